//! `observer run --repro all`: every step the workload logged is in the stream
//! exactly once, field by field.

use std::process::Command;

use observer_tests::{observer::observer_bin, require_root};
use serde_json::Value;

fn lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// The fields of the stream's event that a step determines.
fn same(step: &Value, e: &Value) -> bool {
    if step["call"] == "port_pressure" {
        let p = &step["pressure"];
        return e["event"] == "port_pressure"
            && e["netns"] == step["netns"]
            && e["addr"] == step["addr"]
            && [
                "proto", "scope", "port", "in_use", "range", "level", "previous",
            ]
            .iter()
            .all(|k| e[*k] == p[*k]);
    }
    let common = ["pid", "tid", "netns", "fd", "errno"]
        .iter()
        .all(|k| e[*k] == step[*k])
        && e["event"] == step["event"];
    common
        && match step["call"].as_str().unwrap() {
            "bind" => {
                e["addr"] == step["addr"]
                    && e["port"] == step["port"]
                    && e["proto"] == step["proto"]
                    && e["options"]["reuseaddr"] == step["reuseaddr"]
                    && e["options"]["reuseport"] == step["reuseport"]
                    && e["sock_ino"] == step["sock_ino"]
            }
            "listen" => e["laddr"] == step["addr"] && e["lport"] == step["port"],
            "connect" => e["daddr"] == step["addr"] && e["dport"] == step["port"],
            other => panic!("unknown call {other}"),
        }
}

/// A port_pressure step as the record it predicts (to count its twins).
fn pressure_as_event(step: &Value) -> Value {
    if step["call"] != "port_pressure" {
        return Value::Null;
    }
    let mut e = step["pressure"].clone();
    e["event"] = "port_pressure".into();
    e["netns"] = step["netns"].clone();
    e["addr"] = step["addr"].clone();
    e
}

#[test]
fn every_scenario_step_is_in_the_stream_exactly_once() {
    require_root!();
    let log = std::env::temp_dir().join(format!("observer-repro-{}.jsonl", std::process::id()));
    let out = Command::new(observer_bin())
        .args(["run", "--repro", "all", "--repro-log"])
        .arg(&log)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {}: {stderr}", out.status);
    let steps = lines(&std::fs::read_to_string(&log).unwrap());
    std::fs::remove_file(&log).unwrap();
    let events = lines(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(events[0]["event"], "observer_start");
    assert_eq!(events.last().unwrap()["reason"], "repro");

    let names: std::collections::BTreeSet<&str> = steps
        .iter()
        .map(|s| s["scenario"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 7, "every scenario ran: {names:?}");
    assert!(
        steps.iter().all(|s| s["ok"] == true),
        "every kernel answer as expected"
    );
    let observable: Vec<&Value> = steps.iter().filter(|s| !s["event"].is_null()).collect();
    assert!(
        observable.len() > 50,
        "{} observable steps",
        observable.len()
    );
    for s in &observable {
        let n = events.iter().filter(|e| same(s, e)).count();
        // A namespace's inode number is reused once it is gone: steps of two
        // namespaces may predict the same port_pressure record, each once.
        let want = observable
            .iter()
            .filter(|o| same(o, &pressure_as_event(s)))
            .count()
            .max(1);
        assert_eq!(n, want, "{n} events for step {s}");
    }
    // ephemeral-exhaustion: its 20-port range crossed 80 % and 95 % and came
    // back, per part and pair: every port_pressure record of the scenarios'
    // namespaces was predicted by a step, none is missing, none extra.
    let predicted: Vec<&&Value> = observable
        .iter()
        .filter(|s| s["call"] == "port_pressure")
        .collect();
    let written: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "port_pressure")
        .collect();
    assert!(
        predicted.len() >= 16,
        "{} port_pressure steps",
        predicted.len()
    );
    assert_eq!(predicted.len(), written.len(), "{written:#?}");
    for (level, previous, in_use) in [(80, 0, 16), (95, 80, 19), (80, 95, 17), (0, 80, 14)] {
        assert!(
            written.iter().any(|e| e["scope"] == "local"
                && e["addr"] == "127.0.0.1"
                && e["level"] == level
                && e["previous"] == previous
                && e["in_use"] == in_use
                && e["range"] == 20),
            "127.0.0.1 {previous} -> {level} at {in_use} of 20"
        );
    }
    // Explain predicts, the kernel decides: they agree on every bind to a fixed port.
    let predicted: Vec<&Value> = steps
        .iter()
        .filter(|s| !s["explain_verdict"].is_null())
        .collect();
    assert!(predicted.len() > 50, "{} predicted steps", predicted.len());
    for s in &predicted {
        let answer = s["errno"].as_str().unwrap_or("ok");
        assert_eq!(
            s["explain_verdict"], answer,
            "explain disagrees with the kernel: {s}"
        );
        assert_eq!(s["explain_rule"].is_null(), answer == "ok", "{s}");
    }
    assert!(
        steps
            .iter()
            .filter(|s| s["call"] == "bind" && s["port"] != 0)
            .all(|s| !s["explain_verdict"].is_null()),
        "every bind to a fixed port was predicted"
    );
    // In the stream, every EADDRINUSE bind carries an explanation with a rule.
    let in_use: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "bind" && e["errno"] == "EADDRINUSE")
        .collect();
    assert!(!in_use.is_empty());
    for e in &in_use {
        assert!(
            e["explain"]["rule"].is_string() && e["explain"]["hint"].is_string(),
            "{e}"
        );
    }

    // Failures of each kind made it: EADDRINUSE binds, EADDRNOTAVAIL connects,
    // and the binds refused before the port (the `addresses` scenario).
    for (event, errno) in [
        ("bind", "EADDRINUSE"),
        ("connect", "EADDRNOTAVAIL"),
        ("bind", "EADDRNOTAVAIL"),
        ("bind", "EINVAL"),
        ("bind", "EACCES"),
    ] {
        assert!(
            observable
                .iter()
                .any(|s| s["event"] == event && s["errno"] == errno),
            "{event} {errno}"
        );
    }
    // Successful listens and connects make no event.
    let silent = steps.iter().filter(|s| s["event"].is_null()).count();
    assert!(silent > 0);
    let workload_pids: std::collections::BTreeSet<u64> =
        steps.iter().map(|s| s["pid"].as_u64().unwrap()).collect();
    let from_workload = events
        .iter()
        .filter(|e| ["listen", "connect"].contains(&e["event"].as_str().unwrap_or("")))
        .filter(|e| workload_pids.contains(&e["pid"].as_u64().unwrap()))
        .count();
    let failed_calls = observable
        .iter()
        .filter(|s| s["event"] != "bind" && s["event"] != "port_pressure")
        .count();
    assert_eq!(
        from_workload, failed_calls,
        "listen/connect events only for the failures"
    );
}

#[test]
fn repro_cli_lists_and_refuses_unknown_names() {
    let out = Command::new(observer_bin())
        .args(["repro", "--list"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let list = String::from_utf8(out.stdout).unwrap();
    let names: Vec<&str> = list
        .lines()
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "restart-time-wait",
            "wildcard-vs-specific",
            "reuseaddr",
            "reuseport",
            "ephemeral-exhaustion",
            "addresses",
            "udp"
        ]
    );
    for args in [&["repro", "nope"][..], &["run", "--repro", "nope"]] {
        let out = Command::new(observer_bin()).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("'nope'"), "{err}");
    }
}

/// `observer repro all` on its own (no observer): every answer as the tables
/// say, the helpers included (their spec pipe may land on fd 3 already).
#[test]
fn repro_cli_runs_every_scenario() {
    observer_tests::require_root!();
    let out = Command::new(observer_bin())
        .args(["repro", "all"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {}: {stderr}", out.status);
    assert!(!stderr.contains("error:"), "{stderr}");
}
