//! Policy files as an operator writes them, and what `rampart check` tells them.

use std::path::{Path, PathBuf};

use agent_common::{gcra::stage_at, http::method, Fingerprint, Stage, TOKEN_ANY_SCOPE};

use super::*;
use crate::datapath::clock::unix_to_tai_ns;

fn compile(text: &str) -> CompiledPolicy {
    match CompiledPolicy::from_str(text, Path::new("policy.toml")) {
        Ok(p) => p,
        Err(diags) => panic!("unexpected errors:\n{}", Diagnostics(&diags)),
    }
}

/// Every diagnostic, as printed.
fn errors(text: &str) -> Vec<String> {
    CompiledPolicy::from_str(text, Path::new("policy.toml"))
        .expect_err("policy should be refused")
        .iter()
        .map(ToString::to_string)
        .collect()
}

/// The only diagnostic.
fn error(text: &str) -> String {
    let all = errors(text);
    assert_eq!(all.len(), 1, "expected one error, got {all:#?}");
    all.into_iter().next().unwrap()
}

const SEC: u64 = 1_000_000_000;
const FP1: &str = "00112233445566778899aabbccddeeff";
const FP2: &str = "0123456789abcdef0123456789abcdef";

const POLICY: &str = r#"
[[contract]]
name = "partner"
stages = [
  { after = "0s", rate = 5, burst = 10 },
  { after = "10m", rate = "0.5", burst = 2 },
  { after = "1h30m", rate = 20.25, burst = 40 },
]

[[contract]]
name = "bulk"
ramp = { start = 500, growth = "50%", step = "5m", cap = 5000, burst = 50 }
penalty = { demote = 2, cooldown = "10m" }

[[scope]]
name = "orders-read"
methods = ["GET", "HEAD"]
prefix = "/v1/orders"

[[scope]]
name = "orders-write"
methods = ["POST", "PUT", "DELETE"]
prefix = "/v1/orders/"

[[scope]]
name = "health"
methods = ["*"]
prefix = "/healthz"

[[token]]
fingerprint = "00112233445566778899aabbccddeeff"
contract = "bulk"
scopes = ["orders-read", "health"]
not_before = "2026-01-01T00:00:00Z"
expires = "2026-12-01T00:00:00Z"
label = "billing batch"

[[token]]
fingerprint = "0123456789abcdef0123456789abcdef"
contract = "partner"
scopes = ["*"]
"#;

#[test]
fn explicit_stages_compile_to_gcra_parameters() {
    let p = compile(POLICY);
    let (name, c) = &p.contracts[0];
    assert_eq!(name, "partner");
    assert_eq!(c.n_stages, 3);
    assert_eq!((c.penalty_stages, c.penalty_ns), (0, 0));
    assert_eq!(
        &c.stages[..3],
        &[
            // 5/s: one every 200 ms, 10 at once.
            Stage {
                after_ns: 0,
                interval_ns: 200_000_000,
                tolerance_ns: 2 * SEC,
            },
            // 0.5/s: one every 2 s, 2 at once.
            Stage {
                after_ns: 600 * SEC,
                interval_ns: 2 * SEC,
                tolerance_ns: 4 * SEC,
            },
            // 20.25/s: 1e12 / 20250 ns.
            Stage {
                after_ns: 5400 * SEC,
                interval_ns: 49_382_716,
                tolerance_ns: 40 * 49_382_716,
            },
        ]
    );
    assert_eq!(stage_at(c, 600 * SEC - 1), 0);
    assert_eq!(stage_at(c, 600 * SEC), 1);
}

#[test]
fn ramp_rule_expands_to_stages_with_penalty() {
    let p = compile(POLICY);
    let (name, c) = &p.contracts[1];
    assert_eq!(name, "bulk");
    assert_eq!(c.n_stages, 7);
    // 500, 750, 1125, 1687.5, 2531.25, 3796.875, 5000 per second, every 5 minutes.
    let rates_milli = [
        500_000u64, 750_000, 1_125_000, 1_687_500, 2_531_250, 3_796_875, 5_000_000,
    ];
    for (k, milli) in rates_milli.iter().enumerate() {
        let interval = 1_000_000_000_000 / milli;
        assert_eq!(
            c.stages[k],
            Stage {
                after_ns: k as u64 * 300 * SEC,
                interval_ns: interval,
                tolerance_ns: 50 * interval,
            },
            "stage {k}"
        );
    }
    assert_eq!(c.stages[7], Stage::default());
    assert_eq!((c.penalty_stages, c.penalty_ns), (2, 600 * SEC));
}

#[test]
fn scopes_compile_to_method_sets_and_prefixes() {
    let p = compile(POLICY);
    let names: Vec<&str> = p.scopes.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["orders-read", "orders-write", "health"]);
    let read = &p.scopes[0].1;
    assert_eq!(read.methods, method::GET | method::HEAD);
    assert_eq!(&read.prefix[..read.prefix_len as usize], b"/v1/orders");
    assert!(read.prefix[read.prefix_len as usize..]
        .iter()
        .all(|&b| b == 0));
    assert_eq!(
        p.scopes[1].1.methods,
        method::POST | method::PUT | method::DELETE
    );
    assert_eq!(p.scopes[2].1.methods, method::ALL);
}

#[test]
fn static_tokens_reference_contracts_and_scopes() {
    let p = compile(POLICY);
    assert_eq!(p.tokens.len(), 2);
    let billing = &p.tokens[0];
    assert_eq!(billing.fingerprint.to_string(), FP1);
    assert_eq!(billing.label.as_deref(), Some("billing batch"));
    assert_eq!(billing.info.contract, 1);
    assert_eq!(billing.info.flags, 0);
    assert_eq!(billing.info.scopes, 0b101, "orders-read (0) and health (2)");
    assert_eq!(billing.info.ramp_start_ns, 0);
    // CLOCK_TAI times; the TAI offset is read from the clock, so allow for its jitter.
    let near = |got: u64, want: u64| got.abs_diff(want) < SEC / 1000;
    assert!(near(
        billing.info.not_before_ns,
        unix_to_tai_ns(1_767_225_600)
    ));
    assert!(near(billing.info.expires_ns, unix_to_tai_ns(1_796_083_200)));
    let partner = &p.tokens[1];
    assert_eq!(partner.info.contract, 0);
    assert_eq!(
        (partner.info.flags, partner.info.scopes),
        (TOKEN_ANY_SCOPE, 0)
    );
    assert_eq!(
        (partner.info.not_before_ns, partner.info.expires_ns),
        (0, 0)
    );
    assert_eq!(partner.label, None);
}

#[test]
fn lookups_for_token_issuing() {
    let p = compile(POLICY);
    assert_eq!(p.contract_index("partner"), Some(0));
    assert_eq!(p.contract_index("bulk"), Some(1));
    assert_eq!(p.contract_index("nope"), None);
    let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(p.scope_mask(&names(&["health"])).unwrap(), (0, 0b100));
    assert_eq!(
        p.scope_mask(&names(&["orders-write", "orders-read"]))
            .unwrap(),
        (0, 0b011)
    );
    assert_eq!(p.scope_mask(&names(&["*"])).unwrap(), (TOKEN_ANY_SCOPE, 0));
    assert_eq!(
        p.scope_mask(&names(&["admin"])).unwrap_err().to_string(),
        "unknown scope `admin`"
    );
    assert!(matches!(
        p.scope_mask(&names(&["*", "health"])),
        Err(PolicyError::WildcardWithNames)
    ));
    assert!(matches!(p.scope_mask(&[]), Err(PolicyError::NoScopes)));
}

#[test]
fn fingerprints_round_trip() {
    let fp = Fingerprint([0x0011_2233_4455_6677, 0x8899_aabb_ccdd_eeff]);
    assert_eq!(fp.to_string(), FP1);
    assert_eq!(parse_fingerprint(FP1), Some(fp));
    let small = Fingerprint([1, 2]);
    assert_eq!(small.to_string(), "00000000000000010000000000000002");
    assert_eq!(parse_fingerprint(&small.to_string()), Some(small));
    for bad in [
        "00112233445566778899AABBCCDDEEFF",
        "00112233445566778899aabbccddeef",
        "00112233445566778899aabbccddeeff0",
        "+0112233445566778899aabbccddeeff",
        "0011223344556677 899aabbccddeeff",
        "",
    ] {
        assert_eq!(parse_fingerprint(bad), None, "{bad:?}");
    }
}

#[test]
fn files_merge_and_reference_each_other() {
    let sources = [
        (
            PathBuf::from("tokens.toml"),
            format!("[[token]]\nfingerprint = \"{FP1}\"\ncontract = \"c\"\nscopes = [\"s\"]\n"),
        ),
        (
            PathBuf::from("contracts.toml"),
            "[[contract]]\nname = \"c\"\nstages = [{ after = \"0s\", rate = 1, burst = 1 }]\n\
             [[scope]]\nname = \"s\"\nmethods = [\"GET\"]\nprefix = \"/\"\n"
                .to_string(),
        ),
    ];
    let p = CompiledPolicy::from_sources(&sources).unwrap();
    assert_eq!(p.tokens[0].info.contract, 0);
    assert_eq!(p.tokens[0].info.scopes, 1);
}

#[test]
fn name_defined_twice_across_files_is_reported_at_the_second() {
    let c = "[[contract]]\nname = \"c\"\nstages = [{ after = \"0s\", rate = 1, burst = 1 }]\n";
    let sources = [
        (PathBuf::from("a.toml"), c.to_string()),
        (PathBuf::from("b.toml"), format!("\n{c}")),
    ];
    let diags = CompiledPolicy::from_sources(&sources).unwrap_err();
    let shown: Vec<String> = diags.iter().map(ToString::to_string).collect();
    assert_eq!(
        shown,
        ["b.toml:3:8: contract `c` is already defined at a.toml:2:8"]
    );
}

#[test]
fn every_error_is_collected_in_order() {
    let text = r#"
[[contract]]
name = "c"
stages = [
  { after = "0s", rate = 0, burst = 0 },
  { after = "5 fortnights", rate = "lots", burst = 1 },
]

[[scope]]
name = "s"
methods = ["get"]
prefix = "v1"

[[token]]
fingerprint = "00112233445566778899aabbccddeeff"
contract = "missing"
scopes = ["s", "t"]
colour = "blue"
"#;
    assert_eq!(
        errors(text),
        [
            "policy.toml:5:26: rate 0 is out of range: it must be between 0.001 and 1000000 \
             requests per second",
            "policy.toml:5:37: `burst` must be at least 1",
            "policy.toml:6:13: invalid duration `5 fortnights` (unknown time unit \"fortnights\", \
             supported units: ns, us/µs, ms, sec, min, hours, days, weeks, months, years (and few \
             variations)); write it like \"30s\", \"5m\" or \"1h30m\"",
            "policy.toml:6:36: invalid rate `lots`: expected requests per second, like 5 or \"0.5\"",
            "policy.toml:11:12: unknown method `get`: use GET, HEAD, POST, PUT, DELETE, PATCH, \
             OPTIONS, CONNECT, TRACE (upper case) or \"*\"",
            "policy.toml:12:10: scope prefix `v1` must start with '/'",
            "policy.toml:16:12: unknown contract `missing`",
            "policy.toml:17:16: unknown scope `t`",
            "policy.toml:18:1: unknown key `colour` in token (expected `fingerprint`, \
             `contract`, `scopes`, `not_before`, `expires` or `label`)",
        ]
    );
}

#[test]
fn stage_rules() {
    let contract = |stages: &str| format!("[[contract]]\nname = \"c\"\nstages = [{stages}]\n");
    assert_eq!(
        error(&contract(r#"{ after = "1m", rate = 1, burst = 1 }"#)),
        "policy.toml:3:21: the first stage must start at `after = \"0s\"`"
    );
    assert_eq!(
        error(&contract(
            r#"{ after = "0s", rate = 1, burst = 1 }, { after = "10m", rate = 2, burst = 1 }, { after = "5m", rate = 3, burst = 1 }"#
        )),
        "policy.toml:3:100: stages out of order: `after` must be later than the previous \
         stage's (10m)"
    );
    assert_eq!(
        error(&contract(
            r#"{ after = "0s", rate = 1, burst = 1 }, { after = "0s", rate = 2, burst = 1 }"#
        )),
        "policy.toml:3:60: stages out of order: `after` must be later than the previous \
         stage's (0s)"
    );
    assert_eq!(
        error(&contract("")),
        "policy.toml:3:10: contract `c` has no stages"
    );
    assert_eq!(
        error(&contract(r#"{ after = "0s", rate = 1 }"#)),
        "policy.toml:3:11: a stage is missing `burst`"
    );
    assert_eq!(
        error(&contract(r#"{ after = 0, rate = 1, burst = 1 }"#)),
        "policy.toml:3:21: `after` must be a duration string like \"10m\""
    );
    assert_eq!(
        error(&contract(r#"{ after = "0s", rate = 2000000, burst = 1 }"#)),
        "policy.toml:3:34: rate 2000000 is out of range: it must be between 0.001 and 1000000 \
         requests per second"
    );
    let seventeen: Vec<String> = (0..17)
        .map(|i| format!("{{ after = \"{i}m\", rate = 1, burst = 1 }}"))
        .collect();
    let err = error(&contract(&seventeen.join(",\n")));
    assert!(
        err.starts_with("policy.toml:19:1: contract `c` has more than 16 stages"),
        "{err}"
    );
    assert_eq!(
        error("[[contract]]\nname = \"c\"\n"),
        "policy.toml:1:1: contract `c` needs `stages` or `ramp`"
    );
    assert_eq!(
        error(
            "[[contract]]\nname = \"c\"\nstages = [{ after = \"0s\", rate = 1, burst = 1 }]\n\
             ramp = { start = 1, growth = \"50%\", step = \"1m\", cap = 2, burst = 1 }\n"
        ),
        "policy.toml:4:8: contract `c` sets both `stages` and `ramp`; keep one"
    );
}

#[test]
fn ramp_and_penalty_rules() {
    let ramp = |r: &str| format!("[[contract]]\nname = \"r\"\nramp = {{ {r} }}\n");
    assert_eq!(
        error(&ramp(
            r#"start = 1, growth = "10%", step = "1m", cap = 5000, burst = 5"#
        )),
        "policy.toml:3:8: ramp from 1/s to 5000/s growing 10% per 1m needs 91 stages, more \
         than the 16 a contract can hold: use a larger growth per step (and a larger step to \
         keep the ramp's length), or list `stages` explicitly"
    );
    assert_eq!(
        error(&ramp(
            r#"start = 1, growth = "10", step = "1m", cap = 2, burst = 5"#
        )),
        "policy.toml:3:30: invalid growth `10`: expected a positive percentage like \"50%\""
    );
    assert_eq!(
        error(&ramp(r#"start = 1, growth = "10%", step = "1m", cap = 2"#)),
        "policy.toml:3:8: ramp is missing `burst`"
    );
    let penalised = |p: &str| {
        format!(
            "[[contract]]\nname = \"p\"\nstages = [{{ after = \"0s\", rate = 1, burst = 1 }}, \
             {{ after = \"1m\", rate = 2, burst = 1 }}]\npenalty = {{ {p} }}\n"
        )
    };
    assert_eq!(
        error(&penalised(r#"demote = 2, cooldown = "10m""#)),
        "policy.toml:4:22: penalty `demote` (2) must be less than the number of stages (2)"
    );
    assert_eq!(
        error(&penalised(r#"demote = 0, cooldown = "10m""#)),
        "policy.toml:4:22: penalty `demote` must be at least 1 stage"
    );
    assert_eq!(
        error(&penalised(r#"demote = 1, cooldown = "0s""#)),
        "policy.toml:4:36: penalty `cooldown` must be longer than 0s"
    );
    assert_eq!(
        error(&penalised(
            r#"demote = 1, cooldown = "10m", forgive = true"#
        )),
        "policy.toml:4:43: unknown key `forgive` in penalty (expected `demote` or `cooldown`)"
    );
}

#[test]
fn scope_rules() {
    assert_eq!(
        error("[[scope]]\nname = \"s\"\nprefix = \"/\"\n"),
        "policy.toml:1:1: scope `s` has no `methods` (like [\"GET\"], or [\"*\"] for every method)"
    );
    assert_eq!(
        error("[[scope]]\nname = \"s\"\nmethods = []\nprefix = \"/\"\n"),
        "policy.toml:3:11: scope `s` has no methods (like [\"GET\"], or [\"*\"] for every method)"
    );
    assert_eq!(
        error("[[scope]]\nname = \"s\"\nmethods = [\"GET\"]\n"),
        "policy.toml:1:1: scope `s` has no `prefix` (the request path it covers, like \"/\")"
    );
    let long = format!("/{}", "a".repeat(128));
    assert_eq!(
        error(&format!(
            "[[scope]]\nname = \"s\"\nmethods = [\"GET\"]\nprefix = \"{long}\"\n"
        )),
        "policy.toml:4:10: scope prefix is 129 bytes, longer than the 128 the datapath compares"
    );
    assert_eq!(
        error("[[scope]]\nname = \"s\"\nmethods = [\"GET\"]\nprefix = \"/a b\"\n"),
        "policy.toml:4:10: scope prefix may only hold visible ASCII characters (percent-encode \
         others, as request paths do)"
    );
    assert_eq!(
        error("[[scope]]\nname = \"a b\"\nmethods = [\"GET\"]\nprefix = \"/\"\n"),
        "policy.toml:2:8: invalid scope name `a b`: use 1 to 64 letters, digits, '-', '_' or '.'"
    );
    let mut many = String::new();
    for i in 0..=64 {
        many.push_str(&format!(
            "[[scope]]\nname = \"s{i}\"\nmethods = [\"GET\"]\nprefix = \"/{i}\"\n"
        ));
    }
    assert_eq!(
        error(&many),
        "policy.toml:257:1: more than 64 scopes (a token's scopes are a 64-bit set)"
    );
}

#[test]
fn token_rules() {
    let head = "[[contract]]\nname = \"c\"\nstages = [{ after = \"0s\", rate = 1, burst = 1 }]\n";
    let token = |body: &str| format!("{head}[[token]]\n{body}\n");
    let plaintext = "sk_live_this_is_a_secret_bearer_token";
    let err = error(&token(&format!(
        "fingerprint = \"{plaintext}\"\ncontract = \"c\"\nscopes = [\"*\"]"
    )));
    assert_eq!(
        err,
        "policy.toml:5:15: fingerprint must be 32 lowercase hex digits (what `rampart \
         fingerprint` prints; never the token itself)"
    );
    assert!(!err.contains(plaintext));
    // Its references are still checked.
    assert_eq!(
        errors(&format!(
            "{head}[[token]]\nfingerprint = \"{plaintext}\"\ncontract = \"d\"\nscopes = [\"s\"]\n"
        ))[1..],
        [
            "policy.toml:6:12: unknown contract `d`",
            "policy.toml:7:11: unknown scope `s`"
        ]
    );
    let twice = format!(
        "{head}[[token]]\nfingerprint = \"{FP2}\"\ncontract = \"c\"\nscopes = [\"*\"]\n\
         [[token]]\nfingerprint = \"{FP2}\"\ncontract = \"c\"\nscopes = [\"*\"]\n"
    );
    assert_eq!(
        error(&twice),
        format!("policy.toml:9:15: fingerprint {FP2} is already listed at policy.toml:5:15")
    );
    assert_eq!(
        error(&token(&format!(
            "fingerprint = \"{FP1}\"\ncontract = \"c\"\nscopes = []"
        ))),
        "policy.toml:7:10: token has no scopes: list scope names, or [\"*\"] for every scope"
    );
    assert_eq!(
        error(&token(&format!(
            "fingerprint = \"{FP1}\"\ncontract = \"c\"\nscopes = [\"*\", \"x\"]"
        ))),
        "policy.toml:7:10: \"*\" already grants every scope; list it alone"
    );
    assert_eq!(
        error(&token(&format!(
            "fingerprint = \"{FP1}\"\nscopes = [\"*\"]"
        ))),
        "policy.toml:4:1: token is missing `contract`"
    );
    assert_eq!(
        error(&token(&format!(
            "fingerprint = \"{FP1}\"\ncontract = \"c\"\nscopes = [\"*\"]\n\
             not_before = \"2026-12-01T00:00:00Z\"\nexpires = \"2026-06-01T00:00:00Z\""
        ))),
        "policy.toml:9:11: `expires` must be later than `not_before`"
    );
    assert_eq!(
        error(&token(&format!(
            "fingerprint = \"{FP1}\"\ncontract = \"c\"\nscopes = [\"*\"]\n\
             expires = \"2026-12-01 00:00\""
        ))),
        "policy.toml:8:11: invalid timestamp `2026-12-01 00:00` (timestamp format is \
         invalid); write UTC RFC 3339 like \"2026-12-01T00:00:00Z\""
    );
    // An unquoted TOML datetime is accepted too.
    let p = compile(&token(&format!(
        "fingerprint = \"{FP1}\"\ncontract = \"c\"\nscopes = [\"*\"]\nexpires = 2026-12-01T00:00:00Z"
    )));
    assert!(
        p.tokens[0]
            .info
            .expires_ns
            .abs_diff(unix_to_tai_ns(1_796_083_200))
            < SEC / 1000
    );
}

#[test]
fn file_level_errors() {
    assert_eq!(
        error("[[contract]\nname = 1\n"),
        "policy.toml:1:11: invalid table header\nexpected `.`, `]]`"
    );
    assert_eq!(
        error("[contract]\nname = \"c\"\n"),
        "policy.toml:1:1: `contract` must be a list of tables (`[[contract]]` or `contract = [{ .. }]`)"
    );
    assert_eq!(
        error("version = 2\n"),
        "policy.toml:1:1: unknown key `version` in a policy file (expected `contract`, `scope` or `token`)"
    );
    let diags = CompiledPolicy::load(&[PathBuf::from("/nonexistent/policy.toml")]).unwrap_err();
    assert_eq!(diags.len(), 1);
    assert!(diags[0]
        .to_string()
        .starts_with("/nonexistent/policy.toml: cannot read policy file: "));
    assert_eq!(
        PolicyError::from(diags).to_string(),
        "/nonexistent/policy.toml: cannot read policy file: No such file or directory (os error 2)"
    );
}

/// `n` static tokens, five lines each (plus a contract and a scope), fingerprint `i`.
fn many_tokens(n: usize) -> String {
    let mut text = String::from(
        "[[contract]]\nname = \"c\"\nstages = [{ after = \"0s\", rate = 5, burst = 10 }]\n\n\
         [[scope]]\nname = \"s\"\nmethods = [\"GET\"]\nprefix = \"/\"\n",
    );
    for i in 0..n {
        text.push_str(&format!(
            "\n[[token]]\nfingerprint = \"{:032x}\"\ncontract = \"c\"\nscopes = [\"s\"]\n",
            i + 1
        ));
    }
    text
}

/// A policy of many static tokens compiles to every one of them, and a mistake deep in it
/// is still reported at its own line, every one of them in the same run.
#[test]
fn many_static_tokens_compile_and_late_mistakes_keep_their_lines() {
    const N: usize = 50_000;
    let p = compile(&many_tokens(N));
    assert_eq!(p.tokens.len(), N);
    let last = p.tokens.last().unwrap();
    assert_eq!(last.fingerprint, Fingerprint([0, N as u64]));
    assert_eq!(last.info.contract, 0);
    assert_eq!(last.info.scopes, 1);

    // Tokens start at line 10, five lines apart; their `fingerprint` is the second line.
    let fp_line = |i: usize| 10 + 5 * i + 1;
    let mut text = many_tokens(N);
    // The last token repeats the first one's fingerprint; the one before names no contract
    // the policy defines.
    let first = format!("{:032x}", 1);
    let last = format!("{:032x}", N);
    text = text.replacen(
        &format!("fingerprint = \"{last}\""),
        &format!("fingerprint = \"{first}\""),
        1,
    );
    let before_last = format!("fingerprint = \"{:032x}\"\ncontract = \"c\"", N - 1);
    text = text.replacen(
        &before_last,
        &format!("fingerprint = \"{:032x}\"\ncontract = \"gold\"", N - 1),
        1,
    );
    assert_eq!(
        errors(&text),
        [
            format!(
                "policy.toml:{}:12: unknown contract `gold`",
                fp_line(N - 2) + 1
            ),
            format!(
                "policy.toml:{}:15: fingerprint {first} is already listed at policy.toml:{}:15",
                fp_line(N - 1),
                fp_line(0)
            ),
        ]
    );
}
