//! Denial events: what a record carries, and the per-CPU flood cap.

use agent_common::{deny_action, mode, Verdict};
use rampart::datapath::parse_event;
use rampart_tests::packet::Http;

use crate::{fp, listener, req, Fixture, Hook, GOOD, NOW, PORT, REVOKED, UNKNOWN};

#[test]
fn deny_events_carry_fingerprint_reason_and_flow() {
    let mut f = Fixture::new(listener(mode::ENFORCE, deny_action::DROP));
    let mut ring = f.dp.take_events().expect("event ring");
    while ring.next().is_some() {}
    f.run(Hook::Xdp, &req(Http::get("/v1/a").bearer(REVOKED)));
    f.run(Hook::Xdp, &req(Http::get("/v1/a")));
    f.run(Hook::Xdp, &req(Http::get("/v1/a").bearer(GOOD)));
    let mut events = Vec::new();
    while let Some(item) = ring.next() {
        events.push(parse_event(&item).expect("event record"));
    }
    assert_eq!(events.len(), 2, "allowed requests emit no event");
    let (revoked, missing) = (events[0], events[1]);
    assert_eq!(revoked.verdict, Verdict::Revoked as u32);
    assert_eq!(revoked.fingerprint, fp(REVOKED));
    assert_eq!(revoked.dport, PORT);
    assert_eq!(revoked.sport, 40000);
    assert_eq!(&revoked.saddr[12..], &[10, 203, 9, 1]);
    assert_eq!(revoked.time_ns, NOW);
    assert_eq!(revoked.method, agent_common::http::method::GET);
    assert_eq!(revoked.action, agent_common::action::DROPPED);
    assert_ne!(revoked.path_hash, 0);
    assert_eq!(missing.verdict, Verdict::Missing as u32);
    assert_eq!(missing.fingerprint, agent_common::Fingerprint::ZERO);
    assert_eq!(
        missing.path_hash, revoked.path_hash,
        "same path, same keyed hash"
    );
}

#[test]
fn event_flood_is_capped_and_counted() {
    let mut f = Fixture::new(listener(mode::ENFORCE, deny_action::DROP));
    let mut cfg = f.dp.config().unwrap();
    cfg.events_per_sec = 5;
    f.dp.set_config(&cfg).unwrap();
    let frame = req(Http::get("/").bearer(UNKNOWN));
    // repeat = 20 runs on one CPU within the same (fixed-clock) second.
    let mut out = vec![0u8; frame.len() + 512];
    f.dp.test_run_xdp(&frame, &mut out, 20).unwrap();
    let mut ring = f.dp.take_events().unwrap();
    let mut n = 0;
    while ring.next().is_some() {
        n += 1;
    }
    assert_eq!(n, 5);
    assert_eq!(f.dp.events_dropped().unwrap(), 15);
}
