//! Who holds a port, which rule made a bind fail, and what would fix it:
//! sock_diag (one dump filtered by port in the kernel), owners from /proc, the
//! options the observer saw, and the rules in `rules`.

pub mod cli;
pub mod env;
pub mod rules;

use std::{
    collections::{HashMap, VecDeque},
    io,
    net::SocketAddr,
    time::{Duration, Instant},
};

use rules::{Holder, Request};

use crate::{
    names::socket_state_name,
    sock_diag::{Diag, IPPROTO_TCP, IPPROTO_UDP, InetSock},
};

/// Socket options (and the binding process) by socket cookie or inode, as the
/// observer saw them (bind events, TIME_WAIT sockets); oldest forgotten first
/// beyond `CAP`.
#[derive(Default)]
pub struct OptionsBook {
    map: HashMap<u64, (bool, bool)>,
    owners: HashMap<u64, (u32, String)>,
    order: VecDeque<u64>,
    /// TIME_WAIT sockets the stream saw enter, by connection (their cookie
    /// is often unset): inherited options and who closed them.
    time_wait: HashMap<TwKey, TwNote>,
    tw_order: VecDeque<TwKey>,
}

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
        if cookie == 0 {
            return;
        }
        if self.map.insert(cookie, (reuseaddr, reuseport)).is_none() {
            self.order.push_back(cookie);
            if self.order.len() > Self::CAP
                && let Some(old) = self.order.pop_front()
            {
                self.map.remove(&old);
                self.owners.remove(&old);
            }
        }
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
        self.note(cookie, reuseaddr, reuseport);
        if self.map.contains_key(&cookie) {
            self.owners.insert(cookie, (pid, comm.to_owned()));
        }
    }

    /// A `time_wait_enter`: what a TIME_WAIT blocker on that connection
    /// inherited, and who closed it; the oldest forgotten beyond `CAP`.
    pub fn note_time_wait(&mut self, e: &crate::time_wait::TimeWaitEnter) {
        let (Ok(src), Ok(dst)) = (e.saddr.parse(), e.daddr.parse()) else {
            return;
        };
        let reuse = e.reuseaddr.zip(e.reuseport);
        if let (Some(c), Some((a, p))) = (e.sock_cookie, reuse) {
            self.note(c, a, p);
        }
        let key = (
            e.netns,
            SocketAddr::new(src, e.sport),
            SocketAddr::new(dst, e.dport),
        );
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

    fn time_wait_note(&self, netns: u32, s: &InetSock) -> Option<&TwNote> {
        let canon = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
        self.time_wait
            .get(&(netns, s.src, s.dst))
            .or_else(|| self.time_wait.get(&(netns, canon(s.src), canon(s.dst))))
    }

    fn owner(&self, cookie: u64) -> Option<(u32, String)> {
        self.owners.get(&cookie).cloned()
    }

    pub fn get(&self, cookie: u64) -> Option<(bool, bool)> {
        self.map.get(&cookie).copied()
    }

    /// Every entry, oldest first: (cookie, reuseaddr, reuseport), for a helper process.
    pub fn entries(&self) -> Vec<(u64, bool, bool)> {
        self.order
            .iter()
            .filter(|c| **c & INO == 0)
            .filter_map(|c| self.map.get(c).map(|(a, p)| (*c, *a, *p)))
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
                let Ok(link) = std::fs::read_link(fd.path()) else {
                    continue;
                };
                let link = link.to_string_lossy();
                if let Some(ino) = link
                    .strip_prefix("socket:[")
                    .and_then(|s| s.strip_suffix(']'))
                    .and_then(|s| s.parse().ok())
                {
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

/// Every socket on `port` (TCP in any state, bound-only included, and UDP) in
/// the namespace `diag` was opened in (`netns`, 0 when unknown), with owners
/// and known options.
pub fn holders(
    diag: &mut Diag,
    netns: u32,
    port: u16,
    book: &OptionsBook,
    owners: &mut Owners,
    ask: Ask,
) -> io::Result<Vec<Holder>> {
    let started = Instant::now();
    let mut socks = diag.sockets(IPPROTO_TCP, u32::MAX, Some(port))?;
    socks.extend(diag.sockets(IPPROTO_UDP, u32::MAX, Some(port))?);
    let dumped = started.elapsed();
    let holders = socks
        .iter()
        .map(|s| holder(s, netns, book, owners, ask))
        .collect();
    log::debug!(
        "port {port}: {} sockets; sock_diag {:?}, owners and options {:?}",
        socks.len(),
        dumped,
        started.elapsed() - dumped
    );
    Ok(holders)
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

fn holder(s: &InetSock, netns: u32, book: &OptionsBook, owners: &mut Owners, ask: Ask) -> Holder {
    let time_wait = (s.state == observer_common::tcp::state::TIME_WAIT)
        .then(|| book.time_wait_note(netns, s))
        .flatten();
    // A TIME_WAIT socket has no owner: name the process that closed it.
    let owner = match (
        book.find_owner(s.cookie, s.inode),
        time_wait.and_then(|n| n.closer.clone()),
    ) {
        (Some((pid, comm)), _) | (None, Some((pid, comm))) => Some((pid, comm, -1)),
        (None, None) => owners.get(s.inode),
    };
    let known = book
        .find(s.cookie, s.inode)
        .or_else(|| time_wait.and_then(|n| n.reuse))
        .or_else(|| match (&owner, ask) {
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
        reuseaddr: known.map(|k| k.0),
        reuseport: known.map(|k| k.1),
        v6only: s.v6only,
        expires_ms: (s.state == observer_common::tcp::state::TIME_WAIT).then_some(s.expires_ms),
        pid: owner.as_ref().map(|o| o.0),
        comm: owner.map(|o| o.1),
        sock_cookie: s.cookie,
        inode: s.inode,
        local,
        state_num: s.state,
        proto_num: s.proto,
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
    recent: HashMap<(u32, u8, u16), (Instant, Vec<Holder>)>,
    pub coalesced: u64,
}

pub const COALESCE: Duration = Duration::from_millis(100);

impl Coalescer {
    pub fn new() -> Self {
        Coalescer {
            recent: HashMap::new(),
            coalesced: 0,
        }
    }

    /// The holders on the port, from a lookup made less than 100 ms ago or from `lookup`.
    pub fn holders(
        &mut self,
        key: (u32, u8, u16),
        lookup: impl FnOnce() -> io::Result<Vec<Holder>>,
    ) -> io::Result<Vec<Holder>> {
        let now = Instant::now();
        self.recent
            .retain(|_, (t, _)| now.duration_since(*t) < COALESCE);
        if let Some((_, h)) = self.recent.get(&key) {
            self.coalesced += 1;
            return Ok(h.clone());
        }
        let h = lookup()?;
        self.recent.insert(key, (now, h.clone()));
        Ok(h)
    }
}

/// The stream's explainer: options seen so far, owners, one sock_diag socket
/// for the daemon's own namespace, and the storm limiter.
pub struct Explainer {
    pub book: OptionsBook,
    owners: Owners,
    pub coalescer: Coalescer,
    own_netns: Option<u32>,
    own: Option<Diag>,
}

impl Explainer {
    pub fn new() -> Self {
        Explainer {
            book: OptionsBook::default(),
            // A stream must not stall on /proc walks: at most one per 10 s.
            owners: Owners::every(Duration::from_secs(10)),
            coalescer: Coalescer::new(),
            own_netns: crate::netns::own(),
            own: None,
        }
    }

    /// The sockets on `port` in namespace `netns` (found through `tid`), coalesced.
    fn holders(&mut self, netns: u32, tid: u32, proto: u8, port: u16) -> io::Result<Vec<Holder>> {
        let Explainer {
            book,
            owners,
            coalescer,
            own_netns,
            own,
        } = self;
        coalescer.holders((netns, proto, port), || {
            if Some(netns) == *own_netns || netns == 0 {
                if own.is_none() {
                    *own = Some(Diag::open()?);
                }
                holders(
                    own.as_mut().expect("opened"),
                    netns,
                    port,
                    book,
                    owners,
                    Ask::BookOnly,
                )
            } else {
                let file = crate::netns::open(netns, Some(tid)).ok_or_else(|| {
                    io::Error::other(format!("network namespace {netns} is gone"))
                })?;
                holders(
                    &mut Diag::open_in(&file)?,
                    netns,
                    port,
                    book,
                    owners,
                    Ask::BookOnly,
                )
            }
        })
    }

    /// `explain` for a bind that failed with EADDRINUSE; `None` when it cannot be
    /// looked up (not TCP/UDP, or the namespace is gone).
    pub fn bind_failure(&mut self, b: &crate::events::Bind) -> Option<rules::Explain> {
        let proto = match b.proto.as_deref()? {
            "tcp" => rules::TCP,
            "udp" => rules::UDP,
            _ => return None,
        };
        let r = Request {
            reuseaddr: b.options.reuseaddr.unwrap_or(false),
            reuseport: b.options.reuseport.unwrap_or(false),
            // v6only: not readable from the bind hook: the system default.
            uid: b.uid,
            ..Request::new(proto, b.addr.as_deref()?.parse().ok()?, b.port?)
        };
        Some(
            match self.holders(b.netns.unwrap_or(0), b.tid, proto, r.port) {
                Ok(on_port) => failure(&r, &on_port),
                Err(e) => rules::lookup_failed(r.port, &e),
            },
        )
    }

    /// `explain` for a listen() that failed with EADDRINUSE. The failing socket
    /// is itself bound on the port: it is recognised by its inode and left out.
    pub fn listen_failure(&mut self, c: &crate::events::SockCall) -> Option<rules::Explain> {
        let port = c.lport?;
        let own_inode: Option<u32> = std::fs::read_link(format!("/proc/{}/fd/{}", c.pid, c.fd))
            .ok()
            .and_then(|l| {
                let l = l.to_string_lossy().into_owned();
                l.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
            });
        let on_port = match self.holders(c.netns.unwrap_or(0), c.tid, rules::TCP, port) {
            Ok(on_port) => on_port,
            Err(e) => return Some(rules::lookup_failed(port, &e)),
        };
        let (mine, others): (Vec<Holder>, Vec<Holder>) = on_port
            .into_iter()
            .partition(|h| Some(h.inode) == own_inode);
        let (reuseaddr, reuseport) = mine
            .first()
            .and_then(|h| self.book.find(h.sock_cookie, h.inode))
            .unwrap_or((false, false));
        let r = Request {
            reuseaddr,
            reuseport,
            uid: c.uid,
            ..Request::new(rules::TCP, c.laddr.as_deref()?.parse().ok()?, port)
        };
        Some(failure(&r, &others))
    }
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
}
