//! The child processes some scenarios need (a server that is killed like a
//! crash, a listener of another uid). A scenario re-executes the observer
//! binary inside its network namespace with a pipe on [`SPEC_FD`] that carries
//! the helper's [`Spec`]; the child prints its steps as JSON lines and then
//! `ready` on stdout, and holds its sockets until it is killed.
//!
//! It has no subcommand: nothing typed on a command line reaches it. The
//! child recognises itself by the environment variable and the inherited pipe
//! its parent sets, and refuses to run unless its parent is this same binary
//! and it is outside the host's network namespace; its spec is validated too.

use std::{
    fs::File,
    io::{self, Read},
    net::SocketAddr,
    os::{
        fd::{FromRawFd, OwnedFd},
        unix::fs::FileTypeExt,
    },
    process::ExitCode,
};

use serde::{Deserialize, Serialize};

use super::ctx::{Ctx, Opts, Sink};

/// Names the descriptor the spec comes on; set only by [`Ctx::helper`].
pub const ENV: &str = "OBSERVER_REPRO_HELPER_FD";
/// The descriptor the parent puts the spec's pipe on.
pub const SPEC_FD: i32 = 3;
/// A helper never accepts more connections than this.
const MAX_CONNS: usize = 64;

/// What a helper does, as its parent scenario asks.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Spec {
    pub scenario: String,
    /// Options of the scenario's sockets, by cookie: (cookie, reuseaddr, reuseport).
    pub known: Vec<(u64, bool, bool)>,
    pub mode: Mode,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum Mode {
    /// Listen, accept `conns` connections, close them first, then wait to be killed.
    Server {
        addr: SocketAddr,
        conns: usize,
        reuseaddr: bool,
    },
    /// Drop to `uid`, bind (and listen, if the bind succeeds), then wait.
    Bind {
        addr: SocketAddr,
        reuseport: bool,
        uid: u32,
        expect: Option<String>,
    },
}

impl Spec {
    /// What the spec may ask: a known scenario, loopback addresses, a bounded
    /// number of connections, an unprivileged uid, a known errno.
    pub fn validate(&self) -> Result<(), String> {
        if !super::scenarios::SCENARIOS
            .iter()
            .any(|s| s.name == self.scenario)
        {
            return Err(format!("unknown scenario '{}'", self.scenario));
        }
        let loopback = |a: &SocketAddr| a.ip().is_loopback() || a.ip().is_unspecified();
        match &self.mode {
            Mode::Server { addr, conns, .. } => {
                if !loopback(addr) {
                    return Err(format!("{addr} is not a loopback address"));
                }
                if *conns > MAX_CONNS {
                    return Err(format!("{conns} connections: at most {MAX_CONNS}"));
                }
            }
            Mode::Bind {
                addr, uid, expect, ..
            } => {
                if !loopback(addr) {
                    return Err(format!("{addr} is not a loopback address"));
                }
                if *uid == 0 {
                    return Err("a bind helper runs as another uid than root".into());
                }
                if let Some(e) = expect
                    && !["EADDRINUSE", "EACCES", "EADDRNOTAVAIL"].contains(&e.as_str())
                {
                    return Err(format!("unexpected errno '{e}'"));
                }
            }
        }
        Ok(())
    }
}

/// `Some(exit code)` when this process is a helper (then it was one, and is
/// done); `None` for every ordinary invocation.
pub fn run_if_helper() -> Option<ExitCode> {
    let fd = std::env::var_os(ENV)?;
    // SAFETY: single-threaded here (main has not started anything yet).
    unsafe { std::env::remove_var(ENV) };
    let code = match helper(fd.to_str()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("observer: repro helper: {e}");
            ExitCode::from(2)
        }
    };
    Some(code)
}

fn helper(fd: Option<&str>) -> io::Result<()> {
    if fd != Some(&SPEC_FD.to_string()) {
        return Err(io::Error::other("not started by a repro scenario"));
    }
    let spec = read_spec()?;
    spec.validate().map_err(io::Error::other)?;
    started_by_a_scenario()?;
    serve(spec)
}

/// The spec from the inherited pipe, which must be one.
fn read_spec() -> io::Result<Spec> {
    // SAFETY: fstat on a descriptor number; it may not be open, which fstat reports.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(SPEC_FD, &mut st) } != 0 {
        return Err(io::Error::other("not started by a repro scenario"));
    }
    // SAFETY: the descriptor is open (fstat said so) and nothing else owns it.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(SPEC_FD) });
    if !file.metadata()?.file_type().is_fifo() {
        return Err(io::Error::other("not started by a repro scenario"));
    }
    let mut text = String::new();
    file.take(1 << 20).read_to_string(&mut text)?;
    serde_json::from_str(&text).map_err(|e| io::Error::other(format!("bad spec: {e}")))
}

/// The parent is this same binary, and we are not in the host's network
/// namespace (a scenario always makes its own).
fn started_by_a_scenario() -> io::Result<()> {
    let own = std::fs::read_link("/proc/self/exe")?;
    let parent = std::fs::read_link(format!("/proc/{}/exe", nix::unistd::getppid()))?;
    if own != parent {
        return Err(io::Error::other("not started by a repro scenario"));
    }
    let ino = |p: &str| crate::kernel::netns::inode(std::path::Path::new(p));
    if ino("/proc/self/ns/net") == ino("/proc/1/ns/net") {
        return Err(io::Error::other(
            "refusing to run in the host's network namespace",
        ));
    }
    Ok(())
}

fn ready() {
    println!("ready");
}

fn serve(spec: Spec) -> io::Result<()> {
    // Exec'd as /proc/self/exe, its comm would be "exe".
    let _ = nix::sys::prctl::set_name(c"repro-helper");
    let mut ctx = Ctx::here(&spec.scenario, Sink::Stdout);
    for &(cookie, reuseaddr, reuseport) in &spec.known {
        ctx.book.note(cookie, reuseaddr, reuseport);
    }
    match spec.mode {
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

/// The pipe for a helper's spec: the read end to put on [`SPEC_FD`] in the
/// child, and the spec written into the write end (small: it fits the pipe).
pub fn spec_pipe(spec: &Spec) -> io::Result<OwnedFd> {
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let mut w = File::from(write);
    io::Write::write_all(&mut w, serde_json::to_string(spec)?.as_bytes())?;
    drop(w);
    Ok(read)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bind(addr: &str, uid: u32) -> Spec {
        Spec {
            scenario: "reuseport".into(),
            known: vec![(7, true, false)],
            mode: Mode::Bind {
                addr: addr.parse().unwrap(),
                reuseport: true,
                uid,
                expect: Some("EADDRINUSE".into()),
            },
        }
    }

    #[test]
    fn specs_are_validated() {
        assert_eq!(bind("127.0.0.1:6200", 65534).validate(), Ok(()));
        assert!(bind("10.0.0.1:6200", 65534).validate().is_err());
        assert!(bind("127.0.0.1:6200", 0).validate().is_err());
        let mut s = bind("127.0.0.1:6200", 65534);
        s.scenario = "nope".into();
        assert!(s.validate().is_err());
        s = Spec {
            scenario: "restart-time-wait".into(),
            known: vec![],
            mode: Mode::Server {
                addr: "127.0.0.1:5700".parse().unwrap(),
                conns: 100_000,
                reuseaddr: false,
            },
        };
        assert!(s.validate().is_err());
        let text = serde_json::to_string(&bind("[::1]:1", 1)).unwrap();
        assert_eq!(
            serde_json::from_str::<Spec>(&text).unwrap(),
            bind("[::1]:1", 1)
        );
    }
}
