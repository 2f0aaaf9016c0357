//! HTTP/1.x request parsing over the per-CPU scratch copy of the request bytes.
//!
//! All reads go through `byte`/`word`, which mask the index into the scratch buffer so the
//! verifier sees every access in bounds; callers keep indexes below `len` (≤ SCAN_BYTES),
//! which makes the mask a no-op at run time.

use core::ffi::c_void;

use agent_common::{
    http::{known_method, method, B64, CLASS, TCHAR},
    siphash::{low_bytes_mask, Sip128},
    Fingerprint, FingerprintKey, MAX_TOKEN_LEN, SCAN_BYTES,
};
use aya_ebpf::helpers::generated::bpf_loop;

use crate::maps::Scratch;

const MASK: usize = SCAN_BYTES - 1;
const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;
/// Header lines examined; a block with more is `incomplete`.
const MAX_LINES: u32 = 256;
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
}

/// 0x80 in every byte of `x` that is zero, nothing elsewhere (exact, no carries).
#[inline(always)]
fn zero_bytes(x: u64) -> u64 {
    !(((x & !HIGHS).wrapping_add(!HIGHS)) | x) & HIGHS
}

#[inline(always)]
fn eq_bytes(w: u64, c: u8) -> u64 {
    zero_bytes(w ^ (ONES * c as u64))
}

/// Index of the first `c` in `[from, len)`, scanning a word at a time.
#[inline(always)]
fn find_byte(buf: Buf, from: usize, len: usize, c: u8) -> Option<usize> {
    // Laundered so the loop's comparisons narrow private copies, not the caller's values
    // (which would otherwise leave the loop with a different range per iteration).
    let from = buf.launder(from);
    let len = buf.launder(len);
    for i in 0..SCAN_BYTES / 8 {
        let off = from + i * 8;
        if off >= len {
            return None;
        }
        let m = eq_bytes(buf.word(off), c);
        if m != 0 {
            let pos = buf.launder(off + (m.trailing_zeros() / 8) as usize);
            return if pos < len { Some(pos) } else { None };
        }
    }
    None
}

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
    /// Where the header block starts.
    pub headers_off: usize,
}

/// Cheap first look at a segment's first 8 bytes: a known method plus SP.
#[inline(always)]
pub fn method_of(first8: u64) -> Option<(u32, usize)> {
    known_method(first8)
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
            return if i > 0 { Some(buf.launder(i + 1)) } else { None };
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
/// (`method_len` includes its SP). `known`: a standard method, whose broken request line
/// is malformed rather than "not a request".
#[inline(always)]
pub fn request_line(
    buf: Buf,
    len: usize,
    method: u32,
    method_len: usize,
    known: bool,
) -> Result<RequestLine, LineError> {
    let lf = match find_byte(buf, 0, len, b'\n') {
        Some(lf) => lf,
        None => {
            return Err(if known {
                LineError::Incomplete
            } else {
                LineError::NotRequest
            })
        }
    };
    let bad = if known {
        LineError::Malformed
    } else {
        LineError::NotRequest
    };
    // Bare LF is accepted, as nginx does.
    let vend = if lf > 0 && buf.byte(lf - 1) == b'\r' { lf - 1 } else { lf };
    if vend < method_len + 1 + 9 {
        return Err(bad);
    }
    let v = buf.word(vend - 8);
    if (v != HTTP_1_1 && v != HTTP_1_0) || buf.byte(vend - 9) != b' ' {
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
        headers_off: lf + 1,
    })
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
    pub pos: u64,
    pub auth_start: u64,
    pub auth_lf: u64,
    pub auths: u64,
    pub end: u64,
}

/// What bpf_loop hands the callback (it must live on the stack).
#[repr(C)]
struct LoopCtx {
    scratch: *mut Scratch,
}

const AUTHORIZ: u64 = u64::from_le_bytes(*b"authoriz");
const ATION: u64 = u64::from_le_bytes(*b"ation\0\0\0");
const LOWER: u64 = 0x2020_2020_2020_2020;

/// One header line per call (bpf_loop callback): end of block, obs-fold, or an
/// Authorization field (counted; whitespace before its colon is malformed).
extern "C" fn scan_line(_index: u32, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop hands back the LoopCtx the caller passed.
    let scratch = unsafe { (*(ctx as *mut LoopCtx)).scratch };
    let buf = Buf::new(scratch);
    // SAFETY: the per-CPU scratch map value.
    let s = unsafe { &mut (*scratch).scan };
    let len = s.len as usize;
    let start = s.pos as usize;
    if start >= len || start >= SCAN_BYTES || len > SCAN_BYTES {
        s.end = SCAN_TRUNCATED;
        return 1;
    }
    let c0 = buf.byte(start);
    if c0 == b'\n' || (c0 == b'\r' && start + 1 < len && buf.byte(start + 1) == b'\n') {
        s.end = SCAN_COMPLETE;
        return 1;
    }
    if c0 == b' ' || c0 == b'\t' {
        // obs-fold: the upstream may glue it to the previous field.
        s.end = SCAN_MALFORMED;
        return 1;
    }
    let lf = match find_byte(buf, start, len, b'\n') {
        Some(lf) => lf,
        None => {
            s.end = SCAN_TRUNCATED;
            // A cut-off Authorization field still counts as seen.
            if start + 14 <= len && is_authorization(buf, start) {
                s.auths += 1;
            }
            return 1;
        }
    };
    if lf >= start + 14 && is_authorization(buf, start) {
        let mut i = start + 13;
        let mut ws = false;
        for _ in 0..MAX_OWS {
            let c = buf.byte(i);
            if c != b' ' && c != b'\t' {
                break;
            }
            ws = true;
            i += 1;
        }
        if buf.byte(i) == b':' {
            if ws {
                s.end = SCAN_MALFORMED;
                return 1;
            }
            s.auths += 1;
            if s.auths > 1 {
                s.end = SCAN_MALFORMED;
                return 1;
            }
            s.auth_start = start as u64;
            s.auth_lf = lf as u64;
        }
    }
    s.pos = (lf + 1) as u64;
    0
}

/// The 13 bytes at `i` spell "authorization", any case.
#[inline(always)]
fn is_authorization(buf: Buf, i: usize) -> bool {
    buf.word(i) | LOWER == AUTHORIZ && (buf.word(i + 8) | LOWER) & 0xff_ffff_ffff == ATION
}

/// Scans the header block; the result is in the scratch's `scan`.
#[inline(always)]
pub fn scan_headers(buf: Buf, len: usize, from: usize) -> &'static HeaderScan {
    let scratch = buf.scratch();
    // SAFETY: the per-CPU scratch map value, valid for this program run.
    let s = unsafe { &mut (*scratch).scan };
    s.len = len as u64;
    s.pos = from as u64;
    s.auth_start = 0;
    s.auth_lf = 0;
    s.auths = 0;
    s.end = SCAN_RUNNING;
    let mut ctx = LoopCtx { scratch };
    // SAFETY: the callback only touches the scratch value `ctx` points to.
    unsafe {
        bpf_loop(
            MAX_LINES,
            scan_line as *mut c_void,
            &mut ctx as *mut LoopCtx as *mut c_void,
            0,
        );
    }
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
    let start = buf.launder(start);
    let mut end = buf.launder(lf);
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
    // b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
    let mut bad = 0u8;
    let mut seen_eq = 0u8;
    for i in 0..MAX_TOKEN_LEN {
        if i >= len {
            break;
        }
        let c = buf.byte(p + i);
        let ok = CLASS[c as usize] & B64;
        let eq = (c == b'=') as u8;
        bad |= ((ok == 0) as u8 & (eq ^ 1)) | ((ok != 0) as u8 & seen_eq);
        seen_eq |= eq;
    }
    if bad != 0 || buf.byte(p) == b'=' {
        return Err(());
    }
    Ok(Token {
        off: buf.launder(p),
        len: buf.launder(len),
    })
}

/// Keyed SipHash-2-4-128 of `len` (≤ MAX_WORDS × 8) bytes at `off` (the same function
/// as userspace's).
#[inline(always)]
pub fn hash<const MAX_WORDS: usize>(
    key: &FingerprintKey,
    buf: Buf,
    off: usize,
    len: usize,
) -> Fingerprint {
    let mut h = Sip128::new(key);
    let off = buf.launder(off);
    let len = buf.launder(len);
    let words = len / 8;
    for i in 0..MAX_WORDS {
        if i >= words {
            break;
        }
        h.write_word(buf.word(off + i * 8));
    }
    let tail = buf.word(off + words * 8) & low_bytes_mask(len % 8);
    h.finish(tail, len)
}

/// Length of the path part of a request-target (up to `?` or `#`).
#[inline(always)]
pub fn path_len(buf: Buf, off: usize, len: usize) -> usize {
    let end = off + len;
    let q = find_byte(buf, off, end, b'?').unwrap_or(end);
    let h = find_byte(buf, off, q, b'#').unwrap_or(q);
    h - off
}

/// A path an upstream might normalise into another one: dot segments, `//`, backslashes
/// and percent-encoded dots, slashes, backslashes or percents. Scoped tokens using such a
/// path are out of scope: we do not guess what the upstream will make of it.
#[inline(always)]
pub fn path_is_ambiguous(buf: Buf, off: usize, len: usize) -> bool {
    let off = buf.launder(off);
    let len = buf.launder(len);
    if len > MAX_SCOPED_PATH {
        return true;
    }
    for i in 0..MAX_SCOPED_PATH / 8 {
        let o = i * 8;
        if o >= len {
            break;
        }
        let w0 = buf.word(off + o);
        let w1 = buf.word(off + o + 1);
        let w2 = buf.word(off + o + 2);
        let slash = eq_bytes(w0, b'/');
        let dot1 = eq_bytes(w1, b'.');
        let hits = (slash & dot1 & (eq_bytes(w2, b'/') | eq_bytes(w2, b'.')))
            | (slash & eq_bytes(w1, b'/'))
            | eq_bytes(w0, b'\\')
            | (eq_bytes(w0, b'%')
                & ((eq_bytes(w1, b'2')
                    & (eq_bytes(w2 | LOWER, b'e') | eq_bytes(w2 | LOWER, b'f') | eq_bytes(w2, b'5')))
                    | (eq_bytes(w1, b'5') & eq_bytes(w2 | LOWER, b'c'))));
        let valid = if len - o >= 8 {
            u64::MAX
        } else {
            low_bytes_mask(len - o)
        };
        if hits & valid != 0 {
            return true;
        }
    }
    // A path ending in "/." or "/.." is a dot segment too.
    len >= 2 && buf.byte(off + len - 1) == b'.' && {
        let c = buf.byte(off + len - 2);
        c == b'/' || (c == b'.' && len >= 3 && buf.byte(off + len - 3) == b'/')
    }
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
    hash::<32>(key, buf, off, len).0[0]
}

pub const METHOD_OTHER: u32 = method::OTHER;
