//! Decision events into the ring buffer, under a per-CPU per-second cap so a flood of bad
//! requests cannot starve userspace. What the cap (or a full ring) drops is counted.

use agent_common::{Event, GlobalConfig};
use aya_log_ebpf::warn;

use crate::{
    maps::{EVENTS, EVENT_BUDGET},
    packet::Packet,
};

const SECOND: u64 = 1_000_000_000;

#[inline(always)]
pub fn emit(p: &impl Packet, cfg: &GlobalConfig, now: u64, fill: impl FnOnce(&mut Event)) {
    let Some(budget) = EVENT_BUDGET.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU value, only this CPU touches it.
    let b = unsafe { &mut *budget };
    if now.wrapping_sub(b.window_start_ns) >= SECOND {
        b.window_start_ns = now;
        b.emitted = 0;
    }
    if b.emitted >= cfg.events_per_sec as u64 {
        if b.emitted == cfg.events_per_sec as u64 {
            // Once per CPU and window: the operator learns the cap is hiding events.
            b.emitted += 1;
            let (cap, dropped) = (cfg.events_per_sec, b.dropped);
            warn!(
                p.ctx(),
                "event cap of {} per second reached on this CPU: dropping events for the rest of the second ({} dropped so far)",
                cap,
                dropped
            );
        }
        b.dropped += 1;
        return;
    }
    match EVENTS.reserve::<Event>(0) {
        Some(mut slot) => {
            let ev = slot.as_mut_ptr();
            // SAFETY: the reserved slot is ours until submit; zero it, then fill.
            unsafe {
                crate::scratch::zero_words(ev);
                (*ev).time_ns = now;
                fill(&mut *ev);
            }
            slot.submit(0);
            b.emitted += 1;
        }
        None => b.dropped += 1,
    }
}
