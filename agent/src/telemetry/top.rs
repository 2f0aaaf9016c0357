//! `rampart top`: one row per active token, busiest first, fitted to the terminal.
//!
//! Pure: rows come from the control socket's `top` op, the frame is a String, and the rate
//! estimator only does arithmetic on cumulative counters, so all of it is testable without a
//! terminal or a datapath.

use std::{
    cmp::Ordering,
    collections::HashMap,
    hash::Hash,
    time::{Instant, SystemTime},
};

use crate::control::protocol::TopRow;

/// Renders one frame: a title line, a column header, then rows sorted by current rate
/// (descending), every line at most `width` characters and at most `height` lines in all.
/// Lines end in `\n`; the caller positions the cursor.
pub fn render_frame(
    title: &str,
    rows: &[TopRow],
    width: usize,
    height: usize,
    now: SystemTime,
) -> String {
    let mut sorted: Vec<&TopRow> = rows.iter().collect();
    sorted.sort_by(|a, b| busiest_first(a, b));

    let layout = Layout::fit(&sorted, width);
    let mut lines = vec![title.to_owned(), layout.header()];
    let room = height.saturating_sub(lines.len());
    let (shown, hidden) = if sorted.len() > room {
        // Keep one line to say how many did not fit.
        let shown = room.saturating_sub(1);
        (shown, sorted.len() - shown)
    } else {
        (sorted.len(), 0)
    };
    lines.extend(sorted[..shown].iter().map(|r| layout.row(r, now)));
    if hidden > 0 && room > 0 {
        lines.push(format!("… {hidden} more"));
    }

    let mut out = String::new();
    for line in lines.iter().take(height) {
        out.push_str(&truncate(line, width));
        out.push('\n');
    }
    out
}

fn busiest_first(a: &TopRow, b: &TopRow) -> Ordering {
    b.current_rate
        .total_cmp(&a.current_rate)
        .then(b.throttles.cmp(&a.throttles))
        .then_with(|| a.fingerprint.0.cmp(&b.fingerprint.0))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Col {
    Fingerprint,
    Label,
    Contract,
    Stage,
    StageRate,
    Rate,
    Throttles,
    Breaches,
    LastSeen,
}

/// Which columns go first when the terminal is too narrow.
const DROP_ORDER: [Col; 4] = [Col::Contract, Col::Breaches, Col::LastSeen, Col::Label];
/// A fingerprint prefix this long still tells tokens apart on one screen.
const SHORT_FINGERPRINT: usize = 16;
const MAX_LABEL: usize = 20;

struct Layout {
    cols: Vec<(Col, usize)>,
}

impl Layout {
    fn fit(rows: &[&TopRow], width: usize) -> Self {
        let label_w = rows
            .iter()
            .filter_map(|r| r.label.as_deref())
            .map(|l| l.chars().count())
            .max()
            .unwrap_or(0)
            .clamp(5, MAX_LABEL);
        let contract_w = rows
            .iter()
            .map(|r| r.contract.chars().count())
            .max()
            .unwrap_or(0)
            .clamp(8, MAX_LABEL);
        let mut cols = vec![
            (Col::Fingerprint, 32),
            (Col::Label, label_w),
            (Col::Contract, contract_w),
            (Col::Stage, 5),
            (Col::StageRate, 9),
            (Col::Rate, 9),
            (Col::Throttles, 10),
            (Col::Breaches, 8),
            (Col::LastSeen, 9),
        ];
        let total = |cols: &[(Col, usize)]| -> usize {
            cols.iter().map(|(_, w)| w).sum::<usize>() + cols.len().saturating_sub(1)
        };
        for drop in DROP_ORDER {
            if total(&cols) <= width {
                break;
            }
            cols.retain(|(c, _)| *c != drop);
        }
        if total(&cols) > width {
            cols[0].1 = SHORT_FINGERPRINT;
        }
        Layout { cols }
    }

    fn header(&self) -> String {
        self.join(|c| {
            match c {
                Col::Fingerprint => "FINGERPRINT",
                Col::Label => "LABEL",
                Col::Contract => "CONTRACT",
                Col::Stage => "STAGE",
                Col::StageRate => "LIMIT/s",
                Col::Rate => "RATE/s",
                Col::Throttles => "THROTTLES",
                Col::Breaches => "BREACHES",
                Col::LastSeen => "SEEN",
            }
            .to_owned()
        })
    }

    fn row(&self, r: &TopRow, now: SystemTime) -> String {
        self.join(|c| match c {
            Col::Fingerprint => r.fingerprint.to_string(),
            Col::Label => r.label.clone().unwrap_or_else(|| "-".to_owned()),
            Col::Contract => r.contract.clone(),
            Col::Stage => r.stage.to_string(),
            Col::StageRate => format_rate(r.stage_rate),
            Col::Rate => format_rate(r.current_rate),
            Col::Throttles => r.throttles.to_string(),
            Col::Breaches => r.breaches.to_string(),
            Col::LastSeen => format_age(r.last_seen.as_deref(), now),
        })
    }

    fn join(&self, cell: impl Fn(Col) -> String) -> String {
        let cells: Vec<String> = self
            .cols
            .iter()
            .map(|&(c, w)| {
                let text = truncate(&cell(c), w);
                let numeric = !matches!(c, Col::Fingerprint | Col::Label | Col::Contract);
                if numeric {
                    format!("{text:>w$}")
                } else {
                    format!("{text:<w$}")
                }
            })
            .collect();
        cells.join(" ").trim_end().to_owned()
    }
}

fn truncate(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        return s.to_owned();
    }
    s.chars().take(width).collect()
}

/// Requests per second, compact: one decimal below 10k, then `k`/`M`.
pub fn format_rate(r: f64) -> String {
    if !r.is_finite() || r < 0.0 {
        "-".to_owned()
    } else if r < 10_000.0 {
        format!("{r:.1}")
    } else if r < 10_000_000.0 {
        format!("{:.1}k", r / 1e3)
    } else {
        format!("{:.1}M", r / 1e6)
    }
}

/// Time since an RFC 3339 instant, in its largest whole unit (`42s`, `3m`, `5h`, `2d`).
fn format_age(rfc3339: Option<&str>, now: SystemTime) -> String {
    let Some(t) = rfc3339 else {
        return "never".to_owned();
    };
    let Ok(t) = humantime::parse_rfc3339_weak(t) else {
        return "?".to_owned();
    };
    let secs = now.duration_since(t).map(|d| d.as_secs()).unwrap_or(0);
    match secs {
        0 => "now".to_owned(),
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86_400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// Turns successive cumulative counter readings (per key) into per-second rates.
#[derive(Debug)]
pub struct RateEstimator<K> {
    last: Option<(Instant, HashMap<K, u64>)>,
}

impl<K> Default for RateEstimator<K> {
    fn default() -> Self {
        RateEstimator { last: None }
    }
}

impl<K: Eq + Hash + Clone> RateEstimator<K> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records the totals read at `at` and returns each key's rate since the previous
    /// reading. The first reading (or one not later than the previous) yields no rates.
    /// A key absent last time counts from zero (its counters were created in between);
    /// a total that went down was reset (e.g. the token was re-added), so it also counts
    /// from zero rather than producing a negative rate.
    pub fn observe(
        &mut self,
        at: Instant,
        totals: impl IntoIterator<Item = (K, u64)>,
    ) -> HashMap<K, f64> {
        let totals: HashMap<K, u64> = totals.into_iter().collect();
        let mut rates = HashMap::new();
        if let Some((prev_at, prev)) = &self.last {
            let dt = at.saturating_duration_since(*prev_at).as_secs_f64();
            if dt > 0.0 {
                for (k, &now) in &totals {
                    let before = prev.get(k).copied().filter(|&b| b <= now).unwrap_or(0);
                    rates.insert(k.clone(), (now - before) as f64 / dt);
                }
            }
        }
        self.last = Some((at, totals));
        rates
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use agent_common::Fingerprint;

    use super::*;
    use crate::control::Fp;

    fn row(n: u64, rate: f64) -> TopRow {
        TopRow {
            fingerprint: Fp(Fingerprint([0, n])),
            label: Some(format!("client-{n}")),
            contract: "standard".into(),
            stage: 2,
            stage_rate: 50.0,
            current_rate: rate,
            throttles: n * 10,
            breaches: n,
            last_seen: Some("2024-05-01T12:00:00Z".into()),
        }
    }

    fn now() -> SystemTime {
        humantime::parse_rfc3339("2024-05-01T12:03:30Z").unwrap()
    }

    #[test]
    fn rows_sorted_busiest_first_with_all_columns_when_wide() {
        let rows = [row(1, 3.0), row(2, 120.5), row(3, 40.0)];
        let frame = render_frame("rampart top", &rows, 200, 50, now());
        let lines: Vec<&str> = frame.lines().collect();
        assert_eq!(lines[0], "rampart top");
        for col in [
            "FINGERPRINT",
            "LABEL",
            "CONTRACT",
            "STAGE",
            "LIMIT/s",
            "RATE/s",
            "THROTTLES",
            "BREACHES",
            "SEEN",
        ] {
            assert!(lines[1].contains(col), "{col} missing from {:?}", lines[1]);
        }
        assert_eq!(lines.len(), 5);
        let order: Vec<&str> = lines[2..].iter().map(|l| &l[..32]).collect();
        assert_eq!(
            order,
            [
                rows[1].fingerprint.to_string(),
                rows[2].fingerprint.to_string(),
                rows[0].fingerprint.to_string()
            ]
        );
        let busiest: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(
            busiest,
            [
                rows[1].fingerprint.to_string().as_str(),
                "client-2",
                "standard",
                "2",
                "50.0",
                "120.5",
                "20",
                "2",
                "3m"
            ]
        );
    }

    #[test]
    fn fits_narrow_terminals() {
        let rows: Vec<TopRow> = (0..5).map(|n| row(n, n as f64)).collect();
        for width in [20, 40, 60, 80, 100] {
            let frame = render_frame(
                "rampart top — 5 tokens, policy generation 3",
                &rows,
                width,
                24,
                now(),
            );
            for line in frame.lines() {
                assert!(line.chars().count() <= width, "{width}: {line:?}");
            }
        }
        // At 80 columns the rate and limit survive; less important columns go first.
        let frame = render_frame("t", &rows, 80, 24, now());
        let header = frame.lines().nth(1).unwrap();
        assert!(
            header.contains("RATE/s") && header.contains("LIMIT/s") && header.contains("THROTTLES")
        );
        assert!(!header.contains("CONTRACT"));
        // Very narrow: the fingerprint is shortened to a prefix, not cut mid-column.
        let frame = render_frame("t", &rows, 60, 24, now());
        let first = frame.lines().nth(2).unwrap();
        assert!(
            first.starts_with(&format!("{} ", &rows[4].fingerprint.to_string()[..16])),
            "{first:?}"
        );
    }

    #[test]
    fn height_limits_rows_and_says_how_many_are_hidden() {
        let rows: Vec<TopRow> = (0..30).map(|n| row(n, n as f64)).collect();
        let frame = render_frame("t", &rows, 200, 10, now());
        let lines: Vec<&str> = frame.lines().collect();
        assert_eq!(lines.len(), 10);
        assert_eq!(lines[9], "… 23 more");
        assert!(lines[2].starts_with(&rows[29].fingerprint.to_string()));
        // Everything fits: no "more" line.
        let frame = render_frame("t", &rows[..3], 200, 10, now());
        assert_eq!(frame.lines().count(), 5);
        assert!(!frame.contains("more"));
    }

    #[test]
    fn never_used_token_and_large_rates() {
        let mut r = row(1, 12_345.0);
        r.last_seen = None;
        r.label = None;
        let frame = render_frame("t", &[r], 200, 10, now());
        let cells: Vec<&str> = frame.lines().nth(2).unwrap().split_whitespace().collect();
        assert_eq!(cells[1], "-");
        assert_eq!(cells[5], "12.3k");
        assert_eq!(*cells.last().unwrap(), "never");
    }

    #[test]
    fn rates_from_cumulative_counters() {
        let t0 = Instant::now();
        let mut est = RateEstimator::new();
        assert!(est.observe(t0, [("a", 100), ("b", 5)]).is_empty());

        let rates = est.observe(
            t0 + Duration::from_secs(2),
            [("a", 110), ("b", 5), ("c", 8)],
        );
        assert_eq!(rates["a"], 5.0);
        assert_eq!(rates["b"], 0.0);
        // New since the last reading: all its requests happened in between.
        assert_eq!(rates["c"], 4.0);

        // "a" was reset (re-added): counts from zero, never negative. "b" vanished.
        let rates = est.observe(t0 + Duration::from_millis(2500), [("a", 3), ("c", 9)]);
        assert_eq!(rates["a"], 6.0);
        assert_eq!(rates["c"], 2.0);
        assert!(!rates.contains_key("b"));

        // A reading at the same instant gives no rates instead of dividing by zero.
        assert!(est
            .observe(t0 + Duration::from_millis(2500), [("a", 4)])
            .is_empty());
    }
}
