use std::net::Ipv4Addr;

use serde_json::json;

use super::*;

const OFFSET: i64 = 37_000_000_000;
/// 2024-05-01T12:00:00.5Z as Unix ns.
const UNIX_NS: u64 = 1_714_564_800_500_000_000;

fn ctx() -> EventContext {
    EventContext {
        tai_offset_ns: OFFSET,
        listeners: HashMap::from([(3, "public-api".to_owned())]),
    }
}

fn v4_event() -> Event {
    Event {
        time_ns: UNIX_NS + OFFSET as u64,
        fingerprint: Fingerprint([0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210]),
        path_hash: 0xdead_beef,
        saddr: Ipv4Addr::new(192, 0, 2, 7).to_ipv6_mapped().octets(),
        daddr: Ipv4Addr::new(10, 1, 2, 3).to_ipv6_mapped().octets(),
        sport: 40_000,
        dport: 8080,
        listener: 3,
        verdict: Verdict::Throttled as u32,
        method: method::POST,
        action: action::DROPPED,
        _pad: [0; 7],
    }
}

#[test]
fn ipv4_event_as_json() {
    let r = EventRecord::from_event(&v4_event(), &ctx());
    let v: serde_json::Value = serde_json::from_str(&r.to_json_line().unwrap()).unwrap();
    assert_eq!(
        v,
        json!({
            "time": "2024-05-01T12:00:00.500000000Z",
            "fingerprint": "0123456789abcdeffedcba9876543210",
            "verdict": "throttled",
            "action": "dropped",
            "listener": "public-api",
            "src": "192.0.2.7:40000",
            "dst": "10.1.2.3:8080",
            "method": "POST",
            "path_hash": "00000000deadbeef",
        })
    );
    // The record reads back as itself (the CLI receives records as JSON).
    let back: EventRecord = serde_json::from_value(v).unwrap();
    assert_eq!(back, r);
}

#[test]
fn ipv6_event_without_token() {
    let ev = Event {
        fingerprint: Fingerprint::ZERO,
        saddr: "2001:db8::1".parse::<Ipv6Addr>().unwrap().octets(),
        daddr: "::1".parse::<Ipv6Addr>().unwrap().octets(),
        sport: 51_000,
        dport: 443,
        verdict: Verdict::Missing as u32,
        method: method::GET,
        action: action::RESET,
        listener: 9,
        ..v4_event()
    };
    let r = EventRecord::from_event(&ev, &ctx());
    let v: serde_json::Value = serde_json::from_str(&r.to_json_line().unwrap()).unwrap();
    assert_eq!(v["fingerprint"], serde_json::Value::Null);
    assert_eq!(v["src"], "[2001:db8::1]:51000");
    assert_eq!(v["dst"], "[::1]:443");
    assert_eq!(v["verdict"], "missing");
    assert_eq!(v["action"], "reset");
    assert_eq!(v["method"], "GET");
    // The listener went away in a reload: still identifiable by id.
    assert_eq!(v["listener"], "listener_9");
}

#[test]
fn human_line_names_what_happened() {
    let line = EventRecord::from_event(&v4_event(), &ctx()).to_string();
    assert_eq!(
        line,
        "2024-05-01T12:00:00.500000000Z throttled     dropped public-api POST \
         192.0.2.7:40000 -> 10.1.2.3:8080 token=0123456789abcdeffedcba9876543210 \
         path=00000000deadbeef"
    );
    let ev = Event {
        fingerprint: Fingerprint::ZERO,
        ..v4_event()
    };
    let line = EventRecord::from_event(&ev, &ctx()).to_string();
    assert!(line.contains(" token=- "), "{line}");
}

#[test]
fn filter_by_token_and_verdict() {
    let r = EventRecord::from_event(&v4_event(), &ctx());
    let m = |f: &EventFilter, r: &EventRecord| f.matches(&Record::Decision(r.clone()));
    let f = |token: Option<&str>, verdict: Option<&str>| EventFilter {
        fingerprint: token.map(|t| Fp(t.parse().unwrap())),
        verdict: verdict.map(|v| EventKind::parse(v).unwrap()),
    };
    assert!(m(&f(None, None), &r));
    assert!(m(
        &f(Some("0123456789ABCDEFFEDCBA9876543210"), Some("throttled")),
        &r
    ));
    assert!(!m(&f(Some("0123456789abcdeffedcba9876543211"), None), &r));
    assert!(!m(&f(None, Some("revoked")), &r));
    let anon = EventRecord {
        fingerprint: None,
        ..r
    };
    assert!(!m(
        &f(Some("0123456789abcdeffedcba9876543210"), None),
        &anon
    ));
}

#[test]
fn expiry_warning_as_json_line_and_one_liner() {
    let fp = Fingerprint([0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210]);
    // Expires a day after the warning.
    let rec = ExpiryRecord::new(
        UNIX_NS + OFFSET as u64,
        &fp,
        1_714_651_200,
        Some("ci deploy".into()),
        OFFSET,
    );
    let line = Record::from(rec.clone()).to_json_line().unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        v,
        json!({
            "time": "2024-05-01T12:00:00.500000000Z",
            "kind": "expiring",
            "fingerprint": "0123456789abcdeffedcba9876543210",
            "expires_at": "2024-05-02T12:00:00Z",
            "label": "ci deploy",
        })
    );
    // Read back from a mixed file, each line is what it was.
    let decision = EventRecord::from_event(&v4_event(), &ctx());
    let back: Record = serde_json::from_str(&line).unwrap();
    assert_eq!(back, Record::Expiry(rec.clone()));
    let back: Record = serde_json::from_str(&decision.to_json_line().unwrap()).unwrap();
    assert_eq!(back, Record::Decision(decision.clone()));

    assert_eq!(
        Record::from(rec.clone()).to_string(),
        "2024-05-01T12:00:00.500000000Z expiring      \
         token=0123456789abcdeffedcba9876543210 expires=2024-05-02T12:00:00Z \
         label=\"ci deploy\""
    );
    let unlabelled = ExpiryRecord { label: None, ..rec };
    assert!(!Record::from(unlabelled.clone())
        .to_string()
        .contains("label"));
    assert!(!Record::from(unlabelled.clone())
        .to_json_line()
        .unwrap()
        .contains("label"));

    // `--verdict expiring` finds it; any real verdict does not; `--token` does.
    let f = |token: Option<&str>, verdict: Option<&str>| EventFilter {
        fingerprint: token.map(|t| Fp(t.parse().unwrap())),
        verdict: verdict.map(|v| EventKind::parse(v).unwrap()),
    };
    let r = Record::from(unlabelled);
    assert!(f(None, Some("expiring")).matches(&r));
    assert!(!f(None, Some("throttled")).matches(&r));
    assert!(f(Some("0123456789ABCDEFFEDCBA9876543210"), None).matches(&r));
    assert!(!f(Some("0123456789abcdeffedcba9876543211"), None).matches(&r));
    assert!(!f(None, Some("expiring")).matches(&Record::Decision(decision)));
}

#[test]
fn event_records_decode_kernel_events() {
    let mut ev = Event {
        time_ns: 7,
        fingerprint: Fingerprint([3, 4]),
        verdict: Verdict::Revoked as u32,
        method: method::POST,
        action: action::DROPPED,
        sport: 40000,
        dport: 8080,
        ..Default::default()
    };
    ev.saddr[10] = 0xff;
    ev.saddr[11] = 0xff;
    ev.saddr[12..].copy_from_slice(&[10, 0, 0, 1]);
    let rec = EventRecord::from_event(&ev, &ctx());
    assert_eq!(rec.src, "10.0.0.1:40000");
    assert_eq!(rec.dst, "[::]:8080");
    assert_eq!(rec.verdict, "revoked");
    assert_eq!(rec.action, "dropped");
    assert_eq!(rec.method, "POST");
    let rec = Record::Decision(rec);
    let f = EventFilter {
        fingerprint: Some(Fp(Fingerprint([3, 4]))),
        verdict: None,
    };
    assert!(f.matches(&rec));
    let f = EventFilter {
        fingerprint: None,
        verdict: Some(EventKind::Verdict(Verdict::Allow)),
    };
    assert!(!f.matches(&rec));
    // Numbers from a newer datapath still make a record, named by number, on the
    // stream as in the export file.
    ev.verdict = 99;
    ev.action = 7;
    let rec = EventRecord::from_event(&ev, &ctx());
    assert_eq!(rec.verdict, "verdict_99");
    assert_eq!(rec.action, "action_7");
}

#[test]
fn expiry_notices_share_the_stream_and_its_filter() {
    let fp = Fp(Fingerprint([3, 4]));
    let notice = Record::Expiry(ExpiryRecord::new(
        9,
        &fp.0,
        1_714_564_800,
        Some("ci".into()),
        0,
    ));
    let decision = Record::Decision(EventRecord::from_event(
        &Event {
            fingerprint: fp.0,
            verdict: Verdict::Throttled as u32,
            ..Default::default()
        },
        &ctx(),
    ));
    // Each reads back as what it was, also inside a stream item.
    for ev in [&notice, &decision] {
        let item = crate::control::StreamItem::Event(Box::new(ev.clone()));
        let line = serde_json::to_string(&item).unwrap();
        let back: crate::control::StreamItem = serde_json::from_str(&line).unwrap();
        assert_eq!(back, item, "{line}");
    }
    let v = serde_json::to_value(&notice).unwrap();
    assert_eq!(v["kind"], "expiring");
    assert_eq!(v["fingerprint"], "00000000000000030000000000000004");
    assert_eq!(v["expires_at"], "2024-05-01T12:00:00Z");

    let filter = |fingerprint: Option<Fp>, verdict: Option<EventKind>| EventFilter {
        fingerprint,
        verdict,
    };
    // No verdict filter: both. `expiring`: only the notice. A verdict: only decisions.
    assert!(filter(Some(fp), None).matches(&notice));
    assert!(filter(Some(fp), None).matches(&decision));
    assert!(filter(None, Some(EventKind::Expiring)).matches(&notice));
    assert!(!filter(None, Some(EventKind::Expiring)).matches(&decision));
    let throttled = Some(EventKind::Verdict(Verdict::Throttled));
    assert!(!filter(None, throttled).matches(&notice));
    assert!(filter(None, throttled).matches(&decision));
    assert!(!filter(Some(Fp(Fingerprint([3, 5]))), None).matches(&notice));
    assert_eq!(EventKind::parse("expiring"), Some(EventKind::Expiring));
    assert!(EventKind::names().contains(&"throttled"));
}

#[test]
fn tai_times_before_the_offset_clamp_to_epoch() {
    assert_eq!(
        rfc3339_from_tai(5, OFFSET),
        "1970-01-01T00:00:00.000000000Z"
    );
    assert_eq!(
        rfc3339_from_tai(UNIX_NS + OFFSET as u64, OFFSET),
        "2024-05-01T12:00:00.500000000Z"
    );
}
