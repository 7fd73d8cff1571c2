//! `--format text`: one aligned line per event, bindsnoop-style, with the
//! explain hint indented under failures.

use crate::schema::{BindOptions, Counts, Event, Line};

/// The column titles, and what the one out-of-order kind means.
pub const HEADER: &str = "TIME          PID     COMM             EVENT           PROTO ADDR                                  PORT   OPTS  RESULT
# time_wait_enter: TIME is when the socket entered TIME_WAIT; one that got there without a timer event of its own is told up to a few tens of ms later, after lines that came after it";

/// A value as a column: `-` for none.
fn s<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

/// Option letters: R SO_REUSEADDR, P SO_REUSEPORT, F IP_FREEBIND, T IP_TRANSPARENT,
/// N IP_BIND_ADDRESS_NO_PORT; `-` off, `?` unknown.
pub fn opts(o: &BindOptions) -> String {
    [
        (o.reuseaddr, 'R'),
        (o.reuseport, 'P'),
        (o.freebind, 'F'),
        (o.transparent, 'T'),
        (o.bind_address_no_port, 'N'),
    ]
    .iter()
    .map(|(v, c)| match v {
        Some(true) => *c,
        Some(false) => '-',
        None => '?',
    })
    .collect()
}

/// `saddr:sport > daddr:dport`
fn connection(saddr: &str, sport: u16, daddr: &str, dport: u16) -> String {
    format!("{saddr}:{sport} > {daddr}:{dport}")
}

/// `ok`, or the errno's name.
fn result(errno: &Option<crate::names::Name>) -> &str {
    errno.as_deref().unwrap_or("ok")
}

pub fn line(l: &Line) -> String {
    // 2026-11-25T14:56:50.775951813Z -> 14:56:50.775952
    let time = l.ts.get(11..26).unwrap_or(&l.ts);
    let event = l.event.name();
    let head = |pid: Option<u32>, comm: Option<&str>, cols: [String; 5]| {
        let [proto, addr, port, opts, result] = cols;
        format!(
            "{:<13} {:<7} {:<16} {:<15} {:<5} {:<37} {:<6} {:<5} {}\n",
            time,
            s(pid),
            comm.unwrap_or("-").chars().take(16).collect::<String>(),
            event,
            proto,
            addr,
            port,
            opts,
            result
        )
    };
    let own = |what: String| {
        // observer_start/stop, lost, stats: one readable line of the daemon's own.
        format!(
            "{:<13} {:<7} {:<16} {:<15} {}\n",
            time, "-", "observer", event, what
        )
    };
    let (mut out, explain) = match &l.event {
        Event::Bind(b) => {
            let bound = b
                .bound_port
                .map(|p| format!(" (port {p})"))
                .unwrap_or_default();
            let p = &b.process;
            (
                head(
                    Some(p.pid),
                    Some(&p.comm),
                    [
                        s(b.proto.as_ref()),
                        s(b.addr.as_ref()),
                        s(b.port),
                        opts(&b.options),
                        format!("{}{bound}", result(&b.errno)),
                    ],
                ),
                b.explain.as_ref(),
            )
        }
        Event::Listen(c) | Event::Connect(c) => {
            let (addr, port) = if matches!(l.event, Event::Connect(_)) {
                (&c.daddr, c.dport)
            } else {
                (&c.laddr, c.lport)
            };
            let p = &c.process;
            (
                head(
                    Some(p.pid),
                    Some(&p.comm),
                    [
                        "tcp".into(),
                        s(addr.as_ref()),
                        s(port),
                        String::new(),
                        result(&c.errno).to_owned(),
                    ],
                ),
                c.explain.as_ref(),
            )
        }
        Event::TcpState(t) => (
            head(
                t.pid,
                t.comm.as_deref(),
                [
                    "tcp".into(),
                    connection(&t.saddr, t.sport, &t.daddr, t.dport),
                    String::new(),
                    String::new(),
                    match t.prev_state_ms {
                        Some(ms) => format!("{} -> {} ({ms} ms)", t.old, t.new),
                        None => format!("{} -> {}", t.old, t.new),
                    },
                ],
            ),
            None,
        ),
        Event::TimeWaitEnter(e) => (
            head(
                e.pid,
                e.comm.as_deref(),
                [
                    "tcp".into(),
                    connection(&e.flow.saddr, e.flow.sport, &e.flow.daddr, e.flow.dport),
                    String::new(),
                    String::new(),
                    format!("expires in {} ms", e.expires_ms),
                ],
            ),
            None,
        ),
        Event::TimeWaitExit(x) => (
            head(
                None,
                None,
                [
                    "tcp".into(),
                    connection(&x.flow.saddr, x.flow.sport, &x.flow.daddr, x.flow.dport),
                    String::new(),
                    String::new(),
                    match x.held_ms {
                        Some(ms) => format!("{} after {ms} ms", x.reason),
                        None => x.reason.to_string(),
                    },
                ],
            ),
            None,
        ),
        Event::PortPressure(p) => (
            head(
                None,
                None,
                [
                    p.proto.into(),
                    p.addr.clone(),
                    s(p.port),
                    String::new(),
                    format!(
                        "{} {}/{} ports ({}%): level {} -> {}",
                        p.scope, p.in_use, p.range, p.percent, p.previous, p.level
                    ),
                ],
            ),
            None,
        ),
        Event::ObserverStart(r) => (
            own(format!(
                "observer {} (pid {}) on Linux {}: {} hooks, ring buffer {} KiB, cgroup {}",
                r.version,
                r.pid,
                r.kernel,
                r.hooks.len(),
                r.ring_buffer_bytes / 1024,
                r.cgroup
            )),
            None,
        ),
        Event::Lost(r) => (own(format!("{} lost ({})", r.count, r.cause)), None),
        Event::Stats(r) => (
            own(format!(
                "{}; CPU {} ms, RSS {} kB",
                counts(&r.counts),
                r.cpu_ms,
                r.rss_kb
            )),
            None,
        ),
        Event::ObserverStop(r) => (
            own(format!("stopped ({}): {}", r.reason, counts(&r.counts))),
            None,
        ),
    };
    if let Some(e) = explain {
        out += &format!("              ↳ {}\n", e.hint);
    }
    out
}

/// `written bind 11, tcp_state 26, …; lost 0; filtered 0`, with the causes of any loss.
fn counts(c: &Counts) -> String {
    let t = &c.totals;
    let lost: Vec<String> = c
        .lost_by_cause
        .each()
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(cause, n)| format!("{n} {cause}"))
        .collect();
    format!(
        "written bind {}, tcp_state {}, listen {}, connect {}, time_wait_enter {}, time_wait_exit {}; lost {}{}; filtered {}",
        t.bind,
        t.tcp_state,
        t.listen,
        t.connect,
        t.time_wait_enter,
        t.time_wait_exit,
        c.lost,
        if lost.is_empty() {
            String::new()
        } else {
            format!(" ({})", lost.join(", "))
        },
        c.filtered
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        clock::Clock,
        schema::{Bind, Explain, Rule, Stop, TcpState, TimeWaitExit},
    };

    /// 2026-11-25T14:56:50.775951813Z
    fn at(event: Event) -> Line {
        Line::at(&Clock::with_offset(1_764_082_610_775_951_813), 0, event)
    }

    #[test]
    fn a_failed_bind_with_its_hint() {
        let mut b = Bind::from_record(&observer_common::BindRecord::zeroed());
        (b.process.pid, b.process.comm) = (31522, "python3".into());
        (b.proto, b.addr, b.port) = (Some("tcp".into()), Some("127.0.0.1".into()), Some(8080));
        (b.options.reuseaddr, b.options.reuseport) = (Some(true), Some(false));
        (b.ret, b.errno) = (-98, Some("EADDRINUSE".into()));
        b.explain = Some(std::sync::Arc::new(Explain {
            rule: Rule::ListenerConflict,
            hint: "0.0.0.0:8080 is held by LISTEN socket of python3 (pid 31522)".into(),
            blockers: vec![],
        }));
        let l = line(&at(Event::Bind(b)));
        assert!(
            l.starts_with("14:56:50.775951 31522   python3          bind"),
            "{l}"
        );
        assert!(l.contains(" R-??? EADDRINUSE\n"), "{l}");
        assert!(
            l.ends_with("↳ 0.0.0.0:8080 is held by LISTEN socket of python3 (pid 31522)\n"),
            "{l}"
        );
        assert_eq!(l.lines().count(), 2);
    }

    #[test]
    fn states_and_time_wait() {
        let mut t = TcpState::from_record(&observer_common::TcpStateRecord::zeroed());
        (t.saddr, t.sport, t.daddr, t.dport) =
            ("127.0.0.1".into(), 5700, "127.0.0.1".into(), 20000);
        (t.old, t.new, t.prev_state_ms) = ("FIN_WAIT2", "CLOSE", Some(0.017));
        let l = line(&at(Event::TcpState(t)));
        assert!(
            l.contains("127.0.0.1:5700 > 127.0.0.1:20000")
                && l.contains("FIN_WAIT2 -> CLOSE (0.017 ms)"),
            "{l}"
        );
        let mut x = TimeWaitExit::example();
        (x.reason, x.held_ms) = ("expired", Some(61093));
        assert!(line(&at(Event::TimeWaitExit(x))).contains("expired after 61093 ms"));
        let stop = Stop {
            reason: "SIGINT",
            counts: Default::default(),
            programs: vec![],
        };
        let l = line(&at(Event::ObserverStop(stop)));
        assert!(
            l.contains("observer_stop   stopped (SIGINT): written bind 0, tcp_state 0,")
                && l.ends_with("; lost 0; filtered 0\n")
                && l.lines().count() == 1,
            "{l}"
        );
        // Unknown durations are left out, not printed as `-`.
        let mut t = TcpState::from_record(&observer_common::TcpStateRecord::zeroed());
        (t.old, t.new, t.prev_state_ms) = ("CLOSE", "LISTEN", None);
        assert!(line(&at(Event::TcpState(t))).ends_with("CLOSE -> LISTEN\n"));
        let lost = Event::Lost(crate::schema::Lost {
            count: 3,
            cause: "ring_buffer",
        });
        assert!(line(&at(lost)).ends_with("lost            3 lost (ring_buffer)\n"));
    }
}
