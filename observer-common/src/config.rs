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
    /// `sock_common.skc_net` (a `possible_net_t`, whose first member is the `struct net *`)
    pub sk_net: u32,
    /// fd → socket: `task_struct.files`, `files_struct.fdt`, `fdtable.max_fds`,
    /// `fdtable.fd`, `file.private_data` (a `struct socket *`), `socket.sk`;
    /// `socket.file` points back to the file (so the file is a socket).
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdt_max_fds: u32,
    pub fdt_fd: u32,
    pub file_private_data: u32,
    pub socket_sk: u32,
    pub socket_file: u32,
    /// `sock_common` members: family, local port (host order), local IPv4 and IPv6 address.
    pub skc_family: u32,
    pub skc_num: u32,
    pub skc_rcv_saddr: u32,
    pub skc_v6_rcv_saddr: u32,
    /// `sock_common` members of the remote end and the cookie: `skc_dport`
    /// (network order), `skc_daddr`, `skc_v6_daddr`, `skc_cookie`.
    pub skc_dport: u32,
    pub skc_daddr: u32,
    pub skc_v6_daddr: u32,
    pub skc_cookie: u32,
    /// The byte of `sock_common` holding the bitfields `skc_reuse:4` and
    /// `skc_reuseport:1`: `byte << 16 | reuse_bit << 8 | reuseport_bit`; 0 if unknown.
    pub skc_reuse_bits: u32,
    /// `sock.sk_type`, `sock.sk_protocol` (u16 each), `sock_common.skc_bound_dev_if`.
    pub sk_type: u32,
    pub sk_protocol: u32,
    pub skc_bound_dev_if: u32,
    /// `file.f_inode`, `inode.i_ino`.
    pub file_f_inode: u32,
    pub inode_i_ino: u32,
    /// Where `inet_sock` keeps IP_FREEBIND, IP_TRANSPARENT and
    /// IP_BIND_ADDRESS_NO_PORT: `byte << 8 | bit` each; 0 if unknown.
    pub inet_freebind: u32,
    pub inet_transparent: u32,
    pub inet_bind_address_no_port: u32,
    pub _pad: u32,
}

impl KernelOffsets {
    pub const ZERO: KernelOffsets = KernelOffsets {
        task_nsproxy: 0,
        nsproxy_net_ns: 0,
        net_ns_inum: 0,
        sk_net: 0,
        task_files: 0,
        files_fdt: 0,
        fdt_max_fds: 0,
        fdt_fd: 0,
        file_private_data: 0,
        socket_sk: 0,
        socket_file: 0,
        skc_family: 0,
        skc_num: 0,
        skc_rcv_saddr: 0,
        skc_v6_rcv_saddr: 0,
        skc_dport: 0,
        skc_daddr: 0,
        skc_v6_daddr: 0,
        skc_cookie: 0,
        skc_reuse_bits: 0,
        sk_type: 0,
        sk_protocol: 0,
        skc_bound_dev_if: 0,
        file_f_inode: 0,
        inode_i_ino: 0,
        inet_freebind: 0,
        inet_transparent: 0,
        inet_bind_address_no_port: 0,
        _pad: 0,
    };

    /// The socket behind a file descriptor can be read (and told from other files).
    pub const fn fd_sock_known(&self) -> bool {
        self.task_files != 0
            && self.fdt_fd != 0
            && self.file_private_data != 0
            && self.file_f_inode != 0
            && self.socket_sk != 0
            && self.socket_file != 0
            && self.skc_num != 0
    }

    /// Both ends of a `sock_common` can be read. (`skc_daddr` is its first
    /// member: 0 is its real offset, not "unknown".)
    pub const fn tuple_known(&self) -> bool {
        self.skc_family != 0
            && self.skc_num != 0
            && self.skc_dport != 0
            && self.skc_rcv_saddr != 0
            && self.skc_v6_rcv_saddr != 0
            && self.skc_v6_daddr != 0
    }

    pub const fn netns_known(&self) -> bool {
        self.task_nsproxy != 0 && self.nsproxy_net_ns != 0 && self.net_ns_inum != 0
    }
}

/// Name of the global in the eBPF object holding the [`KernelOffsets`].
pub const KERNEL_OFFSETS_SYMBOL: &str = "KERNEL_OFFSETS";

/// The global (a u64) holding the bytes a CPU submits to the ring buffer
/// between two wakeups of the daemon.
pub const WAKE_EVERY_BYTES_SYMBOL: &str = "WAKE_EVERY_BYTES";

#[cfg(feature = "user")]
unsafe impl aya::Pod for KernelOffsets {}
