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
        observer run --duration 10 | jq 'select(.event == \"bind\" and .errno != null)'"
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
    Run(RunArgs),
    /// Re-create the classic bind failures, each in its own network namespace.
    Repro(crate::repro::ReproArgs),
    /// Would a bind like this succeed right now, and if not, why? Exit 0 if it would.
    Explain(crate::explain::cli::ExplainArgs),
    /// Every socket on a port: state, ends, owner (the `ss` answer).
    Who(crate::explain::cli::WhoArgs),
    /// Which hooks load and attach on this kernel, and what is missing; exit 0 when the daemon can run.
    Check,
    /// Internal: a scenario's child process.
    #[command(hide = true)]
    ReproHelper(crate::repro::helper::HelperArgs),
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Stop by itself after SECS seconds (default: run until SIGINT/SIGTERM).
    #[arg(short, long, value_name = "SECS", value_parser = parse_duration)]
    pub duration: Option<std::time::Duration>,

    /// Size of the kernel ring buffer in bytes: a power of two, at least one page.
    /// Events that do not fit are counted and reported in `lost` records.
    #[arg(long, value_name = "BYTES", default_value_t = 8 << 20, value_parser = parse_ring_size)]
    pub ring_buffer: u32,

    /// Run these reproduction scenarios (or `all`) while observing, then stop;
    /// exits non-zero if a scenario failed or one of its events is missing.
    #[arg(long, value_name = "NAME", num_args = 1..)]
    pub repro: Option<Vec<String>>,

    /// With --repro: also write the workload's own log of steps, as JSON Lines, to FILE.
    #[arg(long, value_name = "FILE", requires = "repro")]
    pub repro_log: Option<std::path::PathBuf>,

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
    #[arg(long, value_name = "UID", allow_hyphen_values = true)]
    pub uid: Option<u32>,

    /// Only events from inside this cgroup2 directory (and its descendants).
    #[arg(long, value_name = "PATH", value_parser = parse_cgroup_dir)]
    pub cgroup: Option<std::path::PathBuf>,

    /// Only events in this network namespace: a path (/run/netns/NAME) or a PID.
    #[arg(long, value_name = "PATH|PID", value_parser = parse_netns)]
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

    /// Write a `stats` record every SECS seconds.
    #[arg(long, value_name = "SECS", value_parser = parse_duration)]
    pub stats: Option<std::time::Duration>,
}

fn parse_cgroup_dir(s: &str) -> Result<std::path::PathBuf, String> {
    let p = std::path::PathBuf::from(s);
    if !p.join("cgroup.procs").is_file() {
        return Err(format!("'{s}' is not a cgroup directory"));
    }
    p.canonicalize().map_err(|e| format!("'{s}': {e}"))
}

fn parse_netns(s: &str) -> Result<u32, String> {
    use std::os::unix::fs::MetadataExt;
    let path = crate::netns::path_of(s);
    let m = std::fs::metadata(&path)
        .map_err(|e| format!("'{s}' is not a network namespace ({path}: {e})"))?;
    Ok(m.ino() as u32)
}

fn parse_ring_size(s: &str) -> Result<u32, String> {
    let n: u32 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a size in bytes"))?;
    let page = page_size();
    if !n.is_power_of_two() || n < page {
        return Err(format!(
            "{n} must be a power of two of at least {page} (the page size)"
        ));
    }
    Ok(n)
}

fn page_size() -> u32 {
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
    std::time::Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())
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

fn one_line(rendered: &str) -> String {
    let first = rendered.lines().next().unwrap_or("invalid arguments");
    let msg = first.strip_prefix("error: ").unwrap_or(first);
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
