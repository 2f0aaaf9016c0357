//! Map keys, map values and events shared by kernel and userspace.

/// Longest token accepted (RFC 6750 b64token); longer is `malformed`.
pub const MAX_TOKEN_LEN: usize = 4096;
/// Ramp stages per contract.
pub const MAX_STAGES: usize = 16;
/// Scope definitions; a token's scope set is a bitmask over these.
pub const MAX_SCOPES: usize = 64;
/// Longest scope path prefix.
pub const MAX_SCOPE_PREFIX: usize = 128;
/// Contracts that can be loaded at once.
pub const MAX_CONTRACTS: u32 = 1024;
/// Listeners (interface + port) the datapath tells apart in its statistics.
pub const MAX_LISTENERS: u32 = 64;
/// Bytes of an HTTP request (request line + header block) the parser examines.
pub const SCAN_BYTES: usize = 8192;
/// Default capacity of the token, revocation and token-state maps.
pub const DEFAULT_MAX_TOKENS: u32 = 1 << 20;
/// Default capacity of the connection table (`FLOWS`): concurrent connections tracked.
pub const DEFAULT_MAX_FLOWS: u32 = 1 << 18;
/// Default capacity of `PARTIAL`: connections at once whose request line or header block
/// spans segments.
pub const DEFAULT_MAX_PARTIAL: u32 = 1024;

/// The keyed 128-bit fingerprint of a token (SipHash-2-4-128 words `[h1, h2]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u64; 2]);

impl Fingerprint {
    pub const ZERO: Fingerprint = Fingerprint([0, 0]);
}

/// The one text form of a fingerprint, wherever it is shown or stored: 32 lower-case hex
/// digits, `{:016x}{:016x}` of its words.
impl core::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:016x}{:016x}", self.0[0], self.0[1])
    }
}

/// Text that is not 32 hex digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParseFingerprintError;

impl core::fmt::Display for ParseFingerprintError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("a fingerprint is 32 hex digits")
    }
}

impl core::error::Error for ParseFingerprintError {}

/// Parses the `Display` form, in either case (policy files ask for lower case themselves).
impl core::str::FromStr for Fingerprint {
    type Err = ParseFingerprintError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // `from_str_radix` alone would also take a sign.
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ParseFingerprintError);
        }
        let word = |r: core::ops::Range<usize>| {
            u64::from_str_radix(&s[r], 16).map_err(|_| ParseFingerprintError)
        };
        Ok(Fingerprint([word(0..16)?, word(16..32)?]))
    }
}

/// The 128-bit fingerprint key, loaded by userspace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FingerprintKey(pub [u64; 2]);

/// Per-request decision, in decision order. Counted per listener in `VERDICT_STATS`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    /// Not an inspected HTTP request (other port, ACK, body segment...).
    Pass = 0,
    Allow = 1,
    Missing = 2,
    Malformed = 3,
    Incomplete = 4,
    Unknown = 5,
    Revoked = 6,
    NotYetValid = 7,
    Expired = 8,
    OutOfScope = 9,
    Throttled = 10,
    /// Where an HTTP/1.x request must start (a connection's first byte, or the byte after
    /// a request and its body) stand bytes that cannot start one: the h2c preface, a TLS
    /// ClientHello, binary. Denied unless the listener sets `on_not_http = allow`.
    NotHttp = 11,
    /// Data of a connection the datapath holds no state for: it opened before the
    /// listener attached, or its state was evicted from a full flow table. Where its next
    /// request starts is unknown, so nothing of it is let through.
    Untracked = 12,
    /// A segment that does not continue the byte stream where the datapath judged it up to
    /// (ahead of a gap, or overlapping judged bytes other than as an exact retransmission
    /// of the last segment). Dropped, never reset: the client's TCP sends it again in order.
    OutOfSequence = 13,
}

pub const VERDICT_COUNT: usize = 14;
/// Verdicts a request with a known token can get (`Pass` through `Throttled`): the
/// entries of `TokenStats`.
pub const TOKEN_VERDICT_COUNT: usize = 11;

impl Verdict {
    pub const ALL: [Verdict; VERDICT_COUNT] = [
        Verdict::Pass,
        Verdict::Allow,
        Verdict::Missing,
        Verdict::Malformed,
        Verdict::Incomplete,
        Verdict::Unknown,
        Verdict::Revoked,
        Verdict::NotYetValid,
        Verdict::Expired,
        Verdict::OutOfScope,
        Verdict::Throttled,
        Verdict::NotHttp,
        Verdict::Untracked,
        Verdict::OutOfSequence,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Allow => "allow",
            Verdict::Missing => "missing",
            Verdict::Malformed => "malformed",
            Verdict::Incomplete => "incomplete",
            Verdict::Unknown => "unknown",
            Verdict::Revoked => "revoked",
            Verdict::NotYetValid => "not_yet_valid",
            Verdict::Expired => "expired",
            Verdict::OutOfScope => "out_of_scope",
            Verdict::Throttled => "throttled",
            Verdict::NotHttp => "not_http",
            Verdict::Untracked => "untracked",
            Verdict::OutOfSequence => "out_of_sequence",
        }
    }

    pub fn from_u32(v: u32) -> Option<Verdict> {
        Verdict::ALL.get(v as usize).copied()
    }

    /// The verdict `name` names (`Verdict::name`).
    pub fn from_name(name: &str) -> Option<Verdict> {
        Verdict::ALL.into_iter().find(|v| v.name() == name)
    }
}

/// What the datapath did with a judged request (in events).
pub mod action {
    /// Let through: allowed, observe mode, or a default of `allow`.
    pub const PASSED: u8 = 0;
    pub const DROPPED: u8 = 1;
    /// The server side got an RST in place of the request.
    pub const RESET: u8 = 2;

    /// Each action's name in events, indexed by its value: like `Verdict::name`, named
    /// where it is defined.
    pub const NAMES: [&str; 3] = ["passed", "dropped", "reset"];

    /// `None` for a value this build does not know.
    pub fn name(action: u8) -> Option<&'static str> {
        NAMES.get(usize::from(action)).copied()
    }
}

/// Listener `mode`.
pub mod mode {
    pub const ENFORCE: u8 = 0;
    pub const OBSERVE: u8 = 1;
}

/// Listener `action` on a denied request.
pub mod deny_action {
    pub const DROP: u8 = 0;
    pub const RESET: u8 = 1;
}

/// Default for missing / unknown / incomplete tokens.
pub mod default_policy {
    pub const DENY: u8 = 0;
    pub const ALLOW: u8 = 1;
}

/// Global datapath configuration, `CONFIG[0]`. Written by userspace at load and on reload.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GlobalConfig {
    pub key: FingerprintKey,
    /// Events each CPU may emit per second; what exceeds it is counted as dropped.
    pub events_per_sec: u32,
    /// `CLOCK_FIXED` makes the datapath read `fixed_now_ns` instead of the clock (tests only).
    pub clock_mode: u32,
    pub fixed_now_ns: u64,
}

pub const CLOCK_REAL: u32 = 0;
pub const CLOCK_FIXED: u32 = 1;

/// `LISTENERS` key: an interface and a TCP destination port (host byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    pub ifindex: u32,
    pub port: u16,
    pub _pad: u16,
}

/// How one listener treats the requests it judges.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenerConfig {
    /// Index into the statistics (< MAX_LISTENERS).
    pub id: u32,
    pub mode: u8,
    pub action: u8,
    pub on_missing: u8,
    pub on_unknown: u8,
    pub on_incomplete: u8,
    /// `default_policy` for `Verdict::NotHttp` (pins from before it hold 0: deny).
    pub on_not_http: u8,
    pub _pad: [u8; 2],
}

/// Token flag: the token is not restricted to its scope set.
pub const TOKEN_ANY_SCOPE: u32 = 1;
/// Token flag: the fingerprint is in `REVOKED`. The datapath reads this instead of looking
/// the fingerprint up in `REVOKED` (one hash lookup less per request). Userspace keeps the
/// two in step in one place, `Datapath` (agent/src/datapath/tables.rs): every TOKENS write
/// carries it for a revoked fingerprint, a revocation sets it on the installed entry, and
/// loading adopted maps sets it wherever a daemon that predates it left it out.
pub const TOKEN_REVOKED: u32 = 1 << 1;
/// Token flag, only in `NEXT_TOKENS`: the generation being switched to removes the token.
pub const TOKEN_ABSENT: u32 = 1 << 2;

/// `GENERATION[0]`: the token generation the programs judge by (low 32 bits) and, in this
/// bit, whether a switch to it is under way: then `NEXT_TOKENS` holds the entries the
/// generation changes or removes, and is read before `TOKENS` (agent-ebpf's `maps::token`;
/// userspace's side is agent/src/datapath/switch.rs).
pub const GENERATION_SWITCHING: u64 = 1 << 32;

/// `TOKENS` value: what a fingerprint may do. Times are CLOCK_TAI nanoseconds, 0 = unset.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenInfo {
    pub contract: u32,
    pub flags: u32,
    /// Bitmask over `SCOPES` indexes.
    pub scopes: u64,
    pub not_before_ns: u64,
    pub expires_ns: u64,
    /// Explicit ramp start; 0 = the first request starts the ramp.
    pub ramp_start_ns: u64,
    /// The token's `TOKEN_STATE` index. Userspace's `Datapath` assigns it (whatever an
    /// `install_token` caller passes): one slot per installed fingerprint, zeroed before
    /// the entry that names it is written.
    pub state_slot: u32,
    /// The token generation from which the entry applies: the programs ignore a `TOKENS`
    /// entry of a later generation than `GENERATION`'s (it is a new token of a generation
    /// not switched to yet). 0 in pins from before generations: always applies.
    pub generation: u32,
}

/// One ramp stage: from `after_ns` past the ramp start, GCRA with emission interval
/// `interval_ns` (= 1 s / rate) and tolerance `tolerance_ns` (= burst × interval).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stage {
    pub after_ns: u64,
    pub interval_ns: u64,
    pub tolerance_ns: u64,
}

/// `CONTRACTS[i]`: a ramp of up to MAX_STAGES stages with an optional breach penalty.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Contract {
    pub n_stages: u32,
    /// On breach, demote by this many stages ...
    pub penalty_stages: u32,
    /// ... for this long after the last breach.
    pub penalty_ns: u64,
    pub stages: [Stage; MAX_STAGES],
}

/// `SCOPES[i]`: a method set and a request-target prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scope {
    /// Bitmask of `http::method` bits.
    pub methods: u32,
    pub prefix_len: u32,
    pub prefix: [u8; MAX_SCOPE_PREFIX],
}

impl Default for Scope {
    fn default() -> Self {
        Scope {
            methods: 0,
            prefix_len: 0,
            prefix: [0; MAX_SCOPE_PREFIX],
        }
    }
}

/// `TOKEN_STATE[TokenInfo::state_slot]`: per-token runtime state, updated lock-free by the
/// datapath. All zero: the token has not been seen since its slot was assigned (or its
/// ramp restarted); the first admission fills in `first_seen_ns` and the ramp start.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenState {
    /// GCRA theoretical arrival time (compare-and-swap).
    pub tat_ns: u64,
    /// When the ramp started (first use, or `TokenInfo::ramp_start_ns`).
    pub ramp_start_ns: u64,
    /// Penalty demotion applies until then.
    pub penalty_until_ns: u64,
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    pub breaches: u64,
    /// Contract the state was built under; a reload that changes it resets the state.
    pub contract: u32,
    /// Stage the last admission decision used (after any penalty).
    pub stage: u32,
    /// Requests admitted (atomic add). Counted here, on the cache line the admission
    /// already holds, instead of in `TOKEN_STATS` (one hash lookup less per allowed
    /// request); `Datapath::token_stats` adds it back in.
    pub allowed: u64,
}

/// `TOKEN_STATS` value (per CPU): requests by verdict for one token.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenStats {
    pub by_verdict: [u64; TOKEN_VERDICT_COUNT],
}

/// `EVENT_BUDGET[0]` (per CPU): the event rate cap's window.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventBudget {
    pub window_start_ns: u64,
    pub emitted: u64,
    /// Events the cap (or a full ring) dropped, ever.
    pub dropped: u64,
}

/// A decision other than allow/pass, streamed through the `EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    pub time_ns: u64,
    /// Zero when the request carried no (well-formed) token.
    pub fingerprint: Fingerprint,
    /// Keyed hash of the request-target (no path bytes leave the kernel either).
    pub path_hash: u64,
    /// IPv4 addresses are IPv4-mapped IPv6 (::ffff:a.b.c.d).
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub listener: u32,
    pub verdict: u32,
    /// One `http::method` bit.
    pub method: u32,
    /// One of `action::*`.
    pub action: u8,
    pub _pad: [u8; 7],
}

/// A TCP connection as its client sends it: `FLOWS` key. IPv4 addresses are IPv4-mapped.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowId {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
}

/// Where a connection's byte stream stands (`FlowState::kind`).
pub mod stream {
    /// The next byte starts a request (empty lines before it are skipped, as servers do).
    pub const BOUNDARY: u32 = 0;
    /// The next `remaining` bytes are a request body framed by Content-Length.
    pub const BODY: u32 = 1;
    /// The next bytes continue a request's header block, `partial` bytes of which are in
    /// `PARTIAL`.
    pub const HEADERS: u32 = 2;
    /// Inside a chunked body; `remaining` holds the chunk position (see the datapath's
    /// `chunked` module).
    pub const CHUNKED: u32 = 3;
}

/// `FLOWS` value: one connection's judged position, and the position before the last
/// segment that moved it (an exact retransmission of that segment is judged again from
/// there).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowState {
    /// Sequence number of the next byte to judge.
    pub next: u32,
    /// One of `stream::*`, at `next`.
    pub kind: u32,
    /// Body bytes left (BODY), chunk state (CHUNKED), header bytes held (HEADERS).
    pub remaining: u64,
    /// The same three at the start of the last segment that moved the stream.
    pub prev: u32,
    pub prev_kind: u32,
    pub prev_remaining: u64,
    /// The client's initial sequence number (from its SYN).
    pub isn: u32,
    pub _pad: u32,
    /// CLOCK_MONOTONIC_COARSE of the SYN.
    pub seen_ns: u64,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for Fingerprint {}
    unsafe impl aya::Pod for GlobalConfig {}
    unsafe impl aya::Pod for ListenerKey {}
    unsafe impl aya::Pod for ListenerConfig {}
    unsafe impl aya::Pod for TokenInfo {}
    unsafe impl aya::Pod for Contract {}
    unsafe impl aya::Pod for Scope {}
    unsafe impl aya::Pod for TokenState {}
    unsafe impl aya::Pod for TokenStats {}
    unsafe impl aya::Pod for EventBudget {}
    unsafe impl aya::Pod for Event {}
    unsafe impl aya::Pod for FlowId {}
    unsafe impl aya::Pod for FlowState {}
}
