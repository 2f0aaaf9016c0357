//! Writing a compiled policy into the datapath, at start and on reload.
//!
//! What a request sees: the programs judge it by its token's entry in the generation
//! they judge by, and by the contract slot and scope slots that entry names. Every token
//! entry an application writes or removes, static or issued, goes into one generation,
//! which the programs switch to at one instant (datapath/switch.rs). A reload never
//! rewrites a slot that an entry may still name: a changed contract or scope goes into a
//! new slot (`stabilize`), the entries that use it are rewritten to name the new one (in
//! the generation), and the old slot keeps its old definition. So every request is judged
//! wholly by the old generation or wholly by the new one, and a request judged after
//! another never by an older generation than it.
//!
//! Order keeps the rest right: revocations from the store first, then definitions (into
//! slots no entry names yet), then the generation; revocations are never cleared, and the
//! `Datapath` facade flags a revoked fingerprint's entry whenever it writes one.

use std::collections::{HashMap, HashSet};

use agent_common::{Contract, Fingerprint, TokenInfo};

use super::enforcer::DatapathEnforcer;
use crate::{
    datapath::{Datapath, DatapathError},
    policy::CompiledPolicy,
    store::{StoreError, TokenStatus},
    token::{ApplyReport, Lifecycle, LifecycleError},
};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("writing the policy into the datapath")]
    Datapath(#[from] DatapathError),
    #[error("re-applying tokens and revocations")]
    Lifecycle(#[from] LifecycleError),
    #[error("reading tokens from the store")]
    Store(#[from] StoreError),
}

/// What the kernel holds, as far as this daemon knows, when a reload starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// The last application succeeded: the kernel holds the running policy, under which
    /// `unresolved` active issued tokens did not resolve (their contract or a scope left
    /// the policy).
    InStep { unresolved: usize },
    /// An application failed midway: the kernel may hold part of it.
    Unknown,
}

/// What one application changed.
#[derive(Debug, Default)]
pub struct Applied {
    pub lifecycle: ApplyReport,
    /// Static tokens the new policy no longer lists, removed from the kernel.
    pub removed: usize,
    /// Tokens whose contract changed, whose ramp restarts.
    pub reset: usize,
    /// TOKENS entries written (new or changed, static or issued; unchanged ones are not).
    pub written: usize,
    /// Active issued tokens that do not resolve under the applied policy.
    pub unresolved: usize,
}

/// The contract and scope slots of `new` that differ from `old`'s (every slot without
/// `old`).
fn write_definitions(
    dp: &mut Datapath,
    old: Option<&CompiledPolicy>,
    new: &CompiledPolicy,
) -> Result<(), DatapathError> {
    for (i, (_, c)) in new.contracts.iter().enumerate() {
        if old.and_then(|o| o.contracts.get(i)).map(|(_, d)| d) != Some(c) {
            dp.set_contract(i as u32, c)?;
        }
    }
    for (i, (_, s)) in new.scopes.iter().enumerate() {
        if old.and_then(|o| o.scopes.get(i)).map(|(_, d)| d) != Some(s) {
            dp.set_scope(i as u32, s)?;
        }
    }
    Ok(())
}

/// First application, before any listener is attached by this daemon. Static tokens are
/// compared with what the kernel holds (pinned maps of an earlier daemon): only entries
/// that differ are written.
pub fn apply_initial(
    enf: &DatapathEnforcer,
    lifecycle: &Lifecycle,
    policy: &CompiledPolicy,
) -> Result<Applied, ApplyError> {
    // Revocations from SQLite first, then static and issued tokens under this policy's
    // indexes, as one generation.
    let revoked = lifecycle.apply_revocations()?;
    let resolved = lifecycle.resolve_all(policy)?;
    let installed = resolved.entries.len();
    let written = {
        let mut dp = enf.lock();
        write_definitions(&mut dp, None, policy)?;
        dp.install_tokens(
            policy
                .tokens
                .iter()
                .map(|t| (t.fingerprint, t.info))
                .chain(resolved.entries),
        )?
    };
    Ok(Applied {
        unresolved: resolved.failed.len(),
        lifecycle: ApplyReport {
            revoked,
            installed,
            failed: resolved.failed,
        },
        written,
        ..Applied::default()
    })
}

/// Static tokens that differ between two policies.
#[derive(Debug, Default, PartialEq)]
struct TokenDiff {
    /// New or changed entries, with the contract index the token had before (None: new).
    changed: Vec<(Fingerprint, TokenInfo, Option<u32>)>,
    /// No longer listed.
    removed: Vec<Fingerprint>,
}

/// What changed from `old`'s static tokens to `new`'s. Both are in file order, so an edit
/// leaves them aligned but for a few tokens: compared in step while they are, by
/// fingerprint from the first misalignment on.
fn diff_tokens(old: &CompiledPolicy, new: &CompiledPolicy) -> TokenDiff {
    let mut diff = TokenDiff::default();
    let aligned = old
        .tokens
        .iter()
        .zip(&new.tokens)
        .take_while(|(o, n)| o.fingerprint == n.fingerprint)
        .count();
    for (o, n) in old.tokens[..aligned].iter().zip(&new.tokens[..aligned]) {
        if o.info != n.info {
            diff.changed
                .push((n.fingerprint, n.info, Some(o.info.contract)));
        }
    }
    let (old_rest, new_rest) = (&old.tokens[aligned..], &new.tokens[aligned..]);
    if old_rest.is_empty() && new_rest.is_empty() {
        return diff;
    }
    let before: HashMap<Fingerprint, &TokenInfo> =
        old_rest.iter().map(|t| (t.fingerprint, &t.info)).collect();
    let mut kept: HashSet<Fingerprint> = HashSet::with_capacity(new_rest.len());
    for n in new_rest {
        kept.insert(n.fingerprint);
        match before.get(&n.fingerprint) {
            Some(info) if **info == n.info => {}
            was => diff
                .changed
                .push((n.fingerprint, n.info, was.map(|i| i.contract))),
        }
    }
    diff.removed = old_rest
        .iter()
        .map(|t| t.fingerprint)
        .filter(|fp| !kept.contains(fp))
        .collect();
    diff
}

/// Live contract and scope names with their slots (tombstones left out).
fn resolution(p: &CompiledPolicy) -> (HashMap<&str, usize>, HashMap<&str, usize>) {
    fn live<T>(defs: &[(String, T)]) -> HashMap<&str, usize> {
        defs.iter()
            .enumerate()
            .filter(|(_, (n, _))| !n.starts_with(TOMBSTONE))
            .map(|(i, (n, _))| (n.as_str(), i))
            .collect()
    }
    (live(&p.contracts), live(&p.scopes))
}

/// Whether an issued token may resolve otherwise under `new` than under `old`: a name
/// that active tokens use (`in_use`, asked only if a name moved or left) moved or left, or
/// a name came while `unresolved` tokens lacked one.
fn resolves_otherwise(
    old: &CompiledPolicy,
    new: &CompiledPolicy,
    unresolved: usize,
    in_use: impl FnOnce() -> Result<(HashSet<String>, HashSet<String>), StoreError>,
) -> Result<bool, StoreError> {
    let ((old_c, old_s), (new_c, new_s)) = (resolution(old), resolution(new));
    if (new_c.len() > old_c.len() || new_s.len() > old_s.len()) && unresolved > 0 {
        return Ok(true);
    }
    fn gone<'p>(o: &HashMap<&'p str, usize>, n: &HashMap<&str, usize>) -> Vec<&'p str> {
        o.iter()
            .filter(|(name, slot)| n.get(*name) != Some(slot))
            .map(|(name, _)| *name)
            .collect()
    }
    let (gone_c, gone_s) = (gone(&old_c, &new_c), gone(&old_s, &new_s));
    if gone_c.is_empty() && gone_s.is_empty() {
        return Ok(false);
    }
    let (used_c, used_s) = in_use()?;
    Ok(gone_c.iter().any(|n| used_c.contains(*n)) || gone_s.iter().any(|n| used_s.contains(*n)))
}

/// Which of `fps` are active issued tokens (their entries are the lifecycle's, not the
/// policy's): looked up one by one when they are few, from one read of the store else.
fn issued_among(
    lifecycle: &Lifecycle,
    fps: &[Fingerprint],
) -> Result<HashSet<Fingerprint>, StoreError> {
    let store = lifecycle.store();
    if fps.len() <= 1024 {
        let mut out = HashSet::new();
        for fp in fps {
            if store
                .get(fp)?
                .is_some_and(|r| r.status == TokenStatus::Active)
            {
                out.insert(*fp);
            }
        }
        return Ok(out);
    }
    let wanted: HashSet<&Fingerprint> = fps.iter().collect();
    Ok(store
        .active()?
        .into_iter()
        .map(|r| r.fingerprint)
        .filter(|fp| wanted.contains(fp))
        .collect())
}

/// A reload from `old` to `new` (stabilized against it) while the listeners keep judging
/// traffic. When the kernel holds `old` as applied, only what differs between the two
/// policies is written, and issued tokens are re-applied only if one may resolve
/// otherwise. If not, every static token is compared with what the kernel holds and every
/// issued token is re-applied.
pub fn apply_reload(
    enf: &DatapathEnforcer,
    lifecycle: &Lifecycle,
    old: &CompiledPolicy,
    new: &CompiledPolicy,
    kernel: Kernel,
) -> Result<Applied, ApplyError> {
    let Kernel::InStep { unresolved } = kernel else {
        return apply_full(enf, lifecycle, old, new);
    };
    let diff = diff_tokens(old, new);
    let touched: Vec<Fingerprint> = diff
        .changed
        .iter()
        .map(|(fp, ..)| *fp)
        .chain(diff.removed.iter().copied())
        .collect();
    let issued = issued_among(lifecycle, &touched)?;
    let mut applied = Applied {
        unresolved,
        ..Applied::default()
    };
    // Issued tokens are re-resolved only when one may resolve otherwise; revocations go
    // in first, as `Lifecycle::apply_all` does.
    let reissued = if resolves_otherwise(old, new, unresolved, || lifecycle.store().names_in_use())?
    {
        applied.lifecycle.revoked = lifecycle.apply_revocations()?;
        let r = lifecycle.resolve_all(new)?;
        applied.lifecycle.installed = r.entries.len();
        applied.lifecycle.failed = r.failed;
        applied.unresolved = applied.lifecycle.failed.len();
        Some((r.entries, issued_ramp_restarts(lifecycle, old, new)?))
    } else {
        None
    };
    let removed: Vec<Fingerprint> = diff
        .removed
        .iter()
        .filter(|fp| !issued.contains(*fp))
        .copied()
        .collect();
    // A contract whose definition changed moved to a new slot (`stabilize`), so the
    // tokens whose ramp restarts are those whose contract slot changed.
    let mut restarts: Vec<Fingerprint> = diff
        .changed
        .iter()
        .filter(|(fp, info, was)| was.is_some_and(|c| c != info.contract) && !issued.contains(fp))
        .map(|(fp, ..)| *fp)
        .collect();
    let statics = diff
        .changed
        .iter()
        .filter(|(fp, ..)| !issued.contains(fp))
        .map(|(fp, info, _)| (*fp, *info));
    let mut dp = enf.lock();
    write_definitions(&mut dp, Some(old), new)?;
    // Static and issued tokens, and removals, as one generation (datapath/switch.rs).
    applied.written = match reissued {
        Some((entries, moved)) => {
            restarts.extend(moved);
            dp.switch_generation(statics.chain(entries), &removed)?
        }
        None => dp.switch_generation(statics, &removed)?,
    };
    applied.removed = removed.len();
    for fp in &restarts {
        dp.reset_token_state(fp)?;
    }
    applied.reset = restarts.len();
    Ok(applied)
}

/// Issued tokens whose contract (by name) says something else under `new`.
fn issued_ramp_restarts(
    lifecycle: &Lifecycle,
    old: &CompiledPolicy,
    new: &CompiledPolicy,
) -> Result<Vec<Fingerprint>, StoreError> {
    let issued: HashMap<Fingerprint, String> = lifecycle
        .store()
        .active()?
        .into_iter()
        .map(|r| (r.fingerprint, r.contract))
        .collect();
    Ok(issued_restarts(old, new, &issued))
}

/// A reload that does not trust the kernel to hold `old`: every static token compared
/// with the kernel's entries, every issued token re-applied, every revocation re-flagged.
fn apply_full(
    enf: &DatapathEnforcer,
    lifecycle: &Lifecycle,
    old: &CompiledPolicy,
    new: &CompiledPolicy,
) -> Result<Applied, ApplyError> {
    let revoked = lifecycle.apply_revocations()?;
    let resolved = lifecycle.resolve_all(new)?;
    let issued: HashMap<Fingerprint, String> = lifecycle
        .store()
        .active()?
        .into_iter()
        .map(|r| (r.fingerprint, r.contract))
        .collect();
    let new_static: HashSet<Fingerprint> = new.tokens.iter().map(|t| t.fingerprint).collect();
    let removed: Vec<Fingerprint> = old
        .tokens
        .iter()
        .map(|t| t.fingerprint)
        .filter(|fp| !new_static.contains(fp) && !issued.contains_key(fp))
        .collect();
    let changed = ramp_restarts(old, new, &issued);
    let installed = resolved.entries.len();
    let written = {
        let mut dp = enf.lock();
        write_definitions(&mut dp, None, new)?;
        // Static and issued tokens, and removals, as one generation (datapath/switch.rs).
        let written = dp.switch_generation(
            new.tokens
                .iter()
                .map(|t| (t.fingerprint, t.info))
                .chain(resolved.entries),
            &removed,
        )?;
        for fp in &changed {
            dp.reset_token_state(fp)?;
        }
        written
    };
    // REVOKED is never cleared, but a revocation recorded while this ran must not be missed.
    for fp in lifecycle.store().revoked()? {
        use crate::token::Enforcer as _;
        enf.revoke(fp)
            .map_err(|source| LifecycleError::KernelRevoke {
                fingerprint: fp.to_string(),
                source,
            })?;
    }
    Ok(Applied {
        unresolved: resolved.failed.len(),
        lifecycle: ApplyReport {
            revoked,
            installed,
            failed: resolved.failed,
        },
        removed: removed.len(),
        reset: changed.len(),
        written,
    })
}

/// Names of slots whose contract or scope the new policy dropped: kept (with the old
/// definition) so that no index moves. NUL cannot appear in a policy name or a CLI argument,
/// so nothing can resolve these.
const TOMBSTONE: &str = "\u{0}removed:";

/// Reorders `new` so that every contract and scope keeps the slot it had in `old` while
/// its definition stays, and a changed definition never overwrites a slot that an entry in
/// the kernel may still name (module comment): a dropped or redefined entry's slot becomes
/// a tombstone that keeps its old definition, and new or redefined names take free slots.
/// When the table is full, tombstones left by earlier reloads are reused (every entry was
/// rewritten since: static tokens by that reload, issued ones by its re-resolution); if
/// that is not enough, falls back to `new` as compiled (the next restart compacts).
pub fn stabilize(old: &CompiledPolicy, mut new: CompiledPolicy) -> CompiledPolicy {
    fn order<T: Clone + PartialEq>(
        old: &[(String, T)],
        new: &[(String, T)],
        max: usize,
    ) -> (Vec<(String, T)>, Vec<u32>) {
        let mut reusable: std::collections::VecDeque<usize> = old
            .iter()
            .enumerate()
            .filter(|(_, (n, _))| n.starts_with(TOMBSTONE))
            .map(|(i, _)| i)
            .collect();
        let mut out: Vec<(String, T)> = old
            .iter()
            .map(|(name, def)| match new.iter().find(|(n, _)| n == name) {
                Some((_, d)) if d == def => (name.clone(), def.clone()),
                _ if name.starts_with(TOMBSTONE) => (name.clone(), def.clone()),
                _ => (format!("{TOMBSTONE}{name}"), def.clone()),
            })
            .collect();
        let mut remap = Vec::with_capacity(new.len());
        for (name, def) in new {
            let slot = match out.iter().position(|(n, _)| n == name) {
                Some(i) => i,
                None => match (out.len() >= max).then(|| reusable.pop_front()).flatten() {
                    Some(i) => {
                        out[i] = (name.clone(), def.clone());
                        i
                    }
                    None => {
                        out.push((name.clone(), def.clone()));
                        out.len() - 1
                    }
                },
            };
            remap.push(slot as u32);
        }
        (out, remap)
    }
    let (contracts, contract_map) = order(
        &old.contracts,
        &new.contracts,
        agent_common::MAX_CONTRACTS as usize,
    );
    let (scopes, scope_map) = order(&old.scopes, &new.scopes, agent_common::MAX_SCOPES);
    if scopes.len() > agent_common::MAX_SCOPES
        || contracts.len() > agent_common::MAX_CONTRACTS as usize
    {
        tracing::warn!("policy reload: index tables full, indexes renumbered (restart to compact)");
        return new;
    }
    for t in &mut new.tokens {
        t.info.contract = contract_map[t.info.contract as usize];
        let mut mask = 0u64;
        for (bit, to) in scope_map.iter().enumerate() {
            if t.info.scopes & (1 << bit) != 0 {
                mask |= 1 << to;
            }
        }
        t.info.scopes = mask;
    }
    new.contracts = contracts;
    new.scopes = scopes;
    new
}

/// What a contract name says in `p`.
fn definition<'p>(p: &'p CompiledPolicy, name: &str) -> Option<&'p Contract> {
    p.contracts.iter().find(|(n, _)| n == name).map(|(_, c)| c)
}

/// The tokens whose ramp restarts on a reload from `old` to `new`: those whose contract
/// (by name, then by what it says) changed. `issued`: the active issued tokens and the
/// names of their contracts. Tokens new to the policy start fresh anyway.
fn ramp_restarts(
    old: &CompiledPolicy,
    new: &CompiledPolicy,
    issued: &HashMap<Fingerprint, String>,
) -> Vec<Fingerprint> {
    fn name(p: &CompiledPolicy, idx: u32) -> Option<&str> {
        p.contracts.get(idx as usize).map(|(n, _)| n.as_str())
    }
    // By fingerprint: a policy may list hundreds of thousands of static tokens.
    let old_contract: HashMap<Fingerprint, u32> = old
        .tokens
        .iter()
        .map(|o| (o.fingerprint, o.info.contract))
        .collect();
    let mut changed: Vec<Fingerprint> = Vec::new();
    for t in &new.tokens {
        let before = old_contract.get(&t.fingerprint).and_then(|c| name(old, *c));
        if let (Some(b), Some(n)) = (before, name(new, t.info.contract)) {
            if b != n || definition(old, b) != definition(new, n) {
                changed.push(t.fingerprint);
            }
        }
    }
    changed.extend(issued_restarts(old, new, issued));
    changed
}

/// The issued tokens whose contract says something else under `new`.
fn issued_restarts(
    old: &CompiledPolicy,
    new: &CompiledPolicy,
    issued: &HashMap<Fingerprint, String>,
) -> Vec<Fingerprint> {
    issued
        .iter()
        .filter(|(_, n)| definition(old, n).is_some() && definition(old, n) != definition(new, n))
        .map(|(fp, _)| *fp)
        .collect()
}

#[cfg(test)]
#[path = "apply_tests.rs"]
mod tests;
