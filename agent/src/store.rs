//! Durable daemon state in SQLite (`<state_dir>/rampart.db`): issued tokens, revocations and an
//! append-only audit log.
//!
//! Only fingerprints are ever stored, never a plaintext token. Every mutating call commits
//! (WAL, `synchronous=FULL`) before it returns, so a caller that acts on success — e.g. the
//! revocation path, which inserts into the kernel only after this — can rely on the change
//! surviving a crash or restart.

use std::{
    collections::HashMap,
    fs::{self, OpenOptions},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use agent_common::Fingerprint;
use rusqlite::{params, Connection, OptionalExtension, Row, Transaction};
use serde::{Deserialize, Serialize};

/// File name of the database inside the state directory.
pub const DB_FILE: &str = "rampart.db";

/// Schema version written to `PRAGMA user_version`; bump with a new entry in `MIGRATIONS`.
pub const SCHEMA_VERSION: i64 = 1;

/// `MIGRATIONS[i]` takes the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE tokens (
    fingerprint  TEXT PRIMARY KEY NOT NULL CHECK (length(fingerprint) = 32),
    contract     TEXT NOT NULL,
    scopes       TEXT NOT NULL,              -- JSON array of scope names
    label        TEXT,
    issued_at    INTEGER NOT NULL,           -- Unix seconds
    not_before   INTEGER,
    expires_at   INTEGER,
    rotated_from TEXT REFERENCES tokens(fingerprint),
    status       TEXT NOT NULL DEFAULT 'active'
                 CHECK (status IN ('active', 'revoked', 'expired'))
);
CREATE INDEX tokens_status ON tokens(status);

CREATE TABLE revocations (
    fingerprint TEXT PRIMARY KEY NOT NULL CHECK (length(fingerprint) = 32),
    revoked_at  INTEGER NOT NULL,
    reason      TEXT NOT NULL,
    uid         INTEGER NOT NULL
);

CREATE TABLE audit (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    time        INTEGER NOT NULL,
    uid         INTEGER,
    action      TEXT NOT NULL,
    fingerprint TEXT,
    detail      TEXT NOT NULL DEFAULT ''
);
-- The audit trail is evidence: it only ever grows.
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
"#];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create state directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create database file {path}")]
    CreateFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open database {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("database {path} has schema version {found}, newer than this rampart ({supported})")]
    SchemaTooNew {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error("migrating database {path} to schema version {version}")]
    Migrate {
        path: PathBuf,
        version: i64,
        #[source]
        source: rusqlite::Error,
    },
    #[error("token {fingerprint} is already recorded")]
    Duplicate { fingerprint: String },
    #[error("no token with fingerprint {fingerprint}")]
    NotFound { fingerprint: String },
    #[error("token {fingerprint} is {status}, not active")]
    NotActive {
        fingerprint: String,
        status: TokenStatus,
    },
    #[error("database row is corrupt: {what}")]
    Corrupt { what: String },
    #[error("database {op} failed")]
    Sql {
        op: &'static str,
        #[source]
        source: rusqlite::Error,
    },
}

/// Lifecycle state of an issued token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenStatus {
    Active,
    Revoked,
    Expired,
}

impl TokenStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenStatus::Active => "active",
            TokenStatus::Revoked => "revoked",
            TokenStatus::Expired => "expired",
        }
    }

    fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "active" => Ok(TokenStatus::Active),
            "revoked" => Ok(TokenStatus::Revoked),
            "expired" => Ok(TokenStatus::Expired),
            other => Err(StoreError::Corrupt {
                what: format!("token status {other:?}"),
            }),
        }
    }
}

impl std::fmt::Display for TokenStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the audit log records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditAction {
    Issue,
    Rotate,
    Revoke,
    Expire,
    Reload,
    Start,
    Stop,
}

impl AuditAction {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditAction::Issue => "issue",
            AuditAction::Rotate => "rotate",
            AuditAction::Revoke => "revoke",
            AuditAction::Expire => "expire",
            AuditAction::Reload => "reload",
            AuditAction::Start => "start",
            AuditAction::Stop => "stop",
        }
    }

    fn parse(s: &str) -> Result<Self, StoreError> {
        Ok(match s {
            "issue" => AuditAction::Issue,
            "rotate" => AuditAction::Rotate,
            "revoke" => AuditAction::Revoke,
            "expire" => AuditAction::Expire,
            "reload" => AuditAction::Reload,
            "start" => AuditAction::Start,
            "stop" => AuditAction::Stop,
            other => {
                return Err(StoreError::Corrupt {
                    what: format!("audit action {other:?}"),
                })
            }
        })
    }
}

/// A token about to be recorded (times are Unix seconds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewToken {
    pub fingerprint: Fingerprint,
    pub contract: String,
    pub scopes: Vec<String>,
    pub label: Option<String>,
    pub issued_at: i64,
    pub not_before: Option<i64>,
    pub expires_at: Option<i64>,
}

/// An issued token as recorded (times are Unix seconds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRecord {
    pub fingerprint: Fingerprint,
    pub contract: String,
    pub scopes: Vec<String>,
    pub label: Option<String>,
    pub issued_at: i64,
    pub not_before: Option<i64>,
    pub expires_at: Option<i64>,
    pub rotated_from: Option<Fingerprint>,
    pub status: TokenStatus,
}

impl TokenRecord {
    /// The status as of `now`: an active token past its expiry reads as expired even before
    /// `Store::mark_expired` has run.
    pub fn status_at(&self, now: i64) -> TokenStatus {
        match (self.status, self.expires_at) {
            (TokenStatus::Active, Some(exp)) if exp <= now => TokenStatus::Expired,
            (s, _) => s,
        }
    }
}

/// Tokens by state at one instant (`Store::count_by_state`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateCounts {
    pub active: u64,
    pub not_yet_valid: u64,
    pub revoked: u64,
    pub expired: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revocation {
    pub fingerprint: Fingerprint,
    pub revoked_at: i64,
    pub reason: String,
    pub uid: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEntry {
    pub id: i64,
    pub time: i64,
    pub uid: Option<u32>,
    pub action: AuditAction,
    pub fingerprint: Option<Fingerprint>,
    pub detail: String,
}

/// Which tokens `Store::list` returns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListFilter {
    /// Only active tokens whose expiry falls within this long from now.
    pub expiring_within: Option<Duration>,
    /// Only tokens not seen for this long (never-seen tokens count from their issue time).
    pub idle_for: Option<Duration>,
    /// Include revoked and expired tokens too.
    pub include_inactive: bool,
}

/// The result of `Store::revoke`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revoked {
    pub revocation: Revocation,
    /// The token was already revoked; `revocation` is the original record.
    pub already: bool,
}

/// The state database. Cheap to share behind an `Arc`; calls serialise on one connection.
pub struct Store {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

/// Now, in Unix seconds.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn sql(op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Sql { op, source }
}

fn corrupt_fp(s: &str) -> StoreError {
    StoreError::Corrupt {
        what: format!("fingerprint {s:?}"),
    }
}

fn row_to_record(row: &Row<'_>) -> rusqlite::Result<RawRecord> {
    Ok(RawRecord {
        fingerprint: row.get(0)?,
        contract: row.get(1)?,
        scopes: row.get(2)?,
        label: row.get(3)?,
        issued_at: row.get(4)?,
        not_before: row.get(5)?,
        expires_at: row.get(6)?,
        rotated_from: row.get(7)?,
        status: row.get(8)?,
    })
}

const RECORD_COLUMNS: &str =
    "fingerprint, contract, scopes, label, issued_at, not_before, expires_at, rotated_from, status";

/// A row as SQLite holds it, before validation.
struct RawRecord {
    fingerprint: String,
    contract: String,
    scopes: String,
    label: Option<String>,
    issued_at: i64,
    not_before: Option<i64>,
    expires_at: Option<i64>,
    rotated_from: Option<String>,
    status: String,
}

impl RawRecord {
    fn parse(self) -> Result<TokenRecord, StoreError> {
        let fingerprint = self
            .fingerprint
            .parse::<Fingerprint>()
            .map_err(|_| corrupt_fp(&self.fingerprint))?;
        let rotated_from = match self.rotated_from {
            Some(s) => Some(s.parse::<Fingerprint>().map_err(|_| corrupt_fp(&s))?),
            None => None,
        };
        let scopes = serde_json::from_str(&self.scopes).map_err(|e| StoreError::Corrupt {
            what: format!("scope list of {}: {e}", self.fingerprint),
        })?;
        Ok(TokenRecord {
            fingerprint,
            contract: self.contract,
            scopes,
            label: self.label,
            issued_at: self.issued_at,
            not_before: self.not_before,
            expires_at: self.expires_at,
            rotated_from,
            status: TokenStatus::parse(&self.status)?,
        })
    }
}

fn get_in(conn: &Connection, fp: &Fingerprint) -> Result<Option<TokenRecord>, StoreError> {
    conn.query_row(
        &format!("SELECT {RECORD_COLUMNS} FROM tokens WHERE fingerprint = ?1"),
        params![fp.to_string()],
        row_to_record,
    )
    .optional()
    .map_err(sql("read token"))?
    .map(RawRecord::parse)
    .transpose()
}

fn insert_token(
    tx: &Transaction<'_>,
    t: &NewToken,
    rotated_from: Option<&Fingerprint>,
) -> Result<(), StoreError> {
    let fp = t.fingerprint.to_string();
    let scopes = serde_json::to_string(&t.scopes).map_err(|e| StoreError::Corrupt {
        what: format!("scope list: {e}"),
    })?;
    let res = tx.execute(
        "INSERT INTO tokens (fingerprint, contract, scopes, label, issued_at, not_before, \
         expires_at, rotated_from, status) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'active')",
        params![
            fp,
            t.contract,
            scopes,
            t.label,
            t.issued_at,
            t.not_before,
            t.expires_at,
            rotated_from.map(ToString::to_string),
        ],
    );
    match res {
        Ok(_) => Ok(()),
        Err(rusqlite::Error::SqliteFailure(e, _))
            if e.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            Err(StoreError::Duplicate { fingerprint: fp })
        }
        Err(source) => Err(StoreError::Sql {
            op: "insert token",
            source,
        }),
    }
}

fn audit_in(
    conn: &Connection,
    uid: Option<u32>,
    action: AuditAction,
    fp: Option<&Fingerprint>,
    detail: &str,
) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO audit (time, uid, action, fingerprint, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            unix_now(),
            uid,
            action.as_str(),
            fp.map(ToString::to_string),
            detail
        ],
    )
    .map_err(sql("append audit"))?;
    Ok(())
}

impl Store {
    /// Opens (creating if needed) `<state_dir>/rampart.db`. The directory is created 0700 and
    /// the database file 0600: fingerprints are not secrets, but labels and the audit trail are
    /// operator business.
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        if !state_dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(state_dir)
                .map_err(|source| StoreError::CreateDir {
                    path: state_dir.to_owned(),
                    source,
                })?;
        }
        let path = state_dir.join(DB_FILE);
        // Pre-create the file with its final mode; SQLite gives -wal/-shm the same mode.
        let created = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .and_then(|f| f.set_permissions(fs::Permissions::from_mode(0o600)));
        created.map_err(|source| StoreError::CreateFile {
            path: path.clone(),
            source,
        })?;

        let open_err = |source| StoreError::Open {
            path: path.clone(),
            source,
        };
        let mut conn = Connection::open(&path).map_err(open_err)?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(open_err)?;
        // WAL + FULL: every commit is fsynced before it returns.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(open_err)?;
        // Freed pages are zeroed so deleted data does not linger in the file.
        conn.pragma_update(None, "secure_delete", "ON")
            .map_err(open_err)?;
        migrate(&mut conn, &path)?;
        Ok(Store {
            path,
            conn: Mutex::new(conn),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite half-written (transactions roll
        // back on drop), so a poisoned lock is still safe to use.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a newly issued token and its audit entry in one transaction.
    pub fn issue(&self, t: &NewToken, uid: u32) -> Result<TokenRecord, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(sql("begin"))?;
        insert_token(&tx, t, None)?;
        let detail = format!("contract={} scopes={}", t.contract, t.scopes.join(","));
        audit_in(
            &tx,
            Some(uid),
            AuditAction::Issue,
            Some(&t.fingerprint),
            &detail,
        )?;
        let rec = get_in(&tx, &t.fingerprint)?.ok_or_else(|| StoreError::NotFound {
            fingerprint: t.fingerprint.to_string(),
        })?;
        tx.commit().map_err(sql("commit issue"))?;
        Ok(rec)
    }

    /// Records many tokens in one transaction (`rampart token import`): all of them, or
    /// none. On a failure, the error comes with the index of the token that caused it.
    /// The audit log gets one entry for the import.
    pub fn import(&self, tokens: &[NewToken], uid: u32) -> Result<(), (usize, StoreError)> {
        let mut conn = self.conn();
        let whole = |e| (0, e);
        let tx = conn.transaction().map_err(sql("begin")).map_err(whole)?;
        for (i, t) in tokens.iter().enumerate() {
            insert_token(&tx, t, None).map_err(|e| (i, e))?;
        }
        let detail = format!("import of {} tokens", tokens.len());
        audit_in(&tx, Some(uid), AuditAction::Issue, None, &detail).map_err(whole)?;
        tx.commit().map_err(sql("commit import")).map_err(whole)
    }

    /// Records `new` as the successor of the active token `old`, and moves `old`'s expiry to
    /// `old_expires_at` (never later than it already was). Returns (old, new) as now recorded.
    pub fn rotate(
        &self,
        old: &Fingerprint,
        new: &NewToken,
        old_expires_at: i64,
        uid: u32,
    ) -> Result<(TokenRecord, TokenRecord), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(sql("begin"))?;
        let old_rec = get_in(&tx, old)?.ok_or_else(|| StoreError::NotFound {
            fingerprint: old.to_string(),
        })?;
        if old_rec.status != TokenStatus::Active {
            return Err(StoreError::NotActive {
                fingerprint: old.to_string(),
                status: old_rec.status,
            });
        }
        let expiry = old_rec
            .expires_at
            .map_or(old_expires_at, |e| e.min(old_expires_at));
        tx.execute(
            "UPDATE tokens SET expires_at = ?2 WHERE fingerprint = ?1",
            params![old.to_string(), expiry],
        )
        .map_err(sql("shorten rotated token"))?;
        insert_token(&tx, new, Some(old))?;
        let detail = format!("rotated from {} (old expires at {expiry})", old);
        audit_in(
            &tx,
            Some(uid),
            AuditAction::Rotate,
            Some(&new.fingerprint),
            &detail,
        )?;
        let old_now = get_in(&tx, old)?.ok_or_else(|| StoreError::NotFound {
            fingerprint: old.to_string(),
        })?;
        let new_now = get_in(&tx, &new.fingerprint)?.ok_or_else(|| StoreError::NotFound {
            fingerprint: new.fingerprint.to_string(),
        })?;
        tx.commit().map_err(sql("commit rotate"))?;
        Ok((old_now, new_now))
    }

    /// Revokes a recorded token; committed (fsynced) before returning. Revoking an already
    /// revoked token succeeds with `already = true` and the original record, so a caller can
    /// safely retry the kernel side.
    pub fn revoke(&self, fp: &Fingerprint, reason: &str, uid: u32) -> Result<Revoked, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(sql("begin"))?;
        let hex = fp.to_string();
        if get_in(&tx, fp)?.is_none() {
            return Err(StoreError::NotFound { fingerprint: hex });
        }
        let existing = tx
            .query_row(
                "SELECT revoked_at, reason, uid FROM revocations WHERE fingerprint = ?1",
                params![hex],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, u32>(2)?,
                    ))
                },
            )
            .optional()
            .map_err(sql("read revocation"))?;
        if let Some((revoked_at, reason, uid)) = existing {
            return Ok(Revoked {
                revocation: Revocation {
                    fingerprint: *fp,
                    revoked_at,
                    reason,
                    uid,
                },
                already: true,
            });
        }
        let now = unix_now();
        tx.execute(
            "INSERT INTO revocations (fingerprint, revoked_at, reason, uid) VALUES (?1, ?2, ?3, ?4)",
            params![hex, now, reason, uid],
        )
        .map_err(sql("insert revocation"))?;
        tx.execute(
            "UPDATE tokens SET status = 'revoked' WHERE fingerprint = ?1",
            params![hex],
        )
        .map_err(sql("mark revoked"))?;
        audit_in(&tx, Some(uid), AuditAction::Revoke, Some(fp), reason)?;
        tx.commit().map_err(sql("commit revoke"))?;
        Ok(Revoked {
            revocation: Revocation {
                fingerprint: *fp,
                revoked_at: now,
                reason: reason.to_owned(),
                uid,
            },
            already: false,
        })
    }

    /// Marks active tokens whose expiry is at or before `now` as expired (one audit entry
    /// each) and returns their fingerprints.
    pub fn mark_expired(&self, now: i64) -> Result<Vec<Fingerprint>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(sql("begin"))?;
        let due: Vec<String> = {
            let mut stmt = tx
                .prepare(
                    "SELECT fingerprint FROM tokens WHERE status = 'active' \
                     AND expires_at IS NOT NULL AND expires_at <= ?1",
                )
                .map_err(sql("select expired"))?;
            let rows = stmt
                .query_map(params![now], |r| r.get(0))
                .map_err(sql("select expired"))?;
            rows.collect::<Result<_, _>>()
                .map_err(sql("select expired"))?
        };
        let mut out = Vec::with_capacity(due.len());
        for hex in due {
            let fp = hex.parse::<Fingerprint>().map_err(|_| corrupt_fp(&hex))?;
            tx.execute(
                "UPDATE tokens SET status = 'expired' WHERE fingerprint = ?1",
                params![hex],
            )
            .map_err(sql("mark expired"))?;
            audit_in(&tx, None, AuditAction::Expire, Some(&fp), "")?;
            out.push(fp);
        }
        tx.commit().map_err(sql("commit expire"))?;
        Ok(out)
    }

    /// Appends an audit entry for an event the store does not itself perform (reload, start...).
    pub fn record(
        &self,
        action: AuditAction,
        uid: Option<u32>,
        fp: Option<&Fingerprint>,
        detail: &str,
    ) -> Result<(), StoreError> {
        audit_in(&self.conn(), uid, action, fp, detail)
    }

    pub fn get(&self, fp: &Fingerprint) -> Result<Option<TokenRecord>, StoreError> {
        get_in(&self.conn(), fp)
    }

    /// Tokens matching `filter`, oldest first. `last_seen` (Unix seconds, from the datapath)
    /// drives the idle filter; without it every token counts as idle since issue.
    pub fn list(
        &self,
        filter: &ListFilter,
        now: i64,
        last_seen: Option<&HashMap<Fingerprint, i64>>,
    ) -> Result<Vec<TokenRecord>, StoreError> {
        let all = self.all_records()?;
        let secs = |d: Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
        Ok(all
            .into_iter()
            .filter(|r| filter.include_inactive || r.status_at(now) == TokenStatus::Active)
            .filter(|r| match filter.expiring_within {
                None => true,
                Some(d) => r
                    .expires_at
                    .is_some_and(|e| e > now && e <= now.saturating_add(secs(d))),
            })
            .filter(|r| match filter.idle_for {
                None => true,
                Some(d) => {
                    let seen = last_seen
                        .and_then(|m| m.get(&r.fingerprint).copied())
                        .unwrap_or(r.issued_at);
                    seen <= now.saturating_sub(secs(d))
                }
            })
            .collect())
    }

    /// Every token whose status is `active` (start-up installs these into the kernel).
    pub fn active(&self) -> Result<Vec<TokenRecord>, StoreError> {
        Ok(self
            .all_records()?
            .into_iter()
            .filter(|r| r.status == TokenStatus::Active)
            .collect())
    }

    /// How many tokens are in each state at `now`, counted by SQLite: the metrics ask every
    /// few seconds, and building every record costs four times as much (100k tokens,
    /// release build: 117 ms against 30 ms).
    /// Same classes as `TokenRecord::status_at`, with active tokens whose `not_before` is
    /// still ahead counted apart.
    pub fn count_by_state(&self, now: i64) -> Result<StateCounts, StoreError> {
        let conn = self.conn();
        conn.query_row(
            "SELECT
                 COALESCE(SUM(status = 'active' AND (expires_at IS NULL OR expires_at > ?1)
                              AND (not_before IS NULL OR not_before <= ?1)), 0),
                 COALESCE(SUM(status = 'active' AND (expires_at IS NULL OR expires_at > ?1)
                              AND not_before > ?1), 0),
                 COALESCE(SUM(status = 'revoked'), 0),
                 COALESCE(SUM(status = 'expired'
                              OR (status = 'active' AND expires_at <= ?1)), 0)
             FROM tokens",
            [now],
            |r| {
                Ok(StateCounts {
                    active: r.get(0)?,
                    not_yet_valid: r.get(1)?,
                    revoked: r.get(2)?,
                    expired: r.get(3)?,
                })
            },
        )
        .map_err(sql("count tokens"))
    }

    fn all_records(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {RECORD_COLUMNS} FROM tokens ORDER BY issued_at, rowid"
            ))
            .map_err(sql("list tokens"))?;
        let rows = stmt
            .query_map([], row_to_record)
            .map_err(sql("list tokens"))?;
        let mut out = Vec::new();
        for row in rows {
            out.push(row.map_err(sql("list tokens"))?.parse()?);
        }
        Ok(out)
    }

    /// Every revoked fingerprint (start-up re-applies these before attaching).
    pub fn revoked(&self) -> Result<Vec<Fingerprint>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT fingerprint FROM revocations ORDER BY revoked_at, rowid")
            .map_err(sql("list revocations"))?;
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(sql("list revocations"))?;
        let mut out = Vec::new();
        for row in rows {
            let hex = row.map_err(sql("list revocations"))?;
            out.push(hex.parse::<Fingerprint>().map_err(|_| corrupt_fp(&hex))?);
        }
        Ok(out)
    }

    pub fn revocation(&self, fp: &Fingerprint) -> Result<Option<Revocation>, StoreError> {
        self.conn()
            .query_row(
                "SELECT revoked_at, reason, uid FROM revocations WHERE fingerprint = ?1",
                params![fp.to_string()],
                |r| {
                    Ok(Revocation {
                        fingerprint: *fp,
                        revoked_at: r.get(0)?,
                        reason: r.get(1)?,
                        uid: r.get(2)?,
                    })
                },
            )
            .optional()
            .map_err(sql("read revocation"))
    }

    /// The newest `limit` audit entries, newest first.
    pub fn audit(&self, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT id, time, uid, action, fingerprint, detail FROM audit \
                 ORDER BY id DESC LIMIT ?1",
            )
            .map_err(sql("read audit"))?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt
            .query_map(params![limit], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, Option<u32>>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, Option<String>>(4)?,
                    r.get::<_, String>(5)?,
                ))
            })
            .map_err(sql("read audit"))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, time, uid, action, fp, detail) = row.map_err(sql("read audit"))?;
            let fingerprint = match fp {
                Some(s) => Some(s.parse::<Fingerprint>().map_err(|_| corrupt_fp(&s))?),
                None => None,
            };
            out.push(AuditEntry {
                id,
                time,
                uid,
                action: AuditAction::parse(&action)?,
                fingerprint,
                detail,
            });
        }
        Ok(out)
    }
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(|source| StoreError::Open {
            path: path.to_owned(),
            source,
        })?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            path: path.to_owned(),
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    for (from, step) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let to = from as i64 + 1;
        let err = |source| StoreError::Migrate {
            path: path.to_owned(),
            version: to,
            source,
        };
        let tx = conn.transaction().map_err(err)?;
        tx.execute_batch(step).map_err(err)?;
        tx.pragma_update(None, "user_version", to).map_err(err)?;
        tx.commit().map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
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
        assert!(
            matches!(err, StoreError::SchemaTooNew { found, .. } if found == SCHEMA_VERSION + 1)
        );
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
    fn list_filters_expiring_and_idle() {
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

        let active = store.list(&ListFilter::default(), now, None).unwrap();
        let fps: Vec<_> = active.iter().map(|r| r.fingerprint).collect();
        assert_eq!(fps, vec![fp(1), fp(2)]);

        let expiring = ListFilter {
            expiring_within: Some(Duration::from_secs(3_600)),
            ..Default::default()
        };
        let fps: Vec<_> = store
            .list(&expiring, now, None)
            .unwrap()
            .iter()
            .map(|r| r.fingerprint)
            .collect();
        assert_eq!(fps, vec![fp(1)]);

        // Token 1 was seen a minute ago, token 2 never (issued at 1_000).
        let seen = HashMap::from([(fp(1), now - 60)]);
        let idle = ListFilter {
            idle_for: Some(Duration::from_secs(3_600)),
            ..Default::default()
        };
        let fps: Vec<_> = store
            .list(&idle, now, Some(&seen))
            .unwrap()
            .iter()
            .map(|r| r.fingerprint)
            .collect();
        assert_eq!(fps, vec![fp(2)]);

        let all = ListFilter {
            include_inactive: true,
            ..Default::default()
        };
        assert_eq!(store.list(&all, now, None).unwrap().len(), 4);

        assert_eq!(store.mark_expired(now).unwrap(), vec![fp(4)]);
        assert_eq!(
            store.get(&fp(4)).unwrap().unwrap().status,
            TokenStatus::Expired
        );
        assert_eq!(store.active().unwrap().len(), 2);
    }
}
