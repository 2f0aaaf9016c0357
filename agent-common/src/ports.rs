//! `PORTS` words: how a TCP destination port is judged, in one 64-bit word per port.
//!
//! The datapath reads a port's word with one array load. Most ports have at most one
//! listener, and the word then holds that listener whole (interface and config), so the
//! request needs no `LISTENERS` hash lookup. Userspace derives each word from `LISTENERS`
//! and replaces it with one atomic store (the map is mmapped), so the datapath never sees
//! a word half old, half new.
//!
//! Layout, from bit 0: interface index (32 bits, 0 = every interface), listener id (6),
//! 2 spare, then 2 bits each for mode, action, on_missing, on_unknown, on_incomplete and
//! on_not_http, then max_header_kib (5 bits); bit 62 `OTHERS`, bit 63 `LISTENER`. A word
//! of 0: no listener on this port.

use crate::{ListenerConfig, ListenerKey};

/// The word holds a listener (interface and config).
pub const LISTENER: u64 = 1 << 63;
/// `LISTENERS` has listeners of this port that the word does not hold: a packet on an
/// interface the word does not name is looked up there.
pub const OTHERS: u64 = 1 << 62;

const ID_BITS: u32 = 6;
const FIELD_BITS: u32 = 2;
const CONFIG_SHIFT: u32 = 32;
const FIELDS_SHIFT: u32 = CONFIG_SHIFT + 8;
const HEADER_KIB_BITS: u32 = 5;
const HEADER_KIB_SHIFT: u32 = FIELDS_SHIFT + FIELD_BITS * 6;

/// Where a packet's listener is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortListener {
    /// No listener judges this packet.
    None,
    /// The word's listener.
    Here(ListenerConfig),
    /// Look in `LISTENERS`: (ifindex, port), then (0, port).
    Lookup,
}

/// The word holding `key`'s listener, if its config fits (every config the daemon
/// writes does; one that does not is left to the `LISTENERS` lookup).
pub fn pack(key: &ListenerKey, cfg: &ListenerConfig) -> Option<u64> {
    let fields = [
        cfg.mode,
        cfg.action,
        cfg.on_missing,
        cfg.on_unknown,
        cfg.on_incomplete,
        cfg.on_not_http,
    ];
    if cfg.id >= 1 << ID_BITS
        || fields.iter().any(|f| u32::from(*f) >= 1 << FIELD_BITS)
        || u32::from(cfg.max_header_kib) >= 1 << HEADER_KIB_BITS
    {
        return None;
    }
    let mut w = LISTENER | u64::from(key.ifindex) | u64::from(cfg.id) << CONFIG_SHIFT;
    for (i, f) in fields.iter().enumerate() {
        w |= u64::from(*f) << (FIELDS_SHIFT + FIELD_BITS * i as u32);
    }
    w |= u64::from(cfg.max_header_kib) << HEADER_KIB_SHIFT;
    Some(w)
}

#[inline(always)]
fn field(w: u64, i: u32) -> u8 {
    ((w >> (FIELDS_SHIFT + FIELD_BITS * i)) & ((1 << FIELD_BITS) - 1)) as u8
}

/// The config a `LISTENER` word holds.
#[inline(always)]
pub fn config(w: u64) -> ListenerConfig {
    ListenerConfig {
        id: ((w >> CONFIG_SHIFT) & ((1 << ID_BITS) - 1)) as u32,
        mode: field(w, 0),
        action: field(w, 1),
        on_missing: field(w, 2),
        on_unknown: field(w, 3),
        on_incomplete: field(w, 4),
        on_not_http: field(w, 5),
        max_header_kib: ((w >> HEADER_KIB_SHIFT) & ((1 << HEADER_KIB_BITS) - 1)) as u8,
        _pad: 0,
    }
}

/// Where the listener of a packet received on `ifindex` is, given its port's word. An
/// interface's own listener comes before the every-interface one, as in `LISTENERS`.
#[inline(always)]
pub fn resolve(w: u64, ifindex: u32) -> PortListener {
    if w & LISTENER != 0 {
        let on = w as u32;
        // The word's own interface; or every interface, when no other listener could
        // name this one.
        if on == ifindex || (on == 0 && w & OTHERS == 0) {
            return PortListener::Here(config(w));
        }
    }
    if w & OTHERS != 0 {
        PortListener::Lookup
    } else {
        PortListener::None
    }
}

/// The word for a port whose listeners are `listeners` (all of that port). One that
/// names its interface is preferred: with an every-interface listener in the word, any
/// other listener makes every packet look in `LISTENERS`.
pub fn word(listeners: &[(ListenerKey, ListenerConfig)]) -> u64 {
    let mut best: Option<(bool, u64)> = None;
    for (k, c) in listeners {
        if let Some(w) = pack(k, c) {
            let named = k.ifindex != 0;
            if best.is_none_or(|(b, _)| named && !b) {
                best = Some((named, w));
            }
        }
    }
    match best {
        None if listeners.is_empty() => 0,
        None => OTHERS,
        Some((_, w)) if listeners.len() == 1 => w,
        Some((_, w)) => w | OTHERS,
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use crate::{default_policy, deny_action, mode};

    fn key(ifindex: u32) -> ListenerKey {
        ListenerKey {
            ifindex,
            port: 8080,
            _pad: 0,
        }
    }

    fn cfg(id: u32, m: u8) -> ListenerConfig {
        ListenerConfig {
            id,
            mode: m,
            action: deny_action::RESET,
            on_missing: default_policy::ALLOW,
            on_unknown: default_policy::DENY,
            on_incomplete: default_policy::ALLOW,
            on_not_http: default_policy::ALLOW,
            max_header_kib: 0,
            _pad: 0,
        }
    }

    #[test]
    fn every_field_survives_the_word() {
        for id in [0, 1, 37, 63] {
            for m in [mode::ENFORCE, mode::OBSERVE] {
                let c = cfg(id, m);
                let w = pack(&key(7), &c).unwrap();
                assert_eq!(config(w), c);
                assert_eq!(w as u32, 7);
            }
        }
        let odd = ListenerConfig {
            on_unknown: default_policy::ALLOW,
            on_missing: default_policy::DENY,
            ..cfg(5, mode::ENFORCE)
        };
        assert_eq!(config(pack(&key(0), &odd).unwrap()), odd);
        for kib in [0, 1, 4, 16, 31] {
            let c = ListenerConfig {
                max_header_kib: kib,
                ..cfg(63, mode::ENFORCE)
            };
            assert_eq!(config(pack(&key(3), &c).unwrap()), c);
        }
    }

    #[test]
    fn configs_that_do_not_fit_are_not_packed() {
        assert_eq!(pack(&key(1), &cfg(64, mode::ENFORCE)), None);
        let long = ListenerConfig {
            max_header_kib: 32,
            ..cfg(1, mode::ENFORCE)
        };
        assert_eq!(pack(&key(1), &long), None);
        assert_eq!(pack(&key(1), &cfg(1, 4)), None);
        // ... and leave the port to the LISTENERS lookup.
        let (k, c) = (key(1), cfg(64, mode::ENFORCE));
        assert_eq!(word(&[(k, c)]), OTHERS);
        assert_eq!(resolve(OTHERS, 1), PortListener::Lookup);
    }

    #[test]
    fn no_listener_is_a_zero_word() {
        assert_eq!(word(&[]), 0);
        assert_eq!(resolve(0, 3), PortListener::None);
    }

    #[test]
    fn a_lone_listener_is_answered_from_the_word() {
        let (k, c) = (key(3), cfg(2, mode::ENFORCE));
        let w = word(&[(k, c)]);
        assert_eq!(resolve(w, 3), PortListener::Here(c));
        // Another interface has no listener on this port.
        assert_eq!(resolve(w, 4), PortListener::None);
        let (k, c) = (key(0), cfg(2, mode::OBSERVE));
        let w = word(&[(k, c)]);
        assert_eq!(resolve(w, 3), PortListener::Here(c));
        assert_eq!(resolve(w, 4), PortListener::Here(c));
    }

    /// The precedence `LISTENERS` has ((ifindex, port) before (0, port)) holds through
    /// the word, whichever listener it holds.
    #[test]
    fn an_interfaces_own_listener_comes_first() {
        let (named, any, other) = (key(3), key(0), key(4));
        let (cn, ca, co) = (
            cfg(1, mode::ENFORCE),
            cfg(2, mode::OBSERVE),
            cfg(3, mode::ENFORCE),
        );
        for order in [[(named, cn), (any, ca)], [(any, ca), (named, cn)]] {
            let w = word(&order);
            assert_eq!(w & OTHERS, OTHERS);
            assert_eq!(resolve(w, 3), PortListener::Here(cn));
            // Interface 4 may only get the every-interface listener from LISTENERS.
            assert_eq!(resolve(w, 4), PortListener::Lookup);
        }
        // Two named listeners: one in the word, the other looked up.
        let w = word(&[(named, cn), (other, co)]);
        assert_eq!(resolve(w, 3), PortListener::Here(cn));
        assert_eq!(resolve(w, 4), PortListener::Lookup);
        assert_eq!(resolve(w, 5), PortListener::Lookup);
        // An every-interface listener alone in the word, with others: always looked up.
        let w = word(&[(any, ca), (named, co_unpackable())]);
        assert_eq!(resolve(w, 3), PortListener::Lookup);
        assert_eq!(resolve(w, 9), PortListener::Lookup);
    }

    fn co_unpackable() -> ListenerConfig {
        cfg(99, mode::ENFORCE)
    }
}
