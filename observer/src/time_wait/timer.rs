//! TIME_WAIT from the kernel's timer (the eBPF side is `observer-ebpf/src/
//! time_wait.rs`): finding what the programs need on this kernel, and
//! turning their records into `time_wait_enter`/`time_wait_exit`.
//!
//! The kernel says when a timewait socket enters, expires, or has its timer
//! deleted early. An early delete is `reused` when the kernel then sees a new
//! connection take the same 4-tuple (a `REUSED` record), else `killed`; so it
//! waits here, at most [`DECIDE_WITHIN`], which is all this side keeps per socket.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};

use observer_common::{
    TimeWaitRecord,
    time_wait::{TimeWaitConfig, flags, op},
};

use super::{Closer, Entered, Key, Left, Out, poll};
use crate::{clock::Clock, schema::c_str};

/// How long an early delete waits for the connection that reused its 4-tuple.
pub const DECIDE_WITHIN: Duration = Duration::from_millis(500);
/// Early deletes waiting at once, at most (beyond: counted as lost).
const MAX_PENDING: usize = 1 << 18;

/// The address of the timewait sockets' timer handler. Reading /proc/kallsyms
/// takes the kernel some 30 ms: the daemon starts it first, on a thread, and
/// needs it only once the programs are verified.
pub fn handler() -> Result<u64, String> {
    crate::kernel::kallsyms::address("tw_timer_handler")
}

/// The kernel's layout the timer programs need and its HZ, or why this
/// kernel cannot give them (then the daemon polls sock_diag). The handler's
/// address (see above) is only needed to attach them.
pub fn discover(
    tw: &crate::kernel::btf_offsets::TimeWaitOffsets,
) -> Result<(TimeWaitConfig, u64), String> {
    let (
        Some(tw_timer),
        Some(tw_substate),
        Some(timer_function),
        Some(timer_expires),
        Some(tw_rcv_nxt),
        Some(tw_snd_nxt),
    ) = (
        tw.tw_timer,
        tw.tw_substate,
        tw.timer_function,
        tw.timer_expires,
        tw.tw_rcv_nxt,
        tw.tw_snd_nxt,
    )
    else {
        return Err(format!(
            "BTF does not say where the timewait socket's members are ({tw:?})"
        ));
    };
    let hz = kernel_hz()?;
    let config = TimeWaitConfig {
        tw_timer,
        tw_substate,
        timer_function,
        timer_expires,
        tw_rcv_nxt,
        tw_snd_nxt,
        // TCP_TIMEWAIT_LEN is 60 s on every kernel.
        timewait_len_jiffies: 60 * hz,
        ns_per_jiffy: 1_000_000_000 / hz,
    };
    Ok((config, hz))
}

/// The kernel's HZ. jiffies start at `INITIAL_JIFFIES` (2^32 - 300 HZ) at
/// boot, so one reading of /proc/timer_list beside the monotonic clock gives
/// it; near 300 s of uptime, or if the estimate is not a value Linux is built
/// with, two readings 100 ms apart do.
fn kernel_hz() -> Result<u64, String> {
    let (ns0, j0) = timer_list_sample()?;
    if let Some(hz) = hz_from_boot(ns0, j0) {
        return Ok(hz);
    }
    std::thread::sleep(Duration::from_millis(100));
    let (ns1, j1) = timer_list_sample()?;
    let measured = j1.saturating_sub(j0) as f64 * 1e9 / (ns1.saturating_sub(ns0)).max(1) as f64;
    Ok(nearest_hz(measured))
}

/// `now at` (monotonic ns) and `jiffies:` from /proc/timer_list.
fn timer_list_sample() -> Result<(u64, u64), String> {
    let text = std::fs::read_to_string("/proc/timer_list")
        .map_err(|e| format!("/proc/timer_list: {e}"))?;
    let num = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|r| r.split_whitespace().next()?.parse::<u64>().ok())
    };
    match (num("now at "), num("jiffies:")) {
        (Some(ns), Some(j)) => Ok((ns, j)),
        _ => Err("/proc/timer_list has no `now at` or `jiffies:`".into()),
    }
}

/// HZ from one reading, when uptime is far enough from 300 s for the boot's
/// own second of slack not to matter and the result is within 2 % of a real HZ.
fn hz_from_boot(now_ns: u64, jiffies: u64) -> Option<u64> {
    let since_wrap = now_ns as f64 / 1e9 - 300.0;
    if since_wrap.abs() < 60.0 {
        return None;
    }
    let estimate = (jiffies as f64 - 4_294_967_296.0) / since_wrap;
    let hz = nearest_hz(estimate);
    ((estimate - hz as f64).abs() <= hz as f64 * 0.02).then_some(hz)
}

fn nearest_hz(measured: f64) -> u64 {
    [100u64, 250, 300, 1000]
        .into_iter()
        .min_by(|a, b| {
            (*a as f64 - measured)
                .abs()
                .total_cmp(&(*b as f64 - measured).abs())
        })
        .expect("a non-empty list")
}

/// An early delete, waiting to be told reused or killed.
struct Pending {
    left: Left,
    cancelled_ns: u64,
    /// It moved to TIME_WAIT unseen: its enter comes first, unless a re-arm
    /// shows the delete was only that.
    entered: Option<Entered>,
}

/// Kernel timer records in, TIME_WAIT records out.
pub struct Tracker {
    clock: Clock,
    hz: u64,
    /// Early deletes by timewait socket.
    pending: HashMap<u64, Pending>,
    /// Connections reported as preexisting by the start-up snapshot, while a
    /// kernel enter of the same one (made between attach and snapshot) may
    /// still come: it is not reported twice.
    snapshot: HashSet<Key>,
    /// Open TIME_WAIT sockets as reported (enters minus exits).
    pub open: i64,
    /// Early deletes that found no room to wait.
    pub dropped: u64,
}

impl Tracker {
    pub fn new(clock: Clock, hz: u64) -> Tracker {
        Tracker {
            clock,
            hz,
            pending: HashMap::new(),
            snapshot: HashSet::new(),
            open: 0,
            dropped: 0,
        }
    }

    /// The TIME_WAIT sockets of every namespace now: `preexisting` enters.
    pub fn preexisting(&mut self) -> Vec<Out> {
        let now = self.clock.now_ktime();
        let mut out = Vec::new();
        for (ino, socks) in poll::time_wait_everywhere() {
            for s in socks {
                let key = Key {
                    netns: ino,
                    src: s.src,
                    dst: s.dst,
                };
                self.snapshot.insert(key);
                self.open += 1;
                let entered = Entered {
                    key,
                    ktime_ns: now,
                    sk: None,
                    expires_ms: s.expires_ms,
                    preexisting: true,
                    cookie: Some(s.cookie),
                    reuse: None,
                    closer: None,
                };
                out.push(Out::Enter(entered.record()));
            }
        }
        out
    }

    /// The start-up snapshot is behind us: every enter from now on is new.
    pub fn forget_snapshot(&mut self) {
        self.snapshot = HashSet::new();
    }

    pub fn on_record(&mut self, r: &TimeWaitRecord) -> Vec<Out> {
        let key = key_of(r);
        match r.op {
            op::ENTER => {
                // The re-arm of a cancel just before (the kernel says so, or,
                // when the start came too late for it to tell, the connection
                // is the same): that cancel was no end. An ENTER of another
                // connection at that address is a new socket in its memory.
                let rearm = r.flags & flags::REARM != 0
                    || self.pending.get(&r.tw).is_some_and(|p| p.left.key == key);
                if rearm {
                    self.forget_pending(r.tw);
                }
                if self.snapshot.remove(&key) {
                    return Vec::new(); // reported as preexisting already
                }
                let entered = self.entered(r, key, r.header.ktime_ns);
                vec![self.enter(entered)]
            }
            op::EXPIRED => vec![self.exit(self.left(r, key, "expired"))],
            op::CANCELLED => {
                if self.pending.len() >= MAX_PENDING {
                    self.dropped += 1;
                    return Vec::new();
                }
                let left = self.left(r, key, "killed");
                let entered =
                    (r.flags & flags::ENTER_PENDING != 0).then(|| self.entered(r, key, r.enter_ns));
                // A new socket at the address of one still waiting: the older
                // one's end is decided now (its reuse would have been told).
                let older = self.pending.insert(
                    r.tw,
                    Pending {
                        left,
                        cancelled_ns: r.header.ktime_ns,
                        entered,
                    },
                );
                older.map(|p| self.end(p)).unwrap_or_default()
            }
            op::REARMED => {
                self.forget_pending(r.tw);
                Vec::new()
            }
            op::REUSED => match self.pending.remove(&r.tw) {
                Some(mut p) => {
                    p.left.reason = "reused";
                    self.end(p)
                }
                None => Vec::new(),
            },
            _ => Vec::new(),
        }
    }

    /// Early deletes that waited long enough: nothing took their 4-tuple.
    pub fn decide(&mut self, now_ns: u64) -> Vec<Out> {
        let window = DECIDE_WITHIN.as_nanos() as u64;
        let mut due: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| now_ns.saturating_sub(p.cancelled_ns) >= window)
            .map(|(tw, _)| *tw)
            .collect();
        due.sort_by_key(|tw| self.pending[tw].cancelled_ns);
        let mut out = Vec::with_capacity(due.len());
        for tw in due {
            if let Some(p) = self.pending.remove(&tw) {
                out.extend(self.end(p));
            }
        }
        out
    }

    /// A decided early delete: its unseen enter first, if any, then its exit.
    fn end(&mut self, p: Pending) -> Vec<Out> {
        let mut out = Vec::with_capacity(2);
        if let Some(e) = p.entered {
            out.push(self.enter(e));
        }
        out.push(self.exit(p.left));
        out
    }

    fn entered(&self, r: &TimeWaitRecord, key: Key, at_ns: u64) -> Entered {
        let known = |set: u16| r.flags & set != 0;
        Entered {
            key,
            ktime_ns: at_ns,
            sk: Some(r.tw),
            expires_ms: (r.timeout_jiffies.saturating_mul(1000) / self.hz.max(1))
                .min(u64::from(u32::MAX)) as u32,
            preexisting: false,
            cookie: (r.cookie != 0).then_some(r.cookie),
            reuse: known(flags::REUSE_KNOWN)
                .then(|| (known(flags::REUSEADDR), known(flags::REUSEPORT))),
            closer: known(flags::CLOSER).then(|| Closer {
                pid: r.closer.pid(),
                tid: r.closer.tid(),
                comm: c_str(&r.closer.comm),
                uid: r.closer.uid(),
            }),
        }
    }

    fn enter(&mut self, e: Entered) -> Out {
        self.open += 1;
        Out::Enter(e.record())
    }

    fn forget_pending(&mut self, tw: u64) {
        self.pending.remove(&tw);
    }

    fn left(&self, r: &TimeWaitRecord, key: Key, reason: &'static str) -> Left {
        let enter_known = r.flags & (flags::ENTER_KNOWN | flags::ENTER_PENDING) != 0;
        Left {
            key,
            ktime_ns: r.header.ktime_ns,
            sk: Some(r.tw),
            held_ms: enter_known.then(|| r.header.ktime_ns.saturating_sub(r.enter_ns) / 1_000_000),
            reason,
            preexisting: r.flags & flags::PREEXISTING != 0,
            cookie: (r.cookie != 0).then_some(r.cookie),
        }
    }

    fn exit(&mut self, left: Left) -> Out {
        self.open -= 1;
        Out::Exit(left.record())
    }
}

fn key_of(r: &TimeWaitRecord) -> Key {
    let ip = |b: &[u8; 16]| -> IpAddr {
        if i32::from(r.family) == libc::AF_INET {
            Ipv4Addr::new(b[0], b[1], b[2], b[3]).into()
        } else {
            Ipv6Addr::from(*b).into()
        }
    };
    Key {
        netns: r.netns,
        src: SocketAddr::new(ip(&r.saddr), r.sport),
        dst: SocketAddr::new(ip(&r.daddr), r.dport),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use observer_common::tcp::state;

    const NS: u32 = 4026531840;
    const SK: u64 = 0xffff_8881_0000_1000;

    fn rec(what: u8, ms: u64) -> TimeWaitRecord {
        let mut r = TimeWaitRecord::zeroed();
        r.header.ktime_ns = ms * 1_000_000;
        r.tw = SK;
        r.op = what;
        r.netns = NS;
        r.family = 2;
        r.substate = state::TIME_WAIT;
        r.sport = 5700;
        r.dport = 41000;
        r.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        r.daddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        r.cookie = 7;
        r
    }

    fn key() -> Key {
        Key {
            netns: NS,
            src: "127.0.0.1:5700".parse().unwrap(),
            dst: "127.0.0.1:41000".parse().unwrap(),
        }
    }

    fn entered(ms: u64) -> TimeWaitRecord {
        let mut r = rec(op::ENTER, ms);
        r.timeout_jiffies = 15_000; // 60 s at HZ=250
        r.flags = flags::CLOSER | flags::REUSE_KNOWN | flags::REUSEADDR;
        r.closer.pid_tgid = (10 << 32) | 11;
        r.closer.comm[..6].copy_from_slice(b"server");
        r
    }

    fn ended(what: u8, ms: u64) -> TimeWaitRecord {
        let mut r = rec(what, ms);
        r.enter_ns = 1_000_000_000;
        r.flags = flags::ENTER_KNOWN;
        r
    }

    #[test]
    fn enter_then_expired() {
        let mut t = Tracker::new(Clock::with_offset(0), 250);
        let out = t.on_record(&entered(1000));
        let [Out::Enter(e)] = out.as_slice() else {
            panic!("{out:?}")
        };
        assert_eq!(
            (e.expires_ms, e.pid, e.comm.as_deref(), e.reuseaddr),
            (60_000, Some(10), Some("server"), Some(true))
        );
        assert_eq!(e.flow.sk.as_deref(), Some("0xffff888100001000"));
        let out = t.on_record(&ended(op::EXPIRED, 61_000));
        let [Out::Exit(x)] = out.as_slice() else {
            panic!("{out:?}")
        };
        assert_eq!(
            (x.reason, x.held_ms, x.preexisting),
            ("expired", Some(60_000), false)
        );
        assert_eq!(t.open, 0);
    }

    #[test]
    fn an_early_delete_is_reused_when_the_tuple_comes_back_else_killed() {
        let mut t = Tracker::new(Clock::with_offset(0), 250);
        t.on_record(&entered(1000));
        assert!(
            t.on_record(&ended(op::CANCELLED, 5_000)).is_empty(),
            "it waits"
        );
        let out = t.on_record(&rec(op::REUSED, 5_001));
        let [Out::Exit(x)] = out.as_slice() else {
            panic!("{out:?}")
        };
        assert_eq!((x.reason, x.held_ms), ("reused", Some(4_000)));
        assert!(t.decide(10_000_000_000).is_empty(), "decided once");

        t.on_record(&entered(20_000));
        t.on_record(&ended(op::CANCELLED, 21_000));
        assert!(t.decide(21_400_000_000).is_empty(), "not yet");
        let out = t.decide(21_500_000_000);
        let [Out::Exit(x)] = out.as_slice() else {
            panic!("{out:?}")
        };
        assert_eq!(x.reason, "killed");
        assert_eq!(x.ktime_ns, 21_000_000_000);
    }

    #[test]
    fn a_rearm_is_not_an_end() {
        let mut t = Tracker::new(Clock::with_offset(0), 1000);
        t.on_record(&entered(1000));
        t.on_record(&ended(op::CANCELLED, 2_000));
        t.on_record(&ended(op::REARMED, 2_000));
        assert!(t.decide(u64::MAX / 2).is_empty());
        assert_eq!(t.open, 1);
    }

    #[test]
    fn an_unseen_move_to_time_wait_is_reported_before_its_end() {
        let mut t = Tracker::new(Clock::with_offset(0), 250);
        let mut c = ended(op::CANCELLED, 9_000);
        c.flags = flags::ENTER_PENDING | flags::CLOSER;
        c.enter_ns = 2_000_000_000;
        c.timeout_jiffies = 15_000;
        assert!(t.on_record(&c).is_empty());
        let out = t.decide(10_000_000_000);
        let [Out::Enter(e), Out::Exit(x)] = out.as_slice() else {
            panic!("{out:?}")
        };
        assert_eq!((e.expires_ms, e.ktime_ns), (60_000, 2_000_000_000));
        assert_eq!((x.reason, x.held_ms), ("killed", Some(7_000)));
        assert_eq!(t.open, 0);
        // The same delete followed by the start of the re-arm: only the enter, then.
        t.on_record(&c);
        let mut rearm = entered(9_000);
        rearm.flags |= flags::REARM;
        assert_eq!(t.on_record(&rearm).len(), 1);
        assert!(t.decide(u64::MAX / 2).is_empty());
        assert_eq!(t.open, 1);
        // A start too late for the kernel to tie it to the cancel (an
        // emulated machine): the same connection, so the same re-arm.
        let mut t = Tracker::new(Clock::with_offset(0), 250);
        t.on_record(&c);
        assert_eq!(t.on_record(&entered(9_000)).len(), 1);
        assert!(t.decide(u64::MAX / 2).is_empty(), "no second enter, no end");
        assert_eq!(t.open, 1);
    }

    #[test]
    fn a_new_socket_in_the_memory_of_a_killed_one_keeps_its_end() {
        // Killed (an RST), and 38 ms later a new timewait socket at the same
        // address enters and is killed too: two ends, each once.
        let mut t = Tracker::new(Clock::with_offset(0), 250);
        t.on_record(&entered(1_000));
        assert!(t.on_record(&ended(op::CANCELLED, 2_000)).is_empty());
        let mut other = entered(2_038);
        other.dport = 42000;
        assert_eq!(
            t.on_record(&other).len(),
            1,
            "a new enter, no end forgotten"
        );
        let mut killed = ended(op::CANCELLED, 2_100);
        killed.dport = 42000;
        let out = t.on_record(&killed);
        let [Out::Exit(x)] = out.as_slice() else {
            panic!("the first one's end, decided: {out:?}")
        };
        assert_eq!((x.reason, x.flow.dport), ("killed", 41000));
        let out = t.decide(u64::MAX / 2);
        let [Out::Exit(x)] = out.as_slice() else {
            panic!("{out:?}")
        };
        assert_eq!((x.reason, x.flow.dport), ("killed", 42000));
        assert_eq!(t.open, 0);
    }

    #[test]
    fn snapshot_and_kernel_enter_of_one_socket_report_it_once() {
        let mut t = Tracker::new(Clock::with_offset(0), 1000);
        t.snapshot.insert(key());
        assert!(t.on_record(&entered(1)).is_empty());
        assert_eq!(t.on_record(&entered(2)).len(), 1, "the next one is new");
        let mut r = rec(op::EXPIRED, 3);
        r.flags = flags::PREEXISTING;
        let out = t.on_record(&r);
        let [Out::Exit(x)] = out.as_slice() else {
            panic!("{out:?}")
        };
        assert_eq!((x.preexisting, x.held_ms), (true, None));
    }

    #[test]
    fn hz_rounds_to_a_real_value() {
        assert_eq!(nearest_hz(249.2), 250);
        assert_eq!(nearest_hz(990.0), 1000);
        assert_eq!(nearest_hz(101.0), 100);
    }

    #[test]
    fn hz_from_one_reading() {
        // This host at 6405.8 s of uptime, HZ=250.
        assert_eq!(hz_from_boot(6_405_840_718_091, 4_296_493_741), Some(250));
        // Ten seconds after boot at HZ=1000: jiffies still below 2^32.
        assert_eq!(
            hz_from_boot(10_000_000_000, 4_294_967_296 - 290_000),
            Some(1000)
        );
        // Too close to the wrap to tell.
        assert_eq!(hz_from_boot(310_000_000_000, 4_294_967_296 + 2_500), None);
        // A clock that does not fit any HZ (suspend, say): measure instead.
        assert_eq!(
            hz_from_boot(6_405_840_718_091, 4_294_967_296 + 1_400_000),
            None
        );
    }
}
