//! `observer run` filters: which records reach the output. They combine with AND;
//! a filter that matches nothing is not an error.

use std::collections::BTreeSet;

use observer_common::filter::{FilterConfig, event, on};

use crate::schema::{Event, Process};

/// The event kinds `--events` can name (`time_wait` is both enter and exit).
pub const EVENT_KINDS: [&str; 5] = ["bind", "tcp_state", "time_wait", "listen", "connect"];

/// The kernel's bit for each kind `--events` names.
const EVENT_BITS: [u32; 5] = [
    event::BIND,
    event::TCP_STATE,
    event::TIME_WAIT,
    event::LISTEN,
    event::CONNECT,
];

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

impl<'a> Facts<'a> {
    /// What the filters look at in a record; `None` for the daemon's own
    /// records, which are never filtered.
    pub fn of(event: &'a Event) -> Option<Facts<'a>> {
        let call = |p: &'a Process, ports, failed| Facts {
            event: event.name(),
            pid: Some(p.pid),
            ports,
            comm: Some(&p.comm),
            uid: Some(p.uid),
            cgroup: p.cgroup.as_deref(),
            netns: p.netns,
            failed,
        };
        Some(match event {
            Event::Bind(b) => call(&b.process, [b.port, b.bound_port], b.errno.is_some()),
            Event::Listen(c) | Event::Connect(c) => call(&c.process, [c.lport, c.dport], true),
            Event::TcpState(t) => Facts {
                event: event.name(),
                pid: t.pid,
                ports: [Some(t.sport), Some(t.dport)],
                comm: t.comm.as_deref(),
                uid: t.uid,
                cgroup: None,
                netns: t.netns,
                failed: false,
            },
            Event::TimeWaitEnter(e) => Facts {
                event: event.name(),
                pid: e.pid,
                ports: [Some(e.flow.sport), Some(e.flow.dport)],
                comm: e.comm.as_deref(),
                uid: e.uid,
                cgroup: None,
                netns: Some(e.flow.netns),
                failed: false,
            },
            Event::TimeWaitExit(e) => Facts {
                event: event.name(),
                ports: [Some(e.flow.sport), Some(e.flow.dport)],
                netns: Some(e.flow.netns),
                ..Facts::default()
            },
            // No process: a pid, comm, uid, cgroup or port filter keeps it
            // out; it passes --errors-only (it warns of failures to come).
            Event::PortPressure(p) => Facts {
                event: event.name(),
                netns: Some(p.netns),
                failed: true,
                ..Facts::default()
            },
            Event::ObserverStart(_) | Event::Lost(_) | Event::Stats(_) | Event::ObserverStop(_) => {
                return None;
            }
        })
    }
}

impl Filter {
    /// The flags in force, by name (`port,netns`); empty when nothing is filtered.
    pub fn describe(&self) -> String {
        [
            ("pid", !self.pids.is_empty()),
            ("port", !self.ports.is_empty()),
            ("comm", self.comm.is_some()),
            ("uid", self.uid.is_some()),
            ("cgroup", self.cgroup.is_some()),
            ("netns", self.netns.is_some()),
            ("errors_only", self.errors_only),
            ("events", !self.events.is_empty()),
        ]
        .iter()
        .filter(|(_, on)| *on)
        .map(|(name, _)| *name)
        .collect::<Vec<_>>()
        .join(",")
    }

    /// Whether a record goes to the output.
    pub fn keeps(&self, event: &Event) -> bool {
        Facts::of(event).is_none_or(|f| self.pass(&f))
    }

    /// The part the kernel programs apply (everything but a `--comm` longer
    /// than the kernel keeps: 15 bytes; that one is applied here only).
    pub fn kernel(&self) -> FilterConfig {
        let mut k = FilterConfig::NONE;
        if !self.events.is_empty() {
            k.events = EVENT_KINDS
                .iter()
                .zip(EVENT_BITS)
                .filter(|(name, _)| self.events.contains(**name))
                .fold(0, |m, (_, bit)| m | bit);
        }
        let mut set = |on: bool, bit: u32| {
            if on {
                k.flags |= bit;
            }
        };
        set(self.errors_only, on::ERRORS_ONLY);
        set(!self.pids.is_empty(), on::PIDS);
        set(!self.ports.is_empty(), on::PORTS);
        set(self.cgroup.is_some(), on::CGROUP);
        if let Some(uid) = self.uid {
            k.flags |= on::UID;
            k.uid = uid;
        }
        if let Some(netns) = self.netns {
            k.flags |= on::NETNS;
            k.netns = netns;
        }
        if let Some(comm) = self.comm.as_deref().filter(|c| c.len() < 16) {
            k.flags |= on::COMM;
            k.comm[..comm.len()].copy_from_slice(comm.as_bytes());
        }
        k
    }

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
    fn the_kernel_gets_every_filter_it_can_apply() {
        let f = Filter {
            pids: [7].into(),
            comm: Some("nginx".into()),
            uid: Some(33),
            errors_only: true,
            events: ["bind".to_string(), "time_wait".to_string()].into(),
            ..Filter::default()
        };
        let k = f.kernel();
        assert_eq!(k.events, event::BIND | event::TIME_WAIT);
        assert!(k.has(on::PIDS) && k.has(on::UID) && k.has(on::ERRORS_ONLY) && k.has(on::COMM));
        assert!(!k.has(on::PORTS) && !k.has(on::NETNS) && !k.has(on::CGROUP));
        assert_eq!((k.uid, &k.comm[..6]), (33, &b"nginx\0"[..]));
        let long = Filter {
            comm: Some("a-name-longer-than-15".into()),
            ..Filter::default()
        };
        assert!(!long.kernel().has(on::COMM), "left to userspace");
        assert_eq!(Filter::default().kernel(), FilterConfig::NONE);
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
