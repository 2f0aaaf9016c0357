//! The `rampart run` daemon (being written).
