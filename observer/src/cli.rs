//! Command line: validated completely before anything is loaded.

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "observer",
    version,
    about = "Watch every socket bind() on this host, and why it failed, as JSON Lines",
    after_help = "EXAMPLES:\n    \
        observer run                      # stream until Ctrl-C\n    \
        observer run --duration 10 | jq 'select(.event == \"bind\" and .errno != null)'\n    \
        observer report events.jsonl.1 events.jsonl --html report.html"
)]
pub struct Cli {
    /// More diagnostics on stderr (-v info, -vv debug). OBSERVER_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Attach the eBPF programs and write one JSON object per event to stdout.
    Run(Box<RunArgs>),
    /// Re-create the classic bind failures, each in its own network namespace.
    Repro(crate::repro::ReproArgs),
    /// Would a bind like this succeed right now, and if not, why? Exit 0 if it would.
    Explain(crate::explain::cli::ExplainArgs),
    /// Every socket (or those on a port): state, ends, owner — the `ss -tuanp` answer; `--summary` counts them.
    Who(crate::explain::cli::WhoArgs),
    /// Which hooks load and attach on this kernel, and what is missing; exit 0 when the daemon can run.
    Check,
    /// Summarize a stream (files, rotated files in order, or stdin): failures by
    /// errno, port, process and rule, busiest binders, TIME_WAIT, lost records.
    Report(crate::report::ReportArgs),
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Stop by itself after SECS seconds (default: run until SIGINT/SIGTERM).
    #[arg(short, long, value_name = "SECS", allow_hyphen_values = true, value_parser = parse_duration)]
    pub duration: Option<std::time::Duration>,

    /// Size of the kernel ring buffer in bytes: a power of two, at least one page.
    /// Events that do not fit are counted and reported in `lost` records.
    #[arg(long, value_name = "BYTES", default_value_t = 8 << 20, allow_hyphen_values = true,
          value_parser = parse_ring_size)]
    pub ring_buffer: u32,

    /// Run these reproduction scenarios (or `all`) while observing, then stop;
    /// exits non-zero if a scenario failed or one of its events is missing.
    #[arg(long, value_name = "NAME", num_args = 1..)]
    pub repro: Option<Vec<String>>,

    /// With --repro: also write the workload's own log of steps, as JSON Lines, to FILE.
    #[arg(long, value_name = "FILE", requires = "repro")]
    pub repro_log: Option<std::path::PathBuf>,

    /// With --repro: write every record of the host, not only those of the
    /// scenarios' network namespaces.
    #[arg(long, requires = "repro")]
    pub all_host: bool,

    /// Only these processes (tgid); repeat the flag or separate with commas.
    #[arg(short = 'p', long = "pid", value_name = "PID", value_delimiter = ',',
          allow_hyphen_values = true, value_parser = clap::value_parser!(u32).range(1..))]
    pub pids: Vec<u32>,

    /// Only these ports (requested, bound, or either end of a connection).
    #[arg(short = 'P', long = "port", value_name = "PORT", value_delimiter = ',',
          allow_hyphen_values = true, value_parser = clap::value_parser!(u16))]
    pub ports: Vec<u16>,

    /// Only processes with this command name (as `comm`, up to 15 characters).
    #[arg(long, value_name = "NAME")]
    pub comm: Option<String>,

    /// Only processes of this uid.
    #[arg(long, value_name = "UID", allow_hyphen_values = true, value_parser = parse_uid)]
    pub uid: Option<u32>,

    /// Only events from inside this cgroup2 directory (and its descendants).
    #[arg(long, value_name = "PATH", value_parser = parse_cgroup_dir)]
    pub cgroup: Option<CgroupDir>,

    /// Only events in this network namespace: a path (/run/netns/NAME) or a PID.
    #[arg(long, value_name = "PATH|PID", allow_hyphen_values = true, value_parser = parse_netns)]
    pub netns: Option<u32>,

    /// Failed calls only (binds, listens, connects that returned an error).
    #[arg(short = 'x', long)]
    pub errors_only: bool,

    /// Only these event kinds, comma-separated.
    #[arg(long, value_name = "LIST", value_delimiter = ',',
          value_parser = clap::builder::PossibleValuesParser::new(crate::filter::EVENT_KINDS))]
    pub events: Vec<String>,

    /// Output format.
    #[arg(long, value_enum, default_value = "json")]
    pub format: crate::output::Format,

    /// Append to FILE (created 0640) instead of stdout; SIGHUP reopens it.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<std::path::PathBuf>,

    /// Write a `stats` record every SECS seconds (at least 0.1).
    #[arg(long, value_name = "SECS", allow_hyphen_values = true, value_parser = parse_stats_period)]
    pub stats: Option<std::time::Duration>,

    /// Serve Prometheus metrics of the stream at http://ADDR:PORT/metrics.
    #[arg(long, value_name = "ADDR:PORT", value_parser = parse_metrics_addr)]
    pub metrics: Option<std::net::SocketAddr>,
}

/// An address to listen on, as people write them: `127.0.0.1:9464`, `[::1]:9464`.
fn parse_metrics_addr(s: &str) -> Result<std::net::SocketAddr, String> {
    s.parse().map_err(|_| {
        format!("'{s}' is not ADDR:PORT (an IP address and a port: 127.0.0.1:9464, [::]:9464)")
    })
}

/// A cgroup2 directory: where it is, and its path under the cgroup2 mount
/// (`/a/b`), which is how the stream names cgroups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupDir {
    pub dir: std::path::PathBuf,
    pub rel: String,
}

fn parse_cgroup_dir(s: &str) -> Result<CgroupDir, String> {
    let dir = std::path::Path::new(s)
        .canonicalize()
        .map_err(|e| format!("'{s}': {e}"))?;
    if !dir.is_dir() || fs_magic(&dir) != Some(CGROUP2_SUPER_MAGIC) {
        return Err(format!(
            "'{s}' is not a cgroup2 directory (a cgroup v1 hierarchy cannot be filtered on)"
        ));
    }
    let root = crate::kernel::mounts::cgroup2_mount()
        .and_then(|r| Ok(r.canonicalize()?))
        .map_err(|e| format!("'{s}': {e:#}"))?;
    if !dir.starts_with(&root) {
        return Err(format!(
            "'{s}' is not under the cgroup2 mount {}",
            root.display()
        ));
    }
    Ok(CgroupDir {
        rel: crate::kernel::cgroups::relative(&root, &dir),
        dir,
    })
}

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// The filesystem type of `path` (`statfs`'s `f_type`).
fn fs_magic(path: &std::path::Path) -> Option<i64> {
    nix::sys::statfs::statfs(path)
        .ok()
        .map(|s| s.filesystem_type().0)
}

/// A network namespace: a PID, or a path to an nsfs file (/run/netns/NAME,
/// /proc/PID/ns/net) whose namespace type is NET; its inode.
fn parse_netns(s: &str) -> Result<u32, String> {
    netns_file(s).map(|(_, ino)| ino)
}

/// As `parse_netns`, keeping the path (for commands that enter the namespace).
pub fn parse_netns_path(s: &str) -> Result<String, String> {
    netns_file(s).map(|(path, _)| path)
}

fn netns_file(s: &str) -> Result<(String, u32), String> {
    use std::os::{fd::AsRawFd, unix::fs::MetadataExt};
    let path = crate::kernel::netns::path_of(s);
    let not = |why: String| format!("'{s}' is not a network namespace ({why})");
    let file = std::fs::File::open(&path).map_err(|e| not(format!("{path}: {e}")))?;
    if fs_magic(std::path::Path::new(&path)) != Some(NSFS_MAGIC) {
        return Err(not(format!("{path} is not a namespace file")));
    }
    // NS_GET_NSTYPE = _IO(0xb7, 0x3): the CLONE_NEW* flag of the namespace.
    // SAFETY: an ioctl without arguments on a descriptor we own.
    let kind = unsafe { libc::ioctl(file.as_raw_fd(), 0xb703 as _) };
    if kind != libc::CLONE_NEWNET {
        return Err(not(format!("{path} is another kind of namespace")));
    }
    let m = file.metadata().map_err(|e| not(e.to_string()))?;
    Ok((path, m.ino() as u32))
}

pub fn parse_uid(s: &str) -> Result<u32, String> {
    s.parse()
        .map_err(|_| format!("'{s}' is not a uid (a number from 0 to 4294967295)"))
}

/// The largest ring buffer accepted: larger ones take seconds to set up and
/// pin that much kernel memory.
pub const RING_MAX: u64 = 1 << 30;

fn parse_ring_size(s: &str) -> Result<u32, String> {
    let n: u64 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a size in bytes"))?;
    let page = u64::from(page_size());
    if n > RING_MAX {
        return Err(format!(
            "{n} is too large: the maximum is {RING_MAX} (1 GiB)"
        ));
    }
    if !n.is_power_of_two() || n < page {
        return Err(format!(
            "{n} must be a power of two of at least {page} (the page size)"
        ));
    }
    Ok(n as u32)
}

/// The system's page size (4096 when it cannot be asked).
pub fn page_size() -> u32 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096, |p| p as u32)
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    if !(secs.is_finite() && secs > 0.0) {
        return Err(format!("'{s}' must be a positive number of seconds"));
    }
    std::time::Duration::try_from_secs_f64(secs).map_err(|e| format!("'{s}': {e}"))
}

/// The shortest `--stats` period: shorter ones would fill the output with stats.
const STATS_MIN_SECS: f64 = 0.1;

fn parse_stats_period(s: &str) -> Result<std::time::Duration, String> {
    let d = parse_duration(s)?;
    if d.as_secs_f64() < STATS_MIN_SECS {
        return Err(format!(
            "'{s}' is too short: at least {STATS_MIN_SECS} seconds"
        ));
    }
    Ok(d)
}

impl Cli {
    pub fn log_level(&self) -> log::LevelFilter {
        match self.verbose {
            0 => log::LevelFilter::Warn,
            1 => log::LevelFilter::Info,
            _ => log::LevelFilter::Debug,
        }
    }
}

/// `--help` and `--version` print in full; a usage error is one line on stderr, exit 2.
pub fn report_parse_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            ExitCode::from(if e.use_stderr() { 2 } else { 0 })
        }
        _ => {
            eprintln!("observer: {}", one_line(&e.render().to_string()));
            ExitCode::from(2)
        }
    }
}

/// clap's message in one line: its first line, with what it lists on the
/// next ones (the missing arguments, the possible values) folded in.
fn one_line(rendered: &str) -> String {
    let mut lines = rendered.lines().map(str::trim);
    let first = lines.next().unwrap_or("invalid arguments");
    let mut msg = first.strip_prefix("error: ").unwrap_or(first).to_owned();
    for l in lines.take_while(|l| !l.is_empty() && !l.starts_with("Usage:")) {
        if !l.starts_with("tip:") {
            msg.push(' ');
            msg += l;
        }
    }
    format!("{msg} (see --help)")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("observer").chain(args.iter().copied()))
    }

    #[test]
    fn run_with_duration() {
        let cli = parse(&["run", "--duration", "2.5"]).unwrap();
        let Command::Run(run) = cli.command else {
            panic!()
        };
        assert_eq!(run.duration, Some(std::time::Duration::from_millis(2500)));
        assert_eq!(run.ring_buffer, 8 << 20);
        assert_eq!(run.format, crate::output::Format::Json);
        assert_eq!(run.metrics, None);
        let Command::Run(run) = parse(&["run", "--metrics", "[::1]:9464"]).unwrap().command else {
            panic!()
        };
        assert_eq!(run.metrics, Some("[::1]:9464".parse().unwrap()));
    }

    #[test]
    fn filters_parse_and_bad_values_name_their_flag() {
        let Command::Run(run) = parse(&[
            "run",
            "-p",
            "1,2",
            "-P",
            "80",
            "-P",
            "443",
            "-x",
            "--events",
            "bind,time_wait",
        ])
        .unwrap()
        .command
        else {
            panic!()
        };
        assert_eq!(
            (run.pids, run.ports, run.errors_only),
            (vec![1, 2], vec![80, 443], true)
        );
        assert_eq!(run.events, ["bind", "time_wait"]);
        for (args, flag) in [
            (&["run", "-P", "notaport"][..], "--port"),
            (&["run", "-p", "-3"], "--pid"),
            (&["run", "-p", "0"], "--pid"),
            (&["run", "--events", "bind,nope"], "--events"),
            (&["run", "--cgroup", "/nonexistent"], "--cgroup"),
            (&["run", "--netns", "/nonexistent"], "--netns"),
            (&["run", "--format", "xml"], "--format"),
            (&["run", "--stats", "0"], "--stats"),
            (&["run", "--metrics", "9464"], "--metrics"),
            (&["run", "--metrics", "localhost:9464"], "--metrics"),
            (&["run", "--metrics", "127.0.0.1:70000"], "--metrics"),
        ] {
            let e = parse(args).unwrap_err();
            let line = one_line(&e.render().to_string());
            assert!(line.contains(flag), "{args:?}: {line}");
            assert_eq!(e.exit_code(), 2);
        }
    }

    #[test]
    fn ring_buffer_size_is_a_power_of_two_pages() {
        let Command::Run(run) = parse(&["run", "--ring-buffer", "65536"]).unwrap().command else {
            panic!()
        };
        assert_eq!(run.ring_buffer, 65536);
        for bad in ["65537", "1024", "0", "big"] {
            assert!(parse(&["run", "--ring-buffer", bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_input_is_one_line() {
        for args in [
            &["run", "--duration", "soon"][..],
            &["run", "--duration", "-1"],
            &["run", "--bogus"],
            &["run", "--ring-buffer", "3000"],
            &["run", "--metrics", "127.0.0.1"],
            &["frobnicate"],
        ] {
            let e = parse(args).unwrap_err();
            let line = one_line(&e.render().to_string());
            assert!(!line.contains('\n'), "{line}");
            assert!(line.len() > 20, "{args:?}: {line}");
        }
        let e = parse(&["run", "--duration", "soon"]).unwrap_err();
        assert!(one_line(&e.render().to_string()).contains("--duration"));
    }
}
