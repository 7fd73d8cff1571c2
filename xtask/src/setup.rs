//! `cargo xtask setup`: the eBPF toolchain on a fresh Debian machine, idempotently.
//!
//! 1. Debian's `rustc-web` and its prebuilt `core` for `bpfel-unknown-none`.
//! 2. The LLVM development packages of the major that rustc was built with.
//! 3. `bpf-linker` built against that same LLVM, under `~/.cargo/observer-tools`.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};

use crate::{as_root, status};

/// The compiler for the eBPF crate: Debian's, because it ships `core` for bpfel.
const RUSTC: &str = "/usr/bin/rustc";
const BPF_LINKER_VERSION: &str = "0.13.0";
const RUST_PACKAGES: [&str; 2] = ["rustc-web", "libstd-rust-web-dev-bpf"];

pub struct Tools {
    pub rustc: PathBuf,
    pub bpf_linker: PathBuf,
}

/// Set in the environment, it makes `ensure` run the whole set-up again
/// (apt included): the test that stdout stays clean during set-up uses it.
pub const FORCE_ENV: &str = "OBSERVER_FORCE_SETUP";

fn forced() -> bool {
    std::env::var_os(FORCE_ENV).is_some_and(|v| !v.is_empty() && v != "0")
}

/// What `build` needs: checks quickly, runs the full set-up only when something is missing.
pub fn ensure() -> Result<Tools> {
    match ready() {
        Some(tools) if !forced() => Ok(tools),
        _ => setup(),
    }
}

fn tools_dir() -> PathBuf {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cargo"));
    cargo_home.join("observer-tools")
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/root".into())
}

fn linker_path() -> PathBuf {
    tools_dir().join("bin/bpf-linker")
}

/// Records which bpf-linker version and LLVM major the installed binary was built for.
fn stamp_path() -> PathBuf {
    tools_dir().join("bpf-linker.stamp")
}

fn stamp(llvm_major: u32) -> String {
    format!("bpf-linker {BPF_LINKER_VERSION} llvm-{llvm_major}\n")
}

fn ready() -> Option<Tools> {
    let major = llvm_major().ok()?;
    let bpf_core = sysroot().ok()?.join("lib/rustlib/bpfel-unknown-none");
    let linker_ok = std::fs::read_to_string(stamp_path()).ok()? == stamp(major);
    (bpf_core.is_dir() && linker_ok && linker_path().is_file()).then(|| Tools {
        rustc: RUSTC.into(),
        bpf_linker: linker_path(),
    })
}

pub fn setup() -> Result<Tools> {
    let started = Instant::now();
    ensure_packages(&RUST_PACKAGES)?;
    let major = llvm_major()?;
    eprintln!("xtask: {RUSTC} uses LLVM {major}");
    ensure_packages(&[
        &format!("llvm-{major}-dev"),
        &format!("libpolly-{major}-dev"),
        "libzstd-dev",
    ])?;

    let bpf_core = sysroot()?.join("lib/rustlib/bpfel-unknown-none");
    if !bpf_core.is_dir() {
        bail!(
            "{} is missing: the `libstd-rust-web-dev-bpf` package did not provide core for bpfel",
            bpf_core.display()
        );
    }

    if std::fs::read_to_string(stamp_path()).ok().as_deref() != Some(&stamp(major))
        || !linker_path().is_file()
    {
        install_bpf_linker(major)?;
    } else {
        eprintln!(
            "xtask: bpf-linker {BPF_LINKER_VERSION} (LLVM {major}) already in {}",
            linker_path().display()
        );
    }
    eprintln!(
        "xtask: set-up complete in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(Tools {
        rustc: RUSTC.into(),
        bpf_linker: linker_path(),
    })
}

fn install_bpf_linker(major: u32) -> Result<()> {
    let llvm = PathBuf::from(format!("/usr/lib/llvm-{major}"));
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against {} (about a minute)",
        llvm.display()
    );
    let path = std::env::join_paths(std::iter::once(llvm.join("bin")).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))?;
    status(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args([
                "install",
                "bpf-linker",
                "--force",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args(["--no-default-features", "--features"])
            .arg(format!("llvm-{major}"))
            .arg("--root")
            .arg(tools_dir())
            .env("PATH", path)
            .env("LLVM_PREFIX", &llvm)
            .env_remove("RUSTC")
            .env_remove("RUSTFLAGS"),
    )
    .context("installing bpf-linker")?;
    std::fs::write(stamp_path(), stamp(major)).context("writing the bpf-linker stamp")
}

/// What `cargo xtask vm-test` runs on the host: qemu, the guest's busybox,
/// modprobe/depmod for the guest kernel's modules, cpio for its initramfs, and
/// the decompressors for `.ko.xz` / `.ko.zst` modules.
pub fn ensure_vm_packages() -> Result<()> {
    ensure_packages(&[
        "qemu-system-x86",
        "busybox-static",
        "kmod",
        "cpio",
        "xz-utils",
        "zstd",
    ])
}

/// What the tests use beyond the daemon: Debian's `prometheus` (with
/// `promtool`) for the metrics test, without the node exporter it
/// recommends, and `chromium`, in which the `report` test opens `observer
/// report --html`'s page (headless). Not fatal: without them those tests
/// say why they were skipped.
pub fn ensure_test_packages() {
    for package in ["prometheus", "chromium"] {
        if let Err(e) = ensure_packages_with(&[package], &["--no-install-recommends"]) {
            eprintln!("xtask: {e:#}; the test that needs {package} will be skipped");
        }
    }
}

/// Installs the Debian packages that are not installed yet; no apt call when all are.
/// apt's stdout goes to our stderr: xtask's stdout is kept for what it reports.
fn ensure_packages(packages: &[&str]) -> Result<()> {
    ensure_packages_with(packages, &[])
}

/// As `ensure_packages`, with more arguments for `apt-get install`.
fn ensure_packages_with(packages: &[&str], install_args: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| forced() || !package_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    status(
        as_root("apt-get")
            .arg("update")
            .arg("-q")
            .stdout(std::io::stderr()),
    )?;
    status(
        as_root("apt-get")
            .args(["install", "-y", "-q"])
            .args(install_args)
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(std::io::stderr()),
    )
    .with_context(|| format!("apt-get install {}", missing.join(" ")))
}

fn package_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Abbrev}", package])
        .output()
        .map(|o| o.status.success() && o.stdout.starts_with(b"ii"))
        .unwrap_or(false)
}

fn rustc_output(args: &[&str]) -> Result<String> {
    if !Path::new(RUSTC).exists() {
        bail!("{RUSTC} is not installed");
    }
    let out = Command::new(RUSTC)
        .args(args)
        .output()
        .with_context(|| format!("running {RUSTC}"))?;
    if !out.status.success() {
        bail!("{RUSTC} {args:?} failed");
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn sysroot() -> Result<PathBuf> {
    Ok(rustc_output(&["--print", "sysroot"])?.trim().into())
}

/// The LLVM major `rustc -vV` reports, e.g. 22 for "LLVM version: 22.1.8".
fn llvm_major() -> Result<u32> {
    parse_llvm_major(&rustc_output(&["-vV"])?)
        .with_context(|| format!("no LLVM version in `{RUSTC} -vV`"))
}

fn parse_llvm_major(version_output: &str) -> Option<u32> {
    version_output
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))?
        .split('.')
        .next()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::parse_llvm_major;

    #[test]
    fn llvm_major_from_rustc_vv() {
        let out = "rustc 1.96.0 (abc 2026-05-01)\nbinary: rustc\nhost: x86_64-unknown-linux-gnu\nrelease: 1.96.0\nLLVM version: 22.1.8\n";
        assert_eq!(parse_llvm_major(out), Some(22));
        assert_eq!(parse_llvm_major("rustc 1.96.0\n"), None);
    }
}
