//! Records shared by the eBPF programs and the daemon: the one place each layout lives.
//!
//! Every record starts with a [`Header`] whose `kind` says which record follows.
//! Kinds have fixed numbers, never renumbered. The `user` feature adds `aya::Pod`
//! impls and checked decoding for the daemon.
#![no_std]

pub mod bind;
pub mod config;
#[cfg(feature = "user")]
pub mod decode;
pub mod filter;
pub mod sockcall;
pub mod task;
pub mod tcp;
pub mod time_wait;

pub use bind::BindRecord;
pub use sockcall::SockCallRecord;
pub use tcp::TcpStateRecord;
pub use time_wait::TimeWaitRecord;

/// Which record follows the header.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Bind = 1,
    TcpState = 2,
    SockCall = 3,
    TimeWait = 4,
}

impl Kind {
    pub const fn from_u32(v: u32) -> Option<Kind> {
        match v {
            1 => Some(Kind::Bind),
            2 => Some(Kind::TcpState),
            3 => Some(Kind::SockCall),
            4 => Some(Kind::TimeWait),
            _ => None,
        }
    }

    /// The full size of a record of this kind, header included.
    pub const fn record_size(self) -> usize {
        // No `_` arm: a new kind cannot be forgotten here.
        match self {
            Kind::Bind => core::mem::size_of::<BindRecord>(),
            Kind::TcpState => core::mem::size_of::<TcpStateRecord>(),
            Kind::SockCall => core::mem::size_of::<SockCallRecord>(),
            Kind::TimeWait => core::mem::size_of::<TimeWaitRecord>(),
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// A [`Kind`] as `u32`.
    pub kind: u32,
    pub _reserved: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the event completed.
    pub ktime_ns: u64,
}

/// Index of the lost-event counter in the per-CPU `LOST` array.
pub const LOST_RINGBUF: u32 = 0;
/// Index of the counter of syscalls that found their in-flight map full.
pub const LOST_INFLIGHT: u32 = 1;
/// Index of the counter of timewait sockets the kernel-side table had no room for.
pub const LOST_TIME_WAIT_MAP: u32 = 2;
pub const LOST_SLOTS: u32 = 3;

/// Per-CPU counters of records the kernel-side filters kept out (`FILTERED`).
pub const FILTERED_SLOT: u32 = 0;
