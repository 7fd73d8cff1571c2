//! The TIME_WAIT lifecycle as records: `time_wait_enter` when the kernel puts
//! a connection's socket in TIME_WAIT, `time_wait_exit` when that socket goes.
//!
//! Two sources: the kernel's own timer (`timer`: exact, nothing kept per
//! socket here) and, where the timer's handler cannot be found, sock_diag
//! polling (`poll`). sock_diag also reports the TIME_WAIT sockets that exist
//! when the observer starts (`preexisting`).

pub mod poll;
pub mod timer;

use std::net::SocketAddr;

pub use crate::schema::{Closer, Flow, TimeWaitEnter, TimeWaitExit};

/// A connection: its socket's network namespace and both ends.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    pub netns: u32,
    pub src: SocketAddr,
    pub dst: SocketAddr,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Out {
    Enter(TimeWaitEnter),
    Exit(TimeWaitExit),
}

/// What a `time_wait_enter` says, from either source.
pub struct Entered {
    pub key: Key,
    pub ktime_ns: u64,
    pub sk: Option<u64>,
    pub expires_ms: u32,
    pub preexisting: bool,
    pub cookie: Option<u64>,
    pub reuse: Option<(bool, bool)>,
    pub closer: Option<Closer>,
}

/// What a `time_wait_exit` says, from either source.
pub struct Left {
    pub key: Key,
    pub ktime_ns: u64,
    pub sk: Option<u64>,
    pub held_ms: Option<u64>,
    pub reason: &'static str,
    pub preexisting: bool,
    pub cookie: Option<u64>,
}

impl Entered {
    pub fn record(self) -> TimeWaitEnter {
        let k = self.key;
        TimeWaitEnter {
            ktime_ns: self.ktime_ns,
            flow: Flow::new(self.sk, k.netns, k.src, k.dst),
            expires_ms: self.expires_ms,
            confirmed: true,
            preexisting: self.preexisting,
            sock_cookie: self.cookie,
            reuseaddr: self.reuse.map(|r| r.0),
            reuseport: self.reuse.map(|r| r.1),
            pid: self.closer.as_ref().map(|c| c.pid),
            tid: self.closer.as_ref().map(|c| c.tid),
            comm: self.closer.as_ref().map(|c| c.comm.clone()),
            uid: self.closer.as_ref().map(|c| c.uid),
        }
    }
}

impl Left {
    pub fn record(self) -> TimeWaitExit {
        let k = self.key;
        TimeWaitExit {
            ktime_ns: self.ktime_ns,
            flow: Flow::new(self.sk, k.netns, k.src, k.dst),
            held_ms: self.held_ms,
            reason: self.reason,
            preexisting: self.preexisting,
            sock_cookie: self.cookie,
        }
    }
}

#[cfg(test)]
impl TimeWaitEnter {
    /// Every field filled, for schema tests.
    pub fn example() -> TimeWaitEnter {
        Entered {
            key: Key {
                netns: 1,
                src: "127.0.0.1:1".parse().expect("literal"),
                dst: "127.0.0.1:2".parse().expect("literal"),
            },
            ktime_ns: 0,
            sk: Some(1),
            expires_ms: 1,
            preexisting: false,
            cookie: Some(1),
            reuse: Some((false, false)),
            closer: Some(Closer {
                pid: 1,
                tid: 1,
                comm: "x".into(),
                uid: 0,
            }),
        }
        .record()
    }
}

#[cfg(test)]
impl TimeWaitExit {
    /// Every field filled, for schema tests.
    pub fn example() -> TimeWaitExit {
        Left {
            key: Key {
                netns: 1,
                src: "127.0.0.1:1".parse().expect("literal"),
                dst: "127.0.0.1:2".parse().expect("literal"),
            },
            ktime_ns: 0,
            sk: Some(1),
            held_ms: Some(1),
            reason: "expired",
            preexisting: false,
            cookie: Some(1),
        }
        .record()
    }
}
