//! Who made a call: the process part of `bind`, `listen` and `connect`,
//! decoded from the kernel's one `TaskHeader`.

use std::sync::Arc;

use observer_common::task::TaskHeader;
use serde::Serialize;

use super::c_str;

#[derive(Serialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct Process {
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub uid: u32,
    pub cgroup_id: u64,
    /// The cgroup2 path of `cgroup_id`, and the container id it names, if
    /// any: filled by the stream (`Cgroups`), not by the kernel. Shared with
    /// the caches they come from (a record per bind must not copy them).
    pub cgroup: Option<Arc<str>>,
    pub container_id: Option<Arc<str>>,
    /// The systemd unit its cgroup names, its parent and its command line
    /// (at most 256 bytes): filled by the stream from /proc, `null` when the
    /// process was gone before it looked.
    pub unit: Option<Arc<str>>,
    pub ppid: Option<u32>,
    pub cmdline: Option<Arc<str>>,
    pub netns: Option<u32>,
}

impl Process {
    pub fn of(t: &TaskHeader) -> Process {
        Process {
            pid: t.pid(),
            tid: t.tid(),
            comm: c_str(&t.comm),
            uid: t.uid(),
            cgroup_id: t.cgroup_id,
            cgroup: None,
            container_id: None,
            unit: None,
            ppid: None,
            cmdline: None,
            netns: (t.netns != 0).then_some(t.netns),
        }
    }
}
