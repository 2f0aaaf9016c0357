//! The benchmark's floor (`cargo xtask bench datapath`, never attached): the least work
//! any implementation of an allowed request must do, written for speed and free of every
//! obligation the product has. It finds the LFs of the whole payload (one exact SWAR test
//! per word, nothing done per LF), hashes the token with SipHash-2-4-128 straight from
//! packet memory, and looks the fingerprint up in TOKENS: no copy, no request-line or
//! header grammar, no revocation, expiry, scope or ramp, no counters.
//!
//! Host-only, like the bench: Linux 6.1's verifier rejects its packet-pointer arithmetic.
//!
//! The bench frame is an IPv4/TCP frame without options whose TCP window field holds the
//! token's offset in the payload and whose urgent pointer holds its length.

use agent_common::{
    siphash::Sip128, Fingerprint, GlobalConfig, TokenInfo, DEFAULT_MAX_TOKENS, MAX_TOKEN_LEN,
};
use aya_ebpf::{
    bindings::xdp_action,
    macros::map,
    maps::{Array, HashMap},
    programs::XdpContext,
};

/// The fingerprint key, as the product's `CONFIG` holds it (only `key` is read). Written
/// by the bench.
#[map]
static CONFIG: Array<GlobalConfig> = Array::with_max_entries(1, 0);

/// Fingerprint → token, the product's `TOKENS` in key, value and flags, so the floor's
/// lookup costs what the product's does. Written by the bench. Set at load (as large as
/// the product's beside it).
#[map]
static TOKENS: HashMap<Fingerprint, TokenInfo> = HashMap::with_max_entries(DEFAULT_MAX_TOKENS, 0);

/// Ethernet, IPv4 and TCP headers without options.
const PAYLOAD: usize = 14 + 20 + 20;
const WINDOW: usize = 14 + 20 + 14;
const URGENT: usize = 14 + 20 + 18;
const LFS: u64 = 0x0a0a_0a0a_0a0a_0a0a;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// XDP_PASS when the token is known, XDP_DROP when not, XDP_ABORTED on a frame of the
/// wrong shape: the bench checks the answer, so the work cannot go missing.
#[inline(always)]
pub fn run(ctx: &XdpContext) -> u32 {
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + PAYLOAD > end {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: inside the bounds checked above.
    let (off, len) = unsafe {
        (
            u16::from_be(*((data + WINDOW) as *const u16)) as usize,
            u16::from_be(*((data + URGENT) as *const u16)) as usize,
        )
    };
    let (off, len) = (off & 2047, len & (MAX_TOKEN_LEN * 2 - 1));
    if len == 0 || len > MAX_TOKEN_LEN {
        return xdp_action::XDP_ABORTED;
    }
    // Every LF of the payload, exactly: the header block must be read to its end (a
    // second Authorization field, an obs-fold), so no implementation skips it.
    let mut lfs = 0u64;
    let mut p = data + PAYLOAD;
    for _ in 0..1500 / 8 {
        if p + 8 > end {
            break;
        }
        // SAFETY: bounds checked.
        let x = unsafe { (p as *const u64).read_unaligned() } ^ LFS;
        lfs |= !(((x & !HIGHS).wrapping_add(!HIGHS)) | x) & HIGHS;
        p += 8;
    }
    let Some(cfg) = CONFIG.get(0) else {
        return xdp_action::XDP_ABORTED;
    };
    let tok = data + PAYLOAD + off;
    let mut sip = Sip128::new(&cfg.key);
    let mut i = 0;
    for _ in 0..MAX_TOKEN_LEN / 8 {
        if i + 8 > len {
            break;
        }
        if tok + i + 8 > end {
            return xdp_action::XDP_ABORTED;
        }
        // SAFETY: bounds checked.
        sip.write_word(unsafe { ((tok + i) as *const u64).read_unaligned() });
        i += 8;
    }
    // The token is followed by at least CRLF CRLF, so the tail word is in the frame.
    if tok + i + 8 > end {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: bounds checked.
    let tail = unsafe { ((tok + i) as *const u64).read_unaligned() }
        & agent_common::siphash::low_bytes_mask(len % 8);
    let fp = sip.finish(tail, len);
    if lfs == 0 {
        return xdp_action::XDP_ABORTED;
    }
    if TOKENS.get_ptr(fp).is_some() {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    }
}
