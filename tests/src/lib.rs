//! Shared test support: packet builder, network-namespace topology.

pub mod attach_support;
pub mod cli;
pub mod client;
pub mod daemon;
pub mod gateway;
pub mod netns;
pub mod nginx;
pub mod packet;
pub mod session;
pub mod topology;
pub mod upstream;
