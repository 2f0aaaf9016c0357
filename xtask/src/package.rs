//! `cargo xtask package`: the Debian package of the release build, with dpkg-deb.
//!
//! What it installs: /usr/bin/rampart; the systemd unit (packaging/rampart.service);
//! /etc/rampart/{rampart,policy}.toml as conffiles (the commented examples); man pages
//! and bash/zsh/fish completions generated from the clap definitions by the binary
//! itself; the maintainer scripts in packaging/deb. State, runtime and log directories
//! come from the unit (StateDirectory=, RuntimeDirectory=, LogsDirectory=).

use std::{
    fs,
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{ensure, Context, Result};

use crate::setup::{cargo, exec};

/// Arguments of `cargo xtask package`.
#[derive(clap::Args)]
pub struct PackageArgs {
    /// Debian revision appended to the crate version (`<version>-<revision>`); a larger
    /// one makes an upgrade of an installed package.
    #[arg(long, default_value = "1")]
    pub revision: String,
    /// Skip `cargo build --release` and package the binary already built.
    #[arg(long)]
    pub no_build: bool,
}

/// Maintainer scripts, from packaging/deb.
const SCRIPTS: &[&str] = &["postinst", "prerm", "postrm"];
/// (source under the workspace, path in the package) of the configuration files.
const CONFFILES: &[(&str, &str)] = &[
    ("examples/rampart.toml", "etc/rampart/rampart.toml"),
    ("examples/policy.toml", "etc/rampart/policy.toml"),
];
/// (shell, where the package puts its completion script).
const COMPLETIONS: &[(&str, &str)] = &[
    ("bash", "usr/share/bash-completion/completions/rampart"),
    ("zsh", "usr/share/zsh/vendor-completions/_rampart"),
    ("fish", "usr/share/fish/vendor_completions.d/rampart.fish"),
];

/// Builds the package; returns the path of the .deb.
pub fn run(args: &PackageArgs) -> Result<PathBuf> {
    let root = crate::workspace_root();
    if !args.no_build {
        exec(cargo(&root).args(["build", "--release", "-p", "rampart"]))?;
    }
    let binary = root.join("target/release/rampart");
    ensure!(binary.exists(), "{} is not built", binary.display());
    // xtask shares the workspace's version.
    let version = format!("{}-{}", env!("CARGO_PKG_VERSION"), args.revision);
    let out = root.join("target/package");
    let stage = out.join(format!("rampart_{version}_amd64"));
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    }

    let usr_bin = stage.join("usr/bin/rampart");
    copy(&binary, &usr_bin, 0o755)?;
    exec(Command::new("strip").arg("--strip-debug").arg(&usr_bin))?;
    copy(
        &root.join("packaging/rampart.service"),
        &stage.join("lib/systemd/system/rampart.service"),
        0o644,
    )?;
    for (src, dst) in CONFFILES {
        copy(&root.join(src), &stage.join(dst), 0o644)?;
    }
    for (shell, dst) in COMPLETIONS {
        let text = output(Command::new(&binary).args(["completions", shell]))?;
        write(&stage.join(dst), &text, 0o644)?;
    }
    let man = stage.join("usr/share/man/man1");
    exec(Command::new(&binary).arg("manpages").arg(&man))?;
    for page in fs::read_dir(&man)? {
        // -n: no name or time stamp in the header, so a rebuild is byte-identical.
        exec(Command::new("gzip").args(["-9", "-n"]).arg(page?.path()))?;
    }
    write(
        &stage.join("usr/share/doc/rampart/copyright"),
        COPYRIGHT.as_bytes(),
        0o644,
    )?;

    let debian = stage.join("DEBIAN");
    for script in SCRIPTS {
        copy(
            &root.join("packaging/deb").join(script),
            &debian.join(script),
            0o755,
        )?;
    }
    let conffiles: String = CONFFILES.iter().map(|(_, d)| format!("/{d}\n")).collect();
    write(&debian.join("conffiles"), conffiles.as_bytes(), 0o644)?;
    let size_kib = dir_size(&stage)? / 1024;
    write(
        &debian.join("control"),
        control(&version, size_kib).as_bytes(),
        0o644,
    )?;

    let deb = out.join(format!("rampart_{version}_amd64.deb"));
    exec(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&stage)
            .arg(&deb),
    )?;
    println!("package: {}", deb.display());
    Ok(deb)
}

fn control(version: &str, size_kib: u64) -> String {
    format!(
        "Package: rampart\n\
         Version: {version}\n\
         Architecture: amd64\n\
         Maintainer: Rampart developers <rampart@localhost>\n\
         Installed-Size: {size_kib}\n\
         Depends: libc6 (>= 2.34), systemd\n\
         Section: net\n\
         Priority: optional\n\
         Description: kernel-level API token enforcement (eBPF)\n \
         Rampart judges every plaintext HTTP/1.x request on the ports it guards in the\n \
         kernel (XDP or TC): the bearer token's keyed fingerprint must be known, not\n \
         revoked, within its validity and scopes, and within its ramp contract.\n \
         A daemon loads policy, issues and revokes tokens and streams telemetry.\n"
    )
}

const COPYRIGHT: &str =
    "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
Upstream-Name: rampart\n\
\n\
Files: *\n\
Copyright: the Rampart developers\n\
License: Apache-2.0\n \
On Debian systems, the full text of the Apache License 2.0 is in\n \
/usr/share/common-licenses/Apache-2.0.\n";

fn copy(src: &Path, dst: &Path, mode: u32) -> Result<()> {
    let bytes = fs::read(src).with_context(|| format!("reading {}", src.display()))?;
    write(dst, &bytes, mode)
}

fn write(dst: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    if let Some(dir) = dst.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut f = fs::File::create(dst).with_context(|| format!("writing {}", dst.display()))?;
    f.write_all(bytes)?;
    f.set_permissions(fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn output(cmd: &mut Command) -> Result<Vec<u8>> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

fn dir_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            dir_size(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}
