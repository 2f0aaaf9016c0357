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
mod tests;
