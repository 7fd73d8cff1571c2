//! Linux's bind conflict rules, as measured (docs/ARCHITECTURE.md, "Bind rules"):
//! given a bind request and the sockets already on its port, which of them
//! block it, by which rule, and what would fix it. Pure logic; the kernel tests
//! check its verdicts against the kernel's answers on every repro step.

use std::net::{IpAddr, SocketAddr};

pub use crate::schema::{Explain, Holder, Rule};

use observer_common::tcp::state::{LISTEN, TIME_WAIT};

pub const TCP: u8 = libc::IPPROTO_TCP as u8;
pub const UDP: u8 = libc::IPPROTO_UDP as u8;

/// A bind about to be made (or that just failed).
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub proto: u8,
    pub addr: IpAddr,
    pub port: u16,
    pub reuseaddr: bool,
    pub reuseport: bool,
    /// IPV6_V6ONLY of an IPv6 socket.
    pub v6only: bool,
    pub uid: u32,
    /// The interface the bind names (`sin6_scope_id`, or SO_BINDTODEVICE).
    pub ifindex: Option<u32>,
    /// IP_FREEBIND or IP_TRANSPARENT: an address that is not (yet) local is allowed.
    pub nonlocal: bool,
}

impl Request {
    /// A plain request: no options, no interface, uid 0.
    pub fn new(proto: u8, addr: IpAddr, port: u16) -> Request {
        Request {
            proto,
            addr,
            port,
            reuseaddr: false,
            reuseport: false,
            v6only: false,
            uid: 0,
            ifindex: None,
            nonlocal: false,
        }
    }
}

/// Does a socket bound to (`a`, `a_v6only`) overlap one bound to (`b`, `b_v6only`)?
pub fn overlaps(a: IpAddr, a_v6only: bool, b: IpAddr, b_v6only: bool) -> bool {
    let (a, b) = (a.to_canonical(), b.to_canonical());
    match (a, b) {
        (IpAddr::V4(x), IpAddr::V4(y)) => x == y || x.is_unspecified() || y.is_unspecified(),
        (IpAddr::V6(x), IpAddr::V6(y)) => x == y || x.is_unspecified() || y.is_unspecified(),
        // IPv4 against IPv6: only a dual-stack `::` covers IPv4 addresses.
        (IpAddr::V6(x), IpAddr::V4(_)) => x.is_unspecified() && !a_v6only,
        (IpAddr::V4(_), IpAddr::V6(y)) => y.is_unspecified() && !b_v6only,
    }
}

/// Whether `h` blocks `r` (the kernel's inet_bind_conflict / udp_lib_lport_inuse,
/// simplified to what the table in docs/ARCHITECTURE.md and the repro scenarios cover).
/// Unknown options count as unset: the verdict is then "probably".
pub fn blocks(r: &Request, h: &Holder) -> bool {
    if h.proto_num != r.proto
        || h.local.port() != r.port
        || !overlaps(r.addr, r.v6only, h.local.ip(), h.v6only.unwrap_or(false))
    {
        return false;
    }
    let ra = r.reuseaddr && h.reuseaddr.unwrap_or(false);
    let rp = r.reuseport && h.reuseport.unwrap_or(false);
    if r.proto == UDP {
        return !(ra || rp && h.uid == r.uid);
    }
    let relaxed = ra && h.state_num != LISTEN;
    let shared = rp && (h.state_num == TIME_WAIT || h.uid == r.uid);
    !(relaxed || shared)
}

/// Who holds a socket, as a person finds it: `python3 (pid 20383:
/// python3 -m http.server 8000, nginx.service, running for 2 h 5 min)`.
fn owner(h: &Holder) -> String {
    match (&h.comm, h.pid) {
        (Some(c), Some(p)) => {
            let about: Vec<String> = [
                h.cmdline.clone(),
                h.unit.clone(),
                h.container_id
                    .as_deref()
                    .map(|c| format!("container {}", &c[..c.len().min(12)])),
                h.running_s.map(|s| format!("running for {}", how_long(s))),
            ]
            .into_iter()
            .flatten()
            .collect();
            if about.is_empty() {
                format!("{c} (pid {p})")
            } else {
                format!("{c} (pid {p}: {})", about.join(", "))
            }
        }
        _ if h.state_num == TIME_WAIT => "the kernel (no owner)".into(),
        _ => "a process the observer could not find".into(),
    }
}

/// `45 s`, `12 min`, `2 h 5 min`, `3 d 4 h`.
fn how_long(s: u64) -> String {
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min", s / 60),
        3600..86400 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", s / 86400, s % 86400 / 3600),
    }
}

fn endpoint(ip: IpAddr, port: u16) -> String {
    SocketAddr::new(ip.to_canonical(), port).to_string()
}

/// `None` when nothing in `holders` blocks the request: the bind would succeed.
pub fn explain(r: &Request, holders: &[Holder]) -> Option<Explain> {
    let blockers: Vec<Holder> = holders.iter().filter(|h| blocks(r, h)).cloned().collect();
    let first = blockers.first()?;
    let port = r.port;
    let n = blockers.len();
    let (rule, hint) = if blockers.iter().all(|h| h.state_num == TIME_WAIT) {
        let wait_s = blockers
            .iter()
            .filter_map(|h| h.expires_ms)
            .max()
            .unwrap_or(60_000)
            .div_ceil(1000);
        let left_by = match (r.reuseaddr, first.reuseaddr) {
            (false, _) => "; the new socket does not set SO_REUSEADDR".to_owned(),
            (true, Some(false)) => {
                " left by a socket without SO_REUSEADDR (they inherit it from the listener that accepted them)".to_owned()
            }
            (true, None) => {
                " (they inherit SO_REUSEADDR from the listener that accepted them, which the observer did not see)".to_owned()
            }
            (true, Some(true)) => String::new(),
        };
        (
            Rule::TimeWaitWithoutReuseaddr,
            format!(
                "port {port} is held by {n} TIME_WAIT socket{}{left_by}; on Linux both the old and the new socket need SO_REUSEADDR, or wait {wait_s} s",
                if n == 1 { "" } else { "s" }
            ),
        )
    } else {
        let h = blockers
            .iter()
            .find(|h| h.state_num != TIME_WAIT)
            .unwrap_or(first);
        let held = format!(
            "{} is held by {} socket of {}",
            endpoint(h.local.ip(), port),
            h.state,
            owner(h)
        );
        let mine_v4 = r.addr.to_canonical().is_ipv4();
        let theirs_v4 = h.local.ip().to_canonical().is_ipv4();
        if r.proto == UDP {
            (
                Rule::UdpConflict,
                format!(
                    "{held}; two UDP sockets share a port only if both set SO_REUSEADDR, or both SO_REUSEPORT with the same uid"
                ),
            )
        } else if r.reuseport && h.reuseport == Some(true) && h.uid != r.uid {
            (
                Rule::ReuseportUidMismatch,
                format!(
                    "{held}; SO_REUSEPORT needs the same uid: the listener belongs to uid {}",
                    h.uid
                ),
            )
        } else if r.reuseport != h.reuseport.unwrap_or(false)
            && (r.reuseport || h.state_num == LISTEN)
        {
            let missing = match (r.reuseport, h.reuseport) {
                (true, None) => {
                    "the existing socket's setting is unknown (it was bound before the observer ran)"
                }
                (true, _) => "the existing socket does not set it",
                (false, _) => "the new socket does not set it",
            };
            (
                Rule::ReuseportMissing,
                format!(
                    "{held}; every socket sharing a port through SO_REUSEPORT must set it, and {missing}"
                ),
            )
        } else if mine_v4 != theirs_v4 {
            (
                Rule::DualStackOverlap,
                format!(
                    "{held}; an IPv6 :: socket without IPV6_V6ONLY also covers every IPv4 address: set IPV6_V6ONLY on it, or bind only one of them"
                ),
            )
        } else if r.addr.to_canonical() != h.local.ip().to_canonical() {
            (
                Rule::WildcardOverlap,
                format!(
                    "{held}; a specific address cannot share a port with a wildcard unless both set SO_REUSEADDR and neither listens"
                ),
            )
        } else if h.state_num == LISTEN {
            (
                Rule::ListenerConflict,
                format!(
                    "{held}; stop it, or bind another port; SO_REUSEPORT on both (same uid) only if the two are meant to share the port"
                ),
            )
        } else {
            (
                Rule::ReuseaddrMissing,
                format!(
                    "{held}; two sockets share an address and port only if both set SO_REUSEADDR and neither listens"
                ),
            )
        }
    };
    Some(Explain {
        rule,
        hint,
        blockers,
    })
}

/// The checks `inet_bind`/`inet6_bind` make before the port, in the kernel's
/// order: IPv4 checks the address, then the port's privilege; IPv6 the
/// privilege, then the link-local scope, then the address. `None`: they pass.
pub fn precheck(r: &Request, env: &super::env::Env) -> Option<Explain> {
    let privileged = || {
        (r.port != 0 && r.port < env.unprivileged_port_start && r.uid != 0).then(|| Explain {
            rule: Rule::PrivilegedPort,
            hint: format!(
                "port {} is below net.ipv4.ip_unprivileged_port_start ({}): uid {} needs CAP_NET_BIND_SERVICE (AmbientCapabilities=CAP_NET_BIND_SERVICE in its systemd unit, or setcap cap_net_bind_service=+ep on the binary), or use a port of {} or above",
                r.port, env.unprivileged_port_start, r.uid, env.unprivileged_port_start
            ),
            blockers: Vec::new(),
        })
    };
    let not_local = |addr: IpAddr, nonlocal_sysctl: &str| Explain {
        rule: Rule::AddressNotLocal,
        hint: format!(
            "{addr} is not an address of any interface in this network namespace; bind {} instead, add the address first, or set IP_FREEBIND on the socket (or {nonlocal_sysctl}=1) to bind an address that is not there yet",
            if addr.is_ipv4() { "0.0.0.0" } else { "::" }
        ),
        blockers: Vec::new(),
    };
    match r.addr {
        IpAddr::V4(a) => {
            let ok = a.is_unspecified()
                || a.is_multicast()
                || r.nonlocal
                || env.nonlocal_bind_v4
                || env.is_local(r.addr, None);
            if !ok {
                return Some(not_local(r.addr, "net.ipv4.ip_nonlocal_bind"));
            }
            privileged()
        }
        IpAddr::V6(a) => {
            if let Some(e) = privileged() {
                return Some(e);
            }
            if let Some(v4) = a.to_ipv4_mapped() {
                let ok = v4.is_unspecified()
                    || v4.is_multicast()
                    || r.nonlocal
                    || env.nonlocal_bind_v4
                    || env.is_local(v4.into(), None);
                return (!ok).then(|| not_local(v4.into(), "net.ipv4.ip_nonlocal_bind"));
            }
            if a.is_unspecified() || a.is_multicast() {
                return None;
            }
            if a.is_unicast_link_local() && r.ifindex.is_none() {
                return Some(Explain {
                    rule: Rule::LinkLocalNeedsScope,
                    hint: format!(
                        "{a} is a link-local address, which exists once per interface: name the interface ([{a}%eth0]:{}, sin6_scope_id) or bind the socket to one first (SO_BINDTODEVICE)",
                        r.port
                    ),
                    blockers: Vec::new(),
                });
            }
            let ok = r.nonlocal || env.nonlocal_bind_v6 || env.is_local(r.addr, r.ifindex);
            (!ok).then(|| not_local(r.addr, "net.ipv6.ip_nonlocal_bind"))
        }
    }
}

/// The whole verdict on a request: the checks before the port, then the port.
pub fn verdict(r: &Request, env: &super::env::Env, holders: &[Holder]) -> Option<Explain> {
    precheck(r, env).or_else(|| explain(r, holders))
}

/// Most blockers an explanation lists.
const LISTED: usize = 10;

/// The explanation of a bind to port 0 that got EADDRINUSE: the kernel found
/// no free port in `range` (`ip_local_port_range`). `holders` are the
/// namespace's sockets of the request's protocol; `None` when they leave a
/// port of the range free for it now (the ports were released since).
pub fn ephemeral_exhausted(r: &Request, range: (u16, u16), holders: &[Holder]) -> Option<Explain> {
    let (low, high) = range;
    let in_range: Vec<&Holder> = holders
        .iter()
        .filter(|h| (low..=high).contains(&h.port))
        .collect();
    // A port is taken for this request when a socket on it blocks it.
    let taken = |port: u16| {
        let at = Request { port, ..r.clone() };
        in_range.iter().any(|h| h.port == port && blocks(&at, h))
    };
    let size = usize::from(high.saturating_sub(low)) + 1;
    if (low..=high).any(|p| !taken(p)) {
        return None;
    }
    let time_wait = in_range.iter().filter(|h| h.state_num == TIME_WAIT).count();
    let mut by_owner: Vec<(String, usize)> = Vec::new();
    for h in &in_range {
        let o = owner(h);
        match by_owner.iter_mut().find(|(k, _)| *k == o) {
            Some((_, n)) => *n += 1,
            None => by_owner.push((o, 1)),
        }
    }
    by_owner.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    let top: Vec<String> = by_owner
        .iter()
        .take(3)
        .map(|(o, n)| format!("{n} by {o}"))
        .collect();
    Some(Explain {
        rule: Rule::EphemeralExhausted,
        hint: format!(
            "bind to port 0 found no free port: all {size} ports of ip_local_port_range {low}-{high} are in use ({} sockets: {}{}); widen the range (sysctl net.ipv4.ip_local_port_range), release sockets, or connect() without bind() (or with IP_BIND_ADDRESS_NO_PORT) so that ports are shared per destination{}",
            in_range.len(),
            top.join(", "),
            if time_wait > 0 {
                format!(", {time_wait} of them in TIME_WAIT")
            } else {
                String::new()
            },
            if time_wait > 0 && !r.reuseaddr {
                "; SO_REUSEADDR on the new socket would not reuse TIME_WAIT ports for bind(0)"
            } else {
                ""
            }
        ),
        blockers: in_range.iter().take(LISTED).map(|h| (*h).clone()).collect(),
    })
}

/// The explanation when the kernel said EADDRINUSE but nothing blocks now.
pub fn no_blocker(port: u16) -> Explain {
    Explain {
        rule: Rule::NoBlocker,
        hint: format!(
            "no socket holds port {port} now: whatever did was released between the failure and the lookup"
        ),
        blockers: Vec::new(),
    }
}

/// Nothing found where the kernel cannot show sockets bound but not listening.
pub fn bound_only_unlisted(port: u16) -> Explain {
    Explain {
        rule: Rule::BoundOnlyUnlisted,
        hint: format!(
            "no socket on port {port} can be seen, and this kernel's sock_diag cannot list sockets that are bound but not listening (Linux 6.3 can): one of those, bound before the observer ran or already closed, likely held it"
        ),
        blockers: Vec::new(),
    }
}

/// The explanation when the port could not be looked at (its namespace is gone).
pub fn lookup_failed(port: u16, e: &std::io::Error) -> Explain {
    Explain {
        rule: Rule::NoBlocker,
        hint: format!("the sockets on port {port} could not be read before they went away: {e}"),
        blockers: Vec::new(),
    }
}

/// Convenience for tests and tables.
#[cfg(test)]
pub fn holder(
    proto: u8,
    state: u8,
    local: &str,
    reuseaddr: bool,
    reuseport: bool,
    uid: u32,
) -> Holder {
    let local: SocketAddr = local.parse().expect("a literal address");
    Holder {
        proto: if proto == UDP { "udp" } else { "tcp" },
        state: crate::names::socket_state_name(proto, state),
        addr: local.ip().to_string(),
        port: local.port(),
        raddr: "0.0.0.0".into(),
        rport: 0,
        uid,
        reuseaddr: Some(reuseaddr),
        reuseport: Some(reuseport),
        v6only: local.is_ipv6().then_some(false),
        expires_ms: (state == TIME_WAIT).then_some(43_000),
        pid: None,
        comm: None,
        cmdline: None,
        unit: None,
        container_id: None,
        running_s: None,
        sock_cookie: 0,
        inode: 0,
        local,
        state_num: state,
        proto_num: proto,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUND: u8 = 13;
    const EST: u8 = 1;

    #[test]
    fn port_zero_fails_when_every_port_of_the_range_is_taken() {
        let r = req(TCP, "127.0.0.1", false, false);
        let mut held: Vec<Holder> = (40000..=40002)
            .map(|p| holder(TCP, EST, &format!("127.0.0.1:{p}"), false, false, 0))
            .collect();
        assert!(
            ephemeral_exhausted(&r, (40000, 40003), &held).is_none(),
            "40003 is free"
        );
        held.push(holder(TCP, TIME_WAIT, "127.0.0.1:40003", false, false, 0));
        // Outside the range: not counted.
        held.push(holder(TCP, LISTEN, "127.0.0.1:8080", false, false, 0));
        let e = ephemeral_exhausted(&r, (40000, 40003), &held).expect("exhausted");
        assert_eq!(e.rule, Rule::EphemeralExhausted);
        assert_eq!(e.blockers.len(), 4);
        assert!(
            e.hint
                .contains("all 4 ports of ip_local_port_range 40000-40003 are in use (4 sockets")
                && e.hint.contains("1 of them in TIME_WAIT"),
            "{}",
            e.hint
        );
        // Another address does not conflict with 127.0.0.1's ports.
        let elsewhere = req(TCP, "127.0.0.2", false, false);
        assert!(ephemeral_exhausted(&elsewhere, (40000, 40003), &held).is_none());
    }

    fn req(proto: u8, addr: &str, reuseaddr: bool, reuseport: bool) -> Request {
        Request {
            reuseaddr,
            reuseport,
            ..Request::new(proto, addr.parse().unwrap(), 5700)
        }
    }

    fn v6only(mut h: Holder) -> Holder {
        h.v6only = Some(true);
        h
    }

    /// (what, holder, request, rule — None when the bind succeeds)
    #[rustfmt::skip]
    fn table() -> Vec<(&'static str, Holder, Request, Option<Rule>)> {
        use Rule::*;
        vec![
            // The table in docs/ARCHITECTURE.md, TCP.
            ("0.0.0.0 then 127.0.0.1", holder(TCP, BOUND, "0.0.0.0:5700", false, false, 0), req(TCP, "127.0.0.1", false, false), Some(WildcardOverlap)),
            ("127.0.0.1 then 0.0.0.0", holder(TCP, BOUND, "127.0.0.1:5700", false, false, 0), req(TCP, "0.0.0.0", false, false), Some(WildcardOverlap)),
            ("127.0.0.1 then 127.0.0.2", holder(TCP, LISTEN, "127.0.0.1:5700", false, false, 0), req(TCP, "127.0.0.2", false, false), None),
            ("wildcard +RA not listening, specific +RA", holder(TCP, BOUND, "0.0.0.0:5700", true, false, 0), req(TCP, "127.0.0.1", true, false), None),
            ("wildcard +RA listening, specific +RA", holder(TCP, LISTEN, "0.0.0.0:5700", true, false, 0), req(TCP, "127.0.0.1", true, false), Some(WildcardOverlap)),
            ("TIME_WAIT without RA, new without", holder(TCP, TIME_WAIT, "127.0.0.1:5700", false, false, 0), req(TCP, "127.0.0.1", false, false), Some(TimeWaitWithoutReuseaddr)),
            ("TIME_WAIT without RA, new with", holder(TCP, TIME_WAIT, "127.0.0.1:5700", false, false, 0), req(TCP, "127.0.0.1", true, false), Some(TimeWaitWithoutReuseaddr)),
            ("TIME_WAIT with RA, new without", holder(TCP, TIME_WAIT, "127.0.0.1:5700", true, false, 0), req(TCP, "127.0.0.1", false, false), Some(TimeWaitWithoutReuseaddr)),
            ("TIME_WAIT with RA, new with", holder(TCP, TIME_WAIT, "127.0.0.1:5700", true, false, 0), req(TCP, "127.0.0.1", true, false), None),
            // Same address.
            ("listener, then the same address", holder(TCP, LISTEN, "127.0.0.1:5700", false, false, 0), req(TCP, "127.0.0.1", false, false), Some(ListenerConflict)),
            ("listener +RA, then +RA", holder(TCP, LISTEN, "127.0.0.1:5700", true, false, 0), req(TCP, "127.0.0.1", true, false), Some(ListenerConflict)),
            ("bound +RA, then without", holder(TCP, BOUND, "127.0.0.1:5700", true, false, 0), req(TCP, "127.0.0.1", false, false), Some(ReuseaddrMissing)),
            ("established child +RA, new +RA", holder(TCP, EST, "127.0.0.1:5700", true, false, 0), req(TCP, "127.0.0.1", true, false), None),
            // IPv6 and dual stack.
            (":: then ::1", holder(TCP, LISTEN, "[::]:5700", false, false, 0), req(TCP, "::1", false, false), Some(WildcardOverlap)),
            ("::1 then 127.0.0.1", holder(TCP, LISTEN, "[::1]:5700", false, false, 0), req(TCP, "127.0.0.1", false, false), None),
            (":: dual-stack then 0.0.0.0", holder(TCP, LISTEN, "[::]:5700", false, false, 0), req(TCP, "0.0.0.0", false, false), Some(DualStackOverlap)),
            (":: V6ONLY then 0.0.0.0", v6only(holder(TCP, LISTEN, "[::]:5700", false, false, 0)), req(TCP, "0.0.0.0", false, false), None),
            ("0.0.0.0 then :: dual-stack", holder(TCP, LISTEN, "0.0.0.0:5700", false, false, 0), req(TCP, "::", false, false), Some(DualStackOverlap)),
            ("0.0.0.0 then :: V6ONLY", holder(TCP, LISTEN, "0.0.0.0:5700", false, false, 0), Request { v6only: true, ..req(TCP, "::", false, false) }, None),
            // SO_REUSEPORT.
            ("RP listener, RP same uid", holder(TCP, LISTEN, "127.0.0.1:5700", false, true, 0), req(TCP, "127.0.0.1", false, true), None),
            ("RP listener, RP other uid", holder(TCP, LISTEN, "127.0.0.1:5700", false, true, 1000), req(TCP, "127.0.0.1", false, true), Some(ReuseportUidMismatch)),
            ("RP listener, then without", holder(TCP, LISTEN, "127.0.0.1:5700", false, true, 0), req(TCP, "127.0.0.1", false, false), Some(ReuseportMissing)),
            ("listener without, then RP", holder(TCP, LISTEN, "127.0.0.1:5700", false, false, 0), req(TCP, "127.0.0.1", false, true), Some(ReuseportMissing)),
            ("RP TIME_WAIT of another uid, RP", holder(TCP, TIME_WAIT, "127.0.0.1:5700", false, true, 1000), req(TCP, "127.0.0.1", false, true), None),
            // UDP.
            ("UDP twice", holder(UDP, 7, "127.0.0.1:5700", false, false, 0), req(UDP, "127.0.0.1", false, false), Some(UdpConflict)),
            ("UDP 0.0.0.0 then 127.0.0.1", holder(UDP, 7, "0.0.0.0:5700", false, false, 0), req(UDP, "127.0.0.1", false, false), Some(UdpConflict)),
            ("UDP both RA", holder(UDP, 7, "127.0.0.1:5700", true, false, 0), req(UDP, "127.0.0.1", true, false), None),
            ("UDP both RP", holder(UDP, 7, "127.0.0.1:5700", false, true, 0), req(UDP, "127.0.0.1", false, true), None),
            ("UDP RP other uid", holder(UDP, 7, "127.0.0.1:5700", false, true, 1000), req(UDP, "127.0.0.1", false, true), Some(UdpConflict)),
            ("UDP RP only first", holder(UDP, 7, "127.0.0.1:5700", false, true, 0), req(UDP, "127.0.0.1", false, false), Some(UdpConflict)),
            // Other protocol or port: never a conflict.
            ("TCP listener, UDP bind", holder(TCP, LISTEN, "127.0.0.1:5700", false, false, 0), req(UDP, "127.0.0.1", false, false), None),
            ("other port", holder(TCP, LISTEN, "127.0.0.1:5701", false, false, 0), req(TCP, "127.0.0.1", false, false), None),
        ]
    }

    #[test]
    fn the_rules_table() {
        for (what, h, r, rule) in table() {
            let got = explain(&r, std::slice::from_ref(&h));
            assert_eq!(got.as_ref().map(|e| e.rule), rule, "{what}: {got:?}");
            if let Some(e) = got {
                assert_eq!(e.blockers, [h], "{what}");
                assert!(!e.hint.is_empty() && !e.hint.contains('\n'), "{what}");
            }
        }
    }

    #[test]
    fn hints_say_what_would_fix_it() {
        let mut tw = holder(TCP, TIME_WAIT, "127.0.0.1:5700", false, false, 0);
        tw.expires_ms = Some(42_100);
        let e = explain(
            &req(TCP, "127.0.0.1", true, false),
            &[tw.clone(), tw.clone(), tw],
        )
        .unwrap();
        assert_eq!(
            e.hint,
            "port 5700 is held by 3 TIME_WAIT sockets left by a socket without SO_REUSEADDR (they inherit it from the listener that accepted them); on Linux both the old and the new socket need SO_REUSEADDR, or wait 43 s"
        );
        let mut nginx = holder(TCP, LISTEN, "0.0.0.0:8080", false, false, 0);
        nginx.port = 8080;
        (nginx.pid, nginx.comm) = (Some(812), Some("nginx".into()));
        let r = Request {
            port: 8080,
            ..req(TCP, "127.0.0.1", false, false)
        };
        let e = explain(&r, &[nginx]).unwrap();
        assert_eq!(
            e.hint,
            "0.0.0.0:8080 is held by LISTEN socket of nginx (pid 812); a specific address cannot share a port with a wildcard unless both set SO_REUSEADDR and neither listens"
        );
        let e = explain(
            &req(TCP, "127.0.0.1", false, true),
            &[holder(TCP, LISTEN, "127.0.0.1:5700", false, true, 1000)],
        )
        .unwrap();
        assert!(
            e.hint
                .ends_with("SO_REUSEPORT needs the same uid: the listener belongs to uid 1000"),
            "{}",
            e.hint
        );
        assert_eq!(no_blocker(5700).blockers, []);
    }

    #[test]
    fn checks_before_the_port_in_the_kernels_order() {
        use super::super::env::Env;
        let env = Env::default();
        let rule = |r: &Request| precheck(r, &env).map(|e| e.rule);
        let r = |addr: &str, port: u16, uid: u32| Request {
            uid,
            ..Request::new(TCP, addr.parse().unwrap(), port)
        };
        assert_eq!(rule(&r("1.2.3.4", 80, 0)), Some(Rule::AddressNotLocal));
        assert_eq!(rule(&r("127.0.0.5", 80, 0)), None, "127.0.0.0/8 is local");
        assert_eq!(rule(&r("0.0.0.0", 80, 1000)), Some(Rule::PrivilegedPort));
        assert_eq!(rule(&r("0.0.0.0", 1024, 1000)), None);
        // IPv4 checks the address first, IPv6 the port first.
        assert_eq!(rule(&r("1.2.3.4", 80, 1000)), Some(Rule::AddressNotLocal));
        assert_eq!(rule(&r("fe80::1", 80, 1000)), Some(Rule::PrivilegedPort));
        assert_eq!(
            rule(&r("fe80::1", 8080, 0)),
            Some(Rule::LinkLocalNeedsScope)
        );
        let scoped = Request {
            ifindex: Some(1),
            ..r("fe80::1", 8080, 0)
        };
        assert_eq!(rule(&scoped), Some(Rule::AddressNotLocal));
        assert_eq!(rule(&r("::ffff:127.0.0.1", 8080, 0)), None);
        assert_eq!(
            rule(&r("::ffff:1.2.3.4", 8080, 0)),
            Some(Rule::AddressNotLocal)
        );
        assert_eq!(
            rule(&r("2001:db8::1", 8080, 0)),
            Some(Rule::AddressNotLocal)
        );
        let freebind = Request {
            nonlocal: true,
            ..r("192.0.2.99", 8080, 0)
        };
        assert_eq!(rule(&freebind), None);
        for e in [
            r("1.2.3.4", 80, 0),
            r("fe80::1", 8080, 0),
            r("0.0.0.0", 80, 1000),
        ] {
            let e = precheck(&e, &env).unwrap();
            assert!(e.hint.len() > 40 && !e.hint.contains('\n'), "{}", e.hint);
            assert_ne!(e.rule.errno(), "EADDRINUSE");
        }
    }

    #[test]
    fn unknown_options_count_as_unset() {
        let mut h = holder(TCP, BOUND, "127.0.0.1:5700", true, false, 0);
        h.reuseaddr = None;
        assert!(blocks(&req(TCP, "127.0.0.1", true, false), &h));
    }
}
