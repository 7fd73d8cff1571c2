//! The kernel side's rare paths, told through aya-log (shown by `observer
//! run -v`): a full ring buffer or map, a caller's sockaddr or a socket that
//! could not be read. Each is counted per CPU and logged the first time and
//! at every power of two after, so that a storm of them costs a counter, not
//! a log line each; nothing here runs on a call that goes as expected.
//! Without `-v` the daemon sets aya-log's level to off: no line is made.

use aya_ebpf::{macros::map, maps::PerCpuArray};
use aya_log_ebpf::info;
use observer_common::{LOST_INFLIGHT, LOST_RINGBUF, LOST_TIME_WAIT_MAP};

/// What went wrong, beyond the losses (which `LOST` counts).
#[derive(Clone, Copy)]
#[repr(u32)]
pub enum Rare {
    /// The caller's sockaddr could not be copied (a page not resident, say),
    /// although the kernel read it: the record has no address.
    SockaddrUnreadable = 0,
    /// A successful call's socket could not be reached through the fd
    /// table: the offsets taken from BTF may not fit this kernel.
    SocketUnreadable = 1,
}

#[map]
static RARE: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

/// Counts `what` on this CPU, and logs it the first time and at powers of two.
pub fn note(what: Rare) {
    let Some(n) = RARE.get_ptr_mut(what as u32) else {
        return;
    };
    // SAFETY: this CPU's value, valid for the run; no other program runs on this CPU
    // meanwhile (see `maps::count_lost`).
    let n = unsafe {
        *n += 1;
        *n
    };
    if n.is_power_of_two() {
        log_rare(what, n);
    }
}

/// A loss of cause `slot` (the `n`th on this CPU): logged at powers of two.
pub fn note_lost(slot: u32, n: u64) {
    if n.is_power_of_two() {
        log_lost(slot, n);
    }
}

// Out of line: the log's code and stack are paid only when it runs.
#[inline(never)]
fn log_rare(what: Rare, n: u64) {
    let said = match what {
        Rare::SockaddrUnreadable => "a caller's sockaddr could not be read",
        Rare::SocketUnreadable => {
            "a bound socket could not be reached through the fd table (kernel offsets?)"
        }
    };
    info!(&(), "{}: {} time(s) on this CPU", said, n);
}

#[inline(never)]
fn log_lost(slot: u32, n: u64) {
    let said = match slot {
        LOST_RINGBUF => "ring buffer full, record lost",
        LOST_INFLIGHT => "in-flight map full, call lost",
        LOST_TIME_WAIT_MAP => "TIME_WAIT map full, socket not tracked",
        _ => "record lost",
    };
    info!(&(), "{}: {} time(s) on this CPU", said, n);
}
