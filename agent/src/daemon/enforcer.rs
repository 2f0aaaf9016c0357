//! The datapath as the token lifecycle's `Enforcer`.

use std::sync::{Mutex, MutexGuard};

use agent_common::{Contract, Fingerprint, TokenInfo};

use crate::{
    datapath::{clock::tai_now_ns, Datapath},
    token::{EnforceError, Enforcer, TokenRuntime},
};

/// One lock around the datapath. Map operations are single syscalls, so critical sections
/// stay short; nothing awaits while holding it.
pub struct DatapathEnforcer {
    dp: Mutex<Datapath>,
}

impl DatapathEnforcer {
    pub fn new(dp: Datapath) -> Self {
        DatapathEnforcer { dp: Mutex::new(dp) }
    }

    /// The datapath, for the daemon's own map work (policy, snapshots).
    pub fn lock(&self) -> MutexGuard<'_, Datapath> {
        // A panic under the lock left the maps as the kernel has them: still consistent.
        self.dp.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Requests per second a ramp stage admits (`None` for a contract without stages).
pub fn stage_rate(contract: &Contract, stage: u32) -> Option<f64> {
    let s = contract
        .stages
        .get(stage as usize)
        .filter(|_| stage < contract.n_stages)?;
    (s.interval_ns > 0).then(|| 1e9 / s.interval_ns as f64)
}

impl Enforcer for DatapathEnforcer {
    fn install(&self, fp: Fingerprint, info: TokenInfo) -> Result<(), EnforceError> {
        self.lock()
            .install_token(fp, info)
            .map_err(|e| EnforceError(Box::new(e)))
    }

    /// The REVOKED insert and the TOKENS flag are synchronous bpf syscalls: when this
    /// returns, the next packet on every CPU sees the revocation.
    fn revoke(&self, fp: Fingerprint) -> Result<(), EnforceError> {
        self.lock()
            .revoke(fp, tai_now_ns())
            .map_err(|e| EnforceError(Box::new(e)))
    }

    /// Batched: TOKENS is read once and written a batch at a time.
    fn install_many(&self, tokens: Vec<(Fingerprint, TokenInfo)>) -> Result<(), EnforceError> {
        self.lock()
            .install_tokens(tokens)
            .map(|_| ())
            .map_err(|e| EnforceError(Box::new(e)))
    }

    fn runtime(&self, fp: Fingerprint) -> Option<TokenRuntime> {
        runtime(&self.lock(), fp)
    }

    /// Under one hold of the lock.
    fn runtimes(&self, fps: &[Fingerprint]) -> Vec<Option<TokenRuntime>> {
        let dp = self.lock();
        fps.iter().map(|fp| runtime(&dp, *fp)).collect()
    }
}

/// A token's runtime state and counts, as `token show` and `token list` give them.
fn runtime(dp: &Datapath, fp: Fingerprint) -> Option<TokenRuntime> {
    let state = dp.token_state(&fp);
    let stats = dp.token_stats(&fp);
    // The entry only for the rate of a token that has a stage: `token list` asks for
    // every token, most of them never seen.
    let rate = state.and_then(|st| {
        let info = dp.token(&fp)?;
        let c = dp.contract(info.contract).ok()?;
        stage_rate(&c, st.stage)
    });
    if state.is_none() && stats.by_verdict.iter().all(|&n| n == 0) {
        return None;
    }
    // Verdicts past `TOKEN_VERDICT_COUNT` are never a known token's: zero.
    let mut by_verdict = [0; agent_common::VERDICT_COUNT];
    by_verdict[..stats.by_verdict.len()].copy_from_slice(&stats.by_verdict);
    Some(TokenRuntime {
        state: state.unwrap_or_default(),
        by_verdict,
        rate_per_sec: rate,
    })
}
