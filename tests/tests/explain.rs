//! `observer explain` and `observer who` against sockets in a private namespace.

use std::{net::TcpListener, process::Command, sync::mpsc, time::Duration};

use observer_tests::{observer::observer_bin, require_root, workload::enter_private_netns};
use serde_json::Value;

/// A thread in a new namespace holding a wildcard listener on 8080, a
/// SO_REUSEPORT listener of uid 0 on 8081, a TCP socket bound to 8083 and
/// nothing more, and three TIME_WAIT sockets of a server on 8084 (a listener
/// there too); returns the namespace's path.
fn namespace_with_listeners() -> (String, mpsc::Sender<()>) {
    let (path_tx, path_rx) = mpsc::channel();
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        enter_private_netns();
        let _wild = TcpListener::bind("0.0.0.0:8080").unwrap();
        let rp = observer_tests::workload::Workload::socket(
            &"127.0.0.1:8081".parse().unwrap(),
            true,
            false,
            true,
        )
        .unwrap();
        rp.bind(
            &"127.0.0.1:8081"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
        rp.listen(8).unwrap();
        let bound =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        bound
            .bind(
                &"127.0.0.1:8083"
                    .parse::<std::net::SocketAddr>()
                    .unwrap()
                    .into(),
            )
            .unwrap();
        let server = TcpListener::bind("127.0.0.1:8084").unwrap();
        for _ in 0..3 {
            let mut c = std::net::TcpStream::connect("127.0.0.1:8084").unwrap();
            let (a, _) = server.accept().unwrap();
            drop(a); // the server's FIN first
            let mut buf = [0u8; 1];
            assert_eq!(std::io::Read::read(&mut c, &mut buf).unwrap(), 0);
        } // the clients' FINs: the server's three sockets enter TIME_WAIT
        let tid = unsafe { libc::gettid() };
        path_tx
            .send(format!("/proc/{}/task/{tid}/ns/net", std::process::id()))
            .unwrap();
        let _ = stop_rx.recv_timeout(Duration::from_secs(60));
    });
    (path_rx.recv().unwrap(), stop_tx)
}

fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(observer_bin()).args(args).output().unwrap();
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
    (out.status.code(), String::from_utf8(out.stdout).unwrap())
}

#[test]
fn explain_names_the_holder_and_the_rule() {
    require_root!();
    let (ns, _stop) = namespace_with_listeners();
    let (code, out) = run(&["explain", "127.0.0.1:8080", "--netns", &ns, "--json"]);
    assert_eq!(code, Some(1), "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["would_succeed"], false);
    assert_eq!(v["rule"], "wildcard_overlap");
    let b = &v["blockers"][0];
    assert_eq!(
        (b["state"].as_str(), b["addr"].as_str(), b["port"].as_u64()),
        (Some("LISTEN"), Some("0.0.0.0"), Some(8080))
    );
    assert_eq!(b["pid"], std::process::id(), "the owner, from /proc: {b}");
    assert!(
        v["hint"]
            .as_str()
            .unwrap()
            .contains("0.0.0.0:8080 is held by LISTEN socket of"),
        "{v}"
    );

    // Another uid with SO_REUSEPORT: the uid rule.
    let (code, out) = run(&[
        "explain",
        "127.0.0.1:8081",
        "--reuseport",
        "--uid",
        "1000",
        "--netns",
        &ns,
        "--json",
    ]);
    assert_eq!(code, Some(1));
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["rule"], "reuseport_uid_mismatch", "{v}");

    // A free address: exit 0; before 6.3, which cannot show bound-only
    // sockets, "cannot tell" (3, would_succeed null).
    let (code, out) = run(&["explain", "127.0.0.2:8082", "--netns", &ns, "--json"]);
    let (want, verdict) = if observer_tests::kernel_at_least(6, 3) {
        (0, Value::Bool(true))
    } else {
        (3, Value::Null)
    };
    assert_eq!(code, Some(want), "{out}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["would_succeed"],
        verdict
    );
    // UDP does not collide with the TCP listener.
    assert_eq!(
        run(&["explain", "127.0.0.1:8080", "--udp", "--netns", &ns]).0,
        Some(0)
    );
}

#[test]
fn who_lists_every_socket_on_the_port() {
    require_root!();
    let (ns, _stop) = namespace_with_listeners();
    let (code, out) = run(&["who", "8080", "--netns", &ns, "--json"]);
    assert_eq!(code, Some(0));
    let socks: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(socks.len(), 1, "{out}");
    assert_eq!(
        (socks[0]["proto"].as_str(), socks[0]["state"].as_str()),
        (Some("tcp"), Some("LISTEN"))
    );
    // Text by default, and a bad namespace is one line on stderr.
    let (code, out) = run(&["who", "8081", "--netns", &ns]);
    assert_eq!(code, Some(0));
    assert!(out.lines().count() == 2 && out.contains("LISTEN"), "{out}");

    // A socket bound and doing nothing else is BOUND (listed from 6.3).
    let (_, out) = run(&["who", "8083", "--netns", &ns]);
    if observer_tests::kernel_at_least(6, 3) {
        assert!(out.lines().count() == 2 && out.contains(" BOUND "), "{out}");
    }
    // Every socket, with the filters: each state, the process.
    let json = |args: &[&str]| -> Vec<Value> {
        let mut all = vec!["who", "--netns", &ns, "--json"];
        all.extend(args);
        let (code, out) = run(&all);
        assert_eq!(code, Some(0), "{out}");
        out.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let every = json(&[]);
    let listening = json(&["--state", "listen"]);
    let ports = |v: &[Value]| -> Vec<u64> {
        let mut p: Vec<u64> = v.iter().map(|s| s["port"].as_u64().unwrap()).collect();
        p.sort();
        p
    };
    assert_eq!(ports(&listening), [8080, 8081, 8084], "{listening:?}");
    let waiting = json(&["--state", "TIME_WAIT"]);
    assert_eq!(ports(&waiting), [8084; 3], "{waiting:?}");
    let mine = json(&["--pid", &std::process::id().to_string()]);
    let bound_listed = usize::from(observer_tests::kernel_at_least(6, 3));
    // Ours: the three listeners, the bound one where listed; TIME_WAIT sockets have no owner.
    assert_eq!(mine.len(), 3 + bound_listed, "{mine:?}");
    assert_eq!(every.len(), 3 + bound_listed + 3, "{every:?}");
    // The count per port and state.
    let counts = json(&["--summary"]);
    assert_eq!(
        (
            &counts[0]["proto"],
            &counts[0]["port"],
            &counts[0]["state"],
            &counts[0]["count"]
        ),
        (
            &Value::from("tcp"),
            &Value::from(8084),
            &Value::from("TIME_WAIT"),
            &Value::from(3)
        ),
        "{counts:?}"
    );
    assert_eq!(counts.len(), 4 + bound_listed, "{counts:?}");
    let (code, text) = run(&["who", "--netns", &ns, "--summary", "--state", "TIME_WAIT"]);
    assert_eq!(code, Some(0));
    assert!(
        text.contains("8084") && text.contains("TIME_WAIT") && text.trim_end().ends_with('3'),
        "{text}"
    );
    // `observer who | head`: a reader gone before the table is written ends it quietly.
    let mut child = Command::new(observer_bin())
        .args(["who", "--netns", &ns])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let bad = Command::new(observer_bin())
        .args(["who", "--state", "NOPE"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    let bad = Command::new(observer_bin())
        .args(["who", "1", "--netns", "/nonexistent"])
        .output()
        .unwrap();
    // Checked when the command line is read: a usage error.
    assert_eq!(bad.status.code(), Some(2));
    assert_eq!(String::from_utf8_lossy(&bad.stderr).lines().count(), 1);
}

/// What the kernel refuses before the port: each says the errno the kernel
/// would answer, and its rule (the repro scenario `addresses` checks the same
/// verdicts against real binds).
#[test]
fn explain_knows_the_checks_before_the_port() {
    require_root!();
    let (ns, _stop) = namespace_with_listeners();
    for (args, errno, rule) in [
        (
            &["1.2.3.4:80"][..],
            Some("EADDRNOTAVAIL"),
            Some("address_not_local"),
        ),
        (
            &["[fe80::1]:80"],
            Some("EINVAL"),
            Some("link_local_needs_scope"),
        ),
        (
            &["[fe80::1%lo]:80"],
            Some("EADDRNOTAVAIL"),
            Some("address_not_local"),
        ),
        (
            &["127.0.0.1:80", "--uid", "65534"],
            Some("EACCES"),
            Some("privileged_port"),
        ),
        (&["127.0.0.1:1024", "--uid", "65534"], None, None),
        (&["::ffff:127.0.0.1:9000"], None, None),
        (&["192.0.2.99:9000", "--freebind"], None, None),
    ] {
        let mut all = vec!["explain", "--json", "--netns", &ns];
        all.extend_from_slice(args);
        let (code, out) = run(&all);
        let v: Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"));
        // Before 6.3 a TCP bind nothing visibly blocks cannot be judged (3).
        let ok = if observer_tests::kernel_at_least(6, 3) {
            0
        } else {
            3
        };
        assert_eq!(
            code,
            Some(if errno.is_some() { 1 } else { ok }),
            "{args:?}: {out}"
        );
        assert_eq!(
            (v["errno"].as_str(), v["rule"].as_str()),
            (errno, rule),
            "{args:?}: {out}"
        );
    }
}
