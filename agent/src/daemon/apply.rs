//! Writing a compiled policy into the datapath, at start and on reload.
//!
//! Order is what keeps enforcement right while maps change one entry at a time: everything
//! the new policy allows is written before anything the old one allowed is removed (no valid
//! token is denied in between), and revocations are re-applied last (REVOKED is never
//! cleared, so a revoked token is refused throughout).

use std::collections::{HashMap, HashSet};

use agent_common::{Contract, Fingerprint};

use super::enforcer::DatapathEnforcer;
use crate::{
    datapath::DatapathError,
    policy::CompiledPolicy,
    store::StoreError,
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
}

/// Contracts, scopes and static tokens; the indexes are the policy's positions. Only the
/// TOKENS entries that differ from what the kernel holds are written (batched); returns
/// how many.
fn write(enf: &DatapathEnforcer, policy: &CompiledPolicy) -> Result<usize, DatapathError> {
    let mut dp = enf.lock();
    for (i, (_, c)) in policy.contracts.iter().enumerate() {
        dp.set_contract(i as u32, c)?;
    }
    for (i, (_, s)) in policy.scopes.iter().enumerate() {
        dp.set_scope(i as u32, s)?;
    }
    dp.install_tokens(policy.tokens.iter().map(|t| (t.fingerprint, t.info)))
}

/// First application, before any listener is attached by this daemon.
pub fn apply_initial(
    enf: &DatapathEnforcer,
    lifecycle: &Lifecycle,
    policy: &CompiledPolicy,
) -> Result<Applied, ApplyError> {
    let written = write(enf, policy)?;
    // Revocations from SQLite first, then issued tokens under this policy's indexes.
    let lifecycle = lifecycle.apply_all(policy)?;
    Ok(Applied {
        lifecycle,
        written,
        ..Applied::default()
    })
}

/// A reload from `old` to `new` while the listeners keep judging traffic.
pub fn apply_reload(
    enf: &DatapathEnforcer,
    lifecycle: &Lifecycle,
    old: &CompiledPolicy,
    new: &CompiledPolicy,
) -> Result<Applied, ApplyError> {
    let written = write(enf, new)?;
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

/// Reorders `new` so that every contract and scope keeps the index it had in `old`: the
/// kernel maps are updated one entry at a time, and a token must never see another
/// contract's rate or another scope's prefix in between. Dropped entries stay as
/// tombstones; new ones take the next free slots. Falls back to `new` as compiled when the
/// scope table would overflow (the next restart compacts the indexes).
pub fn stabilize(old: &CompiledPolicy, mut new: CompiledPolicy) -> CompiledPolicy {
    fn order<T: Clone>(old: &[(String, T)], new: &[(String, T)]) -> (Vec<(String, T)>, Vec<u32>) {
        let mut out: Vec<(String, T)> = old
            .iter()
            .map(|(name, def)| match new.iter().find(|(n, _)| n == name) {
                Some((_, d)) => (name.clone(), d.clone()),
                None if name.starts_with(TOMBSTONE) => (name.clone(), def.clone()),
                None => (format!("{TOMBSTONE}{name}"), def.clone()),
            })
            .collect();
        let mut remap = Vec::with_capacity(new.len());
        for (name, def) in new {
            match out.iter().position(|(n, _)| n == name) {
                Some(i) => remap.push(i as u32),
                None => {
                    remap.push(out.len() as u32);
                    out.push((name.clone(), def.clone()));
                }
            }
        }
        (out, remap)
    }
    let (contracts, contract_map) = order(&old.contracts, &new.contracts);
    let (scopes, scope_map) = order(&old.scopes, &new.scopes);
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

/// The tokens whose ramp restarts on a reload from `old` to `new`: those whose contract
/// (by name, then by what it says) changed. `issued`: the active issued tokens and the
/// names of their contracts. Tokens new to the policy start fresh anyway.
fn ramp_restarts(
    old: &CompiledPolicy,
    new: &CompiledPolicy,
    issued: &HashMap<Fingerprint, String>,
) -> Vec<Fingerprint> {
    // A token's ramp restarts only when what its contract says changed.
    fn def<'p>(p: &'p CompiledPolicy, name: &str) -> Option<&'p Contract> {
        p.contracts.iter().find(|(n, _)| n == name).map(|(_, c)| c)
    }
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
            if b != n || def(old, b) != def(new, n) {
                changed.push(t.fingerprint);
            }
        }
    }
    for (fp, n) in issued {
        if def(old, n).is_some() && def(old, n) != def(new, n) {
            changed.push(*fp);
        }
    }
    changed
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

    fn policy(contracts: &[&str], scopes: &[&str], token: (&str, &[&str])) -> CompiledPolicy {
        let mut p = CompiledPolicy {
            contracts: contracts
                .iter()
                .enumerate()
                .map(|(i, n)| (n.to_string(), contract(i as u32 + 1)))
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
            contract(1),
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
