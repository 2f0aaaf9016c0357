//! Rampart's test and bench programs: an object of their own, built and embedded only
//! with the agent's `test-support` feature, so the product's object never carries them
//! (as aya keeps its test programs in test/integration-ebpf).
#![no_std]
#![no_main]

mod floor;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

/// A pass-through program: the benchmark's baseline, and the peer of a veth whose other
/// end answers with XDP_TX (a veth only delivers XDP_TX frames to a peer running XDP).
#[xdp]
pub fn rampart_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// The benchmark's floor (see `floor`); never attached.
#[xdp]
pub fn rampart_floor(ctx: XdpContext) -> u32 {
    floor::run(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
