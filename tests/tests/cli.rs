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
    for (args, names) in [
        (&["run", "--bogus"][..], "--bogus"),
        (&["run", "--duration", "soon"], "--duration"),
        (&["run", "--ring-buffer", "1000"], "--ring-buffer"),
        (&["run", "-P", "notaport"], "--port"),
        (&["run", "-p", "-3"], "--pid"),
        (&["run", "--events", "bind,nope"], "--events"),
        (&["run", "--cgroup", "/nonexistent"], "--cgroup"),
        (&["run", "--netns", "/nonexistent"], "--netns"),
        (&["run", "--format", "xml"], "--format"),
        (&["run", "--metrics", "9464"], "--metrics"),
        (&["run", "--metrics", "localhost:9464"], "is not ADDR:PORT"),
        (&["launch"], "launch"),
        // Each names its flag, and what would be accepted.
        (&["run", "--stats", "1e-10"], "at least 0.1"),
        (&["run", "--stats", "0.000000001"], "--stats"),
        (&["run", "--stats", "-1"], "--stats"),
        (&["run", "--duration", "-1"], "--duration"),
        (&["run", "--netns", "-1"], "--netns"),
        (
            &["run", "--netns", "/etc/passwd"],
            "not a network namespace",
        ),
        (
            &["run", "--ring-buffer", "4294967296"],
            "maximum is 1073741824",
        ),
        (&["run", "--ring-buffer", "2147483648"], "maximum"),
        (&["run", "--ring-buffer", "-4096"], "--ring-buffer"),
        (&["run", "--cgroup", "/proc"], "not a cgroup2 directory"),
        (
            &["run", "--events", "foo"],
            "possible values: bind, tcp_state",
        ),
        (&["run", "--format", "xml"], "json, text"),
        (&["explain"], "<ADDR:PORT>"),
        (&["explain", "--uid", "-1", "127.0.0.1:80"], "--uid"),
        (&["explain", "127.0.0.1"], "ADDR:PORT"),
        (
            &["explain", "--netns", "/etc/passwd", "127.0.0.1:80"],
            "--netns",
        ),
        (&["who", "--state", "NOPE"], "--state"),
        (&["who", "99999"], "99999"),
        (&["run", "-o", "/proc/version"], "--output /proc/version"),
    ] {
        let out = Command::new(observer_bin()).args(args).output().unwrap();
        let line = one_line_error(&out, 2);
        assert!(
            line.starts_with("observer: ") && line.contains(names),
            "{args:?}: {line}"
        );
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
    for args in [&["run", "--duration", "1"][..], &["check"]] {
        let out = Command::new(&bin)
            .args(args)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        let line = one_line_error(&out, 1);
        assert!(
            line.contains("root") && line.contains("CAP_BPF"),
            "{args:?}: {line}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn check_says_this_kernel_can_run_it() {
    observer_tests::require_root!();
    let out = Command::new(observer_bin()).arg("check").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("ok   tracepoint/syscalls/sys_exit_bind")),
        "{stdout}"
    );
    assert!(stdout.lines().all(|l| !l.starts_with("FAIL")), "{stdout}");
    assert!(stdout.ends_with("observer can run here\n"), "{stdout}");
}
