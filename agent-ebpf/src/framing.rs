//! How a request is followed in its connection's stream (RFC 9112 §6): no body, a
//! Content-Length body, or a chunked one. Read from the complete header block in the
//! scratch buffer; anything a server could read another way is an error (`malformed`).

use agent_common::{
    stream::{BODY, BOUNDARY, CHUNKED},
    swar::{eq_bytes, first_marked_byte, HIGHS, LOWER},
};

use crate::{chunked, scratch::Buf};

/// How the request whose header block the scan completed is followed: `(kind, remaining)`
/// of the stream after its header block. `Err`: framing the server could read another way
/// (both Content-Length and Transfer-Encoding, either twice, a coding other than chunked,
/// a value that is not a plain number, whitespace before the colon).
#[inline(always)]
pub fn framing(buf: Buf) -> Result<(u64, u64), ()> {
    if !crate::headers::framing_fields(buf) {
        return Err(());
    }
    // SAFETY: the per-CPU scratch map value; `framing_fields` is done with it.
    let s = unsafe { &(*buf.scratch()).scan };
    if s.cls + s.tes > 1 {
        return Err(());
    }
    if s.tes == 1 {
        return if transfer_encoding_chunked(buf, s.te_start as usize)? {
            Ok((CHUNKED as u64, chunked::START))
        } else {
            Ok((BOUNDARY as u64, 0))
        };
    }
    if s.cls == 1 {
        return match content_length(buf, s.cl_start as usize)? {
            Some(0) | None => Ok((BOUNDARY as u64, 0)),
            Some(n) => Ok((BODY as u64, n)),
        };
    }
    Ok((BOUNDARY as u64, 0))
}

/// Skips optional whitespace from `i` (at most 8 bytes of it).
#[inline(always)]
fn skip_ows(buf: Buf, i: usize) -> usize {
    let w = buf.word(i);
    let ws = !(eq_bytes(w, b' ') | eq_bytes(w, b'\t')) & HIGHS;
    if ws == 0 {
        i + 8
    } else {
        i + first_marked_byte(ws)
    }
}

/// The end of a field value at `i`: optional whitespace, then CRLF or LF.
#[inline(always)]
fn value_ends(buf: Buf, i: usize) -> bool {
    let i = skip_ows(buf, i);
    buf.byte(i) == b'\n' || (buf.byte(i) == b'\r' && buf.byte(i + 1) == b'\n')
}

/// The value of the `Content-Length` field at line start `at`: `None` when the name
/// only starts like it ("Content-Lengths:").
#[inline(always)]
fn content_length(buf: Buf, at: usize) -> Result<Option<u64>, ()> {
    let c = buf.byte(at + 14);
    if c == b' ' || c == b'\t' {
        return Err(());
    }
    if c != b':' {
        return Ok(None);
    }
    let start = buf.launder(skip_ows(buf, at + 15));
    let mut v = 0u64;
    let mut i = start;
    // Up to 15 digits: no body the datapath could count is longer.
    for _ in 0..15 {
        let d = buf.byte(i).wrapping_sub(b'0');
        if d > 9 {
            break;
        }
        v = v * 10 + d as u64;
        i += 1;
    }
    let (i, v) = (buf.launder(i), buf.launder(v as usize) as u64);
    if i == start || !value_ends(buf, i) {
        return Err(());
    }
    Ok(Some(v))
}

const CHUNKED_WORD: u64 = u64::from_le_bytes(*b"chunked\0");

/// Whether the `Transfer-Encoding` field at line start `at` is exactly `chunked` (`false`
/// when the name only starts like it); any other coding is `Err`.
#[inline(always)]
fn transfer_encoding_chunked(buf: Buf, at: usize) -> Result<bool, ()> {
    if buf.byte(at + 16) | 0x20 != b'g' {
        return Ok(false);
    }
    let c = buf.byte(at + 17);
    if c == b' ' || c == b'\t' {
        return Err(());
    }
    if c != b':' {
        return Ok(false);
    }
    let i = buf.launder(skip_ows(buf, at + 18));
    if (buf.word(i) | LOWER) & 0x00ff_ffff_ffff_ffff != CHUNKED_WORD || !value_ends(buf, i + 7) {
        return Err(());
    }
    Ok(true)
}
