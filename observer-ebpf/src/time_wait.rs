//! TIME_WAIT from the kernel's own timer. Every timewait socket arms
//! `tw->tw_timer`, whose handler is `tw_timer_handler`:
//!
//! - `timer:timer_start`: armed. A new socket in TIME_WAIT (or one moving
//!   there from FIN_WAIT2) is an `ENTER`; a FIN_WAIT2 one is kept until it moves.
//! - `timer:timer_expire_entry`: ran out, the socket dies: `EXPIRED`.
//! - `timer:timer_cancel`: deleted. Three cases: just before every expiry
//!   (in the timer softirq: `EXPIRED` follows, nothing to say), a re-arm
//!   (`mod_timer`: the start follows at once on this CPU) and a real end
//!   (killed or reused: nothing follows). The program says `CANCELLED` and
//!   keeps the socket's state in a per-CPU slot; a start of the same socket
//!   on this CPU right after takes it back and says `REARMED`.
//!
//! - A socket born in FIN_WAIT2 may move to TIME_WAIT without a timer event
//!   (the new expiry falls in the same wheel bucket: the kernel only updates
//!   `expires`). Such sockets wait in a queue that `obs_time_wait_sweep`,
//!   run by the daemon every few tens of ms, checks; and every event of a
//!   socket first catches up on that move. The enter's time then comes from
//!   the new `expires` (60 s after the move).
//!
//! Per socket, the kernel keeps what the record needs later (`TW`: when it
//! entered, its cookie), and who closed each connection (`CLOSERS`, filled by
//! the TCP state program at FIN_WAIT1), so the daemon keeps nothing per socket.

use aya_ebpf::{
    helpers::generated,
    macros::{map, raw_tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, Queue},
    programs::RawTracePointContext,
};
use observer_common::{
    Kind, LOST_TIME_WAIT_MAP, TimeWaitRecord,
    filter::{event, on},
    task::TaskHeader,
    tcp::state,
    time_wait::{TimeWaitConfig, flags, op},
};

use crate::{
    kernel::{FlowKey, read, sock_cookie, sock_flow, sock_reuse},
    maps::{count_lost, reserve_zeroed, time_wait_config, tw_handler, wake_flags},
    task::{count_filtered, filter, ports_pass},
    tcp::in_timer_softirq,
};

/// The processes that closed connections on their way to TIME_WAIT (moved
/// them to FIN_WAIT1). LRU: one that never gets there (reset, orphan limits)
/// cannot pin an entry.
#[map]
pub static CLOSERS: LruHashMap<FlowKey, TaskHeader> = LruHashMap::with_max_entries(65536, 0);

/// Timewait sockets deleted early, by connection, for a moment: a new
/// connection on the same 4-tuple right after makes that end a reuse.
#[map]
pub static CANCELLED: LruHashMap<FlowKey, u64> = LruHashMap::with_max_entries(65536, 0);

/// A timewait socket the programs have seen armed.
#[repr(C)]
#[derive(Clone, Copy)]
struct TwState {
    enter_ns: u64,
    cookie: u64,
    /// `tw_substate` at the last arm: FIN_WAIT2 until it enters TIME_WAIT.
    substate: u8,
    /// It predates the observer (seen first at a re-arm or an end).
    preexisting: u8,
    _pad: [u8; 6],
}

const BPF_F_NO_PREALLOC: u32 = 1;

/// Live timewait sockets by address. Not preallocated: memory follows the
/// host's count; when full, an insert fails and is counted (`time_wait_map`).
#[map]
static TW: HashMap<u64, TwState> = HashMap::with_max_entries(1 << 20, BPF_F_NO_PREALLOC);

/// The last cancel of a known timewait socket on this CPU, for a start that
/// follows it at once (a re-arm).
#[repr(C)]
#[derive(Clone, Copy)]
struct Slot {
    tw: u64,
    ktime: u64,
    /// The connection's sequence numbers: a socket killed at this address and
    /// a new one made there at once (slab memory is reused right away) differ.
    seqs: u64,
    state: TwState,
}

/// `tw_rcv_nxt` and `tw_snd_nxt` of a timewait socket, together.
#[inline(always)]
fn seqs(c: &TimeWaitConfig, tw: u64) -> u64 {
    let rcv: u32 = read(tw, c.tw_rcv_nxt).unwrap_or(0);
    let snd: u32 = read(tw, c.tw_snd_nxt).unwrap_or(0);
    u64::from(rcv) << 32 | u64::from(snd)
}

#[map]
static LAST_CANCEL: PerCpuArray<Slot> = PerCpuArray::with_max_entries(1, 0);

/// Timewait sockets born in FIN_WAIT2, for the sweep; and those it found
/// still there, for the next sweep.
#[map]
static FW2_NEW: Queue<u64> = Queue::with_max_entries(1 << 16, 0);
#[map]
static FW2_WAIT: Queue<u64> = Queue::with_max_entries(1 << 16, 0);
/// The sweep's counts (only the sweep uses them, one run at a time):
/// `[WAITING]` how many `FW2_WAIT` holds, `[LEFT]` how many of them this
/// sweep has still to look at (those it puts back wait for the next one).
#[map]
static FW2_COUNTS: Array<u64> = Array::with_max_entries(2, 0);
const WAITING: u32 = 0;
const LEFT: u32 = 1;

/// The kernel's jiffies now (`bpf_jiffies64`): turns a timer's `expires`
/// into a ktime, exactly, at any moment.
#[inline(always)]
fn jiffies() -> u64 {
    // SAFETY: bpf_jiffies64 takes no arguments; nothing to uphold.
    unsafe { generated::bpf_jiffies64() }
}

/// A start more than this long after a cancel is not its re-arm (the memory
/// of a killed timewait socket can hold a new one at once: slab RCU).
const REARM_WITHIN_NS: u64 = 200_000;

fn now() -> u64 {
    // SAFETY: bpf_ktime_get_ns takes no arguments; nothing to uphold.
    unsafe { generated::bpf_ktime_get_ns() }
}

/// The timer a raw timer tracepoint is about (`TP_PROTO`'s first argument on
/// every kernel), and the timewait socket behind it if it is one's.
#[inline(always)]
fn tw_of_timer(ctx: &RawTracePointContext, c: &TimeWaitConfig) -> (u64, Option<u64>) {
    let timer = ctx.arg::<u64>(0);
    let handler = tw_handler();
    if handler == 0 {
        return (timer, None);
    }
    let function: u64 = read(timer, c.timer_function).unwrap_or(0);
    let tw = (function == handler && timer > c.tw_timer as u64).then(|| timer - c.tw_timer as u64);
    (timer, tw)
}

#[raw_tracepoint]
pub fn obs_timer_start(ctx: RawTracePointContext) -> i32 {
    let _ = try_start(&ctx);
    0
}

fn try_start(ctx: &RawTracePointContext) -> Result<(), i64> {
    let c = time_wait_config();
    // The function filter first: this runs for every timer armed on the host.
    let (timer, Some(tw)) = tw_of_timer(ctx, &c) else {
        return Ok(());
    };
    let substate: u8 = read(tw, c.tw_substate).ok_or(0i64)?;
    let expires: u64 = read(timer, c.timer_expires).ok_or(0i64)?;
    let t = now();
    let timeout_jiffies = expires.wrapping_sub(jiffies());
    // A socket already in `TW` without a cancel just before is a stale entry
    // (its end was lost) under a new socket: it starts afresh.
    let prev = take_slot(tw, t, seqs(&c, tw));
    let mut st = TwState {
        enter_ns: t,
        cookie: sock_cookie(tw),
        substate,
        preexisting: 0,
        _pad: [0; 6],
    };
    let entering = match prev {
        Some(p) if p.substate == state::TIME_WAIT => {
            st = p; // a re-arm in TIME_WAIT: nothing changes but the timer
            emit(
                tw,
                &st,
                &Event {
                    op: op::REARMED,
                    at_ns: t,
                    timeout_jiffies: 0,
                    flags: 0,
                },
            );
            false
        }
        Some(p) => {
            st.preexisting = p.preexisting;
            substate == state::TIME_WAIT // FIN_WAIT2 -> TIME_WAIT
        }
        None => substate == state::TIME_WAIT,
    };
    if TW.insert(&tw, &st, 0).is_err() {
        count_lost(LOST_TIME_WAIT_MAP);
    }
    if entering {
        emit(
            tw,
            &st,
            &Event {
                op: op::ENTER,
                at_ns: t,
                timeout_jiffies,
                flags: if prev.is_some() { flags::REARM } else { 0 },
            },
        );
    } else if st.substate != state::TIME_WAIT && FW2_NEW.push(tw, 0).is_err() {
        count_lost(LOST_TIME_WAIT_MAP);
    }
    Ok(())
}

/// A socket known in FIN_WAIT2 that is now in TIME_WAIT without a timer
/// event: say it entered, when its `expires` says, and remember it did.
#[inline(always)]
fn catch_up(c: &TimeWaitConfig, tw: u64, st: &mut TwState) {
    if st.substate == state::TIME_WAIT || read::<u8>(tw, c.tw_substate) != Some(state::TIME_WAIT) {
        return;
    }
    let expires: u64 = read(tw + c.tw_timer as u64, c.timer_expires).unwrap_or(0);
    let t = now();
    // `expires` tells the move to the jiffy (4 ms at HZ=250), floored; the
    // move cannot come before the socket's birth, known to the nanosecond
    // (a new socket on a reused 4-tuple would else seem to enter before
    // the old one's end).
    let entered = enter_time(c, expires, t).max(st.enter_ns);
    st.substate = state::TIME_WAIT;
    st.enter_ns = entered;
    emit(
        tw,
        st,
        &Event {
            op: op::ENTER,
            at_ns: entered,
            timeout_jiffies: c.timewait_len_jiffies,
            flags: 0,
        },
    );
}

/// When a TIME_WAIT timer that runs out at `expires` (jiffies) was armed,
/// as a ktime no later than `t` (now): it was armed `TCP_TIMEWAIT_LEN` before.
#[inline(always)]
fn enter_time(c: &TimeWaitConfig, expires: u64, t: u64) -> u64 {
    let armed = expires.wrapping_sub(c.timewait_len_jiffies);
    let ago = jiffies().wrapping_sub(armed) as i64;
    if ago <= 0 {
        return t;
    }
    // Bounded first, no 128-bit product: a catch-up at the expiry itself comes
    // TCP_TIMEWAIT_LEN after the arm plus the wheel's lateness (an eighth, or
    // much more on a loaded machine), so the bound is well above both.
    let ago = (ago as u64).min(4 * c.timewait_len_jiffies);
    t.saturating_sub(ago.wrapping_mul(c.ns_per_jiffy))
}

/// Run by the daemon (BPF_PROG_TEST_RUN), never attached, once per queued
/// socket: a FIN_WAIT2-born socket that moved to TIME_WAIT enters, one still
/// in FIN_WAIT2 waits for the next sweep. The daemon's first run of a sweep
/// passes 1 as the first argument. Returns 1 while more may be queued.
///
/// One socket per run, no loop: the verifier walks every copy of a loop's
/// body, and its work grew about fourfold with each (58 ms for four a run,
/// 6 ms for one, on 6.18: most of the daemon's start).
#[raw_tracepoint]
pub fn obs_time_wait_sweep(ctx: RawTracePointContext) -> i32 {
    let c = time_wait_config();
    if tw_handler() == 0 {
        return 0;
    }
    let (Some(waiting), Some(left)) = (
        FW2_COUNTS.get_ptr_mut(WAITING),
        FW2_COUNTS.get_ptr_mut(LEFT),
    ) else {
        return 0;
    };
    // SAFETY: array values, valid while the map lives; only this program uses
    // them, and the daemon runs it one call at a time.
    let (waiting, left) = unsafe { (&mut *waiting, &mut *left) };
    if ctx.arg::<u64>(0) == 1 {
        *left = *waiting; // a new sweep
    }
    // Those that waited first, then the newly born.
    let from_waiting = *left > 0;
    let next = if from_waiting {
        *left -= 1;
        *waiting = waiting.saturating_sub(1);
        FW2_WAIT.pop()
    } else {
        FW2_NEW.pop()
    };
    let Ok(Some(tw)) = next else {
        // Nothing new; or a count that was wrong (it cannot be): start afresh.
        *left = 0;
        return i32::from(from_waiting);
    };
    // SAFETY: plain data copied out at once; an update or removal on another CPU
    // meanwhile can only make the copy stale or mixed, never fault.
    let Some(mut st) = (unsafe { TW.get(&tw) }).copied() else {
        return 1; // gone: expired or killed while in FIN_WAIT2
    };
    catch_up(&c, tw, &mut st);
    if st.substate == state::TIME_WAIT {
        let _ = TW.insert(&tw, &st, 0);
    } else if FW2_WAIT.push(tw, 0).is_ok() {
        *waiting += 1;
    } else {
        count_lost(LOST_TIME_WAIT_MAP);
    }
    1
}

/// The state a cancel of `tw` on this CPU left, if that cancel was just now.
#[inline(always)]
fn take_slot(tw: u64, t: u64, seqs: u64) -> Option<TwState> {
    let slot = LAST_CANCEL.get_ptr_mut(0)?;
    // SAFETY: this CPU's value, valid for the run; only the timer tracepoint programs
    // use it, and those never nest on one CPU, so this `&mut` is exclusive.
    let s = unsafe { &mut *slot };
    let hit = s.tw == tw && s.seqs == seqs && t.wrapping_sub(s.ktime) < REARM_WITHIN_NS;
    s.tw = 0;
    hit.then_some(s.state)
}

#[raw_tracepoint]
pub fn obs_timer_cancel(ctx: RawTracePointContext) -> i32 {
    let _ = try_cancel(&ctx);
    0
}

fn try_cancel(ctx: &RawTracePointContext) -> Result<(), i64> {
    let c = time_wait_config();
    let (_, Some(tw)) = tw_of_timer(ctx, &c) else {
        return Ok(());
    };
    if in_timer_softirq() {
        return Ok(()); // an expiry: its expire_entry follows and says it
    }
    // SAFETY: plain data copied out at once; an update or removal on another CPU
    // meanwhile can only make the copy stale or mixed, never fault.
    let known = unsafe { TW.get(&tw) }.copied();
    let _ = TW.remove(&tw);
    let substate: u8 = read(tw, c.tw_substate).unwrap_or(0);
    let mut st = known.unwrap_or(TwState {
        enter_ns: 0,
        cookie: sock_cookie(tw),
        substate,
        preexisting: 1,
        _pad: [0; 6],
    });
    let t = now();
    // In FIN_WAIT2 when last seen, in TIME_WAIT now: either this cancel is the
    // re-arm of that very move (a start follows, and says ENTER), or the move
    // happened unseen and this is the end. The daemon tells which.
    let enter_pending = st.substate != state::TIME_WAIT && substate == state::TIME_WAIT;
    if let Some(slot) = LAST_CANCEL.get_ptr_mut(0) {
        // SAFETY: as in `take_slot`: this CPU's value, which no other program writes
        // meanwhile.
        unsafe {
            *slot = Slot {
                tw,
                ktime: t,
                seqs: seqs(&c, tw),
                state: st,
            }
        };
    }
    if enter_pending {
        let expires: u64 = read(tw + c.tw_timer as u64, c.timer_expires).unwrap_or(0);
        st.enter_ns = enter_time(&c, expires, t).max(st.enter_ns);
        emit(
            tw,
            &st,
            &Event {
                op: op::CANCELLED,
                at_ns: t,
                timeout_jiffies: c.timewait_len_jiffies,
                flags: flags::ENTER_PENDING,
            },
        );
    } else if st.substate == state::TIME_WAIT {
        emit(
            tw,
            &st,
            &Event {
                op: op::CANCELLED,
                at_ns: t,
                timeout_jiffies: 0,
                flags: 0,
            },
        );
    }
    Ok(())
}

#[raw_tracepoint]
pub fn obs_timer_expire_entry(ctx: RawTracePointContext) -> i32 {
    let _ = try_expire(&ctx);
    0
}

fn try_expire(ctx: &RawTracePointContext) -> Result<(), i64> {
    let c = time_wait_config();
    let (_, Some(tw)) = tw_of_timer(ctx, &c) else {
        return Ok(());
    };
    // SAFETY: plain data copied out at once; an update or removal on another CPU
    // meanwhile can only make the copy stale or mixed, never fault.
    let known = unsafe { TW.get(&tw) }.copied();
    let _ = TW.remove(&tw);
    let substate: u8 = read(tw, c.tw_substate).unwrap_or(0);
    let mut st = known.unwrap_or(TwState {
        enter_ns: 0,
        cookie: sock_cookie(tw),
        substate,
        preexisting: 1,
        _pad: [0; 6],
    });
    catch_up(&c, tw, &mut st);
    if st.substate != state::TIME_WAIT {
        return Ok(()); // a FIN_WAIT2 timewait socket never was in TIME_WAIT
    }
    emit(
        tw,
        &st,
        &Event {
            op: op::EXPIRED,
            at_ns: now(),
            timeout_jiffies: 0,
            flags: 0,
        },
    );
    Ok(())
}

/// One record about `tw`, read from the socket itself (it is alive in all
/// three tracepoints).
/// What a record says beyond the socket (BPF functions take five arguments at most).
struct Event {
    op: u8,
    at_ns: u64,
    timeout_jiffies: u64,
    flags: u16,
}

fn emit(tw: u64, st: &TwState, e: &Event) {
    let Some(key) = sock_flow(tw) else {
        return;
    };
    let f = filter();
    let netns = key.netns;
    if !f.wants(event::TIME_WAIT)
        || (f.has(on::NETNS) && netns != f.netns)
        || !ports_pass(&f, [key.sport, key.dport])
    {
        // Its closer will not be asked for: let it go.
        if e.op == op::ENTER || e.flags & flags::ENTER_PENDING != 0 {
            let _ = CLOSERS.remove(&key);
        }
        count_filtered();
        return;
    }
    let Some(mut slot) = reserve_zeroed::<TimeWaitRecord>(Kind::TimeWait) else {
        return;
    };
    // SAFETY: reserve_zeroed zeroed all of it, and an all-zero `TimeWaitRecord`
    // (integers and byte arrays only) is valid.
    let r = unsafe { slot.assume_init_mut() };
    r.header.ktime_ns = e.at_ns;
    r.tw = tw;
    r.op = e.op;
    r.substate = st.substate;
    r.cookie = st.cookie;
    r.timeout_jiffies = e.timeout_jiffies;
    r.flags = e.flags;
    r.netns = netns;
    r.family = key.family;
    r.sport = key.sport;
    r.dport = key.dport;
    r.saddr = key.saddr;
    r.daddr = key.daddr;
    if st.preexisting != 0 {
        r.flags |= flags::PREEXISTING;
    } else if st.enter_ns != 0 {
        r.enter_ns = st.enter_ns;
        r.flags |= flags::ENTER_KNOWN;
    }
    if let Some((reuseaddr, reuseport)) = sock_reuse(tw) {
        r.flags |= flags::REUSE_KNOWN
            | if reuseaddr { flags::REUSEADDR } else { 0 }
            | if reuseport { flags::REUSEPORT } else { 0 };
    }
    if e.op == op::CANCELLED {
        let _ = CANCELLED.insert(&key, &tw, 0);
    } else if e.op == op::REARMED || e.flags & flags::REARM != 0 {
        // That cancel was a re-arm, no end: its entry goes, so that the map
        // holds only the ends that wait for a reuse (every connection that
        // moves FIN_WAIT2 -> TIME_WAIT re-arms; left there, those entries
        // would push out, LRU, the one a reuse needs a moment later).
        let _ = CANCELLED.remove(&key);
    }
    if e.op == op::ENTER || e.flags & flags::ENTER_PENDING != 0 {
        if let Some(c) = CLOSERS.get_ptr(&key) {
            // SAFETY: an LRU value stays valid memory for the run, though another CPU may
            // reuse it; its plain fields are copied out at once: at worst they are wrong.
            r.closer = unsafe { *c };
            r.flags |= flags::CLOSER;
            let _ = CLOSERS.remove(&key);
        }
    }
    slot.submit(wake_flags(size_of::<TimeWaitRecord>(), false, 0));
}

/// A connection reaching ESTABLISHED on the 4-tuple of
/// a timewait socket deleted just before: that socket was reused.
pub fn note_new_connection(key: &FlowKey, t: u64) {
    // SAFETY: an LRU value, copied out at once; another CPU reusing the entry can at
    // worst give a wrong u64.
    let Some(tw) = (unsafe { CANCELLED.get(key) }).copied() else {
        return;
    };
    let _ = CANCELLED.remove(key);
    let Some(mut slot) = reserve_zeroed::<TimeWaitRecord>(Kind::TimeWait) else {
        return;
    };
    // SAFETY: as in `emit`: zeroed by reserve_zeroed, and all-zero is a valid record.
    let r = unsafe { slot.assume_init_mut() };
    r.header.ktime_ns = t;
    r.tw = tw;
    r.op = op::REUSED;
    r.netns = key.netns;
    r.family = key.family;
    r.sport = key.sport;
    r.dport = key.dport;
    r.saddr = key.saddr;
    r.daddr = key.daddr;
    slot.submit(wake_flags(size_of::<TimeWaitRecord>(), false, 0));
}
