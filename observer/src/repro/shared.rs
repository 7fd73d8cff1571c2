//! What `run --repro` shares between its scenarios and the stream: the
//! network namespaces the scenarios made (the stream shows only those unless
//! `--all-host`), and a barrier per failing step — the scenario keeps its
//! blockers until the stream has written that failure, explained, so the
//! explainer finds the sockets that caused it.

use std::{
    collections::HashSet,
    sync::{Condvar, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use crate::schema::Event;

/// How long a failing step waits for its record, at most.
pub const WAIT_WITHIN: Duration = Duration::from_secs(2);
/// How long a step that crossed a port-pressure level waits for its
/// `port_pressure` record, at most: a namespace is counted at most every
/// 250 ms, and one whose sockets went without a record (bound-only ones)
/// every second.
pub const PRESSURE_WITHIN: Duration = Duration::from_secs(5);

#[derive(Default)]
pub struct Shared {
    namespaces: Mutex<HashSet<u32>>,
    /// EADDRINUSE failures of this process the stream wrote and no step has
    /// waited for yet: (tid, fd).
    written: Mutex<HashSet<(u32, i32)>>,
    /// `port_pressure` records written and not waited for yet, by `pressure_key`.
    pressure: Mutex<Vec<String>>,
    cv: Condvar,
    pressure_cv: Condvar,
}

/// What a `port_pressure` record and the step predicting it agree on.
pub fn pressure_key(p: &crate::schema::PortPressure) -> String {
    format!(
        "{} {} {} {} {:?} {}/{} {}->{}",
        p.netns, p.proto, p.scope, p.addr, p.port, p.in_use, p.range, p.previous, p.level
    )
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// A scenario's namespace, before anything happens in it.
    pub fn add_netns(&self, ino: u64) {
        lock(&self.namespaces).insert(ino as u32);
    }

    /// Whether a record in `netns` is one of the scenarios'.
    pub fn watches(&self, netns: Option<u32>) -> bool {
        netns.is_some_and(|n| lock(&self.namespaces).contains(&n))
    }

    /// The stream wrote `event`: if it is an EADDRINUSE failure of this
    /// process, the step that made it may go on.
    pub fn written(&self, event: &Event) {
        if let Event::PortPressure(p) = event {
            if self.watches(Some(p.netns)) {
                lock(&self.pressure).push(pressure_key(p));
                self.pressure_cv.notify_all();
            }
            return;
        }
        let (p, fd, errno) = match event {
            Event::Bind(b) => (&b.process, b.fd, &b.errno),
            Event::Listen(c) => (&c.process, c.fd, &c.errno),
            _ => return,
        };
        if errno.as_deref() != Some("EADDRINUSE") || p.pid != std::process::id() {
            return;
        }
        lock(&self.written).insert((p.tid, fd));
        self.cv.notify_all();
    }

    /// Waits until the stream has written the `port_pressure` record `key`
    /// (see `pressure_key`), at most `within`; whether it did.
    pub fn wait_pressure(&self, key: &str, within: Duration) -> bool {
        let until = Instant::now() + within;
        let mut written = lock(&self.pressure);
        loop {
            if let Some(i) = written.iter().position(|k| k == key) {
                written.remove(i);
                return true;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            written = self
                .pressure_cv
                .wait_timeout(written, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Waits until the stream has written the failure of `fd` on thread
    /// `tid`, at most `within`; whether it did.
    pub fn wait_written(&self, tid: u32, fd: i32, within: Duration) -> bool {
        let until = Instant::now() + within;
        let mut written = lock(&self.written);
        loop {
            if written.remove(&(tid, fd)) {
                return true;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            written = self
                .cv
                .wait_timeout(written, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::schema::Bind;

    fn failure(tid: u32, fd: i32) -> Event {
        let mut b = Bind::from_record(&observer_common::BindRecord::zeroed());
        (b.process.pid, b.process.tid, b.fd) = (std::process::id(), tid, fd);
        b.errno = Some("EADDRINUSE".into());
        Event::Bind(b)
    }

    #[test]
    fn a_step_waits_for_its_own_record_only() {
        let s = Arc::new(Shared::default());
        let writer = {
            let s = s.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                s.written(&failure(7, 3));
            })
        };
        assert!(s.wait_written(7, 3, Duration::from_secs(5)));
        writer.join().unwrap();
        // Consumed; another fd, or another process's failure, does not count.
        assert!(!s.wait_written(7, 3, Duration::from_millis(10)));
        let Event::Bind(mut other) = failure(7, 4) else {
            unreachable!()
        };
        other.process.pid += 1;
        s.written(&Event::Bind(other));
        assert!(!s.wait_written(7, 4, Duration::from_millis(10)));
    }

    #[test]
    fn only_the_scenarios_namespaces_are_watched() {
        let s = Shared::default();
        s.add_netns(4026532156);
        assert!(s.watches(Some(4026532156)));
        assert!(!s.watches(Some(1)) && !s.watches(None));
    }
}
