//! `observer report` on a stream of known contents: the numbers it prints,
//! the same numbers in its HTML page as headless Chromium renders it, and a
//! screenshot of that page that is not blank. No root needed, but to install
//! Debian's chromium when it is missing (`cargo xtask test` installs it).

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use observer_tests::observer::observer_bin;

/// 2026-11-28T21:00:SS
fn ts(sec: u32, ms: u32) -> String {
    format!(
        "2026-11-28T21:{:02}:{:02}.{ms:03}000000Z",
        sec / 60,
        sec % 60
    )
}

fn bind(
    t: u32,
    pid: u32,
    comm: &str,
    port: u16,
    errno: Option<&str>,
    rule: Option<&str>,
) -> String {
    let (ret, errno) = match errno {
        Some(e) => (-98, format!("\"{e}\"")),
        None => (0, "null".to_owned()),
    };
    let explain = rule.map_or(String::new(), |r| {
        format!(r#","explain":{{"rule":"{r}","hint":"port {port} is held","blockers":[]}}"#)
    });
    format!(
        r#"{{"v":1,"ts":"{}","event":"bind","pid":{pid},"tid":{pid},"comm":"{comm}","uid":0,"cgroup_id":1,"cgroup":"/","container_id":null,"netns":4026532177,"fd":3,"family":"inet","proto":"tcp","addr":"127.0.0.1","port":{port},"bound_port":null,"options":{{"reuseaddr":false,"reuseport":false,"freebind":false,"transparent":false,"bind_address_no_port":false,"bound_dev_if":0}},"ret":{ret},"errno":{errno},"latency_ns":null,"sock_cookie":null,"sock_ino":10264181{explain}}}"#,
        ts(t, 0)
    )
}

fn time_wait(t: u32, ms: u32, enter: bool, sport: u16) -> String {
    if enter {
        format!(
            r#"{{"v":1,"ts":"{}","event":"time_wait_enter","sk":"0xffff8882e99ddb00","netns":4026532177,"family":"inet","saddr":"127.0.0.1","sport":{sport},"daddr":"127.0.0.1","dport":47424,"expires_ms":60000,"confirmed":true,"preexisting":false,"sock_cookie":null,"reuseaddr":true,"reuseport":false,"pid":30437,"tid":30437,"comm":"python3","uid":0}}"#,
            ts(t, ms)
        )
    } else {
        format!(
            r#"{{"v":1,"ts":"{}","event":"time_wait_exit","sk":"0xffff8882e99ddb00","netns":4026532177,"family":"inet","saddr":"127.0.0.1","sport":{sport},"daddr":"127.0.0.1","dport":47424,"held_ms":60000,"reason":"expired","preexisting":false,"sock_cookie":null}}"#,
            ts(t, ms)
        )
    }
}

/// Ten minutes of a host where a server restarts into its own TIME_WAIT
/// sockets: known numbers throughout.
fn known_stream() -> Vec<String> {
    let mut l = vec![format!(
        r#"{{"v":1,"ts":"{}","event":"observer_start","version":"0.1.0","kernel":"6.18.44","pid":27768,"hooks":[],"prog_ids":[],"cgroup":"/sys/fs/cgroup","ring_buffer_bytes":8388608}}"#,
        ts(0, 0)
    )];
    // nginx binds 80 and 443 once a minute: 20 binds.
    for m in 0..10 {
        l.push(bind(m * 60 + 1, 812, "nginx", 80, None, None));
        l.push(bind(m * 60 + 2, 812, "nginx", 443, None, None));
    }
    // 200 connections to 5700 closed by the server: TIME_WAIT in minutes 1-2, gone 60 s later.
    for i in 0..200 {
        l.push(time_wait(60 + i / 2, (i % 2) * 500, true, 5700));
    }
    for i in 0..200 {
        l.push(time_wait(160 + i / 2, (i % 2) * 500, false, 5700));
    }
    // 20 to 443 closed at minute 5, gone 70 s later.
    for i in 0..20 {
        l.push(time_wait(300 + i / 2, (i % 2) * 500, true, 443));
    }
    for i in 0..20 {
        l.push(time_wait(370 + i / 2, (i % 2) * 500, false, 443));
    }
    // The restart at minute 3: 30 failed binds (20 explained), then one that works.
    for i in 0..30 {
        let rule = (i < 20).then_some("time_wait_without_reuseaddr");
        l.push(bind(
            180 + i,
            9422,
            "python3",
            5700,
            Some("EADDRINUSE"),
            rule,
        ));
    }
    l.push(bind(240, 9422, "python3", 5700, None, None));
    // A second server fights over 8080: 5 failures.
    for i in 0..5 {
        l.push(bind(
            300 + i,
            9500,
            "java",
            8080,
            Some("EADDRINUSE"),
            Some("wildcard_overlap"),
        ));
    }
    l.push(format!(
        r#"{{"v":1,"ts":"{}","event":"lost","count":42,"cause":"ring_buffer"}}"#,
        ts(400, 0)
    ));
    l.push("garbage that is not a record".into());
    l.push(format!(
        r#"{{"v":1,"ts":"{}","event":"observer_stop","reason":"SIGTERM","totals":{{"bind":56,"tcp_state":0,"listen":0,"connect":0,"time_wait_enter":220,"time_wait_exit":220,"lost":42}},"lost":42,"lost_by_cause":{{"ring_buffer":42,"inflight_map":0,"time_wait_map":0,"time_wait_queue":0,"output":0,"recursion":0}},"filtered":0,"explain_coalesced":0,"explain_skipped":0,"programs":[]}}"#,
        ts(599, 0)
    ));
    l
}

struct Dir(PathBuf);

impl Dir {
    /// A fresh directory of this test's own (tests may run side by side).
    fn new(test: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("observer-report-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn report(args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(observer_bin())
        .arg("report")
        .args(args)
        .output()
        .expect("running observer report")
}

type Tables = Vec<(String, Vec<String>, Vec<Vec<String>>)>;

/// The terminal's tables: title, head, rows (cells two or more spaces apart;
/// a note is one parenthesized cell).
fn text_tables(s: &str) -> Tables {
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

/// The tables of a DOM as Chromium serialized it: per `<table id="t-…">` its
/// caption, header cells and rows of cells, as text.
fn dom_tables(dom: &str) -> Tables {
    let mut out = Vec::new();
    let mut rest = dom;
    while let Some(i) = rest.find("<table id=\"t-") {
        let end = rest[i..].find("</table>").expect("a table ends") + i;
        let t = &rest[i..end];
        rest = &rest[end..];
        let texts = |tag: &str, within: &str| -> Vec<String> {
            let open = format!("<{tag}");
            let close = format!("</{tag}>");
            let mut v = Vec::new();
            let mut s = within;
            while let Some(a) = s.find(&open) {
                let body_at = s[a..].find('>').unwrap() + a + 1;
                let b = s[body_at..].find(&close).unwrap() + body_at;
                v.push(unescape(&strip_tags(&s[body_at..b])));
                s = &s[b + close.len()..];
            }
            v
        };
        let caption = texts("caption", t).pop().unwrap_or_default();
        let head = texts("th", t);
        let body = &t[t.find("<tbody>").unwrap_or(0)..];
        let rows = texts("tr", body)
            .into_iter()
            .zip(body.split("<tr>").skip(1))
            .map(|(_, raw)| texts("td", raw))
            .collect();
        out.push((caption, head, rows));
    }
    out
}

fn strip_tags(s: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for c in s.chars() {
        match c {
            '<' => inside = true,
            '>' => inside = false,
            c if !inside => out.push(c),
            _ => {}
        }
    }
    out
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&")
}

fn row<'a>(t: &'a Tables, title: &str, label: &str) -> &'a [String] {
    let t = t
        .iter()
        .find(|t| t.0.starts_with(title))
        .unwrap_or_else(|| panic!("no table {title}"));
    t.2.iter()
        .find(|r| r[0] == label)
        .unwrap_or_else(|| panic!("{title}: no row {label}: {:?}", t.2))
}

#[test]
fn report_numbers_of_a_known_stream() {
    let dir = Dir::new("numbers");
    let lines = known_stream();
    let file = dir.0.join("events.jsonl");
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let out = report(&[file.as_os_str()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
    let printed = String::from_utf8(out.stdout).unwrap();
    let t = text_tables(&printed);
    assert_eq!(row(&t, "SUMMARY", "lines")[1], "500", "{printed}");
    assert_eq!(row(&t, "SUMMARY", "records")[1], "499");
    assert_eq!(row(&t, "SUMMARY", "lines not records (skipped)")[1], "1");
    assert_eq!(row(&t, "SUMMARY", "span")[1], "9 min 59 s");
    assert_eq!(row(&t, "SUMMARY", "binds")[1], "56");
    assert_eq!(row(&t, "SUMMARY", "failed binds")[1], "35");
    assert_eq!(row(&t, "SUMMARY", "time_wait max open")[1], "200");
    assert_eq!(
        row(&t, "FAILURES BY ERRNO", "EADDRINUSE")[1..],
        ["35", "35", "0", "0"]
    );
    assert_eq!(row(&t, "FAILURES BY PORT", "5700")[1], "30");
    assert_eq!(row(&t, "FAILURES BY PORT", "8080")[1], "5");
    assert_eq!(
        row(&t, "FAILURES BY PROCESS", "python3")[1..3],
        ["9422", "30"]
    );
    assert_eq!(row(&t, "FAILURES BY PROCESS", "java")[1..3], ["9500", "5"]);
    assert_eq!(
        row(
            &t,
            "FAILURES BY EXPLAIN RULE",
            "time_wait_without_reuseaddr"
        )[1],
        "20"
    );
    assert_eq!(
        row(&t, "FAILURES BY EXPLAIN RULE", "wildcard_overlap")[1],
        "5"
    );
    assert_eq!(
        row(&t, "FAILURES BY EXPLAIN RULE", "(EADDRINUSE not explained)")[1],
        "10"
    );
    assert_eq!(
        row(&t, "BUSIEST BINDERS", "python3")[1..],
        ["9422", "31", "30"]
    );
    assert_eq!(row(&t, "BUSIEST BINDERS", "nginx")[1..], ["812", "20", "0"]);
    assert_eq!(
        row(&t, "TIME_WAIT BY LOCAL PORT", "5700")[1..],
        ["200", "200", "0", "200", "2026-11-28T21:02:39.500Z"]
    );
    assert_eq!(
        row(&t, "TIME_WAIT BY LOCAL PORT", "443")[1..],
        ["20", "20", "0", "20", "2026-11-28T21:05:09.500Z"]
    );
    assert_eq!(row(&t, "LOST", "ring_buffer")[1..], ["42", "42"]);
    // TIME_WAIT open per port: the most at a 10 s bucket's end in each minute.
    let per_port = t
        .iter()
        .find(|t| t.0.starts_with("TIME_WAIT OPEN BY LOCAL PORT OVER TIME"))
        .unwrap();
    assert_eq!(
        per_port.0,
        "TIME_WAIT OPEN BY LOCAL PORT OVER TIME (columns of 1 min, UTC)"
    );
    assert_eq!(
        per_port.1,
        [
            "PORT", "21:00", "21:01", "21:02", "21:03", "21:04", "21:05", "21:06", "21:07",
            "21:08", "21:09"
        ]
    );
    assert_eq!(
        per_port.2,
        [
            [
                "5700", "0", "120", "200", "140", "20", "0", "0", "0", "0", "0"
            ],
            ["443", "0", "0", "0", "0", "0", "20", "20", "0", "0", "0"],
            [
                "(all)", "0", "120", "200", "140", "20", "20", "20", "0", "0", "0"
            ]
        ]
    );
    // Ten minutes in buckets of 10 s.
    let timeline = t.iter().find(|t| t.0.starts_with("OVER TIME")).unwrap();
    assert_eq!(timeline.0, "OVER TIME (buckets of 10 s, UTC)");
    assert_eq!(timeline.2.len(), 60);
    assert_eq!(row(&t, "OVER TIME", "21:02:30")[5], "200", "all open");
    assert_eq!(
        row(&t, "OVER TIME", "21:03:00")[1..3],
        ["12", "10"],
        "nginx's two and the restart's ten"
    );

    // Rotated files in order, and stdin, say the same (but for the input row).
    let (a, b) = (dir.0.join("events.jsonl.1"), dir.0.join("events.jsonl.2"));
    std::fs::write(&a, lines[..200].join("\n") + "\n").unwrap();
    std::fs::write(&b, lines[200..].join("\n")).unwrap();
    let rotated = report(&[a.as_os_str(), b.as_os_str()]);
    assert!(rotated.status.success());
    let stdin = Command::new(observer_bin())
        .args(["report", "-"])
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .unwrap();
    assert!(stdin.status.success());
    let without_input = |o: &[u8]| -> String {
        String::from_utf8_lossy(o)
            .lines()
            .filter(|l| !l.starts_with("input "))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let want = without_input(printed.as_bytes());
    assert_eq!(without_input(&rotated.stdout), want);
    assert_eq!(without_input(&stdin.stdout), want);
    let stdin_tables = text_tables(&String::from_utf8_lossy(&stdin.stdout));
    assert_eq!(row(&stdin_tables, "SUMMARY", "input")[1], "stdin");
}

#[test]
fn report_errors_are_one_line_and_a_closed_stdout_is_quiet() {
    let dir = Dir::new("errors");
    for (args, says) in [
        (
            vec!["/nonexistent/events.jsonl"],
            "/nonexistent/events.jsonl: No such file",
        ),
        (vec!["/"], "/: is a directory"),
        (vec!["--top", "0"], "--top"),
        (vec!["-", "--html", "/proc/version"], "--html /proc/version"),
    ] {
        let out = Command::new(observer_bin())
            .arg("report")
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("observer: ") && stderr.contains(says),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    // `observer report … | head`: the reader is gone before the report is written.
    let file = dir.0.join("events.jsonl");
    std::fs::write(&file, known_stream().join("\n")).unwrap();
    // The page is not written over the stream it is made of.
    let out = report(&[file.as_os_str(), "--html".as_ref(), file.as_os_str()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is one of the files to read"));
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        known_stream().join("\n")
    );
    let mut child = Command::new(observer_bin())
        .arg("report")
        .arg(&file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Debian's chromium, installed when missing and we may; `None` (and why) when it cannot be had.
fn chromium() -> Result<PathBuf, String> {
    let found = || {
        ["/usr/bin/chromium", "/usr/bin/chromium-headless-shell"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
    };
    if let Some(p) = found() {
        return Ok(p);
    }
    if unsafe { libc::geteuid() } != 0 {
        return Err("chromium is not installed and installing it needs root".into());
    }
    let install = Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends", "chromium"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::null())
        .status();
    match install {
        Ok(s) if s.success() => {
            found().ok_or_else(|| "apt-get installed chromium, but not at /usr/bin/chromium".into())
        }
        other => Err(format!("`apt-get install chromium` failed: {other:?}")),
    }
}

/// Headless Chromium, as the machine's notes say it runs here: no sandbox
/// (root), no GPU, none of its background connections, a fresh profile.
fn headless(chromium: &Path, profile: &Path) -> Command {
    let mut c = Command::new(chromium);
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--window-size=1200,1600",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .stdin(Stdio::null());
    c
}

#[test]
fn report_page_in_chromium() {
    let chromium = match chromium() {
        Ok(p) => p,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let dir = Dir::new("chromium");
    let file = dir.0.join("events.jsonl");
    std::fs::write(&file, known_stream().join("\n") + "\n").unwrap();
    let page = dir.0.join("page.html");
    let out = report(&[file.as_os_str(), "--html".as_ref(), page.as_os_str()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = text_tables(&String::from_utf8(out.stdout).unwrap());
    let html = std::fs::read_to_string(&page).unwrap();
    for fetch in ["<script", "src=", "href=", "url(", "@import"] {
        assert!(
            !html.contains(fetch),
            "the page must fetch nothing: {fetch}"
        );
    }
    let url = format!("file://{}", page.display());

    let dom = headless(&chromium, &dir.0.join("profile-dom"))
        .arg("--dump-dom")
        .arg(&url)
        .stderr(Stdio::null())
        .output()
        .expect("running chromium --dump-dom");
    assert!(dom.status.success(), "chromium --dump-dom: {}", dom.status);
    let dom = String::from_utf8_lossy(&dom.stdout);
    let shown = dom_tables(&dom);
    assert_eq!(
        shown.len(),
        text.len(),
        "tables in the page and in the text"
    );
    for (page_t, text_t) in shown.iter().zip(&text) {
        assert_eq!(page_t, text_t, "the page's table and the report's");
    }
    // The table of TIME_WAIT open per port over time among them, cell for cell.
    let per_port = |t: &Tables| {
        t.iter()
            .find(|t| t.0.starts_with("TIME_WAIT OPEN BY LOCAL PORT OVER TIME"))
            .cloned()
            .expect("the table of TIME_WAIT open per port over time")
    };
    assert_eq!(per_port(&shown), per_port(&text));
    assert_eq!(per_port(&shown).2.len(), 3, "5700, 443, (all)");
    assert!(
        dom.contains("<svg id=\"chart\""),
        "the chart is in the page"
    );
    assert!(
        dom.contains("<svg id=\"chart-ports\""),
        "the per-port chart is in the page"
    );
    for port in ["5700", "443"] {
        assert!(
            dom.contains(&format!("<g class=\"port\" data-port=\"{port}\">")),
            "a line and a legend for port {port}"
        );
    }

    let png = dir.0.join("page.png");
    let shot = headless(&chromium, &dir.0.join("profile-shot"))
        .arg(format!("--screenshot={}", png.display()))
        .arg(&url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("running chromium --screenshot");
    assert!(shot.success(), "chromium --screenshot: {shot}");
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png).unwrap()));
    let mut reader = decoder.read_info().expect("a PNG");
    let mut buf = vec![0; reader.output_buffer_size().expect("a size")];
    let info = reader.next_frame(&mut buf).expect("a frame");
    assert_eq!((info.width, info.height), (1200, 1600));
    let channels = info.color_type.samples();
    let px: Vec<&[u8]> = buf[..info.buffer_size()].chunks(channels).collect();
    let non_white = px.iter().filter(|p| p[..3] != [255, 255, 255]).count();
    let mut colours: Vec<[u8; 3]> = px.iter().map(|p| [p[0], p[1], p[2]]).collect();
    colours.sort_unstable();
    colours.dedup();
    assert!(
        non_white > px.len() / 50,
        "the screenshot is nearly blank: {non_white} of {} pixels not white",
        px.len()
    );
    assert!(colours.len() > 16, "only {} colours", colours.len());
    // The three series are drawn: pixels of each colour.
    for (name, rgb) in [
        ("binds", [0x4e, 0x79, 0xa7]),
        ("failures", [0xe1, 0x57, 0x59]),
        ("TIME_WAIT open", [0xf2, 0x8e, 0x2b]),
    ] {
        let n = px.iter().filter(|p| p[..3] == rgb).count();
        assert!(n > 100, "{name}: {n} pixels of its colour");
    }
    if let Some(keep) = std::env::var_os("OBSERVER_REPORT_SCREENSHOT") {
        std::fs::copy(&png, keep).unwrap();
    }
}
