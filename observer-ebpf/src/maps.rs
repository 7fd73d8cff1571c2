//! Maps and globals shared by all programs.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    macros::map,
    maps::{PerCpuArray, RingBuf, ring_buf::RingBufEntry},
};
use observer_common::{
    Header, Kind, LOST_RINGBUF, LOST_SLOTS, config::KernelOffsets, time_wait::TimeWaitConfig,
};

/// Every record goes through this one ring buffer (the daemon may resize it).
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(8 << 20, 0);

/// Records that could not be delivered, by cause (`LOST_*` indexes).
#[map]
pub static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(LOST_SLOTS, 0);

/// Written by the daemon before load (see `KernelOffsets`).
// SAFETY: no other symbol has this name; the loader finds the global by it.
#[unsafe(no_mangle)]
pub static KERNEL_OFFSETS: KernelOffsets = KernelOffsets::ZERO;

pub fn kernel_offsets() -> KernelOffsets {
    // SAFETY: a valid, aligned static of plain u32s, so any bytes the loader writes are
    // valid; volatile so that the compiler cannot fold in the zeros it was built with.
    unsafe { core::ptr::read_volatile(&KERNEL_OFFSETS) }
}

/// Written by the daemon before load (see `TimeWaitConfig`).
// SAFETY: as for `KERNEL_OFFSETS`.
#[unsafe(no_mangle)]
pub static TIME_WAIT_CONFIG: TimeWaitConfig = TimeWaitConfig::OFF;

pub fn time_wait_config() -> TimeWaitConfig {
    // SAFETY: as for `kernel_offsets` (`TimeWaitConfig` holds only u32s and u64s).
    unsafe { core::ptr::read_volatile(&TIME_WAIT_CONFIG) }
}

/// Wake the daemon only once this much is waiting: a wakeup per record (the
/// ring buffer's default while the reader keeps up) costs microseconds per
/// bind. The daemon also drains on a short timer, so nothing waits long.
const WAKE_BYTES: u64 = 256 * 1024;

/// An urgent record wakes the daemon at most this often per CPU.
const URGENT_EVERY_NS: u64 = 1_000_000;

/// When this CPU last let an urgent record wake the daemon.
#[map]
static WOKE: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// `flags` for submitting a record of `size` bytes made at `now_ns`. An
/// `urgent` record (a failure, which the daemon explains by looking at the
/// sockets before they go) wakes the daemon if it is idle (the ring buffer's
/// own rule: it had read everything before this record), at most once per
/// millisecond per CPU: a wakeup costs the failing caller a self-IPI, and in
/// a storm of failures the daemon, idle between records, would be woken for
/// each. The rest wait for the next wakeup or the daemon's 10 ms drain.
pub fn wake_flags(size: usize, urgent: bool, now_ns: u64) -> u64 {
    if EVENTS.query(BPF_RB_AVAIL_DATA as u64) + size as u64 >= WAKE_BYTES {
        return BPF_RB_FORCE_WAKEUP as u64;
    }
    if urgent && let Some(last) = WOKE.get_ptr_mut(0) {
        // SAFETY: this CPU's value, valid for the run; no other program runs on this
        // CPU meanwhile (see `count_lost`).
        unsafe {
            if now_ns.wrapping_sub(*last) >= URGENT_EVERY_NS {
                *last = now_ns;
                return 0;
            }
        }
    }
    BPF_RB_NO_WAKEUP as u64
}

pub fn count_lost(slot: u32) {
    if let Some(n) = LOST.get_ptr_mut(slot) {
        // SAFETY: this CPU's value, valid for the run; no other tracepoint program runs
        // on this CPU meanwhile (an IRQ during the daemon-run sweep can lose one count).
        let n = unsafe {
            *n += 1;
            *n
        };
        crate::rare::note_lost(slot, n);
    }
}

/// A record of kind `kind` reserved in the ring buffer and zeroed where it
/// lies: built on the stack and copied, a 256-byte record would take half of
/// the 512 bytes of stack a chain of BPF calls may use. `T` starts with a
/// `Header`. `None` (and counted) when the ring buffer is full.
// Inlined: a ring-buffer reference returned from a BPF subprogram and
// null-checked again by the caller leaks on 6.1's verifier (it cannot prune
// the second check), which then refuses the program.
#[inline(always)]
pub fn reserve_zeroed<T: 'static>(kind: Kind) -> Option<RingBufEntry<T>> {
    let Some(mut slot) = EVENTS.reserve::<T>(0) else {
        count_lost(LOST_RINGBUF);
        return None;
    };
    let p = slot.as_mut_ptr();
    // SAFETY: the reserved entry is `size_of::<T>()` bytes, 8-aligned, and ours until
    // it is submitted; `T` begins with a `Header`, so that store stays inside it too.
    unsafe {
        zero(p.cast::<u8>(), core::mem::size_of::<T>());
        (*p.cast::<Header>()).kind = kind as u32;
    }
    Some(slot)
}

/// Zeroes `len` bytes at `p` (8-aligned, as ring buffer records are) with
/// 8-byte stores. `write_bytes` becomes a call to the builtin `memset`, a
/// byte loop: for a 248-byte record, most of a bind's cost in the kernel.
///
/// # Safety
/// `p` is valid for `len` bytes of writes and 8-aligned.
#[inline(always)]
pub unsafe fn zero(p: *mut u8, len: usize) {
    let words = p.cast::<u64>();
    for i in 0..len / 8 {
        // SAFETY: within `len`, aligned (the caller's promise); volatile so
        // that the stores are not merged back into a memset call.
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
    }
    for i in len / 8 * 8..len {
        // SAFETY: `i < len`, inside the caller's bytes; a byte store needs no alignment.
        unsafe { core::ptr::write_volatile(p.add(i), 0) };
    }
}
