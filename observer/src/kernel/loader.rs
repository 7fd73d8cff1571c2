//! Loads the embedded eBPF object, writes its configuration (kernel offsets,
//! the TIME_WAIT timer, the filters), and attaches the programs this run and
//! this kernel need. Every program is a tracepoint (raw where it must run
//! nested in another: see `RAW`): nothing is attached to a cgroup, nothing
//! can change what the kernel decides.

use std::{fs::File, os::fd::AsRawFd};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{CgroupArray, HashMap},
    programs::{RawTracePoint, RawTracePointRunOptions, TestRun, TracePoint},
    util::KernelVersion,
};
use observer_common::{
    config::{KERNEL_OFFSETS_SYMBOL, KernelOffsets, WAKE_EVERY_BYTES_SYMBOL},
    filter::{FILTER_SYMBOL, FilterConfig, event},
    time_wait::{TIME_WAIT_CONFIG_SYMBOL, TW_HANDLER_MAP, TimeWaitConfig},
};

use crate::schema::ProgramStats;

/// The eBPF object, built by `cargo xtask build` and embedded by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/observer-ebpf.o"));

/// The `category` of a program attached as a raw tracepoint. A classic
/// tracepoint program does not run while another BPF program runs on its CPU
/// (the kernel's global `bpf_prog_active`): a softirq that runs on the exit
/// of an interrupt taken inside one of our programs would go unseen, and with
/// it the expiry of the TIME_WAIT timers it runs. A raw tracepoint program is
/// only kept from nesting in itself.
const RAW: &str = "raw";

/// A program and the tracepoint it attaches to.
struct Program {
    name: &'static str,
    category: &'static str,
    event: &'static str,
    /// The record kinds it serves: attached only when one of them is wanted.
    serves: u32,
}

const fn p(
    name: &'static str,
    category: &'static str,
    event: &'static str,
    serves: u32,
) -> Program {
    Program {
        name,
        category,
        event,
        serves,
    }
}

const STATES: u32 = event::TCP_STATE | event::TIME_WAIT;

/// The syscall exits, reading the arguments from the task's registers
/// (`bpf_task_pt_regs`, 5.15+): one program per call.
#[rustfmt::skip]
const FROM_REGS: [Program; 3] = [
    p("obs_sys_exit_bind", "syscalls", "sys_exit_bind", event::BIND),
    p("obs_sys_exit_listen", "syscalls", "sys_exit_listen", event::LISTEN),
    p("obs_sys_exit_connect", "syscalls", "sys_exit_connect", event::CONNECT),
];

/// The same where the registers cannot be read: the entry keeps the
/// arguments for the exit. Exits first, so that every entry kept is taken.
#[rustfmt::skip]
const FROM_ENTRY: [Program; 6] = [
    p("obs_sys_exit_bind_entered", "syscalls", "sys_exit_bind", event::BIND),
    p("obs_sys_exit_listen_entered", "syscalls", "sys_exit_listen", event::LISTEN),
    p("obs_sys_exit_connect_entered", "syscalls", "sys_exit_connect", event::CONNECT),
    p("obs_sys_enter_args", "syscalls", "sys_enter_bind", event::BIND),
    p("obs_sys_enter_args", "syscalls", "sys_enter_listen", event::LISTEN),
    p("obs_sys_enter_args", "syscalls", "sys_enter_connect", event::CONNECT),
];

/// TCP states, and what TIME_WAIT needs of them (the closer, reuse); the
/// timer's end before its start, so that a socket seen entering is seen leaving.
#[rustfmt::skip]
const STATE_PROGRAMS: [Program; 3] = [
    p("obs_softirq_exit", RAW, "softirq_exit", STATES),
    p("obs_softirq_entry", RAW, "softirq_entry", STATES),
    p("obs_inet_sock_set_state", "sock", "inet_sock_set_state", STATES),
];

#[rustfmt::skip]
const TIMER_PROGRAMS: [Program; 3] = [
    p("obs_timer_expire_entry", RAW, "timer_expire_entry", event::TIME_WAIT),
    p("obs_timer_cancel", RAW, "timer_cancel", event::TIME_WAIT),
    p("obs_timer_start", RAW, "timer_start", event::TIME_WAIT),
];

/// Loaded beside the timer programs, never attached: the daemon runs it.
const SWEEP: &str = "obs_time_wait_sweep";
/// Runs of the sweep per call at most (each looks at one queued socket):
/// 327,680 a second at one call every 50 ms; more wait in the queue.
const SWEEP_RUNS: usize = 16384;

/// What to load and attach.
pub struct Setup<'a> {
    pub offsets: &'a KernelOffsets,
    /// The TIME_WAIT timer's configuration; `None`: TIME_WAIT is polled.
    pub time_wait: Option<&'a TimeWaitConfig>,
    pub filter: &'a FilterConfig,
    /// `-p`, `-P`, `--cgroup` (the cgroup2 directory), for the filter's maps.
    pub pids: &'a [u32],
    pub ports: &'a [u16],
    pub cgroup: Option<&'a std::path::Path>,
    pub ring_bytes: u32,
}

pub struct Attached {
    /// Owns every program, map and link: dropping it detaches everything.
    pub ebpf: Ebpf,
    /// `section/name` of each attached hook.
    pub hooks: Vec<String>,
    pub prog_ids: Vec<u32>,
    names: Vec<&'static str>,
    /// The TIME_WAIT sweep is loaded (the timer programs are attached).
    sweep: bool,
    /// The address of `tw_timer_handler` the timer programs use, or why
    /// they are not attached (the daemon then polls sock_diag).
    pub timer_handler: Result<u64, String>,
}

impl Attached {
    /// Runs the TIME_WAIT sweep (see observer-ebpf's time_wait.rs) until it
    /// has looked at every queued FIN_WAIT2 socket once.
    pub fn sweep_time_wait(&self) -> Result<()> {
        if !self.sweep {
            return Ok(());
        }
        let prog: &RawTracePoint = self
            .ebpf
            .program(SWEEP)
            .context("the sweep program is missing")?
            .try_into()?;
        for run in 0..SWEEP_RUNS {
            // The first argument says a new sweep begins.
            let mut args = RawTracePointRunOptions::new();
            args.args[0] = u64::from(run == 0);
            let r = prog.test_run(args).context("running the TIME_WAIT sweep")?;
            if r.return_value == 0 {
                break;
            }
        }
        Ok(())
    }

    pub fn program_stats(&self) -> Vec<ProgramStats> {
        self.names
            .iter()
            .zip(&self.hooks)
            .zip(&self.prog_ids)
            .filter_map(|((name, hook), id)| {
                let info = self.ebpf.program(name)?.info().ok()?;
                Some(ProgramStats {
                    hook: hook.clone(),
                    id: *id,
                    run_count: info.run_count(),
                    run_time_ns: info.run_time().as_nanos() as u64,
                    recursion_misses: self.recursion_misses_of(name),
                })
            })
            .collect()
    }

    /// Runs of the attached programs the kernel skipped because the same
    /// program was already running on that CPU (an interrupt came inside it)
    /// or, for tracepoints, another BPF program was: each may have been a record.
    pub fn recursion_misses(&self) -> u64 {
        self.names.iter().map(|n| self.recursion_misses_of(n)).sum()
    }

    /// `recursion_misses` of one program, from its fdinfo (0 on kernels
    /// that do not count them, before 5.12).
    fn recursion_misses_of(&self, name: &str) -> u64 {
        let Some(fd) = self.ebpf.program(name).and_then(|p| p.fd().ok()) else {
            return 0;
        };
        use std::os::fd::AsFd;
        let path = format!("/proc/self/fdinfo/{}", fd.as_fd().as_raw_fd());
        std::fs::read_to_string(path)
            .ok()
            .and_then(|text| fdinfo_field(&text, "recursion_misses"))
            .unwrap_or(0)
    }
}

/// A number field (`name:\tvalue`) of an fdinfo file.
fn fdinfo_field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k == name).then(|| v.trim().parse().ok())?
    })
}

/// aya's loader, made ahead of the load: making one parses the kernel's BTF
/// (which `load` then sets aside) and the first load probes the kernel's
/// features, ~20 ms of work that a thread at start-up does beside the rest.
pub struct Prepared(EbpfLoader<'static>);

pub fn prepare() -> Prepared {
    aya::features();
    Prepared(EbpfLoader::new())
}

/// Loads the object (maps and globals); programs are loaded by `load_program`.
fn load(s: &Setup, prepared: Prepared) -> Result<Ebpf> {
    if OBJECT.is_empty() {
        bail!("this binary was built without its eBPF programs: build it with `cargo xtask build`");
    }
    // Before 6.1 the verifier warns (a kernel WARN, with a stack trace, that
    // taints the kernel) when a tracing program uses a map that allocates at
    // run time: there the TIME_WAIT map is preallocated, and smaller.
    let old_kernel = KernelVersion::current().is_ok_and(|v| v < KernelVersion::new(6, 1, 0));
    let patched;
    let object = if old_kernel {
        patched = preallocated(OBJECT, "TW")?;
        &patched[..]
    } else {
        OBJECT
    };
    let mut loader = prepared.0;
    if old_kernel {
        loader.map_max_entries("TW", TIME_WAIT_PREALLOCATED);
    }
    let mut ebpf = loader
        // No CO-RE relocations in our programs: skip parsing the kernel's BTF again.
        .btf(None)
        .override_global(KERNEL_OFFSETS_SYMBOL, s.offsets, true)
        .override_global(
            TIME_WAIT_CONFIG_SYMBOL,
            s.time_wait.unwrap_or(&TimeWaitConfig::OFF),
            true,
        )
        .override_global(FILTER_SYMBOL, s.filter, true)
        .override_global(
            WAKE_EVERY_BYTES_SYMBOL,
            &wake_every_bytes(s.ring_bytes),
            true,
        )
        .override_global(aya_log::LEVEL, &kernel_log_level(), false)
        .map_max_entries("EVENTS", s.ring_bytes)
        .load(object)
        .context("loading the eBPF object into the kernel")?;
    fill_filter_maps(&mut ebpf, s)?;
    Ok(ebpf)
}

/// What a CPU submits between two wakeups of the daemon: a quarter of the
/// ring buffer over all CPUs, so that it is woken well before the ring fills
/// however the load is spread (within 4 KiB .. 256 KiB).
fn wake_every_bytes(ring_bytes: u32) -> u64 {
    let cpus = aya::util::nr_cpus().unwrap_or(1).max(1) as u64;
    (u64::from(ring_bytes) / 4 / cpus).clamp(4 << 10, 256 << 10)
}

pub type KernelLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// aya-log's level for the kernel side's rare paths (`observer-ebpf/src/rare.rs`):
/// what the daemon's own log shows (`-v` info, `-vv` debug); off without `-v`,
/// so that the programs make no log record at all.
fn kernel_log_level() -> u8 {
    use aya_log::Level;
    match log::max_level() {
        log::LevelFilter::Off | log::LevelFilter::Error | log::LevelFilter::Warn => 0,
        log::LevelFilter::Info => Level::Info as u8,
        log::LevelFilter::Debug => Level::Debug as u8,
        log::LevelFilter::Trace => Level::Trace as u8,
    }
}

/// The kernel side's log records, read where `-v` asks for them; `None`
/// otherwise (the programs then write none).
pub fn kernel_logger(ebpf: &mut Ebpf) -> Option<KernelLogger> {
    if kernel_log_level() == 0 {
        return None;
    }
    aya_log::EbpfLogger::init(ebpf)
        .inspect_err(|e| log::warn!("the programs' log cannot be read: {e}"))
        .ok()
}

/// Timewait sockets the kernel map holds where it must be preallocated
/// (about 20 MiB of kernel memory; the kernel's own default cap,
/// `tcp_max_tw_buckets`, is 262,144 per namespace on most hosts).
pub const TIME_WAIT_PREALLOCATED: u32 = 1 << 18;

/// The object with map `name` defined without `BPF_F_NO_PREALLOC`. aya keeps
/// a map's flags as the object says; its definition (`struct bpf_map_def`
/// in the `maps` section: type, key size, value size, max entries, flags, …)
/// is patched in a copy.
fn preallocated(object: &[u8], name: &str) -> Result<Vec<u8>> {
    use object::{Object, ObjectSection, ObjectSymbol};
    const FLAGS_AT: u64 = 16;
    let file = object::File::parse(object).context("parsing the eBPF object")?;
    let sym = file
        .symbols()
        .find(|s| s.name() == Ok(name))
        .with_context(|| format!("no map {name} in the eBPF object"))?;
    let section = file.section_by_index(
        sym.section_index()
            .with_context(|| format!("map {name} has no section"))?,
    )?;
    let (start, _) = section
        .file_range()
        .with_context(|| format!("map {name}'s section has no data"))?;
    let at = usize::try_from(start + sym.address() + FLAGS_AT)?;
    const BPF_F_NO_PREALLOC: u32 = 1;
    let mut out = object.to_vec();
    let flags = out
        .get_mut(at..at + 4)
        .with_context(|| format!("map {name}'s definition is outside the object"))?;
    let old = u32::from_le_bytes(flags.try_into()?);
    flags.copy_from_slice(&(old & !BPF_F_NO_PREALLOC).to_le_bytes());
    Ok(out)
}

fn fill_filter_maps(ebpf: &mut Ebpf, s: &Setup) -> Result<()> {
    let mut pids: HashMap<_, u32, u8> =
        HashMap::try_from(ebpf.map_mut("PIDS").context("no PIDS map")?)?;
    for pid in s.pids {
        pids.insert(pid, 1, 0).context("filling the pid filter")?;
    }
    let mut ports: HashMap<_, u16, u8> =
        HashMap::try_from(ebpf.map_mut("PORTS").context("no PORTS map")?)?;
    for port in s.ports {
        ports
            .insert(port, 1, 0)
            .context("filling the port filter")?;
    }
    if let Some(dir) = s.cgroup {
        let fd = File::open(dir).with_context(|| format!("--cgroup {}", dir.display()))?;
        let mut cg = CgroupArray::try_from(ebpf.map_mut("CGROUP").context("no CGROUP map")?)?;
        cg.set(0, fd.as_raw_fd(), 0)
            .context("filling the cgroup filter")?;
    }
    Ok(())
}

fn load_program(ebpf: &mut Ebpf, name: &str) -> Result<()> {
    let p = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} is missing from the eBPF object"))?;
    load_each(&mut [(name, p)])
}

/// Verifying the programs is most of the start-up: they are loaded on two
/// threads (the kernel verifies programs of one process side by side), each
/// taking the next of `names` when it is done (the bind program, the
/// longest to verify, first).
fn load_all(ebpf: &mut Ebpf, names: &[&str]) -> Result<()> {
    let mut progs: Vec<(&str, &mut aya::programs::Program)> = ebpf
        .programs_mut()
        .filter(|(name, _)| names.contains(name))
        .collect();
    if let Some(missing) = names
        .iter()
        .find(|n| !progs.iter().any(|(have, _)| have == *n))
    {
        bail!("program {missing} is missing from the eBPF object");
    }
    progs.sort_by_key(|(name, _)| names.iter().position(|n| n == name));
    let queue = std::sync::Mutex::new(progs.into_iter());
    let next = || queue.lock().ok()?.next();
    let work = || -> Result<()> {
        while let Some(mut p) = next() {
            load_each(std::slice::from_mut(&mut p))?;
        }
        Ok(())
    };
    std::thread::scope(|scope| {
        let other = scope.spawn(work);
        let here = work();
        other
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("a loader thread panicked")))
            .and(here)
    })
}

fn load_each(progs: &mut [(&str, &mut aya::programs::Program)]) -> Result<()> {
    use aya::programs::Program as P;
    for (name, p) in progs {
        let loaded = match p {
            P::TracePoint(tp) if tp.fd().is_err() => tp.load(),
            P::RawTracePoint(rtp) if rtp.fd().is_err() => rtp.load(),
            _ => Ok(()),
        };
        loaded.with_context(|| format!("loading {name}"))?;
    }
    Ok(())
}

fn attach(ebpf: &mut Ebpf, prog: &Program) -> Result<u32> {
    load_program(ebpf, prog.name)?;
    let p = ebpf.program_mut(prog.name).expect("loaded above");
    let attached = if prog.category == RAW {
        let p: &mut RawTracePoint = p.try_into()?;
        p.attach(prog.event).map(|_| p.info())
    } else {
        let p: &mut TracePoint = p.try_into()?;
        p.attach(prog.category, prog.event).map(|_| p.info())
    };
    let info = attached.with_context(|| format!("attaching {} to {}", prog.name, label(prog)))?;
    Ok(info?.id())
}

/// `section/name`, as observer_start and observer check name a hook:
/// `tracepoint/CATEGORY/EVENT` or `raw_tracepoint/EVENT`.
fn label(p: &Program) -> String {
    if p.category == RAW {
        format!("raw_tracepoint/{}", p.event)
    } else {
        format!("tracepoint/{}/{}", p.category, p.event)
    }
}

/// The programs for this run, in attach order, loaded: the syscall exits
/// from the registers where this kernel can load them, else from the entry.
fn plan(ebpf: &mut Ebpf, s: &Setup, sweep: bool) -> Result<Vec<&'static Program>> {
    let wanted = |p: &&Program| s.filter.events & p.serves != 0;
    let timers: &'static [Program] = if s.time_wait.is_some() {
        &TIMER_PROGRAMS
    } else {
        &[]
    };
    let names = |progs: &[&Program]| progs.iter().map(|p| p.name).collect::<Vec<_>>();
    let rest: Vec<&'static Program> = STATE_PROGRAMS.iter().chain(timers).filter(wanted).collect();
    let mut others = names(&rest);
    if sweep {
        others.push(SWEEP);
    }
    let from_regs: Vec<&'static Program> = FROM_REGS.iter().filter(wanted).collect();
    let mut all = names(&from_regs);
    all.extend(&others);
    let calls = match load_all(ebpf, &all) {
        Ok(()) => from_regs,
        Err(e) => {
            // If the others load, it was the registers: only old kernels.
            load_all(ebpf, &others)?;
            log::info!(
                "syscall arguments from the entry tracepoints: the registers cannot be read here ({e:#})"
            );
            let from_entry: Vec<&'static Program> = FROM_ENTRY.iter().filter(wanted).collect();
            load_all(ebpf, &names(&from_entry))?;
            from_entry
        }
    };
    Ok(calls.into_iter().chain(rest).collect())
}

/// Loads everything and attaches every program this run and this kernel need.
/// `handler` gives the address of `tw_timer_handler` (it is asked for once
/// the programs are verified): without it the timer programs stay detached.
pub fn load_and_attach(
    s: &Setup,
    prepared: Prepared,
    handler: impl FnOnce() -> Result<u64, String>,
) -> Result<Attached> {
    let began = std::time::Instant::now();
    let mut ebpf = load(s, prepared)?;
    log::debug!("startup: object and maps loaded in {:?}", began.elapsed());
    let sweep = s.time_wait.is_some() && s.filter.wants(event::TIME_WAIT);
    let mut hooks = Vec::new();
    let mut prog_ids = Vec::new();
    let mut names = Vec::new();
    let order = plan(&mut ebpf, s, sweep)?;
    log::debug!("startup: programs verified in {:?}", began.elapsed());
    let timer_handler = match s.time_wait {
        Some(_) => handler().and_then(|a| set_tw_handler(&mut ebpf, a).map(|()| a)),
        None => Err("the timer programs are not loaded".into()),
    };
    let sweep = sweep && timer_handler.is_ok();
    let is_timer = |p: &Program| TIMER_PROGRAMS.iter().any(|t| t.name == p.name);
    for prog in order {
        if is_timer(prog) && timer_handler.is_err() {
            continue;
        }
        let id = attach(&mut ebpf, prog)?;
        log::info!("attached {} (prog id {id})", label(prog));
        hooks.push(label(prog));
        prog_ids.push(id);
        names.push(prog.name);
    }
    Ok(Attached {
        ebpf,
        hooks,
        prog_ids,
        names,
        sweep,
        timer_handler,
    })
}

/// Writes the handler's address where the timer programs read it.
fn set_tw_handler(ebpf: &mut Ebpf, address: u64) -> Result<(), String> {
    let map = ebpf
        .map_mut(TW_HANDLER_MAP)
        .ok_or_else(|| format!("no {TW_HANDLER_MAP} map"))?;
    let mut array: aya::maps::Array<_, u64> = map.try_into().map_err(|e| format!("{e}"))?;
    array
        .set(0, address, 0)
        .map_err(|e| format!("writing {TW_HANDLER_MAP}: {e}"))
}

/// One hook tried by `probe`.
pub struct Probed {
    pub label: String,
    pub result: Result<u32>,
    /// For the syscall programs, the call they serve: of its two ways (from
    /// the registers, from the entry) one is enough.
    pub call: Option<u32>,
}

/// Tries every hook on its own and reports each (for `observer check`):
/// both ways of reading syscall arguments, and the timer where configured.
/// All are detached again when this returns.
pub fn probe(s: &Setup) -> Result<Vec<Probed>> {
    let mut ebpf = load(s, prepare())?;
    let timers: &[Program] = if s.time_wait.is_some() {
        &TIMER_PROGRAMS
    } else {
        &[]
    };
    Ok(FROM_REGS
        .iter()
        .chain(&FROM_ENTRY)
        .chain(&STATE_PROGRAMS)
        .chain(timers)
        .map(|prog| Probed {
            label: format!("{} ({})", label(prog), prog.name),
            result: attach(&mut ebpf, prog),
            call: (prog.category == "syscalls").then_some(prog.serves),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_time_wait_map_can_be_made_preallocated() {
        if OBJECT.is_empty() {
            return; // built without eBPF (plain `cargo test`): nothing to patch
        }
        let patched = preallocated(OBJECT, "TW").unwrap();
        let changed: Vec<usize> = (0..OBJECT.len())
            .filter(|&i| OBJECT[i] != patched[i])
            .collect();
        // One bit of one byte: BPF_F_NO_PREALLOC in TW's map_flags.
        assert_eq!(changed.len(), 1, "{changed:?}");
        assert_eq!(OBJECT[changed[0]] ^ patched[changed[0]], 1);
        assert!(preallocated(OBJECT, "NO_SUCH_MAP").is_err());
    }
}
