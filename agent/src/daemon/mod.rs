//! The `rampart run` daemon: load, enforce, then serve operators until told to stop.
//!
//! Start-up order is the safety argument: policy and every revocation are in the maps before
//! this daemon attaches anything, and attaching swaps programs inside pinned links, so an
//! interface is never unguarded. Stopping (SIGTERM) leaves the links and maps pinned:
//! enforcement continues without the daemon; only `rampart detach` removes it.

mod apply;
mod attach;
mod enforcer;
mod handler;
pub mod ops;
pub mod preflight;
mod tasks;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
};

use agent_common::{Fingerprint, GlobalConfig, CLOCK_REAL};
pub use apply::{Applied, ApplyError};
pub use attach::AttachedListener;
pub use enforcer::{stage_rate, DatapathEnforcer};
pub use handler::ControlHandler;
use tokio::sync::broadcast;

use crate::{
    config::{self, Config},
    control::{self, ControlError, ServerOptions},
    datapath::{AttachError, Datapath, DatapathError, LoadOptions},
    policy::{CompiledPolicy, Diagnostic, PolicyCache},
    store::{AuditAction, Store, StoreError},
    telemetry::{EventExporter, Metrics, RateEstimator, TelemetryError},
    token::{load_key, KeyError, Lifecycle},
};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{} error{} in the configuration or policy:\n{}", .0.len(), if .0.len() == 1 { "" } else { "s" }, lines(.0))]
    Config(Vec<Diagnostic>),
    #[error("cannot load the fingerprint key {} (run `rampart keygen` to create it)", path.display())]
    Key {
        path: PathBuf,
        #[source]
        source: KeyError,
    },
    #[error("cannot open the state database")]
    Store(#[from] StoreError),
    #[error("cannot load the eBPF datapath")]
    Datapath(#[from] DatapathError),
    #[error("applying the policy")]
    Apply(#[from] ApplyError),
    #[error("interface {interface} of listener {listener} does not exist")]
    NoInterface { listener: String, interface: String },
    #[error("attaching listener {listener} to {interface}")]
    Attach {
        listener: String,
        interface: String,
        #[source]
        source: Box<AttachError>,
    },
    #[error("cannot start the control socket")]
    Control(#[from] Box<ControlError>),
    #[error("telemetry")]
    Telemetry(#[from] TelemetryError),
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
    #[error("this host cannot run the daemon")]
    Preflight(#[from] preflight::PreflightError),
}

fn lines(d: &[Diagnostic]) -> String {
    d.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Everything the runtime tasks and the control handler share.
pub struct Daemon {
    pub config: Config,
    policy: RwLock<Arc<CompiledPolicy>>,
    generation: AtomicU64,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
    /// One reload at a time (SIGHUP, file change and the `reload` op may race), and what
    /// the next one starts from.
    reload_lock: Mutex<Reloading>,
    pub enforcer: Arc<DatapathEnforcer>,
    pub lifecycle: Lifecycle,
    pub metrics: Arc<Metrics>,
    pub events: broadcast::Sender<crate::telemetry::Record>,
    /// The event export file, shared by the datapath event reader and expiry warnings.
    exporter: Mutex<Option<EventExporter>>,
    pub listeners: Vec<AttachedListener>,
    top_rates: Mutex<RateEstimator<Fingerprint>>,
}

/// What a reload starts from: the policy files as last compiled (a reload re-walks only
/// what changed) and what the kernel holds (it writes only what differs).
struct Reloading {
    cache: PolicyCache,
    kernel: apply::Kernel,
}

/// Why a reload was refused; the running policy stays.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{}", lines(.0))]
    Invalid(Vec<Diagnostic>),
    #[error("applying the new policy failed (the datapath may hold part of it; the next successful reload completes it)")]
    Apply(#[source] ApplyError),
}

impl Daemon {
    pub fn policy(&self) -> Arc<CompiledPolicy> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Validates the configuration and policy files and, if they are valid, applies the
    /// policy. Blocking (files, SQLite, map syscalls): call from a blocking context.
    pub fn reload(&self, why: &str) -> Result<u64, ReloadError> {
        let mut state = self.reload_lock.lock().unwrap_or_else(|e| e.into_inner());
        let began = std::time::Instant::now();
        let result = self.try_reload(&mut state);
        let took = began.elapsed().as_secs_f64();
        let store = self.lifecycle.store();
        match &result {
            Ok((generation, applied)) => {
                self.reloads_ok.fetch_add(1, Ordering::Relaxed);
                self.metrics.record_reload(true);
                self.metrics.set_policy_generation(*generation);
                let detail = format!(
                    "{why}: generation {generation}, {} static token entries written, {} tokens installed, {} removed, {} ramps reset, {} failed",
                    applied.written,
                    applied.lifecycle.installed,
                    applied.removed,
                    applied.reset,
                    applied.lifecycle.failed.len()
                );
                tracing::info!("policy reloaded in {took:.3} s ({detail})");
                for (fp, msg) in &applied.lifecycle.failed {
                    tracing::warn!(fingerprint = %fp, "token not installed: {msg}");
                }
                if let Err(e) = store.record(AuditAction::Reload, None, None, &detail) {
                    tracing::error!(error = %crate::error_chain(&e), "cannot audit-log the reload");
                }
            }
            Err(e) => {
                self.reloads_failed.fetch_add(1, Ordering::Relaxed);
                self.metrics.record_reload(false);
                match e {
                    ReloadError::Invalid(diags) => {
                        for d in diags {
                            tracing::error!("reload rejected: {d}");
                        }
                    }
                    ReloadError::Apply(e) => {
                        tracing::error!(error = %crate::error_chain(e), "reload failed")
                    }
                }
                let detail = format!("{why}: failed, keeping generation {}", self.generation());
                if let Err(e) = store.record(AuditAction::Reload, None, None, &detail) {
                    tracing::error!(error = %crate::error_chain(&e), "cannot audit-log the reload");
                }
            }
        }
        result.map(|(g, _)| g)
    }

    fn try_reload(&self, state: &mut Reloading) -> Result<(u64, Applied), ReloadError> {
        let (config, new) = config::load_all_with(&self.config.path, Some(&mut state.cache))
            .map_err(ReloadError::Invalid)?;
        if config.listeners != self.config.listeners
            || config.maps != self.config.maps
            || config.bpffs_dir != self.config.bpffs_dir
        {
            tracing::warn!(
                "listener, map or pin changes in the configuration take effect on restart only"
            );
        }
        let old = self.policy();
        let new = apply::stabilize(&old, new);
        let kernel = std::mem::replace(&mut state.kernel, apply::Kernel::Unknown);
        let applied = apply::apply_reload(&self.enforcer, &self.lifecycle, &old, &new, kernel)
            .map_err(ReloadError::Apply)?;
        state.kernel = apply::Kernel::InStep {
            unresolved: applied.unresolved,
        };
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        Ok((generation, applied))
    }
}

/// Loads everything and attaches; returns the shared state, ready for the runtime tasks.
fn start(
    config: Config,
    policy: CompiledPolicy,
    cache: PolicyCache,
) -> Result<Daemon, DaemonError> {
    let key_path = config.key_path();
    let key = load_key(&key_path).map_err(|source| DaemonError::Key {
        path: key_path.clone(),
        source,
    })?;
    let began = std::time::Instant::now();
    let store = Arc::new(Store::open(&config.state_dir)?);
    let mut dp = Datapath::load(LoadOptions {
        max_tokens: config.maps.max_tokens,
        max_revoked: config.maps.max_revoked,
        token_stats: config.maps.token_stats,
        ring_bytes: config.maps.ring_bytes,
        max_flows: config.maps.max_flows,
        pin_dir: Some(config.bpffs_dir.clone()),
    })?;
    dp.set_config(&GlobalConfig {
        key,
        events_per_sec: config.events.per_cpu_per_sec,
        clock_mode: CLOCK_REAL,
        fixed_now_ns: 0,
    })?;
    tracing::info!(
        tokens = dp.token_count(),
        secs = began.elapsed().as_secs_f64(),
        "maps loaded"
    );
    let enforcer = Arc::new(DatapathEnforcer::new(dp));
    let lifecycle = Lifecycle::new(store.clone(), enforcer.clone(), key);
    let applied = apply::apply_initial(&enforcer, &lifecycle, &policy)?;
    tracing::info!(
        revoked = applied.lifecycle.revoked,
        installed = applied.lifecycle.installed,
        static_tokens = policy.tokens.len(),
        written = applied.written,
        secs = began.elapsed().as_secs_f64(),
        "policy applied"
    );
    for (fp, msg) in &applied.lifecycle.failed {
        tracing::warn!(fingerprint = %fp, "token not installed: {msg}");
    }

    // Only now, with every revocation in REVOKED, does this daemon's program judge traffic.
    let listeners = attach::attach_listeners(&enforcer, &config)?;
    tracing::info!(
        listeners = listeners.len(),
        secs = began.elapsed().as_secs_f64(),
        "listeners attached"
    );
    let metrics = Arc::new(Metrics::default());
    metrics.set_policy_generation(1);
    let (events, _) = broadcast::channel(4096);
    let exporter = match &config.events.export_file {
        Some(path) => Some(EventExporter::new(
            path,
            config.events.export_max_bytes,
            config.events.export_keep as usize,
        )?),
        None => None,
    };
    if let Err(e) = store.record(
        AuditAction::Start,
        None,
        None,
        &format!("{} listeners", listeners.len()),
    ) {
        tracing::warn!(error = %crate::error_chain(&e), "cannot audit-log the start");
    }
    Ok(Daemon {
        config,
        policy: RwLock::new(Arc::new(policy)),
        generation: AtomicU64::new(1),
        reloads_ok: AtomicU64::new(0),
        reloads_failed: AtomicU64::new(0),
        reload_lock: Mutex::new(Reloading {
            cache,
            kernel: apply::Kernel::InStep {
                unresolved: applied.unresolved,
            },
        }),
        enforcer,
        lifecycle,
        metrics,
        events,
        exporter: Mutex::new(exporter),
        listeners,
        top_rates: Mutex::new(RateEstimator::new()),
    })
}

/// `rampart run`: returns on SIGTERM/SIGINT, leaving enforcement in place.
pub async fn run(config_path: &Path) -> Result<(), DaemonError> {
    let mut cache = PolicyCache::default();
    let (config, policy) =
        config::load_all_with(config_path, Some(&mut cache)).map_err(DaemonError::Config)?;
    preflight::check(&config.bpffs_dir)?;
    let control_socket = config.control_socket.clone();
    let metrics_addr = config.metrics_addr;
    let daemon = {
        let cfg = config.clone();
        tokio::task::spawn_blocking(move || start(cfg, policy, cache))
            .await
            .expect("start-up does not panic")?
    };
    let daemon = Arc::new(daemon);
    let listener = control::bind(&control_socket).map_err(Box::new)?;
    let metrics_server = crate::telemetry::http::MetricsServer::bind(metrics_addr).await?;
    tracing::info!(addr = %metrics_server.local_addr(), "serving metrics");

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(control::serve(
        listener,
        Arc::new(ControlHandler(daemon.clone())),
        ServerOptions::default(),
    ));
    tasks.spawn(metrics_server.serve(daemon.metrics.clone()));
    tasks::spawn_all(&daemon, &mut tasks);
    let listener_names: HashMap<u32, String> = daemon
        .listeners
        .iter()
        .map(|l| (l.id, l.config.name.clone()))
        .collect();
    tasks::spawn_events(&daemon, listener_names, &mut tasks)?;

    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;
    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;

    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    tracing::info!(
        listeners = daemon.listeners.len(),
        socket = %control_socket.display(),
        "rampart is enforcing"
    );
    loop {
        tokio::select! {
            _ = hup.recv() => {
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Reloading]);
                let d = daemon.clone();
                let _ = tokio::task::spawn_blocking(move || d.reload("SIGHUP")).await;
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    tracing::info!(
        "stopping; programs stay attached and keep enforcing (`rampart detach` removes them)"
    );
    if let Err(e) = daemon
        .lifecycle
        .store()
        .record(AuditAction::Stop, None, None, "")
    {
        tracing::warn!(error = %crate::error_chain(&e), "cannot audit-log the stop");
    }
    tasks.abort_all();
    let _ = std::fs::remove_file(&control_socket);
    Ok(())
}
