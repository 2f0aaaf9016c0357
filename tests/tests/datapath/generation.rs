//! Token generations: what one application writes (a reload, an import) is seen by the
//! programs at one instant, while they judge requests throughout (agent/src/datapath/
//! switch.rs).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

use agent_common::{deny_action, http::method, mode, Fingerprint, Scope, TokenInfo};
use rampart::datapath::TestRunner;
use rampart_tests::packet::{syn_of, Frame, Http};

use crate::{fp, listener, Fixture, PORT, XDP_DROP, XDP_PASS};

/// The probed tokens, in the order a reader probes them: `X` and `Y` change scope between
/// the generations, `Z` is only in A, `W` only in B.
const X: &str = "rmp_GenerationProbeX-0123456789abcdefghijk";
const Z: &str = "rmp_GenerationProbeZ-0123456789abcdefghijk";
const W: &str = "rmp_GenerationProbeW-0123456789abcdefghijk";
const Y: &str = "rmp_GenerationProbeY-0123456789abcdefghijk";
const PROBES: [(&str, &str); 4] = [("X", X), ("Z", Z), ("W", W), ("Y", Y)];
/// Whether each probe's request is allowed in generation A (in B, the opposite).
const ALLOWED_IN_A: [bool; 4] = [true, true, false, true];

/// Tokens each generation also changes, written between `X` and the others: a switch
/// that wrote entries one after another would take long enough for a reader to see `X`
/// changed and `Y` not. Fewer than `NEXT_TOKENS` holds at these map sizes (a quarter of
/// 4096), so each generation is one switch.
const FILLERS: u64 = 1000;
const ROUNDS: u32 = 12;

fn filler(i: u64) -> Fingerprint {
    Fingerprint([0x6e6e_7261_7469_6f6e, i])
}

/// Scope 0 (`/v1/reports/`, set by `Fixture::new`) or scope 1 (`/other/`).
fn scoped(scope: u32) -> TokenInfo {
    TokenInfo {
        scopes: 1 << scope,
        ..TokenInfo::default()
    }
}

/// Generation A (`b` false) or B: the entries written and the tokens removed.
fn generation(b: bool) -> (Vec<(Fingerprint, TokenInfo)>, Vec<Fingerprint>) {
    let moved = scoped(u32::from(b));
    let mut entries = vec![(fp(X), moved)];
    entries.extend((0..FILLERS).map(|i| (filler(i), scoped(u32::from(b != (i % 2 == 0))))));
    let (present, absent) = if b { (W, Z) } else { (Z, W) };
    entries.push((fp(present), scoped(0)));
    entries.push((fp(Y), moved));
    (entries, vec![fp(absent)])
}

/// What the reader and the writer share.
struct Shared {
    /// The generation switch under way: odd rounds switch to B, even ones to A.
    round: AtomicU32,
    /// The last round in which the reader saw the whole of the new generation.
    caught_up: AtomicU32,
    /// Reader passes that saw a probe of the new generation before one of the old.
    mixed: AtomicUsize,
    /// Reader passes made wholly within one round.
    passes: AtomicUsize,
    stop: AtomicBool,
}

/// Probes `X`, `Z`, `W`, `Y` in turn, each on a new connection, until told to stop.
fn read(runner: &TestRunner, shared: &Shared) {
    let mut conn: u32 = 0;
    let mut allowed = |token: &str| {
        conn += 1;
        let mut f = Frame::tcp(PORT, &Http::get("/v1/reports/q").bearer(token).bytes());
        f.sport = 1024 + (conn % 60_000) as u16;
        // A 4-tuple comes back every 60 000 connections: with an initial sequence number
        // ahead of its last one, as a real client's would be.
        f.seq = 1000 + (conn / 60_000) * 1_000_000;
        let frame = f.build();
        let syn = syn_of(&frame).expect("a TCP frame");
        runner.run(&syn).expect("BPF_PROG_TEST_RUN of a SYN");
        match runner.run(&frame).expect("BPF_PROG_TEST_RUN of a request") {
            XDP_PASS => true,
            XDP_DROP => false,
            other => panic!("unexpected XDP return {other}"),
        }
    };
    while !shared.stop.load(Ordering::SeqCst) {
        let round = shared.round.load(Ordering::SeqCst);
        let seen: Vec<bool> = PROBES.iter().map(|(_, t)| allowed(t)).collect();
        if shared.round.load(Ordering::SeqCst) != round || round == 0 {
            continue;
        }
        shared.passes.fetch_add(1, Ordering::SeqCst);
        let to_b = round % 2 == 1;
        let new: Vec<bool> = seen
            .iter()
            .zip(ALLOWED_IN_A)
            .map(|(s, a)| *s == (a != to_b))
            .collect();
        // Within one pass, once a probe sees the new generation, every later one must.
        if new.windows(2).any(|w| w[0] && !w[1]) {
            shared.mixed.fetch_add(1, Ordering::SeqCst);
        }
        if new.iter().all(|n| *n) {
            shared.caught_up.store(round, Ordering::SeqCst);
        }
    }
}

/// A reader runs the XDP program over requests with four tokens, one after another, while
/// generations switch back and forth: two tokens change scope, one is removed, one added,
/// and a thousand other entries change. No reader pass may see a token of the new
/// generation and then one of the old.
#[test]
fn a_generation_is_seen_at_one_instant() {
    let mut f = Fixture::new(listener(mode::ENFORCE, deny_action::DROP));
    let mut other = Scope {
        methods: method::GET,
        prefix_len: 7,
        ..Default::default()
    };
    other.prefix[..7].copy_from_slice(b"/other/");
    f.dp.set_scope(1, &other).unwrap();
    let (entries, removed) = generation(false);
    f.dp.switch_generation(entries, &removed).unwrap();
    let runner = f.dp.xdp_test_runner().unwrap();
    let shared = Shared {
        round: AtomicU32::new(0),
        caught_up: AtomicU32::new(0),
        mixed: AtomicUsize::new(0),
        passes: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
    };
    std::thread::scope(|s| {
        let reader = s.spawn(|| read(&runner, &shared));
        for round in 1..=ROUNDS {
            let before = f.dp.generation();
            shared.round.store(round, Ordering::SeqCst);
            let (entries, removed) = generation(round % 2 == 1);
            f.dp.switch_generation(entries, &removed).unwrap();
            assert_eq!(f.dp.generation(), before + 1, "one switch per round");
            // The next round starts once the reader has seen this one's generation whole.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            while shared.caught_up.load(Ordering::SeqCst) < round {
                assert!(
                    !reader.is_finished() && std::time::Instant::now() < deadline,
                    "the reader never saw generation {round} whole"
                );
                std::thread::yield_now();
            }
        }
        shared.stop.store(true, Ordering::SeqCst);
        reader.join().expect("the reader");
    });
    assert!(shared.passes.load(Ordering::SeqCst) >= ROUNDS as usize);
    assert_eq!(
        shared.mixed.load(Ordering::SeqCst),
        0,
        "reader passes that saw a token of the new generation, then one of the old"
    );
    // An even number of switches: back in generation A.
    assert!(f.dp.token(&fp(Z)).is_some(), "Z is in generation A");
    assert!(f.dp.token(&fp(W)).is_none(), "W is not in generation A");
}
