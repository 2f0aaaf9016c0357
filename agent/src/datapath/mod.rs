//! The one facade over the eBPF object: load, typed maps, attach, pins.

pub mod clock;
