//! `--format text`: one aligned line per event, bindsnoop-style, with the
//! explain hint indented under failures.

use serde_json::Value;

pub const HEADER: &str = "TIME          PID     COMM             EVENT           PROTO ADDR                                  PORT   OPTS  RESULT";

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Option letters: R SO_REUSEADDR, P SO_REUSEPORT, F IP_FREEBIND, T IP_TRANSPARENT,
/// N IP_BIND_ADDRESS_NO_PORT; `-` off, `?` unknown.
pub fn opts(o: &Value) -> String {
    [
        ("reuseaddr", 'R'),
        ("reuseport", 'P'),
        ("freebind", 'F'),
        ("transparent", 'T'),
        ("bind_address_no_port", 'N'),
    ]
    .iter()
    .map(|(k, c)| match o.get(*k) {
        Some(Value::Bool(true)) => *c,
        Some(Value::Bool(false)) => '-',
        _ => '?',
    })
    .collect()
}

fn time(v: &Value) -> String {
    // 2026-11-25T14:56:50.775951813Z -> 14:56:50.775952
    let ts = v["ts"].as_str().unwrap_or("");
    ts.get(11..26).unwrap_or(ts).to_owned()
}

/// `saddr:sport > daddr:dport`
fn connection(v: &Value) -> String {
    format!(
        "{}:{} > {}:{}",
        s(&v["saddr"]),
        s(&v["sport"]),
        s(&v["daddr"]),
        s(&v["dport"])
    )
}

pub fn line(v: &Value) -> String {
    let event = v["event"].as_str().unwrap_or("?");
    let head = |proto: String, addr: String, port: String, opts: String, result: String| {
        format!(
            "{:<13} {:<7} {:<16} {:<15} {:<5} {:<37} {:<6} {:<5} {}\n",
            time(v),
            s(&v["pid"]),
            s(&v["comm"]).chars().take(16).collect::<String>(),
            event,
            proto,
            addr,
            port,
            opts,
            result
        )
    };
    let result = |v: &Value| {
        if v["errno"].is_null() {
            "ok".to_owned()
        } else {
            s(&v["errno"])
        }
    };
    let mut out = match event {
        "bind" => head(
            s(&v["proto"]),
            s(&v["addr"]),
            s(&v["port"]),
            opts(&v["options"]),
            {
                let bound = if v["bound_port"].is_null() {
                    String::new()
                } else {
                    format!(" (port {})", v["bound_port"])
                };
                format!("{}{bound}", result(v))
            },
        ),
        "listen" | "connect" => {
            let (addr, port) = if event == "connect" {
                ("daddr", "dport")
            } else {
                ("laddr", "lport")
            };
            head(
                "tcp".into(),
                s(&v[addr]),
                s(&v[port]),
                String::new(),
                result(v),
            )
        }
        "tcp_state" => head(
            "tcp".into(),
            connection(v),
            String::new(),
            String::new(),
            format!(
                "{} -> {} ({} ms)",
                s(&v["old"]),
                s(&v["new"]),
                s(&v["prev_state_ms"])
            ),
        ),
        "time_wait_enter" | "time_wait_exit" => head(
            "tcp".into(),
            connection(v),
            String::new(),
            String::new(),
            if event == "time_wait_enter" {
                format!("expires in {} ms", s(&v["expires_ms"]))
            } else {
                format!("{} after {} ms", s(&v["reason"]), s(&v["held_ms"]))
            },
        ),
        _ => {
            // observer_start/stop, lost, stats: the record itself.
            let mut rest = v.clone();
            if let Some(m) = rest.as_object_mut() {
                for k in ["v", "ts", "event"] {
                    m.remove(k);
                }
            }
            format!(
                "{:<13} {:<7} {:<16} {:<15} {}\n",
                time(v),
                "-",
                "observer",
                event,
                rest
            )
        }
    };
    if let Some(hint) = v["explain"]["hint"].as_str() {
        out += &format!("              ↳ {hint}\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_failed_bind_with_its_hint() {
        let v = json!({"v":1,"ts":"2026-11-25T14:56:50.775951813Z","event":"bind","pid":31522,"comm":"python3",
            "proto":"tcp","addr":"127.0.0.1","port":8080,"bound_port":null,
            "options":{"reuseaddr":true,"reuseport":false,"freebind":null,"transparent":null,"bind_address_no_port":null},
            "errno":"EADDRINUSE","explain":{"hint":"0.0.0.0:8080 is held by LISTEN socket of python3 (pid 31522)"}});
        let l = line(&v);
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
        let v = json!({"ts":"2026-11-25T14:56:50.775951813Z","event":"tcp_state","pid":null,"comm":null,
            "saddr":"127.0.0.1","sport":5700,"daddr":"127.0.0.1","dport":20000,"old":"FIN_WAIT2","new":"CLOSE","prev_state_ms":0.017});
        assert!(
            line(&v).contains("127.0.0.1:5700 > 127.0.0.1:20000")
                && line(&v).contains("FIN_WAIT2 -> CLOSE (0.017 ms)")
        );
        let x = json!({"ts":"2026-11-25T14:56:50.775951813Z","event":"time_wait_exit","saddr":"127.0.0.1","sport":5700,
            "daddr":"127.0.0.1","dport":20000,"reason":"expired","held_ms":61093});
        assert!(line(&x).contains("expired after 61093 ms"));
        let stop = json!({"ts":"2026-11-25T14:56:50.775951813Z","event":"observer_stop","reason":"SIGINT"});
        assert!(
            line(&stop).contains("observer_stop   {\"reason\":\"SIGINT\"}"),
            "{}",
            line(&stop)
        );
    }
}
