//! Schema v1 records, built from kernel records and serialized as JSON Lines.

use std::{net::SocketAddr, sync::Arc};

use observer_common::{BindRecord, bind::flags};
use serde::Serialize;

use super::{Explain, Process, Target, sockaddr_target};
use crate::names::{Name, errno_of_ret, family_name, proto_name};

#[derive(Serialize, Debug, Clone)]
pub struct Bind {
    #[serde(flatten)]
    pub process: Process,
    pub fd: i32,
    pub family: Option<Name>,
    pub proto: Option<Name>,
    pub addr: Option<String>,
    pub port: Option<u16>,
    pub bound_port: Option<u16>,
    pub options: BindOptions,
    pub ret: i64,
    pub errno: Option<Name>,
    /// Time in the syscall, where its start was seen (kernels that need the
    /// entry tracepoint); `null` otherwise.
    pub latency_ns: Option<u64>,
    /// The socket's cookie, where the kernel had given it one.
    pub sock_cookie: Option<u64>,
    /// The socket's inode (`ss -e`'s `ino:`): always there for a socket.
    pub sock_ino: Option<u64>,
    /// On EADDRINUSE: who holds the port, which rule fired, what would fix it
    /// (shared by the failures of a storm explained by one lookup).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub explain: Option<Arc<Explain>>,
    /// For the explainer, typed: the IP protocol of a TCP or UDP socket and
    /// the address it asked for.
    #[serde(skip)]
    pub request: Option<(u8, SocketAddr)>,
}

/// `null` where the kernel did not let the hook read the option, never a guessed `false`.
#[derive(Serialize, Debug, Default, Clone, PartialEq, Eq)]
pub struct BindOptions {
    pub reuseaddr: Option<bool>,
    pub reuseport: Option<bool>,
    /// IP_FREEBIND, IP_TRANSPARENT, IP_BIND_ADDRESS_NO_PORT, from `inet_sock`'s bits.
    pub freebind: Option<bool>,
    pub transparent: Option<bool>,
    pub bind_address_no_port: Option<bool>,
    pub bound_dev_if: Option<u32>,
}

impl Bind {
    pub fn from_record(r: &BindRecord) -> Bind {
        let socket = r.flags & flags::SOCKET != 0;
        let inet = socket && matches!(i32::from(r.family), libc::AF_INET | libc::AF_INET6);
        let target = if r.flags & flags::SOCKADDR != 0 {
            let len = (r.addrlen as usize).min(r.sockaddr.len());
            requested(&r.sockaddr[..len], inet.then_some(r.family))
        } else {
            Target::default()
        };
        let flag = |known: u32, set: u32| (r.flags & known != 0).then_some(r.flags & set != 0);
        Bind {
            process: Process::of(&r.task),
            fd: r.fd,
            family: target.family.map(family_name),
            proto: inet.then(|| proto_name(r.sock_type, r.protocol)),
            addr: target.addr,
            port: target.port,
            bound_port: (r.flags & flags::BOUND_PORT != 0).then_some(r.bound_port),
            options: BindOptions {
                reuseaddr: flag(flags::REUSEADDR_KNOWN, flags::REUSEADDR),
                reuseport: flag(flags::REUSEPORT_KNOWN, flags::REUSEPORT),
                freebind: flag(flags::INET_FLAGS_KNOWN, flags::FREEBIND),
                transparent: flag(flags::INET_FLAGS_KNOWN, flags::TRANSPARENT),
                bind_address_no_port: flag(flags::INET_FLAGS_KNOWN, flags::BIND_ADDRESS_NO_PORT),
                bound_dev_if: (r.flags & flags::BOUND_DEV_IF_KNOWN != 0).then_some(r.bound_dev_if),
            },
            ret: r.ret,
            errno: errno_of_ret(r.ret),
            latency_ns: (r.flags & flags::ENTER != 0)
                .then(|| r.header.ktime_ns.saturating_sub(r.enter_ns)),
            sock_cookie: (socket && r.sock_cookie != 0).then_some(r.sock_cookie),
            sock_ino: (socket && r.sock_ino != 0).then_some(r.sock_ino),
            explain: None,
            request: match (inet, i32::from(r.sock_type), i32::from(r.protocol)) {
                (true, libc::SOCK_STREAM, libc::IPPROTO_TCP)
                | (true, libc::SOCK_DGRAM, libc::IPPROTO_UDP) => target
                    .ip
                    .zip(target.port)
                    .map(|(ip, port)| (r.protocol as u8, SocketAddr::new(ip, port))),
                _ => None,
            },
        }
    }
}

/// What the caller asked for, from its sockaddr. An inet socket accepts
/// AF_UNSPEC with INADDR_ANY as AF_INET (`inet_bind`): read it as such.
fn requested(sa: &[u8], inet_family: Option<u16>) -> Target {
    let unspec = sa.len() >= 2 && u16::from_ne_bytes([sa[0], sa[1]]) == libc::AF_UNSPEC as u16;
    if unspec && inet_family == Some(libc::AF_INET as u16) {
        let mut as_inet = sa.to_vec();
        as_inet[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        let t = sockaddr_target(&as_inet);
        return Target {
            family: Some(libc::AF_UNSPEC as u16),
            ..t
        };
    }
    sockaddr_target(sa)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::{
        clock::Clock,
        schema::{Event, Line},
    };

    fn sockaddr_in(r: &mut BindRecord, ip: [u8; 4], port: u16) {
        r.sockaddr[..2].copy_from_slice(&2u16.to_ne_bytes());
        r.sockaddr[2..4].copy_from_slice(&port.to_be_bytes());
        r.sockaddr[4..8].copy_from_slice(&ip);
        r.addrlen = 16;
        r.flags |= flags::SOCKADDR;
    }

    /// A failed TCP bind of 127.0.0.1:5700, as the exit program records it.
    fn tcp_v4() -> BindRecord {
        let mut r = BindRecord::zeroed();
        r.header.ktime_ns = 2_000;
        r.task.pid_tgid = (1234 << 32) | 1240;
        r.task.uid_gid = (100 << 32) | 1000;
        r.task.cgroup_id = 77;
        r.task.netns = 4026531840;
        r.task.comm[..6].copy_from_slice(b"server");
        r.fd = 3;
        r.family = 2;
        r.sock_type = 1;
        r.protocol = 6;
        r.sock_cookie = 4096;
        r.sock_ino = 55;
        r.ret = -98;
        r.flags = flags::SOCKET
            | flags::REUSEADDR_KNOWN
            | flags::REUSEPORT_KNOWN
            | flags::REUSEPORT
            | flags::BOUND_DEV_IF_KNOWN
            | flags::INET_FLAGS_KNOWN
            | flags::FREEBIND;
        sockaddr_in(&mut r, [127, 0, 0, 1], 5700);
        r
    }

    #[test]
    fn failed_tcp_bind_json_shape() {
        let r = tcp_v4();
        let line = Line::at(
            &Clock::with_offset(1_700_000_000_000_000_000),
            r.header.ktime_ns,
            Event::Bind(Bind::from_record(&r)),
        );
        let json = serde_json::to_value(line).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "v": 1, "ts": "2023-11-14T22:13:20.000002000Z", "event": "bind",
                "pid": 1234, "tid": 1240, "comm": "server", "uid": 1000, "cgroup_id": 77, "cgroup": null, "container_id": null,
                "unit": null, "ppid": null, "cmdline": null,
                "netns": 4026531840u32, "fd": 3, "family": "inet", "proto": "tcp",
                "addr": "127.0.0.1", "port": 5700, "bound_port": null,
                "options": {"reuseaddr": false, "reuseport": true, "freebind": true,
                            "transparent": false, "bind_address_no_port": false, "bound_dev_if": 0},
                "ret": -98, "errno": "EADDRINUSE", "latency_ns": null, "sock_cookie": 4096, "sock_ino": 55
            })
        );
    }

    #[test]
    fn ephemeral_port_is_the_bound_port_and_latency_from_the_entry() {
        let mut r = tcp_v4();
        sockaddr_in(&mut r, [127, 0, 0, 1], 0);
        r.ret = 0;
        r.bound_port = 41000;
        r.enter_ns = 1_500;
        r.flags |= flags::BOUND_PORT | flags::ENTER;
        let b = Bind::from_record(&r);
        assert_eq!(
            (b.port, b.bound_port, b.errno, b.latency_ns),
            (Some(0), Some(41000), None, Some(500))
        );
    }

    #[test]
    fn what_the_caller_asked_for_whatever_the_socket() {
        // A sockaddr_in6 passed to an AF_INET socket (EAFNOSUPPORT follows).
        let mut r = tcp_v4();
        r.sockaddr = [0; 128];
        r.sockaddr[..2].copy_from_slice(&10u16.to_ne_bytes());
        r.sockaddr[2..4].copy_from_slice(&5700u16.to_be_bytes());
        r.sockaddr[8..24].copy_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
        r.addrlen = 28;
        r.ret = -97;
        let b = Bind::from_record(&r);
        assert_eq!(
            (b.family.as_deref(), b.addr.as_deref(), b.port),
            (Some("inet6"), Some("::1"), Some(5700))
        );
        assert_eq!(b.errno.as_deref(), Some("EAFNOSUPPORT"));
        // AF_UNSPEC on an inet socket reads as AF_INET, as inet_bind does.
        let mut r = tcp_v4();
        r.sockaddr[..2].copy_from_slice(&0u16.to_ne_bytes());
        let b = Bind::from_record(&r);
        assert_eq!(
            (b.family.as_deref(), b.addr.as_deref()),
            (Some("unspec"), Some("127.0.0.1"))
        );
    }

    #[test]
    fn not_a_socket_has_unknown_options_and_the_raw_address() {
        let mut r = BindRecord::zeroed();
        r.ret = -9;
        sockaddr_in(&mut r, [10, 0, 0, 1], 8080);
        let b = Bind::from_record(&r);
        assert_eq!(b.errno.as_deref(), Some("EBADF"));
        assert_eq!(
            (b.family.as_deref(), b.addr.as_deref(), b.port),
            (Some("inet"), Some("10.0.0.1"), Some(8080))
        );
        assert_eq!(b.proto, None);
        assert_eq!(b.options, BindOptions::default());
        assert_eq!(
            (b.sock_cookie, b.sock_ino, b.bound_port, b.process.netns),
            (None, None, None, None)
        );
    }
}
