//! Configuration the daemon writes into the eBPF programs' globals before loading.

/// Byte offsets of kernel struct members, read by the daemon from the running
/// kernel's BTF (no CO-RE in Rust eBPF). Zero means "unknown": the field that
/// needs it is reported as unknown rather than read from a guessed place.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `task_struct.nsproxy`
    pub task_nsproxy: u32,
    /// `nsproxy.net_ns`
    pub nsproxy_net_ns: u32,
    /// `net.ns` + `ns_common.inum`
    pub net_ns_inum: u32,
    pub _reserved: u32,
}

impl KernelOffsets {
    pub const fn netns_known(&self) -> bool {
        self.task_nsproxy != 0 && self.nsproxy_net_ns != 0 && self.net_ns_inum != 0
    }
}

/// Name of the global in the eBPF object holding the [`KernelOffsets`].
pub const KERNEL_OFFSETS_SYMBOL: &str = "KERNEL_OFFSETS";

#[cfg(feature = "user")]
unsafe impl aya::Pod for KernelOffsets {}
