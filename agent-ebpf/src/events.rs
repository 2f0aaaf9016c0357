//! Decision events into the ring buffer, under a per-CPU per-second cap so a flood of bad
//! requests cannot starve userspace. What the cap (or a full ring) drops is counted.

use agent_common::{Event, GlobalConfig};

use crate::maps::{EVENTS, EVENT_BUDGET};

const SECOND: u64 = 1_000_000_000;

#[inline(always)]
pub fn emit(cfg: &GlobalConfig, now: u64, fill: impl FnOnce(&mut Event)) {
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
        b.dropped += 1;
        return;
    }
    match EVENTS.reserve::<Event>(0) {
        Some(mut slot) => {
            let ev = slot.as_mut_ptr();
            // SAFETY: the reserved slot is ours until submit; zero it, then fill.
            unsafe {
                core::ptr::write_bytes(ev, 0, 1);
                (*ev).time_ns = now;
                fill(&mut *ev);
            }
            slot.submit(0);
            b.emitted += 1;
        }
        None => b.dropped += 1,
    }
}
