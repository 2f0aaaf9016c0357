//! Ramp contract arithmetic: which stage applies, and GCRA admission.
//!
//! Integer nanoseconds throughout. The datapath runs `admit` inside a compare-and-swap loop
//! on `TokenState::tat_ns`; the tests and userspace tooling use the same functions.

use crate::types::{Contract, MAX_STAGES};

pub const NANOS_PER_SEC: u64 = 1_000_000_000;

/// GCRA: given the theoretical arrival time `tat`, may a request at `now` pass?
/// Returns the new TAT on admission. `tolerance` = burst × interval, so from idle
/// `burst + 1` requests pass back to back and then one per `interval`.
#[inline(always)]
pub fn admit(tat: u64, now: u64, interval: u64, tolerance: u64) -> Option<u64> {
    let t = if tat > now { tat } else { now };
    if t - now > tolerance {
        None
    } else {
        Some(t + interval)
    }
}

/// Index of the stage in force `elapsed` ns after the ramp start: the last stage whose
/// `after_ns` has passed (stage 0 starts at 0).
#[inline(always)]
pub fn stage_at(contract: &Contract, elapsed: u64) -> u32 {
    let n = contract.n_stages as usize;
    let mut idx = 0u32;
    for i in 1..MAX_STAGES {
        if i >= n {
            break;
        }
        if contract.stages[i].after_ns <= elapsed {
            idx = i as u32;
        } else {
            break;
        }
    }
    idx
}

/// The stage that applies once a breach penalty (if active) has demoted it.
#[inline(always)]
pub fn effective_stage(contract: &Contract, elapsed: u64, penalised: bool) -> u32 {
    let s = stage_at(contract, elapsed);
    if penalised {
        s.saturating_sub(contract.penalty_stages)
    } else {
        s
    }
}

/// Emission interval for a rate given in thousandths of a request per second
/// (so 0.5/s is 500). Rates are 0.001/s ..= 1,000,000/s.
pub fn interval_for_milli_rate(milli_per_sec: u64) -> u64 {
    (NANOS_PER_SEC * 1000) / milli_per_sec.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Stage;

    fn contract(stages: &[(u64, u64, u64)], penalty: (u32, u64)) -> Contract {
        let mut c = Contract {
            n_stages: stages.len() as u32,
            penalty_stages: penalty.0,
            penalty_ns: penalty.1,
            ..Default::default()
        };
        for (i, &(after_s, rate, burst)) in stages.iter().enumerate() {
            let interval = NANOS_PER_SEC / rate;
            c.stages[i] = Stage {
                after_ns: after_s * NANOS_PER_SEC,
                interval_ns: interval,
                tolerance_ns: burst * interval,
            };
        }
        c
    }

    #[test]
    fn burst_then_steady_rate() {
        let i = NANOS_PER_SEC / 10;
        let mut tat = 0;
        let now = 5 * NANOS_PER_SEC;
        let mut admitted = 0;
        for _ in 0..20 {
            if let Some(t) = admit(tat, now, i, 3 * i) {
                tat = t;
                admitted += 1;
            }
        }
        assert_eq!(admitted, 4, "burst 3 admits 1 + 3 at once");
        // Under continuous demand (a request every ms) over [0, 1 s]: burst + 1 at once,
        // then one per interval.
        let mut tat = 0;
        let mut total = 0;
        for ms in 0..=1000u64 {
            if let Some(t) = admit(tat, now + ms * 1_000_000, i, 3 * i) {
                tat = t;
                total += 1;
            }
        }
        assert_eq!(total, 4 + 10);
    }

    #[test]
    fn stages_and_penalty() {
        let c = contract(
            &[(0, 5, 1), (10, 10, 2), (20, 20, 4)],
            (1, 30 * NANOS_PER_SEC),
        );
        assert_eq!(stage_at(&c, 0), 0);
        assert_eq!(stage_at(&c, 10 * NANOS_PER_SEC - 1), 0);
        assert_eq!(stage_at(&c, 10 * NANOS_PER_SEC), 1);
        assert_eq!(stage_at(&c, 1000 * NANOS_PER_SEC), 2);
        assert_eq!(effective_stage(&c, 1000 * NANOS_PER_SEC, true), 1);
        assert_eq!(effective_stage(&c, 0, true), 0);
    }

    #[test]
    fn fractional_rates() {
        assert_eq!(interval_for_milli_rate(500), 2 * NANOS_PER_SEC);
        assert_eq!(interval_for_milli_rate(1_000_000_000), 1_000);
    }
}
