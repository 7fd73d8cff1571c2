//! Who a process is beyond its `comm`: its command line, parent and start
//! time, from /proc, read lazily (only for records that are written) and
//! cached per process for a few seconds, so a busy binder costs one read.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use foldhash::HashMap;

/// A command line longer than this is cut (at a character boundary) and ends in `…`.
pub const CMDLINE_MAX: usize = 256;
/// How long a reading stands (a pid can be reused: not for long).
const FRESH_FOR: Duration = Duration::from_secs(5);
/// Processes remembered at most; the cache starts over beyond it.
const CAP: usize = 4096;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ident {
    pub ppid: u32,
    /// The arguments joined by spaces; `None` for kernel threads (empty).
    /// Shared with the records that carry it.
    pub cmdline: Option<Arc<str>>,
    /// Seconds since boot when it started (`/proc/PID/stat` field 22).
    pub started_s: u64,
    /// Its cgroup2 path (`/proc/PID/cgroup`'s `0::` line).
    pub cgroup: Option<String>,
}

impl Ident {
    /// Its systemd unit, from the cgroup path.
    pub fn unit(&self) -> Option<&str> {
        self.cgroup.as_deref().and_then(systemd_unit)
    }

    /// How long it has run, in seconds.
    pub fn running_s(&self) -> u64 {
        uptime_s().saturating_sub(self.started_s)
    }
}

#[derive(Default)]
pub struct Procs {
    seen: HashMap<u32, (Instant, Option<Ident>)>,
}

impl Procs {
    /// Process `pid` now; `None` when it is gone.
    pub fn ident(&mut self, pid: u32) -> Option<&Ident> {
        let stale = self
            .seen
            .get(&pid)
            .is_none_or(|(at, _)| at.elapsed() > FRESH_FOR);
        if stale {
            if self.seen.len() >= CAP {
                self.seen.clear();
            }
            self.seen.insert(pid, (Instant::now(), read(pid)));
        }
        self.seen.get(&pid).and_then(|(_, i)| i.as_ref())
    }
}

/// Reads process `pid` from /proc.
pub fn read(pid: u32) -> Option<Ident> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (ppid, started_s) = parse_stat(&stat)?;
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("0::"))
                .map(str::to_owned)
        });
    Some(Ident {
        ppid,
        cmdline: cmdline(&raw).map(Arc::from),
        started_s,
        cgroup,
    })
}

/// `ppid` and the start time in seconds from a /proc/PID/stat line. The
/// `comm` field may hold spaces and parentheses: fields count from the last `)`.
fn parse_stat(stat: &str) -> Option<(u32, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After `comm`: state(3) ppid(4) … starttime(22), in clock ticks.
    let ppid = f.get(1)?.parse().ok()?;
    let ticks: u64 = f.get(19)?.parse().ok()?;
    Some((ppid, ticks / clock_ticks()))
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// NUL-separated arguments as one line, at most `CMDLINE_MAX` bytes.
fn cmdline(raw: &[u8]) -> Option<String> {
    let line = String::from_utf8_lossy(raw)
        .trim_end_matches('\0')
        .replace('\0', " ");
    if line.is_empty() {
        return None;
    }
    if line.len() <= CMDLINE_MAX {
        return Some(line);
    }
    let mut cut = CMDLINE_MAX;
    while !line.is_char_boundary(cut) {
        cut -= 1;
    }
    Some(format!("{}…", &line[..cut]))
}

/// Seconds since boot (CLOCK_BOOTTIME), to age a process by its start time.
pub fn uptime_s() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).map_or(0, |t| t.tv_sec() as u64)
}

/// The systemd unit a cgroup path names: its last `.service` or `.scope`
/// component (`/system.slice/nginx.service` → `nginx.service`).
pub fn systemd_unit(cgroup: &str) -> Option<&str> {
    cgroup
        .rsplit('/')
        .find(|c| c.ends_with(".service") || c.ends_with(".scope"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_a_difficult_comm() {
        let stat = "20383 (py (x) 3) S 1042 20383 1042 34816 20400 4194304 1 0 0 0 0 0 0 0 20 0 1 0 512345 0 0";
        let (ppid, started) = parse_stat(stat).unwrap();
        assert_eq!(ppid, 1042);
        assert_eq!(started, 512345 / clock_ticks());
    }

    #[test]
    fn command_lines_are_joined_and_bounded() {
        assert_eq!(
            cmdline(b"python3\0-m\0http.server\08000\0").as_deref(),
            Some("python3 -m http.server 8000")
        );
        assert_eq!(cmdline(b""), None);
        let long = "é".repeat(200);
        let c = cmdline(long.as_bytes()).unwrap();
        assert!(
            c.len() <= CMDLINE_MAX + '…'.len_utf8() && c.ends_with('…'),
            "{c}"
        );
    }

    #[test]
    fn this_process_is_read() {
        let me = read(std::process::id()).unwrap();
        assert_eq!(me.ppid, std::os::unix::process::parent_id());
        assert!(me.cmdline.is_some() && me.started_s <= uptime_s());
    }

    #[test]
    fn units_from_cgroup_paths() {
        assert_eq!(
            systemd_unit("/system.slice/nginx.service"),
            Some("nginx.service")
        );
        assert_eq!(
            systemd_unit(
                "/user.slice/user-1000.slice/user@1000.service/app.slice/vte-spawn-1.scope"
            ),
            Some("vte-spawn-1.scope")
        );
        assert_eq!(systemd_unit("/"), None);
    }
}
