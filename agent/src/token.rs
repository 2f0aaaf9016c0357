//! Tokens: minting, the fingerprint key, format validation, and the issue / rotate / revoke
//! lifecycle that keeps the store and the kernel in step.
//!
//! A plaintext token exists only between `mint()` and the caller that hands it to the operator
//! once; it is wrapped in `Token`, whose `Debug` is redacted and whose bytes are wiped on drop.
//! Everything durable or logged uses the fingerprint.

use std::{
    collections::HashMap,
    error::Error as StdError,
    fs::{self, OpenOptions},
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use agent_common::{
    http::is_b64token, siphash::fingerprint, Fingerprint, FingerprintKey, TokenInfo, TokenState,
    MAX_TOKEN_LEN, VERDICT_COUNT,
};
use rand::{rngs::OsRng, RngCore};

use crate::{
    datapath::clock::unix_to_tai_ns,
    store::{
        unix_now, ListFilter, NewToken, Revocation, Store, StoreError, TokenRecord, TokenStatus,
    },
};

/// Every token rampart mints starts with this, so leaked ones are easy to recognise (and scan
/// for) in logs and repositories.
pub const TOKEN_PREFIX: &str = "rmp_";
/// Random bytes per token: 256 bits of entropy.
pub const TOKEN_RANDOM_BYTES: usize = 32;
/// File name of the fingerprint key in the state directory.
pub const KEY_FILE: &str = "fingerprint.key";

/// A plaintext token. Shown to the operator exactly once; never logged or stored.
pub struct Token(String);

impl Token {
    /// The secret itself. Call sites are the one place it is printed or sent.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }

    /// Wraps a plaintext received from elsewhere (control-socket response) so it gets the same
    /// redaction and wiping.
    pub fn from_secret(s: String) -> Token {
        Token(s)
    }

    pub fn fingerprint(&self, key: &FingerprintKey) -> Fingerprint {
        fingerprint(key, self.0.as_bytes())
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Drop for Token {
    fn drop(&mut self) {
        // SAFETY: zero bytes are valid UTF-8; the volatile writes keep the wipe from being
        // optimised away as a dead store.
        let bytes = unsafe { self.0.as_bytes_mut() };
        for b in bytes.iter_mut() {
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

/// Mints a new token: `rmp_` + unpadded base64url of 32 bytes from the OS RNG.
pub fn mint() -> Token {
    let mut raw = [0u8; TOKEN_RANDOM_BYTES];
    OsRng.fill_bytes(&mut raw);
    let mut s = String::with_capacity(TOKEN_PREFIX.len() + 43);
    s.push_str(TOKEN_PREFIX);
    base64url_into(&raw, &mut s);
    raw.fill(0);
    Token(s)
}

fn base64url_into(data: &[u8], out: &mut String) {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        // 1 byte -> 2 chars, 2 -> 3, 3 -> 4; no padding.
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
}

/// Why a candidate token is not an RFC 6750 `b64token`. Carries positions, never content.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenFormatError {
    #[error("token is empty")]
    Empty,
    #[error("token is {len} bytes, longer than {MAX_TOKEN_LEN}")]
    TooLong { len: usize },
    #[error("token has a character outside the RFC 6750 b64token set at byte {offset}")]
    BadChar { offset: usize },
}

/// Checks `token` is what the datapath would accept as a Bearer credential:
/// `1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`, at most 4096 bytes.
///
/// Every fingerprint the daemon installs must come through here (or from `issue`, whose
/// tokens are valid by construction): the datapath checks the grammar of unknown tokens
/// only, since a known fingerprint implies the bytes of a token accepted here.
pub fn validate_token(token: &[u8]) -> Result<(), TokenFormatError> {
    if token.is_empty() {
        return Err(TokenFormatError::Empty);
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenFormatError::TooLong { len: token.len() });
    }
    let body = token.iter().take_while(|&&c| is_b64token(c)).count();
    if body == 0 {
        return Err(TokenFormatError::BadChar { offset: 0 });
    }
    match token[body..].iter().position(|&c| c != b'=') {
        Some(i) => Err(TokenFormatError::BadChar { offset: body + i }),
        None => Ok(()),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path} already exists (use --force to replace it; tokens issued under the old key stop matching)")]
    Exists { path: PathBuf },
    #[error("cannot create {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} has mode {mode:04o}; it must not be accessible to group or others (chmod 600)"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{path} must hold exactly 32 hex characters (128 bits), found {len} characters")]
    Length { path: PathBuf, len: usize },
    #[error("{path} holds non-hex characters")]
    NotHex { path: PathBuf },
}

/// Writes a fresh random 128-bit key to `path` (32 hex chars + newline, mode 0600). Refuses to
/// replace an existing key unless `force`. The parent directory is created 0700 if missing.
pub fn write_key(path: &Path, force: bool) -> Result<(), KeyError> {
    let create_err = |source| KeyError::Create {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(create_err)?;
        }
    }
    if force {
        match fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(create_err(e)),
        }
    }
    let mut file = match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(KeyError::Exists {
                path: path.to_owned(),
            })
        }
        Err(e) => return Err(create_err(e)),
    };
    let mut raw = [0u8; 16];
    OsRng.fill_bytes(&mut raw);
    let mut text = hex::encode(raw).into_bytes();
    raw.fill(0);
    text.push(b'\n');
    let write_err = |source| KeyError::Write {
        path: path.to_owned(),
        source,
    };
    // The umask may have narrowed the mode further; it can never have widened it, but make the
    // final mode explicit anyway.
    let res = file
        .set_permissions(fs::Permissions::from_mode(0o600))
        .and_then(|()| file.write_all(&text))
        .and_then(|()| file.sync_all());
    text.fill(0);
    res.map_err(write_err)
}

/// Loads the fingerprint key. The 16 key bytes are the SipHash key `k0 || k1`, each little-endian.
pub fn load_key(path: &Path) -> Result<FingerprintKey, KeyError> {
    let read_err = |source| KeyError::Read {
        path: path.to_owned(),
        source,
    };
    let meta = fs::metadata(path).map_err(read_err)?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    let mut text = fs::read(path).map_err(read_err)?;
    let key = parse_key(&text, path);
    text.fill(0);
    key
}

fn parse_key(text: &[u8], path: &Path) -> Result<FingerprintKey, KeyError> {
    let body = text.strip_suffix(b"\n").unwrap_or(text);
    let body = body.strip_suffix(b"\r").unwrap_or(body);
    if body.len() != 32 {
        return Err(KeyError::Length {
            path: path.to_owned(),
            len: body.len(),
        });
    }
    let mut raw = [0u8; 16];
    hex::decode_to_slice(body, &mut raw).map_err(|_| KeyError::NotHex {
        path: path.to_owned(),
    })?;
    let mut k0 = [0u8; 8];
    let mut k1 = [0u8; 8];
    k0.copy_from_slice(&raw[..8]);
    k1.copy_from_slice(&raw[8..]);
    raw.fill(0);
    Ok(FingerprintKey([
        u64::from_le_bytes(k0),
        u64::from_le_bytes(k1),
    ]))
}

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
    TokenInfo {
        contract: grant.contract,
        flags: grant.flags,
        scopes: grant.scopes,
        not_before_ns: rec.not_before.map_or(0, unix_to_tai_ns),
        // A (theoretical) expiry at the epoch must not read as "never expires" (0).
        expires_ns: rec.expires_at.map_or(0, |e| unix_to_tai_ns(e).max(1)),
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
        let mut report = ApplyReport::default();
        for fp in self.store.revoked()? {
            self.enforcer
                .revoke(fp)
                .map_err(|source| LifecycleError::KernelRevoke {
                    fingerprint: fp.to_string(),
                    source,
                })?;
            report.revoked += 1;
        }
        let now = unix_now();
        let mut resolved = Vec::new();
        for rec in self.store.active()? {
            if rec.status_at(now) != TokenStatus::Active {
                continue;
            }
            match policy.resolve(&rec.contract, &rec.scopes) {
                Ok(g) => resolved.push((rec.fingerprint, token_info(&rec, g))),
                Err(e) => report.failed.push((rec.fingerprint, error_chain(&e))),
            }
        }
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

    /// `Store::list`, with last-seen times taken from the datapath for the idle filter.
    pub fn list(&self, filter: &ListFilter) -> Result<Vec<TokenRecord>, LifecycleError> {
        let now = unix_now();
        let last_seen = if filter.idle_for.is_some() {
            let candidates = self.store.list(filter, now, None)?;
            Some(self.last_seen(&candidates))
        } else {
            None
        };
        Ok(self.store.list(filter, now, last_seen.as_ref())?)
    }

    /// Last-seen times (Unix seconds) of the given tokens that the datapath has seen.
    pub fn last_seen(&self, records: &[TokenRecord]) -> HashMap<Fingerprint, i64> {
        let offset = crate::datapath::clock::tai_offset_ns();
        records
            .iter()
            .filter_map(|r| {
                let rt = self.enforcer.runtime(r.fingerprint)?;
                (rt.state.last_seen_ns != 0).then(|| {
                    let unix_ns = rt.state.last_seen_ns as i64 - offset;
                    (r.fingerprint, unix_ns.div_euclid(1_000_000_000))
                })
            })
            .collect()
    }
}

/// An error and its sources on one line.
pub fn error_chain(e: &dyn StdError) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        s.push_str(": ");
        s.push_str(&src.to_string());
        cur = src.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use std::{collections::HashSet, sync::Mutex};

    use super::*;

    #[test]
    fn minted_tokens_have_prefix_length_charset_and_are_distinct() {
        let mut seen = HashSet::new();
        for _ in 0..1000 {
            let t = mint();
            let s = t.expose_secret();
            assert!(s.starts_with(TOKEN_PREFIX));
            let body = &s[TOKEN_PREFIX.len()..];
            // 32 bytes -> ceil(256 / 6) = 43 base64url characters, unpadded.
            assert_eq!(body.len(), 43);
            assert!(body
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
            assert_eq!(validate_token(s.as_bytes()), Ok(()));
            assert!(seen.insert(s.to_owned()), "duplicate token minted");
        }
        // Every base64url character position carries entropy: over 1000 tokens each of the
        // 42 full-6-bit positions shows many distinct symbols (a constant or low-entropy
        // position would show very few).
        let tokens: Vec<&String> = seen.iter().collect();
        for pos in TOKEN_PREFIX.len()..TOKEN_PREFIX.len() + 42 {
            let distinct: HashSet<u8> = tokens.iter().map(|t| t.as_bytes()[pos]).collect();
            assert!(
                distinct.len() > 40,
                "position {pos}: {} symbols",
                distinct.len()
            );
        }
    }

    #[test]
    fn base64url_matches_known_vectors() {
        let enc = |d: &[u8]| {
            let mut s = String::new();
            base64url_into(d, &mut s);
            s
        };
        // RFC 4648 test vectors, url-safe alphabet, no padding.
        assert_eq!(enc(b"f"), "Zg");
        assert_eq!(enc(b"fo"), "Zm8");
        assert_eq!(enc(b"foo"), "Zm9v");
        assert_eq!(enc(b"foobar"), "Zm9vYmFy");
        assert_eq!(enc(&[0xfb, 0xff]), "-_8");
    }

    #[test]
    fn token_debug_is_redacted() {
        let t = mint();
        let dbg = format!("{t:?}");
        assert!(!dbg.contains(&t.expose_secret()[TOKEN_PREFIX.len()..]));
        assert_eq!(dbg, "Token(<redacted>)");
    }

    #[test]
    fn validate_token_follows_rfc6750() {
        assert_eq!(validate_token(b"abc-._~+/=="), Ok(()));
        assert_eq!(validate_token(b""), Err(TokenFormatError::Empty));
        assert_eq!(
            validate_token(b"=abc"),
            Err(TokenFormatError::BadChar { offset: 0 })
        );
        assert_eq!(
            validate_token(b"ab=c"),
            Err(TokenFormatError::BadChar { offset: 3 })
        );
        assert_eq!(
            validate_token(b"ab c"),
            Err(TokenFormatError::BadChar { offset: 2 })
        );
        assert_eq!(validate_token(&[b'a'; MAX_TOKEN_LEN]), Ok(()));
        assert_eq!(
            validate_token(&[b'a'; MAX_TOKEN_LEN + 1]),
            Err(TokenFormatError::TooLong {
                len: MAX_TOKEN_LEN + 1
            })
        );
    }

    #[test]
    fn key_file_is_private_and_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join(KEY_FILE);
        write_key(&path, false).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.len(), 33);
        assert!(text.ends_with('\n'));
        let key = load_key(&path).unwrap();

        assert!(matches!(
            write_key(&path, false),
            Err(KeyError::Exists { .. })
        ));
        assert_eq!(
            load_key(&path).unwrap(),
            key,
            "refused write left key intact"
        );

        write_key(&path, true).unwrap();
        assert_ne!(load_key(&path).unwrap(), key, "--force writes a new key");
    }

    #[test]
    fn key_loading_rejects_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE);
        let put = |text: &str, mode: u32| {
            fs::write(&path, text).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        };
        put("00112233445566778899aabbccddeeff\n", 0o600);
        let key = load_key(&path).unwrap();
        // Bytes are k0 || k1, little-endian each (the SipHash reference key layout).
        assert_eq!(key.0, [0x7766_5544_3322_1100, 0xffee_ddcc_bbaa_9988]);

        put("00112233445566778899aabbccddeeff\n", 0o640);
        assert!(matches!(
            load_key(&path),
            Err(KeyError::Permissions { mode: 0o640, .. })
        ));
        put("00112233445566778899aabbccddeeff\n", 0o604);
        assert!(matches!(load_key(&path), Err(KeyError::Permissions { .. })));
        put("00112233445566778899aabbccddee\n", 0o600);
        assert!(matches!(
            load_key(&path),
            Err(KeyError::Length { len: 30, .. })
        ));
        put("00112233445566778899aabbccddeeff00\n", 0o600);
        assert!(matches!(load_key(&path), Err(KeyError::Length { .. })));
        put("0011223344556677889zaabbccddeeff\n", 0o600);
        assert!(matches!(load_key(&path), Err(KeyError::NotHex { .. })));
    }

    #[derive(Debug, Clone, PartialEq)]
    enum Call {
        Install(Fingerprint, TokenInfo),
        /// Whether the revocation was already on disk (seen by a fresh connection).
        Revoke(Fingerprint, bool),
    }

    struct FakeEnforcer {
        state_dir: PathBuf,
        calls: Mutex<Vec<Call>>,
        fail_install: bool,
        last_seen_ns: Mutex<HashMap<Fingerprint, u64>>,
    }

    impl FakeEnforcer {
        fn new(state_dir: &Path) -> Arc<Self> {
            Arc::new(FakeEnforcer {
                state_dir: state_dir.to_owned(),
                calls: Mutex::new(Vec::new()),
                fail_install: false,
                last_seen_ns: Mutex::new(HashMap::new()),
            })
        }
        fn calls(&self) -> Vec<Call> {
            self.calls.lock().unwrap().clone()
        }
    }

    impl Enforcer for FakeEnforcer {
        fn install(&self, fp: Fingerprint, info: TokenInfo) -> Result<(), EnforceError> {
            if self.fail_install {
                return Err(EnforceError("map full".into()));
            }
            self.calls.lock().unwrap().push(Call::Install(fp, info));
            Ok(())
        }
        fn revoke(&self, fp: Fingerprint) -> Result<(), EnforceError> {
            // A separate connection sees only committed data.
            let on_disk = Store::open(&self.state_dir)
                .unwrap()
                .revoked()
                .unwrap()
                .contains(&fp);
            self.calls.lock().unwrap().push(Call::Revoke(fp, on_disk));
            Ok(())
        }
        fn runtime(&self, fp: Fingerprint) -> Option<TokenRuntime> {
            let last = *self.last_seen_ns.lock().unwrap().get(&fp)?;
            Some(TokenRuntime {
                state: TokenState {
                    last_seen_ns: last,
                    ..Default::default()
                },
                ..Default::default()
            })
        }
    }

    struct FakePolicy;
    impl Resolve for FakePolicy {
        fn resolve(&self, contract: &str, scopes: &[String]) -> Result<Grant, ResolveError> {
            let idx = match contract {
                "standard" => 0,
                "partner" => 1,
                _ => {
                    return Err(ResolveError {
                        contract: contract.into(),
                        scopes: scopes.to_vec(),
                        source: "unknown contract".into(),
                    })
                }
            };
            Ok(Grant {
                contract: idx,
                flags: 0,
                scopes: (1u64 << scopes.len()) - 1,
            })
        }
    }

    fn setup() -> (
        tempfile::TempDir,
        Arc<FakeEnforcer>,
        Lifecycle,
        FingerprintKey,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let fake = FakeEnforcer::new(dir.path());
        let key = FingerprintKey([0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210]);
        let lc = Lifecycle::new(store, fake.clone(), key);
        (dir, fake, lc, key)
    }

    /// TAI conversions read two clocks, so they agree to well under a millisecond, not exactly.
    fn assert_close(a: u64, b: u64) {
        assert!(a.abs_diff(b) < 1_000_000, "{a} vs {b}");
    }

    fn req(contract: &str, ttl: Option<Duration>) -> IssueRequest {
        IssueRequest {
            contract: contract.into(),
            scopes: vec!["read".into(), "write".into()],
            ttl,
            label: Some("billing".into()),
            not_before: None,
        }
    }

    #[test]
    fn issue_stores_fingerprint_then_installs() {
        let (_dir, fake, lc, key) = setup();
        let issued = lc
            .issue(
                &FakePolicy,
                &req("partner", Some(Duration::from_secs(3600))),
                0,
            )
            .unwrap();
        let fp = fingerprint(&key, issued.token.expose_secret().as_bytes());
        assert_eq!(issued.record.fingerprint, fp);
        let rec = lc.store().get(&fp).unwrap().unwrap();
        assert_eq!(rec.contract, "partner");
        assert_eq!(rec.expires_at, Some(rec.issued_at + 3600));
        let calls = fake.calls();
        assert_eq!(calls.len(), 1);
        let Call::Install(ifp, info) = calls[0] else {
            panic!("expected install, got {:?}", calls[0])
        };
        assert_eq!(ifp, fp);
        assert_eq!(info.contract, 1);
        assert_eq!(info.scopes, 0b11);
        assert_close(info.expires_ns, unix_to_tai_ns(rec.issued_at + 3600));

        assert!(matches!(
            lc.issue(&FakePolicy, &req("nope", None), 0),
            Err(LifecycleError::Resolve(_))
        ));
    }

    #[test]
    fn failed_install_leaves_no_active_token() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let fake = Arc::new(FakeEnforcer {
            fail_install: true,
            ..Arc::try_unwrap(FakeEnforcer::new(dir.path())).ok().unwrap()
        });
        let lc = Lifecycle::new(store.clone(), fake, FingerprintKey([1, 2]));
        let err = lc
            .issue(&FakePolicy, &req("standard", None), 0)
            .unwrap_err();
        assert!(matches!(err, LifecycleError::Install { .. }));
        assert!(store.active().unwrap().is_empty());
        assert_eq!(store.revoked().unwrap().len(), 1);
    }

    #[test]
    fn revoke_persists_before_kernel_insert() {
        let (dir, fake, lc, _) = setup();
        let issued = lc.issue(&FakePolicy, &req("standard", None), 0).unwrap();
        let fp = issued.record.fingerprint;
        drop(issued);
        let rev = lc.revoke(&fp, "compromised", 0).unwrap();
        assert_eq!(rev.reason, "compromised");
        let calls = fake.calls();
        assert_eq!(calls.last(), Some(&Call::Revoke(fp, true)));

        // After a restart the revocation is re-applied before any token is installed.
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let fake2 = FakeEnforcer::new(dir.path());
        let lc2 = Lifecycle::new(store, fake2.clone(), FingerprintKey([1, 2]));
        let report = lc2.apply_all(&FakePolicy).unwrap();
        assert_eq!((report.revoked, report.installed), (1, 0));
        assert_eq!(fake2.calls(), vec![Call::Revoke(fp, true)]);
    }

    #[test]
    fn rotate_issues_successor_and_shortens_old_in_kernel() {
        let (_dir, fake, lc, _) = setup();
        let issued = lc
            .issue(
                &FakePolicy,
                &req("partner", Some(Duration::from_secs(86_400))),
                0,
            )
            .unwrap();
        let old = issued.record.fingerprint;
        let rot = lc
            .rotate(&FakePolicy, &old, Duration::from_secs(3600), None, 0)
            .unwrap();
        assert_ne!(rot.token.expose_secret(), issued.token.expose_secret());
        assert_eq!(rot.record.rotated_from, Some(old));
        assert_eq!(rot.record.contract, "partner");
        assert_eq!(rot.record.scopes, issued.record.scopes);
        assert_eq!(
            rot.record.expires_at,
            Some(rot.record.issued_at + 86_400),
            "keeps the old lifetime"
        );
        let old_exp = rot.old.expires_at.unwrap();
        assert!((old_exp - (unix_now() + 3600)).abs() <= 2);
        let calls = fake.calls();
        assert_eq!(calls.len(), 3);
        assert!(matches!(calls[1], Call::Install(fp, _) if fp == rot.record.fingerprint));
        let Call::Install(fp, info) = calls[2] else {
            panic!("expected install of old token")
        };
        assert_eq!(fp, old);
        assert_close(info.expires_ns, unix_to_tai_ns(old_exp));

        lc.revoke(&old, "done", 0).unwrap();
        assert!(matches!(
            lc.rotate(&FakePolicy, &old, Duration::ZERO, None, 0),
            Err(LifecycleError::NotActive { .. })
        ));
    }

    #[test]
    fn idle_listing_uses_datapath_last_seen() {
        let (_dir, fake, lc, _) = setup();
        let a = lc.issue(&FakePolicy, &req("standard", None), 0).unwrap();
        let b = lc.issue(&FakePolicy, &req("standard", None), 0).unwrap();
        // Token a was used just now, b never; with a zero idle window both issued "now" are
        // idle unless seen after now.
        fake.last_seen_ns.lock().unwrap().insert(
            a.record.fingerprint,
            crate::datapath::clock::tai_now_ns() + 10_000_000_000,
        );
        let idle = ListFilter {
            idle_for: Some(Duration::ZERO),
            ..Default::default()
        };
        let fps: Vec<_> = lc
            .list(&idle)
            .unwrap()
            .iter()
            .map(|r| r.fingerprint)
            .collect();
        assert_eq!(fps, vec![b.record.fingerprint]);
    }

    #[test]
    fn sqlite_files_never_contain_the_plaintext_token() {
        let (dir, _fake, lc, _) = setup();
        let issued = lc
            .issue(
                &FakePolicy,
                &req("standard", Some(Duration::from_secs(60))),
                0,
            )
            .unwrap();
        let rot = lc
            .rotate(
                &FakePolicy,
                &issued.record.fingerprint,
                Duration::ZERO,
                None,
                0,
            )
            .unwrap();
        for (tok, rec) in [(&issued.token, &issued.record), (&rot.token, &rot.record)] {
            let secret = tok.expose_secret().as_bytes();
            // The random part alone, too, in case a prefix were ever stripped before storing.
            let body = &secret[TOKEN_PREFIX.len()..];
            for entry in fs::read_dir(dir.path()).unwrap() {
                let path = entry.unwrap().path();
                let bytes = fs::read(&path).unwrap();
                let found = bytes.windows(body.len()).any(|w| w == body);
                assert!(
                    !found,
                    "plaintext of token {} found in {}",
                    rec.fingerprint,
                    path.display()
                );
            }
        }
        // The fingerprint, by contrast, is there (the search itself works).
        let hex = issued.record.fingerprint.to_string();
        let stored = fs::read_dir(dir.path()).unwrap().any(|e| {
            let bytes = fs::read(e.unwrap().path()).unwrap();
            bytes.windows(32).any(|w| w == hex.as_bytes())
        });
        assert!(stored, "fingerprint {hex} not found in the state dir");
    }
}
