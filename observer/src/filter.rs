//! `observer run` filters: which records reach the output. They combine with AND;
//! a filter that matches nothing is not an error.

use std::collections::BTreeSet;

/// The event kinds `--events` can name (`time_wait` is both enter and exit).
pub const EVENT_KINDS: [&str; 5] = ["bind", "tcp_state", "time_wait", "listen", "connect"];

#[derive(Debug, Default, Clone)]
pub struct Filter {
    pub pids: BTreeSet<u32>,
    pub ports: BTreeSet<u16>,
    pub comm: Option<String>,
    pub uid: Option<u32>,
    /// cgroup2 path relative to the mount, `/a/b`: the cgroup and its descendants.
    pub cgroup: Option<String>,
    pub netns: Option<u32>,
    pub errors_only: bool,
    /// Empty: every kind.
    pub events: BTreeSet<String>,
}

/// What a filter looks at in a record.
#[derive(Debug, Default)]
pub struct Facts<'a> {
    /// `bind`, `tcp_state`, `time_wait_enter`, …
    pub event: &'a str,
    pub pid: Option<u32>,
    pub ports: [Option<u16>; 2],
    pub comm: Option<&'a str>,
    pub uid: Option<u32>,
    pub cgroup: Option<&'a str>,
    pub netns: Option<u32>,
    pub failed: bool,
}

impl Filter {
    pub fn pass(&self, f: &Facts) -> bool {
        let kind = f
            .event
            .strip_suffix("_enter")
            .or(f.event.strip_suffix("_exit"))
            .unwrap_or(f.event);
        (self.events.is_empty() || self.events.contains(kind))
            && (!self.errors_only || f.failed)
            && (self.pids.is_empty() || f.pid.is_some_and(|p| self.pids.contains(&p)))
            && (self.ports.is_empty() || f.ports.iter().flatten().any(|p| self.ports.contains(p)))
            && self.comm.as_deref().is_none_or(|c| f.comm == Some(c))
            && self.uid.is_none_or(|u| f.uid == Some(u))
            && self.netns.is_none_or(|n| f.netns == Some(n))
            && self.cgroup.as_deref().is_none_or(|want| {
                f.cgroup.is_some_and(|have| {
                    want == "/"
                        || have == want
                        || have.strip_prefix(want).is_some_and(|r| r.starts_with('/'))
                })
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bind(pid: u32, port: u16, failed: bool) -> Facts<'static> {
        Facts {
            event: "bind",
            pid: Some(pid),
            ports: [Some(port), None],
            comm: Some("nginx"),
            uid: Some(0),
            cgroup: Some("/system.slice/nginx.service"),
            netns: Some(7),
            failed,
        }
    }

    #[test]
    fn filters_combine_with_and() {
        let mut f = Filter::default();
        assert!(f.pass(&bind(1, 80, false)));
        f.ports.insert(80);
        f.errors_only = true;
        assert!(f.pass(&bind(1, 80, true)));
        assert!(!f.pass(&bind(1, 80, false)));
        assert!(!f.pass(&bind(1, 81, true)));
        f.pids.insert(2);
        assert!(!f.pass(&bind(1, 80, true)));
    }

    #[test]
    fn cgroup_matches_itself_and_descendants_only() {
        let mut f = Filter {
            cgroup: Some("/system.slice".into()),
            ..Filter::default()
        };
        assert!(f.pass(&bind(1, 80, false)));
        f.cgroup = Some("/system.slice/nginx.service".into());
        assert!(f.pass(&bind(1, 80, false)));
        f.cgroup = Some("/system.sl".into());
        assert!(
            !f.pass(&bind(1, 80, false)),
            "a prefix of a name is not a parent"
        );
        let mut no_cgroup = bind(1, 80, false);
        no_cgroup.cgroup = None;
        assert!(!f.pass(&no_cgroup));
    }

    #[test]
    fn events_name_kinds_and_time_wait_covers_both() {
        let f = Filter {
            events: ["time_wait".to_string()].into(),
            ..Filter::default()
        };
        let mut e = bind(1, 80, false);
        assert!(!f.pass(&e));
        e.event = "time_wait_exit";
        assert!(f.pass(&e));
        let no_pid = Filter {
            pids: [5].into(),
            ..Filter::default()
        };
        e.pid = None;
        assert!(
            !no_pid.pass(&e),
            "an event without a process does not match a pid filter"
        );
    }
}
