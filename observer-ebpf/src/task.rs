//! The process side of every record, filled by one helper, and the filters
//! that look at it (`observer run -p/--uid/--netns/--comm/--cgroup`).

use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid, generated},
    macros::map,
    maps::{CgroupArray, HashMap, PerCpuArray},
};
use observer_common::{
    FILTERED_SLOT,
    filter::{FilterConfig, on},
    task::TaskHeader,
};

use crate::kernel::current_netns;

/// Written by the daemon before load (see `FilterConfig`).
// SAFETY: no other symbol has this name; the loader finds the global by it.
#[unsafe(no_mangle)]
pub static FILTER: FilterConfig = FilterConfig::NONE;

pub fn filter() -> &'static FilterConfig {
    crate::maps::loaded(&FILTER)
}

/// `-p`: the processes (tgids) to keep.
#[map]
pub static PIDS: HashMap<u32, u8> = HashMap::with_max_entries(1024, 0);

/// `-P`: the ports to keep.
#[map]
pub static PORTS: HashMap<u16, u8> = HashMap::with_max_entries(1024, 0);

/// `--cgroup`: slot 0 holds the cgroup whose tasks (and descendants') to keep.
#[map]
pub static CGROUP: CgroupArray = CgroupArray::with_max_entries(1, 0);

/// Records the filters kept out, per CPU.
#[map]
pub static FILTERED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

pub fn count_filtered() {
    if let Some(n) = FILTERED.get_ptr_mut(FILTERED_SLOT) {
        // SAFETY: this CPU's value, valid for the run; no other tracepoint program runs
        // on this CPU meanwhile (an IRQ during the daemon-run sweep can lose one count).
        unsafe { *n += 1 };
    }
}

/// The calling task, as records carry it.
pub fn current_task() -> TaskHeader {
    TaskHeader {
        netns: current_netns(),
        ..current_process()
    }
}

/// The calling task without its namespace (`netns` 0), for a record that
/// takes the namespace of the socket it is about: three reads fewer.
#[inline(always)]
fn current_process() -> TaskHeader {
    TaskHeader {
        pid_tgid: bpf_get_current_pid_tgid(),
        uid_gid: bpf_get_current_uid_gid(),
        // SAFETY: bpf_get_current_cgroup_id takes no arguments; nothing to uphold.
        cgroup_id: unsafe { generated::bpf_get_current_cgroup_id() },
        netns: 0,
        _pad: 0,
        comm: bpf_get_current_comm().unwrap_or_default(),
    }
}

/// The calling task, if it passes the process filters: `-p` is checked
/// before anything else is read, so a process filtered out costs little.
#[inline(always)]
pub fn passing_task(f: &FilterConfig) -> Option<TaskHeader> {
    if !process_passes_now(f) {
        return None;
    }
    let task = current_task();
    netns_passes(f, task.netns).then_some(task)
}

/// Whether the calling task passes the process filters but `--netns`, which
/// the caller checks with `netns_passes` (against a socket's namespace, say).
/// Nothing is read when no such filter is on; `-p` is checked first.
#[inline(always)]
pub fn process_passes_now(f: &FilterConfig) -> bool {
    if f.flags & (on::PIDS | on::UID | on::COMM | on::CGROUP) == 0 {
        return true;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    pid_passes(f, tgid) && process_passes_but_pid(f, &current_process())
}

/// Fills `t` with the calling task but its namespace, where it lies (a
/// record in the ring buffer): built on the stack and copied, the header
/// would take 56 of the 512 bytes a program's stack has.
#[inline(always)]
pub fn fill_process(t: &mut TaskHeader) {
    t.pid_tgid = bpf_get_current_pid_tgid();
    t.uid_gid = bpf_get_current_uid_gid();
    // SAFETY: bpf_get_current_cgroup_id takes no arguments; bpf_get_current_comm
    // writes at most 16 bytes, the size of `comm`, and zero-fills on error.
    unsafe {
        t.cgroup_id = generated::bpf_get_current_cgroup_id();
        generated::bpf_get_current_comm(t.comm.as_mut_ptr().cast(), 16);
    }
}

/// The process filters and `--netns` on a task: the namespace, then `-p`
/// (the most selective), uid, comm, cgroup.
pub fn task_passes(f: &FilterConfig, t: &TaskHeader) -> bool {
    netns_passes(f, t.netns) && process_passes(f, t)
}

/// `--netns`.
pub fn netns_passes(f: &FilterConfig, netns: u32) -> bool {
    !f.has(on::NETNS) || netns == f.netns
}

/// The process filters but `--netns`.
fn process_passes(f: &FilterConfig, t: &TaskHeader) -> bool {
    f.flags == 0 || (pid_passes(f, t.pid()) && process_passes_but_pid(f, t))
}

/// `-p`.
fn pid_passes(f: &FilterConfig, tgid: u32) -> bool {
    // SAFETY: only whether the key is present is used, never the value, so a
    // concurrent update of the map cannot matter.
    !f.has(on::PIDS) || unsafe { PIDS.get(&tgid) }.is_some()
}

/// uid, comm, cgroup.
fn process_passes_but_pid(f: &FilterConfig, t: &TaskHeader) -> bool {
    if f.has(on::UID) && t.uid() != f.uid {
        return false;
    }
    if f.has(on::COMM) && t.comm != f.comm {
        return false;
    }
    !f.has(on::CGROUP) || CGROUP.current_task_under_cgroup(0) == Ok(true)
}

/// `-P`: one of these ports (0 stands for "none") is among the kept ones.
pub fn ports_pass(f: &FilterConfig, ports: [u16; 2]) -> bool {
    // SAFETY: as in `task_passes`: only presence is used, never the value.
    !f.has(on::PORTS) || ports.iter().any(|p| unsafe { PORTS.get(p) }.is_some())
}
