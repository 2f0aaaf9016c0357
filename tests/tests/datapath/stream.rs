//! Segment-sequence fixtures: one connection's segments fed in order (or not), the
//! connection state carried in the programs' maps, as the server's byte stream would have
//! them. What is asserted is what reaches the server (each segment passes or drops) and
//! which requests were judged how (the verdict counters).

use agent_common::{default_policy, deny_action, mode};
use rampart_tests::packet::typical_request;

use super::*;

/// The connection every case uses: `Frame::tcp`'s 4-tuple, its data starting at
/// sequence number `ISN + 1`.
const ISN: u32 = 999;

/// One connection's segments: `bytes` cut at `cuts` (ascending offsets), each a frame
/// carrying the sequence number of its first byte.
fn segments(bytes: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut edges = vec![0];
    edges.extend(cuts.iter().copied().filter(|c| *c > 0 && *c < bytes.len()));
    edges.push(bytes.len());
    edges.dedup();
    edges
        .windows(2)
        .map(|w| at(w[0], &bytes[w[0]..w[1]]))
        .collect()
}

/// A segment of the connection carrying `payload` from stream offset `off`.
fn at(off: usize, payload: &[u8]) -> Vec<u8> {
    let mut f = Frame::tcp(PORT, payload);
    f.seq = ISN.wrapping_add(1).wrapping_add(off as u32);
    f.build()
}

/// What one segment came to: whether it passed, and the requests counted by verdict.
#[derive(Debug, PartialEq)]
struct Seen {
    fate: Fate,
    counted: Vec<(Verdict, u64)>,
}

fn seen(fate: Fate, counted: &[(Verdict, u64)]) -> Seen {
    Seen {
        fate,
        counted: counted.to_vec(),
    }
}

impl Fixture {
    /// Forgets every connection and opens the test connection (its SYN).
    fn open(&mut self, hook: Hook) {
        self.dp.forget_flows().unwrap();
        self.syn(hook, ISN);
    }

    /// Sends one segment of the open connection; several requests may be counted.
    fn segment(&mut self, hook: Hook, frame: &[u8]) -> Seen {
        let (ret, _, counted) = self.send_counting(hook, frame);
        Seen {
            fate: fate_of(hook, ret),
            counted,
        }
    }

    /// A client SYN of the test connection's 4-tuple with initial sequence number `isn`.
    fn syn(&mut self, hook: Hook, isn: u32) {
        let mut syn = Frame::tcp(PORT, b"");
        syn.seq = isn;
        syn.flags = rampart_tests::packet::TCP_SYN;
        let got = self.segment(hook, &syn.build());
        assert_eq!(got.counted, vec![], "a SYN is no request");
    }

    /// Opens the connection and sends `frames` in order: what each came to.
    fn stream(&mut self, hook: Hook, frames: &[Vec<u8>]) -> Vec<Seen> {
        self.open(hook);
        frames.iter().map(|f| self.segment(hook, f)).collect()
    }
}

fn both(mut check: impl FnMut(Hook)) {
    for hook in [Hook::Xdp, Hook::Tc] {
        check(hook);
    }
}

fn enforcing() -> Fixture {
    Fixture::new(listener(mode::ENFORCE, deny_action::DROP))
}

/// Every segment but the last passes uncounted (held or body); the last gets `last`.
fn held_then(got: &[Seen], last: Seen, what: &str) {
    let (end, before) = got.split_last().expect("segments");
    for (i, s) in before.iter().enumerate() {
        assert_eq!(
            s,
            &seen(Fate::Passes, &[(Verdict::Pass, 1)]),
            "{what}: segment {i}"
        );
    }
    assert_eq!(end, &last, "{what}: last segment");
}

#[test]
fn a_request_split_at_every_byte_is_judged_once_whole() {
    let mut f = enforcing();
    let good = typical_request(GOOD);
    let unknown = typical_request(UNKNOWN);
    both(|hook| {
        for cut in 1..good.len() {
            let got = f.stream(hook, &segments(&good, &[cut]));
            held_then(
                &got,
                seen(Fate::Passes, &[(Verdict::Allow, 1)]),
                &format!("{hook:?} good token, cut at {cut}"),
            );
        }
        for cut in 1..unknown.len() {
            let got = f.stream(hook, &segments(&unknown, &[cut]));
            held_then(
                &got,
                seen(Fate::Drops, &[(Verdict::Unknown, 1)]),
                &format!("{hook:?} unknown token, cut at {cut}"),
            );
        }
        // Three-way splits, around the request line, the token and the block's end.
        let n = good.len();
        for a in (1..n - 1).step_by(7) {
            for b in [a + 1, a + 13, n - 2, n - 1] {
                if b <= a || b >= n {
                    continue;
                }
                let got = f.stream(hook, &segments(&good, &[a, b]));
                held_then(
                    &got,
                    seen(Fate::Passes, &[(Verdict::Allow, 1)]),
                    &format!("{hook:?} cut at {a} and {b}"),
                );
            }
        }
    });
}

#[test]
fn a_request_line_split_after_its_method_is_judged() {
    let mut f = enforcing();
    let bytes = b"GET /v1/admin HTTP/1.1\r\nHost: a\r\n\r\n";
    both(|hook| {
        for cut in [1, 2, 3, 4] {
            let got = f.stream(hook, &segments(bytes, &[cut]));
            held_then(
                &got,
                seen(Fate::Drops, &[(Verdict::Missing, 1)]),
                &format!("{hook:?} cut at {cut}"),
            );
        }
    });
}

/// A header block of about `size` bytes with the bearer field at `position` (0: first,
/// 1: middle, 2: last).
fn large_block(size: usize, position: usize, token: &str) -> Vec<u8> {
    let filler_lines = size / 100;
    let mut h = Http::get("/v1/reports/large");
    for i in 0..filler_lines {
        if i == position * filler_lines / 2 && position < 2 {
            h = h.bearer(token);
        }
        h = h.header(&format!("X-Filler-{i:04}: {}", "f".repeat(84)));
    }
    if position == 2 {
        h = h.bearer(token);
    }
    h.bytes()
}

#[test]
fn header_blocks_of_4_8_and_16_kib_in_mtu_segments() {
    let mut f = enforcing();
    both(|hook| {
        // 16 000: about as much as the datapath reads (SCAN_BYTES, 16 KiB).
        for size in [4000, 8000, 16_000] {
            for position in 0..3 {
                let bytes = large_block(size, position, GOOD);
                let cuts: Vec<usize> = (1..=bytes.len() / 1448).map(|i| i * 1448).collect();
                let got = f.stream(hook, &segments(&bytes, &cuts));
                held_then(
                    &got,
                    seen(Fate::Passes, &[(Verdict::Allow, 1)]),
                    &format!("{hook:?} {size} bytes, token at {position}"),
                );
                let bytes = large_block(size, position, UNKNOWN);
                let got = f.stream(hook, &segments(&bytes, &cuts));
                held_then(
                    &got,
                    seen(Fate::Drops, &[(Verdict::Unknown, 1)]),
                    &format!("{hook:?} {size} bytes, unknown token at {position}"),
                );
            }
        }
    });
}

#[test]
fn a_header_block_longer_than_the_datapath_reads_is_incomplete() {
    let mut f = enforcing();
    both(|hook| {
        let bytes = large_block(24_000, 2, GOOD);
        let cuts: Vec<usize> = (1..=bytes.len() / 1448).map(|i| i * 1448).collect();
        let got = f.stream(hook, &segments(&bytes, &cuts));
        let limit = got
            .iter()
            .position(|s| s.fate == Fate::Drops)
            .expect("some segment is denied");
        assert_eq!(
            got[limit],
            seen(Fate::Drops, &[(Verdict::Incomplete, 1)]),
            "{hook:?}"
        );
        assert_eq!(limit, agent_common::SCAN_BYTES / 1448, "{hook:?}");
    });
}

#[test]
fn a_listener_reads_header_blocks_up_to_its_max_header_bytes() {
    let mut l = listener(mode::ENFORCE, deny_action::DROP);
    l.max_header_kib = 4;
    let mut f = Fixture::new(l);
    both(|hook| {
        // Within 4 KiB: judged.
        let bytes = large_block(3800, 2, GOOD);
        let cuts: Vec<usize> = (1..=bytes.len() / 1448).map(|i| i * 1448).collect();
        let got = f.stream(hook, &segments(&bytes, &cuts));
        held_then(
            &got,
            seen(Fate::Passes, &[(Verdict::Allow, 1)]),
            &format!("{hook:?} 3 800 bytes under a 4 KiB limit"),
        );
        // Longer: incomplete on the segment that passes 4 KiB, though the datapath could
        // read 16.
        let bytes = large_block(8000, 2, GOOD);
        let cuts: Vec<usize> = (1..=bytes.len() / 1448).map(|i| i * 1448).collect();
        let got = f.stream(hook, &segments(&bytes, &cuts));
        let limit = 4096 / 1448;
        assert!(
            got[..limit].iter().all(|s| s.fate == Fate::Passes),
            "{hook:?}: {got:?}"
        );
        assert_eq!(
            got[limit],
            seen(Fate::Drops, &[(Verdict::Incomplete, 1)]),
            "{hook:?}"
        );
        // A longer block in one segment (GRO merges segments before TC): the same, under
        // a 1 KiB limit.
        f.dp.set_listener(
            listener_key(0),
            ListenerConfig {
                max_header_kib: 1,
                ..l
            },
        )
        .unwrap();
        let bytes = large_block(2000, 2, GOOD);
        let got = f.stream(hook, &[at(0, &bytes)]);
        assert_eq!(
            got,
            vec![seen(Fate::Drops, &[(Verdict::Incomplete, 1)])],
            "{hook:?} one 2 000-byte segment under a 1 KiB limit"
        );
        f.dp.set_listener(listener_key(0), l).unwrap();
    });
}

#[test]
fn pipelined_requests_are_each_judged() {
    let mut f = enforcing();
    let get = |path: &str, token: Option<&str>| {
        let h = Http::get(path);
        match token {
            Some(t) => h.bearer(t).bytes(),
            None => h.bytes(),
        }
    };
    both(|hook| {
        let two = [get("/a", Some(GOOD)), get("/b", Some(GOOD))].concat();
        let got = f.stream(hook, &[at(0, &two)]);
        assert_eq!(
            got,
            vec![seen(Fate::Passes, &[(Verdict::Allow, 2)])],
            "{hook:?}"
        );

        let ten: Vec<u8> = (0..10)
            .flat_map(|i| get(&format!("/r{i}"), Some(GOOD)))
            .collect();
        let got = f.stream(hook, &[at(0, &ten)]);
        assert_eq!(
            got,
            vec![seen(Fate::Passes, &[(Verdict::Allow, 10)])],
            "{hook:?}"
        );

        // The second request has no token: the whole segment is denied, and the stream
        // stays before it (its retransmission is judged again).
        let mixed = [get("/a", Some(GOOD)), get("/b", None)].concat();
        let got = f.stream(hook, &[at(0, &mixed), at(0, &mixed)]);
        let denied = seen(Fate::Drops, &[(Verdict::Allow, 1), (Verdict::Missing, 1)]);
        assert_eq!(
            got,
            vec![
                denied,
                seen(Fate::Drops, &[(Verdict::Allow, 1), (Verdict::Missing, 1)])
            ],
            "{hook:?}"
        );

        // Ten, the seventh out of scope.
        let mut mixed10 = Vec::new();
        for i in 0..10 {
            let path = if i == 6 {
                "/v1/admin/x"
            } else {
                "/v1/reports/x"
            };
            mixed10.extend(get(path, Some(SCOPED)));
        }
        let got = f.stream(hook, &[at(0, &mixed10)]);
        assert_eq!(
            got,
            vec![seen(
                Fate::Drops,
                &[(Verdict::Allow, 6), (Verdict::OutOfScope, 1)]
            )],
            "{hook:?}"
        );
    });
}

#[test]
fn empty_lines_before_a_request_do_not_hide_it() {
    let mut f = enforcing();
    both(|hook| {
        for prefix in [
            &b"\r\n"[..],
            b"\n",
            b"\r\n\r\n\r\n",
            b"\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n",
        ] {
            let bytes = [prefix, &Http::get("/v1/admin").bytes()].concat();
            let got = f.stream(hook, &[at(0, &bytes)]);
            assert_eq!(
                got,
                vec![seen(Fate::Drops, &[(Verdict::Missing, 1)])],
                "{hook:?} {prefix:?}"
            );
            // In a segment of their own, then the request.
            let got = f.stream(hook, &segments(&bytes, &[prefix.len()]));
            held_then(
                &got,
                seen(Fate::Drops, &[(Verdict::Missing, 1)]),
                &format!("{hook:?}"),
            );
        }
        // After an allowed request, in the same segment.
        let bytes = [
            Http::get("/a").bearer(GOOD).bytes(),
            b"\r\n\r\n".to_vec(),
            Http::get("/v1/admin").bytes(),
        ]
        .concat();
        let got = f.stream(hook, &[at(0, &bytes)]);
        assert_eq!(
            got,
            vec![seen(
                Fate::Drops,
                &[(Verdict::Allow, 1), (Verdict::Missing, 1)]
            )],
            "{hook:?}"
        );
        // More empty-line bytes than servers are expected to skip: not HTTP.
        let bytes = [vec![b'\n'; 40], Http::get("/").bytes()].concat();
        let got = f.stream(hook, &[at(0, &bytes)]);
        assert_eq!(
            got,
            vec![seen(Fate::Drops, &[(Verdict::NotHttp, 1)])],
            "{hook:?}"
        );
    });
}

fn post(token: &str, headers: &[&str], body: &[u8]) -> Vec<u8> {
    let mut h = Http::get("/v1/reports/upload").method("POST").bearer(token);
    for x in headers {
        h = h.header(x);
    }
    [h.bytes(), body.to_vec()].concat()
}

#[test]
fn a_request_after_a_body_is_judged_and_a_body_is_never_a_request() {
    let mut f = enforcing();
    let sneaky = Http::get("/v1/admin").bytes();
    both(|hook| {
        // Content-Length body, then a request in the same segment.
        let bytes = [post(GOOD, &["Content-Length: 5"], b"hello"), sneaky.clone()].concat();
        let got = f.stream(hook, &[at(0, &bytes)]);
        assert_eq!(
            got,
            vec![seen(
                Fate::Drops,
                &[(Verdict::Allow, 1), (Verdict::Missing, 1)]
            )],
            "{hook:?} CL"
        );
        // A body that looks like a request, in segments of its own: body, passed.
        let body = Http::get("/v1/admin").bytes();
        let cl = format!("Content-Length: {}", body.len());
        let bytes = post(GOOD, &[&cl], &body);
        let head = bytes.len() - body.len();
        let got = f.stream(hook, &segments(&bytes, &[head, head + 10]));
        assert_eq!(
            got,
            vec![
                seen(Fate::Passes, &[(Verdict::Allow, 1)]),
                seen(Fate::Passes, &[(Verdict::Pass, 1)]),
                seen(Fate::Passes, &[(Verdict::Pass, 1)]),
            ],
            "{hook:?} body like a request"
        );
        // A body spread over segments, and a request after its last byte.
        let bytes = [
            post(GOOD, &["Content-Length: 3000"], &[b'x'; 3000]),
            sneaky.clone(),
        ]
        .concat();
        let got = f.stream(hook, &segments(&bytes, &[1000, 2000, 3000]));
        assert_eq!(
            got.last().unwrap(),
            &seen(Fate::Drops, &[(Verdict::Missing, 1)]),
            "{hook:?} after a long body"
        );
        // Chunked, with an extension and a trailer, then a request.
        let chunked = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n";
        let bytes = [
            post(GOOD, &["Transfer-Encoding: chunked"], chunked),
            sneaky.clone(),
        ]
        .concat();
        let got = f.stream(hook, &[at(0, &bytes)]);
        assert_eq!(
            got,
            vec![seen(
                Fate::Drops,
                &[(Verdict::Allow, 1), (Verdict::Missing, 1)]
            )],
            "{hook:?} chunked"
        );
        // The same, split at every byte of the chunked framing.
        let head = bytes.len() - sneaky.len() - chunked.len();
        for cut in head + 1..head + chunked.len() {
            let got = f.stream(hook, &segments(&bytes, &[cut]));
            assert_eq!(got.len(), 2);
            assert_eq!(got[0].fate, Fate::Passes, "{hook:?} chunked cut at {cut}");
            assert_eq!(
                got[1],
                seen(Fate::Drops, &[(Verdict::Missing, 1)]),
                "{hook:?} chunked cut at {cut}"
            );
        }
        // Allowed pipelining after a chunked body.
        let bytes = [
            post(GOOD, &["Transfer-Encoding: chunked"], chunked),
            Http::get("/x").bearer(GOOD).bytes(),
        ]
        .concat();
        let got = f.stream(hook, &[at(0, &bytes)]);
        assert_eq!(
            got,
            vec![seen(Fate::Passes, &[(Verdict::Allow, 2)])],
            "{hook:?}"
        );
    });
}

#[test]
fn framing_a_server_could_read_two_ways_is_malformed() {
    let mut f = enforcing();
    both(|hook| {
        for (what, headers, body) in [
            (
                "CL and TE",
                &["Content-Length: 5", "Transfer-Encoding: chunked"][..],
                &b"0\r\n\r\n"[..],
            ),
            (
                "two CLs",
                &["Content-Length: 5", "Content-Length: 5"][..],
                b"hello",
            ),
            ("CL list", &["Content-Length: 5, 5"][..], b"hello"),
            ("CL sign", &["Content-Length: +5"][..], b"hello"),
            ("space before colon", &["Content-Length : 5"][..], b"hello"),
            (
                "TE gzip",
                &["Transfer-Encoding: gzip, chunked"][..],
                b"0\r\n\r\n",
            ),
            (
                "two TEs",
                &["Transfer-Encoding: chunked", "Transfer-Encoding: chunked"][..],
                b"0\r\n\r\n",
            ),
        ] {
            let got = f.stream(hook, &[at(0, &post(GOOD, headers, body))]);
            assert_eq!(
                got,
                vec![seen(Fate::Drops, &[(Verdict::Malformed, 1)])],
                "{hook:?} {what}"
            );
        }
        for (what, chunked) in [
            ("bad size", &b"5x\r\nhello\r\n0\r\n\r\n"[..]),
            ("bare LF", b"5\nhello\r\n0\r\n\r\n"),
            ("no CRLF after data", b"5\r\nhelloX0\r\n\r\n"),
            ("size too long", b"1000000000000\r\n"),
        ] {
            let got = f.stream(
                hook,
                &[at(0, &post(GOOD, &["Transfer-Encoding: chunked"], chunked))],
            );
            // The request was judged (allowed); its body's framing is malformed.
            assert_eq!(
                got,
                vec![seen(
                    Fate::Drops,
                    &[(Verdict::Allow, 1), (Verdict::Malformed, 1)]
                )],
                "{hook:?} {what}"
            );
        }
    });
}

#[test]
fn a_second_authorization_field_in_a_later_segment_is_malformed() {
    let mut f = enforcing();
    let bytes = Http::get("/v1/reports/x")
        .bearer(GOOD)
        .header("X-Pad: 1")
        .bearer(UNKNOWN)
        .bytes();
    let cut = bytes.windows(5).rposition(|w| w == b"X-Pad").unwrap();
    both(|hook| {
        let got = f.stream(hook, &segments(&bytes, &[cut]));
        held_then(
            &got,
            seen(Fate::Drops, &[(Verdict::Malformed, 1)]),
            &format!("{hook:?}"),
        );
    });
}

#[test]
fn retransmissions_are_judged_again_and_cannot_change_the_stream() {
    let mut f = enforcing();
    // Two requests of the same length, one with a field that frames a body.
    let first = Http::get("/v1/reports/a")
        .bearer(GOOD)
        .header("X-Pad-Fields-01: 10")
        .bytes();
    let with_body = Http::get("/v1/reports/a")
        .bearer(GOOD)
        .header("Content-Length: 100")
        .bytes();
    assert_eq!(first.len(), with_body.len());
    let pad = "0".repeat(GOOD.len() - UNKNOWN.len());
    let unknown = Http::get("/v1/reports/a")
        .bearer(UNKNOWN)
        .header(&format!("X-Pad-Fields-01: 10{pad}"))
        .bytes();
    assert_eq!(first.len(), unknown.len());
    both(|hook| {
        // The same segment again: judged again, same outcome.
        let got = f.stream(hook, &[at(0, &first), at(0, &first)]);
        let allowed = seen(Fate::Passes, &[(Verdict::Allow, 1)]);
        assert_eq!(
            got,
            vec![allowed, seen(Fate::Passes, &[(Verdict::Allow, 1)])],
            "{hook:?}"
        );
        // Same place, other bytes: judged on their own merits...
        let got = f.stream(hook, &[at(0, &first), at(0, &unknown)]);
        assert_eq!(
            got[1],
            seen(Fate::Drops, &[(Verdict::Unknown, 1)]),
            "{hook:?}"
        );
        // ... and bytes that would leave the stream elsewhere than the original did (here
        // inside a body) are malformed: the server may hold either.
        let got = f.stream(hook, &[at(0, &first), at(0, &with_body)]);
        assert_eq!(
            got[1],
            seen(Fate::Drops, &[(Verdict::Malformed, 1)]),
            "{hook:?}"
        );
        // A held first part sent again: the same bytes pass again; other bytes of the
        // same length would leave the server holding what was not judged: malformed.
        let evil = Http::get("/v1/admin/aaaa").bearer(GOOD).bytes();
        let fine = Http::get("/v1/reports/a").bearer(GOOD).bytes();
        let cut = 17;
        assert_eq!(evil[..cut].len(), fine[..cut].len());
        let got = f.stream(hook, &[at(0, &evil[..cut]), at(0, &evil[..cut])]);
        let held = seen(Fate::Passes, &[(Verdict::Pass, 1)]);
        assert_eq!(
            got,
            vec![held, seen(Fate::Passes, &[(Verdict::Pass, 1)])],
            "{hook:?}"
        );
        let got = f.stream(hook, &[at(0, &evil[..cut]), at(0, &fine[..cut])]);
        assert_eq!(
            got[1],
            seen(Fate::Drops, &[(Verdict::Malformed, 1)]),
            "{hook:?} held"
        );
        // Overlapping judged bytes other than as the last segment, or ahead of a gap:
        // out of sequence, dropped.
        let got = f.stream(hook, &[at(0, &first), at(5, &first[5..])]);
        let oos = seen(Fate::Drops, &[(Verdict::OutOfSequence, 1)]);
        assert_eq!(got[1], oos, "{hook:?} overlap");
        let got = f.stream(hook, &[at(100, &first)]);
        assert_eq!(
            got[0],
            seen(Fate::Drops, &[(Verdict::OutOfSequence, 1)]),
            "{hook:?} gap"
        );
        // Ahead of a gap but inside a Content-Length body: body, passed.
        let bytes = post(GOOD, &["Content-Length: 3000"], &[b'x'; 3000]);
        let head = bytes.len() - 3000;
        let got = f.stream(
            hook,
            &[
                at(0, &bytes[..head]),
                at(head + 1500, &bytes[head + 1500..head + 2000]),
            ],
        );
        assert_eq!(
            got[1],
            seen(Fate::Passes, &[(Verdict::Pass, 1)]),
            "{hook:?} in a body"
        );
    });
}

#[test]
fn a_default_of_allow_for_incomplete_lets_it_through_and_forgets_the_connection() {
    let mut l = listener(mode::ENFORCE, deny_action::DROP);
    l.on_incomplete = default_policy::ALLOW;
    let mut f = Fixture::new(l);
    both(|hook| {
        let bytes = large_block(24_000, 2, GOOD);
        let cuts: Vec<usize> = (1..=bytes.len() / 1448).map(|i| i * 1448).collect();
        let got = f.stream(hook, &segments(&bytes, &cuts));
        let limit = agent_common::SCAN_BYTES / 1448;
        assert_eq!(
            got[limit],
            seen(Fate::Passes, &[(Verdict::Incomplete, 1)]),
            "{hook:?}"
        );
        assert_eq!(
            got[limit + 1],
            seen(Fate::Drops, &[(Verdict::Untracked, 1)]),
            "{hook:?}"
        );
    });
}

#[test]
fn a_connection_without_a_syn_seen_is_untracked() {
    let mut f = enforcing();
    both(|hook| {
        f.dp.forget_flows().unwrap();
        let got = f.segment(hook, &at(0, &Http::get("/").bearer(GOOD).bytes()));
        assert_eq!(
            got,
            seen(Fate::Drops, &[(Verdict::Untracked, 1)]),
            "{hook:?}"
        );
        // A SYN of the same 4-tuple whose ISN lies ahead of the judged bytes starts a new
        // connection (a reused port); the old one's bytes are out of sequence.
        let first = Http::get("/").bearer(GOOD).bytes();
        f.open(hook);
        assert_eq!(
            f.segment(hook, &at(0, &first)),
            seen(Fate::Passes, &[(Verdict::Allow, 1)])
        );
        f.syn(hook, ISN + 100_000);
        let got = f.segment(hook, &at(100_000, &first));
        assert_eq!(
            got,
            seen(Fate::Passes, &[(Verdict::Allow, 1)]),
            "{hook:?} new connection"
        );
        let got = f.segment(hook, &at(first.len(), &first));
        assert_eq!(
            got,
            seen(Fate::Drops, &[(Verdict::OutOfSequence, 1)]),
            "{hook:?} old one"
        );
        // One behind them (a forged SYN that would move the judged position under the
        // live connection) forgets the connection.
        f.open(hook);
        assert_eq!(
            f.segment(hook, &at(0, &first)),
            seen(Fate::Passes, &[(Verdict::Allow, 1)])
        );
        f.syn(hook, ISN + 5);
        let got = f.segment(hook, &at(5, &first));
        assert_eq!(
            got,
            seen(Fate::Drops, &[(Verdict::Untracked, 1)]),
            "{hook:?} SYN behind"
        );
        // The same SYN again (a retransmission) changes nothing.
        f.open(hook);
        f.syn(hook, ISN);
        let got = f.segment(hook, &at(0, &Http::get("/").bearer(GOOD).bytes()));
        assert_eq!(
            got,
            seen(Fate::Passes, &[(Verdict::Allow, 1)]),
            "{hook:?} SYN again"
        );
    });
}

#[test]
fn not_http_may_be_allowed_per_listener_and_then_the_connection_is_untracked() {
    let mut l = listener(mode::ENFORCE, deny_action::DROP);
    l.on_not_http = default_policy::ALLOW;
    let mut f = Fixture::new(l);
    both(|hook| {
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        let got = f.stream(
            hook,
            &[at(0, preface), at(preface.len(), &Http::get("/").bytes())],
        );
        assert_eq!(
            got,
            vec![
                seen(Fate::Passes, &[(Verdict::NotHttp, 1)]),
                seen(Fate::Drops, &[(Verdict::Untracked, 1)]),
            ],
            "{hook:?}"
        );
    });
}
