//! The control socket's ops, answered from the daemon's shared state.

use std::{sync::Arc, time::Instant};

use agent_common::{Fingerprint, Verdict};
use tokio::sync::broadcast;

use super::{
    enforcer::stage_rate,
    ops::{answer, DaemonOps},
    Daemon, ReloadError,
};
use crate::{
    config::Mode,
    control::{
        protocol::{ListenerStatus, ReloadBody, StatusBody, TokenCountsView, TopRow, TopSnapshot},
        Fp, Handler, Peer, Request, Response,
    },
    datapath::clock::tai_offset_ns,
    error_chain,
    store::unix_now,
    telemetry::event::rfc3339_from_tai,
};

pub struct ControlHandler(pub Arc<Daemon>);

/// Blocking work (SQLite fsyncs, map syscalls) off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    tokio::task::spawn_blocking(f).await.ok()
}

impl Handler for ControlHandler {
    async fn handle(&self, peer: Peer, req: Request) -> Response {
        let d = self.0.clone();
        let resp = blocking(move || {
            let policy = d.policy();
            answer(&d.lifecycle, &*policy, &*d, peer.uid, &req)
        })
        .await;
        resp.unwrap_or_else(|| Response::error("the daemon failed while answering"))
    }

    fn subscribe(
        &self,
        _peer: Peer,
    ) -> Result<broadcast::Receiver<crate::telemetry::Record>, String> {
        Ok(self.0.events.subscribe())
    }
}

impl DaemonOps for Daemon {
    fn status(&self) -> Response {
        status(self)
    }

    fn reload(&self) -> Response {
        match Daemon::reload(self, "control socket") {
            Ok(generation) => Response::ok(&ReloadBody { generation }),
            Err(ReloadError::Invalid(diags)) => Response::error(format!(
                "policy rejected, previous policy still enforced:\n{}",
                super::lines(&diags)
            )),
            Err(e) => Response::error(error_chain(&e)),
        }
    }

    fn top(&self, limit: Option<usize>) -> Response {
        top(self, limit)
    }
}

pub(super) fn token_counts(d: &Daemon) -> TokenCountsView {
    let mut out = TokenCountsView::default();
    match d.lifecycle.store().count_by_state(unix_now()) {
        Ok(c) => {
            out.active = c.active;
            out.not_yet_valid = c.not_yet_valid;
            out.revoked = c.revoked;
            out.expired = c.expired;
        }
        Err(e) => tracing::warn!("counting tokens by state: {}", error_chain(&e)),
    }
    out.in_kernel = d.enforcer.lock().token_count() as u64;
    out
}

fn status(d: &Daemon) -> Response {
    let policy = d.policy();
    let listeners = d
        .listeners
        .iter()
        .map(|l| {
            let requests = d
                .enforcer
                .lock()
                .verdict_counts(l.id)
                .map(|counts| {
                    Verdict::ALL
                        .iter()
                        .map(|v| (v.name().to_owned(), counts[*v as usize]))
                        .collect()
                })
                .unwrap_or_default();
            ListenerStatus {
                id: l.id,
                name: l.config.name.clone(),
                interface: l.config.interface.clone(),
                hook: l.config.hook.to_string(),
                ports: l.config.ports.clone(),
                mode: match l.config.mode {
                    Mode::Enforce => "enforce",
                    Mode::Observe => "observe",
                }
                .to_owned(),
                program_id: l.attached.program_id,
                link_pin: l.attached.pin.display().to_string(),
                adopted: l.attached.adopted,
                requests,
            }
        })
        .collect();
    let events_dropped = d.enforcer.lock().events_dropped().unwrap_or(0);
    Response::ok(&StatusBody {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        pid: std::process::id(),
        config: d.config.path.display().to_string(),
        policy_generation: d.generation(),
        reloads_ok: d.reloads_ok.load(std::sync::atomic::Ordering::Relaxed),
        reloads_failed: d.reloads_failed.load(std::sync::atomic::Ordering::Relaxed),
        listeners,
        tokens: token_counts(d),
        contracts: policy.contracts.len(),
        scopes: policy.scopes.len(),
        static_tokens: policy.tokens.len(),
        events_dropped,
    })
}

/// One row per token the datapath has seen; rates from the previous `top` call.
fn top(d: &Daemon, limit: Option<usize>) -> Response {
    let policy = d.policy();
    let offset = tai_offset_ns();
    // Name and label of every token the daemon knows: issued (store) and static (policy).
    let mut known: Vec<(Fingerprint, String, Option<String>)> = d
        .lifecycle
        .store()
        .active()
        .unwrap_or_default()
        .into_iter()
        .map(|r| (r.fingerprint, r.contract, r.label))
        .collect();
    for t in &policy.tokens {
        let name = policy
            .contracts
            .get(t.info.contract as usize)
            .map(|(n, _)| n.clone())
            .unwrap_or_default();
        known.push((t.fingerprint, name, t.label.clone()));
    }
    let mut rows = Vec::new();
    let mut totals = Vec::new();
    {
        let dp = d.enforcer.lock();
        for (fp, contract, label) in known {
            let stats = dp.token_stats(&fp);
            let total: u64 = stats.by_verdict.iter().sum();
            let state = dp.token_state(&fp);
            if total == 0 && state.is_none() {
                continue;
            }
            let state = state.unwrap_or_default();
            let stage_rate = policy
                .contracts
                .iter()
                .find(|(n, _)| *n == contract)
                .and_then(|(_, c)| stage_rate(c, state.stage))
                .unwrap_or(0.0);
            totals.push((fp, total));
            rows.push((
                fp,
                TopRow {
                    fingerprint: Fp(fp),
                    label,
                    contract,
                    stage: state.stage,
                    stage_rate,
                    current_rate: 0.0,
                    throttles: stats.by_verdict[Verdict::Throttled as usize],
                    breaches: state.breaches,
                    last_seen: (state.last_seen_ns != 0)
                        .then(|| rfc3339_from_tai(state.last_seen_ns, offset)),
                },
            ));
        }
    }
    let rates = d
        .top_rates
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .observe(Instant::now(), totals);
    let mut rows: Vec<TopRow> = rows
        .into_iter()
        .map(|(fp, mut row)| {
            row.current_rate = rates.get(&fp).copied().unwrap_or(0.0);
            row
        })
        .collect();
    rows.sort_by(|a, b| b.current_rate.total_cmp(&a.current_rate));
    if let Some(n) = limit {
        rows.truncate(n);
    }
    Response::ok(&TopSnapshot { rows })
}
