//! What the store holds and answers, as Rust types; only fingerprints, never a token.

use std::time::Duration;

use agent_common::Fingerprint;
use serde::{Deserialize, Serialize};

use super::StoreError;

/// Lifecycle state of an issued token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenStatus {
    Active,
    Revoked,
    Expired,
}

impl TokenStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenStatus::Active => "active",
            TokenStatus::Revoked => "revoked",
            TokenStatus::Expired => "expired",
        }
    }

    pub(super) fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "active" => Ok(TokenStatus::Active),
            "revoked" => Ok(TokenStatus::Revoked),
            "expired" => Ok(TokenStatus::Expired),
            other => Err(StoreError::Corrupt {
                what: format!("token status {other:?}"),
            }),
        }
    }
}

impl std::fmt::Display for TokenStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the audit log records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditAction {
    Issue,
    Rotate,
    Revoke,
    Expire,
    Reload,
    Start,
    Stop,
}

impl AuditAction {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditAction::Issue => "issue",
            AuditAction::Rotate => "rotate",
            AuditAction::Revoke => "revoke",
            AuditAction::Expire => "expire",
            AuditAction::Reload => "reload",
            AuditAction::Start => "start",
            AuditAction::Stop => "stop",
        }
    }

    pub(super) fn parse(s: &str) -> Result<Self, StoreError> {
        Ok(match s {
            "issue" => AuditAction::Issue,
            "rotate" => AuditAction::Rotate,
            "revoke" => AuditAction::Revoke,
            "expire" => AuditAction::Expire,
            "reload" => AuditAction::Reload,
            "start" => AuditAction::Start,
            "stop" => AuditAction::Stop,
            other => {
                return Err(StoreError::Corrupt {
                    what: format!("audit action {other:?}"),
                })
            }
        })
    }
}

/// A token about to be recorded (times are Unix seconds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewToken {
    pub fingerprint: Fingerprint,
    pub contract: String,
    pub scopes: Vec<String>,
    pub label: Option<String>,
    pub issued_at: i64,
    pub not_before: Option<i64>,
    pub expires_at: Option<i64>,
}

/// An issued token as recorded (times are Unix seconds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRecord {
    pub fingerprint: Fingerprint,
    pub contract: String,
    pub scopes: Vec<String>,
    pub label: Option<String>,
    pub issued_at: i64,
    pub not_before: Option<i64>,
    pub expires_at: Option<i64>,
    pub rotated_from: Option<Fingerprint>,
    pub status: TokenStatus,
}

impl TokenRecord {
    /// The status as of `now`: an active token past its expiry reads as expired even before
    /// `Store::mark_expired` has run.
    pub fn status_at(&self, now: i64) -> TokenStatus {
        match (self.status, self.expires_at) {
            (TokenStatus::Active, Some(exp)) if exp <= now => TokenStatus::Expired,
            (s, _) => s,
        }
    }
}

/// Tokens by state at one instant (`Store::count_by_state`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateCounts {
    pub active: u64,
    pub not_yet_valid: u64,
    pub revoked: u64,
    pub expired: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revocation {
    pub fingerprint: Fingerprint,
    pub revoked_at: i64,
    pub reason: String,
    pub uid: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEntry {
    pub id: i64,
    pub time: i64,
    pub uid: Option<u32>,
    pub action: AuditAction,
    pub fingerprint: Option<Fingerprint>,
    pub detail: String,
}

/// Which tokens `Store::list` returns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListFilter {
    /// Only active tokens whose expiry falls within this long from now.
    pub expiring_within: Option<Duration>,
    /// Only tokens not seen for this long (never-seen tokens count from their issue time).
    pub idle_for: Option<Duration>,
    /// Include revoked and expired tokens too.
    pub include_inactive: bool,
    /// Only tokens on this contract.
    pub contract: Option<String>,
}

/// The result of `Store::revoke`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revoked {
    pub revocation: Revocation,
    /// The token was already revoked; `revocation` is the original record.
    pub already: bool,
}
