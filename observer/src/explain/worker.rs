//! The stream's explanations, on a thread of their own: a lookup is a
//! sock_diag dump and, now and then, a walk of /proc that takes half a second
//! on a host with 100,000 sockets; on the event loop it would hold up every
//! record behind it. A failing record goes to the worker (a bounded queue)
//! and comes back explained; other records do not wait for it.

use std::{
    io,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
    },
    time::{Duration, Instant},
};

use super::{
    Ask, Bound, Coalescer, Known, OptionsBook, Owners, Port, Verdicts, failure, holder, on_port,
    rules::{self, Holder, Request},
    socket_inode,
};
use crate::{
    kernel::sock_diag::{Diag, lists_bound_only},
    schema::{Bind, Event, Line, SockCall},
};

/// Failures waiting for a lookup, at most: beyond it a failure is written
/// without its explanation (and counted in `explain_skipped`).
pub const QUEUE: usize = 1024;

/// A record that failed with EADDRINUSE (a `bind` or a `listen`), on its
/// way to be explained.
pub type Failure = Box<Line>;

/// The event loop's handle.
pub struct Worker {
    tx: SyncSender<Failure>,
    /// What the stream saw (binds, TIME_WAIT sockets): shared with the
    /// worker, locked briefly on both sides.
    pub book: Arc<Mutex<OptionsBook>>,
    verdicts: Arc<Mutex<Verdicts>>,
    coalesced: Arc<AtomicU64>,
    /// Failures the event loop explained itself, from `verdicts`.
    given: u64,
    /// Failures written without an explanation: the queue was full.
    pub skipped: u64,
}

impl Worker {
    /// Starts the worker; explained records come back on `done`.
    pub fn spawn(done: tokio::sync::mpsc::Sender<Failure>) -> Worker {
        let (tx, rx) = sync_channel(QUEUE);
        let book = Arc::new(Mutex::new(OptionsBook::default()));
        let verdicts = Arc::new(Mutex::new(Verdicts::default()));
        let coalesced = Arc::new(AtomicU64::new(0));
        let explainer = Explainer::new(book.clone(), verdicts.clone(), coalesced.clone());
        std::thread::Builder::new()
            .name("explain".into())
            .spawn(move || explainer.serve(rx, done))
            .expect("spawning the explain thread");
        Worker {
            tx,
            book,
            verdicts,
            coalesced,
            given: 0,
            skipped: 0,
        }
    }

    /// Explains a bind failure at once when it repeats a request the worker
    /// explained from the port's current lookup (never waits for the lock).
    pub fn explain_at_once(&mut self, b: &mut Bind) -> bool {
        let Some((key, r)) = bind_request(b) else {
            return false;
        };
        let Some(e) = self.verdicts.try_lock().ok().and_then(|v| v.get(key, &r)) else {
            return false;
        };
        b.explain = Some(e);
        self.given += 1;
        true
    }

    /// Hands a failure over; gives it back when the queue is full.
    pub fn submit(&mut self, f: Failure) -> Result<(), Failure> {
        self.tx.try_send(f).map_err(|e| match e {
            TrySendError::Full(f) | TrySendError::Disconnected(f) => f,
        })
    }

    /// Failures explained from an earlier lookup on the same port.
    pub fn coalesced(&self) -> u64 {
        self.coalesced.load(Ordering::Relaxed) + self.given
    }

    /// Locks the book (a poisoned lock only means the worker died mid-note).
    pub fn book(&self) -> std::sync::MutexGuard<'_, OptionsBook> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The worker's side: owners, sock_diag sockets, the storm limiter.
struct Explainer {
    book: Arc<Mutex<OptionsBook>>,
    verdicts: Arc<Mutex<Verdicts>>,
    owners: Owners,
    coalescer: Coalescer,
    coalesced: Arc<AtomicU64>,
    own_netns: Option<u32>,
    own: Option<Diag>,
    /// This kernel's sock_diag lists sockets bound but not listening.
    lists_bound: bool,
}

/// The port a failed bind asked for, and the request the rules judge.
fn bind_request(b: &Bind) -> Option<(Port, Request)> {
    let (proto, asked) = b.request?;
    let r = Request {
        reuseaddr: b.options.reuseaddr.unwrap_or(false),
        reuseport: b.options.reuseport.unwrap_or(false),
        // v6only: not read by the bind program: the system default.
        uid: b.process.uid,
        ..Request::new(proto, asked.ip(), asked.port())
    };
    Some(((b.process.netns.unwrap_or(0), proto, asked.port()), r))
}

/// The sockets the stream saw bound, still open and not among `holders`
/// (sock_diag before 6.3 cannot list them), added as blockers.
fn add_unlisted(holders: &mut Vec<Holder>, bound: &[Bound]) {
    let unlisted: Vec<Holder> = bound
        .iter()
        .filter(|b| !holders.iter().any(|h| u64::from(h.inode) == b.ino))
        .filter(|b| b.alive())
        .map(Bound::holder)
        .collect();
    holders.extend(unlisted);
}

impl Explainer {
    fn new(
        book: Arc<Mutex<OptionsBook>>,
        verdicts: Arc<Mutex<Verdicts>>,
        coalesced: Arc<AtomicU64>,
    ) -> Explainer {
        Explainer {
            book,
            verdicts,
            // A walk of /proc reads every descriptor of every process: at most one per 10 s.
            owners: Owners::every(Duration::from_secs(10)),
            coalescer: Coalescer::new(),
            coalesced,
            own_netns: crate::kernel::netns::own(),
            own: None,
            lists_bound: lists_bound_only(),
        }
    }

    fn serve(mut self, rx: Receiver<Failure>, done: tokio::sync::mpsc::Sender<Failure>) {
        while let Ok(mut f) = rx.recv() {
            match &mut f.event {
                Event::Bind(b) => b.explain = self.bind_failure(b),
                Event::Listen(c) => c.explain = self.listen_failure(c).map(Arc::new),
                _ => {}
            }
            self.coalesced
                .store(self.coalescer.coalesced, Ordering::Relaxed);
            // Waits while the event loop is behind: the queue in front then
            // fills, and further failures go out unexplained (counted).
            if done.blocking_send(f).is_err() {
                return;
            }
        }
    }

    fn book(&self) -> std::sync::MutexGuard<'_, OptionsBook> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The sockets on `port` in namespace `netns` (found through `tid`),
    /// coalesced; with the ones the stream saw bound where sock_diag cannot
    /// list them.
    fn holders(
        &mut self,
        netns: u32,
        tid: u32,
        proto: u8,
        port: u16,
    ) -> io::Result<(Vec<Holder>, Instant)> {
        let key = (netns, proto, port);
        let Explainer {
            book,
            owners,
            coalescer,
            own_netns,
            own,
            lists_bound,
            ..
        } = self;
        coalescer.holders(key, || {
            let socks = if Some(netns) == *own_netns || netns == 0 {
                if own.is_none() {
                    *own = Some(Diag::open()?);
                }
                on_port(own.as_mut().expect("opened"), Some(port))?
            } else {
                let file = crate::kernel::netns::open(netns, Some(tid)).ok_or_else(|| {
                    io::Error::other(format!("network namespace {netns} is gone"))
                })?;
                on_port(&mut Diag::open_in(&file)?, Some(port))?
            };
            // The book under its lock, briefly; owners (a /proc walk) after.
            let (known, bound): (Vec<Known>, Vec<Bound>) = {
                let b = book.lock().unwrap_or_else(|p| p.into_inner());
                let known = socks.iter().map(|s| b.known(netns, s)).collect();
                let bound = if *lists_bound {
                    Vec::new()
                } else {
                    b.bound_on(netns, port)
                };
                (known, bound)
            };
            let mut holders: Vec<Holder> = socks
                .iter()
                .zip(known)
                .map(|(s, k)| holder(s, k, owners, Ask::BookOnly))
                .collect();
            add_unlisted(&mut holders, &bound);
            Ok(holders)
        })
    }

    /// The verdict on what was found: the rule, or why nothing was.
    fn verdict(&self, r: &Request, holders: &[Holder]) -> rules::Explain {
        if !self.lists_bound && rules::explain(r, holders).is_none() {
            return rules::bound_only_unlisted(r.port);
        }
        failure(r, holders)
    }

    /// `explain` for a bind that failed with EADDRINUSE; `None` when it cannot be
    /// looked up (not TCP/UDP). The same request on the same lookup of the
    /// port gets the same explanation.
    fn bind_failure(&mut self, b: &Bind) -> Option<Arc<rules::Explain>> {
        let (key, r) = bind_request(b)?;
        let (netns, proto, port) = key;
        let tid = b.process.tid;
        if port == 0 {
            return Some(Arc::new(
                self.ephemeral(netns, tid, &r)
                    .unwrap_or_else(|e| rules::lookup_failed(0, &e)),
            ));
        }
        let known = self.verdicts().get(key, &r);
        if let Some(e) = known {
            self.coalescer.coalesced += 1;
            return Some(e);
        }
        Some(match self.holders(netns, tid, proto, port) {
            // The failing socket is bound to nothing: it is not among them.
            Ok((on_port, at)) => {
                let e = Arc::new(self.verdict(&r, &on_port));
                self.verdicts().keep(key, at, &r, &e);
                e
            }
            Err(e) => Arc::new(rules::lookup_failed(port, &e)),
        })
    }

    fn verdicts(&self) -> std::sync::MutexGuard<'_, Verdicts> {
        self.verdicts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A bind to port 0 that got EADDRINUSE: the namespace's port range and
    /// every socket of the protocol in it (one dump; such failures are rare
    /// next to those on a port).
    fn ephemeral(&mut self, netns: u32, tid: u32, r: &Request) -> io::Result<rules::Explain> {
        let file = crate::kernel::netns::open(netns, Some(tid))
            .ok_or_else(|| io::Error::other(format!("network namespace {netns} is gone")))?;
        let env = super::env::Env::of(&file)?;
        let socks = Diag::open_in(&file)?.sockets(r.proto, u32::MAX, None)?;
        let (known, bound): (Vec<Known>, Vec<Bound>) = {
            let b = self.book();
            let bound = if self.lists_bound || r.proto != rules::TCP {
                Vec::new()
            } else {
                b.bound_on(netns, None)
            };
            (socks.iter().map(|s| b.known(netns, s)).collect(), bound)
        };
        let mut holders: Vec<Holder> = socks
            .iter()
            .zip(known)
            .map(|(s, k)| holder(s, k, &mut self.owners, Ask::BookOnly))
            .collect();
        // Where sock_diag cannot list bound-only sockets: those the stream saw.
        add_unlisted(&mut holders, &bound);
        Ok(
            rules::ephemeral_exhausted(r, env.local_port_range, &holders)
                .unwrap_or_else(|| rules::no_blocker(0)),
        )
    }

    /// `explain` for a listen() that failed with EADDRINUSE. The failing socket
    /// is itself bound on the port: it is recognised by its inode and left out.
    fn listen_failure(&mut self, c: &SockCall) -> Option<rules::Explain> {
        let local = c.local?;
        let port = local.port();
        let p = &c.process;
        let own_inode = socket_inode(format!("/proc/{}/fd/{}", p.pid, c.fd).as_ref());
        let on_port = match self.holders(p.netns.unwrap_or(0), p.tid, rules::TCP, port) {
            Ok((on_port, _)) => on_port,
            Err(e) => return Some(rules::lookup_failed(port, &e)),
        };
        let (mine, others): (Vec<Holder>, Vec<Holder>) = on_port
            .into_iter()
            .partition(|h| Some(h.inode) == own_inode);
        let (reuseaddr, reuseport) = mine
            .first()
            .and_then(|h| self.book().find(h.sock_cookie, h.inode))
            .unwrap_or((false, false));
        let r = Request {
            reuseaddr,
            reuseport,
            uid: p.uid,
            ..Request::new(rules::TCP, local.ip(), port)
        };
        Some(self.verdict(&r, &others))
    }
}
