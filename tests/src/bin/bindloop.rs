//! The benchmark's load: as many binds (or TCP connections) as one thread can
//! make, on loopback, for a time or a count. Prints `ops=N secs=S rate=R pid=P`.
//!
//!   bindloop udp|tcp SECS [COUNT]   socket + bind(127.0.0.1:0) + close
//!   bindloop churn SECS             connect + accept + close, over loopback

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
        _ => usage(),
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "ops={ops} secs={secs:.3} rate={:.0} pid={}",
        ops as f64 / secs,
        std::process::id()
    );
}
