//! The Prometheus registry.
//!
//! Datapath counters are per-CPU kernel totals that userspace sums; they are monotonic on
//! their own, so the registry does not count anything itself: it keeps the last snapshot the
//! daemon handed it and a collector encodes that snapshot verbatim at scrape time. A scrape
//! therefore shows exactly the kernel total as of the last snapshot, never a re-derived delta.
//!
//! Labels are bounded by configuration (listeners, maps), never by tokens: a per-token label
//! would make the series count grow with the token population.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, RwLock,
    },
};

use agent_common::{Verdict, VERDICT_COUNT};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelValue, LabelValueEncoder, MetricEncoder},
    metrics::MetricType,
    registry::Registry,
};

/// Content type of [`Metrics::encode`]'s output (OpenMetrics text, which Prometheus
/// negotiates by default).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What `rampart_build_info` reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildInfo {
    pub version: String,
    /// The git commit, when the build knew it.
    pub commit: Option<String>,
}

impl Default for BuildInfo {
    /// This binary: the crate version and, if the build set `RAMPART_GIT_COMMIT`, the commit.
    fn default() -> Self {
        BuildInfo {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            commit: option_env!("RAMPART_GIT_COMMIT").map(str::to_owned),
        }
    }
}

/// Requests one listener judged, by verdict (index = `Verdict as usize`), summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListenerRequests {
    /// The listener's configured name.
    pub listener: String,
    pub by_verdict: [u64; VERDICT_COUNT],
}

/// Tokens known to the datapath, by validity state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenCounts {
    pub active: u64,
    pub revoked: u64,
    pub expired: u64,
    pub not_yet_valid: u64,
}

/// How full one BPF map is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapFill {
    pub map: String,
    pub entries: u64,
    pub capacity: u64,
}

/// One periodic reading of the datapath maps, as the daemon sums them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DatapathSnapshot {
    pub requests: Vec<ListenerRequests>,
    pub tokens: TokenCounts,
    /// Ramp contract breaches, summed over tokens.
    pub breaches_total: u64,
    /// Events the kernel's per-CPU rate cap (or a full ring) dropped, summed over CPUs.
    pub events_dropped_total: u64,
    pub maps: Vec<MapFill>,
    /// Active tokens that expire within the configured warning window.
    pub expiring_tokens: u64,
}

/// The daemon's metrics: update from snapshots and reload outcomes, encode on scrape.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    state: Arc<State>,
}

#[derive(Debug, Default)]
struct State {
    snapshot: RwLock<DatapathSnapshot>,
    reloads_success: AtomicU64,
    reloads_failure: AtomicU64,
    policy_generation: AtomicU64,
    build: BuildInfo,
}

impl Metrics {
    pub fn new(build: BuildInfo) -> Self {
        let state = Arc::new(State {
            build,
            ..State::default()
        });
        let mut registry = Registry::with_prefix("rampart");
        registry.register_collector(Box::new(SnapshotCollector(state.clone())));
        Metrics { registry, state }
    }

    /// Replaces the datapath reading scrapes report.
    pub fn update(&self, snapshot: DatapathSnapshot) {
        // A poisoned lock only means a writer panicked mid-assignment of a plain value.
        *self
            .state
            .snapshot
            .write()
            .unwrap_or_else(|e| e.into_inner()) = snapshot;
    }

    /// Counts one policy reload attempt.
    pub fn record_reload(&self, success: bool) {
        let counter = if success {
            &self.state.reloads_success
        } else {
            &self.state.reloads_failure
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The generation of the policy the datapath currently enforces.
    pub fn set_policy_generation(&self, generation: u64) {
        self.state
            .policy_generation
            .store(generation, Ordering::Relaxed);
    }

    /// The full exposition, as served on `/metrics` (see [`CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; the collector itself never errors either.
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("encoding metrics into a String");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new(BuildInfo::default())
    }
}

#[derive(Debug)]
struct SnapshotCollector(Arc<State>);

impl Collector for SnapshotCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let state = &self.0;
        let snap = state.snapshot.read().unwrap_or_else(|e| e.into_inner());

        // Merge by name so a snapshot that repeats a listener cannot produce duplicate series.
        let mut requests: BTreeMap<&str, [u64; VERDICT_COUNT]> = BTreeMap::new();
        for l in &snap.requests {
            let sums = requests.entry(&l.listener).or_default();
            for (sum, v) in sums.iter_mut().zip(l.by_verdict) {
                *sum = sum.saturating_add(v);
            }
        }

        let mut m = enc.encode_descriptor(
            "requests",
            "HTTP requests the datapath judged, by listener and verdict",
            None,
            MetricType::Counter,
        )?;
        for (listener, by_verdict) in &requests {
            for verdict in Verdict::ALL {
                let labels = [("listener", Lv(listener)), ("verdict", Lv(verdict.name()))];
                counter(&mut m, &labels, by_verdict[verdict as usize])?;
            }
        }

        let mut m = enc.encode_descriptor(
            "throttles",
            "Requests denied for exceeding their token's ramp contract, by listener",
            None,
            MetricType::Counter,
        )?;
        for (listener, by_verdict) in &requests {
            let labels = [("listener", Lv(listener))];
            counter(&mut m, &labels, by_verdict[Verdict::Throttled as usize])?;
        }

        let mut m = enc.encode_descriptor(
            "tokens",
            "Tokens loaded into the datapath, by validity state",
            None,
            MetricType::Gauge,
        )?;
        let t = snap.tokens;
        for (s, n) in [
            ("active", t.active),
            ("revoked", t.revoked),
            ("expired", t.expired),
            ("not_yet_valid", t.not_yet_valid),
        ] {
            gauge(&mut m, &[("state", Lv(s))], n)?;
        }

        let mut m = enc.encode_descriptor(
            "expiring_tokens",
            "Active tokens that expire within the warning window",
            None,
            MetricType::Gauge,
        )?;
        plain_gauge(&mut m, snap.expiring_tokens)?;

        let mut m = enc.encode_descriptor(
            "breaches",
            "Ramp contract breaches over all tokens",
            None,
            MetricType::Counter,
        )?;
        plain_counter(&mut m, snap.breaches_total)?;

        let mut m = enc.encode_descriptor(
            "events_dropped",
            "Datapath events dropped by the kernel's per-CPU event rate cap or a full ring",
            None,
            MetricType::Counter,
        )?;
        plain_counter(&mut m, snap.events_dropped_total)?;

        let mut m = enc.encode_descriptor(
            "policy_reloads",
            "Policy reload attempts, by result",
            None,
            MetricType::Counter,
        )?;
        for (result, n) in [
            ("success", state.reloads_success.load(Ordering::Relaxed)),
            ("failure", state.reloads_failure.load(Ordering::Relaxed)),
        ] {
            counter(&mut m, &[("result", Lv(result))], n)?;
        }

        let mut m = enc.encode_descriptor(
            "policy_generation",
            "Generation of the policy the datapath enforces",
            None,
            MetricType::Gauge,
        )?;
        let generation = state.policy_generation.load(Ordering::Relaxed);
        plain_gauge(&mut m, generation)?;

        let mut maps: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
        for f in &snap.maps {
            maps.insert(&f.map, (f.entries, f.capacity));
        }
        let mut m = enc.encode_descriptor(
            "map_entries",
            "Entries in a datapath map",
            None,
            MetricType::Gauge,
        )?;
        for (map, (entries, _)) in &maps {
            gauge(&mut m, &[("map", Lv(map))], *entries)?;
        }
        let mut m = enc.encode_descriptor(
            "map_capacity",
            "Maximum entries of a datapath map",
            None,
            MetricType::Gauge,
        )?;
        for (map, (_, capacity)) in &maps {
            gauge(&mut m, &[("map", Lv(map))], *capacity)?;
        }

        // OpenMetrics `info`: the sample is `rampart_build_info{...} 1`.
        let mut m = enc.encode_descriptor(
            "build",
            "Version of the running rampart",
            None,
            MetricType::Info,
        )?;
        let build = &state.build;
        let mut labels = vec![("version", Lv(&build.version))];
        if let Some(commit) = &build.commit {
            labels.push(("commit", Lv(commit)));
        }
        m.encode_info(&labels)?;
        Ok(())
    }
}

fn counter<L>(m: &mut MetricEncoder, labels: &L, v: u64) -> Result<(), std::fmt::Error>
where
    L: prometheus_client::encoding::EncodeLabelSet,
{
    m.encode_family(labels)?
        .encode_counter::<(), _, u64>(&v, None)
}

/// Unlabelled samples are encoded without a family, else the crate writes an empty `{}`.
fn plain_counter(m: &mut MetricEncoder, v: u64) -> Result<(), std::fmt::Error> {
    m.encode_counter::<(), _, u64>(&v, None)
}

fn plain_gauge(m: &mut MetricEncoder, v: u64) -> Result<(), std::fmt::Error> {
    m.encode_gauge(&i64::try_from(v).unwrap_or(i64::MAX))
}

fn gauge<L>(m: &mut MetricEncoder, labels: &L, v: u64) -> Result<(), std::fmt::Error>
where
    L: prometheus_client::encoding::EncodeLabelSet,
{
    // The crate's gauges are i64; no fill level or token count comes near 2^63.
    let v = i64::try_from(v).unwrap_or(i64::MAX);
    m.encode_family(labels)?.encode_gauge(&v)
}

/// A label value, escaped as the exposition format requires (the crate writes values raw,
/// and listener names come from operator configuration).
struct Lv<'a>(&'a str);

impl EncodeLabelValue for Lv<'_> {
    fn encode(&self, enc: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        for c in self.0.chars() {
            match c {
                '\\' => enc.write_str("\\\\")?,
                '"' => enc.write_str("\\\"")?,
                '\n' => enc.write_str("\\n")?,
                c => enc.write_char(c)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use super::*;

    fn snapshot() -> DatapathSnapshot {
        let mut api = [0u64; VERDICT_COUNT];
        api[Verdict::Allow as usize] = 12_345;
        api[Verdict::Throttled as usize] = 7;
        // Exactly the kernel's u64, however large: no float round-trip.
        api[Verdict::Revoked as usize] = u64::MAX;
        let mut admin = [0u64; VERDICT_COUNT];
        admin[Verdict::Unknown as usize] = 2;
        DatapathSnapshot {
            requests: vec![
                ListenerRequests {
                    listener: "api".into(),
                    by_verdict: api,
                },
                ListenerRequests {
                    listener: "we\"ird\\".into(),
                    by_verdict: admin,
                },
            ],
            tokens: TokenCounts {
                active: 40,
                revoked: 3,
                expired: 2,
                not_yet_valid: 1,
            },
            breaches_total: 9,
            events_dropped_total: 11,
            maps: vec![MapFill {
                map: "tokens".into(),
                entries: 46,
                capacity: 1 << 20,
            }],
            expiring_tokens: 5,
        }
    }

    fn metrics() -> Metrics {
        let m = Metrics::new(BuildInfo {
            version: "1.2.3".into(),
            commit: Some("abc123".into()),
        });
        m.update(snapshot());
        m.record_reload(true);
        m.record_reload(true);
        m.record_reload(false);
        m.set_policy_generation(4);
        m
    }

    #[test]
    fn exposes_snapshot_values_exactly() {
        let text = metrics().encode();
        let lines: HashSet<&str> = text.lines().collect();
        for want in [
            "# TYPE rampart_requests counter",
            r#"rampart_requests_total{listener="api",verdict="allow"} 12345"#,
            r#"rampart_requests_total{listener="api",verdict="revoked"} 18446744073709551615"#,
            r#"rampart_requests_total{listener="api",verdict="not_yet_valid"} 0"#,
            r#"rampart_requests_total{listener="we\"ird\\",verdict="unknown"} 2"#,
            r#"rampart_throttles_total{listener="api"} 7"#,
            r#"rampart_throttles_total{listener="we\"ird\\"} 0"#,
            "# TYPE rampart_tokens gauge",
            r#"rampart_tokens{state="active"} 40"#,
            r#"rampart_tokens{state="revoked"} 3"#,
            r#"rampart_tokens{state="expired"} 2"#,
            r#"rampart_tokens{state="not_yet_valid"} 1"#,
            "rampart_expiring_tokens 5",
            "rampart_breaches_total 9",
            "rampart_events_dropped_total 11",
            r#"rampart_policy_reloads_total{result="success"} 2"#,
            r#"rampart_policy_reloads_total{result="failure"} 1"#,
            "rampart_policy_generation 4",
            r#"rampart_map_entries{map="tokens"} 46"#,
            r#"rampart_map_capacity{map="tokens"} 1048576"#,
            r#"rampart_build_info{version="1.2.3",commit="abc123"} 1"#,
        ] {
            assert!(lines.contains(want), "missing line {want:?} in:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn later_snapshot_replaces_earlier() {
        let m = metrics();
        let mut s = snapshot();
        s.requests[0].by_verdict[Verdict::Allow as usize] = 20_000;
        s.tokens.active = 39;
        m.update(s);
        let text = m.encode();
        assert!(
            text.contains("\nrampart_requests_total{listener=\"api\",verdict=\"allow\"} 20000\n")
        );
        assert!(text.contains("\nrampart_tokens{state=\"active\"} 39\n"));
        assert!(!text.contains(" 12345\n"));
    }

    #[test]
    fn every_family_is_well_formed() {
        let text = metrics().encode();
        let valid_name = |n: &str| {
            n.starts_with("rampart_")
                && n.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        };
        let mut types: HashMap<String, String> = HashMap::new();
        let mut helped: HashSet<String> = HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap();
                assert!(valid_name(name), "bad family name {name}");
                assert!(rest.len() > name.len() + 1, "empty HELP for {name}");
                helped.insert(name.to_owned());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, ty) = rest.split_once(' ').unwrap();
                assert!(helped.contains(name), "TYPE before HELP for {name}");
                types.insert(name.to_owned(), ty.to_owned());
            } else if line == "# EOF" {
                continue;
            } else {
                let name = line.split(['{', ' ']).next().unwrap();
                assert!(valid_name(name), "bad sample name {name}");
                let family = types
                    .keys()
                    .filter(|f| name.starts_with(f.as_str()))
                    .max_by_key(|f| f.len())
                    .unwrap_or_else(|| panic!("sample {name} has no TYPE"));
                match types[family].as_str() {
                    "counter" => assert_eq!(name, format!("{family}_total")),
                    "info" => assert_eq!(name, format!("{family}_info")),
                    _ => assert_eq!(name, family),
                }
                assert!(!line.contains("{}"), "empty label set in {line}");
                // Series are bounded by configuration: never a per-token label.
                assert!(!line.contains("fingerprint=") && !line.contains("token="));
            }
        }
        for family in [
            "rampart_requests",
            "rampart_tokens",
            "rampart_throttles",
            "rampart_breaches",
            "rampart_events_dropped",
            "rampart_policy_reloads",
            "rampart_policy_generation",
            "rampart_map_entries",
            "rampart_map_capacity",
            "rampart_build",
            "rampart_expiring_tokens",
        ] {
            assert!(types.contains_key(family), "family {family} missing");
        }
    }

    #[test]
    fn build_info_without_commit() {
        let m = Metrics::new(BuildInfo {
            version: "0.9.0".into(),
            commit: None,
        });
        assert!(m
            .encode()
            .lines()
            .any(|l| l == r#"rampart_build_info{version="0.9.0"} 1"#));
    }
}
