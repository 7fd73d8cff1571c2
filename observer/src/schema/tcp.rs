//! `tcp_state` records.

use std::net::SocketAddr;

use observer_common::{TcpStateRecord, tcp::flags};
use serde::Serialize;

use super::{c_str, ip_from, ip_string};
use crate::names::{Name, family_name, tcp_state_name};

#[derive(Serialize, Debug, Clone)]
pub struct TcpState {
    /// The kernel's socket address, in hex: stable for the socket's life.
    pub sk: String,
    /// The process that caused the change; `null` when it happened in softirq
    /// context (packet receive, timers), where the current task is unrelated.
    pub pid: Option<u32>,
    pub tid: Option<u32>,
    pub comm: Option<String>,
    pub uid: Option<u32>,
    pub netns: Option<u32>,
    pub family: Name,
    pub saddr: String,
    pub sport: u16,
    pub daddr: String,
    pub dport: u16,
    pub old: &'static str,
    pub new: &'static str,
    /// Time spent in `old`; `null` when the socket's previous change was not seen.
    pub prev_state_ms: Option<f64>,
    /// The socket's SO_REUSEADDR / SO_REUSEPORT (`null` when unreadable).
    pub reuseaddr: Option<bool>,
    pub reuseport: Option<bool>,
}

impl TcpState {
    pub fn from_record(r: &TcpStateRecord) -> TcpState {
        let task = (r.flags & flags::PROCESS_CONTEXT != 0).then_some(&r.task);
        let (src, dst) = tuple(r);
        TcpState {
            sk: format!("{:#x}", r.skaddr),
            pid: task.map(|t| t.pid()),
            tid: task.map(|t| t.tid()),
            comm: task.map(|t| c_str(&t.comm)),
            uid: task.map(|t| t.uid()),
            netns: (r.netns != 0).then_some(r.netns),
            family: family_name(r.family),
            saddr: ip_string(src.ip()),
            sport: src.port(),
            daddr: ip_string(dst.ip()),
            dport: dst.port(),
            old: tcp_state_name(r.oldstate),
            new: tcp_state_name(r.newstate),
            prev_state_ms: (r.flags & flags::PREV_KNOWN != 0)
                .then(|| (r.prev_state_ns / 1000) as f64 / 1000.0),
            reuseaddr: reuse(r).map(|(a, _)| a),
            reuseport: reuse(r).map(|(_, p)| p),
        }
    }
}

/// The socket's SO_REUSEADDR and SO_REUSEPORT, when the kernel side read them.
pub fn reuse(r: &TcpStateRecord) -> Option<(bool, bool)> {
    (r.flags & flags::REUSE_KNOWN != 0).then_some((
        r.flags & flags::REUSEADDR != 0,
        r.flags & flags::REUSEPORT != 0,
    ))
}

/// The socket's (local, remote) ends.
pub fn tuple(r: &TcpStateRecord) -> (SocketAddr, SocketAddr) {
    (
        SocketAddr::new(ip_from(r.family, &r.saddr), r.sport),
        SocketAddr::new(ip_from(r.family, &r.daddr), r.dport),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use observer_common::tcp::state;

    #[test]
    fn softirq_change_has_no_process() {
        let mut r = TcpStateRecord::zeroed();
        r.skaddr = 0xffff888100a0b000;
        r.family = 2;
        r.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        r.daddr[..4].copy_from_slice(&[127, 0, 0, 2]);
        r.sport = 5700;
        r.dport = 41000;
        r.oldstate = state::FIN_WAIT2;
        r.newstate = state::CLOSE;
        r.prev_state_ns = 1_234_567;
        r.flags = flags::PREV_KNOWN;
        r.task.pid_tgid = 99 << 32; // whatever was interrupted: must not show
        let json = serde_json::to_value(TcpState::from_record(&r)).unwrap();
        assert_eq!(json["sk"], "0xffff888100a0b000");
        assert_eq!(
            (json["old"].as_str(), json["new"].as_str()),
            (Some("FIN_WAIT2"), Some("CLOSE"))
        );
        assert_eq!(json["pid"], serde_json::Value::Null);
        assert_eq!(json["comm"], serde_json::Value::Null);
        assert_eq!(json["prev_state_ms"], 1.234);
        assert_eq!(
            (json["saddr"].as_str(), json["dport"].as_u64()),
            (Some("127.0.0.1"), Some(41000))
        );
    }

    #[test]
    fn process_context_change_names_the_process() {
        let mut r = TcpStateRecord::zeroed();
        r.family = 10;
        r.saddr = std::net::Ipv6Addr::LOCALHOST.octets();
        r.flags = flags::PROCESS_CONTEXT;
        r.task.pid_tgid = (7 << 32) | 8;
        r.task.comm[..4].copy_from_slice(b"curl");
        let t = TcpState::from_record(&r);
        assert_eq!(
            (t.pid, t.tid, t.comm.as_deref()),
            (Some(7), Some(8), Some("curl"))
        );
        assert_eq!((t.saddr.as_str(), t.prev_state_ms), ("::1", None));
    }
}
