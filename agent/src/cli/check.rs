//! `rampart check`: validate the configuration and its policy files without touching the
//! kernel, so CI can gate policy changes.

use std::path::Path;

use anyhow::bail;
use rampart::{config, config::Config, policy::CompiledPolicy};

#[derive(clap::Args, Debug)]
pub struct Args {}

pub async fn run(config: &Path, _args: Args) -> anyhow::Result<()> {
    match config::load_all(config) {
        Ok((config, policy)) => {
            println!("{}", summary(&config, &policy));
            Ok(())
        }
        Err(diagnostics) => {
            for d in &diagnostics {
                eprintln!("{d}");
            }
            let n = diagnostics.len();
            bail!("{n} error{} found", if n == 1 { "" } else { "s" })
        }
    }
}

/// The one line printed on success.
pub fn summary(config: &Config, policy: &CompiledPolicy) -> String {
    let count = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
    format!(
        "{}: ok, {}, {}, {}, {} in {}",
        config.path.display(),
        count(config.listeners.len(), "listener"),
        count(policy.contracts.len(), "contract"),
        count(policy.scopes.len(), "scope"),
        count(policy.tokens.len(), "static token"),
        count(config.policy.len(), "policy file"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_counts_what_was_loaded() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/rampart.toml");
        let (config, policy) = config::load_all(&path).expect("examples pass check");
        assert_eq!(
            summary(&config, &policy),
            format!(
                "{}: ok, 2 listeners, 2 contracts, 3 scopes, 1 static token in 1 policy file",
                path.display()
            )
        );
    }

    #[test]
    fn broken_policy_fails_check_with_every_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("rampart.toml"),
            "policy = [\"p.toml\", \"gone.toml\"]\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("p.toml"),
            "[[scope]]\nname = \"s\"\nmethods = [\"GET\"]\nprefix = \"x\"\n",
        )
        .unwrap();
        let diags = config::load_all(&dir.path().join("rampart.toml")).unwrap_err();
        let shown: Vec<String> = diags.iter().map(ToString::to_string).collect();
        let p = dir.path().join("p.toml");
        let gone = dir.path().join("gone.toml");
        assert_eq!(
            shown,
            [
                format!(
                    "{}: cannot read policy file: No such file or directory (os error 2)",
                    gone.display()
                ),
                format!("{}:4:10: scope prefix `x` must start with '/'", p.display()),
            ]
        );
        let result = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(run(&dir.path().join("rampart.toml"), Args {}));
        assert_eq!(result.unwrap_err().to_string(), "2 errors found");
    }
}
