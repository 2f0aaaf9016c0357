//! `cargo xtask <command>`: the project's build, test and setup entry points.
//!
//! Every command except `setup` first makes sure the toolchain and host packages are
//! present ([`setup::ensure`]), so a fresh clone needs nothing typed by hand.

mod bench;
mod bench_scale;
mod demo;
mod package;
mod setup;
mod test;
mod vm;

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Rampart build, test and setup tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what building and testing need (idempotent; skips what is present).
    Setup,
    /// Build, run every test (host and 6.1 VM), clippy and rustfmt; print a summary.
    Test(test::TestArgs),
    /// Benchmarks (e.g. `cargo xtask bench datapath`).
    Bench(bench::BenchArgs),
    /// A guided run of Rampart against a local upstream.
    Demo,
    /// Build the Debian package (target/package/rampart_<version>_amd64.deb).
    Package(package::PackageArgs),
    /// The kernel-facing tests in the 6.1 VM (the VM step of `test`), or with
    /// `-- <program> [args]` one command inside the VM.
    VmTest {
        /// Also run the daemon target (host only in `test`).
        #[arg(long)]
        vm_daemon: bool,
        /// Test name filter, passed to every test binary.
        #[arg(long)]
        filter: Option<String>,
        /// Program and arguments, run from the workspace root inside the guest.
        #[arg(trailing_var_arg = true)]
        command: Vec<String>,
    },
}

fn main() -> Result<ExitCode> {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Setup) {
        setup::ensure()?;
    }
    match cli.command {
        Command::Setup => setup::run()?,
        Command::Test(args) => return test::run(&args),
        Command::Bench(args) => bench::run(args)?,
        Command::Demo => demo::run()?,
        Command::Package(args) => {
            package::run(&args)?;
        }
        Command::VmTest {
            vm_daemon,
            filter,
            command,
        } => {
            if command.is_empty() {
                return test::run(&test::TestArgs::vm_only(vm_daemon, filter));
            }
            vm::run(vm::VmOptions::new(&workspace_root(), vec![command]))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The workspace root: xtask lives one level below it.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask/ has a parent")
        .to_path_buf()
}
