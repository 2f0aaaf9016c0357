//! Builds test frames: Ethernet (optional 802.1ad/802.1Q tags) → IPv4 (optional options) or
//! IPv6 (optional extension headers) → TCP (optional options) → payload, with valid lengths
//! and checksums. Also a small HTTP request builder.

use std::net::{Ipv4Addr, Ipv6Addr};

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const SERVER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 203, 9, 1);
pub const SERVER_V4: Ipv4Addr = Ipv4Addr::new(10, 203, 9, 2);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x203, 9, 0, 0, 0, 0, 1);
pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x203, 9, 0, 0, 0, 0, 2);

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_RST: u8 = 0x04;

#[derive(Clone, Debug)]
pub struct Frame {
    /// TPIDs of the VLAN tags, outermost first (0x88a8 / 0x8100).
    pub vlans: Vec<u16>,
    pub ipv6: bool,
    /// IPv4 options (padded to 4 bytes).
    pub ip_options: Vec<u8>,
    /// IPv6 extension headers before TCP, by next-header value (0, 43, 60), 8 bytes each.
    pub ipv6_ext: Vec<u8>,
    /// Protocol number (6 = TCP, 17 = UDP).
    pub protocol: u8,
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub tcp_options: Vec<u8>,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn tcp(dport: u16, payload: &[u8]) -> Frame {
        Frame {
            vlans: Vec::new(),
            ipv6: false,
            ip_options: Vec::new(),
            ipv6_ext: Vec::new(),
            protocol: 6,
            sport: 40000,
            dport,
            seq: 1000,
            ack: 5000,
            flags: TCP_ACK | TCP_PSH,
            tcp_options: Vec::new(),
            payload: payload.to_vec(),
        }
    }

    pub fn v6(mut self) -> Self {
        self.ipv6 = true;
        self
    }

    pub fn vlan(mut self, tpid: u16) -> Self {
        self.vlans.push(tpid);
        self
    }

    pub fn build(&self) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&SERVER_MAC);
        f.extend_from_slice(&CLIENT_MAC);
        for (i, tpid) in self.vlans.iter().enumerate() {
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&(100 + i as u16).to_be_bytes());
        }
        f.extend_from_slice(&(if self.ipv6 { 0x86ddu16 } else { 0x0800 }).to_be_bytes());

        let l4 = self.l4();
        if self.ipv6 {
            let mut ext = Vec::new();
            let mut next = self.protocol;
            // Built back to front so each header names the one after it.
            for kind in self.ipv6_ext.iter().rev() {
                let mut h = vec![next, 0, 0, 0, 0, 0, 0, 0];
                h.extend(ext);
                ext = h;
                next = *kind;
            }
            f.extend_from_slice(&0x6000_0000u32.to_be_bytes());
            f.extend_from_slice(&((ext.len() + l4.len()) as u16).to_be_bytes());
            f.push(next);
            f.push(64);
            f.extend_from_slice(&CLIENT_V6.octets());
            f.extend_from_slice(&SERVER_V6.octets());
            f.extend(ext);
        } else {
            let mut opts = self.ip_options.clone();
            while !opts.len().is_multiple_of(4) {
                opts.push(0);
            }
            let ihl = (20 + opts.len()) / 4;
            let mut h = vec![0x40 | ihl as u8, 0];
            h.extend_from_slice(&((ihl * 4 + l4.len()) as u16).to_be_bytes());
            h.extend_from_slice(&[0, 1, 0x40, 0, 64, self.protocol, 0, 0]);
            h.extend_from_slice(&CLIENT_V4.octets());
            h.extend_from_slice(&SERVER_V4.octets());
            h.extend(opts);
            let c = checksum(&h, 0);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            f.extend(h);
        }
        f.extend(l4);
        f
    }

    fn l4(&self) -> Vec<u8> {
        if self.protocol != 6 {
            let mut u = Vec::new();
            u.extend_from_slice(&self.sport.to_be_bytes());
            u.extend_from_slice(&self.dport.to_be_bytes());
            u.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
            u.extend_from_slice(&[0, 0]);
            u.extend_from_slice(&self.payload);
            return u;
        }
        let mut opts = self.tcp_options.clone();
        while !opts.len().is_multiple_of(4) {
            opts.push(1);
        }
        let doff = (20 + opts.len()) / 4;
        let mut t = Vec::new();
        t.extend_from_slice(&self.sport.to_be_bytes());
        t.extend_from_slice(&self.dport.to_be_bytes());
        t.extend_from_slice(&self.seq.to_be_bytes());
        t.extend_from_slice(&self.ack.to_be_bytes());
        t.push((doff as u8) << 4);
        t.push(self.flags);
        t.extend_from_slice(&65535u16.to_be_bytes());
        t.extend_from_slice(&[0, 0, 0, 0]);
        t.extend(opts);
        t.extend_from_slice(&self.payload);
        let c = tcp_checksum(self.ipv6, &t);
        t[16..18].copy_from_slice(&c.to_be_bytes());
        t
    }
}

fn tcp_checksum(ipv6: bool, seg: &[u8]) -> u16 {
    let mut pseudo = Vec::new();
    if ipv6 {
        pseudo.extend_from_slice(&CLIENT_V6.octets());
        pseudo.extend_from_slice(&SERVER_V6.octets());
        pseudo.extend_from_slice(&(seg.len() as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 6]);
    } else {
        pseudo.extend_from_slice(&CLIENT_V4.octets());
        pseudo.extend_from_slice(&SERVER_V4.octets());
        pseudo.extend_from_slice(&[0, 6]);
        pseudo.extend_from_slice(&(seg.len() as u16).to_be_bytes());
    }
    checksum(seg, sum(&pseudo))
}

fn sum(b: &[u8]) -> u32 {
    b.chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum()
}

/// Internet checksum of `b` with an initial partial sum.
pub fn checksum(b: &[u8], initial: u32) -> u16 {
    let mut s = initial as u64 + sum(b) as u64;
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// The client SYN that opened the connection of TCP `frame` (any layout `Frame` builds):
/// the same headers, no payload, flags SYN, sequence number one before the frame's, with
/// lengths and checksums made right. `None` for a frame that is not TCP.
pub fn syn_of(frame: &[u8]) -> Option<Vec<u8>> {
    let mut off = 12;
    let mut proto = u16::from_be_bytes([frame[off], frame[off + 1]]);
    while proto == 0x8100 || proto == 0x88a8 {
        off += 4;
        proto = u16::from_be_bytes([frame[off], frame[off + 1]]);
    }
    let l3 = off + 2;
    let (tcp, ipv6) = match proto {
        0x0800 => {
            let ihl = ((frame[l3] & 0x0f) as usize) * 4;
            if frame[l3 + 9] != 6 {
                return None;
            }
            (l3 + ihl, false)
        }
        0x86dd => {
            let mut next = frame[l3 + 6];
            let mut at = l3 + 40;
            while matches!(next, 0 | 43 | 60) {
                next = frame[at];
                at += (frame[at + 1] as usize + 1) * 8;
            }
            if next != 6 {
                return None;
            }
            (at, true)
        }
        _ => return None,
    };
    let doff = ((frame[tcp + 12] >> 4) as usize) * 4;
    let mut f = frame[..tcp + doff].to_vec();
    let seq = u32::from_be_bytes(f[tcp + 4..tcp + 8].try_into().unwrap()).wrapping_sub(1);
    f[tcp + 4..tcp + 8].copy_from_slice(&seq.to_be_bytes());
    f[tcp + 8..tcp + 12].copy_from_slice(&[0; 4]);
    f[tcp + 13] = TCP_SYN;
    f[tcp + 16..tcp + 18].copy_from_slice(&[0, 0]);
    let (src, dst) = if ipv6 {
        let plen = (f.len() - l3 - 40) as u16;
        f[l3 + 4..l3 + 6].copy_from_slice(&plen.to_be_bytes());
        (f[l3 + 8..l3 + 24].to_vec(), f[l3 + 24..l3 + 40].to_vec())
    } else {
        let tot = (f.len() - l3) as u16;
        f[l3 + 2..l3 + 4].copy_from_slice(&tot.to_be_bytes());
        f[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
        let c = checksum(&f[l3..tcp], 0);
        f[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
        (f[l3 + 12..l3 + 16].to_vec(), f[l3 + 16..l3 + 20].to_vec())
    };
    let seg_len = f.len() - tcp;
    let mut pseudo = src;
    pseudo.extend_from_slice(&dst);
    if ipv6 {
        pseudo.extend_from_slice(&(seg_len as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 6]);
    } else {
        pseudo.extend_from_slice(&[0, 6]);
        pseudo.extend_from_slice(&(seg_len as u16).to_be_bytes());
    }
    let c = checksum(&f[tcp..], sum(&pseudo));
    f[tcp + 16..tcp + 18].copy_from_slice(&c.to_be_bytes());
    Some(f)
}

/// True when the TCP checksum of a parsed IPv4/IPv6 frame (no VLAN tags) verifies,
/// using the frame's own addresses.
pub fn tcp_checksum_ok(frame: &[u8]) -> bool {
    let ipv6 = u16::from_be_bytes([frame[12], frame[13]]) == 0x86dd;
    let (src, dst, l4) = if ipv6 {
        (&frame[22..38], &frame[38..54], &frame[54..])
    } else {
        let ihl = ((frame[14] & 0x0f) as usize) * 4;
        let tot = u16::from_be_bytes([frame[16], frame[17]]) as usize;
        (&frame[26..30], &frame[30..34], &frame[14 + ihl..14 + tot])
    };
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(src);
    pseudo.extend_from_slice(dst);
    if ipv6 {
        pseudo.extend_from_slice(&(l4.len() as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 6]);
    } else {
        pseudo.extend_from_slice(&[0, 6]);
        pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    }
    checksum(l4, sum(&pseudo)) == 0
}

/// An HTTP/1.1 request: request line, headers in order, empty line, no body.
pub struct Http {
    pub method: String,
    pub target: String,
    pub version: String,
    pub headers: Vec<String>,
    /// Leave off the final empty line (an unfinished header block).
    pub unterminated: bool,
}

impl Http {
    pub fn get(target: &str) -> Http {
        Http {
            method: "GET".into(),
            target: target.into(),
            version: "HTTP/1.1".into(),
            headers: vec!["Host: api.example".into()],
            unterminated: false,
        }
    }

    pub fn method(mut self, m: &str) -> Self {
        self.method = m.into();
        self
    }

    pub fn header(mut self, h: &str) -> Self {
        self.headers.push(h.into());
        self
    }

    pub fn bearer(self, token: &str) -> Self {
        self.header(&format!("Authorization: Bearer {token}"))
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut s = format!("{} {} {}\r\n", self.method, self.target, self.version);
        for h in &self.headers {
            s.push_str(h);
            s.push_str("\r\n");
        }
        if !self.unterminated {
            s.push_str("\r\n");
        }
        s.into_bytes()
    }
}

/// A typical browser/API-client header block of about 400 bytes, with the bearer header
/// 4th, as in the datapath benchmark.
pub fn typical_request(token: &str) -> Vec<u8> {
    Http::get("/v1/reports/2026/q3?format=json")
        .header("User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/126.0")
        .header("Accept: application/json, text/plain;q=0.9, */*;q=0.8")
        .bearer(token)
        .header("Accept-Encoding: gzip, deflate, br")
        .header("Accept-Language: en-GB,en;q=0.9")
        .header("X-Request-Id: 6f1c2b7e-90a4-4c1d-9a55-0b7d3c2e11aa")
        .header("Cookie: session=Zm9vYmFyYmF6cXV4; theme=dark; consent=1")
        .header("Connection: keep-alive")
        .bytes()
}
