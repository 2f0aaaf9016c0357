//! Tokens, by concern:
//!
//! - `secret`: the plaintext `Token` (redacted, wiped) and `mint`.
//! - `format`: the RFC 6750 grammar every installed token passes.
//! - `key`: the fingerprint key file.
//! - `lifecycle`: issue / rotate / revoke over the store and the kernel (`Enforcer`), with
//!   names resolved against the policy (`Resolve`).
//!
//! Everything durable or logged uses the fingerprint, never the token.

mod format;
mod key;
mod lifecycle;
mod secret;

pub use format::{validate_token, TokenFormatError};
pub use key::{load_key, write_key, KeyError};
pub use lifecycle::*;
pub use secret::{mint, Token, TOKEN_PREFIX, TOKEN_RANDOM_BYTES};
