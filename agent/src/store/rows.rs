//! SQL rows to and from the store's types, shared by the `Store` calls.

use agent_common::Fingerprint;
use rusqlite::{params, Connection, OptionalExtension, Row, Transaction};

use super::{sql, unix_now, AuditAction, NewToken, StoreError, TokenRecord, TokenStatus};

pub(super) fn corrupt_fp(s: &str) -> StoreError {
    StoreError::Corrupt {
        what: format!("fingerprint {s:?}"),
    }
}

pub(super) fn row_to_record(row: &Row<'_>) -> rusqlite::Result<RawRecord> {
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

pub(super) const RECORD_COLUMNS: &str =
    "fingerprint, contract, scopes, label, issued_at, not_before, expires_at, rotated_from, status";

/// A row as SQLite holds it, before validation.
pub(super) struct RawRecord {
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
    pub(super) fn parse(self) -> Result<TokenRecord, StoreError> {
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

pub(super) fn get_in(
    conn: &Connection,
    fp: &Fingerprint,
) -> Result<Option<TokenRecord>, StoreError> {
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

pub(super) fn insert_token(
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

pub(super) fn audit_in(
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
