//! HTTP/1.x request parsing over the per-CPU scratch copy of the request bytes.
//!
//! All reads go through `byte`/`word`, which mask the index into the scratch buffer so the
//! verifier sees every access in bounds; callers keep indexes below `len` (≤ SCAN_BYTES),
//! which makes the mask a no-op at run time.

use core::ffi::c_void;

use agent_common::{
    http::{first_marked_byte, CLASS, TCHAR},
    siphash::{low_bytes_mask, Sip128},
    Fingerprint, FingerprintKey, MAX_TOKEN_LEN, SCAN_BYTES,
};
use aya_ebpf::helpers::generated::bpf_loop;

use crate::maps::Scratch;

const MASK: usize = SCAN_BYTES - 1;
const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;
const MAX_OWS: usize = 16;
/// Longest path a scoped token may use (longer is out of scope).
pub const MAX_SCOPED_PATH: usize = 2048;

/// Hides `x` from LLVM so the mask that follows survives: LLVM drops masks it can prove
/// redundant, and the verifier, which cannot follow that proof, then rejects the access.
#[inline(always)]
pub fn opaque(mut x: usize) -> usize {
    // SAFETY: a register move LLVM cannot see through. (An empty asm block would do, but
    // leaves a line-table row without an instruction, which the kernel rejects.)
    unsafe { core::arch::asm!("{0} = {0}", inout(reg) x, options(pure, nomem, nostack)) };
    x
}

/// The scratch copy of a request: bounds-masked reads, and a laundering slot.
#[derive(Clone, Copy)]
pub struct Buf {
    s: *mut Scratch,
}

impl Buf {
    #[inline(always)]
    pub fn new(s: *mut Scratch) -> Self {
        Buf { s }
    }

    #[inline(always)]
    pub fn ptr(&self) -> *mut u8 {
        // SAFETY: `s` is the per-CPU scratch map value.
        unsafe { (*self.s).buf.as_mut_ptr() }
    }

    #[inline(always)]
    pub fn scratch(&self) -> *mut Scratch {
        self.s
    }

    #[inline(always)]
    pub fn byte(&self, i: usize) -> u8 {
        // SAFETY: masked index inside the padded scratch buffer.
        unsafe { *self.ptr().add(opaque(i) & MASK) }
    }

    #[inline(always)]
    pub fn word(&self, i: usize) -> u64 {
        // SAFETY: masked index; the buffer has 16 bytes of padding past SCAN_BYTES.
        unsafe { (self.ptr().add(opaque(i) & MASK) as *const u64).read_unaligned() }
    }

    /// Passes `x` through map memory, which the verifier does not track. A position found
    /// by a loop would otherwise carry a different range out of every iteration, and the
    /// verifier would walk the rest of the program once per iteration.
    #[inline(always)]
    pub fn launder(&self, x: usize) -> usize {
        // SAFETY: `s` is the per-CPU scratch map value; volatile keeps LLVM from
        // forwarding the store to the load.
        unsafe {
            core::ptr::write_volatile(&mut (*self.s).launder, x as u64);
            core::ptr::read_volatile(&(*self.s).launder) as usize
        }
    }

    /// `launder`, then masked to `mask` (2^n - 1, at least the largest value `x` can
    /// take). A laundered value is unbounded to the verifier, and Linux 6.1 forgets the
    /// bounds a check taught it when the value is spilled to the stack and reloaded; a
    /// masked value keeps its range through spills.
    #[inline(always)]
    pub fn launder_within(&self, x: usize, mask: usize) -> usize {
        self.launder(x) & mask
    }
}

/// Stores a zero LLVM cannot merge with its neighbours into a `memset` call, which Linux
/// 6.1's verifier rejects (a global function with a pointer argument).
#[inline(always)]
pub fn clear(x: &mut u64) {
    // SAFETY: a plain store through a valid reference.
    unsafe { core::ptr::write_volatile(x, 0) }
}

/// Zeroes a `T` (a multiple of 8 bytes, 8-aligned) with word stores: `write_bytes` and
/// `Default` become `memset` calls (see `clear`).
#[inline(always)]
pub fn zero_words<T>(p: *mut T) {
    const { assert!(core::mem::size_of::<T>().is_multiple_of(8) && core::mem::align_of::<T>() == 8) };
    let w = p as *mut u64;
    for i in 0..core::mem::size_of::<T>() / 8 {
        // SAFETY: inside the `T` the caller owns.
        unsafe { core::ptr::write_volatile(w.add(i), 0) };
    }
}

/// 0x80 in every byte of `x` that is zero, nothing elsewhere (exact, no carries).
#[inline(always)]
fn zero_bytes(x: u64) -> u64 {
    !(((x & !HIGHS).wrapping_add(!HIGHS)) | x) & HIGHS
}

/// 0x80 in every byte of `w` that is ≥ `c` (bytes below 0x80 only; others are
/// rejected by the caller).
#[inline(always)]
fn ge_bytes(w: u64, c: u8) -> u64 {
    ((w | HIGHS).wrapping_sub(ONES * c as u64)) & HIGHS
}

/// 0x80 in every byte of `w` in `lo..=hi`.
#[inline(always)]
fn in_range(w: u64, lo: u8, hi: u8) -> u64 {
    ge_bytes(w, lo) & !ge_bytes(w, hi + 1) & HIGHS
}

/// 0x80 in every byte of `w` that is a b64token body character: letters (one range once
/// lower-cased), `+ - . /` and digits (0x2B..=0x39 but ','), `_` and `~`.
#[inline(always)]
fn b64_bytes(w: u64) -> u64 {
    let ascii = !w & HIGHS;
    ascii
        & (in_range(w | LOWER, b'a', b'z')
            | (in_range(w, b'+', b'9') & !eq_bytes(w, b','))
            | eq_bytes(w, b'_')
            | eq_bytes(w, b'~'))
}

#[inline(always)]
fn eq_bytes(w: u64, c: u8) -> u64 {
    zero_bytes(w ^ (ONES * c as u64))
}

const NOT_FOUND: u64 = u64::MAX;

pub enum LineError {
    /// Not the start of an HTTP/1.x request: pass.
    NotRequest,
    Malformed,
    /// The request line does not end inside the bytes we have.
    Incomplete,
}

pub struct RequestLine {
    pub method: u32,
    pub target_off: usize,
    pub target_len: usize,
}

/// An extension method: 1..=16 tchars then SP. Returns the length including the SP.
#[inline(always)]
pub fn extension_method(buf: Buf, len: usize) -> Option<usize> {
    let len = buf.launder(len);
    for i in 0..17 {
        if i >= len {
            return None;
        }
        let c = buf.byte(i);
        if c == b' ' {
            return if i > 0 {
                Some(buf.launder(i + 1))
            } else {
                None
            };
        }
        if CLASS[c as usize] & TCHAR == 0 {
            return None;
        }
    }
    None
}

const HTTP_1_1: u64 = u64::from_le_bytes(*b"HTTP/1.1");
const HTTP_1_0: u64 = u64::from_le_bytes(*b"HTTP/1.0");

/// `method SP request-target SP HTTP/1.x CRLF` with the method already recognised
/// (`method_len` includes its SP), ending at the first LF the header scan found.
/// `known`: a standard method, whose broken request line is malformed rather than "not a
/// request".
#[inline(always)]
pub fn request_line(
    buf: Buf,
    scan: &HeaderScan,
    method: u32,
    method_len: usize,
    known: bool,
) -> Result<RequestLine, LineError> {
    if scan.first_lf == NOT_FOUND {
        return Err(if known {
            LineError::Incomplete
        } else {
            LineError::NotRequest
        });
    }
    let lf = buf.launder_within(scan.first_lf as usize, MASK);
    let bad = if known {
        LineError::Malformed
    } else {
        LineError::NotRequest
    };
    let Some(vend) = version_end(buf, lf) else {
        return Err(bad);
    };
    if vend < method_len + 1 + 9 || buf.byte(vend - 9) != b' ' {
        return Err(bad);
    }
    let target_len = vend - 9 - method_len;
    if target_len == 0 || buf.byte(method_len) == b' ' {
        return Err(bad);
    }
    Ok(RequestLine {
        method,
        target_off: method_len,
        target_len: buf.launder(target_len),
    })
}

/// Where the version of a request line ending at `lf` ends (its CR, or the LF itself: a
/// bare LF is accepted, as nginx does), if the line ends in `HTTP/1.1` or `HTTP/1.0`.
#[inline(always)]
fn version_end(buf: Buf, lf: usize) -> Option<usize> {
    let vend = if lf > 0 && buf.byte(lf - 1) == b'\r' {
        lf - 1
    } else {
        lf
    };
    if vend < 8 {
        return None;
    }
    let v = buf.word(vend - 8);
    (v == HTTP_1_1 || v == HTTP_1_0).then_some(vend)
}

/// How the header scan ended.
pub const SCAN_RUNNING: u64 = 0;
pub const SCAN_COMPLETE: u64 = 1;
pub const SCAN_TRUNCATED: u64 = 2;
pub const SCAN_MALFORMED: u64 = 3;

/// Header-scan state. It lives in the scratch map value, so the verifier checks the
/// bpf_loop callback once instead of once per distinct position.
#[repr(C)]
pub struct HeaderScan {
    pub len: u64,
    /// Next word to scan.
    pub pos: u64,
    pub auth_start: u64,
    pub auth_lf: u64,
    pub auths: u64,
    pub end: u64,
    /// The line being scanned is an Authorization field (its LF is still to come).
    pub in_auth: u64,
    /// LFs of the word at `pos` not handled yet.
    pub mask: u64,
    /// The request line's LF (the first of the data), or `NOT_FOUND`.
    pub first_lf: u64,
}

/// What bpf_loop hands the callback (it must live on the stack).
#[repr(C)]
struct LoopCtx {
    scratch: *mut Scratch,
}

/// A bpf_loop callback: gets the scratch value back through `ctx` (`loop_scratch`);
/// returns 0 to go on, 1 to stop.
pub type LoopStep = extern "C" fn(u32, *mut c_void) -> i64;

/// Calls `step` up to `iterations` times with the scratch value, where every loop keeps
/// its state: map memory the verifier does not track, so it checks the callback once
/// rather than once per distinct position, and the caller's state stays one state.
#[inline(always)]
pub fn run_loop(scratch: *mut Scratch, iterations: u32, step: LoopStep) {
    let mut ctx = LoopCtx { scratch };
    // SAFETY: the callbacks only touch the scratch value `ctx` points to.
    unsafe {
        bpf_loop(
            iterations,
            step as *mut c_void,
            &mut ctx as *mut LoopCtx as *mut c_void,
            0,
        );
    }
}

/// The scratch value inside a `run_loop` callback.
#[inline(always)]
pub fn loop_scratch(ctx: *mut c_void) -> *mut Scratch {
    // SAFETY: bpf_loop hands back the LoopCtx `run_loop` passed.
    unsafe { (*(ctx as *mut LoopCtx)).scratch }
}

const AUTHORIZ: u64 = u64::from_le_bytes(*b"authoriz");
const ATION: u64 = u64::from_le_bytes(*b"ation\0\0\0");
const LOWER: u64 = 0x2020_2020_2020_2020;
const LFS: u64 = ONES * b'\n' as u64;
/// Scan steps (see `scan_words`) per bpf_loop call. 20: a request of about 500 bytes in a
/// dozen header lines is scanned in one call (a call costs ≈ 8-12 ns here). Each step
/// more costs the verifier ≈ 13k instructions on 6.18 and ≈ 27k on Linux 6.1, where the
/// programs need ≈ 750-770k of the 1M limit at 20 (≈ 640-660k at 16).
const SCAN_STEPS_PER_CALL: usize = 20;

/// Looks at the start of a header line at `start` (just after an LF). Returns false when
/// the scan is over (end of block, malformed, or out of data).
#[inline(always)]
fn line_start(buf: Buf, s: &mut HeaderScan, start: usize, len: usize) -> bool {
    if start >= len {
        s.end = SCAN_TRUNCATED;
        return false;
    }
    let c0 = buf.byte(start);
    if c0 == b'\n' || (c0 == b'\r' && start + 1 < len && buf.byte(start + 1) == b'\n') {
        s.end = SCAN_COMPLETE;
        return false;
    }
    if c0 == b' ' || c0 == b'\t' {
        // obs-fold: the upstream may glue it to the previous field.
        s.end = SCAN_MALFORMED;
        return false;
    }
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
        s.end = SCAN_MALFORMED;
        return false;
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

pub struct Token {
    pub off: usize,
    pub len: usize,
}

const BEARER: u64 = u64::from_le_bytes(*b"bearer\0\0");

/// `Authorization: Bearer <b64token>` with optional whitespace around the value. Anything
/// else (another scheme, an empty or over-long token, a stray character) is malformed.
#[inline(always)]
pub fn bearer_token(buf: Buf, start: usize, lf: usize) -> Result<Token, ()> {
    // Both come from the scan state in map memory: unknown to the verifier already.
    let mut end = lf;
    if end > start && buf.byte(end - 1) == b'\r' {
        end -= 1;
    }
    for _ in 0..MAX_OWS {
        let c = buf.byte(end - 1);
        if end <= start || (c != b' ' && c != b'\t') {
            break;
        }
        end -= 1;
    }
    let end = buf.launder(end);
    let mut p = start + 14;
    for _ in 0..MAX_OWS {
        let c = buf.byte(p);
        if p >= end || (c != b' ' && c != b'\t') {
            break;
        }
        p += 1;
    }
    let mut p = buf.launder(p);
    if p + 7 > end || (buf.word(p) | LOWER) & 0xffff_ffff_ffff != BEARER || buf.byte(p + 6) != b' '
    {
        return Err(());
    }
    p += 7;
    for _ in 0..MAX_OWS {
        if p >= end || buf.byte(p) != b' ' {
            break;
        }
        p += 1;
    }
    let p = buf.launder(p);
    if p >= end {
        return Err(());
    }
    let len = buf.launder(end - p);
    if len > MAX_TOKEN_LEN {
        return Err(());
    }
    Ok(Token {
        off: buf.launder(p),
        len: buf.launder(len),
    })
}

/// Token hashing or checking state, in the scratch map value (see `HeaderScan`).
#[repr(C)]
pub struct TokenScan {
    pub sip: Sip128,
    pub off: u64,
    pub len: u64,
    pub word: u64,
    /// 0: absorb the words into `sip`; 1: check them against the b64token grammar.
    pub check: u64,
    pub bad: u64,
    pub seen_eq: u64,
}

/// Folds the b64token check of the bytes of `w` marked in `valid` (0x80 per byte) into
/// `bad` and `seen_eq`. Branch-free: every branch in the word loop multiplies the paths
/// the verifier walks.
#[inline(always)]
fn check_word(w: u64, valid: u64, bad: &mut u64, seen_eq: &mut u64) {
    // b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
    let eqs = eq_bytes(w, b'=') & valid;
    let ok = b64_bytes(w) & valid;
    // Padding only at the end: no token character at or after the first '='.
    // (Bit tricks, not ctz/clz: BPF lowers those to table lookups.)
    let first_eq = eqs & eqs.wrapping_neg();
    let after_eq = !first_eq.wrapping_sub(1) | *seen_eq;
    *bad |= (valid & !(ok | eqs)) | (ok & after_eq);
    // All ones once any '=' was seen ((x | -x) has its top bit set iff x != 0).
    *seen_eq |= 0u64.wrapping_sub((eqs | eqs.wrapping_neg()) >> 63);
}

/// Up to TOKEN_WORDS_PER_CALL whole 8-byte words per call (bpf_loop callback), either
/// absorbed into the hash or checked against the grammar (`check`); the last, partial word
/// is left to the caller. The loop exit is each word's only branch: every branch in the
/// unrolled loop multiplies the paths the verifier walks. A per-byte loop over 4 KiB would
/// exceed the verifier's jump history, and an inline word loop would be re-verified for
/// every caller state.
extern "C" fn token_word(_index: u32, ctx: *mut c_void) -> i64 {
    let scratch = loop_scratch(ctx);
    let buf = Buf::new(scratch);
    // SAFETY: the per-CPU scratch map value.
    let t = unsafe { &mut (*scratch).token };
    let len = t.len as usize;
    if len > MAX_TOKEN_LEN {
        return 1;
    }
    let off = t.off as usize;
    let mut word = t.word as usize;
    // Several words per call: the call and the state kept in map memory cost more than a
    // word's worth of work.
    if t.check == 0 {
        let mut sip = t.sip;
        for _ in 0..TOKEN_WORDS_PER_CALL {
            let o = word * 8;
            if o + 8 > len {
                break;
            }
            sip.write_word(buf.word(off + o));
            word += 1;
        }
        t.sip = sip;
    } else {
        let mut bad = t.bad;
        let mut seen_eq = t.seen_eq;
        for _ in 0..TOKEN_WORDS_PER_CALL {
            let o = word * 8;
            if o + 8 > len {
                break;
            }
            check_word(buf.word(off + o), HIGHS, &mut bad, &mut seen_eq);
            word += 1;
        }
        t.bad = bad;
        t.seen_eq = seen_eq;
    }
    t.word = word as u64;
    if word * 8 + 8 > len {
        1
    } else {
        0
    }
}

const TOKEN_WORDS_PER_CALL: usize = 16;

/// Runs `token_word` over the `len` (1..=MAX_TOKEN_LEN) bytes at `off`, hashing
/// (`check` 0) or checking them. One bpf_loop, which the verifier checks once, whoever
/// calls it. Returns the length as the loop saw it, masked for the caller's tail read.
#[inline(always)]
fn token_words(buf: Buf, off: usize, len: usize, check: u64) -> (&'static TokenScan, usize) {
    let scratch = buf.scratch();
    // SAFETY: the per-CPU scratch map value, valid for this program run.
    let t = unsafe { &mut (*scratch).token };
    t.off = off as u64;
    t.len = len as u64;
    t.check = check;
    clear(&mut t.word);
    run_loop(
        scratch,
        (MAX_TOKEN_LEN / 8 / TOKEN_WORDS_PER_CALL) as u32,
        token_word,
    );
    (t, buf.launder(t.len as usize))
}

/// The fingerprint of the token at `tok`: the same keyed SipHash-2-4-128 as userspace's
/// `agent_common::siphash::fingerprint`.
///
/// The grammar is not checked here: a token whose fingerprint is known carries exactly
/// the bytes of a token the daemon issued or `rampart fingerprint` accepted, all valid
/// b64tokens (a second preimage of a keyed 128-bit PRF is out of reach). Only unknown
/// tokens need `token_is_valid`, which tells `malformed` from `unknown`.
#[inline(always)]
pub fn token_fingerprint(key: &FingerprintKey, buf: Buf, tok: &Token) -> Fingerprint {
    hash_region(key, buf, tok.off, tok.len)
}

/// Regions shorter than this are hashed inline (see `hash_region`).
const SHORT_REGION: usize = 64;

/// Keyed SipHash-2-4-128 of `len` (1..=MAX_TOKEN_LEN) bytes at `off`.
#[inline(always)]
fn hash_region(key: &FingerprintKey, buf: Buf, off: usize, len: usize) -> Fingerprint {
    if len < SHORT_REGION {
        // Most tokens: the words in registers here, not through a bpf_loop callback and
        // the scratch value (a call, and the state stored and loaded around it).
        let mut sip = Sip128::new(key);
        for i in 0..SHORT_REGION / 8 - 1 {
            if i * 8 + 8 > len {
                break;
            }
            sip.write_word(buf.word(off + i * 8));
        }
        let tail = buf.word(off + (len / 8) * 8) & low_bytes_mask(len % 8);
        return sip.finish(tail, len);
    }
    let scratch = buf.scratch();
    // SAFETY: the per-CPU scratch map value, valid for this program run.
    unsafe { (*scratch).token.sip = Sip128::new(key) };
    let (t, len) = token_words(buf, off, len, 0);
    let len = len & (MAX_TOKEN_LEN * 2 - 1);
    let tail = buf.word(off + (len / 8) * 8) & low_bytes_mask(len % 8);
    t.sip.finish(tail, len)
}

/// Whether the token at `tok` is an RFC 6750 b64token: body characters, then only `=`
/// padding, and not padding alone.
#[inline(always)]
pub fn token_is_valid(buf: Buf, tok: &Token) -> bool {
    let scratch = buf.scratch();
    // SAFETY: the per-CPU scratch map value, valid for this program run.
    unsafe {
        clear(&mut (*scratch).token.bad);
        clear(&mut (*scratch).token.seen_eq);
    }
    let (t, raw_len) = token_words(buf, tok.off, tok.len, 1);
    let len = raw_len & (MAX_TOKEN_LEN * 2 - 1);
    let tail_mask = low_bytes_mask(len % 8);
    let tail = buf.word(tok.off + (len / 8) * 8) & tail_mask;
    let mut bad = t.bad;
    let mut seen_eq = t.seen_eq;
    check_word(tail, tail_mask & HIGHS, &mut bad, &mut seen_eq);
    bad == 0 && raw_len != 0 && raw_len <= MAX_TOKEN_LEN && buf.byte(tok.off) != b'='
}

/// Path scan state, in the scratch map value (see `HeaderScan`).
#[repr(C)]
pub struct PathScan {
    pub off: u64,
    /// Request-target length on input; path length (up to `?` or `#`) on output.
    pub len: u64,
    pub word: u64,
    pub done: u64,
    pub ambiguous: u64,
}

/// One word of the request-target per call (bpf_loop callback): find where the path ends
/// and flag what an upstream might normalise: dot segments, `//`, backslashes and
/// percent-encoded dots, slashes, backslashes or percents.
extern "C" fn path_word(_index: u32, ctx: *mut c_void) -> i64 {
    let scratch = loop_scratch(ctx);
    let buf = Buf::new(scratch);
    // SAFETY: the per-CPU scratch map value.
    let s = unsafe { &mut (*scratch).path };
    let len = s.len as usize;
    let o = (s.word as usize) * 8;
    if o >= len || len > MAX_SCOPED_PATH {
        s.done = 1;
        return 1;
    }
    let at = s.off as usize + o;
    let w0 = buf.word(at);
    let w1 = buf.word(at + 1);
    let w2 = buf.word(at + 2);
    let mut valid = if len - o >= 8 {
        HIGHS
    } else {
        low_bytes_mask(len - o) & HIGHS
    };
    let stop = (eq_bytes(w0, b'?') | eq_bytes(w0, b'#')) & valid;
    if stop != 0 {
        let first = stop & stop.wrapping_neg();
        valid &= first.wrapping_sub(1);
        s.len = (o + first_marked_byte(first)) as u64;
        s.done = 1;
    }
    let slash = eq_bytes(w0, b'/');
    let hits = (slash & eq_bytes(w1, b'.') & (eq_bytes(w2, b'/') | eq_bytes(w2, b'.')))
        | (slash & eq_bytes(w1, b'/'))
        | eq_bytes(w0, b'\\')
        | (eq_bytes(w0, b'%')
            & ((eq_bytes(w1, b'2')
                & (eq_bytes(w2 | LOWER, b'e') | eq_bytes(w2 | LOWER, b'f') | eq_bytes(w2, b'5')))
                | (eq_bytes(w1, b'5') & eq_bytes(w2 | LOWER, b'c'))));
    if hits & valid != 0 {
        s.ambiguous = 1;
    }
    s.word += 1;
    if s.done != 0 {
        1
    } else {
        0
    }
}

/// The path part (up to `?` or `#`) of the request-target at `off`: its length, or None
/// when an upstream might read it as another path (or it is longer than scopes allow).
#[inline(always)]
pub fn scoped_path(buf: Buf, off: usize, len: usize) -> Option<usize> {
    let scratch = buf.scratch();
    // SAFETY: the per-CPU scratch map value, valid for this program run.
    let s = unsafe { &mut (*scratch).path };
    s.off = off as u64;
    s.len = len as u64;
    clear(&mut s.word);
    clear(&mut s.done);
    s.ambiguous = if len > MAX_SCOPED_PATH { 1 } else { 0 };
    run_loop(scratch, (MAX_SCOPED_PATH / 8) as u32, path_word);
    let plen = buf.launder(s.len as usize);
    if s.ambiguous != 0 || plen > MAX_SCOPED_PATH {
        return None;
    }
    // A path ending in "/." or "/.." is a dot segment too.
    if plen >= 2 && buf.byte(off + plen - 1) == b'.' {
        let c = buf.byte(off + plen - 2);
        if c == b'/' || (c == b'.' && plen >= 3 && buf.byte(off + plen - 3) == b'/') {
            return None;
        }
    }
    Some(plen)
}

/// Does the path at `off` start with `prefix[..plen]`?
#[inline(always)]
pub fn has_prefix(buf: Buf, off: usize, len: usize, prefix: &[u8; 128], plen: usize) -> bool {
    let off = buf.launder(off);
    let plen = buf.launder(plen);
    if plen > len || plen > 128 {
        return false;
    }
    for k in 0..16 {
        let o = k * 8;
        if o >= plen {
            break;
        }
        // SAFETY: o + 8 <= 128.
        let want = unsafe { (prefix.as_ptr().add(o & 127) as *const u64).read_unaligned() };
        let m = if plen - o >= 8 {
            u64::MAX
        } else {
            low_bytes_mask(plen - o)
        };
        if (buf.word(off + o) ^ want) & m != 0 {
            return false;
        }
    }
    true
}

/// Keyed hash of the request-target, for events (no path bytes leave the kernel).
#[inline(always)]
pub fn target_hash(key: &FingerprintKey, buf: Buf, off: usize, len: usize) -> u64 {
    let len = if len > 256 { 256 } else { len };
    hash_region(key, buf, off, len).0[0]
}
