//! The per-request decision (where requests start is `stream`'s business), in the order
//! the checks run: bytes that cannot start a request line → not_http; a request line or
//! header block that does not end yet → held for the next segment (incomplete once it
//! passes SCAN_BYTES); a broken request line → malformed (not_http for an unknown
//! method); a malformed header block (obs-fold, a second Authorization field, whitespace
//! before its colon) → malformed; no Authorization field → missing; not `Bearer <token>`
//! → malformed; a fingerprint not in TOKENS → unknown (malformed when the token breaks the
//! b64token grammar); revoked; not yet valid; expired; out of scope; throttled; allow.

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
    maps::{self, CONFIG, LISTENERS, PORTS, SCRATCH, TOKEN_STATS},
    packet::{copy_in, copy_len, Packet, HEADER_OFF_MASK},
    parse::{self, Flow, TCP_ACK, TCP_SYN},
    ramp,
    reply::{self, write_addrs},
    request_line::{self, LineError, MethodStart, RequestLine},
    scope::in_scope,
    scratch::{zero_words, Buf, HeaderScan, Seen, NOT_FOUND, SCAN_COMPLETE, SCAN_MALFORMED},
    stream::{self, Request},
};

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
    /// The program of the jump map that goes on with this segment (`stream::go_on`).
    pub next: Option<u32>,
}

impl Decision {
    const fn untouched() -> Self {
        Decision {
            verdict: Verdict::Pass,
            listener: None,
            deny: false,
            flow: None,
            rebound: false,
            next: None,
        }
    }

    /// Nothing to count in this run: the segment goes on in program `next`, or is done.
    const fn uncounted(flow: Flow, next: Option<u32>) -> Self {
        Decision {
            verdict: Verdict::Pass,
            listener: None,
            deny: false,
            flow: Some(flow),
            rebound: false,
            next,
        }
    }
}

/// A segment of an inspected port's traffic, as both programs see it.
struct Segment {
    flow: Flow,
    listener: ListenerConfig,
    buf: Buf,
}

/// Parses the packet and finds its listener; `None`: nothing to judge (not TCP, no data
/// and no SYN, an uninspected port).
#[inline(always)]
fn segment(p: &impl Packet) -> Option<Segment> {
    let mut flow = match parse::parse(p) {
        Ok(Some(f)) => f,
        // Not TCP, or headers the stack will reject itself: none of our business.
        Ok(None) | Err(()) => return None,
    };
    if flow.payload_len == 0 && flow.flags & TCP_SYN == 0 {
        // An ACK, FIN or RST without data: no byte of the stream.
        return None;
    }
    let port_word = match PORTS.get(flow.dport as u32) {
        Some(w) if *w != 0 => *w,
        _ => return None,
    };
    let scratch = SCRATCH.get_ptr_mut(0)?;
    // Every header layout (VLAN tags, IP options, IPv6 extension headers) reaches this
    // point with different offsets; laundered, they are one state for the verifier.
    let buf = Buf::new(scratch);
    // The masks are no-ops: the parser bounds header offsets by MAX_HEADER_OFFSET (plus
    // a TCP header) and the payload by the 16-bit IP length.
    flow.l3_off = buf.launder_within(flow.l3_off, HEADER_OFF_MASK);
    flow.l4_off = buf.launder_within(flow.l4_off, HEADER_OFF_MASK);
    flow.payload_off = buf.launder_within(flow.payload_off, HEADER_OFF_MASK);
    flow.payload_len = buf.launder_within(flow.payload_len, 0xffff);
    let listener = listener(port_word, p.ifindex(), flow.dport)?;
    if flow.flags & TCP_SYN != 0 {
        // Data in a SYN (TCP Fast Open) starts after the SYN's sequence number.
        flow.seq = flow.seq.wrapping_add(1);
    }
    Some(Segment {
        flow,
        listener,
        buf,
    })
}

/// The entry program's decision: a new segment (or the rest of one after a request) up
/// to its next request, which goes to the request program (`Decision::next`).
#[inline(always)]
pub fn entry(p: &impl Packet) -> Decision {
    let Some(Segment {
        flow,
        listener,
        buf,
    }) = segment(p)
    else {
        return Decision::untouched();
    };
    let first = stream::cursor(buf).cont == 0;
    if first && flow.flags & TCP_SYN != 0 {
        if flow.flags & TCP_ACK == 0 {
            // The SYN's own sequence number (see `segment`).
            stream::syn(p, flow.seq.wrapping_sub(1), &flow, buf);
        }
        if flow.payload_len == 0 {
            return Decision::untouched();
        }
    }
    if first
        && listener.mode == mode::ENFORCE
        && listener.action == agent_common::deny_action::RESET
        && reply::already_reset(p, &flow)
    {
        return Decision {
            verdict: Verdict::Pass,
            listener: None,
            deny: true,
            flow: Some(flow),
            rebound: true,
            next: None,
        };
    }
    let verdict = match stream::enter(p, &flow, buf) {
        stream::Step::Request => return Decision::uncounted(flow, Some(stream::REQUEST)),
        stream::Step::Done(None) => return Decision::uncounted(flow, None),
        stream::Step::Done(Some(v)) => settle(buf, v),
    };
    let Some(cfg) = CONFIG.get(0) else {
        return Decision::untouched();
    };
    // SAFETY: the per-CPU scratch map value, valid for this program run.
    let seen = unsafe { &mut (*buf.scratch()).seen };
    zero_words(seen as *mut Seen);
    decided(p, cfg, buf, flow, listener, verdict, seen, None)
}

/// The decision on `verdict` for this run, reported when it is neither allow nor pass;
/// the segment goes on in program `next` unless it is denied.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn decided(
    p: &impl Packet,
    cfg: &GlobalConfig,
    buf: Buf,
    flow: Flow,
    listener: ListenerConfig,
    verdict: Verdict,
    seen: &Seen,
    next: Option<u32>,
) -> Decision {
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
        next: if deny { None } else { next },
    }
}

/// The request program's decision: the request at the cursor.
#[inline(always)]
pub fn request_run(p: &impl Packet) -> Decision {
    let Some(Segment {
        flow,
        listener,
        buf,
    }) = segment(p)
    else {
        return Decision::untouched();
    };
    let Some(cfg) = CONFIG.get(0) else {
        return Decision::untouched();
    };
    // SAFETY: the per-CPU scratch map value, valid for this program run.
    let seen = unsafe { &mut (*buf.scratch()).seen };
    zero_words(seen as *mut Seen);
    let enforce = listener.mode == mode::ENFORCE;
    let v = stream::request(
        p,
        &flow,
        buf,
        |v| enforce && denies(v, &listener),
        |c, held| request(p, cfg, buf, &flow, seen, c.off as usize, held),
    );
    let verdict = settle(buf, v);
    let next = (stream::cursor(buf).more != 0).then_some(stream::ENTRY);
    decided(p, cfg, buf, flow, listener, verdict, seen, next)
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

#[inline(always)]
fn denies(v: Verdict, l: &ListenerConfig) -> bool {
    match v {
        Verdict::Pass | Verdict::Allow => false,
        Verdict::Missing => l.on_missing != default_policy::ALLOW,
        Verdict::Unknown => l.on_unknown != default_policy::ALLOW,
        Verdict::Incomplete => l.on_incomplete != default_policy::ALLOW,
        Verdict::NotHttp => l.on_not_http != default_policy::ALLOW,
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

/// Judges the request at payload offset `off`, whose first `held` bytes earlier segments
/// brought (already at the start of the scratch buffer): the segment's bytes go after
/// them, then `decide`.
#[inline(always)]
fn request(
    p: &impl Packet,
    cfg: &GlobalConfig,
    buf: Buf,
    flow: &Flow,
    seen: &mut Seen,
    off: usize,
    held: usize,
) -> Request {
    let plen = buf.launder_within(flow.payload_len, 0xffff);
    let off = buf.launder_within(off, 0xffff);
    if off >= plen {
        return Request::Judged(Verdict::Malformed);
    }
    let room = SCAN_BYTES - held;
    let n = if plen - off > room { room } else { plen - off };
    // The held bytes are in the buffer already (`stream::enter` put them there): one copy
    // path, so the verifier walks what follows once.
    let held = buf.launder_within(held, SCAN_BYTES - 1);
    // SAFETY: `held` < SCAN_BYTES and the copy at most SCAN_BYTES: inside the scratch
    // buffer, which holds twice that.
    let dst = unsafe { buf.ptr().add(held) };
    if copy_in(p, flow.payload_off + off, dst, copy_len(n, SCAN_BYTES)).is_err() {
        return Request::Judged(Verdict::Malformed);
    }
    decide(cfg, buf, held + n, seen)
}

/// Judges the request whose first `n` bytes are in the scratch buffer.
#[inline(always)]
fn decide(cfg: &GlobalConfig, buf: Buf, n: usize, seen: &mut Seen) -> Request {
    let n = buf.launder_within(n, 2 * SCAN_BYTES - 1);
    let (method, mlen, known) = match known_method(buf.word(0)) {
        Some((m, l)) if l <= n => (m, l, true),
        _ => match request_line::extension_method(buf, n) {
            MethodStart::Method(l) => (method::OTHER, l, false),
            MethodStart::Prefix => return Request::Hold(n),
            MethodStart::No => return Request::Judged(Verdict::NotHttp),
        },
    };
    let mlen = buf.launder(mlen);
    let scan = headers::scan_headers(buf, n);
    let line = match request_line::request_line(buf, scan, method, mlen, known) {
        Ok(l) => l,
        Err(LineError::NotRequest) if scan.first_lf == NOT_FOUND => return Request::Hold(n),
        Err(LineError::NotRequest) => return Request::Judged(Verdict::NotHttp),
        Err(LineError::Malformed) => return Request::Judged(Verdict::Malformed),
        Err(LineError::Incomplete) => return Request::Hold(n),
    };
    seen.method = line.method as u64;
    seen.target_off = line.target_off as u64;
    seen.target_len = line.target_len as u64;

    if scan.end == SCAN_MALFORMED {
        return Request::Judged(Verdict::Malformed);
    }
    if scan.end != SCAN_COMPLETE {
        // The header block goes on in a later segment: judged once it ends.
        return Request::Hold(n);
    }
    if scan.auths > 1 {
        return Request::Judged(Verdict::Malformed);
    }
    Request::Judged(judge_block(cfg, buf, scan, &line, method, seen))
}

/// The decision on a request whose header block is complete in the scratch buffer.
#[inline(always)]
fn judge_block(
    cfg: &GlobalConfig,
    buf: Buf,
    scan: &HeaderScan,
    line: &RequestLine,
    method: u32,
    seen: &mut Seen,
) -> Verdict {
    if scan.auths == 0 {
        return Verdict::Missing;
    }
    if scan.auth_lf == 0 {
        return Verdict::Malformed;
    }
    let Ok(token) = bearer::bearer_token(buf, scan.auth_start as usize, scan.auth_lf as usize)
    else {
        return Verdict::Malformed;
    };
    let fp = bearer::token_fingerprint(&cfg.key, buf, &token);
    let Some(info) = maps::token(&fp) else {
        // Only now is the grammar checked (see `token_fingerprint`); a malformed token
        // gets no fingerprint in its event.
        if !bearer::token_is_valid(buf, &token) {
            return Verdict::Malformed;
        }
        seen.fingerprint = fp;
        return Verdict::Unknown;
    };
    seen.fingerprint = fp;
    let v = known_token(cfg, &info, buf, line, method);
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
