//! `rampart run` (placeholder: its owner replaces this file).

use std::path::Path;

#[derive(clap::Args, Debug)]
pub struct Args {}

pub async fn run(_config: &Path, _args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`rampart run` is not implemented yet")
}
