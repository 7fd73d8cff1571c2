//! `cargo xtask vm-test`: the daemon and its kernel tests on Debian's other
//! kernels (6.1, 6.12, and 5.10 when it can be fetched), each booted under qemu.
//!
//! This module owns everything under `target/vm`:
//! - `debs/` and `k/<version>/`: the kernel packages, downloaded once and unpacked once;
//! - `apt/`: a private apt configuration for Debian 11 (its 5.10), apart from the host's;
//! - `initramfs/<version>/` and `initramfs-<version>.cpio`: busybox, the modules
//!   the guest needs and an `init` written here, rebuilt for every boot;
//! - `out/<version>/`: the one directory the guest can write to (9p). The host
//!   writes the guest's step script there, the guest writes back each step's
//!   log and exit status; the serial console is logged there too.
//!
//! The guest runs on qemu's TCG (KVM is not usable on these machines), sees
//! the host's root read-only under a tmpfs overlay, and runs the same binaries
//! `cargo xtask test` runs, from the same paths.

use std::{
    collections::HashSet,
    ffi::OsString,
    fmt::Write as _,
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use serde_json::Value;

use crate::{cargo, is_root, setup, status};

/// What the guest loads before it mounts anything: 9p over virtio for the
/// shares, overlay for a writable root, sock_diag for `explain`/`who`, veth
/// for the tests' network namespaces. Dependencies are added by modprobe.
const MODULES: [&str; 8] = [
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "overlay",
    "inet_diag",
    "tcp_diag",
    "udp_diag",
    "veth",
];
/// The test binaries of `--quick`, for CI. Left out: the slow ones, which wait
/// out TIME_WAIT (tcp, time_wait), soak (operations) or stall the daemon on
/// purpose (lifecycle, hardening).
const QUICK_TESTS: [&str; 4] = ["bind", "explain", "repro", "cli"];
/// Test binaries the guests skip: they test no kernel (`report` reads a file
/// and opens a page in Chromium, which would crawl under TCG).
const HOST_ONLY_TESTS: [&str; 1] = ["report"];
/// From qemu's start to the guest's first write into its share. TCG boots a
/// Debian kernel in well under a minute; this allows for a loaded host.
const BOOT_SECS: u64 = 300;
/// Per step, enforced in the guest by `timeout`. TCG runs code several times
/// slower than the host, and the TIME_WAIT tests wait for the kernel's 60 s timer.
const OBSERVER_STEP_SECS: u64 = 300;
const TEST_STEP_SECS: u64 = 600;
/// What a step may overrun its limit by before the host gives the guest up:
/// `timeout -k 10`, then writing the result over 9p.
const STEP_GRACE_SECS: u64 = 60;
/// The private apt lists are refreshed when older than this.
const APT_LISTS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KernelArg {
    #[value(name = "6.1")]
    V6_1,
    #[value(name = "6.12")]
    V6_12,
    #[value(name = "5.10")]
    V5_10,
    All,
}

pub struct Options {
    pub kernel: KernelArg,
    pub quick: bool,
    /// Test-name filters for each test binary.
    pub filter: Vec<OsString>,
}

/// A kernel series: which packages are its kernels, and whose apt lists them.
struct Series {
    name: &'static str,
    /// An apt-cache search regex matching the series' generic amd64 kernels.
    pattern: &'static str,
    /// From Debian 11 (through the private apt configuration), not the host's apt.
    bullseye: bool,
}

const SERIES: [Series; 3] = [
    Series {
        name: "6.1",
        pattern: r"^linux-image-6\.1\.0-[0-9]+-amd64-unsigned$",
        bullseye: false,
    },
    Series {
        name: "6.12",
        pattern: r"^linux-image-6\.12\.[0-9]+\+deb12-amd64-unsigned$",
        bullseye: false,
    },
    Series {
        name: "5.10",
        pattern: r"^linux-image-5\.10\.0-[0-9]+-amd64-unsigned$",
        bullseye: true,
    },
];

impl KernelArg {
    fn series(self) -> Vec<&'static Series> {
        let name = match self {
            KernelArg::V6_1 => "6.1",
            KernelArg::V6_12 => "6.12",
            KernelArg::V5_10 => "5.10",
            KernelArg::All => return SERIES.iter().collect(),
        };
        SERIES.iter().filter(|s| s.name == name).collect()
    }
}

/// An unpacked kernel package.
struct Kernel {
    /// What `uname -r` says in the guest, e.g. 6.1.0-57-amd64.
    version: String,
    /// The package file it came from, e.g. linux-image-…_6.1.170-1_amd64.deb.
    deb: String,
    dir: PathBuf,
}

impl Kernel {
    fn vmlinuz(&self) -> PathBuf {
        vmlinuz(&self.dir, &self.version)
    }
}

fn vmlinuz(dir: &Path, version: &str) -> PathBuf {
    dir.join("boot").join(format!("vmlinuz-{version}"))
}

/// What every guest runs: the daemon (also the tests' OBSERVER_BIN) and the steps.
struct Plan {
    observer: PathBuf,
    steps: Vec<Step>,
}

/// One command the guest runs, with its own log and time limit.
struct Step {
    name: String,
    log: String,
    secs: u64,
    cwd: PathBuf,
    argv: Vec<OsString>,
}

/// One line of a summary table.
struct Row {
    step: String,
    result: String,
    secs: Option<f64>,
    ok: bool,
}

/// What happened to one kernel series.
struct Report {
    kernel: String,
    rows: Vec<Row>,
    /// Lines printed under the table: the package, kernel features, skips, where the logs are.
    notes: Vec<String>,
    /// The ends of the logs of what failed, printed before all tables.
    details: Vec<String>,
    failed: bool,
}

pub fn run(opts: &Options, observer: &Path, root: &Path) -> Result<()> {
    let started = Instant::now();
    setup::ensure_vm_packages()?;
    let tests = build_tests(root)?;
    let plan = plan(opts, observer, root, &tests);
    let vm_dir = root.join("target/vm");
    let reports: Vec<Report> = opts
        .kernel
        .series()
        .into_iter()
        .map(|series| kernel_report(&vm_dir, series, opts.kernel, &plan))
        .collect();
    // Details first, so that the tables are what a terminal or CI log ends with.
    for detail in reports.iter().flat_map(|r| &r.details) {
        eprintln!("{detail}");
    }
    for report in &reports {
        print_report(report);
    }
    let failed: Vec<&str> = reports
        .iter()
        .filter(|r| r.failed)
        .map(|r| r.kernel.as_str())
        .collect();
    eprintln!(
        "xtask: vm-test took {:.0} s",
        started.elapsed().as_secs_f64()
    );
    if !failed.is_empty() {
        bail!("vm-test failed on {}", failed.join(", "));
    }
    Ok(())
}

/// Fetches, boots and runs one series; every failure becomes a row, so that
/// the other kernels still run and the table says what went wrong.
fn kernel_report(vm_dir: &Path, series: &Series, arg: KernelArg, plan: &Plan) -> Report {
    match fetch(vm_dir, series) {
        Ok(kernel) => guest(vm_dir, &kernel, plan),
        Err(e) if series.bullseye && arg == KernelArg::All => Report {
            kernel: series.name.into(),
            rows: vec![row("fetch", "skipped", None, true)],
            notes: vec![format!(
                "{}: skipped, its kernel cannot be fetched: {e:#}",
                series.name
            )],
            details: Vec::new(),
            failed: false,
        },
        Err(e) => Report {
            kernel: series.name.into(),
            rows: vec![row("fetch", "FAIL", None, false)],
            notes: vec![format!("{}: cannot fetch its kernel: {e:#}", series.name)],
            details: Vec::new(),
            failed: true,
        },
    }
}

fn row(step: &str, result: &str, secs: Option<f64>, ok: bool) -> Row {
    Row {
        step: step.into(),
        result: result.into(),
        secs,
        ok,
    }
}

// ---------------------------------------------------------------------------
// What the guest runs

/// The kernel test binaries, built on the host as `cargo xtask test` builds
/// them: (target name, executable), from cargo's JSON messages.
fn build_tests(root: &Path) -> Result<Vec<(String, PathBuf)>> {
    let obj = root.join("target/bpf/bpfel-unknown-none/release/observer-ebpf");
    let out = cargo()
        .args([
            "test",
            "--release",
            "--package",
            "observer-tests",
            "--no-run",
        ])
        .arg("--message-format=json")
        .env("OBSERVER_EBPF_OBJ", &obj)
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the kernel tests failed: {}", out.status);
    }
    let tests = test_executables(&String::from_utf8_lossy(&out.stdout));
    if tests.is_empty() {
        bail!("cargo built no test executable for observer-tests");
    }
    Ok(tests)
}

fn test_executables(messages: &str) -> Vec<(String, PathBuf)> {
    let mut tests: Vec<(String, PathBuf)> = messages
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["profile"]["test"] == true)
        .filter_map(|m| {
            let name = m["target"]["name"].as_str()?.to_string();
            Some((name, m["executable"].as_str()?.into()))
        })
        .collect();
    tests.sort();
    tests
}

fn plan(opts: &Options, observer: &Path, root: &Path, tests: &[(String, PathBuf)]) -> Plan {
    let observer_step = |name: &str, args: &[&str]| Step {
        name: name.into(),
        log: String::new(),
        secs: OBSERVER_STEP_SECS,
        cwd: root.into(),
        argv: std::iter::once(observer.as_os_str().to_owned())
            .chain(args.iter().map(OsString::from))
            .collect(),
    };
    let mut steps = vec![
        observer_step("check", &["check"]),
        observer_step("repro all", &["repro", "all"]),
        observer_step("run --repro all", &["run", "--repro", "all"]),
    ];
    for (name, exe) in tests {
        if opts.quick && !QUICK_TESTS.contains(&name.as_str())
            || HOST_ONLY_TESTS.contains(&name.as_str())
        {
            continue;
        }
        let mut argv = vec![exe.as_os_str().to_owned(), "--test-threads=1".into()];
        argv.extend(opts.filter.iter().cloned());
        steps.push(Step {
            name: format!("test {name}"),
            log: String::new(),
            secs: TEST_STEP_SECS,
            // Where `cargo test` runs them: the package's directory.
            cwd: root.join("tests"),
            argv,
        });
    }
    for (i, step) in steps.iter_mut().enumerate() {
        step.log = format!("{:02}-{}.log", i + 1, step.name.replace([' ', '-'], "_"));
    }
    Plan {
        observer: observer.into(),
        steps,
    }
}

// ---------------------------------------------------------------------------
// Kernel packages

/// apt, with the host's configuration or with a private one (`options`).
struct Apt {
    options: Vec<String>,
    /// Where the private configuration keeps its `updated` stamp.
    private_dir: Option<PathBuf>,
    label: &'static str,
}

impl Apt {
    fn host() -> Apt {
        Apt {
            options: Vec::new(),
            private_dir: None,
            label: "the host's apt",
        }
    }

    /// Debian 11 from the mirrors the host already uses, in its own state and
    /// cache directories: the host's sources and lists stay as they are.
    fn bullseye(dir: &Path) -> Result<Apt> {
        for sub in ["state/lists/partial", "cache/archives/partial"] {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        let sources = dir.join("sources.list");
        fs::write(&sources, bullseye_sources(&host_mirrors()))
            .with_context(|| format!("writing {}", sources.display()))?;
        let mut options = vec![
            format!("Dir::Etc::sourcelist={}", sources.display()),
            "Dir::Etc::sourceparts=-".into(),
            format!("Dir::State={}", dir.join("state").display()),
            format!("Dir::Cache={}", dir.join("cache").display()),
            "APT::Get::List-Cleanup=0".into(),
            // Only the package lists are needed, not their translations nor
            // the AppStream metadata the host's apt.conf.d may ask for.
            "Acquire::Languages=none".into(),
            "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".into(),
        ];
        if is_root() {
            // apt drops to `_apt` to download, which cannot write under target/.
            options.push("APT::Sandbox::User=root".into());
        }
        Ok(Apt {
            options,
            private_dir: Some(dir.into()),
            label: "the private bullseye apt",
        })
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        for o in &self.options {
            cmd.arg("-o").arg(o);
        }
        cmd
    }

    fn search(&self, pattern: &str) -> Result<Vec<String>> {
        let out = self
            .command("apt-cache")
            .args(["search", "--names-only", pattern])
            .stderr(Stdio::inherit())
            .output()
            .context("running apt-cache search")?;
        if !out.status.success() {
            bail!("apt-cache search {pattern} failed: {}", out.status);
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect())
    }

    fn update(&self) -> Result<()> {
        eprintln!("xtask: apt-get update ({})", self.label);
        let mut cmd = match self.private_dir {
            // Without --error-on=any, a mirror that cannot be reached is only a
            // warning, and its reason would be lost behind "no package matches".
            Some(_) => {
                let mut cmd = self.command("apt-get");
                cmd.arg("--error-on=any");
                cmd
            }
            None => crate::as_root("apt-get"),
        };
        run_apt(cmd.args(["update", "-q"]))
            .with_context(|| format!("apt-get update with {}", self.label))?;
        if let Some(dir) = &self.private_dir {
            fs::write(dir.join("updated"), "").context("writing the apt stamp")?;
        }
        Ok(())
    }

    /// The private lists when they are older than a day (or missing); the
    /// host's only when they know no package of the series at all.
    fn lists_stale(&self, found: &[String]) -> bool {
        match &self.private_dir {
            Some(dir) => fs::metadata(dir.join("updated"))
                .and_then(|m| m.modified())
                .map(|t| age(t) > APT_LISTS_MAX_AGE)
                .unwrap_or(true),
            None => found.is_empty(),
        }
    }

    /// The newest package matching `pattern`, after an `apt-get update` when
    /// the lists are stale. A failed update is only fatal without old lists.
    fn newest(&self, pattern: &str) -> Result<String> {
        let mut found = self.search(pattern)?;
        if self.lists_stale(&found) {
            match self.update() {
                Ok(()) => found = self.search(pattern)?,
                Err(e) if !found.is_empty() => {
                    eprintln!("xtask: {e:#}; using the lists from before")
                }
                Err(e) => return Err(e),
            }
        }
        found
            .into_iter()
            .max_by_key(|p| version_key(p))
            .with_context(|| format!("no package matches {pattern} in {}", self.label))
    }

    fn download(&self, package: &str, debs: &Path) -> Result<PathBuf> {
        fs::create_dir_all(debs).with_context(|| format!("creating {}", debs.display()))?;
        eprintln!("xtask: downloading {package}");
        let mut cmd = self.command("apt-get");
        if is_root() && self.private_dir.is_none() {
            // As above: `_apt` cannot write into target/vm/debs.
            cmd.args(["-o", "APT::Sandbox::User=root"]);
        }
        run_apt(cmd.args(["download", "-q", package]).current_dir(debs))
            .with_context(|| format!("apt-get download {package} with {}", self.label))?;
        cached_deb(debs, package)
            .with_context(|| format!("apt-get download left no {package}_*.deb"))
    }
}

/// Runs apt with its stdout on our stderr; a failure's error carries apt's
/// first `E:` line, the reason (apt's whole stderr is passed on as well).
fn run_apt(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .stdout(std::io::stderr())
        .stderr(Stdio::piped())
        .output()
        .context("running apt-get")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprint!("{stderr}");
    if !out.status.success() {
        let reason = stderr
            .lines()
            .find(|l| l.starts_with("E: "))
            .unwrap_or("see apt's messages above");
        bail!("{}: {reason}", out.status);
    }
    Ok(())
}

fn age(t: SystemTime) -> Duration {
    SystemTime::now().duration_since(t).unwrap_or_default()
}

/// Orders kernel package names by the numbers in them: 6.1.0-57 after 6.1.0-9.
fn version_key(package: &str) -> Vec<u64> {
    package
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// `linux-image-6.1.0-57-amd64-unsigned` → `6.1.0-57-amd64`, the guest's `uname -r`.
fn kernel_version(package: &str) -> Option<&str> {
    package
        .strip_prefix("linux-image-")?
        .strip_suffix("-unsigned")
}

/// The Debian archive and security URLs the host's apt sources use: this
/// machine reaches Debian only through them, so the private sources reuse them.
fn host_mirrors() -> (String, String) {
    let uris = host_source_uris();
    let find = |suffix: &str, default: &str| {
        uris.iter()
            .find(|u| u.trim_end_matches('/').ends_with(suffix))
            .map_or_else(|| default.to_string(), |u| u.trim_end_matches('/').into())
    };
    (
        find("/debian", "http://deb.debian.org/debian"),
        find(
            "/debian-security",
            "http://security.debian.org/debian-security",
        ),
    )
}

/// Every http(s) URI in /etc/apt/sources.list and sources.list.d/*.{list,sources}.
fn host_source_uris() -> Vec<String> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        files.extend(
            dir.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "list" || x == "sources")),
        );
    }
    files
        .iter()
        .filter_map(|f| fs::read_to_string(f).ok())
        .flat_map(|text| {
            text.lines()
                .filter(|l| !l.trim_start().starts_with('#'))
                .flat_map(|l| l.split_whitespace())
                .filter(|w| w.starts_with("http://") || w.starts_with("https://"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

fn bullseye_sources((archive, security): &(String, String)) -> String {
    let signed = if Path::new(KEYRING).is_file() {
        format!("[signed-by={KEYRING}] ")
    } else {
        String::new()
    };
    format!(
        "# cargo xtask vm-test: Debian 11, for its 5.10 kernel only\n\
         deb {signed}{archive} bullseye main\n\
         deb {signed}{security} bullseye-security main\n"
    )
}

/// The newest kernel of the series, downloaded and unpacked unless it already is.
fn fetch(vm_dir: &Path, series: &Series) -> Result<Kernel> {
    let apt = if series.bullseye {
        Apt::bullseye(&vm_dir.join("apt"))?
    } else {
        Apt::host()
    };
    let package = apt.newest(series.pattern)?;
    let version = kernel_version(&package)
        .with_context(|| format!("{package} is not named like a kernel image"))?
        .to_string();
    let debs = vm_dir.join("debs");
    let dir = vm_dir.join("k").join(&version);
    if !vmlinuz(&dir, &version).is_file() {
        let deb = match cached_deb(&debs, &package) {
            Some(deb) => deb,
            None => apt.download(&package, &debs)?,
        };
        unpack(&deb, &dir, &version)?;
    }
    let deb = cached_deb(&debs, &package)
        .and_then(|p| Some(p.file_name()?.to_string_lossy().into_owned()))
        .unwrap_or_else(|| package.clone());
    eprintln!("xtask: {}: kernel {version} from {deb}", series.name);
    Ok(Kernel { version, deb, dir })
}

fn cached_deb(debs: &Path, package: &str) -> Option<PathBuf> {
    let prefix = format!("{package}_");
    fs::read_dir(debs)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
}

/// Unpacks beside the final directory and renames it into place, so that an
/// interrupted unpack is never taken for a cached kernel.
fn unpack(deb: &Path, dir: &Path, version: &str) -> Result<()> {
    let partial = dir.with_file_name(format!(".{version}.partial"));
    if partial.exists() {
        fs::remove_dir_all(&partial).with_context(|| format!("removing {}", partial.display()))?;
    }
    fs::create_dir_all(&partial).with_context(|| format!("creating {}", partial.display()))?;
    eprintln!("xtask: unpacking {}", deb.display());
    status(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&partial))
        .with_context(|| format!("unpacking {}", deb.display()))?;
    if !vmlinuz(&partial, version).is_file() {
        bail!("{} has no boot/vmlinuz-{version}", deb.display());
    }
    // The package ships no modules.dep (its postinst makes it); modprobe needs one.
    status(
        Command::new("/sbin/depmod")
            .arg("-b")
            .arg(&partial)
            .arg(version),
    )
    .with_context(|| format!("depmod for {version}"))?;
    fs::rename(&partial, dir).with_context(|| format!("renaming to {}", dir.display()))
}

// ---------------------------------------------------------------------------
// The initramfs

/// Busybox, the modules and `init`, as an uncompressed newc cpio (the kernel
/// takes it as is, and TCG would spend seconds inflating it).
fn initramfs(vm_dir: &Path, kernel: &Kernel, out: &Path) -> Result<PathBuf> {
    let tree = vm_dir.join("initramfs").join(&kernel.version);
    if tree.exists() {
        fs::remove_dir_all(&tree).with_context(|| format!("removing {}", tree.display()))?;
    }
    for sub in ["bin", "proc", "sys", "dev", "host", "rw", "newroot", "mods"] {
        fs::create_dir_all(tree.join(sub))
            .with_context(|| format!("creating {}", tree.join(sub).display()))?;
    }
    fs::copy("/bin/busybox", tree.join("bin/busybox")).context("copying /bin/busybox")?;
    let modules = install_modules(kernel, &tree.join("mods"))?;
    let init = tree.join("init");
    fs::write(&init, init_script(&modules, out)?).context("writing init")?;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755))?;
    let cpio = vm_dir.join(format!("initramfs-{}.cpio", kernel.version));
    write_cpio(&tree, &cpio)?;
    Ok(cpio)
}

/// The `.ko` files of MODULES and their dependencies, dependencies first, as
/// `modprobe --show-depends` lists them for the unpacked kernel.
fn module_files(kernel: &Kernel) -> Result<Vec<PathBuf>> {
    let mut seen = HashSet::new();
    let mut files = Vec::new();
    for module in MODULES {
        let out = Command::new("/sbin/modprobe")
            .arg("-d")
            .arg(&kernel.dir)
            .args(["-S", &kernel.version, "--show-depends", module])
            // The host's /etc/modprobe.d is for the host's kernel, not this one.
            .args(["-C", "/dev/null"])
            .stderr(Stdio::inherit())
            .output()
            .context("running modprobe")?;
        if !out.status.success() {
            bail!(
                "modprobe finds no {module} in {} {}",
                kernel.version,
                kernel.dir.display()
            );
        }
        // `insmod PATH [params]` per module, `builtin NAME` for built-in ones.
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let mut words = line.split_whitespace();
            if let (Some("insmod"), Some(path)) = (words.next(), words.next())
                && seen.insert(path.to_string())
            {
                files.push(PathBuf::from(path));
            }
        }
    }
    Ok(files)
}

/// Copies the modules into `mods`, decompressed (busybox insmod takes plain
/// `.ko` only); returns their names in load order.
fn install_modules(kernel: &Kernel, mods: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for file in module_files(kernel)? {
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("module path {}", file.display()))?;
        let (plain, decompress) = match name.rsplit_once('.') {
            Some((stem, "xz")) => (stem, Some(["xz", "-dc"])),
            Some((stem, "zst")) => (stem, Some(["zstd", "-qdc"])),
            _ => (name, None),
        };
        let target = mods.join(plain);
        match decompress {
            Some([tool, flag]) => decompress_to(tool, flag, &file, &target)?,
            None => {
                fs::copy(&file, &target).with_context(|| format!("copying {}", file.display()))?;
            }
        }
        names.push(plain.to_string());
    }
    Ok(names)
}

/// `tool flag file > target`. Not through `status`, which sends a child's
/// stdout to our stderr.
fn decompress_to(tool: &str, flag: &str, file: &Path, target: &Path) -> Result<()> {
    let out = Command::new(tool)
        .arg(flag)
        .arg(file)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {tool}"))?;
    if !out.status.success() || out.stdout.is_empty() {
        bail!("{tool} {flag} {} failed: {}", file.display(), out.status);
    }
    fs::write(target, out.stdout).with_context(|| format!("writing {}", target.display()))
}

/// Archives `tree` with cpio, parents listed before their contents (the
/// kernel's unpacker creates each path as it comes).
fn write_cpio(tree: &Path, cpio: &Path) -> Result<()> {
    let mut list = String::new();
    list_tree(tree, Path::new(""), &mut list)?;
    let mut child = Command::new("cpio")
        .args(["-o", "-H", "newc", "--quiet"])
        .current_dir(tree)
        .stdin(Stdio::piped())
        .stdout(fs::File::create(cpio).with_context(|| format!("creating {}", cpio.display()))?)
        .spawn()
        .context("running cpio")?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().context("cpio's stdin")?;
        stdin
            .write_all(list.as_bytes())
            .context("writing to cpio")?;
    }
    let st = child.wait()?;
    if !st.success() {
        bail!("cpio failed: {st}");
    }
    Ok(())
}

fn list_tree(root: &Path, rel: &Path, list: &mut String) -> Result<()> {
    let mut entries: Vec<_> = fs::read_dir(root.join(rel))?
        .flatten()
        .map(|e| rel.join(e.file_name()))
        .collect();
    entries.sort();
    for entry in entries {
        writeln!(list, "{}", entry.display())?;
        if root.join(&entry).is_dir() {
            list_tree(root, &entry, list)?;
        }
    }
    Ok(())
}

/// The guest's PID 1 (busybox sh): modules, the overlay root over the host's,
/// the kernel file systems the daemon needs, then the step script in a chroot.
/// It marks `booted` and `finished` in the share, which is how the host tells
/// a guest that did not boot from one that did not finish.
fn init_script(modules: &[String], out: &Path) -> Result<String> {
    let out = utf8(out)?;
    let mut s = String::from(
        "#!/bin/busybox sh\n\
         # PID 1 of a `cargo xtask vm-test` guest, written by xtask/src/vm.rs.\n\
         /bin/busybox --install -s /bin\n\
         export PATH=/bin\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sysfs /sys\n\
         mount -t devtmpfs devtmpfs /dev\n\
         # The initramfs has no /dev/console for the kernel to give us: take it now.\n\
         exec </dev/console >/dev/console 2>&1\n\
         fail() { echo \"vm-test: $*\"; poweroff -f; }\n",
    );
    for m in modules {
        writeln!(s, "insmod /mods/{m} || echo \"vm-test: insmod {m} failed\"")?;
    }
    write!(
        s,
        "mount -t 9p -o trans=virtio,version=9p2000.L,cache=loose,ro hostroot /host || fail 'mounting the host root (9p) failed'\n\
         mount -t tmpfs -o size=1g tmpfs /rw\n\
         mkdir -p /rw/upper /rw/work\n\
         mount -t overlay overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work /newroot || fail 'mounting the overlay root failed'\n\
         R=/newroot\n\
         mount -t proc proc $R/proc\n\
         mount -t sysfs sysfs $R/sys\n\
         mount -t devtmpfs devtmpfs $R/dev\n\
         mkdir -p $R/dev/pts $R/dev/shm\n\
         mount -t devpts devpts $R/dev/pts\n\
         mount -t tmpfs tmpfs $R/dev/shm\n\
         mount -t cgroup2 cgroup2 $R/sys/fs/cgroup\n\
         mount -t tracefs tracefs $R/sys/kernel/tracing\n\
         mount -t debugfs debugfs $R/sys/kernel/debug\n\
         mount -t bpf bpf $R/sys/fs/bpf\n\
         mount -t tmpfs tmpfs $R/run\n\
         mkdir -p $R{out}\n\
         mount -t 9p -o trans=virtio,version=9p2000.L,cache=none outshare $R{out} || fail 'mounting the results share (9p) failed'\n\
         ip link set lo up\n\
         uname -r > $R{out}/booted\n\
         echo \"vm-test: $(uname -r) up, running {out}/guest.sh\"\n\
         # Booted quietly; from now on warnings (lockups, splats) reach the console with their\n\
         # stacks, which print at the default level 4: the console needs 5 (not 6: no info chatter).\n\
         echo 5 > /proc/sys/kernel/printk\n\
         chroot $R /bin/sh {out}/guest.sh > $R{out}/guest.log 2>&1\n\
         echo $? > $R{out}/finished\n\
         sync\n\
         umount $R{out}\n\
         poweroff -f\n"
    )?;
    Ok(s)
}

/// The script the guest runs in the chroot: the kernel's features, then each
/// step under `timeout`, appending `rc<TAB>start<TAB>end<TAB>name` to `results`.
fn guest_script(plan: &Plan, out: &Path) -> Result<String> {
    let out = quote(utf8(out)?);
    let mut s = format!(
        "# written by `cargo xtask vm-test` (xtask/src/vm.rs), run in the guest's chroot\n\
         OUT={out}\n\
         export OBSERVER_BIN={}\n\
         export RUST_BACKTRACE=1\n\
         T=/sys/kernel/tracing\n\
         {{\n\
         echo \"release $(uname -r)\"\n\
         if [ -e /sys/kernel/btf/vmlinux ]; then echo 'btf yes'; else echo 'btf no'; fi\n\
         echo \"inet_bind_functions $(grep -c inet_bind $T/available_filter_functions)\"\n\
         if echo 'p:obs_probe inet_bind' >> $T/kprobe_events; then\n\
         echo 'kprobe yes'; echo '-:obs_probe' >> $T/kprobe_events\n\
         else echo 'kprobe no'; fi\n\
         }} > \"$OUT/kernel-info\" 2>&1\n\
         step() {{\n\
         name=$1 log=$2 secs=$3 dir=$4; shift 4\n\
         start=$(date +%s.%N)\n\
         (cd \"$dir\" && exec timeout -k 10 \"$secs\" \"$@\") > \"$OUT/$log\" 2>&1 < /dev/null\n\
         rc=$?\n\
         printf '%s\\t%s\\t%s\\t%s\\n' \"$rc\" \"$start\" \"$(date +%s.%N)\" \"$name\" >> \"$OUT/results\"\n\
         }}\n",
        quote(utf8(&plan.observer)?)
    );
    for step in &plan.steps {
        let argv: Vec<String> = step
            .argv
            .iter()
            .map(|a| a.to_str().map(quote).context("a non-UTF-8 argument"))
            .collect::<Result<_>>()?;
        writeln!(
            s,
            "step {} {} {} {} {}",
            quote(&step.name),
            quote(&step.log),
            step.secs,
            quote(utf8(&step.cwd)?),
            argv.join(" ")
        )?;
    }
    Ok(s)
}

fn utf8(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

/// Single-quotes for sh.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

// ---------------------------------------------------------------------------
// One guest

/// Boots `kernel`, runs the steps, and turns what came back into a report.
fn guest(vm_dir: &Path, kernel: &Kernel, plan: &Plan) -> Report {
    let out = vm_dir.join("out").join(&kernel.version);
    let mut report = Report {
        kernel: kernel.version.clone(),
        rows: Vec::new(),
        notes: vec![format!("{}: package {}", kernel.version, kernel.deb)],
        details: Vec::new(),
        failed: false,
    };
    match boot(vm_dir, kernel, plan, &out) {
        Ok(run) => collect(&mut report, &run, &plan.steps, &out),
        Err(e) => {
            report.rows.push(row("boot", "FAIL", None, false));
            report.notes.push(format!("{}: {e:#}", kernel.version));
        }
    }
    report.failed = report.rows.iter().any(|r| !r.ok);
    if report.failed {
        report.notes.push(format!(
            "{}: full log in {}/",
            kernel.version,
            out.display()
        ));
    }
    report
}

/// How a guest's run ended, seen from the host.
struct GuestRun {
    boot_secs: Option<f64>,
    wall_secs: f64,
    timed_out: bool,
}

fn boot(vm_dir: &Path, kernel: &Kernel, plan: &Plan, out: &Path) -> Result<GuestRun> {
    if out.exists() {
        fs::remove_dir_all(out).with_context(|| format!("removing {}", out.display()))?;
    }
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    fs::write(out.join("guest.sh"), guest_script(plan, out)?).context("writing guest.sh")?;
    let initrd = initramfs(vm_dir, kernel, out)?;
    eprintln!(
        "xtask: booting {} under qemu (TCG), {} steps",
        kernel.version,
        plan.steps.len()
    );
    let child = qemu(kernel, &initrd, out)?
        .spawn()
        .context("starting qemu-system-x86_64")?;
    watch(child, &kernel.version, out, &plan.steps)
}

fn qemu(kernel: &Kernel, initrd: &Path, out: &Path) -> Result<Command> {
    let out_str = utf8(out)?;
    if out_str.contains(',') {
        bail!("{out_str}: qemu's -virtfs cannot take a path with a comma");
    }
    let log = fs::File::create(out.join("qemu.log")).context("creating qemu.log")?;
    let mut cmd = Command::new("qemu-system-x86_64");
    // thread=single: with one host thread per vCPU, a vCPU can run a stale
    // translation of kernel text another vCPU just live-patched (static keys
    // flip as tracepoints attach and detach) and the guest oopses on a
    // leftover int3 in handle_softirqs (seen on 6.1 and 6.12). Two vCPUs
    // taking turns on one thread see every patch at once.
    cmd.args(["-machine", "q35", "-accel", "tcg,thread=single", "-cpu", "max"])
        .args(["-m", "2048", "-smp", "2"])
        .args(["-display", "none", "-monitor", "none", "-nic", "none"])
        .arg("-no-reboot")
        .arg("-serial")
        .arg(format!("file:{out_str}/console.log"))
        .arg("-kernel")
        .arg(kernel.vmlinuz())
        .arg("-initrd")
        .arg(initrd)
        // panic=-1 reboots at once, and -no-reboot turns that into qemu's exit.
        .args(["-append", "console=ttyS0 panic=-1 quiet loglevel=4"])
        .arg("-virtfs")
        .arg("local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap,id=hostroot")
        .arg("-virtfs")
        .arg(format!(
            "local,path={out_str},mount_tag=outshare,security_model=none,multidevs=remap,id=outshare"
        ))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    Ok(cmd)
}

/// Waits for qemu, printing each step as its result arrives. A guest that
/// makes no progress for longer than the current phase may take (booting, or
/// the running step's own limit, which `timeout` should have enforced) is
/// stuck, say in a kernel lockup: it is killed then, not hours later.
fn watch(mut child: Child, version: &str, out: &Path, steps: &[Step]) -> Result<GuestRun> {
    let started = Instant::now();
    let mut boot_secs = None;
    let mut reported = 0;
    let mut progress = Instant::now();
    let timed_out = loop {
        let exited = child.try_wait().context("waiting for qemu")?.is_some();
        if boot_secs.is_none() && out.join("booted").exists() {
            let secs = started.elapsed().as_secs_f64();
            eprintln!("xtask: [{version}] booted in {secs:.1} s");
            boot_secs = Some(secs);
            progress = Instant::now();
        }
        let results = read_results(out);
        for r in &results[reported..] {
            let (word, _) = r.verdict();
            eprintln!("xtask: [{version}] {}: {word} ({:.1} s)", r.name, r.secs);
            progress = Instant::now();
        }
        reported = results.len();
        if exited {
            break false;
        }
        if progress.elapsed() > phase_limit(steps, boot_secs.is_some(), reported) {
            eprintln!("xtask: [{version}] no progress in time: stopping qemu");
            // Our own child, by its pid.
            child.kill().context("stopping qemu")?;
            child.wait().context("waiting for qemu")?;
            break true;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    Ok(GuestRun {
        boot_secs,
        wall_secs: started.elapsed().as_secs_f64(),
        timed_out,
    })
}

/// How long the guest may go without progress: BOOT_SECS until it has booted,
/// then the running step's limit plus STEP_GRACE_SECS (after the last step:
/// the grace alone, to power off).
fn phase_limit(steps: &[Step], booted: bool, done: usize) -> Duration {
    let secs = match steps.get(done) {
        _ if !booted => BOOT_SECS,
        Some(step) => step.secs + STEP_GRACE_SECS,
        None => STEP_GRACE_SECS,
    };
    Duration::from_secs(secs)
}

/// One line of the guest's `results`.
struct StepResult {
    name: String,
    rc: i32,
    secs: f64,
}

impl StepResult {
    /// The table's word for it, and whether it passed.
    fn verdict(&self) -> (String, bool) {
        match self.rc {
            0 => ("ok".into(), true),
            // timeout's own codes: the step ran out of time (and was killed).
            124 | 137 => ("TIMEOUT".into(), false),
            rc => (format!("FAIL (exit {rc})"), false),
        }
    }
}

fn read_results(out: &Path) -> Vec<StepResult> {
    fs::read_to_string(out.join("results"))
        .unwrap_or_default()
        // A line still being written has no newline yet: it is read next time.
        .split_inclusive('\n')
        .filter_map(|l| parse_result(l.strip_suffix('\n')?))
        .collect()
}

fn parse_result(line: &str) -> Option<StepResult> {
    let mut f = line.splitn(4, '\t');
    let rc = f.next()?.parse().ok()?;
    let start: f64 = f.next()?.parse().ok()?;
    let end: f64 = f.next()?.parse().ok()?;
    Some(StepResult {
        rc,
        secs: end - start,
        name: f.next()?.to_string(),
    })
}

/// Rows for boot, every planned step and the whole run; notes for the
/// kernel's features and for what failed.
fn collect(report: &mut Report, run: &GuestRun, steps: &[Step], out: &Path) {
    let version = report.kernel.clone();
    match run.boot_secs {
        Some(s) => report.rows.push(row("boot", "ok", Some(s), true)),
        None => {
            report.rows.push(row("boot", "FAIL", None, false));
            report.details.push(format!(
                "{version}: the guest did not boot; its console:\n{}\nqemu:\n{}",
                tail(&out.join("console.log"), 30),
                tail(&out.join("qemu.log"), 10)
            ));
        }
    }
    let results = read_results(out);
    for step in steps {
        match results.iter().find(|r| r.name == step.name) {
            Some(r) => {
                let (word, ok) = r.verdict();
                report.rows.push(row(&step.name, &word, Some(r.secs), ok));
                if !ok {
                    let log = out.join(&step.log);
                    report.notes.push(format!(
                        "{version}: {} failed: {}",
                        step.name,
                        log.display()
                    ));
                    report.details.push(format!(
                        "{version}: {}, the end of {}:\n{}",
                        step.name,
                        log.display(),
                        tail(&log, 30)
                    ));
                }
            }
            // Its log exists: the guest stopped (or was stopped) while it ran.
            None if out.join(&step.log).exists() => {
                let log = out.join(&step.log);
                report
                    .rows
                    .push(row(&step.name, "INTERRUPTED", None, false));
                report.details.push(format!(
                    "{version}: {} did not finish, the end of {}:\n{}",
                    step.name,
                    log.display(),
                    tail(&log, 30)
                ));
            }
            None => report.rows.push(row(&step.name, "not run", None, false)),
        }
    }
    let finished = out.join("finished").exists();
    let result = match (finished, run.timed_out) {
        (true, _) => "finished",
        (false, true) => "TIMEOUT",
        (false, false) => "FAIL (guest stopped early)",
    };
    report
        .rows
        .push(row("boot+run", result, Some(run.wall_secs), finished));
    if let Some(info) = kernel_info(out) {
        report.notes.push(format!("{version}: {info}"));
    }
}

/// The guest's `kernel-info`, as one line.
fn kernel_info(out: &Path) -> Option<String> {
    let text = fs::read_to_string(out.join("kernel-info")).ok()?;
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
            .unwrap_or("?")
            .to_string()
    };
    Some(format!(
        "/sys/kernel/btf/vmlinux: {}; inet_bind lines in available_filter_functions: {}; kprobe p:inet_bind: {}",
        get("btf"),
        get("inet_bind_functions"),
        get("kprobe")
    ))
}

fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_else(|e| format!("({e})"));
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(n);
    lines[from..]
        .iter()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn print_report(report: &Report) {
    eprintln!();
    eprintln!(
        "{:<24} {:<24} {:<28} {:>8}",
        "KERNEL", "STEP", "RESULT", "SECONDS"
    );
    for r in &report.rows {
        let secs = r.secs.map_or_else(|| "-".into(), |s| format!("{s:.1}"));
        eprintln!(
            "{:<24} {:<24} {:<28} {secs:>8}",
            report.kernel, r.step, r.result
        );
    }
    for note in &report.notes {
        eprintln!("{note}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_kernel_by_number() {
        let names = [
            "linux-image-6.1.0-9-amd64-unsigned",
            "linux-image-6.1.0-57-amd64-unsigned",
        ];
        let newest = names.iter().max_by_key(|p| version_key(p)).unwrap();
        assert_eq!(kernel_version(newest), Some("6.1.0-57-amd64"));
        assert_eq!(
            kernel_version("linux-image-6.12.117+deb12-amd64-unsigned"),
            Some("6.12.117+deb12-amd64")
        );
    }

    #[test]
    fn results_lines() {
        let r = parse_result("1\t10.5\t12.0\ttest bind").unwrap();
        assert_eq!((r.rc, r.secs, r.name.as_str()), (1, 1.5, "test bind"));
        assert_eq!(r.verdict(), ("FAIL (exit 1)".to_string(), false));
        assert!(parse_result("garbage").is_none());
    }

    #[test]
    fn test_executables_from_cargo_json() {
        let json = r#"{"reason":"compiler-artifact","profile":{"test":true},"target":{"name":"bind"},"executable":"/t/bind-1"}
{"reason":"compiler-artifact","profile":{"test":false},"target":{"name":"bindloop"},"executable":"/t/bindloop"}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            test_executables(json),
            vec![("bind".to_string(), PathBuf::from("/t/bind-1"))]
        );
    }

    #[test]
    fn quoting() {
        assert_eq!(quote("it's"), r"'it'\''s'");
    }
}
