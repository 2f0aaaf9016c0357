//! Types and logic shared by the Rampart eBPF programs and the userspace agent.
//!
//! Everything that crosses the kernel/user boundary is defined here once, `#[repr(C)]`
//! with explicit padding. Logic that must agree on both sides (the token fingerprint,
//! GCRA admission, HTTP method classification) lives here too, with one set of tests.
#![no_std]

pub mod gcra;
pub mod http;
pub mod ports;
pub mod respond;
pub mod siphash;
pub mod swar;
pub mod types;

pub use types::*;
