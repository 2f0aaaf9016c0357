//! The header scan: one pass over the request from its first byte, finding the request
//! line's end, every header line's start, the Authorization field and the end of the block.

use core::ffi::c_void;

use agent_common::{
    siphash::low_bytes_mask,
    swar::{first_marked_byte, zero_bytes, HIGHS, LOWER, ONES},
    SCAN_BYTES,
};

use crate::{
    request_line::version_end,
    scratch::{
        clear, loop_scratch, opaque, run_loop, Buf, HeaderScan, MASK, NOT_FOUND, SCAN_COMPLETE,
        SCAN_MALFORMED, SCAN_RUNNING, SCAN_TRUNCATED,
    },
};

const AUTHORIZ: u64 = u64::from_le_bytes(*b"authoriz");
const CONTENT_: u64 = u64::from_le_bytes(*b"content-");
const TRANSFER: u64 = u64::from_le_bytes(*b"transfer");
/// "length" and "-encodin", masked to the bytes compared.
const LENGTH: u64 = u64::from_le_bytes(*b"length\0\0");
const ENCODIN: u64 = u64::from_le_bytes(*b"-encodin");
/// Header lines whose starts the scan records (a power of two); a block with more is
/// `malformed` (see `framing_fields`).
pub const MAX_LINES: usize = 1024;
/// Lines looked at per `framing_step` call.
const LINES_PER_CALL: usize = 8;
const ATION: u64 = u64::from_le_bytes(*b"ation\0\0\0");
const LFS: u64 = ONES * b'\n' as u64;
/// Scan steps (see `scan_words`) per bpf_loop call. 8: a request of about 500 bytes in a
/// dozen header lines is scanned in two or three calls (a call costs ≈ 8-12 ns here). Each step
/// costs the verifier tens of thousands of instructions on Linux 6.1 (which walks the
/// callback again for each state it is called in), and the request program must stay
/// within its 1M there.
const SCAN_STEPS_PER_CALL: usize = 8;

/// Looks at the start of a header line at `start` (just after an LF). Returns false when
/// the scan is over (end of block, malformed, or out of data).
#[inline(always)]
fn line_start(buf: Buf, s: &mut HeaderScan, start: usize, len: usize) -> bool {
    if start >= len {
        s.end = SCAN_TRUNCATED;
        return false;
    }
    let c0 = buf.byte(start);
    if c0 == b'\n' {
        s.end = SCAN_COMPLETE;
        s.block_end = start as u64 + 1;
        return false;
    }
    if c0 == b'\r' && start + 1 < len && buf.byte(start + 1) == b'\n' {
        s.end = SCAN_COMPLETE;
        s.block_end = start as u64 + 2;
        return false;
    }
    if c0 == b' ' || c0 == b'\t' {
        // obs-fold: the upstream may glue it to the previous field.
        s.end = SCAN_MALFORMED;
        return false;
    }
    // Every header line's start, for `framing_fields` (one store, no branch: this runs in
    // every scan step, which Linux 6.1's verifier walks once per path).
    let k = s.lines as usize;
    s.lines = k as u64 + 1;
    // SAFETY: the per-CPU scratch value holds MAX_LINES starts; the index is masked.
    unsafe { (*buf.scratch()).line_starts[k & (MAX_LINES - 1)] = start as u16 };
    if (c0 | 0x20) != b'a' || start + 14 > len || !is_authorization(buf, start) {
        return true;
    }
    let c = buf.byte(start + 13);
    if c == b' ' || c == b'\t' {
        // Whitespace before the colon (RFC 9112 §5.1), or a name no field can have: one
        // look settles both, where skipping the whitespace first would be a loop the
        // verifier walks in every scan step.
        s.end = SCAN_MALFORMED;
        return false;
    }
    if c != b':' {
        // "Authorization-Foo:" and the like: another field.
        return true;
    }
    s.auths += 1;
    if s.auths > 1 {
        // Malformed (`judge::decide`), but the scan reads on to the block's end: the
        // request's framing still tells where the next one starts.
        return true;
    }
    s.auth_start = start as u64;
    s.in_auth = 1;
    true
}

/// Up to SCAN_STEPS_PER_CALL steps per call (bpf_loop callback); a step handles the next
/// LF of the current word, or else reads on (up to four words, as far as the first with
/// an LF) and handles that word's first LF, which starts a line check. One flat loop keeps
/// the verifier's work small.
extern "C" fn scan_words(_index: u32, ctx: *mut c_void) -> i64 {
    let scratch = loop_scratch(ctx);
    let buf = Buf::new(scratch);
    // SAFETY: the per-CPU scratch map value.
    let s = unsafe { &mut (*scratch).scan };
    let len = s.len as usize;
    if len > SCAN_BYTES {
        s.end = SCAN_TRUNCATED;
        return 1;
    }
    let mut o = s.pos as usize;
    let mut m = s.mask;
    for _ in 0..SCAN_STEPS_PER_CALL {
        if m == 0 {
            // Most words hold no LF: a step reads up to four while they are inside the
            // data, and skips four or eight at once in an Authorization field (a JWT is
            // a 1 KiB line), where one test on four words pays off.
            if s.in_auth != 0
                && o + 40 <= len
                && (lf_hint(buf.word(o + 8))
                    | lf_hint(buf.word(o + 16))
                    | lf_hint(buf.word(o + 24))
                    | lf_hint(buf.word(o + 32)))
                    & HIGHS
                    == 0
            {
                o += if o + 72 <= len
                    && (lf_hint(buf.word(o + 40))
                        | lf_hint(buf.word(o + 48))
                        | lf_hint(buf.word(o + 56))
                        | lf_hint(buf.word(o + 64)))
                        & HIGHS
                        == 0
                {
                    64
                } else {
                    32
                };
                continue;
            }
            if o + 40 <= len {
                // Up to four words, as far as the first that holds an LF.
                let a = zero_bytes(buf.word(o + 8) ^ LFS);
                if a != 0 {
                    o += 8;
                    m = a;
                } else {
                    let b = zero_bytes(buf.word(o + 16) ^ LFS);
                    if b != 0 {
                        o += 16;
                        m = b;
                    } else {
                        let c = zero_bytes(buf.word(o + 24) ^ LFS);
                        if c != 0 {
                            o += 24;
                            m = c;
                        } else {
                            o += 32;
                            m = zero_bytes(buf.word(o) ^ LFS);
                        }
                    }
                }
            } else {
                // The last words, one at a time.
                o += 8;
                if o >= len {
                    s.end = SCAN_TRUNCATED;
                    return 1;
                }
                m = zero_bytes(buf.word(o) ^ LFS);
                if len - o < 8 {
                    m &= low_bytes_mask(len - o);
                }
            }
            // A no-op (o < len <= SCAN_BYTES) that gives the verifier one range for `o`
            // out of every path above, so it checks the LF handling below once.
            o = opaque(o) & MASK;
            // The word's first LF is handled in the same step: most header lines then
            // take one or two steps.
            if m == 0 {
                continue;
            }
        }
        let lf = o + first_marked_byte(m);
        m &= m - 1;
        if s.first_lf == NOT_FOUND {
            s.first_lf = lf as u64;
            // No request line: `request_line` decides without the header block, and a
            // body segment that merely starts like a method is not scanned to its end.
            if version_end(buf, lf).is_none() {
                s.end = SCAN_TRUNCATED;
                return 1;
            }
        }
        if s.in_auth != 0 {
            s.auth_lf = lf as u64;
            s.in_auth = 0;
        }
        if !line_start(buf, s, lf + 1, len) {
            return 1;
        }
    }
    s.pos = o as u64;
    s.mask = m;
    0
}

/// Up to LINES_PER_CALL recorded line starts per call (bpf_loop callback): counts the
/// Content-Length and Transfer-Encoding fields and keeps the last start of each.
extern "C" fn framing_step(index: u32, ctx: *mut c_void) -> i64 {
    let scratch = loop_scratch(ctx);
    let buf = Buf::new(scratch);
    // SAFETY: the per-CPU scratch map value.
    let s = unsafe { &mut (*scratch).scan };
    for k in 0..LINES_PER_CALL {
        let i = index as usize * LINES_PER_CALL + k;
        if i as u64 >= s.lines || i >= MAX_LINES {
            return 1;
        }
        // SAFETY: as above; the index is below MAX_LINES.
        let start = unsafe { (*scratch).line_starts[opaque(i) & (MAX_LINES - 1)] } as usize;
        let w0 = buf.word(start) | LOWER;
        if w0 == CONTENT_ && (buf.word(start + 8) | LOWER) & 0xffff_ffff_ffff == LENGTH {
            s.cl_start = start as u64;
            s.cls += 1;
        } else if w0 == TRANSFER && buf.word(start + 8) | LOWER == ENCODIN {
            s.te_start = start as u64;
            s.tes += 1;
        }
    }
    0
}

/// Finds the fields that frame a body among the complete block's header lines (their
/// names only; `stream::framing` reads the values). `false`: more lines than recorded.
#[inline(always)]
pub fn framing_fields(buf: Buf) -> bool {
    let scratch = buf.scratch();
    // SAFETY: the per-CPU scratch map value, valid for this program run.
    let s = unsafe { &mut (*scratch).scan };
    clear(&mut s.cls);
    clear(&mut s.tes);
    if s.lines as usize > MAX_LINES {
        return false;
    }
    run_loop(scratch, (MAX_LINES / LINES_PER_CALL) as u32, framing_step);
    true
}

/// Has 0x80 set in some byte (after `& HIGHS`) iff `w` holds an LF: the classic
/// has-zero-byte test, cheaper than `zero_bytes` but exact only as a yes/no answer.
#[inline(always)]
fn lf_hint(w: u64) -> u64 {
    let x = w ^ LFS;
    x.wrapping_sub(ONES) & !x
}

/// The 13 bytes at `i` spell "authorization", any case.
#[inline(always)]
fn is_authorization(buf: Buf, i: usize) -> bool {
    buf.word(i) | LOWER == AUTHORIZ && (buf.word(i + 8) | LOWER) & 0xff_ffff_ffff == ATION
}

/// Scans the request from its first byte: the first LF ends the request line (checked
/// afterwards by `request_line`), every later one starts a header line. One pass over the
/// bytes; the result is in the scratch's `scan`.
#[inline(always)]
pub fn scan_headers(buf: Buf, len: usize) -> &'static HeaderScan {
    let scratch = buf.scratch();
    // SAFETY: the per-CPU scratch map value, valid for this program run.
    let s = unsafe { &mut (*scratch).scan };
    s.len = len as u64;
    clear(&mut s.auth_start);
    clear(&mut s.auth_lf);
    clear(&mut s.auths);
    clear(&mut s.in_auth);
    clear(&mut s.block_end);
    clear(&mut s.lines);
    s.end = SCAN_RUNNING;
    s.first_lf = NOT_FOUND;
    // The first step looks at the word at pos + 8 = 0.
    s.pos = 0u64.wrapping_sub(8);
    clear(&mut s.mask);
    run_loop(
        scratch,
        (2 * SCAN_BYTES / SCAN_STEPS_PER_CALL) as u32,
        scan_words,
    );
    s
}
