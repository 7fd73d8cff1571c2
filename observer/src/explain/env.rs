//! What the kernel looks at before the port, read from one network namespace:
//! its interfaces and their addresses, and the sysctls that relax the checks
//! (`ip_nonlocal_bind`, `ip_unprivileged_port_start`). Read on a thread that
//! enters the namespace, since addresses and `/proc/sys/net` answer for the
//! reader's own namespace.

use std::{
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr},
};

use nix::{net::if_::InterfaceFlags, sched::CloneFlags};

/// One address of an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IfAddr {
    pub ifindex: u32,
    pub addr: IpAddr,
    /// The prefix length (what the netmask says).
    pub prefix: u8,
    pub loopback: bool,
    /// IPv4 broadcast address of the interface, if any.
    pub broadcast: Option<Ipv4Addr>,
}

/// A network namespace as the bind checks see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Env {
    /// Interfaces by name, with their index (for `fe80::1%eth0`).
    pub interfaces: Vec<(String, u32)>,
    pub addrs: Vec<IfAddr>,
    /// `net.ipv4.ip_nonlocal_bind`, `net.ipv6.ip_nonlocal_bind`.
    pub nonlocal_bind_v4: bool,
    pub nonlocal_bind_v6: bool,
    /// `net.ipv4.ip_unprivileged_port_start` (ports below it need CAP_NET_BIND_SERVICE).
    pub unprivileged_port_start: u16,
    /// `net.ipv4.ip_local_port_range`: where bind(0) and connect() pick a port.
    pub local_port_range: (u16, u16),
}

impl Default for Env {
    /// Linux's defaults, with only loopback: for tests.
    fn default() -> Env {
        Env {
            interfaces: vec![("lo".into(), 1)],
            addrs: vec![
                IfAddr {
                    ifindex: 1,
                    addr: Ipv4Addr::LOCALHOST.into(),
                    prefix: 8,
                    loopback: true,
                    broadcast: None,
                },
                IfAddr {
                    ifindex: 1,
                    addr: std::net::Ipv6Addr::LOCALHOST.into(),
                    prefix: 128,
                    loopback: true,
                    broadcast: None,
                },
            ],
            nonlocal_bind_v4: false,
            nonlocal_bind_v6: false,
            unprivileged_port_start: 1024,
            local_port_range: (32768, 60999),
        }
    }
}

impl Env {
    /// The calling thread's own network namespace.
    pub fn here() -> io::Result<Env> {
        let mut addrs = Vec::new();
        let mut interfaces: Vec<(String, u32)> = Vec::new();
        for ifa in nix::ifaddrs::getifaddrs().map_err(io::Error::from)? {
            let Ok(index) = nix::net::if_::if_nametoindex(ifa.interface_name.as_str()) else {
                continue;
            };
            if !interfaces.iter().any(|(n, _)| *n == ifa.interface_name) {
                interfaces.push((ifa.interface_name.clone(), index));
            }
            let Some(addr) = ifa.address.as_ref().and_then(ip_of) else {
                continue;
            };
            let prefix = ifa.netmask.as_ref().and_then(ip_of).map_or(0, |m| match m {
                IpAddr::V4(m) => u32::from(m).count_ones() as u8,
                IpAddr::V6(m) => u128::from(m).count_ones() as u8,
            });
            let broadcast = ifa
                .broadcast
                .as_ref()
                .and_then(ip_of)
                .and_then(|b| match b {
                    IpAddr::V4(b) => Some(b),
                    IpAddr::V6(_) => None,
                });
            addrs.push(IfAddr {
                ifindex: index,
                addr,
                prefix,
                loopback: ifa.flags.contains(InterfaceFlags::IFF_LOOPBACK),
                broadcast,
            });
        }
        let sysctl = |name: &str| {
            std::fs::read_to_string(format!("/proc/sys/net/{name}"))
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
        };
        Ok(Env {
            interfaces,
            addrs,
            nonlocal_bind_v4: sysctl("ipv4/ip_nonlocal_bind").unwrap_or(0) != 0,
            nonlocal_bind_v6: sysctl("ipv6/ip_nonlocal_bind").unwrap_or(0) != 0,
            unprivileged_port_start: sysctl("ipv4/ip_unprivileged_port_start")
                .map_or(1024, |p| p.min(65536) as u16),
            local_port_range: std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
                .ok()
                .and_then(|s| parse_range(&s))
                .unwrap_or((32768, 60999)),
        })
    }

    /// The namespace behind `netns` (an open nsfs file), from a thread that enters it.
    pub fn of(netns: &File) -> io::Result<Env> {
        std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(netns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
                Env::here()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("reading the namespace panicked")))
        })
    }

    /// The index of interface `name`.
    pub fn ifindex(&self, name: &str) -> Option<u32> {
        self.interfaces
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, i)| *i)
    }

    /// Whether the kernel treats `addr` as one of this namespace's own for a
    /// bind (`inet_addr_type` LOCAL or BROADCAST, `ipv6_chk_addr`): an address
    /// of an interface (of `ifindex` when the bind names one), any address in
    /// a loopback interface's IPv4 prefix (127.0.0.0/8), a broadcast address.
    pub fn is_local(&self, addr: IpAddr, ifindex: Option<u32>) -> bool {
        self.addrs.iter().any(|a| {
            let on_dev = ifindex.is_none_or(|i| i == a.ifindex);
            match (addr, a.addr) {
                (IpAddr::V4(x), IpAddr::V4(y)) => {
                    x == y
                        || a.broadcast == Some(x)
                        || x.is_broadcast()
                        || (a.loopback && in_prefix(u32::from(x), u32::from(y), a.prefix))
                }
                (IpAddr::V6(x), IpAddr::V6(y)) => on_dev && x == y,
                _ => false,
            }
        })
    }
}

/// `ip_local_port_range`'s "LOW\tHIGH".
fn parse_range(s: &str) -> Option<(u16, u16)> {
    let mut it = s.split_whitespace().map(|p| p.parse::<u16>().ok());
    Some((it.next()??, it.next()??))
}

fn in_prefix(x: u32, net: u32, prefix: u8) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    };
    x & mask == net & mask
}

fn ip_of(s: &nix::sys::socket::SockaddrStorage) -> Option<IpAddr> {
    if let Some(v4) = s.as_sockaddr_in() {
        return Some(IpAddr::V4(v4.ip()));
    }
    s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_prefix_and_exact_v6() {
        let env = Env::default();
        assert!(env.is_local("127.0.0.1".parse().unwrap(), None));
        assert!(env.is_local("127.3.2.1".parse().unwrap(), None));
        assert!(!env.is_local("192.0.2.1".parse().unwrap(), None));
        assert!(env.is_local("::1".parse().unwrap(), None));
        assert!(env.is_local("::1".parse().unwrap(), Some(1)));
        assert!(!env.is_local("::1".parse().unwrap(), Some(2)));
        assert!(!env.is_local("fe80::1".parse().unwrap(), Some(1)));
        assert_eq!(env.ifindex("lo"), Some(1));
    }

    #[test]
    fn port_ranges_as_the_kernel_writes_them() {
        assert_eq!(parse_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_range("40000 40003"), Some((40000, 40003)));
        assert_eq!(parse_range("x"), None);
    }

    #[test]
    fn this_namespace_has_loopback() {
        let env = Env::here().unwrap();
        assert!(env.ifindex("lo").is_some(), "{env:?}");
    }
}
