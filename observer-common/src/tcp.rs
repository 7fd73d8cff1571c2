//! One TCP state change, from `tracepoint/sock/inet_sock_set_state`.

/// Bits of [`TcpStateRecord::flags`].
pub mod flags {
    /// The change happened in process context: `task` is the process that caused it. Without it, it ran in softirq or hardirq context, where
    /// "current" is whichever task was interrupted.
    pub const PROCESS_CONTEXT: u16 = 1 << 0;
    /// `prev_state_ns` is known (the previous change of this socket was seen).
    pub const PREV_KNOWN: u16 = 1 << 1;
    /// The socket's SO_REUSEADDR / SO_REUSEPORT bits were read (`REUSEADDR`, `REUSEPORT`).
    pub const REUSE_KNOWN: u16 = 1 << 2;
    pub const REUSEADDR: u16 = 1 << 3;
    pub const REUSEPORT: u16 = 1 << 4;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpStateRecord {
    pub header: crate::Header,
    /// The kernel's `struct sock *`: the socket's id for as long as it lives.
    pub skaddr: u64,
    /// The process that caused the change (with `flags::PROCESS_CONTEXT`; else zero).
    pub task: crate::task::TaskHeader,
    /// Time spent in `oldstate`.
    pub prev_state_ns: u64,
    /// Inode of the socket's network namespace; 0 when unknown.
    pub netns: u32,
    pub oldstate: u8,
    pub newstate: u8,
    pub flags: u16,
    pub family: u16,
    /// Host order.
    pub sport: u16,
    pub dport: u16,
    pub _pad: u16,
    /// 4 bytes for IPv4, 16 for IPv6, network order.
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

impl TcpStateRecord {
    pub const fn zeroed() -> Self {
        TcpStateRecord {
            header: crate::Header {
                kind: crate::Kind::TcpState as u32,
                _reserved: 0,
                ktime_ns: 0,
            },
            skaddr: 0,
            task: crate::task::TaskHeader::ZERO,
            prev_state_ns: 0,
            netns: 0,
            oldstate: 0,
            newstate: 0,
            flags: 0,
            family: 0,
            sport: 0,
            dport: 0,
            _pad: 0,
            saddr: [0; 16],
            daddr: [0; 16],
        }
    }
}

/// TCP states as the kernel numbers them (`include/net/tcp_states.h`).
pub mod state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;
    pub const NEW_SYN_RECV: u8 = 12;
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for TcpStateRecord {}
