//! `cargo xtask demo`: builds the agent and the demo driver, then runs the driver.
//!
//! The driver lives in the tests crate (`tests/src/bin/demo.rs`) because it reuses the
//! network-namespace harness. xtask only runs cargo and the resulting binary: depending on
//! either crate would make `cargo xtask setup` compile the eBPF object before bpf-linker
//! exists. `main` has already run `setup::ensure` by the time we get here.

use std::process::Command;

use anyhow::{bail, Context, Result};

/// Builds `rampart` and the `demo` binary, then runs the demo with the terminal attached;
/// a failing demo's exit status becomes ours (`main` only knows success or an error, so
/// this exits directly rather than flattening every failure to 1).
pub fn run() -> Result<()> {
    let root = crate::workspace_root();
    cargo(&["build", "-p", "rampart"])?;
    cargo(&["build", "-p", "rampart-tests", "--bin", "demo"])?;
    let demo = root.join("target/debug/demo");
    let status = Command::new(&demo)
        .current_dir(&root)
        .status()
        .with_context(|| format!("running {}", demo.display()))?;
    match status.code() {
        Some(0) => Ok(()),
        Some(code) => std::process::exit(code),
        None => bail!("the demo was ended by a signal ({status})"),
    }
}

fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = Command::new(&cargo)
        .args(args)
        .current_dir(crate::workspace_root())
        .status()
        .with_context(|| format!("running {cargo} {}", args.join(" ")))?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}
