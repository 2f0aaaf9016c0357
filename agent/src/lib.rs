//! Rampart: kernel-level API token enforcement. The library behind the `rampart` binary.
//!
//! - `datapath`: the one facade over the eBPF object (load, maps, attach, pins).
//! - `config`, `policy`, `paths`: operator configuration and version-controlled policy.
//! - `store`: SQLite state (issued tokens, revocations, audit log).
//! - `token`: the plaintext token, its format, the key file, and the issue / rotate /
//!   revoke lifecycle over the store and the kernel.
//! - `control`: the root-only control socket: protocol (requests, every reply body),
//!   server and client.
//! - `daemon`: `rampart run`: start-up order, listener attach, the answer to every
//!   control request (`daemon::ops`), background tasks.
//! - `telemetry`: Prometheus exposition and the one event record (streamed and exported).

pub mod config;
pub mod control;
pub mod daemon;
pub mod datapath;
pub mod paths;
pub mod policy;
pub mod respond;
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

/// The eBPF object built by build.rs from agent-ebpf: the product's programs only.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/rampart.bpf.o"));

/// The test object built by build.rs from agent-ebpf's `rampart-test` bin: the programs
/// only tests and the bench load (`datapath::TestPrograms`).
#[cfg(feature = "test-support")]
pub static TEST_EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/rampart-test.bpf.o"));
