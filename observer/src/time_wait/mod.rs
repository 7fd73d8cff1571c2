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

use serde::Serialize;

use crate::{clock::Clock, events::SCHEMA_VERSION, names::family_name};

/// A connection: its socket's network namespace and both ends.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    pub netns: u32,
    pub src: SocketAddr,
    pub dst: SocketAddr,
}

impl Key {
    fn family(&self) -> String {
        family_name(if self.src.is_ipv4() { 2 } else { 10 })
    }
}

/// The process that closed a connection (moved it to FIN_WAIT1 in process context).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Closer {
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub uid: u32,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct TimeWaitEnter {
    pub v: u8,
    pub ts: String,
    pub event: &'static str,
    /// The timewait socket's kernel address, as `tcp_state`'s `sk` (`null`
    /// when sock_diag found it).
    pub sk: Option<String>,
    pub netns: u32,
    pub family: String,
    pub saddr: String,
    pub sport: u16,
    pub daddr: String,
    pub dport: u16,
    /// What the kernel's TIME_WAIT timer was armed for (or had left, for
    /// sockets sock_diag found).
    pub expires_ms: u32,
    /// The kernel itself reported it (its timer, or its table).
    pub confirmed: bool,
    /// It was there before the observer started (no close was seen).
    pub preexisting: bool,
    /// The socket's cookie; `null` when the kernel had not given it one.
    pub sock_cookie: Option<u64>,
    /// Inherited from the socket it replaces (`null` when unknown): a restarted
    /// server can bind next to it only if both have SO_REUSEADDR.
    pub reuseaddr: Option<bool>,
    pub reuseport: Option<bool>,
    /// The process that closed the connection, when known.
    pub pid: Option<u32>,
    pub tid: Option<u32>,
    pub comm: Option<String>,
    pub uid: Option<u32>,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct TimeWaitExit {
    pub v: u8,
    pub ts: String,
    pub event: &'static str,
    pub sk: Option<String>,
    pub netns: u32,
    pub family: String,
    pub saddr: String,
    pub sport: u16,
    pub daddr: String,
    pub dport: u16,
    /// From the close to the end; `null` for sockets that predate the observer.
    pub held_ms: Option<u64>,
    /// `expired` (the timer ran out), `reused` (a new connection took the
    /// 4-tuple) or `killed` (deleted early: an RST, its namespace went).
    pub reason: &'static str,
    pub preexisting: bool,
    pub sock_cookie: Option<u64>,
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

fn sk_hex(sk: Option<u64>) -> Option<String> {
    sk.map(|a| format!("{a:#x}"))
}

impl Entered {
    pub fn record(self, clock: &Clock) -> TimeWaitEnter {
        let k = self.key;
        TimeWaitEnter {
            v: SCHEMA_VERSION,
            ts: clock.rfc3339(self.ktime_ns).to_string(),
            event: "time_wait_enter",
            sk: sk_hex(self.sk),
            netns: k.netns,
            family: k.family(),
            saddr: k.src.ip().to_string(),
            sport: k.src.port(),
            daddr: k.dst.ip().to_string(),
            dport: k.dst.port(),
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
    pub fn record(self, clock: &Clock) -> TimeWaitExit {
        let k = self.key;
        TimeWaitExit {
            v: SCHEMA_VERSION,
            ts: clock.rfc3339(self.ktime_ns).to_string(),
            event: "time_wait_exit",
            sk: sk_hex(self.sk),
            netns: k.netns,
            family: k.family(),
            saddr: k.src.ip().to_string(),
            sport: k.src.port(),
            daddr: k.dst.ip().to_string(),
            dport: k.dst.port(),
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
        .record(&Clock::with_offset(0))
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
        .record(&Clock::with_offset(0))
    }
}
