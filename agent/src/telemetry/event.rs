//! Events as records an operator can read: JSON lines for machines, a one-liner for
//! humans. Decisions are built from `agent_common::Event`, which carries only a fingerprint
//! and a keyed path hash, so a record never holds a token or a request path; the daemon's
//! own notices (a token about to expire) carry a fingerprint, an expiry and the label.

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    time::{Duration, UNIX_EPOCH},
};

use agent_common::{action, http::method, Event, Fingerprint, Verdict};
use serde::{Deserialize, Serialize};

use super::TelemetryError;
use crate::datapath::clock;

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
    /// 32 hex digits; `null` when the request carried no well-formed token.
    pub fingerprint: Option<String>,
    /// `Verdict::name()`.
    pub verdict: String,
    /// `passed`, `dropped` or `reset`.
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
        let verdict = match Verdict::from_u32(ev.verdict) {
            Some(v) => v.name().to_owned(),
            None => format!("verdict_{}", ev.verdict),
        };
        EventRecord {
            time: rfc3339_from_tai(ev.time_ns, ctx.tai_offset_ns),
            fingerprint: (ev.fingerprint != Fingerprint::ZERO).then(|| ev.fingerprint.to_string()),
            verdict,
            action: action_name(ev.action),
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
            self.fingerprint.as_deref().unwrap_or("-"),
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
    pub fingerprint: String,
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
            fingerprint: fp.to_string(),
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
    pub fn fingerprint(&self) -> Option<&str> {
        match self {
            Record::Expiry(e) => Some(&e.fingerprint),
            Record::Decision(d) => d.fingerprint.as_deref(),
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

/// Which records an event consumer wants.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct EventFilter {
    /// Only this fingerprint (32 hex digits, any case).
    pub token: Option<String>,
    /// Only this verdict name (`expiring`: only expiry warnings).
    pub verdict: Option<String>,
}

impl EventFilter {
    pub fn matches(&self, r: &Record) -> bool {
        let token_ok = match (&self.token, r.fingerprint()) {
            (None, _) => true,
            (Some(want), Some(have)) => want.eq_ignore_ascii_case(have),
            (Some(_), None) => false,
        };
        token_ok && self.verdict.as_ref().is_none_or(|v| v == r.kind())
    }
}

/// `action::*` as a word.
pub fn action_name(a: u8) -> String {
    match a {
        action::PASSED => "passed".to_owned(),
        action::DROPPED => "dropped".to_owned(),
        action::RESET => "reset".to_owned(),
        other => format!("action_{other}"),
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
            token: token.map(str::to_owned),
            verdict: verdict.map(str::to_owned),
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
            token: token.map(str::to_owned),
            verdict: verdict.map(str::to_owned),
        };
        let r = Record::from(unlabelled);
        assert!(f(None, Some("expiring")).matches(&r));
        assert!(!f(None, Some("throttled")).matches(&r));
        assert!(f(Some("0123456789ABCDEFFEDCBA9876543210"), None).matches(&r));
        assert!(!f(Some("0123456789abcdeffedcba9876543211"), None).matches(&r));
        assert!(!f(None, Some("expiring")).matches(&Record::Decision(decision)));
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
