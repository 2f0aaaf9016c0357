//! `rampart detach`: stop enforcing. Removes the pinned links (which detaches the programs),
//! deletes the netlink tc filters of `tc_attach = "netlink"` listeners (and of tc listeners
//! on kernels without TCX), and removes the pinned maps, so nothing of rampart stays in the
//! kernel. Netlink filters are found in the caller's network namespace: run it where the
//! daemon runs.

use std::path::Path;

use anyhow::Context as _;
use rampart::{control::Client, datapath::detach_pinned};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Detach even though a daemon answers on the control socket (it keeps its own link
    /// handles until it exits; stop it first for the programs to go at once).
    #[arg(long)]
    force: bool,
}

pub async fn run(config: &Path, args: Args) -> anyhow::Result<()> {
    let config = super::load_config(config)?;
    if !args.force && Client::connect(&config.control_socket).await.is_ok() {
        anyhow::bail!(
            "the daemon is running (control socket {}); stop it first (systemctl stop rampart), or pass --force",
            config.control_socket.display()
        );
    }
    let removed = detach_pinned(&config.bpffs_dir)
        .with_context(|| format!("removing pins under {}", config.bpffs_dir.display()))?;
    let links = removed
        .iter()
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("link_"))
        })
        .count();
    println!(
        "detached {links} link{}, removed {} pinned map{} under {}",
        if links == 1 { "" } else { "s" },
        removed.len() - links,
        if removed.len() - links == 1 { "" } else { "s" },
        config.bpffs_dir.display()
    );
    Ok(())
}
