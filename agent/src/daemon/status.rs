//! The `status` op's body, shared by the daemon (which builds it) and `rampart status`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

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
