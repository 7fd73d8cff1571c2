//! Maps and globals shared by all programs.

use aya_ebpf::{
    bindings::{BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    macros::map,
    maps::{Array, PerCpuArray, RingBuf, ring_buf::RingBufEntry},
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

pub fn kernel_offsets() -> &'static KernelOffsets {
    loaded(&KERNEL_OFFSETS)
}

/// A global the loader writes before load (`KERNEL_OFFSETS`, `FILTER`, …),
/// as the loader wrote it: the pointer is read back volatile, so the compiler
/// can neither fold in the zeros the object was built with nor copy the whole
/// struct to the stack (120 of its 512 bytes for the offsets); each field is
/// loaded where it is used. Any bytes are valid for these plain-integer structs.
#[inline(always)]
pub fn loaded<T>(global: &'static T) -> &'static T {
    let p: *const T = global;
    // SAFETY: reads back a pointer to `global`, valid for 'static and never written.
    unsafe { &*core::ptr::read_volatile(&p) }
}

/// Written by the daemon before load (see `TimeWaitConfig`).
// SAFETY: as for `KERNEL_OFFSETS`.
#[unsafe(no_mangle)]
pub static TIME_WAIT_CONFIG: TimeWaitConfig = TimeWaitConfig::OFF;

pub fn time_wait_config() -> &'static TimeWaitConfig {
    loaded(&TIME_WAIT_CONFIG)
}

/// The address of `tw_timer_handler`, written by the daemon after the load,
/// before it attaches the timer programs (reading /proc/kallsyms, the slowest
/// part of its start, runs meanwhile). 0: TIME_WAIT is not followed from the
/// timer (not yet, or the daemon polls sock_diag).
#[map]
pub static TW_HANDLER: Array<u64> = Array::with_max_entries(1, 0);

#[inline(always)]
pub fn tw_handler() -> u64 {
    TW_HANDLER.get(0).copied().unwrap_or(0)
}

/// Written by the daemon before load: the bytes a CPU submits between two
/// wakeups of the daemon (a part of the ring buffer; see `wake_flags`).
// SAFETY: as for `KERNEL_OFFSETS`.
#[unsafe(no_mangle)]
pub static WAKE_EVERY_BYTES: u64 = 256 * 1024;

/// An urgent record wakes the daemon at most this often per CPU.
const URGENT_EVERY_NS: u64 = 1_000_000;

/// Per CPU: bytes submitted since this CPU last woke the daemon, and when
/// an urgent record last did.
#[repr(C)]
struct Wake {
    bytes: u64,
    urgent_ns: u64,
}

#[map]
static WAKE: PerCpuArray<Wake> = PerCpuArray::with_max_entries(1, 0);

/// `flags` for submitting a record of `size` bytes made at `now_ns`. A
/// wakeup costs the submitting task a self-interrupt, and asking the ring
/// buffer how much waits reads the daemon's position, a cache line the other
/// CPU writes as it reads: so each CPU counts what it submitted and wakes the
/// daemon once per `WAKE_EVERY_BYTES` of it; the daemon also drains every
/// 10 ms. An `urgent` record (a failure, which the daemon explains by looking
/// at the sockets before they go) wakes it too, at most once per millisecond
/// per CPU: in a storm of failures it would be woken for each.
#[inline(always)]
pub fn wake_flags(size: usize, urgent: bool, now_ns: u64) -> u64 {
    let Some(w) = WAKE.get_ptr_mut(0) else {
        return BPF_RB_NO_WAKEUP as u64;
    };
    // SAFETY: this CPU's value, valid for the run; no other program runs on this
    // CPU meanwhile (see `count_lost`): at worst an interrupting one skews a count.
    let w = unsafe { &mut *w };
    w.bytes += size as u64;
    if w.bytes >= *loaded(&WAKE_EVERY_BYTES) {
        w.bytes = 0;
        return BPF_RB_FORCE_WAKEUP as u64;
    }
    if urgent && now_ns.wrapping_sub(w.urgent_ns) >= URGENT_EVERY_NS {
        w.urgent_ns = now_ns;
        w.bytes = 0;
        return BPF_RB_FORCE_WAKEUP as u64;
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
