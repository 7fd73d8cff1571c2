//! The benchmark's load: as many binds (or TCP connections) as one thread can
//! make, on loopback, for a time or a count. Prints `ops=N secs=S rate=R pid=P`.
//!
//!   bindloop udp|tcp SECS [COUNT]   socket + bind(127.0.0.1:0) + close
//!   bindloop churn SECS             connect + accept + close, over loopback
//!   bindloop storm SECS             socket + bind(a port a listener holds) + close: every
//!                                   bind fails with EADDRINUSE
//!   bindloop hold N                 N idle TCP listeners in a network namespace of its
//!                                   own; prints `ready` and holds them until stdin closes
//!   bindloop twchurn SECS [COUNT]   the same, the server closing first (its socket goes to
//!                                   TIME_WAIT), on 2 threads, in a network namespace of its
//!                                   own; also prints `tw=N` (TIME_WAIT sockets there after
//!                                   1 s) and `netns=INODE`, then holds the namespace until
//!                                   stdin closes

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use socket2::{Domain, Socket, Type};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = || -> ! {
        eprintln!("usage: bindloop udp|tcp|churn SECS [COUNT]");
        std::process::exit(2)
    };
    let (Some(mode), Some(secs)) = (args.get(1), args.get(2).and_then(|s| s.parse::<f64>().ok()))
    else {
        usage()
    };
    let count: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(u64::MAX);
    let deadline = Duration::from_secs_f64(secs);
    let any: SocketAddr = (Ipv4Addr::LOCALHOST, 0).into();
    let start = Instant::now();
    let mut ops = 0u64;
    match mode.as_str() {
        "udp" | "tcp" => {
            let ty = if mode == "udp" {
                Type::DGRAM
            } else {
                Type::STREAM
            };
            while ops < count && (!ops.is_multiple_of(256) || start.elapsed() < deadline) {
                let s = Socket::new(Domain::IPV4, ty, None).expect("socket");
                s.bind(&any.into()).expect("bind");
                drop(s);
                ops += 1;
            }
        }
        "churn" => {
            let listener = TcpListener::bind(any).expect("listen");
            let to = listener.local_addr().unwrap();
            while ops < count && (!ops.is_multiple_of(16) || start.elapsed() < deadline) {
                let c = TcpStream::connect(to).expect("connect");
                let (a, _) = listener.accept().expect("accept");
                drop(c); // the client closes first: its socket goes to TIME_WAIT
                drop(a);
                ops += 1;
            }
        }
        "storm" => {
            let holder = TcpListener::bind(any).expect("listen");
            let held = holder.local_addr().unwrap();
            while ops < count && (!ops.is_multiple_of(256) || start.elapsed() < deadline) {
                let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
                let e = s.bind(&held.into()).expect_err("the port is held");
                assert_eq!(e.raw_os_error(), Some(libc::EADDRINUSE), "{e}");
                drop(s);
                ops += 1;
            }
        }
        "hold" => {
            hold_idle_sockets(secs as usize);
            return;
        }
        "twchurn" => {
            let (made, tw, netns) = time_wait_churn(deadline, count);
            ops = made;
            let secs = start.elapsed().as_secs_f64() - 1.0;
            println!(
                "ops={ops} secs={secs:.3} rate={:.0} pid={} tw={tw} netns={netns}",
                ops as f64 / secs,
                std::process::id()
            );
            // Hold the namespace (and its TIME_WAIT sockets) until told.
            let _ = std::io::Read::read(&mut std::io::stdin(), &mut [0u8; 1]);
            return;
        }
        _ => usage(),
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "ops={ops} secs={secs:.3} rate={:.0} pid={}",
        ops as f64 / secs,
        std::process::id()
    );
}

/// Listeners the TIME_WAIT churn spreads over: 16 x 64,000 client ports
/// gives a million distinct 4-tuples, so no TIME_WAIT socket is reused.
const TW_LISTENERS: u16 = 64;
const TW_THREADS: usize = 1;

/// Server-first connections on `TW_THREADS` threads in a new network
/// namespace until `deadline` or `count`; returns (server-side closes,
/// TIME_WAIT sockets in the namespace 1 s later, its inode).
fn time_wait_churn(deadline: Duration, count: u64) -> (u64, usize, u64) {
    use std::{
        io::Read,
        os::unix::fs::MetadataExt,
        sync::{
            Arc,
            atomic::{AtomicU64, Ordering},
        },
    };
    // SAFETY: unshare and the ioctls below act on this (single-threaded so far) process.
    assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
    lo_up();
    std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "1024 65535").unwrap();
    std::fs::write("/proc/sys/net/ipv4/tcp_max_tw_buckets", "2000000").unwrap();
    let listeners: Vec<TcpListener> = (0..TW_LISTENERS)
        .map(|i| TcpListener::bind((Ipv4Addr::LOCALHOST, 900 + i)).expect("listen"))
        .collect();
    let listeners = Arc::new(listeners);
    let made = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let threads: Vec<_> = (0..TW_THREADS)
        .map(|t| {
            let (listeners, made) = (listeners.clone(), made.clone());
            std::thread::spawn(move || {
                let mut i = t;
                loop {
                    let n = made.fetch_add(1, Ordering::Relaxed);
                    if n >= count || (n % 64 == 0 && start.elapsed() >= deadline) {
                        made.fetch_sub(1, Ordering::Relaxed);
                        break;
                    }
                    let l = &listeners[i % listeners.len()];
                    i += TW_THREADS;
                    let mut c = TcpStream::connect(l.local_addr().unwrap()).expect("connect");
                    let (a, _) = l.accept().expect("accept");
                    drop(a); // the server closes first
                    let _ = c.read(&mut [0u8; 1]); // its FIN
                    drop(c); // the client's FIN: the server's socket enters TIME_WAIT
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let made = made.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(1));
    let tw = std::fs::read_to_string("/proc/self/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .filter(|l| l.split_whitespace().nth(3) == Some("06"))
        .count();
    let netns = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
    (made, tw, netns)
}

/// Brings `lo` up in the current network namespace.
fn lo_up() {
    // SAFETY: plain ioctls on a socket this function owns.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (d, s) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
            *d = *s as libc::c_char;
        }
        assert_eq!(libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr), 0);
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        assert_eq!(libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr), 0);
        libc::close(fd);
    }
}

/// `n` idle TCP listeners (over 127.0.0.0/8 and every port) in a network
/// namespace of this process's own, until stdin closes. As many children as
/// the descriptor limit needs hold them (raising the hard limit needs
/// CAP_SYS_RESOURCE, which a container may not give).
fn hold_idle_sockets(n: usize) {
    // SAFETY: unshare acts on this (single-threaded) process.
    assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
    lo_up();
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on this process.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    let per = (limit.rlim_cur as usize).saturating_sub(64).max(1);
    let mut ready = [0i32; 2];
    // SAFETY: a pipe for the children to say they hold their share.
    assert_eq!(unsafe { libc::pipe(ready.as_mut_ptr()) }, 0);
    let mut children = Vec::new();
    for first in (0..n).step_by(per) {
        // SAFETY: this process is single-threaded; the child binds and waits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            let _held: Vec<TcpListener> = (first..n.min(first + per))
                .map(|i| {
                    let ip = Ipv4Addr::new(127, 0, 1 + (i / 60_000) as u8, 1);
                    TcpListener::bind((ip, 1024 + (i % 60_000) as u16)).expect("listen")
                })
                .collect();
            // SAFETY: one byte to the parent, then wait to be killed.
            unsafe {
                libc::write(ready[1], [1u8].as_ptr().cast(), 1);
                loop {
                    libc::pause();
                }
            }
        }
        children.push(pid);
    }
    for _ in &children {
        let mut b = [0u8; 1];
        // SAFETY: reading one byte per child from our pipe.
        assert_eq!(unsafe { libc::read(ready[0], b.as_mut_ptr().cast(), 1) }, 1);
    }
    println!("ready {n}");
    let _ = std::io::Read::read(&mut std::io::stdin(), &mut [0u8; 1]);
    for pid in children {
        // SAFETY: our own children.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
    }
}
