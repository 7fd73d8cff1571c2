//! The observer's eBPF programs: tracepoints only, each a thin wrapper that
//! calls a `try_` function. They read and report; none changes what the
//! kernel decides.
#![no_std]
#![no_main]

mod args;
mod bind;
mod kernel;
mod maps;
mod rare;
mod sockcall;
mod task;
mod tcp;
mod time_wait;
mod tp;

/// Does nothing: the benchmark attaches it where the observer's programs go,
/// to measure what a hook costs before any work is done (the floor).
#[aya_ebpf::macros::tracepoint]
pub fn obs_floor(_ctx: aya_ebpf::programs::TracePointContext) -> u32 {
    0
}

/// The same, for the raw tracepoints (softirq, timer).
#[aya_ebpf::macros::raw_tracepoint]
pub fn obs_floor_raw(_ctx: aya_ebpf::programs::RawTracePointContext) -> i32 {
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// SAFETY: a plain byte array in the section the loader reads the licence from;
// no other symbol is named LICENSE.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
