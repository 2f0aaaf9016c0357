//! The `respond` action: what a denied request is answered with, and the arithmetic of the
//! 429's `Retry-After` and RateLimit fields. Userspace renders one response per listener and
//! verdict (`ResponseTemplate`, in the `RESPONSES` map); the datapath copies it into the
//! denied segment, inserting a throttled request's rate fields after the status line.

use crate::{gcra::NANOS_PER_SEC, Verdict, VERDICT_COUNT};

/// Bytes of a rendered response (status line, headers, body). With the 429's rate fields
/// (`RATE_FIELDS_MAX`) a response stays within 512 bytes: one segment at any MSS a TCP
/// stack accepts (IPv4's minimum is 536), and one `bpf_csum_diff` call.
pub const TEMPLATE_BYTES: usize = 384;
/// Bytes of the rate fields the datapath writes into a 429 (three header lines).
pub const RATE_FIELDS_MAX: usize = 128;
/// The longest response the datapath sends.
pub const RESPONSE_MAX: usize = TEMPLATE_BYTES + RATE_FIELDS_MAX;
const _: () = assert!(RESPONSE_MAX <= 512);

/// The name of the one RateLimit policy a 429 reports (the token's current ramp stage).
pub const POLICY_NAME: &str = "ramp";

/// `RESPONSES` value: a listener's response to one verdict. `len` 0: none (the datapath
/// resets the connection instead).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResponseTemplate {
    pub len: u32,
    /// Where the rate fields go (after the status line's CRLF); 0: none.
    pub insert_at: u32,
    pub bytes: [u8; TEMPLATE_BYTES],
}

impl Default for ResponseTemplate {
    fn default() -> Self {
        ResponseTemplate {
            len: 0,
            insert_at: 0,
            bytes: [0; TEMPLATE_BYTES],
        }
    }
}

/// `RESPONDED` value: a connection whose client got a response from the datapath. Its next
/// segments are turned into an RST to the server (which never saw the request), then an
/// ACK of the client's FIN. Sequence numbers in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Responded {
    /// The sequence number the server expects from the client: the denied segment's.
    pub server_seq: u32,
    /// The acknowledgement number the denied segment carried: the server's next byte.
    pub server_ack: u32,
    /// The client's sequence number after the denied segment (what the response acked).
    pub client_end: u32,
    /// Our sequence number after the response and its FIN.
    pub reply_end: u32,
    /// `RESPONDED_OPEN` or `RESPONDED_SERVER_RESET`.
    pub state: u32,
    pub _pad: u32,
    /// When the response was sent (CLOCK_BOOTTIME ns).
    pub at_ns: u64,
}

/// `Responded::state`: the server still holds the connection.
pub const RESPONDED_OPEN: u32 = 0;
/// `Responded::state`: the server side was reset; the client's FIN is acked.
pub const RESPONDED_SERVER_RESET: u32 = 1;

/// The `RESPONSES` index of a listener's response to `verdict`.
#[inline(always)]
pub fn index(listener: u32, verdict: u32) -> u32 {
    listener * VERDICT_COUNT as u32 + verdict
}

/// What a `respond` listener does with a denied verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// An HTTP response with this status.
    Status(Status),
    /// Reset the connection: there is no request to answer (not HTTP, or a connection
    /// whose stream position is unknown).
    Reset,
    /// Drop the segment: the client's TCP sends it again in order.
    Drop,
}

/// The statuses a `respond` listener answers with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// 401 without an error code (RFC 6750 §3.1: no authentication information).
    NoToken,
    /// 401 `invalid_token`.
    InvalidToken,
    /// 400 `invalid_request`.
    InvalidRequest,
    /// 431: a header block longer than the datapath reads.
    HeadersTooLarge,
    /// 403 `insufficient_scope`.
    InsufficientScope,
    /// 429 with `Retry-After` and the RateLimit fields.
    Throttled,
}

impl Status {
    pub const fn code(self) -> u16 {
        match self {
            Status::NoToken | Status::InvalidToken => 401,
            Status::InvalidRequest => 400,
            Status::HeadersTooLarge => 431,
            Status::InsufficientScope => 403,
            Status::Throttled => 429,
        }
    }

    pub const fn reason(self) -> &'static str {
        match self {
            Status::NoToken | Status::InvalidToken => "Unauthorized",
            Status::InvalidRequest => "Bad Request",
            Status::HeadersTooLarge => "Request Header Fields Too Large",
            Status::InsufficientScope => "Forbidden",
            Status::Throttled => "Too Many Requests",
        }
    }

    /// The RFC 6750 error code of the `WWW-Authenticate` challenge; `None` with
    /// `challenge`: a challenge without one.
    pub const fn bearer_error(self) -> Option<&'static str> {
        match self {
            Status::InvalidToken => Some("invalid_token"),
            Status::InvalidRequest => Some("invalid_request"),
            Status::InsufficientScope => Some("insufficient_scope"),
            Status::NoToken | Status::HeadersTooLarge | Status::Throttled => None,
        }
    }

    /// Whether the response carries a `WWW-Authenticate: Bearer` challenge.
    pub const fn challenge(self) -> bool {
        !matches!(self, Status::HeadersTooLarge | Status::Throttled)
    }
}

/// The answer to a denied `verdict`.
pub const fn answer(verdict: Verdict) -> Answer {
    match verdict {
        Verdict::Missing => Answer::Status(Status::NoToken),
        Verdict::Unknown | Verdict::Revoked | Verdict::NotYetValid | Verdict::Expired => {
            Answer::Status(Status::InvalidToken)
        }
        Verdict::Malformed => Answer::Status(Status::InvalidRequest),
        Verdict::Incomplete => Answer::Status(Status::HeadersTooLarge),
        Verdict::OutOfScope => Answer::Status(Status::InsufficientScope),
        Verdict::Throttled => Answer::Status(Status::Throttled),
        Verdict::NotHttp | Verdict::Untracked => Answer::Reset,
        // Never denied (pass, allow) or never answered (out of sequence).
        Verdict::Pass | Verdict::Allow | Verdict::OutOfSequence => Answer::Drop,
    }
}

/// Whole seconds until GCRA admits the token's next request: the theoretical arrival time
/// `tat` less the stage's `tolerance` is the first instant `admit` says yes. Rounded up, and
/// never 0 (a request that was just throttled is told to wait at least a second).
#[inline(always)]
pub fn retry_after_secs(tat: u64, now: u64, tolerance: u64) -> u64 {
    retry_after_secs_per(tat, now, tolerance, NANOS_PER_SEC)
}

/// `retry_after_secs` with the nanoseconds per second passed in: the datapath passes a
/// value LLVM cannot see, as a division by a constant becomes a 128-bit multiplication,
/// which BPF does not have.
#[inline(always)]
pub fn retry_after_secs_per(tat: u64, now: u64, tolerance: u64, sec: u64) -> u64 {
    if sec == 0 {
        return 1;
    }
    let admit_at = tat.saturating_sub(tolerance);
    let wait = admit_at.saturating_sub(now);
    let secs = wait.div_ceil(sec);
    if secs == 0 {
        1
    } else {
        secs
    }
}

/// The stage as a RateLimit policy (quota `q` per window `w` seconds): GCRA is a token
/// bucket of `burst + 1` requests refilled one per `interval`, so the quota is the bucket
/// and the window the time it takes to refill it, in whole seconds rounded up (at least 1).
#[inline(always)]
pub fn quota_window(interval_ns: u64, tolerance_ns: u64) -> (u64, u64) {
    quota_window_per(interval_ns, tolerance_ns, NANOS_PER_SEC)
}

/// `quota_window` with the nanoseconds per second passed in (see `retry_after_secs_per`).
#[inline(always)]
pub fn quota_window_per(interval_ns: u64, tolerance_ns: u64, sec: u64) -> (u64, u64) {
    if interval_ns == 0 || sec == 0 {
        return (1, 1);
    }
    let quota = tolerance_ns / interval_ns + 1;
    // quota × interval, without a multiplication (an overflow-checked one needs a
    // 128-bit helper BPF does not have).
    let refill = (tolerance_ns - tolerance_ns % interval_ns).saturating_add(interval_ns);
    let window = refill.div_ceil(sec);
    (quota, if window == 0 { 1 } else { window })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gcra::admit;

    const S: u64 = NANOS_PER_SEC;

    #[test]
    fn retry_after_is_when_gcra_admits_again() {
        // 1/s, burst 0: after a request at t=10 s, the next is admitted at 11 s.
        let (interval, tolerance) = (S, 0);
        let tat = admit(0, 10 * S, interval, tolerance).unwrap();
        let now = 10 * S + S / 4;
        assert!(admit(tat, now, interval, tolerance).is_none());
        let r = retry_after_secs(tat, now, tolerance);
        assert_eq!(r, 1);
        assert!(admit(tat, now + r * S, interval, tolerance).is_some());
        // 0.1/s: ten seconds, rounded up from 9.75.
        let tat = admit(0, 10 * S, 10 * S, 0).unwrap();
        assert_eq!(retry_after_secs(tat, now, 0), 10);
        // Already admissible (another CPU moved on): still 1, never 0.
        assert_eq!(retry_after_secs(5 * S, 10 * S, 0), 1);
        // Exactly on a second.
        assert_eq!(retry_after_secs(13 * S, 10 * S, S), 2);
    }

    #[test]
    fn retry_after_never_too_early() {
        for interval in [S / 7, S / 2, S, 3 * S + 1] {
            for burst in 0..3 {
                let tolerance = burst * interval;
                let mut tat = 0;
                let mut now = 100 * S;
                while let Some(t) = admit(tat, now, interval, tolerance) {
                    tat = t;
                }
                now += 12_345;
                let r = retry_after_secs(tat, now, tolerance);
                assert!(r >= 1);
                assert!(admit(tat, now + r * S, interval, tolerance).is_some());
                assert!(r == 1 || admit(tat, now + (r - 1) * S - 1, interval, tolerance).is_none());
            }
        }
    }

    #[test]
    fn quota_and_window() {
        // 5/s burst 10: 11 at once, refilled in 2.2 s → 3.
        assert_eq!(quota_window(S / 5, 10 * (S / 5)), (11, 3));
        // 1/s burst 0.
        assert_eq!(quota_window(S, 0), (1, 1));
        // 1000/s burst 1000: 1001 in 1.001 s → 2.
        assert_eq!(quota_window(S / 1000, 1000 * (S / 1000)), (1001, 2));
        assert_eq!(quota_window(0, 0), (1, 1));
    }

    #[test]
    fn every_verdict_has_an_answer() {
        for v in Verdict::ALL {
            let a = answer(v);
            match v {
                Verdict::Pass | Verdict::Allow | Verdict::OutOfSequence => {
                    assert_eq!(a, Answer::Drop)
                }
                Verdict::NotHttp | Verdict::Untracked => assert_eq!(a, Answer::Reset),
                _ => assert!(matches!(a, Answer::Status(_)), "{v:?}"),
            }
        }
        assert_eq!(answer(Verdict::Missing), Answer::Status(Status::NoToken));
        assert_eq!(Status::NoToken.bearer_error(), None);
        assert!(Status::NoToken.challenge());
    }
}
