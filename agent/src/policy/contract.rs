//! Ramp contracts: explicit stages or a growth rule, turned into the datapath's `Contract`.

use std::time::Duration;

use agent_common::{gcra, Contract, Stage, MAX_STAGES};

/// One stage as written: from `after` past the ramp start, `milli_rate` thousandths of a
/// request per second with bursts of `burst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StageSpec {
    pub after: Duration,
    pub milli_rate: u64,
    pub burst: u32,
}

/// A growth rule in the style of the "500/50/5" ramp: start at `start`, grow by `growth`
/// every `step` until `cap`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Ramp {
    pub start_milli: u64,
    /// Fraction per step (0.5 = 50%).
    pub growth: f64,
    pub step: Duration,
    pub cap_milli: u64,
    pub burst: u32,
}

/// Expands a growth rule into stages: rate_k = min(start × (1 + growth)^k, cap) from
/// k × step, one stage per step until the cap is reached.
pub fn expand_ramp(ramp: &Ramp) -> Result<Vec<StageSpec>, String> {
    if ramp.start_milli > ramp.cap_milli {
        return Err(format!(
            "ramp start {} is above its cap {}",
            show_rate(ramp.start_milli),
            show_rate(ramp.cap_milli)
        ));
    }
    if ramp.step.is_zero() {
        return Err("ramp step must be longer than 0s".into());
    }
    let mut stages = Vec::new();
    for k in 0..MAX_STAGES {
        let after = ramp
            .step
            .checked_mul(k as u32)
            .filter(|d| u64::try_from(d.as_nanos()).is_ok())
            .ok_or("ramp step is too long")?;
        let rate = ramp.start_milli as f64 * (1.0 + ramp.growth).powi(k as i32);
        let milli_rate = if rate >= ramp.cap_milli as f64 {
            ramp.cap_milli
        } else {
            rate.round() as u64
        };
        stages.push(StageSpec {
            after,
            milli_rate,
            burst: ramp.burst,
        });
        if milli_rate == ramp.cap_milli {
            return Ok(stages);
        }
    }
    // Stages needed: the k that first reaches the cap, plus stage 0.
    let needed = ((ramp.cap_milli as f64 / ramp.start_milli as f64).ln() / (1.0 + ramp.growth).ln())
        .ceil() as u64
        + 1;
    Err(format!(
        "ramp from {} to {} growing {}% per {} needs {needed} stages, more than the {MAX_STAGES} a \
         contract can hold: use a larger growth per step (and a larger step to keep the ramp's \
         length), or list `stages` explicitly",
        show_rate(ramp.start_milli),
        show_rate(ramp.cap_milli),
        ramp.growth * 100.0,
        humantime::format_duration(ramp.step),
    ))
}

/// The datapath form of a stage: GCRA emission interval and tolerance.
pub fn to_stage(spec: &StageSpec) -> Result<Stage, String> {
    let interval_ns = gcra::interval_for_milli_rate(spec.milli_rate);
    let tolerance_ns = interval_ns
        .checked_mul(u64::from(spec.burst))
        .ok_or_else(|| {
            format!(
                "burst {} at {} spans more time than the datapath can count",
                spec.burst,
                show_rate(spec.milli_rate)
            )
        })?;
    let after_ns = u64::try_from(spec.after.as_nanos()).map_err(|_| {
        format!(
            "`after` {} is too long",
            humantime::format_duration(spec.after)
        )
    })?;
    Ok(Stage {
        after_ns,
        interval_ns,
        tolerance_ns,
    })
}

/// Assembles a contract from already validated stages (1..=MAX_STAGES, in order).
pub fn to_contract(stages: &[Stage], penalty: Option<(u32, Duration)>) -> Contract {
    let mut contract = Contract {
        n_stages: stages.len() as u32,
        ..Default::default()
    };
    contract.stages[..stages.len()].copy_from_slice(stages);
    if let Some((demote, cooldown)) = penalty {
        contract.penalty_stages = demote;
        contract.penalty_ns = u64::try_from(cooldown.as_nanos()).unwrap_or(u64::MAX);
    }
    contract
}

/// "5/s", "0.5/s", "1687.5/s": a milli-rate for messages.
pub fn show_rate(milli_rate: u64) -> String {
    let whole = milli_rate / 1000;
    let frac = milli_rate % 1000;
    if frac == 0 {
        format!("{whole}/s")
    } else {
        let frac = format!("{frac:03}");
        format!("{whole}.{}/s", frac.trim_end_matches('0'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn ramp_500_50_5_expands_to_seven_stages() {
        let stages = expand_ramp(&Ramp {
            start_milli: 500_000,
            growth: 0.5,
            step: 5 * MIN,
            cap_milli: 5_000_000,
            burst: 50,
        })
        .unwrap();
        let rates: Vec<String> = stages.iter().map(|s| show_rate(s.milli_rate)).collect();
        assert_eq!(
            rates,
            [
                "500/s",
                "750/s",
                "1125/s",
                "1687.5/s",
                "2531.25/s",
                "3796.875/s",
                "5000/s"
            ]
        );
        let minutes: Vec<u64> = stages.iter().map(|s| s.after.as_secs() / 60).collect();
        assert_eq!(minutes, [0, 5, 10, 15, 20, 25, 30]);
        assert!(stages.iter().all(|s| s.burst == 50));
    }

    #[test]
    fn ramp_starting_at_its_cap_is_one_stage() {
        let stages = expand_ramp(&Ramp {
            start_milli: 10_000,
            growth: 1.0,
            step: MIN,
            cap_milli: 10_000,
            burst: 1,
        })
        .unwrap();
        assert_eq!(stages.len(), 1);
    }

    #[test]
    fn ramp_needing_too_many_stages_says_how_many_and_what_to_change() {
        let err = expand_ramp(&Ramp {
            start_milli: 1_000,
            growth: 0.1,
            step: 5 * MIN,
            cap_milli: 5_000_000,
            burst: 1,
        })
        .unwrap_err();
        // 1.1^k >= 5000 first at k = 90.
        assert_eq!(
            err,
            "ramp from 1/s to 5000/s growing 10% per 5m needs 91 stages, more than the 16 a \
             contract can hold: use a larger growth per step (and a larger step to keep the \
             ramp's length), or list `stages` explicitly"
        );
    }

    #[test]
    fn ramp_start_above_cap_is_refused() {
        let err = expand_ramp(&Ramp {
            start_milli: 2_000,
            growth: 0.5,
            step: MIN,
            cap_milli: 1_000,
            burst: 1,
        })
        .unwrap_err();
        assert_eq!(err, "ramp start 2/s is above its cap 1/s");
    }

    #[test]
    fn stages_become_gcra_interval_and_tolerance() {
        let stage = to_stage(&StageSpec {
            after: 10 * MIN,
            milli_rate: 500,
            burst: 2,
        })
        .unwrap();
        assert_eq!(
            stage,
            Stage {
                after_ns: 600_000_000_000,
                interval_ns: 2_000_000_000,
                tolerance_ns: 4_000_000_000,
            }
        );
        let fast = to_stage(&StageSpec {
            after: Duration::ZERO,
            milli_rate: 3_796_875,
            burst: 10,
        })
        .unwrap();
        assert_eq!(fast.interval_ns, 263_374); // 1 s / 3796.875
        assert_eq!(fast.tolerance_ns, 2_633_740);
        assert!(to_stage(&StageSpec {
            after: Duration::ZERO,
            milli_rate: 1,
            burst: u32::MAX,
        })
        .is_err());
    }

    #[test]
    fn contracts_carry_stages_and_penalty() {
        let a = to_stage(&StageSpec {
            after: Duration::ZERO,
            milli_rate: 5_000,
            burst: 10,
        })
        .unwrap();
        let b = to_stage(&StageSpec {
            after: 10 * MIN,
            milli_rate: 10_000,
            burst: 10,
        })
        .unwrap();
        let c = to_contract(&[a, b], Some((1, 10 * MIN)));
        assert_eq!(c.n_stages, 2);
        assert_eq!(c.penalty_stages, 1);
        assert_eq!(c.penalty_ns, 600_000_000_000);
        assert_eq!(&c.stages[..2], &[a, b]);
        assert_eq!(c.stages[2], Stage::default());
        // The datapath's stage selection agrees with what was written.
        assert_eq!(gcra::stage_at(&c, 599_999_999_999), 0);
        assert_eq!(gcra::stage_at(&c, 600_000_000_000), 1);
    }
}
