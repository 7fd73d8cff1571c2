//! A stream of known contents, built line by line like the README's
//! examples, and every number the report says about it.

use super::{
    aggregate::{Calls, MAX_PORT_BINS, ProcStats, Report, TW_SERIES_PORTS, TimeWait},
    html, text, time,
};

/// 2026-11-28T21:00:00Z
const T0: i64 = 1_795_899_600 * 1_000_000_000;

fn ts(secs: f64) -> String {
    time::format_nanos(T0 + (secs * 1e9) as i64)
}

fn bind(
    t: f64,
    pid: u32,
    comm: &str,
    port: Option<u16>,
    errno: Option<&str>,
    rule: Option<&str>,
) -> String {
    let (family, proto, addr) = match port {
        Some(_) => ("inet", "\"tcp\"", "127.0.0.1"),
        None => ("unix", "null", "@demo"),
    };
    let port = port.map_or("null".to_owned(), |p| p.to_string());
    let ret = match errno {
        Some("EADDRINUSE") => -98,
        Some("EACCES") => -13,
        Some(_) => -1,
        None => 0,
    };
    let errno_json = errno.map_or("null".to_owned(), |e| format!("\"{e}\""));
    let explain = rule.map_or(String::new(), |r| {
        format!(
            r#","explain":{{"rule":"{r}","hint":"port {port} is held by \"someone\"","blockers":[{{"proto":"tcp","state":"TIME_WAIT","addr":"127.0.0.1","port":{port},"raddr":"127.0.0.1","rport":54556,"uid":0,"reuseaddr":false,"reuseport":false,"v6only":null,"expires_ms":59800,"pid":null,"comm":null,"sock_cookie":5502375}}]}}"#
        )
    });
    format!(
        r#"{{"v":1,"ts":"{}","event":"bind","pid":{pid},"tid":{pid},"comm":"{comm}","uid":0,"cgroup_id":1,"cgroup":"/","container_id":null,"netns":4026532177,"fd":3,"family":"{family}","proto":{proto},"addr":"{addr}","port":{port},"bound_port":null,"options":{{"reuseaddr":true,"reuseport":false,"freebind":false,"transparent":false,"bind_address_no_port":false,"bound_dev_if":0}},"ret":{ret},"errno":{errno_json},"latency_ns":null,"sock_cookie":null,"sock_ino":10264181{explain}}}"#,
        ts(t)
    )
}

/// A failed listen or connect of `(pid, comm)`, its local and destination ports.
fn call(
    t: f64,
    event: &str,
    (pid, comm): (u32, &str),
    (lport, dport): (u16, Option<u16>),
    errno: &str,
    rule: Option<&str>,
) -> String {
    let explain = rule.map_or(String::new(), |r| {
        format!(r#","explain":{{"rule":"{r}","hint":"h","blockers":[]}}"#)
    });
    let dport = dport.map_or("null".to_owned(), |p| p.to_string());
    format!(
        r#"{{"v":1,"ts":"{}","event":"{event}","pid":{pid},"tid":{pid},"comm":"{comm}","uid":0,"cgroup_id":1,"cgroup":"/","container_id":null,"netns":4026532177,"fd":7,"family":"inet","laddr":"127.0.0.1","lport":{lport},"daddr":null,"dport":{dport},"ret":-98,"errno":"{errno}","latency_ns":null{explain}}}"#,
        ts(t)
    )
}

fn tw_enter(t: f64, sport: u16) -> String {
    format!(
        r#"{{"v":1,"ts":"{}","event":"time_wait_enter","sk":"0xffff8882e99ddb00","netns":4026532177,"family":"inet","saddr":"127.0.0.1","sport":{sport},"daddr":"127.0.0.1","dport":47424,"expires_ms":60000,"confirmed":true,"preexisting":false,"sock_cookie":null,"reuseaddr":true,"reuseport":false,"pid":30437,"tid":30437,"comm":"python3","uid":0}}"#,
        ts(t)
    )
}

fn tw_exit(t: f64, sport: u16, reason: &str) -> String {
    format!(
        r#"{{"v":1,"ts":"{}","event":"time_wait_exit","sk":"0xffff8882e99ddb00","netns":4026532177,"family":"inet","saddr":"127.0.0.1","sport":{sport},"daddr":"127.0.0.1","dport":47424,"held_ms":60329,"reason":"{reason}","preexisting":false,"sock_cookie":null}}"#,
        ts(t)
    )
}

fn tcp_state(t: f64) -> String {
    format!(
        r#"{{"v":1,"ts":"{}","event":"tcp_state","sk":"0xffff88811ff88940","pid":null,"tid":null,"comm":null,"uid":null,"netns":4026532177,"family":"inet","saddr":"127.0.0.1","sport":5700,"daddr":"127.0.0.1","dport":20000,"old":"FIN_WAIT2","new":"CLOSE","prev_state_ms":0.013,"reuseaddr":false,"reuseport":false}}"#,
        ts(t)
    )
}

fn counts(event: &str, t: f64, extra: &str, ring: u64, output: u64) -> String {
    format!(
        r#"{{"v":1,"ts":"{}","event":"{event}",{extra}"totals":{{"bind":11,"tcp_state":26,"listen":1,"connect":1,"time_wait_enter":1,"time_wait_exit":1,"lost":0}},"lost":{},"lost_by_cause":{{"ring_buffer":{ring},"inflight_map":0,"time_wait_map":0,"time_wait_queue":0,"output":{output},"recursion":0}},"filtered":0,"explain_coalesced":0,"explain_skipped":1,"cpu_ms":235,"rss_kb":21816}}"#,
        ts(t),
        ring + output
    )
}

/// The known stream: 100 s from `observer_start` to `observer_stop`.
pub fn stream() -> Vec<String> {
    let mut l = vec![format!(
        r#"{{"v":1,"ts":"{}","event":"observer_start","version":"0.1.0","kernel":"6.18.44","pid":27768,"hooks":["tracepoint/syscalls/sys_exit_bind"],"prog_ids":[12369],"cgroup":"/sys/fs/cgroup","ring_buffer_bytes":8388608}}"#,
        ts(0.0)
    )];
    for i in 1..=5 {
        l.push(bind(f64::from(i), 100, "nginx", Some(80), None, None));
    }
    for t in [10.0, 11.0, 12.0] {
        let rule = Some("time_wait_without_reuseaddr");
        l.push(bind(
            t,
            200,
            "python3",
            Some(5700),
            Some("EADDRINUSE"),
            rule,
        ));
    }
    l.push(bind(
        13.0,
        200,
        "python3",
        Some(8080),
        Some("EADDRINUSE"),
        Some("wildcard_overlap"),
    ));
    l.push(bind(
        14.0,
        200,
        "python3",
        Some(8080),
        Some("EADDRINUSE"),
        None,
    ));
    l.push(bind(15.0, 200, "python3", Some(80), Some("EACCES"), None));
    l.push(bind(16.0, 200, "python3", Some(0), None, None));
    l.push(bind(17.0, 200, "python3", Some(0), None, None));
    l.push(bind(18.0, 1, "systemd", None, None, None));
    l.push(bind(19.0, 1, "systemd", None, Some("EADDRINUSE"), None));
    l.push(call(
        20.0,
        "listen",
        (200, "python3"),
        (9000, None),
        "EADDRINUSE",
        Some("listener_conflict"),
    ));
    l.push(call(
        21.0,
        "connect",
        (300, "curl"),
        (0, Some(8080)),
        "EADDRNOTAVAIL",
        None,
    ));
    for t in [22.0, 22.5, 23.0, 23.5] {
        l.push(tcp_state(t));
    }
    for t in [30.0, 31.0, 32.0] {
        l.push(tw_enter(t, 5700));
    }
    l.push(tw_enter(33.0, 5800));
    l.push(format!(
        r#"{{"v":1,"ts":"{}","event":"lost","count":185,"cause":"ring_buffer"}}"#,
        ts(40.0)
    ));
    l.push(format!(
        r#"{{"v":1,"ts":"{}","event":"lost","count":15,"cause":"ring_buffer"}}"#,
        ts(41.0)
    ));
    l.push(format!(
        r#"{{"v":1,"ts":"{}","event":"lost","count":3,"cause":"output"}}"#,
        ts(42.0)
    ));
    l.push(counts("stats", 60.0, "", 200, 0));
    l.push(format!(
        r#"{{"v":1,"ts":"{}","event":"future_kind","x":1}}"#,
        ts(61.0)
    ));
    l.push(tw_exit(90.0, 5700, "expired"));
    l.push(tw_exit(91.0, 5700, "expired"));
    l.push(tw_exit(92.0, 5800, "reused"));
    // Not records: skipped and counted.
    l.push("not json at all".into());
    l.push("{}".into());
    l.push(r#"{"v":1,"ts":"yesterday","event":"bind"}"#.into());
    l.push(r#"{"v":1,"ts":"2026-11-28T21:00:50Z","event":"bind","port":"eighty"}"#.into());
    l.push(bind(50.0, 9, "cut", Some(1), None, None)[..100].to_owned());
    l.push(String::new()); // blank: not even a line
    l.push(counts(
        "observer_stop",
        100.0,
        r#""reason":"SIGTERM","programs":[],"#,
        200,
        3,
    ));
    l
}

fn report_of(lines: &[String]) -> Report {
    let mut r = Report::default();
    let mut reader = super::LineReader::default();
    let joined = lines.join("\n") + "\n";
    reader.feed(&mut joined.as_bytes(), &mut r).unwrap();
    r
}

fn cell<'a>(tables: &'a [text::Table], id: &str, label: &str, col: &str) -> &'a str {
    let t = tables
        .iter()
        .find(|t| t.id == id)
        .unwrap_or_else(|| panic!("{id}"));
    let c = t
        .head
        .iter()
        .position(|h| *h == col)
        .unwrap_or_else(|| panic!("{id}.{col}"));
    let row = t
        .rows
        .iter()
        .find(|r| r[0] == label)
        .unwrap_or_else(|| panic!("{id}: {label}: {:?}", t.rows));
    &row[c]
}

#[test]
fn every_number_of_a_known_stream() {
    let mut r = report_of(&stream());
    assert_eq!(r.lines, 40, "lines, the blank one not counted");
    assert_eq!(r.not_records, 5);
    assert_eq!((r.first, r.last), (Some(T0), Some(T0 + 100_000_000_000)));
    assert_eq!(r.by_event, [1, 15, 4, 4, 3, 1, 1, 0, 3, 1, 1]);
    assert_eq!(r.other_events, 1);
    assert_eq!(r.binds, 15);
    let calls = |bind, listen, connect| Calls {
        bind,
        listen,
        connect,
    };
    assert_eq!(r.failures, calls(7, 1, 1));
    assert_eq!(r.by_errno["EADDRINUSE"], calls(6, 1, 0));
    assert_eq!(r.by_errno["EACCES"], calls(1, 0, 0));
    assert_eq!(r.by_errno["EADDRNOTAVAIL"], calls(0, 0, 1));
    assert_eq!(r.by_errno.len(), 3);
    assert_eq!(r.by_port[&Some(5700)], calls(3, 0, 0));
    assert_eq!(r.by_port[&Some(8080)], calls(2, 0, 1));
    assert_eq!(r.by_port[&Some(80)], calls(1, 0, 0));
    assert_eq!(r.by_port[&Some(9000)], calls(0, 1, 0));
    assert_eq!(r.by_port[&None], calls(1, 0, 0));
    assert_eq!(r.by_port.len(), 5);
    let proc_ = |pid: u32, comm: &str| -> ProcStats {
        r.procs[&pid]
            .iter()
            .find(|(c, _)| c.as_ref() == comm)
            .unwrap()
            .1
            .clone()
    };
    assert_eq!(
        proc_(200, "python3"),
        ProcStats {
            binds: 8,
            failures: calls(6, 1, 0)
        }
    );
    assert_eq!(
        proc_(100, "nginx"),
        ProcStats {
            binds: 5,
            failures: calls(0, 0, 0)
        }
    );
    assert_eq!(
        proc_(1, "systemd"),
        ProcStats {
            binds: 2,
            failures: calls(1, 0, 0)
        }
    );
    assert_eq!(
        proc_(300, "curl"),
        ProcStats {
            binds: 0,
            failures: calls(0, 0, 1)
        }
    );
    assert_eq!(r.by_rule["time_wait_without_reuseaddr"], calls(3, 0, 0));
    assert_eq!(r.by_rule["wildcard_overlap"], calls(1, 0, 0));
    assert_eq!(r.by_rule["listener_conflict"], calls(0, 1, 0));
    assert_eq!(r.unexplained_in_use, calls(2, 0, 0));
    let s = |n: i64| T0 + n * 1_000_000_000;
    assert_eq!(
        r.tw_ports[&5700],
        TimeWait {
            enters: 3,
            exits: 2,
            open: 1,
            max_open: 3,
            max_at: s(32)
        }
    );
    assert_eq!(
        r.tw_ports[&5800],
        TimeWait {
            enters: 1,
            exits: 1,
            open: 0,
            max_open: 1,
            max_at: s(33)
        }
    );
    assert_eq!(
        r.time_wait,
        TimeWait {
            enters: 4,
            exits: 3,
            open: 1,
            max_open: 4,
            max_at: s(33)
        }
    );
    assert_eq!(
        r.tw_exit_reasons
            .iter()
            .map(|(k, v)| (k.as_ref(), *v))
            .collect::<Vec<_>>(),
        [("expired", 2), ("reused", 1)]
    );
    assert_eq!(
        r.lost
            .iter()
            .map(|(k, v)| (k.as_ref(), *v))
            .collect::<Vec<_>>(),
        [("output", 3), ("ring_buffer", 200)]
    );
    assert_eq!(r.lost_records, 3);
    let last = r.last_counts.clone().unwrap();
    assert_eq!(
        (last.event, last.ns, last.lost, last.explain_skipped),
        ("observer_stop", s(100), 203, Some(1))
    );

    // The tables say the same.
    let (tables, chart) = text::tables(&mut r, &["events.jsonl".into()], 10);
    let ids: Vec<&str> = tables.iter().map(|t| t.id).collect();
    assert_eq!(
        ids,
        [
            "summary",
            "records",
            "failures_by_errno",
            "failures_by_port",
            "failures_by_process",
            "failures_by_rule",
            "binders",
            "time_wait_by_port",
            "timeline",
            "time_wait_by_port_over_time",
            "lost"
        ]
    );
    for (what, value) in [
        ("first record", "2026-11-28T21:00:00.000000000Z"),
        ("last record", "2026-11-28T21:01:40.000000000Z"),
        ("span", "1 min 40 s"),
        ("lines", "40"),
        ("records", "35"),
        ("lines not records (skipped)", "5"),
        ("binds", "15"),
        ("failed binds", "7"),
        ("failed listens", "1"),
        ("failed connects", "1"),
        ("time_wait max open", "4"),
        ("lost", "203"),
    ] {
        assert_eq!(cell(&tables, "summary", what, "VALUE"), value, "{what}");
    }
    assert_eq!(cell(&tables, "records", "(other)", "RECORDS"), "1");
    assert_eq!(cell(&tables, "records", "tcp_state", "RECORDS"), "4");
    let rows = |id: &str| tables.iter().find(|t| t.id == id).unwrap().rows.clone();
    assert_eq!(
        rows("failures_by_errno"),
        [
            ["EADDRINUSE", "7", "6", "1", "0"],
            ["EACCES", "1", "1", "0", "0"],
            ["EADDRNOTAVAIL", "1", "0", "0", "1"]
        ]
    );
    assert_eq!(
        rows("failures_by_port"),
        [
            ["5700", "3", "3", "0", "0"],
            ["8080", "3", "2", "0", "1"],
            ["-", "1", "1", "0", "0"],
            ["80", "1", "1", "0", "0"],
            ["9000", "1", "0", "1", "0"]
        ]
    );
    assert_eq!(
        rows("failures_by_process"),
        [
            ["python3", "200", "7", "6", "1", "0"],
            ["curl", "300", "1", "0", "0", "1"],
            ["systemd", "1", "1", "1", "0", "0"]
        ]
    );
    assert_eq!(
        rows("failures_by_rule"),
        [
            ["time_wait_without_reuseaddr", "3", "3", "0"],
            ["listener_conflict", "1", "0", "1"],
            ["wildcard_overlap", "1", "1", "0"],
            ["(EADDRINUSE not explained)", "2", "2", "0"]
        ]
    );
    assert!(
        tables[5]
            .note
            .as_deref()
            .unwrap()
            .starts_with("1 failures written without explanation")
    );
    assert_eq!(
        rows("binders"),
        [
            ["python3", "200", "8", "6"],
            ["nginx", "100", "5", "0"],
            ["systemd", "1", "2", "1"]
        ]
    );
    assert_eq!(
        rows("time_wait_by_port"),
        [
            ["5700", "3", "2", "1", "3", "2026-11-28T21:00:32.000Z"],
            ["5800", "1", "1", "0", "1", "2026-11-28T21:00:33.000Z"],
            ["(all)", "4", "3", "1", "4", "2026-11-28T21:00:33.000Z"]
        ]
    );
    assert!(
        tables[7]
            .note
            .as_deref()
            .unwrap()
            .contains("exits: expired 2, reused 1")
    );
    assert_eq!(
        rows("lost"),
        [
            ["output", "3", "3"],
            ["ring_buffer", "200", "200"],
            ["(all)", "203", "203"]
        ]
    );

    // 100 s in buckets of 2 s: 51 buckets, from 21:00:00 to 21:01:40.
    assert_eq!(chart.width_ms, 2000);
    assert_eq!(tables[8].title, "OVER TIME (buckets of 2 s, UTC)");
    let tl = rows("timeline");
    assert_eq!(tl.len(), 51);
    assert_eq!(
        tl[0],
        ["21:00:00", "1", "0", "0", "0", "0"],
        "the bind at 1 s"
    );
    assert_eq!(
        tl[5],
        ["21:00:10", "2", "2", "0", "0", "0"],
        "binds at 10 and 11 s"
    );
    assert_eq!(
        tl[10],
        ["21:00:20", "0", "2", "0", "0", "0"],
        "listen at 20 s, connect at 21 s"
    );
    assert_eq!(tl[15], ["21:00:30", "0", "0", "2", "0", "2"]);
    assert_eq!(tl[16], ["21:00:32", "0", "0", "2", "0", "4"]);
    assert_eq!(tl[45], ["21:01:30", "0", "0", "0", "2", "2"]);
    assert_eq!(tl[46], ["21:01:32", "0", "0", "0", "1", "1"]);
    assert_eq!(tl[50], ["21:01:40", "0", "0", "0", "0", "1"]);
    // TIME_WAIT open per port: 51 buckets in 9 columns of 6 (12 s).
    let t = tables
        .iter()
        .find(|t| t.id == "time_wait_by_port_over_time")
        .unwrap();
    assert_eq!(
        t.title,
        "TIME_WAIT OPEN BY LOCAL PORT OVER TIME (columns of 12 s, UTC)"
    );
    assert_eq!(
        t.head,
        [
            "PORT", "21:00:00", "21:00:12", "21:00:24", "21:00:36", "21:00:48", "21:01:00",
            "21:01:12", "21:01:24", "21:01:36"
        ]
    );
    assert_eq!(
        rows("time_wait_by_port_over_time"),
        [
            ["5700", "0", "0", "3", "3", "3", "3", "3", "3", "1"],
            ["5800", "0", "0", "1", "1", "1", "1", "1", "1", "0"],
            ["(all)", "0", "0", "4", "4", "4", "4", "4", "4", "1"]
        ],
        "no (other): every port is shown"
    );
    // The chart's series, bucket by bucket: 5700 enters at 30, 31, 32 s and
    // exits at 90, 91 s; 5800 enters at 33 s and exits at 92 s.
    let series = |at: &[(usize, i64)]| -> Vec<i64> {
        (0..51)
            .map(|i| {
                at.iter()
                    .rev()
                    .find(|(from, _)| i >= *from)
                    .map_or(0, |a| a.1)
            })
            .collect()
    };
    assert_eq!(
        chart.ports,
        [
            ("5700".to_owned(), series(&[(15, 2), (16, 3), (45, 1)])),
            ("5800".to_owned(), series(&[(16, 1), (46, 0)])),
        ]
    );
    let sum = |c: usize| tl.iter().map(|r| r[c].parse::<u64>().unwrap()).sum::<u64>();
    assert_eq!([sum(1), sum(2), sum(3), sum(4)], [15, 9, 4, 3]);
    assert_eq!(chart.open.iter().copied().max(), Some(4));

    // The terminal's text and the page hold the same cells.
    let printed = text::render(&tables);
    assert_eq!(
        parse_text(&printed),
        tables
            .iter()
            .map(|t| (
                t.title.clone(),
                t.head.iter().map(|h| h.to_string()).collect(),
                t.rows.clone()
            ))
            .collect::<Vec<_>>()
    );
    let page = html::render(&tables, &chart, r.first, r.last);
    assert!(page.contains("<svg id=\"chart\""));
    assert!(page.contains("<svg id=\"chart-ports\""));
    for port in ["5700", "5800"] {
        assert!(page.contains(&format!("<g class=\"port\" data-port=\"{port}\">")));
        assert!(page.contains(&format!(">port {port}</text>")));
    }
    assert!(
        !page.contains("http://")
            || page
                .matches("http://")
                .all(|_| page.contains("xmlns=\"http://www.w3.org/2000/svg\""))
    );
    assert!(
        !page.contains("<script") && !page.contains("src=") && !page.contains("href="),
        "nothing fetched"
    );
    for t in &tables {
        assert!(page.contains(&format!(
            "<table id=\"t-{}\"><caption>{}</caption>",
            t.id,
            html::esc(&t.title)
        )));
        for row in &t.rows {
            let cells: String = row
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    format!(
                        "<td{}>{}</td>",
                        if i < t.labels { " class=\"l\"" } else { "" },
                        html::esc(c)
                    )
                })
                .collect();
            assert!(page.contains(&format!("<tr>{cells}</tr>")), "{cells}");
        }
    }
}

/// The terminal's tables read back: per table its title, head, rows (cells
/// are two or more spaces apart; a note is one parenthesized cell).
pub fn parse_text(s: &str) -> Vec<(String, Vec<String>, Vec<Vec<String>>)> {
    s.split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .map(|block| {
            let mut lines = block.lines();
            let title = lines.next().unwrap().to_owned();
            let split = |l: &str| -> Vec<String> {
                l.trim()
                    .split("  ")
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .map(str::to_owned)
                    .collect()
            };
            let head = split(lines.next().unwrap());
            let rows = lines
                .map(split)
                .filter(|r| !(r.len() == 1 && r[0].starts_with('(')))
                .collect();
            (title, head, rows)
        })
        .collect()
}

#[test]
fn rotated_files_and_partial_lines() {
    let lines = stream();
    let whole = report_of(&lines);
    // The same stream cut in three files, one ending without its newline,
    // read through a reader that returns a few bytes at a time.
    struct Trickle<'a>(&'a [u8]);
    impl std::io::Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.0.len().min(buf.len()).min(7);
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }
    let parts = [
        lines[..10].join("\n") + "\n",
        lines[10..20].join("\n"),
        "\n".to_owned() + &lines[20..].join("\n") + "\n",
    ];
    let mut r = Report::default();
    let mut reader = super::LineReader::default();
    for p in &parts {
        reader.feed(&mut Trickle(p.as_bytes()), &mut r).unwrap();
    }
    assert_eq!(
        (r.lines, r.not_records, r.binds, r.failures),
        (whole.lines, whole.not_records, whole.binds, whole.failures)
    );
    assert_eq!(r.by_event, whole.by_event);
}

#[test]
fn an_empty_stream_is_a_report_of_nothing() {
    let mut r = report_of(&[]);
    let (tables, chart) = text::tables(&mut r, &["stdin".into()], 10);
    assert!(chart.buckets.is_empty());
    let printed = text::render(&tables);
    let summary = &parse_text(&printed)[0];
    assert!(
        summary
            .2
            .contains(&vec!["first record".to_owned(), "-".to_owned()]),
        "{printed}"
    );
    assert!(
        summary
            .2
            .contains(&vec!["lines".to_owned(), "0".to_owned()]),
        "{printed}"
    );
    assert!(html::render(&tables, &chart, None, None).contains("no records"));
}

#[test]
fn a_day_of_records_in_at_most_sixty_buckets_and_bounded_bins() {
    let mut r = Report::default();
    // A bind every 0.5 s for a day (172,800 records), in order.
    for i in 0..172_800i64 {
        r.line(bind(i as f64 * 0.5, 1, "a", Some(80), None, None).as_bytes());
    }
    let (tables, chart) = text::tables(&mut r, &["-".into()], 10);
    assert_eq!(chart.width_ms, 1_800_000, "30 min buckets");
    assert_eq!(chart.buckets.len(), 48);
    assert_eq!(
        chart.buckets.iter().map(|(_, b)| b.binds).sum::<u64>(),
        172_800
    );
    assert_eq!(chart.buckets[0].1.binds, 3600);
    assert!(
        tables
            .iter()
            .any(|t| t.title == "OVER TIME (buckets of 30 min, UTC)")
    );
    // Widened as it went: never more than its bound of bins.
    assert!(r.timeline_bins() <= 1 << 16);
}

#[test]
fn a_clock_gone_wrong_still_makes_a_short_timeline() {
    let mut r = Report::default();
    for t in [
        "1677-09-22T00:12:44Z",
        "2026-11-28T21:00:00Z",
        "2262-04-11T23:47:16Z",
    ] {
        let l = bind(0.0, 1, "a", Some(80), None, None).replace(&ts(0.0), t);
        r.line(l.as_bytes());
    }
    // Only exits on a port: no time of "most open".
    r.line(tw_exit(1.0, 9, "expired").as_bytes());
    assert_eq!((r.binds, r.not_records), (3, 0));
    let (tables, chart) = text::tables(&mut r, &["-".into()], 10);
    assert!(
        (2..=61).contains(&chart.buckets.len()),
        "{}",
        chart.buckets.len()
    );
    assert_eq!(chart.buckets.iter().map(|(_, b)| b.binds).sum::<u64>(), 3);
    let tw = tables.iter().find(|t| t.id == "time_wait_by_port").unwrap();
    assert_eq!(tw.rows[0], ["9", "0", "1", "-1", "0", "-"]);
}

#[test]
fn top_n_keeps_the_largest_and_says_how_many_more() {
    let mut r = Report::default();
    for port in 1..=30u16 {
        for _ in 0..port {
            r.line(bind(1.0, 7, "x", Some(port), Some("EADDRINUSE"), None).as_bytes());
        }
    }
    let (tables, _) = text::tables(&mut r, &["-".into()], 3);
    let t = tables.iter().find(|t| t.id == "failures_by_port").unwrap();
    assert_eq!(
        t.rows.iter().map(|r| r[0].as_str()).collect::<Vec<_>>(),
        ["30", "29", "28"]
    );
    assert!(t.note.as_deref().unwrap().starts_with("27 more ports"));
}

/// A stream of TIME_WAIT records only, over ten minutes from `T0`: (time s, port, enter).
fn tw_stream(events: &[(f64, u16, bool)]) -> Report {
    let mut r = Report::default();
    r.line(bind(0.0, 1, "a", Some(1), None, None).as_bytes());
    for &(t, port, enter) in events {
        let l = if enter {
            tw_enter(t, port)
        } else {
            tw_exit(t, port, "expired")
        };
        r.line(l.as_bytes());
    }
    r.line(bind(599.0, 1, "a", Some(1), None, None).as_bytes());
    r
}

#[test]
fn time_wait_per_port_over_time_of_two_ports() {
    // Port 80: 5 enters at 5..9 s, exits 60 s later; 443: 3 enters at 150 s, exits at 300 s.
    let mut ev = Vec::new();
    for i in 0..5 {
        ev.push((5.0 + f64::from(i), 80, true));
    }
    for _ in 0..3 {
        ev.push((150.0, 443, true));
    }
    for i in 0..5 {
        ev.push((65.0 + f64::from(i), 80, false));
    }
    for _ in 0..3 {
        ev.push((300.0, 443, false));
    }
    ev.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut r = tw_stream(&ev);
    let (tables, chart) = text::tables(&mut r, &["-".into()], 10);
    let t = tables
        .iter()
        .find(|t| t.id == "time_wait_by_port_over_time")
        .unwrap();
    // 60 buckets of 10 s in 10 columns of a minute.
    assert_eq!(chart.width_ms, 10_000);
    assert_eq!(
        t.title,
        "TIME_WAIT OPEN BY LOCAL PORT OVER TIME (columns of 1 min, UTC)"
    );
    assert_eq!(
        t.head,
        [
            "PORT", "21:00", "21:01", "21:02", "21:03", "21:04", "21:05", "21:06", "21:07",
            "21:08", "21:09"
        ]
    );
    // Ranked by the most open at once; each column the most at a bucket's end
    // (the five of port 80 are open at 21:01:00, the end of the first minute's
    // last bucket, and gone by 21:01:10).
    assert_eq!(
        t.rows,
        [
            ["80", "5", "0", "0", "0", "0", "0", "0", "0", "0", "0"],
            ["443", "0", "0", "3", "3", "3", "0", "0", "0", "0", "0"],
            ["(all)", "5", "0", "3", "3", "3", "0", "0", "0", "0", "0"]
        ]
    );
    let at = |port: &str| &chart.ports.iter().find(|p| p.0 == port).unwrap().1;
    let mut want80 = vec![0; 60];
    want80[0] = 5;
    want80[1..=5].fill(5);
    want80[6] = 0;
    assert_eq!(at("80"), &want80);
    let mut want443 = vec![0; 60];
    want443[15..30].fill(3);
    assert_eq!(at("443"), &want443);
    assert_eq!(chart.ports.len(), 2);

    // --top 1: the other port is (other), and said so.
    let (tables, chart) = text::tables(&mut r, &["-".into()], 1);
    let t = tables
        .iter()
        .find(|t| t.id == "time_wait_by_port_over_time")
        .unwrap();
    assert_eq!(
        t.rows.iter().map(|r| r[0].as_str()).collect::<Vec<_>>(),
        ["80", "(other)", "(all)"]
    );
    assert_eq!(t.rows[1][1..6], ["0", "0", "3", "3", "3"]);
    assert!(
        t.note
            .as_deref()
            .unwrap()
            .starts_with("1 more ports in (other)")
    );
    assert_eq!(chart.ports[1], ("(other)".to_owned(), want443));
}

#[test]
fn time_wait_series_are_kept_for_64_ports_and_sum_to_the_host() {
    // 100 ports with one socket each come first and fill the 64 series; then
    // port 9999 has 5 at once: it takes a series (from its third, when it
    // passes the one the kept ports have), and its sockets open until then move with it.
    let mut ev: Vec<(f64, u16, bool)> = (0..100).map(|i| (1.0, 2000 + i, true)).collect();
    for i in 0..5 {
        ev.push((100.0 + f64::from(i), 9999, true));
    }
    for i in 0..5 {
        ev.push((200.0 + f64::from(i), 9999, false));
    }
    for i in 0..100 {
        ev.push((400.0, 2000 + i, false));
    }
    let mut r = tw_stream(&ev);
    let kept: Vec<u16> = r.tw_series.ports().collect();
    assert_eq!(kept.len(), TW_SERIES_PORTS);
    assert!(kept.contains(&9999));
    let (_, chart) = text::tables(&mut r, &["-".into()], 3);
    let (w, start, n) = (chart.width_ms, chart.buckets[0].0, chart.buckets.len());
    let mine = r.tw_series.open(Some(9999), w, start, n);
    let secs = |s: i64| (s * 1000 / w) as usize;
    for (i, v) in mine.iter().enumerate() {
        let want = match i {
            _ if i < secs(100) => 0,
            _ if i < secs(104) => i as i64 - secs(100) as i64 + 1,
            _ if i < secs(200) => 5,
            _ if i < secs(204) => 5 - (i as i64 - secs(200) as i64 + 1),
            _ => 0,
        };
        assert_eq!(*v, want, "bucket {i}");
    }
    assert_eq!(chart.ports[0].0, "9999");
    // The kept series and `other` together are the host's, bucket by bucket.
    let mut sum = r.tw_series.open(None, w, start, n);
    for p in &kept {
        for (s, v) in sum.iter_mut().zip(r.tw_series.open(Some(*p), w, start, n)) {
            *s += v;
        }
    }
    assert_eq!(sum, chart.open);
    assert_eq!(chart.width_ms, 10_000);
    assert_eq!(chart.open[secs(100)], 105);
    assert_eq!(
        mine[secs(100)],
        5,
        "all five, the two before it was kept too"
    );
}

#[test]
fn time_wait_series_bins_are_bounded() {
    // 100,000 enters half a second apart on 64 ports: more bins than the
    // bound at 10 ms, so the series widen; every port's count is still exact.
    let mut r = Report::default();
    for i in 0..100_000u32 {
        r.line(tw_enter(f64::from(i) * 0.5, 1000 + (i % 64) as u16).as_bytes());
    }
    assert!(
        r.tw_series.bins() <= MAX_PORT_BINS,
        "{}",
        r.tw_series.bins()
    );
    assert!(r.tw_series.width() > 0);
    let (tables, chart) = text::tables(&mut r, &["-".into()], 64);
    let t = tables
        .iter()
        .find(|t| t.id == "time_wait_by_port_over_time")
        .unwrap();
    assert_eq!(t.rows.len(), 65, "64 ports and (all)");
    for row in &t.rows[..64] {
        let port: u32 = row[0].parse().unwrap();
        let enters = (0..100_000u32).filter(|i| 1000 + i % 64 == port).count();
        assert_eq!(row.last().unwrap(), &enters.to_string(), "{port}");
    }
    assert_eq!(t.rows[64].last().unwrap(), "100000");
    assert_eq!(chart.open.last(), Some(&100_000));
}

mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// No line, however odd, makes the report panic; a line is a record or counted as not one.
        #[test]
        fn any_line(bytes in proptest::collection::vec(any::<u8>(), 0..300), cut in 0usize..700) {
            let mut r = Report::default();
            r.line(&bytes);
            let l = bind(3.0, 1, "p", Some(1), Some("EADDRINUSE"), Some("x"));
            let cut = cut.min(l.len());
            r.line(&l.as_bytes()[..cut]);
            let mut mangled = l.clone().into_bytes();
            if let Some(b) = mangled.get_mut(cut) { *b = bytes.first().copied().unwrap_or(b'"'); }
            r.line(&mangled);
            let (tables, chart) = text::tables(&mut r, &["-".into()], 5);
            let _ = html::render(&tables, &chart, r.first, r.last);
            let records: u64 = r.by_event.iter().sum::<u64>() + r.other_events;
            prop_assert_eq!(records + r.not_records, r.lines);
        }
    }
}
