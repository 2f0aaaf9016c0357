//! Helpers for the attach tests: a datapath configured the way the daemon would (real
//! clock, one generous contract), verdict-count deltas, and a raw HTTP/1.1 client over a
//! `TcpStream` opened inside a namespace, so a test controls the request bytes exactly and
//! sees exactly what TCP did (response, reset, silence).
//!
//! Tokens only ever live in request byte buffers: nothing here formats, logs or returns
//! them, and errors mention fingerprints at most.

use std::{
    fmt::Write as _,
    io::{self, Read, Write},
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use agent_common::{
    default_policy, gcra::NANOS_PER_SEC, siphash::fingerprint, Contract, Fingerprint,
    FingerprintKey, GlobalConfig, ListenerConfig, Stage, TokenInfo, Verdict, CLOCK_REAL,
    TOKEN_ANY_SCOPE, VERDICT_COUNT,
};
use rampart::datapath::{Datapath, DatapathError, LoadOptions};

use crate::{
    client::BearerToken,
    netns::{Netns, NetnsError},
};

/// Fingerprint key of every attach test (any fixed key will do: the tests compare the
/// kernel's fingerprints with `siphash::fingerprint` under the same key).
pub const KEY: FingerprintKey = FingerprintKey([0x5eed_0123_4567_89ab, 0xa77a_c4ed_cafe_f00d]);
/// Contract index the tokens use.
pub const CONTRACT: u32 = 0;

/// Loads the object (unpinned, small maps), sets the real clock and contract 0:
/// 1000 requests/s with a burst of 100, far above anything a test sends.
pub fn load_datapath() -> Result<Datapath, DatapathError> {
    let mut dp = Datapath::load(LoadOptions {
        max_tokens: 1024,
        max_revoked: 1024,
        token_stats: 1024,
        ring_bytes: 1 << 16,
        max_flows: agent_common::DEFAULT_MAX_FLOWS,
        pin_dir: None,
    })?;
    dp.set_config(&GlobalConfig {
        key: KEY,
        events_per_sec: 1000,
        clock_mode: CLOCK_REAL,
        fixed_now_ns: 0,
    })?;
    let interval_ns = NANOS_PER_SEC / 1000;
    let mut contract = Contract {
        n_stages: 1,
        ..Default::default()
    };
    contract.stages[0] = Stage {
        after_ns: 0,
        interval_ns,
        tolerance_ns: 100 * interval_ns,
    };
    dp.set_contract(CONTRACT, &contract)?;
    Ok(dp)
}

/// A listener that denies missing, unknown and incomplete tokens.
pub fn listener(id: u32, mode: u8, action: u8) -> ListenerConfig {
    ListenerConfig {
        id,
        mode,
        action,
        on_missing: default_policy::DENY,
        on_unknown: default_policy::DENY,
        on_incomplete: default_policy::DENY,
        on_not_http: agent_common::default_policy::DENY,
        max_header_kib: 0,
        _pad: 0,
    }
}

/// The fingerprint the kernel computes for `token`.
pub fn fp(token: &BearerToken) -> Fingerprint {
    fingerprint(&KEY, token.expose().as_bytes())
}

/// `{:016x}{:016x}`: the only form a token may appear in output.
pub fn fp_hex(f: &Fingerprint) -> String {
    f.to_string()
}

/// Installs `token` for any scope under [`CONTRACT`].
pub fn install_token(dp: &mut Datapath, token: &BearerToken) -> Result<(), DatapathError> {
    dp.install_token(
        fp(token),
        TokenInfo {
            contract: CONTRACT,
            flags: TOKEN_ANY_SCOPE,
            ..Default::default()
        },
    )
}

/// A fresh random token (never printed).
pub fn random_token() -> BearerToken {
    BearerToken::new(format!("rmp_attach_{:032x}", rand::random::<u128>()))
}

/// Verdict counters of one listener, to diff before/after a request.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Counts(pub [u64; VERDICT_COUNT]);

impl Counts {
    pub fn read(dp: &Datapath, listener: u32) -> Result<Self, DatapathError> {
        dp.verdict_counts(listener).map(Counts)
    }

    pub fn get(&self, v: Verdict) -> u64 {
        self.0[v as usize]
    }

    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &Counts) -> Counts {
        let mut d = [0u64; VERDICT_COUNT];
        for (i, o) in d.iter_mut().enumerate() {
            *o = self.0[i].saturating_sub(earlier.0[i]);
        }
        Counts(d)
    }

    /// Non-zero counters other than `pass` (ACKs and handshakes are not requests).
    pub fn requests_only(&self) -> Vec<(Verdict, u64)> {
        Verdict::ALL
            .into_iter()
            .filter(|v| *v != Verdict::Pass && self.get(*v) != 0)
            .map(|v| (v, self.get(v)))
            .collect()
    }
}

impl std::fmt::Debug for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = String::new();
        for v in Verdict::ALL {
            if self.get(v) != 0 {
                let _ = write!(s, "{}={} ", v.name(), self.get(v));
            }
        }
        write!(f, "Counts[{}]", s.trim_end())
    }
}

/// How a request carries its credentials.
#[derive(Clone, Copy)]
pub enum Auth<'a> {
    None,
    Bearer(&'a BearerToken),
    /// Two `Authorization` fields: ambiguous, so malformed whatever the tokens are.
    Twice(&'a BearerToken),
}

/// `GET <path>` with `X-Test-Id: <test_id>`; the bytes hold the token, never print them.
pub fn request_bytes(path: &str, test_id: &str, auth: Auth<'_>) -> Vec<u8> {
    let mut r = format!("GET {path} HTTP/1.1\r\nHost: upstream\r\nX-Test-Id: {test_id}\r\n");
    match auth {
        Auth::None => {}
        Auth::Bearer(t) => {
            let _ = write!(r, "Authorization: Bearer {}\r\n", t.expose());
        }
        Auth::Twice(t) => {
            for _ in 0..2 {
                let _ = write!(r, "Authorization: Bearer {}\r\n", t.expose());
            }
        }
    }
    r.push_str("Accept: */*\r\n\r\n");
    r.into_bytes()
}

/// What the client saw for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Response {
        status: u16,
        body: String,
    },
    /// ECONNRESET (or EPIPE): the connection was reset.
    Reset,
    /// Nothing arrived within the deadline.
    TimedOut,
    /// Orderly close before any response byte.
    Closed,
    Failed(io::ErrorKind),
}

/// What the client saw, and how long it took.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub outcome: Outcome,
    pub elapsed: Duration,
}

impl Exchange {
    pub fn status(&self) -> Option<u16> {
        match self.outcome {
            Outcome::Response { status, .. } => Some(status),
            _ => None,
        }
    }
}

/// One client TCP connection, opened inside a namespace.
#[derive(Debug)]
pub struct HttpConn {
    stream: TcpStream,
}

impl HttpConn {
    /// Connects from inside `ns` (the socket stays in that namespace for its life).
    pub fn connect(ns: &Netns, addr: SocketAddr) -> Result<io::Result<Self>, NetnsError> {
        ns.run(|| {
            TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map(|stream| {
                // Requests go out at once, one segment each.
                let _ = stream.set_nodelay(true);
                HttpConn { stream }
            })
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.stream.local_addr()
    }

    /// Sends `request` and reads one response (head plus Content-Length body), waiting
    /// at most `timeout` for it.
    pub fn exchange(&mut self, request: &[u8], timeout: Duration) -> Exchange {
        let start = Instant::now();
        let outcome = self.exchange_inner(request, start + timeout);
        Exchange {
            outcome,
            elapsed: start.elapsed(),
        }
    }

    fn exchange_inner(&mut self, request: &[u8], deadline: Instant) -> Outcome {
        if let Err(e) = self.stream.write_all(request) {
            return classify(e);
        }
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(done) = complete_response(&buf) {
                return done;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Outcome::TimedOut;
            }
            if let Err(e) = self.stream.set_read_timeout(Some(left)) {
                return classify(e);
            }
            match self.stream.read(&mut chunk) {
                Ok(0) if buf.is_empty() => return Outcome::Closed,
                Ok(0) => return Outcome::Failed(io::ErrorKind::UnexpectedEof),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return classify(e),
            }
        }
    }

    /// Closes with an RST (SO_LINGER 0): a connection whose request was dropped still
    /// has unacknowledged data, so a FIN would never be accepted by the server.
    pub fn abort(self) {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: valid fd and a correctly sized linger struct.
        unsafe {
            libc::setsockopt(
                self.stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
    }
}

fn classify(e: io::Error) -> Outcome {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Outcome::TimedOut,
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => Outcome::Reset,
        k => Outcome::Failed(k),
    }
}

/// The response in `buf`, once head and body are all there.
fn complete_response(buf: &[u8]) -> Option<Outcome> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..head_end]);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let len: usize = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(n, _)| n.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    if buf.len() < head_end + len {
        return None;
    }
    Some(Outcome::Response {
        status,
        body: String::from_utf8_lossy(&buf[head_end..head_end + len]).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_bytes_carry_the_token_only_in_the_authorization_fields() {
        let t = BearerToken::new("secret-attach-token");
        let twice = String::from_utf8(request_bytes("/a", "id", Auth::Twice(&t))).unwrap();
        assert_eq!(
            twice
                .matches("Authorization: Bearer secret-attach-token\r\n")
                .count(),
            2
        );
        assert!(twice.ends_with("\r\n\r\n"));
        let none = String::from_utf8(request_bytes("/a", "id", Auth::None)).unwrap();
        assert!(!none.contains("Authorization"));
    }

    #[test]
    fn response_is_complete_only_with_its_body() {
        let r = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nab";
        assert_eq!(complete_response(r), None);
        let r = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc";
        assert_eq!(
            complete_response(r),
            Some(Outcome::Response {
                status: 200,
                body: "abc".into()
            })
        );
    }
}
