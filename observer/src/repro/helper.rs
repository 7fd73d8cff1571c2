//! `observer repro-helper`: the child processes some scenarios need (a server
//! that is killed like a crash, a listener of another uid). It runs inside its
//! scenario's network namespace, prints its steps as JSON lines and then
//! `ready` on stdout, and holds its sockets until it is killed.

use std::{io, net::SocketAddr, process::ExitCode};

use clap::{Args, Subcommand};

use super::ctx::{Ctx, Opts, Sink};

#[derive(Args, Debug)]
pub struct HelperArgs {
    #[arg(long)]
    scenario: String,
    /// Options of the scenario's sockets, by cookie (for the explain engine).
    #[arg(long, default_value = "")]
    known: String,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// Listen, accept CONNS connections, close them first, then wait to be killed.
    Server {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        conns: usize,
        #[arg(long)]
        reuseaddr: bool,
    },
    /// Drop to UID, bind (and listen, if the bind succeeds), then wait.
    Bind {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        reuseport: bool,
        #[arg(long)]
        uid: u32,
        #[arg(long)]
        expect: Option<String>,
    },
}

pub fn run(args: HelperArgs) -> ExitCode {
    match helper(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("observer repro-helper: {e}");
            ExitCode::FAILURE
        }
    }
}

fn ready() {
    println!("ready");
}

fn helper(args: HelperArgs) -> io::Result<()> {
    // Exec'd as /proc/self/exe, its comm would be "exe".
    let _ = nix::sys::prctl::set_name(c"repro-helper");
    let mut ctx = Ctx::here(&args.scenario, Sink::Stdout);
    ctx.book = crate::explain::OptionsBook::from_arg(&args.known);
    match args.mode {
        Mode::Server {
            addr,
            conns,
            reuseaddr,
        } => {
            let opts = Opts {
                reuseaddr,
                ..Opts::default()
            };
            ctx.socket("listener", &addr, opts)?;
            let what = if reuseaddr {
                "old server, SO_REUSEADDR"
            } else {
                "old server"
            };
            ctx.bind("listener", what, addr, None);
            ctx.listen("listener", what, None);
            ready();
            for i in 0..conns {
                ctx.accept("listener", &format!("conn{i}"))?;
            }
            // Close first: these sockets, not the clients', go to TIME_WAIT.
            for i in 0..conns {
                ctx.close(&format!("conn{i}"));
            }
        }
        Mode::Bind {
            addr,
            reuseport,
            uid,
            expect,
        } => {
            let id = nix::unistd::Uid::from_raw(uid);
            let gid = nix::unistd::Gid::from_raw(uid);
            nix::unistd::setgroups(&[]).map_err(io::Error::from)?;
            nix::unistd::setgid(gid).map_err(io::Error::from)?;
            nix::unistd::setuid(id).map_err(io::Error::from)?;
            let opts = Opts {
                reuseport,
                ..Opts::default()
            };
            ctx.socket("sock", &addr, opts)?;
            let what = format!("listener of uid {uid}");
            if ctx.bind("sock", &what, addr, expect.as_deref()) && expect.is_none() {
                ctx.listen("sock", &what, None);
            }
            ready();
        }
    }
    // Hold everything until the scenario kills us.
    loop {
        nix::unistd::pause();
    }
}
