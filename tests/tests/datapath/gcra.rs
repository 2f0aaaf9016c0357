//! A token's runtime state: throttling, GCRA at ramp-stage boundaries, breach penalties,
//! admissions counted in the state, and state slots reused from a clean start.

use agent_common::{
    deny_action, gcra::NANOS_PER_SEC, mode, TokenInfo, TokenState, Verdict, TOKEN_ANY_SCOPE,
};
use rampart_tests::packet::Http;

use crate::{contract, fp, listener, req, stage, Fate, Fixture, Hook, GOOD, NOW, REVOKED, SLOW};

#[test]
fn throttled_when_contract_exceeded() {
    let mut f = Fixture::new(listener(mode::ENFORCE, deny_action::DROP));
    for hook in [Hook::Xdp, Hook::Tc] {
        f.dp.reset_token_state(&fp(SLOW)).unwrap();
        let frame = req(Http::get("/x").bearer(SLOW));
        // 1/s, burst 0: the first request at an instant passes, the second is throttled.
        assert_eq!(f.fate(hook, &frame), (Fate::Passes, Some(Verdict::Allow)));
        assert_eq!(
            f.fate(hook, &frame),
            (Fate::Drops, Some(Verdict::Throttled))
        );
        let st = f.dp.token_state(&fp(SLOW)).expect("state after use");
        assert_eq!(st.breaches, 1);
        assert_eq!(st.first_seen_ns, NOW);
    }
}

/// Sends one request per `step_ms` from `from_ms` to `to_ms` (exclusive) of emulated time;
/// returns how many were admitted.
fn offer(f: &mut Fixture, token: &str, from_ms: u64, to_ms: u64, step_ms: u64) -> u64 {
    let frame = req(Http::get("/").bearer(token));
    let mut admitted = 0;
    let mut t = from_ms;
    while t < to_ms {
        let mut cfg = f.dp.config().unwrap();
        cfg.fixed_now_ns = NOW + t * 1_000_000;
        f.dp.set_config(&cfg).unwrap();
        match f.fate(Hook::Xdp, &frame) {
            (Fate::Passes, Some(Verdict::Allow)) => admitted += 1,
            (Fate::Drops, Some(Verdict::Throttled)) => {}
            other => panic!("unexpected {other:?} at {t} ms"),
        }
        t += step_ms;
    }
    admitted
}

#[test]
fn gcra_exact_at_stage_boundaries() {
    let mut f = Fixture::new(listener(mode::ENFORCE, deny_action::DROP));
    // 10/s burst 2 for 10 s, then 20/s burst 4 for 10 s, then 40/s burst 4.
    let ramp = contract(
        &[stage(0, 10, 2), stage(10, 20, 4), stage(20, 40, 4)],
        (0, 0),
    );
    f.dp.set_contract(2, &ramp).unwrap();
    const T: &str = "rmp_RampToken0123456789abcdefghijklmnopqrs";
    f.dp.install_token(
        fp(T),
        TokenInfo {
            contract: 2,
            flags: TOKEN_ANY_SCOPE,
            ramp_start_ns: NOW,
            ..Default::default()
        },
    )
    .unwrap();
    // Demand every 10 ms. Stage 0: burst + 1 at t=0, then one per 100 ms (t=100..9900).
    assert_eq!(offer(&mut f, T, 0, 10_000, 10), 3 + 99);
    // Stage 1 from 10 s: TAT is 10 000 ms; one per 50 ms on the grid, the burst is already
    // spent on keeping up, so exactly 200 in 10 s.
    assert_eq!(offer(&mut f, T, 10_000, 20_000, 10), 200);
    assert_eq!(f.dp.token_state(&fp(T)).unwrap().stage, 1);
    // Stage 2: 40/s, tolerance 100 ms. Stage 1 ended with TAT = t + 250 ms (its burst of
    // 4 × 50 ms in use), so the first 100 ms of stage 2 drain that debt: admissions start at
    // 20 100 ms and run 4 per 100 ms on the 10 ms grid (at +0, +30, +50, +80): 49 × 4.
    assert_eq!(offer(&mut f, T, 20_000, 25_000, 10), 196);
    assert_eq!(f.dp.token_state(&fp(T)).unwrap().stage, 2);
    // Idle for 10 s refills the burst: burst + 1 at once, then nothing at the same instant.
    assert_eq!(offer(&mut f, T, 35_000, 35_001, 1), 1);
    let frame = req(Http::get("/").bearer(T));
    let extra = (0..10)
        .filter(|_| f.fate(Hook::Xdp, &frame).1 == Some(Verdict::Allow))
        .count();
    assert_eq!(extra, 4, "burst 4 on top of the first");
}

#[test]
fn breach_penalty_demotes_for_cooldown() {
    let mut f = Fixture::new(listener(mode::ENFORCE, deny_action::DROP));
    // 10/s then (after 1 s) 100/s; a breach demotes one stage for 2 s.
    let ramp = contract(&[stage(0, 10, 0), stage(1, 100, 0)], (1, 2 * NANOS_PER_SEC));
    f.dp.set_contract(3, &ramp).unwrap();
    const T: &str = "rmp_PenaltyToken0123456789abcdefghijklmno";
    f.dp.install_token(
        fp(T),
        TokenInfo {
            contract: 3,
            flags: TOKEN_ANY_SCOPE,
            ramp_start_ns: NOW,
            ..Default::default()
        },
    )
    .unwrap();
    // Stage 1 at 100/s, offered every 5 ms (200/s): breaches from the start.
    let admitted = offer(&mut f, T, 1_000, 1_100, 5);
    let st: TokenState = f.dp.token_state(&fp(T)).unwrap();
    assert!(st.breaches > 0);
    assert_eq!(st.stage, 0, "demoted to stage 0 while penalised");
    assert!(
        admitted <= 2 + 1,
        "at most one stage-1 admission, then 10/s: got {admitted}"
    );
    // During the cool-down (breaches keep extending it) the rate stays at stage 0's 10/s.
    let during = offer(&mut f, T, 1_100, 2_100, 5);
    assert_eq!(during, 10);
    // Stop breaching: once the cool-down after the last breach ends, stage 1 applies again.
    let last_breach = f.dp.token_state(&fp(T)).unwrap().penalty_until_ns;
    let resume_ms = (last_breach - NOW) / 1_000_000 + 10;
    let after = offer(&mut f, T, resume_ms, resume_ms + 1_000, 10);
    assert_eq!(after, 100);
    assert_eq!(f.dp.token_state(&fp(T)).unwrap().stage, 1);
}

/// Admissions are counted in the token's runtime state (not TOKEN_STATS); `token_stats`
/// reports them, and a ramp restart (contract change) keeps them.
#[test]
fn allowed_counts_live_in_the_state_and_survive_a_ramp_restart() {
    let mut f = Fixture::new(listener(mode::ENFORCE, deny_action::DROP));
    let frame = req(Http::get("/v1/x").bearer(GOOD));
    let allowed = |f: &Fixture| f.dp.token_stats(&fp(GOOD)).by_verdict[Verdict::Allow as usize];
    // XDP only: TC shares the judge, and each program verified costs seconds in the VM.
    for _ in 0..3 {
        assert_eq!(
            f.fate(Hook::Xdp, &frame),
            (Fate::Passes, Some(Verdict::Allow))
        );
    }
    assert_eq!(f.dp.token_state(&fp(GOOD)).unwrap().allowed, 3);
    assert_eq!(allowed(&f), 3);
    f.dp.reset_token_state(&fp(GOOD)).unwrap();
    assert!(f.dp.token_state(&fp(GOOD)).is_none());
    assert_eq!(
        allowed(&f),
        3,
        "a ramp restart must not lose the token's counts"
    );
    assert_eq!(
        f.fate(Hook::Tc, &frame),
        (Fate::Passes, Some(Verdict::Allow))
    );
    assert_eq!(allowed(&f), 4);
    // Other verdicts of known tokens are still per-CPU TOKEN_STATS counters.
    let revoked = req(Http::get("/v1/x").bearer(REVOKED));
    f.fate(Hook::Xdp, &revoked);
    assert_eq!(
        f.dp.token_stats(&fp(REVOKED)).by_verdict[Verdict::Revoked as usize],
        1
    );
}

/// The programs find a token's runtime state through its TOKENS entry's slot: a fresh
/// slot starts the ramp at the first request, removing a token frees its slot (zeroed),
/// and a token installed later in the same slot starts from nothing, not from the removed
/// token's GCRA position.
#[test]
fn a_reused_state_slot_starts_fresh() {
    let mut f = Fixture::new(listener(mode::ENFORCE, deny_action::DROP));
    // Contract 1: one request per second, no burst.
    let one_per_sec = TokenInfo {
        contract: 1,
        flags: TOKEN_ANY_SCOPE,
        ..Default::default()
    };
    let tokens: Vec<String> = (0..3)
        .map(|i| format!("rmp_SlotToken{i}_0123456789abcdefghij"))
        .collect();
    let frame = |t: &str| req(Http::get("/v1/x").bearer(t));
    f.dp.install_token(fp(&tokens[0]), one_per_sec).unwrap();
    assert_eq!(f.dp.token_state(&fp(&tokens[0])), None);
    assert_eq!(
        f.fate(Hook::Xdp, &frame(&tokens[0])).1,
        Some(Verdict::Allow)
    );
    let st =
        f.dp.token_state(&fp(&tokens[0]))
            .expect("state after the first request");
    assert_eq!(
        (st.first_seen_ns, st.ramp_start_ns, st.contract),
        (NOW, NOW, 1)
    );
    assert_eq!(
        f.fate(Hook::Xdp, &frame(&tokens[0])).1,
        Some(Verdict::Throttled),
        "1/s without burst: the second request in the same instant is throttled"
    );
    let slot = f.dp.token(&fp(&tokens[0])).unwrap().state_slot;
    f.dp.remove_token(&fp(&tokens[0])).unwrap();
    // Take every never-used slot first (the fixture's tokens hold some), so the next
    // install gets the freed one.
    let mut fillers = 0u32;
    let reused = loop {
        let t = format!("rmp_FillerToken{fillers}_0123456789abcdef");
        f.dp.install_token(fp(&t), one_per_sec).unwrap();
        let s = f.dp.token(&fp(&t)).unwrap().state_slot;
        fillers += 1;
        if s == slot {
            break t;
        }
        assert!(fillers <= 4096, "the freed slot never came back");
    };
    assert_eq!(
        f.dp.token_state(&fp(&reused)),
        None,
        "a reused slot starts zeroed"
    );
    assert_eq!(
        f.fate(Hook::Xdp, &frame(&reused)).1,
        Some(Verdict::Allow),
        "the removed token's GCRA position must not carry over"
    );
}
