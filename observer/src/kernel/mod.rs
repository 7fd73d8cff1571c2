//! The kernel's interfaces, each in one place: the eBPF object's loading and
//! attaching (`loader`), the layouts it needs from BTF (`btf`, `btf_offsets`)
//! and /proc/kallsyms, and what userspace asks the kernel directly —
//! sock_diag, network namespaces, cgroups, mounts.

pub mod btf;
pub mod btf_offsets;
pub mod cgroups;
pub mod kallsyms;
pub mod loader;
pub mod mounts;
pub mod netns;
pub mod procs;
pub mod ring;
pub mod sock_diag;
