//! `rampart keygen`: create the fingerprint key (`<state_dir>/fingerprint.key`, mode 0600).
//!
//! The key never appears on screen: only its path is printed. Replacing it makes every
//! issued token's fingerprint stop matching, hence `--force`.

use std::path::Path;

use anyhow::Context as _;
use rampart::token::write_key;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Replace an existing key (every token issued under the old key stops matching).
    #[arg(long)]
    force: bool,
}

pub async fn run(config: &Path, args: Args) -> anyhow::Result<()> {
    let config = super::load_config(config)?;
    let path = config.key_path();
    write_key(&path, args.force)
        .with_context(|| format!("writing the fingerprint key {}", path.display()))?;
    println!("{}", path.display());
    Ok(())
}
