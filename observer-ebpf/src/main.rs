//! The observer's eBPF programs. Every program is a thin wrapper that calls a
//! `try_` function; the cgroup hooks return 1 (allow) whatever happened inside:
//! an observer never changes what the kernel decides.
#![no_std]
#![no_main]

mod bind;
mod kernel;
mod maps;
mod sockcall;
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
