//! Each connection's byte stream, as the server will parse it: where its next request
//! starts. The unit of judgement is the HTTP/1.x request, not the segment.
//!
//! `FLOWS` holds, per connection, the sequence number up to which the stream was judged
//! and what comes there (`agent_common::stream`): a request (after any empty lines), the
//! rest of a Content-Length body, a chunked body, or the rest of a header block whose
//! first bytes are held in `PARTIAL`. The rules, all fail-closed:
//! - A client SYN starts the entry; a SYN of a known 4-tuple with another initial
//!   sequence number replaces it when that number lies ahead of the bytes judged (a new
//!   connection on a reused port: if the server still held the old one, data at the new
//!   numbers would only ever wait behind a gap nothing fills), and removes it when it lies
//!   behind (it could move the judged position under the old connection).
//! - Data without an entry is `untracked` (opened before the listener attached, or evicted
//!   from a full table): where its next request starts is unknown.
//! - A segment is judged when it starts where the stream was judged up to, or when it
//!   repeats the last segment exactly (a retransmission: judged again from where that one
//!   started, and it must leave the stream where that one did, else `malformed`). A
//!   segment wholly inside a Content-Length body passes. Anything else (a gap before it, a
//!   partial overlap) is `out_of_sequence` and dropped: the client sends it again in order.
//! - In a segment, body bytes are skipped, empty lines before a request are skipped as
//!   servers skip them, and every request is judged: the first in this run, each further
//!   one in a tail call of the program to itself (at most `MAX_REQUESTS_PER_SEGMENT`).
//! - A request line or header block that does not end in the segment is held (its bytes
//!   copied to `PARTIAL`) and the segment passes — a server cannot act on a request whose
//!   header block has not ended — and it is judged whole on the segment that ends it.
//! - The stream moves on only when the whole segment is let through: a denied segment
//!   leaves the connection where it was, so whatever completes it later is judged too.

use core::ffi::c_void;

use agent_common::{
    siphash::low_bytes_mask,
    stream::{BODY, BOUNDARY, CHUNKED, HEADERS},
    swar::{eq_bytes, first_marked_byte, HIGHS},
    FlowId, FlowState, Verdict, SCAN_BYTES,
};
use aya_ebpf::helpers::generated::{bpf_ktime_get_coarse_ns, bpf_loop, bpf_probe_read_kernel};

use crate::{
    chunked, framing,
    maps::{Partial, FLOWS, PARTIAL},
    packet::{copy_len, ptr_at, Packet},
    parse::Flow,
    reply::write_addrs,
    scratch::{clear, Buf, Cursor, SCAN_COMPLETE},
};

/// Requests judged in one segment: two runs each (entry, request), of the 33 the kernel
/// allows a packet.
pub const MAX_REQUESTS_PER_SEGMENT: u64 = 16;
// `clear(&mut c.kind)` sets BOUNDARY: zero stores go through `clear`, as LLVM turns
// neighbouring plain ones into a `memset` call, which Linux 6.1 rejects.
const _: () = assert!(BOUNDARY == 0);

/// Bytes of empty lines skipped before a request.
const MAX_EMPTY_LINE_BYTES: usize = 16;

/// Writes the connection's `FLOWS` key.
#[inline(always)]
pub fn write_flow_id(p: &impl Packet, f: &Flow, id: &mut FlowId) -> Result<(), ()> {
    write_addrs(p, f, &mut id.saddr, &mut id.daddr)?;
    id.sport = f.sport;
    id.dport = f.dport;
    Ok(())
}

/// The connection's key as `enter` wrote it (`flow_id`), for the request program it
/// tail-calls.
#[inline(always)]
fn current_id(buf: Buf) -> &'static FlowId {
    // SAFETY: the per-CPU scratch map value, valid for this program run.
    unsafe { &(*buf.scratch()).flow.id }
}

/// The connection's key, in the scratch value.
#[inline(always)]
fn flow_id(p: &impl Packet, f: &Flow) -> Result<&'static FlowId, ()> {
    let scratch = crate::scratch::get().ok_or(())?;
    // SAFETY: the per-CPU scratch map value, valid for this program run.
    let id = unsafe { &mut (*scratch).flow.id };
    write_flow_id(p, f, id)?;
    Ok(id)
}

#[inline(always)]
fn coarse_now() -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// A client's SYN to an inspected port (see the module comment).
#[inline(always)]
pub fn syn(p: &impl Packet, isn: u32, f: &Flow, buf: Buf) {
    let Ok(id) = flow_id(p, f) else {
        return;
    };
    let now = coarse_now();
    if let Some(st) = FLOWS.get_ptr(id) {
        // SAFETY: map value pointer valid for this run.
        let (known, next) = unsafe { ((*st).isn, (*st).next) };
        if known == isn {
            // The same SYN again (its SYN-ACK was lost).
            return;
        }
        if (isn.wrapping_add(1).wrapping_sub(next) as i32) <= 0 {
            // A new connection starts ahead of the old one's bytes (RFC 6528: Linux and
            // every modern stack choose it so). One behind them could move the judged
            // position under a server still on the old connection: forget it instead.
            let _ = FLOWS.remove(id);
            return;
        }
    }
    // SAFETY: the per-CPU scratch map value.
    let fresh = unsafe { &mut (*buf.scratch()).fresh };
    let next = isn.wrapping_add(1);
    *fresh = FlowState {
        next,
        kind: BOUNDARY,
        remaining: 0,
        prev: next,
        prev_kind: BOUNDARY,
        prev_remaining: 0,
        isn,
        _pad: 0,
        seen_ns: now,
    };
    let _ = FLOWS.insert(id, fresh, 0);
}

#[inline(always)]
pub fn cursor(buf: Buf) -> &'static mut Cursor {
    // SAFETY: the per-CPU scratch map value, valid for this program run.
    unsafe { &mut (*buf.scratch()).cursor }
}

/// What a request at the cursor came to (see `judge::request`).
pub enum Request {
    Judged(Verdict),
    /// The request line or header block goes on past the segment: its `n` bytes so far
    /// (in the scratch buffer) are held.
    Hold(usize),
}

/// Where the entry program leaves a segment.
pub enum Step {
    /// The segment is settled with this verdict (`None`: a continuation with nothing
    /// new to count).
    Done(Option<Verdict>),
    /// A request starts at the cursor: the request program judges it.
    Request,
}

/// The entry program's part: where the segment starts in its connection's stream (or,
/// in a continuation after a request, where it goes on), then over body bytes and empty
/// lines to the next request, if the segment has one.
#[inline(always)]
pub fn enter(p: &impl Packet, f: &Flow, buf: Buf) -> Step {
    let c = cursor(buf);
    let Ok(id) = flow_id(p, f) else {
        clear(&mut c.cont);
        return Step::Done(Some(Verdict::Malformed));
    };
    let len = buf.launder_within(f.payload_len, 0xffff) as u64;
    let first = c.cont == 0;
    clear(&mut c.cont);
    if first {
        let Some(st) = FLOWS.get_ptr(id) else {
            return Step::Done(Some(Verdict::Untracked));
        };
        // SAFETY: map value pointer valid for this run.
        if let Err(v) = start(c, unsafe { &*st }, f.seq, len as u32) {
            return Step::Done(Some(v));
        }
    }
    if let Err(v) = advance(p, f, buf, c, len) {
        return Step::Done(Some(v));
    }
    if c.off >= len {
        let v = finish(id, c, f.seq, len, Verdict::Pass);
        return Step::Done(if first || v != Verdict::Pass {
            Some(v)
        } else {
            None
        });
    }
    if c.requests >= MAX_REQUESTS_PER_SEGMENT {
        return Step::Done(Some(Verdict::Malformed));
    }
    if c.kind == HEADERS as u64 && !fetch_held(id, buf, c.remaining as usize) {
        // Evicted: the start of this request is gone.
        return Step::Done(Some(Verdict::Untracked));
    }
    Step::Request
}

/// What `same_step` compares: the scratch buffer's first `words` words with `part`'s.
#[repr(C)]
struct SameCtx {
    scratch: *mut crate::scratch::Scratch,
    part: *const Partial,
    words: u64,
    /// The last word's bytes that count.
    last_mask: u64,
    differ: u64,
}

/// Words compared per bpf_loop call.
const SAME_WORDS_PER_CALL: usize = 8;

extern "C" fn same_step(index: u32, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop hands back the SameCtx `holds_same` passed.
    let c = unsafe { &mut *(ctx as *mut SameCtx) };
    let buf = Buf::new(c.scratch);
    for k in 0..SAME_WORDS_PER_CALL {
        let w = index as usize * SAME_WORDS_PER_CALL + k;
        if w as u64 >= c.words {
            return 1;
        }
        let at = (w * 8) & (SCAN_BYTES - 8);
        let mask = if w as u64 + 1 == c.words {
            c.last_mask
        } else {
            u64::MAX
        };
        // SAFETY: `at` + 8 ≤ SCAN_BYTES, inside the PARTIAL value.
        let held = unsafe { ((*c.part).bytes.as_ptr().add(at) as *const u64).read_unaligned() };
        if (buf.word(at) ^ held) & mask != 0 {
            c.differ = 1;
            return 1;
        }
    }
    0
}

/// Whether `PARTIAL` holds exactly the first `n` bytes of the scratch buffer.
#[inline(always)]
fn holds_same(id: &FlowId, buf: Buf, n: usize) -> bool {
    let Some(part) = PARTIAL.get_ptr(id) else {
        return false;
    };
    let n = buf.launder_within(n, SCAN_BYTES - 1);
    let mut ctx = SameCtx {
        scratch: buf.scratch(),
        part,
        words: n.div_ceil(8) as u64,
        last_mask: if n.is_multiple_of(8) {
            u64::MAX
        } else {
            low_bytes_mask(n % 8)
        },
        differ: 0,
    };
    // SAFETY: `same_step` reads the scratch value and the PARTIAL value `ctx` names.
    unsafe {
        bpf_loop(
            (SCAN_BYTES / 8 / SAME_WORDS_PER_CALL) as u32,
            same_step as *mut c_void,
            &mut ctx as *mut SameCtx as *mut c_void,
            0,
        );
    }
    ctx.differ == 0
}

/// Keeps the first `n` bytes of the scratch buffer in `PARTIAL`: copied into the
/// connection's entry when it has one (only those bytes), else a new entry.
#[inline(always)]
fn hold_bytes(id: &FlowId, buf: Buf, n: usize) -> bool {
    if let Some(part) = PARTIAL.get_ptr_mut(id) {
        let n = buf.launder_within(n, SCAN_BYTES - 1);
        // SAFETY: both ranges lie inside their map values (the length bounded by the mask).
        let rc = unsafe {
            bpf_probe_read_kernel(
                part as *mut c_void,
                copy_len(n, SCAN_BYTES),
                buf.ptr() as *const c_void,
            )
        };
        return rc == 0;
    }
    // SAFETY: the scratch buffer holds SCAN_BYTES and more.
    let bytes = unsafe { &*(buf.ptr() as *const Partial) };
    PARTIAL.insert(id, bytes, 0).is_ok()
}

/// Copies the `held` bytes of the request the segment continues from `PARTIAL` to the
/// start of the scratch buffer, where the request program reads on.
#[inline(always)]
fn fetch_held(id: &FlowId, buf: Buf, held: usize) -> bool {
    let Some(part) = PARTIAL.get_ptr(id) else {
        return false;
    };
    let held = buf.launder_within(held, SCAN_BYTES - 1);
    // SAFETY: both ranges lie inside their map values (the length bounded by the mask).
    let rc = unsafe {
        bpf_probe_read_kernel(
            buf.ptr() as *mut c_void,
            copy_len(held, SCAN_BYTES),
            part as *const c_void,
        )
    };
    rc == 0
}

/// The request program's part: judges the request at the cursor (`judge`), then moves
/// the cursor past it (and past a Content-Length body in the segment). `cursor().more`:
/// bytes of the segment remain, for the entry program.
#[inline(always)]
pub fn request(
    p: &impl Packet,
    f: &Flow,
    buf: Buf,
    limit: usize,
    denies: impl Fn(Verdict) -> bool,
    judge: impl FnOnce(&Cursor, usize) -> Request,
) -> Verdict {
    let c = cursor(buf);
    clear(&mut c.more);
    let id = current_id(buf);
    let len = buf.launder_within(f.payload_len, 0xffff) as u64;
    // Laundered after the choice: one state for the verifier, whichever it was.
    let held = buf.launder_within(
        if c.kind == HEADERS as u64 {
            c.remaining as usize
        } else {
            0
        },
        SCAN_BYTES - 1,
    );
    // Every path out of the judge joins here through map memory: the verifier walks what
    // follows once, not once per way a request can end.
    let (hold, code) = match judge(c, held) {
        Request::Hold(n) => (1, n),
        Request::Judged(v) => (0, v as usize),
    };
    let (hold, code) = (buf.launder(hold), buf.launder(code));
    let outcome = if hold != 0 {
        Request::Hold(buf.launder_within(code, 2 * SCAN_BYTES - 1))
    } else {
        Request::Judged(Verdict::from_u32(code as u32).unwrap_or(Verdict::Malformed))
    };
    match outcome {
        Request::Hold(n) => {
            if n >= limit {
                // The header block is longer than the listener reads.
                return untracked_after(id, Verdict::Incomplete, &denies);
            }
            if c.rejudge != 0 {
                // A retransmission that leaves the request held: the server keeps the
                // bytes it has, which must be the ones held here.
                if !holds_same(id, buf, n) {
                    return Verdict::Malformed;
                }
            } else if !hold_bytes(id, buf, n) {
                return Verdict::Incomplete;
            }
            c.kind = HEADERS as u64;
            c.remaining = n as u64;
            c.off = len;
            finish(id, c, f.seq, len, Verdict::Pass)
        }
        Request::Judged(v) => {
            if denies(v) {
                return v;
            }
            // Let through (allowed, observe mode, or a default of allow): on to what
            // follows it, if its framing is known.
            // SAFETY: the per-CPU scratch map value.
            let scan = unsafe { &(*buf.scratch()).scan };
            // SAFETY: as above.
            let line_ok = unsafe { (*buf.scratch()).seen.target_len } != 0;
            let framed = match v {
                Verdict::NotHttp | Verdict::Incomplete => Err(()),
                // A request line and a complete header block whose content is malformed
                // (a second Authorization field, another scheme): framed all the same.
                Verdict::Malformed if scan.end != SCAN_COMPLETE || !line_ok => Err(()),
                _ => framing::framing(buf),
            };
            let Ok((kind, remaining)) = framed else {
                return match v {
                    Verdict::Malformed | Verdict::NotHttp | Verdict::Incomplete => {
                        untracked_after(id, v, &denies)
                    }
                    // A request let through whose body framing is ambiguous.
                    _ => untracked_after(id, Verdict::Malformed, &denies),
                };
            };
            let end = scan.block_end as usize;
            if end <= held {
                return Verdict::Malformed;
            }
            c.off += (end - held) as u64;
            c.kind = kind;
            c.remaining = remaining;
            c.requests += 1;
            if c.kind == BODY as u64 {
                consume_body(c, len);
            }
            if c.off < len {
                c.more = 1;
                return v;
            }
            finish(id, c, f.seq, len, v)
        }
    }
}

/// `v` for a request after which the stream's position is unknown. When `v` is let
/// through (observe mode, or a default of allow) the connection is forgotten: the rest of
/// it is `untracked`, denied in enforce mode.
#[inline(always)]
fn untracked_after(id: &FlowId, v: Verdict, denies: &impl Fn(Verdict) -> bool) -> Verdict {
    if !denies(v) {
        let _ = FLOWS.remove(id);
    }
    v
}

/// Sets the cursor at the start of a segment (see the module comment); `Err` is the
/// verdict of a segment that is not judged from here.
#[inline(always)]
fn start(c: &mut Cursor, st: &FlowState, seq: u32, len: u32) -> Result<(), Verdict> {
    if seq == st.next {
        c.kind = st.kind as u64;
        c.remaining = st.remaining;
        clear(&mut c.rejudge);
    } else if seq == st.prev && seq.wrapping_add(len) == st.next && st.prev != st.next {
        c.kind = st.prev_kind as u64;
        c.remaining = st.prev_remaining;
        c.rejudge = 1;
    } else {
        let ahead = seq.wrapping_sub(st.next);
        if st.kind == BODY && (ahead as i32) > 0 && ahead as u64 + len as u64 <= st.remaining {
            return Err(Verdict::Pass);
        }
        return Err(Verdict::OutOfSequence);
    }
    clear(&mut c.off);
    c.start_kind = c.kind;
    c.start_remaining = c.remaining;
    clear(&mut c.requests);
    Ok(())
}

/// Moves the stream on to `c` after the whole segment was let through. A retransmission
/// must leave it where the segment it repeats did.
#[inline(always)]
fn finish(id: &FlowId, c: &Cursor, seq: u32, len: u64, v: Verdict) -> Verdict {
    let Some(st) = FLOWS.get_ptr_mut(id) else {
        return Verdict::Untracked;
    };
    // SAFETY: map value pointer valid for this run.
    let st = unsafe { &mut *st };
    if c.rejudge != 0 {
        if c.kind != st.kind as u64 || c.remaining != st.remaining {
            // The bytes differ from what was judged, and the server may hold either.
            return Verdict::Malformed;
        }
        return v;
    }
    st.prev = seq;
    st.prev_kind = c.start_kind as u32;
    st.prev_remaining = c.start_remaining;
    st.next = seq.wrapping_add(len as u32);
    st.kind = c.kind as u32;
    st.remaining = c.remaining;
    v
}

/// Moves the cursor over the Content-Length body bytes in the segment.
#[inline(always)]
fn consume_body(c: &mut Cursor, len: u64) {
    let left = len - c.off;
    if c.remaining >= left {
        c.remaining -= left;
        c.off = len;
    } else {
        c.off += c.remaining;
        clear(&mut c.remaining);
        clear(&mut c.kind);
    }
}

/// Moves the cursor over body bytes and over the empty lines before a request.
#[inline(always)]
fn advance(p: &impl Packet, f: &Flow, buf: Buf, c: &mut Cursor, len: u64) -> Result<(), Verdict> {
    if c.kind == BODY as u64 {
        consume_body(c, len);
        if c.kind == BODY as u64 {
            return Ok(());
        }
    }
    if c.kind == CHUNKED as u64 {
        chunked::walk(p, f, buf, c, len)?;
        if c.kind == CHUNKED as u64 {
            return Ok(());
        }
    }
    if c.kind == BOUNDARY as u64 && c.off < len {
        skip_empty_lines(p, f, buf, c, len)?;
    }
    Ok(())
}

/// Servers ignore CR and LF before a request line (RFC 9112 §2.2; nginx skips any run of
/// them): so does the cursor, up to MAX_EMPTY_LINE_BYTES; a longer run is `not_http`.
#[inline(always)]
fn skip_empty_lines(
    p: &impl Packet,
    f: &Flow,
    buf: Buf,
    c: &mut Cursor,
    len: u64,
) -> Result<(), Verdict> {
    let n = buf.launder_within((len - c.off) as usize, 0xffff);
    let n = if n > MAX_EMPTY_LINE_BYTES {
        MAX_EMPTY_LINE_BYTES
    } else {
        n
    };
    let at = buf.launder_within(f.payload_off + c.off as usize, 0xffff);
    // The common case, a request right here: its first byte read in place, no copy (two
    // bytes: a one-byte bounds check compiles to a form the verifier does not follow).
    if let Ok(b) = ptr_at::<[u8; 2]>(p, at) {
        // SAFETY: ptr_at checked the bounds.
        let b = unsafe { (*b)[0] };
        if b != b'\r' && b != b'\n' {
            return Ok(());
        }
    }
    // SAFETY: the per-CPU scratch map value.
    let peek = unsafe { &mut (*buf.scratch()).peek };
    if n == 0
        || p.load(at, peek.as_mut_ptr() as *mut u8, copy_len(n, 16))
            .is_err()
    {
        return Err(Verdict::Malformed);
    }
    let mut skip = 0usize;
    for (i, w) in peek.iter().enumerate() {
        let valid = if n >= 8 * (i + 1) {
            HIGHS
        } else if n > 8 * i {
            low_bytes_mask(n - 8 * i) & HIGHS
        } else {
            0
        };
        let other = !(eq_bytes(*w, b'\r') | eq_bytes(*w, b'\n')) & valid;
        if other != 0 {
            c.off += (skip + first_marked_byte(other)) as u64;
            return Ok(());
        }
        skip += if n >= 8 * (i + 1) { 8 } else { n - 8 * i };
        if n <= 8 * (i + 1) {
            c.off += skip as u64;
            return Ok(());
        }
    }
    Err(Verdict::NotHttp)
}

/// Slots of the jump maps (`JUMP_XDP`, `JUMP_TC`).
pub const ENTRY: u32 = 0;
pub const REQUEST: u32 = 1;

/// Goes on with this segment in program `slot`, the cursor marked as a continuation.
/// Returns only when the tail call failed.
#[inline(always)]
pub fn go_on(p: &impl Packet, slot: u32) {
    let Some(scratch) = crate::scratch::get() else {
        return;
    };
    let c = cursor(Buf::new(scratch));
    c.cont = (slot == ENTRY) as u64;
    p.rerun(slot);
    clear(&mut c.cont);
}
