//! Rampart: kernel-level API token enforcement. The library behind the `rampart` binary.
//!
//! - `datapath`: the one facade over the eBPF object (load, maps, attach, pins).
//! - `config`, `policy`, `paths`: operator configuration and version-controlled policy.
//! - `store`: SQLite state (issued tokens, revocations, audit log).
//! - `control`: the root-only control socket protocol, server and client.
//! - `telemetry`: Prometheus exposition and the event stream.

pub mod config;
pub mod control;
pub mod daemon;
pub mod datapath;
pub mod paths;
pub mod policy;
pub mod store;
pub mod telemetry;
pub mod token;
pub mod token_io;

/// The eBPF object built by build.rs from agent-ebpf.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/rampart.bpf.o"));
