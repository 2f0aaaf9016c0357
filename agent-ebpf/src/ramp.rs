//! Ramp contracts in the kernel: stage by time since the ramp start, then GCRA admission
//! by compare-and-swap on the token's TAT, so racing CPUs never admit past the contract.

use core::intrinsics::{atomic_cxchg, atomic_xadd, AtomicOrdering};

use agent_common::{
    gcra::{admit, effective_stage},
    TokenInfo, MAX_STAGES,
};

use crate::maps::{CONTRACTS, TOKEN_STATE};

const CAS_TRIES: usize = 8;

/// True when the request is admitted. Anything we cannot account for is a throttle.
#[inline(always)]
pub fn admit_request(info: &TokenInfo, now: u64) -> bool {
    let Some(contract) = CONTRACTS.get(info.contract) else {
        return false;
    };
    let Some(state) = TOKEN_STATE.get_ptr_mut(info.state_slot) else {
        return false;
    };
    // SAFETY: `state` points into a map value that stays valid for this program run.
    let st = unsafe { &mut *state };
    // SAFETY: aligned u64 inside the map value.
    if unsafe { core::ptr::read_volatile(&st.first_seen_ns) } == 0 {
        // A fresh slot (userspace zeroed it when it assigned it). Of CPUs racing here,
        // the one whose compare-and-swap lands records the ramp start; the others (and
        // anyone reading a ramp start of 0 meanwhile) start the ramp at their own now,
        // which is the same moment to within the race.
        // SAFETY: as above; the BPF cmpxchg instruction.
        let (_, first) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                &mut st.first_seen_ns,
                0,
                now,
            )
        };
        if first {
            st.ramp_start_ns = if info.ramp_start_ns != 0 {
                info.ramp_start_ns
            } else {
                now
            };
            st.contract = info.contract;
        }
    }
    st.last_seen_ns = now;
    let start = if info.ramp_start_ns != 0 {
        info.ramp_start_ns
    } else if st.ramp_start_ns != 0 {
        st.ramp_start_ns
    } else {
        now
    };
    let elapsed = now.saturating_sub(start);
    let penalised = now < st.penalty_until_ns;
    let idx = effective_stage(contract, elapsed, penalised) as usize;
    let stage = &contract.stages[idx & (MAX_STAGES - 1)];
    st.stage = idx as u32;
    for _ in 0..CAS_TRIES {
        // SAFETY: aligned u64 inside the map value.
        let tat = unsafe { core::ptr::read_volatile(&st.tat_ns) };
        match admit(tat, now, stage.interval_ns, stage.tolerance_ns) {
            Some(next) => {
                // SAFETY: as above; the BPF cmpxchg instruction.
                let (_, ok) = unsafe {
                    atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                        &mut st.tat_ns,
                        tat,
                        next,
                    )
                };
                if ok {
                    // SAFETY: aligned u64 inside the map value; the BPF atomic add.
                    unsafe {
                        atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(&mut st.allowed, 1)
                    };
                    return true;
                }
            }
            None => {
                // SAFETY: as above; the BPF atomic add instruction.
                unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(&mut st.breaches, 1) };
                if contract.penalty_stages != 0 {
                    st.penalty_until_ns = now + contract.penalty_ns;
                }
                return false;
            }
        }
    }
    false
}
