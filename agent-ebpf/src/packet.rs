//! The one way into packet memory: bounds-checked pointers into the linear part, and
//! helper-based copies for everything (including non-linear skb data and XDP fragments).

use core::{ffi::c_void, mem::size_of};

use aya_ebpf::{
    helpers::generated::{
        bpf_redirect, bpf_skb_change_tail, bpf_skb_load_bytes, bpf_skb_pull_data,
        bpf_skb_store_bytes, bpf_xdp_adjust_head, bpf_xdp_adjust_tail, bpf_xdp_get_buff_len,
        bpf_xdp_load_bytes, bpf_xdp_store_bytes,
    },
    programs::{TcContext, XdpContext},
    EbpfContext,
};

/// Headers are looked for in the first 2 KiB of a packet.
pub const MAX_HEADER_OFFSET: usize = 2048;
/// Covers every header offset the parser accepts (≤ MAX_HEADER_OFFSET + 60).
pub const HEADER_OFF_MASK: usize = 4095;
const _: () = assert!(MAX_HEADER_OFFSET + 60 <= HEADER_OFF_MASK);

pub trait Packet {
    /// The program context, for aya-log.
    type Ctx: EbpfContext;
    fn ctx(&self) -> &Self::Ctx;
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// Whole packet length, including non-linear data.
    fn len(&self) -> usize;
    fn ifindex(&self) -> u32;
    /// Copies `len` (1..=max) bytes at `off` into `dst`.
    fn load(&self, off: usize, dst: *mut u8, len: u32) -> Result<(), ()>;
    /// Makes the first `len` bytes linear and writable (TC); a no-op for XDP.
    fn make_writable(&self, len: u32) -> Result<(), ()>;
    /// Cuts the packet to `len` bytes (or grows it, where the hook has room). Invalidates
    /// earlier pointers.
    fn truncate(&self, len: usize) -> Result<(), ()>;
    /// Writes `len` (1..=max) bytes from `src` at `off`. Invalidates earlier pointers.
    fn store(&self, off: usize, src: *const u8, len: u32) -> Result<(), ()>;
    /// Adds `delta` bytes before the packet's first byte (XDP: its headroom); `Err` where
    /// the hook cannot (TC grows at the tail). Invalidates earlier pointers.
    fn grow_front(&self, delta: u32) -> Result<(), ()>;
    /// The program's context, for a bpf_loop callback (`load_raw`).
    fn raw(&self) -> *mut c_void;
    /// `load` through the context `raw` returned.
    ///
    /// # Safety
    /// `raw` is this program run's context; `dst` has room for `len` bytes.
    unsafe fn load_raw(raw: *mut c_void, off: usize, dst: *mut u8, len: u32) -> Result<(), ()>;
    /// The chunked-body walk's bpf_loop callback for this hook (`chunked::walk`).
    fn chunk_step(&self) -> crate::scratch::LoopStep;
    /// Runs program `slot` of the hook's jump map on this packet (`stream::go_on`);
    /// returns only if the tail call failed.
    fn rerun(&self, slot: u32);
}

/// `n` (1..=max, `max` a power of two) in a form the verifier can bound: LLVM drops a
/// plain `n != 0` check it can prove (and a mask it can prove redundant), leaving the
/// helper a length of "0 or more", which Linux 6.1 rejects.
#[inline(always)]
pub fn copy_len(n: usize, max: usize) -> u32 {
    (((crate::scratch::opaque(n).wrapping_sub(1)) & (max - 1)) + 1) as u32
}

/// A helper's return code as a Result (0 is success).
#[inline(always)]
fn helper_ok(rc: i64) -> Result<(), ()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(())
    }
}

/// A pointer to a `T` at `off`, if the linear data holds it.
#[inline(always)]
pub fn ptr_at<T>(p: &impl Packet, off: usize) -> Result<*const T, ()> {
    // Header offsets may come through map memory (unknown to the verifier): bound them.
    if off > MAX_HEADER_OFFSET {
        return Err(());
    }
    let start = p.data();
    if start + off + size_of::<T>() > p.data_end() {
        return Err(());
    }
    Ok((start + off) as *const T)
}

#[inline(always)]
pub fn ptr_at_mut<T>(p: &impl Packet, off: usize) -> Result<*mut T, ()> {
    Ok(ptr_at::<T>(p, off)? as *mut T)
}

/// Bytes per block of `copy_in`'s direct copy.
const BLOCK: usize = 64;
/// The longest copy `copy_in` makes with plain loads and stores.
pub const DIRECT_COPY_MAX: usize = 1024;

/// Copies `len` (1..=max) bytes at header offset `off` into `dst`, as `Packet::load` does.
/// When the linear data holds them all and `len` is BLOCK..=DIRECT_COPY_MAX (a typical
/// request), with plain loads and stores, 64 bytes per bounds check, the last block
/// overlapping the one before: on a CPU where every return is expensive (SRSO "Safe
/// RET"), the helper's calls and returns cost more than copying a request. Anything else
/// (short, long or non-linear) goes through the helper.
#[inline(always)]
pub fn copy_in(p: &impl Packet, off: usize, dst: *mut u8, len: u32) -> Result<(), ()> {
    let n = len as usize;
    let base = p.data() + (off & HEADER_OFF_MASK);
    let end = p.data_end();
    if off <= HEADER_OFF_MASK && (BLOCK..=DIRECT_COPY_MAX).contains(&n) && base + n <= end {
        for i in 0..DIRECT_COPY_MAX / BLOCK - 1 {
            let o = i * BLOCK;
            if o + BLOCK >= n {
                break;
            }
            // SAFETY: `o` + 64 ≤ n ≤ DIRECT_COPY_MAX, inside the caller's buffer.
            if !copy_block(base + o, end, unsafe { dst.add(o) }) {
                return p.load(off, dst, len);
            }
        }
        let last = (n - BLOCK) & (DIRECT_COPY_MAX - 1);
        // SAFETY: as above.
        if copy_block(base + last, end, unsafe { dst.add(last) }) {
            return Ok(());
        }
    }
    p.load(off, dst, len)
}

/// Copies the 64 bytes at packet address `src` to `dst`, if they end by `end`.
#[inline(always)]
fn copy_block(src: usize, end: usize, dst: *mut u8) -> bool {
    // One register for the check and the loads: the verifier learns the bounds of the
    // pointer it compares (and of constant offsets from it), not of a sum LLVM rebuilds.
    let src = crate::scratch::opaque(src);
    if src + BLOCK > end {
        return false;
    }
    let (s, d) = (src as *const u64, dst as *mut u64);
    for k in 0..BLOCK / 8 {
        // SAFETY: `src..src + 64` is linear packet data (checked above); `dst` has room
        // for 64 bytes (the caller's buffer).
        unsafe { d.add(k).write_unaligned(s.add(k).read_unaligned()) };
    }
    true
}

pub struct Xdp<'a>(pub &'a XdpContext);

impl Packet for Xdp<'_> {
    type Ctx = XdpContext;
    #[inline(always)]
    fn ctx(&self) -> &XdpContext {
        self.0
    }
    #[inline(always)]
    fn data(&self) -> usize {
        self.0.data()
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        self.0.data_end()
    }
    #[inline(always)]
    fn len(&self) -> usize {
        // SAFETY: the context pointer comes from the kernel.
        unsafe { bpf_xdp_get_buff_len(self.0.ctx) as usize }
    }
    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: reading a field of the kernel-provided context.
        unsafe { (*self.0.ctx).ingress_ifindex }
    }
    #[inline(always)]
    fn load(&self, off: usize, dst: *mut u8, len: u32) -> Result<(), ()> {
        // SAFETY: dst points to at least `len` bytes (callers bound len by their buffer).
        let rc = unsafe { bpf_xdp_load_bytes(self.0.ctx, off as u32, dst as *mut c_void, len) };
        helper_ok(rc)
    }
    #[inline(always)]
    fn make_writable(&self, _len: u32) -> Result<(), ()> {
        Ok(())
    }
    #[inline(always)]
    fn raw(&self) -> *mut c_void {
        self.0.ctx as *mut c_void
    }
    #[inline(always)]
    unsafe fn load_raw(raw: *mut c_void, off: usize, dst: *mut u8, len: u32) -> Result<(), ()> {
        // SAFETY: the caller's contract.
        helper_ok(unsafe { bpf_xdp_load_bytes(raw as *mut _, off as u32, dst as *mut c_void, len) })
    }
    #[inline(always)]
    fn chunk_step(&self) -> crate::scratch::LoopStep {
        crate::chunked::step_xdp
    }
    #[inline(always)]
    fn rerun(&self, slot: u32) {
        // SAFETY: the slots hold this object's XDP programs (see `JUMP_XDP`).
        unsafe { crate::maps::JUMP_XDP.tail_call(self.0, slot) };
    }
    #[inline(always)]
    fn truncate(&self, len: usize) -> Result<(), ()> {
        let delta = len as i32 - self.len() as i32;
        // SAFETY: shrinking the frame by a negative delta the kernel validates.
        helper_ok(unsafe { bpf_xdp_adjust_tail(self.0.ctx, delta) })
    }
    #[inline(always)]
    fn store(&self, off: usize, src: *const u8, len: u32) -> Result<(), ()> {
        // SAFETY: `src` holds `len` bytes (callers bound len by their buffer); the helper
        // checks the packet's bounds.
        helper_ok(unsafe { bpf_xdp_store_bytes(self.0.ctx, off as u32, src as *mut c_void, len) })
    }
    #[inline(always)]
    fn grow_front(&self, delta: u32) -> Result<(), ()> {
        // SAFETY: the kernel validates the delta against the headroom.
        helper_ok(unsafe { bpf_xdp_adjust_head(self.0.ctx, -(delta as i32)) })
    }
}

pub struct Tc<'a>(pub &'a TcContext);

impl Packet for Tc<'_> {
    type Ctx = TcContext;
    #[inline(always)]
    fn ctx(&self) -> &TcContext {
        self.0
    }
    #[inline(always)]
    fn data(&self) -> usize {
        self.0.data()
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        self.0.data_end()
    }
    #[inline(always)]
    fn len(&self) -> usize {
        self.0.len() as usize
    }
    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: reading a field of the kernel-provided skb.
        unsafe { (*self.0.skb.skb).ifindex }
    }
    #[inline(always)]
    fn load(&self, off: usize, dst: *mut u8, len: u32) -> Result<(), ()> {
        // SAFETY: dst points to at least `len` bytes; the helper reads non-linear data too.
        let rc = unsafe {
            bpf_skb_load_bytes(
                self.0.skb.skb as *const c_void,
                off as u32,
                dst as *mut c_void,
                len,
            )
        };
        helper_ok(rc)
    }
    #[inline(always)]
    fn make_writable(&self, len: u32) -> Result<(), ()> {
        // SAFETY: the helper validates len against the skb.
        helper_ok(unsafe { bpf_skb_pull_data(self.0.skb.skb, len) })
    }
    #[inline(always)]
    fn raw(&self) -> *mut c_void {
        self.0.skb.skb as *mut c_void
    }
    #[inline(always)]
    unsafe fn load_raw(raw: *mut c_void, off: usize, dst: *mut u8, len: u32) -> Result<(), ()> {
        // SAFETY: the caller's contract.
        helper_ok(unsafe {
            bpf_skb_load_bytes(raw as *const c_void, off as u32, dst as *mut c_void, len)
        })
    }
    #[inline(always)]
    fn chunk_step(&self) -> crate::scratch::LoopStep {
        crate::chunked::step_tc
    }
    #[inline(always)]
    fn rerun(&self, slot: u32) {
        // SAFETY: the slots hold this object's TC programs (see `JUMP_TC`).
        unsafe { crate::maps::JUMP_TC.tail_call(self.0, slot) };
    }
    #[inline(always)]
    fn truncate(&self, len: usize) -> Result<(), ()> {
        // SAFETY: the helper validates len against the skb.
        helper_ok(unsafe { bpf_skb_change_tail(self.0.skb.skb, len as u32, 0) })
    }
    #[inline(always)]
    fn store(&self, off: usize, src: *const u8, len: u32) -> Result<(), ()> {
        // SAFETY: `src` holds `len` bytes; the helper checks the skb's bounds.
        helper_ok(unsafe {
            bpf_skb_store_bytes(self.0.skb.skb, off as u32, src as *const c_void, len, 0)
        })
    }
    #[inline(always)]
    fn grow_front(&self, _delta: u32) -> Result<(), ()> {
        // `truncate` (bpf_skb_change_tail) grows an skb as far as needed.
        Err(())
    }
}

/// Sends the (rewritten) skb out of `ifindex`; the TC counterpart of XDP_TX.
#[inline(always)]
pub fn tc_redirect(ifindex: u32) -> i32 {
    // SAFETY: plain helper call.
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}
