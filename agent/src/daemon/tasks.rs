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
    datapath::{clock, parse_event},
    error_chain,
    store::{unix_now, TokenRecord},
    telemetry::{
        DatapathSnapshot, EventContext, EventRecord, ExpiryRecord, ListenerRequests, MapFill,
        Record, TokenCounts,
    },
};

/// How often metrics are refreshed from the maps.
const SNAPSHOT_EVERY: Duration = Duration::from_secs(1);
/// Token counts, breaches and map fill levels cost a pass over the store and the big maps
/// (tens of milliseconds at 100k tokens): every this many snapshots.
const TOKEN_SCAN_EVERY_TICKS: u32 = 5;
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
                // aya-log panics on a record it cannot decode; that record is consumed and
                // lost, the forwarding goes on.
                let logger = guard.get_inner_mut();
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| logger.flush()))
                    .is_err()
                {
                    tracing::warn!(target: "rampart::ebpf", "skipped an eBPF log record that could not be decoded");
                }
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
    let ctx = EventContext::new(listener_names);
    let d = daemon.clone();
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
                d.publish(Record::Decision(EventRecord::from_event(&ev, &ctx)));
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

/// Tokens already warned about, with the expiry they were warned of.
type Warned = HashMap<Fingerprint, i64>;

async fn snapshots(d: Arc<Daemon>) {
    let mut tick = tokio::time::interval(SNAPSHOT_EVERY);
    let mut n: u32 = 0;
    let mut warned = Warned::new();
    let mut expiring = 0u64;
    let mut last = DatapathSnapshot::default();
    loop {
        tick.tick().await;
        let d2 = d.clone();
        let do_expiry = n.is_multiple_of(EXPIRY_EVERY_TICKS);
        let scan_tokens = n.is_multiple_of(TOKEN_SCAN_EVERY_TICKS);
        n = n.wrapping_add(1);
        let mut w = std::mem::take(&mut warned);
        let prev = std::mem::take(&mut last);
        let res = tokio::task::spawn_blocking(move || {
            if do_expiry {
                expiring = expiry(&d2, &mut w, unix_now());
            }
            let snap = snapshot(&d2, &prev, expiring, scan_tokens);
            d2.metrics.update(snap.clone());
            (w, expiring, snap)
        })
        .await;
        if let Ok((w, e, snap)) = res {
            warned = w;
            expiring = e;
            last = snap;
        }
    }
}

/// Marks expired tokens in the store and warns — a log line and an `expiring` event — of
/// active tokens whose expiry is within the window: once per token and expiry, so a rotation
/// that shortens (or a re-issue that moves) the expiry warns again. Returns how many active
/// tokens expire within the window.
fn expiry(d: &Daemon, warned: &mut Warned, now: i64) -> u64 {
    let store = d.lifecycle.store();
    match store.mark_expired(now) {
        Ok(expired) => {
            for fp in expired {
                tracing::info!(fingerprint = %fp, "token expired");
            }
        }
        Err(e) => tracing::warn!(error = %error_chain(&e), "cannot mark expired tokens"),
    }
    let window = i64::try_from(d.config.expiry_warning.as_secs()).unwrap_or(i64::MAX);
    let soon: Vec<_> = store
        .expiring(now, window)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|rec| {
            let exp = rec.expires_at?;
            (exp > now && exp - now <= window).then_some((rec, exp))
        })
        .collect();
    let due = newly_due(warned, &soon);
    let tai_now = clock::tai_now_ns();
    let tai_offset = clock::tai_offset_ns();
    for &i in &due {
        let (rec, exp) = &soon[i];
        tracing::warn!(
            fingerprint = %rec.fingerprint,
            label = rec.label.as_deref().unwrap_or(""),
            expires_in_secs = exp - now,
            "token expires soon; rotate it"
        );
        d.publish(Record::Expiry(ExpiryRecord::new(
            tai_now,
            &rec.fingerprint,
            *exp,
            rec.label.clone(),
            tai_offset,
        )));
    }
    soon.len() as u64
}

/// Which of `soon` (tokens in the warning window, with their expiry) to warn about now:
/// those not warned of yet, or warned of with another expiry. Tokens that left the window
/// (expired, revoked, rotated away) are forgotten, so `warned` stays as small as the
/// window's population.
fn newly_due(warned: &mut Warned, soon: &[(TokenRecord, i64)]) -> Vec<usize> {
    // A set: a batch of tokens issued together enters the window together.
    let in_window: std::collections::HashSet<Fingerprint> =
        soon.iter().map(|(r, _)| r.fingerprint).collect();
    warned.retain(|fp, _| in_window.contains(fp));
    soon.iter()
        .enumerate()
        .filter(|(_, (rec, exp))| warned.insert(rec.fingerprint, *exp) != Some(*exp))
        .map(|(i, _)| i)
        .collect()
}

impl Daemon {
    /// Sends a record to the subscribers (none is not an error) and appends it to the export
    /// file, if one is configured. A failed write is logged and the record lost: the live
    /// stream and the datapath never wait on the disk.
    fn publish(&self, rec: Record) {
        let mut x = self.exporter.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(x) = x.as_mut() {
            if let Err(e) = x.write(&rec) {
                tracing::warn!(error = %error_chain(&e), "event export failed");
            }
        }
        drop(x);
        let _ = self.events.send(rec);
    }
}

/// The metrics' view of the datapath. Request counters and dropped events (small per-CPU
/// arrays) are read every time; token counts, breaches and map fill levels need a pass over
/// the store and the big maps, so with `scan_tokens` false they are carried over from
/// `prev`. A failed map read also keeps the previous value: counters never step back.
fn snapshot(
    d: &Daemon,
    prev: &DatapathSnapshot,
    expiring: u64,
    scan_tokens: bool,
) -> DatapathSnapshot {
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
    let mut next = DatapathSnapshot {
        requests,
        events_dropped_total: d
            .enforcer
            .lock()
            .events_dropped()
            .unwrap_or(prev.events_dropped_total),
        expiring_tokens: expiring,
        ..prev.clone()
    };
    if !scan_tokens {
        return next;
    }
    let counts = token_counts(d);
    next.tokens = TokenCounts {
        active: counts.active,
        revoked: counts.revoked,
        expired: counts.expired,
        not_yet_valid: counts.not_yet_valid,
    };
    // One pass over the mmapped TOKEN_STATE (no syscall per token).
    let dp = d.enforcer.lock();
    let totals = match dp.runtime_totals() {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::debug!(error = %error_chain(&e), "cannot read token runtime state");
            None
        }
    };
    if let Some(t) = totals {
        next.breaches_total = t.breaches;
    }
    next.maps = dp
        .fill_levels(totals)
        .into_iter()
        .map(|(map, entries, capacity)| MapFill {
            map: map.to_owned(),
            entries: entries as u64,
            capacity: capacity.into(),
        })
        .collect();
    next
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::TokenStatus;

    fn rec(n: u64) -> TokenRecord {
        TokenRecord {
            fingerprint: Fingerprint([n, n]),
            contract: "std".into(),
            scopes: Vec::new(),
            label: None,
            issued_at: 0,
            not_before: None,
            expires_at: None,
            rotated_from: None,
            status: TokenStatus::Active,
        }
    }

    #[test]
    fn each_token_is_warned_once_per_expiry() {
        let mut warned = Warned::new();
        let soon = vec![(rec(1), 100), (rec(2), 200)];
        assert_eq!(newly_due(&mut warned, &soon), [0, 1]);
        // The next checks, same expiries: silence.
        assert!(newly_due(&mut warned, &soon).is_empty());
        assert!(newly_due(&mut warned, &soon).is_empty());
        // Token 1 rotated (expiry moved up), token 3 entered the window.
        let soon = vec![(rec(1), 50), (rec(2), 200), (rec(3), 300)];
        assert_eq!(newly_due(&mut warned, &soon), [0, 2]);
        // Token 2 left the window (revoked) and is forgotten; were it back, it warns again.
        let without_2 = vec![(rec(1), 50), (rec(3), 300)];
        assert!(newly_due(&mut warned, &without_2).is_empty());
        assert_eq!(warned.len(), 2);
        assert_eq!(newly_due(&mut warned, &soon), [1]);
    }
}
