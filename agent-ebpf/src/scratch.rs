//! The per-CPU scratch value the parser works in: the request bytes (`Buf`: bounds-masked
//! reads and a laundering slot), every loop's state (the `*Scan` structs, in map memory the
//! verifier does not track, so a bpf_loop callback is checked once), and the verifier
//! tricks that go with them.

use core::ffi::c_void;

use agent_common::{siphash::Sip128, Fingerprint, TokenStats, SCAN_BYTES};
use aya_ebpf::helpers::generated::{bpf_get_smp_processor_id, bpf_loop};

use crate::maps::FlowKey;

/// Index mask of the request bytes.
pub const MASK: usize = SCAN_BYTES - 1;
/// A `first_lf` the header scan did not find.
pub const NOT_FOUND: u64 = u64::MAX;

/// Request bytes, padded so an 8-byte load at any index below SCAN_BYTES stays inside,
/// and the parser's variables. Values that pass through map memory are unknown to the
/// verifier, which is the point: see `Buf::launder`.
#[repr(C)]
pub struct Scratch {
    /// First: its address is the value's, so the parser's loops need no register for it
    /// (the scan's position stays in a register instead of the stack).
    /// Twice the scanned size: the bytes of a segment are loaded after the held start of
    /// its request (both at most SCAN_BYTES), at an offset the verifier cannot bound by
    /// their sum.
    pub buf: [u8; 2 * SCAN_BYTES + 16],
    pub launder: u64,
    pub cursor: Cursor,
    pub walk: crate::chunked::Walk,
    /// The bytes after a request, looked at for empty lines.
    pub peek: [u64; 2],
    /// Where each header line of the scanned block starts (`headers::MAX_LINES`).
    pub line_starts: [u16; crate::headers::MAX_LINES],
    /// A new `FLOWS` entry, built here (the stack is nearly full).
    pub fresh: agent_common::FlowState,
    pub scan: HeaderScan,
    pub token: TokenScan,
    pub path: PathScan,
    pub scope: ScopeScan,
    pub new_stats: TokenStats,
    pub seen: Seen,
    pub flow: FlowKey,
    /// The segment as the entry program parsed it, for the request program it tail-calls
    /// (the same packet, on the same CPU): parsed once.
    pub carried: Carried,
}

/// See `Scratch::carried`.
#[repr(C)]
pub struct Carried {
    pub flow: crate::parse::Flow,
    pub listener: agent_common::ListenerConfig,
}

/// This CPU's scratch value. A program runs to its end on one CPU (tail calls included),
/// and nothing else on that CPU runs the datapath meanwhile.
#[inline(always)]
pub fn get() -> Option<*mut Scratch> {
    // SAFETY: plain helper call.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    crate::maps::SCRATCH.get_ptr_mut(cpu)
}

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
    /// SCAN_COMPLETE: where what follows the header block starts.
    pub block_end: u64,
    /// Header lines seen (their starts in `Scratch::line_starts`).
    pub lines: u64,
    /// The last `Content-Length` field's line start, and how many there are.
    pub cl_start: u64,
    pub cls: u64,
    /// The same for `Transfer-Encoding`.
    pub te_start: u64,
    pub tes: u64,
}

/// One segment's walk through its connection's byte stream (see `stream`), kept across
/// the tail calls that judge the requests pipelined in it.
#[repr(C)]
pub struct Cursor {
    /// Set just before the program tail-calls itself for the next request of the segment;
    /// cleared by the run that reads it.
    pub cont: u64,
    /// Payload offset of the next byte to look at.
    pub off: u64,
    /// Stream state (`agent_common::stream`) and its count at `off`.
    pub kind: u64,
    pub remaining: u64,
    /// The same at the start of the segment.
    pub start_kind: u64,
    pub start_remaining: u64,
    /// The segment repeats the last one: it must leave the stream where that one did.
    pub rejudge: u64,
    /// Requests judged in this segment so far.
    pub requests: u64,
    /// This run leaves bytes of the segment to judge: the entry tail-calls the program.
    pub more: u64,
}

/// Token hashing or checking state (see `HeaderScan`).
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

/// Path scan state (see `HeaderScan`).
#[repr(C)]
pub struct PathScan {
    pub off: u64,
    /// Request-target length on input; path length (up to `?` or `#`) on output.
    pub len: u64,
    pub word: u64,
    pub done: u64,
    pub ambiguous: u64,
}

/// Scope matching state (see `HeaderScan`).
#[repr(C)]
pub struct ScopeScan {
    pub scopes: u64,
    pub method: u64,
    pub path_off: u64,
    pub path_len: u64,
    pub hit: u64,
}

/// Request facts gathered along the way, for the event (here: the stack is nearly full).
#[repr(C)]
pub struct Seen {
    pub method: u64,
    pub target_off: u64,
    pub target_len: u64,
    pub fingerprint: Fingerprint,
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
