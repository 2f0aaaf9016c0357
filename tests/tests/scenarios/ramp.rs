//! The ramp contract: GCRA admission at each stage's rate, measured against the model, and
//! the breach penalty.

use std::{
    collections::BTreeMap,
    thread,
    time::{Duration, Instant},
};

use rampart_tests::{
    client::Request,
    gateway::{Gateway, Side},
};
use serde_json::{json, Value};

use super::support::*;

/// Expected admissions of a GCRA stage under continuous demand.
///
/// `admit` passes a request at `now` when `max(TAT, now) − now ≤ τ` (τ = burst × T) and
/// then sets TAT to `max(TAT, now) + T`. From an idle start at t = 0 the k-th admission
/// (k = 0, 1, …) needs `k·T − τ ≤ now`, so over [0, D] exactly `⌊(D + τ)/T⌋ + 1 =
/// ⌊rate·D⌋ + burst + 1` pass: the burst (plus the first request) at once, then one per T.
/// While the demand outruns the rate TAT stays ahead of `now`, so it grows by exactly T
/// per admission and sparse arrivals (here every ~5 ms) add no drift.
///
/// At a stage change the TAT carries over: after `K` admissions TAT = K·T₁. The new stage
/// admits once `TAT − now ≤ τ₂`, i.e. from `s = max(D₁, K·T₁ − τ₂)`, then one per T₂; over
/// [D₁, W] that is `⌊(W − s)/T₂⌋ + 1`. With 20/s burst 5 then 40/s burst 5: K = 206,
/// TAT = 10.3 s, s = 10.175 s, so the 40/s stage starts 175 ms (7 intervals) late.
/// Returns (stage 1 over [0, d1), stage 2 over [d1, w)).
fn gcra_expected(rate1: f64, burst1: f64, d1: f64, rate2: f64, burst2: f64, w: f64) -> (f64, f64) {
    let (t1, t2) = (1.0 / rate1, 1.0 / rate2);
    let k1 = (rate1 * d1 + burst1).floor() + 1.0;
    let start2 = d1.max(k1 * t1 - burst2 * t2);
    let k2 = ((w - start2) / t2).floor() + 1.0;
    (k1, k2.max(0.0))
}

/// 5. Ramp accuracy: contract 20/s burst 5 for 10 s, then 40/s (a quarter in the VM); offered 200 rps for 20 s
///    from 2 connections. Admitted per stage within ±3 % of the contract (±4 requests at
///    least in the VM), the stage
///    advances on time, and a breach penalty demotes as configured.
#[test]
fn s5_ramp_accuracy_and_penalty() {
    // The counts need demand above the top rate at every instant (see the saturation
    // check). The emulated VM's TLS gateway offers 30–85/s (30 with the other lane of
    // tests beside it): a quarter of the rates there.
    let (contract, rate1, rate2) = if in_emulated_vm() {
        ("ramp-vm", 5.0, 10.0)
    } else {
        ("ramp", 20.0, 40.0)
    };
    const BURST: f64 = 5.0;
    let mut gw = gateway(Gateway::builder().loopback(false));
    fast_retransmit(&gw);
    let side = Side::Veth;
    let t = gw
        .issue(side, contract, &["all"])
        .unwrap_or_else(|e| panic!("{e}"));
    let up = gw.upstream(side);
    let load_start = Instant::now();
    // Two client connections, each paced at 100 requests/s, stopped after 20 s.
    let loads: Vec<_> = (0..2)
        .map(|c| {
            paced(
                &gw,
                &format!("ramp-{c}"),
                &t.token,
                Some("s5-ramp"),
                "/v1/reports/",
                100,
                4000,
            )
        })
        .collect();
    // Watch the stage while the load runs: when does Rampart report stage 1?
    // A query reports the stage at some instant between its start and its end (the CLI
    // takes most of a second in the VM): the switch lies between the start of the last
    // query that saw stage 0 and the end of the first that saw stage 1.
    let mut stage1_seen: Option<Instant> = None;
    let mut stage0_last: Option<Instant> = None;
    while load_start.elapsed() < Duration::from_secs(14) {
        let asked = Instant::now();
        if let Ok(v) = gw.token_show(side, &t.fp) {
            match v["runtime"]["stage"].as_u64() {
                Some(0) if stage1_seen.is_none() => stage0_last = Some(asked),
                Some(1) if stage1_seen.is_none() => stage1_seen = Some(Instant::now()),
                _ => {}
            }
        }
        thread::sleep(Duration::from_millis(100));
    }
    // Run the load 20.3 s past the ramp start (the first admitted request), which comes
    // a while after the clients start (TLS handshakes; most of a second in the VM).
    let first_arrival = up
        .requests_with_test_id("s5-ramp")
        .iter()
        .map(|r| r.received)
        .min()
        .unwrap_or(load_start);
    thread::sleep(Duration::from_millis(20_300).saturating_sub(first_arrival.elapsed()));
    let mut statuses = Vec::new();
    for (mut child, rx) in loads {
        let _ = child.kill();
        statuses.extend(finish(child, rx));
    }
    let load_end = Instant::now();
    let show = gw.token_show(side, &t.fp).unwrap_or_else(|e| panic!("{e}"));
    let reqs = &show["runtime"]["requests"];
    let offered: u64 = reqs
        .as_object()
        .map(|m| m.values().filter_map(Value::as_u64).sum())
        .unwrap_or(0);
    let allowed = reqs["allow"].as_u64().unwrap_or(0);

    let arrivals: Vec<Instant> = up
        .requests_with_test_id("s5-ramp")
        .iter()
        .map(|r| r.received)
        .collect();
    assert!(!arrivals.is_empty(), "nothing reached the upstream");
    // The ramp starts at the token's first request, which is admitted (fresh TAT).
    let t0 = *arrivals.iter().min().expect("non-empty");
    let secs = |i: Instant| i.saturating_duration_since(t0).as_secs_f64();
    // Demand stops when the clients stop; measure stage 2 up to 20 s or to 250 ms
    // before the last client finished, whichever is first.
    let w = (secs(load_end) - 0.25).min(20.0);
    let measured1 = arrivals.iter().filter(|&&a| secs(a) < 10.0).count() as f64;
    let measured2 = arrivals
        .iter()
        .filter(|&&a| (10.0..w).contains(&secs(a)))
        .count() as f64;
    let (expected1, expected2) = gcra_expected(rate1, BURST, 10.0, rate2, BURST, w);
    let offered_rps = offered as f64 / secs(load_end).max(1e-3);
    let err1 = (measured1 - expected1) / expected1 * 100.0;
    let err2 = (measured2 - expected2) / expected2 * 100.0;
    let shape = format!("{rate1}/s burst {BURST} for 10 s, then {rate2}/s burst {BURST}");
    println!("ramp ({contract}): {shape}; offered {offered} requests ({offered_rps:.0}/s) from 2 connections over {:.1} s", secs(load_end));
    println!("  stage  window          expected  measured  error");
    println!("  0      0–10 s          {expected1:>8.0}  {measured1:>8.0}  {err1:+.2} %");
    println!("  1      10–{w:.2} s      {expected2:>8.0}  {measured2:>8.0}  {err2:+.2} %");
    let c200 = statuses.iter().filter(|&&s| s == 200).count();
    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    for &s in &statuses {
        *by_status.entry(s).or_default() += 1;
    }
    println!(
        "  client: {} responses {by_status:?}; upstream: {} requests; Rampart: {allowed} allowed",
        statuses.len(),
        arrivals.len()
    );
    let stage_at = stage1_seen.map(secs);
    let stage0_at = stage0_last.map(secs);
    println!(
        "  `token show`: stage 0 in a query started at {} s, stage 1 in one that ended at {} s",
        stage0_at.map_or("never".into(), |s| format!("{s:.2}")),
        stage_at.map_or("never".into(), |s| format!("{s:.2}")),
    );
    record(
        "s5_ramp",
        json!({
            "contract": shape,
            "offered_requests": offered,
            "offered_rps": offered_rps,
            "stages": [
                { "window_s": [0.0, 10.0], "expected": expected1, "measured": measured1, "error_pct": err1 },
                { "window_s": [10.0, w], "expected": expected2, "measured": measured2, "error_pct": err2 },
            ],
            "stage_switch_between_s": [stage0_at, stage_at],
            "client_200": c200,
            "upstream_requests": arrivals.len(),
            "rampart_allowed": allowed,
        }),
    );
    // Saturation is what the per-stage counts need: a request waiting whenever the GCRA
    // would admit one. A late arrival costs nothing while it is later than the burst
    // tolerance allows (5 intervals): the TAT, not the arrival, sets the next admission.
    // So demand must stay well above the top rate: 2× is the floor. The host offers
    // ~130/s against 40/s; the emulated 6.1 VM, whose TLS gateway is the bottleneck,
    // 30–85/s, against 10/s there.
    assert!(
        offered_rps > 2.0 * rate2,
        "offered load only {offered_rps:.0}/s: the clients did not saturate the contract"
    );
    assert!(w > 19.5, "the load ran only {w:.1} s past the ramp start");
    // ±3 %, and in the emulated VM (a quarter of the rates: 56 and 93 requests) at least
    // ±4 requests: there an arrival's timestamp lags its admission by a busy guest's
    // scheduling, and three requests straddling the 10 s mark are 3 %.
    let tolerance = |expected: f64| {
        let pct = expected * 0.03;
        if in_emulated_vm() {
            pct.max(4.0)
        } else {
            pct
        }
    };
    assert!(
        (measured1 - expected1).abs() <= tolerance(expected1),
        "stage 0 admitted {measured1}, expected {expected1} (offered {offered_rps:.0}/s)"
    );
    assert!(
        (measured2 - expected2).abs() <= tolerance(expected2),
        "stage 1 admitted {measured2}, expected {expected2} (offered {offered_rps:.0}/s)"
    );
    // Every request that reached the upstream was allowed. The other way round, a request
    // allowed as its client was killed can die with the client's connection (nginx drops
    // its upstream request when the client goes) before the upstream reads it: at most one
    // per client connection, as each has one request in flight.
    let in_flight = allowed as usize - arrivals.len().min(allowed as usize);
    assert!(
        arrivals.len() <= allowed as usize && in_flight <= 2,
        "Rampart allowed {allowed}, the upstream saw {}",
        arrivals.len()
    );
    let stage_at = stage_at.expect("stage 1 was never reported");
    let stage0_at = stage0_at.expect("stage 0 was never reported");
    assert!(
        stage0_at < 10.1 && stage_at > 9.9,
        "the switch to stage 1 lies between {stage0_at:.2} s and {stage_at:.2} s, not at 10 s"
    );
    // (The stage-1 count already pins the switch to about ±0.3 s: at 40/s, 3 % of it is
    // 12 admissions. This checks what `token show` reports; its queries take most of a
    // second in the VM.)
    assert!(
        stage_at - stage0_at < 3.0,
        "the queries bracket the switch only to {stage0_at:.2}–{stage_at:.2} s"
    );

    // Penalty: `demote` reaches its 40/s stage after 1 s; a breach demotes it one stage
    // for 3 s, after which it is back.
    let p = gw
        .issue(side, "demote", &["all"])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_served(
        &gw,
        side,
        &Request::get("/v1/x").token(&p.token),
        "demote: first request",
    );
    thread::sleep(Duration::from_millis(1300));
    assert_served(
        &gw,
        side,
        &Request::get("/v1/x").token(&p.token),
        "demote: after 1.3 s",
    );
    let v = gw.token_show(side, &p.fp).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(v["runtime"]["stage"], 1, "demote: stage after 1.3 s: {v}");
    // Three connections at up to 100/s each: one alone cannot outrun 40/s where the TLS
    // gateway is slow (the emulated 6.1 VM serves ~40/s per connection).
    let floods: Vec<_> = (0..3)
        .map(|c| {
            paced(
                &gw,
                &format!("demote-{c}"),
                &p.token,
                None,
                "/v1/x",
                100,
                60,
            )
        })
        .collect();
    let flood: Vec<u16> = floods
        .into_iter()
        .flat_map(|(child, rx)| finish(child, rx))
        .collect();
    let flood_end = now_unix();
    let v = gw.token_show(side, &p.fp).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        v["runtime"]["breaches"].as_u64().unwrap_or(0) > 0,
        "no breach under a flood of 3 × 100/s on a 40/s stage: {v}"
    );
    assert_eq!(
        v["runtime"]["stage"], 0,
        "demote: stage during the penalty: {v}"
    );
    let until = v["runtime"]["penalty_until"]
        .as_i64()
        .unwrap_or_else(|| panic!("no penalty_until: {v}")) as f64;
    assert!(
        (flood_end + 1.0..flood_end + 4.0).contains(&until),
        "penalty until {until}, the flood ended at {flood_end:.1} (cooldown 3 s)"
    );
    let admitted = flood.iter().filter(|&&s| s == 200).count();
    println!(
        "penalty: the flood of {} requests got {admitted} × 200; demoted to stage 0 until +{:.1} s",
        flood.len(),
        until - flood_end
    );
    thread::sleep(Duration::from_millis(
        ((until - now_unix()).max(0.0) * 1000.0) as u64 + 1200,
    ));
    assert_served(
        &gw,
        side,
        &Request::get("/v1/x").token(&p.token),
        "demote: after the cooldown",
    );
    let v = gw.token_show(side, &p.fp).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        v["runtime"]["stage"], 1,
        "demote: stage after the cooldown: {v}"
    );

    // Every admitted request the upstream answered must reach the client as a 200, but
    // for at most one per client still on its way back when the clients were stopped.
    assert!(
        c200 <= arrivals.len() && arrivals.len() <= c200 + 2,
        "the upstream answered {} admitted requests but the clients got {c200} × 200 ({by_status:?})",
        arrivals.len()
    );
    // Every answered request was judged: a response Rampart never counted means a request
    // was turned away unjudged (as the 4-tuple-only reset memory once did to new
    // connections reusing a reset connection's port). One request per client may have
    // been judged but not answered when the clients were stopped.
    assert!(
        statuses.len() as u64 <= offered + 2,
        "the clients got {} responses but Rampart judged only {offered} requests of the token \
         (the listener's counts: {:?})",
        statuses.len(),
        counters(&gw, side)
    );
}
