//! The verifier's work per program, against the kernel's limit.

use crate::{require_root, Lease};

/// The verifier's work per program (the kernel's `verified_insns`), printed for the README's
/// budget figures (`--nocapture`); fails past 90 % of the 1M limit, which leaves room for
/// the next change to be measured rather than discovered by a load failure.
#[test]
fn verified_instruction_counts_stay_within_budget() {
    require_root();
    let mut dp = Lease::unpinned();
    for (name, info) in dp.enforcing_program_infos().unwrap() {
        let Some(n) = info.verified_instruction_count() else {
            eprintln!("{name}: the kernel does not report verified instructions");
            continue;
        };
        eprintln!("verified instructions, {name}: {n}");
        assert!(n < 900_000, "{name}: {n} verified instructions");
    }
}
