//! Every TCP state change on the host, from `sock:inet_sock_set_state`.

use aya_ebpf::{
    helpers::generated,
    macros::{map, raw_tracepoint, tracepoint},
    maps::{LruHashMap, PerCpuArray},
    programs::{RawTracePointContext, TracePointContext},
};
use observer_common::{
    LOST_RINGBUF, TcpStateRecord,
    filter::{FilterConfig, event, on},
    task::TaskHeader,
    tcp::{flags, state},
};

use crate::{
    kernel::{sock_netns, sock_reuse},
    maps::{EVENTS, count_lost, time_wait_config, wake_flags},
    task::{count_filtered, current_task, filter, ports_pass, task_passes},
    time_wait::{CLOSERS, FlowKey, note_new_connection},
};

/// When each socket entered its current state, for `prev_state_ms`. LRU: a
/// socket whose CLOSE we never saw cannot pin an entry forever.
#[map]
static SINCE: LruHashMap<u64, u64> = LruHashMap::with_max_entries(131072, 0);

/// Per CPU: the softirq being served, plus one (0: none), from
/// `irq:softirq_entry` .. `softirq_exit`. TCP state changes driven by packets
/// and timers run there, on whatever task was interrupted, so "current" names
/// no process that caused them; and a timer deleted in the timer softirq is
/// one about to run.
#[map]
static IN_SOFTIRQ: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

const TIMER_SOFTIRQ: u32 = 1;

// Raw tracepoints: a classic one is skipped when the softirq runs on the exit
// of an interrupt taken inside another of our programs (see the loader's `RAW`).
#[raw_tracepoint]
pub fn obs_softirq_entry(ctx: RawTracePointContext) -> i32 {
    // `softirq_entry(unsigned int vec_nr)`.
    let vec = ctx.arg::<u64>(0) as u32;
    set_in_softirq(vec.wrapping_add(1));
    0
}

#[raw_tracepoint]
pub fn obs_softirq_exit(_ctx: RawTracePointContext) -> i32 {
    set_in_softirq(0);
    0
}

fn set_in_softirq(v: u32) {
    if let Some(p) = IN_SOFTIRQ.get_ptr_mut(0) {
        // SAFETY: this CPU's value, valid for the run; only the softirq programs write
        // it, and tracepoint programs never nest on one CPU.
        unsafe { *p = v };
    }
}

fn in_softirq() -> bool {
    IN_SOFTIRQ.get(0).is_some_and(|v| *v != 0)
}

/// The timer softirq is running on this CPU (timers expire there).
pub fn in_timer_softirq() -> bool {
    IN_SOFTIRQ.get(0).is_some_and(|v| *v == TIMER_SOFTIRQ + 1)
}

// Offsets in the tracepoint's record (events/sock/inet_sock_set_state/format).
const SKADDR: usize = 8;
const OLDSTATE: usize = 16;
const NEWSTATE: usize = 20;
const SPORT: usize = 24;
const DPORT: usize = 26;
const FAMILY: usize = 28;
const PROTOCOL: usize = 30;
const SADDR: usize = 32;
const DADDR: usize = 36;
const SADDR_V6: usize = 40;
const DADDR_V6: usize = 56;

const IPPROTO_TCP: u16 = 6;
const AF_INET: u16 = 2;

#[tracepoint]
pub fn obs_inet_sock_set_state(ctx: TracePointContext) -> u32 {
    let _ = try_set_state(&ctx);
    0
}

fn try_set_state(ctx: &TracePointContext) -> Result<(), i64> {
    // SAFETY: read_at is bpf_probe_read_kernel (a bad address is an error, never a
    // fault); the offsets are this record's (stable since 4.16): 30 is `__u16 protocol`.
    if unsafe { ctx.read_at::<u16>(PROTOCOL)? } != IPPROTO_TCP {
        return Ok(());
    }
    let f = filter();
    // SAFETY: bpf_ktime_get_ns takes no arguments; nothing to uphold.
    let now = unsafe { generated::bpf_ktime_get_ns() };
    let mut r = TcpStateRecord::zeroed();
    r.header.ktime_ns = now;
    // SAFETY: as above; offset 8 is `const void *skaddr`, read as a u64.
    r.skaddr = unsafe { ctx.read_at(SKADDR)? };
    // SAFETY: as above; offset 16 is `int oldstate`.
    r.oldstate = unsafe { ctx.read_at::<i32>(OLDSTATE)? } as u8;
    // SAFETY: as above; offset 20 is `int newstate`.
    r.newstate = unsafe { ctx.read_at::<i32>(NEWSTATE)? } as u8;
    // SAFETY: as above; offset 24 is `__u16 sport`.
    r.sport = unsafe { ctx.read_at(SPORT)? };
    // SAFETY: as above; offset 26 is `__u16 dport`.
    r.dport = unsafe { ctx.read_at(DPORT)? };
    // SAFETY: as above; offset 28 is `__u16 family`.
    r.family = unsafe { ctx.read_at(FAMILY)? };
    if r.family == AF_INET {
        // SAFETY: as above; offset 32 is `__u8 saddr[4]`.
        r.saddr[..4].copy_from_slice(&unsafe { ctx.read_at::<[u8; 4]>(SADDR)? });
        // SAFETY: as above; offset 36 is `__u8 daddr[4]`.
        r.daddr[..4].copy_from_slice(&unsafe { ctx.read_at::<[u8; 4]>(DADDR)? });
    } else {
        // SAFETY: as above; offset 40 is `__u8 saddr_v6[16]`.
        r.saddr = unsafe { ctx.read_at(SADDR_V6)? };
        // SAFETY: as above; offset 56 is `__u8 daddr_v6[16]`.
        r.daddr = unsafe { ctx.read_at(DADDR_V6)? };
    }
    if !in_softirq() {
        r.task = current_task();
        r.flags |= flags::PROCESS_CONTEXT;
    }
    r.netns = sock_netns(r.skaddr);
    // The TIME_WAIT programs need these changes whatever is written.
    note_closer(&r);
    if !f.wants(event::TCP_STATE) {
        return Ok(());
    }
    // SAFETY: LRU entries are preallocated: another CPU may evict and reuse this one,
    // but the u64 is read once, so at worst the duration is wrong.
    if let Some(since) = unsafe { SINCE.get(r.skaddr) } {
        r.prev_state_ns = now.saturating_sub(*since);
        r.flags |= flags::PREV_KNOWN;
    }
    if r.newstate == state::CLOSE {
        let _ = SINCE.remove(r.skaddr);
    } else {
        let _ = SINCE.insert(r.skaddr, now, 0);
    }
    if !state_passes(&f, &r) {
        count_filtered();
        return Ok(());
    }
    if let Some((reuseaddr, reuseport)) = sock_reuse(r.skaddr) {
        r.flags |= flags::REUSE_KNOWN
            | if reuseaddr { flags::REUSEADDR } else { 0 }
            | if reuseport { flags::REUSEPORT } else { 0 };
    }
    if EVENTS
        .output::<TcpStateRecord>(&r, wake_flags(size_of::<TcpStateRecord>(), false, 0))
        .is_err()
    {
        count_lost(LOST_RINGBUF);
    }
    Ok(())
}

/// The filters on a state change: never a failure, no cgroup; the process
/// filters only where a process caused it; the socket's own namespace.
fn state_passes(f: &FilterConfig, r: &TcpStateRecord) -> bool {
    if f.flags == 0 {
        return true;
    }
    if f.has(on::ERRORS_ONLY) || f.has(on::CGROUP) {
        return false;
    }
    if f.has(on::NETNS) && r.netns != f.netns {
        return false;
    }
    let process = r.flags & flags::PROCESS_CONTEXT != 0;
    if (f.has(on::PIDS) || f.has(on::UID) || f.has(on::COMM)) && !process {
        return false;
    }
    // The namespace was compared above, against the socket's.
    let task = TaskHeader {
        netns: f.netns,
        ..r.task
    };
    task_passes(f, &task) && ports_pass(f, [r.sport, r.dport])
}

/// Who closed a connection that may end in TIME_WAIT: kept from its
/// FIN_WAIT1 (in process context) until its timewait socket enters, or it
/// closes some other way.
fn note_closer(r: &TcpStateRecord) {
    if time_wait_config().tw_timer_handler == 0 {
        return;
    }
    let key = FlowKey {
        netns: r.netns,
        family: r.family,
        sport: r.sport,
        dport: r.dport,
        _pad: 0,
        saddr: r.saddr,
        daddr: r.daddr,
    };
    match r.newstate {
        state::FIN_WAIT1 if r.flags & flags::PROCESS_CONTEXT != 0 => {
            let _ = CLOSERS.insert(&key, &r.task, 0);
        }
        // FIN_WAIT2/CLOSING -> CLOSE comes after the timewait socket entered
        // (which took the closer); any other way to CLOSE ends the story.
        state::CLOSE if !matches!(r.oldstate, state::FIN_WAIT2 | state::CLOSING) => {
            let _ = CLOSERS.remove(&key);
        }
        state::SYN_SENT | state::SYN_RECV | state::ESTABLISHED => {
            note_new_connection(&key, r.header.ktime_ns)
        }
        _ => {}
    }
}
