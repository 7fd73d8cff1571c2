//! A root daemon nobody can turn against the host, and no fault that ends it:
//! planted output paths, a full disk, a log directory removed under it, a
//! reader that stops reading, and the repro helper out of reach.

use std::{
    io::Read,
    net::{Ipv4Addr, SocketAddr},
    os::unix::{
        fs::{MetadataExt, PermissionsExt},
        process::CommandExt,
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use observer_tests::{
    observer::{observer_bin, still_loaded},
    require_root,
    workload::enter_private_netns,
};
use serde_json::Value;
use socket2::{Domain, Socket, Type};

/// A directory that, like /tmp, everyone may write into (sticky).
struct SharedDir(PathBuf);

impl SharedDir {
    fn new(name: &str) -> SharedDir {
        let p = std::env::temp_dir().join(format!("observer-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o1777)).unwrap();
        SharedDir(p)
    }
}

impl Drop for SharedDir {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg(&self.0)
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `observer ARGS`, its exit status and stderr.
fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(observer_bin()).args(args).output().unwrap();
    assert!(out.stdout.is_empty(), "nothing on stdout");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn output_refuses_paths_another_user_planted() {
    require_root!();
    let dir = SharedDir::new("planted");
    let victim = dir.0.join("victim");
    std::fs::write(&victim, "secret\n").unwrap();
    let link = dir.0.join("obs.jsonl");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let dangling = dir.0.join("dangling.jsonl");
    let nowhere = dir.0.join("created-by-a-link");
    std::os::unix::fs::symlink(&nowhere, &dangling).unwrap();
    let theirs = dir.0.join("theirs.jsonl");
    std::fs::write(&theirs, "").unwrap();
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
    let hardlink = dir.0.join("hard.jsonl");
    std::fs::hard_link(&victim, &hardlink).unwrap();
    for (path, says) in [
        (&link, "symbolic link"),
        (&dangling, "symbolic link"),
        (&theirs, "uid 65534"),
        (&hardlink, "hard links"),
        (&PathBuf::from("/proc/version"), "procfs"),
        (&dir.0, "directory"),
    ] {
        let (code, stderr) = run(&["run", "-o", path.to_str().unwrap(), "-d", "1"]);
        assert_eq!(code, Some(2), "{}: {stderr}", path.display());
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains(&format!("--output {}", path.display())) && stderr.contains(says),
            "{}: {stderr}",
            path.display()
        );
    }
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "secret\n");
    assert!(!nowhere.exists(), "a dangling link created its target");
}

#[test]
fn output_is_created_0640_whatever_the_umask() {
    require_root!();
    let dir = SharedDir::new("umask");
    for umask in [0o077, 0o022, 0o000] {
        let path = dir.0.join(format!("events-{umask:o}.jsonl"));
        let mut cmd = Command::new(observer_bin());
        cmd.args(["run", "-d", "0.5", "-o", path.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: umask() is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                libc::umask(umask);
                Ok(())
            });
        }
        let status = cmd.status().unwrap();
        assert!(status.success());
        let mode = std::fs::metadata(&path).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o640, "umask {umask:o}");
    }
}

/// `n` binds of 127.0.0.1:0, in a private network namespace.
fn bind_storm(n: usize) {
    std::thread::spawn(move || {
        enter_private_netns();
        for _ in 0..n {
            let s = Socket::new(Domain::IPV4, Type::DGRAM, None).unwrap();
            s.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())
                .unwrap();
        }
    })
    .join()
    .unwrap();
}

/// Each thread of `pid`: its name, state, wait channel and kernel stack.
fn where_threads_wait(pid: u32) -> String {
    let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_default();
    let mut out = String::new();
    let tasks = PathBuf::from(format!("/proc/{pid}/task"));
    for t in std::fs::read_dir(&tasks).into_iter().flatten().flatten() {
        let d = t.path();
        let stat = read(d.join("stat"));
        let state = stat.rsplit(") ").next().and_then(|r| r.split(' ').next());
        out += &format!(
            "thread {} {} state {} wchan {}\n{}",
            t.file_name().to_string_lossy(),
            read(d.join("comm")).trim(),
            state.unwrap_or("?"),
            read(d.join("wchan")),
            read(d.join("stack")),
        );
    }
    out
}

fn records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("a partial or bad line ({e}): {l}"))
        })
        .collect()
}

fn spawn_to_file(path: &Path, extra: &[&str]) -> Child {
    let mut child = Command::new(observer_bin())
        .args(["run", "-o", path.to_str().unwrap()])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(path).is_ok_and(|s| s.contains("observer_start")) {
        assert!(Instant::now() < deadline, "the observer did not start");
        assert!(child.try_wait().unwrap().is_none(), "the observer exited");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn stop(mut child: Child, sig: i32) -> (std::process::ExitStatus, String) {
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (status, stderr)
}

#[test]
fn a_full_disk_is_counted_and_survived() {
    require_root!();
    let dir = SharedDir::new("full");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs"])
        .arg(&dir.0)
        .status()
        .unwrap();
    assert!(mounted.success(), "mounting a small tmpfs");
    let filler = dir.0.join("filler");
    let events = dir.0.join("events.jsonl");
    let child = spawn_to_file(&events, &["--stats", "1"]);
    // Fill what is left, then make records.
    let _ = std::fs::write(&filler, vec![0u8; 256 * 1024]);
    bind_storm(3000);
    std::thread::sleep(Duration::from_millis(1500));
    std::fs::remove_file(&filler).unwrap();
    bind_storm(10);
    std::thread::sleep(Duration::from_millis(2500));
    let (status, stderr) = stop(child, libc::SIGTERM);
    assert!(status.success(), "{status}: {stderr}");
    let all = records(&events); // every line whole
    let stop = all.last().unwrap();
    assert_eq!(stop["event"], "observer_stop", "{stop}");
    let output_lost = stop["lost_by_cause"]["output"].as_u64().unwrap();
    assert!(output_lost > 0, "the full disk lost records: {stop}");
    let told: u64 = all
        .iter()
        .filter(|r| r["event"] == "lost" && r["cause"] == "output")
        .map(|r| r["count"].as_u64().unwrap())
        .sum();
    assert_eq!(
        told, output_lost,
        "every lost line told once writing worked"
    );
    assert!(
        all.iter()
            .any(|r| r["event"] == "stats" && r["lost_by_cause"]["output"] == output_lost),
        "stats count them"
    );
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("No space left"))
        .collect();
    assert_eq!(warnings.len(), 1, "one warning a minute at most: {stderr}");
    assert!(
        warnings[0].contains(&format!("--output {}", events.display())),
        "{stderr}"
    );
}

#[test]
fn sighup_after_the_log_directory_is_gone_keeps_writing() {
    require_root!();
    let dir = SharedDir::new("gone");
    let logs = dir.0.join("logs");
    std::fs::create_dir(&logs).unwrap();
    let events = logs.join("events.jsonl");
    let mut child = spawn_to_file(&events, &[]);
    std::fs::remove_dir_all(&logs).unwrap();
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP ended the daemon"
    );
    // The directory comes back: the next SIGHUP opens a new file there.
    std::fs::create_dir(&logs).unwrap();
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !events.exists() {
        assert!(
            Instant::now() < deadline,
            "no new file after the second SIGHUP"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    bind_storm(5);
    std::thread::sleep(Duration::from_millis(300));
    let (status, stderr) = stop(child, libc::SIGINT);
    assert!(status.success(), "{status}: {stderr}");
    assert!(
        stderr.contains(&format!("--output {}", events.display()))
            && stderr.contains("still writing"),
        "{stderr}"
    );
    let all = records(&events);
    assert_eq!(all.last().unwrap()["event"], "observer_stop");
}

/// SIGTERM and SIGINT end the daemon quickly whatever its output does: a
/// pipe nobody reads while binds storm, and a file under the same storm.
#[test]
fn signals_end_the_daemon_with_a_stalled_output() {
    require_root!();
    let dir = SharedDir::new("stalled");
    for (sig, to_file) in [
        (libc::SIGTERM, false),
        (libc::SIGINT, false),
        (libc::SIGINT, true),
        (libc::SIGTERM, true),
    ] {
        let file = dir.0.join(format!("events-{sig}.jsonl"));
        let mut cmd = Command::new(observer_bin());
        cmd.arg("run").stderr(Stdio::piped());
        if to_file {
            cmd.args(["-o", file.to_str().unwrap()])
                .stdout(Stdio::null());
        } else {
            cmd.stdout(Stdio::piped()); // read by nobody
        }
        let mut child = cmd.spawn().unwrap();
        // Its first record (then the pipe is read no more).
        let deadline = Instant::now() + Duration::from_secs(30);
        let first = if to_file {
            loop {
                let text = std::fs::read_to_string(&file).unwrap_or_default();
                if let Some(line) = text.lines().next() {
                    break line.to_owned();
                }
                assert!(Instant::now() < deadline, "the observer did not start");
                std::thread::sleep(Duration::from_millis(20));
            }
        } else {
            let mut line = String::new();
            let mut out = std::io::BufReader::new(child.stdout.as_mut().unwrap());
            std::io::BufRead::read_line(&mut out, &mut line).unwrap();
            line
        };
        let start: Value = serde_json::from_str(&first).unwrap();
        assert_eq!(start["event"], "observer_start");
        let ids: Vec<u32> = start["prog_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_u64().unwrap() as u32)
            .collect();
        let storm = std::thread::spawn(|| bind_storm(200_000));
        std::thread::sleep(Duration::from_millis(700));
        let sent = Instant::now();
        unsafe { libc::kill(child.id() as i32, sig) };
        let deadline = sent + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() >= deadline {
                // Where each of its threads waits, so an intermittent failure says why.
                let threads = where_threads_wait(child.id());
                let _ = child.kill();
                panic!("signal {sig} (file: {to_file}) did not end the daemon in 10 s:\n{threads}");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        eprintln!(
            "signal {sig}, file output {to_file}: ended in {:?}",
            sent.elapsed()
        );
        storm.join().unwrap();
        assert!(status.success(), "{status}");
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        if !to_file {
            assert!(
                stderr.contains("could not be written to stdout"),
                "{stderr}"
            );
        }
        let left = still_loaded(&ids, Duration::from_secs(2));
        assert!(left.is_empty(), "its programs were detached: {left:?} left");
    }
}

#[test]
fn the_repro_helper_is_out_of_reach() {
    require_root!();
    // No subcommand reaches it.
    let (code, stderr) = run(&["repro-helper", "--scenario", "reuseport", "server"]);
    assert_eq!(code, Some(2), "{stderr}");
    // The environment variable and a pipe, by hand, from a shell: refused too.
    let spec = r#"{"scenario":"restart-time-wait","known":[],"mode":{"Server":{"addr":"127.0.0.1:5799","conns":1,"reuseaddr":false}}}"#;
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo '{spec}' | OBSERVER_REPRO_HELPER_FD=3 {} 3<&0",
            observer_bin()
        ))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("not started by a repro scenario"),
        "{stderr}"
    );
    assert!(
        std::net::TcpListener::bind("127.0.0.1:5799").is_ok(),
        "nothing listens on the host"
    );
}
