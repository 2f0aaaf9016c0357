//! Ethernet (up to two VLAN tags) → IPv4 (with options) / IPv6 (with extension headers)
//! → TCP (with options). Finds where the TCP payload starts and how long it is.

use crate::packet::{ptr_at, Packet};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;
const MAX_VLAN_TAGS: usize = 2;
const MAX_IPV6_EXT: usize = 4;

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub proto: u16,
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub ver_ihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
}

#[repr(C)]
pub struct Ipv6Hdr {
    pub ver_tc_flow: u32,
    pub payload_len: u16,
    pub next: u8,
    pub hop_limit: u8,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

#[repr(C)]
pub struct TcpHdr {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    /// Data offset (high nibble of the first byte) and flags (second byte).
    pub off_flags: [u8; 2],
    pub window: u16,
    pub check: u16,
    pub urg: u16,
}

pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Where a TCP segment's parts are, and its ports (host order).
#[derive(Clone, Copy)]
pub struct Flow {
    pub ipv6: bool,
    pub l3_off: usize,
    pub l4_off: usize,
    pub payload_off: usize,
    pub payload_len: usize,
    pub sport: u16,
    pub dport: u16,
    /// The segment's sequence number (host order).
    pub seq: u32,
    /// TCP flags (`TCP_*`).
    pub flags: u8,
}

/// `Ok(None)`: not TCP, or a non-first fragment — not ours to judge.
/// `Err`: headers truncated or inconsistent before we know whose traffic it is; the
/// caller passes it on to the stack, which validates and drops it.
#[inline(always)]
pub fn parse(p: &impl Packet) -> Result<Option<Flow>, ()> {
    let eth = ptr_at::<EthHdr>(p, 0)?;
    // SAFETY: ptr_at checked the bounds.
    let mut proto = u16::from_be(unsafe { (*eth).proto });
    let mut off = ETH_HLEN;
    for _ in 0..MAX_VLAN_TAGS {
        if proto != ETH_P_8021Q && proto != ETH_P_8021AD {
            break;
        }
        let inner = ptr_at::<[u16; 2]>(p, off)?;
        // SAFETY: bounds checked.
        proto = u16::from_be(unsafe { (*inner)[1] });
        off += 4;
    }
    let l3_off = off;
    let (ipv6, l4_off, l4_len) = match proto {
        ETH_P_IP => {
            let ip = ptr_at::<Ipv4Hdr>(p, off)?;
            // SAFETY: bounds checked.
            let (vihl, proto, frag, tot) = unsafe {
                (
                    (*ip).ver_ihl,
                    (*ip).proto,
                    u16::from_be((*ip).frag_off),
                    u16::from_be((*ip).tot_len) as usize,
                )
            };
            let ihl = ((vihl & 0x0f) as usize) * 4;
            if vihl >> 4 != 4 || ihl < 20 || tot < ihl {
                return Err(());
            }
            // Fragment offset ≠ 0: no TCP header here. The first fragment is judged.
            if proto != IPPROTO_TCP || frag & 0x1fff != 0 {
                return Ok(None);
            }
            (false, off + ihl, tot - ihl)
        }
        ETH_P_IPV6 => {
            let ip = ptr_at::<Ipv6Hdr>(p, off)?;
            // SAFETY: bounds checked.
            let (mut next, plen) =
                unsafe { ((*ip).next, u16::from_be((*ip).payload_len) as usize) };
            let mut l4 = off + 40;
            let mut ext_len = 0usize;
            for _ in 0..MAX_IPV6_EXT {
                match next {
                    // Hop-by-hop, routing, destination options: (len + 1) × 8 bytes.
                    0 | 43 | 60 => {
                        let h = ptr_at::<[u8; 2]>(p, l4)?;
                        // SAFETY: bounds checked.
                        let (n, l) = unsafe { ((*h)[0], (*h)[1]) };
                        let len = (l as usize + 1) * 8;
                        next = n;
                        l4 += len;
                        ext_len += len;
                    }
                    // Fragment header: judge the first fragment only.
                    44 => {
                        let h = ptr_at::<[u8; 4]>(p, l4)?;
                        // SAFETY: bounds checked.
                        let (n, fo) = unsafe { ((*h)[0], u16::from_be_bytes([(*h)[2], (*h)[3]])) };
                        if fo & 0xfff8 != 0 {
                            return Ok(None);
                        }
                        next = n;
                        l4 += 8;
                        ext_len += 8;
                    }
                    _ => break,
                }
            }
            if next != IPPROTO_TCP {
                return Ok(None);
            }
            if plen < ext_len {
                return Err(());
            }
            (true, l4, plen - ext_len)
        }
        _ => return Ok(None),
    };
    let tcp = ptr_at::<TcpHdr>(p, l4_off)?;
    // SAFETY: bounds checked.
    let (sport, dport, off_flags, seq) = unsafe {
        (
            u16::from_be((*tcp).sport),
            u16::from_be((*tcp).dport),
            (*tcp).off_flags,
            u32::from_be((*tcp).seq),
        )
    };
    let doff = ((off_flags[0] >> 4) as usize) * 4;
    if doff < 20 || l4_len < doff {
        return Err(());
    }
    let payload_off = l4_off + doff;
    Ok(Some(Flow {
        ipv6,
        l3_off,
        l4_off,
        payload_off,
        // The IP length, not the frame length: Ethernet may pad short frames.
        payload_len: l4_len - doff,
        sport,
        dport,
        seq,
        flags: off_flags[1],
    }))
}
