//! Start, stop and clean-up of the daemon: nothing of ours stays in the kernel.

use observer_tests::{
    observer::{Observer, loaded_prog_ids, still_loaded},
    require_root,
};
use std::time::Duration;

use serde_json::Value;

/// The syscall exits, reading the arguments from the registers (5.15+).
const HOOKS: [&str; 6] = [
    "tracepoint/syscalls/sys_exit_bind",
    "tracepoint/syscalls/sys_exit_listen",
    "tracepoint/syscalls/sys_exit_connect",
    "raw_tracepoint/softirq_exit",
    "raw_tracepoint/softirq_entry",
    "tracepoint/sock/inet_sock_set_state",
];

/// The same on a kernel whose registers cannot be read at the exit.
const HOOKS_WITH_ENTRY: [&str; 9] = [
    "tracepoint/syscalls/sys_exit_bind",
    "tracepoint/syscalls/sys_exit_listen",
    "tracepoint/syscalls/sys_exit_connect",
    "tracepoint/syscalls/sys_enter_bind",
    "tracepoint/syscalls/sys_enter_listen",
    "tracepoint/syscalls/sys_enter_connect",
    "raw_tracepoint/softirq_exit",
    "raw_tracepoint/softirq_entry",
    "tracepoint/sock/inet_sock_set_state",
];

/// Attached too where the kernel's TIME_WAIT timer handler can be found.
const TIMER_HOOKS: [&str; 3] = [
    "raw_tracepoint/timer_expire_entry",
    "raw_tracepoint/timer_cancel",
    "raw_tracepoint/timer_start",
];

/// `tw_timer_handler` is in /proc/kallsyms with a real address.
fn kernel_has_tw_timer_handler() -> bool {
    std::fs::read_to_string("/proc/kallsyms")
        .unwrap()
        .lines()
        .any(|l| l.ends_with(" tw_timer_handler") && !l.starts_with("0000000000000000"))
}

fn prog_ids(start: &Value) -> Vec<u32> {
    start["prog_ids"]
        .as_array()
        .expect("prog_ids")
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

fn check_start(start: &Value) -> Vec<u32> {
    assert_eq!(start["v"], 1);
    assert_eq!(start["version"], env!("CARGO_PKG_VERSION"));
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(start["kernel"], release.trim());
    let hooks: Vec<&str> = start["hooks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap())
        .collect();
    let mut want = if hooks.contains(&"tracepoint/syscalls/sys_enter_bind") {
        HOOKS_WITH_ENTRY.to_vec()
    } else {
        HOOKS.to_vec()
    };
    if kernel_has_tw_timer_handler() {
        want.extend(TIMER_HOOKS);
    }
    assert_eq!(hooks, want);
    let ids = prog_ids(start);
    assert_eq!(ids.len(), want.len());
    let loaded = loaded_prog_ids();
    for id in &ids {
        assert!(
            loaded.contains(id),
            "program {id} is not loaded while the observer runs"
        );
    }
    ids
}

fn check_gone(ids: &[u32]) {
    check_gone_within(ids, Duration::from_secs(2));
}

fn check_gone_within(ids: &[u32], within: Duration) {
    let left = still_loaded(ids, within);
    assert!(
        left.is_empty(),
        "programs still loaded after exit: {left:?}"
    );
}

#[test]
fn duration_stops_by_itself_and_detaches() {
    require_root!();
    let (obs, start) = Observer::start(&["--duration", "1"]);
    let ids = check_start(&start);
    let done = obs.wait();
    assert!(done.status.success(), "{}: {}", done.status, done.stderr);
    let records = done.records(); // every stdout line is a JSON object
    let stop = records.last().unwrap();
    assert_eq!(stop["event"], "observer_stop");
    assert_eq!(stop["reason"], "duration");
    assert!(
        stop["totals"]["bind"].is_u64() && stop["lost"].is_u64(),
        "{stop}"
    );
    assert!(!done.stderr.contains("panicked"), "{}", done.stderr);
    check_gone(&ids);
}

#[test]
fn sigterm_and_sigint_stop_cleanly_and_detach() {
    require_root!();
    for (sig, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGINT, "SIGINT")] {
        let (obs, start) = Observer::start(&[]);
        let ids = check_start(&start);
        obs.signal(sig);
        let done = obs.wait();
        assert!(
            done.status.success(),
            "{name}: {}: {}",
            done.status,
            done.stderr
        );
        let records = done.records();
        assert_eq!(records.last().unwrap()["reason"], name);
        check_gone(&ids);
    }
}

#[test]
fn sigkill_leaves_nothing_loaded() {
    require_root!();
    let (obs, start) = Observer::start(&[]);
    let ids = check_start(&start);
    obs.signal(libc::SIGKILL);
    let done = obs.wait();
    assert!(!done.status.success());
    // Links are owned by the process's fds: the kernel releases them at exit.
    // Program release is deferred (RCU), so allow it a moment.
    check_gone_within(&ids, Duration::from_secs(5));
}

#[test]
fn closed_stdout_ends_quietly_and_detaches() {
    require_root!();
    use std::io::{BufRead, BufReader};
    // `observer run | head -n 1`: the reader goes away after the first line.
    let mut child = std::process::Command::new(observer_tests::observer::observer_bin())
        .arg("run")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap(); // the reader is dropped here: the pipe is closed
    let start: Value = serde_json::from_str(&first).unwrap();
    let ids = prog_ids(&start);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "exit {}", out.status);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.lines().all(|l| l.contains("tracefs")),
        "closed stdout must end quietly, stderr: {stderr}"
    );
    check_gone(&ids);
}
