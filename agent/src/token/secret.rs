//! The plaintext token: minted here, wrapped so that its `Debug` is redacted and its bytes
//! are wiped on drop. It exists only between `mint()` and the caller that hands it to the
//! operator once.

use agent_common::{siphash::fingerprint, Fingerprint, FingerprintKey};
use rand::{rngs::OsRng, RngCore};

/// Every token rampart mints starts with this, so leaked ones are easy to recognise (and scan
/// for) in logs and repositories.
pub const TOKEN_PREFIX: &str = "rmp_";
/// Random bytes per token: 256 bits of entropy.
pub const TOKEN_RANDOM_BYTES: usize = 32;

/// A plaintext token. Shown to the operator exactly once; never logged or stored.
pub struct Token(String);

impl Token {
    /// The secret itself. Call sites are the one place it is printed or sent.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }

    /// Wraps a plaintext received from elsewhere (control-socket response) so it gets the same
    /// redaction and wiping.
    pub fn from_secret(s: String) -> Token {
        Token(s)
    }

    pub fn fingerprint(&self, key: &FingerprintKey) -> Fingerprint {
        fingerprint(key, self.0.as_bytes())
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Drop for Token {
    fn drop(&mut self) {
        // SAFETY: zero bytes are valid UTF-8; the volatile writes keep the wipe from being
        // optimised away as a dead store.
        let bytes = unsafe { self.0.as_bytes_mut() };
        for b in bytes.iter_mut() {
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

/// Mints a new token: `rmp_` + unpadded base64url of 32 bytes from the OS RNG.
pub fn mint() -> Token {
    let mut raw = [0u8; TOKEN_RANDOM_BYTES];
    OsRng.fill_bytes(&mut raw);
    let mut s = String::with_capacity(TOKEN_PREFIX.len() + 43);
    s.push_str(TOKEN_PREFIX);
    base64url_into(&raw, &mut s);
    raw.fill(0);
    Token(s)
}

fn base64url_into(data: &[u8], out: &mut String) {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        // 1 byte -> 2 chars, 2 -> 3, 3 -> 4; no padding.
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::token::validate_token;

    #[test]
    fn minted_tokens_have_prefix_length_charset_and_are_distinct() {
        let mut seen = HashSet::new();
        for _ in 0..1000 {
            let t = mint();
            let s = t.expose_secret();
            assert!(s.starts_with(TOKEN_PREFIX));
            let body = &s[TOKEN_PREFIX.len()..];
            // 32 bytes -> ceil(256 / 6) = 43 base64url characters, unpadded.
            assert_eq!(body.len(), 43);
            assert!(body
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
            assert_eq!(validate_token(s.as_bytes()), Ok(()));
            assert!(seen.insert(s.to_owned()), "duplicate token minted");
        }
        // Every base64url character position carries entropy: over 1000 tokens each of the
        // 42 full-6-bit positions shows many distinct symbols (a constant or low-entropy
        // position would show very few).
        let tokens: Vec<&String> = seen.iter().collect();
        for pos in TOKEN_PREFIX.len()..TOKEN_PREFIX.len() + 42 {
            let distinct: HashSet<u8> = tokens.iter().map(|t| t.as_bytes()[pos]).collect();
            assert!(
                distinct.len() > 40,
                "position {pos}: {} symbols",
                distinct.len()
            );
        }
    }

    #[test]
    fn base64url_matches_known_vectors() {
        let enc = |d: &[u8]| {
            let mut s = String::new();
            base64url_into(d, &mut s);
            s
        };
        // RFC 4648 test vectors, url-safe alphabet, no padding.
        assert_eq!(enc(b"f"), "Zg");
        assert_eq!(enc(b"fo"), "Zm8");
        assert_eq!(enc(b"foo"), "Zm9v");
        assert_eq!(enc(b"foobar"), "Zm9vYmFy");
        assert_eq!(enc(&[0xfb, 0xff]), "-_8");
    }

    #[test]
    fn token_debug_is_redacted() {
        let t = mint();
        let dbg = format!("{t:?}");
        assert!(!dbg.contains(&t.expose_secret()[TOKEN_PREFIX.len()..]));
        assert_eq!(dbg, "Token(<redacted>)");
    }
}
