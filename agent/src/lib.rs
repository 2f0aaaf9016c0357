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

/// An error and its sources on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        s.push_str(": ");
        s.push_str(&src.to_string());
        cur = src.source();
    }
    s
}

/// The eBPF object built by build.rs from agent-ebpf.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/rampart.bpf.o"));
