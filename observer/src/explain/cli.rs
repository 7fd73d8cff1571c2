//! `observer explain ADDR:PORT` and `observer who PORT`: the same engine as the
//! stream's `explain`, asked directly, without tracing.

use std::{
    fs::File,
    net::{IpAddr, SocketAddr},
    process::ExitCode,
    time::Duration,
};

use std::io::Write;

use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;

use super::{Ask, OptionsBook, Owners, env::Env, holders, rules};

/// A line on stdout; an error (a closed pipe: `observer who | head`) goes
/// up, where `main` ends quietly on a broken pipe.
macro_rules! out {
    ($($arg:tt)*) => {
        writeln!(std::io::stdout().lock(), $($arg)*)?
    };
}
use crate::kernel::sock_diag::Diag;

#[derive(Args, Debug)]
pub struct ExplainArgs {
    /// The bind to ask about: 127.0.0.1:5700, [::]:8080, [fe80::1%eth0]:80, ::ffff:127.0.0.1:80.
    #[arg(value_name = "ADDR:PORT", value_parser = parse_target)]
    pub addr: Target,
    /// A TCP socket (the default).
    #[arg(long, conflicts_with = "udp")]
    pub tcp: bool,
    /// A UDP socket.
    #[arg(long)]
    pub udp: bool,
    /// The new socket sets SO_REUSEADDR.
    #[arg(long)]
    pub reuseaddr: bool,
    /// The new socket sets SO_REUSEPORT.
    #[arg(long)]
    pub reuseport: bool,
    /// The new (IPv6) socket sets IPV6_V6ONLY.
    #[arg(long)]
    pub v6only: bool,
    /// The new socket sets IP_FREEBIND (an address need not be local).
    #[arg(long)]
    pub freebind: bool,
    /// The uid the new socket would belong to (default: ours); any uid but 0
    /// is taken to lack CAP_NET_BIND_SERVICE.
    #[arg(long, allow_hyphen_values = true, value_parser = crate::cli::parse_uid)]
    pub uid: Option<u32>,
    #[command(flatten)]
    pub ns: NetnsArg,
    /// One JSON object on stdout instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct WhoArgs {
    /// Only the sockets on this local port (default: every socket).
    pub port: Option<u16>,
    /// Only sockets in these states (LISTEN, ESTABLISHED, TIME_WAIT, BOUND,
    /// UDP, …); repeat the flag or separate with commas.
    #[arg(long, value_name = "STATE", value_delimiter = ',', value_parser = parse_state)]
    pub state: Vec<&'static str>,
    /// Only sockets of this process (TIME_WAIT sockets have none: the
    /// process that closed them, when the daemon saw it, is not known here).
    #[arg(long, value_name = "PID", allow_hyphen_values = true, value_parser = clap::value_parser!(u32).range(1..))]
    pub pid: Option<u32>,
    /// A count per protocol, port and state instead of one line per socket.
    #[arg(long)]
    pub summary: bool,
    #[command(flatten)]
    pub ns: NetnsArg,
    /// JSON Lines on stdout, one socket (or one count) per line.
    #[arg(long)]
    pub json: bool,
}

/// The states `who` shows, as it spells them.
const STATES: [&str; 14] = [
    "ESTABLISHED",
    "SYN_SENT",
    "SYN_RECV",
    "FIN_WAIT1",
    "FIN_WAIT2",
    "TIME_WAIT",
    "CLOSE_WAIT",
    "LAST_ACK",
    "LISTEN",
    "CLOSING",
    "NEW_SYN_RECV",
    "BOUND",
    "UDP",
    "UDP_CONNECTED",
];

fn parse_state(s: &str) -> Result<&'static str, String> {
    let up = s.to_ascii_uppercase();
    STATES
        .iter()
        .find(|&&k| k == up)
        .copied()
        .ok_or_else(|| format!("unknown state {s:?}; one of {}", STATES.join(", ")))
}

#[derive(Args, Debug)]
pub struct NetnsArg {
    /// Look in this network namespace: a path (/run/netns/NAME, /proc/PID/ns/net) or a PID.
    #[arg(long, value_name = "PATH|PID", allow_hyphen_values = true,
          value_parser = crate::cli::parse_netns_path)]
    pub netns: Option<String>,
}

impl NetnsArg {
    fn file(&self) -> Result<Option<File>> {
        self.netns
            .as_deref()
            .map(|path| File::open(path).with_context(|| format!("--netns {path}")))
            .transpose()
    }

    fn diag(&self) -> Result<Diag> {
        match self.file()? {
            None => Diag::open().context("opening NETLINK_SOCK_DIAG"),
            Some(f) => Diag::open_in(&f)
                .with_context(|| format!("--netns {}", self.netns.as_deref().unwrap_or(""))),
        }
    }

    /// The namespace's interfaces, addresses and bind sysctls.
    fn env(&self) -> Result<Env> {
        match self.file()? {
            None => Env::here(),
            Some(f) => Env::of(&f),
        }
        .context("reading the network namespace's addresses")
    }
}

/// An address to bind, as people write it: `ADDR:PORT`, `[V6]:PORT`,
/// `[V6%IFACE]:PORT`, or a bare IPv6 address whose last `:` starts the port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub ip: IpAddr,
    /// The interface of a link-local address: a name or an index.
    pub scope: Option<String>,
    pub port: u16,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.ip, &self.scope) {
            (IpAddr::V4(ip), _) => write!(f, "{ip}:{}", self.port),
            (IpAddr::V6(ip), None) => write!(f, "[{ip}]:{}", self.port),
            (IpAddr::V6(ip), Some(s)) => write!(f, "[{ip}%{s}]:{}", self.port),
        }
    }
}

pub fn parse_target(s: &str) -> Result<Target, String> {
    let bad = || format!("'{s}' is not ADDR:PORT (127.0.0.1:80, [::1]:80, [fe80::1%eth0]:80)");
    let (host, port) = match s.strip_prefix('[') {
        Some(rest) => {
            let (host, port) = rest.split_once("]:").ok_or_else(bad)?;
            (host, port)
        }
        None => s.rsplit_once(':').ok_or_else(bad)?,
    };
    let port: u16 = port.parse().map_err(|_| bad())?;
    let (ip, scope) = match host.split_once('%') {
        Some((ip, scope)) if !scope.is_empty() => (ip, Some(scope.to_owned())),
        Some(_) => return Err(bad()),
        None => (host, None),
    };
    let ip: IpAddr = ip.parse().map_err(|_| bad())?;
    if scope.is_some() && !ip.is_ipv6() {
        return Err(format!("'{s}': only IPv6 addresses have a %scope"));
    }
    Ok(Target { ip, scope, port })
}

#[derive(Serialize)]
struct Verdict<'a> {
    addr: String,
    port: u16,
    proto: &'static str,
    /// `null`: this kernel cannot tell (see `observer check`).
    would_succeed: Option<bool>,
    errno: Option<&'static str>,
    rule: Option<rules::Rule>,
    hint: Option<&'a str>,
    blockers: &'a [rules::Holder],
}

pub fn explain(args: ExplainArgs) -> Result<ExitCode> {
    let env = args.ns.env()?;
    let ifindex = match &args.addr.scope {
        None => None,
        Some(s) => Some(match s.parse::<u32>() {
            Ok(i) => i,
            Err(_) => env.ifindex(s).with_context(|| {
                format!(
                    "{}: no interface named '{s}' in this network namespace",
                    args.addr
                )
            })?,
        }),
    };
    let mut diag = args.ns.diag()?;
    let on_port = holders(
        &mut diag,
        0,
        args.addr.port,
        &OptionsBook::default(),
        &mut Owners::every(Duration::ZERO),
        Ask::Owner,
    )
    .context("reading the sockets on the port")?;
    let proto = if args.udp { rules::UDP } else { rules::TCP };
    let r = rules::Request {
        reuseaddr: args.reuseaddr,
        reuseport: args.reuseport,
        v6only: args.v6only,
        uid: args.uid.unwrap_or_else(|| nix::unistd::geteuid().as_raw()),
        ifindex,
        nonlocal: args.freebind,
        ..rules::Request::new(proto, args.addr.ip, args.addr.port)
    };
    let e = rules::verdict(&r, &env, &on_port);
    // Nothing in the way, on a kernel that cannot show every socket: say so.
    let unknown = e.is_none() && !args.udp && !crate::kernel::sock_diag::lists_bound_only();
    let v = Verdict {
        addr: args.addr.ip.to_string(),
        port: r.port,
        proto: if args.udp { "udp" } else { "tcp" },
        would_succeed: (!unknown).then_some(e.is_none()),
        errno: e.as_ref().map(|e| e.rule.errno()),
        rule: e.as_ref().map(|e| e.rule),
        hint: e.as_ref().map(|e| e.hint.as_str()),
        blockers: e.as_ref().map_or(&[], |e| &e.blockers),
    };
    if args.json {
        out!("{}", serde_json::to_string(&v)?);
    } else if let Some(e) = &e {
        out!(
            "bind {} would fail with {} ({:?}): {}",
            args.addr,
            e.rule.errno(),
            e.rule,
            e.hint
        );
        if !e.blockers.is_empty() {
            print_table(&e.blockers)?;
        }
    } else if unknown {
        out!(
            "bind {} cannot be judged here: no socket on port {} conflicts that this kernel can show, but its sock_diag cannot list sockets bound and not listening (Linux 6.3 can)",
            args.addr,
            r.port
        );
    } else {
        out!(
            "bind {} would succeed: no socket on port {} conflicts",
            args.addr,
            r.port
        );
    }
    Ok(match (&e, unknown) {
        (Some(_), _) => ExitCode::FAILURE,
        (None, true) => ExitCode::from(UNKNOWN),
        (None, false) => ExitCode::SUCCESS,
    })
}

/// `observer explain`'s exit status when this kernel cannot tell.
pub const UNKNOWN: u8 = 3;

pub fn who(args: WhoArgs) -> Result<ExitCode> {
    let mut diag = args.ns.diag()?;
    let mut socks = holders(
        &mut diag,
        0,
        args.port,
        &OptionsBook::default(),
        &mut Owners::every(Duration::ZERO),
        Ask::Owner,
    )
    .context(if args.port.is_some() {
        "reading the sockets on the port"
    } else {
        "reading the sockets"
    })?;
    socks.retain(|h| {
        (args.state.is_empty() || args.state.contains(&h.state))
            && args.pid.is_none_or(|pid| h.pid == Some(pid))
    });
    match (args.summary, args.json) {
        (false, false) => print_table(&socks)?,
        (false, true) => {
            for h in &socks {
                out!("{}", serde_json::to_string(h)?);
            }
        }
        (true, json) => {
            if !json {
                out!(
                    "{:<5} {:>5} {:<13} {:>7}",
                    "PROTO",
                    "PORT",
                    "STATE",
                    "SOCKETS"
                );
            }
            for c in summary(&socks) {
                if json {
                    out!("{}", serde_json::to_string(&c)?);
                } else {
                    out!(
                        "{:<5} {:>5} {:<13} {:>7}",
                        c.proto,
                        c.port,
                        c.state,
                        c.count
                    );
                }
            }
        }
    }
    if !crate::kernel::sock_diag::lists_bound_only() {
        eprintln!(
            "observer: note: this kernel's sock_diag cannot list TCP sockets bound and not listening (Linux 6.3 can): they are not shown"
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Sockets per protocol, local port and state.
#[derive(Serialize, Debug, PartialEq, Eq)]
struct Count {
    proto: &'static str,
    port: u16,
    state: &'static str,
    count: usize,
}

/// The counts, most first (then by port).
fn summary(socks: &[rules::Holder]) -> Vec<Count> {
    let mut by: std::collections::BTreeMap<(&'static str, u16, &'static str), usize> =
        Default::default();
    for h in socks {
        *by.entry((h.proto, h.port, h.state)).or_default() += 1;
    }
    let mut counts: Vec<Count> = by
        .into_iter()
        .map(|((proto, port, state), count)| Count {
            proto,
            port,
            state,
            count,
        })
        .collect();
    counts.sort_by(|a, b| b.count.cmp(&a.count).then(a.port.cmp(&b.port)));
    counts
}

fn print_table(holders: &[rules::Holder]) -> std::io::Result<()> {
    out!(
        "{:<5} {:<13} {:<28} {:<28} {:>6} {:<22} {:>8}",
        "PROTO",
        "STATE",
        "LOCAL",
        "REMOTE",
        "UID",
        "PROCESS",
        "EXPIRES"
    );
    for h in holders {
        let process = match (&h.comm, h.pid) {
            (Some(c), Some(p)) => format!("{c}/{p}"),
            _ => "-".into(),
        };
        let expires = h
            .expires_ms
            .map_or("-".into(), |ms| format!("{:.1}s", ms as f64 / 1000.0));
        out!(
            "{:<5} {:<13} {:<28} {:<28} {:>6} {:<22} {:>8}",
            h.proto,
            h.state,
            SocketAddr::new(h.local.ip(), h.port).to_string(),
            format!("{}:{}", h.raddr, h.rport),
            h.uid,
            process,
            expires
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_as_people_write_them() {
        assert_eq!(parse_state("time_wait"), Ok("TIME_WAIT"));
        assert_eq!(parse_state("BOUND"), Ok("BOUND"));
        assert!(parse_state("CLOSE").unwrap_err().contains("unknown state"));
    }

    #[test]
    fn targets_as_people_write_them() {
        let t = |s: &str| parse_target(s).map(|t| t.to_string());
        assert_eq!(t("127.0.0.1:80").as_deref(), Ok("127.0.0.1:80"));
        assert_eq!(t("[::]:8080").as_deref(), Ok("[::]:8080"));
        assert_eq!(t("[fe80::1%lo]:80").as_deref(), Ok("[fe80::1%lo]:80"));
        assert_eq!(
            t("::ffff:127.0.0.1:80").as_deref(),
            Ok("[::ffff:127.0.0.1]:80")
        );
        assert_eq!(
            parse_target("[fe80::1%2]:80").unwrap().scope.as_deref(),
            Some("2")
        );
        for bad in [
            "127.0.0.1",
            "127.0.0.1:99999",
            "[::1]80",
            "1.2.3.4%lo:80",
            "[fe80::1%]:80",
            "x:80",
        ] {
            assert!(parse_target(bad).is_err(), "{bad}");
        }
    }
}
