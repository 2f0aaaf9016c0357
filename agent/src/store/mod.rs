//! Durable daemon state in SQLite (`<state_dir>/rampart.db`): issued tokens, revocations and an
//! append-only audit log.
//!
//! Only fingerprints are ever stored, never a plaintext token. Every mutating call commits
//! (WAL, `synchronous=FULL`) before it returns, so a caller that acts on success — e.g. the
//! revocation path, which inserts into the kernel only after this — can rely on the change
//! surviving a crash or restart.

//!
//! - `schema`: the file name, schema version and migrations.
//! - `record`: what the store holds and answers, as Rust types.
//! - `rows`: SQL rows to and from those types (shared by the calls below).

mod record;
mod rows;
mod schema;

use std::{
    collections::HashSet,
    fs::{self, OpenOptions},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use agent_common::Fingerprint;
pub use record::*;
use rows::{audit_in, corrupt_fp, get_in, insert_token, row_to_record, RECORD_COLUMNS};
use rusqlite::{params, Connection, OptionalExtension};
use schema::migrate;
pub use schema::{DB_FILE, SCHEMA_VERSION};

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

    /// One page of the tokens matching `filter` but its idle filter (which needs the
    /// datapath's last-seen times), in the order they were recorded (issue order): at most
    /// `limit`, those recorded after the token `after` if given. One indexed query (the
    /// rowid B-tree), however many tokens there are; the caller pages on from the last
    /// record returned.
    pub fn list_page(
        &self,
        filter: &ListFilter,
        now: i64,
        after: Option<&Fingerprint>,
        limit: usize,
    ) -> Result<Vec<TokenRecord>, StoreError> {
        let conn = self.conn();
        let after_row: i64 = match after {
            None => 0,
            Some(fp) => conn
                .query_row(
                    "SELECT rowid FROM tokens WHERE fingerprint = ?1",
                    [fp.to_string()],
                    |r| r.get(0),
                )
                .optional()
                .map_err(sql("list tokens"))?
                .ok_or_else(|| StoreError::NotFound {
                    fingerprint: fp.to_string(),
                })?,
        };
        let secs = |d: Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
        let expiring_until = filter.expiring_within.map(|d| now.saturating_add(secs(d)));
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {RECORD_COLUMNS} FROM tokens
                 WHERE rowid > ?1
                   AND (?2 OR (status = 'active' AND (expires_at IS NULL OR expires_at > ?3)))
                   AND (?4 IS NULL OR (expires_at > ?3 AND expires_at <= ?4))
                   AND (?5 IS NULL OR contract = ?5)
                 ORDER BY rowid LIMIT ?6"
            ))
            .map_err(sql("list tokens"))?;
        let rows = stmt
            .query_map(
                rusqlite::params![
                    after_row,
                    filter.include_inactive,
                    now,
                    expiring_until,
                    filter.contract,
                    i64::try_from(limit).unwrap_or(i64::MAX),
                ],
                row_to_record,
            )
            .map_err(sql("list tokens"))?;
        let mut out = Vec::with_capacity(limit.min(65536));
        for row in rows {
            out.push(row.map_err(sql("list tokens"))?.parse()?);
        }
        Ok(out)
    }

    /// Every token active at `now` (not revoked, not expired) as the kernel needs it, in
    /// the order they were recorded: `f(fingerprint, contract, scopes as the stored JSON
    /// array, not_before, expires_at)`. Reads only those columns and builds no record:
    /// start-up and reloads resolve a million tokens through this.
    pub fn for_each_active(
        &self,
        now: i64,
        mut f: impl FnMut(Fingerprint, &str, &str, Option<i64>, Option<i64>),
    ) -> Result<(), StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT fingerprint, contract, scopes, not_before, expires_at FROM tokens
                 WHERE status = 'active' AND (expires_at IS NULL OR expires_at > ?1)
                 ORDER BY rowid",
            )
            .map_err(sql("list active tokens"))?;
        let mut rows = stmt.query([now]).map_err(sql("list active tokens"))?;
        while let Some(row) = rows.next().map_err(sql("list active tokens"))? {
            let fp = row.get_ref(0).map_err(sql("list active tokens"))?;
            let fp = fp
                .as_str()
                .map_err(|e| sql("list active tokens")(e.into()))?;
            let fingerprint = fp.parse::<Fingerprint>().map_err(|_| corrupt_fp(fp))?;
            let text = |i: usize| -> Result<&str, StoreError> {
                row.get_ref(i)
                    .and_then(|v| v.as_str().map_err(Into::into))
                    .map_err(sql("list active tokens"))
            };
            f(
                fingerprint,
                text(1)?,
                text(2)?,
                row.get(3).map_err(sql("list active tokens"))?,
                row.get(4).map_err(sql("list active tokens"))?,
            );
        }
        Ok(())
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

    /// The contract names and the scope names that active tokens use, each once: whether
    /// a policy change that drops a name concerns any issued token, without building a
    /// record per token.
    pub fn names_in_use(&self) -> Result<(HashSet<String>, HashSet<String>), StoreError> {
        let conn = self.conn();
        let distinct = |column: &str| -> Result<Vec<String>, StoreError> {
            let mut stmt = conn
                .prepare(&format!(
                    "SELECT DISTINCT {column} FROM tokens WHERE status = 'active'"
                ))
                .map_err(sql("list names in use"))?;
            let rows = stmt
                .query_map([], |r| r.get::<_, String>(0))
                .map_err(sql("list names in use"))?;
            rows.map(|r| r.map_err(sql("list names in use"))).collect()
        };
        let contracts = distinct("contract")?.into_iter().collect();
        let mut scopes = HashSet::new();
        for list in distinct("scopes")? {
            let names: Vec<String> =
                serde_json::from_str(&list).map_err(|e| StoreError::Corrupt {
                    what: format!("a scope list: {e}"),
                })?;
            scopes.extend(names);
        }
        Ok((contracts, scopes))
    }

    fn all_records(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.records_where("1", [])
    }

    /// Active tokens that expire after `now` and no later than `now + window` seconds,
    /// oldest first: SQLite picks them, so the expiry warnings of a few tokens among a
    /// million do not build a million records every time they are checked.
    pub fn expiring(&self, now: i64, window: i64) -> Result<Vec<TokenRecord>, StoreError> {
        self.records_where(
            "status = 'active' AND expires_at > ?1 AND expires_at <= ?2",
            [now, now.saturating_add(window)],
        )
    }

    /// Records matching an SQL condition on the tokens table, oldest first.
    fn records_where<P: rusqlite::Params>(
        &self,
        condition: &str,
        params: P,
    ) -> Result<Vec<TokenRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {RECORD_COLUMNS} FROM tokens WHERE {condition} ORDER BY issued_at, rowid"
            ))
            .map_err(sql("list tokens"))?;
        let rows = stmt
            .query_map(params, row_to_record)
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

#[cfg(test)]
mod tests;
