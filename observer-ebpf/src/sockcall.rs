//! Failed `listen()` and `connect()` calls (EADDRINUSE at listen, EADDRNOTAVAIL
//! when the ephemeral ports are exhausted), with the socket's local end: one
//! program at each exit, the arguments from the registers (or, before 5.15,
//! from `obs_sys_enter_args`).

use aya_ebpf::{helpers::generated, macros::tracepoint, programs::TracePointContext};
use observer_common::{
    Kind, SockCallRecord,
    filter::on,
    sockcall::{Call, flags},
};

use crate::{
    args::{self, Args, read_sockaddr},
    kernel::{fd_socket, sock_local},
    maps::{reserve_zeroed, wake_flags},
    task::{count_filtered, filter, passing_task, ports_pass},
    tp::exit_ret,
};

/// A non-blocking connect in progress is not a failure.
const EINPROGRESS: i64 = 115;

#[tracepoint]
pub fn obs_sys_exit_connect(ctx: TracePointContext) -> u32 {
    let _ = exit(&ctx, Call::Connect, args::from_regs);
    0
}

#[tracepoint]
pub fn obs_sys_exit_listen(ctx: TracePointContext) -> u32 {
    let _ = exit(&ctx, Call::Listen, args::from_regs);
    0
}

#[tracepoint]
pub fn obs_sys_exit_connect_entered(ctx: TracePointContext) -> u32 {
    let _ = exit(&ctx, Call::Connect, args::from_entry);
    0
}

#[tracepoint]
pub fn obs_sys_exit_listen_entered(ctx: TracePointContext) -> u32 {
    let _ = exit(&ctx, Call::Listen, args::from_entry);
    0
}

#[inline(always)]
fn exit(ctx: &TracePointContext, call: Call, args: fn() -> Option<Args>) -> Result<(), i64> {
    let ret = exit_ret(ctx);
    // Successes are not reported: only then are the arguments needed.
    if ret >= 0 || ret == -EINPROGRESS {
        let _ = args(); // forget what the entry kept
        return Ok(());
    }
    let Some(a) = args() else {
        return Ok(());
    };
    let f = filter();
    let Some(task) = passing_task(&f) else {
        count_filtered();
        return Ok(());
    };
    let fd = a.a[0] as i32;
    let (uaddr, addrlen) = match call {
        Call::Connect => (a.a[1], a.a[2] as u32),
        Call::Listen => (0, 0),
    };
    let local = fd_socket(fd).and_then(|s| sock_local(s.sk));
    if f.has(on::PORTS) && !ports_pass(&f, [local.as_ref().map_or(0, |l| l.port), 0]) {
        count_filtered();
        return Ok(());
    }
    let Some(mut entry) = reserve_zeroed::<SockCallRecord>(Kind::SockCall) else {
        return Ok(());
    };
    // SAFETY: reserve_zeroed zeroed all of it, and an all-zero `SockCallRecord` (integers
    // and byte arrays only) is valid.
    let r = unsafe { entry.assume_init_mut() };
    r.call = call as u32;
    // SAFETY: bpf_ktime_get_ns takes no arguments; nothing to uphold.
    r.header.ktime_ns = unsafe { generated::bpf_ktime_get_ns() };
    r.task = task;
    r.ret = ret;
    r.fd = fd;
    r.addrlen = addrlen;
    if let Some(enter_ns) = a.enter_ns {
        r.enter_ns = enter_ns;
        r.flags |= flags::ENTER;
    }
    if let Some(local) = local {
        r.family = local.family;
        r.lport = local.port;
        r.laddr = local.addr;
        r.flags |= flags::LOCAL;
    }
    if read_sockaddr(&mut r.sockaddr, uaddr, addrlen) {
        r.flags |= flags::SOCKADDR;
    }
    let now = r.header.ktime_ns;
    entry.submit(wake_flags(size_of::<SockCallRecord>(), true, now));
    Ok(())
}
