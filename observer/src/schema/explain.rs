//! The `explain` part of a failing bind or listen: which rule fired, a hint,
//! and the sockets that hold the port. The rules engine (`explain::rules`)
//! fills it; this is only its shape in the stream.

use std::net::SocketAddr;

use serde::Serialize;

/// A socket already on the port, as sock_diag shows it, with its options where known.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Holder {
    pub proto: &'static str,
    /// `LISTEN`, `TIME_WAIT`, `ESTABLISHED`, `BOUND` (bound, neither listening
    /// nor connected), `UDP`, …
    pub state: &'static str,
    pub addr: String,
    pub port: u16,
    pub raddr: String,
    pub rport: u16,
    pub uid: u32,
    /// `None`: the kernel did not tell, and the observer did not see it set.
    pub reuseaddr: Option<bool>,
    pub reuseport: Option<bool>,
    pub v6only: Option<bool>,
    pub expires_ms: Option<u32>,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    /// The owner's command line (at most 256 bytes), systemd unit, and how
    /// long it has run: who to stop, in words a person knows.
    pub cmdline: Option<String>,
    pub unit: Option<String>,
    pub container_id: Option<String>,
    pub running_s: Option<u64>,
    pub sock_cookie: u64,
    #[serde(skip)]
    pub inode: u32,
    #[serde(skip)]
    pub local: SocketAddr,
    #[serde(skip)]
    pub state_num: u8,
    #[serde(skip)]
    pub proto_num: u8,
}

/// Why a bind cannot succeed: a stable id for tools that aggregate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// Only TIME_WAIT sockets hold the port, and SO_REUSEADDR is not on both sides.
    TimeWaitWithoutReuseaddr,
    /// A wildcard address (0.0.0.0, ::) and a specific one on the same port.
    WildcardOverlap,
    /// An IPv6 `::` socket without IPV6_V6ONLY covers every IPv4 address too.
    DualStackOverlap,
    /// The same address, held by a listener.
    ListenerConflict,
    /// The same address, held by a socket that does not listen; SO_REUSEADDR is missing.
    ReuseaddrMissing,
    /// Sharing through SO_REUSEPORT, but not every socket sets it.
    ReuseportMissing,
    /// SO_REUSEPORT on both, but the sockets belong to different uids.
    ReuseportUidMismatch,
    /// UDP: the same address without SO_REUSEADDR/SO_REUSEPORT on both.
    UdpConflict,
    /// Nothing holds the port now (it was released between the failure and the lookup).
    NoBlocker,
    /// EADDRNOTAVAIL: the address belongs to no interface of the namespace.
    AddressNotLocal,
    /// EINVAL: an IPv6 link-local address without the interface it is on.
    LinkLocalNeedsScope,
    /// EACCES: a port below `ip_unprivileged_port_start` without CAP_NET_BIND_SERVICE.
    PrivilegedPort,
    /// Nothing found, on a kernel whose sock_diag cannot list sockets that are
    /// bound but not listening (before 6.3): one of those may hold the port.
    BoundOnlyUnlisted,
    /// bind() to port 0 found no free port: every port of the namespace's
    /// `ip_local_port_range` is in use.
    EphemeralExhausted,
}

impl Rule {
    /// The errno the kernel answers when this rule fires.
    pub fn errno(self) -> &'static str {
        match self {
            Rule::AddressNotLocal => "EADDRNOTAVAIL",
            Rule::LinkLocalNeedsScope => "EINVAL",
            Rule::PrivilegedPort => "EACCES",
            Rule::TimeWaitWithoutReuseaddr
            | Rule::EphemeralExhausted
            | Rule::WildcardOverlap
            | Rule::DualStackOverlap
            | Rule::ListenerConflict
            | Rule::ReuseaddrMissing
            | Rule::ReuseportMissing
            | Rule::ReuseportUidMismatch
            | Rule::UdpConflict
            | Rule::NoBlocker
            | Rule::BoundOnlyUnlisted => "EADDRINUSE",
        }
    }
}

/// The verdict on a request: the blockers, the rule that fired, one sentence of advice.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Explain {
    pub rule: Rule,
    pub hint: String,
    pub blockers: Vec<Holder>,
}
