//! The daemon's configuration file, `/etc/rampart/rampart.toml`.
//!
//! Parsed with serde; every error, including the checks that span several listeners, is
//! reported as `file:line:col: message`. Relative paths resolve against the directory of
//! the configuration file, so a config and its policy can live together in a repository.

use std::{
    collections::HashMap,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use agent_common::{default_policy, deny_action, mode, ListenerConfig, MAX_LISTENERS};
use serde::{Deserialize, Deserializer};
use serde_spanned::Spanned;

use crate::{
    paths,
    policy::{CompiledPolicy, Diagnostic, PolicyCache, SourceText},
};

/// The validated configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// The file it was read from (relative paths below were resolved against its directory).
    pub path: PathBuf,
    pub state_dir: PathBuf,
    pub bpffs_dir: PathBuf,
    pub control_socket: PathBuf,
    pub metrics_addr: SocketAddr,
    /// Policy files, merged in this order.
    pub policy: Vec<PathBuf>,
    /// Warn (log, metrics) when a token expires within this long.
    pub expiry_warning: Duration,
    pub maps: MapsConfig,
    pub events: EventsConfig,
    pub listeners: Vec<Listener>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            path: PathBuf::from(paths::CONFIG_FILE),
            state_dir: PathBuf::from(paths::STATE_DIR),
            bpffs_dir: PathBuf::from(paths::BPFFS_DIR),
            control_socket: PathBuf::from(paths::CONTROL_SOCKET),
            metrics_addr: paths::METRICS_ADDR.parse().expect("valid default address"),
            // No policy: only tokens issued at runtime are known.
            policy: Vec::new(),
            // A day's notice leaves time to rotate before a token stops working.
            expiry_warning: Duration::from_secs(24 * 3600),
            maps: MapsConfig::default(),
            events: EventsConfig::default(),
            // No listener: the daemon loads but judges nothing until one is configured.
            listeners: Vec::new(),
        }
    }
}

/// `[maps]`: capacities of the datapath maps, fixed when the eBPF object is loaded.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MapsConfig {
    /// Tokens (static and issued) the datapath can know at once.
    #[serde(deserialize_with = "positive")]
    pub max_tokens: u32,
    /// Revoked fingerprints remembered until they expire.
    #[serde(deserialize_with = "positive")]
    pub max_revoked: u32,
    /// Per-token statistics (an LRU: the least recently seen tokens drop out).
    #[serde(deserialize_with = "positive")]
    pub token_stats: u32,
    /// Event ring buffer size; the kernel wants a power of two and whole pages.
    #[serde(deserialize_with = "ring_bytes")]
    pub ring_bytes: u32,
    /// Connections to inspected ports tracked at once (an LRU: under a flood the idlest
    /// drop out, and their next request is denied as `untracked`).
    #[serde(deserialize_with = "positive")]
    pub max_flows: u32,
}

impl Default for MapsConfig {
    fn default() -> Self {
        MapsConfig {
            // About a million tokens: 48 bytes each in TOKENS, plus their state.
            max_tokens: agent_common::DEFAULT_MAX_TOKENS,
            // Revocations are kept for good; half as many as tokens. Not preallocated, so
            // the capacity costs 16 bytes a slot of hash buckets (8 MB).
            max_revoked: crate::datapath::DEFAULT_MAX_REVOKED,
            // Statistics for the 64k busiest tokens are enough for `rampart top`.
            token_stats: 65536,
            // 1 MiB holds about ten thousand events, seconds of backlog at the default cap.
            ring_bytes: 1 << 20,
            // 256k concurrent connections, about 150 bytes each in the kernel.
            max_flows: agent_common::DEFAULT_MAX_FLOWS,
        }
    }
}

/// `[events]`: the stream of denials.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventsConfig {
    /// Events each CPU may emit per second; the rest are counted, not sent.
    #[serde(deserialize_with = "positive")]
    pub per_cpu_per_sec: u32,
    /// Append events as JSON lines to this file (rotated), if set.
    pub export_file: Option<PathBuf>,
    /// Rotate the export file when it reaches this size.
    pub export_max_bytes: u64,
    /// Rotated export files to keep.
    pub export_keep: u32,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            // A flood of denials must not become a flood of userspace work.
            per_cpu_per_sec: 1000,
            // Export is opt-in; `rampart events` streams without it.
            export_file: None,
            // 64 MiB per file, five files: a bounded footprint on disk.
            export_max_bytes: 64 << 20,
            export_keep: 5,
        }
    }
}

/// `[[listener]]`: an interface and the ports on it whose requests are judged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listener {
    pub name: String,
    pub interface: String,
    pub hook: Hook,
    /// How a tc listener attaches (xdp listeners: always `Auto`, unused).
    pub tc_attach: TcAttach,
    pub ports: Vec<u16>,
    pub mode: Mode,
    pub action: DenyAction,
    pub on_missing: DefaultPolicy,
    pub on_unknown: DefaultPolicy,
    pub on_incomplete: DefaultPolicy,
    /// Bytes where a request must start that cannot start an HTTP/1.x request (h2c, TLS,
    /// binary): denied by default.
    pub on_not_http: DefaultPolicy,
    /// What `action = "respond"` answers with: the realm of its `WWW-Authenticate`
    /// challenges and the `type` of its problem details.
    pub response: crate::respond::ResponseConfig,
}

impl Listener {
    /// The `LISTENERS` map value for this listener, `id` being its statistics index.
    pub fn datapath_config(&self, id: u32) -> ListenerConfig {
        ListenerConfig {
            id,
            mode: self.mode.to_datapath(),
            action: self.action.to_datapath(),
            on_missing: self.on_missing.to_datapath(),
            on_unknown: self.on_unknown.to_datapath(),
            on_incomplete: self.on_incomplete.to_datapath(),
            on_not_http: self.on_not_http.to_datapath(),
            _pad: [0; 2],
        }
    }
}

/// Where the program attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Xdp(XdpMode),
    /// TC ingress (also sees loopback traffic, which XDP in native mode does not).
    Tc,
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hook::Xdp(XdpMode::Native) => f.write_str("xdp (native)"),
            Hook::Xdp(XdpMode::Generic) => f.write_str("xdp (generic)"),
            Hook::Tc => f.write_str("tc"),
        }
    }
}

/// The kernel mechanism a tc listener attaches through.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TcAttach {
    /// TCX where the kernel has it (Linux >= 6.6), netlink otherwise.
    #[default]
    Auto,
    /// A TCX link; refused on kernels older than 6.6.
    Tcx,
    /// A `cls_bpf` filter on the `clsact` qdisc, through netlink (any kernel).
    Netlink,
}

impl TcAttach {
    /// The value as written in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            TcAttach::Auto => "auto",
            TcAttach::Tcx => "tcx",
            TcAttach::Netlink => "netlink",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum HookKind {
    Xdp,
    Tc,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// In the driver: fastest, needs driver support.
    #[default]
    Native,
    /// In the stack (SKB mode): works everywhere.
    Generic,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Denied requests are dropped or reset.
    #[default]
    Enforce,
    /// Everything passes; verdicts are only counted and streamed (for rollout).
    Observe,
}

impl Mode {
    pub fn to_datapath(self) -> u8 {
        match self {
            Mode::Enforce => mode::ENFORCE,
            Mode::Observe => mode::OBSERVE,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DenyAction {
    #[default]
    Drop,
    /// Reset the connection so the client fails fast instead of retransmitting.
    Reset,
    /// Answer the client with an HTTP response saying why (401, 400, 403, 429), from the
    /// kernel; the server never sees the request.
    Respond,
}

impl DenyAction {
    pub fn to_datapath(self) -> u8 {
        match self {
            DenyAction::Drop => deny_action::DROP,
            DenyAction::Reset => deny_action::RESET,
            DenyAction::Respond => deny_action::RESPOND,
        }
    }
}

/// What happens to requests without a (known, complete) token.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultPolicy {
    #[default]
    Deny,
    Allow,
}

impl DefaultPolicy {
    pub fn to_datapath(self) -> u8 {
        match self {
            DefaultPolicy::Deny => default_policy::DENY,
            DefaultPolicy::Allow => default_policy::ALLOW,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(Diagnostic),
}

impl ConfigError {
    /// As a diagnostic, to list with policy problems.
    pub fn into_diagnostic(self) -> Diagnostic {
        match self {
            ConfigError::Read { path, source } => {
                Diagnostic::whole_file(path, format!("cannot read configuration: {source}"))
            }
            ConfigError::Invalid(d) => d,
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_str(&text, path)
    }

    /// Parses configuration text as if read from `path` (which names it in errors and
    /// anchors relative paths).
    pub fn from_str(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let src = SourceText::new(path, text);
        let file: ConfigFile = toml::from_str(text)
            .map_err(|e| ConfigError::Invalid(src.at(e.span(), e.message().trim_end())))?;
        let listeners = validate_listeners(&src, file.listener).map_err(ConfigError::Invalid)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: PathBuf| base.join(p);
        Ok(Config {
            path: path.to_path_buf(),
            state_dir: resolve(file.state_dir),
            bpffs_dir: resolve(file.bpffs_dir),
            control_socket: resolve(file.control_socket),
            metrics_addr: file.metrics_addr,
            policy: file.policy.into_iter().map(resolve).collect(),
            expiry_warning: file.expiry_warning,
            maps: file.maps,
            events: EventsConfig {
                export_file: file.events.export_file.map(resolve),
                ..file.events
            },
            listeners,
        })
    }

    /// The fingerprint key file inside the state directory.
    pub fn key_path(&self) -> PathBuf {
        self.state_dir.join(paths::KEY_FILE)
    }

    /// The SQLite database inside the state directory.
    pub fn db_path(&self) -> PathBuf {
        self.state_dir.join(paths::DB_FILE)
    }
}

/// Loads the configuration and every policy file it names: what `rampart check` runs and
/// what the daemon (re)loads. All problems found are returned, in file order.
pub fn load_all(path: &Path) -> Result<(Config, CompiledPolicy), Vec<Diagnostic>> {
    load_all_with(path, None)
}

/// `load_all` through the daemon's `cache` of the policy files as last compiled: only
/// what changed since is walked again.
pub fn load_all_with(
    path: &Path,
    cache: Option<&mut PolicyCache>,
) -> Result<(Config, CompiledPolicy), Vec<Diagnostic>> {
    let config = Config::load(path).map_err(|e| vec![e.into_diagnostic()])?;
    let policy = CompiledPolicy::load_cached(&config.policy, cache)?;
    Ok((config, policy))
}

/// The file as written; `Config::from_str` validates and resolves it.
#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ConfigFile {
    state_dir: PathBuf,
    bpffs_dir: PathBuf,
    control_socket: PathBuf,
    metrics_addr: SocketAddr,
    policy: Vec<PathBuf>,
    #[serde(deserialize_with = "duration")]
    expiry_warning: Duration,
    maps: MapsConfig,
    events: EventsConfig,
    listener: Vec<Spanned<ListenerEntry>>,
}

impl Default for ConfigFile {
    fn default() -> Self {
        // Exactly the defaults of `Config`.
        let c = Config::default();
        ConfigFile {
            state_dir: c.state_dir,
            bpffs_dir: c.bpffs_dir,
            control_socket: c.control_socket,
            metrics_addr: c.metrics_addr,
            policy: c.policy,
            expiry_warning: c.expiry_warning,
            maps: c.maps,
            events: c.events,
            listener: Vec::new(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenerEntry {
    name: Spanned<String>,
    interface: Spanned<String>,
    hook: HookKind,
    xdp_mode: Option<Spanned<XdpMode>>,
    tc_attach: Option<Spanned<TcAttach>>,
    ports: Spanned<Vec<Spanned<u16>>>,
    #[serde(default)]
    mode: Mode,
    #[serde(default)]
    action: DenyAction,
    #[serde(default)]
    on_missing: DefaultPolicy,
    #[serde(default)]
    on_unknown: DefaultPolicy,
    #[serde(default)]
    on_incomplete: DefaultPolicy,
    #[serde(default)]
    on_not_http: DefaultPolicy,
    realm: Option<Spanned<String>>,
    problem_type: Option<Spanned<String>>,
}

/// The checks that look across listeners, or at fields serde passes through unchecked.
fn validate_listeners(
    src: &SourceText,
    entries: Vec<Spanned<ListenerEntry>>,
) -> Result<Vec<Listener>, Diagnostic> {
    let at = |span: std::ops::Range<usize>, message: String| src.at(Some(span), message);
    let here = |span: &std::ops::Range<usize>| src.location(span.start);
    let mut names: HashMap<String, String> = HashMap::new();
    // (interface, port) → listener name; interface → (hook, tc_attach, listener name).
    let mut claimed: HashMap<(String, u16), String> = HashMap::new();
    let mut hooks: HashMap<String, (Hook, TcAttach, String)> = HashMap::new();
    let mut listeners = Vec::new();
    for (i, spanned) in entries.into_iter().enumerate() {
        let entry_span = spanned.span();
        let e = spanned.into_inner();
        if i == MAX_LISTENERS as usize {
            return Err(at(
                entry_span,
                format!("more than {MAX_LISTENERS} listeners (the datapath tells at most {MAX_LISTENERS} apart)"),
            ));
        }
        let name = e.name.get_ref().clone();
        if name.is_empty() {
            return Err(at(e.name.span(), "listener name must not be empty".into()));
        }
        if let Some(first) = names.get(&name) {
            return Err(at(
                e.name.span(),
                format!("listener name `{name}` is already used at {first}"),
            ));
        }
        names.insert(name.clone(), here(&e.name.span()));

        let interface = e.interface.get_ref().clone();
        // IFNAMSIZ is 16 including the terminating NUL.
        if interface.is_empty() || interface.len() > 15 || interface.contains(['/', ' ']) {
            return Err(at(
                e.interface.span(),
                format!(
                    "`{interface}` is not an interface name (1 to 15 characters, no '/' or spaces)"
                ),
            ));
        }

        let hook = match (e.hook, &e.xdp_mode) {
            (HookKind::Xdp, mode) => {
                Hook::Xdp(mode.as_ref().map(|m| *m.get_ref()).unwrap_or_default())
            }
            (HookKind::Tc, None) => Hook::Tc,
            (HookKind::Tc, Some(mode)) => {
                return Err(at(
                    mode.span(),
                    format!("`xdp_mode` applies to xdp listeners only; listener `{name}` uses tc"),
                ))
            }
        };
        let tc_attach = match (hook, &e.tc_attach) {
            (_, None) => TcAttach::default(),
            (Hook::Tc, Some(t)) => *t.get_ref(),
            (Hook::Xdp(_), Some(t)) => {
                return Err(at(
                    t.span(),
                    format!("`tc_attach` applies to tc listeners only; listener `{name}` uses xdp"),
                ))
            }
        };
        // One program per interface: two hooks would judge (and rate-limit) requests twice.
        match hooks.get(&interface) {
            Some((other, _, owner)) if *other != hook => {
                return Err(at(
                    entry_span,
                    format!(
                        "interface `{interface}` is attached with {other} by listener `{owner}`; \
                         every listener on an interface must use the same hook and xdp_mode"
                    ),
                ))
            }
            Some((_, other, owner)) if *other != tc_attach => {
                return Err(at(
                    entry_span,
                    format!(
                        "interface `{interface}` is attached with tc_attach = \"{}\" by \
                         listener `{owner}`; every listener on an interface must use the same \
                         tc_attach",
                        other.name()
                    ),
                ))
            }
            Some(_) => {}
            None => {
                hooks.insert(interface.clone(), (hook, tc_attach, name.clone()));
            }
        }

        let ports_span = e.ports.span();
        let ports = e.ports.into_inner();
        if ports.is_empty() {
            return Err(at(ports_span, format!("listener `{name}` has no ports")));
        }
        let mut port_list = Vec::new();
        for port in ports {
            let (span, port) = (port.span(), *port.get_ref());
            if port == 0 {
                return Err(at(span, "port 0 is not a valid listener port".into()));
            }
            if let Some(owner) = claimed.get(&(interface.clone(), port)) {
                return Err(at(
                    span,
                    format!(
                        "port {port} on `{interface}` is already claimed by listener `{owner}`"
                    ),
                ));
            }
            claimed.insert((interface.clone(), port), name.clone());
            port_list.push(port);
        }

        let mut response = crate::respond::ResponseConfig::default();
        if let Some(r) = &e.realm {
            response.realm = r.get_ref().clone();
            crate::respond::check_realm(&response.realm).map_err(|m| at(r.span(), m))?;
        }
        if let Some(t) = &e.problem_type {
            response.problem_type = t.get_ref().clone();
            crate::respond::check_problem_type(&response.problem_type)
                .map_err(|m| at(t.span(), m))?;
        }

        listeners.push(Listener {
            name,
            interface,
            hook,
            tc_attach,
            ports: port_list,
            mode: e.mode,
            action: e.action,
            on_missing: e.on_missing,
            on_unknown: e.on_unknown,
            on_incomplete: e.on_incomplete,
            on_not_http: e.on_not_http,
            response,
        });
    }
    Ok(listeners)
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    crate::policy::units::parse_duration(&text).map_err(serde::de::Error::custom)
}

fn positive<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let n = u32::deserialize(d)?;
    if n == 0 {
        return Err(serde::de::Error::custom("must be at least 1"));
    }
    Ok(n)
}

fn ring_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let n = u32::deserialize(d)?;
    if !n.is_power_of_two() || n < 4096 {
        return Err(serde::de::Error::custom(format!(
            "ring_bytes {n} must be a power of two of at least 4096 (whole pages)"
        )));
    }
    Ok(n)
}

#[cfg(test)]
mod tests;
