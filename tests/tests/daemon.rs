//! `rampart run` as an operator sees it: issue, revoke (denied the moment the command
//! returns), kill -9 (enforcement goes on), restart (pins adopted, counters kept), a broken
//! policy reload (rejected with file:line:col, old policy kept), SIGTERM (still enforcing),
//! `rampart detach` (nothing left). Finally no log, state, export or metrics file holds a
//! plaintext token.
//!
//! Needs root, iproute2 and curl, and the binary: `cargo build -p rampart` first (the xtask
//! test command does). Each test has its own network namespace and a private bpffs mount.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use rampart_tests::{
    client::{BearerToken, Curl, Request},
    daemon::{redact, ConfigTemplate, DaemonProcess},
    gateway::{bpffs_root, rampart_binary},
    netns::{Netns, VethConfig, VethPair},
    upstream::UpstreamServer,
};

const PORT: u16 = 8080;
const POLICY: &str = r#"[[contract]]
name = "std"
stages = [{ after = "0s", rate = 1000, burst = 1000 }]

[[scope]]
name = "all"
methods = ["*"]
prefix = "/"
"#;
/// Line 3, column 34 is the bad rate.
const BROKEN_POLICY: &str = r#"[[contract]]
name = "std"
stages = [{ after = "0s", rate = "fast", burst = 1000 }]

[[scope]]
name = "all"
methods = ["*"]
prefix = "/"
"#;

/// The daemon's configuration file: the one template with this file's listener (TC on
/// `lo`, reset) and its expiry warning window.
fn config_text(dir: &Path, bpffs: &Path) -> String {
    ConfigTemplate {
        dir,
        bpffs_dir: &bpffs.join("rampart"),
        control_socket: &dir.join("run/control.sock"),
        metrics_port: 9464,
        extra: "expiry_warning = \"1h\"\n",
        listener: &format!(
            "name = \"api\"\ninterface = \"lo\"\nhook = \"tc\"\nports = [{PORT}]\n\
             mode = \"enforce\"\naction = \"reset\"\n"
        ),
    }
    .text()
}

fn daemon_process(dir: &Path) -> DaemonProcess {
    DaemonProcess::new(
        "rampart",
        rampart_binary().unwrap_or_else(|e| panic!("{e}")),
        dir.join("rampart.toml"),
        dir.join("daemon.log"),
    )
}

struct Fixture {
    dir: tempfile::TempDir,
    bpffs: PathBuf,
    ns: Netns,
    upstream: UpstreamServer,
    daemon: DaemonProcess,
    tokens: Vec<BearerToken>,
}

impl Fixture {
    /// Writes the configuration file: the fixture's default (`config_text`) as `edit`
    /// leaves it.
    fn write_config(&self, edit: impl FnOnce(String) -> String) {
        let text = edit(config_text(self.dir.path(), &self.bpffs));
        fs::write(&self.daemon.config, text).expect("config");
    }

    fn new(name: &str) -> Fixture {
        let ns = Netns::new(name).expect("network namespace");
        let dir = tempfile::Builder::new()
            .prefix("rmp-daemon-")
            .tempdir()
            .expect("temp dir");
        let bpffs = dir.path().join("bpffs");
        fs::create_dir(&bpffs).expect("bpffs mount point");
        // A private bpffs: this test's pins cannot collide with anyone's, and unmounting it
        // takes whatever a failed test left behind.
        let out = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&bpffs)
            .output()
            .expect("mount");
        assert!(out.status.success(), "mount bpffs: {out:?}");
        let daemon = daemon_process(dir.path());
        fs::write(&daemon.config, config_text(dir.path(), &bpffs)).expect("config");
        fs::write(dir.path().join("policy.toml"), POLICY).expect("policy");
        let upstream =
            UpstreamServer::start(&ns, "upstream", SocketAddr::from(([127, 0, 0, 1], PORT)))
                .expect("upstream server");
        let fx = Fixture {
            dir,
            bpffs,
            ns,
            upstream,
            daemon,
            tokens: Vec::new(),
        };
        let out = fx.cli(&["keygen"]);
        assert!(out.status.success(), "keygen: {}", fx.show(&out.stderr));
        fx
    }

    fn show(&self, bytes: &[u8]) -> String {
        redact(&String::from_utf8_lossy(bytes), &self.tokens)
    }

    fn log(&self) -> String {
        self.daemon.log_text(&self.tokens)
    }

    /// `rampart <args>` in the daemon's network namespace (where `detach` finds netlink
    /// filters; control socket and pins are files, reachable from anywhere).
    fn cli(&self, args: &[&str]) -> Output {
        self.daemon
            .cli(Some(&self.ns), args)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn start(&mut self) {
        self.daemon
            .start(&self.ns, &self.tokens)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    fn signal(&self, sig: libc::c_int) {
        self.daemon.signal(sig).unwrap_or_else(|e| panic!("{e}"));
    }

    /// SIGTERM, and the clean exit it must lead to.
    fn stop(&mut self) {
        let st = self
            .daemon
            .stop(&self.tokens)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            st.success(),
            "rampart run after SIGTERM: {st}\n{}",
            self.log()
        );
    }

    fn wait_exit(&mut self) -> ExitStatus {
        self.daemon
            .wait_exit(&self.tokens)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Issues a token; returns it (kept for redaction and the final scan) and its fingerprint.
    fn issue(&mut self) -> (BearerToken, String) {
        self.issue_with(&["token", "issue", "--contract", "std", "--scope", "all"])
    }

    /// `rampart <args>` for a verb that prints a new token (issue, rotate).
    fn issue_with(&mut self, args: &[&str]) -> (BearerToken, String) {
        let out = self.cli(args);
        let (token, fp) = rampart_tests::cli::issued(&out);
        self.tokens.push(token.clone());
        assert!(
            out.status.success(),
            "{}: {}",
            args.join(" "),
            self.show(&out.stderr)
        );
        let fp = fp.unwrap_or_else(|| panic!("no fingerprint in: {}", self.show(&out.stderr)));
        assert_eq!(fp.len(), 32, "fingerprint {fp}");
        (token, fp)
    }

    /// The status of one request (0: connection reset, nothing answered).
    fn request(&self, token: Option<&BearerToken>) -> u16 {
        let mut req = Request::get("/v1/items");
        if let Some(t) = token {
            req = req.token(t);
        }
        Curl::new(&self.ns, &format!("http://127.0.0.1:{PORT}"))
            .timeout(Duration::from_secs(3))
            .send(&req)
            .expect("curl")
            .status
    }

    /// A request must be answered by the upstream.
    fn assert_allowed(&self, token: Option<&BearerToken>, what: &str) {
        let before = self.upstream.count();
        assert_eq!(self.request(token), 200, "{what}: expected 200");
        assert_eq!(self.upstream.count(), before + 1, "{what}: upstream count");
    }

    /// A request must be refused without ever reaching the upstream.
    fn assert_denied(&self, token: Option<&BearerToken>, what: &str) {
        let before = self.upstream.count();
        let status = self.request(token);
        assert_ne!(status, 200, "{what}: expected a denial");
        assert_eq!(
            self.upstream.count(),
            before,
            "{what}: reached the upstream"
        );
    }

    /// `rampart events --follow --json <args>`: the child and its lines as they come.
    fn follow(&self, args: &[&str]) -> (Child, std::sync::mpsc::Receiver<String>) {
        let mut sub = self
            .daemon
            .cli_command(None)
            .args(["events", "--follow", "--json"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("rampart events");
        let stdout = sub.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        (sub, rx)
    }

    fn status_json(&self) -> serde_json::Value {
        let out = self.cli(&["status", "--json"]);
        assert!(out.status.success(), "status: {}", self.show(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    fn metrics(&self) -> String {
        let out = self
            .ns
            .command("curl")
            .args(["-s", "-m", "5", "http://127.0.0.1:9464/metrics"])
            .output()
            .expect("curl metrics");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.daemon.kill();
        // Unmounting the private bpffs drops every pin, and with them links and maps.
        let _ = Command::new("umount").arg("-l").arg(&self.bpffs).status();
    }
}

fn counter(status: &serde_json::Value, verdict: &str) -> u64 {
    status["listeners"][0]["requests"][verdict]
        .as_u64()
        .unwrap_or_else(|| panic!("no {verdict} counter in status"))
}

#[test]
fn daemon_enforces_across_revoke_crash_restart_reload_and_detach() {
    let mut fx = Fixture::new("daemon");
    fx.start();
    let (a, fp_a) = fx.issue();
    let (b, _fp_b) = fx.issue();

    fx.assert_allowed(Some(&a), "token A after issue");
    fx.assert_allowed(Some(&b), "token B after issue");
    fx.assert_denied(None, "no token");

    // Revocation holds as soon as the command returns: no sleep in between.
    let out = fx.cli(&["token", "revoke", &fp_a]);
    assert!(out.status.success(), "revoke: {}", fx.show(&out.stderr));
    fx.assert_denied(Some(&a), "token A right after revoke");
    fx.assert_allowed(Some(&b), "token B after A's revoke");

    let before_crash = fx.status_json();
    let program_before = before_crash["listeners"][0]["program_id"].as_u64();
    assert_eq!(before_crash["listeners"][0]["adopted"], false);
    let allow_before = counter(&before_crash, "allow");
    assert!(allow_before >= 3, "allow counter {allow_before}");
    assert!(counter(&before_crash, "revoked") >= 1);

    // The exported event stream saw the revoked request, by fingerprint only.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let events = fs::read_to_string(fx.dir.path().join("events.jsonl")).unwrap_or_default();
        if events
            .lines()
            .any(|l| l.contains(&fp_a) && l.contains("revoked"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no revoked event for {fp_a} in the export:\n{}",
            fx.show(events.as_bytes())
        );
        sleep(Duration::from_millis(100));
    }
    // The live stream (`events.subscribe`) delivers the next denial of A.
    let (mut sub, rx) = fx.follow(&["--token", &fp_a]);
    // The subscription is live once the daemon answered it; retry the request until then.
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        fx.assert_denied(Some(&a), "token A while subscribed");
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(500)) {
            break line;
        }
        assert!(Instant::now() < deadline, "no live event for {fp_a}");
    };
    let _ = sub.kill();
    let _ = sub.wait();
    let ev: serde_json::Value = serde_json::from_str(&line).expect("event JSON");
    assert_eq!(
        ev["fingerprint"],
        fp_a.as_str(),
        "{}",
        fx.show(line.as_bytes())
    );
    assert_eq!(ev["verdict"], "revoked", "{}", fx.show(line.as_bytes()));

    let metrics_before = fx.metrics();
    assert!(
        metrics_before.contains("verdict=\"allow\""),
        "metrics:\n{}",
        fx.show(metrics_before.as_bytes())
    );

    // kill -9: the pinned program keeps judging with the pinned maps.
    fx.signal(libc::SIGKILL);
    fx.wait_exit();
    fx.assert_denied(Some(&a), "revoked token with the daemon dead");
    fx.assert_allowed(Some(&b), "valid token with the daemon dead");
    fx.assert_denied(None, "no token with the daemon dead");

    // Restart: the link is adopted (program swapped in place), counters carry on.
    fx.start();
    let after = fx.status_json();
    assert_eq!(after["listeners"][0]["adopted"], true, "link adopted");
    assert_ne!(
        after["listeners"][0]["program_id"].as_u64(),
        program_before,
        "the new daemon's program runs in the link"
    );
    let allow_after = counter(&after, "allow");
    assert!(
        allow_after > allow_before,
        "allow counter restarted: {allow_before} before, {allow_after} after"
    );
    fx.assert_denied(Some(&a), "revoked token after restart");
    fx.assert_allowed(Some(&b), "valid token after restart");

    // A broken policy is rejected with its location; the running policy stays.
    fs::write(fx.dir.path().join("policy.toml"), BROKEN_POLICY).expect("write policy");
    fx.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while fx.status_json()["reloads_failed"].as_u64().unwrap_or(0) == 0 {
        assert!(
            Instant::now() < deadline,
            "reload not attempted:\n{}",
            fx.log()
        );
        sleep(Duration::from_millis(100));
    }
    let log = fx.log();
    assert!(
        log.contains("policy.toml:3:34:"),
        "no file:line:col diagnostic in the log:\n{log}"
    );
    assert_eq!(fx.status_json()["policy_generation"], 1);
    fx.assert_allowed(Some(&b), "valid token after a rejected reload");
    fx.assert_denied(Some(&a), "revoked token after a rejected reload");

    // A fixed policy reloads (SIGHUP or the file watcher, whichever comes first).
    fs::write(fx.dir.path().join("policy.toml"), POLICY).expect("write policy");
    fx.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while fx.status_json()["policy_generation"].as_u64().unwrap_or(0) < 2 {
        assert!(
            Instant::now() < deadline,
            "reload did not succeed:\n{}",
            fx.log()
        );
        sleep(Duration::from_millis(100));
    }
    fx.assert_allowed(Some(&b), "valid token after a good reload");
    fx.assert_denied(Some(&a), "revoked token after a good reload");
    let metrics_after = fx.metrics();

    // SIGTERM: a clean stop that leaves enforcement in place.
    fx.stop();
    fx.assert_denied(Some(&a), "revoked token after SIGTERM");
    fx.assert_allowed(Some(&b), "valid token after SIGTERM");

    // Detach: no link, no map, traffic flows unjudged.
    let out = fx.cli(&["detach"]);
    assert!(out.status.success(), "detach: {}", fx.show(&out.stderr));
    let left: Vec<_> = fs::read_dir(&fx.bpffs)
        .expect("bpffs")
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| !n.to_string_lossy().ends_with(".debug"))
        .collect();
    assert!(left.is_empty(), "left in bpffs: {left:?}");
    let filters = fx
        .ns
        .exec(&["tc", "filter", "show", "dev", "lo", "ingress"])
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    assert!(filters.trim().is_empty(), "tc filters left: {filters}");
    fx.assert_allowed(None, "no token after detach (nothing judges)");

    // Not one plaintext token anywhere: logs, SQLite (and WAL), export, metrics.
    let mut found = Vec::new();
    fs::write(fx.dir.path().join("metrics-1.txt"), metrics_before).expect("save metrics");
    fs::write(fx.dir.path().join("metrics-2.txt"), metrics_after).expect("save metrics");
    let mut all = Vec::new();
    rampart_tests::gateway::walk(fx.dir.path(), &mut all);
    let names: Vec<String> = all
        .iter()
        .map(|(p, _)| {
            p.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    for want in ["daemon.log", "rampart.db", "events.jsonl", "metrics-1.txt"] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} not scanned: {names:?}"
        );
    }
    for (path, bytes) in &all {
        for (i, tok) in fx.tokens.iter().enumerate() {
            let needle = tok.expose().as_bytes();
            if bytes.windows(needle.len()).any(|w| w == needle) {
                found.push(format!("token #{i} in {}", path.display()));
            }
        }
    }
    assert!(found.is_empty(), "plaintext tokens found: {found:?}");
}

/// A restart with another listener: the new one judges, the old port and hook are let go
/// (its LISTENERS entry and its pinned link removed).
#[test]
fn restart_with_a_changed_listener_lets_the_old_one_go() {
    relisten("relisten", None);
}

/// The same with the tc listener attached through netlink: pruning its pin deletes its
/// cls_bpf filter.
#[test]
fn restart_with_a_changed_listener_deletes_the_old_netlink_filter() {
    relisten("relisten-nl", Some("netlink"));
}

fn relisten(name: &str, tc_attach: Option<&str>) {
    let mut fx = Fixture::new(name);
    fx.write_config(|text| match tc_attach {
        Some(t) => text.replace(
            "hook = \"tc\"",
            &format!("hook = \"tc\"\ntc_attach = \"{t}\""),
        ),
        None => text,
    });
    fx.start();
    fx.assert_denied(None, "no token on the first listener");
    let tag = match tc_attach {
        Some(_) => "tcnl",
        None => auto_tc_tag(),
    };
    assert_eq!(link_pins(&fx), [format!("link_0_if1_{tag}")]);
    let filters = rampart_filter_programs(&fx).len();
    assert_eq!(filters, usize::from(tag == "tcnl"), "{}", lo_filters(&fx));
    fx.signal(libc::SIGKILL);
    fx.wait_exit();

    // Same listener id, now XDP (generic) on another port.
    let other = UpstreamServer::start(
        &fx.ns,
        "other",
        SocketAddr::from(([127, 0, 0, 1], PORT + 1)),
    )
    .expect("second upstream");
    fx.write_config(|text| {
        text.replace("hook = \"tc\"", "hook = \"xdp\"\nxdp_mode = \"generic\"")
            .replace(
                &format!("ports = [{PORT}]"),
                &format!("ports = [{}]", PORT + 1),
            )
    });
    fx.start();
    assert_eq!(link_pins(&fx), ["link_0_if1_xdpskb"], "old link pruned");
    assert_eq!(
        rampart_filter_programs(&fx),
        [0u64; 0],
        "old filter deleted:\n{}",
        lo_filters(&fx)
    );
    fx.assert_allowed(None, "the old port is no longer judged");
    let before = other.count();
    let status = Curl::new(&fx.ns, &format!("http://127.0.0.1:{}", PORT + 1))
        .timeout(Duration::from_secs(3))
        .send(&Request::get("/"))
        .expect("curl")
        .status;
    assert_ne!(status, 200, "no token on the new listener");
    assert_eq!(other.count(), before, "denied request reached the upstream");
}

/// The pin tag of a tc listener with `tc_attach = "auto"`: a TCX link from Linux 6.6 on,
/// a netlink filter before.
fn auto_tc_tag() -> &'static str {
    let tcx = aya::util::KernelVersion::current()
        .map_or(true, |k| k >= aya::util::KernelVersion::new(6, 6, 0));
    if tcx {
        "tc"
    } else {
        "tcnl"
    }
}

/// `tc filter show dev lo ingress` in the test's namespace.
fn lo_filters(fx: &Fixture) -> String {
    let out = fx
        .ns
        .exec(&["tc", "filter", "show", "dev", "lo", "ingress"])
        .expect("tc filter show");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The ids of the programs in rampart's netlink filters on lo (priority 0x7261 = 29281,
/// handle "ramp").
fn rampart_filter_programs(fx: &Fixture) -> Vec<u64> {
    lo_filters(fx)
        .lines()
        .filter(|l| l.contains("pref 29281") && l.contains("handle 0x72616d70"))
        .filter_map(|l| {
            let rest = l.split(" id ").nth(1)?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .collect()
}

/// A tc listener forced onto netlink (what kernels before 6.6 get): the cls_bpf filter
/// enforces, outlives kill -9 and SIGTERM, a restart swaps its program in place with no
/// request slipping through, and `rampart detach` deletes it.
#[test]
fn netlink_tc_filter_enforces_across_crash_restart_and_detach() {
    let mut fx = Fixture::new("tcnl");
    fx.write_config(|text| text.replace("hook = \"tc\"", "hook = \"tc\"\ntc_attach = \"netlink\""));
    fx.start();
    let (token, _fp) = fx.issue();
    fx.assert_denied(None, "no token");
    fx.assert_allowed(Some(&token), "valid token");
    assert_eq!(link_pins(&fx), ["link_0_if1_tcnl"]);
    let first = fx.status_json();
    assert_eq!(first["listeners"][0]["adopted"], false);
    let program_first = first["listeners"][0]["program_id"]
        .as_u64()
        .expect("program id");
    assert_eq!(
        rampart_filter_programs(&fx),
        [program_first],
        "our filter runs the daemon's program:\n{}",
        lo_filters(&fx)
    );

    // kill -9: the filter holds its program; the pinned maps keep the tokens.
    fx.signal(libc::SIGKILL);
    fx.wait_exit();
    fx.assert_denied(None, "no token with the daemon dead");
    fx.assert_allowed(Some(&token), "valid token with the daemon dead");

    // Restart while requests without a token keep coming: not one may reach the upstream.
    let before = fx.upstream.count();
    let load = fx
        .ns
        .command("sh")
        .args([
            "-c",
            &format!(
                "while :; do curl -s -o /dev/null -m 1 -w '%{{http_code}}\\n' \
                 http://127.0.0.1:{PORT}/v1/items; done"
            ),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("request loop");
    fx.start();
    // SAFETY: kill(2) on the loop's shell, our child; then reap it.
    unsafe { libc::kill(load.id() as libc::pid_t, libc::SIGKILL) };
    let out = load.wait_with_output().expect("request loop output");
    let tried = String::from_utf8_lossy(&out.stdout).lines().count();
    assert!(tried > 0, "the request loop sent nothing");
    assert_eq!(
        fx.upstream.count(),
        before,
        "a request without a token reached the upstream during the restart ({tried} sent)"
    );
    let after = fx.status_json();
    assert_eq!(after["listeners"][0]["adopted"], true, "filter adopted");
    let program_after = after["listeners"][0]["program_id"]
        .as_u64()
        .expect("program id");
    assert_ne!(
        program_after, program_first,
        "the new daemon's program judges"
    );
    assert_eq!(
        rampart_filter_programs(&fx),
        [program_after],
        "the same filter, its program replaced:\n{}",
        lo_filters(&fx)
    );
    assert_eq!(link_pins(&fx), ["link_0_if1_tcnl"]);
    fx.assert_denied(None, "no token after restart");
    fx.assert_allowed(Some(&token), "valid token after restart");

    // SIGTERM: a clean stop that leaves the filter in place.
    fx.stop();
    fx.assert_denied(None, "no token after SIGTERM");
    fx.assert_allowed(Some(&token), "valid token after SIGTERM");
    assert_eq!(rampart_filter_programs(&fx), [program_after]);

    let out = fx.cli(&["detach"]);
    assert!(out.status.success(), "detach: {}", fx.show(&out.stderr));
    let filters = lo_filters(&fx);
    assert!(
        !filters.contains("pref 29281") && !filters.contains("0x72616d70"),
        "rampart's filter left on lo:\n{filters}"
    );
    assert!(
        !fx.bpffs.join("rampart").exists(),
        "pin dir left after detach"
    );
    fx.assert_allowed(None, "no token after detach (nothing judges)");
}

/// Names of the link pins, sorted.
fn link_pins(fx: &Fixture) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(fx.bpffs.join("rampart"))
        .expect("pin dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("link_"))
        .collect();
    v.sort();
    v
}

/// A restart that moves a listener from native to generic XDP on the same interface: the
/// kernel allows one XDP mode per interface, so the old link must make way (today's daemon
/// detaches it just before attaching the new one); enforcement, tokens and counters go on.
#[test]
fn restart_from_native_to_generic_xdp_on_one_interface() {
    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
    let mut fx = Fixture::new("xdpmode");
    let client = Netns::new("xdpmode-client").expect("client namespace");
    let veth = VethPair::create(
        &fx.ns,
        VethConfig {
            name: "rmpsrv",
            ipv4: SERVER,
            ipv6: "fd77::1".parse().expect("ipv6"),
        },
        &client,
        VethConfig {
            name: "rmpcli",
            ipv4: Ipv4Addr::new(10, 77, 0, 2),
            ipv6: "fd77::2".parse().expect("ipv6"),
        },
    )
    .expect("veth between client and daemon");
    let upstream = UpstreamServer::start(&fx.ns, "veth-upstream", SocketAddr::from((SERVER, PORT)))
        .expect("upstream on the veth address");
    let config = |mode: &'static str| {
        move |text: String| {
            text.replace("interface = \"lo\"", "interface = \"rmpsrv\"")
                .replace(
                    "hook = \"tc\"",
                    &format!("hook = \"xdp\"\nxdp_mode = \"{mode}\""),
                )
                // XDP_TX back into a veth needs a program on the peer; a drop needs nothing.
                .replace("action = \"reset\"", "action = \"drop\"")
        }
    };
    let request = |token: Option<&BearerToken>| {
        let mut req = Request::get("/v1/items");
        if let Some(t) = token {
            req = req.token(t);
        }
        Curl::new(&client, &format!("http://{SERVER}:{PORT}"))
            .timeout(Duration::from_secs(2))
            .send(&req)
            .expect("curl")
            .status
    };
    let xdp_of = |fx: &Fixture| {
        let out = fx
            .ns
            .exec(&["ip", "link", "show", "dev", "rmpsrv"])
            .expect("ip link show");
        // The first line names the XDP mode: ` xdp ` native, ` xdpgeneric ` generic.
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines().next().unwrap_or_default().to_owned()
    };
    let tag = |t: &str| format!("link_0_if{}_{t}", veth.a.ifindex);

    fx.write_config(config("native"));
    fx.start();
    let (token, _fp) = fx.issue();
    assert_eq!(link_pins(&fx), [tag("xdpdrv")]);
    assert!(xdp_of(&fx).contains(" xdp "), "native XDP: {}", xdp_of(&fx));
    let before = upstream.count();
    assert_eq!(request(Some(&token)), 200, "token over native XDP");
    assert_ne!(request(None), 200, "no token over native XDP");
    assert_eq!(
        upstream.count(),
        before + 1,
        "only the token's request got through"
    );
    let allowed = counter(&fx.status_json(), "allow");

    fx.signal(libc::SIGKILL);
    fx.wait_exit();
    fx.write_config(config("generic"));
    fx.start();
    assert_eq!(link_pins(&fx), [tag("xdpskb")], "one link, in the new mode");
    let link = xdp_of(&fx);
    assert!(link.contains(" xdpgeneric "), "generic XDP: {link}");
    assert!(!link.contains(" xdp "), "native XDP left behind: {link}");
    let log = fx.log();
    assert!(
        log.contains("XDP mode changed"),
        "no warning of the gap:\n{log}"
    );
    let status = fx.status_json();
    assert_eq!(status["listeners"][0]["adopted"], false);
    let before = upstream.count();
    assert_eq!(request(Some(&token)), 200, "token over generic XDP");
    assert_ne!(request(None), 200, "no token over generic XDP");
    assert_eq!(
        upstream.count(),
        before + 1,
        "only the token's request got through"
    );
    assert!(
        counter(&fx.status_json(), "allow") > allowed,
        "counters carried over"
    );

    // Same mode again: the link is adopted in place.
    fx.signal(libc::SIGKILL);
    fx.wait_exit();
    fx.start();
    assert_eq!(fx.status_json()["listeners"][0]["adopted"], true);
    assert_eq!(link_pins(&fx), [tag("xdpskb")]);
}

/// An unpinned datapath with room for the 100k-token tests.
fn datapath_for_100k() -> rampart::datapath::Datapath {
    rampart_tests::netns::require_root().expect("root");
    rampart::datapath::Datapath::load(rampart::datapath::LoadOptions {
        max_tokens: 131_072,
        max_revoked: 1024,
        token_stats: 1024,
        ring_bytes: 65_536,
        max_flows: 1024,
        pin_dir: None,
    })
    .expect("load the datapath")
}

/// `rampart_breaches_total` and the map fill levels are refreshed every few seconds. With
/// 100k tokens that must stay cheap: TOKEN_STATE is read through its mmap and TOKENS in
/// batches, not token by token through bpf(2). Prints both costs (`--nocapture`); measured
/// in a debug build: about 430 ms for the syscall walk against 35 ms.
#[test]
fn metrics_over_100k_tokens_cost_milliseconds() {
    use agent_common::{Fingerprint, TokenInfo, TokenState};

    const N: u64 = 100_000;
    let mut dp = datapath_for_100k();
    for i in 0..N {
        let fp = Fingerprint([i, !i]);
        dp.install_token(fp, TokenInfo::default()).expect("install");
        let st = TokenState {
            first_seen_ns: 1 + i,
            breaches: i % 7,
            ..TokenState::default()
        };
        dp.set_token_state(fp, st).expect("token state");
    }
    let want: u64 = (0..N).map(|i| i % 7).sum();

    // What the snapshot did before: walk TOKENS, look up each token's state.
    let t = Instant::now();
    let walked: u64 = dp
        .tokens()
        .iter()
        .filter_map(|(fp, _)| dp.token_state(fp))
        .map(|s| s.breaches)
        .sum();
    let per_token = t.elapsed();
    let t = Instant::now();
    let totals = dp.runtime_totals().expect("runtime totals");
    let batched = t.elapsed();
    let t = Instant::now();
    let fill = dp.fill_levels(Some(totals));
    let fill_cost = t.elapsed();
    eprintln!(
        "{N} tokens: breaches per token {per_token:?}, batched {batched:?}; \
         fill levels (TOKENS, REVOKED) {fill_cost:?}"
    );

    assert_eq!(walked, want);
    assert_eq!(totals.breaches, want);
    assert_eq!(totals.token_states as u64, N);
    assert!(fill.contains(&("tokens", N as usize, 131_072)), "{fill:?}");
    assert!(
        fill.contains(&("token_state", N as usize, 131_072)),
        "{fill:?}"
    );
    assert!(fill.contains(&("revoked", 0, 1024)), "{fill:?}");
    // Generous for a debug build on a busy 2-core machine; the per-token walk is >10x.
    assert!(
        batched < Duration::from_millis(400) && batched * 4 < per_token,
        "batched {batched:?} vs per token {per_token:?}"
    );
}

/// The eBPF programs' aya-log records reach the daemon's log under `rampart::ebpf`: a flood
/// of denied requests past the event cap (2 per CPU per second here) makes the programs warn
/// that events are being dropped.
///
/// Needs the eBPF side's log statement (a `warn!` when the cap starts dropping); until that
/// is in the object, the dropped-events counter rises but no forwarded line appears.
/// A reload of a policy with 100k static tokens writes only what changed: the
/// `Datapath` reads TOKENS once and batches the writes of the entries that differ.
#[test]
fn a_reload_that_changes_one_token_of_100k_writes_one_entry() {
    use agent_common::{Fingerprint, TokenInfo};

    const N: u64 = 100_000;
    let mut dp = datapath_for_100k();
    let policy = |changed: Option<u64>| {
        (0..N).map(move |i| {
            let info = TokenInfo {
                contract: u32::from(Some(i) == changed),
                scopes: 1,
                ..TokenInfo::default()
            };
            (Fingerprint([i, !i]), info)
        })
    };
    assert_eq!(
        dp.install_tokens(policy(None)).expect("first apply"),
        N as usize
    );
    assert_eq!(dp.token_count(), N as usize);
    let slot = dp
        .token(&Fingerprint([7, !7]))
        .expect("installed")
        .state_slot;

    assert_eq!(dp.install_tokens(policy(None)).expect("same policy"), 0);
    assert_eq!(dp.install_tokens(policy(Some(7))).expect("one change"), 1);
    let seven = dp.token(&Fingerprint([7, !7])).expect("still installed");
    assert_eq!(seven.contract, 1, "the change reached the kernel");
    assert_eq!(
        seven.state_slot, slot,
        "the token kept its runtime state's slot"
    );
    assert_eq!(dp.token(&Fingerprint([8, !8])).unwrap().contract, 0);

    // A revoked token's entry keeps its flag through a re-apply, and costs no write.
    dp.revoke(Fingerprint([9, !9]), 1).expect("revoke");
    assert_eq!(dp.install_tokens(policy(Some(7))).expect("again"), 0);
    assert_ne!(
        dp.token(&Fingerprint([9, !9])).unwrap().flags & agent_common::TOKEN_REVOKED,
        0
    );
}

/// REVOKED is no longer preallocated (memory for the revocations there are, not for the
/// capacity), so it is pinned under a new name: an upgraded daemon moves an earlier
/// version's revocations over and removes the old pin, and they keep being enforced.
#[test]
fn revocations_move_from_the_preallocated_pin_to_the_new_one() {
    use agent_common::{Fingerprint, TokenInfo, TOKEN_REVOKED};
    use rampart::datapath::{Datapath, LoadOptions};

    rampart_tests::netns::require_root().expect("root");
    let pins = PathBuf::from(format!(
        "/sys/fs/bpf/rampart-test-revoked-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&pins);
    let options = LoadOptions {
        max_tokens: 1024,
        max_revoked: 1024,
        token_stats: 1024,
        ring_bytes: 65_536,
        max_flows: 1024,
        pin_dir: Some(pins.clone()),
    };
    let revoked = Fingerprint([1, 2]);
    {
        let mut dp = Datapath::load(options.clone()).expect("load");
        dp.install_token(revoked, TokenInfo::default()).unwrap();
        dp.revoke(revoked, 42).unwrap();
    }
    // What an earlier version leaves: its revocations pinned as REVOKED.
    std::fs::rename(pins.join("REVOKED_V2"), pins.join("REVOKED")).unwrap();
    let dp = Datapath::load(options).expect("adopt");
    assert!(dp.is_revoked(&revoked));
    assert!(dp
        .token(&revoked)
        .is_some_and(|i| i.flags & TOKEN_REVOKED != 0));
    assert!(!pins.join("REVOKED").exists(), "the old pin is removed");
    let map = aya::maps::MapData::from_pin(pins.join("REVOKED_V2")).expect("new pin");
    let flags = map.info().expect("map info").map_flags();
    assert_eq!(flags & 1, 1, "BPF_F_NO_PREALLOC, flags {flags:#x}");
    drop(dp);
    std::fs::remove_dir_all(&pins).unwrap();
}

#[test]
fn ebpf_log_records_are_forwarded_into_the_daemon_log() {
    let mut fx = Fixture::new("ebpflog");
    fx.write_config(|text| text.replace("[events]\n", "[events]\nper_cpu_per_sec = 2\n"));
    fx.start();
    let dropped = |fx: &Fixture| -> u64 {
        fx.metrics()
            .lines()
            .find_map(|l| l.strip_prefix("rampart_events_dropped_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let forwarded = |log: &str| {
        log.lines()
            .any(|l| l.contains(" WARN ") && l.contains("rampart::ebpf"))
    };
    loop {
        for _ in 0..20 {
            fx.assert_denied(None, "no token in the flood");
        }
        if dropped(&fx) > 0 && forwarded(&fx.log()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} events dropped, but no eBPF warning forwarded into the log:\n{}",
            dropped(&fx),
            fx.log()
        );
    }
}

/// Lines of the export file that are expiry warnings, as JSON.
fn exported_warnings(fx: &Fixture) -> Vec<serde_json::Value> {
    fs::read_to_string(fx.dir.path().join("events.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "expiring")
        .collect()
}

/// A token inside the warning window (1 h here) is announced once — on the live stream,
/// in the export file and in the log — and again only when a rotation moves its expiry.
#[test]
fn tokens_near_expiry_are_announced_once_on_the_event_stream() {
    // The daemon checks expiries every 10 s.
    const CHECK: Duration = Duration::from_secs(25);
    let mut fx = Fixture::new("expiry");
    fx.start();
    let (mut sub, rx) = fx.follow(&["--verdict", "expiring"]);
    // Let the subscription settle before the first warning can be due.
    sleep(Duration::from_secs(1));
    let (_soon, fp) = fx.issue_with(&[
        "token",
        "issue",
        "--contract",
        "std",
        "--scope",
        "all",
        "--ttl",
        "30m",
        "--label",
        "ci-deploy",
    ]);
    let (_later, fp_later) = fx.issue_with(&[
        "token",
        "issue",
        "--contract",
        "std",
        "--scope",
        "all",
        "--ttl",
        "30d",
    ]);

    let line = rx
        .recv_timeout(CHECK)
        .unwrap_or_else(|_| panic!("no expiring event for {fp} within {CHECK:?}:\n{}", fx.log()));
    let ev: serde_json::Value = serde_json::from_str(&line).expect("event JSON");
    assert_eq!(ev["kind"], "expiring", "{}", fx.show(line.as_bytes()));
    assert_eq!(
        ev["fingerprint"],
        fp.as_str(),
        "{}",
        fx.show(line.as_bytes())
    );
    assert_eq!(ev["label"], "ci-deploy");
    let expires = humantime::parse_rfc3339(ev["expires_at"].as_str().expect("expires_at"))
        .expect("RFC 3339 expiry");
    let left = expires
        .duration_since(std::time::SystemTime::now())
        .expect("expiry in the future");
    assert!(
        left > Duration::from_secs(25 * 60) && left <= Duration::from_secs(30 * 60),
        "expires in {left:?}"
    );
    let log = fx.log();
    assert!(
        log.lines()
            .any(|l| l.contains("token expires soon") && l.contains(&fp)),
        "no log line for {fp}:\n{log}"
    );

    // Later checks stay silent: once per token and expiry, and never for the 30-day token.
    assert!(
        rx.recv_timeout(CHECK).is_err(),
        "warned twice (or of the 30-day token)"
    );
    let warnings = exported_warnings(&fx);
    assert_eq!(warnings.len(), 1, "export: {warnings:?}");
    assert_eq!(warnings[0]["fingerprint"], fp.as_str());
    assert!(
        !fx.log()
            .lines()
            .any(|l| l.contains("expires soon") && l.contains(&fp_later)),
        "the 30-day token was warned of"
    );

    // A rotation with 5 minutes of grace moves the old token's expiry: warned again; the
    // successor keeps the 30-minute lifetime, so it is warned of too.
    let (_next, fp_next) = fx.issue_with(&["token", "rotate", &fp, "--grace", "5m"]);
    let mut got = Vec::new();
    while got.len() < 2 {
        let line = rx
            .recv_timeout(CHECK)
            .unwrap_or_else(|_| panic!("only {got:?} warned after the rotation:\n{}", fx.log()));
        let ev: serde_json::Value = serde_json::from_str(&line).expect("event JSON");
        got.push(ev["fingerprint"].as_str().unwrap_or_default().to_owned());
    }
    got.sort();
    let mut want = vec![fp.clone(), fp_next.clone()];
    want.sort();
    assert_eq!(got, want);
    let _ = sub.kill();
    let _ = sub.wait();

    // The recorded view filters the same way: `--verdict expiring` lists the three warnings,
    // a decision verdict none of them.
    let out = fx.cli(&["events", "--verdict", "expiring"]);
    assert!(out.status.success(), "events: {}", fx.show(&out.stderr));
    let text = fx.show(&out.stdout);
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(text.lines().all(|l| l.contains(" expiring ")), "{text}");
    assert!(!text.contains(&fp_later), "{text}");
    let out = fx.cli(&["events", "--verdict", "unknown"]);
    assert!(!fx.show(&out.stdout).contains("expiring"));
}

/// A bad policy stops `rampart run` before it touches the kernel, with every location.
#[test]
fn run_refuses_an_invalid_policy_with_its_location() {
    let (dir, pins, out) = run_with_policy(BROKEN_POLICY, "broken");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{}:3:34:",
            dir.path().join("policy.toml").display()
        )),
        "{stderr}"
    );
    assert!(!pins.exists(), "nothing pinned");
}

/// Without a key the daemon says how to make one.
#[test]
fn run_without_a_key_says_to_run_keygen() {
    let (_dir, _pins, out) = run_with_policy(POLICY, "nokey");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("rampart keygen"), "{stderr}");
}

/// `rampart run` in a fresh directory (no key) with `policy`, to its exit; pins would go
/// to a fresh directory on bpffs (the daemon refuses a pin directory elsewhere first).
fn run_with_policy(policy: &str, tag: &str) -> (tempfile::TempDir, std::path::PathBuf, Output) {
    let dir = tempfile::tempdir().expect("temp dir");
    let pins = bpffs_root().join(format!("rampart-test-{}-run-{tag}", std::process::id()));
    let daemon = daemon_process(dir.path());
    fs::write(&daemon.config, config_text(dir.path(), &pins)).expect("config");
    fs::write(dir.path().join("policy.toml"), policy).expect("policy");
    let out = daemon.cli(None, &["run"]).unwrap_or_else(|e| panic!("{e}"));
    (dir, pins, out)
}
