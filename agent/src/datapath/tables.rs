//! Domain operations on the datapath's maps.

use std::os::fd::AsFd;

use agent_common::{
    ports, Contract, Event, EventBudget, Fingerprint, GlobalConfig, ListenerConfig, ListenerKey,
    Scope, TokenInfo, TokenState, TokenStats, Verdict, MAX_CONTRACTS, MAX_LISTENERS, MAX_SCOPES,
    TOKEN_REVOKED, VERDICT_COUNT,
};
use aya::{
    maps::{HashMap, IterableMap, MapData, MapError, PerCpuValues, RingBuf},
    Pod,
};

use super::{
    error::map_err,
    migrate,
    slots::{Assigned, Slots},
    switch::Switch,
    sys, Datapath, DatapathError,
};

/// What the metrics need from TOKEN_STATE, read in one pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuntimeTotals {
    /// Tokens with runtime state (seen since their slot was assigned or their ramp restarted).
    pub token_states: usize,
    /// Ramp contract breaches, summed over tokens.
    pub breaches: u64,
}

/// Calls `f` for every entry of a hash map: batched where the kernel can, else (a kernel
/// without batch lookups) entry by entry. Returns the number of entries.
fn scan<K: Pod, V: Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
    mut f: impl FnMut(&K, &V),
) -> Result<usize, DatapathError> {
    let fd = map.map().fd().as_fd();
    match sys::for_each_entry(fd, &mut f) {
        Ok(n) => Ok(n),
        // 524: the kernel's internal ENOTSUPP, which leaks out of bpf(2).
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOTSUP | 524)) => {
            let mut n = 0;
            for (k, v) in map.iter().filter_map(Result::ok) {
                f(&k, &v);
                n += 1;
            }
            Ok(n)
        }
        Err(source) => Err(DatapathError::Batch { name, source }),
    }
}

/// Deleting what is not there is not an error.
fn absent_ok(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

impl Datapath {
    pub fn set_config(&mut self, cfg: &GlobalConfig) -> Result<(), DatapathError> {
        self.config.set(0, cfg, 0).map_err(map_err("CONFIG"))
    }

    pub fn config(&self) -> Result<GlobalConfig, DatapathError> {
        self.config.get(&0, 0).map_err(map_err("CONFIG"))
    }

    pub fn set_listener(
        &mut self,
        key: ListenerKey,
        cfg: ListenerConfig,
    ) -> Result<(), DatapathError> {
        if cfg.id >= MAX_LISTENERS {
            return Err(DatapathError::Capacity {
                what: "listener",
                index: cfg.id,
                max: MAX_LISTENERS,
            });
        }
        self.listeners
            .insert(key, cfg, 0)
            .map_err(map_err("LISTENERS"))?;
        self.sync_port(key.port);
        Ok(())
    }

    pub fn remove_listener(&mut self, key: &ListenerKey) -> Result<(), DatapathError> {
        absent_ok(self.listeners.remove(key)).map_err(map_err("LISTENERS"))?;
        self.sync_port(key.port);
        Ok(())
    }

    /// Rewrites `port`'s PORTS word (the datapath's pre-filter, and its lone listener:
    /// `agent_common::ports`) from LISTENERS.
    fn sync_port(&self, port: u16) {
        let mine: Vec<_> = self
            .listeners()
            .into_iter()
            .filter(|(k, _)| k.port == port)
            .collect();
        self.store_port_word(port, &mine);
    }

    /// Rewrites every PORTS word from LISTENERS.
    pub(super) fn sync_ports(&self) {
        let mut by_port: std::collections::BTreeMap<u16, Vec<_>> = Default::default();
        for l in self.listeners() {
            by_port.entry(l.0.port).or_default().push(l);
        }
        for port in 0..=u16::MAX {
            self.store_port_word(port, by_port.get(&port).map_or(&[], Vec::as_slice));
        }
    }

    /// One atomic store of the word for `port`'s `listeners`, if it changes.
    fn store_port_word(&self, port: u16, listeners: &[(ListenerKey, ListenerConfig)]) {
        let want = ports::word(listeners);
        if self.ports.load(usize::from(port)) != want {
            self.ports.store(usize::from(port), want);
        }
    }

    /// Test hook: the programs act as if they had reset nothing for longer than they
    /// remember a flow (`LAST_RESET` 0), so a test sees the reset path turn the
    /// retransmission check back on.
    #[doc(hidden)]
    pub fn forget_last_reset(&mut self) -> Result<(), DatapathError> {
        super::load::write_last_reset(&mut self.ebpf, 0)
    }

    pub fn listeners(&self) -> Vec<(ListenerKey, ListenerConfig)> {
        self.listeners.iter().filter_map(Result::ok).collect()
    }

    pub fn set_contract(&mut self, index: u32, c: &Contract) -> Result<(), DatapathError> {
        if index >= MAX_CONTRACTS {
            return Err(DatapathError::Capacity {
                what: "contract",
                index,
                max: MAX_CONTRACTS,
            });
        }
        self.contracts
            .set(index, c, 0)
            .map_err(map_err("CONTRACTS"))
    }

    pub fn contract(&self, index: u32) -> Result<Contract, DatapathError> {
        self.contracts.get(&index, 0).map_err(map_err("CONTRACTS"))
    }

    pub fn set_scope(&mut self, index: u32, s: &Scope) -> Result<(), DatapathError> {
        if index as usize >= MAX_SCOPES {
            return Err(DatapathError::Capacity {
                what: "scope",
                index,
                max: MAX_SCOPES as u32,
            });
        }
        self.scopes.set(index, s, 0).map_err(map_err("SCOPES"))
    }

    /// Adds or replaces what a token may do, at one instant (outside any generation
    /// switch: `switch.rs`). Its runtime state is kept. A revoked fingerprint stays
    /// revoked: the entry carries `TOKEN_REVOKED` whatever `info` says. The entry's
    /// `state_slot` is the fingerprint's own (`Slots`), whatever `info` says.
    pub fn install_token(
        &mut self,
        fp: Fingerprint,
        mut info: TokenInfo,
    ) -> Result<(), DatapathError> {
        self.settle()?;
        if self.is_revoked(&fp) {
            info.flags |= TOKEN_REVOKED;
        }
        let assigned = self.slots.assign(fp).ok_or(DatapathError::Full {
            what: "token state",
            max: self.slots.capacity(),
        })?;
        info.state_slot = assigned.slot();
        info.generation = self.generation();
        if let Assigned::New(slot) = assigned {
            // Before any entry names it: the programs take all zero for a fresh state.
            self.token_state
                .write(slot as usize, &TokenState::default());
        }
        self.tokens_at_load = None;
        let replaces = self.tokens.get(&fp, 0).is_ok();
        let r = self.tokens.insert(fp, info, 0).map_err(map_err("TOKENS"));
        if r.is_err() && matches!(assigned, Assigned::New(_)) {
            self.slots.release(&fp);
        }
        // The replaced element may go to the next update while a program reads it.
        self.unsettled |= replaces;
        r
    }

    /// Installs many tokens as `install_token` would each, as one generation: the
    /// programs see all of them at one instant (`switch.rs`). See `switch_generation`.
    pub fn install_tokens(
        &mut self,
        tokens: impl IntoIterator<Item = (Fingerprint, TokenInfo)>,
    ) -> Result<usize, DatapathError> {
        self.switch_generation(tokens, &[])
    }

    /// One token generation: `tokens` installed as `install_token` would each and
    /// `removed` taken out (with their runtime state), all seen by the programs at one
    /// instant (`switch.rs`). Only entries that differ from what TOKENS already holds are
    /// written, through batched updates: a few syscalls per 4096 tokens, not one per token.
    /// What the kernel holds is read in batched passes over TOKENS and REVOKED, or, for a
    /// few tokens (a reload's diff), entry by entry: a reload that changes one token of a
    /// million reads and writes one entry. Returns the number of entries written.
    pub fn switch_generation(
        &mut self,
        tokens: impl IntoIterator<Item = (Fingerprint, TokenInfo)>,
        removed: &[Fingerprint],
    ) -> Result<usize, DatapathError> {
        /// Up to this many tokens, lookups one by one cost less than reading the maps.
        const FEW: usize = 1024;
        self.settle()?;
        let tokens: Vec<(Fingerprint, TokenInfo)> = tokens.into_iter().collect();
        let mut held = std::collections::HashMap::new();
        let mut revoked = std::collections::HashSet::new();
        if tokens.len() + removed.len() <= FEW {
            for fp in tokens.iter().map(|(fp, _)| fp).chain(removed) {
                if let Ok(info) = self.tokens.get(fp, 0) {
                    held.insert(*fp, info);
                }
                if self.is_revoked(fp) {
                    revoked.insert(*fp);
                }
            }
        } else {
            match self.tokens_at_load.take() {
                Some(at_load) => held = at_load,
                None => {
                    scan(
                        &self.tokens,
                        "TOKENS",
                        |fp: &Fingerprint, info: &TokenInfo| {
                            held.insert(*fp, *info);
                        },
                    )?;
                }
            }
            scan(&self.revoked, "REVOKED", |fp: &Fingerprint, _: &u64| {
                revoked.insert(*fp);
            })?;
        }
        let mut switch = Switch::default();
        let mut fresh_slots = Vec::new();
        for (fp, mut info) in tokens {
            if revoked.contains(&fp) {
                info.flags |= TOKEN_REVOKED;
            }
            let assigned = self.slots.assign(fp).ok_or(DatapathError::Full {
                what: "token state",
                max: self.slots.capacity(),
            })?;
            info.state_slot = assigned.slot();
            // `switch` tags what it writes.
            info.generation = 0;
            if let Assigned::New(slot) = assigned {
                // Before any entry names it: the programs take all zero for a fresh state.
                self.token_state
                    .write(slot as usize, &TokenState::default());
                fresh_slots.push(fp);
            }
            match held.get(&fp) {
                None => switch.fresh.push((fp, info)),
                // The generation an entry was written in is not what it says.
                Some(h)
                    if TokenInfo {
                        generation: 0,
                        ..*h
                    } == info => {}
                Some(_) => switch.changed.push((fp, info)),
            }
        }
        for fp in removed {
            if held.contains_key(fp) {
                switch.removed.push(*fp);
            } else {
                self.release_slot(fp);
            }
        }
        let written = switch.fresh.len() + switch.changed.len();
        let r = self.switch(switch);
        if r.is_err() {
            // Slots handed out for entries that may not have been written go back; a slot
            // whose entry was written is re-found from TOKENS at the next load.
            for fp in &fresh_slots {
                if self.tokens.get(fp, 0).is_err() {
                    self.slots.release(fp);
                }
            }
        }
        r.map(|()| written)
    }

    /// Removes a token and its runtime state, at one instant (outside any generation
    /// switch).
    pub fn remove_token(&mut self, fp: &Fingerprint) -> Result<(), DatapathError> {
        self.settle()?;
        self.tokens_at_load = None;
        absent_ok(self.tokens.remove(fp)).map_err(map_err("TOKENS"))?;
        // The deleted element may go to the next insert while a program reads it.
        self.unsettled = true;
        self.release_slot(fp);
        Ok(())
    }

    /// Frees a removed token's state slot (zeroed for its next owner).
    pub(super) fn release_slot(&mut self, fp: &Fingerprint) {
        if let Some(slot) = self.slots.release(fp) {
            self.token_state
                .write(slot as usize, &TokenState::default());
        }
    }

    /// Rebuilds the slot assignment from TOKENS (adopted from pins, or empty): each entry
    /// keeps its slot, but one that is out of range or already taken gets a fresh one
    /// (and loses its runtime state). Runs at load, before any program of this version
    /// can be attached.
    pub(super) fn adopt_token_slots(&mut self) -> Result<(), DatapathError> {
        let cap = u32::try_from(self.token_state.len()).unwrap_or(u32::MAX);
        let mut claims = Vec::new();
        let mut at_load = std::collections::HashMap::new();
        let current = self.generation();
        let mut unborn = Vec::new();
        scan(
            &self.tokens,
            "TOKENS",
            |fp: &Fingerprint, info: &TokenInfo| {
                if info.generation > current {
                    unborn.push(*fp);
                    return;
                }
                claims.push((*fp, info.state_slot));
                at_load.insert(*fp, *info);
            },
        )?;
        if !unborn.is_empty() {
            // A generation a stopped daemon never switched to (`switch.rs`).
            sys::delete_batch(self.tokens.map().fd().as_fd(), &unborn).map_err(|source| {
                DatapathError::Batch {
                    name: "TOKENS",
                    source,
                }
            })?;
            self.unsettled = true;
            tracing::info!(
                tokens = unborn.len(),
                "deleted the entries of a token generation never switched to"
            );
        }
        let (slots, homeless) = Slots::rebuild(cap, claims);
        self.slots = slots;
        self.tokens_at_load = Some(at_load);
        for fp in &homeless {
            if let Ok(info) = self.tokens.get(fp, 0) {
                self.install_token(*fp, info)?;
            }
        }
        if !homeless.is_empty() {
            tracing::warn!(
                tokens = homeless.len(),
                "adopted TOKENS entries without a valid state slot got new ones (their ramps restart)"
            );
        }
        Ok(())
    }

    /// Moves an earlier version's pinned tokens and runtime state (`migrate`) into this
    /// version's maps. An entry these maps already hold wins; a state whose token is not
    /// installed is dropped (its token was removed).
    pub(super) fn migrate_tokens(&mut self, dir: &std::path::Path) -> Result<(), DatapathError> {
        // Revocations first: the tokens moved over below carry their flag from the start.
        let revocations = migrate::revoked_v1(dir, |fp, at| {
            self.revoked.insert(fp, at, 0).map_err(map_err("REVOKED"))
        })?;
        if revocations > 0 {
            tracing::info!(
                revocations,
                "moved revocations from an earlier version's preallocated REVOKED pin"
            );
        }
        let tokens = migrate::tokens_v1(dir, |fp, info| {
            if self.slots.slot(&fp).is_none() {
                self.install_token(fp, info)?;
            }
            Ok(())
        })?;
        let states = migrate::token_states(dir, |fp, st| {
            if let Some(slot) = self.slots.slot(&fp) {
                if self.token_state.read(slot as usize) == TokenState::default() {
                    self.token_state.write(slot as usize, &st);
                }
            }
            Ok(())
        })?;
        if tokens + states > 0 {
            tracing::info!(
                tokens,
                states,
                "moved tokens and their runtime state from an earlier version's pins"
            );
        }
        Ok(())
    }

    /// Moves an earlier version's verdict counters into this layout (see
    /// `migrate::verdict_stats_v1`).
    pub(super) fn migrate_verdict_stats(
        &mut self,
        dir: &std::path::Path,
    ) -> Result<(), DatapathError> {
        let moved = migrate::verdict_stats_v1(dir, |idx, values| {
            self.verdict_stats
                .set(idx, values, 0)
                .map_err(map_err("VERDICT_STATS"))
        })?;
        if moved > 0 {
            tracing::info!(
                moved,
                "moved verdict counters from an earlier version's pin"
            );
        }
        Ok(())
    }

    pub fn token(&self, fp: &Fingerprint) -> Option<TokenInfo> {
        self.tokens.get(fp, 0).ok()
    }

    pub fn tokens(&self) -> Vec<(Fingerprint, TokenInfo)> {
        self.tokens.iter().filter_map(Result::ok).collect()
    }

    /// Denies the token from the next packet on: REVOKED records it (for good), and the
    /// installed entry, which the programs read, gets `TOKEN_REVOKED`. Both updates are
    /// synchronous syscalls: when this returns, every CPU sees the revocation.
    pub fn revoke(&mut self, fp: Fingerprint, at_ns: u64) -> Result<(), DatapathError> {
        self.revoked
            .insert(fp, at_ns, 0)
            .map_err(map_err("REVOKED"))?;
        self.flag_revoked(&fp).map(|_| ())
    }

    /// Sets `TOKEN_REVOKED` on `fp`'s TOKENS entry, if it has one without it; says
    /// whether it did.
    fn flag_revoked(&mut self, fp: &Fingerprint) -> Result<bool, DatapathError> {
        let Ok(mut info) = self.tokens.get(fp, 0) else {
            return Ok(false);
        };
        if info.flags & TOKEN_REVOKED != 0 {
            return Ok(false);
        }
        info.flags |= TOKEN_REVOKED;
        self.settle()?;
        self.tokens_at_load = None;
        self.tokens.insert(fp, info, 0).map_err(map_err("TOKENS"))?;
        // The replaced element may go to the next update while a program reads it.
        self.unsettled = true;
        Ok(true)
    }

    /// Brings adopted maps up to `TOKEN_REVOKED`: a daemon that predates the flag left
    /// revoked tokens' entries without it. Runs at load, before any program of this
    /// version can be attached.
    pub(super) fn flag_all_revoked(&mut self) -> Result<usize, DatapathError> {
        let mut flagged = 0;
        for fp in self.revoked() {
            if self.flag_revoked(&fp)? {
                flagged += 1;
            }
        }
        Ok(flagged)
    }

    pub fn is_revoked(&self, fp: &Fingerprint) -> bool {
        self.revoked.get(fp, 0).is_ok()
    }

    pub fn revoked(&self) -> Vec<Fingerprint> {
        self.revoked.keys().filter_map(Result::ok).collect()
    }

    /// An installed token's runtime state; `None` until its first request (or after a
    /// ramp restart).
    pub fn token_state(&self, fp: &Fingerprint) -> Option<TokenState> {
        let st = self.token_state.read(self.slots.slot(fp)? as usize);
        (st != TokenState::default()).then_some(st)
    }

    /// Overwrites an installed token's runtime state (tests emulate time this way).
    pub fn set_token_state(
        &mut self,
        fp: Fingerprint,
        st: TokenState,
    ) -> Result<(), DatapathError> {
        let slot = self.slots.slot(&fp).ok_or(DatapathError::NotInstalled)?;
        self.token_state.write(slot as usize, &st);
        Ok(())
    }

    /// Restarts a token's ramp (its contract changed). Its admissions so far, counted in
    /// the state, move to TOKEN_STATS, so the token's counts carry on.
    pub fn reset_token_state(&mut self, fp: &Fingerprint) -> Result<(), DatapathError> {
        let Some(slot) = self.slots.slot(fp) else {
            return Ok(());
        };
        let st = self.token_state.read(slot as usize);
        if st == TokenState::default() {
            return Ok(());
        }
        self.token_state
            .write(slot as usize, &TokenState::default());
        if st.allowed != 0 {
            self.add_token_stat(fp, Verdict::Allow, st.allowed)?;
        }
        Ok(())
    }

    /// Adds `n` to one of a token's TOKEN_STATS counters (on the first CPU's row).
    fn add_token_stat(
        &mut self,
        fp: &Fingerprint,
        v: Verdict,
        n: u64,
    ) -> Result<(), DatapathError> {
        let mut rows: Vec<TokenStats> = match self.token_stats.get(fp, 0) {
            Ok(per_cpu) => per_cpu.to_vec(),
            Err(_) => {
                let cpus = aya::util::nr_cpus().map_err(|(path, source)| DatapathError::Io {
                    path: path.into(),
                    source,
                })?;
                vec![TokenStats::default(); cpus]
            }
        };
        rows[0].by_verdict[v as usize] += n;
        // One row per possible CPU, as the map holds them: only a row count that is not
        // the CPU count fails, which `rows` cannot have.
        let values = PerCpuValues::try_from(rows).map_err(|source| DatapathError::Io {
            path: "TOKEN_STATS".into(),
            source,
        })?;
        self.token_stats
            .insert(fp, values, 0)
            .map_err(map_err("TOKEN_STATS"))
    }

    /// Requests by verdict for one listener, summed over CPUs.
    pub fn verdict_counts(&self, listener: u32) -> Result<[u64; VERDICT_COUNT], DatapathError> {
        let mut out = [0u64; VERDICT_COUNT];
        for v in Verdict::ALL {
            let idx = listener * VERDICT_COUNT as u32 + v as u32;
            let per_cpu = self
                .verdict_stats
                .get(&idx, 0)
                .map_err(map_err("VERDICT_STATS"))?;
            out[v as usize] = per_cpu.iter().sum();
        }
        Ok(out)
    }

    /// Requests by verdict for one token, summed over CPUs (zero when never seen); allow
    /// is counted in its runtime state (`TokenState::allowed`) too.
    pub fn token_stats(&self, fp: &Fingerprint) -> TokenStats {
        let mut out = TokenStats::default();
        if let Some(st) = self.token_state(fp) {
            out.by_verdict[Verdict::Allow as usize] = st.allowed;
        }
        if let Ok(per_cpu) = self.token_stats.get(fp, 0) {
            for s in per_cpu.iter() {
                for (o, v) in out.by_verdict.iter_mut().zip(s.by_verdict) {
                    *o += v;
                }
            }
        }
        out
    }

    /// Events the kernel's flood cap (or a full ring) dropped, ever.
    pub fn events_dropped(&self) -> Result<u64, DatapathError> {
        let per_cpu = self
            .event_budget
            .get(&0, 0)
            .map_err(map_err("EVENT_BUDGET"))?;
        Ok(per_cpu.iter().map(|b: &EventBudget| b.dropped).sum())
    }

    /// Hands the event ring to its single reader.
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// Tokens with runtime state and breaches summed over them: read from the mmapped
    /// TOKEN_STATE, no syscall however many tokens there are.
    pub fn runtime_totals(&self) -> Result<RuntimeTotals, DatapathError> {
        let mut totals = RuntimeTotals::default();
        for (_, slot) in self.slots.assigned() {
            let st = self.token_state.read(slot as usize);
            if st != TokenState::default() {
                totals.token_states += 1;
                totals.breaches = totals.breaches.wrapping_add(st.breaches);
            }
        }
        Ok(totals)
    }

    /// Entries in TOKENS: the facade, their only writer, gives each a state slot, so no
    /// pass over the map (a million entries read in batches took seconds, under the lock
    /// that reloads and token commands wait for).
    pub fn token_count(&self) -> usize {
        self.slots.len()
    }

    /// Entries and capacity of the big maps, for fill-level metrics. `totals` saves a
    /// second pass over TOKEN_STATE when the caller has just made one.
    pub fn fill_levels(&self, totals: Option<RuntimeTotals>) -> Vec<(&'static str, usize, u32)> {
        let token_states = match totals {
            Some(t) => t.token_states,
            None => self.runtime_totals().map_or(0, |t| t.token_states),
        };
        vec![
            ("tokens", self.token_count(), self.options.max_tokens),
            (
                "revoked",
                scan(&self.revoked, "REVOKED", |_, _| {}).unwrap_or(0),
                self.options.max_revoked,
            ),
            ("token_state", token_states, self.options.max_tokens),
        ]
    }
}

/// Decodes one ring-buffer record.
pub fn parse_event(bytes: &[u8]) -> Option<Event> {
    if bytes.len() < std::mem::size_of::<Event>() {
        return None;
    }
    // SAFETY: Event is plain old data and the record is at least that long.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const Event) })
}
