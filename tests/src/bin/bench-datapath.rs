//! `cargo xtask bench datapath`: BPF_PROG_TEST_RUN timings of the XDP program, each case
//! next to a trivial XDP_PASS baseline measured in the same run. Prints a table and writes
//! target/bench/datapath.json (`{"case": ns_per_run, ...}`, baseline included).
//!
//! Every case is checked to take the path it claims (its verdict is counted `repeat` times).

use std::{collections::BTreeMap, fs, path::PathBuf, time::Duration};

use agent_common::{
    default_policy, deny_action, gcra::NANOS_PER_SEC, mode, siphash::fingerprint, Contract,
    FingerprintKey, GlobalConfig, ListenerConfig, ListenerKey, Stage, TokenInfo, Verdict,
    CLOCK_FIXED, CLOCK_REAL, TOKEN_ANY_SCOPE,
};
use anyhow::{bail, Context as _};
use rampart::datapath::{Datapath, LoadOptions, TestPrograms};
use rampart_tests::packet::{syn_of, typical_request, Frame, Http};

const PORT: u16 = 8080;
/// A second listener, whose action is `reset`: each of its requests also checks whether
/// it retransmits a segment already reset.
const RESET_PORT: u16 = 8081;
/// A third listener, whose action is `respond`.
const RESPOND_PORT: u16 = 8082;
const LOOPBACK_IFINDEX: u32 = 1;
const KEY: FingerprintKey = FingerprintKey([0x1111_2222_3333_4444, 0x5555_6666_7777_8888]);

struct Case {
    name: &'static str,
    frame: Vec<u8>,
    /// The verdict the run must count (None: not counted, e.g. a bare ACK).
    verdict: Option<Verdict>,
    /// Target, as ns above the baseline.
    target_ns: Option<f64>,
    /// Run with the real clock (a `bpf_ktime_get_tai_ns` call per admission, as in
    /// production) instead of the emulated one the other cases use.
    real_clock: bool,
    /// Segments of the same connection sent once before the timed runs (after the SYN
    /// of `frame`'s connection): what the timed segment continues.
    setup: Vec<Vec<u8>>,
    /// Requests the timed segment carries (each counted).
    per_run: u64,
    /// One run per BPF_PROG_TEST_RUN call (the baseline too), the durations summed: for
    /// cases whose program rewrites the frame, which a repeated run would then judge as
    /// the rewritten frame. Each call's duration includes the kernel's timer reads.
    single: bool,
}

impl Case {
    fn new(
        name: &'static str,
        frame: Vec<u8>,
        verdict: Option<Verdict>,
        target_ns: Option<f64>,
    ) -> Case {
        Case {
            name,
            frame,
            verdict,
            target_ns,
            real_clock: false,
            setup: Vec::new(),
            per_run: 1,
            single: false,
        }
    }

    fn one_per_call(self) -> Case {
        Case {
            single: true,
            ..self
        }
    }

    /// `frame` continues a connection that carried `setup` first.
    fn after(self, setup: Vec<Vec<u8>>) -> Case {
        Case { setup, ..self }
    }

    fn carrying(self, per_run: u64) -> Case {
        Case { per_run, ..self }
    }

    fn with_real_clock(self) -> Case {
        Case {
            real_clock: true,
            ..self
        }
    }
}

fn token(len: usize, seed: usize) -> String {
    let a = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    (0..len)
        .map(|i| a[(i * 31 + seed * 7) % a.len()] as char)
        .collect()
}

/// `len` bytes of prose in 60-byte lines.
fn text_body(len: usize) -> Vec<u8> {
    let line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit sed.\n";
    line.iter().copied().cycle().take(len).collect()
}

/// A segment of the bench's connection (`Frame::tcp`'s) carrying `payload` from stream
/// offset `off` (its SYN is `syn_of` the segment at offset 0).
fn segment_at(off: usize, payload: &[u8]) -> Vec<u8> {
    let mut f = Frame::tcp(PORT, payload);
    f.seq = f.seq.wrapping_add(off as u32);
    f.build()
}

/// A request with about `size` bytes of header block, the bearer field last.
fn large_block(token: &str, size: usize) -> Vec<u8> {
    let mut h = Http::get("/v1/reports/large");
    for i in 0..size / 100 {
        h = h.header(&format!("X-Filler-{i:04}: {}", "f".repeat(84)));
    }
    h.bearer(token).bytes()
}

/// A JWT-shaped token (header.payload.signature) of `len` bytes.
fn jwt(len: usize) -> String {
    let mut t = token(len, 3).into_bytes();
    t[36] = b'.';
    t[len - 44] = b'.';
    String::from_utf8(t).unwrap()
}

fn main() -> anyhow::Result<()> {
    let repeat: u32 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()
        .context("repeat count")?
        .unwrap_or(1_000_000);
    // Optional: only the cases whose name contains this (for profiling one path).
    let only = std::env::args().nth(2);
    let options = LoadOptions {
        max_tokens: 1 << 16,
        max_revoked: 1 << 16,
        token_stats: 1 << 16,
        ..LoadOptions::default()
    };
    let mut dp = Datapath::load(options.clone()).context("loading the datapath (run as root)")?;
    // The baseline and the floor: the test object's programs.
    let mut test = TestPrograms::load(&options).context("loading the test programs")?;
    let config = GlobalConfig {
        key: KEY,
        events_per_sec: 1000,
        clock_mode: CLOCK_FIXED,
        fixed_now_ns: 1_900_000_000 * NANOS_PER_SEC,
    };
    dp.set_config(&config)?;
    test.set_floor_config(&config)?;
    // Both listeners count in row 0, which the bench checks.
    let listener = ListenerConfig {
        id: 0,
        mode: mode::ENFORCE,
        action: deny_action::DROP,
        on_missing: default_policy::DENY,
        on_unknown: default_policy::DENY,
        on_incomplete: default_policy::DENY,
        on_not_http: agent_common::default_policy::DENY,
        _pad: [0; 2],
    };
    dp.set_listener(
        ListenerKey {
            // As the daemon keys listeners: by interface. BPF_PROG_TEST_RUN runs XDP as if
            // received on the namespace's loopback device.
            ifindex: LOOPBACK_IFINDEX,
            port: PORT,
            _pad: 0,
        },
        listener,
    )?;
    dp.set_listener(
        ListenerKey {
            ifindex: LOOPBACK_IFINDEX,
            port: RESET_PORT,
            _pad: 0,
        },
        ListenerConfig {
            id: 0,
            action: deny_action::RESET,
            ..listener
        },
    )?;
    dp.set_listener(
        ListenerKey {
            ifindex: LOOPBACK_IFINDEX,
            port: RESPOND_PORT,
            _pad: 0,
        },
        ListenerConfig {
            id: 0,
            action: deny_action::RESPOND,
            ..listener
        },
    )?;
    dp.set_responses(0, &rampart::respond::ResponseConfig::default())?;
    // The steady state of a gateway that has reset nothing in the last 30 s (a load
    // starts as if it just had: flows an earlier program set reset stay recognised).
    dp.forget_last_reset()?;
    // 1,000,000/s with a burst that covers every repetition at one emulated instant.
    let mut c = Contract {
        n_stages: 1,
        ..Default::default()
    };
    c.stages[0] = Stage {
        after_ns: 0,
        interval_ns: 1_000,
        tolerance_ns: 1_000 * 100_000_000,
    };
    dp.set_contract(0, &c)?;
    let t43 = token(43, 1);
    let t1k = jwt(1024);
    let t4k = token(4096, 2);
    let t43_real = token(43, 3);
    let info = TokenInfo {
        contract: 0,
        flags: TOKEN_ANY_SCOPE,
        ..Default::default()
    };
    for t in [&t43, &t43_real, &t1k, &t4k] {
        dp.install_token(fingerprint(&KEY, t.as_bytes()), info)?;
    }
    // The floor's own TOKENS, as large as the datapath's: the tokens it is run with.
    for t in [&t43, &t1k] {
        test.install_floor_token(fingerprint(&KEY, t.as_bytes()), info)?;
    }
    let body_head = Http::get("/v1/uploads/1")
        .method("POST")
        .bearer(&t43)
        .header("Content-Length: 1000000000")
        .bytes();
    let large = large_block(&t43, agent_common::SCAN_BYTES - 512);
    let large_cuts: Vec<usize> = (0..12).map(|i| i * large.len() / 12).collect();
    let mut ack = Frame::tcp(PORT, b"");
    ack.flags = 0x10;
    let cases = vec![
        Case::new("non_http_ack", ack.build(), None, Some(15.0)),
        Case::new(
            "uninspected_port_request",
            Frame::tcp(9999, &typical_request(&t43)).build(),
            None,
            None,
        ),
        Case::new(
            "allowed_typical_43b_token",
            Frame::tcp(PORT, &typical_request(&t43)).build(),
            Some(Verdict::Allow),
            Some(250.0),
        ),
        // A token of its own: the others' ramp state lives at the emulated time.
        Case::new(
            "allowed_typical_real_clock",
            Frame::tcp(PORT, &typical_request(&t43_real)).build(),
            Some(Verdict::Allow),
            None,
        )
        .with_real_clock(),
        Case::new(
            "allowed_typical_reset_listener",
            Frame::tcp(RESET_PORT, &typical_request(&t43)).build(),
            Some(Verdict::Allow),
            None,
        ),
        Case::new(
            "allowed_1k_jwt",
            Frame::tcp(PORT, &typical_request(&t1k)).build(),
            Some(Verdict::Allow),
            Some(1500.0),
        ),
        Case::new(
            "allowed_4k_token",
            Frame::tcp(PORT, &typical_request(&t4k)).build(),
            Some(Verdict::Allow),
            None,
        ),
        Case::new(
            "missing_token",
            Frame::tcp(PORT, &Http::get("/v1/reports/x").bytes()).build(),
            Some(Verdict::Missing),
            None,
        ),
        // A full-size segment of a Content-Length body that reads like text (and like an
        // extension method, "Lorem "): body, passed without a look.
        Case::new(
            "body_segment_text",
            segment_at(body_head.len(), &text_body(1400)),
            Some(Verdict::Pass),
            None,
        )
        .after(vec![segment_at(0, &body_head)]),
        // The second segment of a typical request cut in two: the held first part and
        // this one judged whole.
        Case::new(
            "request_in_2_segments",
            segment_at(200, &typical_request(&t43)[200..]),
            Some(Verdict::Allow),
            None,
        )
        .after(vec![segment_at(0, &typical_request(&t43)[..200])]),
        // The last of 12 segments of a header block of about SCAN_BYTES bytes.
        Case::new(
            "large_block_last_of_12",
            segment_at(large_cuts[11], &large[large_cuts[11]..]),
            Some(Verdict::Allow),
            None,
        )
        .after(
            (0..11)
                .map(|i| segment_at(large_cuts[i], &large[large_cuts[i]..large_cuts[i + 1]]))
                .collect(),
        ),
        Case::new(
            "pipelined_pair",
            Frame::tcp(
                PORT,
                &[typical_request(&t43), typical_request(&t43)].concat(),
            )
            .build(),
            Some(Verdict::Allow),
            None,
        )
        .carrying(2),
        Case::new(
            "malformed_scheme",
            Frame::tcp(
                PORT,
                &Http::get("/v1/reports/x")
                    .header("Authorization: Basic dXNlcjpwYXNz")
                    .bytes(),
            )
            .build(),
            Some(Verdict::Malformed),
            None,
        ),
        Case::new(
            "malformed_token_char",
            Frame::tcp(
                PORT,
                &Http::get("/v1/reports/x")
                    .bearer(&format!("{},", token(42, 5)))
                    .bytes(),
            )
            .build(),
            Some(Verdict::Malformed),
            None,
        ),
        Case::new(
            "unknown_token_short",
            Frame::tcp(
                PORT,
                &Http::get("/v1/reports/x").bearer(&token(43, 9)).bytes(),
            )
            .build(),
            Some(Verdict::Unknown),
            None,
        ),
        Case::new(
            "unknown_token",
            Frame::tcp(PORT, &typical_request(&token(43, 9))).build(),
            Some(Verdict::Unknown),
            None,
        ),
        // The same denied request, dropped and answered (401), one run per call.
        Case::new(
            "unknown_token_drop_1x",
            Frame::tcp(PORT, &typical_request(&token(43, 9))).build(),
            Some(Verdict::Unknown),
            None,
        )
        .one_per_call(),
        Case::new(
            "unknown_token_respond_1x",
            Frame::tcp(RESPOND_PORT, &typical_request(&token(43, 9))).build(),
            Some(Verdict::Unknown),
            None,
        )
        .one_per_call(),
    ];

    let mut results: BTreeMap<String, f64> = BTreeMap::new();
    println!(
        "{:<28} {:>10} {:>10} {:>12} {:>10} {:>8}",
        "case", "ns/run", "baseline", "Δ baseline", "target Δ", "met"
    );
    let mut baselines = Vec::new();
    let mut missed = Vec::new();
    for case in cases
        .iter()
        .filter(|c| only.as_deref().is_none_or(|o| c.name.contains(o)))
    {
        dp.set_config(&GlobalConfig {
            clock_mode: if case.real_clock {
                CLOCK_REAL
            } else {
                CLOCK_FIXED
            },
            ..config
        })?;
        let per_round = (repeat / ROUNDS).max(1);
        // A new connection (its SYN), then what the case continues: the timed runs
        // after the first repeat the connection's last segment, judged again each time.
        dp.forget_flows()?;
        let mut out = vec![0u8; 1 << 16];
        // The connection starts with the first setup segment (offset 0), if any.
        let first = case.setup.first().unwrap_or(&case.frame);
        for f in syn_of(first).into_iter().chain(case.setup.iter().cloned()) {
            dp.test_run_xdp(&f, &mut out, 1)?;
        }
        let before = dp.verdict_counts(0)?;
        let mut out = vec![0u8; case.frame.len() + 1024];
        let (base, took) = if case.single {
            alternating_single(&mut test, &case.frame, per_round, || {
                Ok(dp.test_run_xdp(&case.frame, &mut out, 1)?.duration)
            })?
        } else {
            alternating(&mut test, &case.frame, per_round, |_| {
                Ok(dp.test_run_xdp(&case.frame, &mut out, per_round)?.duration)
            })?
        };
        let after = dp.verdict_counts(0)?;
        let repeat = per_round * ROUNDS;
        let counted: u64 = after.iter().sum::<u64>() - before.iter().sum::<u64>();
        match case.verdict {
            Some(v) => {
                let n = after[v as usize] - before[v as usize];
                if n != repeat as u64 * case.per_run || counted != n {
                    bail!(
                        "{}: expected {repeat} × {}, counted {n} (of {counted})",
                        case.name,
                        v.name()
                    );
                }
            }
            None if counted != 0 => bail!("{}: expected no verdict, counted {counted}", case.name),
            None => {}
        }
        let delta = took - base;
        let met = case.target_ns.map(|t| delta <= t);
        if met == Some(false) {
            missed.push(case.name);
        }
        println!(
            "{:<28} {:>10.1} {:>10.1} {:>12.1} {:>10} {:>8}",
            case.name,
            took,
            base,
            delta,
            case.target_ns
                .map(|t| format!("≤ {t:.0}"))
                .unwrap_or_else(|| "-".into()),
            match met {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "-",
            }
        );
        results.insert(case.name.to_string(), took);
        baselines.push(base);
    }
    if baselines.is_empty() {
        bail!("no case matches {only:?}");
    }
    // The floor next to the two targeted cases: what the least work any implementation
    // must do costs on this machine (see agent-ebpf's `floor`).
    let floors = [
        ("floor_typical_43b_token", &t43, 250.0),
        ("floor_1k_jwt", &t1k, 1500.0),
    ];
    let mut printed_header = false;
    for (name, tok, target) in floors
        .into_iter()
        .filter(|(n, ..)| only.as_deref().is_none_or(|o| n.contains(o)))
    {
        if !printed_header {
            println!(
                "\nfloor: an LF test of every payload word, SipHash-2-4-128 of the token from packet memory, one TOKENS lookup"
            );
            printed_header = true;
        }
        let frame = floor_frame(tok);
        let per_round = (repeat / ROUNDS).max(1);
        let (base, took) = alternating(&mut test, &frame, per_round, |test| {
            let r = test.test_run_floor(&frame, per_round)?;
            // XDP_PASS: the fingerprint was found, so the hash covered the right bytes.
            if r.return_value != 2 {
                bail!("{name}: the floor program answered {}", r.return_value);
            }
            Ok(r.duration)
        })?;
        println!(
            "{:<28} {:>10.1} {:>10.1} {:>12.1} {:>10} {:>8}",
            name,
            took,
            base,
            took - base,
            format!("≤ {target:.0}"),
            format!("{:.0} %", (took - base) / target * 100.0),
        );
        results.insert(name.to_string(), took);
        baselines.push(base);
    }
    let baseline = baselines.iter().sum::<f64>() / baselines.len() as f64;
    results.insert("baseline_xdp_pass".into(), baseline);
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    fs::create_dir_all(&dir)?;
    // A filtered run writes its own file: datapath.json always holds every case.
    let path = match &only {
        None => dir.join("datapath.json"),
        Some(_) => dir.join("datapath-filtered.json"),
    };
    let json = format!(
        "{{{}}}\n",
        results
            .iter()
            .map(|(k, v)| format!("\"{k}\": {v:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    fs::write(&path, json)?;
    println!("\nrepeat {repeat} per case, as {ROUNDS} alternating rounds of baseline and case (medians); baseline = rampart_pass (XDP_PASS) on the same frame, same run");
    println!("wrote {}", path.display());
    if !missed.is_empty() {
        println!("targets missed: {}", missed.join(", "));
    }
    Ok(())
}

/// The typical request carrying `token`, as the floor program reads it: the TCP window
/// field holds the token's offset in the payload, the urgent pointer its length.
fn floor_frame(token: &str) -> Vec<u8> {
    let payload = typical_request(token);
    let off = payload
        .windows(token.len())
        .position(|w| w == token.as_bytes())
        .expect("the request carries the token");
    let mut f = Frame::tcp(PORT, &payload).build();
    // Ethernet, IPv4 and TCP without options: window at 48, urgent pointer at 52.
    f[48..50].copy_from_slice(&(off as u16).to_be_bytes());
    f[52..54].copy_from_slice(&(token.len() as u16).to_be_bytes());
    f
}

/// Rounds per case (see the loop in `main`).
const ROUNDS: u32 = 5;

/// ROUNDS alternating runs of the baseline and `run`, `per_round` repetitions each, and
/// the median ns per run of each side: a burst of other work on the machine lands in
/// one round, and both sides of the difference see the same conditions.
fn alternating(
    test: &mut TestPrograms,
    frame: &[u8],
    per_round: u32,
    mut run: impl FnMut(&mut TestPrograms) -> anyhow::Result<Duration>,
) -> anyhow::Result<(f64, f64)> {
    let (mut bases, mut runs) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        bases.push(test.test_run_pass(frame, per_round)?.duration.as_nanos() as f64);
        runs.push(run(test)?.as_nanos() as f64);
    }
    Ok((median(bases), median(runs)))
}

/// `alternating` for cases that run once per call: `per_round` calls of each side per
/// round, their mean ns per run.
fn alternating_single(
    test: &mut TestPrograms,
    frame: &[u8],
    per_round: u32,
    mut run: impl FnMut() -> anyhow::Result<Duration>,
) -> anyhow::Result<(f64, f64)> {
    let (mut bases, mut runs) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let (mut b, mut r) = (Duration::ZERO, Duration::ZERO);
        for _ in 0..per_round {
            b += test.test_run_pass(frame, 1)?.duration;
            r += run()?;
        }
        bases.push(b.as_nanos() as f64 / f64::from(per_round));
        runs.push(r.as_nanos() as f64 / f64::from(per_round));
    }
    Ok((median(bases), median(runs)))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
