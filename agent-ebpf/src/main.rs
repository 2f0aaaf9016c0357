#![no_std]
#![no_main]
use aya_ebpf::{macros::xdp, programs::XdpContext, bindings::xdp_action};
#[xdp]
pub fn rampart_pass(_ctx: XdpContext) -> u32 { xdp_action::XDP_PASS }
#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! { loop {} }
