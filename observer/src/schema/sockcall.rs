//! `listen` and `connect` failures.

use std::{net::SocketAddr, sync::Arc};

use observer_common::{
    SockCallRecord,
    sockcall::{Call, flags},
};
use serde::Serialize;

use super::{Event, Explain, Process, ip_from, ip_string, sockaddr_target};
use crate::names::{Name, errno_of_ret, family_name};

#[derive(Serialize, Debug, Clone)]
pub struct SockCall {
    #[serde(flatten)]
    pub process: Process,
    pub fd: i32,
    pub family: Option<Name>,
    /// The socket's local end (`lport: 0` when it had no port yet).
    pub laddr: Option<String>,
    pub lport: Option<u16>,
    /// connect's destination.
    pub daddr: Option<String>,
    pub dport: Option<u16>,
    pub ret: i64,
    pub errno: Option<Name>,
    /// Time in the syscall, where its start was seen; `null` otherwise.
    pub latency_ns: Option<u64>,
    /// On a listen() EADDRINUSE: who holds the port, which rule fired, what would fix it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub explain: Option<Arc<Explain>>,
    /// The local end, typed, for the explainer.
    #[serde(skip)]
    pub local: Option<SocketAddr>,
}

impl Event {
    /// `listen` or `connect`, as the record says.
    pub fn of_call(r: &SockCallRecord) -> Event {
        let c = SockCall::from_record(r);
        if r.call == Call::Listen as u32 {
            Event::Listen(c)
        } else {
            Event::Connect(c)
        }
    }
}

impl SockCall {
    pub fn from_record(r: &SockCallRecord) -> SockCall {
        let local = r.flags & flags::LOCAL != 0;
        let dest = if r.flags & flags::SOCKADDR != 0 {
            sockaddr_target(&r.sockaddr[..(r.addrlen as usize).min(r.sockaddr.len())])
        } else {
            Default::default()
        };
        let family = if local { Some(r.family) } else { dest.family };
        SockCall {
            process: Process::of(&r.task),
            fd: r.fd,
            family: family.map(family_name),
            laddr: local.then(|| ip_string(ip_from(r.family, &r.laddr))),
            local: local.then(|| SocketAddr::new(ip_from(r.family, &r.laddr), r.lport)),
            lport: local.then_some(r.lport),
            daddr: dest.addr,
            dport: dest.port,
            ret: r.ret,
            errno: errno_of_ret(r.ret),
            latency_ns: (r.flags & flags::ENTER != 0)
                .then(|| r.header.ktime_ns.saturating_sub(r.enter_ns)),
            explain: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_exhaustion_shows_destination_and_local_end() {
        let mut r = SockCallRecord::zeroed(Call::Connect);
        r.ret = -99;
        r.flags = flags::LOCAL | flags::SOCKADDR;
        r.family = 2;
        r.laddr[..4].copy_from_slice(&[0, 0, 0, 0]);
        r.addrlen = 16;
        r.sockaddr[..2].copy_from_slice(&2u16.to_ne_bytes());
        r.sockaddr[2..4].copy_from_slice(&8080u16.to_be_bytes());
        r.sockaddr[4..8].copy_from_slice(&[127, 0, 0, 1]);
        let Event::Connect(c) = Event::of_call(&r) else {
            panic!("a connect record")
        };
        assert_eq!(c.errno.as_deref(), Some("EADDRNOTAVAIL"));
        assert_eq!((c.laddr.as_deref(), c.lport), (Some("0.0.0.0"), Some(0)));
        assert_eq!(
            (c.daddr.as_deref(), c.dport),
            (Some("127.0.0.1"), Some(8080))
        );
    }

    #[test]
    fn listen_without_local_end() {
        let mut r = SockCallRecord::zeroed(Call::Listen);
        r.ret = -98;
        let Event::Listen(c) = Event::of_call(&r) else {
            panic!("a listen record")
        };
        assert_eq!((c.family, c.laddr, c.daddr), (None, None, None));
        assert_eq!(c.errno.as_deref(), Some("EADDRINUSE"));
    }
}
