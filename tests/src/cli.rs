//! Reading what the `rampart` binary prints, shared by the daemon tests and the demo.

use std::process::Output;

use crate::client::BearerToken;

/// `rampart token issue` prints the new token alone on stdout and `fingerprint: <hex>` on
/// stderr. Returns the token (wrapped at once, so it is only ever shown redacted) and the
/// fingerprint if one was printed.
pub fn issued(out: &Output) -> (BearerToken, Option<String>) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let token = BearerToken::new(stdout.lines().next().unwrap_or_default().trim());
    let fp = String::from_utf8_lossy(&out.stderr)
        .lines()
        .find_map(|l| l.strip_prefix("fingerprint:"))
        .map(|f| f.trim().to_owned());
    (token, fp)
}
