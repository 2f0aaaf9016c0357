//! `rampart token import FILE` and `rampart token export`: issued tokens as JSON lines
//! (see `rampart::token_io`), through the daemon.

use std::{
    io::{IsTerminal as _, Write},
    path::PathBuf,
};

use anyhow::Context as _;
use rampart::control::{
    protocol::{ExportBody, ImportBody},
    Client, Request,
};

/// Imports a file: the daemon reads it (an import of a million tokens does not fit a
/// request line) and applies it all or not at all.
pub async fn import(
    client: &mut Client,
    file: PathBuf,
    out: &mut impl Write,
    err: &mut impl Write,
) -> anyhow::Result<()> {
    let path =
        std::fs::canonicalize(&file).with_context(|| format!("cannot read {}", file.display()))?;
    let terminal = std::io::stderr().is_terminal();
    let lines = if terminal {
        std::fs::read(&path)
            .map(|b| b.iter().filter(|&&c| c == b'\n').count())
            .unwrap_or(0)
    } else {
        0
    };
    let req = Request::TokenImport {
        path: path.display().to_string(),
    };
    // On a terminal, the time so far: the daemon answers once, when all is applied.
    let call = super::token::call::<ImportBody>(client, &req);
    tokio::pin!(call);
    let started = std::time::Instant::now();
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
    let body = loop {
        tokio::select! {
            body = &mut call => break body,
            _ = tick.tick(), if terminal => {
                write!(
                    err,
                    "\rimporting {} ({lines} lines, all or none): {:.1} s",
                    path.display(),
                    started.elapsed().as_secs_f64()
                )?;
                err.flush()?;
            }
        }
    };
    if terminal {
        writeln!(err)?;
    }
    writeln!(out, "imported {} tokens", body?.imported)?;
    Ok(())
}

/// Prints the active tokens, one JSON line each.
pub async fn export(client: &mut Client, out: &mut impl Write) -> anyhow::Result<()> {
    let body: ExportBody = super::token::call(client, &Request::TokenExport).await?;
    for t in &body.tokens {
        serde_json::to_writer(&mut *out, t)?;
        writeln!(out)?;
    }
    Ok(())
}
