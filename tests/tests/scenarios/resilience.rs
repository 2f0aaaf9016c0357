//! The daemon going away and coming back: a crash and restart under load, and policy
//! reloads (applied and rejected) while traffic flows.

use std::{
    thread,
    time::{Duration, Instant},
};

use rampart_tests::{
    attach_support::random_token,
    client::Request,
    gateway::{Gateway, Reload, Side},
};

use super::support::*;

/// 7. `kill -9` of the daemon under load: denials go on while it is down; the restarted
///    daemon adopts the pins, and counters and ramp position carry on.
#[test]
fn s7_crash_and_restart_under_load() {
    let mut gw = gateway(Gateway::builder().loopback(false));
    let side = Side::Veth;
    let good = gw
        .issue(side, "standard", &["all"])
        .unwrap_or_else(|e| panic!("{e}"));
    let bad = gw
        .issue(side, "standard", &["all"])
        .unwrap_or_else(|e| panic!("{e}"));
    let ramp = gw
        .issue(side, "demote", &["all"])
        .unwrap_or_else(|e| panic!("{e}"));
    gw.revoke(side, &bad.fp).unwrap_or_else(|e| panic!("{e}"));
    assert_served(
        &gw,
        side,
        &Request::get("/v1/x").token(&ramp.token),
        "ramp token starts its ramp",
    );
    let ramp_before = gw
        .token_show(side, &ramp.fp)
        .unwrap_or_else(|e| panic!("{e}"));
    let program_before =
        gw.status(side).unwrap_or_else(|e| panic!("{e}"))["listeners"][0]["program_id"].as_u64();

    // Load: the valid token at 20/s over one keep-alive connection for ~8 s.
    let (child, rx) = paced(
        &gw,
        "s7",
        &good.token,
        Some("s7-load"),
        "/v1/load/",
        20,
        160,
    );
    thread::sleep(Duration::from_secs(2));
    let allow_before = counter(&gw, side, "allow");
    let revoked_before = counter(&gw, side, "revoked");
    gw.kill9(side).unwrap_or_else(|e| panic!("{e}"));
    let killed = Instant::now();
    let down_count = gw.upstream(side).requests_with_test_id("s7-load").len();
    assert_denied(
        &gw,
        side,
        &Request::get("/v1/x").token(&bad.token),
        "revoked token, daemon dead",
    );
    assert_denied(&gw, side, &Request::get("/v1/x"), "no token, daemon dead");
    assert_served(
        &gw,
        side,
        &Request::get("/v1/x").token(&good.token),
        "valid token, daemon dead",
    );
    thread::sleep(Duration::from_millis(1500));
    let served_while_down = gw.upstream(side).requests_with_test_id("s7-load").len() - down_count;
    assert!(
        served_while_down > 0,
        "the load stopped being served while the daemon was down"
    );

    gw.start(side).unwrap_or_else(|e| panic!("{e}"));
    let down = killed.elapsed();
    let st = gw.status(side).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(st["listeners"][0]["adopted"], true, "pins adopted: {st}");
    assert_ne!(
        st["listeners"][0]["program_id"].as_u64(),
        program_before,
        "the new program runs"
    );
    let allow_after = counter(&gw, side, "allow");
    let revoked_after = counter(&gw, side, "revoked");
    // Everything judged while no daemon ran is in the counters (nothing restarted at 0).
    assert!(
        allow_after > allow_before + served_while_down as u64,
        "allow counter {allow_before} before the crash, {allow_after} after ({served_while_down} served while down)"
    );
    assert!(
        revoked_after > revoked_before,
        "the denial while down was not counted"
    );
    let ramp_after = gw
        .token_show(side, &ramp.fp)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        ramp_after["runtime"]["first_seen"], ramp_before["runtime"]["first_seen"],
        "the ramp restarted: {ramp_after}"
    );
    assert_served(
        &gw,
        side,
        &Request::get("/v1/x").token(&ramp.token),
        "ramp token after restart",
    );
    let ramp_after = gw
        .token_show(side, &ramp.fp)
        .unwrap_or_else(|e| panic!("{e}"));
    // `demote` is at its second stage 1 s after its first request; a reset ramp would
    // be back at stage 0.
    assert_eq!(
        ramp_after["runtime"]["stage"], 1,
        "ramp position lost: {ramp_after}"
    );
    assert_denied(
        &gw,
        side,
        &Request::get("/v1/x").token(&bad.token),
        "revoked token after restart",
    );
    let statuses = finish(child, rx);
    let failed = statuses.iter().filter(|&&s| s != 200).count();
    println!(
        "crash: daemon down {:.1} s; load {} requests, {failed} not 200; {served_while_down} served while down; allow {allow_before} → {allow_after}",
        down.as_secs_f64(),
        statuses.len()
    );
    assert_eq!(
        failed, 0,
        "valid requests failed across the crash: {statuses:?}"
    );
    assert_eq!(statuses.len(), 160);
}

/// 8. Reload: a valid policy change takes effect without dropping a request; a broken
///    policy is rejected with its line:col and the old policy stays in force.
#[test]
fn s8_reload() {
    let mut gw = gateway(Gateway::builder().loopback(false));
    let side = Side::Veth;
    let a = gw
        .issue(side, "standard", &["all"])
        .unwrap_or_else(|e| panic!("{e}"));
    let s = random_token();
    let fp_s = gw.fingerprint(&s).unwrap_or_else(|e| panic!("{e}"));
    assert_denied(
        &gw,
        side,
        &Request::get("/v1/x").token(&s),
        "static token before the reload",
    );

    // Requests flow the whole time: 20/s on one keep-alive connection for 4 s.
    let (child, rx) = paced(&gw, "s8", &a.token, Some("s8-load"), "/v1/load/", 20, 80);
    thread::sleep(Duration::from_millis(700));
    let with_s = format!(
        "{POLICY}\n[[token]]\nfingerprint = \"{fp_s}\"\ncontract = \"standard\"\nscopes = [\"all\"]\n"
    );
    gw.write_policy(&with_s).unwrap_or_else(|e| panic!("{e}"));
    let st = gw.status(side).unwrap_or_else(|e| panic!("{e}"));
    let generation = st["policy_generation"].as_u64().unwrap_or(0);
    let failed = st["reloads_failed"].as_u64().unwrap_or(0);
    let applied = gw
        .reload(side, generation, failed)
        .unwrap_or_else(|e| panic!("{e}"));
    let Reload::Applied(generation) = applied else {
        panic!("a valid policy was rejected:\n{}", gw.log(side));
    };
    assert_served(
        &gw,
        side,
        &Request::get("/v1/x").token(&s),
        "static token after the reload",
    );

    // Broken: line and column of `"fast"`.
    let bad_line = "stages = [{ after = \"0s\", rate = \"fast\", burst = 1 }]";
    let broken = format!("{with_s}\n[[contract]]\nname = \"broken\"\n{bad_line}\n");
    let line = broken
        .lines()
        .position(|l| l == bad_line)
        .expect("bad line")
        + 1;
    let col = bad_line.find("\"fast\"").expect("bad value") + 1;
    gw.write_policy(&broken).unwrap_or_else(|e| panic!("{e}"));
    let outcome = gw
        .reload(side, generation, failed)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(outcome, Reload::Rejected, "a broken policy was applied");
    let log = gw.log(side);
    assert!(
        log.contains(&format!("policy.toml:{line}:{col}:")),
        "no policy.toml:{line}:{col}: diagnostic in the log:\n{log}"
    );
    let st = gw.status(side).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        st["policy_generation"].as_u64(),
        Some(generation),
        "generation moved"
    );
    assert_served(
        &gw,
        side,
        &Request::get("/v1/x").token(&s),
        "static token after the rejected reload",
    );
    assert_denied(
        &gw,
        side,
        &Request::get("/v1/x").token(&random_token()),
        "unknown token after the rejected reload",
    );

    let statuses = finish(child, rx);
    let reached = gw.upstream(side).requests_with_test_id("s8-load").len();
    println!(
        "reload: {} requests across two reloads, {} × 200, {reached} reached the upstream; broken policy rejected at policy.toml:{line}:{col}",
        statuses.len(),
        statuses.iter().filter(|&&s| s == 200).count()
    );
    assert_eq!(statuses.len(), 80, "the client lost requests");
    assert!(
        statuses.iter().all(|&s| s == 200),
        "a request failed during the reloads: {statuses:?}"
    );
    assert_eq!(reached, 80, "the upstream missed requests");
}
