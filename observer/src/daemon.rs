//! `observer run`: attach, stream records until a signal or the duration, detach.

use std::{io, process::ExitCode, time::Duration};

use anyhow::{Context, Result, bail};
use aya::maps::{MapData, PerCpuArray, RingBuf};
use observer_common::{
    LOST_INFLIGHT, LOST_RINGBUF, LOST_SLOTS,
    decode::{Record, decode},
};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
    time::{MissedTickBehavior, interval, sleep},
};

use crate::{
    btf_offsets,
    cli::RunArgs,
    clock::Clock,
    events::{Bind, Lost, SCHEMA_VERSION, SockCall, Start, Stop, TcpState, Totals, reuse, tuple},
    explain::Explainer,
    loader, mounts,
    output::{JsonLines, is_closed_pipe, stdout_closed, stdout_closed_watch},
    repro::{self, ctx::Sink},
    time_wait::{self, Closer, Transition},
};

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
    let ring = RingBuf::try_from(attached.ebpf.take_map("EVENTS").context("no EVENTS map")?)?;
    let lost = PerCpuArray::try_from(attached.ebpf.take_map("LOST").context("no LOST map")?)?;
    // SAFETY: the RingBuf owns its map fd, which stays open until the AsyncFd drops it.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(io::Error::from)
        .context("polling the ring buffer")?;

    let (tw_tx, mut tw_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut s = Stream {
        out: JsonLines::stdout(),
        clock,
        totals: Totals::default(),
        lost_seen: [0; LOST_SLOTS as usize + 1],
        lost,
        time_wait: time_wait::spawn(clock, tw_tx),
        kept: None,
        explainer: Explainer::new(),
    };
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
    let stdout_watch = stdout_closed_watch();
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
            _ = tick.tick() => { s.poll_lost()?; s.out.flush()?; }
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
        explain_coalesced: s.explainer.coalescer.coalesced,
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

struct Stream {
    out: JsonLines,
    clock: Clock,
    totals: Totals,
    lost_seen: [u64; LOST_SLOTS as usize + 1],
    lost: PerCpuArray<MapData, u64>,
    time_wait: time_wait::Handle,
    /// bind/listen/connect records as written, while a `--repro` run needs them.
    kept: Option<Vec<serde_json::Value>>,
    explainer: Explainer,
}

impl Stream {
    fn now(&self) -> String {
        self.clock.rfc3339(self.clock.now_ktime()).to_string()
    }

    /// Writes every record waiting in the ring buffer, then flushes once.
    fn drain(&mut self, ring: &mut RingBuf<MapData>) -> io::Result<()> {
        while let Some(item) = ring.next() {
            match decode(&item) {
                Ok(Record::Bind(r)) => {
                    self.totals.bind += 1;
                    let mut event = Bind::from_record(&r, &self.clock);
                    if event.ret == -i64::from(libc::EADDRINUSE) {
                        event.explain = self.explainer.bind_failure(&event);
                    } else if let (Some(c), Some(ra), Some(rp)) = (
                        event.sock_cookie,
                        event.options.reuseaddr,
                        event.options.reuseport,
                    ) {
                        self.explainer
                            .book
                            .note_bind(c, ra, rp, event.pid, &event.comm);
                    }
                    self.out.emit(&event)?;
                    self.keep(&event);
                }
                Ok(Record::TcpState(r)) => {
                    self.totals.tcp_state += 1;
                    let event = TcpState::from_record(&r, &self.clock);
                    self.out.emit(&event)?;
                    let (src, dst) = tuple(&r);
                    self.time_wait.send(Transition {
                        ktime_ns: r.header.ktime_ns,
                        netns: r.netns,
                        skaddr: r.skaddr,
                        old: r.oldstate,
                        new: r.newstate,
                        src,
                        dst,
                        reuse: reuse(&r),
                        process: event.pid.map(|pid| Closer {
                            pid,
                            tid: event.tid.unwrap_or_default(),
                            comm: event.comm.clone().unwrap_or_default(),
                            uid: event.uid.unwrap_or_default(),
                        }),
                    });
                }
                Ok(Record::SockCall(r)) => {
                    let mut event = SockCall::from_record(&r, &self.clock);
                    if event.event == "listen" && event.ret == -i64::from(libc::EADDRINUSE) {
                        event.explain = self.explainer.listen_failure(&event);
                    }
                    match event.event {
                        "listen" => self.totals.listen += 1,
                        _ => self.totals.connect += 1,
                    }
                    self.out.emit(&event)?;
                    self.keep(&event);
                }
                Err(e) => log::warn!("skipping a record: {e}"),
            }
        }
        self.out.flush()
    }

    fn keep<T: serde::Serialize>(&mut self, event: &T) {
        if let Some(kept) = &mut self.kept {
            kept.push(serde_json::to_value(event).expect("records serialize"));
        }
    }

    fn time_wait_record(&mut self, o: time_wait::Out) -> io::Result<()> {
        match o {
            time_wait::Out::Enter(e) => {
                self.totals.time_wait_enter += 1;
                if let (Some(ra), Some(rp)) = (e.reuseaddr, e.reuseport) {
                    self.explainer.book.note(e.sock_cookie, ra, rp);
                }
                self.out.emit(&e)
            }
            time_wait::Out::Exit(e) => {
                self.totals.time_wait_exit += 1;
                self.out.emit(&e)
            }
        }
    }

    /// Emits a `lost` record per cause whose counter moved: the kernel's per-CPU
    /// counters, and the TIME_WAIT tracker's full queue.
    fn poll_lost(&mut self) -> Result<()> {
        const QUEUE_SLOT: u32 = LOST_SLOTS;
        for (slot, cause) in [
            (LOST_RINGBUF, "ring_buffer"),
            (LOST_INFLIGHT, "inflight_map"),
            (QUEUE_SLOT, "time_wait_queue"),
        ] {
            let total: u64 = if slot == QUEUE_SLOT {
                self.time_wait
                    .dropped
                    .load(std::sync::atomic::Ordering::Relaxed)
            } else {
                self.lost
                    .get(&slot, 0)
                    .context("reading the LOST counters")?
                    .iter()
                    .sum()
            };
            let seen = &mut self.lost_seen[slot as usize];
            if total > *seen {
                let count = total - *seen;
                *seen = total;
                self.totals.lost += count;
                self.out.emit(&Lost {
                    v: SCHEMA_VERSION,
                    ts: self.now(),
                    event: "lost",
                    count,
                    cause,
                })?;
            }
        }
        Ok(())
    }
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
