//! Who holds a port, which rule made a bind fail, and what would fix it:
//! sock_diag (one dump filtered by port in the kernel), owners from /proc, the
//! options the observer saw, and the rules in `rules`.

pub mod cli;
pub mod env;
pub mod rules;
pub mod worker;

use std::{
    collections::VecDeque,
    io,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use foldhash::{HashMap, HashMapExt};

use rules::{Explain, Holder, Request};

use crate::{
    kernel::sock_diag::{Diag, IPPROTO_TCP, IPPROTO_UDP, InetSock},
    names::socket_state_name,
};

/// Socket options (and the binding process) by socket cookie or inode, as the
/// observer saw them (bind events, TIME_WAIT sockets); oldest forgotten first
/// beyond `CAP`.
#[derive(Default)]
pub struct OptionsBook {
    map: HashMap<u64, Note>,
    order: VecDeque<u64>,
    /// TIME_WAIT sockets the stream saw enter, by connection (their cookie
    /// is often unset): inherited options and who closed them.
    time_wait: HashMap<TwKey, TwNote>,
    tw_order: VecDeque<TwKey>,
    /// TCP sockets the stream saw bound to a port, oldest first: where
    /// sock_diag cannot list sockets bound but not listening (before 6.3),
    /// the blockers it cannot show.
    bound: VecDeque<Bound>,
}

/// A socket's options, and the process that bound it where a bind was seen.
struct Note {
    reuse: (bool, bool),
    owner: Option<(u32, String)>,
}

/// A TCP socket a bind record showed bound, and whose it was.
#[derive(Clone, Debug, PartialEq)]
pub struct Bound {
    pub netns: u32,
    pub local: SocketAddr,
    pub ino: u64,
    pub pid: u32,
    pub fd: i32,
    pub uid: u32,
    pub comm: String,
    pub reuseaddr: bool,
    pub reuseport: bool,
}

impl Bound {
    /// The socket is still open in its process (its fd still names it).
    pub fn alive(&self) -> bool {
        std::fs::read_link(format!("/proc/{}/fd/{}", self.pid, self.fd))
            .is_ok_and(|l| l.to_string_lossy() == format!("socket:[{}]", self.ino))
    }

    /// As a blocker: the state sock_diag would show (`BOUND`).
    pub fn holder(&self) -> Holder {
        Holder {
            proto: "tcp",
            state: "BOUND",
            addr: self.local.ip().to_string(),
            port: self.local.port(),
            raddr: if self.local.is_ipv4() {
                "0.0.0.0"
            } else {
                "::"
            }
            .into(),
            rport: 0,
            uid: self.uid,
            reuseaddr: Some(self.reuseaddr),
            reuseport: Some(self.reuseport),
            v6only: None,
            expires_ms: None,
            pid: Some(self.pid),
            comm: Some(self.comm.clone()),
            cmdline: None,
            unit: None,
            container_id: None,
            running_s: None,
            sock_cookie: 0,
            inode: self.ino as u32,
            local: self.local,
            state_num: BOUND_STATE,
            proto_num: IPPROTO_TCP,
        }
        .identified()
    }
}

/// inet_diag's pseudo-state for a socket bound and neither listening nor connected.
pub const BOUND_STATE: u8 = 13;

/// A connection: network namespace, local end, remote end.
type TwKey = (u32, SocketAddr, SocketAddr);

#[derive(Clone, Debug, PartialEq)]
struct TwNote {
    reuse: Option<(bool, bool)>,
    closer: Option<(u32, String)>,
}

/// Inodes share the maps with cookies, marked by the top bit (cookies count up from 1).
const INO: u64 = 1 << 63;

impl OptionsBook {
    const CAP: usize = 1 << 14;

    /// A bind the stream saw, by the socket's inode (its cookie is often unset).
    pub fn note_bind_ino(
        &mut self,
        ino: u64,
        reuseaddr: bool,
        reuseport: bool,
        pid: u32,
        comm: &str,
    ) {
        self.note_bind(ino | INO, reuseaddr, reuseport, pid, comm);
    }

    /// What is known of a socket sock_diag reports: by cookie, else by inode.
    fn find(&self, cookie: u64, inode: u32) -> Option<(bool, bool)> {
        self.get(cookie)
            .or_else(|| (inode != 0).then(|| self.get(u64::from(inode) | INO))?)
    }

    fn find_owner(&self, cookie: u64, inode: u32) -> Option<(u32, String)> {
        self.owner(cookie)
            .or_else(|| (inode != 0).then(|| self.owner(u64::from(inode) | INO))?)
    }

    pub fn note(&mut self, cookie: u64, reuseaddr: bool, reuseport: bool) {
        self.note_with(cookie, (reuseaddr, reuseport), None);
    }

    /// Options and the process that bound the socket (its likely owner).
    pub fn note_bind(
        &mut self,
        cookie: u64,
        reuseaddr: bool,
        reuseport: bool,
        pid: u32,
        comm: &str,
    ) {
        self.note_with(cookie, (reuseaddr, reuseport), Some((pid, comm.to_owned())));
    }

    /// One lookup for the socket, one more to forget the oldest (a bind
    /// storm notes a socket per record).
    fn note_with(&mut self, cookie: u64, reuse: (bool, bool), owner: Option<(u32, String)>) {
        if cookie == 0 {
            return;
        }
        let mut new = false;
        let note = self.map.entry(cookie).or_insert_with(|| {
            new = true;
            Note { reuse, owner: None }
        });
        note.reuse = reuse;
        if owner.is_some() {
            note.owner = owner;
        }
        if new {
            self.order.push_back(cookie);
            if self.order.len() > Self::CAP
                && let Some(old) = self.order.pop_front()
            {
                self.map.remove(&old);
            }
        }
    }

    /// A `time_wait_enter`: what a TIME_WAIT blocker on that connection
    /// inherited, and who closed it; the oldest forgotten beyond `CAP`.
    pub fn note_time_wait(&mut self, e: &crate::time_wait::TimeWaitEnter) {
        let reuse = e.reuseaddr.zip(e.reuseport);
        if let (Some(c), Some((a, p))) = (e.sock_cookie, reuse) {
            self.note(c, a, p);
        }
        let key = (e.flow.netns, e.flow.src, e.flow.dst);
        let note = TwNote {
            reuse,
            closer: e.pid.zip(e.comm.clone()),
        };
        if self.time_wait.insert(key, note).is_none() {
            self.tw_order.push_back(key);
            if self.tw_order.len() > Self::CAP
                && let Some(old) = self.tw_order.pop_front()
            {
                self.time_wait.remove(&old);
            }
        }
    }

    /// A TCP socket bound (kept for kernels whose sock_diag cannot list it).
    pub fn note_bound(&mut self, b: Bound) {
        self.bound.push_back(b);
        if self.bound.len() > Self::CAP {
            self.bound.pop_front();
        }
    }

    /// The sockets seen bound on this port (`None`: on any) in this namespace.
    pub fn bound_on(&self, netns: u32, port: impl Into<Option<u16>>) -> Vec<Bound> {
        let port = port.into();
        self.bound
            .iter()
            .filter(|b| b.netns == netns && port.is_none_or(|p| b.local.port() == p))
            .cloned()
            .collect()
    }

    fn time_wait_note(&self, netns: u32, s: &InetSock) -> Option<&TwNote> {
        let canon = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
        self.time_wait
            .get(&(netns, s.src, s.dst))
            .or_else(|| self.time_wait.get(&(netns, canon(s.src), canon(s.dst))))
    }

    fn owner(&self, cookie: u64) -> Option<(u32, String)> {
        self.map.get(&cookie)?.owner.clone()
    }

    pub fn get(&self, cookie: u64) -> Option<(bool, bool)> {
        Some(self.map.get(&cookie)?.reuse)
    }

    /// Every entry, oldest first: (cookie, reuseaddr, reuseport), for a helper process.
    pub fn entries(&self) -> Vec<(u64, bool, bool)> {
        self.order
            .iter()
            .filter(|c| **c & INO == 0)
            .filter_map(|c| self.get(*c).map(|(a, p)| (*c, a, p)))
            .collect()
    }
}

/// Socket inode → owning process, from /proc/*/fd; rebuilt on a miss, at most once a second.
#[derive(Default)]
pub struct Owners {
    /// inode → (pid, comm, one fd of that process on it)
    map: HashMap<u32, (u32, String, i32)>,
    scanned: Option<Instant>,
    /// Never scan (a caller that only needs the verdict).
    off: bool,
    /// At most one /proc walk per this long (a walk reads every descriptor of
    /// every process: about 0.45 s at 100,000 sockets).
    every: Duration,
}

impl Owners {
    pub fn none() -> Owners {
        Owners {
            off: true,
            ..Owners::default()
        }
    }

    pub fn every(every: Duration) -> Owners {
        Owners {
            every,
            ..Owners::default()
        }
    }

    pub fn get(&mut self, inode: u32) -> Option<(u32, String, i32)> {
        if inode == 0 || self.off {
            return None; // TIME_WAIT and orphaned sockets have no owner
        }
        if !self.map.contains_key(&inode) && self.scanned.is_none_or(|t| t.elapsed() > self.every) {
            self.rescan();
        }
        self.map.get(&inode).cloned()
    }

    fn rescan(&mut self) {
        self.scanned = Some(Instant::now());
        self.map.clear();
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return;
        };
        for p in procs.flatten() {
            let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
                continue;
            };
            let comm = std::fs::read_to_string(p.path().join("comm"))
                .map(|c| c.trim_end().to_owned())
                .unwrap_or_default();
            for fd in fds.flatten() {
                let Some(fdnum) = fd.file_name().to_str().and_then(|s| s.parse::<i32>().ok())
                else {
                    continue;
                };
                if let Some(ino) = socket_inode(&fd.path()) {
                    self.map
                        .entry(ino)
                        .or_insert_with(|| (pid, comm.clone(), fdnum));
                }
            }
        }
    }
}

/// How to learn the options of sockets the observer did not see being bound.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// Only what the book says (the daemon: it never touches other processes' sockets).
    BookOnly,
    /// Also ask the socket itself: borrow its owner's descriptor (pidfd_getfd),
    /// getsockopt, close. For the one-shot commands an operator runs.
    Owner,
}

/// Every socket on `port` (TCP in any state, bound-only included, and UDP;
/// `None`: on every port) in the namespace `diag` was opened in (`netns`, 0
/// when unknown), with owners and known options.
pub fn holders(
    diag: &mut Diag,
    netns: u32,
    port: impl Into<Option<u16>>,
    book: &OptionsBook,
    owners: &mut Owners,
    ask: Ask,
) -> io::Result<Vec<Holder>> {
    let socks = on_port(diag, port.into())?;
    let known: Vec<Known> = socks.iter().map(|s| book.known(netns, s)).collect();
    Ok(socks
        .iter()
        .zip(known)
        .map(|(s, k)| holder(s, k, owners, ask))
        .collect())
}

/// Every TCP (any state) and UDP socket on local port `port` (or on any).
fn on_port(diag: &mut Diag, port: Option<u16>) -> io::Result<Vec<InetSock>> {
    let started = Instant::now();
    let mut socks = diag.sockets(IPPROTO_TCP, u32::MAX, port)?;
    socks.extend(diag.sockets(IPPROTO_UDP, u32::MAX, port)?);
    log::debug!(
        "port {port:?}: {} sockets in {:?}",
        socks.len(),
        started.elapsed()
    );
    Ok(socks)
}

/// SO_REUSEADDR and SO_REUSEPORT of another process's socket, through a
/// duplicate of its descriptor that is closed at once.
fn options_of(pid: u32, fd: i32) -> Option<(bool, bool)> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: plain syscalls; each returned descriptor is owned exactly once.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if pidfd < 0 {
        return None;
    }
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    use std::os::fd::AsRawFd;
    let dup = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if dup < 0 {
        return None;
    }
    let sock = unsafe { socket2::Socket::from_raw_fd(dup as i32) };
    Some((sock.reuse_address().ok()?, sock.reuse_port().ok()?))
}

/// What the book knows of a socket sock_diag reported: taken under the
/// book's lock, which is then let go before anything slow (a /proc walk).
pub struct Known {
    owner: Option<(u32, String)>,
    options: Option<(bool, bool)>,
}

impl OptionsBook {
    fn known(&self, netns: u32, s: &InetSock) -> Known {
        let time_wait = (s.state == observer_common::tcp::state::TIME_WAIT)
            .then(|| self.time_wait_note(netns, s))
            .flatten();
        Known {
            // A TIME_WAIT socket has no owner: name the process that closed it.
            owner: self
                .find_owner(s.cookie, s.inode)
                .or_else(|| time_wait.and_then(|n| n.closer.clone())),
            options: self
                .find(s.cookie, s.inode)
                .or_else(|| time_wait.and_then(|n| n.reuse)),
        }
    }
}

fn holder(s: &InetSock, known: Known, owners: &mut Owners, ask: Ask) -> Holder {
    let owner = match known.owner {
        Some((pid, comm)) => Some((pid, comm, -1)),
        None => owners.get(s.inode),
    };
    let options = known.options.or_else(|| match (&owner, ask) {
        (Some((pid, _, fd)), Ask::Owner) if *fd >= 0 => options_of(*pid, *fd),
        _ => None,
    });
    let local = SocketAddr::new(s.src.ip().to_canonical(), s.src.port());
    Holder {
        proto: if s.proto == IPPROTO_UDP { "udp" } else { "tcp" },
        state: socket_state_name(s.proto, s.state),
        addr: local.ip().to_string(),
        port: local.port(),
        raddr: s.dst.ip().to_canonical().to_string(),
        rport: s.dst.port(),
        uid: s.uid,
        reuseaddr: options.map(|k| k.0),
        reuseport: options.map(|k| k.1),
        v6only: s.v6only,
        expires_ms: (s.state == observer_common::tcp::state::TIME_WAIT).then_some(s.expires_ms),
        pid: owner.as_ref().map(|o| o.0),
        comm: owner.map(|o| o.1),
        cmdline: None,
        unit: None,
        container_id: None,
        running_s: None,
        sock_cookie: s.cookie,
        inode: s.inode,
        local,
        state_num: s.state,
        proto_num: s.proto,
    }
    .identified()
}

impl Holder {
    /// Its owner's command line, unit and age, from /proc (when it has an
    /// owner still there).
    pub fn identified(mut self) -> Holder {
        if let Some(i) = self.pid.and_then(crate::kernel::procs::read) {
            self.unit = i.unit().map(str::to_owned);
            self.container_id = i
                .cgroup
                .as_deref()
                .and_then(crate::kernel::cgroups::container_id)
                .map(str::to_owned);
            self.running_s = Some(i.running_s());
            self.cmdline = i.cmdline.as_deref().map(str::to_owned);
        }
        self
    }
}

/// The explanation of a bind that failed with EADDRINUSE: the blockers now, or
/// that there are none any more.
pub fn failure(r: &Request, holders: &[Holder]) -> rules::Explain {
    rules::explain(r, holders).unwrap_or_else(|| rules::no_blocker(r.port))
}

/// Explanations of a storm of failures: one lookup per (netns, proto, port) per
/// window; later failures in the window reuse it, and are counted.
pub struct Coalescer {
    recent: HashMap<Port, (Instant, Vec<Holder>)>,
    pub coalesced: u64,
}

/// A port of a network namespace: (netns, IP protocol, port).
pub type Port = (u32, u8, u16);

pub const COALESCE: Duration = Duration::from_millis(100);

impl Coalescer {
    pub fn new() -> Self {
        Coalescer {
            recent: HashMap::new(),
            coalesced: 0,
        }
    }

    /// The holders on the port, from a lookup made less than 100 ms ago or
    /// from `lookup`; and when that lookup was made.
    pub fn holders(
        &mut self,
        key: Port,
        lookup: impl FnOnce() -> io::Result<Vec<Holder>>,
    ) -> io::Result<(Vec<Holder>, Instant)> {
        let now = Instant::now();
        self.recent
            .retain(|_, (t, _)| now.duration_since(*t) < COALESCE);
        if let Some((t, h)) = self.recent.get(&key) {
            self.coalesced += 1;
            return Ok((h.clone(), *t));
        }
        let h = lookup()?;
        self.recent.insert(key, (now, h.clone()));
        Ok((h, now))
    }
}

/// The verdicts given from each port's current lookup (the worker's
/// `Coalescer`), shared: in a storm the same request fails again and again,
/// and the event loop gives it the same explanation itself, without a
/// round trip through the worker.
#[derive(Default)]
pub struct Verdicts {
    /// When the port's lookup was made, and the verdicts given from it.
    by_port: HashMap<Port, (Instant, Vec<Verdict>)>,
}

type Verdict = (Request, Arc<Explain>);

/// The requests one lookup keeps verdicts for, at most.
const VERDICTS: usize = 16;

impl Verdicts {
    /// The verdict on `r` from a lookup of its port less than 100 ms old.
    pub fn get(&self, key: Port, r: &Request) -> Option<Arc<Explain>> {
        let (at, verdicts) = self.by_port.get(&key)?;
        if at.elapsed() >= COALESCE {
            return None;
        }
        let (_, e) = verdicts.iter().find(|(q, _)| q == r)?;
        Some(e.clone())
    }

    /// Keeps the verdict on `r` from the lookup of its port made `at`.
    pub fn keep(&mut self, key: Port, at: Instant, r: &Request, e: &Arc<Explain>) {
        self.by_port.retain(|_, (t, _)| t.elapsed() < COALESCE);
        let (t, verdicts) = self.by_port.entry(key).or_insert((at, Vec::new()));
        if *t != at {
            (*t, *verdicts) = (at, Vec::new()); // a newer lookup
        }
        if verdicts.len() < VERDICTS && !verdicts.iter().any(|(q, _)| q == r) {
            verdicts.push((r.clone(), e.clone()));
        }
    }
}

/// The inode of the socket a `/proc/PID/fd/N` link names (`socket:[N]`).
pub fn socket_inode(fd_link: &std::path::Path) -> Option<u32> {
    let link = std::fs::read_link(fd_link).ok()?;
    let link = link.to_string_lossy();
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn book_forgets_the_oldest_beyond_its_cap() {
        let mut b = OptionsBook::default();
        for c in 1..=(OptionsBook::CAP as u64 + 1) {
            b.note(c, true, false);
        }
        assert_eq!(b.get(1), None);
        assert_eq!(b.get(2), Some((true, false)));
        b.note(0, true, true);
        assert_eq!(b.get(0), None);
        let mut small = OptionsBook::default();
        small.note(7, true, false);
        small.note(9, false, true);
        assert_eq!(small.entries(), [(7, true, false), (9, false, true)]);
    }

    #[test]
    fn a_storm_on_one_port_is_one_lookup() {
        let mut c = Coalescer::new();
        let mut lookups = 0;
        for _ in 0..5 {
            c.holders((1, 6, 5700), || {
                lookups += 1;
                Ok(Vec::new())
            })
            .unwrap();
        }
        c.holders((1, 6, 5701), || {
            lookups += 1;
            Ok(Vec::new())
        })
        .unwrap();
        assert_eq!((lookups, c.coalesced), (2, 4));
    }

    #[test]
    fn a_request_that_fails_again_gets_the_same_explanation() {
        let mut v = Verdicts::default();
        let key = (1, rules::TCP, 5700);
        let asked = Request::new(rules::TCP, "127.0.0.1".parse().unwrap(), 5700);
        let other = Request {
            reuseaddr: true,
            ..asked.clone()
        };
        assert!(v.get(key, &asked).is_none());
        let at = Instant::now();
        let e = Arc::new(rules::no_blocker(5700));
        v.keep(key, at, &asked, &e);
        assert!(Arc::ptr_eq(&e, &v.get(key, &asked).expect("kept")));
        assert!(v.get(key, &other).is_none());
        assert!(v.get((1, rules::UDP, 5700), &asked).is_none());
        // A newer lookup of the port forgets the verdicts of the older one.
        let later = Arc::new(rules::no_blocker(5700));
        v.keep(key, at + Duration::from_millis(1), &other, &later);
        assert!(v.get(key, &asked).is_none());
        assert!(Arc::ptr_eq(&later, &v.get(key, &other).expect("kept")));
        // And a lookup 100 ms old is stale.
        v.keep(key, at - COALESCE, &asked, &e);
        assert!(v.get(key, &asked).is_none());
    }
}
