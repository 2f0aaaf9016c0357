//! Shared test support: packet builder, network-namespace topology.
