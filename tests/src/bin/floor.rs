//! The benchmark's floor: the observer's own eBPF object, with a program
//! that does nothing attached to each tracepoint given (`category:event`, or
//! `raw:event` for a raw tracepoint), until SIGINT or SIGTERM. Prints
//! `attached N` once attached.
//!
//!   floor OBJECT syscalls:sys_exit_bind raw:timer_start [...]

use std::io::Write;

use aya::{
    EbpfLoader,
    programs::{RawTracePoint, TracePoint},
};

fn main() {
    // SIGINT ends it by the default action, which a shell's background job
    // inherits as "ignore": set it back.
    // SAFETY: setting a signal's disposition to the default has no preconditions.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_DFL) };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((object, hooks)) = args.split_first() else {
        eprintln!("usage: floor OBJECT CATEGORY:EVENT...");
        std::process::exit(2);
    };
    let bytes = std::fs::read(object).unwrap_or_else(|e| panic!("{object}: {e}"));
    let mut ebpf = EbpfLoader::new()
        .btf(None)
        .load(&bytes)
        .expect("loading the object");
    let (raw, classic): (Vec<&String>, Vec<&String>) =
        hooks.iter().partition(|h| h.starts_with("raw:"));
    let prog: &mut TracePoint = ebpf
        .program_mut("obs_floor")
        .expect("obs_floor in the object")
        .try_into()
        .expect("a tracepoint program");
    prog.load().expect("loading obs_floor");
    for hook in classic {
        let (category, event) = hook.split_once(':').expect("CATEGORY:EVENT");
        prog.attach(category, event)
            .unwrap_or_else(|e| panic!("attaching to {hook}: {e}"));
    }
    let prog: &mut RawTracePoint = ebpf
        .program_mut("obs_floor_raw")
        .expect("obs_floor_raw in the object")
        .try_into()
        .expect("a raw tracepoint program");
    prog.load().expect("loading obs_floor_raw");
    for hook in raw {
        prog.attach(&hook["raw:".len()..])
            .unwrap_or_else(|e| panic!("attaching to {hook}: {e}"));
    }
    println!("attached {}", hooks.len());
    std::io::stdout().flush().unwrap();
    // Until SIGINT or SIGTERM (the default action ends the process, and the
    // links go with it).
    loop {
        // SAFETY: waits for a signal.
        unsafe { libc::pause() };
    }
}
