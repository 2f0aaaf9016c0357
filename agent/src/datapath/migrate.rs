//! Pinned maps whose value layout changed since an earlier version of the daemon.
//!
//! A map whose layout changes is pinned under a new file name (`pin_file`; bpffs allows
//! no dots in names), so a daemon never adopts a map of another layout (aya adopts any
//! pin by path, and programs built for one layout would read another's fields). At load,
//! an earlier version's pin is converted into the new map and removed, before any program
//! of this version can run.

use std::path::Path;

use agent_common::{Fingerprint, TokenState};
use aya::maps::{HashMap, Map, MapData, MapError};

use super::{error::map_err, DatapathError};

/// linux/bpf.h: insert only, never replace.
const BPF_NOEXIST: u64 = 1;

/// The file `name` is pinned as under the bpffs dir.
pub fn pin_file(name: &str) -> &str {
    match name {
        // v2: `TokenState::allowed` (56 → 64 bytes).
        "TOKEN_STATE" => "TOKEN_STATE_V2",
        // v2: a listener word per port (was a bitmap of judged ports).
        "PORTS" => "PORTS_V2",
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

/// Moves an earlier version's `TOKEN_STATE` pin (ramp positions, GCRA state, breaches)
/// into `into`, then removes it. Returns the entries moved. An entry `into` already
/// holds wins. The earlier version's programs, still attached until this daemon
/// replaces them, may update the old map after the copy: at most the requests of that
/// moment go uncounted in the new one.
pub fn token_state_v1(
    dir: &Path,
    into: &mut HashMap<MapData, Fingerprint, TokenState>,
) -> Result<usize, DatapathError> {
    let path = dir.join("TOKEN_STATE");
    if !path.exists() {
        return Ok(0);
    }
    let old = MapData::from_pin(&path).map_err(map_err("TOKEN_STATE (v1 pin)"))?;
    let old: HashMap<MapData, Fingerprint, TokenStateV1> =
        HashMap::try_from(Map::HashMap(old)).map_err(map_err("TOKEN_STATE (v1 pin)"))?;
    let mut moved = 0;
    for (fp, st) in old.iter().filter_map(Result::ok) {
        match into.insert(fp, TokenState::from(st), BPF_NOEXIST) {
            Ok(()) => moved += 1,
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => {
                return Err(DatapathError::Map {
                    name: "TOKEN_STATE",
                    source: e,
                })
            }
        }
    }
    std::fs::remove_file(&path).map_err(|source| DatapathError::Io { path, source })?;
    Ok(moved)
}
