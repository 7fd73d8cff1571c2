//! The TIME_WAIT lifecycle by polling sock_diag: the fallback where the
//! kernel's `tw_timer_handler` cannot be found (see `timer` for the exact path).
//!
//! `inet_sock_set_state` never shows TIME_WAIT: the kernel replaces the socket
//! with a timewait socket and reports `FIN_WAIT2 → CLOSE` or `CLOSING → CLOSE`.
//! Each such change is a *candidate*; it becomes `time_wait_enter` only when the
//! kernel's own table (sock_diag, in the socket's namespace) holds a TIME_WAIT
//! socket with that exact 4-tuple. The confirmed set is then re-read once per
//! tick per namespace; an entry that is gone yields `time_wait_exit`, `reused`
//! if a new connection took its 4-tuple, else `expired`.

use std::{
    collections::{BTreeSet, HashMap, hash_map::Entry},
    fs::File,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
        mpsc::{Receiver, RecvTimeoutError, Sender, channel},
    },
    time::{Duration, Instant},
};

use observer_common::tcp::state;

use super::{Closer, Entered, Key, Left, Out};
use crate::{
    clock::Clock,
    kernel::{
        netns,
        sock_diag::{Diag, IPPROTO_TCP, InetSock, state_mask},
    },
};

/// How often the open set and pending candidates are checked against the kernel.
pub const TICK: Duration = Duration::from_millis(500);
/// A candidate not confirmed in this long is dropped (an orphan in FIN_WAIT2 that
/// never got its peer's FIN, or a socket the kernel closed without TIME_WAIT).
const CANDIDATE_TTL_NS: u64 = 65_000_000_000;
/// Bounds memory: at most this many candidates plus confirmed entries (about
/// 200 bytes each, so about 200 MB at the bound).
pub const MAX_TRACKED: usize = 1_000_000;
/// Transitions queued to the tracker thread; beyond it they are counted as lost.
/// (A counted unbounded channel: a bounded std channel allocates all its slots up front.)
const QUEUE: usize = 1 << 18;

/// The part of a `tcp_state` change the tracker needs.
#[derive(Clone, Debug)]
pub struct Transition {
    pub ktime_ns: u64,
    pub netns: u32,
    pub skaddr: u64,
    pub old: u8,
    pub new: u8,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// Set when the change ran in process context.
    pub process: Option<Closer>,
    /// SO_REUSEADDR, SO_REUSEPORT of the socket, when read (TIME_WAIT sockets inherit them).
    pub reuse: Option<(bool, bool)>,
}

struct Candidate {
    ktime_ns: u64,
    closer: Option<Closer>,
    reuse: Option<(bool, bool)>,
}

struct Open {
    entered_ns: u64,
    cookie: u64,
    reused_ns: Option<u64>,
    preexisting: bool,
}

/// The bookkeeping, free of I/O: fed transitions and sock_diag dumps.
pub struct Tracker {
    /// Who closed each socket still on its way to CLOSE, by socket address.
    closers: HashMap<u64, Closer>,
    candidates: HashMap<Key, Candidate>,
    open: HashMap<Key, Open>,
    /// Candidates dropped unconfirmed, and transitions dropped at MAX_TRACKED.
    pub unconfirmed: u64,
    pub overflow: u64,
}

impl Tracker {
    pub fn new() -> Tracker {
        Tracker {
            closers: HashMap::new(),
            candidates: HashMap::new(),
            open: HashMap::new(),
            unconfirmed: 0,
            overflow: 0,
        }
    }

    fn full(&self) -> bool {
        self.candidates.len() + self.open.len() + self.closers.len() >= MAX_TRACKED
    }

    pub fn on_transition(&mut self, t: Transition) {
        let key = Key {
            netns: t.netns,
            src: t.src,
            dst: t.dst,
        };
        match t.new {
            state::FIN_WAIT1 => {
                if let Some(p) = t.process {
                    if self.full() {
                        self.overflow += 1;
                    } else {
                        self.closers.insert(t.skaddr, p);
                    }
                }
            }
            state::CLOSE => {
                let closer = self.closers.remove(&t.skaddr);
                if matches!(t.old, state::FIN_WAIT2 | state::CLOSING) {
                    if self.full() {
                        self.overflow += 1;
                    } else {
                        self.candidates.insert(
                            key,
                            Candidate {
                                ktime_ns: t.ktime_ns,
                                closer,
                                reuse: t.reuse,
                            },
                        );
                    }
                }
            }
            state::SYN_SENT | state::SYN_RECV | state::ESTABLISHED => {
                if let Some(o) = self.open.get_mut(&key) {
                    o.reused_ns.get_or_insert(t.ktime_ns);
                }
            }
            _ => {}
        }
    }

    /// The namespaces whose TIME_WAIT table must be read this tick.
    pub fn namespaces(&self) -> BTreeSet<u32> {
        self.candidates
            .keys()
            .chain(self.open.keys())
            .map(|k| k.netns)
            .collect()
    }

    /// A tid that was (recently) inside `netns`, to find a handle on it.
    pub fn hint(&self, netns: u32) -> Option<u32> {
        self.candidates
            .iter()
            .filter(|(k, _)| k.netns == netns)
            .find_map(|(_, c)| c.closer.as_ref().map(|c| c.tid))
    }

    /// Compares what is tracked in `netns` with its TIME_WAIT sockets right now.
    pub fn reconcile(&mut self, netns: u32, time_wait: &[InetSock], now_ns: u64) -> Vec<Out> {
        let present: HashMap<(SocketAddr, SocketAddr), &InetSock> = time_wait
            .iter()
            .filter(|s| s.state == state::TIME_WAIT)
            .map(|s| ((s.src, s.dst), s))
            .collect();
        let mut out = Vec::new();

        // Exits first: a reused 4-tuple's old socket leaves before its successor enters.
        let mut gone: Vec<Key> = self
            .open
            .iter()
            .filter(|(k, o)| {
                k.netns == netns
                    && present
                        .get(&(k.src, k.dst))
                        .is_none_or(|s| s.cookie != o.cookie)
            })
            .map(|(k, _)| *k)
            .collect();
        gone.sort();
        for key in gone {
            let o = self.open.remove(&key).unwrap();
            // A different socket on the same 4-tuple means the old one was taken over.
            let replaced = present.contains_key(&(key.src, key.dst));
            let end_ns = o.reused_ns.unwrap_or(now_ns);
            let left = Left {
                key,
                ktime_ns: end_ns,
                sk: None,
                held_ms: (!o.preexisting).then(|| end_ns.saturating_sub(o.entered_ns) / 1_000_000),
                reason: if o.reused_ns.is_some() || replaced {
                    "reused"
                } else {
                    "expired"
                },
                preexisting: o.preexisting,
                cookie: Some(o.cookie),
            };
            out.push(Out::Exit(left.record()));
        }

        let mut waiting: Vec<Key> = self
            .candidates
            .keys()
            .filter(|k| k.netns == netns)
            .copied()
            .collect();
        waiting.sort();
        for key in waiting {
            let Some(s) = present.get(&(key.src, key.dst)) else {
                if now_ns.saturating_sub(self.candidates[&key].ktime_ns) > CANDIDATE_TTL_NS {
                    self.candidates.remove(&key);
                    self.unconfirmed += 1;
                }
                continue;
            };
            let c = self.candidates.remove(&key).unwrap();
            if self.open.get(&key).is_some_and(|o| o.cookie == s.cookie) {
                continue; // already reported
            }
            out.push(self.enter(key, s, c.ktime_ns, c.closer, c.reuse, false));
        }
        out
    }

    /// TIME_WAIT sockets that exist when the observer starts: reported once.
    pub fn preexisting(&mut self, netns: u32, time_wait: &[InetSock], now_ns: u64) -> Vec<Out> {
        time_wait
            .iter()
            .filter(|s| s.state == state::TIME_WAIT)
            .filter_map(|s| {
                let key = Key {
                    netns,
                    src: s.src,
                    dst: s.dst,
                };
                (!self.open.contains_key(&key) && !self.full())
                    .then(|| self.enter(key, s, now_ns, None, None, true))
            })
            .collect()
    }

    fn enter(
        &mut self,
        key: Key,
        s: &InetSock,
        ktime_ns: u64,
        closer: Option<Closer>,
        reuse: Option<(bool, bool)>,
        preexisting: bool,
    ) -> Out {
        self.open.insert(
            key,
            Open {
                entered_ns: ktime_ns,
                cookie: s.cookie,
                reused_ns: None,
                preexisting,
            },
        );
        let entered = Entered {
            key,
            ktime_ns,
            sk: None,
            expires_ms: s.expires_ms,
            preexisting,
            cookie: Some(s.cookie),
            reuse,
            closer,
        };
        Out::Enter(entered.record())
    }
}

/// The tracker on a thread of its own (sock_diag is blocking netlink I/O).
pub struct Handle {
    tx: Sender<Transition>,
    queued: Arc<AtomicUsize>,
    /// Transitions that did not fit the queue.
    pub dropped: Arc<AtomicU64>,
}

impl Handle {
    pub fn send(&self, t: Transition) {
        if self.queued.load(Ordering::Relaxed) >= QUEUE {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        } else if self.tx.send(t).is_ok() {
            self.queued.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Reports the TIME_WAIT sockets of every namespace (`preexisting`) before it
/// returns, so that they all predate the `observer_start` record; then starts
/// the tracker thread. Its records arrive on `out`.
pub fn spawn(clock: Clock, out: tokio::sync::mpsc::UnboundedSender<Out>) -> Handle {
    let mut tracker = Tracker::new();
    for (ino, socks) in time_wait_everywhere() {
        for o in tracker.preexisting(ino, &socks, clock.now_ktime()) {
            let _ = out.send(o);
        }
    }
    let (tx, rx) = channel();
    let queued = Arc::new(AtomicUsize::new(0));
    let in_thread = queued.clone();
    std::thread::Builder::new()
        .name("time-wait".into())
        .spawn(move || run(tracker, clock, rx, &in_thread, out))
        .expect("spawning the time-wait thread");
    Handle {
        tx,
        queued,
        dropped: Arc::new(AtomicU64::new(0)),
    }
}

fn run(
    mut tracker: Tracker,
    clock: Clock,
    rx: Receiver<Transition>,
    queued: &AtomicUsize,
    out: tokio::sync::mpsc::UnboundedSender<Out>,
) {
    // One netlink socket per namespace with something tracked in it; dropped
    // when nothing is, so that the observer does not keep namespaces alive.
    let mut diags: HashMap<u32, Diag> = HashMap::new();
    let mut next_tick = Instant::now() + TICK;
    loop {
        match rx.recv_timeout(next_tick.saturating_duration_since(Instant::now())) {
            Ok(t) => {
                queued.fetch_sub(1, Ordering::Relaxed);
                tracker.on_transition(t);
                continue;
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        next_tick = Instant::now() + TICK;
        let namespaces = tracker.namespaces();
        diags.retain(|ino, _| namespaces.contains(ino));
        for ino in namespaces {
            let socks = match diags.entry(ino) {
                Entry::Occupied(mut d) => d.get_mut().sockets(IPPROTO_TCP, time_wait_mask(), None),
                Entry::Vacant(v) => match netns::open(ino, tracker.hint(ino)) {
                    // The namespace is gone, and its sockets with it.
                    None => Ok(Vec::new()),
                    Some(f) => open_diag(ino, &f)
                        .and_then(|d| v.insert(d).sockets(IPPROTO_TCP, time_wait_mask(), None)),
                },
            };
            match socks {
                Ok(socks) => {
                    for o in tracker.reconcile(ino, &socks, clock.now_ktime()) {
                        if out.send(o).is_err() {
                            return;
                        }
                    }
                }
                Err(e) => log::warn!("sock_diag in netns {ino}: {e}"),
            }
        }
    }
}

/// The TIME_WAIT sockets of every network namespace with a process in it (or
/// named by `ip netns`), right now.
pub fn time_wait_everywhere() -> Vec<(u32, Vec<InetSock>)> {
    netns::all()
        .into_iter()
        .filter_map(|(ino, file)| {
            match open_diag(ino, &file)
                .and_then(|mut d| d.sockets(IPPROTO_TCP, time_wait_mask(), None))
            {
                Ok(socks) => Some((
                    ino,
                    socks
                        .into_iter()
                        .filter(|s| s.state == state::TIME_WAIT)
                        .collect(),
                )),
                Err(e) => {
                    log::warn!("sock_diag in netns {ino}: {e}");
                    None
                }
            }
        })
        .collect()
}

fn open_diag(ino: u32, file: &File) -> std::io::Result<Diag> {
    if netns::own() == Some(ino) {
        Diag::open()
    } else {
        Diag::open_in(file)
    }
}

fn time_wait_mask() -> u32 {
    state_mask(&[state::TIME_WAIT])
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: u32 = 4026531840;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn change(sk: u64, old: u8, new: u8, ms: u64, process: bool) -> Transition {
        Transition {
            ktime_ns: ms * 1_000_000,
            netns: NS,
            skaddr: sk,
            old,
            new,
            src: addr("127.0.0.1:5700"),
            dst: addr("127.0.0.1:41000"),
            process: process.then(|| Closer {
                pid: 10,
                tid: 11,
                comm: "server".into(),
                uid: 0,
            }),
            reuse: Some((true, false)),
        }
    }

    fn tw(cookie: u64, expires_ms: u32) -> InetSock {
        InetSock {
            proto: IPPROTO_TCP,
            v6only: None,
            state: state::TIME_WAIT,
            src: addr("127.0.0.1:5700"),
            dst: addr("127.0.0.1:41000"),
            expires_ms,
            uid: 0,
            inode: 0,
            cookie,
        }
    }

    fn active_close(t: &mut Tracker, sk: u64, at_ms: u64) {
        t.on_transition(change(
            sk,
            state::ESTABLISHED,
            state::FIN_WAIT1,
            at_ms,
            true,
        ));
        t.on_transition(change(
            sk,
            state::FIN_WAIT1,
            state::FIN_WAIT2,
            at_ms + 1,
            false,
        ));
        t.on_transition(change(sk, state::FIN_WAIT2, state::CLOSE, at_ms + 2, false));
    }

    #[test]
    fn confirmed_enter_then_expired_exit() {
        let mut t = Tracker::new();
        active_close(&mut t, 0xa0, 1000);
        assert_eq!(t.namespaces(), BTreeSet::from([NS]));
        // Not in the kernel's table yet: no event, still pending.
        assert!(t.reconcile(NS, &[], 1_100_000_000).is_empty());
        let out = t.reconcile(NS, &[tw(7, 59_500)], 1_500_000_000);
        let [Out::Enter(e)] = out.as_slice() else {
            panic!("{out:?}")
        };
        assert_eq!(
            (e.expires_ms, e.confirmed, e.preexisting),
            (59_500, true, false)
        );
        assert_eq!(
            (e.pid, e.comm.as_deref(), e.flow.sport, e.flow.dport),
            (Some(10), Some("server"), 5700, 41000)
        );
        // Still there: nothing. Then gone without reuse: expired.
        assert!(t.reconcile(NS, &[tw(7, 30_000)], 30_000_000_000).is_empty());
        let out = t.reconcile(NS, &[], 61_002_000_000);
        let [Out::Exit(x)] = out.as_slice() else {
            panic!("{out:?}")
        };
        assert_eq!((x.reason, x.held_ms), ("expired", Some(60_000)));
        assert!(t.namespaces().is_empty());
    }

    #[test]
    fn new_connection_on_the_tuple_is_reuse() {
        let mut t = Tracker::new();
        active_close(&mut t, 0xa0, 1000);
        t.reconcile(NS, &[tw(7, 60_000)], 1_500_000_000);
        t.on_transition(change(
            0xb0,
            state::SYN_RECV,
            state::ESTABLISHED,
            5_000,
            false,
        ));
        let out = t.reconcile(NS, &[], 5_400_000_000);
        let [Out::Exit(x)] = out.as_slice() else {
            panic!("{out:?}")
        };
        assert_eq!((x.reason, x.held_ms), ("reused", Some(3_998)));
    }

    #[test]
    fn a_new_timewait_socket_on_the_tuple_replaces_the_old_one() {
        let mut t = Tracker::new();
        active_close(&mut t, 0xa0, 1000);
        t.reconcile(NS, &[tw(7, 60_000)], 1_500_000_000);
        // Reused and closed again between two ticks: a different cookie.
        active_close(&mut t, 0xb0, 2000);
        let out = t.reconcile(NS, &[tw(8, 60_000)], 2_500_000_000);
        assert!(
            matches!(&out[0], Out::Exit(x) if x.reason == "reused" && x.sock_cookie == Some(7)),
            "{out:?}"
        );
        assert!(
            matches!(&out[1], Out::Enter(e) if e.sock_cookie == Some(8)),
            "{out:?}"
        );
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn no_duplicates_and_unconfirmed_candidates_expire() {
        let mut t = Tracker::new();
        active_close(&mut t, 0xa0, 1000);
        assert_eq!(t.reconcile(NS, &[tw(7, 60_000)], 1_500_000_000).len(), 1);
        assert!(t.reconcile(NS, &[tw(7, 59_000)], 2_000_000_000).is_empty());
        // A close that never shows up as TIME_WAIT (e.g. linger2 < 0).
        let mut c = change(0xc0, state::FIN_WAIT2, state::CLOSE, 3000, false);
        c.src = addr("127.0.0.1:5701");
        t.on_transition(c);
        assert!(t.reconcile(NS, &[tw(7, 59_000)], 4_000_000_000).is_empty());
        assert!(t.reconcile(NS, &[tw(7, 1_000)], 69_000_000_000).is_empty());
        assert_eq!(t.unconfirmed, 1);
    }

    #[test]
    fn passive_close_is_not_a_candidate() {
        let mut t = Tracker::new();
        t.on_transition(change(
            0xa0,
            state::ESTABLISHED,
            state::CLOSE_WAIT,
            1,
            false,
        ));
        t.on_transition(change(0xa0, state::CLOSE_WAIT, state::LAST_ACK, 2, true));
        t.on_transition(change(0xa0, state::LAST_ACK, state::CLOSE, 3, false));
        assert!(t.namespaces().is_empty());
    }

    #[test]
    fn preexisting_are_reported_once() {
        let mut t = Tracker::new();
        let out = t.preexisting(NS, &[tw(7, 12_000)], 5);
        let [Out::Enter(e)] = out.as_slice() else {
            panic!("{out:?}")
        };
        assert!(e.preexisting && e.pid.is_none());
        assert!(t.preexisting(NS, &[tw(7, 11_000)], 6).is_empty());
        let out = t.reconcile(NS, &[], 20_000_000_000);
        let [Out::Exit(x)] = out.as_slice() else {
            panic!("{out:?}")
        };
        assert_eq!(
            (x.reason, x.held_ms, x.preexisting),
            ("expired", None, true)
        );
    }
}
