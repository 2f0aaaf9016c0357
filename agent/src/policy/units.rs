//! The value syntaxes operators write: durations, rates, growth percentages, timestamps.
//!
//! Each parser returns the message to show next to the offending value; the callers add
//! the location. Token issuing reuses these so the CLI and policy files agree.

use std::time::{Duration, UNIX_EPOCH};

/// Slowest rate a stage may have: one request per 1000 s.
pub const MIN_RATE: f64 = 0.001;
/// Fastest rate a stage may have.
pub const MAX_RATE: f64 = 1_000_000.0;

/// A humantime duration: "30d", "5m", "1h30m", "0s".
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| {
        format!("invalid duration `{text}` ({e}); write it like \"30s\", \"5m\" or \"1h30m\"")
    })
}

/// A rate in requests per second as thousandths (the unit of
/// `agent_common::gcra::interval_for_milli_rate`), checked against 0.001..=1,000,000.
pub fn milli_rate(rate: f64) -> Result<u64, String> {
    if !(MIN_RATE..=MAX_RATE).contains(&rate) {
        return Err(format!(
            "rate {rate} is out of range: it must be between 0.001 and 1000000 requests per second"
        ));
    }
    // Rounding only matters beyond three decimals, finer than the datapath resolves anyway.
    Ok((rate * 1000.0).round() as u64)
}

/// A rate written as a string ("0.5", "12").
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let rate: f64 = text.trim().parse().map_err(|_| {
        format!("invalid rate `{text}`: expected requests per second, like 5 or \"0.5\"")
    })?;
    if !rate.is_finite() {
        return Err(format!(
            "invalid rate `{text}`: expected requests per second, like 5 or \"0.5\""
        ));
    }
    milli_rate(rate)
}

/// A growth per step written as a percentage ("50%", "12.5%"), as a fraction (0.5).
pub fn parse_growth(text: &str) -> Result<f64, String> {
    let bad = || format!("invalid growth `{text}`: expected a positive percentage like \"50%\"");
    let number = text.trim().strip_suffix('%').ok_or_else(bad)?;
    let percent: f64 = number.trim().parse().map_err(|_| bad())?;
    if !percent.is_finite() || percent <= 0.0 {
        return Err(bad());
    }
    Ok(percent / 100.0)
}

/// A UTC RFC 3339 timestamp ("2026-12-01T00:00:00Z") as Unix seconds.
pub fn parse_timestamp(text: &str) -> Result<i64, String> {
    let bad = |why: &str| {
        format!(
            "invalid timestamp `{text}` ({why}); write UTC RFC 3339 like \"2026-12-01T00:00:00Z\""
        )
    };
    let time = humantime::parse_rfc3339(text).map_err(|e| bad(&e.to_string()))?;
    let since_epoch = time
        .duration_since(UNIX_EPOCH)
        .map_err(|_| bad("before 1970"))?;
    i64::try_from(since_epoch.as_secs()).map_err(|_| bad("too far in the future"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86400)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        let err = parse_duration("5 parsecs").unwrap_err();
        assert!(err.starts_with("invalid duration `5 parsecs`"), "{err}");
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("0.5"), Ok(500));
        assert_eq!(parse_rate("0.001"), Ok(1));
        assert_eq!(parse_rate("1000000"), Ok(1_000_000_000));
        assert_eq!(milli_rate(1687.5), Ok(1_687_500));
        assert_eq!(
            parse_rate("0.0001"),
            Err("rate 0.0001 is out of range: it must be between 0.001 and 1000000 requests per second".into())
        );
        assert!(parse_rate("fast")
            .unwrap_err()
            .starts_with("invalid rate `fast`"));
        assert!(parse_rate("NaN").is_err());
        assert!(milli_rate(1_000_000.5).is_err());
    }

    #[test]
    fn growth() {
        assert_eq!(parse_growth("50%"), Ok(0.5));
        assert_eq!(parse_growth("12.5%"), Ok(0.125));
        assert!(parse_growth("50").is_err());
        assert!(parse_growth("0%").is_err());
        assert!(parse_growth("-5%").is_err());
    }

    #[test]
    fn timestamps() {
        assert_eq!(parse_timestamp("2026-12-01T00:00:00Z"), Ok(1_796_083_200));
        assert_eq!(parse_timestamp("1970-01-01T00:00:01Z"), Ok(1));
        for bad in ["2026-12-01", "2026-12-01T00:00:00+02:00", "tomorrow"] {
            let err = parse_timestamp(bad).unwrap_err();
            assert!(
                err.starts_with(&format!("invalid timestamp `{bad}`")),
                "{err}"
            );
        }
    }
}
