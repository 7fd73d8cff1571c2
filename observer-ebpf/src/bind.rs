//! One record per `bind()` syscall, from one program at its exit: the
//! arguments from the caller's saved registers, the sockaddr from its memory,
//! the socket through its file table (family, type, protocol, options, the
//! port it got, its inode and cookie). Binds that never reach the socket
//! layer (EBADF, ENOTSOCK) keep what is known: the fd, the result, the sockaddr.
//!
//! Where the registers cannot be read (kernels before 5.15),
//! `obs_sys_exit_bind_entered` takes the arguments `obs_sys_enter_args` kept.

use aya_ebpf::{helpers::generated, macros::tracepoint, programs::TracePointContext};
use observer_common::{BindRecord, Kind, bind::flags, filter::on};

use crate::{
    args::{self, Args, read_sockaddr},
    kernel::{
        Common, FdSocket, Window, common_cookie, common_netns, current_netns, fd_socket, inet_bit,
        inet_flags, sock_common, sock_reuse_in,
    },
    maps::{kernel_offsets, reserve_zeroed, wake_flags},
    rare::{self, Rare},
    task::{count_filtered, fill_process, filter, netns_passes, ports_pass, process_passes_now},
    tp::exit_ret,
};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

#[tracepoint]
pub fn obs_sys_exit_bind(ctx: TracePointContext) -> u32 {
    let _ = try_exit(&ctx, args::from_regs);
    0
}

#[tracepoint]
pub fn obs_sys_exit_bind_entered(ctx: TracePointContext) -> u32 {
    let _ = try_exit(&ctx, args::from_entry);
    0
}

#[inline(always)]
fn try_exit(ctx: &TracePointContext, args: fn() -> Option<Args>) -> Result<(), i64> {
    let f = filter();
    // Taken first, also when filtered out: the entry's copy must not linger.
    let Some(a) = args() else {
        return Ok(());
    };
    let ret = exit_ret(ctx);
    if f.has(on::ERRORS_ONLY) && ret >= 0 {
        count_filtered();
        return Ok(());
    }
    if !process_passes_now(&f) {
        count_filtered();
        return Ok(());
    }
    let (fd, uaddr, addrlen) = (a.a[0] as i32, a.a[1], a.a[2] as u32);
    let sock = fd_socket(fd);
    // Made where it stays (no socket: nothing read): moved, a window is copied
    // on a stack of 512 bytes.
    let common = sock_common(sock.as_ref().map_or(0, |s| s.sk));
    // The bind happens in the socket's namespace (the caller's, unless it
    // moved since it made the socket): from the socket, one read.
    let mut netns = 0;
    if let Some(s) = &sock {
        netns = common_netns(s.sk, &common);
    }
    if netns == 0 {
        netns = current_netns();
    }
    if !netns_passes(&f, netns) {
        count_filtered();
        return Ok(());
    }
    let bound_port = sock.as_ref().and_then(|s| bound_port(s.sk, &common, ret));
    if f.has(on::PORTS)
        && !ports_pass(
            &f,
            [requested_port(uaddr, addrlen), bound_port.unwrap_or(0)],
        )
    {
        count_filtered();
        return Ok(());
    }
    let Some(mut slot) = reserve_zeroed::<BindRecord>(Kind::Bind) else {
        return Ok(());
    };
    // SAFETY: reserve_zeroed zeroed all of it, and an all-zero `BindRecord` (integers
    // and byte arrays only) is valid.
    let r = unsafe { slot.assume_init_mut() };
    // SAFETY: bpf_ktime_get_ns takes no arguments; nothing to uphold.
    r.header.ktime_ns = unsafe { generated::bpf_ktime_get_ns() };
    fill_process(&mut r.task);
    r.task.netns = netns;
    r.ret = ret;
    r.fd = fd;
    r.addrlen = addrlen;
    if let Some(enter_ns) = a.enter_ns {
        r.enter_ns = enter_ns;
        r.flags |= flags::ENTER;
    }
    if read_sockaddr(&mut r.sockaddr, uaddr, addrlen) {
        r.flags |= flags::SOCKADDR;
    } else if ret == 0 {
        rare::note(Rare::SockaddrUnreadable);
    }
    match sock {
        Some(s) => socket_fields(r, &s, &common, bound_port),
        None if ret == 0 => rare::note(Rare::SocketUnreadable),
        None => {}
    }
    let now = r.header.ktime_ns;
    slot.submit(wake_flags(size_of::<BindRecord>(), ret < 0, now));
    Ok(())
}

/// The port an inet socket has after a successful bind.
fn bound_port(sk: u64, common: &Common, ret: i64) -> Option<u16> {
    if ret != 0 {
        return None;
    }
    common.get(sk, kernel_offsets().skc_num)
}

/// The port in the caller's sockaddr (`sin_port` and `sin6_port` sit at the
/// same place), for the port filter before anything is reserved.
fn requested_port(uaddr: u64, addrlen: u32) -> u16 {
    if uaddr == 0 || addrlen < 4 {
        return 0;
    }
    let mut head = [0u8; 4];
    // SAFETY: 4 bytes into the 4-byte `head`; the helper checks the user address (a bad
    // one is an error, never a fault).
    let ok = unsafe {
        generated::bpf_probe_read_user(
            head.as_mut_ptr().cast(),
            4,
            uaddr as *const core::ffi::c_void,
        )
    } == 0;
    if ok {
        u16::from_be_bytes([head[2], head[3]])
    } else {
        0
    }
}

/// What the socket says: family, type, protocol, options, its ids. (Inlined:
/// a call adds its frame to the 512 bytes of stack a chain may use, and on
/// 6.1 the two frames did not fit.)
#[inline(always)]
fn socket_fields(r: &mut BindRecord, s: &FdSocket, c: &Common, bound_port: Option<u16>) {
    let off = kernel_offsets();
    r.sock_ino = s.ino;
    r.sock_cookie = common_cookie(s.sk, c);
    r.family = c.get(s.sk, off.skc_family).unwrap_or(0);
    // `sk_type` and `sk_protocol` are neighbours.
    let tp = Window::<1>::new(s.sk, off.sk_type.min(off.sk_protocol));
    r.sock_type = tp.get(s.sk, off.sk_type).unwrap_or(0);
    r.protocol = tp.get(s.sk, off.sk_protocol).unwrap_or(0);
    r.flags |= flags::SOCKET;
    if r.family != AF_INET && r.family != AF_INET6 {
        return; // options and ports belong to inet sockets
    }
    if let Some(p) = bound_port {
        r.bound_port = p;
        r.flags |= flags::BOUND_PORT;
    }
    if let Some((reuseaddr, reuseport)) = sock_reuse_in(s.sk, c) {
        r.flags |= flags::REUSEADDR_KNOWN
            | flags::REUSEPORT_KNOWN
            | if reuseaddr { flags::REUSEADDR } else { 0 }
            | if reuseport { flags::REUSEPORT } else { 0 };
    }
    if off.skc_bound_dev_if != 0
        && let Some(dev) = c.get::<u32>(s.sk, off.skc_bound_dev_if)
    {
        r.bound_dev_if = dev;
        r.flags |= flags::BOUND_DEV_IF_KNOWN;
    }
    let inet = inet_flags(s.sk);
    if let (Some(fb), Some(tr), Some(np)) = (
        inet_bit(s.sk, &inet, off.inet_freebind),
        inet_bit(s.sk, &inet, off.inet_transparent),
        inet_bit(s.sk, &inet, off.inet_bind_address_no_port),
    ) {
        r.flags |= flags::INET_FLAGS_KNOWN
            | if fb { flags::FREEBIND } else { 0 }
            | if tr { flags::TRANSPARENT } else { 0 }
            | if np { flags::BIND_ADDRESS_NO_PORT } else { 0 };
    }
}
