//! `observer run --metrics`: a real Prometheus (Debian's package, run by hand
//! on loopback) scrapes the daemon every second while a workload makes known
//! numbers in a namespace of its own; the numbers Prometheus stores must be
//! exactly those. `promtool check metrics` passes the exposition; a port in
//! use is one line and a non-zero exit; `--output /dev/null` serves metrics only.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use observer_tests::{
    observer::{Observer, observer_bin},
    require_root,
    workload::enter_private_netns,
};
use serde_json::{Value, json};
use socket2::{Domain, Socket, Type};

/// N binds fail with EADDRINUSE on port P; M server-side TIME_WAIT sockets.
const PORT: u16 = 5950;
const N_IN_USE: usize = 7;
const TW_SERVER: u16 = 5951;
const M_TIME_WAIT: usize = 5;
/// Then the namespace's ephemeral range narrowed to RANGE_PORTS ports, and
/// every one of them held by a TCP socket bound to 127.0.0.1:0: 100 %.
const RANGE_PORTS: usize = 20;
/// How long Prometheus has to show the numbers (scraping every second).
const WAIT: Duration = Duration::from_secs(20);

/// A port free on loopback right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A plain HTTP/1.0 GET on loopback: (status, body).
fn get(port: u16, path: &str, accept: Option<&str>) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n{accept}\r\n")?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_owned()))
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Debian's prometheus and promtool, installed when missing (`cargo xtask
/// test` installs them in its set-up); `None` when they cannot be had.
fn prometheus_installed() -> Result<(), String> {
    let have = |tool: &str| {
        Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if have("prometheus") && have("promtool") {
        return Ok(());
    }
    let out = Command::new("apt-get")
        .args([
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "prometheus",
        ])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .map_err(|e| format!("running apt-get: {e}"))?;
    if !out.status.success() || !have("prometheus") || !have("promtool") {
        return Err(format!(
            "apt-get install prometheus failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// A Prometheus server of our own: temp config and storage, loopback only,
/// scraping the observer every second. Killed on drop.
struct Prometheus {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Prometheus {
    fn start(target: u16) -> Prometheus {
        let dir = std::env::temp_dir().join(format!("observer-prometheus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: observer\n    static_configs:\n      - targets: ['127.0.0.1:{target}']\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting prometheus");
        let p = Prometheus { child, port, dir };
        let until = Instant::now() + Duration::from_secs(30);
        while !matches!(get(p.port, "/-/ready", None), Ok((200, _))) {
            assert!(
                Instant::now() < until,
                "prometheus not ready in 30 s: {}",
                p.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// The value of an instant query that yields one sample (`sum(…)`), or
    /// `None` while it yields none.
    fn query(&self, q: &str) -> Option<f64> {
        let (status, body) = get(
            self.port,
            &format!("/api/v1/query?query={}", percent_encode(q)),
            None,
        )
        .ok()?;
        assert_eq!(status, 200, "{q}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        let result = v["data"]["result"].as_array()?;
        assert!(result.len() <= 1, "{q}: one sample wanted: {body}");
        result.first()?["value"][1].as_str()?.parse().ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The workload's namespace (a path for `--netns`), a way to start it, and
/// word when it is done; it keeps its sockets (TIME_WAIT lasts 60 s) until
/// the returned sender is dropped.
fn workload() -> (String, mpsc::Sender<()>, mpsc::Receiver<()>) {
    let (path_tx, path_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        enter_private_netns();
        let tid = unsafe { libc::gettid() };
        path_tx
            .send(format!("/proc/{}/task/{tid}/ns/net", std::process::id()))
            .unwrap();
        if go_rx.recv().is_err() {
            return;
        }
        let at = |port| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        // A listener on PORT, then N binds that it refuses.
        let holder = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        holder.bind(&at(PORT).into()).unwrap();
        holder.listen(16).unwrap();
        for _ in 0..N_IN_USE {
            let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            let e = s.bind(&at(PORT).into()).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EADDRINUSE));
        }
        // M connections the server closes first: M server sockets in TIME_WAIT.
        let server = TcpListener::bind(at(TW_SERVER)).unwrap();
        for _ in 0..M_TIME_WAIT {
            let mut client = TcpStream::connect(at(TW_SERVER)).unwrap();
            let (accepted, _) = server.accept().unwrap();
            drop(accepted);
            let mut buf = [0u8; 1];
            assert_eq!(client.read(&mut buf).unwrap(), 0, "the client sees the FIN");
            drop(client);
        }
        // The range pushed past 95 %: all of its ports held.
        std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "40000 40019").unwrap();
        let ephemeral: Vec<Socket> = (0..RANGE_PORTS)
            .map(|_| {
                let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
                s.bind(&at(0).into()).unwrap();
                s
            })
            .collect();
        let _ = done_tx.send(());
        // Hold the namespace (and its TIME_WAIT sockets) until the test is done.
        let _ = go_rx.recv();
        drop((holder, server, ephemeral));
    });
    (path_rx.recv().unwrap(), go_tx, done_rx)
}

#[test]
fn metrics_in_prometheus_are_the_numbers_the_workload_made() {
    require_root!();
    if let Err(why) = prometheus_installed() {
        eprintln!("skipped: no prometheus: {why}");
        return;
    }
    let (ns, go, done) = workload();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    // Filtered to the workload's namespace: the host's own traffic (this
    // Prometheus's scrapes among it) stays out of the numbers.
    let (obs, _) = Observer::start(&["--netns", &ns, "--metrics", &addr]);
    let prom = Prometheus::start(port);
    go.send(()).unwrap();
    done.recv_timeout(Duration::from_secs(20))
        .expect("the workload finished");

    let want = [
        (
            format!("sum(observer_bind_failures_total{{errno=\"EADDRINUSE\",port=\"{PORT}\"}})"),
            N_IN_USE as f64,
        ),
        (
            "sum(observer_binds_total{result=\"EADDRINUSE\",proto=\"tcp\",family=\"inet\"})".into(),
            N_IN_USE as f64,
        ),
        (
            "sum(observer_binds_total{result=\"ok\"})".into(),
            (2 + RANGE_PORTS) as f64,
        ),
        (
            "sum(observer_ephemeral_ports_in_use{proto=\"tcp\",scope=\"local\",pair=\"127.0.0.1\"})"
                .into(),
            RANGE_PORTS as f64,
        ),
        (
            "sum(observer_ephemeral_ports_range{proto=\"tcp\",scope=\"local\",pair=\"127.0.0.1\"})"
                .into(),
            RANGE_PORTS as f64,
        ),
        (
            "sum(observer_ephemeral_port_pressure_ratio{proto=\"tcp\",scope=\"local\",pair=\"127.0.0.1\"})"
                .into(),
            1.0,
        ),
        ("sum(observer_time_wait_sockets)".into(), M_TIME_WAIT as f64),
        (
            "sum(observer_time_wait_entered_total{preexisting=\"false\"})".into(),
            M_TIME_WAIT as f64,
        ),
        (
            "sum(observer_tcp_state_changes_total{from=\"ESTABLISHED\",to=\"FIN_WAIT1\"})".into(),
            M_TIME_WAIT as f64,
        ),
        (
            "sum(observer_info{filtered=\"true\",filter=\"netns\"})".into(),
            1.0,
        ),
        ("sum(observer_lost_total)".into(), 0.0),
    ];
    let until = Instant::now() + WAIT;
    let got = loop {
        let got: Vec<Option<f64>> = want.iter().map(|(q, _)| prom.query(q)).collect();
        let all = want.iter().zip(&got).all(|((_, w), g)| *g == Some(*w));
        if all || Instant::now() > until {
            break got;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    for ((q, w), g) in want.iter().zip(&got) {
        eprintln!("{q} = {g:?} (want {w})");
    }
    let up = prom.query("up{job=\"observer\"}");
    assert!(
        want.iter().zip(&got).all(|((_, w), g)| *g == Some(*w)),
        "Prometheus did not show the workload's numbers within {WAIT:?} (up = {up:?}); its log:\n{}",
        prom.log()
    );

    // The exposition as promtool reads it (the classic text format, no Accept).
    let (status, text) = get(port, "/metrics", None).unwrap();
    assert_eq!(status, 200, "{text}");
    let mut lint = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    lint.stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = lint.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // OpenMetrics when asked for.
    let (_, om) = get(port, "/metrics", Some("application/openmetrics-text")).unwrap();
    assert!(om.ends_with("# EOF\n"), "{om}");

    // The stream says the same as the metrics.
    drop(go);
    let finished = obs.stop();
    assert!(finished.status.success(), "{}", finished.stderr);
    let records = finished.records();
    let in_use = records
        .iter()
        .filter(|r| r["event"] == "bind" && r["errno"] == "EADDRINUSE" && r["port"] == PORT)
        .count();
    let tw = records
        .iter()
        .filter(|r| r["event"] == "time_wait_enter")
        .count();
    assert_eq!((in_use, tw), (N_IN_USE, M_TIME_WAIT));
    // And the range's pressure: the last word on 127.0.0.1 is 95 %, all 20 held.
    let last = records
        .iter()
        .rfind(|r| r["event"] == "port_pressure" && r["addr"] == "127.0.0.1")
        .expect("a port_pressure record for 127.0.0.1");
    assert_eq!(
        (
            &last["level"],
            &last["in_use"],
            &last["range"],
            &last["scope"]
        ),
        (
            &json!(95),
            &json!(RANGE_PORTS),
            &json!(RANGE_PORTS),
            &json!("local")
        ),
        "{last}"
    );
    assert_eq!(
        last["holders"][0]["pid"],
        json!(std::process::id()),
        "{last}"
    );
}

#[test]
fn a_metrics_port_in_use_is_one_line_and_metrics_only_works() {
    require_root!();
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap().to_string();
    let out = Command::new(observer_bin())
        .args(["run", "--metrics", &addr, "-d", "1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr.trim_end(),
        format!("observer: --metrics {addr}: address in use")
    );
    assert!(out.stdout.is_empty(), "nothing loaded, nothing written");
    drop(held);

    // Metrics only: no records anywhere, the endpoint serves.
    let port = free_port();
    let child = Command::new(observer_bin())
        .args(["run", "--output", "/dev/null", "-d", "30"])
        .args(["--metrics", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    let text = loop {
        // Served once the programs are attached and the loop runs.
        if let Ok((200, t)) = get(port, "/metrics", None)
            && t.contains("observer_records_written_total")
            && !t.contains("observer_records_written_total 0")
        {
            break t;
        }
        assert!(Instant::now() < until, "no metrics within 30 s");
        std::thread::sleep(Duration::from_millis(200));
    };
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty());
    assert!(
        text.contains("observer_info{version=") && text.contains("filtered=\"false\""),
        "{text}"
    );
    assert!(
        text.contains("observer_ring_buffer_bytes 8388608"),
        "{text}"
    );
    assert!(text.contains("process_cpu_seconds_total "), "{text}");
}

/// The README's alert rules ("Many hosts") are valid as written.
#[test]
fn the_readme_alert_rules_pass_promtool() {
    if let Err(why) = prometheus_installed() {
        eprintln!("skipped: {why}");
        return;
    }
    let readme = include_str!("../../README.md");
    let rules = readme
        .split("```yaml\n")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .find(|b| b.starts_with("groups:"))
        .expect("the README has a block of alert rules");
    let file = std::env::temp_dir().join(format!("observer-rules-{}.yml", std::process::id()));
    std::fs::write(&file, rules).unwrap();
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&file);
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "promtool check rules: {said}\n{rules}"
    );
    assert!(said.contains("SUCCESS: 3 rules found"), "{said}");
}
