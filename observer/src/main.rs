//! `observer`: watches every socket bind() on the host and streams JSON Lines.

mod check;
mod cli;
mod clock;
mod daemon;
mod explain;
mod filter;
mod kernel;
mod metrics;
mod names;
mod output;
mod pressure;
mod report;
mod repro;
mod schema;
mod stream;
mod text;
mod time_wait;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // A repro scenario's child process: never reached from a command line.
    if let Some(code) = repro::helper::run_if_helper() {
        return code;
    }
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return cli::report_parse_error(e),
    };
    env_logger::Builder::new()
        .filter_level(cli.log_level())
        .parse_env("OBSERVER_LOG")
        .target(env_logger::Target::Stderr)
        .init();
    if matches!(cli.command, cli::Command::Repro(_) | cli::Command::Check) {
        // These end like any Unix tool when their reader stops reading
        // (`observer repro --json | head`): by SIGPIPE, quietly. (`run`
        // watches its stdout and stops cleanly; `who`, `explain` and `report`
        // end with 0 on a broken pipe.)
        // SAFETY: restoring a signal's default disposition, before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match cli.command {
        cli::Command::Run(args) => match args.repro.as_deref().map(repro::select) {
            Some(Err(e)) => {
                eprintln!("observer: --repro: {e}");
                ExitCode::from(2)
            }
            _ => match daemon::run(*args) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("observer: {e:#}");
                    if e.downcast_ref::<daemon::ConfigError>().is_some() {
                        ExitCode::from(2)
                    } else {
                        ExitCode::FAILURE
                    }
                }
            },
        },
        cli::Command::Repro(args) => repro::cli(args),
        cli::Command::Explain(args) => report(explain::cli::explain(args)),
        cli::Command::Who(args) => report(explain::cli::who(args)),
        cli::Command::Check => check::run(),
        cli::Command::Report(args) => report::run(args),
    }
}

/// A command's result as an exit code: its own, or 1 with one line on stderr;
/// a reader that stopped reading (`| head`) has what it wanted: 0, quietly.
fn report(r: anyhow::Result<ExitCode>) -> ExitCode {
    r.unwrap_or_else(|e| {
        let closed = e
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe);
        if closed {
            return ExitCode::SUCCESS;
        }
        eprintln!("observer: {e:#}");
        ExitCode::FAILURE
    })
}
