//! TCP socket dumps over `NETLINK_SOCK_DIAG` (inet_diag), the interface `ss` uses.
//!
//! Netlink framing comes from `netlink-packet-core`, the inet_diag structs from
//! `netlink-packet-sock-diag`, the socket from `netlink-sys`. Calls block: run them
//! from `tokio::task::spawn_blocking`.

use std::fs::File;
use std::io;
use std::net::SocketAddr;

use netlink_packet_core::{
    DecodeError, NLM_F_DUMP, NLM_F_REQUEST, NetlinkBuffer, NetlinkHeader, NetlinkMessage,
    NetlinkPayload, Parseable,
};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6};
pub use netlink_packet_sock_diag::constants::{IPPROTO_TCP, IPPROTO_UDP};
use netlink_packet_sock_diag::inet::{
    ExtensionFlags, InetRequest, InetResponseHeader, SocketId, StateFlags, nlas::Nla,
};
use netlink_sys::{Socket, SocketAddr as NetlinkAddr, protocols::NETLINK_SOCK_DIAG};
use nix::sched::{CloneFlags, setns};

/// User buffer for one `recv`. The kernel sizes each dump datagram to the reader's
/// buffer but caps it near 32 KiB, so this always holds one; a dump of any length
/// (tens of thousands of sockets) then comes in as many datagrams as it needs.
const RECV_BUF: usize = 64 * 1024;
/// `SO_RCVBUF` asked for (capped by `net.core.rmem_max`): datagrams queued ahead.
const SO_RCVBUF: i32 = 4 * 1024 * 1024;
/// Offset of `idiag_expires` in `struct inet_diag_msg`: family, state, timer and
/// retrans bytes, then the 48-byte `inet_diag_sockid`.
const EXPIRES_OFFSET: usize = 4 + 48;

/// One TCP or UDP socket from NETLINK_SOCK_DIAG (inet_diag).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InetSock {
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    /// Kernel TCP state number (`TCP_TIME_WAIT` = 6, `TCP_LISTEN` = 10, ...).
    pub state: u8,
    /// Local address and port. The AF_INET dump gives `V4`; the AF_INET6 dump gives
    /// `V6`, IPv4-mapped (`::ffff:a.b.c.d`, dual-stack sockets) included.
    pub src: SocketAddr,
    /// Remote address and port (0.0.0.0:0 or [::]:0 for a listener).
    pub dst: SocketAddr,
    /// `idiag_expires`: the active timer's remaining time, in ms.
    pub expires_ms: u32,
    pub uid: u32,
    pub inode: u32,
    /// The socket cookie (as `SO_COOKIE`, `bpf_get_socket_cookie`).
    pub cookie: u64,
    /// IPV6_V6ONLY of an AF_INET6 full socket (`None` for AF_INET and timewait sockets).
    pub v6only: Option<bool>,
}

/// The mask of `states` for [`Diag::tcp_sockets`]: `1 << state` each (states of 32
/// and above are ignored).
pub fn state_mask(states: &[u8]) -> u32 {
    states
        .iter()
        .filter(|&&s| s < 32)
        .fold(0, |m, &s| m | 1 << s)
}

/// Whether this kernel's sock_diag lists TCP sockets that are bound but not
/// listening (Linux 6.3 added them): a socket bound to 127.0.0.1:0 here is
/// looked for, once. Where that cannot be tried, the kernel's version says.
pub fn lists_bound_only() -> bool {
    static ANSWER: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ANSWER.get_or_init(|| {
        probe_bound_only().unwrap_or_else(|e| {
            log::debug!("probing sock_diag for bound-only sockets: {e}");
            kernel_at_least(6, 3)
        })
    })
}

fn probe_bound_only() -> io::Result<bool> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    let port = s
        .local_addr()?
        .as_socket()
        .map(|a| a.port())
        .ok_or_else(|| io::Error::other("no local address"))?;
    let found = Diag::open()?.sockets(IPPROTO_TCP, u32::MAX, Some(port))?;
    Ok(!found.is_empty())
}

fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut n = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    (n.next().unwrap_or(0), n.next().unwrap_or(0)) >= (major, minor)
}

/// A NETLINK_SOCK_DIAG socket opened in a given network namespace.
pub struct Diag {
    sock: Socket,
    /// Sequence number of the last request: stale replies (of a dump abandoned on
    /// an error) are skipped.
    seq: u32,
}

impl Diag {
    /// Opens the socket in the current thread's network namespace.
    pub fn open() -> io::Result<Diag> {
        let sock = Socket::new(NETLINK_SOCK_DIAG)
            .map_err(|e| context("sock_diag: socket(NETLINK_SOCK_DIAG)", e))?;
        // Talk to the kernel (port 0) only; connect() also binds a port id.
        sock.connect(&NetlinkAddr::new(0, 0))
            .map_err(|e| context("sock_diag: connect", e))?;
        sock.set_rx_buf_sz(SO_RCVBUF)
            .map_err(|e| context("sock_diag: SO_RCVBUF", e))?;
        Ok(Diag { sock, seq: 0 })
    }

    /// Opens the socket inside the network namespace given by `netns` (an open
    /// /proc/PID/ns/net or /proc/PID/task/TID/ns/net file): on the calling thread,
    /// setns() into it, create the netlink socket, and setns() back to the thread's
    /// original namespace (even on error). A netlink socket keeps the namespace of
    /// its creation.
    pub fn open_in(netns: &File) -> io::Result<Diag> {
        // thread-self, not self: setns() moves only this thread.
        let original = File::open("/proc/thread-self/ns/net")
            .map_err(|e| context("sock_diag: open /proc/thread-self/ns/net", e))?;
        setns(netns, CloneFlags::CLONE_NEWNET).map_err(|e| context("sock_diag: setns", e))?;
        let diag = Self::open();
        setns(&original, CloneFlags::CLONE_NEWNET).map_err(|e| {
            log::error!("sock_diag: a thread is stuck in a foreign network namespace");
            context("sock_diag: setns back to the original namespace", e)
        })?;
        diag
    }

    /// One dump per address family (AF_INET and AF_INET6) of the TCP sockets whose
    /// state is in `states` (a bit mask: 1 << state, see [`state_mask`]), optionally
    /// only those whose local or remote port equals `port`.
    ///
    /// `local_port` is asked of the kernel (`idiag_sport`) and checked again here,
    /// after the dump.
    pub fn sockets(
        &mut self,
        proto: u8,
        states: u32,
        local_port: Option<u16>,
    ) -> io::Result<Vec<InetSock>> {
        let mut out = Vec::new();
        for family in [AF_INET, AF_INET6] {
            self.dump(family, proto, states, local_port, None, &mut out)?;
        }
        Ok(out)
    }

    /// Every socket of `proto` (any state) whose local port is in `low..=high`,
    /// both address families: the kernel filters, with an inet_diag bytecode
    /// program (`INET_DIAG_BC_S_GE`, `INET_DIAG_BC_S_LE`), as `ss 'sport >=
    /// :LOW and sport <= :HIGH'` does. Sockets outside never cross to here.
    pub fn in_port_range(&mut self, proto: u8, low: u16, high: u16) -> io::Result<Vec<InetSock>> {
        let bc = port_range_bytecode(low, high);
        let mut out = Vec::new();
        for family in [AF_INET, AF_INET6] {
            self.dump(family, proto, u32::MAX, None, Some(&bc), &mut out)?;
        }
        Ok(out)
    }

    fn dump(
        &mut self,
        family: u8,
        proto: u8,
        states: u32,
        port: Option<u16>,
        bytecode: Option<&[u8]>,
        out: &mut Vec<InetSock>,
    ) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        header.sequence_number = self.seq;
        let mut socket_id = if family == AF_INET {
            SocketId::new_v4()
        } else {
            SocketId::new_v6()
        };
        // A dump skips sockets whose local port differs from a non-zero
        // idiag_sport (inet_diag_dump_icsk, udp_dump): the kernel filters.
        socket_id.source_port = port.unwrap_or(0);
        let request = SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: proto,
            extensions: ExtensionFlags::empty(),
            // Retain bits the crate has no name for (e.g. TCP_NEW_SYN_RECV).
            states: StateFlags::from_bits_retain(states),
            socket_id,
        });
        let mut msg = NetlinkMessage::new(header, request.into());
        msg.finalize();
        let mut bytes = vec![0; msg.buffer_len()];
        msg.serialize(&mut bytes);
        if let Some(bc) = bytecode {
            append_bytecode(&mut bytes, bc);
        }
        self.sock
            .send(&bytes, 0)
            .map_err(|e| context("sock_diag dump: send", e))?;

        let mut buf = vec![0u8; RECV_BUF];
        loop {
            // MSG_TRUNC: recv returns the datagram's real length, showing truncation.
            let n = match self.sock.recv(&mut &mut buf[..], libc::MSG_TRUNC) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(context("sock_diag dump: recv", e)),
            };
            if n > buf.len() {
                let e = io::Error::other(format!("datagram of {n} bytes truncated"));
                return Err(context("sock_diag dump", e));
            }
            if parse_datagram(&buf[..n], self.seq, proto, port, out)? {
                return Ok(());
            }
        }
    }
}

/// `INET_DIAG_REQ_BYTECODE`, the request attribute holding a filter program.
const INET_DIAG_REQ_BYTECODE: u16 = 1;
/// `INET_DIAG_BC_S_GE`, `INET_DIAG_BC_S_LE` (linux/inet_diag.h).
const BC_S_GE: u8 = 2;
const BC_S_LE: u8 = 3;

/// The bytecode of `sport >= low && sport <= high`: two 8-byte conditions,
/// each an `inet_diag_bc_op` {code, yes, no} and one holding the port in
/// `no`. `yes` steps to the next op; `no` jumps 4 bytes past the end, which
/// rejects (the kernel accepts a socket when the program ends exactly at its
/// length; `inet_diag_bc_audit` allows a jump to len + 4).
pub fn port_range_bytecode(low: u16, high: u16) -> Vec<u8> {
    let op = |code: u8, yes: u8, no: u16| {
        let mut b = vec![code, yes];
        b.extend_from_slice(&no.to_ne_bytes());
        b
    };
    [
        op(BC_S_GE, 8, 16 + 4),
        op(0, 0, low),
        op(BC_S_LE, 8, 8 + 4),
        op(0, 0, high),
    ]
    .concat()
}

/// Appends `bc` as an `INET_DIAG_REQ_BYTECODE` attribute to a serialized
/// request and fixes the message's length (the crate has no such attribute).
fn append_bytecode(msg: &mut Vec<u8>, bc: &[u8]) {
    let len = 4 + bc.len();
    msg.extend_from_slice(&(len as u16).to_ne_bytes());
    msg.extend_from_slice(&INET_DIAG_REQ_BYTECODE.to_ne_bytes());
    msg.extend_from_slice(bc);
    msg.resize(msg.len().next_multiple_of(4), 0);
    let total = msg.len() as u32;
    msg[..4].copy_from_slice(&total.to_ne_bytes());
}

/// Parses the netlink messages of one datagram, appending to `out` the sockets of
/// request `seq` on local port `port` (when given). Returns true at NLMSG_DONE.
fn parse_datagram(
    mut data: &[u8],
    seq: u32,
    proto: u8,
    port: Option<u16>,
    out: &mut Vec<InetSock>,
) -> io::Result<bool> {
    while !data.is_empty() {
        // new_checked ensures 16 <= length <= data.len(), so the loop moves on.
        let buffer = NetlinkBuffer::new_checked(&data).map_err(decode_error)?;
        if buffer.sequence_number() == seq {
            let msg = NetlinkMessage::<SockDiagMessage>::parse(&buffer).map_err(decode_error)?;
            match msg.payload {
                NetlinkPayload::Done(done) if done.code < 0 => {
                    let e = io::Error::from_raw_os_error(done.code.saturating_neg());
                    return Err(context("sock_diag dump: NLMSG_DONE", e));
                }
                NetlinkPayload::Done(_) => return Ok(true),
                NetlinkPayload::Error(e) if e.code.is_some() => {
                    return Err(context("sock_diag dump: kernel", e.to_io()));
                }
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    let mut sock = inet_sock(proto, &r.header, buffer.payload())?;
                    sock.v6only = r.nlas.iter().find_map(|n| match n {
                        Nla::SkV6Only(v) => Some(*v),
                        _ => None,
                    });
                    if port.is_none_or(|p| sock.src.port() == p) {
                        out.push(sock);
                    }
                }
                _ => {} // acks, NLMSG_NOOP: no socket
            }
        }
        // Messages are 4-byte aligned (NLMSG_ALIGN); the last may lack its padding.
        let next = (buffer.length() as usize).next_multiple_of(4);
        data = &data[next.min(data.len())..];
    }
    Ok(false)
}

/// Builds an [`InetSock`] from a parsed reply header and the raw `inet_diag_msg`.
fn inet_sock(proto: u8, h: &InetResponseHeader, raw: &[u8]) -> io::Result<InetSock> {
    // The crate drops idiag_expires of TIME_WAIT timers (Timer::TimeWait has no
    // duration): read it from the reply itself.
    let expires_ms = raw
        .get(EXPIRES_OFFSET..EXPIRES_OFFSET + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_ne_bytes)
        .ok_or_else(|| decode_error("inet_diag_msg too short".into()))?;
    let id = &h.socket_id;
    Ok(InetSock {
        proto,
        state: h.state,
        // The crate reads AF_INET addresses (first 4 bytes) as IpAddr::V4.
        src: SocketAddr::new(id.source_address, id.source_port),
        dst: SocketAddr::new(id.destination_address, id.destination_port),
        expires_ms,
        uid: h.uid,
        inode: h.inode,
        cookie: cookie(id.cookie),
        v6only: None,
    })
}

/// `idiag_cookie` is `__u32[2]` in host order, low half first (sock_diag_save_cookie).
fn cookie(raw: [u8; 8]) -> u64 {
    let [a, b, c, d, e, f, g, h] = raw;
    u64::from(u32::from_ne_bytes([a, b, c, d])) | u64::from(u32::from_ne_bytes([e, f, g, h])) << 32
}

fn decode_error(e: DecodeError) -> io::Error {
    let e = io::Error::new(io::ErrorKind::InvalidData, e.to_string());
    context("sock_diag dump: decoding reply", e)
}

/// Prefixes `what` to an error's message, keeping its kind.
fn context(what: &str, e: impl Into<io::Error>) -> io::Error {
    let e = e.into();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, TcpListener, TcpStream};

    use netlink_packet_core::{DoneMessage, ErrorMessage};
    use netlink_packet_sock_diag::inet::{InetResponse, Timer};

    use super::*;
    use netlink_packet_sock_diag::constants::{TCP_ESTABLISHED, TCP_LISTEN, TCP_TIME_WAIT};

    const COOKIE: u64 = 0x1122_3344_5566_7788;

    fn message(seq: u32, payload: NetlinkPayload<SockDiagMessage>) -> Vec<u8> {
        let mut header = NetlinkHeader::default();
        header.sequence_number = seq;
        let mut msg = NetlinkMessage::new(header, payload);
        msg.finalize();
        let mut bytes = vec![0; msg.buffer_len()];
        msg.serialize(&mut bytes);
        bytes
    }

    /// A TIME_WAIT socket 127.0.0.1:sport -> 127.0.0.2:dport with 5 s left.
    fn reply(seq: u32, sport: u16, dport: u16) -> Vec<u8> {
        let mut socket_id = SocketId::new_v4();
        (socket_id.source_port, socket_id.destination_port) = (sport, dport);
        socket_id.source_address = Ipv4Addr::LOCALHOST.into();
        socket_id.destination_address = Ipv4Addr::new(127, 0, 0, 2).into();
        socket_id.cookie[..4].copy_from_slice(&(COOKIE as u32).to_ne_bytes());
        socket_id.cookie[4..].copy_from_slice(&((COOKIE >> 32) as u32).to_ne_bytes());
        let (family, state, timer) = (AF_INET, TCP_TIME_WAIT, Some(Timer::TimeWait));
        let (recv_queue, send_queue, uid, inode) = (0, 0, 1000, 42);
        let header = InetResponseHeader {
            family,
            state,
            timer,
            socket_id,
            recv_queue,
            send_queue,
            uid,
            inode,
        };
        let r = InetResponse {
            header,
            nlas: Default::default(),
        };
        let mut bytes = message(seq, SockDiagMessage::InetResponse(Box::new(r)).into());
        // The crate emits no expiry for TIME_WAIT: put one in as the kernel does.
        bytes[16 + EXPIRES_OFFSET..][..4].copy_from_slice(&5000u32.to_ne_bytes());
        bytes
    }

    /// Request 7's replies: two sockets, a stale one of request 6, then NLMSG_DONE.
    fn datagram() -> Vec<u8> {
        let done = message(7, NetlinkPayload::Done(DoneMessage::default()));
        [
            reply(7, 8080, 5555),
            reply(7, 9999, 5555),
            reply(6, 8080, 5555),
            done,
        ]
        .concat()
    }

    fn parse(data: &[u8], port: Option<u16>) -> io::Result<(bool, Vec<InetSock>)> {
        let mut out = Vec::new();
        parse_datagram(data, 7, IPPROTO_TCP, port, &mut out).map(|done| (done, out))
    }

    #[test]
    fn the_port_range_program_is_what_ss_sends() {
        // `ss 'sport >= :40000 and sport <= :40019'`: S_GE yes 8 no 20, port;
        // S_LE yes 8 no 12, port.
        let n = |v: u16| v.to_ne_bytes();
        let want: Vec<u8> = [
            [2, 8, n(20)[0], n(20)[1]],
            [0, 0, n(40000)[0], n(40000)[1]],
            [3, 8, n(12)[0], n(12)[1]],
            [0, 0, n(40019)[0], n(40019)[1]],
        ]
        .concat();
        assert_eq!(port_range_bytecode(40000, 40019), want);
        // As an attribute after a 72-byte request: length and type, the
        // message's length fixed.
        let mut msg = vec![0u8; 72];
        append_bytecode(&mut msg, &want);
        assert_eq!(msg.len(), 72 + 4 + 16);
        assert_eq!(&msg[..4], &(92u32).to_ne_bytes());
        assert_eq!(&msg[72..76], &[n(20)[0], n(20)[1], n(1)[0], n(1)[1]]);
    }

    #[test]
    fn state_mask_sets_one_bit_per_state() {
        assert_eq!(state_mask(&[TCP_LISTEN, TCP_ESTABLISHED]), 1 << 10 | 1 << 1);
        assert_eq!(state_mask(&[TCP_TIME_WAIT, TCP_TIME_WAIT, 40]), 1 << 6);
    }

    #[test]
    fn parses_a_dump_and_filters_by_port() {
        let expected = InetSock {
            proto: IPPROTO_TCP,
            v6only: None,
            state: TCP_TIME_WAIT,
            src: "127.0.0.1:8080".parse().unwrap(),
            dst: "127.0.0.2:5555".parse().unwrap(),
            expires_ms: 5000,
            uid: 1000,
            inode: 42,
            cookie: COOKIE,
        };
        assert_eq!(
            parse(&datagram(), Some(8080)).unwrap(),
            (true, vec![expected])
        );
        assert_eq!(
            parse(&datagram(), Some(5555)).unwrap().1.len(),
            0,
            "the filter is on the local port"
        );
        assert_eq!(
            parse(&datagram(), None).unwrap().1.len(),
            2,
            "request 6 skipped"
        );
        assert!(
            !parse(&reply(7, 1, 2), None).unwrap().0,
            "no NLMSG_DONE yet"
        );
    }

    #[test]
    fn kernel_errors_and_garbage_are_io_errors() {
        let mut nack = ErrorMessage::default();
        nack.code = std::num::NonZeroI32::new(-libc::EPERM);
        let err = parse(&message(7, NetlinkPayload::Error(nack)), None).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        assert!(err.to_string().starts_with("sock_diag dump"), "{err}");
        assert!(parse(&[1, 2, 3], None).is_err());
        // Truncated or corrupted replies must never panic.
        let good = datagram();
        for len in 0..good.len() {
            let _ = parse(&good[..len], None);
            for v in [0, 1, 3, 0x7f, 0xff] {
                let mut bad = good.clone();
                bad[len] = v;
                let _ = parse(&bad, None);
            }
        }
    }

    #[test]
    fn dumps_a_loopback_connection_here_not_in_another_netns() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let server = listener.local_addr().unwrap();
        let client = TcpStream::connect(server).unwrap();
        let (_accepted, peer) = listener.accept().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());

        let mut diag = Diag::open().unwrap();
        let socks = diag
            .sockets(IPPROTO_TCP, 1 << 10 | 1 << 1, Some(server.port()))
            .unwrap();
        let find = |state, src: SocketAddr, dst: SocketAddr| {
            let hit = |s: &&InetSock| s.state == state && s.src == src && s.dst == dst;
            let found: Vec<_> = socks.iter().filter(hit).collect();
            assert_eq!(found.len(), 1, "{state} {src} {dst} in {socks:#?}");
            found[0].clone()
        };
        let listening = find(TCP_LISTEN, server, "0.0.0.0:0".parse().unwrap());
        let cookie = socket2::SockRef::from(&listener).cookie().unwrap();
        assert_eq!(listening.cookie, cookie);
        find(TCP_ESTABLISHED, server, peer);
        // The kernel filters on the local port: the client's end is not there.
        assert_eq!(socks.len(), 2, "{socks:#?}");

        // open_in: a fresh, empty namespace (made on a thread of its own) has none of
        // them, and the calling thread comes back to its own.
        let ns_id = || std::fs::read_link("/proc/thread-self/ns/net").unwrap();
        let before = ns_id();
        let fresh = std::thread::spawn(|| {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).unwrap();
            File::open("/proc/thread-self/ns/net").unwrap()
        });
        let fresh = fresh.join().unwrap();
        let mut there = Diag::open_in(&fresh).unwrap();
        assert_eq!(ns_id(), before);
        let port = Some(server.port());
        assert_eq!(there.sockets(IPPROTO_TCP, u32::MAX, port).unwrap(), []);
        let mut here = Diag::open_in(&File::open("/proc/thread-self/ns/net").unwrap()).unwrap();
        assert_eq!(here.sockets(IPPROTO_TCP, u32::MAX, port).unwrap().len(), 2);
    }
}
