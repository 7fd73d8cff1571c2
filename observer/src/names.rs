//! Names for kernel numbers: errno, address family, socket type and protocol.

use std::borrow::Cow;

use nix::errno::Errno;

/// A name the schema writes: most are constants, borrowed; the rest made.
pub type Name = Cow<'static, str>;

/// `EADDRINUSE` for 98; `None` for 0 and numbers the C library does not name.
pub fn errno_name(errno: i32) -> Option<Name> {
    if errno == 0 {
        return None;
    }
    match Errno::from_raw(errno) {
        Errno::UnknownErrno => Some(format!("E{errno}").into()),
        e => Some(errno_static(e).map_or_else(|| format!("{e:?}").into(), Cow::Borrowed)),
    }
}

/// The errno names a record of this daemon most often carries, without a
/// string made per record (a failure storm makes one per bind).
fn errno_static(e: Errno) -> Option<&'static str> {
    Some(match e {
        Errno::EADDRINUSE => "EADDRINUSE",
        Errno::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        Errno::EACCES => "EACCES",
        Errno::EPERM => "EPERM",
        Errno::EINVAL => "EINVAL",
        Errno::EBADF => "EBADF",
        Errno::ENOTSOCK => "ENOTSOCK",
        Errno::EAFNOSUPPORT => "EAFNOSUPPORT",
        Errno::ECONNREFUSED => "ECONNREFUSED",
        Errno::ETIMEDOUT => "ETIMEDOUT",
        Errno::ENETUNREACH => "ENETUNREACH",
        Errno::EISCONN => "EISCONN",
        Errno::EALREADY => "EALREADY",
        _ => return None,
    })
}

/// The errno name of a syscall's return value: `None` for success.
pub fn errno_of_ret(ret: i64) -> Option<Name> {
    (ret < 0).then(|| errno_name(i32::try_from(ret.unsigned_abs()).unwrap_or(i32::MAX)))?
}

/// The family as `ss` and the schema name it: `inet`, `inet6`, `unix`, …
pub fn family_name(family: u16) -> Name {
    match i32::from(family) {
        libc::AF_UNSPEC => "unspec".into(),
        libc::AF_UNIX => "unix".into(),
        libc::AF_INET => "inet".into(),
        libc::AF_INET6 => "inet6".into(),
        libc::AF_NETLINK => "netlink".into(),
        libc::AF_PACKET => "packet".into(),
        libc::AF_VSOCK => "vsock".into(),
        libc::AF_BLUETOOTH => "bluetooth".into(),
        libc::AF_XDP => "xdp".into(),
        libc::AF_TIPC => "tipc".into(),
        libc::AF_ALG => "alg".into(),
        n => format!("af_{n}").into(),
    }
}

/// `tcp`, `udp`, … from the socket's type and protocol.
pub fn proto_name(sock_type: u16, protocol: u16) -> Name {
    match (i32::from(sock_type), i32::from(protocol)) {
        (libc::SOCK_STREAM, libc::IPPROTO_TCP) => "tcp".into(),
        (libc::SOCK_STREAM, libc::IPPROTO_MPTCP) => "mptcp".into(),
        (_, libc::IPPROTO_SCTP) => "sctp".into(),
        (libc::SOCK_DGRAM, libc::IPPROTO_UDP) => "udp".into(),
        (libc::SOCK_DGRAM, libc::IPPROTO_UDPLITE) => "udplite".into(),
        (libc::SOCK_DGRAM, libc::IPPROTO_ICMP | libc::IPPROTO_ICMPV6) => "icmp".into(),
        (libc::SOCK_RAW, p) => format!("raw/{p}").into(),
        (t, p) => format!("type{t}/{p}").into(),
    }
}

/// TCP state names as `ss` and bcc's tcpstates print them (`include/net/tcp_states.h`).
pub fn tcp_state_name(state: u8) -> &'static str {
    match state {
        1 => "ESTABLISHED",
        2 => "SYN_SENT",
        3 => "SYN_RECV",
        4 => "FIN_WAIT1",
        5 => "FIN_WAIT2",
        6 => "TIME_WAIT",
        7 => "CLOSE",
        8 => "CLOSE_WAIT",
        9 => "LAST_ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        12 => "NEW_SYN_RECV",
        _ => "UNKNOWN",
    }
}

/// A socket's state as `who` and `explain` show it: TCP states, `BOUND` for
/// a socket bound and neither listening nor connected, `UDP`
/// (`UDP_CONNECTED`) for UDP sockets. inet_diag lists bound-only sockets
/// (asked for by the pseudo-state 13) in their real state, CLOSE: a CLOSE
/// socket in a dump is one that holds a port and does nothing else.
pub fn socket_state_name(proto: u8, state: u8) -> &'static str {
    match (proto, state) {
        (17, 1) => "UDP_CONNECTED",
        (17, _) => "UDP",
        (_, 7 | 13) => "BOUND",
        (_, s) => tcp_state_name(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_only_sockets_are_bound() {
        // As inet_diag lists them (CLOSE), and as the daemon notes them (13).
        assert_eq!(socket_state_name(6, 7), "BOUND");
        assert_eq!(socket_state_name(6, 13), "BOUND");
        assert_eq!(socket_state_name(6, 10), "LISTEN");
        assert_eq!(socket_state_name(17, 7), "UDP");
    }

    #[test]
    fn errnos() {
        assert_eq!(errno_name(0), None);
        assert_eq!(errno_name(98).as_deref(), Some("EADDRINUSE"));
        assert_eq!(errno_name(99).as_deref(), Some("EADDRNOTAVAIL"));
        assert_eq!(errno_name(13).as_deref(), Some("EACCES"));
        assert_eq!(errno_name(22).as_deref(), Some("EINVAL"));
        assert_eq!(errno_name(9).as_deref(), Some("EBADF"));
        assert_eq!(errno_name(88).as_deref(), Some("ENOTSOCK"));
        assert_eq!(errno_name(97).as_deref(), Some("EAFNOSUPPORT"));
        assert_eq!(errno_name(4242).as_deref(), Some("E4242"));
    }

    #[test]
    fn families_and_protocols() {
        assert_eq!(family_name(2), "inet");
        assert_eq!(family_name(10), "inet6");
        assert_eq!(family_name(1), "unix");
        assert_eq!(family_name(16), "netlink");
        assert_eq!(family_name(250), "af_250");
        assert_eq!(proto_name(1, 6), "tcp");
        assert_eq!(proto_name(2, 17), "udp");
        assert_eq!(proto_name(1, 262), "mptcp");
        assert_eq!(proto_name(3, 255), "raw/255");
        assert_eq!(proto_name(5, 0), "type5/0");
        assert_eq!(tcp_state_name(5), "FIN_WAIT2");
        assert_eq!(tcp_state_name(7), "CLOSE");
        assert_eq!(tcp_state_name(99), "UNKNOWN");
    }
}
