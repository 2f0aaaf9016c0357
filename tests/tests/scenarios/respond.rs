//! `action = "respond"`: the client is told why, from the kernel. Through the TLS gateway
//! (nginx passes an upstream's 4xx on) and directly against the upstreams, on both hooks,
//! IPv4 and IPv6: the statuses and headers a real client receives, the upstream never
//! seeing the request, and no connection left on the upstream (`ss`).

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use rampart_tests::{
    attach_support::{random_token, request_bytes, Auth, HttpConn},
    client::BearerToken,
    gateway::{Gateway, Side},
    netns::Netns,
    topology::UPSTREAM_V6,
    upstream::UpstreamServer,
};

use super::support::*;

/// What a client received: status, header fields (names lowercased), body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn parse(raw: &[u8]) -> Option<Answer> {
        let text = String::from_utf8_lossy(raw);
        let (head, body) = text.split_once("\r\n\r\n")?;
        let mut lines = head.split("\r\n");
        let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        Some(Answer {
            status,
            headers,
            body: body.to_owned(),
        })
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Checks what every response of the respond action carries.
    fn assert_problem(&self, status: u16, verdict: &str, what: &str) {
        assert_eq!(self.status, status, "{what}: status");
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "{what}"
        );
        let j: serde_json::Value = serde_json::from_str(self.body.trim())
            .unwrap_or_else(|e| panic!("{what}: body is not JSON ({e})"));
        assert_eq!(j["status"], status, "{what}");
        assert_eq!(j["verdict"], verdict, "{what}");
    }

    fn retry_after(&self, what: &str) -> u64 {
        self.header("retry-after")
            .unwrap_or_else(|| panic!("{what}: no Retry-After"))
            .parse()
            .unwrap_or_else(|e| panic!("{what}: Retry-After: {e}"))
    }
}

/// curl in the client ns through the gateway's route for `side`; the token (if any) from a
/// 0600 header file, never on a command line.
fn through_gateway(
    gw: &Gateway,
    side: Side,
    path: &str,
    token: Option<&BearerToken>,
    id: &str,
) -> Answer {
    let mut cmd = gw.topo().client().command("curl");
    cmd.args(["-sk", "--http1.1", "-i", "--max-time", "10", "-H"])
        .arg(format!("X-Test-Id: {id}"));
    if let Some(t) = token {
        let file = gw
            .header_file(&format!("h-respond-{id}"), t)
            .unwrap_or_else(|e| panic!("{e}"));
        cmd.arg("-H").arg(format!("@{}", file.display()));
    }
    let out = cmd
        .arg(format!("{}{path}", gw.route_url(side)))
        .output()
        .expect("running curl");
    Answer::parse(&out.stdout)
        .unwrap_or_else(|| panic!("{id}: curl got no response (exit {:?})", out.status.code()))
}

/// A client in the gateway ns straight to `addr`: the response, read until the server
/// side closes, and the client's port.
fn direct(gw: &Gateway, addr: SocketAddr, request: &[u8], what: &str) -> (Answer, u16) {
    let mut s = gw
        .topo()
        .gateway()
        .run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(2)))
        .expect("entering the gateway ns")
        .unwrap_or_else(|e| panic!("{what}: connecting: {e}"));
    let port = s.local_addr().unwrap().port();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request).unwrap();
    let mut raw = Vec::new();
    // The response ends with a FIN (`Connection: close`): read to EOF.
    s.read_to_end(&mut raw)
        .unwrap_or_else(|e| panic!("{what}: reading the response: {e}"));
    drop(s);
    let a = Answer::parse(&raw).unwrap_or_else(|| panic!("{what}: no HTTP response"));
    (a, port)
}

/// Sockets of `ns` from local port `server` to peer port `client` (any state), per `ss`.
fn server_sockets(ns: &Netns, server: u16, client: u16) -> Vec<String> {
    let out = ns
        .command("ss")
        .args(["-Htan", "state", "all"])
        .arg(format!("( sport = :{server} and dport = :{client} )"))
        .output()
        .expect("running ss");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

/// Polls `ss` until the server holds nothing of the client's connection.
fn assert_no_server_socket(ns: &Netns, server: u16, client: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = server_sockets(ns, server, client);
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the upstream still holds the connection: {left:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// 13. The respond action: 401, 403 and 429 (with its rate fields) through nginx, a client
///     that waits Retry-After admitted; the same directly against the upstream over IPv4
///     and IPv6, the upstream holding no connection afterwards.
#[test]
fn s13_denied_requests_are_answered_with_their_status() {
    let mut gw = gateway(Gateway::builder().action("respond"));
    let unknown = random_token();
    gw.remember(&unknown);
    // The TC side's upstream listens on 127.0.0.1 only: one on [::1] at the same port
    // for the IPv6 client.
    let lo_v6 = UpstreamServer::start(
        gw.topo().gateway(),
        "loopback-upstream-v6",
        SocketAddr::new(
            IpAddr::V6(Ipv6Addr::LOCALHOST),
            gw.topo().loopback_upstream_port(),
        ),
    )
    .expect("an IPv6 loopback upstream");
    // No XDP program on the veth's peer (gw-up): the daemon attached the veth's listener
    // in generic mode, where XDP_TX needs none.
    let up_if = gw.topo().upstream_veth().name.clone();
    let link = gw
        .topo()
        .upstream()
        .exec(&["ip", "link", "show", "dev", &up_if])
        .expect("ip link show");
    let first_line = String::from_utf8_lossy(&link.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    assert!(first_line.contains(" xdpgeneric"), "{up_if}: {first_line}");
    let peer = gw.topo().gateway_upstream_veth().name.clone();
    let peer_link = gw
        .topo()
        .gateway()
        .exec(&["ip", "link", "show", "dev", &peer])
        .expect("ip link show");
    assert!(
        !String::from_utf8_lossy(&peer_link.stdout).contains(" xdp"),
        "the peer {peer} runs no XDP program"
    );
    for side in [Side::Veth, Side::Loopback] {
        let name = gw.daemon_name(side);
        let valid = gw
            .issue(side, "standard", &["all"])
            .unwrap_or_else(|e| panic!("{e}"));
        let reader = gw
            .issue(side, "standard", &["reports-read"])
            .unwrap_or_else(|e| panic!("{e}"));
        let slow = gw
            .issue(side, "trickle", &["all"])
            .unwrap_or_else(|e| panic!("{e}"));
        // Trickle tokens of their own for the direct clients: admitted once, then throttled.
        let mut direct_slow = Vec::new();
        for _ in 0..2 {
            direct_slow.push(
                gw.issue(side, "trickle", &["all"])
                    .unwrap_or_else(|e| panic!("{e}")),
            );
        }
        let up = gw.upstream(side);
        let id = |what: &str| format!("s13-{name}-{what}");

        let a = through_gateway(&gw, side, "/v1/orders", Some(&valid.token), &id("valid"));
        assert_eq!(a.status, 200, "{name}: valid token");
        assert_eq!(up.requests_with_test_id(&id("valid")).len(), 1);

        let a = through_gateway(&gw, side, "/v1/orders", None, &id("missing"));
        a.assert_problem(401, "missing", &format!("{name}: missing"));
        assert_eq!(
            a.header("www-authenticate"),
            Some("Bearer realm=\"api\""),
            "{name}: RFC 6750 §3.1, no error code"
        );
        let a = through_gateway(&gw, side, "/v1/orders", Some(&unknown), &id("unknown"));
        a.assert_problem(401, "unknown", &format!("{name}: unknown"));
        assert_eq!(
            a.header("www-authenticate"),
            Some("Bearer realm=\"api\", error=\"invalid_token\"")
        );
        let a = through_gateway(&gw, side, "/v1/admin", Some(&reader.token), &id("scope"));
        a.assert_problem(403, "out_of_scope", &format!("{name}: out of scope"));
        assert_eq!(
            a.header("www-authenticate"),
            Some("Bearer realm=\"api\", error=\"insufficient_scope\"")
        );

        // 0.25/s, burst 1: two pass at once, the next is throttled until 4 s after them.
        for n in ["slow-1", "slow-1b"] {
            let a = through_gateway(&gw, side, "/v1/orders", Some(&slow.token), &id(n));
            assert_eq!(
                a.status, 200,
                "{name}: {n}: the first two of a trickle token"
            );
        }
        let a = through_gateway(&gw, side, "/v1/orders", Some(&slow.token), &id("slow-2"));
        a.assert_problem(429, "throttled", &format!("{name}: throttled"));
        let retry = a.retry_after(name);
        assert!((1..=4).contains(&retry), "{name}: Retry-After {retry}");
        assert_eq!(
            a.header("ratelimit-policy"),
            Some("\"ramp\";q=2;w=8"),
            "{name}: the stage's quota and window"
        );
        assert_eq!(
            a.header("ratelimit"),
            Some(format!("\"ramp\";r=0;t={retry}").as_str()),
            "{name}"
        );
        thread::sleep(Duration::from_secs(retry));
        let a = through_gateway(&gw, side, "/v1/orders", Some(&slow.token), &id("slow-3"));
        assert_eq!(a.status, 200, "{name}: admitted after waiting Retry-After");

        for what in ["missing", "unknown", "scope", "slow-2"] {
            assert!(
                up.requests_with_test_id(&id(what)).is_empty(),
                "{name}: the {what} request reached the upstream"
            );
        }

        // Straight to the upstream, IPv4 and IPv6.
        let (server_ns, v6) = match side {
            Side::Veth => (
                gw.topo().upstream(),
                SocketAddr::new(IpAddr::V6(UPSTREAM_V6), gw.topo().upstream_port()),
            ),
            Side::Loopback => (gw.topo().gateway(), lo_v6.addr()),
        };
        for (addr, slow) in [upstream_addr(&gw, side), v6].into_iter().zip(&direct_slow) {
            let v = if addr.is_ipv6() { "v6" } else { "v4" };
            for n in 1..=2 {
                let first = id(&format!("direct-{v}-slow-{n}a"));
                let req = request_bytes("/v1/orders", &first, Auth::Bearer(&slow.token));
                // Served, on a connection the upstream keeps open: read by length.
                let mut conn = HttpConn::connect(gw.topo().gateway(), addr)
                    .expect("entering the gateway ns")
                    .unwrap_or_else(|e| panic!("{first}: connecting: {e}"));
                let ex = conn.exchange(&req, Duration::from_secs(5));
                assert_eq!(
                    ex.status(),
                    Some(200),
                    "{name}: direct to {addr}: trickle request {n}"
                );
            }
            for (label, path, auth, status, verdict) in [
                ("missing", "/v1/orders", Auth::None, 401, "missing"),
                (
                    "unknown",
                    "/v1/orders",
                    Auth::Bearer(&unknown),
                    401,
                    "unknown",
                ),
                (
                    "scope",
                    "/v1/admin",
                    Auth::Bearer(&reader.token),
                    403,
                    "out_of_scope",
                ),
                (
                    "slow-2",
                    "/v1/orders",
                    Auth::Bearer(&slow.token),
                    429,
                    "throttled",
                ),
            ] {
                let what = format!("{name}: direct to {addr}: {label}");
                let test_id = id(&format!("direct-{v}-{label}"));
                let req = request_bytes(path, &test_id, auth);
                let (a, port) = direct(&gw, addr, &req, &what);
                a.assert_problem(status, verdict, &what);
                assert_eq!(a.header("connection"), Some("close"), "{what}");
                if status == 429 {
                    let retry = a.retry_after(&what);
                    assert!((1..=4).contains(&retry), "{what}: Retry-After {retry}");
                    assert!(
                        a.header("ratelimit").is_some() && a.header("ratelimit-policy").is_some(),
                        "{what}"
                    );
                } else {
                    assert!(a.header("www-authenticate").is_some(), "{what}");
                }
                assert!(
                    up.requests_with_test_id(&test_id).is_empty()
                        && lo_v6.requests_with_test_id(&test_id).is_empty(),
                    "{what}: the request reached the upstream"
                );
                assert_no_server_socket(server_ns, addr.port(), port, &what);
            }
        }
        println!("{name}: 401/401/403/429 through nginx, Retry-After {retry} s honoured; direct IPv4/IPv6 answered, upstream left nothing open");
    }
}
