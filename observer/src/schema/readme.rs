//! The README's example line of every record kind against the records the
//! code writes: the same fields, nested ones included, with the same JSON
//! types (`null` stands for any type). A field added, renamed or dropped on
//! either side fails here.

use serde_json::{Value, json};

use super::*;
use crate::{clock::Clock, explain::rules};

const README: &str = include_str!("../../../README.md");

/// Every JSON object in the README that has an `event`, in order.
fn readme_records() -> Vec<Value> {
    README
        .lines()
        .filter(|l| l.starts_with("{\"v\":1"))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("README line ({e}): {l}")))
        .collect()
}

/// Where the two differ in shape, as paths; empty when they agree.
fn differences(path: &str, readme: &Value, code: &Value, out: &mut Vec<String>) {
    match (readme, code) {
        (Value::Null, _) | (_, Value::Null) => {}
        (Value::Object(a), Value::Object(b)) => {
            for k in a.keys().filter(|k| !b.contains_key(*k)) {
                out.push(format!(
                    "{path}.{k}: in the README, not written by the code"
                ));
            }
            for k in b.keys().filter(|k| !a.contains_key(*k)) {
                out.push(format!(
                    "{path}.{k}: written by the code, not in the README"
                ));
            }
            for (k, v) in a {
                if let Some(w) = b.get(k) {
                    differences(&format!("{path}.{k}"), v, w, out);
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            if let (Some(x), Some(y)) = (a.first(), b.first()) {
                differences(&format!("{path}[0]"), x, y, out);
            }
        }
        (Value::Number(_), Value::Number(_))
        | (Value::String(_), Value::String(_))
        | (Value::Bool(_), Value::Bool(_)) => {}
        (a, b) => out.push(format!("{path}: README has {a}, the code writes {b}")),
    }
}

fn blocker() -> Holder {
    let mut h = rules::holder(rules::TCP, 6, "127.0.0.1:5700", false, false, 0);
    (h.pid, h.comm) = (Some(1), Some("python3".into()));
    h
}

/// A record of each kind as the code writes it, every optional part filled.
fn code_record(event: &str, with_explain: bool) -> Value {
    let clock = Clock::with_offset(0);
    let explain = with_explain.then(|| {
        std::sync::Arc::new(Explain {
            rule: Rule::TimeWaitWithoutReuseaddr,
            hint: "a hint".into(),
            blockers: vec![blocker()],
        })
    });
    let call = |call| {
        let mut e = Event::of_call(&observer_common::SockCallRecord::zeroed(call));
        if let Event::Listen(c) | Event::Connect(c) = &mut e {
            c.explain = explain.clone();
        }
        e
    };
    let e = match event {
        "observer_start" => Event::ObserverStart(Start {
            version: "0",
            kernel: String::new(),
            pid: 1,
            hooks: vec!["h".into()],
            prog_ids: vec![1],
            cgroup: String::new(),
            ring_buffer_bytes: 1,
        }),
        "bind" => {
            let mut r = observer_common::BindRecord::zeroed();
            r.flags = observer_common::bind::flags::SOCKET;
            let mut b = Bind::from_record(&r);
            b.explain = explain;
            Event::Bind(b)
        }
        "listen" => call(observer_common::sockcall::Call::Listen),
        "connect" => call(observer_common::sockcall::Call::Connect),
        "tcp_state" => Event::TcpState(TcpState::from_record(
            &observer_common::TcpStateRecord::zeroed(),
        )),
        "time_wait_enter" => Event::TimeWaitEnter(TimeWaitEnter::example()),
        "time_wait_exit" => Event::TimeWaitExit(TimeWaitExit::example()),
        "port_pressure" => Event::PortPressure(PortPressure::example()),
        "lost" => Event::Lost(Lost {
            count: 1,
            cause: "ring_buffer",
        }),
        "stats" => Event::Stats(Stats {
            counts: Counts::default(),
            cpu_ms: 0,
            rss_kb: 0,
        }),
        "observer_stop" => Event::ObserverStop(Stop {
            reason: "SIGINT",
            counts: Counts::default(),
            programs: vec![ProgramStats {
                hook: String::new(),
                id: 1,
                run_count: 0,
                run_time_ns: 0,
                recursion_misses: 0,
            }],
        }),
        other => panic!("the README shows an event the test does not know: {other}"),
    };
    assert_eq!(e.name(), event);
    serde_json::to_value(Line::at(&clock, 0, e)).expect("records serialize")
}

#[test]
fn every_record_kind_matches_the_readme() {
    let records = readme_records();
    let mut seen = std::collections::BTreeSet::new();
    let mut problems = Vec::new();
    for r in &records {
        let event = r["event"].as_str().expect("an event name");
        seen.insert(event.to_owned());
        let code = code_record(event, r.get("explain").is_some());
        differences(event, r, &code, &mut problems);
    }
    assert!(problems.is_empty(), "{problems:#?}");
    for e in EVENT_NAMES {
        assert!(seen.contains(e), "the README has no example line of `{e}`");
    }
    // And the shape test itself tells a difference.
    let mut d = Vec::new();
    differences(
        "x",
        &json!({"a": 1, "b": "s"}),
        &json!({"a": "1", "c": 1}),
        &mut d,
    );
    assert_eq!(d.len(), 3, "{d:?}");
}
