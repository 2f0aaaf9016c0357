//! The respond action: the packet each turn of an answered connection becomes — the
//! response to the client (status, headers, seq/ack, flags, checksums), the RST to the
//! server at the sequence number it expects, the ACK of the client's FIN — on both hooks,
//! IPv4, IPv6 and VLAN-tagged.

use agent_common::{
    deny_action, gcra::NANOS_PER_SEC, mode, respond::RESPONSE_MAX, Stage, TokenInfo, Verdict,
    TOKEN_ANY_SCOPE,
};
use rampart::respond::{render, ResponseConfig};
use rampart_tests::packet::{
    checksum, tcp_checksum_ok, Frame, Http, CLIENT_MAC, CLIENT_V4, SERVER_MAC, SERVER_V4, TCP_ACK,
    TCP_RST,
};

use crate::{
    contract, fp, listener, Fixture, Hook, PORT, REVOKED, SCOPED, TC_ACT_OK, TC_ACT_REDIRECT,
    UNKNOWN, XDP_PASS, XDP_TX,
};

const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
/// A token whose contract admits two requests at once, then one per 2.5 s.
const BURSTY: &str = "rmp_BurstyToken0123456789abcdefghijklmnopq";

fn responder() -> Fixture {
    let mut f = Fixture::new(listener(mode::ENFORCE, deny_action::RESPOND));
    f.dp.set_responses(0, &config()).unwrap();
    let interval = 5 * NANOS_PER_SEC / 2;
    f.dp.set_contract(
        2,
        &contract(
            &[Stage {
                after_ns: 0,
                interval_ns: interval,
                tolerance_ns: interval,
            }],
            (0, 0),
        ),
    )
    .unwrap();
    f.dp.install_token(
        fp(BURSTY),
        TokenInfo {
            contract: 2,
            flags: TOKEN_ANY_SCOPE,
            ..Default::default()
        },
    )
    .unwrap();
    f
}

fn config() -> ResponseConfig {
    ResponseConfig {
        realm: "orders".into(),
        problem_type: "https://example.com/problems/token".into(),
    }
}

/// Where a frame's parts are.
struct Layout {
    l3: usize,
    l4: usize,
    ipv6: bool,
}

fn layout(frame: &[u8]) -> Layout {
    let mut off = 12;
    while matches!(
        u16::from_be_bytes([frame[off], frame[off + 1]]),
        0x8100 | 0x88a8
    ) {
        off += 4;
    }
    let ipv6 = u16::from_be_bytes([frame[off], frame[off + 1]]) == 0x86dd;
    let l3 = off + 2;
    let l4 = if ipv6 {
        l3 + 40
    } else {
        l3 + ((frame[l3] & 0x0f) as usize) * 4
    };
    Layout { l3, l4, ipv6 }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

/// The frame without its VLAN tags (what `tcp_checksum_ok` reads).
fn untagged(frame: &[u8]) -> Vec<u8> {
    let l = layout(frame);
    let mut v = frame[..12].to_vec();
    v.extend_from_slice(&frame[l.l3 - 2..]);
    v
}

/// The checks every rewritten frame passes: lengths, IPv4 header checksum, TCP checksum.
fn assert_consistent(out: &[u8], what: &str) {
    let l = layout(out);
    if l.ipv6 {
        let plen = u16::from_be_bytes([out[l.l3 + 4], out[l.l3 + 5]]) as usize;
        assert_eq!(plen, out.len() - l.l3 - 40, "{what}: IPv6 payload length");
    } else {
        let tot = u16::from_be_bytes([out[l.l3 + 2], out[l.l3 + 3]]) as usize;
        assert_eq!(tot, out.len() - l.l3, "{what}: IPv4 total length");
        assert_eq!(
            checksum(&out[l.l3..l.l4], 0),
            0,
            "{what}: IPv4 header checksum"
        );
    }
    assert!(tcp_checksum_ok(&untagged(out)), "{what}: TCP checksum");
}

/// The TCP payload of a frame.
fn payload(out: &[u8]) -> &[u8] {
    let l = layout(out);
    &out[l.l4 + ((out[l.l4 + 12] >> 4) as usize) * 4..]
}

fn tx(hook: Hook) -> u32 {
    match hook {
        Hook::Xdp => XDP_TX,
        Hook::Tc => TC_ACT_REDIRECT,
    }
}

fn pass(hook: Hook) -> u32 {
    match hook {
        Hook::Xdp => XDP_PASS,
        Hook::Tc => TC_ACT_OK,
    }
}

/// A frame shape: what it does to a plain IPv4 frame.
type Shape = Box<dyn Fn(Frame) -> Frame>;

fn shapes() -> Vec<(&'static str, Shape)> {
    vec![
        ("IPv4", Box::new(|f| f)),
        ("IPv6", Box::new(|f: Frame| f.v6())),
        ("IPv4 in VLAN", Box::new(|f: Frame| f.vlan(0x8100))),
        (
            "IPv6 in QinQ",
            Box::new(|f: Frame| f.v6().vlan(0x88a8).vlan(0x8100)),
        ),
    ]
}

/// A whole answered connection, per hook and frame shape: response, RST to the server,
/// ACK of the client's FIN.
#[test]
fn a_missing_token_is_answered_then_the_server_reset_then_the_fin_acked() {
    for hook in [Hook::Xdp, Hook::Tc] {
        for (shape, make) in shapes() {
            let what = format!("{hook:?} {shape}");
            let mut f = responder();
            let request = Http::get("/v1/orders").bytes();
            let mut frame = make(Frame::tcp(PORT, &request));
            // Timestamps after two NOPs, as Linux sends them: TSval 0x11111111, TSecr
            // 0x22222222 (the server's last TSval).
            frame.tcp_options = vec![1, 1, 8, 10, 0x11, 0x11, 0x11, 0x11, 0x22, 0x22, 0x22, 0x22];
            let (ret, out, v) = f.run(hook, &frame.build());
            assert_eq!(v, Some(Verdict::Missing), "{what}");
            assert_eq!(ret, tx(hook), "{what}: sent back");
            assert_consistent(&out, &what);
            let l = layout(&out);
            assert_eq!(&out[0..6], &CLIENT_MAC, "{what}: to the client's MAC");
            assert_eq!(&out[6..12], &SERVER_MAC, "{what}");
            if !l.ipv6 {
                assert_eq!(&out[l.l3 + 12..l.l3 + 16], &SERVER_V4.octets(), "{what}");
                assert_eq!(&out[l.l3 + 16..l.l3 + 20], &CLIENT_V4.octets(), "{what}");
            }
            assert_eq!(
                &out[l.l4..l.l4 + 2],
                &PORT.to_be_bytes(),
                "{what}: from the port"
            );
            assert_eq!(&out[l.l4 + 2..l.l4 + 4], &40000u16.to_be_bytes(), "{what}");
            assert_eq!(
                be32(&out[l.l4 + 4..]),
                5000,
                "{what}: seq = the client's ack"
            );
            let acked = 1000 + request.len() as u32;
            assert_eq!(be32(&out[l.l4 + 8..]), acked, "{what}: acks the request");
            assert_eq!(out[l.l4 + 13], TCP_FIN | TCP_PSH | TCP_ACK, "{what}: flags");
            assert_eq!(
                &out[l.l4 + 20..l.l4 + 32],
                &[1, 1, 8, 10, 0x22, 0x22, 0x22, 0x22, 0x11, 0x11, 0x11, 0x11],
                "{what}: timestamps turned around"
            );
            let (text, _) = render(
                &config(),
                Verdict::Missing,
                agent_common::respond::Status::NoToken,
            );
            assert_eq!(
                String::from_utf8_lossy(payload(&out)),
                text,
                "{what}: the response"
            );
            assert!(text.starts_with(
                "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"orders\"\r\n"
            ));
            let reply_end = 5000 + text.len() as u32 + 1;

            // The client acks the response (and its FIN): that segment becomes the RST
            // the server accepts, at the sequence number of the request it never saw.
            let mut ackf = make(Frame::tcp(PORT, &[]));
            ackf.seq = acked;
            ackf.ack = reply_end;
            ackf.flags = TCP_ACK;
            let (ret, out, v) = f.send(hook, &ackf.build());
            assert_eq!((ret, v), (pass(hook), None), "{what}: RST to the server");
            assert_consistent(&out, &format!("{what}: server RST"));
            let l = layout(&out);
            assert_eq!(out[l.l4 + 13], TCP_RST | TCP_ACK, "{what}");
            assert_eq!(
                &out[l.l4 + 2..l.l4 + 4],
                &PORT.to_be_bytes(),
                "{what}: to the server"
            );
            assert_eq!(
                be32(&out[l.l4 + 4..]),
                1000,
                "{what}: seq the server expects"
            );
            assert_eq!(be32(&out[l.l4 + 8..]), 5000, "{what}");
            assert!(payload(&out).is_empty());

            // The client closes: its FIN is acked back to it.
            let mut fin = make(Frame::tcp(PORT, &[]));
            fin.seq = acked;
            fin.ack = reply_end;
            fin.flags = TCP_FIN | TCP_ACK;
            let (ret, out, v) = f.send(hook, &fin.build());
            assert_eq!((ret, v), (tx(hook), None), "{what}: FIN acked");
            assert_consistent(&out, &format!("{what}: FIN ack"));
            let l = layout(&out);
            assert_eq!(out[l.l4 + 13], TCP_ACK, "{what}");
            assert_eq!(
                &out[l.l4..l.l4 + 2],
                &PORT.to_be_bytes(),
                "{what}: to the client"
            );
            assert_eq!(be32(&out[l.l4 + 4..]), reply_end, "{what}");
            assert_eq!(be32(&out[l.l4 + 8..]), acked + 1, "{what}: acks the FIN");

            // Anything else the client sends meanwhile is dropped.
            let (ret, _, v) = f.send(hook, &ackf.build());
            assert_eq!(v, None);
            assert!(
                ret != pass(hook) && ret != tx(hook),
                "{what}: dropped, got {ret}"
            );
        }
    }
}

/// Each denied verdict's status and challenge, and a lost response answered again.
#[test]
fn each_verdict_gets_its_status() {
    for hook in [Hook::Xdp, Hook::Tc] {
        let mut f = responder();
        for (token, target, verdict, head) in [
            (
                UNKNOWN,
                "/v1/orders",
                Verdict::Unknown,
                "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"orders\", \
                 error=\"invalid_token\"\r\n",
            ),
            (
                REVOKED,
                "/v1/orders",
                Verdict::Revoked,
                "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"orders\", \
                 error=\"invalid_token\"\r\n",
            ),
            (
                SCOPED,
                "/v1/admin",
                Verdict::OutOfScope,
                "HTTP/1.1 403 Forbidden\r\nWWW-Authenticate: Bearer realm=\"orders\", \
                 error=\"insufficient_scope\"\r\n",
            ),
            (
                "not@a#token",
                "/v1/orders",
                Verdict::Malformed,
                "HTTP/1.1 400 Bad Request\r\nWWW-Authenticate: Bearer realm=\"orders\", \
                 error=\"invalid_request\"\r\n",
            ),
        ] {
            let bytes = Frame::tcp(PORT, &Http::get(target).bearer(token).bytes()).build();
            let (ret, out, v) = f.run(hook, &bytes);
            assert_eq!((ret, v), (tx(hook), Some(verdict)), "{hook:?} {verdict:?}");
            assert_consistent(&out, &format!("{hook:?} {verdict:?}"));
            let text = String::from_utf8_lossy(payload(&out)).into_owned();
            assert!(text.starts_with(head), "{hook:?} {verdict:?}: {text}");
            assert!(
                text.contains(&format!("\"verdict\":\"{}\"", verdict.name())),
                "{text}"
            );
            // The response was lost: the client sends the request again, which is
            // judged (and counted) again and answered again.
            let (ret, again, v) = f.send(hook, &bytes);
            assert_eq!(
                (ret, v),
                (tx(hook), Some(verdict)),
                "{hook:?} {verdict:?} again"
            );
            assert_eq!(again, out, "{hook:?} {verdict:?}: the same response");
        }
    }
}

/// A throttled request: 429 with Retry-After (whole seconds until the contract admits the
/// token again, rounded up) and the RateLimit fields of its stage.
#[test]
fn a_throttled_request_gets_429_with_retry_after_and_ratelimit() {
    for hook in [Hook::Xdp, Hook::Tc] {
        let mut f = responder();
        let bytes = Frame::tcp(PORT, &Http::get("/v1/orders").bearer(BURSTY).bytes()).build();
        // Burst 1: two admitted at NOW; TAT = NOW + 5 s.
        for _ in 0..2 {
            let (ret, _, v) = f.run(hook, &bytes);
            assert_eq!((ret, v), (pass(hook), Some(Verdict::Allow)), "{hook:?}");
        }
        let (ret, out, v) = f.run(hook, &bytes);
        assert_eq!((ret, v), (tx(hook), Some(Verdict::Throttled)), "{hook:?}");
        assert_consistent(&out, &format!("{hook:?} 429"));
        let text = String::from_utf8_lossy(payload(&out)).into_owned();
        assert!(payload(&out).len() <= RESPONSE_MAX);
        // Admitted again at TAT - tolerance = NOW + 2.5 s: 3 s, rounded up. The bucket
        // holds 2 and refills in 5 s.
        let fields = "HTTP/1.1 429 Too Many Requests\r\nRetry-After: 3\r\n\
                      RateLimit-Policy: \"ramp\";q=2;w=5\r\nRateLimit: \"ramp\";r=0;t=3\r\n";
        assert!(text.starts_with(fields), "{hook:?}: {text}");
        let (head, body) = text.split_once("\r\n\r\n").expect("a header block");
        assert!(head.contains("\r\nConnection: close"));
        assert!(!head.contains("WWW-Authenticate"));
        let cl: usize = head
            .split("\r\n")
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(cl, body.len(), "{hook:?}");
        let j: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(j["status"], 429);
        assert_eq!(j["verdict"], "throttled");
        assert_eq!(j["type"], "https://example.com/problems/token");
    }
}

/// Bytes that are not HTTP have no request to answer: the connection is reset, as with
/// `action = "reset"` (an RST to the server first).
#[test]
fn not_http_is_reset() {
    for hook in [Hook::Xdp, Hook::Tc] {
        let mut f = responder();
        let bytes = Frame::tcp(PORT, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03").build();
        let (ret, out, v) = f.run(hook, &bytes);
        assert_eq!((ret, v), (pass(hook), Some(Verdict::NotHttp)), "{hook:?}");
        let l = layout(&out);
        assert_eq!(out[l.l4 + 13], TCP_RST | TCP_ACK, "{hook:?}");
        assert!(payload(&out).is_empty());
    }
}
