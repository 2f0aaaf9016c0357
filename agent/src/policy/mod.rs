//! Version-controlled policy: ramp contracts, scopes and static tokens, in TOML files.
//!
//! ```toml
//! [[contract]]
//! name = "partner"
//! stages = [{ after = "0s", rate = 5, burst = 10 }, { after = "10m", rate = "0.5", burst = 2 }]
//!
//! [[contract]]
//! name = "bulk"
//! ramp = { start = 500, growth = "50%", step = "5m", cap = 5000, burst = 50 }
//! penalty = { demote = 1, cooldown = "10m" }
//!
//! [[scope]]
//! name = "orders-read"
//! methods = ["GET", "HEAD"]
//! prefix = "/v1/orders"
//!
//! [[token]]
//! fingerprint = "0123456789abcdef0123456789abcdef"
//! contract = "partner"
//! scopes = ["orders-read"]   # or ["*"]
//! expires = "2026-12-01T00:00:00Z"
//! ```
//!
//! Several files merge into one `CompiledPolicy`; every problem in all of them is reported
//! as a `Diagnostic` (`file:line:col: message`), not only the first.

mod compile;
pub mod contract;
mod diagnostic;
mod parts;
mod toml_walk;
pub mod units;
mod values;

use std::{
    fmt,
    path::{Path, PathBuf},
};

use agent_common::{Contract, Fingerprint, Scope, TokenInfo, TOKEN_ANY_SCOPE};
pub use diagnostic::Diagnostic;
pub(crate) use diagnostic::SourceText;
pub use parts::PolicyCache;

/// What the policy files say, in datapath form. Indexes into `contracts` and `scopes` are
/// the indexes of the `CONTRACTS` and `SCOPES` maps.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CompiledPolicy {
    pub contracts: Vec<(String, Contract)>,
    pub scopes: Vec<(String, Scope)>,
    pub tokens: Vec<StaticToken>,
}

/// A token listed in a policy file by fingerprint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StaticToken {
    pub fingerprint: Fingerprint,
    pub info: TokenInfo,
    pub label: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("unknown contract `{name}`")]
    UnknownContract { name: String },
    #[error("unknown scope `{name}`")]
    UnknownScope { name: String },
    #[error("no scopes given: name at least one scope, or \"*\" for every scope")]
    NoScopes,
    #[error("\"*\" already grants every scope; give it alone")]
    WildcardWithNames,
    #[error("{}", Diagnostics(.diagnostics))]
    Invalid { diagnostics: Vec<Diagnostic> },
}

impl From<Vec<Diagnostic>> for PolicyError {
    fn from(diagnostics: Vec<Diagnostic>) -> Self {
        PolicyError::Invalid { diagnostics }
    }
}

/// One diagnostic per line.
struct Diagnostics<'a>(&'a [Diagnostic]);

impl fmt::Display for Diagnostics<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl CompiledPolicy {
    /// Reads and compiles policy files in order. Unreadable files are diagnostics too, so
    /// `rampart check` lists them with everything else.
    pub fn load(paths: &[PathBuf]) -> Result<CompiledPolicy, Vec<Diagnostic>> {
        Self::load_cached(paths, None)
    }

    /// `load`, re-walking only what changed since `cache` was filled (the daemon's reloads),
    /// and refilling it.
    pub fn load_cached(
        paths: &[PathBuf],
        cache: Option<&mut PolicyCache>,
    ) -> Result<CompiledPolicy, Vec<Diagnostic>> {
        let mut sources = Vec::new();
        let mut unreadable = Vec::new();
        for path in paths {
            match std::fs::read_to_string(path) {
                Ok(text) => sources.push((path.clone(), text)),
                Err(e) => unreadable.push(Diagnostic::whole_file(
                    path,
                    format!("cannot read policy file: {e}"),
                )),
            }
        }
        match compile::compile(&sources, cache) {
            Ok(policy) if unreadable.is_empty() => Ok(policy),
            Ok(_) => Err(unreadable),
            Err(mut diags) => {
                unreadable.append(&mut diags);
                Err(unreadable)
            }
        }
    }

    /// Compiles `(path, text)` sources in order; `path` only names them in diagnostics.
    pub fn from_sources(sources: &[(PathBuf, String)]) -> Result<CompiledPolicy, Vec<Diagnostic>> {
        compile::compile(sources, None)
    }

    /// One policy file's text (tests, tools).
    pub fn from_str(text: &str, path: &Path) -> Result<CompiledPolicy, Vec<Diagnostic>> {
        Self::from_sources(&[(path.to_path_buf(), text.to_string())])
    }

    /// The `CONTRACTS` index of a contract, for token issuing.
    pub fn contract_index(&self, name: &str) -> Option<u32> {
        self.contracts
            .iter()
            .position(|(n, _)| n == name)
            .map(|i| i as u32)
    }

    /// `TokenInfo::{flags, scopes}` for scope names: `["*"]` is `TOKEN_ANY_SCOPE`, names
    /// set their `SCOPES` index bits.
    pub fn scope_mask(&self, names: &[String]) -> Result<(u32, u64), PolicyError> {
        if names.is_empty() {
            return Err(PolicyError::NoScopes);
        }
        if names.iter().any(|n| n == "*") {
            if names.len() > 1 {
                return Err(PolicyError::WildcardWithNames);
            }
            return Ok((TOKEN_ANY_SCOPE, 0));
        }
        let mut mask = 0u64;
        for name in names {
            let i = self
                .scopes
                .iter()
                .position(|(n, _)| n == name)
                .ok_or_else(|| PolicyError::UnknownScope { name: name.clone() })?;
            mask |= 1 << i;
        }
        Ok((0, mask))
    }
}

/// A fingerprint as written in policy files: its `Display` form, so lower case only (a
/// file names each token one way, and `grep` finds it).
pub fn parse_fingerprint(text: &str) -> Option<Fingerprint> {
    if text.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    text.parse().ok()
}

#[cfg(test)]
mod tests;
