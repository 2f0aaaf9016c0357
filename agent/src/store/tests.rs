use super::*;

fn fp(n: u64) -> Fingerprint {
    Fingerprint([n, n.wrapping_mul(0x9e37_79b9_7f4a_7c15)])
}

fn new_token(n: u64, expires_at: Option<i64>) -> NewToken {
    NewToken {
        fingerprint: fp(n),
        contract: "standard".into(),
        scopes: vec!["read".into(), "write".into()],
        label: Some(format!("client-{n}")),
        issued_at: 1_000,
        not_before: None,
        expires_at,
    }
}

/// The SQL count agrees with classifying every record (`status_at`, not_before).
#[test]
fn state_counts_match_the_records() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let now = 5_000;
    for n in 0..40u64 {
        let mut t = new_token(n, None);
        t.expires_at = match n % 4 {
            0 => None,
            1 => Some(now - 10),
            2 => Some(now),
            _ => Some(now + 10),
        };
        t.not_before = match n % 3 {
            0 => None,
            1 => Some(now + 60),
            _ => Some(now - 60),
        };
        store.issue(&t, 0).unwrap();
    }
    for n in (0..40u64).step_by(5) {
        store.revoke(&fp(n), "test", 0).unwrap();
    }
    store.mark_expired(now - 5).unwrap();
    let mut want = StateCounts::default();
    for r in store.all_records().unwrap() {
        match r.status_at(now) {
            TokenStatus::Active if r.not_before.is_some_and(|nb| nb > now) => {
                want.not_yet_valid += 1
            }
            TokenStatus::Active => want.active += 1,
            TokenStatus::Revoked => want.revoked += 1,
            TokenStatus::Expired => want.expired += 1,
        }
    }
    let got = store.count_by_state(now).unwrap();
    assert_eq!(got, want);
    assert!(got.active > 0 && got.not_yet_valid > 0 && got.revoked > 0 && got.expired > 0);
}

#[test]
fn revocation_and_audit_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        store.issue(&new_token(1, None), 0).unwrap();
        store.issue(&new_token(2, Some(5_000)), 0).unwrap();
        let r = store.revoke(&fp(1), "leaked in CI log", 0).unwrap();
        assert!(!r.already);
    }
    let store = Store::open(dir.path()).unwrap();
    let rec = store.get(&fp(1)).unwrap().expect("token 1 recorded");
    assert_eq!(rec.status, TokenStatus::Revoked);
    assert_eq!(rec.scopes, vec!["read".to_string(), "write".to_string()]);
    assert_eq!(store.revoked().unwrap(), vec![fp(1)]);
    let rev = store.revocation(&fp(1)).unwrap().unwrap();
    assert_eq!(rev.reason, "leaked in CI log");
    let audit = store.audit(10).unwrap();
    let actions: Vec<_> = audit.iter().map(|a| a.action).collect();
    assert_eq!(
        actions,
        vec![AuditAction::Revoke, AuditAction::Issue, AuditAction::Issue]
    );
    assert_eq!(audit[0].fingerprint, Some(fp(1)));
    assert_eq!(audit[0].uid, Some(0));

    // Revoking again is idempotent and keeps the first record.
    let again = store.revoke(&fp(1), "second reason", 0).unwrap();
    assert!(again.already);
    assert_eq!(again.revocation.reason, "leaked in CI log");
    assert_eq!(store.audit(10).unwrap().len(), 3);
}

#[test]
fn audit_rows_cannot_be_updated_or_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.issue(&new_token(1, None), 0).unwrap();
    drop(store);
    // Tamper through a separate connection, as an attacker with file access would.
    let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
    let upd = conn.execute("UPDATE audit SET detail = 'nothing happened'", []);
    assert!(upd.unwrap_err().to_string().contains("append-only"));
    let del = conn.execute("DELETE FROM audit", []);
    assert!(del.unwrap_err().to_string().contains("append-only"));
    let n: i64 = conn
        .query_row("SELECT count(*) FROM audit", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1);
}

#[test]
fn schema_version_is_set_and_newer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(Store::open(dir.path()).unwrap());
    let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
    let v: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(v, SCHEMA_VERSION);
    conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .unwrap();
    drop(conn);
    let err = Store::open(dir.path()).unwrap_err();
    assert!(matches!(err, StoreError::SchemaTooNew { found, .. } if found == SCHEMA_VERSION + 1));
}

#[test]
fn files_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let store = Store::open(&state).unwrap();
    store.issue(&new_token(1, None), 0).unwrap();
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&state.join(DB_FILE)), 0o600);
    assert_eq!(mode(&state.join("rampart.db-wal")), 0o600);
}

#[test]
fn duplicate_and_unknown_fingerprints_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.issue(&new_token(1, None), 0).unwrap();
    assert!(matches!(
        store.issue(&new_token(1, None), 0),
        Err(StoreError::Duplicate { .. })
    ));
    assert!(matches!(
        store.revoke(&fp(9), "x", 0),
        Err(StoreError::NotFound { .. })
    ));
    assert!(store.get(&fp(9)).unwrap().is_none());
}

#[test]
fn rotate_links_tokens_and_shortens_old_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.issue(&new_token(1, Some(100_000)), 0).unwrap();
    let (old, new) = store.rotate(&fp(1), &new_token(2, None), 4_600, 0).unwrap();
    assert_eq!(old.expires_at, Some(4_600));
    assert_eq!(new.rotated_from, Some(fp(1)));
    assert_eq!(new.contract, "standard");
    // A later grace never extends the old token.
    store.issue(&new_token(3, Some(2_000)), 0).unwrap();
    let (old3, _) = store.rotate(&fp(3), &new_token(4, None), 9_000, 0).unwrap();
    assert_eq!(old3.expires_at, Some(2_000));
    // Revoked tokens cannot be rotated.
    store.revoke(&fp(2), "gone", 0).unwrap();
    assert!(matches!(
        store.rotate(&fp(2), &new_token(5, None), 9_000, 0),
        Err(StoreError::NotActive { .. })
    ));
}

#[test]
fn list_filters_expiring_and_inactive() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let now = 10_000;
    store.issue(&new_token(1, Some(now + 60)), 0).unwrap(); // expiring soon
    store
        .issue(&new_token(2, Some(now + 86_400 * 10)), 0)
        .unwrap();
    store.issue(&new_token(3, None), 0).unwrap();
    store.issue(&new_token(4, Some(now - 1)), 0).unwrap(); // already expired
    store.revoke(&fp(3), "r", 0).unwrap();
    let list = |filter: &ListFilter| -> Vec<Fingerprint> {
        store
            .list_page(filter, now, None, 100)
            .unwrap()
            .iter()
            .map(|r| r.fingerprint)
            .collect()
    };

    assert_eq!(list(&ListFilter::default()), vec![fp(1), fp(2)]);
    let expiring = ListFilter {
        expiring_within: Some(Duration::from_secs(3_600)),
        ..Default::default()
    };
    assert_eq!(list(&expiring), vec![fp(1)]);
    let all = ListFilter {
        include_inactive: true,
        ..Default::default()
    };
    assert_eq!(list(&all), vec![fp(1), fp(2), fp(3), fp(4)]);

    assert_eq!(store.mark_expired(now).unwrap(), vec![fp(4)]);
    assert_eq!(
        store.get(&fp(4)).unwrap().unwrap().status,
        TokenStatus::Expired
    );
    assert_eq!(store.active().unwrap().len(), 2);
}

/// Pages follow one another in the order tokens were recorded, each token once, whatever
/// the page size; the contract filter holds on every page.
#[test]
fn list_pages_cover_every_token_once_in_record_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let now = 10_000;
    // Issued out of fingerprint order, half on another contract.
    let order: Vec<u64> = (0..23u64).map(|i| (i * 7) % 23).collect();
    for &n in &order {
        let mut t = new_token(n, None);
        if n % 2 == 1 {
            t.contract = "gold".into();
        }
        store.issue(&t, 0).unwrap();
    }
    let pages = |filter: &ListFilter, size: usize| -> Vec<Fingerprint> {
        let mut out = Vec::new();
        let mut after = None;
        loop {
            let page = store.list_page(filter, now, after.as_ref(), size).unwrap();
            assert!(page.len() <= size);
            out.extend(page.iter().map(|r| r.fingerprint));
            match page.last() {
                Some(r) if page.len() == size => after = Some(r.fingerprint),
                _ => return out,
            }
        }
    };
    let want: Vec<Fingerprint> = order.iter().map(|&n| fp(n)).collect();
    for size in [1, 4, 23, 100] {
        assert_eq!(pages(&ListFilter::default(), size), want, "pages of {size}");
    }
    let gold = ListFilter {
        contract: Some("gold".into()),
        ..Default::default()
    };
    let want_gold: Vec<Fingerprint> = order
        .iter()
        .filter(|n| *n % 2 == 1)
        .map(|&n| fp(n))
        .collect();
    assert_eq!(pages(&gold, 3), want_gold);
    assert!(matches!(
        store.list_page(&ListFilter::default(), now, Some(&fp(99)), 10),
        Err(StoreError::NotFound { .. })
    ));
}

/// The names active tokens use, each once; a revoked token's names no longer count.
#[test]
fn names_in_use_are_those_of_active_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    for n in 0..10u64 {
        store.issue(&new_token(n, None), 0).unwrap();
    }
    let mut other = new_token(99, None);
    other.contract = "gold".into();
    other.scopes = vec!["admin".into()];
    store.issue(&other, 0).unwrap();
    let set = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<HashSet<_>>();
    assert_eq!(
        store.names_in_use().unwrap(),
        (set(&["standard", "gold"]), set(&["read", "write", "admin"]))
    );
    store.revoke(&fp(99), "test", 0).unwrap();
    assert_eq!(
        store.names_in_use().unwrap(),
        (set(&["standard"]), set(&["read", "write"]))
    );
}

/// `expiring` picks what filtering every active record would.
#[test]
fn expiring_tokens_are_picked_by_sqlite_as_by_their_records() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let now = 10_000;
    for n in 0..30u64 {
        let expires = match n % 5 {
            0 => None,
            1 => Some(now - 1),
            2 => Some(now),
            3 => Some(now + 100),
            _ => Some(now + 10_000),
        };
        store.issue(&new_token(n, expires), 0).unwrap();
    }
    store.revoke(&fp(3), "test", 0).unwrap();
    let want: Vec<Fingerprint> = store
        .active()
        .unwrap()
        .into_iter()
        .filter(|r| r.expires_at.is_some_and(|e| e > now && e - now <= 100))
        .map(|r| r.fingerprint)
        .collect();
    let got: Vec<Fingerprint> = store
        .expiring(now, 100)
        .unwrap()
        .into_iter()
        .map(|r| r.fingerprint)
        .collect();
    assert_eq!(got, want);
    assert_eq!(got.len(), 5, "six within the window, one of them revoked");
}
