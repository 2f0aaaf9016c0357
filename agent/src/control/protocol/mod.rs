//! Wire format of the control socket: one JSON object per line each way.
//!
//! Request: `{"op": "<name>", ...fields}`. Response: `{"ok": true, ...body}` or
//! `{"ok": false, "error": "..."}`. After a successful `events.subscribe` the server sends one
//! event object per line until the client disconnects: a `telemetry::event::Record`, as the
//! export file holds it.

mod body;

use agent_common::Fingerprint;
pub use body::*;
use serde::{de::DeserializeOwned, Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::telemetry::event::Record;
pub use crate::telemetry::event::{EventFilter, EventKind};

/// A fingerprint on the wire: 32 lower-case hex characters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fp(pub Fingerprint);

impl Serialize for Fp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Fp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse::<Fingerprint>()
            .map(Fp)
            .map_err(|_| serde::de::Error::custom("fingerprint must be 32 hex characters"))
    }
}

impl std::fmt::Display for Fp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Every operation the daemon understands. Durations are whole seconds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", deny_unknown_fields)]
pub enum Request {
    #[serde(rename = "token.issue")]
    TokenIssue {
        contract: String,
        #[serde(default)]
        scopes: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ttl_secs: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        label: Option<String>,
    },
    #[serde(rename = "token.rotate")]
    TokenRotate {
        fingerprint: Fp,
        /// How long the old token stays valid; 0 when unset.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        grace_secs: Option<u64>,
        /// Lifetime of the successor; unset keeps the old token's lifetime.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ttl_secs: Option<u64>,
    },
    #[serde(rename = "token.revoke")]
    TokenRevoke {
        fingerprint: Fp,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    #[serde(rename = "token.list")]
    TokenList {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expiring_within_secs: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        idle_secs: Option<u64>,
        /// Include revoked and expired tokens.
        #[serde(default)]
        all: bool,
        /// Only tokens on this contract.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        contract: Option<String>,
        /// Only tokens recorded after this one (the `next` of the previous page).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<Fp>,
        /// At most this many tokens (unset: every one, in one reply).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    #[serde(rename = "token.show")]
    TokenShow { fingerprint: Fp },
    /// Imports the JSON-lines file at `path` (read by the daemon: a million tokens do not
    /// fit a request line), all or nothing.
    #[serde(rename = "token.import")]
    TokenImport { path: String },
    #[serde(rename = "token.export")]
    TokenExport,
    #[serde(rename = "status")]
    Status,
    #[serde(rename = "reload")]
    Reload,
    #[serde(rename = "events.subscribe")]
    EventsSubscribe {
        #[serde(flatten)]
        filter: EventFilter,
    },
    #[serde(rename = "top")]
    Top {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<usize>,
    },
}

/// `OPS` and `Request::op` from one table of names: the `match` stays exhaustive (a new
/// variant without a name does not compile) and the list cannot drift from it. The names
/// are the variants' serde renames; a test checks that each parses as its variant.
macro_rules! op_names {
    ($($variant:ident => $name:literal,)*) => {
        /// Op names, for error messages.
        pub const OPS: &[&str] = &[$($name),*];

        impl Request {
            /// The op's name on the wire.
            pub fn op(&self) -> &'static str {
                match self {
                    $(Request::$variant { .. } => $name,)*
                }
            }
        }
    };
}

op_names! {
    TokenIssue => "token.issue",
    TokenRotate => "token.rotate",
    TokenRevoke => "token.revoke",
    TokenList => "token.list",
    TokenShow => "token.show",
    TokenImport => "token.import",
    TokenExport => "token.export",
    Status => "status",
    Reload => "reload",
    EventsSubscribe => "events.subscribe",
    Top => "top",
}

impl Request {
    /// Parses one request line, with messages that say what is wrong (never echoing values:
    /// a confused client might have sent a token).
    pub fn parse(line: &[u8]) -> Result<Request, String> {
        let text = std::str::from_utf8(line)
            .map_err(|e| format!("request is not valid UTF-8 (at byte {})", e.valid_up_to()))?;
        let value: Value = serde_json::from_str(text)
            .map_err(|e| format!("request is not valid JSON: {}", json_pos(&e)))?;
        let Value::Object(obj) = &value else {
            return Err("request must be a JSON object".into());
        };
        let op = match obj.get("op") {
            Some(Value::String(op)) => op.clone(),
            Some(_) => return Err("\"op\" must be a string".into()),
            None => return Err("request has no \"op\"".into()),
        };
        if !OPS.contains(&op.as_str()) {
            // Op names are short identifiers; cap what we echo anyway.
            let shown: String = op.chars().take(40).collect();
            return Err(format!("unknown op {shown:?} (known: {})", OPS.join(", ")));
        }
        serde_json::from_value(value).map_err(|e| format!("invalid {op} request: {e}"))
    }
}

/// Position of a JSON syntax error, without serde_json's echo of the offending input.
fn json_pos(e: &serde_json::Error) -> String {
    format!(
        "{:?} error at line {} column {}",
        e.classify(),
        e.line(),
        e.column()
    )
}

/// A response line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(flatten)]
    pub body: Map<String, Value>,
}

/// A response body could not be built or read as the expected type.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("response body must serialise to a JSON object")]
    NotAnObject,
    #[error("response body does not match the expected shape")]
    Shape(#[source] serde_json::Error),
    #[error("daemon: {0}")]
    Daemon(String),
}

impl Response {
    /// `{"ok": true}` plus the fields of `body` (which must serialise to an object).
    pub fn ok<T: Serialize>(body: &T) -> Response {
        match serde_json::to_value(body) {
            Ok(Value::Object(body)) => Response {
                ok: true,
                error: None,
                body,
            },
            Ok(Value::Null) => Response::ok_empty(),
            Ok(_) => Response::error(BodyError::NotAnObject.to_string()),
            Err(e) => Response::error(format!("cannot encode response: {e}")),
        }
    }

    pub fn ok_empty() -> Response {
        Response {
            ok: true,
            error: None,
            body: Map::new(),
        }
    }

    pub fn error(msg: impl Into<String>) -> Response {
        Response {
            ok: false,
            error: Some(msg.into()),
            body: Map::new(),
        }
    }

    /// The body as `T`, or the daemon's error.
    pub fn into_result<T: DeserializeOwned>(self) -> Result<T, BodyError> {
        if !self.ok {
            return Err(BodyError::Daemon(
                self.error.unwrap_or_else(|| "unspecified error".into()),
            ));
        }
        serde_json::from_value(Value::Object(self.body)).map_err(BodyError::Shape)
    }

    /// The line to write, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self)
            .unwrap_or_else(|_| br#"{"ok":false,"error":"cannot encode response"}"#.to_vec());
        v.push(b'\n');
        v
    }
}

/// What follows a successful `events.subscribe` response, one per line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StreamItem {
    /// The subscriber fell behind and this many events were skipped.
    Lagged {
        lagged: u64,
    },
    Event(Box<Record>),
}

#[cfg(test)]
mod tests {
    use agent_common::Verdict;

    use super::*;

    #[test]
    fn requests_round_trip_and_parse_errors_are_specific() {
        let fp = Fingerprint([0x0123_4567_89ab_cdef, 0x1]);
        let reqs = [
            Request::TokenIssue {
                contract: "standard".into(),
                scopes: vec!["read".into()],
                ttl_secs: Some(60),
                label: None,
            },
            Request::TokenRevoke {
                fingerprint: Fp(fp),
                reason: Some("leak".into()),
            },
            Request::EventsSubscribe {
                filter: EventFilter {
                    fingerprint: Some(Fp(fp)),
                    verdict: Some(EventKind::Verdict(Verdict::OutOfScope)),
                },
            },
            Request::EventsSubscribe {
                filter: EventFilter {
                    fingerprint: None,
                    verdict: Some(EventKind::Expiring),
                },
            },
            Request::Status,
        ];
        for r in reqs {
            let line = serde_json::to_vec(&r).unwrap();
            assert_eq!(Request::parse(&line).unwrap(), r);
        }
        let line = br#"{"op":"events.subscribe","verdict":"out_of_scope"}"#;
        assert!(matches!(
            Request::parse(line).unwrap(),
            Request::EventsSubscribe { filter } if filter.verdict == Some(EventKind::Verdict(Verdict::OutOfScope))
        ));

        let err = |l: &[u8]| Request::parse(l).unwrap_err();
        assert!(err(b"\xff\xfe").contains("UTF-8"));
        assert!(err(b"{\"op\":").contains("not valid JSON"));
        assert!(err(b"[1]").contains("JSON object"));
        assert!(err(br#"{"op":"token.explode"}"#).contains("unknown op"));
        assert!(err(br#"{"op":"token.issue"}"#).contains("missing field `contract`"));
        assert!(err(br#"{"op":"token.show","fingerprint":"xyz"}"#).contains("32 hex"));
        assert!(err(br#"{"op":"events.subscribe","verdict":"maybe"}"#).contains("unknown verdict"));
    }

    /// Each name in `OPS` is its variant's serde rename: it parses (or fails on its fields,
    /// not on the op) as a request whose `op()` is that name.
    #[test]
    fn every_op_name_parses_as_its_variant() {
        for name in OPS {
            let line = serde_json::to_vec(&serde_json::json!({ "op": name })).unwrap();
            match Request::parse(&line) {
                Ok(r) => assert_eq!(r.op(), *name),
                Err(e) => assert!(
                    e.starts_with(&format!("invalid {name} request: missing field")),
                    "{name}: {e}"
                ),
            }
        }
    }

    #[test]
    fn response_shape() {
        let r = Response::ok(&RevokeBody {
            fingerprint: Fp(Fingerprint([1, 2])),
            revoked_at: 5,
            reason: "x".into(),
            already: false,
        });
        let line = String::from_utf8(r.to_line()).unwrap();
        assert!(line.starts_with(r#"{"ok":true,"#));
        assert!(line.contains(r#""fingerprint":"00000000000000010000000000000002""#));
        let back: Response = serde_json::from_str(&line).unwrap();
        let body: RevokeBody = back.into_result().unwrap();
        assert_eq!(body.revoked_at, 5);

        // `reload` answers as it did when it was built from `json!`.
        let r = Response::ok(&ReloadBody { generation: 3 });
        assert_eq!(
            String::from_utf8(r.to_line()).unwrap(),
            "{\"ok\":true,\"generation\":3}\n"
        );

        let e = Response::error("nope");
        assert_eq!(
            String::from_utf8(e.to_line()).unwrap(),
            "{\"ok\":false,\"error\":\"nope\"}\n"
        );
        assert!(matches!(
            e.into_result::<RevokeBody>(),
            Err(BodyError::Daemon(m)) if m == "nope"
        ));
    }
}
