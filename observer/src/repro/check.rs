//! Whether the observer's stream holds every step a scenario made: exactly one
//! matching event each.

use serde_json::Value;

use super::ctx::Step;

/// The event fields a step determines.
pub fn matches(step: &Step, e: &Value) -> bool {
    let Some(event) = step.event.as_deref() else {
        return false;
    };
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
/// than once, and per EADDRINUSE failure of process `waited` (whose steps
/// waited for their record: see `shared`) whose record does not carry the
/// rule the explain engine predicted for it.
pub fn problems(steps: &[Step], events: &[Value], waited: u32) -> Vec<String> {
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
            (n != 1).then(|| {
                format!(
                    "{} / {}: {} {} event(s) in the stream, want 1 ({}:{} fd {} tid {} errno {})",
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
