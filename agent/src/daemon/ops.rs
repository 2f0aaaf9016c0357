//! The answer to every control request: one exhaustive `match` over `Request`, so an op
//! added to the protocol does not compile until it is answered here. The `token.*` ops
//! need only a `Lifecycle`; the others go to the daemon through `DaemonOps`, which a test
//! can stand in for.
//!
//! These calls commit to SQLite (fsync) and touch kernel maps: call them from
//! `tokio::task::spawn_blocking` or accept a few milliseconds of blocking per request.

use std::time::Duration;

use crate::{
    control::protocol::{
        ExportBody, Fp, ImportBody, IssuedBody, ListBody, Request, Response, RevokeBody,
        RuntimeView, ShowBody, TokenView,
    },
    datapath::clock::tai_offset_ns,
    error_chain,
    store::{unix_now, ListFilter, TokenRecord},
    token::{IssueRequest, Lifecycle, Resolve},
};

/// Revocation reason when the operator gives none.
pub const DEFAULT_REASON: &str = "revoked by operator";

/// The ops that need the whole daemon (its datapath, listeners and policy reloads).
pub trait DaemonOps {
    fn status(&self) -> Response;
    fn reload(&self) -> Response;
    fn top(&self, limit: Option<usize>) -> Response;
}

/// Answers `req`. `uid` is the caller (`Peer::uid`), recorded in the audit log.
pub fn answer(
    lc: &Lifecycle,
    policy: &dyn Resolve,
    daemon: &dyn DaemonOps,
    uid: u32,
    req: &Request,
) -> Response {
    match req {
        Request::TokenIssue {
            contract,
            scopes,
            ttl_secs,
            label,
        } => {
            let req = IssueRequest {
                contract: contract.clone(),
                scopes: scopes.clone(),
                ttl: ttl_secs.map(Duration::from_secs),
                label: label.clone(),
                not_before: None,
            };
            match lc.issue(policy, &req, uid) {
                Ok(issued) => Response::ok(&IssuedBody {
                    token: issued.token.expose_secret().to_owned(),
                    record: view(lc, &issued.record, false),
                    old: None,
                }),
                Err(e) => Response::error(error_chain(&e)),
            }
        }
        Request::TokenRotate {
            fingerprint,
            grace_secs,
            ttl_secs,
        } => {
            let grace = Duration::from_secs(grace_secs.unwrap_or(0));
            let ttl = ttl_secs.map(Duration::from_secs);
            match lc.rotate(policy, &fingerprint.0, grace, ttl, uid) {
                Ok(rot) => Response::ok(&IssuedBody {
                    token: rot.token.expose_secret().to_owned(),
                    record: view(lc, &rot.record, false),
                    old: Some(view(lc, &rot.old, false)),
                }),
                Err(e) => Response::error(error_chain(&e)),
            }
        }
        Request::TokenRevoke {
            fingerprint,
            reason,
        } => {
            let reason = reason.as_deref().unwrap_or(DEFAULT_REASON);
            let already = lc
                .store()
                .revocation(&fingerprint.0)
                .ok()
                .flatten()
                .is_some();
            match lc.revoke(&fingerprint.0, reason, uid) {
                Ok(rev) => Response::ok(&RevokeBody {
                    fingerprint: Fp(rev.fingerprint),
                    revoked_at: rev.revoked_at,
                    reason: rev.reason,
                    already,
                }),
                Err(e) => Response::error(error_chain(&e)),
            }
        }
        Request::TokenList {
            expiring_within_secs,
            idle_secs,
            all,
            contract,
            after,
            limit,
        } => {
            let filter = ListFilter {
                expiring_within: expiring_within_secs.map(Duration::from_secs),
                idle_for: idle_secs.map(Duration::from_secs),
                include_inactive: *all,
                contract: contract.clone(),
            };
            let limit = limit.map_or(usize::MAX, |l| l.max(1) as usize);
            match lc.list_page(&filter, after.map(|f| f.0), limit) {
                Ok(page) => {
                    let offset = tai_offset_ns();
                    let now = unix_now();
                    Response::ok(&ListBody {
                        tokens: page
                            .tokens
                            .iter()
                            .map(|(rec, rt)| {
                                let rt =
                                    rt.as_ref().map(|rt| RuntimeView::from_runtime(rt, offset));
                                TokenView::new(rec, now, rt)
                            })
                            .collect(),
                        next: page.next.map(Fp),
                    })
                }
                Err(e) => Response::error(error_chain(&e)),
            }
        }
        Request::TokenShow { fingerprint } => match lc.store().get(&fingerprint.0) {
            Ok(Some(rec)) => Response::ok(&ShowBody {
                record: view(lc, &rec, true),
            }),
            Ok(None) => Response::error(format!("no token with fingerprint {}", fingerprint.0)),
            Err(e) => Response::error(error_chain(&e)),
        },
        Request::TokenImport { path } => match std::fs::read_to_string(path) {
            Ok(text) => match crate::token_io::import(lc, policy, &text, uid) {
                Ok(imported) => Response::ok(&ImportBody { imported }),
                Err(e) => Response::error(error_chain(&e)),
            },
            Err(e) => Response::error(format!("cannot read {path}: {e}")),
        },
        Request::TokenExport => match crate::token_io::export(lc) {
            Ok(tokens) => Response::ok(&ExportBody { tokens }),
            Err(e) => Response::error(error_chain(&e)),
        },
        Request::Status => daemon.status(),
        Request::Reload => daemon.reload(),
        Request::Top { limit } => daemon.top(*limit),
        Request::EventsSubscribe { .. } => {
            Response::error("events.subscribe is answered by the stream handler")
        }
    }
}

fn view(lc: &Lifecycle, rec: &TokenRecord, with_runtime: bool) -> TokenView {
    let runtime = with_runtime
        .then(|| lc.enforcer().runtime(rec.fingerprint))
        .flatten()
        .map(|rt| RuntimeView::from_runtime(&rt, tai_offset_ns()));
    TokenView::new(rec, unix_now(), runtime)
}
