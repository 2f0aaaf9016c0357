//! The daemon's background tasks: event stream, metrics snapshots, expiry, file watching,
//! eBPF log forwarding.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use agent_common::Fingerprint;
use tokio::{io::unix::AsyncFd, task::JoinSet};

use super::{handler::token_counts, Daemon, DaemonError};
use crate::{
    control,
    datapath::parse_event,
    store::{fingerprint_hex, unix_now},
    telemetry::{
        DatapathSnapshot, EventContext, EventExporter, ListenerRequests, MapFill, TokenCounts,
    },
    token::error_chain,
};

/// How often metrics are refreshed from the maps.
const SNAPSHOT_EVERY: Duration = Duration::from_secs(1);
/// Expiry bookkeeping runs every this many snapshots.
const EXPIRY_EVERY_TICKS: u32 = 10;
/// Editors write a file in several steps; wait for them to settle before reloading.
const SETTLE: Duration = Duration::from_millis(300);

pub(super) fn spawn_all(daemon: &Arc<Daemon>, tasks: &mut JoinSet<()>) {
    tasks.spawn(snapshots(daemon.clone()));
    match watch_files(daemon) {
        Ok(fut) => {
            tasks.spawn(fut);
        }
        Err(e) => tracing::warn!(error = %e, "cannot watch policy files; reload with SIGHUP"),
    }
    let logger = daemon.enforcer.lock().take_logger();
    if let Some(logger) = logger {
        tasks.spawn(async move {
            let Ok(mut fd) = async_fd(logger) else {
                return;
            };
            loop {
                let Ok(mut guard) = fd.readable_mut().await else {
                    return;
                };
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        });
    }
}

/// Reads the event ring: each event goes to the subscribers and, if configured, the export
/// file. Only fingerprints are in events; the datapath never copies a token up.
pub(super) fn spawn_events(
    daemon: &Arc<Daemon>,
    listener_names: HashMap<u32, String>,
    tasks: &mut JoinSet<()>,
) -> Result<(), DaemonError> {
    let Some(ring) = daemon.enforcer.lock().take_events() else {
        return Ok(());
    };
    let mut exporter = match &daemon.config.events.export_file {
        Some(path) => Some(EventExporter::new(
            path,
            daemon.config.events.export_max_bytes,
            daemon.config.events.export_keep as usize,
        )?),
        None => None,
    };
    let ctx = EventContext::new(listener_names);
    let events = daemon.events.clone();
    let mut fd = async_fd(ring).map_err(DaemonError::Signals)?;
    tasks.spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                tracing::error!("event ring buffer poll failed; events stop");
                return;
            };
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                let Some(ev) = parse_event(&item) else {
                    continue;
                };
                if let Some(rec) = control::EventRecord::from_event(&ev) {
                    // No subscriber is not an error.
                    let _ = events.send(rec);
                }
                if let Some(x) = exporter.as_mut() {
                    let rec = crate::telemetry::EventRecord::from_event(&ev, &ctx);
                    if let Err(e) = x.write(&rec) {
                        tracing::warn!(error = %error_chain(&e), "event export failed");
                    }
                }
            }
            guard.clear_ready();
        }
    });
    Ok(())
}

/// Registers a ring buffer with tokio. The ring owns its fd and the AsyncFd owns the ring,
/// so the fd stays open exactly as long as it is registered.
#[expect(
    deprecated,
    reason = "AsyncFd::register is unsafe for the same guarantee, which ownership gives here"
)]
fn async_fd<T: std::os::fd::AsRawFd>(inner: T) -> std::io::Result<AsyncFd<T>> {
    AsyncFd::new(inner)
}

async fn snapshots(d: Arc<Daemon>) {
    let mut tick = tokio::time::interval(SNAPSHOT_EVERY);
    let mut n: u32 = 0;
    let mut warned: HashSet<Fingerprint> = HashSet::new();
    let mut expiring = 0u64;
    loop {
        tick.tick().await;
        let d2 = d.clone();
        let do_expiry = n.is_multiple_of(EXPIRY_EVERY_TICKS);
        n = n.wrapping_add(1);
        let mut w = std::mem::take(&mut warned);
        let res = tokio::task::spawn_blocking(move || {
            if do_expiry {
                expiring = expiry(&d2, &mut w);
            }
            d2.metrics.update(snapshot(&d2, expiring));
            (w, expiring)
        })
        .await;
        if let Ok((w, e)) = res {
            warned = w;
            expiring = e;
        }
    }
}

/// Marks expired tokens in the store and warns, once per token, of those about to expire.
/// Returns how many active tokens expire within the warning window.
fn expiry(d: &Daemon, warned: &mut HashSet<Fingerprint>) -> u64 {
    let store = d.lifecycle.store();
    let now = unix_now();
    match store.mark_expired(now) {
        Ok(expired) => {
            for fp in expired {
                tracing::info!(fingerprint = %fingerprint_hex(&fp), "token expired");
                warned.remove(&fp);
            }
        }
        Err(e) => tracing::warn!(error = %error_chain(&e), "cannot mark expired tokens"),
    }
    let window = i64::try_from(d.config.expiry_warning.as_secs()).unwrap_or(i64::MAX);
    let mut count = 0;
    for rec in store.active().unwrap_or_default() {
        let Some(exp) = rec.expires_at else { continue };
        if exp > now && exp - now <= window {
            count += 1;
            if warned.insert(rec.fingerprint) {
                tracing::warn!(
                    fingerprint = %fingerprint_hex(&rec.fingerprint),
                    label = rec.label.as_deref().unwrap_or(""),
                    expires_in_secs = exp - now,
                    "token expires soon; rotate it"
                );
            }
        }
    }
    count
}

fn snapshot(d: &Daemon, expiring: u64) -> DatapathSnapshot {
    let requests = d
        .listeners
        .iter()
        .filter_map(|l| {
            let by_verdict = d.enforcer.lock().verdict_counts(l.id).ok()?;
            Some(ListenerRequests {
                listener: l.config.name.clone(),
                by_verdict,
            })
        })
        .collect();
    let counts = token_counts(d);
    let fps: Vec<Fingerprint> = d
        .enforcer
        .lock()
        .tokens()
        .into_iter()
        .map(|(fp, _)| fp)
        .collect();
    // One short lock per token: issuing and revoking never wait behind a full scan.
    let breaches_total = fps
        .iter()
        .filter_map(|fp| d.enforcer.lock().token_state(fp))
        .map(|s| s.breaches)
        .sum();
    let dp = d.enforcer.lock();
    DatapathSnapshot {
        requests,
        tokens: TokenCounts {
            active: counts.active,
            revoked: counts.revoked,
            expired: counts.expired,
            not_yet_valid: counts.not_yet_valid,
        },
        breaches_total,
        events_dropped_total: dp.events_dropped().unwrap_or(0),
        maps: dp
            .fill_levels()
            .into_iter()
            .map(|(map, entries, capacity)| MapFill {
                map: map.to_owned(),
                entries: entries as u64,
                capacity: capacity.into(),
            })
            .collect(),
        expiring_tokens: expiring,
    }
}

/// Reloads when the configuration or a policy file changes. Directories are watched, not
/// files: editors and `git checkout` replace files by renaming over them.
fn watch_files(
    d: &Arc<Daemon>,
) -> Result<impl std::future::Future<Output = ()> + Send + 'static, notify::Error> {
    use notify::{RecursiveMode, Watcher};

    let mut files: Vec<PathBuf> = vec![d.config.path.clone()];
    files.extend(d.config.policy.iter().cloned());
    let files: Vec<PathBuf> = files
        .into_iter()
        .map(|p| std::fs::canonicalize(&p).unwrap_or(p))
        .collect();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let wanted = files.clone();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(ev) = res else { return };
        if ev.kind.is_access() {
            return;
        }
        if ev.paths.iter().any(|p| wanted.iter().any(|w| w == p)) {
            // A full channel already has a reload pending.
            let _ = tx.try_send(());
        }
    })?;
    let dirs: HashSet<PathBuf> = files
        .iter()
        .filter_map(|f| f.parent().map(PathBuf::from))
        .collect();
    for dir in &dirs {
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
    }
    let d = d.clone();
    Ok(async move {
        let _watcher = watcher;
        while rx.recv().await.is_some() {
            tokio::time::sleep(SETTLE).await;
            while rx.try_recv().is_ok() {}
            let d = d.clone();
            let _ = tokio::task::spawn_blocking(move || d.reload("file change")).await;
        }
    })
}
