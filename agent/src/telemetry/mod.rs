//! Telemetry: what the daemon shows operators about the datapath.
//!
//! - `metrics`: the Prometheus registry, fed from periodic map snapshots, and its HTTP endpoint.
//! - `event`: the one event model: a datapath decision or an expiry warning as a record
//!   (JSON line or human one-liner), streamed to subscribers and exported alike, and the
//!   filter both use.
//! - `export`: an append-only JSON-lines event file with size-based rotation.
//! - `top`: rendering `rampart top`'s rows (`control::protocol::TopRow`) and rate estimation.
//!
//! Only fingerprints ever pass through here; the datapath never hands plaintext tokens up.

pub mod event;
pub mod export;
pub mod http;
pub mod metrics;
pub mod top;

use std::{net::SocketAddr, path::PathBuf};

pub use event::{EventContext, EventFilter, EventRecord, ExpiryRecord, Record};
pub use export::EventExporter;
pub use http::serve_metrics;
pub use metrics::{BuildInfo, DatapathSnapshot, ListenerRequests, MapFill, Metrics, TokenCounts};
pub use top::{render_frame, RateEstimator};

/// Errors of the telemetry area.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot listen for metrics scrapes on {addr}")]
    MetricsBind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open event export file {path}")]
    ExportOpen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write event export file {path}")]
    ExportWrite {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot rotate event export file {from} to {to}")]
    ExportRotate {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot remove old event export file {path}")]
    ExportRemove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot serialise event record")]
    EventSerialize(#[source] serde_json::Error),
}
