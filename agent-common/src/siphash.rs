//! SipHash-2-4 with 128-bit output: the token fingerprint.
//!
//! Written word-at-a-time so the eBPF program can feed it 8-byte loads from its scratch
//! buffer; `fingerprint()` is the byte-slice form userspace uses. Both go through the same
//! `Sip128` state, so kernel and userspace cannot drift apart.

use crate::types::{Fingerprint, FingerprintKey};

#[derive(Clone, Copy)]
pub struct Sip128 {
    v0: u64,
    v1: u64,
    v2: u64,
    v3: u64,
}

#[inline(always)]
fn rotl(x: u64, b: u32) -> u64 {
    x.rotate_left(b)
}

impl Sip128 {
    #[inline(always)]
    pub fn new(key: &FingerprintKey) -> Self {
        let [k0, k1] = key.0;
        Sip128 {
            v0: k0 ^ 0x736f_6d65_7073_6575,
            // The 128-bit variant flips 0xee into v1.
            v1: k1 ^ 0x646f_7261_6e64_6f6d ^ 0xee,
            v2: k0 ^ 0x6c79_6765_6e65_7261,
            v3: k1 ^ 0x7465_6462_7974_6573,
        }
    }

    #[inline(always)]
    fn round(&mut self) {
        self.v0 = self.v0.wrapping_add(self.v1);
        self.v1 = rotl(self.v1, 13) ^ self.v0;
        self.v0 = rotl(self.v0, 32);
        self.v2 = self.v2.wrapping_add(self.v3);
        self.v3 = rotl(self.v3, 16) ^ self.v2;
        self.v0 = self.v0.wrapping_add(self.v3);
        self.v3 = rotl(self.v3, 21) ^ self.v0;
        self.v2 = self.v2.wrapping_add(self.v1);
        self.v1 = rotl(self.v1, 17) ^ self.v2;
        self.v2 = rotl(self.v2, 32);
    }

    /// Absorbs one full 8-byte block (little-endian).
    #[inline(always)]
    pub fn write_word(&mut self, m: u64) {
        self.v3 ^= m;
        self.round();
        self.round();
        self.v0 ^= m;
    }

    /// Absorbs the final partial block (`tail` holds the last `len % 8` bytes, little-endian,
    /// upper bytes zero) and returns the fingerprint of a message of `len` bytes.
    #[inline(always)]
    pub fn finish(mut self, tail: u64, len: usize) -> Fingerprint {
        let b = ((len as u64) << 56) | tail;
        self.write_word(b);
        self.v2 ^= 0xee;
        self.round();
        self.round();
        self.round();
        self.round();
        let h1 = self.v0 ^ self.v1 ^ self.v2 ^ self.v3;
        self.v1 ^= 0xdd;
        self.round();
        self.round();
        self.round();
        self.round();
        let h2 = self.v0 ^ self.v1 ^ self.v2 ^ self.v3;
        Fingerprint([h1, h2])
    }
}

/// Mask keeping the low `n` bytes of a little-endian word (`n` in 0..8).
#[inline(always)]
pub fn low_bytes_mask(n: usize) -> u64 {
    if n == 0 {
        0
    } else {
        u64::MAX >> (64 - 8 * n as u32)
    }
}

/// The fingerprint of `token` under `key`.
pub fn fingerprint(key: &FingerprintKey, token: &[u8]) -> Fingerprint {
    let mut s = Sip128::new(key);
    let mut chunks = token.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        s.write_word(u64::from_le_bytes(w));
    }
    let rest = chunks.remainder();
    let mut w = [0u8; 8];
    w[..rest.len()].copy_from_slice(rest);
    s.finish(u64::from_le_bytes(w), token.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(key: &FingerprintKey, data: &[u8]) -> [u8; 16] {
        let mut k = [0u8; 16];
        k[..8].copy_from_slice(&key.0[0].to_le_bytes());
        k[8..].copy_from_slice(&key.0[1].to_le_bytes());
        use core::hash::Hasher as _;
        let mut h = siphasher::sip128::SipHasher24::new_with_key(&k);
        h.write(data);
        siphasher::sip128::Hasher128::finish128(&h).as_bytes()
    }

    fn ours(key: &FingerprintKey, data: &[u8]) -> [u8; 16] {
        let f = fingerprint(key, data);
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&f.0[0].to_le_bytes());
        out[8..].copy_from_slice(&f.0[1].to_le_bytes());
        out
    }

    #[test]
    fn matches_reference_vectors() {
        // The SipHash paper's key 00..0f and messages 00..(n-1).
        let key = FingerprintKey([
            u64::from_le_bytes([0, 1, 2, 3, 4, 5, 6, 7]),
            u64::from_le_bytes([8, 9, 10, 11, 12, 13, 14, 15]),
        ]);
        let msg: [u8; 64] = core::array::from_fn(|i| i as u8);
        // First vector of the reference implementation's vectors_sip128.
        assert_eq!(
            ours(&key, &[]),
            [
                0xa3, 0x81, 0x7f, 0x04, 0xba, 0x25, 0xa8, 0xe6, 0x6d, 0xf6, 0x72, 0x14, 0xc7, 0x55,
                0x02, 0x93
            ]
        );
        for n in 0..64 {
            assert_eq!(ours(&key, &msg[..n]), reference(&key, &msg[..n]), "len {n}");
        }
    }

    #[test]
    fn random_keys_and_lengths_match_reference() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut buf = [0u8; 300];
        for _ in 0..500 {
            let key = FingerprintKey([rng.gen(), rng.gen()]);
            let n = rng.gen_range(0..buf.len());
            rng.fill(&mut buf[..n]);
            assert_eq!(ours(&key, &buf[..n]), reference(&key, &buf[..n]));
        }
    }

    #[test]
    fn low_bytes_mask_keeps_n_bytes() {
        assert_eq!(low_bytes_mask(0), 0);
        assert_eq!(low_bytes_mask(1), 0xff);
        assert_eq!(low_bytes_mask(7), 0x00ff_ffff_ffff_ffff);
    }
}
