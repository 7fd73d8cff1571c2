//! The daemon as operators run it: filters, two observers at once, an output
//! file rotated under load, and the records it writes about itself.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use observer_tests::{
    observer::{Observer, observer_bin},
    require_root,
    workload::{Workload, enter_private_netns},
};
use serde_json::Value;

/// Binds in a private namespace: (port, expected errno) pairs, in order; returns our pid.
fn binds(plan: &'static [(u16, bool)]) -> u32 {
    std::thread::spawn(move || {
        enter_private_netns();
        let mut w = Workload::default();
        for &(port, second) in plan {
            let a: SocketAddr = SocketAddr::from(([127, 0, 0, 1], port));
            let first = Workload::socket(&a, true, false, false).unwrap();
            w.bind("first", first, a, true);
            if second {
                let s = Workload::socket(&a, true, false, false).unwrap();
                assert_eq!(w.bind("second", s, a, false), libc::EADDRINUSE);
            }
        }
        std::process::id()
    })
    .join()
    .unwrap()
}

#[test]
fn filters_keep_only_what_matches() {
    require_root!();
    // Failed binds on port 5711 only.
    let (obs, _) = Observer::start(&["-P", "5711", "-x"]);
    let pid = binds(&[(5711, true), (5712, true)]);
    let done = obs.stop();
    assert!(done.status.success(), "{}", done.stderr);
    let records = done.records();
    let mine = done.binds_of(&[pid]);
    assert_eq!(mine.len(), 1, "{mine:#?}");
    assert_eq!(
        (mine[0]["port"].as_u64(), mine[0]["errno"].as_str()),
        (Some(5711), Some("EADDRINUSE"))
    );
    assert!(
        records.iter().all(|r| r["event"] != "tcp_state"),
        "-x keeps failures only"
    );
    let stop = records.last().unwrap();
    assert!(stop["filtered"].as_u64().unwrap() >= 3, "{stop}");

    // This process, binds only: both ports, successes too, no TCP states.
    let me = std::process::id().to_string();
    let (obs, _) = Observer::start(&["--pid", &me, "--events", "bind"]);
    binds(&[(5713, false), (5714, true)]);
    let done = obs.stop();
    let records = done.records();
    let kinds: BTreeSet<&str> = records
        .iter()
        .map(|r| r["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        BTreeSet::from(["observer_start", "bind", "observer_stop"]),
        "{kinds:?}"
    );
    assert_eq!(done.binds_of(&[std::process::id()]).len(), 3);
    assert!(
        records
            .iter()
            .filter(|r| r["event"] == "bind")
            .all(|r| r["pid"] == std::process::id())
    );
}

/// UDP binds with SO_REUSEPORT (all succeed) in a private namespace: `n` to
/// each port; returns our pid.
fn reuseport_binds(ports: &'static [u16], n: usize) -> u32 {
    std::thread::spawn(move || {
        enter_private_netns();
        let mut w = Workload::default();
        for &port in ports {
            let a = SocketAddr::from(([127, 0, 0, 1], port));
            for _ in 0..n {
                let s = Workload::socket(&a, false, false, true).unwrap();
                assert_eq!(w.bind("reuseport", s, a, false), 0);
            }
        }
        std::process::id()
    })
    .join()
    .unwrap()
}

/// The sum of `lost` records' counts, and observer_stop.filtered.
fn lost_and_filtered(done: &observer_tests::observer::Finished) -> (u64, u64) {
    let records = done.records();
    let lost = records
        .iter()
        .filter(|r| r["event"] == "lost")
        .map(|r| r["count"].as_u64().unwrap())
        .sum();
    let stop = records.last().unwrap();
    assert_eq!(stop["event"], "observer_stop", "{stop}");
    assert_eq!(
        stop["lost"], lost,
        "observer_stop.lost sums the lost records"
    );
    (lost, stop["filtered"].as_u64().unwrap())
}

#[test]
fn kernel_filters_drop_before_the_ring_buffer() {
    require_root!();
    // One page of ring buffer and a stopped reader: anything the kernel
    // programs do not drop themselves would be lost.
    const N: usize = 400;
    let stopped = |args: &[&str], ports: &'static [u16]| {
        let mut all = vec!["--ring-buffer", "4096"];
        all.extend_from_slice(args);
        let (obs, _) = Observer::start(&all);
        obs.signal(libc::SIGSTOP);
        let pid = reuseport_binds(ports, N);
        obs.signal(libc::SIGCONT);
        let done = obs.stop();
        assert!(done.status.success(), "{}", done.stderr);
        (pid, done)
    };

    // Filtered to pid 1, which binds nothing here: none of our binds is
    // delivered or lost, each is counted as filtered.
    let (pid, done) = stopped(&["-p", "1"], &[5731]);
    assert!(done.binds_of(&[pid]).is_empty());
    let (lost, filtered) = lost_and_filtered(&done);
    assert_eq!(lost, 0, "a filtered-out process cannot cost lost records");
    assert!(
        filtered >= N as u64,
        "filtered {filtered} < {N} binds dropped"
    );

    // Filtered to one port: its binds are each delivered or counted lost,
    // exactly; the other port's are filtered and never reach the ring.
    let (pid, done) = stopped(&["-P", "5733", "--events", "bind"], &[5733, 5734]);
    let mine = done.binds_of(&[pid]);
    assert!(mine.iter().all(|e| e["port"] == 5733), "{mine:#?}");
    let (lost, filtered) = lost_and_filtered(&done);
    assert!(mine.len() < N, "one page cannot hold {N} records");
    assert_eq!(
        mine.len() as u64 + lost,
        N as u64,
        "delivered + lost must be exactly the binds that match"
    );
    assert!(
        filtered >= N as u64,
        "filtered {filtered} < {N} binds dropped"
    );
}

/// The programs' rare paths reach the daemon's log through aya-log with
/// `-v` (the first time, then at powers of two), and cost nothing without.
#[test]
fn the_programs_log_a_full_ring_buffer_with_v() {
    require_root!();
    const N: usize = 300;
    let run = |verbose: bool| {
        let mut args = vec!["--ring-buffer", "4096", "--events", "bind"];
        if verbose {
            args.push("-v");
        }
        let (obs, _) = Observer::start(&args);
        obs.signal(libc::SIGSTOP);
        reuseport_binds(&[5736], N);
        obs.signal(libc::SIGCONT);
        let done = obs.stop();
        assert!(done.status.success(), "{}", done.stderr);
        let (lost, _) = lost_and_filtered(&done);
        assert!(lost > 0, "one page cannot hold {N} records");
        done.stderr
    };
    let said = run(true);
    assert!(
        said.contains("ring buffer full, record lost: 1 time(s) on this CPU"),
        "{said}"
    );
    let quiet = run(false);
    assert!(!quiet.contains("observer_ebpf"), "{quiet}");
}

#[test]
fn two_observers_each_see_everything() {
    require_root!();
    let (a, _) = Observer::start(&[]);
    let (b, _) = Observer::start(&[]);
    let pid = binds(&[(5721, true), (5722, false)]);
    let (a, b) = (a.stop(), b.stop());
    for done in [&a, &b] {
        assert!(done.status.success(), "{}", done.stderr);
        let mine = done.binds_of(&[pid]);
        // (A failure comes when its explanation is ready: order by port.)
        let mut ports: Vec<u64> = mine.iter().map(|e| e["port"].as_u64().unwrap()).collect();
        ports.sort();
        assert_eq!(ports, [5721, 5721, 5722], "{mine:#?}");
    }
}

/// A soak worker: a process of its own in a private namespace, binding,
/// connecting and closing as fast as it can until `deadline`; prints its count.
#[test]
#[ignore = "run by soak_with_rotation as a child process"]
fn soak_worker() {
    let Ok(secs) = std::env::var("SOAK_WORKER_SECS") else {
        return;
    };
    enter_private_netns();
    let listener = TcpListener::bind("127.0.0.1:7100").unwrap();
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs_f64(secs.parse().unwrap());
    let mut binds = 1u64; // the listener's
    while Instant::now() < deadline {
        for _ in 0..50 {
            let u = UdpSocket::bind("127.0.0.1:0").unwrap();
            drop(u);
            binds += 1;
        }
        let c = TcpStream::connect("127.0.0.1:7100").unwrap();
        while let Ok((s, _)) = listener.accept() {
            drop(s);
        }
        drop(c);
        // About 1,000 binds a second per worker: a steady load, not a flood
        // (the flood is the benchmark's job), and files of tens of MB.
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("SOAK binds={binds} pid={}", std::process::id());
}

/// A child that is killed if the test fails before it is waited for.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn lines_of(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {l}", path.display()))
        })
        .collect()
}

#[test]
fn soak_with_rotation() {
    require_root!();
    const SECS: f64 = 60.0;
    const WORKERS: usize = 3;
    /// The daemon's memory bound stated in README.md.
    const RSS_BOUND_KB: u64 = 64 * 1024;
    let dir = std::env::temp_dir().join(format!("observer-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("events.jsonl");
    let mut obs = KillOnDrop(
        Command::new(observer_bin())
            .args(["run", "--stats", "1", "--output"])
            .arg(&file)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let started = Instant::now();
    while lines_of(&file).is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no observer_start in {}",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let me = std::env::current_exe().unwrap();
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            Command::new(&me)
                .args([
                    "soak_worker",
                    "--exact",
                    "--ignored",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("SOAK_WORKER_SECS", SECS.to_string())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    // logrotate twice: move the file away, then SIGHUP.
    let mut parts: Vec<PathBuf> = Vec::new();
    for i in 1..=2 {
        std::thread::sleep(Duration::from_secs_f64(SECS / 3.0));
        let moved = dir.join(format!("events.jsonl.{i}"));
        std::fs::rename(&file, &moved).unwrap();
        parts.push(moved);
        assert_eq!(unsafe { libc::kill(obs.0.id() as i32, libc::SIGHUP) }, 0);
    }
    let mut made: BTreeMap<u64, u64> = BTreeMap::new();
    for w in workers {
        let out = w.wait_with_output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        // libtest prints it after "test soak_worker ... ".
        let line = text
            .lines()
            .find_map(|l| l.split_once("SOAK ").map(|(_, r)| r))
            .unwrap_or_else(|| panic!("no report from a worker: {text}"));
        let field = |k: &str| {
            line.split(' ')
                .find_map(|f| f.strip_prefix(k))
                .unwrap()
                .parse::<u64>()
                .unwrap()
        };
        made.insert(field("pid="), field("binds="));
    }
    assert_eq!(unsafe { libc::kill(obs.0.id() as i32, libc::SIGINT) }, 0);
    assert!(obs.0.wait().unwrap().success());
    parts.push(file.clone());

    let records: Vec<Value> = parts.iter().flat_map(|p| lines_of(p)).collect();
    assert!(
        parts.iter().all(|p| !lines_of(p).is_empty()),
        "each rotated part got records"
    );
    let mut seen: BTreeMap<u64, u64> = BTreeMap::new();
    for r in records.iter().filter(|r| r["event"] == "bind") {
        let pid = r["pid"].as_u64().unwrap();
        if made.contains_key(&pid) {
            *seen.entry(pid).or_insert(0) += 1;
        }
    }
    // Losses that can hide a bind record (not the TIME_WAIT tracker's queue).
    let lost: u64 = records
        .iter()
        .filter(|r| r["event"] == "lost" && r["cause"] != "time_wait_queue")
        .map(|r| r["count"].as_u64().unwrap())
        .sum();
    let total_made: u64 = made.values().sum();
    let total_seen: u64 = seen.values().sum();
    eprintln!(
        "soak: {total_made} binds made in {SECS} s by {WORKERS} processes, {total_seen} seen, {lost} lost"
    );
    assert!(total_made > 10_000, "the workload ran: {total_made}");
    assert!(total_seen <= total_made);
    assert!(
        total_seen + lost >= total_made,
        "{total_seen} seen + {lost} lost < {total_made} made: events lost silently"
    );
    if lost == 0 {
        assert_eq!(seen, made, "every bind of every worker, exactly");
    }
    let stop = records
        .iter()
        .rev()
        .find(|r| r["event"] == "observer_stop")
        .expect("observer_stop");
    let all_lost: u64 = records
        .iter()
        .filter(|r| r["event"] == "lost")
        .map(|r| r["count"].as_u64().unwrap())
        .sum();
    assert_eq!(stop["lost"], all_lost);
    let rss: Vec<u64> = records
        .iter()
        .filter(|r| r["event"] == "stats")
        .map(|r| r["rss_kb"].as_u64().unwrap())
        .collect();
    assert!(
        rss.len() >= (SECS as usize) / 2,
        "stats every second: {}",
        rss.len()
    );
    let max = *rss.iter().max().unwrap();
    eprintln!("soak: daemon RSS {} .. {max} kB", rss.iter().min().unwrap());
    assert!(max < RSS_BOUND_KB, "RSS {max} kB over the stated bound");
    std::fs::remove_dir_all(&dir).unwrap();
}
