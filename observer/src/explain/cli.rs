//! `observer explain ADDR:PORT` and `observer who PORT`: the same engine as the
//! stream's `explain`, asked directly, without tracing.

use std::{fs::File, net::SocketAddr, process::ExitCode, time::Duration};

use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;

use super::{Ask, OptionsBook, Owners, holders, rules};
use crate::sock_diag::Diag;

#[derive(Args, Debug)]
pub struct ExplainArgs {
    /// The bind to ask about, e.g. 127.0.0.1:5700 or [::]:8080.
    #[arg(value_name = "ADDR:PORT")]
    pub addr: SocketAddr,
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
    /// The uid the new socket would belong to (default: ours).
    #[arg(long)]
    pub uid: Option<u32>,
    #[command(flatten)]
    pub ns: NetnsArg,
    /// One JSON object on stdout instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct WhoArgs {
    pub port: u16,
    #[command(flatten)]
    pub ns: NetnsArg,
    /// JSON Lines on stdout, one socket per line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct NetnsArg {
    /// Look in this network namespace: a path (/run/netns/NAME, /proc/PID/ns/net) or a PID.
    #[arg(long, value_name = "PATH|PID")]
    pub netns: Option<String>,
}

impl NetnsArg {
    fn diag(&self) -> Result<Diag> {
        let Some(ns) = &self.netns else {
            return Diag::open().context("opening NETLINK_SOCK_DIAG");
        };
        let path = crate::netns::path_of(ns);
        let file = File::open(&path).with_context(|| format!("--netns: opening {path}"))?;
        Diag::open_in(&file).with_context(|| format!("--netns: entering {path}"))
    }
}

#[derive(Serialize)]
struct Verdict<'a> {
    addr: String,
    port: u16,
    proto: &'static str,
    would_succeed: bool,
    rule: Option<rules::Rule>,
    hint: Option<&'a str>,
    blockers: &'a [rules::Holder],
}

pub fn explain(args: ExplainArgs) -> Result<ExitCode> {
    let mut diag = args.ns.diag()?;
    let on_port = holders(
        &mut diag,
        args.addr.port(),
        &OptionsBook::default(),
        &mut Owners::every(Duration::ZERO),
        Ask::Owner,
    )
    .context("reading the sockets on the port")?;
    let r = rules::Request {
        proto: if args.udp { rules::UDP } else { rules::TCP },
        addr: args.addr.ip(),
        port: args.addr.port(),
        reuseaddr: args.reuseaddr,
        reuseport: args.reuseport,
        v6only: args.v6only,
        uid: args.uid.unwrap_or_else(|| nix::unistd::geteuid().as_raw()),
    };
    let e = rules::explain(&r, &on_port);
    let v = Verdict {
        addr: args.addr.ip().to_string(),
        port: r.port,
        proto: if args.udp { "udp" } else { "tcp" },
        would_succeed: e.is_none(),
        rule: e.as_ref().map(|e| e.rule),
        hint: e.as_ref().map(|e| e.hint.as_str()),
        blockers: e.as_ref().map_or(&[], |e| &e.blockers),
    };
    if args.json {
        println!("{}", serde_json::to_string(&v)?);
    } else if let Some(e) = &e {
        println!(
            "bind {} would fail with EADDRINUSE ({:?}): {}",
            args.addr, e.rule, e.hint
        );
        print_table(&e.blockers);
    } else {
        println!(
            "bind {} would succeed: no socket on port {} conflicts",
            args.addr, r.port
        );
    }
    Ok(if e.is_none() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub fn who(args: WhoArgs) -> Result<ExitCode> {
    let mut diag = args.ns.diag()?;
    let on_port = holders(
        &mut diag,
        args.port,
        &OptionsBook::default(),
        &mut Owners::every(Duration::ZERO),
        Ask::Owner,
    )
    .context("reading the sockets on the port")?;
    if args.json {
        for h in &on_port {
            println!("{}", serde_json::to_string(h)?);
        }
    } else {
        print_table(&on_port);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_table(holders: &[rules::Holder]) {
    println!(
        "{:<5} {:<13} {:<28} {:<28} {:>6} {:<22} {:>8}",
        "PROTO", "STATE", "LOCAL", "REMOTE", "UID", "PROCESS", "EXPIRES"
    );
    for h in holders {
        let process = match (&h.comm, h.pid) {
            (Some(c), Some(p)) => format!("{c}/{p}"),
            _ => "-".into(),
        };
        let expires = h
            .expires_ms
            .map_or("-".into(), |ms| format!("{:.1}s", ms as f64 / 1000.0));
        println!(
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
}
