//! Who made a call: the part every process-related record starts with,
//! filled by one helper on the kernel side.

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskHeader {
    /// `bpf_get_current_pid_tgid()`: tgid in the high half, tid in the low.
    pub pid_tgid: u64,
    /// `bpf_get_current_uid_gid()`: gid in the high half, uid in the low.
    pub uid_gid: u64,
    pub cgroup_id: u64,
    /// Inode of the task's network namespace (a bind record: its socket's, where
    /// the bind happens); 0 when unknown.
    pub netns: u32,
    pub _pad: u32,
    pub comm: [u8; 16],
}

impl TaskHeader {
    pub const ZERO: TaskHeader = TaskHeader {
        pid_tgid: 0,
        uid_gid: 0,
        cgroup_id: 0,
        netns: 0,
        _pad: 0,
        comm: [0; 16],
    };

    pub const fn pid(&self) -> u32 {
        (self.pid_tgid >> 32) as u32
    }

    pub const fn tid(&self) -> u32 {
        self.pid_tgid as u32
    }

    pub const fn uid(&self) -> u32 {
        self.uid_gid as u32
    }
}
