//! The daemon's own records: `observer_start`, `lost`, `stats`, `observer_stop`.

use serde::Serialize;

#[derive(Serialize, Debug, Clone)]
pub struct Start {
    pub version: &'static str,
    pub kernel: String,
    pub pid: u32,
    /// The hooks actually attached, as `section/name`.
    pub hooks: Vec<String>,
    /// Kernel ids of the loaded programs, in the order of `hooks`.
    pub prog_ids: Vec<u32>,
    pub cgroup: String,
    pub ring_buffer_bytes: u32,
}

#[derive(Serialize, Debug, Clone)]
pub struct Lost {
    /// Events lost since the previous `lost` record of this cause.
    pub count: u64,
    /// A [`LostByCause`] name: `ring_buffer` (full), `inflight_map` (too many
    /// binds in flight at once), `time_wait_map`, `time_wait_queue`, `output`
    /// (records the output could not write), `recursion` (runs the kernel skipped).
    pub cause: &'static str,
}

#[derive(Serialize, Debug, Default, Clone, Copy)]
pub struct Totals {
    pub bind: u64,
    pub tcp_state: u64,
    pub listen: u64,
    pub connect: u64,
    pub time_wait_enter: u64,
    pub time_wait_exit: u64,
    pub lost: u64,
}

impl Totals {
    /// One more record of the host written.
    pub fn count(&mut self, e: &super::Event) {
        use super::Event::*;
        match e {
            Bind(_) => self.bind += 1,
            TcpState(_) => self.tcp_state += 1,
            Listen(_) => self.listen += 1,
            Connect(_) => self.connect += 1,
            TimeWaitEnter(_) => self.time_wait_enter += 1,
            TimeWaitExit(_) => self.time_wait_exit += 1,
            // Not the host's: the daemon's reading of it (counted by the metrics).
            PortPressure(_) | ObserverStart(_) | Lost(_) | Stats(_) | ObserverStop(_) => {}
        }
    }
}

/// Records lost, by cause (the `cause` of `lost` records).
#[derive(Serialize, Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LostByCause {
    pub ring_buffer: u64,
    pub inflight_map: u64,
    /// Timewait sockets the kernel-side table had no room for.
    pub time_wait_map: u64,
    pub time_wait_queue: u64,
    /// Records the output could not write (disk full, a stalled reader).
    pub output: u64,
    /// Program runs the kernel skipped (one already running on that CPU):
    /// each may have been a record, so at most this many are missing.
    pub recursion: u64,
}

/// Every `cause` a `lost` record can name, in [`LostByCause::each`]'s order.
pub const LOST_CAUSES: [&str; 6] = [
    "ring_buffer",
    "inflight_map",
    "time_wait_map",
    "time_wait_queue",
    "output",
    "recursion",
];

impl LostByCause {
    /// Every cause with its count, as `lost` records name them.
    pub fn each(&self) -> [(&'static str, u64); 6] {
        let n = [
            self.ring_buffer,
            self.inflight_map,
            self.time_wait_map,
            self.time_wait_queue,
            self.output,
            self.recursion,
        ];
        std::array::from_fn(|i| (LOST_CAUSES[i], n[i]))
    }

    pub fn sum(&self) -> u64 {
        self.each().iter().map(|(_, n)| n).sum()
    }
}

/// What `stats` and `observer_stop` both report: the stream so far.
#[derive(Serialize, Debug, Clone, Default)]
pub struct Counts {
    /// Records written so far, per type.
    pub totals: Totals,
    pub lost: u64,
    pub lost_by_cause: LostByCause,
    /// Records the filters kept out of the output.
    pub filtered: u64,
    /// EADDRINUSE failures explained from a lookup made for an earlier failure on
    /// the same port less than 100 ms before (a storm costs one lookup per port).
    pub explain_coalesced: u64,
    /// EADDRINUSE failures written without an explanation: the explainer was
    /// 1024 lookups behind.
    pub explain_skipped: u64,
}

#[derive(Serialize, Debug, Clone)]
pub struct Stats {
    #[serde(flatten)]
    pub counts: Counts,
    /// The daemon's own CPU time (user + system) and resident memory.
    pub cpu_ms: u64,
    pub rss_kb: u64,
}

#[derive(Serialize, Debug, Clone)]
pub struct Stop {
    /// `duration`, `SIGINT`, `SIGTERM` or `repro`.
    pub reason: &'static str,
    #[serde(flatten)]
    pub counts: Counts,
    /// Per program: runs and time in the kernel (zero unless kernel.bpf_stats_enabled=1).
    pub programs: Vec<ProgramStats>,
}

/// What one program cost in the kernel (counted while `kernel.bpf_stats_enabled=1`).
#[derive(Serialize, Debug, Clone)]
pub struct ProgramStats {
    pub hook: String,
    pub id: u32,
    pub run_count: u64,
    pub run_time_ns: u64,
    /// Runs the kernel skipped (see `lost` cause `recursion`).
    pub recursion_misses: u64,
}
