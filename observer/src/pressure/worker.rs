//! The pressure worker: a thread of its own, off the loop that drains the
//! ring buffer. The stream marks namespaces dirty (a set, bounded); the
//! worker recounts each dirty namespace at most every `RECOUNT_EVERY`: it
//! enters it, reads its range and reserved ports, and makes one sock_diag
//! dump per protocol and address family of the sockets in the range (the
//! kernel filters, see `Diag::in_port_range`). A namespace with a pair at
//! 80 % or more is recounted every `PRESSED_EVERY` even with no record (the
//! closes of UDP and bound-only sockets make none), and the namespaces of the
//! pairs the gauges show (at most `GAUGE_PAIRS`) every `GAUGES_EVERY`; one
//! quiet for `GAUGES_EVERY` otherwise is forgotten (its gauges too). At
//! start, every namespace is counted once.

use std::{
    collections::BTreeMap,
    fs::File,
    io,
    sync::{Arc, Condvar, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use foldhash::{HashMap, HashMapExt};

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use nix::sched::{CloneFlags, setns};
use tokio::sync::mpsc;

use super::{Count, Levels, PROTOS, Range, Scope, Sock, count, parse_reserved, percent};
use crate::{
    explain::{OptionsBook, Owners},
    kernel::{
        netns, procs,
        sock_diag::{Diag, IPPROTO_TCP, lists_bound_only},
    },
    schema::{PortPressure, PressureHolder},
};

/// The state sock_diag gives a TCP socket bound but not listening.
const TCP_CLOSE: u8 = 7;

/// The least time between two rounds of the worker.
const PAUSE: Duration = Duration::from_millis(50);
/// A namespace is counted again no sooner than this many times its last
/// count took (10,000 sockets in its range: ~10 ms, so every second;
/// 100,000: ~100 ms, every 10 s): the worker's cost stays about 1 % of a
/// core whatever the host holds.
const COST_SHARE: u32 = 100;
/// A dirty namespace is recounted at most this often.
pub const RECOUNT_EVERY: Duration = Duration::from_millis(250);
/// A namespace with a pair at 80 % or more, this often even with no record.
pub const PRESSED_EVERY: Duration = Duration::from_secs(1);
/// A namespace with gauges, this often (the gauges are at most this old).
pub const GAUGES_EVERY: Duration = Duration::from_secs(10);
/// Namespaces kept (levels, hints, gauges); dirty marks beyond are dropped.
pub const MAX_NAMESPACES: usize = 4096;
/// Pairs the gauges show: the worst ones, over every namespace.
pub const GAUGE_PAIRS: usize = 8;
/// Holders a record names.
pub const HOLDERS: usize = 5;

/// One pair the gauges show.
#[derive(Clone, Debug, PartialEq)]
pub struct PairGauge {
    pub netns: u32,
    pub proto: &'static str,
    pub scope: &'static str,
    /// `127.0.0.1`, or a destination `127.0.0.1:7000`, `[::1]:80`.
    pub pair: String,
    pub in_use: u32,
    pub range: u32,
}

impl PairGauge {
    pub fn ratio(&self) -> f64 {
        if self.range == 0 {
            0.0
        } else {
            f64::from(self.in_use) / f64::from(self.range)
        }
    }
}

/// The worst pairs of each namespace, for the metrics.
#[derive(Default, Debug)]
pub struct Top {
    by_netns: Mutex<BTreeMap<u32, Vec<PairGauge>>>,
}

impl Top {
    /// The `GAUGE_PAIRS` worst pairs over every namespace, worst first.
    pub fn worst(&self) -> Vec<PairGauge> {
        let mut all: Vec<PairGauge> = lock(&self.by_netns).values().flatten().cloned().collect();
        sort_worst(&mut all);
        all.truncate(GAUGE_PAIRS);
        all
    }

    fn set(&self, netns: u32, mut pairs: Vec<PairGauge>) {
        sort_worst(&mut pairs);
        pairs.truncate(GAUGE_PAIRS);
        let mut m = lock(&self.by_netns);
        if pairs.is_empty() {
            m.remove(&netns);
        } else {
            m.insert(netns, pairs);
        }
    }

    #[cfg(test)]
    fn has(&self, netns: u32) -> bool {
        lock(&self.by_netns).contains_key(&netns)
    }
}

fn sort_worst(v: &mut [PairGauge]) {
    v.sort_by(|a, b| {
        b.ratio()
            .total_cmp(&a.ratio())
            .then(b.in_use.cmp(&a.in_use))
            .then(a.netns.cmp(&b.netns))
            .then(a.pair.cmp(&b.pair))
    });
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Namespaces marked dirty, with a thread likely inside each.
#[derive(Default)]
struct Marks {
    dirty: Mutex<HashMap<u32, Option<u32>>>,
    cv: Condvar,
}

/// The stream's side.
#[derive(Clone)]
pub struct Handle {
    marks: Arc<Marks>,
    /// Marks dropped: the set was full.
    pub dropped: Arc<std::sync::atomic::AtomicU64>,
}

impl Handle {
    /// A record in namespace `netns` (of thread `tid`, when known): count it again.
    pub fn mark(&self, netns: u32, tid: Option<u32>) {
        let mut d = lock(&self.marks.dirty);
        let n = d.len();
        match d.get_mut(&netns) {
            Some(hint) => {
                if tid.is_some() {
                    *hint = tid;
                }
            }
            None if n < MAX_NAMESPACES => {
                d.insert(netns, tid);
                self.marks.cv.notify_one();
            }
            None => {
                self.dropped
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
}

/// Starts the worker: its records go to `out`; `top` gets the gauges; only
/// namespace `only` is looked at when given (`--netns`).
/// `book`: what the stream saw bound, for the TCP sockets bound but not
/// listening that sock_diag cannot list before 6.3.
pub fn spawn(
    out: mpsc::Sender<PortPressure>,
    top: Arc<Top>,
    only: Option<u32>,
    book: Arc<Mutex<OptionsBook>>,
) -> Handle {
    let marks = Arc::new(Marks::default());
    let handle = Handle {
        marks: marks.clone(),
        dropped: Default::default(),
    };
    std::thread::Builder::new()
        .name("port-pressure".into())
        .spawn(move || {
            let mut w = Worker {
                out,
                top,
                only,
                marks,
                spaces: HashMap::new(),
                owners: Owners::every(Duration::from_millis(100)),
                own: netns::own(),
                home: File::open("/proc/thread-self/ns/net").ok(),
                stuck: false,
                unlisted: (!lists_bound_only()).then_some(book),
            };
            w.snapshot();
            w.serve();
        })
        .expect("spawning the port-pressure thread");
    handle
}

/// What the worker keeps of a namespace.
#[derive(Default)]
struct Space {
    levels: Levels,
    counted: Option<Instant>,
    /// How long its last count took: the gaps between counts grow with it.
    cost: Duration,
    dirty: bool,
    hint: Option<u32>,
}

struct Worker {
    out: mpsc::Sender<PortPressure>,
    top: Arc<Top>,
    only: Option<u32>,
    marks: Arc<Marks>,
    spaces: HashMap<u32, Space>,
    owners: Owners,
    own: Option<u32>,
    /// The thread's own namespace, to come back to.
    home: Option<File>,
    /// It could not come back: it stops (it would count the wrong namespace).
    stuck: bool,
    /// Where sock_diag cannot list bound-only TCP sockets: the stream's book.
    unlisted: Option<Arc<Mutex<OptionsBook>>>,
}

/// One count of a namespace.
pub struct Counted {
    pub range: Range,
    pub socks: Vec<Sock>,
}

impl Worker {
    /// Every namespace with a process in it now, once.
    fn snapshot(&mut self) {
        for (ino, file) in netns::all() {
            if self.only.is_some_and(|o| o != ino) {
                continue;
            }
            if self.spaces.len() >= MAX_NAMESPACES {
                break;
            }
            let space = self.spaces.entry(ino).or_default();
            space.counted = Some(Instant::now());
            let counted = self.read(ino, &file);
            if let Some(s) = self.spaces.get_mut(&ino) {
                s.cost = s.counted.map_or(Duration::ZERO, |t| t.elapsed());
            }
            if !self.settle(ino, counted) {
                return;
            }
        }
    }

    fn serve(mut self) {
        loop {
            let marked: Vec<(u32, Option<u32>)> = {
                let mut d = lock(&self.marks.dirty);
                if d.is_empty() {
                    d = self
                        .marks
                        .cv
                        .wait_timeout(d, Duration::from_millis(100))
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                d.drain().collect()
            };
            for (ino, tid) in marked {
                if self.only.is_some_and(|o| o != ino) {
                    continue;
                }
                if !self.spaces.contains_key(&ino) && self.spaces.len() >= MAX_NAMESPACES {
                    continue;
                }
                let s = self.spaces.entry(ino).or_default();
                s.dirty = true;
                if tid.is_some() {
                    s.hint = tid;
                }
            }
            let now = Instant::now();
            let since = |s: &Space| {
                s.counted
                    .map_or(Duration::MAX, |c| now.saturating_duration_since(c))
            };
            // The namespaces the gauges show now: kept fresh (every GAUGES_EVERY).
            let shown: std::collections::HashSet<u32> =
                self.top.worst().iter().map(|g| g.netns).collect();
            // Forget the quiet ones (no mark, no pair at 80 %, not shown, not
            // counted for GAUGES_EVERY): the set stays bounded on a host where
            // namespaces come and go.
            let top = &self.top;
            self.spaces.retain(|ino, s| {
                let keep =
                    s.dirty || s.levels.pressed() || shown.contains(ino) || since(s) < GAUGES_EVERY;
                if !keep {
                    top.set(*ino, Vec::new());
                }
                keep
            });
            let due: Vec<u32> = self
                .spaces
                .iter()
                .filter(|(ino, s)| {
                    let since = since(s);
                    // A namespace whose count is dear (many sockets in its
                    // range) is counted less often: at most 1/COST_SHARE of
                    // this thread's time goes to it.
                    let gap = |every: Duration| every.max(s.cost * COST_SHARE);
                    (s.dirty && since >= gap(RECOUNT_EVERY))
                        || (s.levels.pressed() && since >= gap(PRESSED_EVERY))
                        || (since >= gap(GAUGES_EVERY) && shown.contains(ino))
                })
                .map(|(ino, _)| *ino)
                .collect();
            for ino in due {
                let hint = {
                    let s = self.spaces.get_mut(&ino).expect("due");
                    s.dirty = false;
                    s.counted = Some(Instant::now());
                    s.hint
                };
                let started = Instant::now();
                let counted = match netns::open(ino, hint) {
                    Some(file) => self.read(ino, &file),
                    None => Err(io::Error::other("gone")),
                };
                if let Some(s) = self.spaces.get_mut(&ino) {
                    s.cost = started.elapsed();
                }
                if !self.settle(ino, counted) {
                    return;
                }
            }
            if self.out.is_closed() {
                return;
            }
            // Marks gather meanwhile (one per namespace): without a pause,
            // a stream of records would wake this thread once per record.
            std::thread::sleep(PAUSE);
        }
    }

    /// The namespace's range and sockets in it, read from inside.
    fn read(&mut self, ino: u32, file: &File) -> io::Result<Counted> {
        let mut c = self.read_in(ino, file)?;
        self.add_unlisted(ino, &mut c);
        Ok(c)
    }

    /// Before 6.3 sock_diag lists no TCP socket bound but not listening: add
    /// those the stream saw bound in `ino`, in the range and still open (the
    /// explainer does the same for its blockers).
    fn add_unlisted(&self, ino: u32, c: &mut Counted) {
        let Some(book) = &self.unlisted else {
            return;
        };
        let seen = lock(book).bound_on(ino, None);
        for b in seen {
            if !c.range.picks(b.local.port())
                || c.socks.iter().any(|s| u64::from(s.inode) == b.ino)
                || !b.alive()
            {
                continue;
            }
            let any = if b.local.is_ipv4() {
                IpAddr::V4(Ipv4Addr::UNSPECIFIED)
            } else {
                IpAddr::V6(Ipv6Addr::UNSPECIFIED)
            };
            c.socks.push(Sock {
                proto: IPPROTO_TCP,
                state: TCP_CLOSE,
                src: b.local,
                dst: SocketAddr::new(any, 0),
                inode: b.ino as u32,
            });
        }
    }

    fn read_in(&mut self, ino: u32, file: &File) -> io::Result<Counted> {
        if Some(ino) == self.own {
            return read_here();
        }
        let home = self
            .home
            .as_ref()
            .ok_or_else(|| io::Error::other("no home namespace"))?;
        setns(file, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        let r = read_here();
        if let Err(e) = setns(home, CloneFlags::CLONE_NEWNET) {
            log::error!("port pressure: cannot return to the daemon's namespace ({e}): stopping");
            self.stuck = true;
        }
        r
    }

    /// Levels, gauges and records from one count; false when the worker must stop.
    fn settle(&mut self, ino: u32, counted: io::Result<Counted>) -> bool {
        if self.stuck {
            return false;
        }
        let c = match counted {
            Ok(c) => c,
            Err(e) => {
                // Gone (or unreadable): forget it, silently.
                log::debug!("port pressure: namespace {ino}: {e}");
                self.spaces.remove(&ino);
                self.top.set(ino, Vec::new());
                return true;
            }
        };
        let size = c.range.size();
        let counts = count(&c.socks, &c.range);
        self.top.set(
            ino,
            counts
                .iter()
                .map(|k| PairGauge {
                    netns: ino,
                    proto: k.pair.proto_name(),
                    scope: k.pair.scope_name(),
                    pair: match k.pair.scope {
                        Scope::Local(a) => a.to_string(),
                        Scope::Destination(d) => d.to_string(),
                    },
                    in_use: k.in_use,
                    range: size,
                })
                .collect(),
        );
        let Some(space) = self.spaces.get_mut(&ino) else {
            return true;
        };
        let changes = space.levels.update(&counts, size);
        for ch in changes {
            let (addr, port) = ch.pair.addr();
            let holders = counts
                .get(ch.count)
                .map(|k| holders(k, &c.socks, &c.range, &mut self.owners))
                .unwrap_or_default();
            let record = PortPressure {
                netns: ino,
                proto: ch.pair.proto_name(),
                scope: ch.pair.scope_name(),
                addr,
                port,
                in_use: ch.in_use,
                range: size,
                range_low: c.range.low,
                range_high: c.range.high,
                reserved: c.range.reserved_in(),
                percent: percent(ch.in_use, size),
                level: ch.level,
                previous: ch.previous,
                holders,
            };
            if self.out.blocking_send(record).is_err() {
                return false;
            }
        }
        true
    }
}

/// The calling thread's namespace: its range, reserved ports, and the TCP
/// and UDP sockets on ports of the range.
pub fn read_here() -> io::Result<Counted> {
    let sysctl = |name: &str| std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"));
    let mut it = sysctl("ip_local_port_range")?
        .split_whitespace()
        .map(|p| p.parse::<u16>().ok())
        .collect::<Vec<_>>()
        .into_iter();
    let (Some(Some(low)), Some(Some(high))) = (it.next(), it.next()) else {
        return Err(io::Error::other("ip_local_port_range unreadable"));
    };
    let range = Range {
        low,
        high,
        reserved: sysctl("ip_local_reserved_ports")
            .map(|s| parse_reserved(&s))
            .unwrap_or_default(),
    };
    let mut diag = Diag::open()?;
    let mut socks = Vec::new();
    for proto in PROTOS {
        socks.extend(diag.in_port_range(proto, low, high)?.iter().map(Sock::from));
    }
    Ok(Counted { range, socks })
}

/// The processes holding a pair's ports, most first (at most `HOLDERS`);
/// sockets with no owner (TIME_WAIT) as one holder with no pid.
fn holders(c: &Count, socks: &[Sock], range: &Range, owners: &mut Owners) -> Vec<PressureHolder> {
    let mut by: BTreeMap<Option<u32>, (Option<String>, std::collections::HashSet<u16>)> =
        BTreeMap::new();
    for &i in &c.socks {
        let s = &socks[i];
        if !range.picks(s.src.port()) {
            continue;
        }
        let (pid, comm) = match owners.get(s.inode) {
            Some((pid, comm, _)) => (Some(pid), Some(comm)),
            None => (None, None),
        };
        let e = by.entry(pid).or_default();
        if e.0.is_none() {
            e.0 = comm;
        }
        e.1.insert(s.src.port());
    }
    let mut out: Vec<PressureHolder> = by
        .into_iter()
        .map(|(pid, (comm, ports))| PressureHolder {
            pid,
            comm,
            cmdline: pid
                .and_then(procs::read)
                .and_then(|i| i.cmdline.as_deref().map(str::to_owned)),
            count: ports.len() as u32,
        })
        .collect();
    out.sort_by(|a, b| b.count.cmp(&a.count).then(a.pid.cmp(&b.pid)));
    out.truncate(HOLDERS);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(netns: u32, pair: &str, in_use: u32, range: u32) -> PairGauge {
        PairGauge {
            netns,
            proto: "tcp",
            scope: "local",
            pair: pair.into(),
            in_use,
            range,
        }
    }

    #[test]
    fn the_gauges_show_the_worst_pairs_of_all_namespaces() {
        let top = Top::default();
        top.set(
            1,
            (0..20)
                .map(|i| g(1, &format!("10.0.0.{i}"), i, 28232))
                .collect(),
        );
        top.set(2, vec![g(2, "127.0.0.1", 19, 20), g(2, "127.0.0.2", 1, 20)]);
        let w = top.worst();
        assert_eq!(w.len(), GAUGE_PAIRS);
        assert_eq!((w[0].netns, w[0].in_use), (2, 19));
        assert_eq!(w[1].pair, "127.0.0.2");
        assert_eq!(w[2].pair, "10.0.0.19");
        top.set(2, Vec::new());
        assert!(!top.has(2) && top.has(1));
        assert_eq!(top.worst()[0].pair, "10.0.0.19");
    }

    #[test]
    fn holders_by_process_most_first() {
        let range = Range::new(40000, 40019);
        let socks: Vec<Sock> = (0..3)
            .map(|i| Sock {
                proto: 6,
                state: 6,
                src: format!("127.0.0.1:{}", 40000 + i).parse().unwrap(),
                dst: "127.0.0.1:7000".parse().unwrap(),
                inode: 0,
            })
            .collect();
        let c = count(&socks, &range);
        let h = holders(&c[0], &socks, &range, &mut Owners::none());
        assert_eq!(
            h,
            [PressureHolder {
                pid: None,
                comm: None,
                cmdline: None,
                count: 3
            }]
        );
    }

    #[test]
    fn counts_this_namespace_through_sock_diag() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        // A namespace of its own with a 20-port range, on a thread of its own.
        std::thread::spawn(|| {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).unwrap();
            std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "40000 40019").unwrap();
            std::fs::write("/proc/sys/net/ipv4/ip_local_reserved_ports", "40019").unwrap();
            let held: Vec<std::net::UdpSocket> = (0..3)
                .map(|_| std::net::UdpSocket::bind("0.0.0.0:0").unwrap())
                .collect();
            // Outside the range: filtered out by the kernel.
            let _out = std::net::UdpSocket::bind("0.0.0.0:5000").unwrap();
            let c = read_here().unwrap();
            assert_eq!((c.range.size(), c.range.reserved_in()), (19, 1));
            assert_eq!(c.socks.len(), 3, "{:?}", c.socks);
            let counts = count(&c.socks, &c.range);
            assert_eq!(counts.len(), 1, "{counts:?}");
            assert_eq!(counts[0].in_use, 3);
            let mut owners = Owners::every(Duration::ZERO);
            let h = holders(&counts[0], &c.socks, &c.range, &mut owners);
            assert_eq!(h.len(), 1);
            assert_eq!((h[0].pid, h[0].count), (Some(std::process::id()), 3));
            drop(held);
        })
        .join()
        .unwrap();
    }

    /// The cost of one recount (README, Cost): N TIME_WAIT sockets in a
    /// namespace of its own, all in its range; the median of 20 recounts
    /// (read the range, dump TCP and UDP in the range, count the pairs).
    /// `OBSERVER_RECOUNT_SOCKETS` sets N (10,000 by default).
    #[test]
    #[ignore = "a measurement: cargo test --release -p observer -- --ignored recount_cost --nocapture"]
    fn recount_cost() {
        use std::net::{TcpListener, TcpStream};
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let n: usize = std::env::var("OBSERVER_RECOUNT_SOCKETS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10_000);
        std::thread::spawn(move || {
            crate::repro::ctx::enter_new_netns().unwrap();
            std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "20000 60999").unwrap();
            let server = TcpListener::bind("127.0.0.1:7000").unwrap();
            for _ in 0..n {
                let client = TcpStream::connect("127.0.0.1:7000").unwrap();
                let (accepted, _) = server.accept().unwrap();
                drop(client); // the client closes first: its end waits in TIME_WAIT
                drop(accepted);
            }
            std::thread::sleep(Duration::from_millis(200));
            let mut times = Vec::new();
            let mut last = None;
            for _ in 0..20 {
                let t = Instant::now();
                let c = read_here().unwrap();
                let counts = count(&c.socks, &c.range);
                times.push(t.elapsed());
                last = Some((c.socks.len(), counts));
            }
            times.sort();
            let (socks, counts) = last.unwrap();
            let dest = counts
                .iter()
                .find(|c| matches!(c.pair.scope, Scope::Destination(_)))
                .map_or(0, |c| c.in_use);
            eprintln!(
                "recount of {socks} sockets in range ({dest} TIME_WAIT to 127.0.0.1:7000): median {:?}, min {:?}, max {:?}",
                times[times.len() / 2],
                times[0],
                times[times.len() - 1]
            );
            assert!(socks >= n, "{socks} of {n}");
        })
        .join()
        .unwrap();
    }
}
