//! A syscall's first three arguments at its exit: from the task's saved
//! registers (`bpf_task_pt_regs`, 5.15+: one program per call), or, where
//! that helper is missing, from `obs_sys_enter_args` at the entry (two).

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel, generated},
    macros::{map, tracepoint},
    maps::HashMap,
    programs::TracePointContext,
};
use observer_common::{LOST_INFLIGHT, bind::SOCKADDR_MAX};

use crate::maps::count_lost;

/// The arguments, and when the call started (`None` from the registers).
pub struct Args {
    pub a: [u64; 3],
    pub enter_ns: Option<u64>,
}

/// x86-64's `struct pt_regs`: `dx`, `si`, `di` (the third, second and first
/// syscall arguments) sit at 96, 104, 112.
const PT_REGS_DX: u64 = 96;

/// From the saved registers of the calling task.
pub fn from_regs() -> Option<Args> {
    // SAFETY: nothing to uphold: the only pointer passed is the task the first helper
    // returned, as `bpf_task_pt_regs` expects; neither touches our memory.
    let regs = unsafe {
        let task = generated::bpf_get_current_task_btf();
        generated::bpf_task_pt_regs(task)
    };
    if regs == 0 {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel checks the address (a bad one is an error, never a
    // fault); dx, si, di are three u64s at 96..120 of x86-64's `pt_regs`.
    let [dx, si, di]: [u64; 3] =
        unsafe { bpf_probe_read_kernel((regs as u64 + PT_REGS_DX) as *const [u64; 3]) }.ok()?;
    Some(Args {
        a: [di, si, dx],
        enter_ns: None,
    })
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Entered {
    a: [u64; 3],
    enter_ns: u64,
}

/// Calls in progress, one per thread (16 Ki threads inside one at once).
#[map]
static ENTERED: HashMap<u64, Entered> = HashMap::with_max_entries(16384, 0);

// Offsets of the arguments in every `syscalls:sys_enter_*` record.
const ARG0: usize = 16;

/// Attached to `sys_enter_bind`, `sys_enter_listen` and `sys_enter_connect`
/// where the registers cannot be read at the exit.
#[tracepoint]
pub fn obs_sys_enter_args(ctx: TracePointContext) -> u32 {
    // SAFETY: offset 16 of sys_enter_* is `args[0]`; read_at is bpf_probe_read_kernel,
    // which cannot fault. (listen has two arguments: its third long is junk, unused.)
    let Ok(a) = (unsafe { ctx.read_at::<[u64; 3]>(ARG0) }) else {
        return 0;
    };
    let e = Entered {
        a,
        // SAFETY: bpf_ktime_get_ns takes no arguments; nothing to uphold.
        enter_ns: unsafe { generated::bpf_ktime_get_ns() },
    };
    if ENTERED.insert(&bpf_get_current_pid_tgid(), &e, 0).is_err() {
        count_lost(LOST_INFLIGHT);
    }
    0
}

/// The arguments stored at the entry of this thread's call (and forgets them).
pub fn from_entry() -> Option<Args> {
    let id = bpf_get_current_pid_tgid();
    // SAFETY: only this thread's programs, which run one at a time, insert or remove
    // this key, so the entry cannot change or be reused while it is copied out.
    let e = unsafe { ENTERED.get(&id) }.copied()?;
    let _ = ENTERED.remove(&id);
    Some(Args {
        a: e.a,
        enter_ns: Some(e.enter_ns),
    })
}

/// Copies the caller's sockaddr (`uaddr`, `addrlen` of its arguments) into
/// `dst`, as much of it as fits; says whether it could be read.
#[inline(always)]
pub fn read_sockaddr(dst: &mut [u8; SOCKADDR_MAX], uaddr: u64, addrlen: u32) -> bool {
    if uaddr == 0 || addrlen == 0 {
        return false;
    }
    // Bounded right where it is used: the verifier must see `len <= SOCKADDR_MAX`.
    let len = core::cmp::min(addrlen, SOCKADDR_MAX as u32);
    // SAFETY: `len <= SOCKADDR_MAX`, the size of `dst`, so the copy stays in it; the
    // helper checks the user address (an error, never a fault).
    let copied = unsafe {
        generated::bpf_probe_read_user(
            dst.as_mut_ptr().cast(),
            len,
            uaddr as *const core::ffi::c_void,
        )
    };
    copied == 0
}
