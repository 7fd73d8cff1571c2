//! Kernel records → filtered, enriched, explained records in the output.

use anyhow::{Context, Result};
use aya::maps::{MapData, PerCpuArray, RingBuf};
use observer_common::{
    LOST_INFLIGHT, LOST_RINGBUF, LOST_SLOTS, LOST_TIME_WAIT_MAP,
    decode::{Record, decode},
};
use serde::Serialize;

use crate::{
    cgroups::{Cgroups, container_id},
    clock::Clock,
    events::{
        Bind, Lost, LostByCause, SCHEMA_VERSION, SockCall, Stats, TcpState, Totals, reuse, tuple,
    },
    explain::{
        Bound,
        worker::{Failure, Worker},
    },
    filter::{Facts, Filter},
    output::Output,
    time_wait::{
        self, Closer,
        poll::{self, Transition},
        timer,
    },
};

/// At most this many records per drain: the event loop turns between batches.
const DRAIN_BATCH: usize = 4096;
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
    pub out: Output,
    pub clock: Clock,
    pub totals: Totals,
    /// Records kept out of the output by the filters.
    filtered: u64,
    /// The kernel programs' count of records their filters kept out.
    kernel_filtered: PerCpuArray<MapData, u64>,
    pub filter: Filter,
    pub cgroups: Cgroups,
    lost_seen: [u64; LOST_SLOTS as usize + 1],
    lost: PerCpuArray<MapData, u64>,
    time_wait: TimeWait,
    /// When early TIME_WAIT ends were last decided.
    decided_ns: u64,
    /// bind/listen/connect records as written, while a `--repro` run needs them.
    pub kept: Option<Vec<serde_json::Value>>,
    explainer: Worker,
    /// Failures handed to the explainer and not back yet.
    explaining: usize,
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
        } = parts;
        Stream {
            out,
            clock,
            totals: Totals::default(),
            filtered: 0,
            kernel_filtered,
            filter,
            cgroups,
            lost_seen: [0; LOST_SLOTS as usize + 1],
            lost,
            time_wait,
            decided_ns: 0,
            kept: None,
            explainer,
            explaining: 0,
        }
    }

    /// The cgroup path of a cgroup id, and the container id it names.
    fn cgroup_of(&mut self, cgroup_id: u64) -> (Option<String>, Option<String>) {
        let path = self.cgroups.path(cgroup_id).map(str::to_owned);
        let container = path.as_deref().and_then(container_id).map(str::to_owned);
        (path, container)
    }

    pub fn now(&self) -> String {
        self.clock.rfc3339(self.clock.now_ktime()).to_string()
    }

    /// Writes `record` if the filters let it through; says whether they did.
    fn emit<T: Serialize>(&mut self, facts: &Facts, record: &T) -> bool {
        if !self.filter.pass(facts) {
            self.filtered += 1;
            return false;
        }
        self.out.emit(record);
        true
    }

    /// Writes the records waiting in the ring buffer, at most `DRAIN_BATCH`
    /// of them, then flushes once; returns whether more may be waiting. The
    /// bound keeps the event loop turning (signals, timers) under any load.
    pub fn drain(&mut self, ring: &mut RingBuf<MapData>) -> bool {
        let mut n = 0;
        while n < DRAIN_BATCH {
            let Some(item) = ring.next() else {
                break;
            };
            n += 1;
            match decode(&item) {
                Ok(Record::Bind(r)) => {
                    let mut event = Bind::from_record(&r, &self.clock);
                    self.note_bind(&event);
                    (event.cgroup, event.container_id) = self.cgroup_of(event.cgroup_id);
                    let facts = Facts {
                        event: "bind",
                        pid: Some(event.pid),
                        ports: [event.port, event.bound_port],
                        comm: Some(&event.comm),
                        uid: Some(event.uid),
                        cgroup: event.cgroup.as_deref(),
                        netns: event.netns,
                        failed: event.errno.is_some(),
                    };
                    if !self.filter.pass(&facts) {
                        self.filtered += 1;
                        continue;
                    }
                    if event.ret == -i64::from(libc::EADDRINUSE) {
                        self.explain(Failure::Bind(Box::new(event)));
                    } else {
                        self.write_bind(&event);
                    }
                }
                Ok(Record::TcpState(r)) => {
                    let event = TcpState::from_record(&r, &self.clock);
                    let (src, dst) = tuple(&r);
                    // The tracker sees every change, whatever the filters say.
                    // (The timer path has what it needs from the kernel.)
                    if let TimeWait::Poll(p) = &mut self.time_wait {
                        p.send(Transition {
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
                    let facts = Facts {
                        event: "tcp_state",
                        pid: event.pid,
                        ports: [Some(event.sport), Some(event.dport)],
                        comm: event.comm.as_deref(),
                        uid: event.uid,
                        cgroup: None,
                        netns: event.netns,
                        failed: false,
                    };
                    if self.emit(&facts, &event) {
                        self.totals.tcp_state += 1;
                    }
                }
                Ok(Record::SockCall(r)) => {
                    let mut event = SockCall::from_record(&r, &self.clock);
                    (event.cgroup, event.container_id) = self.cgroup_of(event.cgroup_id);
                    let facts = Facts {
                        event: event.event,
                        pid: Some(event.pid),
                        ports: [event.lport, event.dport],
                        comm: Some(&event.comm),
                        uid: Some(event.uid),
                        cgroup: event.cgroup.as_deref(),
                        netns: event.netns,
                        failed: true,
                    };
                    if !self.filter.pass(&facts) {
                        self.filtered += 1;
                        continue;
                    }
                    if event.event == "listen" && event.ret == -i64::from(libc::EADDRINUSE) {
                        self.explain(Failure::Listen(Box::new(event)));
                    } else {
                        self.write_sockcall(&event);
                    }
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
        self.decide_time_wait();
        self.out.flush();
        n == DRAIN_BATCH
    }

    /// Early TIME_WAIT ends that waited long enough are told (killed); at
    /// most every 100 ms, and at once when `force`.
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
        let mut book = self.explainer.book();
        book.note_bind_ino(ino, ra, rp, b.pid, &b.comm);
        if let (Some("tcp"), Some(port), Some(Ok(ip))) = (
            b.proto.as_deref(),
            b.bound_port,
            b.addr.as_deref().map(str::parse::<std::net::IpAddr>),
        ) && port != 0
        {
            book.note_bound(Bound {
                netns: b.netns.unwrap_or(0),
                local: std::net::SocketAddr::new(ip, port),
                ino,
                pid: b.pid,
                fd: b.fd,
                uid: b.uid,
                comm: b.comm.clone(),
                reuseaddr: ra,
                reuseport: rp,
            });
        }
    }

    /// A failure to the explainer; written at once, unexplained, when it is
    /// that far behind.
    fn explain(&mut self, f: Failure) {
        match self.explainer.submit(f) {
            Ok(()) => self.explaining += 1,
            Err(f) => {
                self.explainer.skipped += 1;
                self.write_explained(f, false);
            }
        }
    }

    /// A failure back from the explainer (or skipped: `returned` false).
    pub fn write_explained(&mut self, f: Failure, returned: bool) {
        if returned {
            self.explaining = self.explaining.saturating_sub(1);
        }
        match f {
            Failure::Bind(b) => self.write_bind(&b),
            Failure::Listen(c) => self.write_sockcall(&c),
        }
    }

    /// Failures the explainer has and has not given back.
    pub fn explaining(&self) -> usize {
        self.explaining
    }

    fn write_bind(&mut self, b: &Bind) {
        self.totals.bind += 1;
        self.out.emit(b);
        self.keep(b);
    }

    fn write_sockcall(&mut self, c: &SockCall) {
        match c.event {
            "listen" => self.totals.listen += 1,
            _ => self.totals.connect += 1,
        }
        self.out.emit(c);
        self.keep(c);
    }

    fn keep<T: Serialize>(&mut self, event: &T) {
        if let Some(kept) = &mut self.kept {
            kept.push(serde_json::to_value(event).expect("records serialize"));
        }
    }

    pub fn time_wait_record(&mut self, o: time_wait::Out) {
        match o {
            time_wait::Out::Enter(e) => {
                self.explainer.book().note_time_wait(&e);
                let facts = Facts {
                    event: "time_wait_enter",
                    pid: e.pid,
                    ports: [Some(e.sport), Some(e.dport)],
                    comm: e.comm.as_deref(),
                    uid: e.uid,
                    cgroup: None,
                    netns: Some(e.netns),
                    failed: false,
                };
                if self.emit(&facts, &e) {
                    self.totals.time_wait_enter += 1;
                }
            }
            time_wait::Out::Exit(e) => {
                let facts = Facts {
                    event: "time_wait_exit",
                    pid: None,
                    ports: [Some(e.sport), Some(e.dport)],
                    netns: Some(e.netns),
                    ..Facts::default()
                };
                if self.emit(&facts, &e) {
                    self.totals.time_wait_exit += 1;
                }
            }
        }
    }

    /// Start-up is over (called on the first ticks).
    pub fn settled(&mut self) {
        self.time_wait.settled();
    }

    /// Emits a `lost` record per cause whose counter moved: the kernel's per-CPU
    /// counters, and the TIME_WAIT tracker's full queue. Never filtered. (Lines
    /// the output could not write are reported by the output itself.)
    pub fn poll_lost(&mut self) -> Result<()> {
        const QUEUE_SLOT: u32 = LOST_SLOTS;
        for (slot, cause) in [
            (LOST_RINGBUF, "ring_buffer"),
            (LOST_INFLIGHT, "inflight_map"),
            (LOST_TIME_WAIT_MAP, "time_wait_map"),
            (QUEUE_SLOT, "time_wait_queue"),
        ] {
            let total: u64 = if slot == QUEUE_SLOT {
                self.time_wait.dropped()
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
                self.out.emit(&Lost {
                    v: SCHEMA_VERSION,
                    ts: self.now(),
                    event: "lost",
                    count,
                    cause,
                });
            }
        }
        Ok(())
    }

    /// Failures explained from an earlier lookup, and written unexplained.
    pub fn explain_counts(&self) -> (u64, u64) {
        (self.explainer.coalesced(), self.explainer.skipped)
    }

    /// Records the filters kept out, in the kernel and here.
    pub fn filtered(&self) -> u64 {
        let kernel: u64 = self
            .kernel_filtered
            .get(&observer_common::FILTERED_SLOT, 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0);
        self.filtered + kernel
    }

    /// Records lost so far, by cause.
    pub fn lost_by_cause(&self) -> LostByCause {
        LostByCause {
            ring_buffer: self.lost_seen[LOST_RINGBUF as usize],
            inflight_map: self.lost_seen[LOST_INFLIGHT as usize],
            time_wait_map: self.lost_seen[LOST_TIME_WAIT_MAP as usize],
            time_wait_queue: self.lost_seen[LOST_SLOTS as usize],
            output: self.out.lost(),
        }
    }

    /// Records written per type, and lost (every cause).
    pub fn totals(&self) -> Totals {
        Totals {
            lost: self.lost_by_cause().sum(),
            ..self.totals
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
        let totals = self.totals();
        let record = Stats {
            v: SCHEMA_VERSION,
            ts: self.now(),
            event: "stats",
            totals,
            lost: totals.lost,
            lost_by_cause: self.lost_by_cause(),
            filtered: self.filtered(),
            explain_coalesced: self.explainer.coalesced(),
            explain_skipped: self.explainer.skipped,
            cpu_ms,
            rss_kb,
        };
        self.out.emit(&record);
        self.out.flush();
    }
}

/// The daemon's resident memory, from /proc/self/statm.
pub fn rss_kb() -> u64 {
    let page_kb = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4, |p| p as u64 / 1024);
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * page_kb)
}
