//! Token generations: what a reload or an import writes into TOKENS, seen by the programs
//! at one instant.
//!
//! The programs read a token's entry through `GENERATION` (agent-ebpf's `maps::token`): a
//! generation number, and a flag saying a switch to it is under way, during which
//! `NEXT_TOKENS` is read before TOKENS. A switch from generation `g` to `g + 1`:
//!
//! 1. new tokens go into TOKENS tagged `g + 1`: the programs ignore an entry of a later
//!    generation than theirs, so nothing sees them yet;
//! 2. the new entries of tokens TOKENS already holds, and a `TOKEN_ABSENT` entry for each
//!    token removed, go into `NEXT_TOKENS`, which no program reads yet;
//! 3. one atomic store makes `GENERATION` say `g + 1, switching`: from that instant every
//!    program run reads the whole of `g + 1`, and runs that started before it read `g`;
//! 4. after a grace period (no run of generation `g` is left), TOKENS is brought up to
//!    `g + 1`: the entries it replaces or deletes are ones no program reads any more
//!    (`NEXT_TOKENS` shadows them), so the kernel may hand their elements to the next
//!    update without a program reading one mid-copy;
//! 5. `GENERATION` says `g + 1` alone, and after another grace period `NEXT_TOKENS` is
//!    emptied.
//!
//! A generation that changes or removes more tokens than `NEXT_TOKENS` holds (a quarter of
//! TOKENS' capacity) is switched to in steps of that many, each at one instant; the new
//! tokens appear with the last. Writes outside a switch (`install_token`, a revocation's
//! flag) replace one entry at one instant; the element they free could be handed to the
//! next update while a program still reads it, so the next write to TOKENS first waits a
//! grace period (`settle`).
//!
//! A daemon that stopped mid-switch leaves `GENERATION` switching: the next load rolls the
//! switch forward from `NEXT_TOKENS`. Entries of a generation never switched to (tagged
//! later than `GENERATION`) are deleted at load.

use std::os::fd::AsFd;

use agent_common::{Fingerprint, TokenInfo, GENERATION_SWITCHING, TOKEN_ABSENT};
use aya::maps::IterableMap as _;

use super::{error::map_err, sys, Datapath, DatapathError};

/// What one switch writes.
#[derive(Default)]
pub(super) struct Switch {
    /// Tokens TOKENS does not hold yet.
    pub(super) fresh: Vec<(Fingerprint, TokenInfo)>,
    /// New entries of tokens TOKENS holds.
    pub(super) changed: Vec<(Fingerprint, TokenInfo)>,
    /// Tokens TOKENS holds that the generation removes.
    pub(super) removed: Vec<Fingerprint>,
}

fn batch_err(name: &'static str) -> impl FnOnce(std::io::Error) -> DatapathError {
    move |source| DatapathError::Batch { name, source }
}

impl Datapath {
    /// The token generation the programs judge by.
    pub fn generation(&self) -> u32 {
        self.generation.load(0) as u32
    }

    /// Whether a switch is under way (only between the steps of `switch`, or after a
    /// daemon stopped in one).
    fn switching(&self) -> bool {
        self.generation.load(0) & GENERATION_SWITCHING != 0
    }

    /// Before writing TOKENS: finishes a switch a stopped daemon left, and waits out the
    /// program runs that may still read an element a write outside a switch freed.
    pub(super) fn settle(&mut self) -> Result<(), DatapathError> {
        if self.switching() {
            self.finish_switch()?;
        }
        if self.unsettled {
            sys::grace_period();
            self.unsettled = false;
        }
        Ok(())
    }

    /// Writes `s` as one generation (in steps if it changes more than `NEXT_TOKENS` holds;
    /// module comment). Entries must carry their slots and flags already.
    pub(super) fn switch(&mut self, mut s: Switch) -> Result<(), DatapathError> {
        if s.fresh.is_empty() && s.changed.is_empty() && s.removed.is_empty() {
            return Ok(());
        }
        self.settle()?;
        self.tokens_at_load = None;
        let cap = (self
            .next_tokens
            .map()
            .info()
            .map_err(map_err("NEXT_TOKENS"))?)
        .max_entries()
        .max(1) as usize;
        let current = self.generation();
        let altered = s.changed.len() + s.removed.len();
        let steps = altered.div_ceil(cap).max(1);
        if steps > 1 {
            tracing::warn!(
                entries = altered,
                capacity = cap,
                steps,
                "the generation changes more tokens than NEXT_TOKENS holds: switched to in steps"
            );
        }
        let last = current.wrapping_add(steps as u32);
        for (_, info) in &mut s.fresh {
            info.generation = last;
        }
        let (keys, values): (Vec<Fingerprint>, Vec<TokenInfo>) = s.fresh.iter().copied().unzip();
        let tokens_fd = self.tokens.map().fd().as_fd();
        if let Err(e) = sys::update_batch(tokens_fd, &keys, &values) {
            // Never seen (a later generation), but a program may have looked one up.
            let _ = sys::delete_batch(tokens_fd, &keys);
            self.unsettled = true;
            return Err(batch_err("TOKENS")(e));
        }
        if altered == 0 {
            self.generation.store(0, u64::from(last));
            return Ok(());
        }
        let r = self.switch_steps(current, steps, cap, s.changed, s.removed);
        if r.is_err() && self.generation() < last {
            // The new tokens' generation was never switched to: they go again.
            let _ = sys::delete_batch(self.tokens.map().fd().as_fd(), &keys);
            self.unsettled = true;
        }
        r
    }

    /// The switches to `current + 1 ..= current + steps`, `cap` entries each.
    fn switch_steps(
        &mut self,
        current: u32,
        steps: usize,
        cap: usize,
        changed: Vec<(Fingerprint, TokenInfo)>,
        removed: Vec<Fingerprint>,
    ) -> Result<(), DatapathError> {
        let mut changed = changed.into_iter();
        let mut removed = removed.into_iter();
        for step in 1..=steps {
            let gen = current.wrapping_add(step as u32);
            let mut next: Vec<(Fingerprint, TokenInfo)> = changed
                .by_ref()
                .take(cap)
                .map(|(fp, info)| {
                    (
                        fp,
                        TokenInfo {
                            generation: gen,
                            ..info
                        },
                    )
                })
                .collect();
            let n_changed = next.len();
            next.extend(removed.by_ref().take(cap - n_changed).map(|fp| {
                (
                    fp,
                    TokenInfo {
                        flags: TOKEN_ABSENT,
                        generation: gen,
                        ..TokenInfo::default()
                    },
                )
            }));
            self.switch_step(gen, &next, n_changed)?;
        }
        Ok(())
    }

    /// Steps 2 to 5 of the module comment for one generation: `next[..n_changed]` are
    /// changed entries, the rest removals.
    fn switch_step(
        &mut self,
        gen: u32,
        next: &[(Fingerprint, TokenInfo)],
        n_changed: usize,
    ) -> Result<(), DatapathError> {
        let (keys, values): (Vec<Fingerprint>, Vec<TokenInfo>) = next.iter().copied().unzip();
        let next_fd = self.next_tokens.map().fd().as_fd();
        if let Err(e) = sys::update_batch(next_fd, &keys, &values) {
            // Nothing reads NEXT_TOKENS while the generation is not switching.
            let _ = sys::delete_batch(next_fd, &keys);
            return Err(batch_err("NEXT_TOKENS")(e));
        }
        self.generation
            .store(0, u64::from(gen) | GENERATION_SWITCHING);
        sys::grace_period();
        self.bring_tokens_up(&keys[..n_changed], &values[..n_changed], &keys[n_changed..])?;
        self.end_switch(gen, &keys)
    }

    /// Step 4: TOKENS takes the entries `NEXT_TOKENS` shadows.
    fn bring_tokens_up(
        &mut self,
        keys: &[Fingerprint],
        values: &[TokenInfo],
        removed: &[Fingerprint],
    ) -> Result<(), DatapathError> {
        let tokens_fd = self.tokens.map().fd().as_fd();
        sys::update_batch(tokens_fd, keys, values).map_err(batch_err("TOKENS"))?;
        sys::delete_batch(tokens_fd, removed).map_err(batch_err("TOKENS"))?;
        for fp in removed {
            self.release_slot(fp);
        }
        Ok(())
    }

    /// Step 5.
    fn end_switch(&mut self, gen: u32, next_keys: &[Fingerprint]) -> Result<(), DatapathError> {
        self.generation.store(0, u64::from(gen));
        sys::grace_period();
        sys::delete_batch(self.next_tokens.map().fd().as_fd(), next_keys)
            .map_err(batch_err("NEXT_TOKENS"))?;
        Ok(())
    }

    /// Rolls forward a switch a stopped daemon (or a failed step) left: `NEXT_TOKENS` holds
    /// the whole of the generation `GENERATION` names.
    fn finish_switch(&mut self) -> Result<(), DatapathError> {
        let gen = self.generation();
        let mut next = Vec::new();
        sys::for_each_entry(
            self.next_tokens.map().fd().as_fd(),
            |fp: &Fingerprint, info: &TokenInfo| next.push((*fp, *info)),
        )
        .map_err(batch_err("NEXT_TOKENS"))?;
        let (absent, present): (Vec<_>, Vec<_>) = next
            .iter()
            .partition(|(_, info)| info.flags & TOKEN_ABSENT != 0);
        let (keys, values): (Vec<Fingerprint>, Vec<TokenInfo>) = present.into_iter().unzip();
        let removed: Vec<Fingerprint> = absent.into_iter().map(|(fp, _)| fp).collect();
        sys::grace_period();
        self.tokens_at_load = None;
        self.bring_tokens_up(&keys, &values, &removed)?;
        let all: Vec<Fingerprint> = next.iter().map(|(fp, _)| *fp).collect();
        self.end_switch(gen, &all)?;
        tracing::info!(
            generation = gen,
            entries = all.len(),
            "finished a token generation switch a stopped daemon left"
        );
        Ok(())
    }

    /// At load, before the slots are rebuilt (which deletes TOKENS entries of a
    /// generation never switched to): finishes a switch under way, and empties
    /// `NEXT_TOKENS` of a switch never made.
    pub(super) fn adopt_generation(&mut self) -> Result<(), DatapathError> {
        if self.switching() {
            self.finish_switch()?;
        }
        let next_fd = self.next_tokens.map().fd().as_fd();
        let mut stale = Vec::new();
        sys::for_each_entry(next_fd, |fp: &Fingerprint, _: &TokenInfo| stale.push(*fp))
            .map_err(batch_err("NEXT_TOKENS"))?;
        sys::delete_batch(next_fd, &stale).map_err(batch_err("NEXT_TOKENS"))?;
        Ok(())
    }
}
