//! HTTP/1.x pieces both sides need: method bits (scopes and events) and character classes.

/// Method bits used by scopes (`Scope::methods`) and events (`Event::method`).
pub mod method {
    pub const GET: u32 = 1 << 0;
    pub const HEAD: u32 = 1 << 1;
    pub const POST: u32 = 1 << 2;
    pub const PUT: u32 = 1 << 3;
    pub const DELETE: u32 = 1 << 4;
    pub const PATCH: u32 = 1 << 5;
    pub const OPTIONS: u32 = 1 << 6;
    pub const CONNECT: u32 = 1 << 7;
    pub const TRACE: u32 = 1 << 8;
    /// Any other (extension) method token.
    pub const OTHER: u32 = 1 << 31;
    pub const ALL: u32 = u32::MAX;

    pub const NAMES: [(&str, u32); 9] = [
        ("GET", GET),
        ("HEAD", HEAD),
        ("POST", POST),
        ("PUT", PUT),
        ("DELETE", DELETE),
        ("PATCH", PATCH),
        ("OPTIONS", OPTIONS),
        ("CONNECT", CONNECT),
        ("TRACE", TRACE),
    ];

    pub fn from_name(name: &str) -> Option<u32> {
        NAMES.iter().find(|(n, _)| *n == name).map(|&(_, b)| b)
    }

    pub fn name(bit: u32) -> &'static str {
        NAMES
            .iter()
            .find(|&&(_, b)| b == bit)
            .map(|&(n, _)| n)
            .unwrap_or("OTHER")
    }
}

const fn word(s: &[u8]) -> u64 {
    let mut w = 0u64;
    let mut i = 0;
    while i < s.len() {
        w |= (s[i] as u64) << (8 * i);
        i += 1;
    }
    w
}

const fn mask(n: usize) -> u64 {
    if n >= 8 {
        u64::MAX
    } else {
        (1u64 << (8 * n)) - 1
    }
}

/// Known methods with their trailing SP, as little-endian words: `(word, length incl. SP, bit)`.
const KNOWN: [(u64, usize, u32); 9] = [
    (word(b"GET "), 4, method::GET),
    (word(b"POST "), 5, method::POST),
    (word(b"HEAD "), 5, method::HEAD),
    (word(b"PUT "), 4, method::PUT),
    (word(b"DELETE "), 7, method::DELETE),
    (word(b"PATCH "), 6, method::PATCH),
    (word(b"OPTIONS "), 8, method::OPTIONS),
    (word(b"CONNECT "), 8, method::CONNECT),
    (word(b"TRACE "), 6, method::TRACE),
];

/// Classifies the first 8 payload bytes (little-endian) of a segment: a known method
/// followed by SP gives `(bit, length including the SP)`.
#[inline(always)]
pub fn known_method(first8: u64) -> Option<(u32, usize)> {
    let mut i = 0;
    while i < KNOWN.len() {
        let (w, n, bit) = KNOWN[i];
        if first8 & mask(n) == w {
            return Some((bit, n));
        }
        i += 1;
    }
    None
}

/// RFC 9110 `tchar` (method and header-name characters).
#[inline(always)]
pub fn is_tchar(c: u8) -> bool {
    CLASS[c as usize] & TCHAR != 0
}

/// RFC 6750 `b64token` body character (`=` padding is handled separately).
#[inline(always)]
pub fn is_b64token(c: u8) -> bool {
    CLASS[c as usize] & B64 != 0
}

pub const TCHAR: u8 = 1;
pub const B64: u8 = 2;

/// Character classes, indexed by byte.
pub static CLASS: [u8; 256] = build_class();

const fn build_class() -> [u8; 256] {
    let mut t = [0u8; 256];
    let mut c = 0usize;
    while c < 256 {
        let b = c as u8;
        let alnum = b.is_ascii_alphanumeric();
        let mut v = 0;
        if alnum
            || matches!(
                b,
                b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+' | b'-'
            )
            || matches!(b, b'.' | b'^' | b'_' | b'`' | b'|' | b'~')
        {
            v |= TCHAR;
        }
        if alnum || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/') {
            v |= B64;
        }
        t[c] = v;
        c += 1;
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn first8(s: &[u8]) -> u64 {
        let mut b = [0u8; 8];
        let n = s.len().min(8);
        b[..n].copy_from_slice(&s[..n]);
        u64::from_le_bytes(b)
    }

    #[test]
    fn classifies_methods() {
        assert_eq!(known_method(first8(b"GET /x H")), Some((method::GET, 4)));
        assert_eq!(
            known_method(first8(b"OPTIONS ")),
            Some((method::OPTIONS, 8))
        );
        assert_eq!(known_method(first8(b"DELETE /")), Some((method::DELETE, 7)));
        assert_eq!(known_method(first8(b"GETX /a ")), None);
        assert_eq!(known_method(first8(b"get / HT")), None);
        assert_eq!(known_method(first8(b"\x16\x03\x01\x02\x00")), None);
    }

    #[test]
    fn character_classes() {
        for c in b"AZaz09-._~+/" {
            assert!(is_b64token(*c), "{}", *c as char);
        }
        for c in b" ,;=\"\r\n\t\x7f\x80" {
            assert!(!is_b64token(*c), "{c:#x}");
        }
        assert!(is_tchar(b'!') && !is_tchar(b':') && !is_tchar(b' '));
    }
}
