//! The report as one self-contained page: inline CSS, the time chart and the
//! chart of TIME_WAIT open per port as inline SVG, the same tables as the terminal's. No script, no font, no
//! image is fetched: the page opens from a file on a machine without network.
//! Each table is `<table id="t-ID">` with its title as `<caption>`, and every
//! cell holds exactly the terminal's text, so a test can compare the two.

use std::fmt::Write as _;

use super::{
    text::{Chart, Table, bucket_label},
    time,
};

const STYLE: &str = "
body{font:14px/1.4 system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;color:#1d2430;background:#fff}
h1{font-size:22px;margin:0 0 4px}
.sub{color:#5a6472;margin:0 0 16px}
.grid{display:flex;flex-wrap:wrap;gap:16px 28px;align-items:flex-start}
section{margin:0}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
caption{text-align:left;font-weight:600;padding:6px 0;letter-spacing:.02em}
th,td{padding:3px 10px;border-bottom:1px solid #e3e7ec;text-align:right;white-space:nowrap}
th{background:#f3f5f8;font-weight:600;font-size:12px;color:#3b4452}
td.l,th.l{text-align:left}
p.note{color:#5a6472;font-size:12px;max-width:560px;margin:4px 0 0}
svg{display:block;margin:8px 0 20px}
svg text{font:12px system-ui,sans-serif;fill:#3b4452}
";

/// Colours of the three series (also their legends).
const BINDS: &str = "#4e79a7";
const FAILURES: &str = "#e15759";
const OPEN: &str = "#f28e2b";

pub fn render(tables: &[Table], chart: &Chart, first: Option<i64>, last: Option<i64>) -> String {
    let mut h = String::with_capacity(64 << 10);
    let span = match (first, last) {
        (Some(f), Some(l)) => format!(
            "{} to {} ({})",
            time::format_millis(f),
            time::format_millis(l),
            time::human(l.saturating_sub(f))
        ),
        _ => "no records".to_owned(),
    };
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width\">\
         <title>observer report: {}</title><style>{STYLE}</style></head><body>\n\
         <h1>observer report</h1><p class=\"sub\">{}</p>\n",
        esc(&span),
        esc(&span)
    );
    if !chart.buckets.is_empty() {
        svg(&mut h, chart, first.unwrap_or(0), last.unwrap_or(0));
        if !chart.ports.is_empty() {
            ports_svg(&mut h, chart, first.unwrap_or(0), last.unwrap_or(0));
        }
    }
    h.push_str("<div class=\"grid\">\n");
    for t in tables {
        table(&mut h, t);
    }
    h.push_str("</div>\n</body></html>\n");
    h
}

fn table(h: &mut String, t: &Table) {
    let _ = write!(
        h,
        "<section><table id=\"t-{}\"><caption>{}</caption><thead><tr>",
        t.id,
        esc(&t.title)
    );
    for (i, c) in t.head.iter().enumerate() {
        let _ = write!(h, "<th{}>{}</th>", class(i, t.labels), esc(c));
    }
    h.push_str("</tr></thead><tbody>");
    for r in &t.rows {
        h.push_str("<tr>");
        for (i, c) in r.iter().enumerate() {
            let _ = write!(h, "<td{}>{}</td>", class(i, t.labels), esc(c));
        }
        h.push_str("</tr>");
    }
    h.push_str("</tbody></table>");
    if t.rows.is_empty() {
        h.push_str("<p class=\"note\">(none)</p>");
    }
    if let Some(n) = &t.note {
        let _ = write!(h, "<p class=\"note\">{}</p>", esc(n));
    }
    h.push_str("</section>\n");
}

fn class(i: usize, labels: usize) -> &'static str {
    if i < labels { " class=\"l\"" } else { "" }
}

/// Three panels over the same time axis: binds and failures per bucket (bars),
/// TIME_WAIT sockets open at each bucket's end (a line over an area).
/// The charts' width, and their margins left (the values) and right.
const W: f64 = 1100.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;

fn svg(h: &mut String, c: &Chart, first: i64, last: i64) {
    const PANEL: f64 = 130.0;
    const GAP: f64 = 58.0;
    const TOP: f64 = 30.0;
    let n = c.buckets.len();
    let plot_w = W - LEFT - RIGHT;
    let bw = plot_w / n as f64;
    let height = TOP + 3.0 * (PANEL + GAP) + 10.0;
    let label = bucket_label(c.width_ms, first, last);
    let per = time::width(c.width_ms);
    let _ = write!(
        h,
        "<svg id=\"chart\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{height}\" \
         viewBox=\"0 0 {W} {height}\" role=\"img\" aria-label=\"binds, failures and TIME_WAIT open over time\">\
         <rect width=\"{W}\" height=\"{height}\" fill=\"#fff\"/>"
    );
    let binds: Vec<i64> = c.buckets.iter().map(|(_, b)| b.binds as i64).collect();
    let failures: Vec<i64> = c.buckets.iter().map(|(_, b)| b.failures as i64).collect();
    let panels: [(&str, &str, &[i64], bool); 3] = [
        (&format!("binds per {per}"), BINDS, &binds, true),
        (&format!("failures per {per}"), FAILURES, &failures, true),
        ("TIME_WAIT sockets open", OPEN, &c.open, false),
    ];
    for (p, (title, colour, values, bars)) in panels.iter().enumerate() {
        let y0 = TOP + p as f64 * (PANEL + GAP);
        let base = y0 + PANEL;
        let max = values.iter().copied().max().unwrap_or(0).max(1);
        let min = values.iter().copied().min().unwrap_or(0).min(0);
        let scale = PANEL / (max - min) as f64;
        let y = |v: i64| base - (v - min) as f64 * scale;
        let _ = write!(
            h,
            "<text x=\"{LEFT}\" y=\"{:.1}\" font-weight=\"600\">{}</text>\
             <rect x=\"{:.1}\" y=\"{:.1}\" width=\"10\" height=\"10\" fill=\"{colour}\"/>",
            y0 - 8.0,
            esc(title),
            LEFT - 16.0,
            y0 - 17.0
        );
        gridlines(h, min, max, y);
        if *bars {
            for (i, v) in values.iter().enumerate().filter(|(_, v)| **v > 0) {
                let x = LEFT + i as f64 * bw;
                let _ = write!(
                    h,
                    "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{colour}\">\
                     <title>{} {v}</title></rect>",
                    x + bw * 0.1,
                    y(*v),
                    (bw * 0.8).max(1.0),
                    (y(0) - y(*v)).max(1.0),
                    esc(&label(c.buckets[i].0))
                );
            }
        } else {
            let pts: Vec<String> = values
                .iter()
                .enumerate()
                .map(|(i, v)| format!("{:.1},{:.1}", LEFT + (i as f64 + 0.5) * bw, y(*v)))
                .collect();
            let (x0, x1) = (LEFT + 0.5 * bw, LEFT + (n as f64 - 0.5) * bw);
            let _ = write!(
                h,
                "<polygon points=\"{x0:.1},{z:.1} {} {x1:.1},{z:.1}\" fill=\"{colour}\" fill-opacity=\"0.25\"/>\
                 <polyline points=\"{}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\"/>",
                pts.join(" "),
                pts.join(" "),
                z = y(0)
            );
            for (i, v) in values.iter().enumerate() {
                let _ = write!(
                    h,
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2.5\" fill=\"{colour}\"><title>{} {v}</title></circle>",
                    LEFT + (i as f64 + 0.5) * bw,
                    y(*v),
                    esc(&label(c.buckets[i].0))
                );
            }
        }
        // Time ticks: the first bucket, the last, and a few between.
        let ticks = 6.min(n);
        for k in 0..ticks {
            let i = if ticks == 1 {
                0
            } else {
                k * (n - 1) / (ticks - 1)
            };
            let x = LEFT + (i as f64 + 0.5) * bw;
            let _ = write!(
                h,
                "<text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                base + 16.0,
                esc(&label(c.buckets[i].0))
            );
        }
    }
    h.push_str("</svg>\n");
}

/// Colours of the per-port lines, in the order of the table's rows (then again).
const PORTS: [&str; 9] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f",
];
/// The line of `(other)`.
const OTHER: &str = "#9a9a9a";

/// TIME_WAIT sockets open at each bucket's end per local port: one line per
/// port of the table `time_wait_by_port_over_time`, `(other)` dashed, a legend.
fn ports_svg(h: &mut String, c: &Chart, first: i64, last: i64) {
    const PANEL: f64 = 180.0;
    let n = c.buckets.len();
    let plot_w = W - LEFT - RIGHT;
    let bw = plot_w / n as f64;
    // The legend: names in rows as wide as the plot.
    let names: Vec<(String, &str, f64, f64)> = {
        let (mut x, mut y) = (LEFT, 38.0);
        let mut v = Vec::new();
        for (k, (port, _)) in c.ports.iter().enumerate() {
            let (name, colour) = if port == "(other)" {
                (port.clone(), OTHER)
            } else {
                (format!("port {port}"), PORTS[k % PORTS.len()])
            };
            let w = 14.0 + 7.5 * name.chars().count() as f64 + 16.0;
            if x + w > W - RIGHT && x > LEFT {
                (x, y) = (LEFT, y + 18.0);
            }
            v.push((name, colour, x, y));
            x += w;
        }
        v
    };
    let legend = names.last().map_or(38.0, |l| l.3);
    let top = legend + 14.0;
    let height = top + PANEL + 30.0;
    let label = bucket_label(c.width_ms, first, last);
    let _ = write!(
        h,
        "<svg id=\"chart-ports\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{height}\" \
         viewBox=\"0 0 {W} {height}\" role=\"img\" aria-label=\"TIME_WAIT open over time per local port\">\
         <rect width=\"{W}\" height=\"{height}\" fill=\"#fff\"/>\
         <text x=\"{LEFT}\" y=\"18\" font-weight=\"600\">TIME_WAIT sockets open per local port</text>"
    );
    let base = top + PANEL;
    let values = c.ports.iter().flat_map(|(_, v)| v.iter().copied());
    let max = values.clone().max().unwrap_or(0).max(1);
    let min = values.min().unwrap_or(0).min(0);
    let scale = PANEL / (max - min) as f64;
    let y = |v: i64| base - (v - min) as f64 * scale;
    gridlines(h, min, max, y);
    for ((port, values), (name, colour, lx, ly)) in c.ports.iter().zip(&names) {
        let other = port == "(other)";
        let _ = write!(
            h,
            "<g class=\"port\" data-port=\"{}\"><rect x=\"{lx:.1}\" y=\"{:.1}\" width=\"10\" height=\"10\" fill=\"{colour}\"/>\
             <text x=\"{:.1}\" y=\"{ly:.1}\">{}</text>",
            esc(port),
            ly - 9.0,
            lx + 14.0,
            esc(name)
        );
        let pts: Vec<String> = values
            .iter()
            .enumerate()
            .map(|(i, v)| format!("{:.1},{:.1}", LEFT + (i as f64 + 0.5) * bw, y(*v)))
            .collect();
        let _ = write!(
            h,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\"{}/>",
            pts.join(" "),
            if other {
                " stroke-dasharray=\"5 4\""
            } else {
                ""
            }
        );
        for (i, v) in values.iter().enumerate() {
            let _ = write!(
                h,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2\" fill=\"{colour}\"><title>{} {} {v}</title></circle>",
                LEFT + (i as f64 + 0.5) * bw,
                y(*v),
                esc(name),
                esc(&label(c.buckets[i].0))
            );
        }
        h.push_str("</g>");
    }
    let ticks = 6.min(n);
    for k in 0..ticks {
        let i = if ticks == 1 {
            0
        } else {
            k * (n - 1) / (ticks - 1)
        };
        let _ = write!(
            h,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            LEFT + (i as f64 + 0.5) * bw,
            base + 16.0,
            esc(&label(c.buckets[i].0))
        );
    }
    h.push_str("</svg>\n");
}

/// Text for HTML: the five characters that could end an element or an attribute.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A panel's three horizontal lines (at `min`, the middle, `max`) with their
/// values, `y` placing a value.
fn gridlines(h: &mut String, min: i64, max: i64, y: impl Fn(i64) -> f64) {
    for v in [min, (max + min) / 2, max] {
        let _ = write!(
            h,
            "<line x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\" stroke=\"#e3e7ec\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{v}</text>",
            W - RIGHT,
            LEFT - 6.0,
            y(v) + 4.0,
            yy = y(v)
        );
    }
}
