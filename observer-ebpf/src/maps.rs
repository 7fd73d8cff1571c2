//! Maps and globals shared by all programs.

use aya_ebpf::{
    macros::map,
    maps::{PerCpuArray, RingBuf},
};
use observer_common::{LOST_SLOTS, config::KernelOffsets};

/// Every record goes through this one ring buffer (the daemon may resize it).
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(8 << 20, 0);

/// Records that could not be delivered, by cause (`LOST_*` indexes).
#[map]
pub static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(LOST_SLOTS, 0);

/// Written by the daemon before load (see `KernelOffsets`).
#[unsafe(no_mangle)]
pub static KERNEL_OFFSETS: KernelOffsets = KernelOffsets::ZERO;

pub fn kernel_offsets() -> KernelOffsets {
    // Volatile: the loader rewrites the value; the compiler must not fold the zeros.
    unsafe { core::ptr::read_volatile(&KERNEL_OFFSETS) }
}

pub fn count_lost(slot: u32) {
    if let Some(n) = LOST.get_ptr_mut(slot) {
        // Per-CPU slot: no other writer while this program runs on this CPU.
        unsafe { *n += 1 };
    }
}
