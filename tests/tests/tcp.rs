//! listen() and connect() failures against the real kernel (TIME_WAIT has
//! its own file, `time_wait.rs`).

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
};

use observer_tests::{
    observer::Observer,
    require_root,
    workload::{Workload, enter_private_netns},
};
use serde_json::Value;
use socket2::{Domain, Socket, Type};

fn tid() -> u32 {
    unsafe { libc::gettid() as u32 }
}

#[test]
fn listen_and_connect_failures() {
    require_root!();
    let (obs, _) = Observer::start(&[]);
    let (pid, tid, fds) = std::thread::spawn(|| {
        enter_private_netns();
        // Two ephemeral ports in this namespace only; the host's range is untouched.
        std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "40000 40001").unwrap();
        let listener = TcpListener::bind("127.0.0.1:7000").unwrap();
        let mut keep = vec![
            TcpStream::connect("127.0.0.1:7000").unwrap(),
            TcpStream::connect("127.0.0.1:7000").unwrap(),
        ];
        let third = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        let err = third
            .connect(&SocketAddr::from((Ipv4Addr::LOCALHOST, 7000)).into())
            .unwrap_err();
        assert_eq!(
            err.raw_os_error(),
            Some(libc::EADDRNOTAVAIL),
            "ephemeral ports exhausted"
        );

        // Two sockets share 127.0.0.1:7001 while neither listens; the second listen fails.
        let a = Workload::socket(&"127.0.0.1:7001".parse().unwrap(), true, true, false).unwrap();
        let b = Workload::socket(&"127.0.0.1:7001".parse().unwrap(), true, true, false).unwrap();
        a.bind(&"127.0.0.1:7001".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        b.bind(&"127.0.0.1:7001".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        a.listen(8).unwrap();
        let err = b.listen(8).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EADDRINUSE));
        // A unix socket has no local address or port: those stay null.
        let unix = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
        let err = unix
            .connect(&socket2::SockAddr::unix(UNIX_NOWHERE).unwrap())
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
        let fds = (third.as_raw_fd(), b.as_raw_fd(), unix.as_raw_fd());
        keep.push(listener.accept().unwrap().0);
        (std::process::id(), tid(), fds)
    })
    .join()
    .unwrap();
    let end = obs.stop();
    assert!(end.status.success(), "{}: {}", end.status, end.stderr);
    let records = end.records();
    let mine: Vec<&Value> = records
        .iter()
        .filter(|v| {
            (v["event"] == "listen" || v["event"] == "connect")
                && v["tid"] == tid
                && v["pid"] == pid
        })
        .collect();
    assert_eq!(
        mine.len(),
        3,
        "only the three failures are reported: {mine:#?}"
    );
    let connect = mine
        .iter()
        .find(|v| v["event"] == "connect" && v["fd"] == fds.0)
        .expect("connect failure");
    assert_eq!(connect["fd"], fds.0);
    assert_eq!(connect["errno"], "EADDRNOTAVAIL");
    assert_eq!(connect["ret"], -libc::EADDRNOTAVAIL);
    assert_eq!(
        (connect["daddr"].as_str(), connect["dport"].as_u64()),
        (Some("127.0.0.1"), Some(7000))
    );
    assert_eq!(
        (connect["family"].as_str(), connect["lport"].as_u64()),
        (Some("inet"), Some(0)),
        "{connect}"
    );
    let listen = mine
        .iter()
        .find(|v| v["event"] == "listen")
        .expect("listen failure");
    assert_eq!(listen["fd"], fds.1);
    assert_eq!(listen["errno"], "EADDRINUSE");
    assert_eq!(
        (listen["laddr"].as_str(), listen["lport"].as_u64()),
        (Some("127.0.0.1"), Some(7001)),
        "{listen}"
    );
    assert_eq!(listen["daddr"], Value::Null);
    let unix = mine
        .iter()
        .find(|v| v["event"] == "connect" && v["fd"] == fds.2)
        .expect("unix connect failure");
    assert_eq!(
        (unix["family"].as_str(), unix["errno"].as_str()),
        (Some("unix"), Some("ENOENT")),
        "{unix}"
    );
    assert_eq!(
        (&unix["laddr"], &unix["lport"], unix["daddr"].as_str()),
        (&Value::Null, &Value::Null, Some(UNIX_NOWHERE)),
        "a unix socket's local end is unknown, not \"::\": {unix}"
    );
}

const UNIX_NOWHERE: &str = "/nonexistent/observer-test.sock";
