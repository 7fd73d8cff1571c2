//! Schema v1 records, built from kernel records and serialized as JSON Lines.

mod bind;
#[cfg(test)]
mod readme;
mod sockcall;
mod tcp;

use std::net::{Ipv4Addr, Ipv6Addr};

use serde::Serialize;

pub use bind::Bind;
pub use sockcall::SockCall;
pub use tcp::{TcpState, reuse, tuple};

pub const SCHEMA_VERSION: u8 = 1;

/// An address from a record's 16-byte field: IPv4 in the first 4 bytes for AF_INET.
pub fn ip_from(family: u16, bytes: &[u8; 16]) -> std::net::IpAddr {
    if i32::from(family) == libc::AF_INET {
        Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).into()
    } else {
        Ipv6Addr::from(*bytes).into()
    }
}

/// What the caller asked to bind to.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Target {
    pub family: Option<u16>,
    pub addr: Option<String>,
    pub port: Option<u16>,
}

/// A caller's raw sockaddr: as much as its length holds.
pub fn sockaddr_target(sa: &[u8]) -> Target {
    let Some(family) = sa.get(..2).map(|b| u16::from_ne_bytes([b[0], b[1]])) else {
        return Target::default();
    };
    let be16 = |at: usize| sa.get(at..at + 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
    let (addr, port) = match i32::from(family) {
        libc::AF_INET => (
            sa.get(4..8)
                .map(|b| Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_string()),
            be16(2),
        ),
        libc::AF_INET6 => (
            sa.get(8..24)
                .map(|b| Ipv6Addr::from(<[u8; 16]>::try_from(b).unwrap()).to_string()),
            be16(2),
        ),
        libc::AF_UNIX => (Some(unix_path(&sa[2..])), None),
        _ => (None, None),
    };
    Target {
        family: Some(family),
        addr,
        port,
    }
}

/// `sun_path` as `ss` shows it: a filesystem path, `@name` for the abstract
/// namespace, and `""` for autobind (no path given).
fn unix_path(path: &[u8]) -> String {
    match path.split_first() {
        Some((0, abstract_name)) => format!("@{}", String::from_utf8_lossy(abstract_name)),
        _ => c_str(path),
    }
}

pub fn c_str(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

#[derive(Serialize, Debug)]
pub struct Start<'a> {
    pub v: u8,
    pub ts: String,
    pub event: &'static str,
    pub version: &'static str,
    pub kernel: String,
    pub pid: u32,
    /// The hooks actually attached, as `section/name`.
    pub hooks: &'a [String],
    /// Kernel ids of the loaded programs, in the order of `hooks`.
    pub prog_ids: &'a [u32],
    pub cgroup: String,
    pub ring_buffer_bytes: u32,
}

#[derive(Serialize, Debug)]
pub struct Lost {
    pub v: u8,
    pub ts: String,
    pub event: &'static str,
    /// Events lost since the previous `lost` record of this cause.
    pub count: u64,
    /// `ring_buffer` (full), `inflight_map` (too many binds in flight at once),
    /// `time_wait_queue`, or `output` (records the output could not write).
    pub cause: &'static str,
}

#[derive(Serialize, Debug, Default, Clone, Copy)]
pub struct Totals {
    pub bind: u64,
    pub tcp_state: u64,
    pub listen: u64,
    pub connect: u64,
    pub time_wait_enter: u64,
    pub time_wait_exit: u64,
    pub lost: u64,
}

/// Records lost, by cause (the `cause` of `lost` records).
#[derive(Serialize, Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LostByCause {
    pub ring_buffer: u64,
    pub inflight_map: u64,
    /// Timewait sockets the kernel-side table had no room for.
    pub time_wait_map: u64,
    pub time_wait_queue: u64,
    /// Records the output could not write (disk full, a stalled reader).
    pub output: u64,
}

impl LostByCause {
    pub fn sum(&self) -> u64 {
        self.ring_buffer
            + self.inflight_map
            + self.time_wait_map
            + self.time_wait_queue
            + self.output
    }
}

#[derive(Serialize, Debug)]
pub struct Stats {
    pub v: u8,
    pub ts: String,
    pub event: &'static str,
    /// Records written so far, per type.
    pub totals: Totals,
    pub lost: u64,
    pub lost_by_cause: LostByCause,
    /// Records the filters kept out of the output.
    pub filtered: u64,
    pub explain_coalesced: u64,
    /// EADDRINUSE failures written without an explanation: the explainer was
    /// 1024 lookups behind.
    pub explain_skipped: u64,
    /// The daemon's own CPU time (user + system) and resident memory.
    pub cpu_ms: u64,
    pub rss_kb: u64,
}

#[derive(Serialize, Debug)]
pub struct Stop {
    pub v: u8,
    pub ts: String,
    pub event: &'static str,
    /// `duration`, `SIGINT`, `SIGTERM` or `repro`.
    pub reason: &'static str,
    pub totals: Totals,
    pub lost: u64,
    pub lost_by_cause: LostByCause,
    /// Records the filters kept out of the output.
    pub filtered: u64,
    /// EADDRINUSE failures explained from a lookup made for an earlier failure on
    /// the same port less than 100 ms before (a storm costs one lookup per port).
    pub explain_coalesced: u64,
    pub explain_skipped: u64,
    /// Per program: runs and time in the kernel (zero unless kernel.bpf_stats_enabled=1).
    pub programs: Vec<crate::loader::ProgramStats>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_foreign_sockaddrs() {
        // EINVAL for a short address: only what the caller gave.
        let mut sa = [0u8; 6];
        sa[..2].copy_from_slice(&2u16.to_ne_bytes());
        sa[2..4].copy_from_slice(&80u16.to_be_bytes());
        assert_eq!(
            sockaddr_target(&sa),
            Target {
                family: Some(2),
                addr: None,
                port: Some(80)
            }
        );
        assert_eq!(sockaddr_target(&[1]), Target::default());
        let mut un = vec![0u8; 2];
        un[..2].copy_from_slice(&1u16.to_ne_bytes());
        un.extend_from_slice(b"\0observer-test");
        assert_eq!(sockaddr_target(&un).addr.as_deref(), Some("@observer-test"));
        let mut path = un[..2].to_vec();
        path.extend_from_slice(b"/run/x.sock\0\0\0");
        assert_eq!(sockaddr_target(&path).addr.as_deref(), Some("/run/x.sock"));
        let mut nl = vec![0u8; 12];
        nl[..2].copy_from_slice(&16u16.to_ne_bytes());
        assert_eq!(
            sockaddr_target(&nl),
            Target {
                family: Some(16),
                addr: None,
                port: None
            }
        );
    }

    mod properties {
        use observer_common::{
            Kind,
            decode::{Record, decode},
        };
        use proptest::prelude::*;

        use crate::{clock::Clock, events::*};

        proptest! {
            /// Whatever a record of the right size holds, it becomes a JSON
            /// record without a panic (lengths, families, ports, text).
            #[test]
            fn any_record_renders(payload in proptest::collection::vec(any::<u8>(), 600), which in 0usize..4) {
                let kind = [Kind::Bind, Kind::TcpState, Kind::SockCall, Kind::TimeWait][which];
                let mut bytes = payload[..kind.record_size()].to_vec();
                bytes[..4].copy_from_slice(&(kind as u32).to_ne_bytes());
                let clock = Clock::with_offset(0);
                let json = match decode(&bytes).expect("right size") {
                    Record::Bind(r) => serde_json::to_string(&Bind::from_record(&r, &clock)),
                    Record::TcpState(r) => serde_json::to_string(&TcpState::from_record(&r, &clock)),
                    Record::SockCall(r) => serde_json::to_string(&SockCall::from_record(&r, &clock)),
                    Record::TimeWait(r) => {
                        // Any record, in any order, through the tracker.
                        let mut t = crate::time_wait::timer::Tracker::new(clock, 250);
                        let mut out = t.on_record(&r);
                        out.extend(t.decide(u64::MAX));
                        serde_json::to_string(&format!("{out:?}"))
                    }
                };
                prop_assert!(json.is_ok());
            }

            #[test]
            fn any_sockaddr_is_read_within_its_length(sa in proptest::collection::vec(any::<u8>(), 0..200)) {
                let _ = sockaddr_target(&sa);
            }
        }
    }
}
