//! `cargo xtask bench`: what the observer costs the host, as ratios taken in one
//! run, interleaved (bare, observed, bpftrace, strace, …; median of each), side
//! by side with the tools people use instead. Writes target/bench/results.json.

use std::{
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

const ROUNDS: usize = 5;
const LOOP_SECS: &str = "2";

struct Bench {
    observer: PathBuf,
    bindloop: PathBuf,
    dir: PathBuf,
}

/// One run of the load generator: its own count, rate and pid.
#[derive(Clone, Copy, Debug)]
struct Run {
    ops: u64,
    rate: f64,
    pid: u32,
}

fn parse_run(stdout: &str) -> Result<Run> {
    let field = |k: &str| {
        stdout
            .split_whitespace()
            .find_map(|f| f.strip_prefix(k))
            .with_context(|| format!("no {k} in bindloop's output: {stdout}"))
    };
    Ok(Run {
        ops: field("ops=")?.parse()?,
        rate: field("rate=")?.parse()?,
        pid: field("pid=")?.parse()?,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

fn lines(path: &Path) -> Vec<Value> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn interrupt(child: &Child) {
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
}

/// A tool watching the load: started before, stopped after.
enum Watcher {
    None,
    Observer,
    Bpftrace,
    Strace,
}

/// What an observed run saw.
#[derive(Default, Debug)]
struct Seen {
    events: u64,
    lost: u64,
    cpu_ms: u64,
    stop: Value,
}

impl Bench {
    fn bindloop(&self, mode: &str, count: Option<u64>, strace_out: Option<&Path>) -> Result<Run> {
        let mut cmd = match strace_out {
            Some(out) => {
                let mut c = Command::new("strace");
                c.args(["-f", "-qq", "-e", "trace=bind", "-o"])
                    .arg(out)
                    .arg(&self.bindloop);
                c
            }
            None => Command::new(&self.bindloop),
        };
        cmd.args([mode, LOOP_SECS]);
        if let Some(n) = count {
            cmd.arg(n.to_string());
        }
        let out = cmd
            .stderr(Stdio::inherit())
            .output()
            .context("running bindloop")?;
        if !out.status.success() {
            bail!("bindloop {mode} failed: {}", out.status);
        }
        parse_run(&String::from_utf8_lossy(&out.stdout))
    }

    /// Starts the observer writing JSON to `out`; returns when it has attached.
    fn start_observer(&self, out: &Path, extra: &[&str]) -> Result<Child> {
        let _ = fs::remove_file(out);
        let child = Command::new(&self.observer)
            .args(["run", "--output"])
            .arg(out)
            .args(extra)
            .stdout(Stdio::null())
            .spawn()
            .context("starting the observer")?;
        let started = Instant::now();
        while !fs::read_to_string(out)
            .unwrap_or_default()
            .contains("observer_start")
        {
            if started.elapsed() > Duration::from_secs(30) {
                bail!("the observer did not start");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(child)
    }

    fn cpu_ms(pid: u32) -> u64 {
        // utime + stime, fields 14 and 15 of /proc/PID/stat, in clock ticks.
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<u64> = after
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        f.get(10)
            .zip(f.get(11))
            .map_or(0, |(u, s)| (u + s) * 1000 / hz.max(1))
    }

    fn watched(&self, watcher: &Watcher, mode: &str) -> Result<(Run, Seen)> {
        let out = self.dir.join("watch.out");
        match watcher {
            Watcher::None => Ok((self.bindloop(mode, None, None)?, Seen::default())),
            Watcher::Strace => Ok((self.bindloop(mode, None, Some(&out))?, Seen::default())),
            Watcher::Observer => {
                let mut obs = self.start_observer(&out, &[])?;
                let cpu0 = Self::cpu_ms(obs.id());
                let run = self.bindloop(mode, None, None)?;
                let cpu_ms = Self::cpu_ms(obs.id()) - cpu0;
                std::thread::sleep(Duration::from_millis(200));
                interrupt(&obs);
                obs.wait()?;
                let records = lines(&out);
                let kind = if mode == "churn" { "tcp_state" } else { "bind" };
                let events = records
                    .iter()
                    .filter(|r| r["event"] == kind && r["pid"] == run.pid)
                    .count() as u64;
                let lost = records
                    .iter()
                    .filter(|r| r["event"] == "lost")
                    .map(|r| r["count"].as_u64().unwrap_or(0))
                    .sum();
                let stop = records
                    .iter()
                    .rev()
                    .find(|r| r["event"] == "observer_stop")
                    .cloned()
                    .unwrap_or_default();
                Ok((
                    run,
                    Seen {
                        events,
                        lost,
                        cpu_ms,
                        stop,
                    },
                ))
            }
            Watcher::Bpftrace => {
                let script = self.dir.join("bind.bt");
                fs::write(&script, BPFTRACE)?;
                let _ = fs::remove_file(&out);
                let mut bt = Command::new("bpftrace")
                    .arg("-o")
                    .arg(&out)
                    .arg(&script)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("starting bpftrace")?;
                let started = Instant::now();
                while !fs::read_to_string(&out)
                    .unwrap_or_default()
                    .contains("Attaching")
                {
                    if started.elapsed() > Duration::from_secs(60) || bt.try_wait()?.is_some() {
                        let _ = bt.kill();
                        bail!("bpftrace did not attach");
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                let run = self.bindloop(mode, None, None)?;
                interrupt(&bt);
                bt.wait()?;
                Ok((run, Seen::default()))
            }
        }
    }
}

/// bpftrace printing the same fields from the same syscall tracepoints.
const BPFTRACE: &str = r#"
tracepoint:syscalls:sys_enter_bind { @start[tid] = nsecs; @fd[tid] = args->fd; }
tracepoint:syscalls:sys_exit_bind /@start[tid]/ {
  printf("%d %d %s %d %d %d\n", pid, tid, comm, @fd[tid], args->ret, nsecs - @start[tid]);
  delete(@start[tid]); delete(@fd[tid]);
}
"#;

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// bpftrace and strace from Debian's packages; a peer that cannot be had is skipped with a note.
fn peers() -> Vec<(&'static str, Watcher)> {
    let mut out = Vec::new();
    for (tool, w) in [("bpftrace", Watcher::Bpftrace), ("strace", Watcher::Strace)] {
        if !have(tool) {
            eprintln!("bench: installing {tool}");
            let _ = crate::status(
                crate::as_root("apt-get")
                    .args(["install", "-y", "-q", tool])
                    .env("DEBIAN_FRONTEND", "noninteractive"),
            );
        }
        if have(tool) {
            out.push((tool, w));
        } else {
            eprintln!("bench: {tool} is not available here: its column is skipped");
        }
    }
    out
}

pub fn run(observer: &Path, bindloop: &Path, root: &Path) -> Result<()> {
    let dir = root.join("target/bench");
    fs::create_dir_all(&dir)?;
    let b = Bench {
        observer: observer.into(),
        bindloop: bindloop.into(),
        dir: dir.clone(),
    };
    let peers = peers();
    let mut results = json!({"rounds": ROUNDS, "loop_secs": LOOP_SECS.parse::<f64>()?});

    // 1 + 2: bind throughput with and without watchers, and completeness.
    for mode in ["udp", "tcp"] {
        let mut rates: Vec<(&str, Vec<f64>)> = vec![("bare", vec![]), ("observer", vec![])];
        rates.extend(peers.iter().map(|(n, _)| (*n, vec![])));
        let (mut events, mut made, mut lost, mut cpu) = (0u64, 0u64, 0u64, 0u64);
        for round in 0..ROUNDS {
            eprintln!("bench: {mode} round {}/{ROUNDS}", round + 1);
            let watchers: Vec<(&str, &Watcher)> =
                [("bare", &Watcher::None), ("observer", &Watcher::Observer)]
                    .into_iter()
                    .chain(peers.iter().map(|(n, w)| (*n, w)))
                    .collect();
            for (name, w) in watchers {
                let (run, seen) = b.watched(w, mode)?;
                rates
                    .iter_mut()
                    .find(|(n, _)| *n == name)
                    .unwrap()
                    .1
                    .push(run.rate);
                if name == "observer" {
                    (events, made, lost, cpu) = (
                        events + seen.events,
                        made + run.ops,
                        lost + seen.lost,
                        cpu + seen.cpu_ms,
                    );
                }
            }
        }
        let bare = median(rates[0].1.clone());
        let mut m = json!({"bare_rate": bare});
        for (name, r) in &rates {
            let med = median(r.clone());
            m[format!("{name}_rate")] = json!(med);
            m[format!("{name}_ratio")] = json!(med / bare);
        }
        m["events"] = json!(events);
        m["binds"] = json!(made);
        m["completeness"] = json!(events as f64 / made as f64);
        m["lost"] = json!(lost);
        m["daemon_cpu_ms_per_s"] = json!(cpu as f64 / (ROUNDS as f64 * 2.0));
        results[mode] = m;
    }

    // 3: in-kernel cost per program, with kernel.bpf_stats_enabled=1 for one observed run.
    let stats_path = Path::new("/proc/sys/kernel/bpf_stats_enabled");
    let before = fs::read_to_string(stats_path).unwrap_or_else(|_| "0".into());
    fs::write(stats_path, "1").context("enabling kernel.bpf_stats_enabled")?;
    let measured = b.watched(&Watcher::Observer, "udp");
    fs::write(stats_path, before.trim())?;
    let (_, seen) = measured?;
    let programs: Vec<Value> = seen.stop["programs"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|p| {
            let runs = p["run_count"].as_u64().unwrap_or(0);
            let ns = p["run_time_ns"].as_u64().unwrap_or(0);
            json!({"hook": p["hook"], "runs": runs, "ns_per_run": if runs > 0 { ns as f64 / runs as f64 } else { 0.0 }})
        })
        .collect();
    results["programs"] = json!(programs);

    // 5: startup (exec to observer_start, median of 10) and RSS after 1 M events.
    let mut startups = vec![];
    for _ in 0..10 {
        let t = Instant::now();
        let mut c = Command::new(observer)
            .args(["run"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let mut first = String::new();
        BufReader::new(c.stdout.take().unwrap()).read_line(&mut first)?;
        startups.push(t.elapsed().as_secs_f64() * 1000.0);
        interrupt(&c);
        c.wait()?;
    }
    let out = dir.join("rss.out");
    let mut o = b.start_observer(&out, &["--stats", "1"])?;
    let mut events = 0u64;
    while events < 1_000_000 {
        events += b.bindloop("udp", Some(1_000_000 - events), None)?.ops;
    }
    std::thread::sleep(Duration::from_millis(2500));
    let rss = Bench::rss_kb(o.id());
    interrupt(&o);
    o.wait()?;
    let records = lines(&out);
    let rss_lost: u64 = records
        .iter()
        .filter(|r| r["event"] == "lost")
        .map(|r| r["count"].as_u64().unwrap_or(0))
        .sum();
    results["startup_ms_median"] = json!(median(startups));
    results["rss_kb_after_1m_events"] = json!(rss);
    results["lost_in_1m_events"] = json!(rss_lost);

    // 4: TCP churn, last: it leaves tens of thousands of TIME_WAIT sockets that
    // a new observer would report and track, which would weigh on 5.
    let (mut bare, mut obs, mut cpu) = (vec![], vec![], 0u64);
    for round in 0..ROUNDS {
        eprintln!("bench: churn round {}/{ROUNDS}", round + 1);
        bare.push(b.watched(&Watcher::None, "churn")?.0.rate);
        let (run, seen) = b.watched(&Watcher::Observer, "churn")?;
        obs.push(run.rate);
        cpu += seen.cpu_ms;
    }
    let (bare, obs) = (median(bare), median(obs));
    results["churn"] = json!({"bare_rate": bare, "observer_rate": obs, "observer_ratio": obs / bare,
        "daemon_cpu_ms_per_s": cpu as f64 / (ROUNDS as f64 * 2.0)});

    let path = dir.join("results.json");
    fs::write(&path, serde_json::to_string_pretty(&results)?)?;
    print_table(&results, &peers.iter().map(|(n, _)| *n).collect::<Vec<_>>());
    eprintln!("bench: wrote {}", path.display());
    Ok(())
}

impl Bench {
    fn rss_kb(pid: u32) -> u64 {
        fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }
}

fn print_table(r: &Value, peers: &[&str]) {
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    println!(
        "{:<34} {:>12} {:>12}",
        "bind throughput (ratio to bare)", "UDP", "TCP"
    );
    println!(
        "{:<34} {:>12.0} {:>12.0}",
        "bare binds/s (median)",
        f(&r["udp"]["bare_rate"]),
        f(&r["tcp"]["bare_rate"])
    );
    for name in std::iter::once(&"observer").chain(peers) {
        let k = format!("{name}_ratio");
        println!(
            "{:<34} {:>12.3} {:>12.3}",
            format!("{name} (target >= 0.90 for observer)"),
            f(&r["udp"][&k]),
            f(&r["tcp"][&k])
        );
    }
    println!(
        "{:<34} {:>12.4} {:>12.4}",
        "completeness (events / binds)",
        f(&r["udp"]["completeness"]),
        f(&r["tcp"]["completeness"])
    );
    println!(
        "{:<34} {:>12} {:>12}",
        "lost (target 0)", r["udp"]["lost"], r["tcp"]["lost"]
    );
    println!(
        "{:<34} {:>12.0} {:>12.0}",
        "daemon CPU ms per s",
        f(&r["udp"]["daemon_cpu_ms_per_s"]),
        f(&r["tcp"]["daemon_cpu_ms_per_s"])
    );
    println!(
        "\n{:<40} {:>10} {:>12}",
        "program (in-kernel cost)", "runs", "ns/run"
    );
    for p in r["programs"].as_array().into_iter().flatten() {
        println!(
            "{:<40} {:>10} {:>12.0}",
            p["hook"].as_str().unwrap_or(""),
            p["runs"],
            f(&p["ns_per_run"])
        );
    }
    println!(
        "\nTCP churn: bare {:.0} conn/s, observed {:.0} conn/s, ratio {:.3}, daemon CPU {:.0} ms/s",
        f(&r["churn"]["bare_rate"]),
        f(&r["churn"]["observer_rate"]),
        f(&r["churn"]["observer_ratio"]),
        f(&r["churn"]["daemon_cpu_ms_per_s"])
    );
    println!(
        "startup {:.0} ms (median of 10, target < 200); RSS after 1 M events {} kB (target < 30720), lost {}",
        f(&r["startup_ms_median"]),
        r["rss_kb_after_1m_events"],
        r["lost_in_1m_events"]
    );
}
