//! Kernel struct offsets for the eBPF side, read from the running kernel's BTF
//! (Rust eBPF has no CO-RE relocations). A member that cannot be found leaves its
//! offset 0, and the eBPF side then reports the field as unknown.

use btf_rs::{Btf, Type};
use observer_common::config::KernelOffsets;

const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

pub fn kernel_offsets() -> KernelOffsets {
    let btf = match Btf::from_file(VMLINUX_BTF) {
        Ok(btf) => btf,
        Err(e) => {
            log::warn!("no kernel BTF ({VMLINUX_BTF}: {e}): netns will be null");
            return KernelOffsets::default();
        }
    };
    let off = |ty: &str, member: &str| {
        let o = member_offset(&btf, ty, member);
        if o.is_none() {
            log::warn!("BTF: no member {ty}.{member}: netns will be null");
        }
        o
    };
    let netns = (|| {
        Some((
            off("task_struct", "nsproxy")?,
            off("nsproxy", "net_ns")?,
            off("net", "ns")? + off("ns_common", "inum")?,
        ))
    })();
    match netns {
        Some((task_nsproxy, nsproxy_net_ns, net_ns_inum)) => KernelOffsets {
            task_nsproxy,
            nsproxy_net_ns,
            net_ns_inum,
            _reserved: 0,
        },
        None => KernelOffsets::default(),
    }
}

/// Byte offset of `member` in struct `ty`, looking into anonymous structs and unions.
fn member_offset(btf: &Btf, ty: &str, member: &str) -> Option<u32> {
    btf.resolve_types_by_name(ty)
        .ok()?
        .iter()
        .find_map(|t| match t {
            Type::Struct(s) => find_in(btf, s, member),
            _ => None,
        })
        .map(|bits| bits / 8)
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
