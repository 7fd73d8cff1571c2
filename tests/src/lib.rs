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

/// The running kernel is at least `major.minor`.
pub fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut n = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    (n.next().unwrap_or(0), n.next().unwrap_or(0)) >= (major, minor)
}
