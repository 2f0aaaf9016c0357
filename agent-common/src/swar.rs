//! Byte tests on eight bytes at once (SIMD within a register), for the datapath's scans.
//!
//! A *mark* is 0x80 in a byte of the result, nothing else in it. Every test here is exact
//! for every byte (no carries from one byte into the next), which the tests below check
//! against the table-driven grammar in `http`, lane by lane.

/// 0x01 in every byte.
pub const ONES: u64 = 0x0101_0101_0101_0101;
/// 0x80 in every byte.
pub const HIGHS: u64 = 0x8080_8080_8080_8080;
/// 0x20 in every byte: `w | LOWER` lower-cases ASCII letters.
pub const LOWER: u64 = 0x2020_2020_2020_2020;

/// Marks every byte of `x` that is zero.
#[inline(always)]
pub fn zero_bytes(x: u64) -> u64 {
    !(((x & !HIGHS).wrapping_add(!HIGHS)) | x) & HIGHS
}

/// Marks every byte of `w` that is ≥ `c` (for bytes below 0x80; callers reject the rest).
#[inline(always)]
pub fn ge_bytes(w: u64, c: u8) -> u64 {
    ((w | HIGHS).wrapping_sub(ONES * c as u64)) & HIGHS
}

/// Marks every byte of `w` in `lo..=hi` (for bytes below 0x80).
#[inline(always)]
pub fn in_range(w: u64, lo: u8, hi: u8) -> u64 {
    ge_bytes(w, lo) & !ge_bytes(w, hi + 1) & HIGHS
}

/// Marks every byte of `w` equal to `c`.
#[inline(always)]
pub fn eq_bytes(w: u64, c: u8) -> u64 {
    zero_bytes(w ^ (ONES * c as u64))
}

/// Marks every byte of `w` that is a b64token body character: letters (one range once
/// lower-cased), `+ - . /` and digits (0x2B..=0x39 but ','), `_` and `~`.
#[inline(always)]
pub fn b64_bytes(w: u64) -> u64 {
    let ascii = !w & HIGHS;
    ascii
        & (in_range(w | LOWER, b'a', b'z')
            | (in_range(w, b'+', b'9') & !eq_bytes(w, b','))
            | eq_bytes(w, b'_')
            | eq_bytes(w, b'~'))
}

/// The index of the lowest marked byte of `m` (at least one marked). A multiply instead of
/// `trailing_zeros`, which BPF lowers to a table lookup: the lowest mark, moved to bit 8k,
/// shifts byte k of the constant (7, 6 .. 0 from the top) into the top byte.
#[inline(always)]
pub fn first_marked_byte(m: u64) -> usize {
    (((m & m.wrapping_neg()) >> 7).wrapping_mul(0x0001_0203_0405_0607) >> 56) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::is_b64token;

    /// Every byte value in every lane, the other lanes holding `fill`.
    fn lanes(fill: u8) -> impl Iterator<Item = (u8, usize, u64)> {
        (0..=255u8).flat_map(move |c| {
            (0..8).map(move |lane| {
                let mut b = [fill; 8];
                b[lane] = c;
                (c, lane, u64::from_le_bytes(b))
            })
        })
    }

    fn marked(m: u64, lane: usize) -> bool {
        (m >> (8 * lane)) & 0xff == 0x80
    }

    /// No bits but the marks.
    fn only_marks(m: u64) -> bool {
        m & !HIGHS == 0
    }

    #[test]
    fn zero_and_eq_bytes_are_exact() {
        for fill in [0u8, 1, b'\n', 0x80, 0xff] {
            for (c, lane, w) in lanes(fill) {
                let z = zero_bytes(w);
                assert!(only_marks(z));
                assert_eq!(
                    marked(z, lane),
                    c == 0,
                    "zero {c:#x} lane {lane} fill {fill:#x}"
                );
                for want in [b'\n', b'=', b'/', 0u8, 0x7f] {
                    let e = eq_bytes(w, want);
                    assert!(only_marks(e));
                    assert_eq!(marked(e, lane), c == want, "{c:#x} == {want:#x}");
                    // The other lanes are marked iff the fill is the byte looked for.
                    for other in (0..8).filter(|&o| o != lane) {
                        assert_eq!(marked(e, other), fill == want);
                    }
                }
            }
        }
    }

    #[test]
    fn in_range_matches_the_range_for_ascii() {
        for (c, lane, w) in lanes(b'x').filter(|(c, _, _)| *c < 0x80) {
            for (lo, hi) in [(b'a', b'z'), (b'+', b'9'), (b'0', b'9'), (0u8, 0x7e)] {
                let m = in_range(w, lo, hi);
                assert!(only_marks(m));
                assert_eq!(
                    marked(m, lane),
                    (lo..=hi).contains(&c),
                    "{c:#x} in {lo}..={hi}"
                );
            }
        }
    }

    #[test]
    fn b64_bytes_agree_with_the_grammar_table() {
        for fill in [b'A', b' ', 0x80, 0xff, b'='] {
            for (c, lane, w) in lanes(fill) {
                let m = b64_bytes(w);
                assert!(only_marks(m));
                assert_eq!(
                    marked(m, lane),
                    is_b64token(c),
                    "{c:#x} lane {lane} fill {fill:#x}"
                );
            }
        }
    }

    #[test]
    fn first_marked_byte_is_the_lowest_mark() {
        for k in 0..8 {
            let lowest = 0x80u64 << (8 * k);
            assert_eq!(first_marked_byte(lowest), k);
            // Marks above the lowest do not matter.
            let above = (HIGHS << (8 * k)) | lowest;
            assert_eq!(first_marked_byte(above), k);
        }
    }
}
