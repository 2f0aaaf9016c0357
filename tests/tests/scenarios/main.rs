//! The end-to-end scenarios of issue 4: real clients (curl, openssl s_client) through a TLS
//! nginx gateway to recording upstreams, with Rampart judging the nginx → upstream hop by
//! native XDP on the upstream veth and by TC on the gateway's loopback. Every scenario
//! asserts what the client and the upstream actually saw.
//!
//! Needs root, the Debian packages of `cargo xtask setup` (nginx, curl, openssl, iproute2)
//! and `cargo build -p rampart`. Run one at a time:
//! `cargo test -p rampart-tests --test scenarios -- --test-threads=1 --nocapture`.
//! Measured figures are printed and merged into `target/bench/scenarios.json`.
//!
//! By concern: `enforcement` (served, denied, scopes, observe mode), `lifecycle`
//! (revocation, expiry), `ramp` (GCRA rates and penalty), `resilience` (crash, restart,
//! reload), `respond` (the statuses a denied client is told) and `telemetry` (counters, events, metrics, no plaintext); `support` holds what
//! they share.

mod enforcement;
mod lifecycle;
mod ramp;
mod resilience;
mod respond;
mod support;
mod telemetry;
