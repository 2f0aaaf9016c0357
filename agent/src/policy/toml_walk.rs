//! Typed, located reads from a parsed TOML document that record problems instead of
//! stopping at the first, so one `rampart check` run reports every mistake.
//!
//! Policy files are walked with `toml_edit` rather than serde: serde stops at the first
//! type error, and an operator fixing a policy wants the whole list.

use std::ops::Range;

use toml_edit::{Item, TableLike, Value};

use super::diagnostic::SourceText;

pub(crate) type Span = Option<Range<usize>>;

/// A problem at a byte span of the text walked (`None`: the file as a whole). It becomes a
/// `file:line:col` diagnostic only when reported: a part of a file walked once keeps its
/// problems across reloads while the text before it changes length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Problem {
    pub span: Span,
    pub message: String,
}

/// Where problems go while one text (a file, or one part of it) is walked. Spans are
/// relative to that text.
pub(crate) struct Walk<'s, 'd> {
    /// The file, for the locations of earlier definitions ("already defined at ..."):
    /// only the part of a file that starts it defines contracts and scopes.
    pub src: &'s SourceText<'s>,
    pub problems: &'d mut Vec<Problem>,
}

/// One table (`[[contract]]`, `{ after = .. }`, ...) being read, with what it is called
/// in messages.
#[derive(Clone, Copy)]
pub(crate) struct Entry<'t> {
    pub table: &'t dyn TableLike,
    pub span: &'t Span,
    pub what: &'static str,
}

/// A value and where it is.
pub(crate) struct Located<'t> {
    pub item: &'t Item,
    pub span: Span,
}

impl Walk<'_, '_> {
    pub fn error(&mut self, span: Span, message: impl Into<String>) {
        self.problems.push(Problem {
            span,
            message: message.into(),
        });
    }

    /// Reports keys outside `allowed`, at the key.
    pub fn check_keys(&mut self, entry: Entry<'_>, allowed: &[&str]) {
        for (key, _) in entry.table.iter() {
            if !allowed.contains(&key) {
                let span = entry.table.key(key).and_then(|k| k.span());
                self.error(
                    span,
                    format!(
                        "unknown key `{key}` in {} (expected {})",
                        entry.what,
                        one_of(allowed)
                    ),
                );
            }
        }
    }

    /// A key's value, or a "missing" error at the table.
    pub fn require<'t>(&mut self, entry: Entry<'t>, key: &str) -> Option<Located<'t>> {
        let found = get(entry, key);
        if found.is_none() {
            self.error(
                entry.span.clone(),
                format!("{} is missing `{key}`", entry.what),
            );
        }
        found
    }

    /// A string value, or a type error at the value.
    pub fn string<'t>(&mut self, key: &str, value: &Located<'t>) -> Option<&'t str> {
        let s = value.item.as_str();
        if s.is_none() {
            self.error(value.span.clone(), format!("`{key}` must be a string"));
        }
        s
    }

    /// A list of strings with their spans; type errors reported per element.
    pub fn strings<'t>(&mut self, key: &str, value: &Located<'t>) -> Option<Vec<(&'t str, Span)>> {
        let Some(array) = value.item.as_array() else {
            self.error(
                value.span.clone(),
                format!("`{key}` must be a list of strings"),
            );
            return None;
        };
        let mut out = Vec::new();
        for v in array.iter() {
            match v.as_str() {
                Some(s) => out.push((s, v.span())),
                None => self.error(v.span(), format!("`{key}` must be a list of strings")),
            }
        }
        Some(out)
    }

    /// An integer within `range`, with `what` naming it in messages.
    pub fn integer(&mut self, key: &str, value: &Located<'_>) -> Option<i64> {
        let n = value.item.as_integer();
        if n.is_none() {
            self.error(value.span.clone(), format!("`{key}` must be an integer"));
        }
        n
    }

    /// The tables of an array of tables (`[[x]]`) or of an inline array (`x = [{..}]`).
    pub fn tables<'t>(
        &mut self,
        key: &str,
        value: &Located<'t>,
    ) -> Option<Vec<(&'t dyn TableLike, Span)>> {
        match value.item {
            Item::ArrayOfTables(array) => Some(
                array
                    .iter()
                    .map(|t| (t as &dyn TableLike, table_span(t, t.span())))
                    .collect(),
            ),
            Item::Value(Value::Array(array)) => {
                let mut out = Vec::new();
                for v in array.iter() {
                    match v.as_inline_table() {
                        Some(t) => out.push((t as &dyn TableLike, v.span())),
                        None => {
                            self.error(v.span(), format!("each entry of `{key}` must be a table"))
                        }
                    }
                }
                Some(out)
            }
            _ => {
                self.error(
                    value.span.clone(),
                    format!(
                        "`{key}` must be a list of tables (`[[{key}]]` or `{key} = [{{ .. }}]`)"
                    ),
                );
                None
            }
        }
    }

    /// A sub-table (`ramp = { .. }` or `[contract.ramp]`).
    pub fn table<'t>(&mut self, key: &str, value: &Located<'t>) -> Option<&'t dyn TableLike> {
        let t = value.item.as_table_like();
        if t.is_none() {
            self.error(value.span.clone(), format!("`{key}` must be a table"));
        }
        t
    }
}

/// A key's value and its span (the key's when the value has none).
pub(crate) fn get<'t>(entry: Entry<'t>, key: &str) -> Option<Located<'t>> {
    let (k, item) = entry.table.get_key_value(key)?;
    Some(Located {
        item,
        span: item.span().or_else(|| k.span()),
    })
}

/// Headers of `[[x]]` tables are not always spanned; fall back to the first key.
fn table_span(table: &dyn TableLike, span: Span) -> Span {
    span.or_else(|| {
        table
            .iter()
            .next()
            .and_then(|(k, _)| table.key(k).and_then(|k| k.span()))
    })
}

/// "`a`, `b` or `c`".
pub(crate) fn one_of(names: &[&str]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
    match quoted.split_last() {
        None => String::new(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
    }
}
