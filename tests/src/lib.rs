//! Helpers for the kernel tests: the real daemon as a child process, private
//! network namespaces, and a bind workload that records what the kernel answered.

pub mod observer;
pub mod workload;

/// Skips (with the reason on stderr) unless we are root: the tests load BPF.
#[macro_export]
macro_rules! require_root {
    () => {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: kernel tests need root (run them with `cargo xtask test`)");
            return;
        }
    };
}
