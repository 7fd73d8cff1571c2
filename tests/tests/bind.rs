//! The `bind` event against the real kernel: every bind the workload made is in
//! the stream exactly once, field by field, and the observer changes no result.

use std::collections::BTreeSet;

use observer_tests::{
    observer::Observer,
    require_root,
    workload::{Op, matches, run_bind_sequence},
};
use serde_json::Value;

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
