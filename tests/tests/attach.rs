//! Real TCP through really attached programs: native XDP on a veth (IPv4 and IPv6), TC on
//! `lo`, enforce and observe mode, drop and reset. Every assertion is about what the client
//! and the upstream saw, plus the verdict counters the datapath kept.
//!
//! Needs root and BPF; fails loudly otherwise. Run with `--test-threads=1`.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    thread,
    time::Duration,
};

use agent_common::{deny_action, mode, ListenerKey, Verdict};
use aya::programs::XdpMode;
use rampart::datapath::{clock::tai_now_ns, Datapath, TestPrograms};
use rampart_tests::{
    attach_support::{
        fp, fp_hex, install_token, listener, load_datapath, random_token, request_bytes, Auth,
        Counts, Exchange, HttpConn, Outcome,
    },
    client::BearerToken,
    netns::{self, Netns, VethConfig, VethPair},
    upstream::UpstreamServer,
};

const LISTENER: u32 = 0;
const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 204, 7, 1);
const SERVER_V4: Ipv4Addr = Ipv4Addr::new(10, 204, 7, 2);
const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x204, 7, 0, 0, 0, 0, 1);
const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x204, 7, 0, 0, 0, 0, 2);
const CLIENT_IF: &str = "att-cli";
const SERVER_IF: &str = "att-srv";
/// A dropped request shows as silence; this long is plenty on a veth or loopback.
const DROP_WAIT: Duration = Duration::from_secs(1);
const RESPONSE_WAIT: Duration = Duration::from_secs(3);

fn require_root() {
    if let Err(e) = netns::require_root() {
        panic!("attach tests load and attach BPF programs: {e}");
    }
    netns::cleanup_stale();
}

/// Client ns ── veth ── server ns; rampart XDP (driver mode) on the server end, the pass
/// program on the client end so XDP_TX'd resets reach the client. Fields drop in order:
/// the upstream, then the datapath (detaching), then the namespaces.
/// A client and a server namespace (`<tag>-cli`, `<tag>-srv`) joined by a veth pair.
fn client_and_server(tag: &str) -> (Netns, Netns, VethPair) {
    let client = Netns::new(&format!("{tag}-cli")).expect("client namespace");
    let server = Netns::new(&format!("{tag}-srv")).expect("server namespace");
    let veth = VethPair::create(
        &client,
        VethConfig {
            name: CLIENT_IF,
            ipv4: CLIENT_V4,
            ipv6: CLIENT_V6,
        },
        &server,
        VethConfig {
            name: SERVER_IF,
            ipv4: SERVER_V4,
            ipv6: SERVER_V6,
        },
    )
    .expect("veth between client and server");
    (client, server, veth)
}

/// Rampart's XDP program on the server's veth end and the pass program on the client's
/// (a veth delivers XDP_TX frames only to a peer running XDP); the latter's object, which
/// must live as long as the rig.
fn attach_both_ends(dp: &mut Datapath, client: &Netns, server: &Netns) -> TestPrograms {
    server
        .run(|| dp.attach_xdp(SERVER_IF, XdpMode::Driver))
        .expect("enter the server namespace")
        .expect("attach rampart XDP (driver mode) to the server veth end");
    let mut pass = TestPrograms::load(dp.options()).expect("load the test programs");
    client
        .run(|| pass.attach_pass(CLIENT_IF, XdpMode::Driver))
        .expect("enter the client namespace")
        .expect("attach the pass program to the client veth end");
    pass
}

struct VethRig {
    upstream: UpstreamServer,
    dp: Datapath,
    /// The pass-through program on the client's end (detached on drop, before the veth).
    _pass: TestPrograms,
    _veth: VethPair,
    client: Netns,
    _server: Netns,
    key: ListenerKey,
}

impl VethRig {
    fn new(mode: u8, action: u8) -> VethRig {
        require_root();
        let (client, server, veth) = client_and_server("att");
        // Dual-stack wildcard: one upstream for both address families.
        let upstream = UpstreamServer::start(
            &server,
            "veth",
            SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
        )
        .expect("upstream in the server namespace");
        let mut dp = load_datapath().expect("load the datapath");
        let key = ListenerKey {
            ifindex: veth.b.ifindex,
            port: upstream.port(),
            _pad: 0,
        };
        dp.set_listener(key, listener(LISTENER, mode, action))
            .expect("listener");
        let pass = attach_both_ends(&mut dp, &client, &server);
        VethRig {
            upstream,
            dp,
            _pass: pass,
            _veth: veth,
            client,
            _server: server,
            key,
        }
    }

    fn set_action(&mut self, mode: u8, action: u8) {
        self.dp
            .set_listener(self.key, listener(LISTENER, mode, action))
            .expect("update the listener");
    }

    fn connect(&self, ip: IpAddr) -> HttpConn {
        let addr = SocketAddr::new(ip, self.upstream.port());
        HttpConn::connect(&self.client, addr)
            .expect("enter the client namespace")
            .unwrap_or_else(|e| panic!("connect to the upstream at {addr}: {e}"))
    }

    fn counts(&self) -> Counts {
        Counts::read(&self.dp, LISTENER).expect("verdict counts")
    }
}

/// The denied cases of a test: id, credentials, the verdict the datapath must give.
fn denied_cases<'a>(
    good: &'a BearerToken,
    unknown: &'a BearerToken,
) -> [(&'static str, Auth<'a>, Verdict); 3] {
    [
        ("unknown", Auth::Bearer(unknown), Verdict::Unknown),
        ("missing", Auth::None, Verdict::Missing),
        // Both fields carry the valid token: the duplication alone must be refused.
        ("malformed", Auth::Twice(good), Verdict::Malformed),
    ]
}

/// Only `verdict` was counted (at least once: a dropped request is retransmitted, and
/// each retransmission is judged again).
fn assert_only(delta: &Counts, verdict: Verdict, what: &str) {
    let seen = delta.requests_only();
    assert!(
        !seen.is_empty() && seen.iter().all(|(v, _)| *v == verdict),
        "{what}: expected only `{}` verdicts, counted {delta:?}",
        verdict.name()
    );
}

fn assert_timed_out(ex: &Exchange, what: &str) {
    assert_eq!(
        ex.outcome,
        Outcome::TimedOut,
        "{what}: a dropped request must leave the client waiting, it saw {ex:?}"
    );
}

fn assert_reset(ex: &Exchange, what: &str) {
    assert_eq!(
        ex.outcome,
        Outcome::Reset,
        "{what}: the client must see a connection reset, it saw {ex:?}"
    );
    // Seen within the exchange's wait, which bounds how prompt it was; no tighter bound,
    // as this also runs under emulation on a busy host.
}

fn enforce_on_veth(ip: IpAddr) {
    let mut rig = VethRig::new(mode::ENFORCE, deny_action::DROP);
    let good = random_token();
    let unknown = random_token();
    install_token(&mut rig.dp, &good).expect("install the valid token");

    // A valid token passes and is answered.
    let before = rig.counts();
    let mut conn = rig.connect(ip);
    let ex = conn.exchange(
        &request_bytes("/v1/items", "allowed", Auth::Bearer(&good)),
        RESPONSE_WAIT,
    );
    assert_eq!(
        ex.status(),
        Some(200),
        "valid token {}: {ex:?}",
        fp_hex(&fp(&good))
    );
    let got = rig.upstream.requests_with_test_id("allowed");
    assert_eq!(got.len(), 1, "the upstream must record the allowed request");
    assert!(got[0].had_authorization);
    let delta = rig.counts().since(&before);
    assert_eq!(
        delta.requests_only(),
        vec![(Verdict::Allow, 1)],
        "allowed request: {delta:?}"
    );
    let stats = rig.dp.token_stats(&fp(&good));
    assert_eq!(
        stats.by_verdict[Verdict::Allow as usize],
        1,
        "the kernel's fingerprint of the valid token must match siphash::fingerprint"
    );
    // Orderly close: the upstream sees EOF and forgets the connection.
    drop(conn);

    // Action drop: the request never reaches the upstream and the client hears nothing.
    for (id, auth, verdict) in denied_cases(&good, &unknown) {
        let what = format!("drop/{id} over {ip}");
        let before = rig.counts();
        let mut conn = rig.connect(ip);
        let ex = conn.exchange(&request_bytes("/v1/items", id, auth), DROP_WAIT);
        assert_timed_out(&ex, &what);
        assert!(
            rig.upstream.requests_with_test_id(id).is_empty(),
            "{what}: the upstream received a denied request"
        );
        assert_only(&rig.counts().since(&before), verdict, &what);
        // The dropped data is still unacknowledged, so only an RST ends this connection.
        conn.abort();
    }
    assert_eq!(
        rig.upstream
            .wait_open_connections(0, Duration::from_secs(2)),
        0,
        "connections from the drop cases must be closed before the reset cases"
    );

    // Action reset: the upstream's half is reset at once, the client's on its
    // retransmission; nobody is left holding a connection.
    rig.set_action(mode::ENFORCE, deny_action::RESET);
    for (id, auth, verdict) in denied_cases(&good, &unknown) {
        let what = format!("reset/{id} over {ip}");
        let before = rig.counts();
        let accepted = rig.upstream.accepted_connections();
        let mut conn = rig.connect(ip);
        let ex = conn.exchange(&request_bytes("/v1/items", id, auth), RESPONSE_WAIT);
        assert_reset(&ex, &what);
        assert!(
            rig.upstream.requests_with_test_id(id).is_empty(),
            "{what}: the upstream received a denied request"
        );
        assert_only(&rig.counts().since(&before), verdict, &what);
        assert_eq!(
            rig.upstream.accepted_connections(),
            accepted + 1,
            "{what}: the upstream must have accepted the connection"
        );
        assert_eq!(
            rig.upstream
                .wait_open_connections(0, Duration::from_secs(1)),
            0,
            "{what}: the upstream still holds the connection"
        );
    }

    // And the valid token still gets through under the reset action.
    let mut conn = rig.connect(ip);
    let ex = conn.exchange(
        &request_bytes("/v1/items", "allowed-again", Auth::Bearer(&good)),
        RESPONSE_WAIT,
    );
    assert_eq!(
        ex.status(),
        Some(200),
        "valid token after the resets: {ex:?}"
    );
    assert_eq!(rig.upstream.requests_with_test_id("allowed-again").len(), 1);
}

#[test]
fn xdp_on_veth_enforces_over_ipv4() {
    enforce_on_veth(IpAddr::V4(SERVER_V4));
}

#[test]
fn xdp_on_veth_enforces_over_ipv6() {
    enforce_on_veth(IpAddr::V6(SERVER_V6));
}

#[test]
fn observe_mode_passes_everything_and_counts_what_enforce_would_deny() {
    // Reset as the action: if observe mode enforced anything, the client would see it.
    let mut rig = VethRig::new(mode::OBSERVE, deny_action::RESET);
    let (good, unknown, revoked) = (&random_token(), &random_token(), &random_token());
    install_token(&mut rig.dp, good).expect("install the valid token");
    install_token(&mut rig.dp, revoked).expect("install the revoked token");
    rig.dp
        .revoke(fp(revoked), tai_now_ns())
        .expect("revoke a token");

    let before = rig.counts();
    let mut conn = rig.connect(IpAddr::V4(SERVER_V4));
    let cases: [(&str, Auth<'_>); 5] = [
        ("obs-allowed", Auth::Bearer(good)),
        ("obs-unknown", Auth::Bearer(unknown)),
        ("obs-missing", Auth::None),
        ("obs-malformed", Auth::Twice(good)),
        ("obs-revoked", Auth::Bearer(revoked)),
    ];
    let mut conn_ids = Vec::new();
    for (id, auth) in cases {
        let ex = conn.exchange(&request_bytes("/v1/items", id, auth), RESPONSE_WAIT);
        assert_eq!(ex.status(), Some(200), "observe mode, {id}: {ex:?}");
        let got = rig.upstream.requests_with_test_id(id);
        assert_eq!(got.len(), 1, "observe mode, {id}: the upstream must get it");
        conn_ids.push(got[0].conn_id);
    }
    conn_ids.dedup();
    assert_eq!(
        conn_ids.len(),
        1,
        "all requests travelled on one connection"
    );

    // Exactly one judgement per request: nothing was retransmitted.
    let delta = rig.counts().since(&before);
    let mut want = vec![
        (Verdict::Allow, 1),
        (Verdict::Missing, 1),
        (Verdict::Malformed, 1),
        (Verdict::Unknown, 1),
        (Verdict::Revoked, 1),
    ];
    want.sort_by_key(|(v, _)| *v as u32);
    assert_eq!(
        delta.requests_only(),
        want,
        "observe mode counts: {delta:?}"
    );
    let revoked_stats = rig.dp.token_stats(&fp(revoked));
    assert_eq!(
        revoked_stats.by_verdict[Verdict::Revoked as usize],
        1,
        "revoked token {} counted per token",
        fp_hex(&fp(revoked))
    );
}

/// One namespace, upstream on 127.0.0.1, rampart TC on `lo` ingress.
struct LoRig {
    upstream: UpstreamServer,
    dp: Datapath,
    ns: Netns,
    key: ListenerKey,
}

impl LoRig {
    fn new(mode: u8, action: u8) -> LoRig {
        require_root();
        let ns = Netns::new("att-lo").expect("namespace");
        let upstream = UpstreamServer::start(
            &ns,
            "lo",
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
        )
        .expect("upstream on 127.0.0.1");
        let mut dp = load_datapath().expect("load the datapath");
        let key = ListenerKey {
            ifindex: ns.ifindex("lo").expect("lo ifindex"),
            port: upstream.port(),
            _pad: 0,
        };
        dp.set_listener(key, listener(LISTENER, mode, action))
            .expect("listener");
        ns.run(|| dp.attach_tc("lo"))
            .expect("enter the namespace")
            .expect("attach rampart TC to lo");
        LoRig {
            upstream,
            dp,
            ns,
            key,
        }
    }

    fn connect(&self) -> HttpConn {
        HttpConn::connect(&self.ns, self.upstream.addr())
            .expect("enter the namespace")
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.upstream.addr()))
    }

    fn counts(&self) -> Counts {
        Counts::read(&self.dp, LISTENER).expect("verdict counts")
    }
}

#[test]
fn tc_on_lo_enforces_and_revocation_hits_an_open_keepalive_connection() {
    let mut rig = LoRig::new(mode::ENFORCE, deny_action::RESET);
    let good = random_token();
    let unknown = random_token();
    install_token(&mut rig.dp, &good).expect("install the valid token");

    // Two requests on one keep-alive connection are both answered.
    let mut keepalive = rig.connect();
    for id in ["ka-1", "ka-2"] {
        let ex = keepalive.exchange(
            &request_bytes("/v1/items", id, Auth::Bearer(&good)),
            RESPONSE_WAIT,
        );
        assert_eq!(ex.status(), Some(200), "{id}: {ex:?}");
    }
    let ka: Vec<_> = ["ka-1", "ka-2"]
        .iter()
        .flat_map(|id| rig.upstream.requests_with_test_id(id))
        .collect();
    assert_eq!(
        ka.len(),
        2,
        "the upstream must record both keep-alive requests"
    );
    assert_eq!(ka[0].conn_id, ka[1].conn_id, "one connection carried both");

    // An unknown token on its own connection is reset and never reaches the upstream.
    let before = rig.counts();
    let mut other = rig.connect();
    let ex = other.exchange(
        &request_bytes("/v1/items", "lo-unknown", Auth::Bearer(&unknown)),
        RESPONSE_WAIT,
    );
    assert_reset(&ex, "TC reset/unknown");
    assert!(rig.upstream.requests_with_test_id("lo-unknown").is_empty());
    assert_only(
        &rig.counts().since(&before),
        Verdict::Unknown,
        "TC reset/unknown",
    );

    // Revocation takes effect on the very next request of the open connection.
    rig.dp
        .revoke(fp(&good), tai_now_ns())
        .expect("revoke the token");
    let before = rig.counts();
    let ex = keepalive.exchange(
        &request_bytes("/v1/items", "ka-3", Auth::Bearer(&good)),
        RESPONSE_WAIT,
    );
    assert_reset(&ex, "revoked token on the keep-alive connection");
    assert!(
        rig.upstream.requests_with_test_id("ka-3").is_empty(),
        "a request with the revoked token {} reached the upstream",
        fp_hex(&fp(&good))
    );
    assert_only(
        &rig.counts().since(&before),
        Verdict::Revoked,
        "revoked token on the keep-alive connection",
    );
    assert_eq!(
        rig.upstream
            .wait_open_connections(0, Duration::from_secs(1)),
        0,
        "the upstream still holds a reset connection"
    );

    // Action drop on TC: silence, and still nothing at the upstream.
    rig.dp
        .set_listener(
            rig.key,
            listener(LISTENER, mode::ENFORCE, deny_action::DROP),
        )
        .expect("update the listener");
    let before = rig.counts();
    let mut dropped = rig.connect();
    let ex = dropped.exchange(
        &request_bytes("/v1/items", "lo-drop", Auth::Bearer(&unknown)),
        DROP_WAIT,
    );
    assert_timed_out(&ex, "TC drop/unknown");
    // Give a late delivery every chance to show up.
    thread::sleep(Duration::from_millis(100));
    assert!(rig.upstream.requests_with_test_id("lo-drop").is_empty());
    assert_only(
        &rig.counts().since(&before),
        Verdict::Unknown,
        "TC drop/unknown",
    );
    dropped.abort();
}

/// The TC fixture table cannot test-run frames over one page; real loopback traffic (64 KiB
/// MTU) carries 4 KiB tokens through the TC program here.
#[test]
fn tc_on_lo_judges_4096_byte_tokens() {
    let mut rig = LoRig::new(mode::ENFORCE, deny_action::RESET);
    let big = BearerToken::new(format!("rmp_{}", "A1b2-C3d4.e5_F6~g7+h8/".repeat(186)));
    let big_unknown = BearerToken::new(format!("rmp_{}", "Z9y8-X7w6.v5_U4~t3+s2/".repeat(186)));
    install_token(&mut rig.dp, &big).expect("install the 4 KiB token");
    let mut conn = rig.connect();
    let ex = conn.exchange(
        &request_bytes("/v1/items", "big-ok", Auth::Bearer(&big)),
        RESPONSE_WAIT,
    );
    assert_eq!(ex.status(), Some(200), "4 KiB token: {ex:?}");
    assert_eq!(rig.upstream.requests_with_test_id("big-ok").len(), 1);
    let before = rig.counts();
    let mut other = rig.connect();
    let ex = other.exchange(
        &request_bytes("/v1/items", "big-unknown", Auth::Bearer(&big_unknown)),
        RESPONSE_WAIT,
    );
    assert_reset(&ex, "unknown 4 KiB token");
    assert!(rig.upstream.requests_with_test_id("big-unknown").is_empty());
    assert_only(
        &rig.counts().since(&before),
        Verdict::Unknown,
        "unknown 4 KiB token",
    );
}

/// A real nginx as the plaintext upstream (origin ports answering `200 ok` themselves),
/// XDP on its veth end, and a client that controls its writes: the access log says which
/// requests nginx parsed out of the byte stream.
struct NginxRig {
    nginx: rampart_tests::nginx::Nginx,
    dp: Datapath,
    _pass: TestPrograms,
    _veth: VethPair,
    client: Netns,
    _server: Netns,
}

/// HTTP/1.1, inspected.
const H1_PORT: u16 = 8180;
/// h2c with prior knowledge, inspected.
const H2C_PORT: u16 = 8181;
/// h2c with prior knowledge, not inspected (the control: such a request does reach nginx).
const H2C_OPEN_PORT: u16 = 8182;

impl NginxRig {
    fn new() -> NginxRig {
        use rampart_tests::nginx::{Nginx, NginxConfig, Origin};
        require_root();
        let (client, server, veth) = client_and_server("ngx");
        let origin = |listen_port, http2| Origin { listen_port, http2 };
        let nginx = Nginx::start(
            &server,
            NginxConfig {
                origins: vec![
                    origin(H1_PORT, false),
                    origin(H2C_PORT, true),
                    origin(H2C_OPEN_PORT, true),
                ],
                ..NginxConfig::default()
            },
        )
        .expect("nginx as the plaintext upstream");
        let mut dp = load_datapath().expect("load the datapath");
        for port in [H1_PORT, H2C_PORT] {
            let key = ListenerKey {
                ifindex: veth.b.ifindex,
                port,
                _pad: 0,
            };
            dp.set_listener(key, listener(LISTENER, mode::ENFORCE, deny_action::DROP))
                .expect("listener");
        }
        let pass = attach_both_ends(&mut dp, &client, &server);
        NginxRig {
            nginx,
            dp,
            _pass: pass,
            _veth: veth,
            client,
            _server: server,
        }
    }

    /// Connects to `port`, writes each of `writes` as its own segment (TCP_NODELAY, a
    /// pause between writes), then reads what comes back within `wait`.
    fn send(&self, port: u16, writes: &[&[u8]], wait: Duration) -> Vec<u8> {
        use std::io::{Read as _, Write as _};
        let addr = SocketAddr::new(IpAddr::V4(SERVER_V4), port);
        let writes: Vec<Vec<u8>> = writes.iter().map(|w| w.to_vec()).collect();
        self.client
            .run(move || {
                let mut s = std::net::TcpStream::connect_timeout(&addr, RESPONSE_WAIT)
                    .unwrap_or_else(|e| panic!("connect to nginx at {addr}: {e}"));
                s.set_nodelay(true).unwrap();
                for w in &writes {
                    s.write_all(w).unwrap();
                    thread::sleep(Duration::from_millis(80));
                }
                s.set_read_timeout(Some(wait)).unwrap();
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                let deadline = std::time::Instant::now() + wait;
                while std::time::Instant::now() < deadline {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                got
            })
            .expect("enter the client namespace")
    }

    /// Request targets in nginx's access log.
    fn parsed(&self) -> String {
        self.nginx.access_log()
    }
}

fn get(path: &str, token: Option<&BearerToken>) -> Vec<u8> {
    let auth = token
        .map(|t| format!("Authorization: Bearer {}\r\n", t.expose()))
        .unwrap_or_default();
    format!("GET {path} HTTP/1.1\r\nHost: origin\r\n{auth}\r\n").into_bytes()
}

#[test]
fn nginx_parses_no_request_that_was_not_judged() {
    let mut rig = NginxRig::new();
    let good = random_token();
    install_token(&mut rig.dp, &good).expect("install the valid token");
    let rig = rig;
    let served = |what: &str, reply: &[u8], path: &str| {
        assert!(
            rig.parsed().contains(&format!("GET {path} HTTP/1.1")),
            "{what}: nginx must have served {path}; access log:\n{}",
            rig.parsed()
        );
        assert!(
            reply.starts_with(b"HTTP/1.1 200"),
            "{what}: reply {:?}",
            String::from_utf8_lossy(reply)
        );
    };
    let never = |what: &str, path: &str| {
        assert!(
            !rig.parsed().contains(path),
            "{what}: nginx parsed {path}, which was never judged; access log:\n{}",
            rig.parsed()
        );
    };
    let long = Duration::from_millis(1500);

    // Pipelined: a valid request and one without a token in one segment. Without the
    // stream view nginx served both; now the segment is denied whole.
    let both = [get("/ok-pipe", Some(&good)), get("/sneaky-pipe", None)].concat();
    rig.send(H1_PORT, &[&both], long);
    never("pipelined", "/sneaky-pipe");
    // Two valid ones in one segment: both served.
    let two = [
        get("/ok-pipe-1", Some(&good)),
        get("/ok-pipe-2", Some(&good)),
    ]
    .concat();
    let reply = rig.send(H1_PORT, &[&two], long);
    served("pipelined pair", &reply, "/ok-pipe-1");
    served("pipelined pair", &reply, "/ok-pipe-2");

    // Empty lines before the request line (nginx skips them).
    let crlf = [b"\r\n\r\n".to_vec(), get("/sneaky-crlf", None)].concat();
    rig.send(H1_PORT, &[&crlf], long);
    never("leading empty lines", "/sneaky-crlf");
    let crlf_ok = [b"\r\n".to_vec(), get("/ok-crlf", Some(&good))].concat();
    let reply = rig.send(H1_PORT, &[&crlf_ok], long);
    served("leading empty line", &reply, "/ok-crlf");

    // A request after a Content-Length body, and after a chunked body.
    let mut post = format!(
        "POST /ok-body HTTP/1.1\r\nHost: origin\r\nAuthorization: Bearer {}\r\nContent-Length: 5\r\n\r\nhello",
        good.expose()
    )
    .into_bytes();
    post.extend(get("/sneaky-after-body", None));
    rig.send(H1_PORT, &[&post], long);
    never("after a body", "/sneaky-after-body");
    let mut chunked = format!(
        "POST /ok-chunked HTTP/1.1\r\nHost: origin\r\nAuthorization: Bearer {}\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\n\r\n",
        good.expose()
    )
    .into_bytes();
    chunked.extend(get("/sneaky-after-chunked", None));
    rig.send(H1_PORT, &[&chunked], long);
    never("after a chunked body", "/sneaky-after-chunked");

    // The request line split right after the method.
    let split = get("/sneaky-split", None);
    rig.send(H1_PORT, &[&split[..3], &split[3..]], long);
    never("split after the method", "/sneaky-split");
    let split_ok = get("/ok-split", Some(&good));
    let reply = rig.send(H1_PORT, &[&split_ok[..3], &split_ok[3..]], long);
    served("split after the method", &reply, "/ok-split");

    // A header block written in several writes, the token in the last: served.
    let block = get("/ok-writes", Some(&good));
    let cut = block
        .windows(13)
        .position(|w| w == b"Authorization")
        .unwrap();
    let reply = rig.send(
        H1_PORT,
        &[
            &block[..20],
            &block[20..cut],
            &block[cut..cut + 30],
            &block[cut + 30..],
        ],
        long,
    );
    served("header block in four writes", &reply, "/ok-writes");

    // h2c with prior knowledge: not HTTP/1.x, denied on the inspected port...
    let curl = |port: u16, path: &str| {
        rig.client
            .command("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "2",
            ])
            .arg("--http2-prior-knowledge")
            .args(["-H", "Authorization: Bearer rmp_unknown_token_0123456789"])
            .arg(format!("http://{SERVER_V4}:{port}{path}"))
            .output()
            .expect("run curl in the client namespace")
    };
    let out = curl(H2C_PORT, "/sneaky-h2c");
    never("h2c prior knowledge", "/sneaky-h2c");
    assert_ne!(
        String::from_utf8_lossy(&out.stdout),
        "200",
        "h2c must not be answered"
    );
    // ... while the same request on a port Rampart does not inspect reaches nginx (so
    // the check above can fail).
    let out = curl(H2C_OPEN_PORT, "/control-h2c");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "200",
        "curl --http2-prior-knowledge control"
    );
    assert!(
        rig.parsed().contains("/control-h2c"),
        "control h2c request missing from the access log"
    );
}

/// Requests of a legitimate client over a lossy, reordering link: `rounds` keep-alive
/// connections of `per_conn` requests, each request's header block (a large cookie)
/// spanning several segments; returns the statuses the client read, in order.
fn lossy_session(rig: &NginxRig, token: &BearerToken, rounds: usize, per_conn: usize) -> Vec<u16> {
    use std::io::{Read as _, Write as _};
    let addr = SocketAddr::new(IpAddr::V4(SERVER_V4), H1_PORT);
    let cookie = "c".repeat(3000);
    let requests: Vec<Vec<u8>> = (0..rounds * per_conn)
        .map(|i| {
            format!(
                "GET /netem-{i} HTTP/1.1\r\nHost: origin\r\nCookie: k={cookie}\r\nAuthorization: Bearer {}\r\n\r\n",
                token.expose()
            )
            .into_bytes()
        })
        .collect();
    rig.client
        .run(move || {
            let mut statuses = Vec::new();
            for conn in requests.chunks(per_conn) {
                let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))
                    .unwrap_or_else(|e| panic!("connect to nginx at {addr}: {e}"));
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                for req in conn {
                    s.write_all(req).unwrap();
                    // One response: its head, then as many body bytes as it announces.
                    let mut got = Vec::new();
                    let mut buf = [0u8; 4096];
                    let head_end = loop {
                        if let Some(p) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                            break p + 4;
                        }
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => return statuses,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&got[..head_end]).to_ascii_lowercase();
                    let body_len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while got.len() < head_end + body_len {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => return statuses,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    statuses.push(head[9..12].parse().unwrap_or(0));
                }
            }
            statuses
        })
        .expect("enter the client namespace")
}

/// Ordinary loss and reordering of a legitimate connection (segments the datapath drops as
/// out of sequence come again from the client's TCP, in order): every request completes,
/// and nginx parsed each exactly once. netem (as in the issue: loss 2 %, reorder 5 %) delays
/// segments by 4 ms, sends 5 % of them at once (ahead of the others) and drops 2 %, in both
/// directions.
#[test]
#[ignore = "needs the sch_netem qdisc, which the 6.18 host kernel lacks: `cargo xtask test` runs it in the 6.1 VM"]
fn legitimate_requests_complete_under_loss_and_reordering() {
    let mut rig = NginxRig::new();
    let good = random_token();
    install_token(&mut rig.dp, &good).expect("install the valid token");
    for (ns, dev) in [(&rig.client, CLIENT_IF), (&rig._server, SERVER_IF)] {
        let out = ns
            .command("tc")
            .args(["qdisc", "add", "dev", dev, "root", "netem"])
            .args(["delay", "4ms", "reorder", "5%", "loss", "2%"])
            .output()
            .expect("run tc");
        assert!(
            out.status.success(),
            "netem on {dev}: {} (is sch_netem available?)",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let before = rig.dp.verdict_counts(LISTENER).expect("verdict counts");
    let (rounds, per_conn) = (6, 10);
    let statuses = lossy_session(&rig, &good, rounds, per_conn);
    let after = rig.dp.verdict_counts(LISTENER).expect("verdict counts");
    let delta = |v: Verdict| after[v as usize] - before[v as usize];
    let log = rig.parsed();
    assert_eq!(
        statuses,
        vec![200; rounds * per_conn],
        "every request answered 200 (allowed {}, out_of_sequence {}, malformed {}); access log:\n{log}",
        delta(Verdict::Allow),
        delta(Verdict::OutOfSequence),
        delta(Verdict::Malformed),
    );
    for i in 0..rounds * per_conn {
        let line = format!("GET /netem-{i} HTTP/1.1");
        assert_eq!(
            log.matches(&line).count(),
            1,
            "nginx parsed /netem-{i} once; access log:\n{log}"
        );
    }
    // Out-of-order segments were in fact dropped and sent again: the link did reorder.
    println!(
        "netem: {} requests allowed, {} segments out of sequence (dropped, sent again)",
        delta(Verdict::Allow),
        delta(Verdict::OutOfSequence)
    );
    assert!(
        delta(Verdict::OutOfSequence) > 0,
        "netem reordered nothing the datapath saw: the test did not test reordering"
    );
}
