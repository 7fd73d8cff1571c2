//! `cargo xtask …`: toolchain set-up, eBPF build, run and test.
//!
//! The eBPF crate is built by Debian's `rustc-web` (it ships a prebuilt `core`
//! for `bpfel-unknown-none`) and linked by `bpf-linker` built against the same
//! LLVM major; the user-space crates build with the rustup toolchain. See
//! docs/ARCHITECTURE.md, "Toolchain".

mod bench;
mod setup;
mod vm;

use std::{
    ffi::OsString,
    os::unix::{fs::MetadataExt, process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, run and test the observer")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what this machine lacks to build the eBPF side (idempotent).
    Setup,
    /// Build the eBPF object and the release daemon.
    Build,
    /// Build, then run `observer run ARGS` (through `sudo -E` when not root).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// What the observer costs the host, against bpftrace and strace (root).
    Bench,
    /// Unit tests, then the kernel tests (root, real kernel).
    Test {
        /// Passed to the test harness of both runs (a test name filter, `--nocapture`, …).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// The kernel tests on Debian's 6.1, 6.12 and 5.10 kernels, each booted under qemu.
    VmTest {
        /// Which kernel series to boot (5.10 is skipped by `all` when it cannot be fetched).
        #[arg(long, value_enum, default_value = "all")]
        kernel: vm::KernelArg,
        /// Only check, repro and run --repro, and the bind, explain, repro and cli tests.
        #[arg(long)]
        quick: bool,
        /// Test name filters, passed to each test binary.
        #[arg(last = true)]
        filter: Vec<OsString>,
    },
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("xtask: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Setup => setup::setup().map(drop),
        Cmd::Build => build().map(drop),
        Cmd::Run { args } => {
            let bin = build()?;
            let mut cmd = as_root(&bin);
            cmd.arg("run").args(args);
            Err(cmd.exec()).with_context(|| format!("exec {}", bin.display()))
        }
        Cmd::Test { args } => test(&args),
        Cmd::VmTest {
            kernel,
            quick,
            filter,
        } => {
            let bin = build()?;
            let opts = vm::Options {
                kernel,
                quick,
                filter,
            };
            vm::run(&opts, &bin, &workspace_root())
        }
        Cmd::Bench => {
            let bin = build()?;
            status(cargo().args([
                "build",
                "--release",
                "--package",
                "observer-tests",
                "--bin",
                "bindloop",
                "--bin",
                "floor",
            ]))
            .context("building the load generator and the floor loader")?;
            if !is_root() {
                bail!("the benchmark loads BPF programs: run it as root");
            }
            let root = workspace_root();
            let release = root.join("target/release");
            let tools = bench::Tools {
                observer: &bin,
                bindloop: &release.join("bindloop"),
                floor: &release.join("floor"),
                object: &root.join("target/bpf/bpfel-unknown-none/release/observer-ebpf"),
            };
            bench::run(tools, &root)
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// The rustup cargo that runs us (`cargo xtask` sets `CARGO`).
fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// Runs a set-up or build step. Its stdout goes to our stderr: the stdout of
/// `cargo xtask run` is the observer's records and nothing else (apt, dpkg and
/// cargo print progress on stdout).
pub(crate) fn status(cmd: &mut Command) -> Result<()> {
    cmd.stdout(std::process::Stdio::from(std::io::stderr()));
    status_keep_stdout(cmd)
}

/// Runs `cmd` with our stdout (tests, whose report is the point).
pub(crate) fn status_keep_stdout(cmd: &mut Command) -> Result<()> {
    let st = cmd
        .status()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

pub(crate) fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// `program` as root: directly when we are root, else through `sudo -E`.
pub(crate) fn as_root(program: impl AsRef<std::ffi::OsStr>) -> Command {
    if is_root() {
        Command::new(program)
    } else {
        let mut cmd = Command::new("sudo");
        cmd.arg("-E").arg(program);
        cmd
    }
}

/// Builds the eBPF object, then the release daemon that embeds it; returns the daemon's path.
fn build() -> Result<PathBuf> {
    let tools = setup::ensure()?;
    let root = workspace_root();
    let bpf_target_dir = root.join("target/bpf");
    status(
        cargo()
            .args(["build", "--release", "--package", "observer-ebpf"])
            .args(["--target", "bpfel-unknown-none", "--target-dir"])
            .arg(&bpf_target_dir)
            .env("RUSTC", &tools.rustc)
            // aya-ebpf uses `#![feature(asm_experimental_arch)]`; Debian's rustc is stable.
            .env("RUSTC_BOOTSTRAP", "1")
            .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", &tools.bpf_linker)
            // BTF in the object: the verifier's messages then name source lines.
            .env(
                "CARGO_TARGET_BPFEL_UNKNOWN_NONE_RUSTFLAGS",
                "-C debuginfo=2 -C link-arg=--btf",
            )
            .env_remove("RUSTFLAGS")
            .env_remove("RUSTC_WRAPPER")
            .env_remove("RUSTUP_TOOLCHAIN"),
    )
    .context("building the eBPF programs")?;
    let obj = bpf_target_dir.join("bpfel-unknown-none/release/observer-ebpf");
    status(
        cargo()
            .args([
                "build",
                "--release",
                "--package",
                "observer",
                "--bin",
                "observer",
            ])
            .env("OBSERVER_EBPF_OBJ", &obj),
    )
    .context("building the daemon")?;
    Ok(root.join("target/release/observer"))
}

fn test(args: &[OsString]) -> Result<()> {
    let bin = build()?;
    setup::ensure_test_packages();
    let root = workspace_root();
    let obj = root.join("target/bpf/bpfel-unknown-none/release/observer-ebpf");
    // Unit tests: no root, no kernel.
    status_keep_stdout(
        cargo()
            .args(["test", "--release", "--workspace"])
            .args(["--exclude", "observer-ebpf", "--exclude", "observer-tests"])
            .env("OBSERVER_EBPF_OBJ", &obj)
            .arg("--")
            .args(args),
    )
    .context("unit tests")?;
    // Kernel tests: they load programs into the running kernel, one at a time.
    let mut cmd = as_root(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(&root)
        .args(["test", "--release", "--package", "observer-tests"])
        .env("OBSERVER_BIN", &bin)
        .env("OBSERVER_EBPF_OBJ", &obj)
        .args(["--", "--test-threads=1"])
        .args(args);
    status_keep_stdout(&mut cmd).context("kernel tests")?;
    if args.is_empty() {
        stdout_is_records_only()?;
    }
    Ok(())
}

/// `cargo xtask run -- -d 1` with the set-up forced (apt and dpkg run again):
/// every line on its stdout must be a record, from the first byte.
fn stdout_is_records_only() -> Result<()> {
    let exe = std::env::current_exe().context("finding the xtask binary")?;
    let out = Command::new(exe)
        .args(["run", "--", "-d", "1"])
        .current_dir(workspace_root())
        .env(setup::FORCE_ENV, "1")
        .stderr(std::process::Stdio::null())
        .output()
        .context("running `cargo xtask run -- -d 1`")?;
    if !out.status.success() {
        bail!(
            "`cargo xtask run -- -d 1` with the set-up forced failed: {}",
            out.status
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let events: Vec<String> = text
        .lines()
        .map(|l| match serde_json::from_str::<serde_json::Value>(l) {
            Ok(v) if v["event"].is_string() => Ok(v["event"].as_str().unwrap_or("").to_owned()),
            _ => Err(anyhow::anyhow!(
                "stdout of `cargo xtask run` has a line that is not a record: {l}"
            )),
        })
        .collect::<Result<_>>()?;
    if events.first().map(String::as_str) != Some("observer_start")
        || events.last().map(String::as_str) != Some("observer_stop")
    {
        bail!(
            "stdout of `cargo xtask run` does not run from observer_start to observer_stop: {events:?}"
        );
    }
    eprintln!(
        "xtask: stdout_is_records_only: `cargo xtask run -- -d 1` with the set-up forced wrote {} records and nothing else",
        events.len()
    );
    Ok(())
}
