//! The report as tables — built once, then printed for the terminal here and
//! laid out as a page by `html.rs`, so the two always say the same numbers.

use std::fmt::Write as _;

use super::{
    aggregate::{Bin, Calls, EVENTS, ProcStats, Report, TW_SERIES_PORTS, TimeWait},
    time,
};

/// One table: a title, column names, rows of cells (never empty: `-`).
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    /// A stable id (`failures_by_errno`): the page's `id="t-…"`.
    pub id: &'static str,
    pub title: String,
    pub head: Vec<String>,
    /// How many leading columns are labels (left-aligned); the rest are numbers.
    pub labels: usize,
    pub rows: Vec<Vec<String>>,
    /// Said under the table (rows left out, what a number means).
    pub note: Option<String>,
}

/// What the page draws: the timeline's buckets.
pub struct Chart {
    pub width_ms: i64,
    pub buckets: Vec<(i64, Bin)>,
    /// TIME_WAIT sockets open at the end of each bucket.
    pub open: Vec<i64>,
    /// The same per local port, for the ports of the table
    /// `time_wait_by_port_over_time` (`(other)` last when it has a row).
    pub ports: Vec<(String, Vec<i64>)>,
}

/// Columns of the table of TIME_WAIT open per port over time, at most.
pub const TW_COLUMNS: usize = 10;

/// The tables of the report, in order, and the timeline for the chart.
pub fn tables(r: &mut Report, files: &[String], top: usize) -> (Vec<Table>, Chart) {
    let mut out = Vec::new();
    let records: u64 = r.by_event.iter().sum::<u64>() + r.other_events;
    let (first, last) = (r.first.unwrap_or(0), r.last.unwrap_or(0));
    let span = |ns: Option<i64>| ns.map_or_else(|| "-".to_owned(), time::format_nanos);
    out.push(Table {
        id: "summary",
        title: "SUMMARY".into(),
        head: heads(["WHAT", "VALUE"]),
        labels: 2,
        rows: vec![
            row(["input", &files.join(", ")]),
            row(["first record", &span(r.first)]),
            row(["last record", &span(r.last)]),
            row([
                "span",
                &r.first.map_or_else(
                    || "-".to_owned(),
                    |_| time::human(last.saturating_sub(first)),
                ),
            ]),
            row(["lines", &r.lines.to_string()]),
            row(["records", &records.to_string()]),
            row(["lines not records (skipped)", &r.not_records.to_string()]),
            row(["binds", &r.binds.to_string()]),
            row(["failed binds", &r.failures.bind.to_string()]),
            row(["failed listens", &r.failures.listen.to_string()]),
            row(["failed connects", &r.failures.connect.to_string()]),
            row(["time_wait max open", &r.time_wait.max_open.to_string()]),
            row(["lost", &r.lost.values().sum::<u64>().to_string()]),
        ],
        note: None,
    });

    let mut rows: Vec<Vec<String>> = EVENTS
        .iter()
        .zip(r.by_event)
        .filter(|(_, n)| *n > 0)
        .map(|(e, n)| row([e, &n.to_string()]))
        .collect();
    if r.other_events > 0 {
        rows.push(row(["(other)", &r.other_events.to_string()]));
    }
    out.push(Table {
        id: "records",
        title: "RECORDS BY EVENT".into(),
        head: heads(["EVENT", "RECORDS"]),
        labels: 1,
        rows,
        note: None,
    });

    let calls = |c: &Calls| {
        [c.total(), c.bind, c.listen, c.connect]
            .into_iter()
            .map(|n| n.to_string())
    };
    let mut errnos: Vec<_> = r.by_errno.iter().collect();
    errnos.sort_by(|a, b| b.1.total().cmp(&a.1.total()).then(a.0.cmp(b.0)));
    out.push(Table {
        id: "failures_by_errno",
        title: "FAILURES BY ERRNO".into(),
        head: heads(["ERRNO", "FAILURES", "BIND", "LISTEN", "CONNECT"]),
        labels: 1,
        rows: errnos
            .into_iter()
            .map(|(e, c)| std::iter::once(e.to_string()).chain(calls(c)).collect())
            .collect(),
        note: None,
    });

    let mut ports: Vec<_> = r.by_port.iter().collect();
    ports.sort_by(|a, b| b.1.total().cmp(&a.1.total()).then(a.0.cmp(b.0)));
    let (ports, more) = cut(ports, top);
    out.push(Table {
        id: "failures_by_port",
        title: "FAILURES BY PORT".into(),
        head: heads(["PORT", "FAILURES", "BIND", "LISTEN", "CONNECT"]),
        labels: 1,
        rows: ports
            .into_iter()
            .map(|(p, c)| std::iter::once(port(*p)).chain(calls(c)).collect())
            .collect(),
        note: joined([
            more.map(|n| format!("{n} more ports")),
            Some("bind: the port asked for (0: any); listen: the local port; connect: the destination's".into()),
        ]),
    });

    let procs: Vec<(&str, u32, &ProcStats)> = r
        .procs
        .iter()
        .flat_map(|(pid, v)| v.iter().map(move |(c, s)| (c.as_ref(), *pid, s)))
        .collect();
    let mut failing: Vec<_> = procs
        .iter()
        .filter(|p| p.2.failures.total() > 0)
        .copied()
        .collect();
    failing.sort_by(|a, b| {
        (b.2.failures.total().cmp(&a.2.failures.total()))
            .then(a.0.cmp(b.0))
            .then(a.1.cmp(&b.1))
    });
    let (failing, more) = cut(failing, top);
    out.push(Table {
        id: "failures_by_process",
        title: "FAILURES BY PROCESS".into(),
        head: heads(["PROCESS", "PID", "FAILURES", "BIND", "LISTEN", "CONNECT"]),
        labels: 2,
        rows: failing
            .into_iter()
            .map(|(c, pid, s)| {
                [c.to_owned(), pid.to_string()]
                    .into_iter()
                    .chain(calls(&s.failures))
                    .collect()
            })
            .collect(),
        note: more.map(|n| format!("{n} more processes")),
    });

    let mut rules: Vec<_> = r.by_rule.iter().collect();
    rules.sort_by(|a, b| b.1.total().cmp(&a.1.total()).then(a.0.cmp(b.0)));
    let mut rows: Vec<Vec<String>> = rules
        .into_iter()
        .map(|(rule, c)| {
            std::iter::once(rule.to_string())
                .chain(calls(c).take(3))
                .collect()
        })
        .collect();
    if r.unexplained_in_use.total() > 0 {
        let c = &r.unexplained_in_use;
        rows.push(
            std::iter::once("(EADDRINUSE not explained)".to_owned())
                .chain(calls(c).take(3))
                .collect(),
        );
    }
    out.push(Table {
        id: "failures_by_rule",
        title: "FAILURES BY EXPLAIN RULE".into(),
        head: heads(["RULE", "FAILURES", "BIND", "LISTEN"]),
        labels: 1,
        rows,
        note: r
            .last_counts
            .as_ref()
            .and_then(|l| l.explain_skipped)
            .filter(|n| *n > 0)
            .map(|n| format!("{n} failures written without explanation (explain_skipped)")),
    });

    let mut binders: Vec<_> = procs.iter().filter(|p| p.2.binds > 0).copied().collect();
    binders.sort_by(|a, b| {
        (b.2.binds.cmp(&a.2.binds))
            .then(a.0.cmp(b.0))
            .then(a.1.cmp(&b.1))
    });
    let (binders, more) = cut(binders, top);
    out.push(Table {
        id: "binders",
        title: "BUSIEST BINDERS".into(),
        head: heads(["PROCESS", "PID", "BINDS", "FAILED"]),
        labels: 2,
        rows: binders
            .into_iter()
            .map(|(c, pid, s)| {
                row([
                    c,
                    &pid.to_string(),
                    &s.binds.to_string(),
                    &s.failures.bind.to_string(),
                ])
            })
            .collect(),
        note: more.map(|n| format!("{n} more processes")),
    });

    let mut tw: Vec<_> = r.tw_ports.iter().collect();
    tw.sort_by(|a, b| {
        (b.1.max_open.cmp(&a.1.max_open))
            .then(b.1.enters.cmp(&a.1.enters))
            .then(a.0.cmp(b.0))
    });
    let (tw, more) = cut(tw, top);
    let reasons: Vec<String> = r
        .tw_exit_reasons
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    let all = &r.time_wait;
    let mut rows: Vec<Vec<String>> = tw
        .into_iter()
        .map(|(p, t)| {
            row([
                &p.to_string(),
                &t.enters.to_string(),
                &t.exits.to_string(),
                &t.open.to_string(),
                &t.max_open.to_string(),
                &max_at(t),
            ])
        })
        .collect();
    if all.enters + all.exits > 0 {
        rows.push(row([
            "(all)",
            &all.enters.to_string(),
            &all.exits.to_string(),
            &all.open.to_string(),
            &all.max_open.to_string(),
            &max_at(all),
        ]));
    }
    out.push(Table {
        id: "time_wait_by_port",
        title: "TIME_WAIT BY LOCAL PORT".into(),
        head: heads(["PORT", "ENTERS", "EXITS", "OPEN AT END", "MAX OPEN", "MAX AT"]),
        labels: 1,
        rows,
        note: joined([
            more.map(|n| format!("{n} more ports")),
            (!reasons.is_empty()).then(|| format!("exits: {}", reasons.join(", "))),
            Some(
                "open: enters less exits in this stream (a stream begun while sockets were open counts them from its observer_start)"
                    .into(),
            ),
        ]),
    });

    let (width_ms, buckets) = match r.first {
        Some(first) => r.timeline.buckets(first, last, r.tw_series.width()),
        None => (1000, Vec::new()),
    };
    let mut open = Vec::with_capacity(buckets.len());
    let mut now = 0i64;
    for (_, b) in &buckets {
        now += b.tw_enters as i64 - b.tw_exits as i64;
        open.push(now);
    }
    let label = bucket_label(width_ms, first, last);
    out.push(Table {
        id: "timeline",
        title: format!("OVER TIME (buckets of {}, UTC)", time::width(width_ms)),
        head: heads([
            "START",
            "BINDS",
            "FAILURES",
            "TW ENTERS",
            "TW EXITS",
            "TW OPEN",
        ]),
        labels: 1,
        rows: buckets
            .iter()
            .zip(&open)
            .map(|((start, b), open)| {
                row([
                    &label(*start),
                    &b.binds.to_string(),
                    &b.failures.to_string(),
                    &b.tw_enters.to_string(),
                    &b.tw_exits.to_string(),
                    &open.to_string(),
                ])
            })
            .collect(),
        note: Some(
            "failures: failed binds, listens and connects; TW OPEN: at the bucket's end".into(),
        ),
    });

    let (table, ports) = tw_over_time(r, top, (first, last), width_ms, &buckets, &open);
    out.push(table);

    let mut causes: Vec<&str> = r.lost.keys().map(AsRef::as_ref).collect();
    if let Some(l) = &r.last_counts {
        causes.extend(l.lost_by_cause.iter().map(|(c, _)| c.as_str()));
    }
    causes.sort_unstable();
    causes.dedup();
    let last = r.last_counts.as_ref();
    let in_last = |cause: &str| {
        last.map_or_else(
            || "-".to_owned(),
            |l| {
                let n = l.lost_by_cause.iter().find(|(c, _)| c == cause);
                n.map_or(0, |(_, n)| *n).to_string()
            },
        )
    };
    let mut rows: Vec<Vec<String>> = causes
        .into_iter()
        .filter(|c| {
            r.lost.get(*c).is_some_and(|n| *n > 0) || in_last(c).parse().is_ok_and(|n: u64| n > 0)
        })
        .map(|c| {
            row([
                c,
                &r.lost.get(c).copied().unwrap_or(0).to_string(),
                &in_last(c),
            ])
        })
        .collect();
    rows.push(row([
        "(all)",
        &r.lost.values().sum::<u64>().to_string(),
        &last.map_or_else(|| "-".to_owned(), |l| l.lost.to_string()),
    ]));
    out.push(Table {
        id: "lost",
        title: "LOST".into(),
        head: heads(["CAUSE", "IN LOST RECORDS", "IN LAST STOP/STATS"]),
        labels: 1,
        rows,
        note: Some(match last {
            Some(l) => format!(
                "{} lost records; the last counters are those of the {} at {} (since that observer started)",
                r.lost_records,
                l.event,
                time::format_millis(l.ns)
            ),
            None => format!(
                "{} lost records; no observer_stop or stats record in the stream",
                r.lost_records
            ),
        }),
    });

    (
        out,
        Chart {
            width_ms,
            buckets,
            open,
            ports,
        },
    )
}

/// TIME_WAIT open over time for the top ports: per port a row of the most
/// open at the end of any bucket in each of at most `TW_COLUMNS` columns of
/// whole buckets; the series it is made of, for the page's chart.
fn tw_over_time(
    r: &Report,
    top: usize,
    (first, last): (i64, i64),
    width_ms: i64,
    buckets: &[(i64, Bin)],
    all: &[i64],
) -> (Table, Vec<(String, Vec<i64>)>) {
    let n = buckets.len();
    let start = buckets.first().map_or(0, |b| b.0);
    // Ranked as in `time_wait_by_port`, among the ports with a series.
    let mut kept: Vec<u16> = r.tw_series.ports().collect();
    kept.sort_by(|a, b| {
        let (ta, tb) = (&r.tw_ports[a], &r.tw_ports[b]);
        (tb.max_open.cmp(&ta.max_open))
            .then(tb.enters.cmp(&ta.enters))
            .then(a.cmp(b))
    });
    let (kept, _) = cut(kept, top);
    let mut series: Vec<(String, Vec<i64>)> = kept
        .iter()
        .map(|p| {
            (
                p.to_string(),
                r.tw_series.open(Some(*p), width_ms, start, n),
            )
        })
        .collect();
    // The host's less the ports shown: the other ports' and any without one.
    let mut rest = all.to_vec();
    for (_, s) in &series {
        for (o, v) in rest.iter_mut().zip(s) {
            *o -= v;
        }
    }
    let more = r.tw_ports.len() - kept.len();
    if more > 0 || rest.iter().any(|v| *v != 0) {
        series.push(("(other)".into(), rest));
    }

    let per = n.div_ceil(TW_COLUMNS).max(1);
    let col_ms = width_ms * per as i64;
    let label = bucket_label(width_ms, first, last);
    // Whole minutes need no seconds.
    let minutes = col_ms % 60_000 == 0 && start.rem_euclid(60_000_000_000) == 0;
    let mut head = vec!["PORT".to_owned()];
    head.extend(buckets.iter().step_by(per).map(|(s, _)| {
        let l = label(*s);
        match l.strip_suffix(":00") {
            Some(hm) if minutes => hm.to_owned(),
            _ => l,
        }
    }));
    let columns = |v: &[i64]| -> Vec<String> {
        v.chunks(per)
            .map(|c| c.iter().max().unwrap_or(&0).to_string())
            .collect()
    };
    let mut rows: Vec<Vec<String>> = series
        .iter()
        .map(|(p, v)| std::iter::once(p.clone()).chain(columns(v)).collect())
        .collect();
    if !rows.is_empty() {
        rows.push(
            std::iter::once("(all)".to_owned())
                .chain(columns(all))
                .collect(),
        );
    }
    let table = Table {
        id: "time_wait_by_port_over_time",
        title: format!(
            "TIME_WAIT OPEN BY LOCAL PORT OVER TIME (columns of {}, UTC)",
            time::width(col_ms)
        ),
        head,
        labels: 1,
        rows,
        note: joined([
            (more > 0).then(|| format!("{more} more ports in (other)")),
            Some(format!(
                "the most open at the end of any {} bucket in the column from the time heading it; \
                 series are kept for the {TW_SERIES_PORTS} ports with the most open at once, \
                 each from when it became one of them (before, in (other)); \
                 (other): the rest of the host's",
                time::width(width_ms)
            )),
        ]),
    };
    (table, series)
}

fn heads<const N: usize>(names: [&str; N]) -> Vec<String> {
    names.iter().map(|h| h.to_string()).collect()
}

/// How a bucket's start is shown: no more than its width needs.
pub fn bucket_label(width_ms: i64, first: i64, last: i64) -> impl Fn(i64) -> String {
    let one_day = first.div_euclid(86_400_000_000_000) == last.div_euclid(86_400_000_000_000);
    move |ns| {
        let full = time::format_millis(ns); // 2026-11-28T21:08:28.346Z
        let (from, to) = match (one_day, width_ms < 1000) {
            (true, true) => (11, 23),
            (true, false) => (11, 19),
            (false, true) => (5, 23),
            (false, false) => (5, 19),
        };
        full.get(from..to).unwrap_or(&full).to_owned()
    }
}

fn row<const N: usize>(cells: [&str; N]) -> Vec<String> {
    cells
        .iter()
        .map(|c| if c.is_empty() { "-" } else { c }.to_owned())
        .collect()
}

/// When the most were open; `-` when none ever was (only exits seen).
fn max_at(t: &TimeWait) -> String {
    if t.max_open > 0 {
        time::format_millis(t.max_at)
    } else {
        "-".to_owned()
    }
}

fn port(p: Option<u16>) -> String {
    p.map_or_else(|| "-".to_owned(), |p| p.to_string())
}

/// The first `top`, and how many were left out.
fn cut<T>(mut v: Vec<T>, top: usize) -> (Vec<T>, Option<usize>) {
    let more = v.len().checked_sub(top).filter(|n| *n > 0);
    v.truncate(top);
    (v, more)
}

fn joined<const N: usize>(parts: [Option<String>; N]) -> Option<String> {
    let parts: Vec<String> = parts.into_iter().flatten().collect();
    (!parts.is_empty()).then(|| parts.join("; "))
}

/// The tables for a terminal: per table its title, its columns aligned (two
/// spaces apart, labels left, numbers right), a note in parentheses, a blank line.
pub fn render(tables: &[Table]) -> String {
    let mut out = String::new();
    for t in tables {
        let _ = writeln!(out, "{}", t.title);
        let mut widths: Vec<usize> = t.head.iter().map(|h| h.chars().count()).collect();
        for r in &t.rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |cells: &mut dyn Iterator<Item = &str>, out: &mut String| {
            let mut s = String::new();
            for (i, (c, w)) in cells.zip(&widths).enumerate() {
                if i > 0 {
                    s.push_str("  ");
                }
                let pad = w.saturating_sub(c.chars().count());
                if i < t.labels {
                    s.push_str(c);
                    s.extend(std::iter::repeat_n(' ', pad));
                } else {
                    s.extend(std::iter::repeat_n(' ', pad));
                    s.push_str(c);
                }
            }
            let _ = writeln!(out, "{}", s.trim_end());
        };
        line(&mut t.head.iter().map(String::as_str), &mut out);
        for r in &t.rows {
            line(&mut r.iter().map(String::as_str), &mut out);
        }
        if t.rows.is_empty() {
            let _ = writeln!(out, "(none)");
        }
        if let Some(n) = &t.note {
            let _ = writeln!(out, "({n})");
        }
        out.push('\n');
    }
    out
}
