//! Kernel struct offsets for the eBPF side, read from the running kernel's BTF
//! (Rust eBPF has no CO-RE relocations). A member that cannot be found leaves its
//! offsets 0, and the eBPF side then reports the fields that need it as unknown.

use btf_rs::{Btf, Type};
use observer_common::config::KernelOffsets;

const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

pub fn kernel_offsets() -> KernelOffsets {
    let btf = match Btf::from_file(VMLINUX_BTF) {
        Ok(btf) => btf,
        Err(e) => {
            log::warn!(
                "no kernel BTF ({VMLINUX_BTF}: {e}): netns and socket addresses will be null"
            );
            return KernelOffsets::ZERO;
        }
    };
    let off = |ty: &str, member: &str| {
        let o = member_offset(&btf, ty, member);
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
    // The reuse bitfields share one byte (skc_reuse:4, skc_reuseport:1, …).
    if let (Some(reuse), Some(reuseport)) = (
        member_bit_offset(&btf, "sock_common", "skc_reuse"),
        member_bit_offset(&btf, "sock_common", "skc_reuseport"),
    ) && reuse / 8 == reuseport / 8
    {
        k.skc_reuse_bits = (reuse / 8) << 16 | (reuse % 8) << 8 | (reuseport % 8);
    }
    log::debug!("kernel offsets from BTF: {k:?}");
    drop(btf);
    // Parsing the kernel's BTF takes tens of MB of small allocations: give
    // them back to the system rather than keep them as the daemon's RSS.
    unsafe { libc::malloc_trim(0) };
    k
}

/// Byte offset of `member` in struct `ty`, looking into anonymous structs and unions.
fn member_offset(btf: &Btf, ty: &str, member: &str) -> Option<u32> {
    member_bit_offset(btf, ty, member).map(|bits| bits / 8)
}

/// Bit offset of `member` (a bitfield, or any member) in struct `ty`.
fn member_bit_offset(btf: &Btf, ty: &str, member: &str) -> Option<u32> {
    btf.resolve_types_by_name(ty)
        .ok()?
        .iter()
        .find_map(|t| match t {
            Type::Struct(s) => find_in(btf, s, member),
            _ => None,
        })
}

fn find_in(btf: &Btf, s: &btf_rs::Struct, member: &str) -> Option<u32> {
    s.members.iter().find_map(|m| {
        let name = btf.resolve_name(m).unwrap_or_default();
        if name == member {
            return Some(m.bit_offset());
        }
        if !name.is_empty() {
            return None;
        }
        // Anonymous struct or union: its members are members of the outer struct.
        match btf.resolve_chained_type(m).ok()? {
            Type::Struct(inner) | Type::Union(inner) => {
                find_in(btf, &inner, member).map(|o| o + m.bit_offset())
            }
            _ => None,
        }
    })
}
