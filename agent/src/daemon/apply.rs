//! Writing a compiled policy into the datapath, at start and on reload.
//!
//! What a request sees: the programs judge it by its token's one `TOKENS` entry (an
//! update links a new element in the old one's place, never a byte copy into the element
//! a lookup returned; but a preallocated map hands the replaced element to the next
//! update at once, so a lookup a few hundred nanoseconds old can read another token's new
//! entry: a limit of BPF hash maps, see the README) and by the contract slot and scope
//! slots that entry names. A reload never rewrites a slot
//! that an entry may still name: a changed contract or scope goes into a new slot
//! (`stabilize`), the entries that use it are rewritten to name the new one, and the old
//! slot keeps its old definition. So every request is judged wholly by the old generation
//! or wholly by the new one for its token, never by a mix. Tokens switch one after another
//! (in batches of 4096 entries per syscall), not all at the same instant.
//!
//! Order keeps the rest right: definitions first, then every entry the new policy adds or
//! changes, then removals (no valid token is denied in between); revocations are never
//! cleared, and the `Datapath` facade flags a revoked fingerprint's entry whenever it
//! writes one.

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
    /// Static tokens' TOKENS entries written (new or changed; unchanged ones are not).
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
    let written = {
        let mut dp = enf.lock();
        write_definitions(&mut dp, None, policy)?;
        dp.install_tokens(policy.tokens.iter().map(|t| (t.fingerprint, t.info)))?
    };
    // Revocations from SQLite first, then issued tokens under this policy's indexes.
    let lifecycle = lifecycle.apply_all(policy)?;
    Ok(Applied {
        unresolved: lifecycle.failed.len(),
        lifecycle,
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
    {
        let mut dp = enf.lock();
        write_definitions(&mut dp, Some(old), new)?;
        applied.written = dp.install_tokens(
            diff.changed
                .iter()
                .filter(|(fp, ..)| !issued.contains(fp))
                .map(|(fp, info, _)| (*fp, *info)),
        )?;
    }
    // A contract whose definition changed moved to a new slot (`stabilize`), so the
    // tokens whose ramp restarts are those whose contract slot changed.
    let restarts: Vec<Fingerprint> = diff
        .changed
        .iter()
        .filter(|(fp, info, was)| was.is_some_and(|c| c != info.contract) && !issued.contains(fp))
        .map(|(fp, ..)| *fp)
        .collect();
    if resolves_otherwise(old, new, unresolved, || lifecycle.store().names_in_use())? {
        applied.lifecycle = lifecycle.apply_all(new)?;
        applied.unresolved = applied.lifecycle.failed.len();
        let moved = issued_ramp_restarts(lifecycle, old, new)?;
        let mut dp = enf.lock();
        for fp in &moved {
            dp.reset_token_state(fp)?;
        }
        applied.reset += moved.len();
    }
    let mut dp = enf.lock();
    for fp in &diff.removed {
        if !issued.contains(fp) {
            dp.remove_token(fp)?;
            applied.removed += 1;
        }
    }
    for fp in &restarts {
        dp.reset_token_state(fp)?;
    }
    applied.reset += restarts.len();
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
    let written = {
        let mut dp = enf.lock();
        write_definitions(&mut dp, None, new)?;
        dp.install_tokens(new.tokens.iter().map(|t| (t.fingerprint, t.info)))?
    };
    let report = lifecycle.apply_all(new)?;

    let issued: HashMap<Fingerprint, String> = lifecycle
        .store()
        .active()?
        .into_iter()
        .map(|r| (r.fingerprint, r.contract))
        .collect();
    let new_static: HashSet<Fingerprint> = new.tokens.iter().map(|t| t.fingerprint).collect();
    let mut removed = 0;
    {
        let mut dp = enf.lock();
        for t in &old.tokens {
            if !new_static.contains(&t.fingerprint) && !issued.contains_key(&t.fingerprint) {
                dp.remove_token(&t.fingerprint)?;
                removed += 1;
            }
        }
    }

    let changed = ramp_restarts(old, new, &issued);
    {
        let mut dp = enf.lock();
        for fp in &changed {
            dp.reset_token_state(fp)?;
        }
    }
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
        unresolved: report.failed.len(),
        lifecycle: report,
        removed,
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
mod tests {
    use agent_common::{Scope, TokenInfo};

    use super::*;
    use crate::policy::StaticToken;

    fn contract(n: u32) -> Contract {
        Contract {
            n_stages: n,
            ..Default::default()
        }
    }

    /// Contracts that say the same when their names start alike.
    fn policy(contracts: &[&str], scopes: &[&str], token: (&str, &[&str])) -> CompiledPolicy {
        let mut p = CompiledPolicy {
            contracts: contracts
                .iter()
                .map(|n| (n.to_string(), contract(u32::from(n.as_bytes()[0]))))
                .collect(),
            scopes: scopes
                .iter()
                .map(|n| (n.to_string(), Scope::default()))
                .collect(),
            tokens: Vec::new(),
        };
        let (_, mask) = p
            .scope_mask(&token.1.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
        p.tokens.push(StaticToken {
            fingerprint: Fingerprint([1, 2]),
            info: TokenInfo {
                contract: p.contract_index(token.0).unwrap(),
                scopes: mask,
                ..Default::default()
            },
            label: None,
        });
        p
    }

    #[test]
    fn reload_keeps_every_index_in_place() {
        let old = policy(&["a", "b", "c"], &["r", "w"], ("c", &["w"]));
        // "a" and "r" dropped, "d" and "x" added, order shuffled.
        let new = policy(&["d", "c", "b"], &["x", "w"], ("c", &["w", "x"]));
        let s = stabilize(&old, new);
        assert_eq!(s.contract_index("b"), Some(1));
        assert_eq!(s.contract_index("c"), Some(2));
        assert_eq!(s.contract_index("d"), Some(3));
        assert_eq!(
            s.contract_index("a"),
            None,
            "a dropped name resolves to nothing"
        );
        assert_eq!(
            s.contracts[0].1,
            contract(u32::from(b'a')),
            "tombstone keeps the old definition"
        );
        assert_eq!(s.tokens[0].info.contract, 2);
        assert_eq!(s.scope_mask(&["w".into()]).unwrap().1, 0b10);
        assert_eq!(s.scope_mask(&["x".into()]).unwrap().1, 0b100);
        assert_eq!(s.tokens[0].info.scopes, 0b110);
        // A second reload keeps the tombstone (once) and the indexes.
        let again = stabilize(&s, policy(&["b", "c", "d"], &["w", "x"], ("d", &["x"])));
        assert_eq!(again.contracts.len(), 4);
        assert_eq!(again.contract_index("d"), Some(3));
        assert_eq!(again.tokens[0].info.scopes, 0b100);
    }

    /// A contract that says something else takes a new slot; the old slot keeps what it
    /// said for the entries not yet rewritten, and the token names the new one.
    #[test]
    fn a_changed_definition_never_overwrites_its_slot() {
        let old = policy(&["a", "b"], &["r"], ("b", &["r"]));
        let mut new = policy(&["a", "b"], &["r"], ("b", &["r"]));
        new.contracts[1].1 = contract(99);
        new.scopes[0].1.prefix_len = 3;
        let s = stabilize(&old, new);
        assert_eq!(s.contracts[1].1, old.contracts[1].1, "old slot untouched");
        assert_eq!(s.contract_index("b"), Some(2));
        assert_eq!(s.contracts[2].1, contract(99));
        assert_eq!(s.tokens[0].info.contract, 2);
        assert_eq!(s.scopes[0].1, Scope::default(), "old scope slot untouched");
        assert_eq!(s.tokens[0].info.scopes, 0b10);
        let used = |c: &[&str], s: &[&str]| {
            let set = |names: &[&str]| names.iter().map(|n| n.to_string()).collect();
            let (c, s): (HashSet<String>, HashSet<String>) = (set(c), set(s));
            move || Ok((c, s))
        };
        let otherwise = |new: &CompiledPolicy, unresolved, in_use| {
            resolves_otherwise(&old, new, unresolved, in_use).unwrap()
        };
        assert!(otherwise(&s, 0, used(&["b"], &[])), "a used contract moved");
        assert!(otherwise(&s, 0, used(&[], &["r"])), "a used scope moved");
        assert!(!otherwise(&s, 0, used(&["a"], &[])), "nothing used moved");
        let added = stabilize(&old, policy(&["a", "b", "c"], &["r"], ("b", &["r"])));
        assert!(
            !otherwise(&added, 0, used(&["a", "b"], &["r"])),
            "a new name alone"
        );
        assert!(
            otherwise(&added, 1, used(&[], &[])),
            "a new name for a token that lacked one"
        );

        // Full tables reuse the tombstones of earlier reloads, never this reload's.
        let names: Vec<String> = (0..agent_common::MAX_SCOPES)
            .map(|i| format!("s{i}"))
            .collect();
        let full = |prefix: u32| {
            let mut p = policy(&["a"], &[], ("a", &["*"]));
            p.scopes = names
                .iter()
                .map(|n| {
                    let scope = Scope {
                        prefix_len: prefix,
                        ..Scope::default()
                    };
                    (n.clone(), scope)
                })
                .collect();
            p
        };
        let mut first = full(1);
        first.tokens.clear();
        // Half the scopes redefined: 32 tombstones beside 64 live names would need 96
        // slots, so the table falls back to the compiled order.
        let mut half = full(1);
        half.tokens.clear();
        for (_, scope) in half.scopes.iter_mut().take(32) {
            scope.prefix_len = 2;
        }
        let fallback = stabilize(&first, half.clone());
        assert_eq!(fallback.scopes, half.scopes);
        // With tombstones from an earlier reload, those are reused.
        let mut fewer = first.clone();
        fewer.scopes.truncate(32);
        let with_tombstones = stabilize(&first, fewer);
        assert_eq!(with_tombstones.scopes.len(), 64);
        let mut back = full(1);
        back.tokens.clear();
        for (_, scope) in back.scopes.iter_mut().skip(32) {
            scope.prefix_len = 3;
        }
        let reused = stabilize(&with_tombstones, back.clone());
        assert_eq!(reused.scopes.len(), 64);
        assert_eq!(reused.scopes[..32], back.scopes[..32], "kept in place");
        assert_eq!(reused.scope_mask(&["s40".into()]).unwrap().1, 1 << 40);
    }

    /// A policy with `contracts` (name, stage count: two contracts say the same when
    /// their counts match) and static `tokens` (fingerprint word, contract name).
    fn listing(contracts: &[(&str, u32)], tokens: &[(u64, &str)]) -> CompiledPolicy {
        let contracts: Vec<(String, Contract)> = contracts
            .iter()
            .map(|(n, stages)| (n.to_string(), contract(*stages)))
            .collect();
        let tokens = tokens
            .iter()
            .map(|(fp, c)| StaticToken {
                fingerprint: Fingerprint([*fp, 0]),
                info: TokenInfo {
                    contract: contracts.iter().position(|(n, _)| n == c).unwrap() as u32,
                    ..Default::default()
                },
                label: None,
            })
            .collect();
        CompiledPolicy {
            contracts,
            scopes: Vec::new(),
            tokens,
        }
    }

    #[test]
    fn a_reload_diff_names_what_changed_and_nothing_else() {
        let base: Vec<(u64, &str)> = (1..=1000).map(|i| (i, "a")).collect();
        let old = listing(&[("a", 1), ("b", 2)], &base);
        assert_eq!(diff_tokens(&old, &old), TokenDiff::default());
        // One token moved to "b", one removed, one added in the middle.
        let mut edited = base.clone();
        edited[10].1 = "b";
        edited.remove(500);
        edited.insert(700, (5000, "a"));
        let new = listing(&[("a", 1), ("b", 2)], &edited);
        let diff = diff_tokens(&old, &new);
        let changed: Vec<(u64, u32, Option<u32>)> = diff
            .changed
            .iter()
            .map(|(fp, info, was)| (fp.0[0], info.contract, *was))
            .collect();
        assert_eq!(changed, [(11, 1, Some(0)), (5000, 0, None)]);
        assert_eq!(diff.removed, [Fingerprint([501, 0])]);
    }

    #[test]
    fn a_ramp_restarts_only_when_what_its_contract_says_changed() {
        let old = listing(&[("a", 1), ("b", 2)], &[(1, "a"), (2, "b"), (3, "a")]);
        let new = listing(
            &[("a", 1), ("b", 5)],
            &[(1, "a"), (2, "b"), (3, "b"), (4, "a")],
        );
        let issued = HashMap::from([
            (Fingerprint([9, 9]), "b".to_string()),
            (Fingerprint([8, 8]), "a".to_string()),
        ]);
        let mut restarts = ramp_restarts(&old, &new, &issued);
        restarts.sort_by_key(|f| f.0);
        // 1 and issued 8: "a" says the same. 2 and issued 9: "b" says otherwise now.
        // 3: moved from "a" to "b". 4: new to the policy, starts fresh anyway.
        assert_eq!(
            restarts,
            [
                Fingerprint([2, 0]),
                Fingerprint([3, 0]),
                Fingerprint([9, 9])
            ]
        );
    }
}
