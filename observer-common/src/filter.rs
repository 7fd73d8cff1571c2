//! `observer run`'s filters, applied by the kernel programs before they
//! build a record: what a filtered observer drops costs it nothing, and its
//! `lost` counts only records it would have written.

/// Bits of [`FilterConfig::events`]: the record kinds to write.
pub mod event {
    pub const BIND: u32 = 1 << 0;
    pub const TCP_STATE: u32 = 1 << 1;
    pub const TIME_WAIT: u32 = 1 << 2;
    pub const LISTEN: u32 = 1 << 3;
    pub const CONNECT: u32 = 1 << 4;
    pub const ALL: u32 = BIND | TCP_STATE | TIME_WAIT | LISTEN | CONNECT;
}

/// Bits of [`FilterConfig::flags`]: which filters are on.
pub mod on {
    /// Only failed calls (bind, listen, connect).
    pub const ERRORS_ONLY: u32 = 1 << 0;
    pub const UID: u32 = 1 << 1;
    pub const NETNS: u32 = 1 << 2;
    pub const COMM: u32 = 1 << 3;
    /// Processes in the `PIDS` map.
    pub const PIDS: u32 = 1 << 4;
    /// Ports in the `PORTS` map.
    pub const PORTS: u32 = 1 << 5;
    /// Tasks under the cgroup in slot 0 of the `CGROUP` map.
    pub const CGROUP: u32 = 1 << 6;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FilterConfig {
    /// Bits of [`event`].
    pub events: u32,
    /// Bits of [`on`].
    pub flags: u32,
    pub uid: u32,
    pub netns: u32,
    /// `comm` as the kernel keeps it (15 bytes and a NUL).
    pub comm: [u8; 16],
}

impl FilterConfig {
    /// Everything passes.
    pub const NONE: FilterConfig = FilterConfig {
        events: event::ALL,
        flags: 0,
        uid: 0,
        netns: 0,
        comm: [0; 16],
    };

    pub const fn wants(&self, kind: u32) -> bool {
        self.events & kind != 0
    }

    pub const fn has(&self, filter: u32) -> bool {
        self.flags & filter != 0
    }
}

/// Name of the global in the eBPF object holding the [`FilterConfig`].
pub const FILTER_SYMBOL: &str = "FILTER";

#[cfg(feature = "user")]
unsafe impl aya::Pod for FilterConfig {}
