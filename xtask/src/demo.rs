//! `cargo xtask demo`: placeholder until the demo lands.

use anyhow::bail;

/// Runs the demo.
pub fn run() -> anyhow::Result<()> {
    bail!("cargo xtask demo is not yet implemented")
}
