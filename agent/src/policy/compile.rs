//! Policy files → `CompiledPolicy`, collecting every problem on the way.
//!
//! Contracts and scopes from all files are defined first; tokens are resolved against them
//! afterwards, so a token may reference a contract from another file.

use std::{collections::HashMap, path::PathBuf};

use agent_common::{
    http::method, Contract, Fingerprint, Scope, TokenInfo, MAX_CONTRACTS, MAX_SCOPES,
    TOKEN_ANY_SCOPE,
};
use toml_edit::ImDocument;

use super::{
    contract::{to_contract, to_stage},
    diagnostic::{Diagnostic, SourceText},
    parse_fingerprint,
    toml_walk::{get, Entry, Span, Walk},
    values::{check_prefix, explicit_stages, penalty, ramp_stages, timestamp},
    CompiledPolicy, StaticToken,
};
use crate::datapath::clock::unix_to_tai_ns;

/// A token whose references wait until every file has defined its contracts and scopes.
struct PendingToken {
    file: usize,
    /// `None` (like the other `Option`s) when already reported as broken; references are
    /// still checked so one run reports them too.
    fingerprint: Option<Fingerprint>,
    contract: Option<(String, Span)>,
    /// `Some(None)` for `["*"]`.
    scopes: Option<Option<Vec<(String, Span)>>>,
    not_before: i64,
    expires: i64,
    label: Option<String>,
}

#[derive(Default)]
struct Compiler {
    /// (file index, diagnostic), sorted by position at the end.
    diags: Vec<(usize, Diagnostic)>,
    contracts: Vec<(String, Contract)>,
    contract_at: HashMap<String, String>,
    scopes: Vec<(String, Scope)>,
    scope_at: HashMap<String, String>,
    tokens: Vec<PendingToken>,
    fingerprint_at: HashMap<Fingerprint, String>,
}

/// Compiles `(path, text)` policy sources, in order.
pub(super) fn compile(sources: &[(PathBuf, String)]) -> Result<CompiledPolicy, Vec<Diagnostic>> {
    let mut c = Compiler::default();
    // One per file, kept for `finish`: each finds its line starts once.
    let srcs: Vec<SourceText> = sources
        .iter()
        .map(|(path, text)| SourceText::new(path, text))
        .collect();
    for (file, src) in srcs.iter().enumerate() {
        let mut diags = Vec::new();
        c.file(
            file,
            Walk {
                src,
                diags: &mut diags,
            },
        );
        c.diags.extend(diags.into_iter().map(|d| (file, d)));
    }
    c.finish(&srcs)
}

impl Compiler {
    fn file(&mut self, file: usize, mut w: Walk<'_, '_>) {
        let doc = match ImDocument::parse(w.src.text) {
            Ok(doc) => doc,
            Err(e) => {
                w.error(e.span(), e.message().trim_end().to_string());
                return;
            }
        };
        let root = doc.as_table();
        let span = None;
        let entry = Entry {
            table: root,
            span: &span,
            what: "a policy file",
        };
        w.check_keys(entry, &["contract", "scope", "token"]);
        for (key, handler) in [
            (
                "contract",
                Compiler::contract as fn(&mut Compiler, &mut Walk, Entry, usize),
            ),
            ("scope", Compiler::scope),
            ("token", Compiler::token),
        ] {
            let Some(value) = get(entry, key) else {
                continue;
            };
            let Some(tables) = w.tables(key, &value) else {
                continue;
            };
            for (table, span) in tables {
                let entry = Entry {
                    table,
                    span: &span,
                    what: key,
                };
                handler(self, &mut w, entry, file);
            }
        }
    }

    /// A definition's `name`: present, well-formed and not defined before (in any file).
    fn name(w: &mut Walk, entry: Entry, defined: &mut HashMap<String, String>) -> Option<String> {
        let value = w.require(entry, "name")?;
        let name = w.string("name", &value)?;
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            w.error(
                value.span,
                format!(
                    "invalid {} name `{name}`: use 1 to 64 letters, digits, '-', '_' or '.'",
                    entry.what
                ),
            );
            return None;
        }
        let here = w.src.location(value.span.as_ref().map_or(0, |s| s.start));
        if let Some(first) = defined.get(name) {
            w.error(
                value.span,
                format!("{} `{name}` is already defined at {first}", entry.what),
            );
            return None;
        }
        defined.insert(name.to_string(), here);
        Some(name.to_string())
    }

    fn contract(&mut self, w: &mut Walk, entry: Entry, _file: usize) {
        w.check_keys(entry, &["name", "stages", "ramp", "penalty"]);
        let name = Self::name(w, entry, &mut self.contract_at);
        let what = match &name {
            Some(n) => format!("contract `{n}`"),
            None => "contract".to_string(),
        };
        let stages = match (get(entry, "stages"), get(entry, "ramp")) {
            (Some(_), Some(ramp)) => {
                w.error(
                    ramp.span,
                    format!("{what} sets both `stages` and `ramp`; keep one"),
                );
                None
            }
            (None, None) => {
                w.error(
                    entry.span.clone(),
                    format!("{what} needs `stages` or `ramp`"),
                );
                None
            }
            (Some(stages), None) => explicit_stages(w, &what, &stages),
            (None, Some(ramp)) => ramp_stages(w, &ramp),
        };
        let penalty = get(entry, "penalty").and_then(|p| penalty(w, &p, stages.as_deref()));
        // A stage that fails here is reported; the policy is refused, so the rest is moot.
        let stages = stages.map(|specs| {
            let mut out = Vec::new();
            for (spec, span) in specs {
                match to_stage(&spec) {
                    Ok(stage) => out.push(stage),
                    Err(message) => w.error(span, message),
                }
            }
            out
        });
        if self.contracts.len() == MAX_CONTRACTS as usize {
            w.error(
                entry.span.clone(),
                format!("more than {MAX_CONTRACTS} contracts"),
            );
        }
        // Defined even when broken, so tokens referencing it do not add "unknown contract".
        if let Some(name) = name {
            let contract = match stages {
                Some(stages) => to_contract(&stages, penalty),
                None => Contract::default(),
            };
            self.contracts.push((name, contract));
        }
    }

    fn scope(&mut self, w: &mut Walk, entry: Entry, _file: usize) {
        w.check_keys(entry, &["name", "methods", "prefix"]);
        let name = Self::name(w, entry, &mut self.scope_at);
        let what = match &name {
            Some(n) => format!("scope `{n}`"),
            None => "scope".to_string(),
        };
        let mut scope = Scope::default();
        match get(entry, "methods") {
            None => w.error(
                entry.span.clone(),
                format!("{what} has no `methods` (like [\"GET\"], or [\"*\"] for every method)"),
            ),
            Some(value) => {
                if let Some(list) = w.strings("methods", &value) {
                    if list.is_empty() {
                        w.error(
                            value.span.clone(),
                            format!("{what} has no methods (like [\"GET\"], or [\"*\"] for every method)"),
                        );
                    }
                    for (m, span) in list {
                        if m == "*" {
                            scope.methods |= method::ALL;
                        } else if let Some(bit) = method::from_name(m) {
                            scope.methods |= bit;
                        } else {
                            let names: Vec<&str> = method::NAMES.iter().map(|(n, _)| *n).collect();
                            w.error(
                                span,
                                format!(
                                    "unknown method `{m}`: use {} (upper case) or \"*\"",
                                    names.join(", ")
                                ),
                            );
                        }
                    }
                }
            }
        }
        match get(entry, "prefix") {
            None => w.error(
                entry.span.clone(),
                format!("{what} has no `prefix` (the request path it covers, like \"/\")"),
            ),
            Some(value) => {
                if let Some(prefix) = w.string("prefix", &value) {
                    if let Err(message) = check_prefix(prefix) {
                        w.error(value.span, message);
                    } else {
                        scope.prefix[..prefix.len()].copy_from_slice(prefix.as_bytes());
                        scope.prefix_len = prefix.len() as u32;
                    }
                }
            }
        }
        if self.scopes.len() == MAX_SCOPES {
            w.error(
                entry.span.clone(),
                format!("more than {MAX_SCOPES} scopes (a token's scopes are a 64-bit set)"),
            );
        }
        if let Some(name) = name {
            self.scopes.push((name, scope));
        }
    }

    fn token(&mut self, w: &mut Walk, entry: Entry, file: usize) {
        w.check_keys(
            entry,
            &[
                "fingerprint",
                "contract",
                "scopes",
                "not_before",
                "expires",
                "label",
            ],
        );
        let fingerprint = w.require(entry, "fingerprint").and_then(|value| {
            let text = w.string("fingerprint", &value)?;
            // Never echo the value: a token pasted here by mistake must not reach a log.
            let Some(fp) = parse_fingerprint(text) else {
                w.error(
                    value.span,
                    "fingerprint must be 32 lowercase hex digits (what `rampart fingerprint` \
                     prints; never the token itself)",
                );
                return None;
            };
            let here = w.src.location(value.span.as_ref().map_or(0, |s| s.start));
            if let Some(first) = self.fingerprint_at.get(&fp) {
                w.error(
                    value.span,
                    format!("fingerprint {} is already listed at {first}", fp),
                );
                return None;
            }
            self.fingerprint_at.insert(fp, here);
            Some(fp)
        });
        let contract = w.require(entry, "contract").and_then(|value| {
            let name = w.string("contract", &value)?;
            Some((name.to_string(), value.span))
        });
        let scopes = w.require(entry, "scopes").and_then(|value| {
            let list = w.strings("scopes", &value)?;
            if list.is_empty() {
                w.error(
                    value.span,
                    "token has no scopes: list scope names, or [\"*\"] for every scope",
                );
                return None;
            }
            if list.iter().any(|(s, _)| *s == "*") {
                if list.len() > 1 {
                    w.error(
                        value.span,
                        "\"*\" already grants every scope; list it alone",
                    );
                }
                return Some(None);
            }
            Some(Some(
                list.into_iter()
                    .map(|(s, span)| (s.to_string(), span))
                    .collect::<Vec<_>>(),
            ))
        });
        let not_before = get(entry, "not_before").and_then(|v| timestamp(w, "not_before", &v));
        let expires = get(entry, "expires").and_then(|v| timestamp(w, "expires", &v));
        if let (Some((nb, _)), Some((exp, span))) = (&not_before, &expires) {
            if exp <= nb {
                w.error(span.clone(), "`expires` must be later than `not_before`");
            }
        }
        let label = get(entry, "label").and_then(|v| w.string("label", &v).map(str::to_string));
        self.tokens.push(PendingToken {
            file,
            fingerprint,
            contract,
            scopes,
            not_before: not_before.map_or(0, |t| t.0),
            expires: expires.map_or(0, |t| t.0),
            label,
        });
    }

    /// Resolves token references and returns the policy, or every diagnostic in order.
    fn finish(mut self, srcs: &[SourceText]) -> Result<CompiledPolicy, Vec<Diagnostic>> {
        let contract_index: HashMap<&str, u32> = self
            .contracts
            .iter()
            .enumerate()
            .map(|(i, (n, _))| (n.as_str(), i as u32))
            .collect();
        let scope_index: HashMap<&str, u32> = self
            .scopes
            .iter()
            .enumerate()
            .map(|(i, (n, _))| (n.as_str(), i as u32))
            .collect();
        let mut tokens = Vec::new();
        for t in std::mem::take(&mut self.tokens) {
            let src = &srcs[t.file];
            let mut info = TokenInfo::default();
            let mut ok = t.fingerprint.is_some() && t.scopes.is_some();
            if let Some((name, span)) = &t.contract {
                match contract_index.get(name.as_str()) {
                    Some(&i) => info.contract = i,
                    None => {
                        self.diags.push((
                            t.file,
                            src.at(span.clone(), format!("unknown contract `{name}`")),
                        ));
                        ok = false;
                    }
                }
            } else {
                ok = false;
            }
            match &t.scopes {
                None => {}
                Some(None) => info.flags |= TOKEN_ANY_SCOPE,
                Some(Some(names)) => {
                    for (name, span) in names {
                        match scope_index.get(name.as_str()) {
                            Some(&i) => info.scopes |= 1 << i,
                            None => {
                                self.diags.push((
                                    t.file,
                                    src.at(span.clone(), format!("unknown scope `{name}`")),
                                ));
                                ok = false;
                            }
                        }
                    }
                }
            }
            if t.not_before != 0 {
                info.not_before_ns = unix_to_tai_ns(t.not_before);
            }
            if t.expires != 0 {
                info.expires_ns = unix_to_tai_ns(t.expires);
            }
            if let (true, Some(fingerprint)) = (ok, t.fingerprint) {
                tokens.push(StaticToken {
                    fingerprint,
                    info,
                    label: t.label,
                });
            }
        }
        if !self.diags.is_empty() {
            self.diags.sort_by_key(|(file, d)| (*file, d.line, d.col));
            return Err(self.diags.into_iter().map(|(_, d)| d).collect());
        }
        Ok(CompiledPolicy {
            contracts: self.contracts,
            scopes: self.scopes,
            tokens,
        })
    }
}
