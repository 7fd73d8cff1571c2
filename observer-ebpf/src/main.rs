//! The observer's eBPF programs: tracepoints only, each a thin wrapper that
//! calls a `try_` function. They read and report; none changes what the
//! kernel decides.
#![no_std]
#![no_main]

mod args;
mod bind;
mod kernel;
mod maps;
mod sockcall;
mod task;
mod tcp;
mod time_wait;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
