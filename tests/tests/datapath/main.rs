//! The XDP and TC programs through BPF_PROG_TEST_RUN: every verdict, IPv4/IPv6/VLAN,
//! header name/scheme/whitespace variants, token position, 4096-byte tokens, malformed and
//! incomplete blocks, non-HTTP traffic, uninspected ports; resets; events; GCRA exactness
//! with an emulated clock; kernel/userspace fingerprint parity; pins adopted and migrated.
//!
//! Needs root and BPF (kernel ≥ 6.1: bpf_loop, bpf_ktime_get_tai_ns, BPF atomics).
//!
//! This file is the harness (`Fixture`, the `Lease` of a verified program set, the test
//! tokens and helpers); the tests are split by concern:
//! - `fixtures`: the case table run through both hooks, and the parser's edges (LF at
//!   every scan offset, every length across the copy edges, fingerprint parity);
//! - `gcra`: the token's runtime state: throttling, ramp stages, penalties, admission
//!   counts, state slots;
//! - `listeners`: observe mode, per-listener defaults, which listener judges a packet;
//! - `events`: what a denial streams, and the flood cap;
//! - `resets`: the reset action's RSTs, also across a restart;
//! - `migration`: pins adopted by a restarted daemon and earlier layouts moved over;
//! - `generation`: a generation of token entries seen by the programs at one instant;
//! - `budget`: the verifier's instruction counts.
//!
//! One test target (`datapath`): `cargo xtask test` runs it in the 6.1 VM as one process
//! that verifies the programs once (see `Lease`).

mod budget;
mod events;
mod fixtures;
mod gcra;
mod generation;
mod listeners;
mod migration;
mod resets;
mod stream;

use agent_common::{
    gcra::NANOS_PER_SEC, siphash::fingerprint, Contract, FingerprintKey, GlobalConfig,
    ListenerConfig, ListenerKey, Scope, Stage, TokenInfo, Verdict, CLOCK_FIXED, TOKEN_ANY_SCOPE,
    VERDICT_COUNT,
};
use rampart::datapath::{Datapath, LoadOptions};
use rampart_tests::packet::{syn_of, Frame, Http};

const PORT: u16 = 8080;
const NOW: u64 = 1_900_000_000 * NANOS_PER_SEC;
const KEY: FingerprintKey = FingerprintKey([0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210]);

const GOOD: &str = "rmp_GoodToken-0123456789_abcdefghijklmnopqrstuv";
const SCOPED: &str = "rmp_ScopedToken.0123456789~abcdefghijklmn";
const REVOKED: &str = "rmp_RevokedToken/0123456789+abcdefghijklm==";
const EXPIRED: &str = "rmp_ExpiredToken0123456789abcdefghijklmnop";
const FUTURE: &str = "rmp_FutureToken0123456789abcdefghijklmnopq";
const SLOW: &str = "rmp_SlowToken0123456789abcdefghijklmnopqrs";
const UNKNOWN: &str = "rmp_NobodyKnowsThisToken0123456789abcdefgh";

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Hook {
    Xdp,
    Tc,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fate {
    Passes,
    Drops,
}

struct Fixture {
    dp: Lease,
}

/// Unpinned program sets loaded by earlier tests of this process, reset to fresh.
/// Verifying the programs is most of a test's time under emulation (10–20 s a program
/// in the 6.1 VM), so each process verifies them once; every test still starts from
/// empty maps (`Datapath::reset_to_fresh`).
static IDLE: std::sync::Mutex<Vec<Datapath>> = std::sync::Mutex::new(Vec::new());

/// A datapath for one test: back to `IDLE` when the test ends well and its maps can be
/// reset (not pinned, event ring not taken); dropped otherwise.
struct Lease(Option<Datapath>);

impl Lease {
    /// An idle program set, or a freshly loaded one; the test key and the emulated
    /// clock at NOW, nothing else configured.
    fn unpinned() -> Lease {
        let idle = IDLE.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let dp = match idle {
            Some(mut dp) => {
                configure(&mut dp);
                dp
            }
            None => loaded(None),
        };
        Lease(Some(dp))
    }
}

impl std::ops::Deref for Lease {
    type Target = Datapath;
    fn deref(&self) -> &Datapath {
        self.0.as_ref().expect("leased")
    }
}

impl std::ops::DerefMut for Lease {
    fn deref_mut(&mut self) -> &mut Datapath {
        self.0.as_mut().expect("leased")
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(mut dp) = self.0.take() else { return };
        if std::thread::panicking() || dp.pin_dir().is_some() {
            return;
        }
        match dp.reset_to_fresh() {
            Ok(()) => IDLE.lock().unwrap_or_else(|e| e.into_inner()).push(dp),
            // The test took the ring: its records cannot be drained here.
            Err(rampart::datapath::DatapathError::EventsTaken) => {}
            Err(e) => panic!("resetting the datapath for the next test: {e}"),
        }
    }
}

fn require_root() {
    assert!(
        unsafe { libc::geteuid() } == 0,
        "the datapath tests load BPF programs: run them as root (cargo xtask test does)"
    );
}

fn stage(after_s: u64, rate: u64, burst: u64) -> Stage {
    let interval = NANOS_PER_SEC / rate;
    Stage {
        after_ns: after_s * NANOS_PER_SEC,
        interval_ns: interval,
        tolerance_ns: burst * interval,
    }
}

fn contract(stages: &[Stage], penalty: (u32, u64)) -> Contract {
    let mut c = Contract {
        n_stages: stages.len() as u32,
        penalty_stages: penalty.0,
        penalty_ns: penalty.1,
        ..Default::default()
    };
    c.stages[..stages.len()].copy_from_slice(stages);
    c
}

fn fp(token: &str) -> agent_common::Fingerprint {
    fingerprint(&KEY, token.as_bytes())
}

/// Listener 0, denying missing, unknown and incomplete tokens.
fn listener(mode: u8, action: u8) -> ListenerConfig {
    rampart_tests::attach_support::listener(0, mode, action)
}

/// The listener key of `PORT` on interface `ifindex` (0: every interface).
fn listener_key(ifindex: u32) -> ListenerKey {
    ListenerKey {
        ifindex,
        port: PORT,
        _pad: 0,
    }
}

/// Small maps, pinned under `pin_dir` if given.
fn load_options(pin_dir: Option<std::path::PathBuf>) -> LoadOptions {
    LoadOptions {
        max_tokens: 4096,
        max_revoked: 4096,
        token_stats: 4096,
        ring_bytes: 1 << 20,
        max_flows: agent_common::DEFAULT_MAX_FLOWS,
        pin_dir,
    }
}

/// The datapath with small maps (pinned under `pin_dir` if given), the test key and the
/// emulated clock at NOW; nothing else configured.
fn loaded(pin_dir: Option<std::path::PathBuf>) -> Datapath {
    let mut dp = Datapath::load(load_options(pin_dir)).expect("load the datapath");
    configure(&mut dp);
    dp
}

/// The test key and the emulated clock at NOW.
fn configure(dp: &mut Datapath) {
    dp.set_config(&GlobalConfig {
        key: KEY,
        events_per_sec: 1_000_000,
        clock_mode: CLOCK_FIXED,
        fixed_now_ns: NOW,
    })
    .unwrap();
}

/// An empty bpffs path of this test process for `tag`'s pins.
fn fresh_pin_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::path::PathBuf::from(format!(
        "/sys/fs/bpf/rampart-test-{}-{tag}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

impl Fixture {
    /// `loaded` with pins under `pins` (a fresh set, or the maps an earlier load left
    /// there), and nothing else configured.
    fn pinned(pins: &std::path::Path) -> Fixture {
        Fixture {
            dp: Lease(Some(loaded(Some(pins.to_path_buf())))),
        }
    }

    fn new(l: ListenerConfig) -> Fixture {
        require_root();
        let mut dp = Lease::unpinned();
        // ifindex 0: any interface (test runs happen on the loopback device).
        dp.set_listener(listener_key(0), l).unwrap();
        dp.set_contract(0, &contract(&[stage(0, 1_000_000, 1_000_000)], (0, 0)))
            .unwrap();
        dp.set_contract(1, &contract(&[stage(0, 1, 0)], (0, 0)))
            .unwrap();
        let mut reports = Scope {
            methods: agent_common::http::method::GET | agent_common::http::method::HEAD,
            prefix_len: 12,
            ..Default::default()
        };
        reports.prefix[..12].copy_from_slice(b"/v1/reports/");
        dp.set_scope(0, &reports).unwrap();
        let any = TokenInfo {
            contract: 0,
            flags: TOKEN_ANY_SCOPE,
            ..Default::default()
        };
        dp.install_token(fp(GOOD), any).unwrap();
        dp.install_token(fp(REVOKED), any).unwrap();
        dp.revoke(fp(REVOKED), NOW).unwrap();
        dp.install_token(
            fp(SCOPED),
            TokenInfo {
                flags: 0,
                scopes: 1,
                ..any
            },
        )
        .unwrap();
        dp.install_token(
            fp(EXPIRED),
            TokenInfo {
                expires_ns: NOW - 1,
                ..any
            },
        )
        .unwrap();
        dp.install_token(
            fp(FUTURE),
            TokenInfo {
                not_before_ns: NOW + 1,
                ..any
            },
        )
        .unwrap();
        dp.install_token(fp(SLOW), TokenInfo { contract: 1, ..any })
            .unwrap();
        Fixture { dp }
    }

    fn counts(&self) -> [u64; VERDICT_COUNT] {
        self.dp.verdict_counts(0).unwrap()
    }

    /// Runs one frame as the first data of a new connection: every connection the
    /// programs knew is forgotten and the frame's SYN goes first. Returns the program's
    /// return code, the frame it left, and the verdict it counted (None: not counted,
    /// i.e. not a listener's traffic).
    fn run(&mut self, hook: Hook, frame: &[u8]) -> (u32, Vec<u8>, Option<Verdict>) {
        self.dp.forget_flows().unwrap();
        if let Some(syn) = syn_of(frame) {
            let (_, _, counted) = self.send(hook, &syn);
            assert_eq!(counted, None, "a SYN is no request");
        }
        self.send(hook, frame)
    }

    /// Runs one frame of the connections as the programs track them (state carries over);
    /// at most one request may be counted.
    fn send(&mut self, hook: Hook, frame: &[u8]) -> (u32, Vec<u8>, Option<Verdict>) {
        let (ret, out, counted) = self.send_counting(hook, frame);
        assert!(counted.len() <= 1, "one request counted twice: {counted:?}");
        for (_, n) in &counted {
            assert_eq!(*n, 1);
        }
        (ret, out, counted.first().map(|(v, _)| *v))
    }

    /// Runs one frame of the connections as the programs track them: the return code,
    /// the frame it left, and every verdict counted (a segment may carry several
    /// requests).
    fn send_counting(&mut self, hook: Hook, frame: &[u8]) -> (u32, Vec<u8>, Vec<(Verdict, u64)>) {
        let before = self.counts();
        let mut out = vec![0u8; frame.len() + 512];
        let r = match hook {
            Hook::Xdp => self.dp.test_run_xdp(frame, &mut out, 1),
            Hook::Tc => self.dp.test_run_tc(frame, &mut out, 1),
        }
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of a {}-byte frame: {e}", frame.len()));
        out.truncate(r.data_size_out as usize);
        let after = self.counts();
        let counted = Verdict::ALL
            .into_iter()
            .filter(|v| after[*v as usize] != before[*v as usize])
            .map(|v| (v, after[v as usize] - before[v as usize]))
            .collect();
        (r.return_value, out, counted)
    }

    fn fate(&mut self, hook: Hook, frame: &[u8]) -> (Fate, Option<Verdict>) {
        let (ret, _, v) = self.run(hook, frame);
        (fate_of(hook, ret), v)
    }
}

/// What a program's return code does with the frame (drop or pass; nothing else is
/// expected here).
fn fate_of(hook: Hook, ret: u32) -> Fate {
    match (hook, ret) {
        (Hook::Xdp, XDP_PASS) | (Hook::Tc, TC_ACT_OK) => Fate::Passes,
        (Hook::Xdp, XDP_DROP) | (Hook::Tc, TC_ACT_SHOT) => Fate::Drops,
        other => panic!("unexpected return {other:?}"),
    }
}

fn req(h: Http) -> Vec<u8> {
    Frame::tcp(PORT, &h.bytes()).build()
}
