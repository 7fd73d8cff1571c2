//! Kernel timestamps (`bpf_ktime_get_ns`, CLOCK_MONOTONIC) to wall-clock RFC 3339.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::time::{ClockId, clock_gettime};

#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// CLOCK_REALTIME minus CLOCK_MONOTONIC, in ns, sampled once at start.
    offset_ns: i128,
}

fn ns(clock: ClockId) -> i128 {
    let t = clock_gettime(clock).expect("clock_gettime of a standard clock");
    t.tv_sec() as i128 * 1_000_000_000 + t.tv_nsec() as i128
}

impl Clock {
    pub fn new() -> Self {
        // Bracket the realtime read with two monotonic reads and take the midpoint.
        let m0 = ns(ClockId::CLOCK_MONOTONIC);
        let r = ns(ClockId::CLOCK_REALTIME);
        let m1 = ns(ClockId::CLOCK_MONOTONIC);
        Clock {
            offset_ns: r - (m0 + m1) / 2,
        }
    }

    #[cfg(test)]
    pub fn with_offset(offset_ns: i128) -> Self {
        Clock { offset_ns }
    }

    pub fn now_ktime(&self) -> u64 {
        ns(ClockId::CLOCK_MONOTONIC) as u64
    }

    pub fn wall(&self, ktime_ns: u64) -> SystemTime {
        let ns = (ktime_ns as i128 + self.offset_ns).max(0);
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    }

    /// RFC 3339, UTC, nanoseconds: `2026-11-25T14:03:07.123456789Z`.
    pub fn rfc3339(&self, ktime_ns: u64) -> humantime::Rfc3339Timestamp {
        humantime::format_rfc3339_nanos(self.wall(ktime_ns))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_nanoseconds_utc() {
        let c = Clock::with_offset(1_700_000_000_000_000_000);
        assert_eq!(
            c.rfc3339(123_456_789).to_string(),
            "2023-11-14T22:13:20.123456789Z"
        );
    }
}
