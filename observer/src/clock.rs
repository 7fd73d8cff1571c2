//! Kernel timestamps (`bpf_ktime_get_ns`, CLOCK_MONOTONIC) to wall-clock RFC 3339.

use std::{
    cell::Cell,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

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

    /// RFC 3339, UTC, nanoseconds: `2026-11-25T14:03:07.123456789Z`. The
    /// date and time of day are worked out once per second (per thread):
    /// every record carries one.
    pub fn rfc3339(&self, ktime_ns: u64) -> String {
        thread_local! {
            static SECOND: Cell<(u64, [u8; SECOND_LEN])> = const { Cell::new((u64::MAX, [0; SECOND_LEN])) };
        }
        let wall = self.wall(ktime_ns);
        let since = wall.duration_since(UNIX_EPOCH).unwrap_or_default();
        let (secs, mut second) = SECOND.get();
        if secs != since.as_secs() {
            let full = humantime::format_rfc3339_seconds(wall).to_string();
            second.copy_from_slice(&full.as_bytes()[..SECOND_LEN]);
            SECOND.set((since.as_secs(), second));
        }
        let mut s = String::with_capacity(SECOND_LEN + 11);
        s.push_str(std::str::from_utf8(&second).expect("ASCII"));
        s.push('.');
        let mut nanos = itoa::Buffer::new();
        let nanos = nanos.format(since.subsec_nanos());
        s.extend(std::iter::repeat_n('0', 9 - nanos.len()));
        s.push_str(nanos);
        s.push('Z');
        s
    }
}

/// `2026-11-25T14:03:07`: RFC 3339 up to the second.
const SECOND_LEN: usize = 19;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_nanoseconds_utc() {
        let c = Clock::with_offset(1_700_000_000_000_000_000);
        assert_eq!(c.rfc3339(123_456_789), "2023-11-14T22:13:20.123456789Z");
        // The second's part is kept: the same second again, then the next.
        assert_eq!(c.rfc3339(5), "2023-11-14T22:13:20.000000005Z");
        assert_eq!(c.rfc3339(1_000_000_000), "2023-11-14T22:13:21.000000000Z");
        assert_eq!(
            Clock::with_offset(0).rfc3339(0),
            "1970-01-01T00:00:00.000000000Z"
        );
    }
}
