//! TCP resets for the `reset` action. The first denied segment of a connection is turned,
//! in place, into an RST to the server (so the upstream holds no half-open connection);
//! the segment is remembered (4-tuple and sequence number), and its retransmission by
//! the client is turned into an RST back to the client (XDP_TX / TC redirect), so
//! neither end hangs. Only that retransmission: a new connection on the same 4-tuple is
//! judged like any other.

use agent_common::SCAN_BYTES;
use aya_ebpf::helpers::generated::{bpf_ktime_get_boot_ns, bpf_ktime_get_coarse_ns};

use crate::{
    maps::{FlowKey, LAST_RESET, RESET_FLOWS, SCRATCH},
    packet::{ptr_at, ptr_at_mut, Packet},
    parse::{EthHdr, Flow, Ipv4Hdr, Ipv6Hdr, TcpHdr, TCP_ACK, TCP_RST},
};

/// How long a reset flow is remembered.
const RESET_MEMORY_NS: u64 = 30_000_000_000;
/// `LAST_RESET` is read with a coarse clock (a tick or so behind): this much more keeps
/// the lookup on for every flow still remembered.
const COARSE_SLACK_NS: u64 = 1_000_000_000;

pub enum Reset {
    /// The segment now carries an RST to the server: let it continue.
    ToServer,
    /// The segment now carries an RST to the client: send it back out.
    ToClient,
}

/// Writes the source and destination addresses (IPv4 as IPv4-mapped IPv6) into `s` and
/// `d`, a 32-bit word at a time: no temporaries on the nearly full stack, and nothing LLVM
/// turns into a `memset` call (which Linux 6.1's verifier rejects).
#[inline(always)]
pub fn write_addrs(
    p: &impl Packet,
    f: &Flow,
    s: &mut [u8; 16],
    d: &mut [u8; 16],
) -> Result<(), ()> {
    let (sp, dp) = (s.as_mut_ptr() as *mut u32, d.as_mut_ptr() as *mut u32);
    if f.ipv6 {
        let ip = ptr_at::<Ipv6Hdr>(p, f.l3_off)?;
        // SAFETY: bounds checked; destinations are 16 bytes.
        unsafe {
            let (src, dst) = (
                (*ip).saddr.as_ptr() as *const u32,
                (*ip).daddr.as_ptr() as *const u32,
            );
            for i in 0..4 {
                sp.add(i).write_unaligned(src.add(i).read_unaligned());
                dp.add(i).write_unaligned(dst.add(i).read_unaligned());
            }
        }
    } else {
        let ip = ptr_at::<Ipv4Hdr>(p, f.l3_off)?;
        // ::ffff:0:0/96, in memory order.
        let mapped = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
        // SAFETY: bounds checked; destinations are 16 bytes.
        unsafe {
            for (ptr, addr) in [(sp, &(*ip).saddr), (dp, &(*ip).daddr)] {
                core::ptr::write_volatile(ptr, 0);
                core::ptr::write_volatile(ptr.add(1), 0);
                ptr.add(2).write_unaligned(mapped);
                ptr.add(3).write_unaligned(u32::from_ne_bytes(*addr));
            }
        }
    }
    Ok(())
}

/// The segment's key, built in the scratch value (the stack is nearly full).
#[inline(always)]
fn flow_key(p: &impl Packet, f: &Flow) -> Result<&'static FlowKey, ()> {
    let scratch = SCRATCH.get_ptr_mut(0).ok_or(())?;
    // SAFETY: the per-CPU scratch map value, valid for this program run.
    let key = unsafe { &mut (*scratch).flow };
    crate::stream::write_flow_id(p, f, &mut key.id)?;
    // Network order, as earlier versions keyed pinned entries.
    key.seq = f.seq.to_be();
    Ok(key)
}

/// Whether some flow reset may still be remembered (see `LAST_RESET`). Unknown: yes.
#[inline(always)]
fn resets_remembered() -> bool {
    match LAST_RESET.get(0) {
        // SAFETY: plain helper call. A `LAST_RESET` ahead of the clock counts as now.
        Some(t) => {
            unsafe { bpf_ktime_get_coarse_ns() }.saturating_sub(*t)
                < RESET_MEMORY_NS + COARSE_SLACK_NS
        }
        None => true,
    }
}

/// Did this very segment (same 4-tuple and sequence number) recently make us reset the
/// connection's server side?
#[inline(always)]
fn recently_reset(key: &FlowKey, now: u64) -> bool {
    match RESET_FLOWS.get_ptr(key) {
        // SAFETY: map value pointer valid for this run.
        Some(t) => now.wrapping_sub(unsafe { *t }) < RESET_MEMORY_NS,
        None => false,
    }
}

/// True for a retransmission of a segment we already turned into an RST to the server.
#[inline(always)]
pub fn already_reset(p: &impl Packet, f: &Flow) -> bool {
    if !resets_remembered() {
        // Nothing reset for longer than a flow is remembered: no flow key, no lookup.
        return false;
    }
    match flow_key(p, f) {
        // SAFETY: plain helper call.
        Ok(key) => recently_reset(key, unsafe { bpf_ktime_get_boot_ns() }),
        Err(()) => false,
    }
}

#[inline(always)]
pub fn reset(p: &impl Packet, f: &Flow) -> Result<Reset, ()> {
    let key = flow_key(p, f)?;
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let to_client = recently_reset(key, now);
    if !to_client {
        RESET_FLOWS.insert(key, now, 0).map_err(|_| ())?;
        if let Some(t) = LAST_RESET.get_ptr_mut(0) {
            // SAFETY: map value pointer valid for this run. Racing CPUs each store a time
            // of this moment; whichever lands keeps the lookups on.
            unsafe { *t = bpf_ktime_get_coarse_ns() };
        }
    }
    let hdr_end = f.payload_off;
    if hdr_end > SCAN_BYTES {
        return Err(());
    }
    p.make_writable(hdr_end as u32)?;
    p.truncate(hdr_end)?;
    let tcp = ptr_at_mut::<TcpHdr>(p, f.l4_off)?;
    let tcp_len = (f.payload_off - f.l4_off) as u16;
    // SAFETY: bounds checked after the truncation (earlier pointers are stale).
    unsafe {
        if to_client {
            let seq = (*tcp).seq;
            (*tcp).seq = (*tcp).ack;
            (*tcp).ack = (u32::from_be(seq).wrapping_add(f.payload_len as u32)).to_be();
            core::mem::swap(&mut (*tcp).sport, &mut (*tcp).dport);
        }
        (*tcp).off_flags[1] = TCP_RST | TCP_ACK;
        (*tcp).window = 0;
        (*tcp).urg = 0;
        (*tcp).check = 0;
    }
    if to_client {
        let eth = ptr_at_mut::<EthHdr>(p, 0)?;
        // SAFETY: bounds checked.
        unsafe { core::mem::swap(&mut (*eth).src, &mut (*eth).dst) };
    }
    let mut sum: u64;
    if f.ipv6 {
        let ip = ptr_at_mut::<Ipv6Hdr>(p, f.l3_off)?;
        // SAFETY: bounds checked.
        unsafe {
            if to_client {
                core::mem::swap(&mut (*ip).saddr, &mut (*ip).daddr);
                (*ip).hop_limit = 64;
            }
            (*ip).payload_len = ((f.payload_off - f.l3_off - 40) as u16).to_be();
            sum = sum_words(&(*ip).saddr) + sum_words(&(*ip).daddr);
        }
    } else {
        let ip = ptr_at_mut::<Ipv4Hdr>(p, f.l3_off)?;
        let ihl = f.l4_off - f.l3_off;
        // SAFETY: bounds checked.
        unsafe {
            if to_client {
                core::mem::swap(&mut (*ip).saddr, &mut (*ip).daddr);
                (*ip).ttl = 64;
            }
            (*ip).tot_len = ((f.payload_off - f.l3_off) as u16).to_be();
            (*ip).check = 0;
            sum = sum_words(&(*ip).saddr) + sum_words(&(*ip).daddr);
        }
        let ipsum = csum_region(p, f.l3_off, ihl)?;
        // SAFETY: bounds checked above; pointer still valid (no helper call in between).
        unsafe { (*ip).check = fold(ipsum) };
    }
    sum += (6u16).to_be() as u64 + tcp_len.to_be() as u64;
    sum += csum_region(p, f.l4_off, tcp_len as usize)?;
    let tcp = ptr_at_mut::<TcpHdr>(p, f.l4_off)?;
    // SAFETY: bounds checked.
    unsafe { (*tcp).check = fold(sum) };
    Ok(if to_client {
        Reset::ToClient
    } else {
        Reset::ToServer
    })
}

#[inline(always)]
pub fn sum_words<const N: usize>(b: &[u8; N]) -> u64 {
    let mut s = 0u64;
    let mut i = 0;
    while i + 1 < N {
        s += u16::from_ne_bytes([b[i], b[i + 1]]) as u64;
        i += 2;
    }
    s
}

/// One's-complement sum of `len` (even, ≤ 60) header bytes at `off`.
#[inline(always)]
pub fn csum_region(p: &impl Packet, off: usize, len: usize) -> Result<u64, ()> {
    let mut s = 0u64;
    for i in 0..30 {
        if i * 2 >= len {
            break;
        }
        let w = ptr_at::<u16>(p, off + i * 2)?;
        // SAFETY: bounds checked.
        s += unsafe { *w } as u64;
    }
    Ok(s)
}

#[inline(always)]
pub fn fold(mut s: u64) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}
