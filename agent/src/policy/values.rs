//! Reading one value of a policy file (stages, a ramp, a penalty, a duration, a rate, a
//! burst, a timestamp, a scope prefix), each reporting its own diagnostic with its span.

use std::time::Duration;

use agent_common::{MAX_SCOPE_PREFIX, MAX_STAGES};
use toml_edit::Item;

use super::{
    contract::{expand_ramp, Ramp, StageSpec},
    toml_walk::{Entry, Located, Span, Walk},
    units,
};

/// `stages = [{ after, rate, burst }, ..]`, checked for order and count.
pub(super) fn explicit_stages(
    w: &mut Walk,
    what: &str,
    value: &Located,
) -> Option<Vec<(StageSpec, Span)>> {
    let tables = w.tables("stages", value)?;
    if tables.is_empty() {
        w.error(value.span.clone(), format!("{what} has no stages"));
        return None;
    }
    let mut out = Vec::new();
    let mut ok = true;
    let mut previous: Option<Duration> = None;
    for (i, (table, span)) in tables.iter().enumerate() {
        let entry = Entry {
            table: *table,
            span,
            what: "a stage",
        };
        if i == MAX_STAGES {
            w.error(
                span.clone(),
                format!("{what} has more than {MAX_STAGES} stages"),
            );
            return None;
        }
        w.check_keys(entry, &["after", "rate", "burst"]);
        let after = w
            .require(entry, "after")
            .and_then(|v| duration(w, "after", &v).map(|d| (d, v.span)));
        let rate = w.require(entry, "rate").and_then(|v| rate(w, &v));
        let burst = w.require(entry, "burst").and_then(|v| burst(w, &v));
        if let Some((after, after_span)) = &after {
            match previous {
                None if !after.is_zero() => w.error(
                    after_span.clone(),
                    "the first stage must start at `after = \"0s\"`",
                ),
                Some(prev) if *after <= prev => w.error(
                    after_span.clone(),
                    format!(
                        "stages out of order: `after` must be later than the previous stage's ({})",
                        humantime::format_duration(prev)
                    ),
                ),
                _ => {}
            }
            previous = Some(*after);
        }
        match (after, rate, burst) {
            (Some((after, _)), Some(milli_rate), Some(burst)) => out.push((
                StageSpec {
                    after,
                    milli_rate,
                    burst,
                },
                span.clone(),
            )),
            _ => ok = false,
        }
    }
    ok.then_some(out)
}

/// `ramp = { start, growth, step, cap, burst }`, expanded into stages.
pub(super) fn ramp_stages(w: &mut Walk, value: &Located) -> Option<Vec<(StageSpec, Span)>> {
    let table = w.table("ramp", value)?;
    let entry = Entry {
        table,
        span: &value.span,
        what: "ramp",
    };
    w.check_keys(entry, &["start", "growth", "step", "cap", "burst"]);
    let start = w.require(entry, "start").and_then(|v| rate(w, &v));
    let growth = w.require(entry, "growth").and_then(|v| {
        let text = w.string("growth", &v)?;
        units::parse_growth(text)
            .map_err(|m| w.error(v.span, m))
            .ok()
    });
    let step = w
        .require(entry, "step")
        .and_then(|v| duration(w, "step", &v));
    let cap = w.require(entry, "cap").and_then(|v| rate(w, &v));
    let burst = w.require(entry, "burst").and_then(|v| burst(w, &v));
    let ramp = Ramp {
        start_milli: start?,
        growth: growth?,
        step: step?,
        cap_milli: cap?,
        burst: burst?,
    };
    match expand_ramp(&ramp) {
        Ok(stages) => Some(
            stages
                .into_iter()
                .map(|s| (s, value.span.clone()))
                .collect(),
        ),
        Err(message) => {
            w.error(value.span.clone(), message);
            None
        }
    }
}

/// `penalty = { demote, cooldown }`; `demote` is checked against the stage count if known.
pub(super) fn penalty(
    w: &mut Walk,
    value: &Located,
    stages: Option<&[(StageSpec, Span)]>,
) -> Option<(u32, Duration)> {
    let table = w.table("penalty", value)?;
    let entry = Entry {
        table,
        span: &value.span,
        what: "penalty",
    };
    w.check_keys(entry, &["demote", "cooldown"]);
    let demote = w.require(entry, "demote").and_then(|v| {
        let n = w.integer("demote", &v)?;
        if n < 1 {
            w.error(v.span, "penalty `demote` must be at least 1 stage");
            return None;
        }
        if let Some(stages) = stages {
            if n >= stages.len() as i64 {
                w.error(
                    v.span,
                    format!(
                        "penalty `demote` ({n}) must be less than the number of stages ({})",
                        stages.len()
                    ),
                );
                return None;
            }
        }
        u32::try_from(n).ok()
    });
    let cooldown = w.require(entry, "cooldown").and_then(|v| {
        let d = duration(w, "cooldown", &v)?;
        if d.is_zero() {
            w.error(v.span, "penalty `cooldown` must be longer than 0s");
            return None;
        }
        Some(d)
    });
    Some((demote?, cooldown?))
}

pub(super) fn duration(w: &mut Walk, key: &str, value: &Located) -> Option<Duration> {
    let Some(text) = value.item.as_str() else {
        w.error(
            value.span.clone(),
            format!("`{key}` must be a duration string like \"10m\""),
        );
        return None;
    };
    units::parse_duration(text)
        .map_err(|m| w.error(value.span.clone(), m))
        .ok()
}

/// A rate as an integer, a float or a string; returned in thousandths per second.
pub(super) fn rate(w: &mut Walk, value: &Located) -> Option<u64> {
    let parsed = match value.item {
        Item::Value(toml_edit::Value::Integer(n)) => units::milli_rate(*n.value() as f64),
        Item::Value(toml_edit::Value::Float(f)) => units::milli_rate(*f.value()),
        Item::Value(toml_edit::Value::String(s)) => units::parse_rate(s.value()),
        _ => Err("a rate must be a number or a string like \"0.5\" (requests per second)".into()),
    };
    parsed.map_err(|m| w.error(value.span.clone(), m)).ok()
}

pub(super) fn burst(w: &mut Walk, value: &Located) -> Option<u32> {
    let n = w.integer("burst", value)?;
    if n < 1 {
        w.error(value.span.clone(), "`burst` must be at least 1");
        return None;
    }
    match u32::try_from(n) {
        Ok(n) => Some(n),
        Err(_) => {
            w.error(value.span.clone(), format!("`burst` {n} is too large"));
            None
        }
    }
}

/// An RFC 3339 UTC time, quoted or as a TOML datetime; Unix seconds and the span.
pub(super) fn timestamp(w: &mut Walk, key: &str, value: &Located) -> Option<(i64, Span)> {
    let text = match value.item {
        Item::Value(toml_edit::Value::String(s)) => s.value().clone(),
        Item::Value(toml_edit::Value::Datetime(d)) => d.value().to_string(),
        _ => {
            w.error(
                value.span.clone(),
                format!("`{key}` must be a UTC RFC 3339 time like \"2026-12-01T00:00:00Z\""),
            );
            return None;
        }
    };
    match units::parse_timestamp(&text) {
        Ok(t) => Some((t, value.span.clone())),
        Err(m) => {
            w.error(value.span.clone(), m);
            None
        }
    }
}

/// A scope prefix: a request path the datapath compares byte for byte.
pub(super) fn check_prefix(prefix: &str) -> Result<(), String> {
    if !prefix.starts_with('/') {
        return Err(format!("scope prefix `{prefix}` must start with '/'"));
    }
    if prefix.len() > MAX_SCOPE_PREFIX {
        return Err(format!(
            "scope prefix is {} bytes, longer than the {MAX_SCOPE_PREFIX} the datapath compares",
            prefix.len()
        ));
    }
    if !prefix.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(
            "scope prefix may only hold visible ASCII characters (percent-encode others, as \
             request paths do)"
                .into(),
        );
    }
    Ok(())
}
