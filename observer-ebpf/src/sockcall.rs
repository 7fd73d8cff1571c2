//! Failed `listen()` and `connect()` calls (EADDRINUSE at listen, EADDRNOTAVAIL
//! when the ephemeral ports are exhausted), with the socket's local end.

use aya_ebpf::{
    bindings::BPF_ANY,
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid, generated},
    macros::{map, tracepoint},
    maps::HashMap,
    programs::TracePointContext,
};
use observer_common::{
    LOST_INFLIGHT, LOST_RINGBUF, SockCallRecord,
    bind::SOCKADDR_MAX,
    sockcall::{Call, flags},
};

use crate::{
    kernel::{current_netns, fd_local},
    maps::{EVENTS, count_lost, wake_flags},
};

/// A listen() or connect() in progress.
#[repr(C)]
struct Pending {
    uaddr: u64,
    enter_ns: u64,
    fd: i32,
    addrlen: u32,
}

#[map]
static PENDING: HashMap<u64, Pending> = HashMap::with_max_entries(16384, 0);

const ENTER_FD: usize = 16;
const ENTER_UADDR: usize = 24;
const ENTER_ADDRLEN: usize = 32;
const EXIT_RET: usize = 16;
/// A non-blocking connect in progress is not a failure.
const EINPROGRESS: i64 = 115;

#[tracepoint]
pub fn obs_sys_enter_connect(ctx: TracePointContext) -> u32 {
    let _ = enter(&ctx, true);
    0
}

#[tracepoint]
pub fn obs_sys_enter_listen(ctx: TracePointContext) -> u32 {
    let _ = enter(&ctx, false);
    0
}

fn enter(ctx: &TracePointContext, has_addr: bool) -> Result<(), i64> {
    let mut p = Pending {
        uaddr: 0,
        enter_ns: unsafe { generated::bpf_ktime_get_ns() },
        fd: unsafe { ctx.read_at::<u64>(ENTER_FD)? } as i32,
        addrlen: 0,
    };
    if has_addr {
        p.uaddr = unsafe { ctx.read_at(ENTER_UADDR)? };
        p.addrlen = unsafe { ctx.read_at::<u64>(ENTER_ADDRLEN)? } as u32;
    }
    if PENDING
        .insert(bpf_get_current_pid_tgid(), &p, BPF_ANY as u64)
        .is_err()
    {
        count_lost(LOST_INFLIGHT);
    }
    Ok(())
}

#[tracepoint]
pub fn obs_sys_exit_connect(ctx: TracePointContext) -> u32 {
    let _ = exit(&ctx, Call::Connect);
    0
}

#[tracepoint]
pub fn obs_sys_exit_listen(ctx: TracePointContext) -> u32 {
    let _ = exit(&ctx, Call::Listen);
    0
}

fn exit(ctx: &TracePointContext, call: Call) -> Result<(), i64> {
    let id = bpf_get_current_pid_tgid();
    let Some(p) = PENDING.get_ptr(id) else {
        return Ok(());
    };
    let p = unsafe { &*p };
    let (uaddr, enter_ns, fd, addrlen) = (p.uaddr, p.enter_ns, p.fd, p.addrlen);
    let _ = PENDING.remove(id);
    let ret: i64 = unsafe { ctx.read_at(EXIT_RET)? };
    if ret >= 0 || ret == -EINPROGRESS {
        return Ok(());
    }
    let Some(mut entry) = EVENTS.reserve::<SockCallRecord>(0) else {
        count_lost(LOST_RINGBUF);
        return Ok(());
    };
    let r = entry.write(SockCallRecord::zeroed(call));
    r.header.ktime_ns = unsafe { generated::bpf_ktime_get_ns() };
    r.pid_tgid = id;
    r.uid_gid = bpf_get_current_uid_gid();
    r.cgroup_id = unsafe { generated::bpf_get_current_cgroup_id() };
    r.comm = bpf_get_current_comm().unwrap_or_default();
    r.enter_ns = enter_ns;
    r.ret = ret;
    r.fd = fd;
    r.addrlen = addrlen;
    r.netns = current_netns();
    if let Some(local) = fd_local(fd) {
        r.family = local.family;
        r.lport = local.port;
        r.laddr = local.addr;
        r.flags |= flags::LOCAL;
    }
    let len = core::cmp::min(addrlen as usize, SOCKADDR_MAX);
    if uaddr != 0 && len > 0 {
        let copied = unsafe {
            generated::bpf_probe_read_user(
                r.sockaddr.as_mut_ptr().cast(),
                len as u32,
                uaddr as *const core::ffi::c_void,
            )
        };
        if copied == 0 {
            r.flags |= flags::SOCKADDR;
        }
    }
    entry.submit(wake_flags(size_of::<SockCallRecord>(), true));
    Ok(())
}
