//! The per-request decision, in the order the checks run: not a request → pass; an
//! unfinished request line → incomplete; a broken one → malformed; a malformed header
//! block (obs-fold, a second Authorization field, whitespace before its colon) →
//! malformed; no Authorization field → missing (incomplete when the block does not end in
//! the segment); its line cut off → incomplete; not `Bearer <token>` → malformed; a
//! fingerprint not in TOKENS → unknown (malformed when the token breaks the b64token
//! grammar); revoked; not yet valid; expired; out of scope; throttled; allow.

use agent_common::{
    default_policy,
    http::{known_method, method},
    mode,
    ports::{self, PortListener},
    GlobalConfig, ListenerConfig, ListenerKey, TokenInfo, Verdict, CLOCK_FIXED, SCAN_BYTES,
    TOKEN_ANY_SCOPE, TOKEN_REVOKED,
};
use aya_ebpf::helpers::generated::bpf_ktime_get_tai_ns;

use crate::{
    bearer, events, headers,
    maps::{CONFIG, LISTENERS, PORTS, SCRATCH, TOKENS, TOKEN_STATS},
    packet::{copy_in, Packet, DIRECT_COPY_MAX, HEADER_OFF_MASK},
    parse::{self, Flow},
    ramp,
    reply::{self, write_addrs},
    request_line::{self, LineError, RequestLine},
    scope::in_scope,
    scratch::{zero_words, Buf, Seen, SCAN_COMPLETE, SCAN_MALFORMED},
};

/// Segments up to this size are copied at once (see `decide`; `copy_in`).
const ONE_COPY: usize = DIRECT_COPY_MAX;

/// What the program entry needs to act on and record.
pub struct Decision {
    pub verdict: Verdict,
    /// None: not traffic of any listener (nothing is recorded).
    pub listener: Option<ListenerConfig>,
    /// Enforce mode and a denying verdict.
    pub deny: bool,
    pub flow: Option<Flow>,
    /// A segment of a connection whose server side this listener already reset (the
    /// client's retransmission): answered with an RST, neither judged again nor counted.
    pub rebound: bool,
}

impl Decision {
    const fn untouched() -> Self {
        Decision {
            verdict: Verdict::Pass,
            listener: None,
            deny: false,
            flow: None,
            rebound: false,
        }
    }
}

#[inline(always)]
pub fn judge(p: &impl Packet) -> Decision {
    let mut flow = match parse::parse(p) {
        Ok(Some(f)) => f,
        // Not TCP, or headers the stack will reject itself: none of our business.
        Ok(None) | Err(()) => return Decision::untouched(),
    };
    if flow.payload_len == 0 {
        return Decision::untouched();
    }
    let port_word = match PORTS.get(flow.dport as u32) {
        Some(w) if *w != 0 => *w,
        _ => return Decision::untouched(),
    };
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return Decision::untouched();
    };
    // Every header layout (VLAN tags, IP options, IPv6 extension headers) reaches this
    // point with different offsets; laundered, they are one state for the verifier.
    let buf = Buf::new(scratch);
    // The masks are no-ops: the parser bounds header offsets by MAX_HEADER_OFFSET (plus
    // a TCP header) and the payload by the 16-bit IP length.
    flow.l3_off = buf.launder_within(flow.l3_off, HEADER_OFF_MASK);
    flow.l4_off = buf.launder_within(flow.l4_off, HEADER_OFF_MASK);
    flow.payload_off = buf.launder_within(flow.payload_off, HEADER_OFF_MASK);
    flow.payload_len = buf.launder_within(flow.payload_len, 0xffff);
    let Some(listener) = listener(port_word, p.ifindex(), flow.dport) else {
        return Decision::untouched();
    };
    if listener.mode == mode::ENFORCE
        && listener.action == agent_common::deny_action::RESET
        && reply::already_reset(p, &flow)
    {
        return Decision {
            verdict: Verdict::Pass,
            listener: None,
            deny: true,
            flow: Some(flow),
            rebound: true,
        };
    }
    let Some(cfg) = CONFIG.get(0) else {
        return Decision::untouched();
    };
    // SAFETY: the per-CPU scratch map value, valid for this program run.
    let seen = unsafe { &mut (*scratch).seen };
    zero_words(seen as *mut Seen);
    let verdict = settle(buf, decide(p, cfg, buf, &flow, seen));
    let deny = listener.mode == mode::ENFORCE && denies(verdict, &listener);
    if verdict != Verdict::Pass && verdict != Verdict::Allow {
        report(p, cfg, buf, &flow, &listener, verdict, seen);
    }
    Decision {
        verdict,
        listener: Some(listener),
        deny,
        flow: Some(flow),
        rebound: false,
    }
}

/// The listener judging a packet to `port` received on `ifindex`: from the port's word
/// when it holds it (one array load, the common case), else from LISTENERS.
#[inline(always)]
fn listener(port_word: u64, ifindex: u32, port: u16) -> Option<ListenerConfig> {
    match ports::resolve(port_word, ifindex) {
        PortListener::Here(l) => Some(l),
        PortListener::None => None,
        PortListener::Lookup => {
            let key = ListenerKey {
                ifindex,
                port,
                _pad: 0,
            };
            let wildcard = ListenerKey { ifindex: 0, ..key };
            LISTENERS
                .get_ptr(key)
                .or_else(|| LISTENERS.get_ptr(wildcard))
                // SAFETY: map value pointer valid for this run.
                .map(|l| unsafe { *l })
        }
    }
}

/// Joins the many paths out of `decide` into one: passed through map memory, the verdict
/// is unknown to the verifier, which then checks what follows once rather than once per
/// verdict.
#[inline(always)]
fn settle(buf: Buf, v: Verdict) -> Verdict {
    let x = buf.launder(v as usize) as u32;
    Verdict::from_u32(x).unwrap_or(Verdict::Malformed)
}

/// `n` (1..=max, `max` a power of two) in a form the verifier can bound: LLVM drops a
/// plain `n != 0` check it can prove, leaving the helper a length of "0 or more".
#[inline(always)]
fn copy_len(n: usize, max: usize) -> u32 {
    (((n.wrapping_sub(1)) & (max - 1)) + 1) as u32
}

#[inline(always)]
fn denies(v: Verdict, l: &ListenerConfig) -> bool {
    match v {
        Verdict::Pass | Verdict::Allow => false,
        Verdict::Missing => l.on_missing != default_policy::ALLOW,
        Verdict::Unknown => l.on_unknown != default_policy::ALLOW,
        Verdict::Incomplete => l.on_incomplete != default_policy::ALLOW,
        _ => true,
    }
}

#[inline(always)]
fn now(cfg: &GlobalConfig) -> u64 {
    if cfg.clock_mode == CLOCK_FIXED {
        cfg.fixed_now_ns
    } else {
        // SAFETY: plain helper call.
        unsafe { bpf_ktime_get_tai_ns() }
    }
}

#[inline(always)]
fn decide(p: &impl Packet, cfg: &GlobalConfig, buf: Buf, flow: &Flow, seen: &mut Seen) -> Verdict {
    // A private copy: comparing `flow.payload_len` itself would narrow it, and the flow
    // (live until the verdict is acted on) would carry one verifier state per range.
    let plen = buf.launder_within(flow.payload_len, 0xffff);
    let n = if plen > SCAN_BYTES { SCAN_BYTES } else { plen };
    // A segment of up to ONE_COPY bytes (most requests) is copied at once. A larger one,
    // most often a body, gets a cheap first look: 24 bytes tell most non-requests apart.
    let first = if n <= ONE_COPY { n } else { 24 };
    if copy_in(p, flow.payload_off, buf.ptr(), copy_len(first, SCAN_BYTES)).is_err() {
        return Verdict::Malformed;
    }
    let (method, mlen, known) = match known_method(buf.word(0)) {
        Some((m, l)) if l <= first => (m, l, true),
        _ => match request_line::extension_method(buf, first) {
            Some(l) => (method::OTHER, l, false),
            None => return Verdict::Pass,
        },
    };
    let mlen = buf.launder(mlen);
    if n > first
        && p.load(flow.payload_off, buf.ptr(), copy_len(n, SCAN_BYTES))
            .is_err()
    {
        return Verdict::Malformed;
    }
    let scan = headers::scan_headers(buf, n);
    let line = match request_line::request_line(buf, scan, method, mlen, known) {
        Ok(l) => l,
        Err(LineError::NotRequest) => return Verdict::Pass,
        Err(LineError::Malformed) => return Verdict::Malformed,
        Err(LineError::Incomplete) => return Verdict::Incomplete,
    };
    seen.method = line.method as u64;
    seen.target_off = line.target_off as u64;
    seen.target_len = line.target_len as u64;

    if scan.end == SCAN_MALFORMED {
        return Verdict::Malformed;
    }
    if scan.auths == 0 {
        return if scan.end == SCAN_COMPLETE {
            Verdict::Missing
        } else {
            Verdict::Incomplete
        };
    }
    if scan.auth_lf == 0 {
        // The Authorization field itself is cut off.
        return Verdict::Incomplete;
    }
    let Ok(token) = bearer::bearer_token(buf, scan.auth_start as usize, scan.auth_lf as usize)
    else {
        return Verdict::Malformed;
    };
    let fp = bearer::token_fingerprint(&cfg.key, buf, &token);
    let Some(info) = TOKENS.get_ptr(fp) else {
        // Only now is the grammar checked (see `token_fingerprint`); a malformed token
        // gets no fingerprint in its event.
        if !bearer::token_is_valid(buf, &token) {
            return Verdict::Malformed;
        }
        seen.fingerprint = fp;
        return Verdict::Unknown;
    };
    seen.fingerprint = fp;
    // SAFETY: map value pointer valid for this run.
    let info: TokenInfo = unsafe { *info };
    let v = known_token(cfg, &info, buf, &line, method);
    // An admission is counted in TOKEN_STATE by `ramp::admit_request`.
    if v != Verdict::Allow {
        count_token(&fp, v);
    }
    v
}

#[inline(always)]
fn known_token(
    cfg: &GlobalConfig,
    info: &TokenInfo,
    buf: Buf,
    line: &RequestLine,
    method: u32,
) -> Verdict {
    // Kept in step with REVOKED by userspace (see `TOKEN_REVOKED`).
    if info.flags & TOKEN_REVOKED != 0 {
        return Verdict::Revoked;
    }
    let now = now(cfg);
    if info.not_before_ns != 0 && now < info.not_before_ns {
        return Verdict::NotYetValid;
    }
    if info.expires_ns != 0 && now >= info.expires_ns {
        return Verdict::Expired;
    }
    if info.flags & TOKEN_ANY_SCOPE == 0 && !in_scope(info.scopes, buf, line, method) {
        return Verdict::OutOfScope;
    }
    if ramp::admit_request(info, now) {
        Verdict::Allow
    } else {
        Verdict::Throttled
    }
}

#[inline(always)]
fn count_token(fp: &agent_common::Fingerprint, v: Verdict) {
    let idx = v as usize;
    if let Some(s) = TOKEN_STATS.get_ptr_mut(fp) {
        // SAFETY: per-CPU value pointer valid for this run; idx < VERDICT_COUNT.
        unsafe {
            if let Some(c) = (*s).by_verdict.get_mut(idx) {
                *c += 1;
            }
        }
        return;
    }
    // The new entry is built in the scratch value: the program's stack is too small for it
    // next to the bpf_loop callbacks' frames.
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: the per-CPU scratch map value.
    let fresh = unsafe { &mut (*scratch).new_stats };
    zero_words(fresh as *mut agent_common::TokenStats);
    if let Some(c) = fresh.by_verdict.get_mut(idx) {
        *c = 1;
    }
    let _ = TOKEN_STATS.insert(fp, fresh, 0);
}

#[inline(always)]
fn report(
    p: &impl Packet,
    cfg: &GlobalConfig,
    buf: Buf,
    flow: &Flow,
    l: &ListenerConfig,
    verdict: Verdict,
    seen: &Seen,
) {
    let deny = l.mode == mode::ENFORCE && denies(verdict, l);
    // The scratch still holds this request.
    let path_hash = if seen.target_len != 0 {
        bearer::target_hash(
            &cfg.key,
            buf,
            seen.target_off as usize,
            seen.target_len as usize,
        )
    } else {
        0
    };
    let action = if !deny {
        agent_common::action::PASSED
    } else if l.action == agent_common::deny_action::RESET {
        agent_common::action::RESET
    } else {
        agent_common::action::DROPPED
    };
    events::emit(p, cfg, now(cfg), |ev| {
        ev.fingerprint = seen.fingerprint;
        ev.path_hash = path_hash;
        // Left zeroed when the addresses cannot be read.
        let _ = write_addrs(p, flow, &mut ev.saddr, &mut ev.daddr);
        ev.sport = flow.sport;
        ev.dport = flow.dport;
        ev.listener = l.id;
        ev.verdict = verdict as u32;
        ev.method = seen.method as u32;
        ev.action = action;
    });
}
