//! The lifecycle against a real store and a fake kernel.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::Mutex,
};

use agent_common::siphash::fingerprint;

use super::*;
use crate::token::TOKEN_PREFIX;

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
    let page = lc.list_page(&idle, None, 10).unwrap();
    let fps: Vec<_> = page.tokens.iter().map(|(r, _)| r.fingerprint).collect();
    assert_eq!(fps, vec![b.record.fingerprint]);
    assert_eq!(page.next, None);
    // A page of one reads on past the token the idle filter drops, and says where it
    // stopped.
    let page = lc.list_page(&idle, None, 1).unwrap();
    let fps: Vec<_> = page.tokens.iter().map(|(r, _)| r.fingerprint).collect();
    assert_eq!(fps, vec![b.record.fingerprint]);
    assert_eq!(page.next, Some(b.record.fingerprint));
    assert!(lc.list_page(&idle, page.next, 1).unwrap().tokens.is_empty());
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
