//! One `bind()` syscall, assembled in the kernel from four hooks:
//! `sys_enter_bind` (fd, start time), `cgroup/bind4|6` (address, socket, options),
//! `cgroup/post_bind4|6` (the port actually bound), `sys_exit_bind` (result, process).

/// Largest user sockaddr copied when the cgroup hook did not run (`sockaddr_storage`).
pub const SOCKADDR_MAX: usize = 128;

/// Bits of [`BindRecord::flags`]: which parts of the record are known.
pub mod flags {
    /// `cgroup/bind4|6` ran: family, type, protocol, addr, port, cookie are from the socket.
    pub const CGROUP_HOOK: u32 = 1 << 0;
    /// `cgroup/post_bind4|6` ran: `bound_port` is the port the socket got.
    pub const POST_BIND: u32 = 1 << 1;
    /// `sockaddr` holds `min(addrlen, SOCKADDR_MAX)` bytes of the caller's sockaddr.
    pub const SOCKADDR: u32 = 1 << 2;
    pub const REUSEADDR_KNOWN: u32 = 1 << 3;
    pub const REUSEADDR: u32 = 1 << 4;
    pub const REUSEPORT_KNOWN: u32 = 1 << 5;
    pub const REUSEPORT: u32 = 1 << 6;
    pub const BOUND_DEV_IF_KNOWN: u32 = 1 << 7;
    /// `sys_enter_bind` was seen (the bind started after the observer attached).
    pub const ENTER: u32 = 1 << 8;
    /// The cgroup hook was `bind6` (else `bind4`): how to read `addr`.
    pub const CGROUP_HOOK_V6: u32 = 1 << 9;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BindRecord {
    pub header: crate::Header,
    /// `bpf_get_current_pid_tgid()`: tgid in the high half, tid in the low.
    pub pid_tgid: u64,
    /// `bpf_get_current_uid_gid()`: gid in the high half, uid in the low.
    pub uid_gid: u64,
    pub cgroup_id: u64,
    /// `SO_COOKIE` of the socket; 0 when the cgroup hook did not run.
    pub sock_cookie: u64,
    /// `ktime` at `sys_enter_bind`; the daemon reports exit minus enter.
    pub enter_ns: u64,
    /// The syscall's return value (0 or -errno).
    pub ret: i64,
    pub fd: i32,
    /// Inode of the caller's network namespace; 0 when unknown.
    pub netns: u32,
    /// The `addrlen` the caller passed.
    pub addrlen: u32,
    pub bound_dev_if: u32,
    /// Bits from [`flags`].
    pub flags: u32,
    pub family: u16,
    pub sock_type: u16,
    pub protocol: u16,
    /// Requested port, host order.
    pub port: u16,
    /// Port the socket got, host order (valid with [`flags::POST_BIND`]).
    pub bound_port: u16,
    pub _pad: u16,
    /// Requested address: 4 bytes for IPv4, 16 for IPv6, network order.
    pub addr: [u8; 16],
    pub comm: [u8; 16],
    /// The caller's sockaddr, for binds the cgroup hook never saw (other
    /// families, failures before `inet_bind`).
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
            pid_tgid: 0,
            uid_gid: 0,
            cgroup_id: 0,
            sock_cookie: 0,
            enter_ns: 0,
            ret: 0,
            fd: 0,
            netns: 0,
            addrlen: 0,
            bound_dev_if: 0,
            flags: 0,
            family: 0,
            sock_type: 0,
            protocol: 0,
            port: 0,
            bound_port: 0,
            _pad: 0,
            addr: [0; 16],
            comm: [0; 16],
            sockaddr: [0; SOCKADDR_MAX],
        }
    }
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for BindRecord {}
