//! A failed `listen()` or `connect()`, from the syscall tracepoints.

/// Which syscall a [`SockCallRecord`] is about.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    Listen = 1,
    Connect = 2,
}

/// Bits of [`SockCallRecord::flags`].
pub mod flags {
    /// `family`, `lport`, `laddr` come from the socket behind the fd.
    pub const LOCAL: u32 = 1 << 0;
    /// `sockaddr` holds the caller's sockaddr (connect's destination).
    pub const SOCKADDR: u32 = 1 << 1;
    /// `enter_ns` is when the call started (arguments from the enter tracepoint).
    pub const ENTER: u32 = 1 << 2;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockCallRecord {
    pub header: crate::Header,
    pub task: crate::task::TaskHeader,
    /// `ktime` at the syscall's entry (with `flags::ENTER`).
    pub enter_ns: u64,
    pub ret: i64,
    /// A [`Call`] as `u32`.
    pub call: u32,
    pub fd: i32,
    pub addrlen: u32,
    pub flags: u32,
    /// The socket's family and local port (host order), when `flags::LOCAL`.
    pub family: u16,
    pub lport: u16,
    pub _pad: u32,
    pub laddr: [u8; 16],
    pub sockaddr: [u8; crate::bind::SOCKADDR_MAX],
}

impl SockCallRecord {
    pub const fn zeroed(call: Call) -> Self {
        SockCallRecord {
            header: crate::Header {
                kind: crate::Kind::SockCall as u32,
                _reserved: 0,
                ktime_ns: 0,
            },
            task: crate::task::TaskHeader::ZERO,
            enter_ns: 0,
            ret: 0,
            call: call as u32,
            fd: 0,
            addrlen: 0,
            flags: 0,
            family: 0,
            lport: 0,
            _pad: 0,
            laddr: [0; 16],
            sockaddr: [0; crate::bind::SOCKADDR_MAX],
        }
    }
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for SockCallRecord {}
