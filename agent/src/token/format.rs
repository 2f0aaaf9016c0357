//! The RFC 6750 `b64token` grammar, as the datapath accepts a Bearer credential.

use agent_common::{http::is_b64token, MAX_TOKEN_LEN};

/// Why a candidate token is not an RFC 6750 `b64token`. Carries positions, never content.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenFormatError {
    #[error("token is empty")]
    Empty,
    #[error("token is {len} bytes, longer than {MAX_TOKEN_LEN}")]
    TooLong { len: usize },
    #[error("token has a character outside the RFC 6750 b64token set at byte {offset}")]
    BadChar { offset: usize },
}

/// Checks `token` is what the datapath would accept as a Bearer credential:
/// `1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`, at most 4096 bytes.
///
/// Every fingerprint the daemon installs must come through here (or from `issue`, whose
/// tokens are valid by construction): the datapath checks the grammar of unknown tokens
/// only, since a known fingerprint implies the bytes of a token accepted here.
pub fn validate_token(token: &[u8]) -> Result<(), TokenFormatError> {
    if token.is_empty() {
        return Err(TokenFormatError::Empty);
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenFormatError::TooLong { len: token.len() });
    }
    let body = token.iter().take_while(|&&c| is_b64token(c)).count();
    if body == 0 {
        return Err(TokenFormatError::BadChar { offset: 0 });
    }
    match token[body..].iter().position(|&c| c != b'=') {
        Some(i) => Err(TokenFormatError::BadChar { offset: body + i }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    #[test]
    fn validate_token_follows_rfc6750() {
        assert_eq!(validate_token(b"abc-._~+/=="), Ok(()));
        assert_eq!(validate_token(b""), Err(TokenFormatError::Empty));
        assert_eq!(
            validate_token(b"=abc"),
            Err(TokenFormatError::BadChar { offset: 0 })
        );
        assert_eq!(
            validate_token(b"ab=c"),
            Err(TokenFormatError::BadChar { offset: 3 })
        );
        assert_eq!(
            validate_token(b"ab c"),
            Err(TokenFormatError::BadChar { offset: 2 })
        );
        assert_eq!(validate_token(&[b'a'; MAX_TOKEN_LEN]), Ok(()));
        assert_eq!(
            validate_token(&[b'a'; MAX_TOKEN_LEN + 1]),
            Err(TokenFormatError::TooLong {
                len: MAX_TOKEN_LEN + 1
            })
        );
    }
}
