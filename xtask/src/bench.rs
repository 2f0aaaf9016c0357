//! `cargo xtask bench`: placeholder until the benchmark driver lands.

use anyhow::bail;

/// Arguments of `cargo xtask bench`.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// Which benchmark to run (e.g. `datapath`).
    pub which: Option<String>,
}

/// Runs the selected benchmark.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    bail!(
        "cargo xtask bench {} is not yet implemented",
        args.which.as_deref().unwrap_or("")
    )
}
