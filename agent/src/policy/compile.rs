//! Policy files → `CompiledPolicy`, collecting every problem on the way.
//!
//! Contracts and scopes from all files are defined first; tokens are resolved against them
//! afterwards, so a token may reference a contract from another file.
//!
//! Linear in the number of tokens, and incremental: a file is cut where its `[[token]]`
//! tables start (`token_cuts`), and each part is parsed and walked on its own and its
//! document dropped (one `toml_edit` document of a million tokens took gigabytes). A
//! `PolicyCache` keeps each part's result with the text it came from, so a reload
//! re-walks only the parts of a file whose text changed (a changed token: one part).

use std::{collections::HashMap, path::PathBuf};

use agent_common::{
    http::method, Contract, Fingerprint, Scope, TokenInfo, MAX_CONTRACTS, MAX_SCOPES,
    TOKEN_ANY_SCOPE,
};
use toml_edit::{ImDocument, Item};

use super::{
    contract::{to_contract, to_stage},
    diagnostic::{Diagnostic, SourceText},
    parse_fingerprint,
    parts::{parts, token_cuts, CachedFile, Part, PolicyCache},
    toml_walk::{get, Entry, Problem, Span, Walk},
    values::{check_prefix, explicit_stages, penalty, ramp_stages, timestamp},
    CompiledPolicy, StaticToken,
};
use crate::datapath::clock::unix_to_tai_ns;

/// A token whose references wait until every file has defined its contracts and scopes.
/// Spans are relative to the text it was walked in (a part of its file).
#[derive(Debug)]
pub(super) struct PendingToken {
    /// `None` (like the other `Option`s) when already reported as broken; references are
    /// still checked so one run reports them too. With the fingerprint's offset, to point
    /// at it from a duplicate.
    fingerprint: Option<(Fingerprint, usize)>,
    contract: Option<(String, Span)>,
    /// `Some(None)` for `["*"]`.
    scopes: Option<Option<Vec<(String, Span)>>>,
    not_before: i64,
    expires: i64,
    label: Option<String>,
}

/// What walking one text found: tokens and problems, at spans relative to it.
#[derive(Debug, Default)]
pub(super) struct Walked {
    tokens: Vec<PendingToken>,
    problems: Vec<Problem>,
}

/// One file's results: its head (everything before its first `[[token]]` line: contracts,
/// scopes, anything else) and its parts.
#[derive(Debug, Default)]
struct FileResult {
    head: Walked,
    /// The head did not parse: the file defines nothing.
    broken_head: bool,
    parts: Vec<Part>,
}

#[derive(Default)]
struct Compiler {
    contracts: Vec<(String, Contract)>,
    contract_at: HashMap<String, String>,
    scopes: Vec<(String, Scope)>,
    scope_at: HashMap<String, String>,
}

/// Compiles `(path, text)` policy sources, in order, reusing and refreshing `cache`.
pub(super) fn compile(
    sources: &[(PathBuf, String)],
    mut cache: Option<&mut PolicyCache>,
) -> Result<CompiledPolicy, Vec<Diagnostic>> {
    let mut c = Compiler::default();
    // One per file, kept for `finish`: each finds its line starts once.
    let srcs: Vec<SourceText> = sources
        .iter()
        .map(|(path, text)| SourceText::new(path, text))
        .collect();
    let mut results = Vec::with_capacity(srcs.len());
    for src in &srcs {
        let old = cache.as_deref_mut().and_then(|c| c.files.remove(src.path));
        results.push(c.file(src, old));
    }
    let compiled = c.finish(&srcs, &results);
    if let Some(cache) = cache {
        cache.files.clear();
        for ((path, text), result) in sources.iter().zip(results) {
            cache.files.insert(
                path.clone(),
                CachedFile {
                    text: text.clone(),
                    parts: result.parts,
                },
            );
        }
    }
    compiled
}

/// Parses and walks one part (it starts with a `[[token]]` line). None when it holds a
/// table other than tokens.
pub(super) fn walk_part(text: &str) -> Option<Walked> {
    let mut walked = Walked::default();
    let mut w = Walk {
        // Only definitions name locations, and a part holds tokens only.
        src: &SourceText::new(std::path::Path::new(""), text),
        problems: &mut walked.problems,
    };
    match ImDocument::parse(text) {
        Ok(doc) => {
            if doc.as_table().iter().any(|(k, _)| k != "token") {
                return None;
            }
            walked.tokens = walk_tables(&mut w, doc.as_table(), "token", walked_token);
        }
        Err(e) => w.error(e.span(), e.message().trim_end().to_string()),
    }
    Some(walked)
}

/// Calls `handler` for each table of the root's `key` (an array of tables or an inline
/// array of tables) and collects what it returns.
fn walk_tables<T>(
    w: &mut Walk,
    root: &toml_edit::Table,
    key: &'static str,
    mut handler: impl FnMut(&mut Walk, Entry) -> T,
) -> Vec<T> {
    let span = None;
    let entry = Entry {
        table: root,
        span: &span,
        what: "a policy file",
    };
    let Some(value) = get(entry, key) else {
        return Vec::new();
    };
    let Some(tables) = w.tables(key, &value) else {
        return Vec::new();
    };
    tables
        .into_iter()
        .map(|(table, span)| {
            handler(
                w,
                Entry {
                    table,
                    span: &span,
                    what: key,
                },
            )
        })
        .collect()
}

/// A `[[token]]` table, its references unresolved.
fn walked_token(w: &mut Walk, entry: Entry) -> PendingToken {
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
        Some((fp, value.span.as_ref().map_or(0, |s| s.start)))
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
    PendingToken {
        fingerprint,
        contract,
        scopes,
        not_before: not_before.map_or(0, |t| t.0),
        expires: expires.map_or(0, |t| t.0),
        label,
    }
}

/// `span` moved by `base` bytes.
fn shift(span: &Span, base: usize) -> Span {
    span.as_ref().map(|s| s.start + base..s.end + base)
}

impl Compiler {
    /// Walks one file: its head here (contracts and scopes are defined as it goes), its
    /// token parts as `parts` finds them.
    fn file(&mut self, src: &SourceText, old: Option<CachedFile>) -> FileResult {
        let text = src.text;
        let cuts = token_cuts(text);
        let mut parts = match cuts.first() {
            Some(_) => parts(text, &cuts, old, walk_part),
            None => None,
        };
        let mut doc = ImDocument::parse(&text[..parts.as_ref().map_or(text.len(), |_| cuts[0])]);
        // The parts' `[[token]]` tables extend the head's `token`, as within the file, only
        // if that is an array of tables too; if not, the whole file says what is wrong.
        if let (Some(_), Ok(head)) = (&parts, &doc) {
            if head
                .as_table()
                .get("token")
                .is_some_and(|t| !matches!(t, Item::ArrayOfTables(_)))
            {
                parts = None;
                doc = ImDocument::parse(text);
            }
        }
        let mut result = FileResult::default();
        let mut w = Walk {
            src,
            problems: &mut result.head.problems,
        };
        match doc {
            Err(e) => {
                w.error(e.span(), e.message().trim_end().to_string());
                result.broken_head = true;
            }
            Ok(doc) => {
                let root = doc.as_table();
                let span = None;
                w.check_keys(
                    Entry {
                        table: root,
                        span: &span,
                        what: "a policy file",
                    },
                    &["contract", "scope", "token"],
                );
                walk_tables(&mut w, root, "contract", |w, e| self.contract(w, e));
                walk_tables(&mut w, root, "scope", |w, e| self.scope(w, e));
                result.head.tokens = walk_tables(&mut w, root, "token", walked_token);
            }
        }
        result.parts = parts.unwrap_or_default();
        result
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

    fn contract(&mut self, w: &mut Walk, entry: Entry) {
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

    fn scope(&mut self, w: &mut Walk, entry: Entry) {
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

    /// Resolves token references and returns the policy, or every diagnostic in order.
    fn finish(
        self,
        srcs: &[SourceText],
        results: &[FileResult],
    ) -> Result<CompiledPolicy, Vec<Diagnostic>> {
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
        let count: usize = results
            .iter()
            .flat_map(|r| std::iter::once(&r.head).chain(r.parts.iter().map(|p| &p.walked)))
            .map(|w| w.tokens.len())
            .sum();
        let mut diags: Vec<(usize, Diagnostic)> = Vec::new();
        // Where each fingerprint was first listed: (file, offset).
        let mut first_at: HashMap<Fingerprint, (usize, usize)> = HashMap::with_capacity(count);
        let mut tokens = Vec::with_capacity(count);
        for (file, (src, result)) in srcs.iter().zip(results).enumerate() {
            let walked = std::iter::once((0, &result.head))
                .chain(result.parts.iter().map(|p| (p.start, &p.walked)));
            for (base, w) in walked {
                for p in &w.problems {
                    diags.push((file, src.at(shift(&p.span, base), p.message.clone())));
                }
                // A file whose head does not parse defines nothing: its tokens' references
                // would only repeat that.
                if result.broken_head {
                    continue;
                }
                for t in &w.tokens {
                    let mut report = |span: &Span, message: String| {
                        diags.push((file, src.at(shift(span, base), message)));
                    };
                    let fingerprint = t.fingerprint.and_then(|(fp, at)| {
                        use std::collections::hash_map::Entry as Slot;
                        match first_at.entry(fp) {
                            Slot::Occupied(first) => {
                                let (f, a) = *first.get();
                                report(
                                    &Some(at..at),
                                    format!(
                                        "fingerprint {fp} is already listed at {}",
                                        srcs[f].location(a)
                                    ),
                                );
                                None
                            }
                            Slot::Vacant(v) => {
                                v.insert((file, at + base));
                                Some(fp)
                            }
                        }
                    });
                    let mut info = TokenInfo::default();
                    let mut ok = t.scopes.is_some();
                    match &t.contract {
                        Some((name, span)) => match contract_index.get(name.as_str()) {
                            Some(&i) => info.contract = i,
                            None => {
                                report(span, format!("unknown contract `{name}`"));
                                ok = false;
                            }
                        },
                        None => ok = false,
                    }
                    match &t.scopes {
                        None => {}
                        Some(None) => info.flags |= TOKEN_ANY_SCOPE,
                        Some(Some(names)) => {
                            for (name, span) in names {
                                match scope_index.get(name.as_str()) {
                                    Some(&i) => info.scopes |= 1 << i,
                                    None => {
                                        report(span, format!("unknown scope `{name}`"));
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
                    if let (true, Some(fingerprint)) = (ok, fingerprint) {
                        tokens.push(StaticToken {
                            fingerprint,
                            info,
                            label: t.label.clone(),
                        });
                    }
                }
            }
        }
        if !diags.is_empty() {
            diags.sort_by_key(|(file, d)| (*file, d.line, d.col));
            return Err(diags.into_iter().map(|(_, d)| d).collect());
        }
        Ok(CompiledPolicy {
            contracts: self.contracts,
            scopes: self.scopes,
            tokens,
        })
    }
}
