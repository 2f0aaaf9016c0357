//! Rampart's eBPF programs: thin entries over one shared judge.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![feature(asm_experimental_arch)]
#![expect(
    internal_features,
    reason = "atomic_cxchg: the target has no atomic-cas feature"
)]

mod bearer;
mod chunked;
mod events;
mod framing;
mod headers;
mod judge;
mod maps;
mod packet;
mod parse;
mod ramp;
mod reply;
mod request_line;
mod respond;
mod scope;
mod scratch;
mod stream;

use agent_common::{
    deny_action,
    respond::{answer, Answer},
    Verdict, MAX_LISTENERS, VERDICT_COUNT,
};
use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK, TC_ACT_SHOT},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

use crate::{
    judge::Decision,
    maps::VERDICT_STATS,
    packet::{tc_redirect, Packet, Tc, Xdp},
    reply::Reset,
    respond::Follow,
};

/// What to do with a packet, before it is mapped to XDP or TC return codes.
enum Act {
    Pass,
    Drop,
    /// Rewritten into an RST that continues to the server.
    PassReset,
    /// Rewritten into an RST or a response back to the client.
    Bounce,
}

// `inline(always)`: the macro wraps the function in the program's entry, and a body this
// size is otherwise left out of line, a call and a return more for every packet.
#[xdp(frags)]
#[inline(always)]
pub fn rampart_xdp(ctx: XdpContext) -> u32 {
    let pkt = Xdp(&ctx);
    xdp_action_of(enforce(&pkt, judge::entry(&pkt)))
}

/// The request judge of the XDP hook, reached by tail call only (`stream::REQUEST`).
#[xdp(frags)]
#[inline(always)]
pub fn rampart_xdp_request(ctx: XdpContext) -> u32 {
    let pkt = Xdp(&ctx);
    xdp_action_of(enforce(&pkt, judge::request_run(&pkt)))
}

/// The respond action's answer (XDP), reached by tail call only (`respond::SLOT`).
#[xdp(frags)]
#[inline(always)]
pub fn rampart_xdp_respond(ctx: XdpContext) -> u32 {
    let pkt = Xdp(&ctx);
    xdp_action_of(answered(&pkt))
}

/// The respond action's answer (TC), reached by tail call only (`respond::SLOT`).
#[classifier]
#[inline(always)]
pub fn rampart_tc_respond(ctx: TcContext) -> i32 {
    let pkt = Tc(&ctx);
    tc_action_of(&pkt, answered(&pkt))
}

/// The answering program's verdict: the response, or a reset when none could be made.
#[inline(always)]
fn answered(p: &impl Packet) -> Act {
    if respond::answer(p).is_ok() {
        return Act::Bounce;
    }
    let flow = match parse::parse(p) {
        Ok(Some(f)) => f,
        _ => return Act::Drop,
    };
    match reply::reset(p, &flow) {
        Ok(Reset::ToServer) => Act::PassReset,
        Ok(Reset::ToClient) => Act::Bounce,
        Err(()) => Act::Drop,
    }
}

#[classifier]
#[inline(always)]
pub fn rampart_tc(ctx: TcContext) -> i32 {
    let pkt = Tc(&ctx);
    tc_action_of(&pkt, enforce(&pkt, judge::entry(&pkt)))
}

/// The request judge of the TC hook, reached by tail call only (`stream::REQUEST`).
#[classifier]
#[inline(always)]
pub fn rampart_tc_request(ctx: TcContext) -> i32 {
    let pkt = Tc(&ctx);
    tc_action_of(&pkt, enforce(&pkt, judge::request_run(&pkt)))
}

#[inline(always)]
fn xdp_action_of(a: Act) -> u32 {
    match a {
        Act::Pass | Act::PassReset => xdp_action::XDP_PASS,
        Act::Drop => xdp_action::XDP_DROP,
        Act::Bounce => xdp_action::XDP_TX,
    }
}

#[inline(always)]
fn tc_action_of(pkt: &Tc, a: Act) -> i32 {
    match a {
        Act::Pass | Act::PassReset => TC_ACT_OK,
        Act::Drop => TC_ACT_SHOT,
        Act::Bounce => tc_redirect(pkt.ifindex()),
    }
}

#[inline(always)]
fn enforce(p: &impl Packet, d: Decision) -> Act {
    record(&d);
    if let Some(f) = d.follow {
        return match f {
            Follow::ToServer => Act::PassReset,
            Follow::ToClient => Act::Bounce,
            Follow::Drop => Act::Drop,
        };
    }
    if !d.deny {
        if let Some(slot) = d.next {
            // The rest of the segment, in the other program; back here only if the tail
            // call failed, and then the segment never passes half-judged.
            stream::go_on(p, slot);
            return Act::Drop;
        }
        return Act::Pass;
    }
    if d.verdict == Verdict::OutOfSequence {
        // Not a judgement: the client's TCP sends the segment again in order.
        return Act::Drop;
    }
    let Some(flow) = d.flow else {
        return Act::Drop;
    };
    if !d.rebound {
        let Some(l) = d.listener else {
            return Act::Drop;
        };
        match l.action {
            deny_action::RESET => {}
            deny_action::RESPOND => match answer(d.verdict) {
                Answer::Status(_) => {
                    // On in the answering program; back here only if the tail call
                    // failed, and then the connection is reset instead.
                    respond::hand_over(p, &l, d.verdict);
                }
                Answer::Reset => {}
                Answer::Drop => return Act::Drop,
            },
            _ => return Act::Drop,
        }
    }
    match reply::reset(p, &flow) {
        Ok(Reset::ToServer) => Act::PassReset,
        Ok(Reset::ToClient) => Act::Bounce,
        // Could not build the RST: still never let the request through.
        Err(()) => Act::Drop,
    }
}

/// The one place verdicts are counted.
#[inline(always)]
fn record(d: &Decision) {
    let Some(l) = d.listener else {
        return;
    };
    let row = if l.id < MAX_LISTENERS {
        l.id
    } else {
        MAX_LISTENERS
    };
    if let Some(c) = VERDICT_STATS.get_ptr_mut(row * VERDICT_COUNT as u32 + d.verdict as u32) {
        // SAFETY: per-CPU counter, only this CPU writes it.
        unsafe { *c += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
