//! The standard topology with Rampart in it: one `rampart run` per namespace that owns a
//! judged hop, both sharing one fingerprint key, shared by the demo and the scenario tests.
//!
//! ```text
//!  client ──TLS──▶ gateway (nginx) ──plaintext over veth──▶ upstream   [XDP native on up-gw]
//!                                  ──plaintext over lo────▶ loopback   [TC on gw's lo]
//! ```
//! A daemon attaches by interface name in its own namespace, so the veth daemon runs in
//! the upstream namespace and the loopback daemon in the gateway namespace. Configs,
//! policy, state (key, SQLite audit), logs and the event export live in one private temp
//! dir; pins go under `$RAMPART_BPFFS` (the VM mounts a second bpffs there, because
//! `ip netns exec` remounts /sys) or `/sys/fs/bpf`, in `rampart-test-<pid>-…` directories
//! so a run killed hard is cleaned by the next one.
//!
//! Dropping a [`Gateway`] kills its daemons, detaches their programs, removes the pins,
//! then the namespaces and the temp dir go; this also runs when a test panics. A signal
//! handler (the demo's) calls [`teardown_registered`] instead, as destructors do not run.
//!
//! Tokens only live in memory ([`BearerToken`]); everything shown is passed through
//! [`Gateway::redact`] first.

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Output, Stdio},
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use crate::{
    client::{BearerToken, ClientError, Curl, Request, Response},
    daemon::{redact, ConfigTemplate, DaemonError, DaemonProcess},
    netns::{self, NetnsError},
    topology::{Role, Topology, TopologyError},
    upstream::UpstreamServer,
};

/// Environment variable naming the bpffs mount to pin into (set in the VM).
pub const BPFFS_ENV: &str = "RAMPART_BPFFS";
const DEFAULT_BPFFS: &str = "/sys/fs/bpf";
/// Pin directories are `<bpffs>/<PIN_PREFIX><pid>-<seq>-<daemon>`.
const PIN_PREFIX: &str = "rampart-test-";

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("not root: {0}")]
    Root(#[source] NetnsError),
    #[error("building the topology: {0}")]
    Topology(#[source] TopologyError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{} is missing: run `cargo build -p rampart` first", path.display())]
    NoBinary { path: PathBuf },
    #[error("`rampart {args}` ({daemon}) failed ({status}): {stderr}")]
    Cli {
        args: String,
        daemon: &'static str,
        status: ExitStatus,
        stderr: String,
    },
    #[error("`rampart {args}` ({daemon}) printed something unexpected: {text}")]
    Output {
        args: String,
        daemon: &'static str,
        text: String,
    },
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error("{daemon} neither applied nor rejected the reload within {waited:?}; its log:\n{log}")]
    ReloadTimeout {
        daemon: &'static str,
        waited: Duration,
        log: String,
    },
    #[error("client: {0}")]
    Client(#[source] ClientError),
}

type Result<T, E = GatewayError> = std::result::Result<T, E>;

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> GatewayError {
    let what = what.into();
    move |source| GatewayError::Io { what, source }
}

/// Which judged hop (and so which daemon).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// nginx → upstream ns over the veth; XDP native on `up-gw`, daemon in the upstream ns.
    Veth,
    /// nginx → 127.0.0.1 in the gateway ns; TC on `lo`, daemon in the gateway ns.
    Loopback,
}

impl Side {
    fn index(self) -> usize {
        match self {
            Side::Veth => 0,
            Side::Loopback => 1,
        }
    }
}

/// What `rampart run` is started with. Listener settings apply to both daemons.
#[derive(Debug, Clone)]
pub struct GatewayBuilder {
    policy: String,
    mode: &'static str,
    action: &'static str,
    loopback: bool,
    metrics_ports: [u16; 2],
}

impl Default for GatewayBuilder {
    fn default() -> Self {
        Self {
            policy: String::new(),
            // What an operator runs in production: deny and reset.
            mode: "enforce",
            action: "reset",
            // Most scenarios judge one hop; the TC daemon costs a verifier run.
            loopback: true,
            // Different namespaces, but distinct ports keep a scraped text unambiguous.
            metrics_ports: [9464, 9465],
        }
    }
}

impl GatewayBuilder {
    /// The policy file's text (contracts, scopes, static tokens), written for both daemons.
    pub fn policy(mut self, text: &str) -> Self {
        self.policy = text.to_owned();
        self
    }

    /// `enforce` or `observe`.
    pub fn mode(mut self, mode: &'static str) -> Self {
        self.mode = mode;
        self
    }

    /// `reset` or `drop`.
    pub fn action(mut self, action: &'static str) -> Self {
        self.action = action;
        self
    }

    /// Whether to run the TC daemon on the gateway's `lo` as well (default yes).
    pub fn loopback(mut self, on: bool) -> Self {
        self.loopback = on;
        self
    }

    /// Topology, key, daemons ready: everything a scenario needs. (Nothing on `gw-up`: the
    /// daemon attaches a veth's XDP listener so that its resets and responses reach the
    /// peer without an XDP program there.)
    pub fn build(self) -> Result<Gateway> {
        netns::require_root().map_err(GatewayError::Root)?;
        cleanup_stale_pins();
        let topo = Topology::builder()
            .build()
            .map_err(GatewayError::Topology)?;
        let mut gw = self.prepare(rampart_binary()?, topo)?;
        gw.keygen()?;
        for side in gw.sides() {
            gw.start(side)?;
        }
        Ok(gw)
    }

    /// Writes configs and policy for a topology the caller built, and starts nothing (the
    /// demo narrates each step: [`Gateway::keygen`], [`Gateway::start`]).
    pub fn prepare(self, rampart: PathBuf, topo: Topology) -> Result<Gateway> {
        // `rmp-<pid>-…`: `netns::cleanup_stale` removes it if this process dies hard.
        let dir = tempfile::Builder::new()
            .prefix(&format!("{}{}-gateway-", netns::PREFIX, std::process::id()))
            .tempdir()
            .map_err(io_err("creating the gateway's temp dir"))?;
        track(|t| t.dirs.push(dir.path().to_owned()));
        let mut gw = Gateway {
            rampart,
            daemons: Vec::new(),
            tokens: Vec::new(),
            topo,
            dir,
        };
        let up_if = gw.topo.upstream_veth().name.clone();
        let listeners = [
            (
                "upstream-xdp",
                Role::Upstream,
                format!(
                    "name = \"veth-upstream\"\ninterface = \"{up_if}\"\nhook = \"xdp\"\nxdp_mode = \"native\"\nports = [{}]\n",
                    gw.topo.upstream_port()
                ),
            ),
            (
                "gateway-tc",
                Role::Gateway,
                format!(
                    "name = \"loopback-upstream\"\ninterface = \"lo\"\nhook = \"tc\"\nports = [{}]\n",
                    gw.topo.loopback_upstream_port()
                ),
            ),
        ];
        let n = if self.loopback { 2 } else { 1 };
        for (i, (name, role, listener)) in listeners.into_iter().take(n).enumerate() {
            gw.add_daemon(name, role, self.metrics_ports[i], &listener, &self)?;
        }
        Ok(gw)
    }
}

/// A token in memory, with the fingerprint that is all anyone ever prints.
#[derive(Debug, Clone)]
pub struct Issued {
    pub token: BearerToken,
    pub fp: String,
}

/// What one request did, as the client and the upstream saw it.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub resp: Response,
    /// The upstream recorded at least one new request while this one ran.
    pub reached: bool,
}

/// How a reload ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    /// `policy_generation` went up to this value.
    Applied(u64),
    /// `reloads_failed` went up; the old policy stays.
    Rejected,
}

/// One `rampart run`, where it runs and what it pins.
#[derive(Debug)]
struct Daemon {
    process: DaemonProcess,
    role: Role,
    bpffs: PathBuf,
    metrics_port: u16,
}

/// The topology with its daemons. Dropping it stops and detaches everything.
pub struct Gateway {
    rampart: PathBuf,
    daemons: Vec<Daemon>,
    /// Every token handled, to redact output and to scan files for plaintext.
    tokens: Vec<BearerToken>,
    topo: Topology,
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Tokens stay out of it (their Debug is redacted anyway); the datapath has no Debug.
        f.debug_struct("Gateway")
            .field("daemons", &self.daemons)
            .field("topo", &self.topo)
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

impl Gateway {
    pub fn builder() -> GatewayBuilder {
        GatewayBuilder::default()
    }

    pub fn topo(&self) -> &Topology {
        &self.topo
    }

    /// The private temp dir holding configs, state, logs and exports.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The sides that have a daemon.
    pub fn sides(&self) -> Vec<Side> {
        [Side::Veth, Side::Loopback]
            .into_iter()
            .take(self.daemons.len())
            .collect()
    }

    fn d(&self, side: Side) -> &Daemon {
        &self.daemons[side.index()]
    }

    pub fn daemon_name(&self, side: Side) -> &'static str {
        self.d(side).process.name
    }

    pub fn config_path(&self, side: Side) -> &Path {
        &self.d(side).process.config
    }

    pub fn bpffs_dir(&self, side: Side) -> &Path {
        &self.d(side).bpffs
    }

    pub fn state_dir(&self, side: Side) -> PathBuf {
        self.daemon_dir(side).join("state")
    }

    fn daemon_dir(&self, side: Side) -> PathBuf {
        self.d(side)
            .process
            .config
            .parent()
            .expect("a config file has a dir")
            .to_owned()
    }

    pub fn policy_path(&self, side: Side) -> PathBuf {
        self.daemon_dir(side).join("policy.toml")
    }

    pub fn events_path(&self, side: Side) -> PathBuf {
        self.daemon_dir(side).join("events.jsonl")
    }

    /// The upstream server behind `side`.
    pub fn upstream(&self, side: Side) -> &UpstreamServer {
        match side {
            Side::Veth => self.topo.veth_upstream(),
            Side::Loopback => self.topo.loopback_upstream(),
        }
    }

    /// curl in the client ns against the TLS route that ends at `side`'s upstream.
    pub fn curl(&self, side: Side) -> Curl<'_> {
        match side {
            Side::Veth => self.topo.curl_veth(),
            Side::Loopback => self.topo.curl_loopback(),
        }
    }

    /// `https://…` of the route to `side`'s upstream.
    pub fn route_url(&self, side: Side) -> String {
        match side {
            Side::Veth => self.topo.veth_route_url(),
            Side::Loopback => self.topo.loopback_route_url(),
        }
    }

    fn add_daemon(
        &mut self,
        name: &'static str,
        role: Role,
        metrics_port: u16,
        listener: &str,
        opts: &GatewayBuilder,
    ) -> Result<()> {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = self.dir.path().join(name);
        fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let bpffs = bpffs_root().join(format!("{PIN_PREFIX}{}-{seq}-{name}", std::process::id()));
        let config = dir.join("rampart.toml");
        let listener = format!(
            "{listener}mode = \"{mode}\"\naction = \"{action}\"\non_missing = \"deny\"\n\
             on_unknown = \"deny\"\non_incomplete = \"deny\"\n",
            mode = opts.mode,
            action = opts.action,
        );
        let text = ConfigTemplate {
            dir: &dir,
            bpffs_dir: &bpffs,
            control_socket: &dir.join("control.sock"),
            metrics_port,
            extra: "",
            listener: &listener,
        }
        .text();
        fs::write(&config, text).map_err(io_err("writing a daemon config"))?;
        fs::write(dir.join("policy.toml"), &opts.policy).map_err(io_err("writing the policy"))?;
        track(|t| {
            t.daemons
                .push((self.rampart.clone(), config.clone(), bpffs.clone()))
        });
        self.daemons.push(Daemon {
            process: DaemonProcess::new(name, self.rampart.clone(), config, dir.join("daemon.log")),
            role,
            bpffs,
            metrics_port,
        });
        Ok(())
    }

    /// One key for every daemon, so a token has the same fingerprint on either path.
    pub fn keygen(&mut self) -> Result<()> {
        self.cli_ok(Side::Veth, &["keygen"])?;
        let key = self.state_dir(Side::Veth).join(rampart::paths::KEY_FILE);
        for side in self.sides().into_iter().skip(1) {
            let other = self.state_dir(side);
            fs::create_dir_all(&other).map_err(io_err("creating a state dir"))?;
            fs::copy(&key, other.join(rampart::paths::KEY_FILE))
                .map_err(io_err("sharing the fingerprint key"))?;
        }
        Ok(())
    }

    /// Starts `side`'s daemon in its namespace and waits until it answers `status`.
    pub fn start(&mut self, side: Side) -> Result<()> {
        let d = &mut self.daemons[side.index()];
        let pid = d.process.spawn(self.topo.ns(d.role))?;
        track(|t| t.pids.push(pid));
        Ok(d.process.wait_ready(&self.tokens)?)
    }

    pub fn pid(&self, side: Side) -> Option<u32> {
        self.d(side).process.pid()
    }

    /// Sends `sig` to the running daemon.
    pub fn signal(&self, side: Side, sig: libc::c_int) -> Result<()> {
        Ok(self.d(side).process.signal(sig)?)
    }

    /// `kill -9` and reap: nothing of the daemon runs afterwards, its pins stay.
    pub fn kill9(&mut self, side: Side) -> Result<ExitStatus> {
        self.end(side, libc::SIGKILL)
    }

    /// SIGTERM and wait for the exit.
    pub fn stop(&mut self, side: Side) -> Result<ExitStatus> {
        self.end(side, libc::SIGTERM)
    }

    /// Sends `sig`, reaps the daemon and forgets its pid (a reaped pid may be reused).
    fn end(&mut self, side: Side, sig: libc::c_int) -> Result<ExitStatus> {
        let pid = self.pid(side);
        let process = &mut self.daemons[side.index()].process;
        let st = process
            .signal(sig)
            .and_then(|()| process.wait_exit(&self.tokens));
        if let Some(pid) = pid {
            untrack_pid(pid);
        }
        Ok(st?)
    }

    /// The daemon log so far, redacted.
    pub fn log(&self, side: Side) -> String {
        self.d(side).process.log_text(&self.tokens)
    }

    /// Replaces every token this gateway handled with `<token>`.
    pub fn redact(&self, bytes: &[u8]) -> String {
        redact(&String::from_utf8_lossy(bytes), &self.tokens)
            .trim_end()
            .to_owned()
    }

    /// Adds a token made elsewhere (e.g. one nobody issued) to redaction and the scan.
    pub fn remember(&mut self, token: &BearerToken) {
        if !self.tokens.contains(token) {
            self.tokens.push(token.clone());
        }
    }

    /// Every token handled so far.
    pub fn tokens(&self) -> &[BearerToken] {
        &self.tokens
    }

    /// `rampart --config <side's config> <args>`; exit status not checked.
    pub fn cli(&self, side: Side, args: &[&str]) -> Result<Output> {
        Ok(self.d(side).process.cli(None, args)?)
    }

    /// A CLI call that must succeed; its redacted stdout.
    pub fn cli_ok(&self, side: Side, args: &[&str]) -> Result<String> {
        let out = self.cli(side, args)?;
        if !out.status.success() {
            return Err(self.cli_failed(side, args, &out));
        }
        Ok(self.redact(&out.stdout))
    }

    /// A CLI call that exited non-zero, its stderr redacted.
    fn cli_failed(&self, side: Side, args: &[&str], out: &Output) -> GatewayError {
        GatewayError::Cli {
            args: args.join(" "),
            daemon: self.d(side).process.name,
            status: out.status,
            stderr: self.redact(&out.stderr),
        }
    }

    fn cli_json(&self, side: Side, args: &[&str]) -> Result<serde_json::Value> {
        let text = self.cli_ok(side, args)?;
        serde_json::from_str(&text).map_err(|_| GatewayError::Output {
            args: args.join(" "),
            daemon: self.d(side).process.name,
            text,
        })
    }

    /// `rampart token issue` on `side`'s daemon.
    pub fn issue(&mut self, side: Side, contract: &str, scopes: &[&str]) -> Result<Issued> {
        self.issue_with(side, contract, scopes, None)
    }

    /// `rampart token issue`, with `--ttl` when given.
    pub fn issue_with(
        &mut self,
        side: Side,
        contract: &str,
        scopes: &[&str],
        ttl: Option<Duration>,
    ) -> Result<Issued> {
        let mut args: Vec<String> = vec!["token".into(), "issue".into(), "--contract".into()];
        args.push(contract.into());
        for s in scopes {
            args.extend(["--scope".into(), (*s).into()]);
        }
        if let Some(ttl) = ttl {
            args.extend(["--ttl".into(), format!("{}ms", ttl.as_millis())]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.cli(side, &args)?;
        // Keep the token (for redaction) before anything can print the output.
        let (token, fp) = crate::cli::issued(&out);
        self.remember(&token);
        if !out.status.success() {
            return Err(self.cli_failed(side, &args, &out));
        }
        let fp = fp.ok_or_else(|| GatewayError::Output {
            args: args.join(" "),
            daemon: self.d(side).process.name,
            text: self.redact(&out.stderr),
        })?;
        Ok(Issued { token, fp })
    }

    /// `rampart token revoke FP`; returns once the daemon says the kernel enforces it.
    pub fn revoke(&self, side: Side, fp: &str) -> Result<String> {
        self.cli_ok(side, &["token", "revoke", fp, "--reason", "test"])
    }

    /// The fingerprint of `token` under the shared key (`rampart fingerprint`, token on
    /// stdin), e.g. for a static `[[token]]` entry or a token nobody issued.
    pub fn fingerprint(&mut self, token: &BearerToken) -> Result<String> {
        self.remember(token);
        let mut child = self
            .d(Side::Veth)
            .process
            .cli_command(None)
            .arg("fingerprint")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io_err("running rampart fingerprint"))?;
        {
            let mut stdin = child.stdin.take().expect("piped stdin");
            writeln!(stdin, "{}", token.expose()).map_err(io_err("writing the token"))?;
        }
        let out = child
            .wait_with_output()
            .map_err(io_err("running rampart fingerprint"))?;
        let text = self.redact(&out.stdout);
        let fp = text
            .split_whitespace()
            .last()
            .unwrap_or_default()
            .to_owned();
        if !out.status.success() || fp.len() != 32 {
            return Err(GatewayError::Output {
                args: "fingerprint".into(),
                daemon: self.d(Side::Veth).process.name,
                text: format!("{text} {}", self.redact(&out.stderr)),
            });
        }
        Ok(fp)
    }

    /// `rampart status --json`.
    pub fn status(&self, side: Side) -> Result<serde_json::Value> {
        self.cli_json(side, &["status", "--json"])
    }

    /// `rampart token show FP --json`.
    pub fn token_show(&self, side: Side, fp: &str) -> Result<serde_json::Value> {
        self.cli_json(side, &["token", "show", fp, "--json"])
    }

    /// Recorded events (`rampart events --json -n N`), oldest first.
    pub fn events(&self, side: Side, n: usize) -> Result<Vec<serde_json::Value>> {
        let n = n.to_string();
        let text = self.cli_ok(side, &["events", "--json", "-n", &n])?;
        Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }

    /// Writes a new policy for every daemon (no reload yet).
    pub fn write_policy(&self, text: &str) -> Result<()> {
        for side in self.sides() {
            fs::write(self.policy_path(side), text).map_err(io_err("writing the policy"))?;
        }
        Ok(())
    }

    /// SIGHUP, then waits until the daemon applied (generation up) or rejected
    /// (`reloads_failed` up) the policy on disk. The file watcher may have reloaded
    /// already; a generation above `since_generation` counts.
    pub fn reload(&self, side: Side, since_generation: u64, since_failed: u64) -> Result<Reload> {
        self.signal(side, libc::SIGHUP)?;
        let waited = Duration::from_secs(10);
        let deadline = Instant::now() + waited;
        loop {
            let st = self.status(side)?;
            let generation = st["policy_generation"].as_u64().unwrap_or(0);
            if generation > since_generation {
                return Ok(Reload::Applied(generation));
            }
            if st["reloads_failed"].as_u64().unwrap_or(0) > since_failed {
                return Ok(Reload::Rejected);
            }
            if Instant::now() > deadline {
                return Err(GatewayError::ReloadTimeout {
                    daemon: self.d(side).process.name,
                    waited,
                    log: self.log(side),
                });
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// `/metrics` of `side`'s daemon (scraped inside its namespace), redacted.
    pub fn metrics(&self, side: Side) -> Result<String> {
        Ok(self.redact(&self.scrape(side)?))
    }

    /// Raw `/metrics` body of `side`'s daemon, scraped inside its namespace.
    fn scrape(&self, side: Side) -> Result<Vec<u8>> {
        let d = self.d(side);
        let out = self
            .topo
            .ns(d.role)
            .command("curl")
            .args(["-s", "-m", "5"])
            .arg(format!("http://127.0.0.1:{}/metrics", d.metrics_port))
            .stdin(Stdio::null())
            .output()
            .map_err(io_err("scraping /metrics"))?;
        Ok(out.stdout)
    }

    /// Raw `/metrics` text saved as a file in the temp dir, so the plaintext scan covers it.
    pub fn save_metrics(&self, side: Side, name: &str) -> Result<String> {
        let body = self.scrape(side)?;
        fs::write(self.dir.path().join(name), &body).map_err(io_err("saving a metrics scrape"))?;
        Ok(self.redact(&body))
    }

    /// One request through the TLS route to `side`; did the upstream see it? The request
    /// carries an `X-Test-Id` (a fresh one unless it has its own), so other traffic to the
    /// same upstream cannot be mistaken for it.
    pub fn request(&self, side: Side, curl: &Curl<'_>, req: &Request) -> Result<Outcome> {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let id = req.test_id.clone().unwrap_or_else(|| {
            format!(
                "gw-{}",
                SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            )
        });
        let req = req.clone().test_id(&id);
        let up = self.upstream(side);
        let before = up.requests_with_test_id(&id).len();
        let resp = curl.send(&req).map_err(GatewayError::Client)?;
        Ok(Outcome {
            reached: up.requests_with_test_id(&id).len() > before,
            resp,
        })
    }

    /// A 0600 curl header file with `token`'s Authorization line, in the private temp dir.
    pub fn header_file(&self, name: &str, token: &BearerToken) -> Result<PathBuf> {
        let path = self.dir.path().join(name);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err("writing a curl header file"))?;
        writeln!(f, "Authorization: Bearer {}", token.expose())
            .map_err(io_err("writing a curl header file"))?;
        Ok(path)
    }

    /// Every file a daemon wrote (logs, key dir, SQLite audit and WAL, event export, saved
    /// metrics) plus nginx's logs and everything the upstreams recorded, for the plaintext
    /// scan. Header files written by [`Gateway::header_file`] hold tokens on purpose and
    /// are left out.
    pub fn collect_files(&self) -> Vec<(PathBuf, Vec<u8>)> {
        let mut out = Vec::new();
        walk(self.dir.path(), &mut out);
        out.retain(|(p, _)| !is_header_file(p));
        let nginx = self.topo.nginx();
        out.push(("nginx/error.log".into(), nginx.error_log().into_bytes()));
        out.push(("nginx/access.log".into(), nginx.access_log().into_bytes()));
        for side in self.sides() {
            let recorded = format!("{:?}", self.upstream(side).requests());
            out.push((
                format!("upstream-{}-recorded", self.d(side).process.name).into(),
                recorded.into_bytes(),
            ));
        }
        out
    }

    /// `(token index, file)` for every plaintext token found in [`Gateway::collect_files`].
    pub fn plaintext_hits(&self) -> (Vec<String>, Vec<PathBuf>) {
        let files = self.collect_files();
        let mut hits = Vec::new();
        for (path, bytes) in &files {
            for (i, tok) in self.tokens.iter().enumerate() {
                let needle = tok.expose().as_bytes();
                if !needle.is_empty() && bytes.windows(needle.len()).any(|w| w == needle) {
                    hits.push(format!("token #{i} in {}", path.display()));
                }
            }
        }
        (hits, files.into_iter().map(|(p, _)| p).collect())
    }

    /// Stops every daemon, detaches its programs and removes its pins; one line per step
    /// for whoever narrates. Idempotent; Drop calls it too.
    pub fn shutdown(&mut self) -> Vec<String> {
        let mut said = Vec::new();
        for i in 0..self.daemons.len() {
            let side = [Side::Veth, Side::Loopback][i];
            if let Some(pid) = self.daemons[i].process.kill() {
                untrack_pid(pid);
                said.push(format!("{} stopped", self.daemons[i].process.name));
            }
            if self.daemons[i].bpffs.exists() {
                match self.cli(side, &["detach", "--force"]) {
                    Ok(out) if out.status.success() => {
                        said.push(format!("rampart detach: {}", self.redact(&out.stdout)))
                    }
                    Ok(out) => said.push(format!(
                        "rampart detach failed: {}",
                        self.redact(&out.stderr)
                    )),
                    Err(e) => said.push(format!("rampart detach: {e}")),
                }
                let _ = fs::remove_dir_all(&self.daemons[i].bpffs);
            }
        }
        said
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // Daemons and pins go before the namespaces (dropped with `topo` after this).
        self.shutdown();
        let dir = self.dir.path().to_owned();
        let bpffs: Vec<PathBuf> = self.daemons.iter().map(|d| d.bpffs.clone()).collect();
        track(|t| {
            t.dirs.retain(|d| *d != dir);
            t.daemons.retain(|(_, _, b)| !bpffs.contains(b));
        });
    }
}

fn is_header_file(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("h-"))
}

/// Every file under `dir` (recursively), as (path, bytes): what the plaintext-token
/// scans read.
pub fn walk(dir: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(&p, out);
        } else if let Ok(bytes) = fs::read(&p) {
            out.push((p, bytes));
        }
    }
}

/// `$RAMPART_BPFFS` or `/sys/fs/bpf`.
pub fn bpffs_root() -> PathBuf {
    std::env::var_os(BPFFS_ENV)
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_BPFFS), PathBuf::from)
}

/// `target/<profile>/rampart`, found next to the running binary (a `bin` target) or one
/// level up (a test in `deps/`).
pub fn rampart_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().map_err(io_err("locating the running binary"))?;
    let mut dir = exe.parent();
    while let Some(d) = dir {
        let bin = d.join("rampart");
        if bin.is_file() {
            return Ok(bin);
        }
        if d.file_name().is_some_and(|n| n == "target") {
            break;
        }
        dir = d.parent();
    }
    Err(GatewayError::NoBinary {
        path: exe
            .parent()
            .map_or_else(|| PathBuf::from("rampart"), |d| d.join("rampart")),
    })
}

/// Pin directories of runs whose process is gone (killed hard, so no clean-up ran).
pub fn cleanup_stale_pins() {
    let Ok(entries) = fs::read_dir(bpffs_root()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PIN_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// What a signal handler must clean up without destructors.
#[derive(Default)]
struct Tracked {
    pids: Vec<u32>,
    /// (rampart binary, config, bpffs dir) per daemon.
    daemons: Vec<(PathBuf, PathBuf, PathBuf)>,
    dirs: Vec<PathBuf>,
}

static TRACKED: Mutex<Tracked> = Mutex::new(Tracked {
    pids: Vec::new(),
    daemons: Vec::new(),
    dirs: Vec::new(),
});

fn track(f: impl FnOnce(&mut Tracked)) {
    f(&mut TRACKED.lock().unwrap_or_else(|e| e.into_inner()));
}

/// A reaped pid may be reused: never signal it from the teardown.
fn untrack_pid(pid: u32) {
    track(|t| t.pids.retain(|&p| p != pid));
}

/// For a SIGINT/SIGTERM handler (no destructors run): kills every daemon started by a
/// [`Gateway`] of this process, detaches, removes pins and temp dirs. Call
/// `netns::cleanup_registered` after it.
pub fn teardown_registered() {
    let t = std::mem::take(&mut *TRACKED.lock().unwrap_or_else(|e| e.into_inner()));
    for &pid in &t.pids {
        // SAFETY: kill(2) has no memory-safety preconditions. A recycled pid is possible
        // in principle but the window (our own children, reaped only by us) is tiny.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline && t.pids.iter().any(|&p| alive(p)) {
        thread::sleep(Duration::from_millis(20));
    }
    for (rampart, config, bpffs) in &t.daemons {
        if bpffs.exists() {
            let _ = Command::new(rampart)
                .arg("--config")
                .arg(config)
                .args(["detach", "--force"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let _ = fs::remove_dir_all(bpffs);
        }
    }
    for dir in &t.dirs {
        let _ = fs::remove_dir_all(dir);
    }
}

/// Alive and not a zombie (killed children stay zombies until reaped).
fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    })
}
