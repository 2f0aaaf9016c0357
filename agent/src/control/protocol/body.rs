//! Every reply body of the control socket, typed: the daemon builds them, the CLI decodes
//! them, and neither has a second copy.

use std::collections::BTreeMap;

use agent_common::Verdict;
use serde::{Deserialize, Serialize};

use super::Fp;
use crate::{
    store::{TokenRecord, TokenStatus},
    token::TokenRuntime,
};

/// Datapath view of a token, as `token.show` reports it. Times are Unix seconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RuntimeView {
    pub stage: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_per_sec: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_seen: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<i64>,
    pub breaches: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub penalty_until: Option<i64>,
    /// Requests by verdict name (zero counts omitted).
    pub requests: BTreeMap<String, u64>,
}

impl RuntimeView {
    /// `tai_offset_ns` is CLOCK_TAI − CLOCK_REALTIME (`datapath::clock::tai_offset_ns`).
    pub fn from_runtime(rt: &TokenRuntime, tai_offset_ns: i64) -> RuntimeView {
        let unix =
            |tai: u64| (tai != 0).then(|| (tai as i64 - tai_offset_ns).div_euclid(1_000_000_000));
        RuntimeView {
            stage: rt.state.stage,
            rate_per_sec: rt.rate_per_sec,
            first_seen: unix(rt.state.first_seen_ns),
            last_seen: unix(rt.state.last_seen_ns),
            breaches: rt.state.breaches,
            penalty_until: unix(rt.state.penalty_until_ns),
            requests: Verdict::ALL
                .iter()
                .zip(rt.by_verdict)
                .filter(|(_, n)| *n != 0)
                .map(|(v, n)| (v.name().to_owned(), n))
                .collect(),
        }
    }
}

/// A token as the control socket reports it. Times are Unix seconds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenView {
    pub fingerprint: Fp,
    pub contract: String,
    pub scopes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    pub issued_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotated_from: Option<Fp>,
    pub status: TokenStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<RuntimeView>,
}

impl TokenView {
    /// `now` (Unix seconds) turns a lapsed active token into `expired`.
    pub fn new(rec: &TokenRecord, now: i64, runtime: Option<RuntimeView>) -> TokenView {
        TokenView {
            fingerprint: Fp(rec.fingerprint),
            contract: rec.contract.clone(),
            scopes: rec.scopes.clone(),
            label: rec.label.clone(),
            issued_at: rec.issued_at,
            not_before: rec.not_before,
            expires_at: rec.expires_at,
            rotated_from: rec.rotated_from.map(Fp),
            status: rec.status_at(now),
            runtime,
        }
    }
}

/// Body of `token.issue` and `token.rotate`. `token` is the plaintext, sent exactly once.
#[derive(Clone, Serialize, Deserialize)]
pub struct IssuedBody {
    pub token: String,
    pub record: TokenView,
    /// `token.rotate` only: the predecessor with its shortened expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old: Option<TokenView>,
}

impl std::fmt::Debug for IssuedBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedBody")
            .field("token", &"<redacted>")
            .field("record", &self.record)
            .field("old", &self.old)
            .finish()
    }
}

/// Body of `token.show`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShowBody {
    pub record: TokenView,
}

/// Body of `token.list`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ListBody {
    pub tokens: Vec<TokenView>,
    /// Where the next page starts (`after`), when more tokens may follow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<Fp>,
}

/// Body of `token.import`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImportBody {
    pub imported: usize,
}

/// Body of `token.export`: the active tokens, as `rampart token export` prints them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExportBody {
    pub tokens: Vec<crate::token_io::TokenLine>,
}

/// Body of `token.revoke`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RevokeBody {
    pub fingerprint: Fp,
    pub revoked_at: i64,
    pub reason: String,
    /// The token had been revoked before; the fields describe the original revocation.
    #[serde(default)]
    pub already: bool,
}

/// Body of `reload`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadBody {
    /// The policy generation now enforced.
    pub generation: u64,
}

/// Body of `status`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StatusBody {
    pub version: String,
    pub pid: u32,
    pub config: String,
    /// Incremented by every successful reload (1 after start).
    pub policy_generation: u64,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    pub listeners: Vec<ListenerStatus>,
    pub tokens: TokenCountsView,
    pub contracts: usize,
    pub scopes: usize,
    pub static_tokens: usize,
    pub events_dropped: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ListenerStatus {
    pub id: u32,
    pub name: String,
    pub interface: String,
    /// `xdp (native)`, `xdp (generic)` or `tc`.
    pub hook: String,
    pub ports: Vec<u16>,
    /// `enforce` or `observe`.
    pub mode: String,
    /// Kernel id of the program running in the listener's link.
    pub program_id: u32,
    pub link_pin: String,
    /// The link was pinned by an earlier daemon and taken over in place.
    pub adopted: bool,
    /// Requests by verdict name, since the maps were created (survives restarts).
    pub requests: BTreeMap<String, u64>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TokenCountsView {
    pub active: u64,
    pub revoked: u64,
    pub expired: u64,
    pub not_yet_valid: u64,
    /// Entries of the kernel token map (static and issued).
    pub in_kernel: u64,
}

/// One token's line in `top`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TopRow {
    /// 32 hex digits.
    pub fingerprint: Fp,
    /// The operator's label for the token, if it was issued with one.
    pub label: Option<String>,
    /// The ramp contract's name.
    pub contract: String,
    /// Index of the ramp stage the last admission used (after any penalty demotion).
    pub stage: u32,
    /// Requests per second the current stage allows.
    pub stage_rate: f64,
    /// Requests per second measured over the last sampling interval.
    pub current_rate: f64,
    /// Requests throttled, ever.
    pub throttles: u64,
    /// Contract breaches, ever.
    pub breaches: u64,
    /// RFC 3339 UTC time of the last request; `None` if never used.
    pub last_seen: Option<String>,
}

/// Body of the control socket's `top` response: the tokens seen recently, any order.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TopSnapshot {
    pub rows: Vec<TopRow>,
}
