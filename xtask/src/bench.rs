//! `cargo xtask bench`: what the observer costs the host, as ratios taken in
//! one run, interleaved (median of each), beside the floor (the same hooks
//! with programs that do nothing) and the tools people use instead
//! (bpftrace, strace). Writes target/bench/results.json.

use std::{
    collections::{HashMap, HashSet},
    fs,
    io::{BufRead, BufReader, Read, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

const ROUNDS: usize = 5;
const LOOP_SECS: &str = "2";
/// TIME_WAIT churn: rounds of this many seconds, bare and observed.
const CHURN_ROUNDS: usize = 3;
const CHURN_SECS: &str = "10";

pub struct Tools<'a> {
    pub observer: &'a Path,
    pub bindloop: &'a Path,
    pub floor: &'a Path,
    /// The eBPF object the observer embeds (the floor loads it too).
    pub object: &'a Path,
}

struct Bench {
    observer: PathBuf,
    bindloop: PathBuf,
    floor: PathBuf,
    object: PathBuf,
    dir: PathBuf,
    /// The hooks the observer attaches here (the floor attaches the same).
    hooks: Vec<String>,
}

/// One run of the load generator: its own count, rate and pid.
#[derive(Clone, Copy, Debug, Default)]
struct Run {
    ops: u64,
    rate: f64,
    pid: u32,
}

fn field<'a>(stdout: &'a str, k: &str) -> Result<&'a str> {
    stdout
        .split_whitespace()
        .find_map(|f| f.strip_prefix(k))
        .with_context(|| format!("no {k} in bindloop's output: {stdout}"))
}

fn parse_run(stdout: &str) -> Result<Run> {
    Ok(Run {
        ops: field(stdout, "ops=")?.parse()?,
        rate: field(stdout, "rate=")?.parse()?,
        pid: field(stdout, "pid=")?.parse()?,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

/// What an observer wrote to its stdout, tallied as it streamed: a 2 s loop
/// writes hundreds of MB, of which nothing is kept but counts.
#[derive(Default, Debug)]
struct Tally {
    /// Records by (event, pid; 0 when null).
    by_pid: HashMap<(String, u64), u64>,
    /// Records by (event, netns).
    by_netns: HashMap<(String, u64), u64>,
    /// `time_wait_enter` records whose (sk, ts) came before, by netns.
    duplicate_enters: HashMap<u64, u64>,
    start: Value,
    stop: Value,
}

impl Tally {
    fn of_pid(&self, event: &str, pid: u32) -> u64 {
        self.by_pid
            .get(&(event.to_owned(), pid.into()))
            .copied()
            .unwrap_or(0)
    }

    fn in_netns(&self, event: &str, netns: u64) -> u64 {
        self.by_netns
            .get(&(event.to_owned(), netns))
            .copied()
            .unwrap_or(0)
    }

    fn lost(&self) -> u64 {
        self.stop["lost"].as_u64().unwrap_or(0)
    }
}

/// The text of `"key":VALUE`'s value in a record line (its first occurrence:
/// the top-level field, which comes before any nested one).
fn raw<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("\"{key}\":");
    let rest = &line[line.find(&pat)? + pat.len()..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    Some(rest[..end].trim_matches('"'))
}

/// Reads an observer's stdout to its end; says on `started` when
/// `observer_start` has come.
fn tally(out: impl Read, started: mpsc::Sender<()>) -> Tally {
    let mut t = Tally::default();
    let mut enters = HashSet::new();
    for line in BufReader::with_capacity(1 << 20, out).lines() {
        let Ok(line) = line else { break };
        let Some(event) = raw(&line, "event") else {
            continue;
        };
        match event {
            "observer_start" => {
                t.start = serde_json::from_str(&line).unwrap_or_default();
                let _ = started.send(());
            }
            "observer_stop" => t.stop = serde_json::from_str(&line).unwrap_or_default(),
            _ => {}
        }
        let pid = raw(&line, "pid").and_then(|p| p.parse().ok()).unwrap_or(0);
        *t.by_pid.entry((event.to_owned(), pid)).or_default() += 1;
        if let Some(ns) = raw(&line, "netns").and_then(|n| n.parse().ok()) {
            *t.by_netns.entry((event.to_owned(), ns)).or_default() += 1;
            if event == "time_wait_enter" {
                let sk = raw(&line, "sk").unwrap_or("").to_owned();
                let ts = raw(&line, "ts").unwrap_or("").to_owned();
                if !enters.insert((ns, sk, ts)) {
                    *t.duplicate_enters.entry(ns).or_default() += 1;
                }
            }
        }
    }
    t
}

/// A running observer and where its records go.
struct Observed {
    child: Child,
    out: Out,
}

enum Out {
    /// Its stdout, tallied on a thread as it comes.
    Pipe(JoinHandle<Tally>),
    /// A file (`-o`), tallied after it stops: a daemon writing to a file (for
    /// a log shipper) pays the write, not its reader's parsing, which on this
    /// two-CPU machine would take its share of the load's time.
    File(PathBuf),
}

impl Observed {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGINT, then everything it wrote.
    fn stop(mut self) -> Result<Tally> {
        interrupt(&self.child);
        self.child.wait()?;
        match self.out {
            Out::Pipe(reader) => reader
                .join()
                .map_err(|_| anyhow::anyhow!("the tally thread panicked")),
            Out::File(path) => {
                let file = fs::File::open(&path).context("opening the observer's output")?;
                let t = tally(file, mpsc::channel().0);
                fs::remove_file(&path)?;
                Ok(t)
            }
        }
    }
}

fn interrupt(child: &Child) {
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
}

/// What watches the load: started before, stopped after.
enum Watcher {
    None,
    /// The observer with these extra arguments.
    Observer(&'static [&'static str]),
    /// Empty programs on the observer's hooks.
    Floor,
    Bpftrace,
    Strace,
}

/// What an observed run saw.
#[derive(Default, Debug)]
struct Seen {
    /// Records of the run's kind from the load's pid.
    events: u64,
    lost: u64,
    cpu_ms: u64,
    stop: Value,
}

impl Bench {
    fn bindloop(
        &self,
        mode: &str,
        secs: &str,
        count: Option<u64>,
        strace_out: Option<&Path>,
    ) -> Result<Run> {
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
        cmd.args([mode, secs]);
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

    /// Starts the observer writing JSON Lines to a pipe; returns when it has attached.
    fn start_observer(&self, extra: &[&str]) -> Result<Observed> {
        let mut child = Command::new(&self.observer)
            .arg("run")
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the observer")?;
        let out = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || tally(out, tx));
        if rx.recv_timeout(Duration::from_secs(30)).is_err() {
            let _ = child.kill();
            bail!("the observer did not start");
        }
        Ok(Observed {
            child,
            out: Out::Pipe(reader),
        })
    }

    /// The same, writing to a file (see `Out::File`): for the rates.
    fn start_observer_to_file(&self, extra: &[&str]) -> Result<Observed> {
        let path = self.dir.join("observed.jsonl");
        let _ = fs::remove_file(&path);
        let mut child = Command::new(&self.observer)
            .arg("run")
            .args(extra)
            .arg("-o")
            .arg(&path)
            .stdout(Stdio::null())
            .spawn()
            .context("starting the observer")?;
        let started = Instant::now();
        loop {
            let mut head = String::new();
            if let Ok(f) = fs::File::open(&path) {
                BufReader::new(f).read_line(&mut head)?;
            }
            if head.contains("\"observer_start\"") {
                break;
            }
            if started.elapsed() > Duration::from_secs(30) || child.try_wait()?.is_some() {
                let _ = child.kill();
                bail!("the observer did not start");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(Observed {
            child,
            out: Out::File(path),
        })
    }

    /// The empty programs on `hooks` (as `observer_start.hooks` names them);
    /// returns when attached.
    fn start_floor(&self, hooks: &[String]) -> Result<Child> {
        let hooks: Vec<String> = hooks
            .iter()
            .filter_map(|h| {
                h.strip_prefix("tracepoint/")
                    .map(|h| h.replacen('/', ":", 1))
                    .or_else(|| {
                        h.strip_prefix("raw_tracepoint/")
                            .map(|h| format!("raw:{h}"))
                    })
            })
            .collect();
        let mut child = Command::new(&self.floor)
            .arg(&self.object)
            .args(&hooks)
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the floor")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
        if !line.starts_with("attached") {
            bail!("the floor did not attach: {line}");
        }
        Ok(child)
    }

    /// The hooks an observer run with `extra` attaches here.
    fn hooks_of(&self, extra: &[&str]) -> Result<Vec<String>> {
        Ok(self.start_observer(extra)?.stop()?.start["hooks"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter_map(|h| h.as_str().map(str::to_owned))
            .collect())
    }

    fn cpu_ms(pid: u32) -> u64 {
        // utime + stime, fields 14 and 15 of /proc/PID/stat, in clock ticks:
        // the 12th and 13th after the command's closing parenthesis. (Counted
        // as words, not as numbers: a daemon's tpgid is -1.)
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = after.split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok());
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        num(11)
            .zip(num(12))
            .map_or(0, |(u, s)| (u + s) * 1000 / hz.max(1))
    }

    /// VmRSS, and RssAnon: the daemon's own memory. VmRSS also counts the
    /// ring buffer's kernel pages (mapped twice: 16 MiB for the default
    /// 8 MiB) and the binary's text.
    fn rss_kb(pid: u32) -> (u64, u64) {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let kb = |field: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        (kb("VmRSS:"), kb("RssAnon:"))
    }

    /// One run of `mode` under `watcher`; `kind` names the records to count.
    fn watched(&self, watcher: &Watcher, mode: &str, kind: &str) -> Result<(Run, Seen)> {
        let out = self.dir.join("watch.out");
        match watcher {
            Watcher::None => Ok((self.bindloop(mode, LOOP_SECS, None, None)?, Seen::default())),
            Watcher::Strace => Ok((
                self.bindloop(mode, LOOP_SECS, None, Some(&out))?,
                Seen::default(),
            )),
            Watcher::Floor => {
                let floor = self.start_floor(&self.hooks)?;
                let run = self.bindloop(mode, LOOP_SECS, None, None);
                interrupt(&floor);
                let _ = floor.wait_with_output();
                Ok((run?, Seen::default()))
            }
            Watcher::Observer(extra) => {
                let obs = self.start_observer_to_file(extra)?;
                let cpu0 = Self::cpu_ms(obs.pid());
                let run = self.bindloop(mode, LOOP_SECS, None, None)?;
                let cpu_ms = Self::cpu_ms(obs.pid()) - cpu0;
                // Explanations of the last failures are still on their way.
                std::thread::sleep(Duration::from_millis(300));
                let t = obs.stop()?;
                Ok((
                    run,
                    Seen {
                        events: t.of_pid(kind, run.pid),
                        lost: t.lost(),
                        cpu_ms,
                        stop: t.stop,
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
                let run = self.bindloop(mode, LOOP_SECS, None, None)?;
                interrupt(&bt);
                bt.wait()?;
                Ok((run, Seen::default()))
            }
        }
    }

    /// Rounds of `mode` under each watcher, interleaved: medians, ratios to
    /// bare, and for the (first) observer completeness, losses and CPU.
    fn compare(
        &self,
        mode: &str,
        kind: &str,
        rounds: usize,
        watchers: &[(&str, Watcher)],
    ) -> Result<Value> {
        let mut rates: Vec<Vec<f64>> = vec![Vec::new(); watchers.len()];
        let (mut events, mut made, mut lost, mut cpu, mut coalesced) =
            (0u64, 0u64, 0u64, 0u64, 0u64);
        let mut by_cause = std::collections::BTreeMap::<String, u64>::new();
        for round in 0..rounds {
            eprintln!("bench: {mode} round {}/{rounds}", round + 1);
            for (i, (name, w)) in watchers.iter().enumerate() {
                let (run, seen) = self.watched(w, mode, kind)?;
                rates[i].push(run.rate);
                if *name == "observer" {
                    events += seen.events;
                    made += run.ops;
                    lost += seen.lost;
                    cpu += seen.cpu_ms;
                    coalesced += seen.stop["explain_coalesced"].as_u64().unwrap_or(0);
                    if let Some(causes) = seen.stop["lost_by_cause"].as_object() {
                        for (cause, n) in causes {
                            *by_cause.entry(cause.clone()).or_insert(0) += n.as_u64().unwrap_or(0);
                        }
                    }
                }
            }
        }
        let bare = median(rates[0].clone());
        let mut m = json!({"bare_rate": bare});
        for ((name, _), r) in watchers.iter().zip(&rates) {
            let med = median(r.clone());
            m[format!("{name}_rate")] = json!(med);
            m[format!("{name}_ratio")] = json!(med / bare);
        }
        m["events"] = json!(events);
        m["calls"] = json!(made);
        m["completeness"] = json!(events as f64 / made.max(1) as f64);
        m["lost"] = json!(lost);
        m["lost_by_cause"] = json!(by_cause);
        m["explain_coalesced"] = json!(coalesced);
        let secs: f64 = LOOP_SECS.parse()?;
        m["daemon_cpu_ms_per_s"] = json!(cpu as f64 / (rounds as f64 * secs));
        Ok(m)
    }

    /// In-kernel cost per program during one observed run of `mode`
    /// (kernel.bpf_stats_enabled=1 while it runs).
    fn program_costs(&self, mode: &str, kind: &str) -> Result<Value> {
        let (run, seen) = with_bpf_stats(|| self.watched(&Watcher::Observer(&[]), mode, kind))?;
        Ok(per_program(&seen.stop, run.ops, "call"))
    }
}

/// `f` with the kernel's per-program statistics on (kernel.bpf_stats_enabled=1),
/// put back as they were after.
fn with_bpf_stats<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    let stats = Path::new("/proc/sys/kernel/bpf_stats_enabled");
    let before = fs::read_to_string(stats).unwrap_or_else(|_| "0".into());
    fs::write(stats, "1").context("enabling kernel.bpf_stats_enabled")?;
    let measured = f();
    fs::write(stats, before.trim())?;
    measured
}

/// Each program of an `observer_stop`: its runs, runs and ns per `unit` of
/// the load (`ops` of them), and ns per run.
fn per_program(stop: &Value, ops: u64, unit: &str) -> Value {
    let ops = ops.max(1) as f64;
    Value::Array(
        stop["programs"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|p| {
                let runs = p["run_count"].as_u64().unwrap_or(0);
                let ns = p["run_time_ns"].as_u64().unwrap_or(0);
                let mut v = json!({"hook": p["hook"], "runs": runs,
                    "ns_per_run": if runs > 0 { ns as f64 / runs as f64 } else { 0.0 }});
                v[format!("runs_per_{unit}")] = json!(runs as f64 / ops);
                v[format!("ns_per_{unit}")] = json!(ns as f64 / ops);
                v
            })
            .collect(),
    )
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

/// A bindloop that holds something (a namespace, sockets) until released.
struct Held {
    child: Child,
    /// Its first line of output.
    said: String,
}

impl Held {
    fn start(bindloop: &Path, args: &[&str]) -> Result<Held> {
        let mut child = Command::new(bindloop)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting bindloop")?;
        let mut said = String::new();
        BufReader::new(child.stdout.take().expect("piped")).read_line(&mut said)?;
        Ok(Held { child, said })
    }

    fn release(mut self) -> Result<()> {
        drop(self.child.stdin.take());
        self.child.wait()?;
        Ok(())
    }
}

/// Timewait sockets on the host, all namespaces (the slab's live objects).
fn time_wait_sockets() -> u64 {
    fs::read_to_string("/proc/slabinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("tw_sock_TCP"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

/// Waits until the timewait sockets a released churn left are gone (its
/// namespace's teardown kills them, in the background, for seconds): the
/// next phase must not measure an observer busy with another round's sockets.
fn settle_time_wait() {
    let until = Instant::now() + Duration::from_secs(120);
    while time_wait_sockets() > 10_000 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The TIME_WAIT churn: bare, floor (the same hooks, empty programs) and
/// observed rounds in namespaces of their own, the observer's records
/// against the workload's own count and the kernel's; then one observed run
/// with the kernel's per-program statistics on (they cost a little, so not
/// in the timed rounds).
fn time_wait_churn(b: &Bench) -> Result<Value> {
    const EXTRA: [&str; 2] = ["--events", "time_wait"];
    let hooks = b.hooks_of(&EXTRA)?;
    let (mut bare, mut floor, mut obs, mut cpu, mut rss, mut own) =
        (vec![], vec![], vec![], 0u64, 0u64, 0u64);
    let (mut enters, mut closes, mut in_kernel, mut exits, mut lost, mut dups) = (0, 0, 0, 0, 0, 0);
    for round in 0..CHURN_ROUNDS {
        eprintln!("bench: TIME_WAIT churn round {}/{CHURN_ROUNDS}", round + 1);
        settle_time_wait();
        let held = Held::start(&b.bindloop, &["twchurn", CHURN_SECS])?;
        bare.push(parse_run(&held.said)?.rate);
        held.release()?;
        settle_time_wait();
        let f = b.start_floor(&hooks)?;
        let held = Held::start(&b.bindloop, &["twchurn", CHURN_SECS]);
        interrupt(&f);
        let _ = f.wait_with_output();
        let held = held?;
        floor.push(parse_run(&held.said)?.rate);
        held.release()?;
        settle_time_wait();
        let o = b.start_observer_to_file(&EXTRA)?;
        let cpu0 = Bench::cpu_ms(o.pid());
        let held = Held::start(&b.bindloop, &["twchurn", CHURN_SECS])?;
        let cpu_ms = Bench::cpu_ms(o.pid()) - cpu0;
        let run = parse_run(&held.said)?;
        let netns: u64 = field(&held.said, "netns=")?.parse()?;
        let tw: u64 = field(&held.said, "tw=")?.parse()?;
        let (vm, anon) = Bench::rss_kb(o.pid());
        rss = rss.max(vm);
        own = own.max(anon);
        // The last early ends are decided within 0.5 s.
        std::thread::sleep(Duration::from_millis(1500));
        let t = o.stop()?;
        held.release()?;
        dups += t.duplicate_enters.get(&netns).copied().unwrap_or(0);
        obs.push(run.rate);
        enters += t.in_netns("time_wait_enter", netns);
        exits += t.in_netns("time_wait_exit", netns);
        closes += run.ops;
        in_kernel += tw;
        lost += t.lost();
        cpu += cpu_ms;
    }
    let programs = churn_program_costs(b, &EXTRA)?;
    let secs: f64 = CHURN_SECS.parse()?;
    let (bare, floor, obs) = (median(bare), median(floor), median(obs));
    Ok(
        json!({"bare_rate": bare, "floor_rate": floor, "floor_ratio": floor / bare,
        "observer_rate": obs, "observer_ratio": obs / bare,
        "server_closes": closes, "time_wait_enter": enters, "time_wait_exit": exits,
        "kernel_time_wait_after": in_kernel, "open_by_the_stream": enters - exits,
        "duplicates": dups, "lost": lost,
        "daemon_cpu_ms_per_s": cpu as f64 / (CHURN_ROUNDS as f64 * secs), "daemon_rss_kb": rss,
        "daemon_own_kb": own, "programs": programs}),
    )
}

/// Per program during one observed churn: runs per connection and ns per run.
fn churn_program_costs(b: &Bench, extra: &[&str]) -> Result<Value> {
    settle_time_wait();
    let (run, stop) = with_bpf_stats(|| {
        let o = b.start_observer(extra)?;
        let held = Held::start(&b.bindloop, &["twchurn", "5"])?;
        let run = parse_run(&held.said)?;
        let t = o.stop()?;
        held.release()?;
        Ok((run, t.stop))
    })?;
    Ok(per_program(&stop, run.ops, "conn"))
}

/// The daemon's RSS with 600,000 TIME_WAIT sockets open.
fn time_wait_rss(b: &Bench) -> Result<Value> {
    eprintln!("bench: 600,000 TIME_WAIT sockets");
    settle_time_wait();
    let o = b.start_observer(&["--events", "time_wait", "--stats", "1"])?;
    let held = Held::start(&b.bindloop, &["twchurn", "120", "600000"])?;
    let tw: u64 = field(&held.said, "tw=")?.parse()?;
    std::thread::sleep(Duration::from_secs(2));
    let (rss, own) = Bench::rss_kb(o.pid());
    let lost = o.stop()?.lost();
    held.release()?;
    Ok(json!({"time_wait_open": tw, "daemon_rss_kb": rss, "daemon_own_kb": own, "lost": lost}))
}

pub fn run(t: Tools, root: &Path) -> Result<()> {
    let dir = root.join("target/bench");
    fs::create_dir_all(&dir)?;
    let mut b = Bench {
        observer: t.observer.into(),
        bindloop: t.bindloop.into(),
        floor: t.floor.into(),
        object: t.object.into(),
        dir: dir.clone(),
        hooks: Vec::new(),
    };
    // The observer's hooks here, for the floor.
    b.hooks = b.hooks_of(&[])?;
    let peers = peers();
    let mut results =
        json!({"rounds": ROUNDS, "loop_secs": LOOP_SECS.parse::<f64>()?, "hooks": b.hooks});

    // 1: the bind loop, bare, observed, at the floor, filtered to another
    // process, and the peers.
    for mode in ["udp", "tcp"] {
        let mut watchers = vec![
            ("bare", Watcher::None),
            ("observer", Watcher::Observer(&[])),
            ("floor", Watcher::Floor),
            ("filtered", Watcher::Observer(&["-p", "1"])),
        ];
        watchers.extend(peers.iter().map(|(n, w)| {
            (
                *n,
                match w {
                    Watcher::Bpftrace => Watcher::Bpftrace,
                    _ => Watcher::Strace,
                },
            )
        }));
        results[mode] = b.compare(mode, "bind", ROUNDS, &watchers)?;
    }

    // 2: a failure storm: every bind EADDRINUSE on one port.
    let storm = [
        ("bare", Watcher::None),
        ("observer", Watcher::Observer(&[])),
        ("floor", Watcher::Floor),
    ];
    results["storm"] = b.compare("storm", "bind", ROUNDS, &storm)?;
    // ... with 100,000 idle sockets in another namespace (lookups cost more).
    eprintln!("bench: 100,000 idle sockets");
    let idle = Held::start(&b.bindloop, &["hold", "100000"])?;
    if !idle.said.starts_with("ready") {
        bail!("bindloop could not hold 100,000 sockets: {}", idle.said);
    }
    let busy = b.compare("storm", "bind", 3, &storm[..2]);
    idle.release()?;
    results["storm_100k_idle"] = busy?;

    // 3: in-kernel cost per program.
    results["programs"] = json!({
        "bind": b.program_costs("udp", "bind")?,
        "storm": b.program_costs("storm", "bind")?,
    });

    // 4: startup (exec to observer_start, median of 10) and RSS after 10 M events.
    let mut startups = vec![];
    for _ in 0..10 {
        let t = Instant::now();
        let mut c = Command::new(&b.observer)
            .args(["run"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let mut first = String::new();
        BufReader::new(c.stdout.take().expect("piped")).read_line(&mut first)?;
        startups.push(t.elapsed().as_secs_f64() * 1000.0);
        interrupt(&c);
        c.wait()?;
    }
    results["startup_ms_median"] = json!(median(startups));
    let o = b.start_observer(&[])?;
    let mut events = 0u64;
    while events < 10_000_000 {
        events += b
            .bindloop("udp", "60", Some(10_000_000 - events), None)?
            .ops;
    }
    std::thread::sleep(Duration::from_millis(2500));
    let (rss, own) = Bench::rss_kb(o.pid());
    results["rss_kb_after_10m_events"] = json!(rss);
    results["own_kb_after_10m_events"] = json!(own);
    let stop = o.stop()?;
    results["lost_in_10m_events"] = json!(stop.lost());
    results["lost_in_10m_by_cause"] = stop.stop["lost_by_cause"].clone();

    // 5: TIME_WAIT: churn, its in-kernel cost, and RSS with 600,000 open.
    results["time_wait_churn"] = time_wait_churn(&b)?;
    results["time_wait_600k"] = time_wait_rss(&b)?;

    // 6: `observer report` over a day of logs.
    results["report_10m"] = report_10m(&b)?;

    let path = dir.join("results.json");
    fs::write(&path, serde_json::to_string_pretty(&results)?)?;
    print_table(
        &results,
        &peers.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
        &mut std::io::stdout(),
    )?;
    eprintln!("bench: wrote {}", path.display());
    Ok(())
}

/// Records in the `observer report` row: a day of a busy host's logs.
const REPORT_RECORDS: u64 = 10_000_000;

/// One record of a synthetic day (`i` of `n`), in the mix a busy host writes:
/// half TCP state changes, two in five binds (one in forty of them failing with
/// its explanation), TIME_WAIT enters and exits, now and then a failed connect.
fn synthetic_record(i: u64, n: u64, out: &mut impl Write) -> std::io::Result<()> {
    // u128: 86,399 s in ns times 10 M does not fit in 64 bits.
    let ns = (u128::from(i) * 86_399_000_000_000 / u128::from(n)) as u64;
    let (s, frac) = (ns / 1_000_000_000, ns % 1_000_000_000);
    let ts = format!(
        "2026-11-28T{:02}:{:02}:{:02}.{frac:09}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    );
    let pid = 1000 + (i * 7919) % 50;
    let port = [80, 443, 5432, 6379, 8080, 9000][(i % 6) as usize];
    match i % 20 {
        0..=9 => writeln!(
            out,
            r#"{{"v":1,"ts":"{ts}","event":"tcp_state","sk":"0xffff88811ff88940","pid":null,"tid":null,"comm":null,"uid":null,"netns":4026532177,"family":"inet","saddr":"127.0.0.1","sport":{port},"daddr":"127.0.0.1","dport":20000,"old":"FIN_WAIT2","new":"CLOSE","prev_state_ms":0.013,"reuseaddr":false,"reuseport":false}}"#
        ),
        10..=15 => writeln!(
            out,
            r#"{{"v":1,"ts":"{ts}","event":"bind","pid":{pid},"tid":{pid},"comm":"worker-{pid}","uid":0,"cgroup_id":1,"cgroup":"/","container_id":null,"netns":4026532177,"fd":4,"family":"inet6","proto":"udp","addr":"::1","port":0,"bound_port":39386,"options":{{"reuseaddr":false,"reuseport":false,"freebind":false,"transparent":false,"bind_address_no_port":false,"bound_dev_if":0}},"ret":0,"errno":null,"latency_ns":null,"sock_cookie":null,"sock_ino":10264080}}"#
        ),
        16 if i % 100 == 16 => writeln!(
            out,
            r#"{{"v":1,"ts":"{ts}","event":"bind","pid":{pid},"tid":{pid},"comm":"worker-{pid}","uid":0,"cgroup_id":1,"cgroup":"/","container_id":null,"netns":4026532177,"fd":3,"family":"inet","proto":"tcp","addr":"127.0.0.1","port":{port},"bound_port":null,"options":{{"reuseaddr":true,"reuseport":false,"freebind":false,"transparent":false,"bind_address_no_port":false,"bound_dev_if":0}},"ret":-98,"errno":"EADDRINUSE","latency_ns":null,"sock_cookie":null,"sock_ino":10264181,"explain":{{"rule":"time_wait_without_reuseaddr","hint":"port {port} is held by 1 TIME_WAIT socket left by a socket without SO_REUSEADDR (they inherit it from the listener that accepted them); on Linux both the old and the new socket need SO_REUSEADDR, or wait 60 s","blockers":[{{"proto":"tcp","state":"TIME_WAIT","addr":"127.0.0.1","port":{port},"raddr":"127.0.0.1","rport":54556,"uid":0,"reuseaddr":false,"reuseport":false,"v6only":null,"expires_ms":59800,"pid":{pid},"comm":"worker-{pid}","sock_cookie":5502375}}]}}}}"#
        ),
        16 | 17 => writeln!(
            out,
            r#"{{"v":1,"ts":"{ts}","event":"bind","pid":{pid},"tid":{pid},"comm":"worker-{pid}","uid":0,"cgroup_id":1,"cgroup":"/","container_id":null,"netns":4026532177,"fd":5,"family":"inet","proto":"tcp","addr":"0.0.0.0","port":{port},"bound_port":{port},"options":{{"reuseaddr":true,"reuseport":false,"freebind":false,"transparent":false,"bind_address_no_port":false,"bound_dev_if":0}},"ret":0,"errno":null,"latency_ns":null,"sock_cookie":null,"sock_ino":10264082}}"#
        ),
        18 => writeln!(
            out,
            r#"{{"v":1,"ts":"{ts}","event":"time_wait_enter","sk":"0xffff8882e99ddb00","netns":4026532177,"family":"inet","saddr":"127.0.0.1","sport":{port},"daddr":"127.0.0.1","dport":47424,"expires_ms":60000,"confirmed":true,"preexisting":false,"sock_cookie":null,"reuseaddr":true,"reuseport":false,"pid":{pid},"tid":{pid},"comm":"worker-{pid}","uid":0}}"#
        ),
        _ if i % 1000 == 19 => writeln!(
            out,
            r#"{{"v":1,"ts":"{ts}","event":"connect","pid":{pid},"tid":{pid},"comm":"worker-{pid}","uid":0,"cgroup_id":1,"cgroup":"/","container_id":null,"netns":4026532177,"fd":9,"family":"inet","laddr":"0.0.0.0","lport":0,"daddr":"127.0.0.1","dport":8080,"ret":-99,"errno":"EADDRNOTAVAIL","latency_ns":null}}"#
        ),
        _ => writeln!(
            out,
            r#"{{"v":1,"ts":"{ts}","event":"time_wait_exit","sk":"0xffff8882e99ddb00","netns":4026532177,"family":"inet","saddr":"127.0.0.1","sport":{port},"daddr":"127.0.0.1","dport":47424,"held_ms":60329,"reason":"expired","preexisting":false,"sock_cookie":null}}"#
        ),
    }
}

/// `observer report` (and its page) over `REPORT_RECORDS` records in one
/// file, written first and removed after: records per second.
fn report_10m(b: &Bench) -> Result<Value> {
    let path = b.dir.join("report-10m.jsonl");
    let page = b.dir.join("report-10m.html");
    eprintln!("bench: writing {REPORT_RECORDS} records for observer report");
    let mut w = std::io::BufWriter::with_capacity(1 << 20, fs::File::create(&path)?);
    for i in 0..REPORT_RECORDS {
        synthetic_record(i, REPORT_RECORDS, &mut w)?;
    }
    w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    let bytes = fs::metadata(&path)?.len();
    // Read once so that both runs find it in the page cache; the median of three.
    let mut secs = vec![];
    let mut stdout = String::new();
    for _ in 0..3 {
        let t = Instant::now();
        let out = Command::new(&b.observer)
            .arg("report")
            .arg(&path)
            .arg("--html")
            .arg(&page)
            .output()
            .context("running observer report")?;
        secs.push(t.elapsed().as_secs_f64());
        if !out.status.success() {
            bail!(
                "observer report failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    }
    let _ = fs::remove_file(&path);
    let records: Option<u64> = stdout
        .lines()
        .find_map(|l| l.strip_prefix("records "))
        .and_then(|v| v.trim().parse().ok());
    if records != Some(REPORT_RECORDS) {
        bail!("observer report counted {records:?} records of {REPORT_RECORDS}");
    }
    let secs = median(secs);
    Ok(json!({
        "records": REPORT_RECORDS,
        "bytes": bytes,
        "secs": secs,
        "records_per_s": REPORT_RECORDS as f64 / secs,
    }))
}

fn print_table(r: &Value, peers: &[&str], w: &mut impl Write) -> std::io::Result<()> {
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    writeln!(
        w,
        "{:<44} {:>10} {:>10} {:>10}",
        "ratio to bare (median)", "UDP", "TCP", "storm"
    )?;
    writeln!(
        w,
        "{:<44} {:>10.0} {:>10.0} {:>10.0}",
        "bare calls/s",
        f(&r["udp"]["bare_rate"]),
        f(&r["tcp"]["bare_rate"]),
        f(&r["storm"]["bare_rate"])
    )?;
    for (name, what) in [
        ("observer", "observer (target >= 0.90; storm >= 0.85)"),
        ("floor", "floor: the same hooks, empty programs"),
        ("filtered", "observer -p 1 (target >= 0.97)"),
    ] {
        let k = format!("{name}_ratio");
        writeln!(
            w,
            "{:<44} {:>10.3} {:>10.3} {:>10.3}",
            what,
            f(&r["udp"][&k]),
            f(&r["tcp"][&k]),
            f(&r["storm"][&k])
        )?;
    }
    for name in peers {
        let k = format!("{name}_ratio");
        writeln!(
            w,
            "{:<44} {:>10.3} {:>10.3}",
            name,
            f(&r["udp"][&k]),
            f(&r["tcp"][&k])
        )?;
    }
    writeln!(
        w,
        "{:<44} {:>10.4} {:>10.4} {:>10.4}",
        "completeness (records / calls)",
        f(&r["udp"]["completeness"]),
        f(&r["tcp"]["completeness"]),
        f(&r["storm"]["completeness"])
    )?;
    writeln!(
        w,
        "{:<44} {:>10} {:>10} {:>10}",
        "lost (target 0)", r["udp"]["lost"], r["tcp"]["lost"], r["storm"]["lost"]
    )?;
    // Where the losses were: in the kernel (ring buffer full) or in the
    // output (the reader of the observer's pipe fell behind).
    let cause = |phase: &str, c: &str| r[phase]["lost_by_cause"][c].as_u64().unwrap_or(0);
    writeln!(
        w,
        "{:<44} {:>10} {:>10} {:>10}",
        "  of which ring buffer / output",
        format!("{}/{}", cause("udp", "ring_buffer"), cause("udp", "output")),
        format!("{}/{}", cause("tcp", "ring_buffer"), cause("tcp", "output")),
        format!(
            "{}/{}",
            cause("storm", "ring_buffer"),
            cause("storm", "output")
        )
    )?;
    writeln!(
        w,
        "{:<44} {:>10.0} {:>10.0} {:>10.0}",
        "daemon CPU ms per s",
        f(&r["udp"]["daemon_cpu_ms_per_s"]),
        f(&r["tcp"]["daemon_cpu_ms_per_s"]),
        f(&r["storm"]["daemon_cpu_ms_per_s"])
    )?;
    let s = &r["storm_100k_idle"];
    writeln!(
        w,
        "storm with 100,000 idle sockets elsewhere: observer {:.3} of bare ({:.0}/s), completeness {:.4}, lost {}, explanations coalesced {}",
        f(&s["observer_ratio"]),
        f(&s["bare_rate"]),
        f(&s["completeness"]),
        s["lost"],
        s["explain_coalesced"]
    )?;
    for (phase, title) in [("bind", "UDP bind loop"), ("storm", "failure storm")] {
        writeln!(
            w,
            "\nin-kernel cost, {title}{:>22} {:>10} {:>10}",
            "runs", "ns/run", "ns/call"
        )?;
        for p in r["programs"][phase].as_array().into_iter().flatten() {
            writeln!(
                w,
                "  {:<48} {:>10} {:>10.0} {:>10.0}",
                p["hook"].as_str().unwrap_or(""),
                p["runs"],
                f(&p["ns_per_run"]),
                f(&p["ns_per_call"])
            )?;
        }
    }
    let c = &r["time_wait_churn"];
    writeln!(
        w,
        "\nTIME_WAIT churn (server closes first, --events time_wait): bare {:.0} conn/s, observed {:.0} conn/s, ratio {:.3} (target >= 0.95); floor (the same hooks, empty programs) {:.0} conn/s, ratio {:.3}",
        f(&c["bare_rate"]),
        f(&c["observer_rate"]),
        f(&c["observer_ratio"]),
        f(&c["floor_rate"]),
        f(&c["floor_ratio"])
    )?;
    writeln!(
        w,
        "  server-side closes {}, time_wait_enter {}, duplicates {}, lost {}; open by the stream {} = the kernel's count {}; daemon CPU {:.0} ms/s, RSS {} kB (own {} kB)",
        c["server_closes"],
        c["time_wait_enter"],
        c["duplicates"],
        c["lost"],
        c["open_by_the_stream"],
        c["kernel_time_wait_after"],
        f(&c["daemon_cpu_ms_per_s"]),
        c["daemon_rss_kb"],
        c["daemon_own_kb"]
    )?;
    writeln!(
        w,
        "  in-kernel cost, churn{:>28} {:>10} {:>10} {:>10}",
        "runs", "per conn", "ns/run", "ns/conn"
    )?;
    for p in c["programs"].as_array().into_iter().flatten() {
        writeln!(
            w,
            "    {:<40} {:>10} {:>10.1} {:>10.0} {:>10.0}",
            p["hook"].as_str().unwrap_or(""),
            p["runs"],
            f(&p["runs_per_conn"]),
            f(&p["ns_per_run"]),
            f(&p["ns_per_conn"])
        )?;
    }
    let t = &r["time_wait_600k"];
    writeln!(
        w,
        "  with {} TIME_WAIT sockets open: daemon RSS {} kB (target < 40960; own {} kB), lost {}",
        t["time_wait_open"], t["daemon_rss_kb"], t["daemon_own_kb"], t["lost"]
    )?;
    writeln!(
        w,
        "startup {:.0} ms (median of 10, target < 100); RSS after 10 M events {} kB (target < 20480; own {} kB: the rest is the ring buffer's kernel pages, mapped twice, and the binary), lost {} (by cause: {})",
        f(&r["startup_ms_median"]),
        r["rss_kb_after_10m_events"],
        r["own_kb_after_10m_events"],
        r["lost_in_10m_events"],
        r["lost_in_10m_by_cause"]
    )?;
    let rep = &r["report_10m"];
    writeln!(
        w,
        "observer report: {} records ({:.1} GB) with its page in {:.2} s, {:.2} M records/s (median of 3, target < 10 s)",
        rep["records"],
        f(&rep["bytes"]) / 1e9,
        f(&rep["secs"]),
        f(&rep["records_per_s"]) / 1e6
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_synthetic_day_is_records_of_every_kind_in_order() {
        let mut out = Vec::new();
        for i in 0..2000 {
            synthetic_record(i, 2000, &mut out).unwrap();
        }
        let mut kinds = HashMap::new();
        let mut last = String::new();
        for l in String::from_utf8(out).unwrap().lines() {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            *kinds
                .entry(v["event"].as_str().unwrap().to_owned())
                .or_insert(0) += 1;
            let ts = v["ts"].as_str().unwrap().to_owned();
            assert!(ts >= last, "{ts} after {last}");
            last = ts;
        }
        assert_eq!(kinds["tcp_state"], 1000);
        assert_eq!(kinds["bind"], 800);
        assert_eq!(kinds["time_wait_enter"], 100);
        assert_eq!(kinds["connect"], 2);
        assert_eq!(kinds["time_wait_exit"], 98);
        assert!(last.starts_with("2026-11-28T23:5"), "{last}");
    }
}
