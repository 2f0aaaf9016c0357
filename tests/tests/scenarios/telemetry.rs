//! What operators see: counters, events, metrics, and no plaintext token in any file.

use std::{
    collections::BTreeMap,
    thread,
    time::{Duration, Instant},
};

use rampart_tests::{
    attach_support::random_token,
    client::Request,
    gateway::{Gateway, Side},
};

use super::support::*;

/// 9. Telemetry: `/metrics` matches what the clients saw; `rampart events --json` shows
///    each denial with fingerprint and reason; no log, event, metric, state or audit file
///    holds a plaintext token.
#[test]
fn s9_telemetry_and_no_plaintext_tokens() {
    let mut gw = gateway(Gateway::builder().loopback(false));
    let side = Side::Veth;
    let a = gw
        .issue(side, "standard", &["all"])
        .unwrap_or_else(|e| panic!("{e}"));
    let r = gw
        .issue(side, "standard", &["all"])
        .unwrap_or_else(|e| panic!("{e}"));
    gw.revoke(side, &r.fp).unwrap_or_else(|e| panic!("{e}"));
    let u = random_token();
    let fp_u = gw.fingerprint(&u).unwrap_or_else(|e| panic!("{e}"));

    let metric = |text: &str, verdict: &str| -> u64 {
        let key =
            format!("rampart_requests_total{{listener=\"veth-upstream\",verdict=\"{verdict}\"}}");
        text.lines()
            .find_map(|l| l.strip_prefix(&key))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    };
    let before = gw
        .save_metrics(side, "metrics-before.txt")
        .unwrap_or_else(|e| panic!("{e}"));
    let plan: [(&str, Request, usize); 4] = [
        ("allow", Request::get("/v1/x").token(&a.token), 5),
        ("unknown", Request::get("/v1/x").token(&u), 3),
        ("missing", Request::get("/v1/x"), 2),
        ("revoked", Request::get("/v1/x").token(&r.token), 2),
    ];
    let mut seen: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for (verdict, req, n) in &plan {
        for _ in 0..*n {
            let o = gw
                .request(side, &gw.curl(side), req)
                .unwrap_or_else(|e| panic!("{e}"));
            let e = seen.entry(verdict).or_default();
            if o.resp.status == 200 && o.reached {
                e.0 += 1;
            } else if o.resp.status != 200 && !o.reached {
                e.1 += 1;
            } else {
                panic!(
                    "{verdict}: client {} but reached={}",
                    o.resp.status, o.reached
                );
            }
        }
    }
    // The exporter samples the kernel counters periodically: scrape until the deltas
    // settle (at most 5 s).
    let deadline = Instant::now() + Duration::from_secs(5);
    let after = loop {
        let after = gw
            .save_metrics(side, "metrics-after.txt")
            .unwrap_or_else(|e| panic!("{e}"));
        let settled = plan
            .iter()
            .all(|(v, _, n)| metric(&after, v) - metric(&before, v) == *n as u64);
        if settled || Instant::now() > deadline {
            break after;
        }
        thread::sleep(Duration::from_millis(250));
    };
    for (verdict, _, n) in &plan {
        let (ok, denied) = seen[verdict];
        let client = if *verdict == "allow" { ok } else { denied };
        assert_eq!(
            client, *n,
            "{verdict}: the client saw {ok} served, {denied} denied"
        );
        assert_eq!(
            metric(&after, verdict) - metric(&before, verdict),
            *n as u64,
            "/metrics {verdict} delta vs the {n} requests the client saw"
        );
    }
    println!(
        "metrics deltas match the clients: allow 5, unknown 3, missing 2, revoked 2 (served {}, denied {})",
        seen["allow"].0,
        seen.values().map(|s| s.1).sum::<usize>()
    );

    // Each denial as an event, with fingerprint (when there is a token) and reason.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let events = gw.events(side, 100).unwrap_or_else(|e| panic!("{e}"));
        let n = |fp: Option<&str>, verdict: &str| {
            events
                .iter()
                .filter(|e| e["verdict"] == verdict)
                .filter(|e| fp.map_or(e["fingerprint"].is_null(), |f| e["fingerprint"] == f))
                .count()
        };
        let got = (
            n(Some(&fp_u), "unknown"),
            n(Some(&r.fp), "revoked"),
            n(None, "missing"),
        );
        if got == (3, 2, 2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "events (unknown by fp, revoked by fp, missing) = {got:?}, expected (3, 2, 2):\n{}",
            gw.redact(
                serde_json::to_string_pretty(&events)
                    .unwrap_or_default()
                    .as_bytes()
            )
        );
        thread::sleep(Duration::from_millis(200));
    }

    // Stop the daemon so its SQLite WAL is checkpointed into files we can read.
    gw.stop(side).unwrap_or_else(|e| panic!("{e}"));
    let (hits, scanned) = gw.plaintext_hits();
    let names: Vec<String> = scanned
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    for want in [
        "daemon.log",
        "rampart.db",
        "events.jsonl",
        "metrics-after.txt",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} not scanned: {names:?}"
        );
    }
    println!(
        "plaintext scan: {} tokens × {} files, {} hits",
        gw.tokens().len(),
        scanned.len(),
        hits.len()
    );
    assert!(hits.is_empty(), "plaintext tokens found: {hits:?}");
}
