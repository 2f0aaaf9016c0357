//! `cargo xtask bench datapath`: builds and runs the BPF_PROG_TEST_RUN benchmark
//! (tests/src/bin/bench-datapath.rs), which prints a table and writes
//! target/bench/datapath.json. It lives in the tests crate because it loads the eBPF
//! object; xtask itself must build before the BPF toolchain exists.
//!
//! `cargo xtask bench scale`: the control plane at many tokens (`bench_scale`).

use anyhow::{bail, Result};

use crate::{
    setup::{cargo, exec},
    workspace_root,
};

/// Arguments of `cargo xtask bench`.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// Which benchmark to run: `datapath` or `scale`.
    pub which: String,
    /// `scale`: how many tokens.
    #[arg(long, default_value_t = 100_000)]
    pub tokens: usize,
    /// BPF_PROG_TEST_RUN repetitions per case.
    #[arg(long, default_value_t = 1_000_000)]
    pub repeat: u32,
    /// Only the cases whose name contains this (e.g. for profiling one path); their
    /// figures go to datapath-filtered.json.
    #[arg(long)]
    pub case: Option<String>,
}

/// Runs the selected benchmark.
pub fn run(args: BenchArgs) -> Result<()> {
    let root = workspace_root();
    if args.which == "scale" {
        return crate::bench_scale::run(&root, args.tokens);
    }
    if args.which != "datapath" {
        bail!(
            "unknown benchmark {:?} (available: datapath, scale)",
            args.which
        );
    }
    exec(cargo(&root).args([
        "build",
        "--release",
        "-p",
        "rampart-tests",
        "--bin",
        "bench-datapath",
    ]))?;
    exec(
        std::process::Command::new(root.join("target/release/bench-datapath"))
            .arg(args.repeat.to_string())
            .args(args.case),
    )
}
