//! `cargo xtask …`: toolchain set-up, eBPF build, run and test.
//!
//! The eBPF crate is built by Debian's `rustc-web` (it ships a prebuilt `core`
//! for `bpfel-unknown-none`) and linked by `bpf-linker` built against the same
//! LLVM major; the user-space crates build with the rustup toolchain. See
//! DESIGN.md, "Toolchain".

mod bench;
mod setup;

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
        Cmd::Bench => {
            let bin = build()?;
            status(cargo().args([
                "build",
                "--release",
                "--package",
                "observer-tests",
                "--bin",
                "bindloop",
            ]))
            .context("building the load generator")?;
            if !is_root() {
                bail!("the benchmark loads BPF programs: run it as root");
            }
            let root = workspace_root();
            bench::run(&bin, &root.join("target/release/bindloop"), &root)
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

pub(crate) fn status(cmd: &mut Command) -> Result<()> {
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
    let root = workspace_root();
    let obj = root.join("target/bpf/bpfel-unknown-none/release/observer-ebpf");
    // Unit tests: no root, no kernel.
    status(
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
    status(&mut cmd).context("kernel tests")
}
