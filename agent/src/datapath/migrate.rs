//! Pinned maps whose value layout changed since an earlier version of the daemon.
//!
//! A map whose layout changes is pinned under a new file name (`pin_file`; bpffs allows
//! no dots in names), so a daemon never adopts a map of another layout (aya adopts any
//! pin by path, and programs built for one layout would read another's fields). At load,
//! an earlier version's pin is converted into the new map and removed, before any program
//! of this version can run.

use std::path::Path;

use agent_common::{Fingerprint, TokenInfo, TokenState, TOKEN_VERDICT_COUNT, VERDICT_COUNT};
use aya::maps::{HashMap, Map, MapData, PerCpuArray, PerCpuValues};

use super::{error::map_err, DatapathError};

/// The file `name` is pinned as under the bpffs dir.
pub fn pin_file(name: &str) -> &str {
    match name {
        // v2: `TokenInfo::state_slot` (40 → 48 bytes).
        "TOKENS" => "TOKENS_V2",
        // v2: not preallocated (BPF_F_NO_PREALLOC); the same entries.
        "REVOKED" => "REVOKED_V2",
        // v2: `TokenState::allowed` (56 → 64 bytes). v3: an array by `state_slot`, no
        // longer a hash by fingerprint.
        "TOKEN_STATE" => "TOKEN_STATE_V3",
        // v2: a listener word per port (was a bitmap of judged ports).
        "PORTS" => "PORTS_V2",
        // v2: 14 verdicts per listener row (was 11: before not_http, untracked and
        // out_of_sequence).
        "VERDICT_STATS" => "VERDICT_STATS_V2",
        other => other,
    }
}

/// `TOKEN_STATE` values as daemons before `TokenState::allowed` pinned them (56 bytes).
/// Their programs counted admissions in TOKEN_STATS, where they stay.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct TokenStateV1 {
    tat_ns: u64,
    ramp_start_ns: u64,
    penalty_until_ns: u64,
    first_seen_ns: u64,
    last_seen_ns: u64,
    breaches: u64,
    contract: u32,
    stage: u32,
}

// SAFETY: repr(C) plain integers without padding.
unsafe impl aya::Pod for TokenStateV1 {}

impl From<TokenStateV1> for TokenState {
    fn from(v: TokenStateV1) -> Self {
        TokenState {
            tat_ns: v.tat_ns,
            ramp_start_ns: v.ramp_start_ns,
            penalty_until_ns: v.penalty_until_ns,
            first_seen_ns: v.first_seen_ns,
            last_seen_ns: v.last_seen_ns,
            breaches: v.breaches,
            contract: v.contract,
            stage: v.stage,
            allowed: 0,
        }
    }
}

/// `TOKENS` values as daemons before `TokenInfo::state_slot` pinned them (40 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct TokenInfoV1 {
    contract: u32,
    flags: u32,
    scopes: u64,
    not_before_ns: u64,
    expires_ns: u64,
    ramp_start_ns: u64,
}

// SAFETY: repr(C) plain integers without padding.
unsafe impl aya::Pod for TokenInfoV1 {}

impl From<TokenInfoV1> for TokenInfo {
    fn from(v: TokenInfoV1) -> Self {
        TokenInfo {
            contract: v.contract,
            flags: v.flags,
            scopes: v.scopes,
            not_before_ns: v.not_before_ns,
            expires_ns: v.expires_ns,
            ramp_start_ns: v.ramp_start_ns,
            ..TokenInfo::default()
        }
    }
}

/// Hands every entry of the hash map pinned at `dir/file` (values of type `V`) to `f`,
/// then removes the pin. Returns the entries handed over (0 when there is no such pin).
/// The earlier version's programs, still attached until this daemon replaces them, may
/// update the old map after the walk: at most the requests of that moment go uncounted.
fn drain_pin<V: aya::Pod>(
    dir: &Path,
    file: &'static str,
    mut f: impl FnMut(Fingerprint, V) -> Result<(), DatapathError>,
) -> Result<usize, DatapathError> {
    let path = dir.join(file);
    if !path.exists() {
        return Ok(0);
    }
    let old = MapData::from_pin(&path).map_err(map_err(file))?;
    let old: HashMap<MapData, Fingerprint, V> =
        HashMap::try_from(Map::HashMap(old)).map_err(map_err(file))?;
    let mut n = 0;
    for (fp, v) in old.iter().filter_map(Result::ok) {
        f(fp, v)?;
        n += 1;
    }
    std::fs::remove_file(&path).map_err(|source| DatapathError::Io { path, source })?;
    Ok(n)
}

/// An earlier version's `TOKENS` pin (no state slots): every entry to `f`, then the pin
/// is removed.
pub fn tokens_v1(
    dir: &Path,
    mut f: impl FnMut(Fingerprint, TokenInfo) -> Result<(), DatapathError>,
) -> Result<usize, DatapathError> {
    drain_pin(dir, "TOKENS", |fp, v: TokenInfoV1| f(fp, v.into()))
}

/// Earlier versions' `TOKEN_STATE` pins, hashes by fingerprint (`TOKEN_STATE_V2`, and the
/// 56-byte values pinned as `TOKEN_STATE` before `TokenState::allowed`): every entry to
/// `f`, then the pins are removed.
pub fn token_states(
    dir: &Path,
    mut f: impl FnMut(Fingerprint, TokenState) -> Result<(), DatapathError>,
) -> Result<usize, DatapathError> {
    let v2 = drain_pin(dir, "TOKEN_STATE_V2", |fp, st: TokenState| f(fp, st))?;
    let v1 = drain_pin(dir, "TOKEN_STATE", |fp, st: TokenStateV1| f(fp, st.into()))?;
    Ok(v1 + v2)
}

/// An earlier version's preallocated `REVOKED` pin: every revocation to `f`, then the pin
/// is removed (a daemon keeps a pinned map's definition, so only a new pin frees the
/// preallocated memory).
pub fn revoked_v1(
    dir: &Path,
    f: impl FnMut(Fingerprint, u64) -> Result<(), DatapathError>,
) -> Result<usize, DatapathError> {
    drain_pin(dir, "REVOKED", f)
}

/// An earlier version's `VERDICT_STATS` pin (rows of `TOKEN_VERDICT_COUNT` verdicts, the
/// count there was then): each non-zero counter's per-CPU values to `f` with its index in
/// the new layout, then the pin is removed. Returns the counters handed over.
pub fn verdict_stats_v1(
    dir: &Path,
    mut f: impl FnMut(u32, PerCpuValues<u64>) -> Result<(), DatapathError>,
) -> Result<usize, DatapathError> {
    const FILE: &str = "VERDICT_STATS";
    let path = dir.join(FILE);
    if !path.exists() {
        return Ok(0);
    }
    let old = MapData::from_pin(&path).map_err(map_err(FILE))?;
    let old: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(Map::PerCpuArray(old)).map_err(map_err(FILE))?;
    let mut n = 0;
    for i in 0..old.len() {
        let values = old.get(&i, 0).map_err(map_err(FILE))?;
        if values.iter().all(|v| *v == 0) {
            continue;
        }
        let (row, verdict) = (
            i / TOKEN_VERDICT_COUNT as u32,
            i % TOKEN_VERDICT_COUNT as u32,
        );
        f(row * VERDICT_COUNT as u32 + verdict, values)?;
        n += 1;
    }
    std::fs::remove_file(&path).map_err(|source| DatapathError::Io { path, source })?;
    Ok(n)
}
