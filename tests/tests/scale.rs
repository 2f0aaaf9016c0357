//! Token populations and policies of thousands of tokens as an operator handles them:
//! `rampart token import` applies a file all or nothing (a bad line named by its number),
//! `token export` gives back what was imported, and a reload writes only the `TOKENS`
//! entries that changed, never rewriting a contract slot an entry still names (seen in
//! the pinned maps).
//!
//! Needs root, iproute2 and the binary (`cargo build -p rampart` first). Each test has its
//! own network namespace and a private bpffs mount.

use std::{
    collections::HashMap,
    fs,
    path::PathBuf,
    process::{Command, Output},
    thread::sleep,
    time::{Duration, Instant},
};

use agent_common::{Contract, Fingerprint, TokenInfo};
use rampart_tests::{
    daemon::{ConfigTemplate, DaemonProcess},
    gateway::rampart_binary,
    netns::Netns,
};

const HEAD: &str = r#"[[contract]]
name = "a"
stages = [{ after = "0s", rate = 100, burst = 100 }]

[[contract]]
name = "b"
stages = [{ after = "0s", rate = 200, burst = 100 }]

[[scope]]
name = "read"
methods = ["GET"]
prefix = "/"
"#;

/// Static tokens in the policy (the template's maps hold 4096).
const N: u64 = 3000;

fn fp(i: u64) -> Fingerprint {
    Fingerprint([0x5ca1e, i + 1])
}

/// `HEAD` (contract `a` at `rate_a` per second) and `n` static tokens on `a`, but token
/// `on_b` on `b`.
fn policy(n: u64, on_b: Option<u64>, rate_a: u32) -> String {
    let mut text = HEAD.replacen("rate = 100,", &format!("rate = {rate_a},"), 1);
    for i in 0..n {
        let c = if Some(i) == on_b { "b" } else { "a" };
        text.push_str(&format!(
            "\n[[token]]\nfingerprint = \"{}\"\ncontract = \"{c}\"\nscopes = [\"read\"]\n",
            fp(i)
        ));
    }
    text
}

struct Fixture {
    dir: tempfile::TempDir,
    bpffs: PathBuf,
    ns: Netns,
    daemon: DaemonProcess,
    reloads: u64,
}

impl Fixture {
    fn new(name: &str, policy: &str) -> Fixture {
        let ns = Netns::new(name).expect("network namespace");
        let dir = tempfile::Builder::new()
            .prefix("rmp-scale-")
            .tempdir()
            .expect("temp dir");
        let bpffs = dir.path().join("bpffs");
        fs::create_dir(&bpffs).expect("bpffs mount point");
        let out = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&bpffs)
            .output()
            .expect("mount");
        assert!(out.status.success(), "mount bpffs: {out:?}");
        let config = ConfigTemplate {
            dir: dir.path(),
            bpffs_dir: &bpffs.join("rampart"),
            control_socket: &dir.path().join("control.sock"),
            metrics_port: 9464,
            extra: "",
            listener: "name = \"api\"\ninterface = \"lo\"\nhook = \"tc\"\nports = [8080]\n\
                       mode = \"enforce\"\naction = \"drop\"\n",
        }
        .text();
        let daemon = DaemonProcess::new(
            "rampart",
            rampart_binary().unwrap_or_else(|e| panic!("{e}")),
            dir.path().join("rampart.toml"),
            dir.path().join("daemon.log"),
        );
        fs::write(&daemon.config, config).expect("config");
        fs::write(dir.path().join("policy.toml"), policy).expect("policy");
        let mut fx = Fixture {
            dir,
            bpffs,
            ns,
            daemon,
            reloads: 0,
        };
        let out = fx.cli(&["keygen"]);
        assert!(out.status.success(), "keygen: {out:?}");
        fx.daemon
            .start(&fx.ns, &[])
            .unwrap_or_else(|e| panic!("{e}"));
        fx
    }

    fn cli(&self, args: &[&str]) -> Output {
        self.daemon
            .cli(Some(&self.ns), args)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Writes the policy, reloads (SIGHUP) and returns the daemon's line about it.
    fn reload(&mut self, policy: &str) -> String {
        fs::write(self.dir.path().join("policy.toml"), policy).expect("policy");
        self.reloads += 1;
        let want = format!("generation {}", self.reloads + 1);
        self.daemon.signal(libc::SIGHUP).expect("SIGHUP");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let log = self.daemon.log_text(&[]);
            if let Some(line) = log.lines().find(|l| l.contains(&want)) {
                return line.to_owned();
            }
            assert!(Instant::now() < deadline, "no reload to {want}:\n{log}");
            sleep(Duration::from_millis(50));
        }
    }

    fn pin(&self, name: &str) -> aya::maps::MapData {
        aya::maps::MapData::from_pin(self.bpffs.join("rampart").join(name))
            .unwrap_or_else(|e| panic!("open pinned {name}: {e}"))
    }

    /// Every TOKENS entry, read from the pinned map.
    fn tokens(&self) -> HashMap<Fingerprint, TokenInfo> {
        let map: aya::maps::HashMap<_, Fingerprint, TokenInfo> =
            aya::maps::HashMap::try_from(aya::maps::Map::HashMap(self.pin("TOKENS_V2")))
                .expect("TOKENS");
        map.iter().map(|r| r.expect("TOKENS entry")).collect()
    }

    fn contract(&self, index: u32) -> Contract {
        let map: aya::maps::Array<_, Contract> =
            aya::maps::Array::try_from(aya::maps::Map::Array(self.pin("CONTRACTS")))
                .expect("CONTRACTS");
        map.get(&index, 0).expect("CONTRACTS slot")
    }

    fn in_kernel(&self) -> u64 {
        let out = self.cli(&["status", "--json"]);
        assert!(out.status.success(), "status: {out:?}");
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
        status["tokens"]["in_kernel"]
            .as_u64()
            .unwrap_or_else(|| panic!("no tokens.in_kernel in {status}"))
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.daemon.kill();
        let _ = Command::new("umount").arg("-l").arg(&self.bpffs).status();
    }
}

/// One token of thousands moves to another contract: the reload writes its entry alone,
/// and it keeps its runtime state's slot. Then contract `a` itself changes: its tokens
/// move to a new slot holding the new definition, and the slot they named before still
/// holds the old one (a request that read an entry a moment earlier is judged by the old
/// definition whole, never by a slot rewritten under it).
#[test]
fn a_reload_writes_only_the_changed_entries_and_never_rewrites_a_named_slot() {
    let mut fx = Fixture::new("scale-reload", &policy(N, None, 100));
    let before = fx.tokens();
    assert_eq!(before.len(), N as usize);
    let a = before[&fp(0)].contract;

    let line = fx.reload(&policy(N, Some(7), 100));
    assert!(line.contains(" 1 static token entries written"), "{line}");
    let after = fx.tokens();
    let changed: Vec<&Fingerprint> = after
        .iter()
        .filter(|(k, v)| before.get(k) != Some(v))
        .map(|(k, _)| k)
        .collect();
    assert_eq!(changed, [&fp(7)], "only the moved token's entry differs");
    assert_ne!(after[&fp(7)].contract, a);
    assert_eq!(after[&fp(7)].state_slot, before[&fp(7)].state_slot);

    let old_a = fx.contract(a);
    let line = fx.reload(&policy(N, Some(7), 50));
    assert!(
        line.contains(&format!(" {} static token entries written", N - 1)),
        "{line}"
    );
    let moved = fx.tokens();
    let new_a = moved[&fp(0)].contract;
    assert_ne!(new_a, a, "a redefined contract takes a new slot");
    assert!(moved
        .iter()
        .all(|(k, v)| *k == fp(7) || v.contract == new_a));
    assert_eq!(
        fx.contract(a),
        old_a,
        "the old slot keeps the old definition"
    );
    assert_ne!(fx.contract(new_a), old_a);
    assert_eq!(fx.in_kernel(), N);
}

/// JSON lines as `token export` prints them.
fn lines(n: u64, bad_line: Option<u64>) -> String {
    (1..=n)
        .map(|line| {
            let scope = if Some(line) == bad_line {
                "write"
            } else {
                "read"
            };
            format!(
                "{{\"fingerprint\":\"{}\",\"contract\":\"b\",\"scopes\":[\"{scope}\"],\
                 \"expires\":\"2099-01-01T00:00:00Z\",\"label\":\"partner {line}\"}}\n",
                Fingerprint([0x1a1e, line])
            )
        })
        .collect()
}

#[test]
fn token_import_is_all_or_nothing_and_export_gives_it_back() {
    let fx = Fixture::new("scale-import", HEAD);
    let file = fx.dir.path().join("tokens.jsonl");

    fs::write(&file, lines(1000, Some(700))).expect("import file");
    let out = fx.cli(&["token", "import", file.to_str().unwrap()]);
    assert!(!out.status.success(), "a bad line must refuse the file");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 700:"), "{err}");
    assert!(err.contains("nothing was imported"), "{err}");
    let export = fx.cli(&["token", "export"]);
    assert!(export.status.success(), "export: {export:?}");
    assert!(export.stdout.is_empty(), "nothing was recorded");
    assert_eq!(fx.in_kernel(), 0, "nothing was installed");

    let good = lines(1000, None);
    fs::write(&file, &good).expect("import file");
    let out = fx.cli(&["token", "import", file.to_str().unwrap()]);
    assert!(out.status.success(), "import: {out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "imported 1000 tokens\n"
    );
    let export = fx.cli(&["token", "export"]);
    assert_eq!(String::from_utf8_lossy(&export.stdout), good);
    assert_eq!(fx.in_kernel(), 1000);
    let kernel = fx.tokens();
    assert!((1..=1000).all(|line| kernel.contains_key(&Fingerprint([0x1a1e, line]))));

    // The same file again: its first line is already recorded, and nothing changes.
    let out = fx.cli(&["token", "import", file.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("line 1: token"),
        "{err}"
    );
    assert_eq!(fx.in_kernel(), 1000);
}
