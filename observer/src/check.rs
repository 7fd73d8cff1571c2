//! `observer check`: can the daemon run on this kernel, and if not, why not.

use std::{path::Path, process::ExitCode};

use crate::kernel::{btf_offsets, loader, mounts, sock_diag::Diag};

/// Capabilities the daemon uses: BPF programs and maps, perf-style tracing
/// reads, cgroup attach and sock_diag, mounting tracefs.
const CAPS: [(u32, &str); 4] = [
    (39, "CAP_BPF"),
    (38, "CAP_PERFMON"),
    (12, "CAP_NET_ADMIN"),
    (21, "CAP_SYS_ADMIN"),
];

fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:").map(|h| h.trim().to_owned()))
        })
        .and_then(|h| u64::from_str_radix(&h, 16).ok())
        .unwrap_or(0)
}

fn line(ok: bool, what: &str, detail: &str) {
    println!("{} {what:<40} {detail}", if ok { "ok  " } else { "FAIL" });
}

pub fn run() -> ExitCode {
    let caps = effective_caps();
    let missing: Vec<&str> = CAPS
        .iter()
        .filter(|(bit, _)| caps & (1 << bit) == 0)
        .map(|(_, n)| *n)
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "observer: not enough privilege: missing {} (run as root, or grant CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN and CAP_SYS_ADMIN)",
            missing.join(", ")
        );
        return ExitCode::FAILURE;
    }
    let mut ok = true;
    line(
        true,
        "capabilities",
        "CAP_BPF CAP_PERFMON CAP_NET_ADMIN CAP_SYS_ADMIN",
    );
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    line(true, "kernel", release.trim());
    let btf = Path::new("/sys/kernel/btf/vmlinux").is_file();
    line(
        btf,
        "BTF (/sys/kernel/btf/vmlinux)",
        if btf {
            "present"
        } else {
            "missing: netns and socket details will be null"
        },
    );
    let (offsets, tw_offsets) = btf_offsets::read();
    for (known, what) in [
        (offsets.netns_known(), "netns of a task and of a socket"),
        (offsets.fd_sock_known(), "socket behind a file descriptor"),
        (
            offsets.skc_reuse_bits != 0,
            "SO_REUSEADDR/PORT bits of a socket",
        ),
    ] {
        line(
            known,
            &format!("BTF offsets: {what}"),
            if known {
                "found"
            } else {
                "not found: reported as null"
            },
        );
    }
    let tracefs_mounted = Path::new(mounts::TRACEFS).join("events").is_dir();
    match mounts::ensure_tracefs() {
        Ok(mounted) => line(
            true,
            "tracefs",
            &if mounted || !tracefs_mounted {
                format!("was not mounted; mounted it at {}", mounts::TRACEFS)
            } else {
                format!("mounted at {}", mounts::TRACEFS)
            },
        ),
        Err(e) => {
            ok = false;
            line(false, "tracefs", &format!("{e:#}"));
        }
    }
    // TIME_WAIT: the kernel's timer where its handler can be found, else polling.
    use crate::time_wait::timer;
    let tw = match timer::discover(&tw_offsets)
        .and_then(|(config, hz)| Ok((config, hz, timer::handler()?)))
    {
        Ok((config, hz, handler)) => {
            line(
                true,
                "TIME_WAIT source",
                &format!("the kernel's timer (tw_timer_handler at {handler:#x}, HZ {hz})"),
            );
            Some(config)
        }
        Err(why) => {
            line(
                true,
                "TIME_WAIT source",
                &format!("sock_diag polling every 500 ms (the timer cannot be used: {why})"),
            );
            None
        }
    };
    let cgroup = match mounts::cgroup2_mount() {
        Ok(c) => {
            line(true, "cgroup2", &c.display().to_string());
            Some(c)
        }
        Err(e) => {
            ok = false;
            line(false, "cgroup2", &format!("{e:#}"));
            None
        }
    };
    match Diag::open() {
        Ok(_) => {
            line(true, "sock_diag (NETLINK_SOCK_DIAG)", "opens");
            let listed = crate::kernel::sock_diag::lists_bound_only();
            line(
                true,
                "sock_diag: bound, not listening TCP",
                if listed {
                    "listed"
                } else {
                    "not listed (before 6.3): explain uses the binds it saw, else says it cannot tell"
                },
            );
        }
        Err(e) => {
            ok = false;
            line(false, "sock_diag (NETLINK_SOCK_DIAG)", &e.to_string());
        }
    }
    if let Some(cgroup) = cgroup {
        let _ = cgroup;
        match loader::probe(&loader::Setup {
            offsets: &offsets,
            time_wait: tw.as_ref(),
            filter: &observer_common::filter::FilterConfig::NONE,
            pids: &[],
            ports: &[],
            cgroup: None,
            ring_bytes: 4096,
        }) {
            Ok(hooks) => {
                // A syscall is served if one of its two ways loads.
                let served = |call: u32| {
                    hooks
                        .iter()
                        .any(|h| h.call == Some(call) && h.result.is_ok())
                };
                for h in &hooks {
                    match &h.result {
                        Ok(id) => line(
                            true,
                            &h.label,
                            &format!("loads and attaches (prog id {id})"),
                        ),
                        Err(e) if h.call.is_some_and(served) => println!(
                            "-    {:<40} not on this kernel, the other way is used ({})",
                            h.label,
                            format!("{e:#}").lines().next().unwrap_or("")
                        ),
                        Err(e) => {
                            ok = false;
                            let e = format!("{e:#}");
                            line(false, &h.label, e.lines().next().unwrap_or(""));
                        }
                    }
                }
            }
            Err(e) => {
                ok = false;
                line(false, "eBPF object", &format!("{e:#}"));
            }
        }
    }
    println!(
        "{}",
        if ok {
            "observer can run here"
        } else {
            "observer cannot run here: see FAIL above"
        }
    );
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
