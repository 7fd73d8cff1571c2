//! `observer run`: attach, stream records until a signal or the duration, detach.

use std::{io, process::ExitCode, time::Duration};

use anyhow::{Context, Result, bail};
use aya::maps::{PerCpuArray, RingBuf};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
    time::{MissedTickBehavior, interval, sleep},
};

use crate::{
    btf_offsets,
    cgroups::{self, Cgroups},
    cli::RunArgs,
    clock::Clock,
    events::{SCHEMA_VERSION, Start, Stop},
    filter::Filter,
    loader, mounts,
    output::{Output, is_closed_pipe, stdout_closed, stdout_closed_watch},
    repro::{self, ctx::Sink},
    stream::Stream,
    time_wait,
};

/// How often the ring buffer is drained without a wakeup from the kernel.
const DRAIN_EVERY: Duration = Duration::from_millis(10);
/// How often the per-CPU loss counters are read.
const LOST_POLL: Duration = Duration::from_secs(1);

pub fn run(args: RunArgs) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    match rt.block_on(stream(args)) {
        Err(e) if e.downcast_ref::<io::Error>().is_some_and(is_closed_pipe) => {
            log::debug!("stdout closed: stopping");
            Ok(ExitCode::SUCCESS)
        }
        other => other,
    }
}

async fn stream(args: RunArgs) -> Result<ExitCode> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "must run as root: loading and attaching the eBPF programs needs CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN and CAP_SYS_ADMIN"
        );
    }
    raise_memlock();
    if mounts::ensure_tracefs()? {
        eprintln!(
            "observer: tracefs was not mounted; mounted it at {}",
            mounts::TRACEFS
        );
    }
    let cgroup = mounts::cgroup2_mount()?;
    let offsets = btf_offsets::kernel_offsets();
    let clock = Clock::new();
    let mut attached = loader::load_and_attach(&cgroup, &offsets, args.ring_buffer)?;
    // Parsing and loading the object allocates and frees megabytes: return them.
    unsafe { libc::malloc_trim(0) };
    let ring = RingBuf::try_from(attached.ebpf.take_map("EVENTS").context("no EVENTS map")?)?;
    let lost = PerCpuArray::try_from(attached.ebpf.take_map("LOST").context("no LOST map")?)?;
    // SAFETY: the RingBuf owns its map fd, which stays open until the AsyncFd drops it.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(io::Error::from)
        .context("polling the ring buffer")?;

    let (tw_tx, mut tw_rx) = tokio::sync::mpsc::unbounded_channel();
    let out = Output::new(args.output.clone(), args.format).with_context(|| {
        format!(
            "opening {}",
            args.output
                .as_deref()
                .unwrap_or("stdout".as_ref())
                .display()
        )
    })?;
    let filter = filter_of(&args, &cgroup)?;
    let mut s = Stream::new(
        out,
        clock,
        filter,
        Cgroups::new(cgroup.clone()),
        lost,
        time_wait::spawn(clock, tw_tx),
    );
    s.out.emit(&Start {
        v: SCHEMA_VERSION,
        ts: s.now(),
        event: "observer_start",
        version: env!("CARGO_PKG_VERSION"),
        kernel: kernel_release(),
        pid: std::process::id(),
        hooks: &attached.hooks,
        prog_ids: &attached.prog_ids,
        cgroup: cgroup.display().to_string(),
        ring_buffer_bytes: args.ring_buffer,
    })?;
    s.out.flush()?;

    // --repro: the scenarios run beside the stream; their events are kept to check.
    let (repro_tx, mut repro_rx) = tokio::sync::oneshot::channel();
    let repro = match &args.repro {
        Some(names) => {
            let scenarios = repro::select(names).map_err(anyhow::Error::msg)?;
            s.kept = Some(Vec::new());
            std::thread::spawn(move || {
                let report = repro::run(&scenarios, Sink::Stderr);
                let _ = repro_tx.send((scenarios, report));
            });
            true
        }
        None => false,
    };
    let mut report = None;

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let deadline = sleep(args.duration.unwrap_or(Duration::MAX / 4));
    tokio::pin!(deadline);
    let mut sighup = signal(SignalKind::hangup())?;
    let stdout_watch = if s.out.is_stdout() {
        stdout_closed_watch()
    } else {
        None
    };
    let mut stats = interval(args.stats.unwrap_or(Duration::from_secs(3600)));
    stats.set_missed_tick_behavior(MissedTickBehavior::Delay);
    stats.tick().await; // the first tick is immediate
    // The kernel side wakes us only when records pile up (see wake_flags):
    // drain on a short timer too.
    let mut drain_tick = interval(DRAIN_EVERY);
    drain_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut tick = interval(LOST_POLL);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);

    let reason = loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                s.drain(guard.get_inner_mut())?;
                guard.clear_ready();
            }
            _ = sigint.recv() => break "SIGINT",
            _ = sigterm.recv() => break "SIGTERM",
            _ = &mut deadline, if args.duration.is_some() => break "duration",
            r = &mut repro_rx, if repro => {
                report = r.ok();
                break "repro";
            }
            _ = stdout_closed(&stdout_watch) => {
                log::debug!("stdout closed: stopping");
                return Ok(ExitCode::SUCCESS);
            }
            _ = drain_tick.tick() => s.drain(ring.get_mut())?,
            _ = tick.tick() => { s.poll_lost()?; s.out.flush()?; }
            _ = stats.tick(), if args.stats.is_some() => s.stats()?,
            _ = sighup.recv() => {
                s.out.reopen().context("reopening the output file on SIGHUP")?;
                log::info!("SIGHUP: output reopened");
            }
            Some(o) = tw_rx.recv() => {
                s.time_wait_record(o)?;
                while let Ok(o) = tw_rx.try_recv() {
                    s.time_wait_record(o)?;
                }
                s.out.flush()?;
            }
        }
    };
    s.drain(ring.get_mut())?;
    s.poll_lost()?;
    s.out.emit(&Stop {
        v: SCHEMA_VERSION,
        ts: s.now(),
        event: "observer_stop",
        reason,
        totals: s.totals,
        lost: s.totals.lost,
        filtered: s.filtered,
        explain_coalesced: s.explainer.coalescer.coalesced,
        programs: attached.program_stats(),
    })?;
    s.out.flush()?;
    drop(ring);
    drop(attached); // detaches every program: their links are owned by this process
    let Some((scenarios, report)) = report else {
        return Ok(ExitCode::SUCCESS);
    };
    eprint!("{}", report.summary(&scenarios));
    if let Some(path) = &args.repro_log {
        let mut log = String::new();
        for step in &report.steps {
            log += &serde_json::to_string(step)?;
            log.push('\n');
        }
        std::fs::write(path, log).with_context(|| format!("writing {}", path.display()))?;
    }
    let problems = repro::check::problems(&report.steps, s.kept.as_deref().unwrap_or_default());
    for p in &problems {
        eprintln!("missing from the stream: {p}");
    }
    Ok(if report.passed() && problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The filters from the command line; a cgroup is named by its path under the cgroup2 mount.
fn filter_of(args: &RunArgs, cgroup2: &std::path::Path) -> Result<Filter> {
    let cgroup = match &args.cgroup {
        None => None,
        Some(dir) => {
            let root = cgroup2
                .canonicalize()
                .context("resolving the cgroup2 mount")?;
            if !dir.starts_with(&root) {
                bail!(
                    "--cgroup: {} is not under the cgroup2 mount {}",
                    dir.display(),
                    root.display()
                );
            }
            Some(cgroups::relative(&root, dir))
        }
    };
    Ok(Filter {
        pids: args.pids.iter().copied().collect(),
        ports: args.ports.iter().copied().collect(),
        comm: args.comm.clone(),
        uid: args.uid,
        cgroup,
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
