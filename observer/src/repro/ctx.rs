//! The scenarios' runtime: private network namespaces, sockets with options,
//! and the log of every call and what the kernel answered.

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    process::{Child, Command, Stdio},
    sync::Arc,
};

use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, Socket, Type};

use super::{
    helper,
    shared::{PRESSURE_WITHIN, Shared, WAIT_WITHIN},
};
use crate::{
    explain::{self, rules, rules::Rule},
    names::errno_name,
};

/// One call a scenario made, what it expected and what the kernel answered.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub scenario: String,
    /// What this step is about, for people.
    pub step: String,
    /// `bind`, `listen` or `connect`.
    pub call: String,
    /// The event this call must produce in the observer's stream, if any:
    /// every bind, and listen/connect when they fail.
    pub event: Option<String>,
    pub pid: u32,
    pub tid: u32,
    pub netns: u64,
    pub fd: i32,
    pub proto: String,
    /// bind/listen: the local address; connect: the destination.
    pub addr: String,
    pub port: u16,
    pub reuseaddr: bool,
    pub reuseport: bool,
    pub sock_cookie: u64,
    /// The socket's inode (its stable id: the stream's records carry it).
    pub sock_ino: u64,
    /// The errno the kernel should answer (`null`: success).
    pub expected: Option<String>,
    /// The errno it answered.
    pub errno: Option<String>,
    pub ok: bool,
    /// For binds to a fixed port: what the explain engine predicted from the
    /// sockets on the port just before (`ok` or `EADDRINUSE`), and its rule.
    pub explain_verdict: Option<String>,
    pub explain_rule: Option<Rule>,
    /// `call` `port_pressure`: the record the scenario's own sockets predict
    /// (a pair of its namespace crossed a level, up or down).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pressure: Option<PressureStep>,
}

/// A `port_pressure` record as a step predicts it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PressureStep {
    pub proto: String,
    pub scope: String,
    pub port: Option<u16>,
    pub in_use: u32,
    pub range: u32,
    pub level: u8,
    pub previous: u8,
}

/// How to make a socket.
#[derive(Clone, Copy, Debug, Default)]
pub struct Opts {
    pub udp: bool,
    pub reuseaddr: bool,
    pub reuseport: bool,
    /// IPV6_V6ONLY for IPv6 sockets (`None`: the system default).
    pub v6only: Option<bool>,
    pub bind_address_no_port: bool,
    /// IP_FREEBIND: bind an address that is not (yet) local.
    pub freebind: bool,
}

pub fn tid() -> u32 {
    nix::unistd::gettid().as_raw() as u32
}

pub fn thread_netns() -> u64 {
    std::fs::metadata("/proc/thread-self/ns/net")
        .map(|m| m.ino())
        .unwrap_or(0)
}

/// A socket's inode number (`fstat`), as `ss -e` shows it.
pub fn socket_ino(s: &Socket) -> u64 {
    nix::sys::stat::fstat(s).map_or(0, |st| st.st_ino)
}

/// Moves the calling thread into a new network namespace with loopback up.
pub fn enter_new_netns() -> io::Result<()> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
    // `lo` is down in a new namespace.
    let fd = Socket::new(Domain::IPV4, Type::DGRAM, None)?;
    unsafe {
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (d, s) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
            *d = *s as libc::c_char;
        }
        if libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) != 0 {
            return Err(io::Error::last_os_error());
        }
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(fd.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn errno_of(r: io::Result<()>) -> Option<String> {
    match r {
        Ok(()) => None,
        Err(e) => Some(
            errno_name(e.raw_os_error().unwrap_or(0)).map_or_else(|| e.to_string(), String::from),
        ),
    }
}

/// A scenario in progress, on its own thread, in its own network namespace.
pub struct Ctx {
    scenario: String,
    netns: u64,
    pub steps: Vec<Step>,
    sockets: HashMap<String, Socket>,
    children: Vec<Child>,
    sink: Sink,
    /// Options of the sockets this scenario made, by cookie (helpers' included),
    /// for the explain engine's predictions.
    pub book: crate::explain::OptionsBook,
    /// What the old server's accepted connections inherited, in TIME_WAIT or
    /// still closing (the scenario knows its old server's options).
    pub time_wait_reuse: Option<(bool, bool)>,
    /// Under `run --repro`: the stream's side (see `shared`).
    shared: Option<Arc<Shared>>,
    /// After `port_range`: the namespace's range and the levels its pairs
    /// are at, as this scenario's own sockets hold them.
    pressure: Option<(crate::pressure::Range, crate::pressure::Levels)>,
}

/// Where steps go as they are made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sink {
    /// Kept, and printed as a human line on stderr.
    Stderr,
    /// Printed as JSON lines on stdout (a helper reporting to its scenario).
    Stdout,
}

impl Ctx {
    /// A scenario's context, in a new network namespace.
    pub fn new(scenario: &str, sink: Sink, shared: Option<Arc<Shared>>) -> io::Result<Ctx> {
        enter_new_netns()?;
        let mut ctx = Ctx::here(scenario, sink);
        if let Some(s) = &shared {
            s.add_netns(ctx.netns);
        }
        ctx.shared = shared;
        Ok(ctx)
    }

    /// A context in the current network namespace (a helper inside its scenario's).
    pub fn here(scenario: &str, sink: Sink) -> Ctx {
        Ctx {
            scenario: scenario.to_owned(),
            netns: thread_netns(),
            steps: Vec::new(),
            sockets: HashMap::new(),
            children: Vec::new(),
            sink,
            book: crate::explain::OptionsBook::default(),
            time_wait_reuse: None,
            shared: None,
            pressure: None,
        }
    }

    /// A fresh namespace for the next variant: nothing of the last one is left to collide with.
    pub fn fresh_netns(&mut self) -> io::Result<()> {
        self.close_all();
        self.pressure = None;
        enter_new_netns()?;
        self.netns = thread_netns();
        if let Some(s) = &self.shared {
            s.add_netns(self.netns);
        }
        Ok(())
    }

    pub fn close_all(&mut self) {
        self.sockets.clear();
        for mut c in self.children.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn socket(&mut self, name: &str, addr: &SocketAddr, o: Opts) -> io::Result<()> {
        let (ty, proto) = if o.udp {
            (Type::DGRAM, Protocol::UDP)
        } else {
            (Type::STREAM, Protocol::TCP)
        };
        let s = Socket::new(Domain::for_address(*addr), ty, Some(proto))?;
        s.set_reuse_address(o.reuseaddr)?;
        s.set_reuse_port(o.reuseport)?;
        if let (Some(v6only), true) = (o.v6only, addr.is_ipv6()) {
            s.set_only_v6(v6only)?;
        }
        if o.freebind {
            s.set_freebind_v4(true)?;
        }
        if o.bind_address_no_port {
            nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::IpBindAddressNoPort, &true)
                .map_err(io::Error::from)?;
        }
        self.sockets.insert(name.to_owned(), s);
        Ok(())
    }

    fn sock(&self, name: &str) -> &Socket {
        &self.sockets[name]
    }

    #[allow(clippy::too_many_arguments)]
    fn record(
        &mut self,
        name: &str,
        what: &str,
        call: &str,
        addr: SocketAddr,
        expected: Option<&str>,
        errno: Option<String>,
        prediction: Option<(String, Option<Rule>)>,
    ) -> bool {
        let s = self.sock(name);
        let udp = s.r#type().ok() == Some(Type::DGRAM);
        let event = match call {
            "bind" => Some("bind"),
            _ if errno.is_some() => Some(call),
            _ => None,
        };
        let (explain_verdict, explain_rule) = prediction.unzip();
        let step = Step {
            explain_verdict,
            explain_rule: explain_rule.flatten(),
            scenario: self.scenario.clone(),
            step: what.to_owned(),
            call: call.to_owned(),
            event: event.map(str::to_owned),
            pid: std::process::id(),
            tid: tid(),
            netns: self.netns,
            fd: s.as_raw_fd(),
            proto: if udp { "udp" } else { "tcp" }.to_owned(),
            addr: addr.ip().to_string(),
            port: addr.port(),
            reuseaddr: s.reuse_address().unwrap_or(false),
            reuseport: s.reuse_port().unwrap_or(false),
            sock_cookie: s.cookie().unwrap_or(0),
            sock_ino: socket_ino(s),
            expected: expected.map(str::to_owned),
            ok: errno.as_deref() == expected,
            errno,
            pressure: None,
        };
        let ok = self.push(step);
        self.track_pressure();
        ok
    }

    /// After a call or a close: the pairs whose level the scenario's own
    /// sockets moved (see `crate::pressure`), one step each; under the
    /// observer each waits for its `port_pressure` record, so the next call
    /// cannot move the count before the observer has seen this one.
    fn track_pressure(&mut self) {
        let Some((range, mut levels)) = self.pressure.take() else {
            return;
        };
        let socks: Vec<crate::pressure::Sock> = self.sockets.values().filter_map(held).collect();
        let counts = crate::pressure::count(&socks, &range);
        let size = range.size();
        for ch in levels.update(&counts, size) {
            let (addr, port) = ch.pair.addr();
            let p = PressureStep {
                proto: ch.pair.proto_name().into(),
                scope: ch.pair.scope_name().into(),
                port,
                in_use: ch.in_use,
                range: size,
                level: ch.level,
                previous: ch.previous,
            };
            let step = Step {
                scenario: self.scenario.clone(),
                step: format!(
                    "{} {} {addr}{}: {}/{size} ports, level {} -> {}",
                    p.proto,
                    p.scope,
                    port.map(|p| format!(":{p}")).unwrap_or_default(),
                    p.in_use,
                    p.previous,
                    p.level
                ),
                call: "port_pressure".into(),
                event: Some("port_pressure".into()),
                pid: std::process::id(),
                tid: tid(),
                netns: self.netns,
                fd: -1,
                proto: p.proto.clone(),
                addr,
                port: port.unwrap_or(0),
                reuseaddr: false,
                reuseport: false,
                sock_cookie: 0,
                sock_ino: 0,
                expected: None,
                errno: None,
                ok: true,
                explain_verdict: None,
                explain_rule: None,
                pressure: Some(p),
            };
            self.push(step);
        }
        self.pressure = Some((range, levels));
    }

    /// Closes `name` with an RST (SO_LINGER 0): its port is free at once,
    /// no TIME_WAIT.
    pub fn close_reset(&mut self, name: &str) {
        if let Some(s) = self.sockets.remove(name) {
            let _ = s.set_linger(Some(std::time::Duration::ZERO));
        }
        self.track_pressure();
    }

    pub fn push(&mut self, step: Step) -> bool {
        self.book
            .note(step.sock_cookie, step.reuseaddr, step.reuseport);
        match self.sink {
            Sink::Stderr => eprintln!("{}", describe(&step)),
            Sink::Stdout => println!("{}", serde_json::to_string(&step).expect("a step is JSON")),
        }
        if let (Some(s), Some(p)) = (&self.shared, &step.pressure) {
            let key = format!(
                "{} {} {} {} {:?} {}/{} {}->{}",
                step.netns,
                p.proto,
                p.scope,
                step.addr,
                p.port,
                p.in_use,
                p.range,
                p.previous,
                p.level
            );
            if !s.wait_pressure(&key, PRESSURE_WITHIN) {
                eprintln!(
                    "{} / {}: the stream did not write this port_pressure record within {PRESSURE_WITHIN:?}",
                    step.scenario, step.step
                );
            }
        }
        // Under the observer, a failure's blockers stay until the stream has
        // explained it (they would be gone before the explainer looks). A
        // helper's steps, pushed here too, are its own process's business.
        if let Some(s) = &self.shared
            && step.pid == std::process::id()
            && step.errno.as_deref() == Some("EADDRINUSE")
            && matches!(step.call.as_str(), "bind" | "listen")
            && !s.wait_written(step.tid, step.fd, WAIT_WITHIN)
        {
            eprintln!(
                "{} / {}: the stream did not write this failure within {WAIT_WITHIN:?}",
                step.scenario, step.step
            );
        }
        let ok = step.ok;
        self.steps.push(step);
        ok
    }

    /// bind(); `expected` is the errno name the kernel should answer (`None`: success).
    pub fn bind(
        &mut self,
        name: &str,
        what: &str,
        addr: SocketAddr,
        expected: Option<&str>,
    ) -> bool {
        let prediction = self.predict(name, addr);
        let errno = errno_of(self.sock(name).bind(&addr.into()));
        self.record(name, what, "bind", addr, expected, errno, prediction)
    }

    /// What the explain engine says a bind of `name` to `addr` will answer, from
    /// the sockets on the port right now and the options this scenario knows.
    fn predict(&self, name: &str, addr: SocketAddr) -> Option<(String, Option<Rule>)> {
        let s = self.sock(name);
        let mut diag = crate::kernel::sock_diag::Diag::open().ok()?;
        // bind(0): every socket, for the port range.
        let port = (addr.port() != 0).then_some(addr.port());
        let mut holders = explain::holders(
            &mut diag,
            0,
            port,
            &self.book,
            &mut explain::Owners::none(),
            explain::Ask::BookOnly,
        )
        .ok()?;
        // Connections still closing (FIN_WAIT2 on a slow machine) hold the
        // port as their TIME_WAIT successors will, with the same options.
        for h in holders
            .iter_mut()
            .filter(|h| !matches!(h.state, "LISTEN" | "BOUND") && h.reuseaddr.is_none())
        {
            (h.reuseaddr, h.reuseport) = self.time_wait_reuse.unzip();
        }
        // What this kernel's sock_diag cannot list (bound, not listening),
        // the scenario knows of its own sockets, as the stream of its binds.
        if !crate::kernel::sock_diag::lists_bound_only() {
            let unlisted: Vec<rules::Holder> = self
                .sockets
                .iter()
                .filter(|(other, _)| other.as_str() != name)
                .filter_map(|(_, s)| self.bound_only(s))
                .filter(|b| !holders.iter().any(|h| u64::from(h.inode) == b.ino))
                .map(|b| b.holder())
                .collect();
            holders.extend(unlisted);
        }
        let proto = if s.r#type().ok()? == Type::DGRAM {
            rules::UDP
        } else {
            rules::TCP
        };
        let r = rules::Request {
            reuseaddr: s.reuse_address().ok()?,
            reuseport: s.reuse_port().ok()?,
            v6only: addr.is_ipv6() && s.only_v6().ok()?,
            uid: nix::unistd::geteuid().as_raw(),
            ifindex: match addr {
                SocketAddr::V6(a) if a.scope_id() != 0 => Some(a.scope_id()),
                _ => None,
            },
            nonlocal: s.freebind_v4().unwrap_or(false),
            ..rules::Request::new(proto, addr.ip(), addr.port())
        };
        // The scenario's thread is inside the namespace it binds in.
        let env = explain::env::Env::here().ok()?;
        if port.is_none() {
            // IP_BIND_ADDRESS_NO_PORT: bind(0) takes no port; connect() picks one.
            if nix::sys::socket::getsockopt(s, nix::sys::socket::sockopt::IpBindAddressNoPort)
                .unwrap_or(false)
            {
                return Some(("ok".to_owned(), None));
            }
            holders.retain(|h| h.proto_num == proto);
            return Some(
                match rules::ephemeral_exhausted(&r, env.local_port_range, &holders) {
                    Some(e) => (e.rule.errno().to_owned(), Some(e.rule)),
                    None => ("ok".to_owned(), None),
                },
            );
        }
        Some(match rules::verdict(&r, &env, &holders) {
            Some(e) => (e.rule.errno().to_owned(), Some(e.rule)),
            None => ("ok".to_owned(), None),
        })
    }

    /// One of this scenario's TCP sockets, if it is bound and not listening.
    fn bound_only(&self, s: &Socket) -> Option<explain::Bound> {
        if s.r#type().ok()? != Type::STREAM || s.is_listener().ok()? {
            return None;
        }
        let local = s.local_addr().ok()?.as_socket()?;
        (local.port() != 0).then(|| explain::Bound {
            netns: 0,
            local,
            ino: socket_ino(s),
            pid: std::process::id(),
            fd: s.as_raw_fd(),
            uid: nix::unistd::geteuid().as_raw(),
            comm: String::new(),
            reuseaddr: s.reuse_address().unwrap_or(false),
            reuseport: s.reuse_port().unwrap_or(false),
        })
    }

    /// The step agrees with the explain engine's prediction (or there was none).
    pub fn agrees(s: &Step) -> bool {
        s.explain_verdict
            .as_deref()
            .is_none_or(|v| v == s.errno.as_deref().unwrap_or("ok"))
    }

    pub fn listen(&mut self, name: &str, what: &str, expected: Option<&str>) -> bool {
        let s = self.sock(name);
        let local = s
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let errno = errno_of(s.listen(128));
        self.record(name, what, "listen", local, expected, errno, None)
    }

    pub fn connect(
        &mut self,
        name: &str,
        what: &str,
        to: SocketAddr,
        expected: Option<&str>,
    ) -> bool {
        let errno = errno_of(self.sock(name).connect(&to.into()));
        self.record(name, what, "connect", to, expected, errno, None)
    }

    /// Accepts one connection on the listener `name`, kept open as `as_name`.
    pub fn accept(&mut self, name: &str, as_name: &str) -> io::Result<()> {
        let (s, _) = self.sock(name).accept()?;
        self.sockets.insert(as_name.to_owned(), s);
        Ok(())
    }

    pub fn close(&mut self, name: &str) {
        self.sockets.remove(name);
    }

    /// Reads until the peer's FIN (end of stream) on `name`.
    pub fn read_eof(&mut self, name: &str) -> io::Result<()> {
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 64];
        while self.sock(name).recv(&mut buf)? > 0 {}
        Ok(())
    }

    /// Runs a helper process (see `helper`) in this namespace; it prints its
    /// steps as JSON lines on stdout and its "ready" line, then waits to be killed.
    pub fn helper(&mut self, mode: helper::Mode) -> io::Result<()> {
        use std::io::BufRead;
        use std::os::unix::process::CommandExt;
        let spec = helper::Spec {
            scenario: self.scenario.clone(),
            known: self.book.entries(),
            mode,
        };
        let read = helper::spec_pipe(&spec)?;
        let read_fd = read.as_raw_fd();
        let mut cmd = Command::new("/proc/self/exe");
        cmd.env(helper::ENV, helper::SPEC_FD.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // The spec's pipe on the agreed descriptor, inherited across
                // exec: dup2 clears CLOEXEC, but does nothing when the pipe is
                // on that descriptor already.
                let placed = if read_fd == helper::SPEC_FD {
                    libc::fcntl(read_fd, libc::F_SETFD, 0)
                } else {
                    libc::dup2(read_fd, helper::SPEC_FD)
                };
                if placed < 0 {
                    return Err(io::Error::last_os_error());
                }
                // The helper dies with this thread, even if the observer is killed.
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(io::Error::from)
            });
        }
        let mut child = cmd.spawn()?;
        drop(read);
        let stdout = child.stdout.take().expect("piped");
        self.children.push(child);
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line?;
            if line == "ready" {
                return Ok(());
            }
            let step: Step = serde_json::from_str(&line).map_err(io::Error::other)?;
            self.push(step);
        }
        Err(io::Error::other("repro helper exited before it was ready"))
    }

    /// Kills the helpers like a crash: SIGKILL, no clean shutdown.
    pub fn kill_helpers(&mut self) {
        for mut c in self.children.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits (up to 2 s) until `n` TCP sockets on local `port` of this
    /// namespace are in TIME_WAIT, as /proc/net/tcp lists them; returns how
    /// many it saw.
    pub fn wait_time_wait(&self, port: u16, n: usize) -> usize {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            let in_tw = self
                .tcp_on(port)
                .iter()
                .filter(|(local, _, st)| local.ends_with(&format!(":{port}")) && st == "06")
                .count();
            if in_tw >= n || std::time::Instant::now() >= until {
                return in_tw;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// The TCP sockets of this thread's namespace with `port` at either end,
    /// as /proc/net/tcp has them: (local, remote, state in hex).
    pub fn tcp_on(&self, port: u16) -> Vec<(String, String, String)> {
        let hex = format!(":{port:04X}");
        let end = |e: &str| -> String {
            let (ip, p) = e.split_once(':').unwrap_or((e, "0"));
            let ip = u32::from_str_radix(ip, 16).unwrap_or(0);
            let p = u16::from_str_radix(p, 16).unwrap_or(0);
            format!("{}:{p}", std::net::Ipv4Addr::from(ip.to_le_bytes()))
        };
        std::fs::read_to_string("/proc/thread-self/net/tcp")
            .unwrap_or_default()
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let (local, remote, st) = (*f.get(1)?, *f.get(2)?, *f.get(3)?);
                (local.ends_with(&hex) || remote.ends_with(&hex))
                    .then(|| (end(local), end(remote), st.to_owned()))
            })
            .collect()
    }

    /// Writes `range` ("LOW HIGH") to this namespace's ip_local_port_range;
    /// from now on, the steps predict the `port_pressure` records too.
    pub fn port_range(&mut self, range: &str) -> io::Result<()> {
        std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", range)?;
        let mut it = range.split_whitespace().map(str::parse::<u16>);
        if let (Some(Ok(low)), Some(Ok(high))) = (it.next(), it.next()) {
            // A fresh namespace reserves no port.
            self.pressure = Some((crate::pressure::Range::new(low, high), Default::default()));
        }
        Ok(())
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        self.close_all();
    }
}

/// A socket of the scenario's as the port count sees it: its local end (if
/// it has a port), its peer (if connected), listening or not.
fn held(s: &Socket) -> Option<crate::pressure::Sock> {
    let src = s.local_addr().ok()?.as_socket()?;
    if src.port() == 0 {
        return None;
    }
    let peer = s.peer_addr().ok().and_then(|a| a.as_socket());
    let udp = s.r#type().ok() == Some(Type::DGRAM);
    let state = if !udp && s.is_listener().unwrap_or(false) {
        10 // LISTEN
    } else if peer.is_some() {
        1 // ESTABLISHED
    } else {
        7 // CLOSE
    };
    Some(crate::pressure::Sock {
        proto: if udp { rules::UDP } else { rules::TCP },
        state,
        src,
        dst: peer.unwrap_or_else(|| SocketAddr::new(src.ip(), 0)),
        inode: 0,
    })
}

/// The human line for a step: what it did, what the kernel answered, what was expected.
pub fn describe(s: &Step) -> String {
    if s.pressure.is_some() {
        return format!("{:<22} port_pressure {}", s.scenario, s.step);
    }
    let answer = s.errno.as_deref().unwrap_or("ok");
    let expected = s.expected.as_deref().unwrap_or("ok");
    let opts = match (s.reuseaddr, s.reuseport) {
        (false, false) => String::new(),
        (true, false) => " SO_REUSEADDR".into(),
        (false, true) => " SO_REUSEPORT".into(),
        (true, true) => " SO_REUSEADDR+SO_REUSEPORT".into(),
    };
    let addr = if s.addr.contains(':') {
        format!("[{}]:{}", s.addr, s.port)
    } else {
        format!("{}:{}", s.addr, s.port)
    };
    let disagree = if Ctx::agrees(s) {
        String::new()
    } else {
        format!(
            " (explain predicted {})",
            s.explain_verdict.as_deref().unwrap_or("")
        )
    };
    format!(
        "{:<22} {:<4} {} {}{} {:<46} -> {:<13} expected {:<13} {}{disagree}",
        s.scenario,
        s.proto,
        s.call,
        addr,
        opts,
        format!("({})", s.step),
        answer,
        expected,
        if s.ok { "ok" } else { "UNEXPECTED" }
    )
}
