//! The responses of `action = "respond"`: rendered here, once per listener and verdict,
//! into the `RESPONSES` map (`agent_common::respond`), which the datapath copies into the
//! denied segment. What each verdict gets:
//!
//! | verdict | status | `WWW-Authenticate` (RFC 6750) |
//! |---|---|---|
//! | missing | 401 | `Bearer realm="…"` (no error code, §3.1) |
//! | unknown, revoked, expired, not_yet_valid | 401 | `…, error="invalid_token"` |
//! | malformed | 400 | `…, error="invalid_request"` |
//! | incomplete (header block past 8 KiB) | 431 | – |
//! | out_of_scope | 403 | `…, error="insufficient_scope"` |
//! | throttled | 429, with `Retry-After`, `RateLimit-Policy`, `RateLimit` (written by the datapath) | – |
//!
//! Every response has `Connection: close` and an `application/problem+json` body (RFC
//! 9457) naming the verdict; no fingerprint, token byte or internal detail.

use agent_common::{
    respond::{answer, Answer, ResponseTemplate, Status, TEMPLATE_BYTES},
    Verdict,
};

/// A listener's `realm` and `problem_type`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseConfig {
    /// The `realm` of the `WWW-Authenticate: Bearer` challenges.
    pub realm: String,
    /// The problem details' `type` URI.
    pub problem_type: String,
}

impl Default for ResponseConfig {
    fn default() -> Self {
        ResponseConfig {
            // Names the protection space, nothing about this host.
            realm: "api".to_owned(),
            // RFC 9457 §4.2.1: no further semantics beyond the status code.
            problem_type: "about:blank".to_owned(),
        }
    }
}

/// Longest `realm` and `problem_type`: with them every response fits its template.
pub const MAX_REALM: usize = 32;
pub const MAX_PROBLEM_TYPE: usize = 60;

fn plain(s: &str) -> bool {
    s.bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
}

/// A realm must be printable ASCII without `"` or `\` (it goes into a quoted-string).
pub fn check_realm(realm: &str) -> Result<(), String> {
    if realm.is_empty() || realm.len() > MAX_REALM || !plain(realm) {
        return Err(format!(
            "`realm` must be 1 to {MAX_REALM} printable ASCII characters without '\"' or '\\'"
        ));
    }
    Ok(())
}

/// A problem type is a URI: printable ASCII without spaces, `"` or `\`.
pub fn check_problem_type(t: &str) -> Result<(), String> {
    if t.is_empty()
        || t.len() > MAX_PROBLEM_TYPE
        || !plain(t)
        || t.contains(' ')
        || !t.contains(':')
    {
        return Err(format!(
            "`problem_type` must be a URI (scheme:...) of at most {MAX_PROBLEM_TYPE} printable \
             ASCII characters without spaces, '\"' or '\\'"
        ));
    }
    Ok(())
}

/// What the body's `detail` says for a verdict.
fn detail(v: Verdict) -> &'static str {
    match v {
        Verdict::Missing => "The request carries no bearer token.",
        Verdict::Unknown => "The token is not known.",
        Verdict::Revoked => "The token was revoked.",
        Verdict::NotYetValid => "The token is not valid yet.",
        Verdict::Expired => "The token has expired.",
        Verdict::Malformed => "The request or its token is malformed.",
        Verdict::Incomplete => "The request's header block is too long.",
        Verdict::OutOfScope => "The token does not cover this request.",
        Verdict::Throttled => "The token's rate contract does not admit the request yet.",
        Verdict::Pass
        | Verdict::Allow
        | Verdict::NotHttp
        | Verdict::Untracked
        | Verdict::OutOfSequence => "",
    }
}

/// The response to `verdict` (with `status`), as text. A 429's rate fields are not in it:
/// the datapath writes them after the status line (`insert_at`).
pub fn render(cfg: &ResponseConfig, verdict: Verdict, status: Status) -> (String, usize) {
    let body = format!(
        "{{\"type\":\"{}\",\"title\":\"{}\",\"status\":{},\"detail\":\"{}\",\"verdict\":\"{}\"}}\n",
        cfg.problem_type,
        status.reason(),
        status.code(),
        detail(verdict),
        verdict.name()
    );
    let status_line = format!("HTTP/1.1 {} {}\r\n", status.code(), status.reason());
    let mut head = status_line.clone();
    if status.challenge() {
        head.push_str(&format!("WWW-Authenticate: Bearer realm=\"{}\"", cfg.realm));
        if let Some(e) = status.bearer_error() {
            head.push_str(&format!(", error=\"{e}\""));
        }
        head.push_str("\r\n");
    }
    head.push_str(&format!(
        "Content-Type: application/problem+json\r\nContent-Length: {}\r\nConnection: \
         close\r\n\r\n",
        body.len()
    ));
    (head + &body, status_line.len())
}

/// The `RESPONSES` entry of `verdict`: `None` for verdicts answered otherwise (reset,
/// drop), an error when the response does not fit its template.
pub fn template(cfg: &ResponseConfig, verdict: Verdict) -> Result<ResponseTemplate, String> {
    let Answer::Status(status) = answer(verdict) else {
        return Ok(ResponseTemplate::default());
    };
    let (text, status_line) = render(cfg, verdict, status);
    if text.len() > TEMPLATE_BYTES {
        return Err(format!(
            "the {} response to `{}` is {} bytes, more than the {TEMPLATE_BYTES} a response \
             may have: shorten `realm` or `problem_type`",
            status.code(),
            verdict.name(),
            text.len()
        ));
    }
    let mut t = ResponseTemplate {
        len: text.len() as u32,
        insert_at: if status == Status::Throttled {
            status_line as u32
        } else {
            0
        },
        ..Default::default()
    };
    t.bytes[..text.len()].copy_from_slice(text.as_bytes());
    Ok(t)
}

/// Every verdict's entry for a listener.
pub fn templates(cfg: &ResponseConfig) -> Result<Vec<(Verdict, ResponseTemplate)>, String> {
    Verdict::ALL
        .into_iter()
        .map(|v| Ok((v, template(cfg, v)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(t: &ResponseTemplate) -> String {
        String::from_utf8(t.bytes[..t.len as usize].to_vec()).unwrap()
    }

    #[test]
    fn statuses_and_challenges() {
        let cfg = ResponseConfig {
            realm: "orders".into(),
            problem_type: "https://example.com/problems/token".into(),
        };
        let t = |v| text(&template(&cfg, v).unwrap());
        assert!(t(Verdict::Missing).starts_with(
            "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"orders\"\r\n"
        ));
        for v in [
            Verdict::Unknown,
            Verdict::Revoked,
            Verdict::Expired,
            Verdict::NotYetValid,
        ] {
            assert!(t(v).contains(
                "\r\nWWW-Authenticate: Bearer realm=\"orders\", error=\"invalid_token\"\r\n"
            ));
            assert!(t(v).starts_with("HTTP/1.1 401 "));
        }
        assert!(t(Verdict::Malformed).starts_with("HTTP/1.1 400 Bad Request\r\n"));
        assert!(t(Verdict::Malformed).contains("error=\"invalid_request\""));
        assert!(t(Verdict::OutOfScope).starts_with("HTTP/1.1 403 Forbidden\r\n"));
        assert!(t(Verdict::OutOfScope).contains("error=\"insufficient_scope\""));
        assert!(t(Verdict::Throttled).starts_with("HTTP/1.1 429 Too Many Requests\r\n"));
        assert!(!t(Verdict::Throttled).contains("WWW-Authenticate"));
        assert!(t(Verdict::Incomplete).starts_with("HTTP/1.1 431 "));
        for v in [Verdict::NotHttp, Verdict::Untracked, Verdict::Allow] {
            assert_eq!(template(&cfg, v).unwrap().len, 0, "{v:?}");
        }
        let th = template(&cfg, Verdict::Throttled).unwrap();
        assert_eq!(
            th.insert_at as usize,
            "HTTP/1.1 429 Too Many Requests\r\n".len()
        );
        assert_eq!(template(&cfg, Verdict::Missing).unwrap().insert_at, 0);
    }

    #[test]
    fn bodies_are_problem_details_of_their_length() {
        let cfg = ResponseConfig::default();
        for (v, t) in templates(&cfg).unwrap() {
            if t.len == 0 {
                continue;
            }
            let s = text(&t);
            let (head, body) = s.split_once("\r\n\r\n").unwrap();
            assert!(head.contains("\r\nConnection: close"));
            assert!(head.contains("\r\nContent-Type: application/problem+json"));
            let cl: usize = head
                .split("\r\n")
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(cl, body.len(), "{v:?}");
            let j: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(j["type"], "about:blank");
            assert_eq!(j["verdict"], v.name());
            assert_eq!(
                j["status"].as_u64().unwrap(),
                u64::from(s[9..12].parse::<u16>().unwrap())
            );
        }
    }

    #[test]
    fn longest_realm_and_type_fit() {
        let cfg = ResponseConfig {
            realm: "r".repeat(MAX_REALM),
            problem_type: format!("https:{}", "t".repeat(MAX_PROBLEM_TYPE - 6)),
        };
        check_realm(&cfg.realm).unwrap();
        check_problem_type(&cfg.problem_type).unwrap();
        templates(&cfg).unwrap();
    }

    #[test]
    fn realm_and_type_are_checked() {
        assert!(check_realm("a\"b").is_err());
        assert!(check_realm("").is_err());
        assert!(check_realm(&"r".repeat(MAX_REALM + 1)).is_err());
        assert!(check_problem_type("no scheme").is_err());
        assert!(check_problem_type("about:blank").is_ok());
    }
}
