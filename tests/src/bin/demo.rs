//! `cargo xtask demo`: a narrated live run of Rampart in three network namespaces.
//!
//! ```text
//!  client ──TLS──▶ gateway (nginx) ──plaintext over veth──▶ upstream   [XDP on up-gw]
//!                                  ──plaintext over lo────▶ loopback   [TC on gw's lo]
//! ```
//! One `rampart run` per namespace that owns a listener interface (a daemon attaches by
//! interface name in its own namespace), both with the same fingerprint key. Tokens live
//! in memory only; the screen shows fingerprints. Everything is torn down at the end, on
//! failure and on Ctrl-C (see [`interrupt`]; stale leftovers of a run killed with -9 are
//! removed by the next run).
//!
//! Needs root and `target/debug/rampart` next to this binary (`cargo xtask demo` builds it).

use std::{
    fmt::Write as _,
    io::{BufRead, BufReader, Write},
    process::{Child, Command, ExitCode, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, ensure, Context, Result};
use rampart_tests::{
    client::{wrk, BearerToken, Curl, LoadConfig, Request, Response},
    gateway::{self, Gateway, Issued, Outcome, Side},
    netns,
    topology::Topology,
};

/// The ramp contract's schedule, shown to the viewer and written into the policy.
const RAMP_STEP_SECS: u64 = 5;

fn main() -> ExitCode {
    let started = Instant::now();
    let result = run();
    // Everything owned by `run` has been dropped (daemons, pins, namespaces) by now.
    match result {
        Ok(notes) => {
            header("Summary");
            for n in notes {
                say(&format!("✓ {n}"));
            }
            say(&format!(
                "demo finished in {:.0} s; daemons stopped, programs detached, namespaces removed",
                started.elapsed().as_secs_f64()
            ));
            ExitCode::SUCCESS
        }
        Err(_) if interrupt::happened() => loop {
            // The signal thread is tearing down and will exit the process.
            thread::park();
        },
        Err(e) => {
            eprintln!("\ndemo FAILED: {e:#}");
            eprintln!("(everything it started has been cleaned up)");
            ExitCode::FAILURE
        }
    }
}

fn header(title: &str) {
    println!("\n━━ {title} ━━");
}

fn say(line: &str) {
    println!("   {line}");
}

fn note(line: &str) {
    println!("   → {line}");
}

fn step(title: &str) {
    let _ = std::io::stdout().flush();
    header(title);
}

fn run() -> Result<Vec<String>> {
    netns::require_root().map_err(|e| anyhow!("{e}"))?;
    let mut notes = Vec::new();

    step("1. Topology");
    netns::cleanup_stale();
    gateway::cleanup_stale_pins();
    interrupt::install()?;
    let t0 = Instant::now();
    let topo = Topology::builder()
        .build()
        .map_err(|e| anyhow!("building the topology: {e}"))?;
    say("client ns ──TLS──▶ gateway ns: nginx :8443 ──veth──▶ upstream ns :8080");
    say("                               nginx :8444 ──lo────▶ 127.0.0.1:8081 (gateway ns)");
    say(&format!(
        "namespaces {} up in {:.1} s; Ctrl-C at any point tears everything down",
        topo.namespace_names().join(", "),
        t0.elapsed().as_secs_f64()
    ));
    let mut demo = Demo::new(topo)?;
    step("2. Two Rampart daemons");
    demo.start()?;
    say(&format!(
        "{}: XDP (native) on {} in the upstream ns, port {}",
        demo.gw.daemon_name(Side::Veth),
        demo.gw.topo().upstream_veth().name,
        demo.gw.topo().upstream_port()
    ));
    say(&format!(
        "{}: TC on lo in the gateway ns, port {}",
        demo.gw.daemon_name(Side::Loopback),
        demo.gw.topo().loopback_upstream_port()
    ));
    say("policy: contracts `standard` (50/s, burst 10) and `ramp` (5/s, doubling every 5 s up to 40/s, burst 2; a breach demotes one stage for 5 s)");
    say("        scopes `reports-read` (GET /v1/reports/) and `all`; unknown or missing tokens are answered 401");
    say("denied requests are answered from the kernel (action = \"respond\"): nginx passes the");
    say("401/403/429 on to the client. On a veth the daemon attaches XDP in generic mode, so the");
    say("answers (XDP_TX) reach the peer without an XDP program there");
    notes.push("two daemons loaded and attached (XDP native + TC)".to_owned());

    step("3. Issuing tokens");
    let veth_tok = demo.issue(Side::Veth, "standard", &["all"])?;
    let lo_tok = demo.issue(Side::Loopback, "standard", &["all"])?;
    let reader = demo.issue(Side::Veth, "standard", &["reports-read"])?;
    let ramp = demo.issue(Side::Veth, "ramp", &["reports-read"])?;
    say("the plaintext goes to the client only; Rampart stores fingerprints");
    for (what, t) in [
        ("veth path, standard, all scopes", &veth_tok),
        ("loopback path, standard, all scopes", &lo_tok),
        ("veth path, standard, reports-read only", &reader),
        ("veth path, ramp, reports-read only", &ramp),
    ] {
        say(&format!("{}  {what}", t.fp));
    }

    step("4. Allowed traffic");
    // A token nobody issued (step 5), known now so that any output is redacted.
    let stranger = BearerToken::new(random_token());
    demo.gw.remember(&stranger);
    let veth = demo.gw.topo().curl_veth();
    let lo = demo.gw.topo().curl_loopback();
    let r = demo.request(
        Side::Veth,
        &veth,
        &Request::get("/v1/orders").token(&veth_tok.token),
    )?;
    show("GET /v1/orders, valid token, veth path", &r);
    ensure!(
        r.reached && r.resp.status == 200,
        "valid token on the veth path was not served"
    );
    let r = demo.request(
        Side::Loopback,
        &lo,
        &Request::get("/v1/orders").token(&lo_tok.token),
    )?;
    show("GET /v1/orders, valid token, loopback path", &r);
    ensure!(
        r.reached && r.resp.status == 200,
        "valid token on the loopback path was not served"
    );
    notes.push("valid tokens served on both paths".to_owned());

    step("5. Missing and unknown tokens");
    let r = demo.request(Side::Veth, &veth, &Request::get("/v1/orders"))?;
    show("no Authorization header, veth path", &r);
    ensure!(!r.reached, "a request without a token reached the upstream");
    ensure!(
        r.resp.status == 401,
        "a request without a token got {}",
        r.resp.status
    );
    let r = demo.request(
        Side::Loopback,
        &lo,
        &Request::get("/v1/orders").token(&stranger),
    )?;
    show("a token nobody issued, loopback path", &r);
    ensure!(!r.reached, "an unknown token reached the upstream");
    ensure!(
        r.resp.status == 401,
        "an unknown token got {}",
        r.resp.status
    );
    note("Rampart answered nginx's upstream request from the kernel (and reset the upstream's");
    note("side of that connection); nginx passed the 401 on, WWW-Authenticate and all");
    notes.push("missing and unknown tokens stopped before the upstream".to_owned());

    step("6. Scopes");
    let r = demo.request(
        Side::Veth,
        &veth,
        &Request::get("/v1/reports/daily").token(&reader.token),
    )?;
    show("GET /v1/reports/daily, reports-read token", &r);
    ensure!(r.reached, "an in-scope GET was denied");
    let r = demo.request(
        Side::Veth,
        &veth,
        &Request::get("/v1/reports/daily")
            .method("POST")
            .token(&reader.token)
            .body("{}"),
    )?;
    show("POST /v1/reports/daily, same token", &r);
    ensure!(!r.reached, "an out-of-scope POST reached the upstream");
    let r = demo.request(
        Side::Veth,
        &veth,
        &Request::get("/v1/orders").token(&reader.token),
    )?;
    show("GET /v1/orders, same token", &r);
    ensure!(!r.reached, "an out-of-scope path reached the upstream");
    notes.push("scoped token: GET in its prefix only".to_owned());

    step("7. A ramp contract under load");
    say("wrk floods the veth route with the `ramp` token (8 connections) for 20 s;");
    say("the contract's rate doubles every 5 s from the token's first request: 5, 10, 20, 40/s");
    say("watch admissions climb one stage behind the schedule: the flood breaches the rate");
    say("all the time, and every breach re-arms the 5 s one-stage demotion");
    let windows = demo.ramp_run(&ramp, 4)?;
    ensure!(
        windows.len() >= 4,
        "only {} load windows were measured",
        windows.len()
    );
    let first = windows[0].admitted;
    let last = windows[windows.len() - 1].admitted;
    ensure!(
        last > first * 2,
        "admissions did not climb with the ramp ({first} → {last} per window)"
    );
    say("rampart token show (ramp token):");
    indent(&demo.cli_ok(Side::Veth, &["token", "show", &ramp.fp])?);
    notes.push(format!(
        "ramp: {first} → {last} admitted per {RAMP_STEP_SECS} s window as the stage climbed"
    ));

    step("8. Revocation mid-stream");
    say("one keep-alive client connection, 5 requests/s; the token is revoked halfway");
    let (before, after) = demo.revoke_mid_stream(&veth_tok)?;
    ensure!(before > 0, "no request succeeded before the revocation");
    ensure!(
        after == 0,
        "{after} requests succeeded after the revocation"
    );
    notes.push("revocation took effect on an open connection, the next request failed".to_owned());

    step("9. Telemetry");
    say("rampart top --once (veth daemon):");
    indent(&demo.cli_ok(Side::Veth, &["top", "--once"])?);
    say("rampart events --follow --json (veth daemon) while denied requests go by:");
    let events = demo.follow_events(Side::Veth, 2, &stranger)?;
    for e in &events {
        say(&format!("  {e}"));
    }
    ensure!(!events.is_empty(), "no live events arrived");
    say("/metrics (veth daemon), request counters:");
    let metrics = demo.gw.metrics(Side::Veth)?;
    let lines: Vec<&str> = metrics
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains("request"))
        .filter(|l| !l.trim_end().ends_with(" 0"))
        .take(8)
        .collect();
    for l in &lines {
        say(&format!("  {l}"));
    }
    ensure!(
        !lines.is_empty(),
        "no non-zero request counters in /metrics"
    );
    notes.push("top, live events and Prometheus metrics all report by fingerprint".to_owned());

    step("10. Clean-up");
    demo.shutdown();
    drop(demo);
    say("namespaces deleted");
    Ok(notes)
}

fn show(what: &str, o: &Outcome) {
    let client = describe(&o.resp);
    let upstream = if o.reached {
        "reached the upstream"
    } else {
        "never reached the upstream"
    };
    say(&format!("{what}: {client}; {upstream}"));
}

fn describe(r: &Response) -> String {
    match r.status {
        200 => "200 OK".to_owned(),
        401 => "401 from Rampart (WWW-Authenticate: Bearer ..., passed on by nginx)".to_owned(),
        403 => "403 from Rampart (insufficient_scope, passed on by nginx)".to_owned(),
        429 => "429 from Rampart (Retry-After and RateLimit fields, passed on by nginx)".to_owned(),
        502 => "502 from nginx (upstream connection reset)".to_owned(),
        504 => "504 from nginx (upstream silent until its timeout)".to_owned(),
        0 => format!("no HTTP response (curl exit {})", r.curl_exit),
        s => format!("HTTP {s}"),
    }
}

fn indent(text: &str) {
    for l in text.lines() {
        say(&format!("  {l}"));
    }
}

fn random_token() -> String {
    use rand::{distributions::Alphanumeric, Rng};
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(43)
        .map(char::from)
        .collect()
}

/// One load window of the ramp run.
struct Window {
    admitted: u64,
}

struct Demo {
    gw: Gateway,
    /// `shutdown` ran (the normal path); Drop then has nothing left to say.
    cleaned: bool,
}

impl Demo {
    /// Configs and policy for both daemons; nothing runs yet.
    fn new(topo: Topology) -> Result<Demo> {
        let gw = Gateway::builder()
            .action("respond")
            .policy(POLICY)
            .prepare(gateway::rampart_binary()?, topo)?;
        Ok(Demo { gw, cleaned: false })
    }

    /// One key for both daemons, so a token has the same fingerprint on either path; then
    /// each daemon starts inside its namespace and is awaited until it answers.
    fn start(&mut self) -> Result<()> {
        self.gw.keygen()?;
        say("rampart keygen: one fingerprint key, shared by both daemons");
        for side in self.gw.sides() {
            let t = Instant::now();
            self.gw.start(side)?;
            say(&format!(
                "{} is up ({:.1} s: programs verified, loaded and attached)",
                self.gw.daemon_name(side),
                t.elapsed().as_secs_f64()
            ));
        }
        Ok(())
    }

    fn cli_ok(&self, side: Side, args: &[&str]) -> Result<String> {
        Ok(self.gw.cli_ok(side, args)?)
    }

    fn issue(&mut self, side: Side, contract: &str, scopes: &[&str]) -> Result<Issued> {
        Ok(self.gw.issue(side, contract, scopes)?)
    }

    fn request(&self, side: Side, curl: &Curl<'_>, req: &Request) -> Result<Outcome> {
        Ok(self.gw.request(side, curl, req)?)
    }

    /// curl in the client ns sending `count` GETs at `rate`/s over one keep-alive
    /// connection; yields (time since start, HTTP status) per request as it completes.
    fn paced(
        &self,
        base: &str,
        token: &BearerToken,
        rate: u32,
        count: u32,
    ) -> Result<(Child, mpsc::Receiver<(Duration, u16)>)> {
        let headers = self.gw.header_file(&format!("h-{rate}-{count}"), token)?;
        let mut child = self
            .gw
            .topo()
            .client()
            .command("stdbuf")
            .args([
                "-oL",
                "curl",
                "-sk",
                "--http1.1",
                "--max-time",
                "5",
                "--rate",
            ])
            .arg(format!("{rate}/s"))
            .args(["-o", "/dev/null", "-w", "%{http_code}\\n", "-H"])
            .arg(format!("@{}", headers.display()))
            .arg(format!("{base}/v1/reports/[1-{count}]"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting curl")?;
        let out = child.stdout.take().context("curl stdout")?;
        let (tx, rx) = mpsc::channel();
        let start = Instant::now();
        thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let status = line.trim().parse().unwrap_or(0);
                if tx.send((start.elapsed(), status)).is_err() {
                    return;
                }
            }
        });
        Ok((child, rx))
    }

    /// Floods the veth route with the ramp token in back-to-back wrk windows of one ramp
    /// step each; per window, Rampart's own counters (`rampart token show`) and what the
    /// client got.
    fn ramp_run(&self, ramp: &Issued, windows: u32) -> Result<Vec<Window>> {
        let url = format!("{}/v1/reports/q", self.gw.topo().veth_route_url());
        let mut out = Vec::new();
        say(&format!(
            "{:>9}  {:<17}  {:>9}  {:>10}  {:>12}  {:>12}",
            "seconds", "ramp stage", "admitted", "throttled", "client 200s", "client 429s"
        ));
        let (mut allow0, mut throttled0) = (0, 0);
        let mut client_ok = 0;
        for w in 0..windows {
            let mut cfg = LoadConfig::new(&url);
            cfg.tokens = vec![ramp.token.clone()];
            cfg.connections = 8;
            cfg.duration = Duration::from_secs(RAMP_STEP_SECS);
            cfg.timeout = Duration::from_secs(2);
            let report = wrk(self.gw.topo().client(), &cfg).map_err(|e| anyhow!("wrk: {e}"))?;
            let show = self.cli_ok(Side::Veth, &["token", "show", &ramp.fp])?;
            let stage = field(&show, "ramp stage:").unwrap_or_else(|| "?".into());
            let rate = field(&show, "rate:").unwrap_or_default();
            let allow = count(&show, "allow");
            let throttled = count(&show, "throttled");
            let penalty = if show.contains("penalty until") {
                ", demoted"
            } else {
                ""
            };
            say(&format!(
                "{:>4}–{:<4}  {:<17}  {:>9}  {:>10}  {:>12}  {:>12}",
                u64::from(w) * RAMP_STEP_SECS,
                u64::from(w + 1) * RAMP_STEP_SECS,
                format!("{stage} ({}{penalty})", rate.trim_end_matches(" req/s")),
                allow - allow0,
                throttled - throttled0,
                report.status(200),
                report.status(429),
            ));
            out.push(Window {
                admitted: allow - allow0,
            });
            client_ok += report.status(200);
            allow0 = allow;
            throttled0 = throttled;
        }
        say("(admitted/throttled: Rampart's per-token counters; stage and rate in /s as `rampart token show` reports them)");
        if client_ok * 10 < allow0 * 8 {
            note(&format!(
                "the client saw {client_ok} answers for {allow0} admissions: admitted requests that \
                 shared an nginx→upstream connection with a reset one are a suspected cause, \
                 not yet investigated"
            ));
        }
        Ok(out)
    }

    /// (requests served before the revocation, served after it).
    fn revoke_mid_stream(&self, tok: &Issued) -> Result<(u32, u32)> {
        let base = self.gw.topo().veth_route_url();
        let (mut child, rx) = self.paced(&base, &tok.token, 5, 20)?;
        let (mut before, mut after) = (0, 0);
        let mut revoked_at: Option<Duration> = None;
        let mut line = String::new();
        loop {
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok((at, status)) => {
                    let mark = if status == 200 { "✓" } else { "✗" };
                    let _ = write!(line, "{mark}{status} ");
                    match revoked_at {
                        None => {
                            if status == 200 {
                                before += 1;
                            }
                        }
                        Some(_) if status == 200 => after += 1,
                        Some(_) => {}
                    }
                    if revoked_at.is_none() && at >= Duration::from_millis(1800) {
                        say(&line);
                        line.clear();
                        let out = self.cli_ok(
                            Side::Veth,
                            &["token", "revoke", &tok.fp, "--reason", "demo"],
                        )?;
                        say(&format!("rampart token revoke: {out}"));
                        revoked_at = Some(at);
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!("the keep-alive client stalled");
                }
            }
        }
        let _ = child.wait();
        say(&line);
        note("the connection from the client stayed open; every request after the revoke was answered 401 (invalid_token) before the upstream");
        Ok((before, after))
    }

    /// Starts `rampart events --follow --json`, sends denied requests until `n` lines
    /// arrived (or 10 s passed), stops the follower.
    fn follow_events(&self, side: Side, n: usize, token: &BearerToken) -> Result<Vec<String>> {
        let mut sub = Command::new(gateway::rampart_binary()?)
            .arg("--config")
            .arg(self.gw.config_path(side))
            .args(["events", "--follow", "--json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting rampart events")?;
        let out = sub.stdout.take().context("events stdout")?;
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let curl = self.gw.topo().curl_veth().timeout(Duration::from_secs(3));
        let mut lines = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while lines.len() < n && Instant::now() < deadline {
            // The subscription is live once the daemon answered it: keep sending.
            let _ = curl.send(&Request::get("/v1/orders").token(token));
            while let Ok(l) = rx.recv_timeout(Duration::from_millis(300)) {
                lines.push(self.gw.redact(l.as_bytes()));
            }
        }
        let _ = sub.kill();
        let _ = sub.wait();
        lines.truncate(n.max(1));
        Ok(lines)
    }

    /// Stops the daemons and detaches their programs, saying what happened. Idempotent.
    fn shutdown(&mut self) {
        self.cleaned = true;
        if interrupt::happened() {
            // The signal thread owns the clean-up now.
            return;
        }
        for line in self.gw.shutdown() {
            say(&line);
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        // On an error path the daemons may still run: stop and detach before the
        // namespaces (dropped with the gateway after this) go away.
        if !self.cleaned && !interrupt::happened() {
            header("Clean-up");
            self.shutdown();
        }
    }
}

/// A verdict's count from the `requests:` block of `rampart token show` (0 if absent).
fn count(text: &str, verdict: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix(verdict))
        .filter_map(|rest| rest.trim().parse().ok())
        .next()
        .unwrap_or(0)
}

/// The value after `key` on its line of `rampart token show` output.
fn field(text: &str, key: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .map(|v| v.trim().to_owned())
}

const POLICY: &str = r#"# Written by the Rampart demo.
[[contract]]
name = "standard"
stages = [{ after = "0s", rate = 50, burst = 10 }]

# 5/s, doubling every 5 s, capped at 40/s: 5, 10, 20, 40. A breach demotes one stage for 5 s.
[[contract]]
name = "ramp"
ramp = { start = 5, growth = "100%", step = "5s", cap = 40, burst = 2 }
penalty = { demote = 1, cooldown = "5s" }

[[scope]]
name = "reports-read"
methods = ["GET"]
prefix = "/v1/reports/"

[[scope]]
name = "all"
methods = ["*"]
prefix = "/"
"#;

/// Ctrl-C (SIGINT) and SIGTERM: kill the daemons, detach their programs, remove the pins
/// and the temp dir (`gateway::teardown_registered`), then delete the namespaces
/// (`netns::cleanup_registered`) and exit with 130. The handler only pokes a pipe; a
/// normal thread does the work.
mod interrupt {
    use std::{
        sync::atomic::{AtomicBool, AtomicI32, Ordering},
        thread,
    };

    use anyhow::{bail, Result};
    use rampart_tests::{gateway, netns};

    static HAPPENED: AtomicBool = AtomicBool::new(false);
    static PIPE_WRITE: AtomicI32 = AtomicI32::new(-1);

    pub fn happened() -> bool {
        HAPPENED.load(Ordering::SeqCst)
    }

    extern "C" fn on_signal(_: libc::c_int) {
        let fd = PIPE_WRITE.load(Ordering::Relaxed);
        if fd >= 0 {
            // SAFETY: write is async-signal-safe; the buffer is a valid 1-byte static.
            unsafe { libc::write(fd, b"x".as_ptr().cast(), 1) };
        }
    }

    pub fn install() -> Result<()> {
        let mut fds = [0; 2];
        // SAFETY: fds is a valid 2-element array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            bail!("pipe2: {}", std::io::Error::last_os_error());
        }
        let (read_fd, write_fd) = (fds[0], fds[1]);
        PIPE_WRITE.store(write_fd, Ordering::Relaxed);
        thread::Builder::new()
            .name("demo-signal".into())
            .spawn(move || {
                let mut b = [0u8; 1];
                // SAFETY: read into a valid 1-byte buffer from our own pipe.
                while unsafe { libc::read(read_fd, b.as_mut_ptr().cast(), 1) } != 1 {}
                HAPPENED.store(true, Ordering::SeqCst);
                eprintln!(
                    "\ninterrupted: stopping the daemons, detaching, deleting the namespaces"
                );
                gateway::teardown_registered();
                netns::cleanup_registered();
                eprintln!("everything the demo started is gone");
                std::process::exit(130);
            })?;
        for sig in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: a zeroed sigaction with a valid handler pointer is a valid argument.
            let rc = unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
                sa.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut sa.sa_mask);
                libc::sigaction(sig, &sa, std::ptr::null_mut())
            };
            if rc != 0 {
                bail!("sigaction: {}", std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}
