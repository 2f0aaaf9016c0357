//! The one model of an event: what the daemon streams on the control socket, writes to the
//! export file and `rampart events` prints, as JSON lines for machines and a one-liner for
//! humans. Decisions are built from `agent_common::Event` here and nowhere else; it carries
//! only a fingerprint and a keyed path hash, so a record never holds a token or a request
//! path. The daemon's own notices (a token about to expire) carry a fingerprint, an expiry
//! and the label.

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    time::{Duration, UNIX_EPOCH},
};

use agent_common::{action, http::method, Event, Fingerprint, Verdict};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::TelemetryError;
use crate::{control::Fp, datapath::clock};

/// What an event needs from outside itself to be rendered.
#[derive(Clone, Debug, Default)]
pub struct EventContext {
    /// CLOCK_TAI − CLOCK_REALTIME in nanoseconds (event times are TAI).
    pub tai_offset_ns: i64,
    /// Listener id (`ListenerConfig::id`) → configured name.
    pub listeners: HashMap<u32, String>,
}

impl EventContext {
    /// A context with the clock's current TAI offset.
    pub fn new(listeners: HashMap<u32, String>) -> Self {
        EventContext {
            tai_offset_ns: clock::tai_offset_ns(),
            listeners,
        }
    }

    /// The listener's configured name, or `listener_<id>` for one a reload removed while
    /// its events were in flight.
    pub fn listener_name(&self, id: u32) -> String {
        match self.listeners.get(&id) {
            Some(name) => name.clone(),
            None => format!("listener_{id}"),
        }
    }
}

/// One datapath decision other than allow/pass.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    /// RFC 3339, UTC, nanosecond precision.
    pub time: String,
    /// `null` when the request carried no well-formed token.
    pub fingerprint: Option<Fp>,
    /// `Verdict::name()`, or `verdict_<n>` for a number this build does not know.
    pub verdict: String,
    /// `action::name()`: `passed`, `dropped` or `reset` (`action_<n>` if unknown).
    pub action: String,
    /// The listener's configured name.
    pub listener: String,
    /// `ip:port`; IPv4-mapped addresses shown as IPv4, IPv6 as `[ip]:port`.
    pub src: String,
    pub dst: String,
    pub method: String,
    /// The keyed hash of the request-target, 16 hex digits.
    pub path_hash: String,
}

impl EventRecord {
    pub fn from_event(ev: &Event, ctx: &EventContext) -> Self {
        EventRecord {
            time: rfc3339_from_tai(ev.time_ns, ctx.tai_offset_ns),
            fingerprint: (ev.fingerprint != Fingerprint::ZERO).then_some(Fp(ev.fingerprint)),
            verdict: Verdict::from_u32(ev.verdict).map_or_else(
                || format!("verdict_{}", ev.verdict),
                |v| v.name().to_owned(),
            ),
            action: action::name(ev.action)
                .map_or_else(|| format!("action_{}", ev.action), str::to_owned),
            listener: ctx.listener_name(ev.listener),
            src: endpoint(ev.saddr, ev.sport).to_string(),
            dst: endpoint(ev.daddr, ev.dport).to_string(),
            method: method::name(ev.method).to_owned(),
            path_hash: format!("{:016x}", ev.path_hash),
        }
    }

    /// One JSON object, no trailing newline.
    pub fn to_json_line(&self) -> Result<String, TelemetryError> {
        serde_json::to_string(self).map_err(TelemetryError::EventSerialize)
    }
}

/// The human one-liner.
impl fmt::Display for EventRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {:<13} {:<7} {} {} {} -> {} token={} path={}",
            self.time,
            self.verdict,
            self.action,
            self.listener,
            self.method,
            self.src,
            self.dst,
            Token(self.fingerprint),
            self.path_hash,
        )
    }
}

/// The daemon's warning that a token is about to expire.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpiryRecord {
    /// When the warning was given; RFC 3339, UTC.
    pub time: String,
    /// Always `expiring`: what tells this record from a decision in a JSON line.
    pub kind: String,
    pub fingerprint: Fp,
    /// RFC 3339, UTC.
    pub expires_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

impl ExpiryRecord {
    pub const KIND: &'static str = "expiring";

    /// `expires_at` in Unix seconds.
    pub fn new(
        time_tai_ns: u64,
        fp: &Fingerprint,
        expires_at: i64,
        label: Option<String>,
        tai_offset_ns: i64,
    ) -> Self {
        ExpiryRecord {
            time: rfc3339_from_tai(time_tai_ns, tai_offset_ns),
            kind: Self::KIND.to_owned(),
            fingerprint: Fp(*fp),
            expires_at: rfc3339_from_unix(expires_at),
            label,
        }
    }
}

/// `{time} expiring token={fp} expires={time} label="..."`: the verdict column says
/// `expiring`, so `grep` and eyes find it where they look for decisions.
impl fmt::Display for ExpiryRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {:<13} token={} expires={}",
            self.time, self.kind, self.fingerprint, self.expires_at
        )?;
        match &self.label {
            Some(l) => write!(f, " label={l:?}"),
            None => Ok(()),
        }
    }
}

/// One line of the event stream or export file. Untagged: an expiry record has `kind`,
/// a decision `verdict`, and files written before notices existed read as decisions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Record {
    Expiry(ExpiryRecord),
    Decision(EventRecord),
}

impl Record {
    pub fn fingerprint(&self) -> Option<Fp> {
        match self {
            Record::Expiry(e) => Some(e.fingerprint),
            Record::Decision(d) => d.fingerprint,
        }
    }

    /// The verdict of a decision, `expiring` for an expiry warning.
    pub fn kind(&self) -> &str {
        match self {
            Record::Expiry(e) => &e.kind,
            Record::Decision(d) => &d.verdict,
        }
    }

    pub fn to_json_line(&self) -> Result<String, TelemetryError> {
        serde_json::to_string(self).map_err(TelemetryError::EventSerialize)
    }
}

impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Record::Expiry(e) => e.fmt(f),
            Record::Decision(d) => d.fmt(f),
        }
    }
}

impl From<EventRecord> for Record {
    fn from(r: EventRecord) -> Self {
        Record::Decision(r)
    }
}

impl From<ExpiryRecord> for Record {
    fn from(r: ExpiryRecord) -> Self {
        Record::Expiry(r)
    }
}

/// What `--verdict` selects: a datapath verdict, or `expiring` for the daemon's expiry
/// warnings (which have no verdict). On the wire, by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Verdict(Verdict),
    Expiring,
}

impl EventKind {
    pub const EXPIRING: &'static str = ExpiryRecord::KIND;

    pub fn name(self) -> &'static str {
        match self {
            EventKind::Verdict(v) => v.name(),
            EventKind::Expiring => Self::EXPIRING,
        }
    }

    /// Every name `parse` accepts, for help and error messages.
    pub fn names() -> Vec<&'static str> {
        Verdict::ALL
            .iter()
            .map(|v| v.name())
            .chain([Self::EXPIRING])
            .collect()
    }

    pub fn parse(s: &str) -> Option<EventKind> {
        if s == Self::EXPIRING {
            return Some(EventKind::Expiring);
        }
        Verdict::from_name(s).map(EventKind::Verdict)
    }
}

impl Serialize for EventKind {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for EventKind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        EventKind::parse(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown verdict {s:?}")))
    }
}

/// Which records an event consumer wants (a subscriber, or `rampart events` reading the
/// export file); unset fields match everything.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventFilter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<Fp>,
    /// A verdict selects only decisions with it; `expiring` only expiry warnings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<EventKind>,
}

impl EventFilter {
    pub fn matches(&self, r: &Record) -> bool {
        self.fingerprint.is_none_or(|f| r.fingerprint() == Some(f))
            && self.verdict.is_none_or(|k| k.name() == r.kind())
    }
}

/// A fingerprint column of the one-liner: `-` for none.
struct Token(Option<Fp>);

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(fp) => fp.fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// A CLOCK_TAI instant as RFC 3339 UTC.
pub fn rfc3339_from_tai(tai_ns: u64, tai_offset_ns: i64) -> String {
    let unix_ns = (i128::from(tai_ns) - i128::from(tai_offset_ns)).clamp(0, u64::MAX.into());
    let t = UNIX_EPOCH + Duration::from_nanos(unix_ns as u64);
    humantime::format_rfc3339_nanos(t).to_string()
}

/// Unix seconds as RFC 3339 UTC (times before the epoch clamp to it).
pub fn rfc3339_from_unix(secs: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_secs(secs.max(0).unsigned_abs());
    humantime::format_rfc3339_seconds(t).to_string()
}

fn endpoint(addr: [u8; 16], port: u16) -> SocketAddr {
    let v6 = Ipv6Addr::from(addr);
    let ip = match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    };
    SocketAddr::new(ip, port)
}

#[cfg(test)]
mod tests {
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
}
