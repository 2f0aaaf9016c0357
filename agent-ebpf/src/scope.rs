//! Scopes: the request-target's path (refusing what an upstream might normalise into
//! another path) against the token's scope set of method bits and path prefixes.

use core::ffi::c_void;

use agent_common::{
    siphash::low_bytes_mask,
    swar::{eq_bytes, first_marked_byte, HIGHS, LOWER},
    MAX_SCOPES,
};

use crate::{
    maps::SCOPES,
    request_line::RequestLine,
    scratch::{clear, loop_scratch, run_loop, Buf},
};

/// Longest path a scoped token may use (longer is out of scope).
pub const MAX_SCOPED_PATH: usize = 2048;

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
fn scoped_path(buf: Buf, off: usize, len: usize) -> Option<usize> {
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
fn has_prefix(buf: Buf, off: usize, len: usize, prefix: &[u8; 128], plen: usize) -> bool {
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

/// One scope per call (bpf_loop callback, index = scope number).
extern "C" fn scope_step(index: u32, ctx: *mut c_void) -> i64 {
    let scratch = loop_scratch(ctx);
    // SAFETY: the per-CPU scratch map value.
    let s = unsafe { &mut (*scratch).scope };
    let i = index & 63;
    if s.scopes >> i == 0 {
        return 1;
    }
    if s.scopes & (1 << i) == 0 {
        return 0;
    }
    let Some(scope) = SCOPES.get(i) else {
        return 0;
    };
    if scope.methods as u64 & s.method != 0
        && has_prefix(
            Buf::new(scratch),
            s.path_off as usize,
            s.path_len as usize,
            &scope.prefix,
            scope.prefix_len as usize,
        )
    {
        s.hit = 1;
        return 1;
    }
    0
}

#[inline(always)]
pub fn in_scope(scopes: u64, buf: Buf, line: &RequestLine, method: u32) -> bool {
    let Some(path) = scoped_path(buf, line.target_off, line.target_len) else {
        return false;
    };
    let scratch = buf.scratch();
    // SAFETY: the per-CPU scratch map value, valid for this program run.
    let s = unsafe { &mut (*scratch).scope };
    s.scopes = scopes;
    s.method = method as u64;
    s.path_off = line.target_off as u64;
    s.path_len = path as u64;
    s.hit = 0;
    run_loop(scratch, MAX_SCOPES as u32, scope_step);
    s.hit != 0
}
