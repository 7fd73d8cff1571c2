//! Loads the embedded eBPF object and attaches its programs.

use std::{fs::File, path::Path};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    programs::{
        CgroupAttachMode, CgroupSock, CgroupSockAddr, RawTracePoint, RawTracePointRunOptions,
        TestRun, TracePoint,
    },
};
use observer_common::{
    config::{KERNEL_OFFSETS_SYMBOL, KernelOffsets},
    time_wait::{TIME_WAIT_CONFIG_SYMBOL, TimeWaitConfig},
};

/// The eBPF object, built by `cargo xtask build` and embedded by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/observer-ebpf.o"));

/// Where a program attaches.
enum Hook {
    Tracepoint(&'static str, &'static str),
    CgroupSockAddr(&'static str),
    CgroupSock(&'static str),
}

/// Programs in attach order: the exit side of each syscall first, its enter side
/// last, so that every in-flight entry created is also completed and submitted
/// (and the timer's end before its start, so that a socket seen entering is
/// seen leaving).
#[rustfmt::skip]
const PROGRAMS: [(&str, Hook); 16] = [
    ("obs_sys_exit_bind", Hook::Tracepoint("syscalls", "sys_exit_bind")),
    ("obs_post_bind4", Hook::CgroupSock("post_bind4")),
    ("obs_post_bind6", Hook::CgroupSock("post_bind6")),
    ("obs_bind4", Hook::CgroupSockAddr("bind4")),
    ("obs_bind6", Hook::CgroupSockAddr("bind6")),
    ("obs_sys_enter_bind", Hook::Tracepoint("syscalls", "sys_enter_bind")),
    ("obs_softirq_exit", Hook::Tracepoint("irq", "softirq_exit")),
    ("obs_softirq_entry", Hook::Tracepoint("irq", "softirq_entry")),
    ("obs_inet_sock_set_state", Hook::Tracepoint("sock", "inet_sock_set_state")),
    ("obs_sys_exit_listen", Hook::Tracepoint("syscalls", "sys_exit_listen")),
    ("obs_sys_exit_connect", Hook::Tracepoint("syscalls", "sys_exit_connect")),
    ("obs_sys_enter_listen", Hook::Tracepoint("syscalls", "sys_enter_listen")),
    ("obs_sys_enter_connect", Hook::Tracepoint("syscalls", "sys_enter_connect")),
    ("obs_timer_expire_entry", Hook::Tracepoint("timer", "timer_expire_entry")),
    ("obs_timer_cancel", Hook::Tracepoint("timer", "timer_cancel")),
    ("obs_timer_start", Hook::Tracepoint("timer", "timer_start")),
];

/// The TIME_WAIT timer programs: attached only where `tw_timer_handler` was found.
fn timer_program(name: &str) -> bool {
    name.starts_with("obs_timer_")
}

/// Loaded beside the timer programs, never attached: the daemon runs it.
const SWEEP: &str = "obs_time_wait_sweep";
/// Runs of the sweep per call at most (each looks at 16 queued sockets).
const SWEEP_RUNS: usize = 1024;

pub struct Attached {
    /// Owns every program, map and link: dropping it detaches everything.
    pub ebpf: Ebpf,
    /// `section/name` of each attached hook.
    pub hooks: Vec<String>,
    pub prog_ids: Vec<u32>,
    names: Vec<&'static str>,
    /// The TIME_WAIT sweep is loaded (the timer programs are attached).
    sweep: bool,
}

/// What one program cost in the kernel (counted while `kernel.bpf_stats_enabled=1`).
#[derive(serde::Serialize, Debug)]
pub struct ProgramStats {
    pub hook: String,
    pub id: u32,
    pub run_count: u64,
    pub run_time_ns: u64,
}

impl Attached {
    /// Runs the TIME_WAIT sweep (see observer-ebpf's time_wait.rs) until it
    /// has looked at every queued FIN_WAIT2 socket.
    pub fn sweep_time_wait(&self) -> Result<()> {
        if !self.sweep {
            return Ok(());
        }
        let prog: &RawTracePoint = self
            .ebpf
            .program(SWEEP)
            .context("the sweep program is missing")?
            .try_into()?;
        for _ in 0..SWEEP_RUNS {
            let r = prog
                .test_run(RawTracePointRunOptions::new())
                .context("running the TIME_WAIT sweep")?;
            if r.return_value == 0 {
                break;
            }
        }
        Ok(())
    }

    pub fn program_stats(&self) -> Vec<ProgramStats> {
        self.names
            .iter()
            .zip(&self.hooks)
            .zip(&self.prog_ids)
            .filter_map(|((name, hook), id)| {
                let info = self.ebpf.program(name)?.info().ok()?;
                Some(ProgramStats {
                    hook: hook.clone(),
                    id: *id,
                    run_count: info.run_count(),
                    run_time_ns: info.run_time().as_nanos() as u64,
                })
            })
            .collect()
    }
}

impl Hook {
    /// `section/name`, as observer_start and observer check name it.
    fn label(&self) -> String {
        match self {
            Hook::Tracepoint(category, event) => format!("tracepoint/{category}/{event}"),
            Hook::CgroupSockAddr(kind) | Hook::CgroupSock(kind) => format!("cgroup/{kind}"),
        }
    }
}

/// Loads the object (maps and globals); programs are loaded by `attach`.
fn load(offsets: &KernelOffsets, tw: &TimeWaitConfig, ring_bytes: u32) -> Result<Ebpf> {
    if OBJECT.is_empty() {
        bail!("this binary was built without its eBPF programs: build it with `cargo xtask build`");
    }
    EbpfLoader::new()
        // No CO-RE relocations in our programs: skip parsing the kernel's BTF again.
        .btf(None)
        .override_global(KERNEL_OFFSETS_SYMBOL, offsets, true)
        .override_global(TIME_WAIT_CONFIG_SYMBOL, tw, true)
        .map_max_entries("EVENTS", ring_bytes)
        .load(OBJECT)
        .context("loading the eBPF object into the kernel")
}

/// Loads and attaches one program; returns its kernel id.
fn attach(
    ebpf: &mut Ebpf,
    name: &str,
    hook: &Hook,
    cgroup: &Path,
    cgroup_fd: &File,
) -> Result<u32> {
    let prog = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} is missing from the eBPF object"))?;
    let info = match *hook {
        Hook::Tracepoint(category, event) => {
            let p: &mut TracePoint = prog.try_into()?;
            p.load().with_context(|| format!("loading {name}"))?;
            p.attach(category, event)
                .with_context(|| format!("attaching {name} to tracepoint {category}:{event}"))?;
            p.info()?
        }
        Hook::CgroupSockAddr(_) => {
            let p: &mut CgroupSockAddr = prog.try_into()?;
            p.load().with_context(|| format!("loading {name}"))?;
            p.attach(cgroup_fd, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name} to cgroup {}", cgroup.display()))?;
            p.info()?
        }
        Hook::CgroupSock(_) => {
            let p: &mut CgroupSock = prog.try_into()?;
            p.load().with_context(|| format!("loading {name}"))?;
            p.attach(cgroup_fd, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name} to cgroup {}", cgroup.display()))?;
            p.info()?
        }
    };
    Ok(info.id())
}

fn open_cgroup(cgroup: &Path) -> Result<File> {
    File::open(cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))
}

/// Loads everything and attaches every program this kernel runs: the timer
/// programs only with a `tw` configuration (`None`: TIME_WAIT is polled).
pub fn load_and_attach(
    cgroup: &Path,
    offsets: &KernelOffsets,
    tw: Option<&TimeWaitConfig>,
    ring_bytes: u32,
) -> Result<Attached> {
    let mut ebpf = load(offsets, tw.unwrap_or(&TimeWaitConfig::OFF), ring_bytes)?;
    let cgroup_fd = open_cgroup(cgroup)?;
    let mut hooks = Vec::new();
    let mut prog_ids = Vec::new();
    let mut names = Vec::new();
    if tw.is_some() {
        let p: &mut RawTracePoint = ebpf
            .program_mut(SWEEP)
            .with_context(|| format!("program {SWEEP} is missing from the eBPF object"))?
            .try_into()?;
        p.load().with_context(|| format!("loading {SWEEP}"))?;
    }
    for (name, hook) in PROGRAMS
        .iter()
        .filter(|(name, _)| tw.is_some() || !timer_program(name))
    {
        let id = attach(&mut ebpf, name, hook, cgroup, &cgroup_fd)?;
        log::info!("attached {} (prog id {id})", hook.label());
        hooks.push(hook.label());
        prog_ids.push(id);
        names.push(*name);
    }
    Ok(Attached {
        ebpf,
        hooks,
        prog_ids,
        names,
        sweep: tw.is_some(),
    })
}

/// Tries every hook on its own and reports each (for `observer check`); all
/// are detached again when this returns.
pub fn probe(
    cgroup: &Path,
    offsets: &KernelOffsets,
    tw: Option<&TimeWaitConfig>,
) -> Result<Vec<(String, Result<u32>)>> {
    let mut ebpf = load(offsets, tw.unwrap_or(&TimeWaitConfig::OFF), 4096)?;
    let cgroup_fd = open_cgroup(cgroup)?;
    Ok(PROGRAMS
        .iter()
        .filter(|(name, _)| tw.is_some() || !timer_program(name))
        .map(|(name, hook)| {
            (
                hook.label(),
                attach(&mut ebpf, name, hook, cgroup, &cgroup_fd),
            )
        })
        .collect())
}
