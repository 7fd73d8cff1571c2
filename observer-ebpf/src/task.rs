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

pub fn filter() -> FilterConfig {
    // SAFETY: as `maps::kernel_offsets`: a valid static of plain integers and bytes,
    // read volatile so that the loader's value, not the built-in one, is used.
    unsafe { core::ptr::read_volatile(&FILTER) }
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
        pid_tgid: bpf_get_current_pid_tgid(),
        uid_gid: bpf_get_current_uid_gid(),
        // SAFETY: bpf_get_current_cgroup_id takes no arguments; nothing to uphold.
        cgroup_id: unsafe { generated::bpf_get_current_cgroup_id() },
        netns: current_netns(),
        _pad: 0,
        comm: bpf_get_current_comm().unwrap_or_default(),
    }
}

/// The calling task, if it passes the process filters: `-p` is checked
/// before anything else is read, so a process filtered out costs little.
#[inline(always)]
pub fn passing_task(f: &FilterConfig) -> Option<TaskHeader> {
    if f.has(on::PIDS) {
        let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        // SAFETY: only whether the key is present is used, never the value, so a
        // concurrent update of the map cannot matter.
        unsafe { PIDS.get(&tgid) }?;
    }
    let task = current_task();
    task_passes(f, &task).then_some(task)
}

/// The process filters, on the calling task: `-p` first (the cheapest and
/// the most selective), then uid, namespace, comm, cgroup.
pub fn task_passes(f: &FilterConfig, t: &TaskHeader) -> bool {
    if f.flags == 0 {
        return true;
    }
    // SAFETY: only whether the key is present is used, never the value.
    if f.has(on::PIDS) && unsafe { PIDS.get(&t.pid()) }.is_none() {
        return false;
    }
    if f.has(on::UID) && t.uid() != f.uid {
        return false;
    }
    if f.has(on::NETNS) && t.netns != f.netns {
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
