//! Putting a loaded program set back into the state of a fresh load, so that a test
//! process verifies the programs once and runs many tests on them. Under emulation (the
//! 6.1 VM step) verifying one program takes 10–20 s; emptying the maps, milliseconds.

use std::os::fd::AsFd as _;

use aya::maps::{IterableMap as _, Map, MapData, MapType};

use super::{error::DatapathError, load::write_last_reset, slots::Slots, Datapath};

/// Maps of the object that hold no state a test could leave behind: the log ring (whose
/// records are read as they come); read-only data sections (`.rodata*`) are skipped too.
const STATELESS: [&str; 1] = ["AYA_LOGS"];

impl Datapath {
    /// Empties every map the programs read or write — hash maps emptied, arrays zeroed,
    /// the event ring drained, `LAST_RESET` set to now — and forgets every token slot, as
    /// a fresh `load` without pins would have them. The programs stay loaded (verified)
    /// and keep their map references. A map the object has and this does not know is an
    /// error, so a new map cannot carry state from one test into the next unnoticed.
    pub fn reset_to_fresh(&mut self) -> Result<(), DatapathError> {
        if self.options.pin_dir.is_some() {
            return Err(DatapathError::ResetPinned);
        }
        let Some(events) = self.events.as_mut() else {
            return Err(DatapathError::EventsTaken);
        };
        while events.next().is_some() {}
        for (name, map) in [
            ("CONFIG", self.config.map()),
            ("PORTS", self.ports.map_data()),
            ("LISTENERS", self.listeners.map()),
            ("TOKENS", self.tokens.map()),
            ("GENERATION", self.generation.map_data()),
            ("NEXT_TOKENS", self.next_tokens.map()),
            ("REVOKED", self.revoked.map()),
            ("CONTRACTS", self.contracts.map()),
            ("SCOPES", self.scopes.map()),
            ("TOKEN_STATE", self.token_state.map_data()),
            ("VERDICT_STATS", self.verdict_stats.map()),
            ("TOKEN_STATS", self.token_stats.map()),
            ("EVENT_BUDGET", self.event_budget.map()),
        ] {
            empty(name, map)?;
        }
        for (name, map) in self.ebpf.maps() {
            if STATELESS.contains(&name) || name.starts_with(".rodata") || name == "LAST_RESET" {
                continue;
            }
            let data = match map {
                // The jump maps hold the programs themselves.
                Map::ProgramArray(_) => continue,
                Map::Array(d)
                | Map::PerCpuArray(d)
                | Map::HashMap(d)
                | Map::LruHashMap(d)
                | Map::PerCpuHashMap(d)
                | Map::PerCpuLruHashMap(d) => d,
                _ => return Err(DatapathError::NoResetRule(name.to_owned())),
            };
            empty(name, data)?;
        }
        write_last_reset(&mut self.ebpf, super::load::coarse_now()?)?;
        self.slots = Slots::rebuild(self.options.max_tokens, []).0;
        self.tokens_at_load = None;
        // Elements were freed while a program may have read them.
        self.unsettled = true;
        Ok(())
    }
}

impl Datapath {
    /// Forgets every connection the programs track (`FLOWS`, `PARTIAL`), as if none had
    /// been opened since they were loaded.
    pub fn forget_flows(&mut self) -> Result<(), DatapathError> {
        for name in ["FLOWS", "PARTIAL"] {
            let map = self.ebpf.map(name).ok_or(DatapathError::MissingMap(name))?;
            let (Map::LruHashMap(d) | Map::HashMap(d)) = map else {
                return Err(DatapathError::NoResetRule(name.to_owned()));
            };
            empty(name, d)?;
        }
        Ok(())
    }
}

/// Empties one hash map or zeroes one array map.
fn empty(name: &str, map: &MapData) -> Result<(), DatapathError> {
    let err = |source| DatapathError::Reset {
        name: name.to_owned(),
        source,
    };
    let info = map.info().map_err(|e| err(std::io::Error::other(e)))?;
    let fd = map.fd().as_fd();
    let ty = info.map_type().map_err(|e| err(std::io::Error::other(e)))?;
    match ty {
        MapType::Hash | MapType::LruHash | MapType::PerCpuHash | MapType::LruPerCpuHash => {
            super::sys::delete_all(fd, info.key_size() as usize)
                .map(drop)
                .map_err(err)
        }
        MapType::Array | MapType::PerCpuArray => {
            let mut value = info.value_size() as usize;
            if ty == MapType::PerCpuArray {
                let cpus = aya::util::nr_cpus().map_err(|(_, e)| err(e))?;
                value = value.next_multiple_of(8) * cpus;
            }
            super::sys::zero_array(fd, info.max_entries(), value).map_err(err)
        }
        _ => Err(DatapathError::NoResetRule(name.to_owned())),
    }
}
