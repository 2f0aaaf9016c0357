//! `rampart run`: the daemon (see `rampart::daemon`).

use std::path::Path;

use rampart::daemon::{self, DaemonError};

#[derive(clap::Args, Debug)]
pub struct Args {}

pub async fn run(config: &Path, _args: Args) -> anyhow::Result<()> {
    match daemon::run(config).await {
        Ok(()) => Ok(()),
        // Diagnostics are already one per line; print them as `rampart check` does.
        Err(DaemonError::Config(diags)) => {
            for d in &diags {
                eprintln!("{d}");
            }
            anyhow::bail!("{} error(s) in the configuration or policy", diags.len())
        }
        Err(e) => Err(e.into()),
    }
}
