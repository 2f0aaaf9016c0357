//! The database file and its schema: `PRAGMA user_version` and the migrations that reach it.

use std::path::Path;

use rusqlite::Connection;

use super::StoreError;

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

pub(super) fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
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
