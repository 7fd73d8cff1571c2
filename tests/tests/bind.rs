//! The `bind` event against the real kernel: every bind the workload made is in
//! the stream exactly once, field by field, and the observer changes no result.

use std::collections::BTreeSet;

use observer_tests::{
    observer::Observer,
    require_root,
    workload::{Op, matches, run_bind_sequence},
};
use serde_json::Value;

/// From 5.15 (`bpf_task_pt_regs`) one program per call is the design: a
/// program the verifier refuses must not fall back to the entry hooks unseen.
#[test]
fn one_program_per_call_where_the_registers_can_be_read() {
    require_root!();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut v = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (v.next().unwrap_or(0), v.next().unwrap_or(0));
    let (obs, start) = Observer::start(&[]);
    let done = obs.stop();
    assert!(done.status.success(), "{}", done.stderr);
    let hooks: Vec<&str> = start["hooks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        hooks.contains(&"tracepoint/syscalls/sys_exit_bind"),
        "{hooks:?}"
    );
    let entries = hooks
        .iter()
        .any(|h| h.starts_with("tracepoint/syscalls/sys_enter_"));
    assert_eq!(
        entries,
        (major, minor) < (5, 15),
        "kernel {release}: hooks {hooks:?}"
    );
}

#[test]
fn every_bind_is_reported_exactly_once() {
    require_root!();
    let (obs, _start) = Observer::start(&[]);
    let ops = run_bind_sequence();
    let done = obs.stop();
    assert!(
        done.status.success(),
        "observer failed: {}\n{}",
        done.status,
        done.stderr
    );

    let pids: Vec<u32> = ops
        .iter()
        .map(|o| o.pid)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let binds = done.binds_of(&pids);
    for op in &ops {
        let expected = op.expected();
        let found: Vec<&Value> = binds.iter().filter(|e| matches(e, &expected)).collect();
        if found.len() != 1 {
            let near: Vec<&Value> = binds
                .iter()
                .filter(|e| e["tid"] == op.tid && e["fd"] == op.fd)
                .collect();
            panic!(
                "{}: {} matching events, want 1\nexpected: {expected}\nsame tid and fd: {near:#?}",
                op.what,
                found.len()
            );
        }
        let e = found[0];
        // Known where the kernel needs the entry tracepoint; null otherwise.
        assert!(
            e["latency_ns"].is_null() || e["latency_ns"].as_u64().is_some_and(|n| n > 0),
            "{}: latency {e}",
            op.what
        );
        assert!(
            e["ts"]
                .as_str()
                .is_some_and(|t| t.ends_with('Z') && t.len() == 30),
            "{}: ts {e}",
            op.what
        );
        assert!(
            e["cgroup_id"].as_u64().is_some_and(|n| n > 0),
            "{}: cgroup_id {e}",
            op.what
        );
        assert_eq!(e["v"], 1);
    }
    assert_eq!(
        binds.len(),
        ops.len(),
        "the stream holds binds from the workload that it did not make"
    );

    let records = done.records();
    let stop = records.last().unwrap();
    assert_eq!(stop["event"], "observer_stop", "last record: {stop}");
    assert_eq!(stop["reason"], "SIGINT");
    let streamed = records.iter().filter(|r| r["event"] == "bind").count() as u64;
    assert_eq!(
        stop["totals"]["bind"], streamed,
        "totals.bind counts the bind records"
    );
    assert_eq!(stop["lost"], 0, "no event lost at this rate");
}

#[test]
fn observer_does_not_change_bind_results() {
    require_root!();
    let outcomes = |ops: &[Op]| {
        let mut v: Vec<(String, i32)> = ops.iter().map(|o| (o.what.clone(), o.errno)).collect();
        v.sort();
        v
    };
    let bare = run_bind_sequence();
    let (obs, _) = Observer::start(&[]);
    let observed = run_bind_sequence();
    let done = obs.stop();
    assert!(
        done.status.success(),
        "observer failed: {}\n{}",
        done.status,
        done.stderr
    );
    assert_eq!(outcomes(&bare), outcomes(&observed));
}

#[test]
fn a_full_ring_buffer_is_reported_as_lost() {
    require_root!();
    // One page of ring buffer, and a reader that is stopped while the workload
    // binds: most records cannot be delivered, and each must be counted.
    let (obs, start) = Observer::start(&["--ring-buffer", "4096"]);
    assert_eq!(start["ring_buffer_bytes"], 4096);
    obs.signal(libc::SIGSTOP);
    const BINDS: usize = 500;
    let ops = std::thread::spawn(|| {
        observer_tests::workload::enter_private_netns();
        let mut w = observer_tests::workload::Workload::default();
        let eph: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
        for _ in 0..BINDS {
            let s = observer_tests::workload::Workload::socket(&eph, false, false, false).unwrap();
            assert_eq!(w.bind("burst", s, eph, false), 0);
        }
        w.ops
    })
    .join()
    .unwrap();
    obs.signal(libc::SIGCONT);
    let done = obs.stop();
    assert!(done.status.success(), "{}: {}", done.status, done.stderr);

    let seen = done.binds_of(&[ops[0].pid]).len();
    let records = done.records();
    let lost_records: Vec<&Value> = records.iter().filter(|r| r["event"] == "lost").collect();
    let lost: u64 = lost_records
        .iter()
        .map(|r| r["count"].as_u64().unwrap())
        .sum();
    assert!(
        lost_records.iter().all(|r| r["cause"] == "ring_buffer"),
        "{lost_records:?}"
    );
    assert!(
        seen < BINDS,
        "a stopped reader and one page cannot hold {BINDS} records"
    );
    assert!(
        seen as u64 + lost >= BINDS as u64,
        "{seen} delivered + {lost} reported lost < {BINDS} binds made: events lost silently"
    );
    assert_eq!(
        records.last().unwrap()["lost"],
        lost,
        "observer_stop.lost sums the lost records"
    );
}

/// setsockopt(fd, level, name, 1).
fn set_flag(fd: i32, level: i32, name: i32) {
    let one: libc::c_int = 1;
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "setsockopt: {}", std::io::Error::last_os_error());
}

#[test]
fn freebind_transparent_and_bind_address_no_port_are_read() {
    require_root!();
    use std::os::fd::AsRawFd;
    // (what, address, options set): each bind's record must say true for
    // exactly the options set on its socket, false for the others.
    const FREEBIND: &str = "freebind";
    const TRANSPARENT: &str = "transparent";
    const NO_PORT: &str = "bind_address_no_port";
    let plan: &[(&str, &str, &[&str])] = &[
        ("none set", "127.0.0.1:0", &[]),
        // Not a local address: only IP_FREEBIND lets this bind succeed.
        ("freebind v4", "192.0.2.99:9000", &[FREEBIND]),
        ("freebind v6", "[2001:db8::99]:9000", &[FREEBIND]),
        ("transparent", "127.0.0.1:0", &[TRANSPARENT]),
        ("transparent v6", "[::1]:0", &[TRANSPARENT]),
        ("no port", "127.0.0.1:0", &[NO_PORT]),
        (
            "all three",
            "192.0.2.98:0",
            &[FREEBIND, TRANSPARENT, NO_PORT],
        ),
    ];
    let (obs, _) = Observer::start(&["--events", "bind"]);
    let (pid, ops) = std::thread::spawn(move || {
        observer_tests::workload::enter_private_netns();
        let mut w = observer_tests::workload::Workload::default();
        let mut ops = Vec::new();
        for &(what, addr, set) in plan {
            let addr: std::net::SocketAddr = addr.parse().unwrap();
            let s = observer_tests::workload::Workload::socket(&addr, false, false, false).unwrap();
            let fd = s.as_raw_fd();
            let v6 = addr.is_ipv6();
            for &o in set {
                let (level, name) = match (o, v6) {
                    (FREEBIND, false) => (libc::IPPROTO_IP, libc::IP_FREEBIND),
                    (FREEBIND, true) => (libc::IPPROTO_IPV6, libc::IPV6_FREEBIND),
                    (TRANSPARENT, false) => (libc::IPPROTO_IP, libc::IP_TRANSPARENT),
                    (TRANSPARENT, true) => (libc::IPPROTO_IPV6, libc::IPV6_TRANSPARENT),
                    _ => (libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT),
                };
                set_flag(fd, level, name);
            }
            assert_eq!(w.bind(what, s, addr, false), 0, "{what}");
            ops.push((w.ops.last().unwrap().clone(), set));
        }
        (std::process::id(), ops)
    })
    .join()
    .unwrap();
    let done = obs.stop();
    assert!(done.status.success(), "{}", done.stderr);
    let binds = done.binds_of(&[pid]);
    for (op, set) in ops {
        let mut expected = op.expected();
        for o in [FREEBIND, TRANSPARENT, NO_PORT] {
            expected["options"][o] = serde_json::json!(set.contains(&o));
        }
        let found: Vec<&Value> = binds.iter().filter(|e| matches(e, &expected)).collect();
        assert_eq!(
            found.len(),
            1,
            "{}: want {expected}\nrecords: {binds:#?}",
            op.what
        );
    }
}
