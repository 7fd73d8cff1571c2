//! One `bind()` syscall, recorded by one program at `sys_exit_bind`: the
//! caller's arguments (from its saved registers), its sockaddr (from its
//! memory), and the socket behind the fd (from its file table).

/// Largest user sockaddr copied (`sockaddr_storage`).
pub const SOCKADDR_MAX: usize = 128;

/// Bits of [`BindRecord::flags`]: which parts of the record are known.
pub mod flags {
    /// The fd is a socket: `family`, `sock_type`, `protocol`, `sock_ino` are its.
    pub const SOCKET: u32 = 1 << 0;
    /// `bound_port` is the port the socket has after the call.
    pub const BOUND_PORT: u32 = 1 << 1;
    /// `sockaddr` holds `min(addrlen, SOCKADDR_MAX)` bytes of the caller's sockaddr.
    pub const SOCKADDR: u32 = 1 << 2;
    pub const REUSEADDR_KNOWN: u32 = 1 << 3;
    pub const REUSEADDR: u32 = 1 << 4;
    pub const REUSEPORT_KNOWN: u32 = 1 << 5;
    pub const REUSEPORT: u32 = 1 << 6;
    pub const BOUND_DEV_IF_KNOWN: u32 = 1 << 7;
    /// `enter_ns` is when the call started (the arguments came from `sys_enter_bind`).
    pub const ENTER: u32 = 1 << 8;
    /// IP_FREEBIND, IP_TRANSPARENT, IP_BIND_ADDRESS_NO_PORT were read (an inet socket).
    pub const INET_FLAGS_KNOWN: u32 = 1 << 9;
    pub const FREEBIND: u32 = 1 << 10;
    pub const TRANSPARENT: u32 = 1 << 11;
    pub const BIND_ADDRESS_NO_PORT: u32 = 1 << 12;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BindRecord {
    pub header: crate::Header,
    pub task: crate::task::TaskHeader,
    /// `SO_COOKIE` of the socket; 0 when the kernel has not given it one yet.
    pub sock_cookie: u64,
    /// The socket's inode (as `ss -e` shows `ino:`); 0 when not a socket.
    pub sock_ino: u64,
    /// `ktime` at `sys_enter_bind` (with `flags::ENTER`).
    pub enter_ns: u64,
    /// The syscall's return value (0 or -errno).
    pub ret: i64,
    pub fd: i32,
    /// The `addrlen` the caller passed.
    pub addrlen: u32,
    pub bound_dev_if: u32,
    /// Bits from [`flags`].
    pub flags: u32,
    /// The socket's family, type and protocol (with `flags::SOCKET`).
    pub family: u16,
    pub sock_type: u16,
    pub protocol: u16,
    /// The port the socket has after the call, host order (with `flags::BOUND_PORT`).
    pub bound_port: u16,
    /// The caller's sockaddr: what it asked for.
    pub sockaddr: [u8; SOCKADDR_MAX],
}

impl BindRecord {
    pub const fn zeroed() -> Self {
        BindRecord {
            header: crate::Header {
                kind: crate::Kind::Bind as u32,
                _reserved: 0,
                ktime_ns: 0,
            },
            task: crate::task::TaskHeader::ZERO,
            sock_cookie: 0,
            sock_ino: 0,
            enter_ns: 0,
            ret: 0,
            fd: 0,
            addrlen: 0,
            bound_dev_if: 0,
            flags: 0,
            family: 0,
            sock_type: 0,
            protocol: 0,
            bound_port: 0,
            sockaddr: [0; SOCKADDR_MAX],
        }
    }
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for BindRecord {}
