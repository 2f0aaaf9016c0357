//! Builds the eBPF object (agent-ebpf, nightly, bpfel-unknown-none) and leaves it in OUT_DIR
//! for `include_bytes_aligned!`; with the `test-support` feature also the test object
//! (agent-ebpf's `rampart-test` bin: the pass-through and floor programs that only tests
//! and the bench load). Needs the toolchain `cargo xtask setup` installs.

use std::{env, fs, path::PathBuf, process::Command};

use anyhow::{bail, Context as _};

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest.parent().context("agent/ has a parent")?;
    let ebpf = root.join("agent-ebpf");
    let out = PathBuf::from(env::var("OUT_DIR")?);
    for p in [
        "agent-ebpf/src",
        "agent-ebpf/Cargo.toml",
        "agent-ebpf/.cargo/config.toml",
        "agent-common/src",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }

    // (bin, object file in OUT_DIR)
    let mut objects = vec![("rampart", "rampart.bpf.o")];
    if env::var_os("CARGO_FEATURE_TEST_SUPPORT").is_some() {
        objects.push(("rampart-test", "rampart-test.bpf.o"));
    }

    let target_dir = out.join("ebpf-target");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&ebpf)
        .args(["+nightly", "build", "--release"])
        .arg("--target-dir")
        .arg(&target_dir);
    for (bin, _) in &objects {
        cmd.args(["--bin", bin]);
    }
    // Inherited cargo/rustup settings belong to the host build, not to the BPF one.
    for (k, _) in env::vars() {
        if k.starts_with("CARGO_") && k != "CARGO_HOME"
            || k.starts_with("RUSTC")
            || k == "RUSTFLAGS"
            || k == "RUSTUP_TOOLCHAIN"
            || k == "RUSTDOCFLAGS"
        {
            cmd.env_remove(&k);
        }
    }
    let status = cmd
        .status()
        .context("running cargo +nightly for agent-ebpf (run `cargo xtask setup`)")?;
    if !status.success() {
        bail!("building agent-ebpf failed ({status}); is bpf-linker installed? run `cargo xtask setup`");
    }
    for (bin, file) in objects {
        let obj = target_dir.join("bpfel-unknown-none/release").join(bin);
        fs::copy(&obj, out.join(file)).with_context(|| format!("copying {}", obj.display()))?;
    }
    Ok(())
}
