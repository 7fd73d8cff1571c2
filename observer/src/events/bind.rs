//! Schema v1 records, built from kernel records and serialized as JSON Lines.

use std::net::{Ipv4Addr, Ipv6Addr};

use observer_common::{BindRecord, bind::flags};
use serde::Serialize;

use super::{SCHEMA_VERSION, Target, c_str, sockaddr_target};
use crate::{
    clock::Clock,
    names::{errno_of_ret, family_name, proto_name},
};

#[derive(Serialize, Debug)]
pub struct Bind {
    pub v: u8,
    pub ts: String,
    pub event: &'static str,
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub uid: u32,
    pub cgroup_id: u64,
    /// The cgroup2 path of `cgroup_id`, and the container id it names, if any.
    pub cgroup: Option<String>,
    pub container_id: Option<String>,
    pub netns: Option<u32>,
    pub fd: i32,
    pub family: Option<String>,
    pub proto: Option<String>,
    pub addr: Option<String>,
    pub port: Option<u16>,
    pub bound_port: Option<u16>,
    pub options: BindOptions,
    pub ret: i64,
    pub errno: Option<String>,
    pub latency_ns: u64,
    pub sock_cookie: Option<u64>,
    /// On EADDRINUSE: who holds the port, which rule fired, what would fix it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub explain: Option<crate::explain::rules::Explain>,
}

/// `null` where the kernel did not let the hook read the option, never a guessed `false`.
#[derive(Serialize, Debug, Default, PartialEq, Eq)]
pub struct BindOptions {
    pub reuseaddr: Option<bool>,
    pub reuseport: Option<bool>,
    /// `bpf_getsockopt` in `cgroup/bind*` refuses IP_FREEBIND, IP_TRANSPARENT and
    /// IP_BIND_ADDRESS_NO_PORT: these stay `null` until a hook can read them.
    pub freebind: Option<bool>,
    pub transparent: Option<bool>,
    pub bind_address_no_port: Option<bool>,
    pub bound_dev_if: Option<u32>,
}

impl Bind {
    pub fn from_record(r: &BindRecord, clock: &Clock) -> Bind {
        let hooked = r.flags & flags::CGROUP_HOOK != 0;
        let target = if hooked {
            hook_target(r)
        } else if r.flags & flags::SOCKADDR != 0 {
            let len = (r.addrlen as usize).min(r.sockaddr.len());
            sockaddr_target(&r.sockaddr[..len])
        } else {
            Target::default()
        };
        let flag = |known: u32, set: u32| (r.flags & known != 0).then_some(r.flags & set != 0);
        Bind {
            v: SCHEMA_VERSION,
            ts: clock.rfc3339(r.header.ktime_ns).to_string(),
            event: "bind",
            pid: (r.pid_tgid >> 32) as u32,
            tid: r.pid_tgid as u32,
            comm: c_str(&r.comm),
            uid: r.uid_gid as u32,
            cgroup_id: r.cgroup_id,
            cgroup: None,
            container_id: None,
            netns: (r.netns != 0).then_some(r.netns),
            fd: r.fd,
            family: target.family.map(family_name),
            proto: hooked.then(|| proto_name(r.sock_type, r.protocol)),
            addr: target.addr,
            port: target.port,
            bound_port: (r.flags & flags::POST_BIND != 0).then_some(r.bound_port),
            options: BindOptions {
                reuseaddr: flag(flags::REUSEADDR_KNOWN, flags::REUSEADDR),
                reuseport: flag(flags::REUSEPORT_KNOWN, flags::REUSEPORT),
                freebind: None,
                transparent: None,
                bind_address_no_port: None,
                bound_dev_if: (r.flags & flags::BOUND_DEV_IF_KNOWN != 0).then_some(r.bound_dev_if),
            },
            ret: r.ret,
            errno: errno_of_ret(r.ret),
            latency_ns: r.header.ktime_ns.saturating_sub(r.enter_ns),
            sock_cookie: hooked.then_some(r.sock_cookie),
            explain: None,
        }
    }
}

/// The address as the cgroup hook saw it. The hook is chosen by the socket's
/// family; a sockaddr of another family (EAFNOSUPPORT follows) has no address
/// the hook could read, but its port sits at the same offset in both.
fn hook_target(r: &BindRecord) -> Target {
    let v6_hook = r.flags & flags::CGROUP_HOOK_V6 != 0;
    let addr = match (i32::from(r.family), v6_hook) {
        // AF_UNSPEC with INADDR_ANY is accepted as AF_INET by inet_bind.
        (libc::AF_INET | libc::AF_UNSPEC, false) => {
            Some(Ipv4Addr::from(<[u8; 4]>::try_from(&r.addr[..4]).unwrap()).to_string())
        }
        (libc::AF_INET6, true) => Some(Ipv6Addr::from(r.addr).to_string()),
        _ => None,
    };
    Target {
        family: Some(r.family),
        addr,
        port: Some(r.port),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clock() -> Clock {
        Clock::with_offset(1_700_000_000_000_000_000)
    }

    fn hooked_v4() -> BindRecord {
        let mut r = BindRecord::zeroed();
        r.header.ktime_ns = 2_000;
        r.enter_ns = 1_500;
        r.pid_tgid = (1234 << 32) | 1240;
        r.uid_gid = (100 << 32) | 1000;
        r.cgroup_id = 77;
        r.netns = 4026531840;
        r.fd = 3;
        r.family = 2;
        r.sock_type = 1;
        r.protocol = 6;
        r.port = 5700;
        r.addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        r.comm[..6].copy_from_slice(b"server");
        r.sock_cookie = 4096;
        r.ret = -98;
        r.flags = flags::ENTER
            | flags::CGROUP_HOOK
            | flags::REUSEADDR_KNOWN
            | flags::REUSEPORT_KNOWN
            | flags::REUSEPORT
            | flags::BOUND_DEV_IF_KNOWN;
        r
    }

    #[test]
    fn failed_tcp_bind_json_shape() {
        let json = serde_json::to_value(Bind::from_record(&hooked_v4(), &clock())).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "v": 1, "ts": "2023-11-14T22:13:20.000002000Z", "event": "bind",
                "pid": 1234, "tid": 1240, "comm": "server", "uid": 1000, "cgroup_id": 77, "cgroup": null, "container_id": null,
                "netns": 4026531840u32, "fd": 3, "family": "inet", "proto": "tcp",
                "addr": "127.0.0.1", "port": 5700, "bound_port": null,
                "options": {"reuseaddr": false, "reuseport": true, "freebind": null,
                            "transparent": null, "bind_address_no_port": null, "bound_dev_if": 0},
                "ret": -98, "errno": "EADDRINUSE", "latency_ns": 500, "sock_cookie": 4096
            })
        );
    }

    #[test]
    fn ephemeral_port_is_the_bound_port() {
        let mut r = hooked_v4();
        r.port = 0;
        r.ret = 0;
        r.bound_port = 41000;
        r.flags |= flags::POST_BIND;
        let b = Bind::from_record(&r, &clock());
        assert_eq!(
            (b.port, b.bound_port, b.errno),
            (Some(0), Some(41000), None)
        );
    }

    #[test]
    fn ipv6_from_hook() {
        let mut r = hooked_v4();
        r.family = 10;
        r.flags |= flags::CGROUP_HOOK_V6;
        r.addr = std::net::Ipv6Addr::LOCALHOST.octets();
        assert_eq!(Bind::from_record(&r, &clock()).addr.as_deref(), Some("::1"));
    }

    #[test]
    fn foreign_family_in_bind4_has_no_address() {
        let mut r = hooked_v4();
        r.family = 10; // a sockaddr_in6 passed to an AF_INET socket
        r.ret = -97;
        let b = Bind::from_record(&r, &clock());
        assert_eq!(
            (b.family.as_deref(), b.addr, b.port),
            (Some("inet6"), None, Some(5700))
        );
        assert_eq!(b.errno.as_deref(), Some("EAFNOSUPPORT"));
    }

    #[test]
    fn unhooked_bind_has_unknown_options_and_raw_address() {
        let mut r = BindRecord::zeroed();
        r.ret = -9;
        r.flags = flags::ENTER | flags::SOCKADDR;
        r.addrlen = 16;
        r.sockaddr[..2].copy_from_slice(&2u16.to_ne_bytes());
        r.sockaddr[2..4].copy_from_slice(&8080u16.to_be_bytes());
        r.sockaddr[4..8].copy_from_slice(&[10, 0, 0, 1]);
        let b = Bind::from_record(&r, &clock());
        assert_eq!(b.errno.as_deref(), Some("EBADF"));
        assert_eq!(
            (b.family.as_deref(), b.addr.as_deref(), b.port),
            (Some("inet"), Some("10.0.0.1"), Some(8080))
        );
        assert_eq!(b.proto, None);
        assert_eq!(b.options, BindOptions::default());
        assert_eq!((b.sock_cookie, b.bound_port, b.netns), (None, None, None));
    }
}
