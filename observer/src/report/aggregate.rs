//! One pass over the stream: each line is read into a small borrowed struct
//! of the fields the report needs (the rest is skipped by the parser) and
//! added to counters keyed by errno, port, process, rule and time. Memory
//! grows with the number of distinct keys, never with the number of records.

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap},
};

use serde::Deserialize;

use super::time;

/// The fields of a record the report reads; every kind's fields in one
/// struct (a field a kind lacks stays `None`).
#[derive(Deserialize)]
struct Rec<'a> {
    #[serde(borrow)]
    ts: Text<'a>,
    #[serde(borrow)]
    event: Text<'a>,
    pid: Option<u32>,
    #[serde(borrow)]
    comm: Option<Text<'a>>,
    #[serde(borrow)]
    errno: Option<Text<'a>>,
    /// `bind`: the port asked for.
    port: Option<u16>,
    /// `listen`: the socket's local port; `connect`: the destination's.
    lport: Option<u16>,
    dport: Option<u16>,
    /// `time_wait_*`: the local port.
    sport: Option<u16>,
    #[serde(borrow)]
    explain: Option<RuleOnly<'a>>,
    /// `lost`.
    count: Option<u64>,
    #[serde(borrow)]
    cause: Option<Text<'a>>,
    /// `time_wait_exit`: `expired`, `reused`, `killed`.
    #[serde(borrow)]
    reason: Option<Text<'a>>,
    /// `stats`, `observer_stop`.
    lost: Option<u64>,
    #[serde(borrow)]
    lost_by_cause: Option<BTreeMap<&'a str, u64>>,
    explain_skipped: Option<u64>,
}

/// A string of the line: borrowed from it, copied only when it has escapes
/// (serde's own `Cow` borrows only as a field, not inside an `Option`).
struct Text<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
            type Value = Text<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Text<'a>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Text<'a>, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V(std::marker::PhantomData))
    }
}

impl std::ops::Deref for Text<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

#[derive(Deserialize)]
struct RuleOnly<'a> {
    #[serde(borrow)]
    rule: Option<Text<'a>>,
}

/// Every record kind of schema v1, in the README's order.
pub use crate::schema::EVENT_NAMES as EVENTS;

const TCP_STATE: usize = 2;

/// The time of a `tcp_state` record, told by how the stream writes every
/// record (`{"v":1,"ts":"…","event":"tcp_state",` … `}`): the most numerous
/// kind, of which the report needs nothing but its time, is not parsed
/// field by field. Anything else, and a line of another shape, is.
fn tcp_state_at(line: &[u8]) -> Option<i64> {
    const HEAD: &[u8] = b"{\"v\":1,\"ts\":\"";
    const EVENT: &[u8] = b"\",\"event\":\"tcp_state\",";
    let rest = line.strip_prefix(HEAD)?;
    if !line.ends_with(b"}") {
        return None;
    }
    let q = memchr::memchr(b'"', rest)?;
    if !rest[q..].starts_with(EVENT) {
        return None;
    }
    time::parse(std::str::from_utf8(&rest[..q]).ok()?)
}

/// Failed calls, by call.
#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Calls {
    pub bind: u64,
    pub listen: u64,
    pub connect: u64,
}

impl Calls {
    pub fn total(&self) -> u64 {
        self.bind + self.listen + self.connect
    }
    fn add(&mut self, call: Call) {
        match call {
            Call::Bind => self.bind += 1,
            Call::Listen => self.listen += 1,
            Call::Connect => self.connect += 1,
        }
    }
}

#[derive(Clone, Copy)]
enum Call {
    Bind,
    Listen,
    Connect,
}

/// One process (pid and comm: an exec changes the comm, not the pid).
#[derive(Default, Clone, Debug, PartialEq, Eq)]
pub struct ProcStats {
    pub binds: u64,
    /// Failed binds, listens and connects.
    pub failures: Calls,
}

/// TIME_WAIT sockets of one local port (or of all).
#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeWait {
    pub enters: u64,
    pub exits: u64,
    /// Enters less exits, in the stream's order.
    pub open: i64,
    pub max_open: i64,
    /// When `max_open` was first reached (ns since the epoch).
    pub max_at: i64,
}

impl TimeWait {
    fn enter(&mut self, ns: i64) {
        self.enters += 1;
        self.open += 1;
        if self.open > self.max_open {
            (self.max_open, self.max_at) = (self.open, ns);
        }
    }
    fn exit(&mut self) {
        self.exits += 1;
        self.open -= 1;
    }
}

/// The counters of the last `observer_stop` or `stats` record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LastCounts {
    pub event: &'static str,
    pub ns: i64,
    pub lost: u64,
    pub lost_by_cause: Vec<(String, u64)>,
    pub explain_skipped: Option<u64>,
}

/// Activity in one span of time.
#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bin {
    pub binds: u64,
    pub failures: u64,
    pub tw_enters: u64,
    pub tw_exits: u64,
}

impl Bin {
    fn add(&mut self, o: &Bin) {
        self.binds += o.binds;
        self.failures += o.failures;
        self.tw_enters += o.tw_enters;
        self.tw_exits += o.tw_exits;
    }
}

/// Bin widths, each a multiple of the one before: the timeline starts at
/// 10 ms and widens when it holds more than `MAX_BINS` bins, so its memory is
/// bounded whatever the span; the chart's buckets are one of these widths too.
pub const WIDTHS_MS: [i64; 17] = [
    10,
    20,
    100,
    200,
    1_000,
    2_000,
    10_000,
    60_000,
    120_000,
    600_000,
    1_800_000,
    3_600_000,
    7_200_000,
    21_600_000,
    43_200_000,
    86_400_000,
    604_800_000,
];
const MAX_BINS: usize = 1 << 16;
/// About this many buckets in the chart and the timeline table, at most.
pub const BUCKETS: i64 = 60;

/// Activity over time in bins of `WIDTHS_MS[width]`; the current bin is
/// kept aside (records come nearly in order, so most need no map lookup).
#[derive(Debug, Default)]
pub struct Timeline {
    width: usize,
    bins: HashMap<i64, Bin>,
    cur: Option<(i64, Bin)>,
}

impl Timeline {
    fn width_ns(&self) -> i64 {
        WIDTHS_MS[self.width] * 1_000_000
    }

    fn at(&mut self, ns: i64) -> &mut Bin {
        let key = ns.div_euclid(self.width_ns());
        if self.cur.as_ref().is_none_or(|(k, _)| *k != key) {
            self.flush();
            // The flush may have widened the bins.
            let key = ns.div_euclid(self.width_ns());
            self.cur = Some((key, Bin::default()));
        }
        &mut self.cur.as_mut().expect("just set").1
    }

    fn flush(&mut self) {
        if let Some((key, bin)) = self.cur.take() {
            self.bins.entry(key).or_default().add(&bin);
            while self.bins.len() > MAX_BINS && self.width + 1 < WIDTHS_MS.len() {
                self.widen();
            }
        }
    }

    fn widen(&mut self) {
        let factor = WIDTHS_MS[self.width + 1] / WIDTHS_MS[self.width];
        self.width += 1;
        let mut wider: HashMap<i64, Bin> = HashMap::with_capacity(self.bins.len() / 2);
        for (k, b) in self.bins.drain() {
            wider.entry(k.div_euclid(factor)).or_default().add(&b);
        }
        self.bins = wider;
    }

    /// Buckets of the smallest width, of `WIDTHS_MS[at_least]` or wider, that
    /// covers `first..=last` in at most about `BUCKETS`, from the one holding
    /// `first` to the one holding `last`, empty ones included: (width in ms,
    /// [(start ns, activity)]). The width is a multiple of every width up to
    /// the one chosen (the per-port series are bucketed the same way).
    pub fn buckets(&mut self, first: i64, last: i64, at_least: usize) -> (i64, Vec<(i64, Bin)>) {
        self.flush();
        let span_ms = ((i128::from(last) - i128::from(first)) / 1_000_000) as i64 + 1;
        let i = (self.width.max(at_least)..WIDTHS_MS.len())
            .find(|&i| span_ms / WIDTHS_MS[i] < BUCKETS)
            .unwrap_or(WIDTHS_MS.len() - 1);
        let mut w_ms = WIDTHS_MS[i];
        if span_ms / w_ms >= BUCKETS {
            // Centuries (a clock gone wrong): weeks by the dozen.
            let week = WIDTHS_MS[WIDTHS_MS.len() - 1];
            w_ms = (span_ms / BUCKETS / week + 1) * week;
        }
        let w = w_ms * 1_000_000;
        let factor = w_ms / WIDTHS_MS[self.width];
        let (lo, hi) = (first.div_euclid(w), last.div_euclid(w));
        let mut out: Vec<(i64, Bin)> = (lo..=hi)
            .map(|k| (k.saturating_mul(w), Bin::default()))
            .collect();
        for (k, b) in &self.bins {
            let j = k.div_euclid(factor) - lo;
            if let Some(slot) = usize::try_from(j).ok().and_then(|j| out.get_mut(j)) {
                slot.1.add(b);
            }
        }
        (w_ms, out)
    }
}

/// Local ports that keep a TIME_WAIT series of their own, at most.
pub const TW_SERIES_PORTS: usize = 64;
/// Bins of all the per-port series together, at most (they widen beyond).
pub const MAX_PORT_BINS: usize = 1 << 16;

/// TIME_WAIT sockets open over time per local port, with memory bounded
/// whatever the ports: at most `TW_SERIES_PORTS` ports keep a series (net
/// change per bin, in bins of `WIDTHS_MS[width]`, widened like the
/// timeline's when they hold more than `MAX_PORT_BINS`); every other port's
/// changes go to one `other` series. A port is kept when seen while there is
/// room, or when its most open at once grows past the least of the kept
/// ports' (`TimeWait::max_open`, exact for every port): that one is folded
/// into `other`, and the newcomer's open count moves from `other` to it at
/// that bin. So the kept ports are the 64 with the most open at once, each
/// series is exact from when its port was kept (before, it is in `other`),
/// and all the series together are exactly the host's.
#[derive(Debug, Default)]
pub struct PortSeries {
    width: usize,
    /// Slot + 1 of each port (0: not kept); 65536 entries once a port is seen.
    slot_of: Vec<u8>,
    /// The kept ports and their bins.
    kept: Vec<(u16, HashMap<i64, i64>)>,
    other: HashMap<i64, i64>,
    /// Bins in `kept` and `other`.
    bins: usize,
    /// No kept port has had fewer open at once than this (`kept` is full).
    floor: i64,
}

impl PortSeries {
    fn width_ns(&self) -> i64 {
        WIDTHS_MS[self.width] * 1_000_000
    }

    /// A TIME_WAIT enter (`delta` 1) or exit (-1) on `port` at `ns`; `ports`
    /// holds every port's counts, this one's already counted.
    fn add(&mut self, port: u16, ns: i64, delta: i64, ports: &HashMap<u16, TimeWait>) {
        if self.slot_of.is_empty() {
            self.slot_of = vec![0; 1 << 16];
        }
        let key = ns.div_euclid(self.width_ns());
        let slot = self.slot_of[usize::from(port)];
        if slot > 0 {
            self.bump(Some(usize::from(slot - 1)), key, delta);
        } else if let Some(slot) = self.admit(port, delta, ports) {
            // Its sockets open before now were counted in `other`: they move.
            let now = ports[&port].open;
            self.bump(Some(slot), key, now);
            if now != delta {
                self.bump(None, key, delta - now);
            }
        } else {
            self.bump(None, key, delta);
        }
        while self.bins > MAX_PORT_BINS && self.width + 1 < WIDTHS_MS.len() {
            self.widen();
        }
    }

    /// The slot `port` is given, if it is to be kept now.
    fn admit(&mut self, port: u16, delta: i64, ports: &HashMap<u16, TimeWait>) -> Option<usize> {
        let rank = |p: u16| {
            let t = &ports[&p];
            (t.max_open, t.enters, std::cmp::Reverse(p))
        };
        let slot = if self.kept.len() < TW_SERIES_PORTS {
            self.kept.push((port, HashMap::new()));
            self.kept.len() - 1
        } else {
            let mine = ports[&port].max_open;
            if delta <= 0 || mine <= self.floor {
                return None;
            }
            let (least, _) = (self.kept.iter().enumerate())
                .min_by_key(|(_, (p, _))| rank(*p))
                .expect("kept is full");
            self.floor = ports[&self.kept[least].0].max_open;
            if mine <= self.floor {
                return None;
            }
            let (gone, mut bins) = std::mem::take(&mut self.kept[least]);
            self.slot_of[usize::from(gone)] = 0;
            for (k, n) in bins.drain() {
                self.bins -= 1;
                self.bump(None, k, n);
            }
            self.kept[least] = (port, bins);
            least
        };
        self.slot_of[usize::from(port)] = slot as u8 + 1;
        Some(slot)
    }

    fn bump(&mut self, slot: Option<usize>, key: i64, n: i64) {
        let bins = match slot {
            Some(s) => &mut self.kept[s].1,
            None => &mut self.other,
        };
        match bins.get_mut(&key) {
            Some(v) => *v += n,
            None => {
                bins.insert(key, n);
                self.bins += 1;
            }
        }
    }

    fn widen(&mut self) {
        let factor = WIDTHS_MS[self.width + 1] / WIDTHS_MS[self.width];
        self.width += 1;
        self.bins = 0;
        for bins in self
            .kept
            .iter_mut()
            .map(|(_, b)| b)
            .chain([&mut self.other])
        {
            let mut wider: HashMap<i64, i64> = HashMap::with_capacity(bins.len() / 2);
            for (k, n) in bins.drain() {
                *wider.entry(k.div_euclid(factor)).or_default() += n;
            }
            self.bins += wider.len();
            *bins = wider;
        }
    }

    /// The index into `WIDTHS_MS` of the bins: the chart's may not be narrower.
    pub fn width(&self) -> usize {
        self.width
    }

    /// The kept ports.
    pub fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.kept.iter().map(|(p, _)| *p)
    }

    /// Sockets open at the end of each of `n` buckets of `width_ms` (a
    /// multiple of the bins' width) from the one starting at `start`: of
    /// `port` (`None`: the ports not kept).
    pub fn open(&self, port: Option<u16>, width_ms: i64, start: i64, n: usize) -> Vec<i64> {
        let bins = match port {
            Some(p) => match self.kept.iter().find(|(q, _)| *q == p) {
                Some((_, b)) => b,
                None => return vec![0; n],
            },
            None => &self.other,
        };
        let factor = width_ms / WIDTHS_MS[self.width];
        let lo = start.div_euclid(width_ms * 1_000_000);
        let mut change = vec![0i64; n];
        for (k, d) in bins {
            let j = k.div_euclid(factor) - lo;
            if let Some(slot) = usize::try_from(j).ok().and_then(|j| change.get_mut(j)) {
                *slot += d;
            }
        }
        let mut now = 0;
        change
            .into_iter()
            .map(|d| {
                now += d;
                now
            })
            .collect()
    }

    /// Bins held, of all the series (bounded).
    #[cfg(test)]
    pub fn bins(&self) -> usize {
        self.bins
    }
}

/// Everything the report says, counted in one pass.
#[derive(Debug, Default)]
pub struct Report {
    pub lines: u64,
    /// Lines that are not records of the stream (not JSON, no `event` or
    /// `ts`, a field of the wrong type): skipped and counted.
    pub not_records: u64,
    pub first: Option<i64>,
    pub last: Option<i64>,
    /// Records per kind, in the order of `EVENTS`; then kinds this version does not know.
    pub by_event: [u64; EVENTS.len()],
    pub other_events: u64,
    pub binds: u64,
    pub failures: Calls,
    pub by_errno: HashMap<Box<str>, Calls>,
    /// `None`: a call without a port (a unix socket's bind).
    pub by_port: HashMap<Option<u16>, Calls>,
    /// Per pid, per comm.
    pub procs: HashMap<u32, Vec<(Box<str>, ProcStats)>>,
    /// Failures with an `explain`, by its rule.
    pub by_rule: HashMap<Box<str>, Calls>,
    /// EADDRINUSE failures without one (the explainer was behind, or a stream
    /// written without it).
    pub unexplained_in_use: Calls,
    pub time_wait: TimeWait,
    pub tw_ports: HashMap<u16, TimeWait>,
    /// TIME_WAIT open over time per port (bounded: see `PortSeries`).
    pub tw_series: PortSeries,
    pub tw_exit_reasons: BTreeMap<Box<str>, u64>,
    /// `lost` records: their counts by cause.
    pub lost: BTreeMap<Box<str>, u64>,
    pub lost_records: u64,
    pub last_counts: Option<LastCounts>,
    pub timeline: Timeline,
}

impl Report {
    /// Bins the timeline holds (bounded).
    #[cfg(test)]
    pub fn timeline_bins(&self) -> usize {
        self.timeline.bins.len()
    }

    /// Adds one line (without its newline).
    pub fn line(&mut self, line: &[u8]) {
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        self.lines += 1;
        if let Some(ns) = tcp_state_at(line) {
            self.seen(ns);
            self.by_event[TCP_STATE] += 1;
            return;
        }
        // One UTF-8 check of the whole line, not one per string in it.
        let Some((rec, ns)) = std::str::from_utf8(line)
            .ok()
            .and_then(|l| serde_json::from_str::<Rec>(l).ok())
            .and_then(|r| time::parse(&r.ts).map(|ns| (r, ns)))
        else {
            self.not_records += 1;
            return;
        };
        self.record(&rec, ns);
    }

    fn seen(&mut self, ns: i64) {
        self.first = Some(self.first.map_or(ns, |f| f.min(ns)));
        self.last = Some(self.last.map_or(ns, |l| l.max(ns)));
    }

    fn record(&mut self, r: &Rec, ns: i64) {
        self.seen(ns);
        let event: &str = &r.event;
        match EVENTS.iter().position(|e| *e == event) {
            Some(i) => self.by_event[i] += 1,
            None => self.other_events += 1,
        }
        match event {
            "bind" => {
                self.binds += 1;
                self.timeline.at(ns).binds += 1;
                self.process(r).binds += 1;
                if r.errno.is_some() {
                    self.failure(r, Call::Bind, r.port, ns);
                }
            }
            "listen" if r.errno.is_some() => self.failure(r, Call::Listen, r.lport, ns),
            "connect" if r.errno.is_some() => self.failure(r, Call::Connect, r.dport, ns),
            "time_wait_enter" => {
                self.time_wait.enter(ns);
                self.timeline.at(ns).tw_enters += 1;
                if let Some(p) = r.sport {
                    self.tw_ports.entry(p).or_default().enter(ns);
                    self.tw_series.add(p, ns, 1, &self.tw_ports);
                }
            }
            "time_wait_exit" => {
                self.time_wait.exit();
                self.timeline.at(ns).tw_exits += 1;
                if let Some(p) = r.sport {
                    self.tw_ports.entry(p).or_default().exit();
                    self.tw_series.add(p, ns, -1, &self.tw_ports);
                }
                let reason = r.reason.as_deref().unwrap_or("-");
                bump(&mut self.tw_exit_reasons, reason, |n| *n += 1);
            }
            "lost" => {
                self.lost_records += 1;
                let cause = r.cause.as_deref().unwrap_or("-");
                let count = r.count.unwrap_or(0);
                bump(&mut self.lost, cause, |n| *n += count);
            }
            "stats" | "observer_stop" => {
                let newer = self.last_counts.as_ref().is_none_or(|l| l.ns <= ns);
                if let (Some(lost), true) = (r.lost, newer) {
                    self.last_counts = Some(LastCounts {
                        event: if event == "stats" {
                            "stats"
                        } else {
                            "observer_stop"
                        },
                        ns,
                        lost,
                        lost_by_cause: r
                            .lost_by_cause
                            .iter()
                            .flatten()
                            .map(|(k, v)| (k.to_string(), *v))
                            .collect(),
                        explain_skipped: r.explain_skipped,
                    });
                }
            }
            _ => {}
        }
    }

    fn failure(&mut self, r: &Rec, call: Call, port: Option<u16>, ns: i64) {
        self.failures.add(call);
        self.timeline.at(ns).failures += 1;
        let errno = r.errno.as_deref().unwrap_or("-");
        bump(&mut self.by_errno, errno, |c| c.add(call));
        self.by_port.entry(port).or_default().add(call);
        self.process(r).failures.add(call);
        match r.explain.as_ref().and_then(|e| e.rule.as_deref()) {
            Some(rule) => bump(&mut self.by_rule, rule, |c| c.add(call)),
            None if errno == "EADDRINUSE" => self.unexplained_in_use.add(call),
            None => {}
        }
    }

    fn process(&mut self, r: &Rec) -> &mut ProcStats {
        let comm = r.comm.as_deref().unwrap_or("-");
        let of_pid = self.procs.entry(r.pid.unwrap_or(0)).or_default();
        let i = match of_pid.iter().position(|(c, _)| c.as_ref() == comm) {
            Some(i) => i,
            None => {
                of_pid.push((comm.into(), ProcStats::default()));
                of_pid.len() - 1
            }
        };
        &mut of_pid[i].1
    }
}

/// `f` on the counter of `key`, made on first use (no allocation when it exists).
fn bump<V: Default, M: MapLike<V>>(map: &mut M, key: &str, f: impl FnOnce(&mut V)) {
    match map.get_mut_str(key) {
        Some(v) => f(v),
        None => f(map.insert_str(key)),
    }
}

trait MapLike<V> {
    fn get_mut_str(&mut self, key: &str) -> Option<&mut V>;
    fn insert_str(&mut self, key: &str) -> &mut V;
}

impl<V: Default> MapLike<V> for HashMap<Box<str>, V> {
    fn get_mut_str(&mut self, key: &str) -> Option<&mut V> {
        self.get_mut(key)
    }
    fn insert_str(&mut self, key: &str) -> &mut V {
        self.entry(key.into()).or_default()
    }
}

impl<V: Default> MapLike<V> for BTreeMap<Box<str>, V> {
    fn get_mut_str(&mut self, key: &str) -> Option<&mut V> {
        self.get_mut(key)
    }
    fn insert_str(&mut self, key: &str) -> &mut V {
        self.entry(key.into()).or_default()
    }
}
