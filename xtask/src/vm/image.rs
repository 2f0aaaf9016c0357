//! The Debian 12 system disk of the system VM (`cargo xtask test`'s packaging step): a
//! minimal Debian with systemd, nginx, curl and iproute2 from Debian's own packages
//! (mmdebstrap), plus the guest kernel's modules, made once into an ext4 image under
//! the VM cache and used read-only: each run boots a qcow2 overlay of it, which keeps
//! what the run wrote across the guest's reboots and is thrown away after.
//!
//! In the guest, `rampart-vm.service` mounts the host's root (virtiofs) at /host, binds
//! the workspace at its host path, runs the run's run.sh (put on the disk by init.sh at
//! every boot) and hands its status to qemu through isa-debug-exit. A command that
//! reboots the guest is run again after the boot: it keeps its own progress on the disk.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{ensure, Context, Result};

use super::KernelFiles;

/// Bump when what goes into the image changes: a cached image of another version is
/// rebuilt.
const IMAGE_VERSION: u32 = 3;
/// Debian's packages beyond the minimal base: systemd as PID 1 (udev for the network
/// devices, dbus for systemctl), and what the packaging test drives.
const PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "udev",
    "dbus",
    "kmod",
    "iproute2",
    "procps",
    "curl",
    "nginx-light",
];
const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";
/// Sparse: only what is written takes space.
const IMAGE_SIZE: &str = "3G";
/// Host packages that build the image.
pub const HOST_PACKAGES: &[&str] = &["mmdebstrap", "qemu-utils", "e2fsprogs"];

/// The runner unit: after the system is up, run run.sh and report.
const UNIT: &str = "[Unit]
Description=Run the rampart VM test commands
After=multi-user.target
[Service]
Type=oneshot
ExecStart=/usr/local/sbin/rampart-vm
StandardOutput=tty
StandardError=inherit
TTYPath=/dev/ttyS0
TTYReset=no
TTYVHangup=no
[Install]
WantedBy=default.target
";

/// What the runner unit starts: the workspace at its host path, then run.sh.
const RUNNER: &str = r#"#!/bin/sh
# rampart-vm: runs /var/lib/rampart-vm/run.sh and ends qemu with its status.
workdir=$(sed -n 's/.*rampart\.workdir=\([^ ]*\).*/\1/p' /proc/cmdline)
mkdir -p /host
mountpoint -q /host || mount -t virtiofs -o ro hostroot /host
if [ -n "$workdir" ] && ! mountpoint -q "$workdir"; then
    mkdir -p "$workdir" && mount --bind "/host$workdir" "$workdir"
fi
sh /var/lib/rampart-vm/run.sh
status=$?
# A command that reboots the guest says so; its run goes on after the boot.
[ -e /run/rampart-vm-rebooting ] && exit 0
case $status in
    0) /usr/local/sbin/debug-exit 1 ;;
    *) /usr/local/sbin/debug-exit 2 ;;
esac
"#;

/// The cached base image for `kernel`, built when missing (needs network for
/// Debian's packages, and a few minutes).
pub fn ensure_image(cache_dir: &Path, kernel: &KernelFiles) -> Result<PathBuf> {
    let image = cached_image(cache_dir, kernel);
    if image.exists() {
        return Ok(image);
    }
    println!("[vm] building the Debian system image (mmdebstrap; a few minutes, once)");
    let staging = cache_dir.join(format!("system-root.tmp-{}", std::process::id()));
    let _ = fs::remove_dir_all(&staging);
    run(Command::new("mmdebstrap")
        .args(["--variant=minbase", "--mode=root", "--quiet"])
        .arg(format!("--include={}", PACKAGES.join(",")))
        .arg(SUITE)
        .arg(&staging)
        .arg(MIRROR))?;
    customize(&staging, kernel)?;
    let partial = image.with_extension("img.partial");
    let _ = fs::remove_file(&partial);
    run(Command::new("mke2fs")
        .args(["-q", "-t", "ext4", "-L", "rampart-root", "-d"])
        .arg(&staging)
        .arg(&partial)
        .arg(IMAGE_SIZE))?;
    fs::rename(&partial, &image)?;
    let _ = fs::remove_dir_all(&staging);
    Ok(image)
}

/// Where the image for `kernel` is cached (it may not exist yet).
pub fn cached_image(cache_dir: &Path, kernel: &KernelFiles) -> PathBuf {
    cache_dir.join(format!(
        "debian-{SUITE}-system-v{IMAGE_VERSION}-{}.img",
        kernel.release
    ))
}

/// A per-run copy-on-write overlay of `base` in `dir`.
pub fn overlay(base: &Path, dir: &Path) -> Result<PathBuf> {
    let disk = dir.join("system.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(base)
        .arg(&disk))?;
    Ok(disk)
}

fn customize(root: &Path, kernel: &KernelFiles) -> Result<()> {
    write(root, "etc/hostname", "rampart-vm\n", 0o644)?;
    write(
        root,
        "etc/fstab",
        "/dev/vda / ext4 rw,errors=remount-ro 0 1\n",
        0o644,
    )?;
    // No password and no login prompt: nothing logs in, the runner unit does the work.
    let masked = root.join("etc/systemd/system/serial-getty@ttyS0.service");
    let _ = fs::remove_file(&masked);
    std::os::unix::fs::symlink("/dev/null", &masked)?;
    write(root, "etc/systemd/system/rampart-vm.service", UNIT, 0o644)?;
    let wants = root.join("etc/systemd/system/default.target.wants");
    fs::create_dir_all(&wants)?;
    let link = wants.join("rampart-vm.service");
    let _ = fs::remove_file(&link);
    std::os::unix::fs::symlink("/etc/systemd/system/rampart-vm.service", link)?;
    write(root, "usr/local/sbin/rampart-vm", RUNNER, 0o755)?;
    let exit = root.join("usr/local/sbin/debug-exit");
    fs::write(&exit, super::debug_exit::program())?;
    fs::set_permissions(&exit, fs::Permissions::from_mode(0o755))?;
    // The guest kernel's modules, indexed, so udev and mount load what they need.
    let modules = root.join("lib/modules");
    fs::create_dir_all(&modules)?;
    run(Command::new("cp")
        .arg("-a")
        .arg(&kernel.modules_dir)
        .arg(&modules))?;
    // The image's own depmod (kmod is among its packages; the host need not have it).
    run(Command::new("chroot")
        .arg(root)
        .args(["depmod", "-a"])
        .arg(&kernel.release))?;
    Ok(())
}

fn write(root: &Path, path: &str, text: &str, mode: u32) -> Result<()> {
    let path = root.join(path);
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    ensure!(status.success(), "{cmd:?} failed ({status})");
    Ok(())
}
