//! Whether the observer's stream holds every step a scenario made: exactly one
//! matching event each.

use serde_json::Value;

use super::ctx::Step;

/// The event fields a step determines.
pub fn matches(step: &Step, e: &Value) -> bool {
    let Some(event) = step.event.as_deref() else {
        return false;
    };
    if let Some(p) = &step.pressure {
        return e["event"] == "port_pressure"
            && e["netns"] == step.netns
            && e["proto"] == p.proto.as_str()
            && e["scope"] == p.scope.as_str()
            && e["addr"] == step.addr.as_str()
            && e["port"] == serde_json::to_value(p.port).unwrap_or_default()
            && e["in_use"] == p.in_use
            && e["range"] == p.range
            && e["level"] == p.level
            && e["previous"] == p.previous;
    }
    let common = e["event"] == event
        && e["pid"] == step.pid
        && e["tid"] == step.tid
        && e["netns"] == step.netns
        && e["fd"] == step.fd
        && e["errno"].as_str() == step.errno.as_deref();
    common
        && match event {
            "bind" => {
                e["addr"] == step.addr.as_str()
                    && e["port"] == step.port
                    && e["proto"] == step.proto.as_str()
                    && e["options"]["reuseaddr"] == step.reuseaddr
                    && e["options"]["reuseport"] == step.reuseport
                    && e["sock_ino"] == step.sock_ino
            }
            "listen" => e["laddr"] == step.addr.as_str() && e["lport"] == step.port,
            "connect" => e["daddr"] == step.addr.as_str() && e["dport"] == step.port,
            _ => false,
        }
}

/// One line per step whose event is missing from `events` or there more
/// than once, per EADDRINUSE failure of process `waited` (whose steps
/// waited for their record: see `shared`) whose record does not carry the
/// rule the explain engine predicted for it, and per `port_pressure` record
/// of a namespace the steps name that no step predicted.
pub fn problems(steps: &[Step], events: &[Value], waited: u32) -> Vec<String> {
    let namespaces: std::collections::HashSet<u64> = steps.iter().map(|s| s.netns).collect();
    let unpredicted = events
        .iter()
        .filter(|e| e["event"] == "port_pressure")
        .filter(|e| e["netns"].as_u64().is_some_and(|n| namespaces.contains(&n)))
        .filter(|e| !steps.iter().any(|s| s.pressure.is_some() && matches(s, e)))
        .map(|e| format!("a port_pressure record no step predicted: {e}"));
    steps
        .iter()
        .filter(|s| s.event.is_some())
        .filter_map(|s| {
            let found: Vec<&Value> = events.iter().filter(|e| matches(s, e)).collect();
            let n = found.len();
            if n == 1
                && s.pid == waited
                && s.errno.as_deref() == Some("EADDRINUSE")
                && let Some(rule) = s.explain_rule
            {
                let want = serde_json::to_value(rule).unwrap_or_default();
                let got = &found[0]["explain"]["rule"];
                return (*got != want).then(|| {
                    format!(
                        "{} / {}: explained as {got}, the engine predicted {want}",
                        s.scenario, s.step
                    )
                });
            }
            // A namespace's inode number is reused once it is gone: steps of
            // two namespaces may predict the same record, each once.
            let want = if s.pressure.is_some() {
                steps.iter().filter(|o| o.pressure.is_some() && o.pressure == s.pressure && o.netns == s.netns && o.addr == s.addr).count()
            } else {
                1
            };
            (n != want).then(|| {
                format!(
                    "{} / {}: {} {} event(s) in the stream, want {want} ({}:{} fd {} tid {} errno {})",
                    s.scenario,
                    s.step,
                    n,
                    s.event.as_deref().unwrap_or(""),
                    s.addr,
                    s.port,
                    s.fd,
                    s.tid,
                    s.errno.as_deref().unwrap_or("none")
                )
            })
        })
        .chain(unpredicted)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn step(call: &str, errno: Option<&str>) -> Step {
        Step {
            scenario: "s".into(),
            step: "t".into(),
            call: call.into(),
            event: if call == "bind" || errno.is_some() {
                Some(call.into())
            } else {
                None
            },
            pid: 1,
            tid: 2,
            netns: 3,
            fd: 4,
            proto: "tcp".into(),
            addr: "127.0.0.1".into(),
            port: 5700,
            reuseaddr: true,
            reuseport: false,
            sock_cookie: 9,
            sock_ino: 99,
            expected: errno.map(str::to_owned),
            errno: errno.map(str::to_owned),
            ok: true,
            explain_verdict: None,
            explain_rule: None,
            pressure: None,
        }
    }

    fn bind_event() -> Value {
        json!({"event": "bind", "pid": 1, "tid": 2, "netns": 3, "fd": 4, "addr": "127.0.0.1", "port": 5700,
               "proto": "tcp", "options": {"reuseaddr": true, "reuseport": false}, "errno": "EADDRINUSE", "sock_ino": 99})
    }

    #[test]
    fn bind_matches_field_by_field() {
        let s = step("bind", Some("EADDRINUSE"));
        assert!(matches(&s, &bind_event()));
        for (k, v) in [
            ("tid", json!(3)),
            ("errno", Value::Null),
            ("port", json!(5701)),
            ("sock_ino", json!(100)),
        ] {
            let mut e = bind_event();
            e[k] = v;
            assert!(!matches(&s, &e), "{k}");
        }
        let mut e = bind_event();
        e["options"]["reuseaddr"] = json!(false);
        assert!(!matches(&s, &e));
    }

    #[test]
    fn missing_and_doubled_are_problems_and_silent_calls_are_not() {
        let s = step("bind", Some("EADDRINUSE"));
        assert_eq!(
            problems(std::slice::from_ref(&s), &[bind_event()], 0),
            Vec::<String>::new()
        );
        assert_eq!(problems(std::slice::from_ref(&s), &[], 0).len(), 1);
        assert_eq!(
            problems(std::slice::from_ref(&s), &[bind_event(), bind_event()], 0).len(),
            1
        );
        // A successful listen has no event to find.
        assert!(problems(&[step("listen", None)], &[], 0).is_empty());
        let failed = step("connect", Some("EADDRNOTAVAIL"));
        let e = json!({"event": "connect", "pid": 1, "tid": 2, "netns": 3, "fd": 4, "daddr": "127.0.0.1", "dport": 5700, "errno": "EADDRNOTAVAIL"});
        assert!(problems(&[failed], &[e], 0).is_empty());
    }

    #[test]
    fn port_pressure_records_are_held_to_the_steps_exactly() {
        let mut s = step("port_pressure", None);
        s.event = Some("port_pressure".into());
        s.pressure = Some(super::super::ctx::PressureStep {
            proto: "tcp".into(),
            scope: "destination".into(),
            port: Some(7000),
            in_use: 16,
            range: 20,
            level: 80,
            previous: 0,
        });
        s.port = 7000;
        let record = json!({"event": "port_pressure", "netns": 3, "proto": "tcp", "scope": "destination",
            "addr": "127.0.0.1", "port": 7000, "in_use": 16, "range": 20, "level": 80, "previous": 0});
        assert!(problems(std::slice::from_ref(&s), std::slice::from_ref(&record), 1).is_empty());
        let mut other = record.clone();
        other["in_use"] = json!(17);
        assert!(!matches(&s, &other));
        // Predicted but missing; written but not predicted; another namespace's: not ours.
        assert_eq!(problems(std::slice::from_ref(&s), &[], 1).len(), 1);
        let p = problems(
            std::slice::from_ref(&s),
            &[record.clone(), other.clone()],
            1,
        );
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("no step predicted"), "{p:?}");
        other["netns"] = json!(4);
        assert!(problems(&[s], &[record, other], 1).is_empty());
    }

    #[test]
    fn a_waited_failure_carries_the_predicted_rule() {
        let mut s = step("bind", Some("EADDRINUSE"));
        s.explain_rule = Some(crate::explain::rules::Rule::ListenerConflict);
        let mut e = bind_event();
        e["explain"] = json!({"rule": "no_blocker"});
        // Another process's step (a helper's) is not held to it.
        assert!(problems(std::slice::from_ref(&s), std::slice::from_ref(&e), 2).is_empty());
        let p = problems(std::slice::from_ref(&s), std::slice::from_ref(&e), 1);
        assert_eq!(p.len(), 1);
        assert!(p[0].contains("explained as \"no_blocker\""), "{p:?}");
        e["explain"]["rule"] = json!("listener_conflict");
        assert!(problems(&[s], &[e], 1).is_empty());
    }
}
