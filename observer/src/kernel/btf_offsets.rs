//! Kernel struct offsets for the eBPF side, read from the running kernel's BTF
//! (Rust eBPF has no CO-RE relocations). A member that cannot be found leaves its
//! offsets 0, and the eBPF side then reports the fields that need it as unknown.

use crate::kernel::btf::Btf;
use observer_common::config::KernelOffsets;

const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Where the timer programs find a timewait socket's timer and substate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimeWaitOffsets {
    pub tw_timer: Option<u32>,
    pub tw_substate: Option<u32>,
    pub timer_function: Option<u32>,
    pub timer_expires: Option<u32>,
    pub tw_rcv_nxt: Option<u32>,
    pub tw_snd_nxt: Option<u32>,
}

/// Everything read from the kernel's BTF, in one pass.
pub fn read() -> (KernelOffsets, TimeWaitOffsets) {
    let btf = match Btf::from_file(VMLINUX_BTF) {
        Ok(btf) => btf,
        Err(e) => {
            log::warn!("no kernel BTF ({e}): netns and socket addresses will be null");
            return (KernelOffsets::ZERO, TimeWaitOffsets::default());
        }
    };
    let k = kernel_offsets(&btf);
    let tw = TimeWaitOffsets {
        tw_timer: member_offset(&btf, "inet_timewait_sock", "tw_timer"),
        tw_substate: member_offset(&btf, "inet_timewait_sock", "tw_substate"),
        timer_function: member_offset(&btf, "timer_list", "function"),
        timer_expires: member_offset(&btf, "timer_list", "expires"),
        // `tcp_timewait_sock.tw_rcv_nxt`/`tw_snd_nxt` are macros for these.
        tw_rcv_nxt: member_offset(&btf, "sock_common", "skc_tw_rcv_nxt"),
        tw_snd_nxt: member_offset(&btf, "sock_common", "skc_tw_snd_nxt"),
    };
    log::debug!("kernel offsets from BTF: {k:?}, {tw:?}");
    (k, tw)
}

fn kernel_offsets(btf: &Btf) -> KernelOffsets {
    let off = |ty: &str, member: &str| {
        let o = member_offset(btf, ty, member);
        if o.is_none() {
            log::warn!("BTF: no member {ty}.{member}: the fields that need it will be null");
        }
        o
    };
    let mut k = KernelOffsets::ZERO;
    if let (Some(a), Some(b), Some(c), Some(d)) = (
        off("task_struct", "nsproxy"),
        off("nsproxy", "net_ns"),
        off("net", "ns"),
        off("ns_common", "inum"),
    ) {
        (k.task_nsproxy, k.nsproxy_net_ns, k.net_ns_inum) = (a, b, c + d);
    }
    k.sk_net = off("sock_common", "skc_net").unwrap_or(0);
    let chain = [
        off("task_struct", "files"),
        off("files_struct", "fdt"),
        off("fdtable", "max_fds"),
        off("fdtable", "fd"),
        off("file", "private_data"),
        off("socket", "sk"),
        off("sock_common", "skc_family"),
        off("sock_common", "skc_num"),
        off("sock_common", "skc_rcv_saddr"),
        off("sock_common", "skc_v6_rcv_saddr"),
    ];
    if let [
        Some(files),
        Some(fdt),
        Some(max_fds),
        Some(fd),
        Some(private_data),
        Some(sk),
        Some(family),
        Some(num),
        Some(saddr),
        Some(saddr6),
    ] = chain
    {
        k.task_files = files;
        k.files_fdt = fdt;
        k.fdt_max_fds = max_fds;
        k.fdt_fd = fd;
        k.file_private_data = private_data;
        k.socket_sk = sk;
        k.skc_family = family;
        k.skc_num = num;
        k.skc_rcv_saddr = saddr;
        k.skc_v6_rcv_saddr = saddr6;
    }
    // (All four or none: `tuple_known` looks at the others, skc_daddr being at 0.)
    if let [Some(dport), Some(daddr), Some(daddr6), Some(cookie)] = [
        off("sock_common", "skc_dport"),
        off("sock_common", "skc_daddr"),
        off("sock_common", "skc_v6_daddr"),
        off("sock_common", "skc_cookie"),
    ] {
        k.skc_dport = dport;
        k.skc_daddr = daddr;
        k.skc_v6_daddr = daddr6;
        k.skc_cookie = cookie;
    }
    k.sk_type = off("sock", "sk_type").unwrap_or(0);
    k.sk_protocol = off("sock", "sk_protocol").unwrap_or(0);
    k.skc_bound_dev_if = off("sock_common", "skc_bound_dev_if").unwrap_or(0);
    if let [Some(f_inode), Some(socket_file), Some(i_ino)] = [
        off("file", "f_inode"),
        off("socket", "file"),
        off("inode", "i_ino"),
    ] {
        (k.file_f_inode, k.socket_file, k.inode_i_ino) = (f_inode, socket_file, i_ino);
    }
    [
        k.inet_freebind,
        k.inet_transparent,
        k.inet_bind_address_no_port,
    ] = inet_bits(btf);
    // The reuse bitfields share one byte (skc_reuse:4, skc_reuseport:1, …).
    if let (Some(reuse), Some(reuseport)) = (
        member_bit_offset(btf, "sock_common", "skc_reuse"),
        member_bit_offset(btf, "sock_common", "skc_reuseport"),
    ) && reuse / 8 == reuseport / 8
    {
        k.skc_reuse_bits = (reuse / 8) << 16 | (reuse % 8) << 8 | (reuseport % 8);
    }
    k
}

/// Where `inet_sock` keeps IP_FREEBIND, IP_TRANSPARENT and
/// IP_BIND_ADDRESS_NO_PORT, as `byte << 8 | bit` (0: unknown): bitfields of
/// their own until 6.5, bits of `inet_flags` numbered by an enum since.
fn inet_bits(btf: &Btf) -> [u32; 3] {
    const NAMES: [(&str, &str); 3] = [
        ("freebind", "INET_FLAGS_FREEBIND"),
        ("transparent", "INET_FLAGS_TRANSPARENT"),
        ("bind_address_no_port", "INET_FLAGS_BIND_ADDRESS_NO_PORT"),
    ];
    let at = |bit: u32| (bit / 8) << 8 | (bit % 8);
    if let Some(flags) = member_bit_offset(btf, "inet_sock", "inet_flags") {
        let values = btf.enum_values(&NAMES.map(|(_, e)| e));
        return NAMES.map(|(_, e)| values.get(e).map_or(0, |&v| at(flags + v)));
    }
    NAMES.map(|(m, _)| member_bit_offset(btf, "inet_sock", m).map_or(0, at))
}

/// Byte offset of `member` in struct `ty`, looking into anonymous structs and unions.
fn member_offset(btf: &Btf, ty: &str, member: &str) -> Option<u32> {
    btf.member_offset(ty, member)
}

/// Bit offset of `member` (a bitfield, or any member) in struct `ty`.
fn member_bit_offset(btf: &Btf, ty: &str, member: &str) -> Option<u32> {
    btf.member_bit_offset(ty, member)
}
