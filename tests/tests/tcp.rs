//! TCP states, TIME_WAIT from birth to death, and listen/connect failures,
//! against the real kernel.

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::Duration,
};

use observer_tests::{
    observer::Observer,
    require_root,
    workload::{Workload, enter_private_netns},
};
use serde_json::Value;
use socket2::{Domain, Socket, Type};

const SERVER: u16 = 5800;
// Below the ephemeral range (32768-60999), so the burst never takes them.
const REUSED_CLIENT: u16 = 20000;
const EXPIRED_CLIENT: u16 = 20001;
const BURST: usize = 10_000;

fn netns_of_thread() -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino()
}

fn tid() -> u32 {
    unsafe { libc::gettid() as u32 }
}

/// A client socket bound to a fixed port (SO_REUSEADDR, so it can bind next to
/// that port's TIME_WAIT socket), connected to the server.
fn client_from(port: u16) -> TcpStream {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.set_reuse_address(true).unwrap();
    s.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)).into())
        .unwrap();
    s.connect(&SocketAddr::from((Ipv4Addr::LOCALHOST, SERVER)).into())
        .unwrap();
    s.into()
}

/// What the workload did, for the checks.
struct Done {
    pid: u32,
    netns: u64,
    /// The thread that closed the server side of the two fixed connections.
    closer_tid: u32,
    burst_ports: HashSet<u16>,
    /// Keeps the namespace (and its TIME_WAIT sockets) alive after the thread ends.
    _ns: File,
    _keep: (Vec<TcpStream>, TcpListener),
}

fn workload() -> Done {
    std::thread::Builder::new()
        .name("tw-workload".into())
        .spawn(|| {
            enter_private_netns();
            let netns = netns_of_thread();
            let ns = File::open("/proc/thread-self/ns/net").unwrap();
            let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            s.set_reuse_address(true).unwrap();
            s.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, SERVER)).into())
                .unwrap();
            s.listen(1024).unwrap();
            let listener: TcpListener = s.into();

            // Two connections the server closes first (active close on the server
            // side): their server sockets go to TIME_WAIT.
            for port in [REUSED_CLIENT, EXPIRED_CLIENT] {
                let mut c = client_from(port);
                let (a, _) = listener.accept().unwrap();
                drop(a); // FIN from the server
                let mut buf = [0u8; 1];
                assert_eq!(c.read(&mut buf).unwrap(), 0, "client sees the server's FIN");
                drop(c); // the client's FIN: the server socket enters TIME_WAIT
            }

            // The burst: the clients close first, so the client sockets go to TIME_WAIT.
            let mut burst_ports = HashSet::new();
            let server = SocketAddr::from((Ipv4Addr::LOCALHOST, SERVER));
            for _ in 0..BURST {
                let c = TcpStream::connect(server).unwrap();
                let (mut a, _) = listener.accept().unwrap();
                burst_ports.insert(c.local_addr().unwrap().port());
                drop(c);
                let mut buf = [0u8; 1];
                assert_eq!(a.read(&mut buf).unwrap(), 0);
                drop(a);
            }
            assert_eq!(burst_ports.len(), BURST);

            // Let the observer confirm, then take the first connection's 4-tuple
            // again: the SYN lands on the server's TIME_WAIT socket, which gives way.
            std::thread::sleep(Duration::from_secs(2));
            let mut again = client_from(REUSED_CLIENT);
            let (a, _) = listener.accept().unwrap();
            again.write_all(b"x").unwrap();
            Done {
                pid: std::process::id(),
                netns,
                closer_tid: tid(),
                burst_ports,
                _ns: ns,
                _keep: (vec![again, a], listener),
            }
        })
        .unwrap()
        .join()
        .unwrap()
}

fn is(v: &Value, event: &str, netns: u64) -> bool {
    v["event"] == event && v["netns"] == netns
}

#[test]
fn time_wait_lifecycle_and_a_burst_of_ten_thousand() {
    require_root!();
    let (mut obs, _) = Observer::start(&["--stats", "1"]);
    let done = workload();
    let ns = done.netns;

    // Every TIME_WAIT socket leaves within the kernel's 60 s timer (plus ticks):
    // one bounded wait for all of them.
    let want = BURST + 2;
    let exits = obs.wait_for(want, Duration::from_secs(90), |v| {
        is(v, "time_wait_exit", ns)
    });
    let end = obs.stop();
    assert!(end.status.success(), "{}: {}", end.status, end.stderr);
    assert_eq!(
        exits, want,
        "time_wait_exit records in the workload's namespace"
    );
    let records = end.records();
    let in_ns =
        |event: &str| -> Vec<&Value> { records.iter().filter(|v| is(v, event, ns)).collect() };
    let port = |v: &Value, k: &str| v[k].as_u64().unwrap() as u16;

    // The server side of the first connection: its states, in order.
    let server_side = |v: &&Value| port(v, "sport") == SERVER && port(v, "dport") == REUSED_CLIENT;
    let states: Vec<&Value> = in_ns("tcp_state").into_iter().filter(server_side).collect();
    let fin1 = states
        .iter()
        .find(|v| v["new"] == "FIN_WAIT1")
        .expect("FIN_WAIT1 of the server side");
    let sk = &fin1["sk"];
    let mut path: Vec<(&str, &str)> = states
        .iter()
        .filter(|v| v["sk"] == *sk)
        .map(|v| (v["old"].as_str().unwrap(), v["new"].as_str().unwrap()))
        .collect();
    // A socket's id is its kernel address: the memory may serve a later socket
    // (here, the reconnection on the same tuple) once this one reached CLOSE.
    let close = path
        .iter()
        .position(|&(_, new)| new == "CLOSE")
        .expect("CLOSE");
    path.truncate(close + 1);
    assert_eq!(
        path,
        [
            ("LISTEN", "SYN_RECV"),
            ("SYN_RECV", "ESTABLISHED"),
            ("ESTABLISHED", "FIN_WAIT1"),
            ("FIN_WAIT1", "FIN_WAIT2"),
            ("FIN_WAIT2", "CLOSE")
        ],
        "states of the closing side"
    );
    assert_eq!(
        fin1["pid"], done.pid,
        "close() runs in process context: {fin1}"
    );
    assert_eq!(fin1["tid"], done.closer_tid);
    assert!(
        fin1["prev_state_ms"].as_f64().is_some_and(|ms| ms >= 0.0),
        "{fin1}"
    );

    let enters = in_ns("time_wait_enter");
    let exits = in_ns("time_wait_exit");
    let one = |list: &[&Value], client: u16| -> Value {
        let found: Vec<&&Value> = list
            .iter()
            .filter(|v| port(v, "sport") == SERVER && port(v, "dport") == client)
            .collect();
        assert_eq!(
            found.len(),
            1,
            "exactly one record for 127.0.0.1:{SERVER} -> :{client}: {found:?}"
        );
        (*found[0]).clone()
    };
    for client in [REUSED_CLIENT, EXPIRED_CLIENT] {
        let e = one(&enters, client);
        assert_eq!(
            (&e["confirmed"], &e["preexisting"]),
            (&Value::Bool(true), &Value::Bool(false)),
            "{e}"
        );
        assert!(
            e["expires_ms"]
                .as_u64()
                .is_some_and(|ms| ms > 0 && ms <= 60_000),
            "{e}"
        );
        assert_eq!(
            (&e["pid"], &e["tid"]),
            (&Value::from(done.pid), &Value::from(done.closer_tid)),
            "the closer: {e}"
        );
        assert_eq!(
            (e["saddr"].as_str(), e["daddr"].as_str()),
            (Some("127.0.0.1"), Some("127.0.0.1"))
        );
    }
    let reused = one(&exits, REUSED_CLIENT);
    assert_eq!(reused["reason"], "reused", "{reused}");
    let expired = one(&exits, EXPIRED_CLIENT);
    assert_eq!(expired["reason"], "expired", "{expired}");
    // The kernel's TIME_WAIT timer is 60 s; our view of the end lags it by a tick.
    assert!(
        expired["held_ms"].as_u64().is_some_and(|ms| ms >= 59_000),
        "{expired}"
    );

    // The burst: exactly one confirmed enter per client socket, each with its exit.
    let burst = |list: &[&Value]| -> HashMap<(u16, u64), usize> {
        let mut m = HashMap::new();
        for v in list
            .iter()
            .filter(|v| port(v, "dport") == SERVER && done.burst_ports.contains(&port(v, "sport")))
        {
            *m.entry((port(v, "sport"), v["sock_cookie"].as_u64().unwrap()))
                .or_insert(0) += 1;
        }
        m
    };
    let burst_enters = burst(&enters);
    let burst_exits = burst(&exits);
    assert_eq!(
        burst_enters.len(),
        BURST,
        "confirmed time_wait_enter for the burst"
    );
    assert!(
        burst_enters.values().all(|&n| n == 1),
        "duplicates among the burst's enters"
    );
    assert_eq!(
        burst_exits, burst_enters,
        "every burst socket leaves TIME_WAIT exactly once"
    );
    assert!(
        enters
            .iter()
            .filter(|v| port(v, "dport") == SERVER)
            .all(|v| v["confirmed"] == true && v["expires_ms"].as_u64().unwrap() <= 60_000),
        "every burst enter is confirmed, with the kernel's timer"
    );
    assert_eq!(records.last().unwrap()["lost"], 0);
    let stats: Vec<&Value> = records.iter().filter(|r| r["event"] == "stats").collect();
    let cpu = |r: &Value| r["cpu_ms"].as_u64().unwrap_or(0);
    eprintln!(
        "burst: {} confirmed time_wait_enter, {} time_wait_exit for {BURST} client sockets; daemon CPU {} ms over {} s, RSS up to {} kB",
        burst_enters.len(),
        burst_exits.len(),
        cpu(stats.last().unwrap()) - cpu(stats[0]),
        stats.len(),
        stats
            .iter()
            .map(|r| r["rss_kb"].as_u64().unwrap_or(0))
            .max()
            .unwrap_or(0)
    );
}

#[test]
fn time_wait_sockets_before_the_start_are_reported_once() {
    require_root!();
    // A TIME_WAIT socket that exists before the observer starts, in a namespace
    // a thread is still in (how the observer finds namespaces).
    let (tx, rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        enter_private_netns();
        let listener = TcpListener::bind("127.0.0.1:5810").unwrap();
        let mut c = TcpStream::connect("127.0.0.1:5810").unwrap();
        let (a, _) = listener.accept().unwrap();
        drop(a); // the server closes first: its socket goes to TIME_WAIT
        let mut buf = [0u8; 1];
        assert_eq!(c.read(&mut buf).unwrap(), 0);
        let port = c.local_addr().unwrap().port();
        drop(c);
        tx.send((netns_of_thread(), port)).unwrap();
        let _ = stop_rx.recv_timeout(Duration::from_secs(120));
    });
    let (netns, client_port) = rx.recv().unwrap();
    let (mut obs, _) = Observer::start(&[]);
    let n = obs.wait_for(1, Duration::from_secs(30), |v| {
        is(v, "time_wait_enter", netns) && v["dport"] == client_port
    });
    let end = obs.stop();
    stop_tx.send(()).unwrap();
    holder.join().unwrap();
    assert_eq!(n, 1);
    let e: Vec<Value> = end
        .records()
        .into_iter()
        .filter(|v| is(v, "time_wait_enter", netns))
        .collect();
    assert_eq!(e.len(), 1, "reported once: {e:?}");
    let e = &e[0];
    assert_eq!(
        (&e["preexisting"], &e["confirmed"]),
        (&Value::Bool(true), &Value::Bool(true)),
        "{e}"
    );
    assert_eq!(
        (e["sport"].as_u64(), e["saddr"].as_str()),
        (Some(5810), Some("127.0.0.1"))
    );
    assert!(
        e["expires_ms"]
            .as_u64()
            .is_some_and(|ms| ms > 0 && ms <= 60_000),
        "{e}"
    );
    assert!(
        e["pid"].is_null(),
        "no closer is known for a socket closed before the start: {e}"
    );
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
