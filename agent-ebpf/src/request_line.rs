//! The request line: `method SP request-target SP HTTP/1.x CRLF`.

use agent_common::http::{CLASS, TCHAR};

use crate::scratch::{Buf, HeaderScan, MASK, NOT_FOUND};

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

/// How a request's first bytes read as a method.
pub enum MethodStart {
    /// 1..=16 tchars then SP: the length including the SP.
    Method(usize),
    /// Tchars up to the end of the data, fewer than 17: a method may still follow.
    Prefix,
    /// No method.
    No,
}

/// An extension method: 1..=16 tchars then SP.
#[inline(always)]
pub fn extension_method(buf: Buf, len: usize) -> MethodStart {
    let len = buf.launder(len);
    for i in 0..17 {
        if i >= len {
            return MethodStart::Prefix;
        }
        let c = buf.byte(i);
        if c == b' ' {
            return if i > 0 {
                MethodStart::Method(buf.launder(i + 1))
            } else {
                MethodStart::No
            };
        }
        if CLASS[c as usize] & TCHAR == 0 {
            return MethodStart::No;
        }
    }
    MethodStart::No
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
pub fn version_end(buf: Buf, lf: usize) -> Option<usize> {
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
