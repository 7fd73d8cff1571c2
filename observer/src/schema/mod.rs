//! Schema v1: every record the stream writes, defined here and nowhere else.
//! A line is a [`Line`] — `v`, `ts`, then an [`Event`]: its `event` tag and
//! its fields. Records from the kernel are decoded into these types here
//! (`from_record`), from the layouts in `observer_common`.

mod bind;
mod daemon;
mod explain;
mod pressure;
mod process;
#[cfg(test)]
mod readme;
mod sockaddr;
mod sockcall;
mod tcp;
mod time_wait;

use serde::Serialize;

pub use bind::{Bind, BindOptions};
pub use daemon::{
    Counts, LOST_CAUSES, Lost, LostByCause, ProgramStats, Start, Stats, Stop, Totals,
};
pub use explain::{Explain, Holder, Rule};
pub use pressure::{PortPressure, PressureHolder};
pub use process::Process;
pub use sockaddr::{Target, c_str, ip_from, ip_string, sockaddr_target};
pub use sockcall::SockCall;
pub use tcp::{TcpState, reuse, tuple};
pub use time_wait::{Closer, Flow, TimeWaitEnter, TimeWaitExit};

use crate::clock::Clock;

pub const SCHEMA_VERSION: u8 = 1;

/// Every `event` tag of schema v1 ([`Event::name`]), in the README's order.
pub const EVENT_NAMES: [&str; 11] = [
    "observer_start",
    "bind",
    "tcp_state",
    "time_wait_enter",
    "time_wait_exit",
    "listen",
    "connect",
    "port_pressure",
    "lost",
    "stats",
    "observer_stop",
];

/// One line of the stream.
#[derive(Serialize, Debug, Clone)]
pub struct Line {
    pub v: u8,
    /// When it happened, RFC 3339 with nanoseconds (UTC).
    pub ts: String,
    #[serde(flatten)]
    pub event: Event,
}

impl Line {
    /// A record of something the kernel saw at `ktime_ns` (CLOCK_MONOTONIC).
    pub fn at(clock: &Clock, ktime_ns: u64, event: Event) -> Line {
        Line {
            v: SCHEMA_VERSION,
            ts: clock.rfc3339(ktime_ns),
            event,
        }
    }

    /// A record of the daemon's own, made now.
    pub fn now(clock: &Clock, event: Event) -> Line {
        Line::at(clock, clock.now_ktime(), event)
    }
}

/// Every record kind, tagged by its `event` name.
#[derive(Serialize, Debug, Clone)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    ObserverStart(Start),
    Bind(Bind),
    TcpState(TcpState),
    TimeWaitEnter(TimeWaitEnter),
    TimeWaitExit(TimeWaitExit),
    Listen(SockCall),
    Connect(SockCall),
    PortPressure(PortPressure),
    Lost(Lost),
    Stats(Stats),
    ObserverStop(Stop),
}

impl Event {
    /// The `event` tag.
    pub fn name(&self) -> &'static str {
        match self {
            Event::ObserverStart(_) => "observer_start",
            Event::Bind(_) => "bind",
            Event::TcpState(_) => "tcp_state",
            Event::TimeWaitEnter(_) => "time_wait_enter",
            Event::TimeWaitExit(_) => "time_wait_exit",
            Event::Listen(_) => "listen",
            Event::Connect(_) => "connect",
            Event::PortPressure(_) => "port_pressure",
            Event::Lost(_) => "lost",
            Event::Stats(_) => "stats",
            Event::ObserverStop(_) => "observer_stop",
        }
    }

    /// The call records (`bind`, `listen`, `connect`): one per syscall seen.
    pub fn is_call(&self) -> bool {
        matches!(self, Event::Bind(_) | Event::Listen(_) | Event::Connect(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_starts_with_its_version_time_and_event() {
        let line = Line::at(
            &Clock::with_offset(0),
            1,
            Event::Lost(Lost {
                count: 2,
                cause: "ring_buffer",
            }),
        );
        assert_eq!(
            serde_json::to_string(&line).unwrap(),
            r#"{"v":1,"ts":"1970-01-01T00:00:00.000000001Z","event":"lost","count":2,"cause":"ring_buffer"}"#
        );
        assert_eq!(line.event.name(), "lost");
    }

    mod properties {
        use observer_common::{
            Kind,
            decode::{Record, decode},
        };
        use proptest::prelude::*;

        use crate::{clock::Clock, schema::*};

        proptest! {
            /// Whatever a record of the right size holds, it becomes a JSON
            /// record without a panic (lengths, families, ports, text).
            #[test]
            fn any_record_renders(payload in proptest::collection::vec(any::<u8>(), 600), which in 0usize..4) {
                let kind = [Kind::Bind, Kind::TcpState, Kind::SockCall, Kind::TimeWait][which];
                let mut bytes = payload[..kind.record_size()].to_vec();
                bytes[..4].copy_from_slice(&(kind as u32).to_ne_bytes());
                let clock = Clock::with_offset(0);
                let line = |e| serde_json::to_string(&Line::at(&clock, 0, e));
                let json = match decode(&bytes).expect("right size") {
                    Record::Bind(r) => line(Event::Bind(Bind::from_record(&r))),
                    Record::TcpState(r) => line(Event::TcpState(TcpState::from_record(&r))),
                    Record::SockCall(r) => line(Event::of_call(&r)),
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
        }
    }
}
