//! `rampart token import` and `export`: issued tokens as JSON lines, one token a line.
//!
//! ```json
//! {"fingerprint":"0123456789abcdef0123456789abcdef","contract":"partner","scopes":["orders-read"],"not_before":"2026-01-01T00:00:00Z","expires":"2026-12-01T00:00:00Z","label":"acme"}
//! ```
//!
//! `fingerprint`, `contract` and `scopes` are required; the rest may be absent or null.
//! Only fingerprints travel, never a token: an import brings in tokens whose plaintext
//! lives elsewhere (e.g. another gateway), and an export holds nothing that authenticates.
//!
//! An import is atomic: every line is parsed and resolved against the policy first, then
//! all tokens are recorded in one SQLite transaction, then installed into the kernel in
//! batches. A bad line refuses the whole file, with its line number, and nothing is
//! recorded or installed. Messages never echo a value from the file: a token pasted by
//! mistake must not reach a terminal or a log.

use std::time::{Duration, UNIX_EPOCH};

use agent_common::Fingerprint;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{
    error_chain,
    policy::units::parse_timestamp,
    store::{unix_now, NewToken, StoreError, TokenRecord},
    token::{token_info, EnforceError, Lifecycle, Resolve},
};

/// One token as a line of an import or export file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenLine {
    pub fingerprint: String,
    pub contract: String,
    pub scopes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("line {line}: {message}; nothing was imported")]
    Line { line: usize, message: String },
    #[error("recording the tokens; nothing was imported")]
    Store(#[source] StoreError),
    #[error(
        "the tokens are recorded, but installing them in the kernel failed (a restart or \
         reload installs them)"
    )]
    Install(#[source] EnforceError),
}

fn line_err(line: usize, message: impl Into<String>) -> ImportError {
    ImportError::Line {
        line,
        message: message.into(),
    }
}

/// An RFC 3339 UTC time as Unix seconds.
fn time_field(
    obj: &Map<String, Value>,
    key: &str,
    line: usize,
) -> Result<Option<i64>, ImportError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        // Not `parse_timestamp`'s message: it quotes the value.
        Some(Value::String(s)) => parse_timestamp(s).map(Some).map_err(|_| {
            line_err(
                line,
                format!("`{key}` must be a UTC RFC 3339 time like \"2026-12-01T00:00:00Z\""),
            )
        }),
        Some(_) => Err(line_err(
            line,
            format!("`{key}` must be a UTC RFC 3339 time like \"2026-12-01T00:00:00Z\""),
        )),
    }
}

fn string_field(obj: &Map<String, Value>, key: &str, line: usize) -> Result<String, ImportError> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        None => Err(line_err(line, format!("missing `{key}`"))),
        Some(_) => Err(line_err(line, format!("`{key}` must be a string"))),
    }
}

/// Parses one line (1-based `line`, for messages) into a token to record.
fn parse_line(text: &str, line: usize, issued_at: i64) -> Result<NewToken, ImportError> {
    // Parsed as a generic value first: serde's own messages quote the offending value.
    let value: Value = serde_json::from_str(text).map_err(|e| {
        line_err(
            line,
            format!(
                "not a JSON object ({:?} error at column {})",
                e.classify(),
                e.column()
            ),
        )
    })?;
    let Value::Object(obj) = value else {
        return Err(line_err(line, "not a JSON object"));
    };
    const KEYS: [&str; 6] = [
        "fingerprint",
        "contract",
        "scopes",
        "not_before",
        "expires",
        "label",
    ];
    if let Some(k) = obj.keys().find(|k| !KEYS.contains(&k.as_str())) {
        let shown: String = k.chars().take(40).collect();
        return Err(line_err(
            line,
            format!("unknown field {shown:?} (expected {})", KEYS.join(", ")),
        ));
    }
    let fingerprint = string_field(&obj, "fingerprint", line)?
        .parse::<Fingerprint>()
        .map_err(|_| {
            line_err(
                line,
                "`fingerprint` must be 32 hex digits (what `rampart fingerprint` prints; \
                 never the token itself)",
            )
        })?;
    let contract = string_field(&obj, "contract", line)?;
    let scopes = match obj.get("scopes") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| line_err(line, "`scopes` must be a list of strings"))?,
        None => return Err(line_err(line, "missing `scopes`")),
        Some(_) => return Err(line_err(line, "`scopes` must be a list of strings")),
    };
    let not_before = time_field(&obj, "not_before", line)?;
    let expires_at = time_field(&obj, "expires", line)?;
    if let (Some(nb), Some(exp)) = (not_before, expires_at) {
        if exp <= nb {
            return Err(line_err(line, "`expires` must be later than `not_before`"));
        }
    }
    let label = match obj.get("label") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(line_err(line, "`label` must be a string")),
    };
    Ok(NewToken {
        fingerprint,
        contract,
        scopes,
        label,
        issued_at,
        not_before,
        expires_at,
    })
}

/// Imports the JSON lines of `text` (blank lines are skipped): all of them, or none.
/// Returns how many tokens were imported.
pub fn import(
    lc: &Lifecycle,
    policy: &dyn Resolve,
    text: &str,
    uid: u32,
) -> Result<usize, ImportError> {
    let now = unix_now();
    let mut tokens = Vec::new();
    let mut lines = Vec::new();
    let mut infos = Vec::new();
    let mut seen = std::collections::HashMap::new();
    for (i, l) in text.lines().enumerate() {
        let line = i + 1;
        if l.trim().is_empty() {
            continue;
        }
        let t = parse_line(l, line, now)?;
        if let Some(first) = seen.insert(t.fingerprint, line) {
            return Err(line_err(
                line,
                format!("fingerprint {} is already on line {first}", t.fingerprint),
            ));
        }
        let grant = policy
            .resolve(&t.contract, &t.scopes)
            .map_err(|e| line_err(line, error_chain(&e)))?;
        let rec = TokenRecord {
            fingerprint: t.fingerprint,
            contract: t.contract.clone(),
            scopes: t.scopes.clone(),
            label: t.label.clone(),
            issued_at: t.issued_at,
            not_before: t.not_before,
            expires_at: t.expires_at,
            rotated_from: None,
            status: crate::store::TokenStatus::Active,
        };
        // Expired on arrival: recorded (the export said so), not worth a kernel entry.
        if t.expires_at.is_none_or(|e| e > now) {
            infos.push((t.fingerprint, token_info(&rec, grant)));
        }
        tokens.push(t);
        lines.push(line);
    }
    lc.store().import(&tokens, uid).map_err(|(i, e)| match e {
        StoreError::Duplicate { fingerprint } => {
            line_err(lines[i], format!("token {fingerprint} is already recorded"))
        }
        e => ImportError::Store(e),
    })?;
    let n = tokens.len();
    lc.enforcer()
        .install_many(infos)
        .map_err(ImportError::Install)?;
    Ok(n)
}

fn rfc3339(unix: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_secs(unix.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The active tokens as export lines, oldest first.
pub fn export(lc: &Lifecycle) -> Result<Vec<TokenLine>, StoreError> {
    Ok(lc
        .store()
        .active()?
        .into_iter()
        .map(|r| TokenLine {
            fingerprint: r.fingerprint.to_string(),
            contract: r.contract,
            scopes: r.scopes,
            not_before: r.not_before.map(rfc3339),
            expires: r.expires_at.map(rfc3339),
            label: r.label,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use std::{
        path::Path,
        sync::{Arc, Mutex},
    };

    use agent_common::{Fingerprint, FingerprintKey, TokenInfo};

    use super::*;
    use crate::{
        policy::CompiledPolicy,
        store::Store,
        token::{Enforcer, TokenRuntime},
    };

    const POLICY: &str = r#"
[[contract]]
name = "standard"
stages = [{ after = "0s", rate = 10, burst = 5 }]

[[scope]]
name = "read"
methods = ["GET"]
prefix = "/v1/"
"#;

    /// Records what reaches the kernel, and in how many calls.
    #[derive(Default)]
    struct Kernel {
        installed: Mutex<Vec<(Fingerprint, TokenInfo)>>,
        calls: Mutex<usize>,
    }

    impl Enforcer for Kernel {
        fn install(&self, fp: Fingerprint, info: TokenInfo) -> Result<(), EnforceError> {
            self.installed.lock().unwrap().push((fp, info));
            Ok(())
        }
        fn revoke(&self, _fp: Fingerprint) -> Result<(), EnforceError> {
            Ok(())
        }
        fn runtime(&self, _fp: Fingerprint) -> Option<TokenRuntime> {
            None
        }
        fn install_many(&self, t: Vec<(Fingerprint, TokenInfo)>) -> Result<(), EnforceError> {
            *self.calls.lock().unwrap() += 1;
            self.installed.lock().unwrap().extend(t);
            Ok(())
        }
    }

    fn setup(dir: &Path) -> (Lifecycle, Arc<Kernel>, CompiledPolicy) {
        let kernel = Arc::new(Kernel::default());
        let store = Arc::new(Store::open(dir).unwrap());
        let lc = Lifecycle::new(store, kernel.clone(), FingerprintKey([1, 2]));
        let policy = CompiledPolicy::from_str(POLICY, Path::new("p.toml")).unwrap();
        (lc, kernel, policy)
    }

    fn lines(n: usize) -> String {
        (0..n)
            .map(|i| {
                format!(
                    "{{\"fingerprint\":\"{:032x}\",\"contract\":\"standard\",\"scopes\":[\"read\"],\
                     \"expires\":\"2099-01-01T00:00:00Z\",\"label\":\"client {i}\"}}\n",
                    i + 1
                )
            })
            .collect()
    }

    #[test]
    fn an_export_imports_into_another_daemon_as_it_was() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (lc, kernel, policy) = setup(a.path());
        assert_eq!(import(&lc, &policy, &lines(1000), 0).unwrap(), 1000);
        assert_eq!(kernel.installed.lock().unwrap().len(), 1000);
        assert_eq!(*kernel.calls.lock().unwrap(), 1, "one batched install");
        let exported: String = export(&lc)
            .unwrap()
            .iter()
            .map(|t| serde_json::to_string(t).unwrap() + "\n")
            .collect();
        assert_eq!(exported, lines(1000));
        let first: TokenLine = serde_json::from_str(exported.lines().next().unwrap()).unwrap();
        assert_eq!(first.expires.as_deref(), Some("2099-01-01T00:00:00Z"));

        let (lc2, kernel2, policy2) = setup(b.path());
        assert_eq!(import(&lc2, &policy2, &exported, 0).unwrap(), 1000);
        assert_eq!(kernel2.installed.lock().unwrap().len(), 1000);
        let again: Vec<TokenLine> = export(&lc2).unwrap();
        assert_eq!(again, export(&lc).unwrap());
    }

    #[test]
    fn a_bad_line_is_named_and_nothing_is_imported() {
        let dir = tempfile::tempdir().unwrap();
        let (lc, kernel, policy) = setup(dir.path());
        let good = lines(5);
        let mut text: Vec<&str> = good.lines().collect();
        let cases = [
            (
                "{\"fingerprint\":\"rmp_notafingerprint\",\"contract\":\"standard\",\"scopes\":[\"read\"]}",
                "line 3: `fingerprint` must be 32 hex digits",
            ),
            (
                "{\"fingerprint\":\"000000000000000000000000000000ff\",\"contract\":\"gold\",\"scopes\":[\"read\"]}",
                "line 3: contract \"gold\" with scopes [\"read\"] does not resolve",
            ),
            (
                "{\"fingerprint\":\"000000000000000000000000000000ff\",\"contract\":\"standard\"}",
                "line 3: missing `scopes`",
            ),
            ("not json", "line 3: not a JSON object"),
        ];
        for (bad, want) in cases {
            text.insert(2, bad);
            let e = import(&lc, &policy, &(text.join("\n") + "\n"), 0).unwrap_err();
            let shown = error_chain(&e);
            assert!(shown.contains(want), "{shown}");
            assert!(shown.contains("nothing was imported"), "{shown}");
            assert!(
                !shown.contains("rmp_"),
                "the error echoes a value from the file"
            );
            text.remove(2);
        }
        // A fingerprint the store already has: named by line, and the whole file refused.
        import(&lc, &policy, text[3], 0).unwrap();
        let e = import(&lc, &policy, &(text.join("\n") + "\n"), 0).unwrap_err();
        assert!(
            error_chain(&e).contains(&format!("line 4: token {:032x} is already recorded", 4)),
            "{}",
            error_chain(&e)
        );
        assert_eq!(export(&lc).unwrap().len(), 1, "only the one imported alone");
        assert_eq!(kernel.installed.lock().unwrap().len(), 1);
    }
}
