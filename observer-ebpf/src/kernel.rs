//! Reads of kernel structs through offsets the daemon took from BTF
//! (`KernelOffsets`); every read is a `bpf_probe_read_kernel` that may fail,
//! and an unknown offset makes the answer "unknown", never a guess.

use core::mem::MaybeUninit;

use aya_ebpf::helpers::{bpf_probe_read_kernel, generated};

use crate::maps::kernel_offsets;

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// Reads a `T` at `base + off` in kernel memory; `None` for a null base or a
/// failed read.
#[inline(always)]
pub fn read<T>(base: u64, off: u32) -> Option<T> {
    if base == 0 {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel checks the address: a bad one is an error, never a
    // fault. Every caller's `T` is an integer or a byte array, valid for any bytes.
    unsafe { bpf_probe_read_kernel((base + off as u64) as *const T).ok() }
}

/// `N` 8-byte words of kernel memory at `base + lo`, copied with one helper call:
/// several members of one struct for the price of one read (each read is a
/// helper call of some 30 ns, the larger part of a bind's cost).
pub struct Window<const N: usize> {
    /// Zeroed, then copied into: the verifier wants every byte written.
    bytes: [u64; N],
    /// Where the copy starts; `NOT_COPIED` when the read failed. (Small, as
    /// windows live on a stack that a chain of BPF calls shares: 512 bytes.)
    lo: u32,
}

const NOT_COPIED: u32 = u32::MAX;

impl<const N: usize> Window<N> {
    #[inline(always)]
    pub fn new(base: u64, lo: u32) -> Self {
        // Built where it is returned (a second copy of a window on the stack
        // can push a program past its 512 bytes), zeroed by 8-byte stores
        // (an initialiser becomes a call to the builtin `memset`, a byte loop).
        let mut w = MaybeUninit::<Self>::uninit();
        let p = w.as_mut_ptr();
        // SAFETY: `p` is our stack's, 8-aligned; `zero` writes the N * 8 bytes of
        // `bytes` and the helper at most as many (it checks the source: a bad address
        // is an error, never a fault); once `lo` is written every field is.
        unsafe {
            let bytes = &raw mut (*p).bytes;
            crate::maps::zero(bytes.cast(), N * 8);
            let copied = base != 0
                && generated::bpf_probe_read_kernel(
                    bytes.cast(),
                    (N * 8) as u32,
                    (base + lo as u64) as *const core::ffi::c_void,
                ) == 0;
            (&raw mut (*p).lo).write(if copied { lo } else { NOT_COPIED });
            w.assume_init()
        }
    }

    /// The `T` at `base + off` (`base` as given to `new`): from the copy
    /// where it lies inside (the offsets are the kernel's, so on another
    /// kernel it may not), else read on its own.
    #[inline(always)]
    pub fn get<T: Copy>(&self, base: u64, off: u32) -> Option<T> {
        if self.lo != NOT_COPIED
            && off >= self.lo
            && (off - self.lo) as usize + core::mem::size_of::<T>() <= N * 8
        {
            let at = (off - self.lo) as usize;
            // SAFETY: `at + size_of::<T>() <= N * 8`, checked above, so the unaligned
            // read stays in `bytes`; callers' `T` are integers, valid for any bytes.
            return Some(unsafe {
                core::ptr::read_unaligned(self.bytes.as_ptr().cast::<u8>().add(at).cast::<T>())
            });
        }
        read(base, off)
    }
}

/// Inode of the current task's network namespace (`task->nsproxy->net_ns->ns.inum`); 0 if unknown.
pub fn current_netns() -> u32 {
    let off = kernel_offsets();
    if !off.netns_known() {
        return 0;
    }
    // SAFETY: bpf_get_current_task takes no arguments; the address it returns is
    // only used through checked reads.
    let task = unsafe { generated::bpf_get_current_task() };
    let nsproxy: u64 = read(task, off.task_nsproxy).unwrap_or(0); // 0 for an exiting task
    net_inum(read(nsproxy, off.nsproxy_net_ns).unwrap_or(0))
}

/// Inode of a socket's network namespace (`sk->__sk_common.skc_net.net->ns.inum`); 0 if unknown.
pub fn sock_netns(sk: u64) -> u32 {
    let off = kernel_offsets();
    if off.sk_net == 0 {
        return 0;
    }
    net_inum(read(sk, off.sk_net).unwrap_or(0))
}

/// Inode of the network namespace at `net` (a `struct net *`); 0 if unknown.
#[inline(always)]
fn net_inum(net: u64) -> u32 {
    let off = kernel_offsets().net_ns_inum;
    if off == 0 {
        return 0;
    }
    read(net, off).unwrap_or(0)
}

/// A connection: both ends of a `struct sock_common` (a full or a timewait
/// socket), as the TCP state and TIME_WAIT programs key their maps: the
/// inode of its network namespace (0 if unknown), family, ports in host
/// order, addresses (4 or 16 bytes, network order).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FlowKey {
    pub netns: u32,
    pub family: u16,
    pub sport: u16,
    pub dport: u16,
    pub _pad: u16,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

#[inline(always)]
pub fn sock_flow(sk: u64) -> Option<FlowKey> {
    let off = kernel_offsets();
    if !off.tuple_known() {
        return None;
    }
    // The v4 addresses, ports and family lie together at the head of
    // `sock_common` (0 to 18 on 6.18): one read for all five.
    let lo = off
        .skc_daddr
        .min(off.skc_rcv_saddr)
        .min(off.skc_dport)
        .min(off.skc_num)
        .min(off.skc_family);
    let w = Window::<3>::new(sk, lo);
    let family: u16 = w.get(sk, off.skc_family)?;
    let sport: u16 = w.get(sk, off.skc_num)?;
    let dport: u16 = u16::from_be(w.get(sk, off.skc_dport)?);
    let netns = sock_netns(sk);
    let mut t = FlowKey {
        netns,
        family,
        sport,
        dport,
        _pad: 0,
        saddr: [0; 16],
        daddr: [0; 16],
    };
    if family == AF_INET6 {
        t.saddr = read(sk, off.skc_v6_rcv_saddr)?;
        t.daddr = read(sk, off.skc_v6_daddr)?;
    } else {
        t.saddr[..4].copy_from_slice(&w.get::<[u8; 4]>(sk, off.skc_rcv_saddr)?);
        t.daddr[..4].copy_from_slice(&w.get::<[u8; 4]>(sk, off.skc_daddr)?);
    }
    Some(t)
}

/// A socket's cookie (`skc_cookie`); 0 when the kernel gave it none yet.
pub fn sock_cookie(sk: u64) -> u64 {
    let off = kernel_offsets().skc_cookie;
    if off == 0 {
        return 0;
    }
    read(sk, off).unwrap_or(0)
}

/// The socket behind `fd` in the current task: its `struct sock *` and its
/// inode number. `None` when the fd is not open or not a socket (its
/// private data does not point back to it), or the offsets are unknown.
pub struct FdSocket {
    pub sk: u64,
    pub ino: u64,
}

#[inline(always)]
pub fn fd_socket(fd: i32) -> Option<FdSocket> {
    let off = kernel_offsets();
    if !off.fd_sock_known() || fd < 0 {
        return None;
    }
    // SAFETY: as in `current_netns`: no arguments, the result only read through.
    let task = unsafe { generated::bpf_get_current_task() };
    let files: u64 = read(task, off.task_files)?;
    let fdt: u64 = read(files, off.files_fdt)?;
    let table = Window::<2>::new(fdt, off.fdt_max_fds.min(off.fdt_fd));
    let max_fds: u32 = table.get(fdt, off.fdt_max_fds)?;
    if fd as u32 >= max_fds {
        return None;
    }
    let fds: u64 = table.get(fdt, off.fdt_fd)?;
    let file: u64 = read(fds, fd as u32 * 8)?;
    let f = Window::<2>::new(file, off.file_f_inode.min(off.file_private_data));
    let socket: u64 = f.get(file, off.file_private_data)?;
    // A socket's file points to it, and it back to the file: no other file's
    // private data does (the kernel compares `f_op` to `socket_file_ops`).
    let s = Window::<2>::new(socket, off.socket_file.min(off.socket_sk));
    if s.get::<u64>(socket, off.socket_file)? != file {
        return None;
    }
    let sk: u64 = s.get(socket, off.socket_sk)?;
    let inode: u64 = f.get(file, off.file_f_inode)?;
    let ino: u64 = read(inode, off.inode_i_ino).unwrap_or(0);
    Some(FdSocket { sk, ino })
}

/// The members of `sock_common` a bind record needs (port, family, reuse
/// bits, bound device, namespace, cookie: 14 to 96 on 6.18), copied with
/// one read.
pub type Common = Window<11>;

#[inline(always)]
pub fn sock_common(sk: u64) -> Common {
    let off = kernel_offsets();
    let known = |o: u32| if o == 0 { u32::MAX } else { o };
    let lo = off
        .skc_num
        .min(off.skc_family)
        .min(off.skc_reuse_bits >> 16)
        .min(known(off.skc_bound_dev_if))
        .min(known(off.sk_net))
        .min(known(off.skc_cookie));
    Window::new(sk, lo)
}

/// The socket's cookie (`skc_cookie`; 0 when the kernel gave it none yet),
/// from its `Common`.
#[inline(always)]
pub fn common_cookie(sk: u64, c: &Common) -> u64 {
    let off = kernel_offsets().skc_cookie;
    if off == 0 {
        return 0;
    }
    c.get(sk, off).unwrap_or(0)
}

/// The inode of a socket's network namespace (0 if unknown), from its `Common`.
#[inline(always)]
pub fn common_netns(sk: u64, c: &Common) -> u32 {
    let off = kernel_offsets().sk_net;
    if off == 0 {
        return 0;
    }
    net_inum(c.get(sk, off).unwrap_or(0))
}

/// The local end of an inet socket: family, port (host order) and address
/// (4 or 16 bytes); `None` for other families, which have no such end.
pub struct Local {
    pub family: u16,
    pub port: u16,
    pub addr: [u8; 16],
}

pub fn sock_local(sk: u64) -> Option<Local> {
    let off = kernel_offsets();
    let family: u16 = read(sk, off.skc_family)?;
    let mut addr = [0u8; 16];
    match family {
        AF_INET6 => addr = read(sk, off.skc_v6_rcv_saddr)?,
        AF_INET => {
            let v4: [u8; 4] = read(sk, off.skc_rcv_saddr)?;
            addr[..4].copy_from_slice(&v4);
        }
        _ => return None,
    }
    let port: u16 = read(sk, off.skc_num)?;
    Some(Local { family, port, addr })
}

/// One bit of `inet_sock` (`byte << 8 | bit`, see `KernelOffsets`), from a
/// window over the flag bytes (see `inet_flags`).
#[inline(always)]
pub fn inet_bit(sk: u64, flags: &Window<1>, at: u32) -> Option<bool> {
    if at == 0 {
        return None;
    }
    let byte: u8 = flags.get(sk, at >> 8)?;
    Some(byte >> (at & 7) & 1 != 0)
}

/// The bytes of `inet_sock` that hold IP_FREEBIND, IP_TRANSPARENT and
/// IP_BIND_ADDRESS_NO_PORT (one or two adjacent bytes on every kernel).
#[inline(always)]
pub fn inet_flags(sk: u64) -> Window<1> {
    let off = kernel_offsets();
    let lo = (off.inet_freebind >> 8)
        .min(off.inet_transparent >> 8)
        .min(off.inet_bind_address_no_port >> 8);
    Window::new(sk, lo)
}

/// SO_REUSEADDR and SO_REUSEPORT of a socket (its `skc_reuse`, `skc_reuseport`
/// bitfields), if their place is known.
#[inline(always)]
pub fn sock_reuse(sk: u64) -> Option<(bool, bool)> {
    sock_reuse_in(
        sk,
        &Window::<1>::new(sk, kernel_offsets().skc_reuse_bits >> 16),
    )
}

#[inline(always)]
pub fn sock_reuse_in<const N: usize>(sk: u64, common: &Window<N>) -> Option<(bool, bool)> {
    let bits = kernel_offsets().skc_reuse_bits;
    if bits == 0 {
        return None;
    }
    let byte: u8 = common.get(sk, bits >> 16)?;
    let reuse = (byte >> ((bits >> 8) & 7)) & 0xf;
    let reuseport = (byte >> (bits & 7)) & 1;
    Some((reuse != 0, reuseport != 0))
}
