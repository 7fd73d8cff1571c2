//! Every TCP state change on the host, from `sock:inet_sock_set_state`.

use aya_ebpf::{
    helpers::generated,
    macros::{map, raw_tracepoint, tracepoint},
    maps::{LruHashMap, PerCpuArray},
    programs::{RawTracePointContext, TracePointContext},
};
use observer_common::{
    Kind, TcpStateRecord,
    filter::{FilterConfig, event, on},
    task::TaskHeader,
    tcp::{flags, state},
};

use crate::{
    kernel::{FlowKey, sock_netns, sock_reuse},
    maps::{reserve_zeroed, tw_handler, wake_flags},
    task::{count_filtered, current_task, filter, ports_pass, task_passes},
    time_wait::{CLOSERS, note_new_connection},
    tp::field,
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
    // SAFETY (each `field` below): the offsets and types are this record's
    // (events/sock/inet_sock_set_state/format, stable since 4.16), each aligned.
    let (protocol, oldstate, newstate) = unsafe {
        (
            field::<u16>(ctx, PROTOCOL),
            field::<i32>(ctx, OLDSTATE) as u8,
            field::<i32>(ctx, NEWSTATE) as u8,
        )
    };
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    let f = filter();
    let wanted = f.wants(event::TCP_STATE);
    // Most changes of a connection matter only to the stream: without it
    // (`--events time_wait`) they end here, before anything is read.
    if !wanted && !closer_cares(oldstate, newstate) {
        return Ok(());
    }
    // SAFETY: bpf_ktime_get_ns takes no arguments; nothing to uphold.
    let now = unsafe { generated::bpf_ktime_get_ns() };
    // SAFETY: see above.
    let skaddr: u64 = unsafe { field(ctx, SKADDR) };
    // The connection, read once into the key the TIME_WAIT programs use too.
    let mut flow = FlowKey {
        netns: sock_netns(skaddr),
        // SAFETY: see above.
        family: unsafe { field(ctx, FAMILY) },
        // SAFETY: see above.
        sport: unsafe { field(ctx, SPORT) },
        // SAFETY: see above.
        dport: unsafe { field(ctx, DPORT) },
        _pad: 0,
        saddr: [0; 16],
        daddr: [0; 16],
    };
    // SAFETY (the four reads): see above; the address arrays sit at offsets
    // aligned to the width read.
    if flow.family == AF_INET {
        flow.saddr[..4].copy_from_slice(&unsafe { field::<u32>(ctx, SADDR) }.to_ne_bytes());
        flow.daddr[..4].copy_from_slice(&unsafe { field::<u32>(ctx, DADDR) }.to_ne_bytes());
    } else {
        flow.saddr = unsafe { v6(ctx, SADDR_V6) };
        flow.daddr = unsafe { v6(ctx, DADDR_V6) };
    }
    let process = !in_softirq();
    // The TIME_WAIT programs need these changes whatever is written.
    note_closer(&flow, oldstate, newstate, process, now);
    if !wanted {
        return Ok(());
    }
    // SAFETY: LRU entries are preallocated: another CPU may evict and reuse this one,
    // but the u64 is read once, so at worst the duration is wrong.
    let prev = unsafe { SINCE.get(skaddr) }.map(|since| now.saturating_sub(*since));
    if newstate == state::CLOSE {
        let _ = SINCE.remove(skaddr);
    } else {
        let _ = SINCE.insert(skaddr, now, 0);
    }
    if !state_passes(&f, &flow, process) {
        count_filtered();
        return Ok(());
    }
    // Filled where it lies in the ring buffer: on the stack, the record and
    // the key would take more than 6.1's 512 bytes for the chain of calls.
    let Some(mut slot) = reserve_zeroed::<TcpStateRecord>(Kind::TcpState) else {
        return Ok(());
    };
    // SAFETY: reserve_zeroed zeroed all of it, and an all-zero `TcpStateRecord`
    // (integers and byte arrays only) is valid.
    let r = unsafe { slot.assume_init_mut() };
    r.header.ktime_ns = now;
    r.skaddr = skaddr;
    r.oldstate = oldstate;
    r.newstate = newstate;
    r.netns = flow.netns;
    r.family = flow.family;
    r.sport = flow.sport;
    r.dport = flow.dport;
    r.saddr = flow.saddr;
    r.daddr = flow.daddr;
    if process {
        r.task = current_task();
        r.flags |= flags::PROCESS_CONTEXT;
    }
    if let Some(ns) = prev {
        r.prev_state_ns = ns;
        r.flags |= flags::PREV_KNOWN;
    }
    if let Some((reuseaddr, reuseport)) = sock_reuse(skaddr) {
        r.flags |= flags::REUSE_KNOWN
            | if reuseaddr { flags::REUSEADDR } else { 0 }
            | if reuseport { flags::REUSEPORT } else { 0 };
    }
    slot.submit(wake_flags(size_of::<TcpStateRecord>(), false, 0));
    Ok(())
}

/// The filters on a state change: never a failure, no cgroup; the process
/// filters only where a process caused it; the socket's own namespace.
fn state_passes(f: &FilterConfig, flow: &FlowKey, process: bool) -> bool {
    if f.flags == 0 {
        return true;
    }
    if f.has(on::ERRORS_ONLY) || f.has(on::CGROUP) {
        return false;
    }
    if f.has(on::NETNS) && flow.netns != f.netns {
        return false;
    }
    if f.has(on::PIDS) || f.has(on::UID) || f.has(on::COMM) {
        if !process {
            return false;
        }
        // The namespace was compared above, against the socket's.
        let task = TaskHeader {
            netns: f.netns,
            ..current_task()
        };
        if !task_passes(f, &task) {
            return false;
        }
    }
    ports_pass(f, [flow.sport, flow.dport])
}

/// The changes `note_closer` acts on.
fn closer_cares(oldstate: u8, newstate: u8) -> bool {
    match newstate {
        state::FIN_WAIT1 | state::ESTABLISHED => true,
        state::CLOSE => oldstate == state::FIN_WAIT1,
        _ => false,
    }
}

/// An IPv6 address of the record, as two aligned 8-byte loads.
///
/// # Safety
/// As for `field`: `off` is a 16-byte address field, 8-byte aligned.
#[inline(always)]
unsafe fn v6(ctx: &TracePointContext, off: usize) -> [u8; 16] {
    // SAFETY: as the caller promises.
    let (hi, lo) = unsafe { (field::<u64>(ctx, off), field::<u64>(ctx, off + 8)) };
    let mut a = [0u8; 16];
    a[..8].copy_from_slice(&hi.to_ne_bytes());
    a[8..].copy_from_slice(&lo.to_ne_bytes());
    a
}

/// Who closed a connection that may end in TIME_WAIT: kept from its
/// FIN_WAIT1 (in process context) until its timewait socket enters, or it
/// closes some other way.
fn note_closer(flow: &FlowKey, oldstate: u8, newstate: u8, process: bool, now: u64) {
    if tw_handler() == 0 {
        return;
    }
    match newstate {
        state::FIN_WAIT1 if process => {
            let _ = CLOSERS.insert(flow, &current_task(), 0);
        }
        // Only FIN_WAIT1 -> CLOSE (a reset, an abort) ends a noted closer
        // unused: FIN_WAIT2/CLOSING -> CLOSE come after the timewait socket
        // entered (which took it), and no other state had one.
        state::CLOSE if oldstate == state::FIN_WAIT1 => {
            let _ = CLOSERS.remove(flow);
        }
        // A reuse deletes the timewait socket before ESTABLISHED on both
        // ends, and after the client's SYN_SENT (`tcp_v4_connect` sets the
        // state, then hashes the connection, which takes the 4-tuple).
        state::ESTABLISHED => note_new_connection(flow, now),
        _ => {}
    }
}
