//! The `respond` action: a denied request is answered from here with a complete HTTP/1.1
//! response (`agent_common::respond`), and the server never sees it.
//!
//! One packet leaves per program run, so the connection is taken apart in turns, each
//! driven by a segment of the client's:
//! 1. the denied segment becomes the response (XDP_TX / TC redirect back out): the
//!    client's addresses and ports swapped, sequence number = the segment's
//!    acknowledgement (the server's next byte), acknowledging the request, FIN set (the
//!    response says `Connection: close`). The connection is remembered in `RESPONDED`;
//! 2. the client's next segment (its ACK of the response, its FIN, anything) becomes an
//!    RST to the server carrying the sequence number the server expects (the denied
//!    segment's), which the server accepts: its socket is gone, having seen nothing;
//! 3. the client's FIN (or a retransmission of it) is acked back to the client, whose
//!    socket then closes cleanly.
//!
//! A retransmission of the denied request (the response was lost) is judged again and
//! answered again. Everything else the client sends meanwhile is dropped.

use agent_common::{
    mode,
    respond::{
        self, quota_window_per, retry_after_secs_per, Responded, ResponseTemplate, RATE_FIELDS_MAX,
        RESPONDED_OPEN, RESPONDED_SERVER_RESET, RESPONSE_MAX, TEMPLATE_BYTES,
    },
    ListenerConfig, Verdict, MAX_STAGES,
};
use aya_ebpf::helpers::generated::{
    bpf_csum_diff, bpf_ktime_get_boot_ns, bpf_ktime_get_coarse_ns, bpf_probe_read_kernel,
};

use crate::{
    maps::{
        RespondBuf, CONFIG, CONTRACTS, LAST_RESPOND, RESPONDED, RESPOND_BUF, RESPONSES, SCRATCH,
        TOKENS, TOKEN_STATE,
    },
    packet::{copy_len, ptr_at, ptr_at_mut, Packet},
    parse::{EthHdr, Flow, Ipv4Hdr, Ipv6Hdr, TcpHdr, TCP_ACK, TCP_RST, TCP_SYN},
    reply::{fold, sum_words},
    scratch::opaque,
};

const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;

/// How long an answered connection is remembered.
const MEMORY_NS: u64 = 30_000_000_000;
/// `LAST_RESPOND` is read with a coarse clock (a tick or so behind): this much more keeps
/// the lookup on for every connection still remembered.
const COARSE_SLACK_NS: u64 = 1_000_000_000;
/// The window the response advertises (scaled by the server's window scale): room for the
/// client's ACK and FIN, which is all that is expected of it.
const WINDOW: u16 = 512;

/// What a segment of an answered connection became.
#[derive(Clone, Copy)]
pub enum Follow {
    /// An RST to the server: let it continue.
    ToServer,
    /// An ACK of the client's FIN: send it back out.
    ToClient,
    /// Nothing more to say: drop it.
    Drop,
}

/// The event action of a denied `verdict` at a `respond` listener.
#[inline(always)]
pub fn event_action(verdict: Verdict) -> u8 {
    match respond::answer(verdict) {
        respond::Answer::Status(_) => agent_common::action::RESPONDED,
        respond::Answer::Reset => agent_common::action::RESET,
        respond::Answer::Drop => agent_common::action::DROPPED,
    }
}

#[inline(always)]
fn buf() -> Result<&'static mut RespondBuf, ()> {
    let b = RESPOND_BUF.get_ptr_mut(0).ok_or(())?;
    // SAFETY: the per-CPU map value, valid for this program run.
    Ok(unsafe { &mut *b })
}

/// Whether a connection may still be remembered as answered (see `LAST_RESPOND`).
#[inline(always)]
pub fn watching() -> bool {
    match LAST_RESPOND.get(0) {
        // SAFETY: plain helper call. A `LAST_RESPOND` ahead of the clock counts as now.
        Some(t) => {
            *t != 0
                && unsafe { bpf_ktime_get_coarse_ns() }.saturating_sub(*t)
                    < MEMORY_NS + COARSE_SLACK_NS
        }
        None => true,
    }
}

/// A segment of a `respond` listener's connection, before it is judged: `Some` when the
/// connection was answered and the segment is one of the turns of the module comment
/// (already rewritten), `None` when it is to be judged as usual.
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "by value, the keys and entries (map memory) would be copied to the stack"
)]
#[inline(always)]
pub fn follow_up(p: &impl Packet, f: &Flow, l: &ListenerConfig) -> Option<Follow> {
    if l.mode != mode::ENFORCE || l.action != agent_common::deny_action::RESPOND || !watching() {
        return None;
    }
    let b = buf().ok()?;
    crate::stream::write_flow_id(p, f, &mut b.id).ok()?;
    let r = RESPONDED.get_ptr_mut(&b.id)?;
    // SAFETY: map value pointer valid for this run.
    let r = unsafe { &mut *r };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    if now.wrapping_sub(r.at_ns) >= MEMORY_NS || f.flags & TCP_SYN != 0 {
        // Forgotten, or a new connection on the same 4-tuple.
        let _ = RESPONDED.remove(&b.id);
        return None;
    }
    if f.payload_len != 0 && f.seq == r.server_seq {
        // The denied request again (the response was lost): judged and answered again.
        return None;
    }
    let (server_seq, server_ack, reply_end) = (r.server_seq, r.server_ack, r.reply_end);
    if r.state == RESPONDED_OPEN {
        r.state = RESPONDED_SERVER_RESET;
        let rst = TCP_RST | TCP_ACK;
        return Some(
            match rewrite(p, f, server_seq, server_ack, rst, NO_PAYLOAD, false) {
                Ok(()) => Follow::ToServer,
                Err(()) => Follow::Drop,
            },
        );
    }
    if f.flags & TCP_FIN == 0 {
        if f.flags & TCP_RST != 0 {
            let _ = RESPONDED.remove(&b.id);
        }
        return Some(Follow::Drop);
    }
    let acked = f.seq.wrapping_add(f.payload_len as u32).wrapping_add(1);
    Some(
        match rewrite(p, f, reply_end, acked, TCP_ACK, NO_PAYLOAD, true) {
            Ok(()) => Follow::ToClient,
            Err(()) => Follow::Drop,
        },
    )
}

/// The slot of the jump maps (`JUMP_XDP`, `JUMP_TC`) of the program that answers: the
/// judging programs hand the denied segment over to it (`hand_over`), so that neither
/// carries the response's code through the verifier's walk of every judgement.
pub const SLOT: u32 = 2;

/// Hands the denied segment over to the answering program (`answer`), with its verdict
/// and listener; returns only if the tail call failed.
#[inline(always)]
pub fn hand_over(p: &impl Packet, l: &ListenerConfig, verdict: Verdict) {
    let Ok(b) = buf() else {
        return;
    };
    b.verdict = verdict as u64;
    b.listener = l.id as u64;
    p.rerun(SLOT);
}

/// The answering program's work: the segment the judging program handed over becomes
/// the response. `Err`: no response could be made (the caller resets instead).
#[inline(always)]
pub fn answer(p: &impl Packet) -> Result<(), ()> {
    let mut f = match crate::parse::parse(p) {
        Ok(Some(f)) => f,
        _ => return Err(()),
    };
    if f.flags & TCP_SYN != 0 {
        // Data in a SYN starts after the SYN's sequence number (as `judge` reads it).
        f.seq = f.seq.wrapping_add(1);
    }
    let b = buf()?;
    let (v, id) = (b.verdict as u32, b.listener as u32);
    respond(p, &f, id, v)
}

/// Turns the denied segment into listener `id`'s response to verdict `v`, to be sent back
/// to the client. `Err`: no response (none configured, or the packet could not take it);
/// the caller resets the connection instead, never letting the request through.
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "by value, the keys and entries (map memory) would be copied to the stack"
)]
#[inline(always)]
fn respond(p: &impl Packet, f: &Flow, id: u32, v: u32) -> Result<(), ()> {
    let b = buf()?;
    let tpl = RESPONSES.get(respond::index(id, v)).ok_or(())?;
    let total = assemble(b, tpl, v == Verdict::Throttled as u32)?;
    let tcp = ptr_at::<TcpHdr>(p, f.l4_off)?;
    // SAFETY: bounds checked.
    let ack = u32::from_be(unsafe { (*tcp).ack });
    let fin = (f.flags & TCP_FIN != 0) as u32;
    let client_end = f.seq.wrapping_add(f.payload_len as u32).wrapping_add(fin);
    crate::stream::write_flow_id(p, f, &mut b.id)?;
    b.entry = Responded {
        server_seq: f.seq,
        server_ack: ack,
        client_end,
        reply_end: ack.wrapping_add(total as u32).wrapping_add(1),
        state: RESPONDED_OPEN,
        _pad: 0,
        // SAFETY: plain helper call.
        at_ns: unsafe { bpf_ktime_get_boot_ns() },
    };
    // Before the rewrite: a connection that cannot be remembered is reset instead (its
    // server side would otherwise stay open). An entry whose response then fails is
    // harmless: the client's retransmission is judged again.
    RESPONDED.insert(&b.id, &b.entry, 0).map_err(|_| ())?;
    let payload = (b.out.as_ptr(), total);
    rewrite(
        p,
        f,
        ack,
        client_end,
        TCP_FIN | TCP_PSH | TCP_ACK,
        payload,
        true,
    )?;
    if let Some(t) = LAST_RESPOND.get_ptr_mut(0) {
        // SAFETY: map value pointer valid for this run; racing CPUs each store a time of
        // this moment.
        unsafe { *t = bpf_ktime_get_coarse_ns() };
    }
    Ok(())
}

/// Copies the response `tpl` into `b.out` (when `throttled`, the rate fields inserted after
/// its status line), zero-padded to a multiple of four; its length.
#[inline(always)]
fn assemble(b: &mut RespondBuf, tpl: &ResponseTemplate, throttled: bool) -> Result<usize, ()> {
    let len = tpl.len as usize;
    if len == 0 || len > TEMPLATE_BYTES {
        return Err(());
    }
    let (src, dst) = (
        tpl.bytes.as_ptr() as *const u64,
        b.out.as_mut_ptr() as *mut u64,
    );
    for i in 0..TEMPLATE_BYTES / 8 {
        // SAFETY: both buffers hold TEMPLATE_BYTES and more.
        unsafe { dst.add(i).write_unaligned(src.add(i).read_unaligned()) };
    }
    let at = tpl.insert_at as usize;
    let mut total = len;
    if throttled && at != 0 && at < len {
        let n = rate_fields(b)?;
        let at = opaque(at) & (RESPONSE_MAX - 1);
        let n = opaque(n) & (RATE_FIELDS_MAX - 1);
        let out = b.out.as_mut_ptr();
        // SAFETY: offsets below RESPONSE_MAX and lengths of at most RESPONSE_MAX inside
        // `out` (2 × RESPONSE_MAX); the sources are map values of this run.
        unsafe {
            bpf_probe_read_kernel(
                out.add((at + n) & (RESPONSE_MAX - 1)) as *mut _,
                copy_len(len - at, RESPONSE_MAX),
                tpl.bytes.as_ptr().add(at) as *const _,
            );
            bpf_probe_read_kernel(
                out.add(at) as *mut _,
                copy_len(n, RATE_FIELDS_MAX),
                b.fields.as_ptr() as *const _,
            );
        }
        total = len + n;
    }
    if total > RESPONSE_MAX {
        return Err(());
    }
    for k in 0..4 {
        b.out[(opaque(total) + k) & (2 * RESPONSE_MAX - 1)] = 0;
    }
    Ok(total)
}

/// A byte writer over `RespondBuf::fields`.
struct Fields<'a> {
    b: &'a mut RespondBuf,
    pos: usize,
}

impl Fields<'_> {
    /// `x` through map memory: every digit count would otherwise be a path of its own for
    /// the rest of the fields (9 per number, four numbers).
    #[inline(always)]
    fn launder(&mut self, x: usize) -> usize {
        // SAFETY: a field of the per-CPU map value.
        unsafe {
            core::ptr::write_volatile(&mut self.b.launder, x as u64);
            core::ptr::read_volatile(&self.b.launder) as usize
        }
    }

    #[inline(always)]
    fn put(&mut self, s: &[u8]) {
        for &c in s {
            self.b.fields[opaque(self.pos) & (RATE_FIELDS_MAX - 1)] = c;
            self.pos += 1;
        }
    }

    /// `n` in decimal (at most 9 digits: larger values are capped).
    #[inline(always)]
    fn num(&mut self, n: u64) {
        let mut x = if n > 999_999_999 { 999_999_999 } else { n };
        // A divisor LLVM cannot see: one by a constant becomes a 128-bit multiplication.
        let ten = opaque(10) as u64;
        if ten == 0 {
            return;
        }
        let mut k = 0usize;
        for _ in 0..9 {
            self.b.digits[k & 15] = b'0' + (x % ten) as u8;
            x /= ten;
            k += 1;
            if x == 0 {
                break;
            }
        }
        let k = self.launder(k) & 15;
        for i in 0..9 {
            if i >= k {
                break;
            }
            let d = self.b.digits[opaque(k - 1 - i) & 15];
            self.b.fields[opaque(self.pos) & (RATE_FIELDS_MAX - 1)] = d;
            self.pos += 1;
        }
        self.pos = self.launder(self.pos) & (RATE_FIELDS_MAX - 1);
    }
}

/// Writes a throttled request's `Retry-After`, `RateLimit-Policy` and `RateLimit` lines
/// into `b.fields`: its length. The token is the one the request program just judged (its
/// fingerprint is in the scratch), its stage the one its admission used.
#[inline(always)]
fn rate_fields(b: &mut RespondBuf) -> Result<usize, ()> {
    let scratch = SCRATCH.get_ptr(0).ok_or(())?;
    // SAFETY: the per-CPU scratch map value, valid for this program run.
    let fp = unsafe { (*scratch).seen.fingerprint };
    let info = TOKENS.get_ptr(fp).ok_or(())?;
    // SAFETY: map value pointer valid for this run.
    let (contract, slot) = unsafe { ((*info).contract, (*info).state_slot) };
    let st = TOKEN_STATE.get_ptr(slot).ok_or(())?;
    // SAFETY: as above; the TAT is updated by compare-and-swap on other CPUs.
    let (tat, stage) = unsafe { (core::ptr::read_volatile(&(*st).tat_ns), (*st).stage) };
    let c = CONTRACTS.get(contract).ok_or(())?;
    let s = &c.stages[stage as usize & (MAX_STAGES - 1)];
    let cfg = CONFIG.get(0).ok_or(())?;
    let now = crate::judge::now(cfg);
    // Divisors LLVM cannot see (see `retry_after_secs_per`).
    let sec = opaque(agent_common::gcra::NANOS_PER_SEC as usize) as u64;
    let retry = retry_after_secs_per(tat, now, s.tolerance_ns, sec);
    let (quota, window) = quota_window_per(s.interval_ns, s.tolerance_ns, sec);
    let mut w = Fields { b, pos: 0 };
    w.put(b"Retry-After: ");
    w.num(retry);
    w.put(b"\r\nRateLimit-Policy: \"ramp\";q=");
    w.num(quota);
    w.put(b";w=");
    w.num(window);
    w.put(b"\r\nRateLimit: \"ramp\";r=0;t=");
    w.num(retry);
    w.put(b"\r\n");
    Ok(w.pos)
}
const _: () = assert!(respond::POLICY_NAME.len() == 4);

/// One's-complement sum of `len` (a multiple of four, at most 60) header bytes at `off`,
/// copied out and summed by one helper call: no loop for the verifier to walk per path.
#[inline(always)]
fn csum_bytes(p: &impl Packet, off: usize, len: usize) -> Result<u64, ()> {
    if len == 0 || len > 60 || !len.is_multiple_of(4) {
        return Err(());
    }
    let b = buf()?;
    p.load(off, b.hdr.as_mut_ptr(), copy_len(len, 64))?;
    let n = copy_len(len, 64) & !3;
    // SAFETY: `hdr` holds 256 bytes, of which the first `n` ≤ 64 were just written.
    let s = unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            b.hdr.as_mut_ptr() as *mut u32,
            n,
            0,
        )
    };
    if s < 0 {
        return Err(());
    }
    Ok(s as u32 as u64)
}

/// No payload, for `rewrite`.
const NO_PAYLOAD: (*const u8, usize) = (core::ptr::null(), 0);

/// Rewrites the segment in place: TCP sequence and acknowledgement numbers `seq`, `ack`,
/// `flags`, and `payload` (bytes in `RESPOND_BUF.out`, zero-padded to four, and their
/// count) as its payload; turned around (addresses, ports, timestamps) when `to_client`.
/// Checksums made right.
#[inline(always)]
fn rewrite(
    p: &impl Packet,
    f: &Flow,
    seq: u32,
    ack: u32,
    flags: u8,
    (out, payload): (*const u8, usize),
    to_client: bool,
) -> Result<(), ()> {
    let hdr_end = f.payload_off;
    if hdr_end > crate::packet::MAX_HEADER_OFFSET || payload > RESPONSE_MAX {
        return Err(());
    }
    p.make_writable(hdr_end as u32)?;
    if p.truncate(hdr_end + payload).is_err() {
        grow_front(p, hdr_end, hdr_end + payload)?;
    }
    if payload != 0 {
        p.store(hdr_end, out, copy_len(payload, RESPONSE_MAX))?;
    }
    // Pointers from before the resize and the store are stale: everything from here.
    p.make_writable(hdr_end as u32)?;
    let tcp = ptr_at_mut::<TcpHdr>(p, f.l4_off)?;
    let tcp_len = (hdr_end - f.l4_off + payload) as u16;
    // SAFETY: bounds checked.
    unsafe {
        (*tcp).seq = seq.to_be();
        (*tcp).ack = ack.to_be();
        if to_client {
            core::mem::swap(&mut (*tcp).sport, &mut (*tcp).dport);
        }
        (*tcp).off_flags[1] = flags;
        (*tcp).window = if flags & TCP_RST != 0 {
            0
        } else {
            WINDOW.to_be()
        };
        (*tcp).urg = 0;
        (*tcp).check = 0;
    }
    if to_client {
        turn_options(p, f)?;
        let eth = ptr_at_mut::<EthHdr>(p, 0)?;
        // SAFETY: bounds checked.
        unsafe { core::mem::swap(&mut (*eth).src, &mut (*eth).dst) };
    }
    let mut sum: u64;
    if f.ipv6 {
        let ip = ptr_at_mut::<Ipv6Hdr>(p, f.l3_off)?;
        // SAFETY: bounds checked.
        unsafe {
            if to_client {
                core::mem::swap(&mut (*ip).saddr, &mut (*ip).daddr);
                (*ip).hop_limit = 64;
            }
            (*ip).payload_len = ((hdr_end - f.l3_off - 40 + payload) as u16).to_be();
            sum = sum_words(&(*ip).saddr) + sum_words(&(*ip).daddr);
        }
    } else {
        let ip = ptr_at_mut::<Ipv4Hdr>(p, f.l3_off)?;
        let ihl = f.l4_off - f.l3_off;
        // SAFETY: bounds checked.
        unsafe {
            if to_client {
                core::mem::swap(&mut (*ip).saddr, &mut (*ip).daddr);
                (*ip).ttl = 64;
            }
            (*ip).tot_len = ((hdr_end - f.l3_off + payload) as u16).to_be();
            (*ip).check = 0;
            sum = sum_words(&(*ip).saddr) + sum_words(&(*ip).daddr);
        }
        let ipsum = csum_bytes(p, f.l3_off, ihl)?;
        // SAFETY: bounds checked above; no helper call in between.
        unsafe { (*ip).check = fold(ipsum) };
    }
    sum += (6u16).to_be() as u64 + tcp_len.to_be() as u64;
    sum += csum_bytes(p, f.l4_off, hdr_end - f.l4_off)?;
    if payload != 0 {
        let words = copy_len((payload + 3) & !3, RESPONSE_MAX) & !3;
        // SAFETY: `out` is `RESPOND_BUF.out` (2 × RESPONSE_MAX bytes), zero-padded after
        // the payload (`assemble`); the helper reads at most 512 bytes of it.
        let s = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, out as *mut u32, words, 0) };
        if s < 0 {
            return Err(());
        }
        sum += s as u32 as u64;
    }
    let tcp = ptr_at_mut::<TcpHdr>(p, f.l4_off)?;
    // SAFETY: bounds checked.
    unsafe { (*tcp).check = fold(sum) };
    Ok(())
}

/// Makes the frame `want` bytes long by adding room before it (a frame without the
/// tailroom, as generic XDP's copies of a cloned skb may be), moving its `hdr_end` bytes of
/// headers to the new front: the payload grows into the room they leave.
#[inline(always)]
fn grow_front(p: &impl Packet, hdr_end: usize, want: usize) -> Result<(), ()> {
    let have = p.len();
    if want <= have || hdr_end > HEADER_ROOM {
        return Err(());
    }
    let delta = want - have;
    if delta > HEADER_ROOM {
        return Err(());
    }
    p.grow_front(delta as u32)?;
    let b = buf()?;
    let n = copy_len(hdr_end, HEADER_ROOM);
    p.load(delta, b.hdr.as_mut_ptr(), n)?;
    p.store(0, b.hdr.as_ptr(), n)
}

/// `RespondBuf::hdr`: the most header bytes `grow_front` moves, and the most room it adds
/// (XDP_PACKET_HEADROOM).
const HEADER_ROOM: usize = 256;

/// The client's TCP options, turned around: its timestamps swapped (TSval becomes the
/// echo of the client's own, and the server's last one, which the client echoed, the new
/// TSval: the client's PAWS check passes) and laid out as NOP, NOP, timestamps; anything
/// else made NOPs (SACK blocks are about the other direction). Timestamps are found where
/// clients put them on data segments (first, or after two NOPs); elsewhere they are lost.
#[inline(always)]
fn turn_options(p: &impl Packet, f: &Flow) -> Result<(), ()> {
    let start = f.l4_off + 20;
    let len = f.payload_off - start;
    if len < 4 {
        return Ok(());
    }
    let head = ptr_at::<[u8; 4]>(p, start)?;
    // SAFETY: bounds checked.
    let ts_at = match unsafe { *head } {
        [1, 1, 8, 10] if len >= 12 => Some(start + 4),
        [8, 10, _, _] if len >= 12 => Some(start + 2),
        _ => None,
    };
    let ts = match ts_at {
        Some(at) => {
            let v = ptr_at::<[u32; 2]>(p, at)?;
            // SAFETY: bounds checked.
            Some(unsafe { core::ptr::read_unaligned(v) })
        }
        None => None,
    };
    // Whole words: the options are a multiple of four bytes long. (A byte-sized check
    // comes out as one the verifier grants no bytes for.)
    for k in 0..10 {
        if k * 4 >= len {
            break;
        }
        let w = ptr_at_mut::<[u8; 4]>(p, start + k * 4)?;
        // SAFETY: bounds checked. Four NOPs.
        unsafe { *w = [1; 4] };
    }
    if let Some([tsval, tsecr]) = ts {
        let o = ptr_at_mut::<[u8; 12]>(p, start)?;
        let (v, e) = (tsval.to_ne_bytes(), tsecr.to_ne_bytes());
        // SAFETY: bounds checked.
        unsafe { *o = [1, 1, 8, 10, e[0], e[1], e[2], e[3], v[0], v[1], v[2], v[3]] };
    }
    Ok(())
}
