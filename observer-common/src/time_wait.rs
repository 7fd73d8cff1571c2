//! The TIME_WAIT lifecycle from the kernel's own timer: every timewait socket
//! arms a timer whose handler is `tw_timer_handler`; the `timer:timer_start`,
//! `timer_cancel` and `timer_expire_entry` tracepoints see it armed, deleted
//! early and run out. One record per transition.
//!
//! One transition has no event of its own: a timewait socket born in
//! FIN_WAIT2 whose peer's FIN moves it to TIME_WAIT re-arms its timer, and
//! when the new expiry falls in the same timer-wheel bucket the kernel only
//! updates `expires`. Such sockets are checked by a sweep program the daemon
//! runs every few tens of ms; the enter's time is taken from the new `expires`.

/// What happened to the timewait socket ([`TimeWaitRecord::op`]).
pub mod op {
    /// It entered TIME_WAIT: born in it, or moved there from FIN_WAIT2.
    pub const ENTER: u8 = 1;
    /// Its timer ran out: the socket is gone.
    pub const EXPIRED: u8 = 2;
    /// Its timer was deleted early: killed (an RST, its namespace went) or
    /// reused (a new connection took the 4-tuple); the daemon tells which.
    pub const CANCELLED: u8 = 3;
    /// Its timer was armed again right after a `CANCELLED` of it: that
    /// cancel was a re-arm, not an end.
    pub const REARMED: u8 = 4;
    /// A new connection took the 4-tuple of a socket `CANCELLED` just before
    /// (a TCP state change of that tuple to SYN_SENT, SYN_RECV or
    /// ESTABLISHED): that end was a reuse. Only the tuple, `tw` and `netns`
    /// are set.
    pub const REUSED: u8 = 5;
}

/// Bits of [`TimeWaitRecord::flags`].
pub mod flags {
    /// `reuseaddr`/`reuseport` bits were read from the socket.
    pub const REUSE_KNOWN: u16 = 1 << 0;
    pub const REUSEADDR: u16 = 1 << 1;
    pub const REUSEPORT: u16 = 1 << 2;
    /// `closer` is the process that closed the connection.
    pub const CLOSER: u16 = 1 << 3;
    /// `enter_ns` is when the socket entered TIME_WAIT (the enter was seen).
    pub const ENTER_KNOWN: u16 = 1 << 4;
    /// The socket was in TIME_WAIT before the observer attached.
    pub const PREEXISTING: u16 = 1 << 5;
    /// `CANCELLED` of a socket that moved from FIN_WAIT2 to TIME_WAIT without
    /// a timer event (at `enter_ns`) and was not yet said to enter: unless a
    /// `REARMED`/`ENTER` follows (a re-arm), the daemon reports the enter too.
    pub const ENTER_PENDING: u16 = 1 << 6;
    /// `ENTER` of a socket whose `CANCELLED` came just before: that cancel was
    /// the re-arm of its move from FIN_WAIT2, not its end. Without it, an
    /// `ENTER` at the address of a socket cancelled earlier is a new socket in
    /// the same memory, and the old one's end still stands.
    pub const REARM: u16 = 1 << 7;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeWaitRecord {
    pub header: crate::Header,
    /// The timewait socket's address: its id while it lives.
    pub tw: u64,
    /// `ktime` when it entered TIME_WAIT (with `flags::ENTER_KNOWN`).
    pub enter_ns: u64,
    /// Its `skc_cookie` (inherited from the socket it replaced); 0 when the
    /// kernel had not given that socket one.
    pub cookie: u64,
    /// `ENTER`: jiffies its timer was armed for (`expires - now`).
    pub timeout_jiffies: u64,
    /// The process that moved the connection to FIN_WAIT1 (with `flags::CLOSER`).
    pub closer: crate::task::TaskHeader,
    /// Inode of the socket's network namespace; 0 when unknown.
    pub netns: u32,
    /// An [`op`] value.
    pub op: u8,
    /// `tw_substate`: 6 (TIME_WAIT) or 5 (FIN_WAIT2).
    pub substate: u8,
    pub flags: u16,
    pub family: u16,
    /// Host order.
    pub sport: u16,
    pub dport: u16,
    pub _pad: u16,
    /// 4 bytes for IPv4, 16 for IPv6, network order.
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

impl TimeWaitRecord {
    pub const fn zeroed() -> Self {
        TimeWaitRecord {
            header: crate::Header {
                kind: crate::Kind::TimeWait as u32,
                _reserved: 0,
                ktime_ns: 0,
            },
            tw: 0,
            enter_ns: 0,
            cookie: 0,
            timeout_jiffies: 0,
            closer: crate::task::TaskHeader::ZERO,
            netns: 0,
            op: 0,
            substate: 0,
            flags: 0,
            family: 0,
            sport: 0,
            dport: 0,
            _pad: 0,
            saddr: [0; 16],
            daddr: [0; 16],
        }
    }
}

/// What the timer programs need to know of the kernel's layout, written by
/// the daemon before load. The handler's address comes after the load, in the
/// [`TW_HANDLER_MAP`] map; until it does (or if it cannot: the daemon then
/// polls sock_diag) the programs do nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimeWaitConfig {
    /// `inet_timewait_sock.tw_timer`, `.tw_substate`; `timer_list.function`, `.expires`.
    pub tw_timer: u32,
    pub tw_substate: u32,
    pub timer_function: u32,
    pub timer_expires: u32,
    /// `tcp_timewait_sock.tw_rcv_nxt`, `.tw_snd_nxt`: a connection's sequence
    /// numbers, which tell a re-armed socket from a new one at the same address.
    pub tw_rcv_nxt: u32,
    pub tw_snd_nxt: u32,
    /// `TCP_TIMEWAIT_LEN` (60 s) in jiffies, and a jiffy in ns (from HZ).
    pub timewait_len_jiffies: u64,
    pub ns_per_jiffy: u64,
}

impl TimeWaitConfig {
    pub const OFF: TimeWaitConfig = TimeWaitConfig {
        tw_timer: 0,
        tw_substate: 0,
        timer_function: 0,
        timer_expires: 0,
        tw_rcv_nxt: 0,
        tw_snd_nxt: 0,
        timewait_len_jiffies: 0,
        ns_per_jiffy: 0,
    };
}

/// Name of the global in the eBPF object holding the [`TimeWaitConfig`].
pub const TIME_WAIT_CONFIG_SYMBOL: &str = "TIME_WAIT_CONFIG";
/// Name of the one-entry array holding the address of `tw_timer_handler`.
pub const TW_HANDLER_MAP: &str = "TW_HANDLER";

#[cfg(feature = "user")]
unsafe impl aya::Pod for TimeWaitRecord {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for TimeWaitConfig {}
