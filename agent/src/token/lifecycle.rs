//! The issue / rotate / revoke lifecycle that keeps the store and the kernel in step, and
//! its two seams: `Resolve` (names to kernel indexes, from the policy) and `Enforcer` (the
//! kernel side, implemented by the datapath and faked in tests).

use std::{collections::HashMap, error::Error as StdError, sync::Arc, time::Duration};

use agent_common::{Fingerprint, FingerprintKey, TokenInfo, TokenState, VERDICT_COUNT};

use super::{mint, Token};
use crate::{
    datapath::clock::unix_to_tai_ns,
    error_chain,
    store::{
        unix_now, ListFilter, NewToken, Revocation, Store, StoreError, TokenRecord, TokenStatus,
    },
};

/// What the kernel needs to know to enforce a token, resolved from contract and scope names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant {
    pub contract: u32,
    pub flags: u32,
    pub scopes: u64,
}

/// Why a contract or scope name does not resolve against the loaded policy.
#[derive(Debug, thiserror::Error)]
#[error("contract {contract:?} with scopes {scopes:?} does not resolve against the policy")]
pub struct ResolveError {
    pub contract: String,
    pub scopes: Vec<String>,
    #[source]
    pub source: Box<dyn StdError + Send + Sync>,
}

/// The loaded policy, as the lifecycle needs it: names to kernel indexes. Implemented for
/// `policy::CompiledPolicy`; contract indexes can change on reload, so the lifecycle resolves
/// names each time it installs.
pub trait Resolve {
    fn resolve(&self, contract: &str, scopes: &[String]) -> Result<Grant, ResolveError>;
}

impl Resolve for crate::policy::CompiledPolicy {
    fn resolve(&self, contract: &str, scopes: &[String]) -> Result<Grant, ResolveError> {
        let fail = |source: crate::policy::PolicyError| ResolveError {
            contract: contract.to_owned(),
            scopes: scopes.to_vec(),
            source: Box::new(source),
        };
        let index = self.contract_index(contract).ok_or_else(|| {
            fail(crate::policy::PolicyError::UnknownContract {
                name: contract.to_owned(),
            })
        })?;
        let (flags, mask) = self.scope_mask(scopes).map_err(fail)?;
        Ok(Grant {
            contract: index,
            flags,
            scopes: mask,
        })
    }
}

/// A kernel-side failure, wrapping whatever the datapath reports.
#[derive(Debug, thiserror::Error)]
#[error("datapath: {0}")]
pub struct EnforceError(#[source] pub Box<dyn StdError + Send + Sync>);

/// Per-token runtime state as the datapath sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TokenRuntime {
    /// Ramp stage, first/last seen (CLOCK_TAI ns, 0 = never), breaches, penalty.
    pub state: TokenState,
    /// Requests by `Verdict as usize`, summed over CPUs.
    pub by_verdict: [u64; VERDICT_COUNT],
    /// The admission rate of the current stage, requests per second (None if unknown).
    pub rate_per_sec: Option<f64>,
}

/// The kernel side of the lifecycle; implemented by the datapath.
pub trait Enforcer: Send + Sync {
    /// Inserts or overwrites the token's entry in the kernel token map.
    fn install(&self, fp: Fingerprint, info: TokenInfo) -> Result<(), EnforceError>;
    /// Inserts the fingerprint into the kernel revoked set.
    fn revoke(&self, fp: Fingerprint) -> Result<(), EnforceError>;
    fn runtime(&self, fp: Fingerprint) -> Option<TokenRuntime>;
    /// Installs many tokens (`rampart token import`); the datapath batches them.
    fn install_many(&self, tokens: Vec<(Fingerprint, TokenInfo)>) -> Result<(), EnforceError> {
        tokens
            .into_iter()
            .try_for_each(|(fp, info)| self.install(fp, info))
    }
    /// `runtime` of each of `fps` (a page of `token list`), in order.
    fn runtimes(&self, fps: &[Fingerprint]) -> Vec<Option<TokenRuntime>> {
        fps.iter().map(|fp| self.runtime(*fp)).collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error("installing token {fingerprint} in the kernel failed; it was recorded as revoked and never handed out")]
    Install {
        fingerprint: String,
        #[source]
        source: EnforceError,
    },
    #[error("updating token {fingerprint} in the kernel failed (the store is updated; a restart re-applies it)")]
    Update {
        fingerprint: String,
        #[source]
        source: EnforceError,
    },
    #[error("token {fingerprint} is revoked in the store but the kernel revoked set rejected it (a restart re-applies it)")]
    KernelRevoke {
        fingerprint: String,
        #[source]
        source: EnforceError,
    },
    #[error("token {fingerprint} is {status}, not active")]
    NotActive {
        fingerprint: String,
        status: TokenStatus,
    },
    #[error("duration {what} is too large")]
    Duration { what: &'static str },
}

/// What `Lifecycle::issue` needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IssueRequest {
    pub contract: String,
    pub scopes: Vec<String>,
    /// None = never expires.
    pub ttl: Option<Duration>,
    pub label: Option<String>,
    /// Unix seconds; None = valid immediately.
    pub not_before: Option<i64>,
}

/// A freshly minted token: the plaintext (hand it out once) and its record.
#[derive(Debug)]
pub struct Issued {
    pub token: Token,
    pub record: TokenRecord,
}

#[derive(Debug)]
pub struct Rotated {
    pub token: Token,
    pub record: TokenRecord,
    /// The predecessor, with its shortened expiry.
    pub old: TokenRecord,
}

/// What `Lifecycle::apply_all` did.
#[derive(Debug, Default)]
pub struct ApplyReport {
    pub revoked: usize,
    pub installed: usize,
    /// Active tokens that could not be installed (e.g. their contract left the policy).
    pub failed: Vec<(Fingerprint, String)>,
}

/// One page of `token list` (`Lifecycle::list_page`).
#[derive(Debug, Default)]
pub struct ListPage {
    pub tokens: Vec<(TokenRecord, Option<TokenRuntime>)>,
    /// The last token the page read, to page on from; None when there are no more.
    pub next: Option<Fingerprint>,
}

/// Active issued tokens under a policy (`Lifecycle::resolve_all`).
#[derive(Debug, Default)]
pub struct Resolved {
    /// Their kernel entries (slots are the datapath's to assign).
    pub entries: Vec<(Fingerprint, TokenInfo)>,
    /// Those that do not resolve, with why.
    pub failed: Vec<(Fingerprint, String)>,
}

/// Issue / rotate / revoke, keeping the store (source of truth) and the kernel in step.
pub struct Lifecycle {
    store: Arc<Store>,
    enforcer: Arc<dyn Enforcer>,
    key: FingerprintKey,
}

fn secs(d: Duration, what: &'static str) -> Result<i64, LifecycleError> {
    i64::try_from(d.as_secs()).map_err(|_| LifecycleError::Duration { what })
}

/// The kernel view of a recorded token.
pub fn token_info(rec: &TokenRecord, grant: Grant) -> TokenInfo {
    entry(grant, rec.not_before, rec.expires_at)
}

/// A token's kernel entry from its grant and validity (Unix seconds).
fn entry(grant: Grant, not_before: Option<i64>, expires_at: Option<i64>) -> TokenInfo {
    TokenInfo {
        contract: grant.contract,
        flags: grant.flags,
        scopes: grant.scopes,
        not_before_ns: not_before.map_or(0, unix_to_tai_ns),
        // A (theoretical) expiry at the epoch must not read as "never expires" (0).
        expires_ns: expires_at.map_or(0, |e| unix_to_tai_ns(e).max(1)),
        ramp_start_ns: 0,
        // Assigned by the datapath.
        ..TokenInfo::default()
    }
}

impl Lifecycle {
    pub fn new(store: Arc<Store>, enforcer: Arc<dyn Enforcer>, key: FingerprintKey) -> Self {
        Lifecycle {
            store,
            enforcer,
            key,
        }
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn enforcer(&self) -> &Arc<dyn Enforcer> {
        &self.enforcer
    }

    /// Mints a token, records it, then installs it in the kernel. If the kernel refuses, the
    /// record is revoked (the plaintext is dropped unseen) and the error returned.
    pub fn issue(
        &self,
        policy: &dyn Resolve,
        req: &IssueRequest,
        uid: u32,
    ) -> Result<Issued, LifecycleError> {
        let grant = policy.resolve(&req.contract, &req.scopes)?;
        let now = unix_now();
        let expires_at = match req.ttl {
            Some(ttl) => Some(now.saturating_add(secs(ttl, "ttl")?)),
            None => None,
        };
        let token = mint();
        let new = NewToken {
            fingerprint: token.fingerprint(&self.key),
            contract: req.contract.clone(),
            scopes: req.scopes.clone(),
            label: req.label.clone(),
            issued_at: now,
            not_before: req.not_before,
            expires_at,
        };
        let record = self.store.issue(&new, uid)?;
        self.install_new(&record, grant, uid)?;
        Ok(Issued { token, record })
    }

    fn install_new(&self, rec: &TokenRecord, grant: Grant, uid: u32) -> Result<(), LifecycleError> {
        let fp = rec.fingerprint;
        if let Err(source) = self.enforcer.install(fp, token_info(rec, grant)) {
            // Nobody has seen this token; make sure it never becomes valid later (restart).
            self.store
                .revoke(&fp, "kernel install failed at issue", uid)?;
            return Err(LifecycleError::Install {
                fingerprint: fp.to_string(),
                source,
            });
        }
        Ok(())
    }

    /// Issues a successor with the same contract, scopes and label, and cuts the old token's
    /// expiry to now + `grace` (never extending it). `ttl` None keeps the old token's lifetime.
    pub fn rotate(
        &self,
        policy: &dyn Resolve,
        old: &Fingerprint,
        grace: Duration,
        ttl: Option<Duration>,
        uid: u32,
    ) -> Result<Rotated, LifecycleError> {
        let hex = old.to_string();
        let prev = self.store.get(old)?.ok_or_else(|| StoreError::NotFound {
            fingerprint: hex.clone(),
        })?;
        let now = unix_now();
        let status = prev.status_at(now);
        if status != TokenStatus::Active {
            return Err(LifecycleError::NotActive {
                fingerprint: hex,
                status,
            });
        }
        let grant = policy.resolve(&prev.contract, &prev.scopes)?;
        let lifetime = match ttl {
            Some(t) => Some(secs(t, "ttl")?),
            None => prev.expires_at.map(|e| (e - prev.issued_at).max(1)),
        };
        let token = mint();
        let new = NewToken {
            fingerprint: token.fingerprint(&self.key),
            contract: prev.contract.clone(),
            scopes: prev.scopes.clone(),
            label: prev.label.clone(),
            issued_at: now,
            not_before: None,
            expires_at: lifetime.map(|l| now.saturating_add(l)),
        };
        let old_expiry = now.saturating_add(secs(grace, "grace")?);
        let (old_rec, record) = self.store.rotate(old, &new, old_expiry, uid)?;
        self.install_new(&record, grant, uid)?;
        self.enforcer
            .install(*old, token_info(&old_rec, grant))
            .map_err(|source| LifecycleError::Update {
                fingerprint: hex,
                source,
            })?;
        Ok(Rotated {
            token,
            record,
            old: old_rec,
        })
    }

    /// Revokes a token. Order matters: the revocation is committed to disk first, then inserted
    /// into the kernel revoked set, and only then does this return — so on success the kernel
    /// already refuses the token, and a restart re-applies it from the store.
    pub fn revoke(
        &self,
        fp: &Fingerprint,
        reason: &str,
        uid: u32,
    ) -> Result<Revocation, LifecycleError> {
        let revoked = self.store.revoke(fp, reason, uid)?;
        // Even when already revoked, re-insert: a previous kernel insert may have failed.
        self.enforcer
            .revoke(*fp)
            .map_err(|source| LifecycleError::KernelRevoke {
                fingerprint: fp.to_string(),
                source,
            })?;
        Ok(revoked.revocation)
    }

    /// Start-up and reload: re-applies every revocation first, then (re)installs every active
    /// token under the current policy. Per-token install failures are reported, not fatal;
    /// a failed revocation is fatal, since attaching without it would readmit the token.
    pub fn apply_all(&self, policy: &dyn Resolve) -> Result<ApplyReport, LifecycleError> {
        let mut report = ApplyReport {
            revoked: self.apply_revocations()?,
            ..ApplyReport::default()
        };
        let Resolved {
            entries: resolved,
            failed,
        } = self.resolve_all(policy)?;
        report.failed = failed;
        // Batched (the datapath writes only what changed); on a failure, token by token,
        // to say which.
        let n = resolved.len();
        if self.enforcer.install_many(resolved.clone()).is_ok() {
            report.installed += n;
            return Ok(report);
        }
        for (fp, info) in resolved {
            match self.enforcer.install(fp, info) {
                Ok(()) => report.installed += 1,
                Err(e) => report.failed.push((fp, error_chain(&e))),
            }
        }
        Ok(report)
    }

    /// Every revocation the store holds, into the kernel again (`apply_all`'s first step).
    pub fn apply_revocations(&self) -> Result<usize, LifecycleError> {
        let mut revoked = 0;
        for fp in self.store.revoked()? {
            self.enforcer
                .revoke(fp)
                .map_err(|source| LifecycleError::KernelRevoke {
                    fingerprint: fp.to_string(),
                    source,
                })?;
            revoked += 1;
        }
        Ok(revoked)
    }

    /// The kernel entry of every active issued token under `policy` (what `apply_all`
    /// installs), and the tokens that do not resolve, with why.
    pub fn resolve_all(&self, policy: &dyn Resolve) -> Result<Resolved, LifecycleError> {
        let mut out = Resolved::default();
        // Tokens share a few (contract, scope set) pairs: each is parsed and resolved once.
        let mut grants: HashMap<(String, String), Result<Grant, String>> = HashMap::new();
        let mut corrupt = None;
        self.store
            .for_each_active(unix_now(), |fp, contract, scopes, not_before, expires| {
                let key = (contract.to_owned(), scopes.to_owned());
                let grant = match grants.get(&key) {
                    Some(g) => g,
                    None => {
                        let g = match serde_json::from_str::<Vec<String>>(scopes) {
                            Ok(names) => policy
                                .resolve(contract, &names)
                                .map_err(|e| error_chain(&e)),
                            Err(e) => {
                                corrupt.get_or_insert(StoreError::Corrupt {
                                    what: format!("scope list of {fp}: {e}"),
                                });
                                return;
                            }
                        };
                        grants.entry(key).or_insert(g)
                    }
                };
                match grant {
                    Ok(g) => out.entries.push((fp, entry(*g, not_before, expires))),
                    Err(why) => out.failed.push((fp, why.clone())),
                }
            })?;
        if let Some(e) = corrupt {
            return Err(e.into());
        }
        Ok(out)
    }

    /// One page of `token list`: at most `limit` tokens matching `filter`, recorded after
    /// `after` if given, each with its runtime; and where the next page starts, when more
    /// may follow. Pages of the store (one indexed query each) are read until `limit`
    /// tokens pass the idle filter, which needs the datapath's last-seen times.
    pub fn list_page(
        &self,
        filter: &ListFilter,
        after: Option<Fingerprint>,
        limit: usize,
    ) -> Result<ListPage, LifecycleError> {
        let now = unix_now();
        let offset = crate::datapath::clock::tai_offset_ns();
        let secs = |d: Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
        let mut page = ListPage::default();
        let mut cursor = after;
        while page.tokens.len() < limit {
            let want = limit - page.tokens.len();
            let records = self.store.list_page(filter, now, cursor.as_ref(), want)?;
            let exhausted = records.len() < want;
            cursor = records.last().map(|r| r.fingerprint).or(cursor);
            let fps: Vec<Fingerprint> = records.iter().map(|r| r.fingerprint).collect();
            let runtimes = self.enforcer.runtimes(&fps);
            for (rec, rt) in records.into_iter().zip(runtimes) {
                if let Some(d) = filter.idle_for {
                    let seen = rt
                        .as_ref()
                        .filter(|rt| rt.state.last_seen_ns != 0)
                        .map_or(rec.issued_at, |rt| {
                            (rt.state.last_seen_ns as i64 - offset).div_euclid(1_000_000_000)
                        });
                    if seen > now.saturating_sub(secs(d)) {
                        continue;
                    }
                }
                page.tokens.push((rec, rt));
            }
            if exhausted {
                return Ok(page);
            }
        }
        page.next = cursor;
        Ok(page)
    }
}

#[cfg(test)]
mod tests;
