//! Kernel records → filtered, enriched, explained records in the output:
//! decoded into the schema's types (`crate::schema`), then one way out for
//! every kind (`Stream::handle`).

use anyhow::{Context, Result};
use aya::maps::{MapData, PerCpuArray};
use observer_common::{
    LOST_INFLIGHT, LOST_RINGBUF, LOST_SLOTS, LOST_TIME_WAIT_MAP, TcpStateRecord,
    decode::{Record, decode},
};

use crate::{
    clock::Clock,
    explain::{
        Bound, rules,
        worker::{Failure, Worker},
    },
    filter::Filter,
    kernel::{cgroups::Cgroups, ring::Ring},
    metrics::Metrics,
    output::Output,
    repro::shared::Shared,
    schema::{
        Bind, Counts, Event, Line, Lost, LostByCause, Process, Stats, TcpState, Totals, reuse,
        tuple,
    },
    time_wait::{
        self, Closer,
        poll::{self, Transition},
        timer,
    },
};

/// At most this many records per drain: the event loop turns between batches.
const DRAIN_BATCH: usize = 4096;
/// `lost_seen` slots after the kernel's: the TIME_WAIT tracker's queue, skipped runs.
const QUEUE_SLOT: u32 = LOST_SLOTS;
const RECURSION_SLOT: u32 = LOST_SLOTS + 1;
/// How often early TIME_WAIT ends are decided (they wait `timer::DECIDE_WITHIN`).
const DECIDE_EVERY_NS: u64 = 100_000_000;

/// What a stream is made of.
pub struct Parts {
    pub out: Output,
    pub clock: Clock,
    pub filter: Filter,
    pub cgroups: Cgroups,
    /// The kernel's per-CPU counters of lost and of filtered records.
    pub lost: PerCpuArray<MapData, u64>,
    pub kernel_filtered: PerCpuArray<MapData, u64>,
    pub time_wait: TimeWait,
    pub explainer: Worker,
    /// With `--metrics`: what is written is counted there too.
    pub metrics: Option<Metrics>,
    /// The port-pressure worker, told which namespaces to count again.
    pub pressure: Option<crate::pressure::worker::Handle>,
}

/// Where TIME_WAIT records come from.
pub enum TimeWait {
    /// The kernel's timer: records in the ring buffer, decided here.
    Timer(timer::Tracker),
    /// sock_diag polling on a thread of its own.
    Poll(poll::Handle),
}

impl TimeWait {
    /// Changes the tracker could not keep (its queue or table was full).
    fn dropped(&self) -> u64 {
        match self {
            TimeWait::Timer(t) => t.dropped,
            TimeWait::Poll(p) => p.dropped.load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// After start-up: the preexisting snapshot can no longer meet a kernel enter.
    pub fn settled(&mut self) {
        if let TimeWait::Timer(t) = self {
            t.forget_snapshot();
        }
    }
}

pub struct Stream {
    /// The daemon drives the output too: flushes, reopens, watches it close.
    pub out: Output,
    clock: Clock,
    totals: Totals,
    /// Records kept out of the output by the filters.
    filtered: u64,
    /// The kernel programs' count of records their filters kept out.
    kernel_filtered: PerCpuArray<MapData, u64>,
    filter: Filter,
    cgroups: Cgroups,
    /// Command lines and parents of the processes records name, cached.
    procs: crate::kernel::procs::Procs,
    /// Per cause, what `lost` records said so far: the kernel's slots, then
    /// the TIME_WAIT queue and the kernel's skipped runs.
    lost_seen: [u64; LOST_SLOTS as usize + 2],
    lost: PerCpuArray<MapData, u64>,
    time_wait: TimeWait,
    /// When early TIME_WAIT ends were last decided.
    decided_ns: u64,
    /// bind/listen/connect records as written, while a `--repro` run needs them.
    kept: Option<Vec<Line>>,
    /// `--repro`: its namespaces and per-failure barrier; whether records of
    /// other namespaces are written too (`--all-host`).
    repro: Option<(std::sync::Arc<Shared>, bool)>,
    explainer: Worker,
    /// Failures handed to the explainer and not back yet.
    explaining: usize,
    /// Beside the output, where every written record goes too (`Sink`).
    sinks: Vec<Box<dyn Sink>>,
    pressure: Option<crate::pressure::worker::Handle>,
}

/// Where written records go beside the output: the metrics, `--repro`'s
/// barrier. Each sees every record `Stream::write` writes and every record
/// of the daemon's own (`Stream::say`); adding one touches only its module
/// and the line that pushes it.
pub trait Sink {
    fn record(&mut self, line: &Line);
}

impl Sink for Metrics {
    fn record(&mut self, line: &Line) {
        self.observe(&line.event);
    }
}

impl Sink for std::sync::Arc<Shared> {
    fn record(&mut self, line: &Line) {
        self.written(&line.event);
    }
}

impl Stream {
    pub fn new(parts: Parts) -> Stream {
        let Parts {
            out,
            clock,
            filter,
            cgroups,
            lost,
            kernel_filtered,
            time_wait,
            explainer,
            metrics,
            pressure,
        } = parts;
        let sinks: Vec<Box<dyn Sink>> = metrics
            .into_iter()
            .map(|m| Box::new(m) as Box<dyn Sink>)
            .collect();
        Stream {
            out,
            clock,
            totals: Totals::default(),
            filtered: 0,
            kernel_filtered,
            filter,
            cgroups,
            procs: Default::default(),
            lost_seen: [0; LOST_SLOTS as usize + 2],
            lost,
            time_wait,
            decided_ns: 0,
            kept: None,
            repro: None,
            explainer,
            explaining: 0,
            sinks,
            pressure,
        }
    }

    /// `--repro`: from now on, keeps the call records written (for its
    /// check), tells the scenarios when their failures are written, and,
    /// unless `all_host`, writes only records of their namespaces.
    pub fn serve_repro(&mut self, shared: std::sync::Arc<Shared>, all_host: bool) {
        self.kept = Some(Vec::new());
        self.sinks.push(Box::new(shared.clone()));
        self.repro = Some((shared, all_host));
    }

    /// Whether `--repro` lets a record through (its namespaces only, by default).
    fn repro_keeps(&self, event: &Event) -> bool {
        match &self.repro {
            Some((shared, false)) => {
                crate::filter::Facts::of(event).is_none_or(|f| shared.watches(f.netns))
            }
            _ => true,
        }
    }

    /// The output, and the call records kept.
    pub fn finish(self) -> (Output, Vec<Line>) {
        (self.out, self.kept.unwrap_or_default())
    }

    /// The cgroup path of the process's cgroup id, the container id and
    /// systemd unit it names; the process's parent and command line.
    fn place(&mut self, p: &mut Process) {
        if let Some(n) = self.cgroups.named(p.cgroup_id) {
            p.cgroup = Some(n.path.clone());
            p.container_id = n.container_id.clone();
            p.unit = n.unit.clone();
        }
        if let Some(i) = self.procs.ident(p.pid) {
            p.ppid = Some(i.ppid);
            p.cmdline = i.cmdline.clone();
        }
    }

    /// One record from the ring buffer, decoded and handled.
    fn on_record(&mut self, item: &[u8]) {
        match decode(item) {
            Ok(Record::Bind(r)) => {
                let mut b = Bind::from_record(&r);
                self.note_bind(&b);
                self.place(&mut b.process);
                self.handle(Line::at(&self.clock, r.header.ktime_ns, Event::Bind(b)));
            }
            Ok(Record::TcpState(r)) => {
                let t = TcpState::from_record(&r);
                self.track(&r, &t);
                self.handle(Line::at(&self.clock, r.header.ktime_ns, Event::TcpState(t)));
            }
            Ok(Record::SockCall(r)) => {
                let mut e = Event::of_call(&r);
                if let Event::Listen(c) | Event::Connect(c) = &mut e {
                    self.place(&mut c.process);
                }
                self.handle(Line::at(&self.clock, r.header.ktime_ns, e));
            }
            Ok(Record::TimeWait(r)) => {
                if let TimeWait::Timer(t) = &mut self.time_wait {
                    for o in t.on_record(&r) {
                        self.time_wait_record(o);
                    }
                }
            }
            Err(e) => log::warn!("skipping a record: {e}"),
        }
    }

    /// Writes the records waiting in the ring buffer, at most `DRAIN_BATCH`
    /// of them, then flushes once; returns whether more may be waiting. The
    /// bound keeps the event loop turning (signals, timers) under any load.
    pub fn drain(&mut self, ring: &mut Ring) -> bool {
        let n = ring.read(DRAIN_BATCH, |item| self.on_record(item));
        self.decide_time_wait();
        self.out.flush();
        n == DRAIN_BATCH
    }

    /// The one way a record of the host goes out: the filters, then the
    /// explainer for an EADDRINUSE failure, then the output.
    fn handle(&mut self, line: Line) {
        self.mark_pressure(&line.event);
        if !self.filter.keeps(&line.event) || !self.repro_keeps(&line.event) {
            self.filtered += 1;
            return;
        }
        let in_use = -i64::from(libc::EADDRINUSE);
        match &line.event {
            Event::Bind(b) if b.ret == in_use => self.explain(line),
            Event::Listen(c) if c.ret == in_use => self.explain(line),
            _ => self.write(line),
        }
    }

    /// A call, TCP or TIME_WAIT record of a namespace the stream shows (by
    /// `--netns` and `--repro`; whatever the other filters say): its ports
    /// are counted again (see `crate::pressure`).
    fn mark_pressure(&self, event: &Event) {
        let Some(p) = &self.pressure else {
            return;
        };
        let (netns, tid) = match event {
            Event::Bind(b) => (b.process.netns, Some(b.process.tid)),
            Event::Listen(c) | Event::Connect(c) => (c.process.netns, Some(c.process.tid)),
            Event::TcpState(t) => (t.netns, t.tid),
            Event::TimeWaitEnter(e) => (Some(e.flow.netns), e.tid),
            Event::TimeWaitExit(e) => (Some(e.flow.netns), None),
            _ => return,
        };
        let Some(netns) = netns else {
            return;
        };
        let shown = self.filter.netns.is_none_or(|n| n == netns)
            && match &self.repro {
                Some((shared, false)) => shared.watches(Some(netns)),
                _ => true,
            };
        if shown {
            p.mark(netns, tid);
        }
    }

    /// A `port_pressure` record from the worker: filtered like the others.
    pub fn port_pressure(&mut self, p: crate::schema::PortPressure) {
        let line = Line::now(&self.clock, Event::PortPressure(p));
        self.handle(line);
    }

    /// Every record of the host that reaches the output passes here, explained.
    fn write(&mut self, line: Line) {
        self.totals.count(&line.event);
        self.out.emit(&line);
        for s in &mut self.sinks {
            s.record(&line);
        }
        if let Some(kept) = &mut self.kept
            && (line.event.is_call() || matches!(line.event, Event::PortPressure(_)))
        {
            kept.push(line);
        }
    }

    /// A record of the daemon's own: never filtered, not counted.
    pub fn say(&mut self, event: Event) {
        let line = Line::now(&self.clock, event);
        self.out.emit(&line);
        for s in &mut self.sinks {
            s.record(&line);
        }
    }

    /// The polling tracker sees every TCP change, whatever the filters say.
    /// (The timer path has what it needs from the kernel.)
    fn track(&mut self, r: &TcpStateRecord, t: &TcpState) {
        let TimeWait::Poll(p) = &mut self.time_wait else {
            return;
        };
        let (src, dst) = tuple(r);
        p.send(Transition {
            ktime_ns: r.header.ktime_ns,
            netns: r.netns,
            skaddr: r.skaddr,
            old: r.oldstate,
            new: r.newstate,
            src,
            dst,
            reuse: reuse(r),
            process: t.pid.map(|pid| Closer {
                pid,
                tid: t.tid.unwrap_or_default(),
                comm: t.comm.clone().unwrap_or_default(),
                uid: t.uid.unwrap_or_default(),
            }),
        });
    }

    /// Early TIME_WAIT ends that waited long enough are told (killed); at
    /// most every 100 ms.
    fn decide_time_wait(&mut self) {
        let TimeWait::Timer(t) = &mut self.time_wait else {
            return;
        };
        let now = self.clock.now_ktime();
        if now.saturating_sub(self.decided_ns) < DECIDE_EVERY_NS {
            return;
        }
        self.decided_ns = now;
        for o in t.decide(now) {
            self.time_wait_record(o);
        }
    }

    /// What a bind tells the explainer: the socket's options and owner, and,
    /// for a TCP socket that got a port, that it is bound there.
    fn note_bind(&mut self, b: &Bind) {
        let (Some(ino), Some(ra), Some(rp)) =
            (b.sock_ino, b.options.reuseaddr, b.options.reuseport)
        else {
            return;
        };
        let p = &b.process;
        let mut book = self.explainer.book();
        book.note_bind_ino(ino, ra, rp, p.pid, &p.comm);
        // Only for kernels whose sock_diag cannot list them (before 6.3).
        if let (Some((proto, asked)), Some(port)) = (b.request, b.bound_port)
            && proto == rules::TCP
            && port != 0
            && !crate::kernel::sock_diag::lists_bound_only()
        {
            book.note_bound(Bound {
                netns: p.netns.unwrap_or(0),
                local: std::net::SocketAddr::new(asked.ip(), port),
                ino,
                pid: p.pid,
                fd: b.fd,
                uid: p.uid,
                comm: p.comm.clone(),
                reuseaddr: ra,
                reuseport: rp,
            });
        }
    }

    /// A failure to the explainer; written at once, unexplained, when it is
    /// that far behind.
    fn explain(&mut self, mut line: Line) {
        if let Event::Bind(b) = &mut line.event
            && self.explainer.explain_at_once(b)
        {
            self.write(line);
            return;
        }
        match self.explainer.submit(Box::new(line)) {
            Ok(()) => self.explaining += 1,
            Err(line) => {
                self.explainer.skipped += 1;
                self.write(*line);
            }
        }
    }

    /// A failure back from the explainer.
    pub fn write_explained(&mut self, line: Failure) {
        self.explaining = self.explaining.saturating_sub(1);
        self.write(*line);
    }

    /// Failures the explainer has and has not given back.
    pub fn explaining(&self) -> usize {
        self.explaining
    }

    pub fn time_wait_record(&mut self, o: time_wait::Out) {
        let (ktime_ns, event) = match o {
            time_wait::Out::Enter(e) => {
                self.explainer.book().note_time_wait(&e);
                (e.ktime_ns, Event::TimeWaitEnter(e))
            }
            time_wait::Out::Exit(e) => (e.ktime_ns, Event::TimeWaitExit(e)),
        };
        self.handle(Line::at(&self.clock, ktime_ns, event));
    }

    /// Start-up is over (called on the first ticks).
    pub fn settled(&mut self) {
        self.time_wait.settled();
    }

    /// Emits a `lost` record per cause whose counter moved: the kernel's per-CPU
    /// counters, the TIME_WAIT tracker's full queue, and the program runs the
    /// kernel skipped (`recursion_misses`, summed over the programs). Never
    /// filtered. (Lines the output could not write are reported by the output itself.)
    pub fn poll_lost(&mut self, recursion_misses: u64) -> Result<()> {
        for (slot, cause) in [
            (LOST_RINGBUF, "ring_buffer"),
            (LOST_INFLIGHT, "inflight_map"),
            (LOST_TIME_WAIT_MAP, "time_wait_map"),
            (QUEUE_SLOT, "time_wait_queue"),
            (RECURSION_SLOT, "recursion"),
        ] {
            let total: u64 = match slot {
                QUEUE_SLOT => self.time_wait.dropped(),
                RECURSION_SLOT => recursion_misses,
                _ => self
                    .lost
                    .get(&slot, 0)
                    .context("reading the LOST counters")?
                    .iter()
                    .sum(),
            };
            let seen = &mut self.lost_seen[slot as usize];
            if total > *seen {
                let count = total - *seen;
                *seen = total;
                self.say(Event::Lost(Lost { count, cause }));
            }
        }
        Ok(())
    }

    /// Records the filters kept out, in the kernel and here.
    fn filtered(&self) -> u64 {
        let kernel: u64 = self
            .kernel_filtered
            .get(&observer_common::FILTERED_SLOT, 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0);
        self.filtered + kernel
    }

    /// The stream so far: written per type, lost by cause, filtered, explained.
    pub fn counts(&self) -> Counts {
        let lost_by_cause = LostByCause {
            ring_buffer: self.lost_seen[LOST_RINGBUF as usize],
            inflight_map: self.lost_seen[LOST_INFLIGHT as usize],
            time_wait_map: self.lost_seen[LOST_TIME_WAIT_MAP as usize],
            time_wait_queue: self.lost_seen[QUEUE_SLOT as usize],
            output: self.out.lost(),
            recursion: self.lost_seen[RECURSION_SLOT as usize],
        };
        let lost = lost_by_cause.sum();
        Counts {
            totals: Totals {
                lost,
                ..self.totals
            },
            lost,
            lost_by_cause,
            filtered: self.filtered(),
            explain_coalesced: self.explainer.coalesced(),
            explain_skipped: self.explainer.skipped,
        }
    }

    /// A `stats` record: what was written, lost and filtered, and what the daemon costs.
    pub fn stats(&mut self) {
        let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF).ok();
        let cpu_ms = usage.map_or(0, |u| {
            let ms =
                |t: nix::sys::time::TimeVal| t.tv_sec() as u64 * 1000 + t.tv_usec() as u64 / 1000;
            ms(u.user_time()) + ms(u.system_time())
        });
        let rss_kb = rss_kb();
        self.say(Event::Stats(Stats {
            counts: self.counts(),
            cpu_ms,
            rss_kb,
        }));
        self.out.flush();
    }
}

/// The daemon's resident memory, from /proc/self/statm.
pub fn rss_kb() -> u64 {
    let page_kb = u64::from(crate::cli::page_size()) / 1024;
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * page_kb)
}
