//! `observer run`: attach, stream records until a signal or the duration, detach.

use std::{
    io,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use aya::maps::{Map, PerCpuArray};
use tokio::{
    io::{
        Interest,
        unix::{AsyncFd, AsyncFdReadyMutGuard},
    },
    signal::unix::{Signal, SignalKind, signal},
    sync::mpsc,
    time::{MissedTickBehavior, interval, sleep},
};

use crate::{
    cli::RunArgs,
    clock::Clock,
    explain::worker::{self, Failure, Worker},
    filter::Filter,
    kernel::{btf_offsets, cgroups::Cgroups, loader, mounts, ring::Ring},
    metrics::{self, Metrics},
    output::{Output, stdout_closed, stdout_closed_watch},
    repro::{self, ctx::Sink, scenarios::Scenario},
    schema::{Event, Line, Start, Stop},
    stream::{Parts, Stream, TimeWait},
    time_wait,
};

/// How often the ring buffer is drained without a wakeup from the kernel.
const DRAIN_EVERY: Duration = Duration::from_millis(10);
/// How often the per-CPU loss counters are read.
const LOST_POLL: Duration = Duration::from_secs(1);
/// How often the kernel checks timewait sockets born in FIN_WAIT2 for a move
/// to TIME_WAIT that no timer event showed.
const SWEEP_EVERY: Duration = Duration::from_millis(50);

/// How long the daemon may take to end after SIGTERM/SIGINT, whatever the
/// output is doing: what is not written by then is counted on stderr.
const STOP_WITHIN: Duration = Duration::from_millis(700);

/// A configuration the daemon cannot run with (a bad `--output`, say): exit
/// status 2, which the service unit does not restart on (it would fail again).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

pub fn run(args: RunArgs) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(stream(args))
}

/// Everything `observer run` has once its programs are attached.
struct Running {
    s: Stream,
    ring: AsyncFd<Ring>,
    attached: loader::Attached,
    /// Failures back from the explainer.
    explained: mpsc::Receiver<Failure>,
    /// TIME_WAIT records from the polling tracker (where the timer is not used).
    time_wait: mpsc::UnboundedReceiver<time_wait::Out>,
    /// The programs' log records (rare paths), with `-v`.
    logs: Option<AsyncFd<loader::KernelLogger>>,
    /// `port_pressure` records from the pressure worker.
    pressure: mpsc::Receiver<crate::schema::PortPressure>,
}

/// Why the loop ended.
enum Ended {
    /// A signal, the duration, or the `--repro` run (with its report).
    Stop(&'static str, Option<ReproDone>),
    /// Nobody reads stdout any more: nothing left to say.
    StdoutClosed,
}

type ReproDone = (Vec<&'static Scenario>, repro::Report);

async fn stream(args: RunArgs) -> Result<ExitCode> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "must run as root: loading and attaching the eBPF programs needs CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN and CAP_SYS_ADMIN"
        );
    }
    // Slow reads of the kernel's own, beside the checks and the BTF offsets.
    let handler = std::thread::spawn(time_wait::timer::handler);
    let prepared = std::thread::spawn(loader::prepare);
    // Signals first: one that arrives while the programs load is served by
    // the loop (a clean stop), not by the default action.
    let mut signals = Signals::new()?;
    let mut r = start(&args, handler, prepared)?;

    // --repro: the scenarios run beside the stream; their events are kept to check.
    let (repro_tx, repro_rx) = tokio::sync::oneshot::channel();
    if let Some(names) = &args.repro {
        let scenarios = repro::select(names).map_err(anyhow::Error::msg)?;
        let shared = Arc::new(repro::shared::Shared::default());
        r.s.serve_repro(shared.clone(), args.all_host);
        std::thread::spawn(move || {
            let report = repro::run(&scenarios, Sink::Stderr, Some(shared));
            let _ = repro_tx.send((scenarios, report));
        });
    }
    let (reason, report) = match serve(&mut r, &args, &mut signals, repro_rx).await? {
        Ended::Stop(reason, report) => (reason, report),
        Ended::StdoutClosed => {
            log::debug!("stdout closed: stopping");
            return Ok(ExitCode::SUCCESS);
        }
    };
    let kept = stop(r, reason, &args).await?;
    match report {
        Some((scenarios, report)) => check_repro(&args, &scenarios, &report, &kept),
        None => Ok(ExitCode::SUCCESS),
    }
}

/// SIGINT, SIGTERM (stop) and SIGHUP (reopen the output).
struct Signals {
    int: Signal,
    term: Signal,
    hup: Signal,
    /// The last stop signal, set by the handler itself. Tokio's streams learn
    /// of a signal only when its driver turns, which a loop that always has
    /// records to drain (a storm on a slow machine) may put off for seconds:
    /// the loop reads this on every turn.
    stop: Arc<AtomicUsize>,
}

impl Signals {
    fn new() -> io::Result<Signals> {
        let stop = Arc::new(AtomicUsize::new(0));
        for sig in [libc::SIGINT, libc::SIGTERM] {
            signal_hook::flag::register_usize(sig, stop.clone(), sig as usize)?;
        }
        Ok(Signals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
            stop,
        })
    }

    /// The stop signal received, if any.
    fn stopping(&self) -> Option<&'static str> {
        match self.stop.load(Ordering::Relaxed) as i32 {
            libc::SIGINT => Some("SIGINT"),
            libc::SIGTERM => Some("SIGTERM"),
            _ => None,
        }
    }
}

/// From the checks to `observer_start`: the output, the kernel's offsets and
/// timer, the programs loaded and attached, the stream ready.
fn start(
    args: &RunArgs,
    handler: JoinHandle<Result<u64, String>>,
    prepared: JoinHandle<loader::Prepared>,
) -> Result<Running> {
    let clock = Clock::new();
    let began = Instant::now();
    let phase = |what: &str| log::debug!("startup: {what} at {:?}", began.elapsed());
    // The output first: a path that cannot be used is a configuration error,
    // said before anything is loaded.
    let out = Output::open(args.output.as_deref(), args.format, clock)
        .map_err(|e| ConfigError(e.to_string()))?;
    let filter = filter_of(args)?;
    // The metrics' port next, before anything is loaded: one that cannot be
    // had is said at once.
    let metrics = match args.metrics {
        Some(addr) => {
            let listener = metrics::http::bind(addr)?;
            let m = Metrics::new(&filter, args.ring_buffer, out.tally());
            metrics::http::spawn(listener, m.registry())?;
            Some(m)
        }
        None => None,
    };
    raise_memlock();
    if mounts::ensure_tracefs()? {
        eprintln!(
            "observer: tracefs was not mounted; mounted it at {}",
            mounts::TRACEFS
        );
    }
    let cgroup = mounts::cgroup2_mount()?;
    let (offsets, tw_offsets) = btf_offsets::read();
    phase("BTF read");
    // TIME_WAIT from the kernel's timer where its layout is known and, once
    // the programs are verified, its handler's address.
    let tw = time_wait::timer::discover(&tw_offsets);
    let kernel_filter = filter.kernel();
    let prepared = prepared
        .join()
        .map_err(|_| anyhow::anyhow!("the loader thread panicked"))?;
    let mut attached = loader::load_and_attach(
        &loader::Setup {
            offsets: &offsets,
            time_wait: tw.as_ref().ok().map(|t| &t.0),
            filter: &kernel_filter,
            pids: &args.pids,
            ports: &args.ports,
            cgroup: args.cgroup.as_ref().map(|c| c.dir.as_path()),
            ring_bytes: args.ring_buffer,
        },
        prepared,
        || {
            handler
                .join()
                .unwrap_or_else(|_| Err("the kallsyms thread panicked".into()))
        },
    )?;
    phase("programs loaded and attached");
    let hz = match tw.and_then(|(_, hz)| attached.timer_handler.clone().map(|_| hz)) {
        Ok(hz) => Some(hz),
        Err(why) => {
            log::warn!("TIME_WAIT: polling sock_diag every 500 ms: {why}");
            None
        }
    };
    let logs = loader::kernel_logger(&mut attached.ebpf)
        // SAFETY: the logger owns its ring buffer's fd, open until the AsyncFd drops it.
        .map(|l| {
            unsafe { AsyncFd::register_with_interest(l, Interest::READABLE) }
                .map_err(io::Error::from)
        })
        .transpose()
        .context("polling the programs' log")?;
    // Parsing and loading the object allocates and frees megabytes: return them.
    // SAFETY: malloc_trim only returns free memory to the system.
    unsafe { libc::malloc_trim(0) };
    let mut map = |name: &str| {
        attached
            .ebpf
            .take_map(name)
            .with_context(|| format!("no {name} map"))
    };
    let ring = match map("EVENTS")? {
        Map::RingBuf(data) => Ring::new(data).context("mapping the ring buffer")?,
        _ => bail!("EVENTS is not a ring buffer"),
    };
    let lost = PerCpuArray::try_from(map("LOST")?)?;
    let filtered = PerCpuArray::try_from(map("FILTERED")?)?;
    // SAFETY: the Ring owns its map fd, which stays open until the AsyncFd drops it.
    let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(io::Error::from)
        .context("polling the ring buffer")?;

    let (tw_tx, tw_rx) = mpsc::unbounded_channel();
    // Explanations come back here, a bounded queue like the one to the worker.
    let (explained_tx, explained_rx) = mpsc::channel(worker::QUEUE);
    // The TIME_WAIT sockets there already: reported right after observer_start.
    let (source, preexisting) = match hz {
        Some(hz) => {
            let mut t = time_wait::timer::Tracker::new(clock, hz);
            let before = t.preexisting();
            (TimeWait::Timer(t), before)
        }
        None => (
            TimeWait::Poll(time_wait::poll::spawn(clock, tw_tx)),
            Vec::new(),
        ),
    };
    phase("TIME_WAIT snapshot taken");
    // Port pressure: its worker counts every namespace once now, then those
    // the records mark; the worst pairs go to the metrics.
    let (pressure_tx, pressure_rx) = mpsc::channel(256);
    let top = metrics
        .as_ref()
        .map_or_else(Default::default, |m| m.pressure_top());
    let explainer = Worker::spawn(explained_tx);
    let pressure =
        crate::pressure::worker::spawn(pressure_tx, top, filter.netns, explainer.book.clone());
    let mut s = Stream::new(Parts {
        out,
        clock,
        filter,
        cgroups: Cgroups::new(cgroup.clone()),
        lost,
        kernel_filtered: filtered,
        time_wait: source,
        explainer,
        metrics,
        pressure: Some(pressure),
    });
    s.say(Event::ObserverStart(Start {
        version: env!("CARGO_PKG_VERSION"),
        kernel: kernel_release(),
        pid: std::process::id(),
        hooks: attached.hooks.clone(),
        prog_ids: attached.prog_ids.clone(),
        cgroup: cgroup.display().to_string(),
        ring_buffer_bytes: args.ring_buffer,
    }));
    for o in preexisting {
        s.time_wait_record(o);
    }
    s.out.flush();
    phase("observer_start written");
    Ok(Running {
        s,
        ring,
        attached,
        explained: explained_rx,
        time_wait: tw_rx,
        logs,
        pressure: pressure_rx,
    })
}

/// The event loop, until a signal, the duration, the end of `--repro`, or
/// a closed stdout.
async fn serve(
    r: &mut Running,
    args: &RunArgs,
    sig: &mut Signals,
    mut repro: tokio::sync::oneshot::Receiver<ReproDone>,
) -> Result<Ended> {
    let deadline = sleep(args.duration.unwrap_or(Duration::MAX / 4));
    tokio::pin!(deadline);
    let stdout_watch = if r.s.out.is_stdout() {
        stdout_closed_watch()
    } else {
        None
    };
    let every = |d: Duration| {
        let mut i = interval(d);
        i.set_missed_tick_behavior(MissedTickBehavior::Delay);
        i
    };
    let mut stats = every(args.stats.unwrap_or(Duration::from_secs(3600)));
    stats.tick().await; // the first tick is immediate
    // The kernel side wakes us only when records pile up (see wake_flags):
    // drain on a short timer too.
    let mut drain_tick = every(DRAIN_EVERY);
    let mut tick = every(LOST_POLL);
    let mut sweep = every(SWEEP_EVERY);
    let s = &mut r.s;
    // As for signals (see `Signals::stop`), the clock is read on every turn.
    let ends_at = args.duration.map(|d| Instant::now() + d);
    loop {
        if s.out.closed() {
            return Ok(Ended::StdoutClosed);
        }
        if let Some(which) = sig.stopping() {
            return Ok(Ended::Stop(which, None));
        }
        if ends_at.is_some_and(|t| Instant::now() >= t) {
            return Ok(Ended::Stop("duration", None));
        }
        // Biased: the ending conditions first, so that no load on the ring
        // buffer can keep a signal waiting (each drain is bounded too).
        tokio::select! {
            biased;
            _ = sig.int.recv() => return Ok(Ended::Stop("SIGINT", None)),
            _ = sig.term.recv() => return Ok(Ended::Stop("SIGTERM", None)),
            _ = &mut deadline, if args.duration.is_some() => return Ok(Ended::Stop("duration", None)),
            _ = stdout_closed(&stdout_watch) => return Ok(Ended::StdoutClosed),
            done = &mut repro, if args.repro.is_some() => return Ok(Ended::Stop("repro", done.ok())),
            _ = sig.hup.recv() => s.out.reopen(),
            // Before the ring buffer: under a storm it is always ready, and
            // explained failures (at most the queue's length) must not starve.
            Some(f) = r.explained.recv() => {
                s.write_explained(f);
                while let Ok(f) = r.explained.try_recv() {
                    s.write_explained(f);
                }
                // In a storm the worker always has more: drain the ring buffer
                // here too (one bounded batch), or it would starve and overflow.
                s.drain(r.ring.get_mut());
            }
            guard = r.ring.readable_mut() => {
                let mut guard = guard?;
                if !s.drain(guard.get_inner_mut()) {
                    guard.clear_ready();
                }
            }
            _ = drain_tick.tick() => { s.drain(r.ring.get_mut()); }
            _ = sweep.tick() => r.attached.sweep_time_wait()?,
            _ = tick.tick() => {
                s.poll_lost(r.attached.recursion_misses())?;
                s.settled();
                s.out.flush();
            }
            _ = stats.tick(), if args.stats.is_some() => s.stats(),
            guard = logs_ready(&mut r.logs) => {
                let mut guard = guard?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            Some(p) = r.pressure.recv() => {
                s.port_pressure(p);
                while let Ok(p) = r.pressure.try_recv() {
                    s.port_pressure(p);
                }
                s.out.flush();
            }
            Some(o) = r.time_wait.recv() => {
                s.time_wait_record(o);
                while let Ok(o) = r.time_wait.try_recv() {
                    s.time_wait_record(o);
                }
                s.out.flush();
            }
        }
    }
}

/// The programs' log, when there is one to read.
async fn logs_ready(
    logs: &mut Option<AsyncFd<loader::KernelLogger>>,
) -> io::Result<AsyncFdReadyMutGuard<'_, loader::KernelLogger>> {
    match logs {
        Some(l) => l.readable_mut().await,
        None => std::future::pending().await,
    }
}

/// What is in flight within `STOP_WITHIN`, `observer_stop`, the programs
/// detached, the output finished. Returns the call records kept for `--repro`.
async fn stop(mut r: Running, reason: &'static str, args: &RunArgs) -> Result<Vec<Line>> {
    let stop_by = Instant::now() + STOP_WITHIN;
    let s = &mut r.s;
    // What is already in the ring buffer, and its explanations, within the time we have.
    while s.drain(r.ring.get_mut()) && Instant::now() + STOP_WITHIN / 3 < stop_by {}
    while s.explaining() > 0 {
        let left = (stop_by - STOP_WITHIN / 3).saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, r.explained.recv()).await {
            Ok(Some(f)) => s.write_explained(f),
            _ => break,
        }
    }
    s.poll_lost(r.attached.recursion_misses())?;
    if let Some(logs) = &mut r.logs {
        logs.get_mut().flush();
    }
    s.say(Event::ObserverStop(Stop {
        reason,
        counts: s.counts(),
        programs: r.attached.program_stats(),
    }));
    // To the writer now: it writes while the programs are detached.
    s.out.flush();
    let Running {
        s, ring, attached, ..
    } = r;
    drop(ring);
    drop(attached); // detaches every program: their links are owned by this process
    let (out, kept) = s.finish();
    let is_stdout = out.is_stdout();
    let unwritten = out.finish(stop_by);
    if unwritten > 0 {
        eprintln!(
            "observer: {} record(s) could not be written to {}",
            unwritten,
            if is_stdout {
                "stdout (its reader stopped reading)".to_owned()
            } else {
                format!(
                    "--output {}",
                    args.output.as_deref().unwrap_or("".as_ref()).display()
                )
            }
        );
    }
    Ok(kept)
}

/// `run --repro`: the workload's report, and whether the stream held every step.
fn check_repro(
    args: &RunArgs,
    scenarios: &[&Scenario],
    report: &repro::Report,
    kept: &[Line],
) -> Result<ExitCode> {
    eprint!("{}", report.summary(scenarios));
    if let Some(path) = &args.repro_log {
        let mut log = String::new();
        for step in &report.steps {
            log += &serde_json::to_string(step)?;
            log.push('\n');
        }
        std::fs::write(path, log).with_context(|| format!("writing {}", path.display()))?;
    }
    let kept: Vec<serde_json::Value> = kept
        .iter()
        .map(serde_json::to_value)
        .collect::<Result<_, _>>()?;
    let problems = repro::check::problems(&report.steps, &kept, std::process::id());
    for p in &problems {
        eprintln!("in the stream: {p}");
    }
    Ok(if report.passed() && problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The filters from the command line; a cgroup is named by its path under the cgroup2 mount.
fn filter_of(args: &RunArgs) -> Result<Filter> {
    Ok(Filter {
        pids: args.pids.iter().copied().collect(),
        ports: args.ports.iter().copied().collect(),
        comm: args.comm.clone(),
        uid: args.uid,
        cgroup: args.cgroup.as_ref().map(|c| c.rel.clone()),
        netns: args.netns,
        errors_only: args.errors_only,
        events: args.events.iter().cloned().collect(),
    })
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; newer ones use memcg.
fn raise_memlock() {
    use nix::sys::resource::{RLIM_INFINITY, Resource, setrlimit};
    if let Err(e) = setrlimit(Resource::RLIMIT_MEMLOCK, RLIM_INFINITY, RLIM_INFINITY) {
        log::debug!(
            "could not raise RLIMIT_MEMLOCK ({e}); not needed on kernels with memcg accounting"
        );
    }
}
