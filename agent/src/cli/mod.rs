//! The command line: one global `--config`, one module per verb.

pub mod check;
pub mod completion;
pub mod detach;
pub mod events;
pub mod fingerprint;
pub mod keygen;
pub mod run;
pub mod status;
pub mod token;
pub mod token_io;
pub mod top;

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use rampart::{config::Config, paths};

/// Kernel-level API token enforcement.
#[derive(Parser, Debug)]
#[command(name = "rampart", version, about)]
pub struct Cli {
    /// Configuration file.
    #[arg(long, global = true, value_name = "PATH", default_value = paths::CONFIG_FILE)]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon: load the datapath, attach listeners, serve control and metrics.
    Run(run::Args),
    /// Validate the configuration and every policy file it names.
    Check(check::Args),
    /// Create the fingerprint key.
    Keygen(keygen::Args),
    /// Print the fingerprint of a token.
    Fingerprint(fingerprint::Args),
    /// Issue, rotate, revoke and list tokens.
    Token(token::Args),
    /// Show the daemon's state.
    Status(status::Args),
    /// Stream denial events.
    Events(events::Args),
    /// Live view of the busiest tokens.
    Top(top::Args),
    /// Detach the programs and remove the pins.
    Detach(detach::Args),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(completion::CompletionArgs),
    /// Write the man pages into a directory (packaging).
    #[command(hide = true)]
    Manpages(completion::ManArgs),
}

pub async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let config = cli.config.as_path();
    match cli.command {
        Command::Run(args) => run::run(config, args).await,
        Command::Check(args) => check::run(config, args).await,
        Command::Keygen(args) => keygen::run(config, args).await,
        Command::Fingerprint(args) => fingerprint::run(config, args).await,
        Command::Token(args) => token::run(config, args).await,
        Command::Status(args) => status::run(config, args).await,
        Command::Events(args) => events::run(config, args).await,
        Command::Top(args) => top::run(config, args).await,
        Command::Detach(args) => detach::run(config, args).await,
        Command::Completions(args) => completion::completions(args),
        Command::Manpages(args) => completion::manpages(args),
    }
}

/// A fingerprint argument: `Fingerprint`'s text form, with a hint where to find one.
pub fn parse_fingerprint(s: &str) -> Result<agent_common::Fingerprint, String> {
    s.parse()
        .map_err(|e| format!("{e} (see `rampart token list`)"))
}

/// The configuration every verb but `run` and `check` reads: the file when it exists, else
/// the defaults, so the CLI works on a host configured by defaults and `keygen` runs before
/// anything is configured. A file that exists but does not load is an error.
pub fn load_config(path: &Path) -> anyhow::Result<Config> {
    if !path.exists() {
        return Ok(Config::default());
    }
    Config::load(path).with_context(|| format!("loading configuration {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_config_is_the_defaults_a_broken_one_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.toml");
        assert_eq!(
            load_config(&missing).unwrap().control_socket,
            Config::default().control_socket
        );
        let broken = dir.path().join("broken.toml");
        std::fs::write(&broken, "control_socket = 5\n").unwrap();
        let err = format!("{:#}", load_config(&broken).unwrap_err());
        assert!(err.contains("loading configuration"), "{err}");
    }
}
