//! `cargo xtask setup`: everything building and testing Rampart needs on a Debian 12
//! host, installed idempotently (each step is skipped when its result is present).
//!
//! The recipe is the verified one in the project's toolchain notes: the eBPF crate
//! builds with the preinstalled nightly (plus rust-src for `-Z build-std=core`), and
//! bpf-linker 0.13.0 is linked against that nightly's own libLLVM 22, because Debian
//! ships no LLVM that new.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, ensure as check, Context, Result};

use crate::vm;

const BPF_LINKER_VERSION: &str = "0.13.0";
/// Matches the LLVM major of the installed rustc (stable and nightly both use 22).
const BPF_LINKER_FEATURE: &str = "llvm-22";
const BPFFS: &str = "/sys/fs/bpf";

/// Debian packages the tests, the demo and the benchmarks use: `ip`/`tc`, nginx as the
/// upstream, openssl for TLS termination in front of it, curl and wrk as clients,
/// `sysctl`/`ps`, ethtool for veth counters, systemd for `systemd-analyze verify`.
const PACKAGES: &[&str] = &[
    "iproute2",
    "nginx-light",
    "openssl",
    "curl",
    "wrk",
    "procps",
    "ethtool",
    "systemd",
];

/// (toolchain, component) pairs; rust-src is what `-Z build-std=core` compiles.
const COMPONENTS: &[(&str, &str)] = &[
    ("nightly", "rust-src"),
    ("nightly", "rustfmt"),
    ("nightly", "clippy"),
    ("stable", "rustfmt"),
    ("stable", "clippy"),
];

/// Runs setup only if something is missing; cheap enough for every xtask command.
pub fn ensure() -> Result<()> {
    let missing = Missing::probe()?;
    if missing.is_empty() {
        return Ok(());
    }
    println!("setup: something is missing, running `cargo xtask setup` first");
    apply(&missing)?;
    Ok(())
}

/// `cargo xtask setup`: installs what is missing and says what it did.
pub fn run() -> Result<()> {
    let missing = Missing::probe()?;
    let did = apply(&missing)?;
    // The guest kernel for the VM tests is fetched here too, so CI does all its
    // downloading in one place; it is cached under target/ and cheap to re-check.
    let cache = vm::VmOptions::new(&crate::workspace_root(), Vec::new()).cache_dir;
    let had_kernel = cache.join("kernel").exists();
    let kernel = vm::ensure_kernel(&cache).context("fetching the 6.1 guest kernel")?;
    if !had_kernel {
        println!(
            "setup: unpacked guest kernel {} for the VM tests",
            kernel.release
        );
    }
    // And the Debian system image the packaging test boots (mmdebstrap; cached).
    let had_image = vm::image::cached_image(&cache, &kernel).exists();
    let image =
        vm::image::ensure_image(&cache, &kernel).context("building the Debian system image")?;
    if !had_image {
        println!("setup: built the Debian system image {}", image.display());
    }
    if did == 0 && had_kernel && had_image {
        println!("setup: everything present, nothing to do");
    }
    Ok(())
}

/// What a probe found missing.
#[derive(Debug, Default)]
struct Missing {
    components: Vec<(&'static str, &'static str)>,
    packages: Vec<&'static str>,
    bpf_linker: bool,
    bpffs: bool,
}

impl Missing {
    fn probe() -> Result<Self> {
        let mut installed = Vec::new();
        for toolchain in ["nightly", "stable"] {
            let out = output(Command::new("rustup").args([
                "component",
                "list",
                "--toolchain",
                toolchain,
                "--installed",
            ]))?;
            installed.extend(out.lines().map(|l| (toolchain, l.trim().to_owned())));
        }
        // Installed components are listed with their target triple (rustfmt-x86_64-…),
        // except rust-src, which has none.
        let components = COMPONENTS
            .iter()
            .filter(|(tc, c)| {
                !installed
                    .iter()
                    .any(|(itc, ic)| itc == tc && (ic == c || ic.starts_with(&format!("{c}-"))))
            })
            .copied()
            .collect();
        Ok(Self {
            components,
            packages: missing_packages()?,
            bpf_linker: !bpf_linker_ok(),
            bpffs: !bpffs_mounted()?,
        })
    }

    fn is_empty(&self) -> bool {
        self.components.is_empty() && self.packages.is_empty() && !self.bpf_linker && !self.bpffs
    }
}

/// Installs what `missing` lists; returns how many steps did something.
fn apply(missing: &Missing) -> Result<usize> {
    let mut did = 0;
    for (toolchain, component) in &missing.components {
        println!("setup: rustup component add {component} --toolchain {toolchain}");
        exec(Command::new("rustup").args([
            "component",
            "add",
            component,
            "--toolchain",
            toolchain,
        ]))?;
        did += 1;
    }
    // Packages before bpf-linker: nothing there needs them, but a failing apt is the
    // more likely error on a fresh machine and is better reported early.
    if !missing.packages.is_empty() {
        install_packages(&missing.packages)?;
        did += 1;
    }
    if missing.bpffs {
        println!("setup: mounting bpffs at {BPFFS}");
        exec(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))?;
        did += 1;
    }
    if missing.bpf_linker {
        install_bpf_linker()?;
        did += 1;
    }
    Ok(did)
}

fn all_packages() -> impl Iterator<Item = &'static str> {
    PACKAGES
        .iter()
        .chain(vm::HOST_PACKAGES)
        .chain(vm::image::HOST_PACKAGES)
        .copied()
}

fn missing_packages() -> Result<Vec<&'static str>> {
    // dpkg-query exits non-zero when one of the names is unknown to dpkg; what it did
    // find is still on stdout, so the status is not checked.
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${db:Status-Abbrev}\n"])
        .args(all_packages())
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .context("running dpkg-query")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let installed: Vec<&str> = text
        .lines()
        .filter_map(|l| {
            let (name, status) = l.split_once(' ')?;
            // Package names may carry an architecture suffix (foo:amd64).
            let name = name.split(':').next()?;
            status.starts_with("ii").then_some(name)
        })
        .collect();
    Ok(all_packages().filter(|p| !installed.contains(p)).collect())
}

fn install_packages(packages: &[&str]) -> Result<()> {
    println!("setup: apt-get install {}", packages.join(" "));
    exec(apt().args(["update", "-q"]))?;
    exec(
        apt()
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(packages),
    )
}

fn apt() -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

fn bpf_linker_ok() -> bool {
    // Running it also proves its libLLVM still resolves (rpath into the nightly).
    Command::new("bpf-linker")
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
        })
}

fn install_bpf_linker() -> Result<()> {
    let sysroot = PathBuf::from(
        output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?.trim(),
    );
    let lib = sysroot.join("lib");
    let versioned = fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so.22"))
        .with_context(|| format!("no libLLVM.so.22* in {}", lib.display()))?;
    // bpf-linker's build links `-lLLVM`, which needs the unversioned name.
    let link = lib.join("libLLVM.so");
    if fs::read_link(&link).ok().as_deref() != Some(Path::new(&versioned)) {
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&versioned, &link)
            .with_context(|| format!("symlinking {}", link.display()))?;
        println!("setup: {} -> {versioned}", link.display());
    }
    println!(
        "setup: cargo install bpf-linker {BPF_LINKER_VERSION} against {} (1-2 minutes)",
        lib.display()
    );
    exec(
        Command::new("cargo")
            .env("LLVM_PREFIX", &sysroot)
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", BPF_LINKER_FEATURE]),
    )?;
    check!(
        bpf_linker_ok(),
        "bpf-linker installed but `bpf-linker --version` does not report {BPF_LINKER_VERSION}; \
         is ~/.cargo/bin first on PATH?"
    );
    Ok(())
}

fn bpffs_mounted() -> Result<bool> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    Ok(mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, kind) = (f.next(), f.next(), f.next());
        dir == Some(BPFFS) && kind == Some("bpf")
    }))
}

/// Runs `cmd` with no stdin (CI has none), failing loudly on a non-zero exit.
pub fn exec(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("starting `{}`", shown(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", shown(cmd));
    }
    Ok(())
}

/// `cmd` as a shell line (with its directory, if set), for messages; `Command`'s own
/// Debug output lists every removed environment variable.
fn shown(cmd: &Command) -> String {
    let mut line = String::new();
    if let Some(dir) = cmd.get_current_dir() {
        line.push_str(&format!("cd {} && ", dir.display()));
    }
    line.push_str(&cmd.get_program().to_string_lossy());
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

/// Runs `cmd` and returns its stdout.
fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting `{}`", shown(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            shown(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// `cargo` in `dir`, without what our own `cargo run` put in the environment: the
/// package variables describe xtask, not the child's package, and rustup's
/// `RUSTUP_TOOLCHAIN` would override `+nightly`-less children and the eBPF crate's
/// rust-toolchain.toml. The user's own settings (CARGO_TARGET_DIR, CARGO_INSTALL_ROOT,
/// ...) are kept.
pub fn cargo(dir: &Path) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(dir);
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_MANIFEST_")
            || matches!(
                &*key,
                "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "RUSTUP_TOOLCHAIN"
            )
        {
            cmd.env_remove(&*key);
        }
    }
    cmd
}
