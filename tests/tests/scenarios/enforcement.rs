//! What a request gets through the gateway: served or never arriving (drop and reset), by
//! scope, and counted but let through in observe mode.

use std::{
    thread,
    time::{Duration, Instant},
};

use rampart_tests::{
    attach_support::{random_token, request_bytes, Auth, HttpConn, Outcome as Seen},
    client::{BearerToken, Request},
    gateway::{Gateway, Side},
};

use super::support::*;

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
            // silent drop and a wait for nginx's timeout): the status tells them apart,
            // not the time, which emulation on a busy host stretches.
            assert_eq!(
                o.resp.status, 502,
                "{name}: {verdict} token: client saw {} {:?}",
                o.resp.status, o.resp.error
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
        // A reset within the exchange's wait (a drop would time out there).
        assert_eq!(ex.outcome, Seen::Reset, "{name}: direct client");
        assert_eq!(
            up.count(),
            count,
            "{name}: the request reached the upstream"
        );
        let open = up.wait_open_connections(open_before, Duration::from_secs(5));
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
