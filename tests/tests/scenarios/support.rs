//! What every scenario shares: the policy, the gateway, counters, assertions on what the
//! client and upstream saw, and the figures file.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead, BufReader},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::{Child, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rampart_tests::{
    client::{BearerToken, Request},
    gateway::{Gateway, GatewayBuilder, Side},
    topology::UPSTREAM_V4,
};
use serde_json::Value;

/// `standard` never throttles a test; `ramp` is scenario 5's contract (`ramp-vm`, at a
/// quarter of the rates, in the emulated 6.1 VM, whose TLS gateway offers only 30–85/s
/// while the other lane runs beside it); `demote` is the
/// same shape compressed to 1 s, with a breach penalty of one stage for 3 s; `trickle`
/// (two at once, then one per 4 s) is the respond scenario's Retry-After.
pub const POLICY: &str = r#"[[contract]]
name = "standard"
stages = [{ after = "0s", rate = 1000, burst = 1000 }]

[[contract]]
name = "ramp"
stages = [
  { after = "0s", rate = 20, burst = 5 },
  { after = "10s", rate = 40, burst = 5 },
]

[[contract]]
name = "ramp-vm"
stages = [
  { after = "0s", rate = 5, burst = 5 },
  { after = "10s", rate = 10, burst = 5 },
]

[[contract]]
name = "demote"
stages = [
  { after = "0s", rate = 20, burst = 5 },
  { after = "1s", rate = 40, burst = 5 },
]
penalty = { demote = 1, cooldown = "3s" }

[[contract]]
name = "trickle"
stages = [{ after = "0s", rate = 0.25, burst = 1 }]

[[scope]]
name = "all"
methods = ["*"]
prefix = "/"

[[scope]]
name = "reports-read"
methods = ["GET"]
prefix = "/v1/reports/"
"#;

/// Inside the emulated 6.1 VM (xtask's VM runner sets `RAMPART_IN_VM`): TCG runs the
/// TLS gateway and the CLI several times slower, so two scenarios scale their load.
pub fn in_emulated_vm() -> bool {
    std::env::var_os("RAMPART_IN_VM").is_some()
}

pub fn gateway(b: GatewayBuilder) -> Gateway {
    b.policy(POLICY)
        .build()
        .unwrap_or_else(|e| panic!("setting up the gateway: {e}"))
}

/// `status --json` request counter of the side's (only) listener.
pub fn counter(gw: &Gateway, side: Side, verdict: &str) -> u64 {
    let st = gw.status(side).unwrap_or_else(|e| panic!("{e}"));
    st["listeners"][0]["requests"][verdict]
        .as_u64()
        .unwrap_or(0)
}

pub fn counters(gw: &Gateway, side: Side) -> BTreeMap<String, u64> {
    let st = gw.status(side).unwrap_or_else(|e| panic!("{e}"));
    st["listeners"][0]["requests"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

pub fn delta(after: &BTreeMap<String, u64>, before: &BTreeMap<String, u64>, v: &str) -> u64 {
    after.get(v).copied().unwrap_or(0) - before.get(v).copied().unwrap_or(0)
}

/// A request that must be served: 200 from the upstream, recorded there.
pub fn assert_served(gw: &Gateway, side: Side, req: &Request, what: &str) {
    let o = gw
        .request(side, &gw.curl(side), req)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(
        o.resp.status,
        200,
        "{what}: client saw {:?} (the listener's counts: {:?})",
        o.resp.error,
        counters(gw, side)
    );
    assert!(o.reached, "{what}: 200 but the upstream recorded nothing");
}

/// A request that must be denied: the client gets no 200 and the upstream never sees it.
pub fn assert_denied(gw: &Gateway, side: Side, req: &Request, what: &str) {
    let o = gw
        .request(side, &gw.curl(side), req)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_ne!(o.resp.status, 200, "{what}: the client was served");
    assert!(!o.reached, "{what}: the request reached the upstream");
}

pub fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

/// An event's `time` (RFC 3339, UTC) as Unix seconds.
pub fn event_time(ev: &Value) -> Option<f64> {
    let t = humantime::parse_rfc3339(ev["time"].as_str()?).ok()?;
    Some(t.duration_since(UNIX_EPOCH).ok()?.as_secs_f64())
}

pub fn rfc3339(unix: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}

/// Merges `value` under `key` into `target/bench/scenarios.json`. (In the 6.1 VM the file
/// lands in the guest's tmpfs overlay; the figures are in the run's console output.)
pub fn record(key: &str, value: Value) {
    let exe = std::env::current_exe().expect("test executable");
    // target/<profile>/deps/scenarios-… → target/
    let target = exe
        .ancestors()
        .nth(3)
        .map_or_else(|| PathBuf::from("target"), PathBuf::from);
    let dir = target.join("bench");
    fs::create_dir_all(&dir).expect("creating target/bench");
    let path = dir.join("scenarios.json");
    let mut all: serde_json::Map<String, Value> = fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    all.insert(key.to_owned(), value);
    fs::write(
        &path,
        serde_json::to_vec_pretty(&Value::Object(all)).expect("JSON"),
    )
    .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    println!("(recorded under \"{key}\" in {})", path.display());
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The TCP address a direct client in the gateway ns uses for `side`'s upstream.
pub fn upstream_addr(gw: &Gateway, side: Side) -> SocketAddr {
    match side {
        Side::Veth => SocketAddr::new(IpAddr::V4(UPSTREAM_V4), gw.topo().upstream_port()),
        Side::Loopback => SocketAddr::new(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            gw.topo().loopback_upstream_port(),
        ),
    }
}

/// curl in the client ns sending `count` GETs to `path_prefix<n>` at `rate`/s over one
/// keep-alive connection (`--rate` paces transfer starts); yields each HTTP status as it
/// completes (0: no response).
pub fn paced(
    gw: &Gateway,
    name: &str,
    token: &BearerToken,
    test_id: Option<&str>,
    path_prefix: &str,
    rate: u32,
    count: u32,
) -> (Child, mpsc::Receiver<u16>) {
    let headers = gw
        .header_file(&format!("h-{name}"), token)
        .unwrap_or_else(|e| panic!("{e}"));
    if let Some(id) = test_id {
        let mut text = fs::read_to_string(&headers).expect("header file");
        text.push_str(&format!("X-Test-Id: {id}\n"));
        fs::write(&headers, text).expect("header file");
    }
    let mut child = gw
        .topo()
        .client()
        .command("curl")
        .args(["-sk", "--http1.1", "--max-time", "5", "--rate"])
        .arg(format!("{rate}/s"))
        // The statuses go to stderr, which stdio leaves unbuffered: on stdout (a pipe,
        // block-buffered) the last 4 KiB of them die with curl when a test kills it.
        .args(["-o", "/dev/null", "-w", "%{stderr}%{http_code}\\n", "-H"])
        .arg(format!("@{}", headers.display()))
        .arg(format!(
            "{}{path_prefix}[1-{count}]",
            gw.route_url(Side::Veth)
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting curl");
    let out = child.stderr.take().expect("curl stderr");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line.trim().parse().unwrap_or(0)).is_err() {
                return;
            }
        }
    });
    (child, rx)
}

/// Waits for a paced curl to finish; its statuses in order.
pub fn finish(mut child: Child, rx: mpsc::Receiver<u16>) -> Vec<u16> {
    let statuses: Vec<u16> = rx.iter().collect();
    let _ = child.wait();
    statuses
}

/// Lets nginx learn of a reset from Rampart within milliseconds instead of one minimum
/// RTO (200 ms): with `action = "reset"` the denied segment itself becomes the RST to the
/// upstream, and nginx hears of it on its first retransmission. A per-route `rto_min` on
/// the gateway → upstream route shortens that wait, so two client connections can offer
/// 200 requests/s even when almost all of them are denied. It changes nothing Rampart
/// sees or decides.
pub fn fast_retransmit(gw: &Gateway) {
    let veth = gw.topo().gateway_upstream_veth().name.clone();
    gw.topo()
        .gateway()
        .ip(&[
            "route",
            "replace",
            "10.203.2.0/24",
            "dev",
            &veth,
            "proto",
            "kernel",
            "scope",
            "link",
            "src",
            "10.203.2.1",
            "rto_min",
            "5ms",
        ])
        .unwrap_or_else(|e| panic!("setting rto_min: {e}"));
}
