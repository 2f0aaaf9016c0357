//! `rampart fingerprint`: the fingerprint of one token read from stdin.
//!
//! Stdin only, never argv: command lines are visible to every user in /proc and land in
//! shell history.

use std::{
    io::{self, IsTerminal, Read},
    path::{Path, PathBuf},
};

use agent_common::{siphash::fingerprint, MAX_TOKEN_LEN};
use anyhow::{bail, Context as _};
use rampart::token::{load_key, validate_token};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Key file to use instead of `<state_dir>/fingerprint.key`.
    #[arg(long, value_name = "PATH")]
    key: Option<PathBuf>,
}

pub async fn run(config: &Path, args: Args) -> anyhow::Result<()> {
    let key_path = match args.key {
        Some(p) => p,
        None => super::load_config(config)?.key_path(),
    };
    let key = load_key(&key_path)
        .with_context(|| format!("loading the fingerprint key {}", key_path.display()))?;
    if io::stdin().is_terminal() {
        eprintln!("rampart: paste the token and press Enter");
    }
    let mut token = read_token(&mut io::stdin().lock())?;
    let checked = validate_token(&token);
    let fp = fingerprint(&key, &token);
    token.fill(0);
    checked.context("stdin does not hold one RFC 6750 bearer token")?;
    println!("{fp}");
    Ok(())
}

/// Reads all of stdin (bounded) and removes one trailing line ending.
fn read_token(input: &mut impl Read) -> anyhow::Result<Vec<u8>> {
    // Room for the longest token plus "\r\n", and one byte more to detect excess.
    let limit = MAX_TOKEN_LEN + 3;
    let mut buf = Vec::with_capacity(limit);
    input
        .take(limit as u64)
        .read_to_end(&mut buf)
        .context("reading the token from stdin")?;
    if buf.len() == limit {
        buf.fill(0);
        bail!("stdin holds more than one token of at most {MAX_TOKEN_LEN} bytes");
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailing_newline_only_is_removed() {
        assert_eq!(read_token(&mut &b"abc\n"[..]).unwrap(), b"abc");
        assert_eq!(read_token(&mut &b"abc\r\n"[..]).unwrap(), b"abc");
        assert_eq!(read_token(&mut &b"abc"[..]).unwrap(), b"abc");
        // A second line stays, so validation rejects it instead of silently taking line one.
        let two = read_token(&mut &b"abc\ndef\n"[..]).unwrap();
        assert!(validate_token(&two).is_err());
        let big = vec![b'a'; MAX_TOKEN_LEN + 10];
        assert!(read_token(&mut &big[..]).is_err());
    }
}
