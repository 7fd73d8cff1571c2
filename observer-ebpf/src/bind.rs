//! One record per `bind()` syscall, assembled across four hooks in a per-thread
//! map entry keyed by `pid_tgid`:
//!
//! - `sys_enter_bind` creates the entry (fd, start time, the caller's sockaddr pointer);
//! - `cgroup/bind4|6` adds what the socket says (address, type, options, cookie);
//! - `cgroup/post_bind4|6` adds the port the kernel actually gave;
//! - `sys_exit_bind` adds the result and the process, submits, and deletes the entry.
//!
//! Binds that never reach `inet_bind` (EBADF, ENOTSOCK, other families, short
//! addresses) get only the tracepoints; `sys_exit_bind` then copies the caller's
//! sockaddr so the daemon can still say what was asked.

use aya_ebpf::{
    EbpfContext,
    bindings::BPF_ANY,
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid, generated},
    macros::{cgroup_sock, cgroup_sock_addr, map, tracepoint},
    maps::HashMap,
    programs::{SockAddrContext, SockContext, TracePointContext},
};
use observer_common::{
    BindRecord, LOST_INFLIGHT, LOST_RINGBUF,
    bind::{SOCKADDR_MAX, flags},
};

use crate::{
    kernel::current_netns,
    maps::{EVENTS, count_lost, wake_flags},
};

/// A bind in progress: what the hooks learn, kept small (every bind copies it
/// in and out of the map); the full record is built in the ring buffer at exit.
#[repr(C)]
struct Inflight {
    /// The caller's `struct sockaddr *`, read at exit only when no cgroup hook ran.
    uaddr: u64,
    enter_ns: u64,
    sock_cookie: u64,
    fd: i32,
    addrlen: u32,
    bound_dev_if: u32,
    flags: u32,
    family: u16,
    sock_type: u16,
    protocol: u16,
    port: u16,
    bound_port: u16,
    _pad: [u16; 3],
    addr: [u8; 16],
}

/// Binds in flight, one per thread; 16 Ki threads inside bind() at once.
#[map]
static INFLIGHT: HashMap<u64, Inflight> = HashMap::with_max_entries(16384, 0);

const SOL_SOCKET: i32 = 1;
const SO_REUSEADDR: i32 = 2;
const SO_REUSEPORT: i32 = 15;

// Offsets in the syscall tracepoints' records (see
// /sys/kernel/tracing/events/syscalls/sys_{enter,exit}_bind/format).
const ENTER_FD: usize = 16;
const ENTER_UMYADDR: usize = 24;
const ENTER_ADDRLEN: usize = 32;
const EXIT_RET: usize = 16;

#[tracepoint]
pub fn obs_sys_enter_bind(ctx: TracePointContext) -> u32 {
    let _ = try_enter(&ctx);
    0
}

fn try_enter(ctx: &TracePointContext) -> Result<(), i64> {
    let fd: u64 = unsafe { ctx.read_at(ENTER_FD)? };
    let uaddr: u64 = unsafe { ctx.read_at(ENTER_UMYADDR)? };
    let addrlen: u64 = unsafe { ctx.read_at(ENTER_ADDRLEN)? };
    let entry = Inflight {
        uaddr,
        enter_ns: unsafe { generated::bpf_ktime_get_ns() },
        sock_cookie: 0,
        fd: fd as i32,
        addrlen: addrlen as u32,
        bound_dev_if: 0,
        flags: flags::ENTER,
        family: 0,
        sock_type: 0,
        protocol: 0,
        port: 0,
        bound_port: 0,
        _pad: [0; 3],
        addr: [0; 16],
    };
    if INFLIGHT
        .insert(bpf_get_current_pid_tgid(), &entry, BPF_ANY as u64)
        .is_err()
    {
        count_lost(LOST_INFLIGHT);
    }
    Ok(())
}

#[cgroup_sock_addr(bind4)]
pub fn obs_bind4(ctx: SockAddrContext) -> i32 {
    on_bind::<false>(&ctx);
    1
}

#[cgroup_sock_addr(bind6)]
pub fn obs_bind6(ctx: SockAddrContext) -> i32 {
    on_bind::<true>(&ctx);
    1
}

/// One copy per family: the verifier rejects `user_ip6` reads in `bind4` even on a dead branch.
#[inline(always)]
fn on_bind<const V6: bool>(ctx: &SockAddrContext) {
    let Some(entry) = INFLIGHT.get_ptr_mut(bpf_get_current_pid_tgid()) else {
        return; // the bind started before we attached
    };
    let r = unsafe { &mut *entry };
    let sa = unsafe { &*ctx.sock_addr };
    r.family = sa.user_family as u16;
    r.sock_type = sa.type_ as u16;
    r.protocol = sa.protocol as u16;
    // user_port holds sin_port as stored in memory: network order in the low 16 bits.
    r.port = u16::from_be(sa.user_port as u16);
    if !V6 {
        r.addr[..4].copy_from_slice(&sa.user_ip4.to_ne_bytes());
    } else {
        for (i, word) in sa.user_ip6.iter().enumerate() {
            r.addr[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
    }
    r.sock_cookie = unsafe { generated::bpf_get_socket_cookie(ctx.as_ptr()) };
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    if !sk.is_null() {
        r.bound_dev_if = unsafe { (*sk).bound_dev_if };
        r.flags |= flags::BOUND_DEV_IF_KNOWN;
    }
    let mut f = flags::CGROUP_HOOK | if V6 { flags::CGROUP_HOOK_V6 } else { 0 };
    f |= sockopt(ctx, SO_REUSEADDR, flags::REUSEADDR_KNOWN, flags::REUSEADDR);
    f |= sockopt(ctx, SO_REUSEPORT, flags::REUSEPORT_KNOWN, flags::REUSEPORT);
    r.flags |= f;
}

/// A boolean SOL_SOCKET option as flag bits: `known` when the kernel answered, `set` when on.
fn sockopt(ctx: &SockAddrContext, name: i32, known: u32, set: u32) -> u32 {
    let mut val: i32 = 0;
    let ret = unsafe {
        generated::bpf_getsockopt(
            ctx.as_ptr(),
            SOL_SOCKET,
            name,
            (&mut val as *mut i32).cast(),
            size_of::<i32>() as i32,
        )
    };
    match (ret, val) {
        (0, 0) => known,
        (0, _) => known | set,
        _ => 0,
    }
}

#[cgroup_sock(post_bind4)]
pub fn obs_post_bind4(ctx: SockContext) -> i32 {
    on_post_bind(&ctx);
    1
}

#[cgroup_sock(post_bind6)]
pub fn obs_post_bind6(ctx: SockContext) -> i32 {
    on_post_bind(&ctx);
    1
}

fn on_post_bind(ctx: &SockContext) {
    if let Some(entry) = INFLIGHT.get_ptr_mut(bpf_get_current_pid_tgid()) {
        let r = unsafe { &mut *entry };
        // src_port is in host order in struct bpf_sock.
        r.bound_port = unsafe { (*ctx.sock).src_port } as u16;
        r.flags |= flags::POST_BIND;
    }
}

#[tracepoint]
pub fn obs_sys_exit_bind(ctx: TracePointContext) -> u32 {
    let _ = try_exit(&ctx);
    0
}

fn try_exit(ctx: &TracePointContext) -> Result<(), i64> {
    let id = bpf_get_current_pid_tgid();
    let Some(entry) = INFLIGHT.get_ptr_mut(id) else {
        return Ok(()); // entered before we attached, or the map was full (counted)
    };
    let e = unsafe { &*entry };
    let ret = unsafe { ctx.read_at::<i64>(EXIT_RET)? };
    let Some(mut slot) = EVENTS.reserve::<BindRecord>(0) else {
        count_lost(LOST_RINGBUF);
        let _ = INFLIGHT.remove(id);
        return Ok(());
    };
    let r = slot.write(BindRecord::zeroed());
    r.ret = ret;
    r.header.ktime_ns = unsafe { generated::bpf_ktime_get_ns() };
    r.pid_tgid = id;
    r.uid_gid = bpf_get_current_uid_gid();
    r.cgroup_id = unsafe { generated::bpf_get_current_cgroup_id() };
    r.comm = bpf_get_current_comm().unwrap_or_default();
    r.netns = current_netns();
    r.enter_ns = e.enter_ns;
    r.sock_cookie = e.sock_cookie;
    r.fd = e.fd;
    r.addrlen = e.addrlen;
    r.bound_dev_if = e.bound_dev_if;
    r.flags = e.flags;
    r.family = e.family;
    r.sock_type = e.sock_type;
    r.protocol = e.protocol;
    r.port = e.port;
    r.bound_port = e.bound_port;
    r.addr = e.addr;
    if e.flags & flags::CGROUP_HOOK == 0 && e.uaddr != 0 {
        let len = core::cmp::min(e.addrlen as usize, SOCKADDR_MAX);
        if len > 0 {
            let copied = unsafe {
                generated::bpf_probe_read_user(
                    r.sockaddr.as_mut_ptr().cast(),
                    len as u32,
                    e.uaddr as *const core::ffi::c_void,
                )
            };
            if copied == 0 {
                r.flags |= flags::SOCKADDR;
            }
        }
    }
    slot.submit(wake_flags(size_of::<BindRecord>(), ret < 0));
    let _ = INFLIGHT.remove(id);
    Ok(())
}
