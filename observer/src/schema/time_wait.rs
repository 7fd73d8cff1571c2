//! `time_wait_enter` and `time_wait_exit` (built by `crate::time_wait`).

use std::net::SocketAddr;

use serde::Serialize;

use super::ip_string;
use crate::names::family_name;

/// The connection a timewait socket stands for: the part both records start with.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Flow {
    /// The timewait socket's kernel address, as `tcp_state`'s `sk` (`null`
    /// when sock_diag found it).
    pub sk: Option<String>,
    pub netns: u32,
    pub family: crate::names::Name,
    pub saddr: String,
    pub sport: u16,
    pub daddr: String,
    pub dport: u16,
    /// Both ends, typed.
    #[serde(skip)]
    pub src: SocketAddr,
    #[serde(skip)]
    pub dst: SocketAddr,
}

impl Flow {
    pub fn new(sk: Option<u64>, netns: u32, src: SocketAddr, dst: SocketAddr) -> Flow {
        Flow {
            sk: sk.map(|a| format!("{a:#x}")),
            netns,
            family: family_name(if src.is_ipv4() { 2 } else { 10 }),
            saddr: ip_string(src.ip()),
            sport: src.port(),
            daddr: ip_string(dst.ip()),
            dport: dst.port(),
            src,
            dst,
        }
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
    /// When it happened (the line's `ts`).
    #[serde(skip)]
    pub ktime_ns: u64,
    #[serde(flatten)]
    pub flow: Flow,
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
    /// When it happened (the line's `ts`).
    #[serde(skip)]
    pub ktime_ns: u64,
    #[serde(flatten)]
    pub flow: Flow,
    /// From the close to the end; `null` for sockets that predate the observer.
    pub held_ms: Option<u64>,
    /// `expired` (the timer ran out), `reused` (a new connection took the
    /// 4-tuple) or `killed` (deleted early: an RST, its namespace went).
    pub reason: &'static str,
    pub preexisting: bool,
    pub sock_cookie: Option<u64>,
}
