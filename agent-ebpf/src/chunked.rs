//! Chunked request bodies (RFC 9112 §7.1): walked over their framing bytes (chunk-size
//! lines, the CRLF after each chunk's data, trailer fields), with chunk data skipped
//! whole. Strict where servers differ: no whitespace around the size, no bare LF, at most
//! `MAX_SIZE_DIGITS` hex digits; anything else is `malformed`.
//!
//! The walk's state is the stream's `remaining` (`phase << 60 | digits << 52 | value`), so
//! a body can end, and its framing lines can be split, anywhere across segments.

use core::ffi::c_void;

use agent_common::Verdict;
use aya_ebpf::helpers::generated::bpf_loop;

use crate::{
    packet::{copy_len, Packet},
    parse::Flow,
    scratch::{clear, Buf, Cursor},
};

const SIZE: u64 = 0;
const EXT: u64 = 1;
const SIZE_LF: u64 = 2;
const DATA: u64 = 3;
const DATA_CR: u64 = 4;
const DATA_LF: u64 = 5;
const TRAILER: u64 = 6;
const TRAILER_LINE: u64 = 7;
const TRAILER_LF: u64 = 8;
const END_LF: u64 = 9;
/// The body's last byte was walked: the stream is at a request boundary.
const DONE: u64 = 14;
const BAD: u64 = 15;

/// The state a chunked body starts in.
pub const START: u64 = SIZE << 60;
const VALUE: u64 = (1 << 52) - 1;
const MAX_SIZE_DIGITS: u64 = 12;
/// Steps (a framing byte, or a run of chunk data) walked per segment; a segment needing
/// more (thousands of tiny chunks) is `malformed`.
const MAX_STEPS: u32 = 8192;
const WINDOW: usize = 32;

/// The walk's state, in the scratch value (see `scratch::HeaderScan` for why).
#[repr(C)]
pub struct Walk {
    pub state: u64,
    pub off: u64,
    pub len: u64,
    pub payload_off: u64,
    /// Payload offset and length of the bytes in `window`.
    pub base: u64,
    pub have: u64,
    pub window: [u8; WINDOW],
}

/// What bpf_loop hands `step`: the scratch value and the program's context (for the
/// packet reads; the verifier keeps its type through the stack slot).
#[repr(C)]
struct WalkCtx {
    scratch: *mut crate::scratch::Scratch,
    ctx: *mut c_void,
}

#[inline(always)]
fn pack(phase: u64, digits: u64, value: u64) -> u64 {
    phase << 60 | (digits & 0xff) << 52 | (value & VALUE)
}

/// The bpf_loop callbacks, one per hook: each a plain function, as the kernel wants BTF
/// function info for a callback (a generic one has none in the object).
pub(crate) extern "C" fn step_xdp(index: u32, ctx: *mut c_void) -> i64 {
    step::<crate::packet::Xdp>(index, ctx)
}

pub(crate) extern "C" fn step_tc(index: u32, ctx: *mut c_void) -> i64 {
    step::<crate::packet::Tc>(index, ctx)
}

#[inline(always)]
fn step<P: Packet>(_index: u32, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop hands back the WalkCtx `walk` passed.
    let (scratch, raw) = unsafe {
        let w = ctx as *mut WalkCtx;
        ((*w).scratch, (*w).ctx)
    };
    // SAFETY: the per-CPU scratch map value.
    let w = unsafe { &mut (*scratch).walk };
    let (off, len) = (w.off & 0xffff, w.len & 0xffff);
    if off >= len {
        return 1;
    }
    let phase = w.state >> 60;
    let digits = (w.state >> 52) & 0xff;
    let value = w.state & VALUE;
    if phase == DATA {
        let skip = if value < len - off { value } else { len - off };
        w.off = off + skip;
        let left = value - skip;
        w.state = if left == 0 {
            pack(DATA_CR, 0, 0)
        } else {
            pack(DATA, 0, left)
        };
        return 0;
    }
    if off < w.base || off >= w.base + w.have {
        let n = len - off;
        let n = if n > WINDOW as u64 { WINDOW as u64 } else { n };
        let at = (w.payload_off + off) as usize & 0xffff;
        // SAFETY: `raw` is this program's context; the window holds WINDOW bytes.
        if n == 0
            || unsafe { P::load_raw(raw, at, w.window.as_mut_ptr(), copy_len(n as usize, WINDOW)) }
                .is_err()
        {
            w.state = pack(BAD, 0, 0);
            return 1;
        }
        w.base = off;
        w.have = n;
    }
    let b = w.window[((off - w.base) as usize) & (WINDOW - 1)];
    let next = match phase {
        SIZE => {
            let d = match b {
                b'0'..=b'9' => Some(b - b'0'),
                b'a'..=b'f' => Some(b - b'a' + 10),
                b'A'..=b'F' => Some(b - b'A' + 10),
                _ => None,
            };
            match d {
                Some(d) if digits < MAX_SIZE_DIGITS => {
                    pack(SIZE, digits + 1, value << 4 | d as u64)
                }
                None if digits > 0 && b == b';' => pack(EXT, digits, value),
                None if digits > 0 && b == b'\r' => pack(SIZE_LF, digits, value),
                _ => pack(BAD, 0, 0),
            }
        }
        EXT => match b {
            b'\r' => pack(SIZE_LF, digits, value),
            b'\t' => w.state,
            0..=0x1f | 0x7f => pack(BAD, 0, 0),
            _ => w.state,
        },
        SIZE_LF => match b {
            b'\n' if value == 0 => pack(TRAILER, 0, 0),
            b'\n' => pack(DATA, 0, value),
            _ => pack(BAD, 0, 0),
        },
        DATA_CR => match b {
            b'\r' => pack(DATA_LF, 0, 0),
            _ => pack(BAD, 0, 0),
        },
        DATA_LF => match b {
            b'\n' => START,
            _ => pack(BAD, 0, 0),
        },
        TRAILER => match b {
            b'\r' => pack(END_LF, 0, 0),
            b'\n' | b' ' | b'\t' => pack(BAD, 0, 0),
            _ => pack(TRAILER_LINE, 0, 0),
        },
        TRAILER_LINE => match b {
            b'\r' => pack(TRAILER_LF, 0, 0),
            b'\n' => pack(BAD, 0, 0),
            _ => w.state,
        },
        TRAILER_LF => match b {
            b'\n' => pack(TRAILER, 0, 0),
            _ => pack(BAD, 0, 0),
        },
        END_LF => match b {
            b'\n' => pack(DONE, 0, 0),
            _ => pack(BAD, 0, 0),
        },
        _ => pack(BAD, 0, 0),
    };
    w.state = next;
    w.off = off + 1;
    let phase = next >> 60;
    if phase == DONE || phase == BAD {
        1
    } else {
        0
    }
}

/// Walks the chunked body at the cursor through the segment (or to its end, after which
/// the cursor is at a request boundary).
#[inline(always)]
pub fn walk<P: Packet>(p: &P, f: &Flow, buf: Buf, c: &mut Cursor, len: u64) -> Result<(), Verdict> {
    let scratch = buf.scratch();
    {
        // SAFETY: the per-CPU scratch map value.
        let w = unsafe { &mut (*scratch).walk };
        w.state = c.remaining;
        w.off = c.off;
        w.len = len;
        w.payload_off = f.payload_off as u64;
        clear(&mut w.base);
        clear(&mut w.have);
    }
    let mut ctx = WalkCtx {
        scratch,
        ctx: p.raw(),
    };
    // SAFETY: `step` only touches the scratch value and reads the packet through `ctx`.
    unsafe {
        bpf_loop(
            MAX_STEPS,
            p.chunk_step() as *mut c_void,
            &mut ctx as *mut WalkCtx as *mut c_void,
            0,
        );
    }
    // SAFETY: as above.
    let w = unsafe { &(*scratch).walk };
    let phase = w.state >> 60;
    if phase == BAD {
        return Err(Verdict::Malformed);
    }
    c.off = w.off;
    if phase == DONE {
        clear(&mut c.kind);
        clear(&mut c.remaining);
        return Ok(());
    }
    if w.off < len {
        // Out of steps before the segment's end.
        return Err(Verdict::Malformed);
    }
    c.remaining = w.state;
    Ok(())
}
