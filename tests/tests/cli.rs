//! The real binary's manners on bad input: one line on stderr, a non-zero exit, no panic.

use std::{os::unix::process::CommandExt, process::Command};

use observer_tests::observer::observer_bin;

fn one_line_error(out: &std::process::Output, code: i32) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "stderr: {stderr}");
    assert!(out.stdout.is_empty(), "nothing on stdout");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr}"
    );
    stderr
}

#[test]
fn usage_errors_exit_2_with_one_line() {
    for args in [
        &["run", "--bogus"][..],
        &["run", "--duration", "soon"],
        &["run", "--ring-buffer", "1000"],
        &["launch"],
    ] {
        let out = Command::new(observer_bin()).args(args).output().unwrap();
        let line = one_line_error(&out, 2);
        assert!(line.starts_with("observer: "), "{args:?}: {line}");
    }
}

#[test]
fn not_root_is_a_clear_error() {
    observer_tests::require_root!(); // to become someone else
    // A copy nobody can reach: the build tree may sit under a private directory.
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("observer-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.join("observer");
    std::fs::copy(observer_bin(), &bin).unwrap();
    let out = Command::new(&bin)
        .args(["run", "--duration", "1"])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let line = one_line_error(&out, 1);
    assert!(line.contains("root") && line.contains("CAP_BPF"), "{line}");
}
