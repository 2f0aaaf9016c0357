//! The end-to-end scenarios of issue 4: real clients (curl, openssl s_client) through a TLS
//! nginx gateway to recording upstreams, with Rampart judging the nginx → upstream hop by
//! native XDP on the upstream veth and by TC on the gateway's loopback. Every scenario
//! asserts what the client and the upstream actually saw.
//!
//! Needs root, the Debian packages of `cargo xtask setup` (nginx, curl, openssl, iproute2)
//! and `cargo build -p rampart`. Run one at a time:
//! `cargo test -p rampart-tests --test scenarios -- --test-threads=1 --nocapture`.
//! Measured figures are printed and merged into `target/bench/scenarios.json`.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead, BufReader},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::{Child, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use rampart_tests::{
    attach_support::{random_token, request_bytes, Auth, HttpConn, Outcome as Seen},
    client::{BearerToken, Request},
    gateway::{Gateway, GatewayBuilder, Issued, Reload, Side},
    session::Session,
    topology::{GATEWAY_V4, UPSTREAM_V4},
};
use serde_json::{json, Value};

/// `standard` never throttles a test; `ramp` is scenario 5's contract (`ramp-vm`, at half
/// the rates, in the emulated 6.1 VM, whose TLS gateway cannot saturate 40/s); `demote` is the
/// same shape compressed to 1 s, with a breach penalty of one stage for 3 s.
const POLICY: &str = r#"[[contract]]
name = "standard"
stages = [{ after = "0s", rate = 1000, burst = 1000 }]

[[contract]]
name = "ramp"
stages = [
  { after = "0s", rate = 20, burst = 5 },
  { after = "10s", rate = 40, burst = 5 },
]

[[contract]]
name = "ramp-vm"
stages = [
  { after = "0s", rate = 10, burst = 5 },
  { after = "10s", rate = 20, burst = 5 },
]

[[contract]]
name = "demote"
stages = [
  { after = "0s", rate = 20, burst = 5 },
  { after = "1s", rate = 40, burst = 5 },
]
penalty = { demote = 1, cooldown = "3s" }

[[scope]]
name = "all"
methods = ["*"]
prefix = "/"

[[scope]]
name = "reports-read"
methods = ["GET"]
prefix = "/v1/reports/"
"#;

/// Inside the emulated 6.1 VM (xtask's VM runner sets `RAMPART_IN_VM`): TCG runs the
/// TLS gateway and the CLI several times slower, so two scenarios scale their load.
fn in_emulated_vm() -> bool {
    std::env::var_os("RAMPART_IN_VM").is_some()
}

fn gateway(b: GatewayBuilder) -> Gateway {
    b.policy(POLICY)
        .build()
        .unwrap_or_else(|e| panic!("setting up the gateway: {e}"))
}

/// `status --json` request counter of the side's (only) listener.
fn counter(gw: &Gateway, side: Side, verdict: &str) -> u64 {
    let st = gw.status(side).unwrap_or_else(|e| panic!("{e}"));
    st["listeners"][0]["requests"][verdict]
        .as_u64()
        .unwrap_or(0)
}

fn counters(gw: &Gateway, side: Side) -> BTreeMap<String, u64> {
    let st = gw.status(side).unwrap_or_else(|e| panic!("{e}"));
    st["listeners"][0]["requests"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

fn delta(after: &BTreeMap<String, u64>, before: &BTreeMap<String, u64>, v: &str) -> u64 {
    after.get(v).copied().unwrap_or(0) - before.get(v).copied().unwrap_or(0)
}

/// A request that must be served: 200 from the upstream, recorded there.
fn assert_served(gw: &Gateway, side: Side, req: &Request, what: &str) {
    let o = gw
        .request(side, &gw.curl(side), req)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(o.resp.status, 200, "{what}: client saw {:?}", o.resp.error);
    assert!(o.reached, "{what}: 200 but the upstream recorded nothing");
}

/// A request that must be denied: the client gets no 200 and the upstream never sees it.
fn assert_denied(gw: &Gateway, side: Side, req: &Request, what: &str) {
    let o = gw
        .request(side, &gw.curl(side), req)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_ne!(o.resp.status, 200, "{what}: the client was served");
    assert!(!o.reached, "{what}: the request reached the upstream");
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

/// An event's `time` (RFC 3339, UTC) as Unix seconds.
fn event_time(ev: &Value) -> Option<f64> {
    let t = humantime::parse_rfc3339(ev["time"].as_str()?).ok()?;
    Some(t.duration_since(UNIX_EPOCH).ok()?.as_secs_f64())
}

fn rfc3339(unix: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}

/// Merges `value` under `key` into `target/bench/scenarios.json`. (In the 6.1 VM the file
/// lands in the guest's tmpfs overlay; the figures are in the run's console output.)
fn record(key: &str, value: Value) {
    let exe = std::env::current_exe().expect("test executable");
    // target/<profile>/deps/scenarios-… → target/
    let target = exe
        .ancestors()
        .nth(3)
        .map_or_else(|| PathBuf::from("target"), PathBuf::from);
    let dir = target.join("bench");
    fs::create_dir_all(&dir).expect("creating target/bench");
    let path = dir.join("scenarios.json");
    let mut all: serde_json::Map<String, Value> = fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    all.insert(key.to_owned(), value);
    fs::write(
        &path,
        serde_json::to_vec_pretty(&Value::Object(all)).expect("JSON"),
    )
    .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    println!("(recorded under \"{key}\" in {})", path.display());
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The TCP address a direct client in the gateway ns uses for `side`'s upstream.
fn upstream_addr(gw: &Gateway, side: Side) -> SocketAddr {
    match side {
        Side::Veth => SocketAddr::new(IpAddr::V4(UPSTREAM_V4), gw.topo().upstream_port()),
        Side::Loopback => SocketAddr::new(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            gw.topo().loopback_upstream_port(),
        ),
    }
}

/// curl in the client ns sending `count` GETs to `path_prefix<n>` at `rate`/s over one
/// keep-alive connection (`--rate` paces transfer starts); yields each HTTP status as it
/// completes (0: no response).
fn paced(
    gw: &Gateway,
    name: &str,
    token: &BearerToken,
    test_id: Option<&str>,
    path_prefix: &str,
    rate: u32,
    count: u32,
) -> (Child, mpsc::Receiver<u16>) {
    let headers = gw
        .header_file(&format!("h-{name}"), token)
        .unwrap_or_else(|e| panic!("{e}"));
    if let Some(id) = test_id {
        let mut text = fs::read_to_string(&headers).expect("header file");
        text.push_str(&format!("X-Test-Id: {id}\n"));
        fs::write(&headers, text).expect("header file");
    }
    let mut child = gw
        .topo()
        .client()
        .command("curl")
        .args(["-sk", "--http1.1", "--max-time", "5", "--rate"])
        .arg(format!("{rate}/s"))
        // The statuses go to stderr, which stdio leaves unbuffered: on stdout (a pipe,
        // block-buffered) the last 4 KiB of them die with curl when a test kills it.
        .args(["-o", "/dev/null", "-w", "%{stderr}%{http_code}\\n", "-H"])
        .arg(format!("@{}", headers.display()))
        .arg(format!(
            "{}{path_prefix}[1-{count}]",
            gw.route_url(Side::Veth)
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting curl");
    let out = child.stderr.take().expect("curl stderr");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line.trim().parse().unwrap_or(0)).is_err() {
                return;
            }
        }
    });
    (child, rx)
}

/// Waits for a paced curl to finish; its statuses in order.
fn finish(mut child: Child, rx: mpsc::Receiver<u16>) -> Vec<u16> {
    let statuses: Vec<u16> = rx.iter().collect();
    let _ = child.wait();
    statuses
}

/// Lets nginx learn of a reset from Rampart within milliseconds instead of one minimum
/// RTO (200 ms): with `action = "reset"` the denied segment itself becomes the RST to the
/// upstream, and nginx hears of it on its first retransmission. A per-route `rto_min` on
/// the gateway → upstream route shortens that wait, so two client connections can offer
/// 200 requests/s even when almost all of them are denied. It changes nothing Rampart
/// sees or decides.
fn fast_retransmit(gw: &Gateway) {
    let veth = gw.topo().gateway_upstream_veth().name.clone();
    gw.topo()
        .gateway()
        .ip(&[
            "route",
            "replace",
            "10.203.2.0/24",
            "dev",
            &veth,
            "proto",
            "kernel",
            "scope",
            "link",
            "src",
            "10.203.2.1",
            "rto_min",
            "5ms",
        ])
        .unwrap_or_else(|e| panic!("setting rto_min: {e}"));
}

/// 1. A valid token is served on both paths; missing, unknown and malformed tokens never
///    reach the upstream; with `action = "reset"` the client of the judged hop sees a reset
///    within 1 s and the upstream keeps no half-open connection.
#[test]
fn s1_valid_served_invalid_never_arrive_and_reset_is_prompt() {
    let mut gw = gateway(Gateway::builder());
    let unknown = random_token();
    gw.remember(&unknown);
    // `@` and `#` are not b64token characters (RFC 6750).
    let malformed = BearerToken::new("not@a#token");
    gw.remember(&malformed);
    for side in [Side::Veth, Side::Loopback] {
        let name = gw.daemon_name(side);
        let valid = gw
            .issue(side, "standard", &["all"])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_served(
            &gw,
            side,
            &Request::get("/v1/orders").token(&valid.token),
            &format!("{name}: valid token"),
        );
        for (verdict, req) in [
            ("missing", Request::get("/v1/orders")),
            ("unknown", Request::get("/v1/orders").token(&unknown)),
            ("malformed", Request::get("/v1/orders").token(&malformed)),
        ] {
            let before = counter(&gw, side, verdict);
            let o = gw
                .request(side, &gw.curl(side), &req)
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(!o.reached, "{name}: a {verdict} token reached the upstream");
            // nginx answers 502 when its upstream connection is reset (504 would mean a
            // silent drop and a wait for nginx's timeout).
            assert_eq!(
                o.resp.status, 502,
                "{name}: {verdict} token: client saw {} {:?}",
                o.resp.status, o.resp.error
            );
            assert!(
                o.resp.time_total < Duration::from_secs(1),
                "{name}: {verdict} token answered after {:?}",
                o.resp.time_total
            );
            assert_eq!(
                counter(&gw, side, verdict),
                before + 1,
                "{name}: the {verdict} counter"
            );
        }
        assert!(
            gw.topo().nginx().error_log().contains("reset by peer"),
            "nginx did not see its upstream connection reset:\n{}",
            gw.redact(gw.topo().nginx().error_log().as_bytes())
        );

        // A direct client of the judged hop (in the gateway ns, as nginx is).
        let up = gw.upstream(side);
        thread::sleep(Duration::from_millis(300));
        let open_before = up.open_connections();
        let accepted = up.accepted_connections();
        let mut conn = HttpConn::connect(gw.topo().gateway(), upstream_addr(&gw, side))
            .expect("entering the gateway ns")
            .expect("connecting to the upstream");
        let deadline = Instant::now() + Duration::from_secs(2);
        while up.accepted_connections() == accepted && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(
            up.open_connections(),
            open_before + 1,
            "{name}: upstream saw the connect"
        );
        let count = up.count();
        let ex = conn.exchange(
            &request_bytes("/v1/orders", "s1-direct", Auth::Bearer(&unknown)),
            Duration::from_secs(3),
        );
        assert_eq!(ex.outcome, Seen::Reset, "{name}: direct client");
        assert!(
            ex.elapsed < Duration::from_secs(1),
            "{name}: the reset took {:?}",
            ex.elapsed
        );
        assert_eq!(
            up.count(),
            count,
            "{name}: the request reached the upstream"
        );
        let open = up.wait_open_connections(open_before, Duration::from_secs(1));
        assert_eq!(
            open, open_before,
            "{name}: the upstream still holds the reset connection"
        );
        println!(
            "{name}: valid 200; missing/unknown/malformed 502 without reaching the upstream; direct client reset after {:?}",
            ex.elapsed
        );
    }
}

/// 2. Revocation on a live keep-alive connection: the next request after `rampart token
///    revoke` returns is denied. Latency from the revoke call's return to the kernel's
///    first denial (the event time) over 100 runs (30 in the 6.1 VM).
#[test]
fn s2_revocation_on_a_live_connection() {
    // 100 runs for the percentiles; in the emulated 6.1 VM (each run takes ~1.4 s there
    // instead of ~0.3 s) 30, which still checks every run and keeps the VM step within
    // its 10 minutes. The printed figures say how many runs they are over.
    let runs: usize = if in_emulated_vm() { 30 } else { 100 };
    let mut gw = gateway(Gateway::builder().loopback(false));
    let tokens: Vec<Issued> = (0..runs)
        .map(|_| {
            gw.issue(Side::Veth, "standard", &["all"])
                .unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
    let mut s = Session::connect(
        gw.topo().client(),
        &GATEWAY_V4.to_string(),
        gw.topo()
            .veth_route_url()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("route port"),
    )
    .expect("openssl s_client");
    let up = gw.upstream(Side::Veth);
    let mut returned_at = Vec::with_capacity(runs);
    let mut client_ms = Vec::with_capacity(runs);
    for (i, t) in tokens.iter().enumerate() {
        let before = format!("s2-{i}-before");
        let r = s
            .send(
                &Request::get("/v1/orders").token(&t.token).test_id(&before),
                Duration::from_secs(5),
            )
            .unwrap_or_else(|e| panic!("run {i}, before the revoke: {e}"));
        assert_eq!(r.status, 200, "run {i}: valid token before the revoke");
        assert_eq!(up.requests_with_test_id(&before).len(), 1);
        gw.revoke(Side::Veth, &t.fp)
            .unwrap_or_else(|e| panic!("{e}"));
        let returned = Instant::now();
        returned_at.push(now_unix());
        let after = format!("s2-{i}-after");
        let r = s
            .send(
                &Request::get("/v1/orders").token(&t.token).test_id(&after),
                Duration::from_secs(5),
            )
            .unwrap_or_else(|e| panic!("run {i}, after the revoke: {e}"));
        client_ms.push(returned.elapsed().as_secs_f64() * 1e3);
        assert_ne!(r.status, 200, "run {i}: served after the revoke returned");
        assert!(
            up.requests_with_test_id(&after).is_empty(),
            "run {i}: the request after the revoke reached the upstream"
        );
    }
    // The kernel's decision time of each first denial, from the event export.
    let deadline = Instant::now() + Duration::from_secs(10);
    let judged_ms: Vec<f64> = loop {
        let events = gw
            .events(Side::Veth, 10 * runs)
            .unwrap_or_else(|e| panic!("{e}"));
        let firsts: Vec<Option<f64>> = tokens
            .iter()
            .map(|t| {
                events
                    .iter()
                    .filter(|e| e["fingerprint"] == t.fp.as_str() && e["verdict"] == "revoked")
                    .filter_map(event_time)
                    .reduce(f64::min)
            })
            .collect();
        if firsts.iter().all(Option::is_some) {
            break firsts
                .into_iter()
                .zip(&returned_at)
                .map(|(t, r)| (t.expect("checked") - r) * 1e3)
                .collect();
        }
        assert!(
            Instant::now() < deadline,
            "{} of {runs} revocations have no `revoked` event",
            firsts.iter().filter(|f| f.is_none()).count()
        );
        thread::sleep(Duration::from_millis(200));
    };
    let mut j = judged_ms.clone();
    j.sort_by(f64::total_cmp);
    let mut c = client_ms.clone();
    c.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&j, 0.5), percentile(&j, 0.99));
    let (c50, c99) = (percentile(&c, 0.5), percentile(&c, 0.99));
    println!(
        "revocation, {runs} runs on one keep-alive TLS connection: revoke returned → kernel denied the next request: p50 {p50:.2} ms, p99 {p99:.2} ms (max {:.2} ms)",
        j[j.len() - 1]
    );
    println!(
        "  revoke returned → client received the denial (nginx 502 after its retransmission): p50 {c50:.1} ms, p99 {c99:.1} ms"
    );
    // The first denial can only come from the request sent after the return: never before.
    assert!(
        j[0] > -5.0,
        "a denial was recorded {:.2} ms before the revoke returned (clock skew?)",
        j[0]
    );
    record(
        "s2_revocation",
        json!({
            "runs": runs,
            "revoke_return_to_kernel_denial_ms": { "p50": p50, "p99": p99, "max": j[j.len() - 1] },
            "revoke_return_to_client_denial_ms": { "p50": c50, "p99": c99 },
        }),
    );
}

/// 3. Expiry: a token that expires in 2 s works, then is denied; a not-yet-valid token is
///    denied.
#[test]
fn s3_expiry_and_not_yet_valid() {
    let mut gw = gateway(Gateway::builder().loopback(false));
    let side = Side::Veth;
    let issued_at = Instant::now();
    let t = gw
        .issue_with(side, "standard", &["all"], Some(Duration::from_secs(2)))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_served(
        &gw,
        side,
        &Request::get("/v1/orders").token(&t.token),
        "a 2 s token right after issue",
    );
    let curl = gw.curl(side).timeout(Duration::from_secs(3));
    let mut served = 1;
    let denied_after = loop {
        let o = gw
            .request(side, &curl, &Request::get("/v1/orders").token(&t.token))
            .unwrap_or_else(|e| panic!("{e}"));
        if o.resp.status != 200 {
            assert!(!o.reached, "a denied request reached the upstream");
            break issued_at.elapsed();
        }
        assert!(o.reached, "200 without the upstream");
        served += 1;
        assert!(
            issued_at.elapsed() < Duration::from_secs(5),
            "the 2 s token still works after {:?}",
            issued_at.elapsed()
        );
        thread::sleep(Duration::from_millis(100));
    };
    println!("a 2 s token: {served} requests served, first denial {denied_after:?} after issue");
    // Expiry is stored in whole seconds, so it lands in (1 s, 3 s] after issue.
    assert!(
        denied_after > Duration::from_millis(1000) && denied_after < Duration::from_millis(3300),
        "a 2 s token was first denied {denied_after:?} after issue"
    );
    let expired = counter(&gw, side, "expired");
    assert_denied(
        &gw,
        side,
        &Request::get("/v1/orders").token(&t.token),
        "expired token, again",
    );
    assert_eq!(
        counter(&gw, side, "expired"),
        expired + 1,
        "expired counter"
    );

    // A not-yet-valid static token (by fingerprint in the policy), next to one already
    // valid, so the denial is down to `not_before` alone.
    let (later, now) = (random_token(), random_token());
    let fp_later = gw.fingerprint(&later).unwrap_or_else(|e| panic!("{e}"));
    let fp_now = gw.fingerprint(&now).unwrap_or_else(|e| panic!("{e}"));
    let unix = now_unix() as u64;
    let policy = format!(
        "{POLICY}\n[[token]]\nfingerprint = \"{fp_later}\"\ncontract = \"standard\"\nscopes = [\"all\"]\nnot_before = \"{}\"\n\n[[token]]\nfingerprint = \"{fp_now}\"\ncontract = \"standard\"\nscopes = [\"all\"]\nnot_before = \"{}\"\n",
        rfc3339(unix + 3600),
        rfc3339(unix - 60),
    );
    gw.write_policy(&policy).unwrap_or_else(|e| panic!("{e}"));
    let st = gw.status(side).unwrap_or_else(|e| panic!("{e}"));
    let generation = st["policy_generation"].as_u64().unwrap_or(0);
    let failed = st["reloads_failed"].as_u64().unwrap_or(0);
    assert!(
        matches!(gw.reload(side, generation, failed), Ok(Reload::Applied(_))),
        "policy with static tokens not applied:\n{}",
        gw.log(side)
    );
    assert_served(
        &gw,
        side,
        &Request::get("/v1/orders").token(&now),
        "static token valid since a minute ago",
    );
    let nyv = counter(&gw, side, "not_yet_valid");
    assert_denied(
        &gw,
        side,
        &Request::get("/v1/orders").token(&later),
        "static token valid from in an hour",
    );
    assert_eq!(
        counter(&gw, side, "not_yet_valid"),
        nyv + 1,
        "not_yet_valid counter"
    );
}

/// 4. Scopes: `GET /v1/reports/x` allowed, `POST /v1/reports/x` and `GET /v1/admin` denied.
#[test]
fn s4_scopes() {
    let mut gw = gateway(Gateway::builder());
    for side in [Side::Veth, Side::Loopback] {
        let t = gw
            .issue(side, "standard", &["reports-read"])
            .unwrap_or_else(|e| panic!("{e}"));
        let oos = counter(&gw, side, "out_of_scope");
        assert_served(
            &gw,
            side,
            &Request::get("/v1/reports/x").token(&t.token),
            "GET /v1/reports/x",
        );
        assert_denied(
            &gw,
            side,
            &Request::get("/v1/reports/x")
                .method("POST")
                .token(&t.token)
                .body("{}"),
            "POST /v1/reports/x",
        );
        assert_denied(
            &gw,
            side,
            &Request::get("/v1/admin").token(&t.token),
            "GET /v1/admin",
        );
        assert_eq!(
            counter(&gw, side, "out_of_scope"),
            oos + 2,
            "{}: out_of_scope counter",
            gw.daemon_name(side)
        );
    }
}

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

/// 5. Ramp accuracy: contract 20/s burst 5 for 10 s, then 40/s (half in the VM); offered 200 rps for 20 s
///    from 2 connections. Admitted per stage within ±3 % of the contract, the stage
///    advances on time, and a breach penalty demotes as configured.
#[test]
fn s5_ramp_accuracy_and_penalty() {
    // The counts need demand above the top rate at every instant (see the saturation
    // check). The emulated VM's TLS gateway offers 50–85/s: half the rates there.
    let (contract, rate1, rate2) = if in_emulated_vm() {
        ("ramp-vm", 10.0, 20.0)
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
    // 50–85/s, against 20/s there.
    assert!(
        offered_rps > 2.0 * rate2,
        "offered load only {offered_rps:.0}/s: the clients did not saturate the contract"
    );
    assert!(w > 19.5, "the load ran only {w:.1} s past the ramp start");
    assert!(
        err1.abs() <= 3.0,
        "stage 0 admitted {measured1}, expected {expected1} (offered {offered_rps:.0}/s)"
    );
    assert!(
        err2.abs() <= 3.0,
        "stage 1 admitted {measured2}, expected {expected2} (offered {offered_rps:.0}/s)"
    );
    assert_eq!(
        allowed as usize,
        arrivals.len(),
        "Rampart's allow count and what reached the upstream differ"
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
        "the clients got {} responses but Rampart judged only {offered} requests of the token",
        statuses.len()
    );
}

/// 6. Observe mode lets everything through and counts what enforce mode would have denied.
#[test]
fn s6_observe_mode() {
    let mut gw = gateway(Gateway::builder().mode("observe"));
    let unknown = random_token();
    gw.remember(&unknown);
    for side in [Side::Veth, Side::Loopback] {
        let t = gw
            .issue(side, "standard", &["reports-read"])
            .unwrap_or_else(|e| panic!("{e}"));
        let before = counters(&gw, side);
        for (what, req) in [
            ("allow", Request::get("/v1/reports/x").token(&t.token)),
            ("missing", Request::get("/v1/orders")),
            ("unknown", Request::get("/v1/orders").token(&unknown)),
            ("out_of_scope", Request::get("/v1/admin").token(&t.token)),
        ] {
            assert_served(&gw, side, &req, &format!("observe: {what}"));
        }
        let after = counters(&gw, side);
        for v in ["allow", "missing", "unknown", "out_of_scope"] {
            assert_eq!(
                delta(&after, &before, v),
                1,
                "{}: {v} counted in observe mode ({after:?})",
                gw.daemon_name(side)
            );
        }
    }
}

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
