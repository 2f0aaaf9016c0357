//! `Authorization: Bearer <b64token>`: finding the token, its keyed fingerprint, and the
//! RFC 6750 grammar check for tokens the datapath does not know.

use core::ffi::c_void;

use agent_common::{
    siphash::{low_bytes_mask, Sip128},
    swar::{b64_bytes, eq_bytes, HIGHS, LOWER},
    Fingerprint, FingerprintKey, MAX_TOKEN_LEN,
};

use crate::scratch::{clear, loop_scratch, run_loop, Buf, TokenScan};

const MAX_OWS: usize = 16;

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

/// Keyed hash of the request-target, for events (no path bytes leave the kernel).
#[inline(always)]
pub fn target_hash(key: &FingerprintKey, buf: Buf, off: usize, len: usize) -> u64 {
    let len = if len > 256 { 256 } else { len };
    hash_region(key, buf, off, len).0[0]
}
