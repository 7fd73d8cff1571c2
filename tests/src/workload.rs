//! A bind workload that records, for each bind it makes, what it asked and what
//! the kernel answered: the reference the observer's stream is compared with.
//!
//! It runs on a thread of its own inside a private network namespace (fixed
//! ports never collide with the host's, and nothing is left behind).

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    os::{
        fd::AsRawFd,
        linux::net::SocketAddrExt,
        unix::net::{SocketAddr as UnixAddr, UnixDatagram},
    },
};

use serde_json::{Value, json};
use socket2::{Domain, Protocol, Socket, Type};

/// One bind() the workload made.
#[derive(Debug, Clone)]
pub struct Op {
    /// What this bind is about (for messages and for comparing runs).
    pub what: String,
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    pub comm: String,
    pub netns: u64,
    pub fd: i32,
    pub family: Option<&'static str>,
    pub proto: Option<&'static str>,
    pub addr: Option<String>,
    pub port: Option<u16>,
    pub bound_port: Option<u16>,
    pub reuseaddr: Option<bool>,
    pub reuseport: Option<bool>,
    /// 0 or the errno the kernel returned.
    pub errno: i32,
    /// The socket's inode (`fstat`), its id in the observer's records.
    pub ino: Option<u64>,
}

impl Op {
    /// The fields the observer's `bind` record must hold for this bind, as JSON.
    pub fn expected(&self) -> Value {
        json!({
            "event": "bind",
            "pid": self.pid, "tid": self.tid, "uid": self.uid, "comm": self.comm,
            "netns": self.netns, "fd": self.fd,
            "family": self.family, "proto": self.proto,
            "addr": self.addr, "port": self.port, "bound_port": self.bound_port,
            "options": {"reuseaddr": self.reuseaddr, "reuseport": self.reuseport},
            "ret": -(self.errno as i64),
            "errno": errno_name(self.errno),
            "sock_ino": self.ino,
        })
    }
}

/// The errno names the workload expects, spelled independently of the daemon's table.
pub fn errno_name(errno: i32) -> Option<&'static str> {
    Some(match errno {
        0 => return None,
        libc::EADDRINUSE => "EADDRINUSE",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        libc::EACCES => "EACCES",
        libc::EINVAL => "EINVAL",
        libc::EBADF => "EBADF",
        libc::ENOTSOCK => "ENOTSOCK",
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        libc::EPERM => "EPERM",
        _ => "unexpected errno",
    })
}

/// True when every field of `expected` (recursively) has the same value in `event`.
pub fn matches(event: &Value, expected: &Value) -> bool {
    match expected {
        Value::Object(fields) => fields
            .iter()
            .all(|(k, v)| event.get(k).is_some_and(|e| matches(e, v))),
        _ => event == expected,
    }
}

/// The calling thread as the observer sees it.
#[derive(Debug, Clone)]
struct Me {
    pid: u32,
    tid: u32,
    uid: u32,
    comm: String,
    netns: u64,
}

fn me() -> Me {
    use std::os::unix::fs::MetadataExt;
    Me {
        pid: std::process::id(),
        tid: unsafe { libc::gettid() } as u32,
        uid: unsafe { libc::getuid() },
        comm: std::fs::read_to_string("/proc/thread-self/comm")
            .unwrap()
            .trim_end()
            .to_owned(),
        netns: std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino(),
    }
}

/// Moves the calling thread into a new network namespace with loopback up.
/// Threads it spawns afterwards start in that namespace too.
pub fn enter_private_netns() {
    assert_eq!(
        unsafe { libc::unshare(libc::CLONE_NEWNET) },
        0,
        "unshare(CLONE_NEWNET): {}",
        io::Error::last_os_error()
    );
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (d, s) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
            *d = *s as libc::c_char;
        }
        assert_eq!(libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr), 0);
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        assert_eq!(
            libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr),
            0,
            "bringing lo up: {}",
            io::Error::last_os_error()
        );
        libc::close(fd);
    }
}

pub fn sockaddr_in(ip: Ipv4Addr, port: u16) -> Vec<u8> {
    let mut sa = vec![0u8; 16];
    sa[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
    sa[2..4].copy_from_slice(&port.to_be_bytes());
    sa[4..8].copy_from_slice(&ip.octets());
    sa
}

pub fn sockaddr_in6(ip: Ipv6Addr, port: u16) -> Vec<u8> {
    let mut sa = vec![0u8; 28];
    sa[..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
    sa[2..4].copy_from_slice(&port.to_be_bytes());
    sa[8..24].copy_from_slice(&ip.octets());
    sa
}

/// The inode of the file behind `fd` (a socket's, as `ss -e` shows it).
pub fn fd_ino(fd: i32) -> u64 {
    // SAFETY: fstat into a zeroed struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::fstat(fd, &mut st) }, 0, "fstat");
    st.st_ino
}

fn errno_of(r: io::Result<()>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(e) => e.raw_os_error().expect("an OS error"),
    }
}

fn family_of(addr: &SocketAddr) -> &'static str {
    if addr.is_ipv4() { "inet" } else { "inet6" }
}

/// The workload's log, and the sockets it keeps open until it is dropped.
#[derive(Default)]
pub struct Workload {
    pub ops: Vec<Op>,
    keep: Vec<Socket>,
    keep_unix: Vec<UnixDatagram>,
}

impl Workload {
    fn op(&mut self, what: &str, fd: i32) -> Op {
        let me = me();
        Op {
            what: what.to_owned(),
            pid: me.pid,
            tid: me.tid,
            uid: me.uid,
            comm: me.comm,
            netns: me.netns,
            fd,
            family: None,
            proto: None,
            addr: None,
            port: None,
            bound_port: None,
            reuseaddr: None,
            reuseport: None,
            errno: 0,
            ino: None,
        }
    }

    pub fn socket(
        addr: &SocketAddr,
        tcp: bool,
        reuseaddr: bool,
        reuseport: bool,
    ) -> io::Result<Socket> {
        let (ty, proto) = if tcp {
            (Type::STREAM, Protocol::TCP)
        } else {
            (Type::DGRAM, Protocol::UDP)
        };
        let s = Socket::new(Domain::for_address(*addr), ty, Some(proto))?;
        s.set_reuse_address(reuseaddr)?;
        s.set_reuse_port(reuseport)?;
        Ok(s)
    }

    /// bind() of an inet socket through the normal path; returns the errno (0 on success).
    pub fn bind(&mut self, what: &str, sock: Socket, addr: SocketAddr, listen: bool) -> i32 {
        let errno = errno_of(sock.bind(&addr.into()));
        let tcp = sock.r#type().unwrap() == Type::STREAM;
        let mut op = self.op(what, sock.as_raw_fd());
        op.family = Some(family_of(&addr));
        op.proto = Some(if tcp { "tcp" } else { "udp" });
        op.addr = Some(addr.ip().to_string());
        op.port = Some(addr.port());
        op.reuseaddr = Some(sock.reuse_address().unwrap());
        op.reuseport = Some(sock.reuse_port().unwrap());
        op.ino = Some(fd_ino(sock.as_raw_fd()));
        op.errno = errno;
        if errno == 0 {
            op.bound_port = Some(sock.local_addr().unwrap().as_socket().unwrap().port());
            if listen && tcp {
                sock.listen(16).unwrap();
            }
        }
        self.ops.push(op);
        self.keep.push(sock);
        errno
    }

    /// Binds `sock` again (it is already bound): EINVAL.
    pub fn rebind(&mut self, what: &str, addr: SocketAddr) -> i32 {
        let sock = self.keep.last().unwrap().try_clone().unwrap();
        self.bind(what, sock, addr, false)
    }

    /// bind(fd, raw sockaddr) for binds the socket layer refuses before `inet_bind`.
    /// `sock` says what the fd is, for the fields the observer can still know.
    pub fn raw_bind(&mut self, what: &str, fd: i32, sa: &[u8], addrlen: usize) -> i32 {
        let r = unsafe {
            libc::bind(
                fd,
                sa.as_ptr().cast::<libc::sockaddr>(),
                addrlen as libc::socklen_t,
            )
        };
        let errno = if r == 0 {
            0
        } else {
            io::Error::last_os_error().raw_os_error().unwrap()
        };
        let mut op = self.op(what, fd);
        let given = &sa[..addrlen.min(sa.len())];
        let family = given
            .get(..2)
            .map(|b| u16::from_ne_bytes([b[0], b[1]]) as i32);
        op.family = match family {
            Some(libc::AF_INET) => Some("inet"),
            Some(libc::AF_INET6) => Some("inet6"),
            _ => None,
        };
        op.port = given.get(2..4).map(|b| u16::from_be_bytes([b[0], b[1]]));
        op.addr = match family {
            Some(libc::AF_INET) => given
                .get(4..8)
                .map(|b| Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_string()),
            Some(libc::AF_INET6) => given
                .get(8..24)
                .map(|b| Ipv6Addr::from(<[u8; 16]>::try_from(b).unwrap()).to_string()),
            _ => None,
        };
        op.errno = errno;
        self.ops.push(op);
        errno
    }

    /// An AF_UNIX bind in the abstract namespace: the observer reports it from the tracepoints.
    pub fn unix_bind(&mut self, what: &str, name: &str) -> i32 {
        let addr = UnixAddr::from_abstract_name(name.as_bytes()).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).expect("abstract unix bind");
        let mut op = self.op(what, sock.as_raw_fd());
        op.family = Some("unix");
        op.addr = Some(format!("@{name}"));
        op.ino = Some(fd_ino(sock.as_raw_fd()));
        self.ops.push(op);
        self.keep_unix.push(sock);
        0
    }

    /// bind(127.0.0.1:port) as uid/gid 65534 in a forked child (a port below 1024: EACCES).
    pub fn bind_as_nobody(&mut self, what: &str, port: u16) -> i32 {
        let sa = sockaddr_in(Ipv4Addr::LOCALHOST, port);
        let mut fds = [0; 2];
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        let parent = me();
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
        if pid == 0 {
            // The child of a multi-threaded process: raw syscalls only, then _exit.
            unsafe {
                let mut out = [-1i64; 3]; // errno, fd, inode
                if libc::setgroups(0, std::ptr::null()) == 0
                    && libc::setgid(65534) == 0
                    && libc::setuid(65534) == 0
                {
                    let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                    let r = libc::bind(fd, sa.as_ptr().cast(), sa.len() as libc::socklen_t);
                    out[0] = if r == 0 {
                        0
                    } else {
                        *libc::__errno_location() as i64
                    };
                    out[1] = fd as i64;
                    let mut st: libc::stat = std::mem::zeroed();
                    libc::fstat(fd, &mut st);
                    out[2] = st.st_ino as i64;
                }
                libc::write(fds[1], out.as_ptr().cast(), 24);
                libc::_exit(0);
            }
        }
        unsafe { libc::close(fds[1]) };
        let mut out = [0i64; 3];
        let n = unsafe { libc::read(fds[0], out.as_mut_ptr().cast(), 24) };
        unsafe { libc::close(fds[0]) };
        let mut status = 0;
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(n, 24, "child reported nothing");
        assert_ne!(out[0], -1, "child could not drop privileges");
        self.ops.push(Op {
            what: what.to_owned(),
            pid: pid as u32,
            tid: pid as u32,
            uid: 65534,
            comm: parent.comm,
            netns: parent.netns,
            fd: out[1] as i32,
            family: Some("inet"),
            proto: Some("tcp"),
            addr: Some("127.0.0.1".into()),
            port: Some(port),
            bound_port: None,
            reuseaddr: Some(false),
            reuseport: Some(false),
            errno: out[0] as i32,
            ino: Some(out[2] as u64),
        });
        out[0] as i32
    }
}

/// The full bind sequence: every outcome the kernel tests expect to see, in a
/// private network namespace. Returns the log (the sockets are closed).
pub fn run_bind_sequence() -> Vec<Op> {
    std::thread::Builder::new()
        .name("bind-workload".into())
        .spawn(|| {
            enter_private_netns();
            let mut w = Workload::default();
            bind_sequence(&mut w);
            w.ops
        })
        .unwrap()
        .join()
        .expect("workload thread")
}

const P: u16 = 5700;

fn v4(a: [u8; 4], port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::from(a), port))
}

fn v6(a: Ipv6Addr, port: u16) -> SocketAddr {
    SocketAddr::from((a, port))
}

fn bind_sequence(w: &mut Workload) {
    let tcp = |a: &SocketAddr, ra, rp| Workload::socket(a, true, ra, rp).unwrap();
    let udp = |a: &SocketAddr, ra, rp| Workload::socket(a, false, ra, rp).unwrap();
    let expect = |what: &str, got: i32, want: i32| {
        assert_eq!(
            (got, errno_name(got)),
            (want, errno_name(want)),
            "kernel answer for {what}"
        );
    };

    let a = v4([127, 0, 0, 1], P);
    expect(
        "fixed port",
        w.bind("fixed port", tcp(&a, false, false), a, true),
        0,
    );
    expect(
        "listener conflict",
        w.bind("listener conflict", tcp(&a, false, false), a, false),
        libc::EADDRINUSE,
    );
    let any = v4([0, 0, 0, 0], P);
    expect(
        "wildcard vs specific",
        w.bind("wildcard vs specific", tcp(&any, false, false), any, false),
        libc::EADDRINUSE,
    );
    let eph = v4([127, 0, 0, 1], 0);
    expect(
        "ephemeral port",
        w.bind("ephemeral port", tcp(&eph, false, false), eph, false),
        0,
    );
    expect("bind twice", w.rebind("bind twice", eph), libc::EINVAL);
    let foreign = v4([10, 255, 255, 1], 0);
    expect(
        "address not on host",
        w.bind(
            "address not on host",
            tcp(&foreign, false, false),
            foreign,
            false,
        ),
        libc::EADDRNOTAVAIL,
    );
    expect(
        "privileged port as nobody",
        w.bind_as_nobody("privileged port as nobody", 80),
        libc::EACCES,
    );

    let l6 = v6(Ipv6Addr::LOCALHOST, P);
    expect(
        "ipv6 loopback",
        w.bind("ipv6 loopback", tcp(&l6, false, false), l6, true),
        0,
    );
    let any6 = v6(Ipv6Addr::UNSPECIFIED, P);
    expect(
        "ipv6 wildcard vs specific",
        w.bind(
            "ipv6 wildcard vs specific",
            tcp(&any6, false, false),
            any6,
            false,
        ),
        libc::EADDRINUSE,
    );
    let any6_free = v6(Ipv6Addr::UNSPECIFIED, P + 1);
    expect(
        "ipv6 wildcard",
        w.bind(
            "ipv6 wildcard",
            tcp(&any6_free, false, false),
            any6_free,
            true,
        ),
        0,
    );

    expect("udp", w.bind("udp", udp(&a, false, false), a, false), 0);
    expect(
        "udp conflict",
        w.bind("udp conflict", udp(&a, false, false), a, false),
        libc::EADDRINUSE,
    );
    let ra = v4([127, 0, 0, 2], P);
    expect(
        "udp reuseaddr 1",
        w.bind("udp reuseaddr 1", udp(&ra, true, false), ra, false),
        0,
    );
    expect(
        "udp reuseaddr 2",
        w.bind("udp reuseaddr 2", udp(&ra, true, false), ra, false),
        0,
    );
    let rp = v4([127, 0, 0, 3], P);
    expect(
        "tcp reuseport 1",
        w.bind("tcp reuseport 1", tcp(&rp, false, true), rp, true),
        0,
    );
    expect(
        "tcp reuseport 2",
        w.bind("tcp reuseport 2", tcp(&rp, false, true), rp, true),
        0,
    );
    expect(
        "tcp reuseport missing",
        w.bind("tcp reuseport missing", tcp(&rp, false, false), rp, false),
        libc::EADDRINUSE,
    );
    let both = v4([127, 0, 0, 4], P);
    expect(
        "reuseaddr and reuseport",
        w.bind(
            "reuseaddr and reuseport",
            tcp(&both, true, true),
            both,
            false,
        ),
        0,
    );

    // Refused before inet_bind: the observer sees them only through the tracepoints.
    let sa = sockaddr_in(Ipv4Addr::LOCALHOST, P + 2);
    let bad_fd = 4000;
    assert_eq!(
        unsafe { libc::fcntl(bad_fd, libc::F_GETFD) },
        -1,
        "fd {bad_fd} must be closed"
    );
    expect(
        "bad fd",
        w.raw_bind("bad fd", bad_fd, &sa, sa.len()),
        libc::EBADF,
    );
    let file = std::fs::File::open("/dev/null").unwrap();
    expect(
        "not a socket",
        w.raw_bind("not a socket", file.as_raw_fd(), &sa, sa.len()),
        libc::ENOTSOCK,
    );
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    // The fd is a socket: the record has the socket's view too.
    let socket_view = |w: &mut Workload| {
        let op = w.ops.last_mut().unwrap();
        op.proto = Some("tcp");
        op.reuseaddr = Some(false);
        op.reuseport = Some(false);
        op.ino = Some(fd_ino(s.as_raw_fd()));
    };
    expect(
        "short address",
        w.raw_bind("short address", s.as_raw_fd(), &sa, 4),
        libc::EINVAL,
    );
    socket_view(w);
    // An AF_INET socket given a sockaddr_in6: inet_bind refuses; the record
    // says what the caller asked for.
    let sa6 = sockaddr_in6(Ipv6Addr::LOCALHOST, P + 2);
    let r = w.raw_bind("wrong family", s.as_raw_fd(), &sa6, sa6.len());
    expect("wrong family", r, libc::EAFNOSUPPORT);
    socket_view(w);
    expect(
        "unix abstract",
        w.unix_bind(
            "unix abstract",
            &format!("observer-test-{}", std::process::id()),
        ),
        0,
    );

    // Several threads at once, TCP and UDP on ephemeral ports.
    let per_thread: Vec<Vec<Op>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|t| {
                std::thread::Builder::new()
                    .name(format!("bind-thread-{t}"))
                    .spawn_scoped(scope, move || {
                        let mut tw = Workload::default();
                        for i in 0..10 {
                            let s = Workload::socket(&eph, i % 2 == 0, false, false).unwrap();
                            assert_eq!(tw.bind("thread ephemeral", s, eph, false), 0);
                        }
                        tw.ops
                    })
                    .unwrap()
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    w.ops.extend(per_thread.into_iter().flatten());
    drop(file);
}
