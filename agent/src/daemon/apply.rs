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
}

/// Contracts, scopes and static tokens; the indexes are the policy's positions.
fn write(enf: &DatapathEnforcer, policy: &CompiledPolicy) -> Result<(), DatapathError> {
    let mut dp = enf.lock();
    for (i, (_, c)) in policy.contracts.iter().enumerate() {
        dp.set_contract(i as u32, c)?;
    }
    for (i, (_, s)) in policy.scopes.iter().enumerate() {
        dp.set_scope(i as u32, s)?;
    }
    for t in &policy.tokens {
        dp.install_token(t.fingerprint, t.info)?;
    }
    Ok(())
}

/// First application, before any listener is attached by this daemon.
pub fn apply_initial(
    enf: &DatapathEnforcer,
    lifecycle: &Lifecycle,
    policy: &CompiledPolicy,
) -> Result<Applied, ApplyError> {
    write(enf, policy)?;
    // Revocations from SQLite first, then issued tokens under this policy's indexes.
    let lifecycle = lifecycle.apply_all(policy)?;
    Ok(Applied {
        lifecycle,
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
    write(enf, new)?;
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

    // A token's ramp restarts only when what its contract says changed.
    let old_def = |name: &str| -> Option<&Contract> {
        old.contracts
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c)
    };
    let new_def = |name: &str| -> Option<&Contract> {
        new.contracts
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c)
    };
    let contract_name = |p: &CompiledPolicy, idx: u32| -> Option<String> {
        p.contracts.get(idx as usize).map(|(n, _)| n.clone())
    };
    let mut changed: Vec<Fingerprint> = Vec::new();
    for t in &new.tokens {
        let now = contract_name(new, t.info.contract);
        let before = old
            .tokens
            .iter()
            .find(|o| o.fingerprint == t.fingerprint)
            .and_then(|o| contract_name(old, o.info.contract));
        let differs = match (&before, &now) {
            (Some(b), Some(n)) => b != n || old_def(b) != new_def(n),
            _ => false,
        };
        if differs {
            changed.push(t.fingerprint);
        }
    }
    for (fp, name) in &issued {
        if old_def(name).is_some() && old_def(name) != new_def(name) {
            changed.push(*fp);
        }
    }
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
                fingerprint: crate::store::fingerprint_hex(&fp),
                source,
            })?;
    }
    Ok(Applied {
        lifecycle: report,
        removed,
        reset: changed.len(),
    })
}
