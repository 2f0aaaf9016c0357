//! `rampart completions <shell>` and `rampart manpages <dir>`: generated from the clap
//! definitions, so the packaged completions and man pages never drift from the CLI.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::CommandFactory as _;

use super::Cli;

#[derive(clap::Args, Debug)]
pub struct CompletionArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(clap::Args, Debug)]
pub struct ManArgs {
    /// Directory the pages are written to: rampart.1 and one rampart-<verb>.1 per
    /// subcommand (nested verbs too, e.g. rampart-token-issue.1).
    pub dir: PathBuf,
}

/// Writes the completion script for `args.shell` to stdout.
pub fn completions(args: CompletionArgs) -> anyhow::Result<()> {
    let mut cmd = Cli::command();
    clap_complete::generate(args.shell, &mut cmd, "rampart", &mut std::io::stdout());
    Ok(())
}

/// Writes one man page per command into `args.dir`.
pub fn manpages(args: ManArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let mut cmd = Cli::command();
    cmd.build();
    write_pages(&cmd, "rampart", &args.dir)
}

fn write_pages(cmd: &clap::Command, name: &str, dir: &Path) -> anyhow::Result<()> {
    // clap_mangen titles a page with the command's own name; a subcommand's page is
    // named after its whole path, as git and cargo name theirs.
    let page = cmd.clone().name(name.to_owned());
    let path = dir.join(format!("{name}.1"));
    let mut out = Vec::new();
    clap_mangen::Man::new(page).render(&mut out)?;
    std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
    // `help` is clap's own, which every page already describes.
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        write_pages(sub, &format!("{name}-{}", sub.get_name()), dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_verb_gets_a_page() {
        let dir = tempfile::tempdir().unwrap();
        manpages(ManArgs {
            dir: dir.path().to_owned(),
        })
        .unwrap();
        let page = std::fs::read_to_string(dir.path().join("rampart.1")).unwrap();
        assert!(page.contains(".TH rampart 1"), "{page}");
        assert!(
            page.contains("Kernel\\-level API token enforcement"),
            "{page}"
        );
        let issue = std::fs::read_to_string(dir.path().join("rampart-token-issue.1")).unwrap();
        assert!(issue.contains(".TH rampart-token-issue 1"), "{issue}");
        assert!(
            issue.contains("rampart\\-token\\-issue \\- Mint a token"),
            "{issue}"
        );
        for verb in Cli::command()
            .get_subcommands()
            .filter(|s| !s.is_hide_set())
        {
            let path = dir.path().join(format!("rampart-{}.1", verb.get_name()));
            assert!(path.exists(), "{} missing", path.display());
        }
    }
}
