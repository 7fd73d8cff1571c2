//! Ephemeral-port pressure (issue #18): per network namespace, how many ports
//! of its range (`ip_local_port_range` less `ip_local_reserved_ports`) are
//! held per local address and per destination, TCP and UDP apart (each has
//! its ports), and the level each pair is at (below 80 %, 80 %, 95 %).
//!
//! The stream's records only say *when* to count (a namespace with a bind,
//! connect, TCP change or TIME_WAIT record is marked dirty); the count itself
//! is one sock_diag dump per protocol of the sockets in the range, filtered
//! in the kernel (see `worker`): closes of UDP and bound-only TCP sockets make
//! no record, so counting events alone would drift.
//!
//! This module is the counting and the levels, pure (no kernel): the daemon
//! feeds it sock_diag's sockets, `run --repro` feeds it its own sockets to
//! predict the records.

pub mod worker;

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use crate::kernel::sock_diag::{IPPROTO_TCP, IPPROTO_UDP};

/// The levels, in percent of the range: a pair is at the highest it reaches.
pub const LEVELS: [u8; 2] = [80, 95];
/// A pair leaves a level only this many points below it (75 %, 90 %): a pair
/// hovering at a threshold does not flap.
pub const HYSTERESIS: u8 = 5;

/// TCP_LISTEN.
const LISTEN: u8 = 10;

/// The ephemeral range of a namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Range {
    pub low: u16,
    pub high: u16,
    /// `ip_local_reserved_ports`, as inclusive spans (any, in or out of the range).
    pub reserved: Vec<(u16, u16)>,
}

impl Range {
    pub fn new(low: u16, high: u16) -> Range {
        Range {
            low,
            high,
            reserved: Vec::new(),
        }
    }

    /// Whether connect() and bind(0) may pick `port`.
    pub fn picks(&self, port: u16) -> bool {
        (self.low..=self.high).contains(&port)
            && !self.reserved.iter().any(|(a, b)| (*a..=*b).contains(&port))
    }

    /// Reserved ports inside the range.
    pub fn reserved_in(&self) -> u32 {
        (self.low..=self.high)
            .filter(|p| self.reserved.iter().any(|(a, b)| (a..=b).contains(&p)))
            .count() as u32
    }

    /// Ports the kernel may pick.
    pub fn size(&self) -> u32 {
        (u32::from(self.high) + 1).saturating_sub(u32::from(self.low)) - self.reserved_in()
    }
}

/// `ip_local_reserved_ports`: `8080,9000-9100` (empty: none).
pub fn parse_reserved(s: &str) -> Vec<(u16, u16)> {
    s.trim()
        .split(',')
        .filter_map(|part| {
            let part = part.trim();
            match part.split_once('-') {
                Some((a, b)) => Some((a.trim().parse().ok()?, b.trim().parse().ok()?)),
                None => part.parse().ok().map(|p| (p, p)),
            }
        })
        .collect()
}

/// A socket as the count sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sock {
    pub proto: u8,
    pub state: u8,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// Its inode (0: no owner, as TIME_WAIT sockets), to find its process.
    pub inode: u32,
}

impl From<&crate::kernel::sock_diag::InetSock> for Sock {
    fn from(s: &crate::kernel::sock_diag::InetSock) -> Sock {
        Sock {
            proto: s.proto,
            state: s.state,
            src: s.src,
            dst: s.dst,
            inode: s.inode,
        }
    }
}

/// What a count is about.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pair {
    pub proto: u8,
    pub scope: Scope,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// Ports held on this local address (0.0.0.0 and :: stand for every one).
    Local(IpAddr),
    /// Ports of connections to this destination.
    Destination(SocketAddr),
}

impl Pair {
    pub fn proto_name(&self) -> &'static str {
        if self.proto == IPPROTO_UDP {
            "udp"
        } else {
            "tcp"
        }
    }

    pub fn scope_name(&self) -> &'static str {
        match self.scope {
            Scope::Local(_) => "local",
            Scope::Destination(_) => "destination",
        }
    }

    /// The address, and the destination's port.
    pub fn addr(&self) -> (String, Option<u16>) {
        match self.scope {
            Scope::Local(a) => (a.to_string(), None),
            Scope::Destination(d) => (d.ip().to_string(), Some(d.port())),
        }
    }
}

/// One pair's count: distinct ports of the range held, and by which sockets
/// (indices into the sockets counted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Count {
    pub pair: Pair,
    pub in_use: u32,
    pub socks: Vec<usize>,
}

/// IPv4-mapped IPv6 addresses (a dual-stack socket's view) as IPv4.
fn plain(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Every pair of `socks` with ports in `range`, counted:
///
/// - `local A` (A a specific address): ports held by sockets bound on A, and
///   by wildcard sockets, which hold their port on every address (0.0.0.0 for
///   IPv4 addresses; `::` for every address: a dual-stack socket, IPV6_V6ONLY
///   is not told apart);
/// - `local 0.0.0.0`: ports held by any IPv4 socket, or `::` (what
///   bind(0.0.0.0:0) needs free); `local ::`: by any socket (present only when
///   some IPv6 socket is);
/// - `destination D`: ports of connected sockets (any state but LISTEN,
///   TIME_WAIT included) whose peer is D.
///
/// TCP and UDP apart. Sockets on ports outside the range, or reserved, do not
/// count.
pub fn count(socks: &[Sock], range: &Range) -> Vec<Count> {
    #[derive(Default)]
    struct Acc {
        ports: HashSet<u16>,
        socks: Vec<usize>,
    }
    let mut acc: BTreeMap<Pair, Acc> = BTreeMap::new();
    let mut add = |proto: u8, scope: Scope, port: u16, i: usize| {
        let a = acc.entry(Pair { proto, scope }).or_default();
        a.ports.insert(port);
        a.socks.push(i);
    };
    let held: Vec<(usize, &Sock, IpAddr)> = socks
        .iter()
        .enumerate()
        .filter(|(_, s)| range.picks(s.src.port()))
        .map(|(i, s)| (i, s, plain(s.src.ip())))
        .collect();
    // The specific local addresses, and which families have sockets.
    let mut specific: BTreeSet<(u8, IpAddr)> = BTreeSet::new();
    let mut families: BTreeSet<(u8, bool)> = BTreeSet::new();
    for (_, s, ip) in &held {
        if !ip.is_unspecified() {
            specific.insert((s.proto, *ip));
        }
        families.insert((s.proto, ip.is_ipv4()));
    }
    let v4_any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    let v6_any = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
    for &(i, s, ip) in &held {
        let port = s.src.port();
        let p = s.proto;
        if ip.is_unspecified() {
            for (_, a) in specific
                .iter()
                .filter(|(sp, a)| *sp == p && (ip.is_ipv6() || a.is_ipv4()))
            {
                add(p, Scope::Local(*a), port, i);
            }
        } else {
            add(p, Scope::Local(ip), port, i);
        }
        // The wildcards' own pairs.
        if (ip.is_ipv4() || ip == v6_any) && families.contains(&(p, true)) {
            add(p, Scope::Local(v4_any), port, i);
        }
        if families.contains(&(p, false)) {
            add(p, Scope::Local(v6_any), port, i);
        }
        if s.dst.port() != 0 && s.state != LISTEN {
            let d = SocketAddr::new(plain(s.dst.ip()), s.dst.port());
            add(p, Scope::Destination(d), port, i);
        }
    }
    acc.into_iter()
        .map(|(pair, a)| Count {
            pair,
            in_use: a.ports.len() as u32,
            socks: a.socks,
        })
        .collect()
}

/// The level of `in_use` of `size`, from `previous`: up as soon as a
/// threshold is reached, down only `HYSTERESIS` points below it.
pub fn level(in_use: u32, size: u32, previous: u8) -> u8 {
    let at = |threshold: u8| u64::from(in_use) * 100 >= u64::from(threshold) * u64::from(size);
    let up = LEVELS.iter().rev().copied().find(|l| at(*l)).unwrap_or(0);
    if up >= previous || size == 0 {
        return if size == 0 { 0 } else { up };
    }
    let down = LEVELS
        .iter()
        .rev()
        .copied()
        .find(|l| at(l - HYSTERESIS))
        .unwrap_or(0);
    down.min(previous)
}

/// `in_use / size` in percent, one decimal, rounded down.
pub fn percent(in_use: u32, size: u32) -> f64 {
    if size == 0 {
        return 0.0;
    }
    (u64::from(in_use) * 1000 / u64::from(size)) as f64 / 10.0
}

/// The pairs' levels in one namespace (only those above 0 are kept), and what
/// changed at a new count: (pair, in_use, level, previous).
#[derive(Default, Debug, Clone)]
pub struct Levels {
    at: BTreeMap<Pair, u8>,
}

/// A pair whose level changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub pair: Pair,
    pub in_use: u32,
    pub level: u8,
    pub previous: u8,
    /// Index into the counts given.
    pub count: usize,
}

impl Levels {
    /// The levels after `counts` (a whole namespace's, of one range); the
    /// changes, ups and downs, in the pairs' order.
    pub fn update(&mut self, counts: &[Count], size: u32) -> Vec<Change> {
        let mut changes = Vec::new();
        let mut next = BTreeMap::new();
        for (i, c) in counts.iter().enumerate() {
            let previous = self.at.get(&c.pair).copied().unwrap_or(0);
            let l = level(c.in_use, size, previous);
            if l != previous {
                changes.push(Change {
                    pair: c.pair.clone(),
                    in_use: c.in_use,
                    level: l,
                    previous,
                    count: i,
                });
            }
            if l > 0 {
                next.insert(c.pair.clone(), l);
            }
        }
        // Pairs with no socket left: down to nothing.
        for (pair, previous) in &self.at {
            if !counts.iter().any(|c| &c.pair == pair) {
                changes.push(Change {
                    pair: pair.clone(),
                    in_use: 0,
                    level: 0,
                    previous: *previous,
                    count: usize::MAX,
                });
            }
        }
        self.at = next;
        changes
    }

    /// Whether some pair is at 80 % or more.
    pub fn pressed(&self) -> bool {
        !self.at.is_empty()
    }
}

/// The protocols counted.
pub const PROTOS: [u8; 2] = [IPPROTO_TCP, IPPROTO_UDP];

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(src: &str, dst: &str, state: u8) -> Sock {
        Sock {
            proto: IPPROTO_TCP,
            state,
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            inode: 1,
        }
    }

    fn of(counts: &[Count], proto: u8, scope: &str) -> Option<u32> {
        counts
            .iter()
            .find(|c| {
                c.pair.proto == proto && {
                    let (a, p) = c.pair.addr();
                    let name = match p {
                        Some(p) => format!("{} {a}:{p}", c.pair.scope_name()),
                        None => format!("{} {a}", c.pair.scope_name()),
                    };
                    name == scope
                }
            })
            .map(|c| c.in_use)
    }

    const ESTABLISHED: u8 = 1;
    const TIME_WAIT: u8 = 6;
    const CLOSE: u8 = 7;

    #[test]
    fn wildcards_count_for_every_address_and_destinations_apart() {
        let range = Range::new(40000, 40019);
        let socks = [
            tcp("127.0.0.1:40000", "127.0.0.1:7000", ESTABLISHED),
            tcp("127.0.0.1:40001", "127.0.0.1:7000", TIME_WAIT),
            tcp("127.0.0.1:40001", "127.0.0.1:7001", ESTABLISHED),
            tcp("127.0.0.2:40002", "0.0.0.0:0", CLOSE),
            tcp("0.0.0.0:40003", "0.0.0.0:0", LISTEN),
            // Outside the range: not counted.
            tcp("127.0.0.1:7000", "127.0.0.1:40000", ESTABLISHED),
            tcp("0.0.0.0:7000", "0.0.0.0:0", LISTEN),
        ];
        let c = count(&socks, &range);
        assert_eq!(of(&c, IPPROTO_TCP, "local 127.0.0.1"), Some(3), "{c:#?}");
        assert_eq!(of(&c, IPPROTO_TCP, "local 127.0.0.2"), Some(2));
        assert_eq!(of(&c, IPPROTO_TCP, "local 0.0.0.0"), Some(4));
        assert_eq!(of(&c, IPPROTO_TCP, "local ::"), None, "no IPv6 socket");
        assert_eq!(
            of(&c, IPPROTO_TCP, "destination 127.0.0.1:7000"),
            Some(2),
            "TIME_WAIT included"
        );
        assert_eq!(of(&c, IPPROTO_TCP, "destination 127.0.0.1:7001"), Some(1));
        assert_eq!(of(&c, IPPROTO_TCP, "destination 0.0.0.0:0"), None);
        assert_eq!(c.len(), 5);
        // The sockets behind a pair: the wildcard listener holds 127.0.0.2's port too.
        let two = c
            .iter()
            .find(|c| c.pair.scope == Scope::Local("127.0.0.2".parse().unwrap()))
            .unwrap();
        assert_eq!(two.socks, [3, 4]);
    }

    #[test]
    fn ipv6_dual_stack_and_udp_apart() {
        let range = Range::new(40000, 40019);
        let mut udp = tcp("127.0.0.1:40005", "0.0.0.0:0", CLOSE);
        udp.proto = IPPROTO_UDP;
        let socks = [
            tcp(
                "[::ffff:127.0.0.1]:40000",
                "[::ffff:127.0.0.1]:7000",
                ESTABLISHED,
            ),
            tcp("[::]:40001", "[::]:0", LISTEN),
            tcp("[::1]:40002", "[::1]:80", ESTABLISHED),
            udp,
        ];
        let c = count(&socks, &range);
        assert_eq!(of(&c, IPPROTO_TCP, "local 127.0.0.1"), Some(2), "{c:#?}");
        assert_eq!(of(&c, IPPROTO_TCP, "local ::1"), Some(2));
        assert_eq!(of(&c, IPPROTO_TCP, "local ::"), Some(3));
        assert_eq!(of(&c, IPPROTO_TCP, "local 0.0.0.0"), Some(2));
        assert_eq!(of(&c, IPPROTO_TCP, "destination 127.0.0.1:7000"), Some(1));
        assert_eq!(of(&c, IPPROTO_UDP, "local 127.0.0.1"), Some(1));
        assert_eq!(of(&c, IPPROTO_UDP, "local 0.0.0.0"), Some(1));
    }

    #[test]
    fn reserved_ports_are_out_of_the_range_and_of_the_count() {
        let mut range = Range::new(40000, 40019);
        range.reserved = parse_reserved("40000-40003,40010, 50000\n");
        assert_eq!(
            range.reserved,
            [(40000, 40003), (40010, 40010), (50000, 50000)]
        );
        assert_eq!(range.reserved_in(), 5);
        assert_eq!(range.size(), 15);
        assert!(parse_reserved("\n").is_empty());
        let socks = [
            tcp("127.0.0.1:40000", "0.0.0.0:0", CLOSE),
            tcp("127.0.0.1:40004", "0.0.0.0:0", CLOSE),
        ];
        let c = count(&socks, &range);
        assert_eq!(of(&c, IPPROTO_TCP, "local 127.0.0.1"), Some(1));
        assert_eq!(Range::new(40000, 40003).size(), 4);
    }

    #[test]
    fn levels_go_up_at_80_and_95_and_down_5_points_below() {
        // 20 ports: 80 % is 16, 95 % is 19; down from 95 below 90 % (17),
        // down from 80 below 75 % (14).
        let steps = [
            (15, 0, 0),
            (16, 0, 80),
            (18, 80, 80),
            (19, 80, 95),
            (20, 95, 95),
            (18, 95, 95),
            (17, 95, 80),
            (15, 80, 80),
            (14, 80, 0),
            (19, 0, 95),
            (10, 95, 0),
        ];
        for (in_use, previous, want) in steps {
            assert_eq!(
                level(in_use, 20, previous),
                want,
                "{in_use} from {previous}"
            );
        }
        assert_eq!(level(4, 4, 0), 95, "4 ports: 100 % at once");
        assert_eq!(level(3, 4, 0), 0, "75 %");
        assert_eq!(level(0, 0, 95), 0, "an empty range");
        assert_eq!(percent(19, 20), 95.0);
        assert_eq!(percent(2, 3), 66.6);
    }

    #[test]
    fn changes_are_told_once_each_way() {
        let range = Range::new(40000, 40019);
        let socks = |n: u16| -> Vec<Sock> {
            (0..n)
                .map(|i| tcp(&format!("127.0.0.1:{}", 40000 + i), "0.0.0.0:0", CLOSE))
                .collect()
        };
        let mut l = Levels::default();
        let mut seen = Vec::new();
        for n in (0..=20).chain((0..20).rev()) {
            for ch in l.update(&count(&socks(n), &range), range.size()) {
                let (a, _) = ch.pair.addr();
                seen.push((a, ch.in_use, ch.previous, ch.level));
            }
        }
        let want = |a: &str| {
            [
                (a.to_owned(), 16, 0, 80),
                (a.to_owned(), 19, 80, 95),
                (a.to_owned(), 17, 95, 80),
                (a.to_owned(), 14, 80, 0),
            ]
        };
        let mut expected: Vec<_> = Vec::new();
        // Both pairs, 0.0.0.0 first in the pairs' order, at each crossing.
        for (x, y) in want("0.0.0.0").into_iter().zip(want("127.0.0.1")) {
            expected.push(x);
            expected.push(y);
        }
        assert_eq!(seen, expected);
        assert!(!l.pressed());
        // A pair whose sockets all went at once comes down too.
        l.update(&count(&socks(20), &range), 20);
        let down = l.update(&[], 20);
        assert_eq!(down.len(), 2);
        assert!(down.iter().all(|c| c.level == 0 && c.in_use == 0));
    }
}
