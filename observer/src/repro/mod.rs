//! `observer repro`: the classic bind failures as runnable scenarios, each in a
//! network namespace of its own, every kernel answer checked against the table.

pub mod check;
pub mod ctx;
pub mod helper;
pub mod scenarios;
pub mod shared;

use std::{process::ExitCode, sync::Arc};

use clap::Args;
use ctx::{Ctx, Sink, Step};
use scenarios::{SCENARIOS, Scenario};

#[derive(Args, Debug, Clone)]
pub struct ReproArgs {
    /// List the scenarios, one per line: NAME  description.
    #[arg(long)]
    pub list: bool,
    /// Write the workload's own log of steps as JSON Lines on stdout.
    #[arg(long)]
    pub json: bool,
    /// Scenarios to run (see --list), or `all`.
    #[arg(value_name = "NAME")]
    pub names: Vec<String>,
}

/// The scenarios named, in the table's order; `all` is every one.
pub fn select(names: &[String]) -> Result<Vec<&'static Scenario>, String> {
    if names.is_empty() {
        return Err("name a scenario or `all` (see `observer repro --list`)".into());
    }
    if let Some(bad) = names
        .iter()
        .find(|n| *n != "all" && !SCENARIOS.iter().any(|s| s.name == n.as_str()))
    {
        return Err(format!(
            "unknown scenario '{bad}' (see `observer repro --list`)"
        ));
    }
    let all = names.iter().any(|n| n == "all");
    Ok(SCENARIOS
        .iter()
        .filter(|s| all || names.iter().any(|n| n == s.name))
        .collect())
}

/// What a run of scenarios did.
#[derive(Debug, Default)]
pub struct Report {
    pub steps: Vec<Step>,
    /// Scenarios that could not run to the end, with why.
    pub errors: Vec<String>,
}

impl Report {
    /// Every kernel answer as expected, and as the explain engine predicted.
    pub fn passed(&self) -> bool {
        self.errors.is_empty() && self.steps.iter().all(|s| s.ok && Ctx::agrees(s))
    }

    /// Per scenario: steps, unexpected answers; then each unexpected step and error.
    pub fn summary(&self, scenarios: &[&Scenario]) -> String {
        let mut out = format!(
            "\n{:<22} {:>5} {:>10} {:>9}\n",
            "SCENARIO", "STEPS", "UNEXPECTED", "PREDICTED"
        );
        for sc in scenarios {
            let steps: Vec<&Step> = self
                .steps
                .iter()
                .filter(|s| s.scenario == sc.name)
                .collect();
            let bad = steps.iter().filter(|s| !s.ok).count();
            let predicted = steps.iter().filter(|s| s.explain_verdict.is_some()).count();
            let agreed = steps
                .iter()
                .filter(|s| s.explain_verdict.is_some() && Ctx::agrees(s))
                .count();
            let failed = self.errors.iter().any(|e| e.starts_with(sc.name));
            out += &format!(
                "{:<22} {:>5} {:>10} {:>9}{}\n",
                sc.name,
                steps.len(),
                bad,
                format!("{agreed}/{predicted}"),
                if failed { "  (did not finish)" } else { "" }
            );
        }
        for s in self.steps.iter().filter(|s| !s.ok || !Ctx::agrees(s)) {
            out += &format!("unexpected: {}\n", ctx::describe(s));
        }
        for e in &self.errors {
            out += &format!("error: {e}\n");
        }
        out
    }
}

/// Runs the scenarios one after the other, each on a thread of its own (its
/// network namespaces are the thread's, gone with it).
pub fn run(
    scenarios: &[&'static Scenario],
    sink: Sink,
    shared: Option<Arc<shared::Shared>>,
) -> Report {
    let mut report = Report::default();
    for &sc in scenarios {
        let shared = shared.clone();
        let (steps, err) = std::thread::Builder::new()
            .name(format!("repro-{}", sc.name))
            .spawn(move || match Ctx::new(sc.name, sink, shared) {
                Err(e) => (Vec::new(), Some(e)),
                Ok(mut ctx) => {
                    let r = (sc.run)(&mut ctx);
                    ctx.close_all();
                    (std::mem::take(&mut ctx.steps), r.err())
                }
            })
            .expect("spawning a scenario thread")
            .join()
            .unwrap_or_else(|_| {
                (
                    Vec::new(),
                    Some(std::io::Error::other("the scenario panicked")),
                )
            });
        report.steps.extend(steps);
        if let Some(e) = err {
            report.errors.push(format!("{}: {e}", sc.name));
        }
    }
    report
}

/// `observer repro …` without the observer.
pub fn cli(args: ReproArgs) -> ExitCode {
    if args.list {
        for s in SCENARIOS {
            println!("{:<22} {}", s.name, s.about);
        }
        return ExitCode::SUCCESS;
    }
    let scenarios = match select(&args.names) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("observer: {e}");
            return ExitCode::from(2);
        }
    };
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "observer: repro must run as root: each scenario creates its own network namespace (CAP_SYS_ADMIN)"
        );
        return ExitCode::FAILURE;
    }
    let report = run(&scenarios, Sink::Stderr, None);
    eprint!("{}", report.summary(&scenarios));
    if args.json {
        for s in &report.steps {
            println!("{}", serde_json::to_string(s).expect("a step is JSON"));
        }
    }
    if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selects_by_name_and_all() {
        let names = |v: &[&str]| select(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(names(&["all"]).unwrap().len(), SCENARIOS.len());
        let two = names(&["udp", "reuseaddr"]).unwrap();
        assert_eq!(
            two.iter().map(|s| s.name).collect::<Vec<_>>(),
            ["reuseaddr", "udp"]
        );
        assert!(names(&["nope"]).is_err_and(|e| e.contains("'nope'")));
        assert!(names(&[]).is_err());
    }
}
