//! The reset action: an RST to the server, then one back to the client for its
//! retransmission, also when the programs were replaced in between.

use agent_common::{deny_action, mode, Verdict};
use rampart_tests::packet::{tcp_checksum_ok, Frame, Http, TCP_RST};

use crate::{
    fresh_pin_dir, listener, listener_key, require_root, Fixture, Hook, PORT, TC_ACT_OK,
    TC_ACT_REDIRECT, UNKNOWN, XDP_PASS, XDP_TX,
};

#[test]
fn reset_action_resets_server_then_client() {
    for hook in [Hook::Xdp, Hook::Tc] {
        for v6 in [false, true] {
            let mut f = Fixture::new(listener(mode::ENFORCE, deny_action::RESET));
            // No reset for longer than a flow is remembered: the first reset must turn
            // the retransmission check (skipped until then) back on.
            f.dp.forget_last_reset().unwrap();
            let mut frame = Frame::tcp(PORT, &Http::get("/").bearer(UNKNOWN).bytes());
            frame.ipv6 = v6;
            let bytes = frame.build();
            // First denied segment: rewritten in place into an RST to the server.
            let (ret, out, v) = f.run(hook, &bytes);
            assert_eq!(v, Some(Verdict::Unknown));
            assert_eq!(
                ret,
                if hook == Hook::Xdp {
                    XDP_PASS
                } else {
                    TC_ACT_OK
                },
                "{hook:?} v6={v6}"
            );
            let l4 = if v6 { 54 } else { 34 };
            assert_eq!(out.len(), l4 + 20, "payload cut off");
            assert_eq!(out[l4 + 13], TCP_RST | 0x10);
            assert_eq!(
                &out[l4..l4 + 2],
                &40000u16.to_be_bytes(),
                "still client → server"
            );
            assert_eq!(
                &out[l4 + 4..l4 + 8],
                &1000u32.to_be_bytes(),
                "seq of the request"
            );
            assert!(tcp_checksum_ok(&out), "server RST checksum");
            // The client's retransmission: an RST back to the client, not judged (or
            // counted) a second time.
            let (ret, out, v) = f.run(hook, &bytes);
            assert_eq!(v, None, "a retransmission is not a new request");
            assert_eq!(
                ret,
                if hook == Hook::Xdp {
                    XDP_TX
                } else {
                    TC_ACT_REDIRECT
                }
            );
            assert_eq!(&out[0..6], &rampart_tests::packet::CLIENT_MAC);
            assert_eq!(&out[l4..l4 + 2], &PORT.to_be_bytes(), "server → client");
            assert_eq!(
                &out[l4 + 4..l4 + 8],
                &5000u32.to_be_bytes(),
                "seq = the client's ack"
            );
            let payload = Http::get("/").bearer(UNKNOWN).bytes().len() as u32;
            assert_eq!(
                &out[l4 + 8..l4 + 12],
                &(1000 + payload).to_be_bytes(),
                "acks the request"
            );
            assert_eq!(out[l4 + 13], TCP_RST | 0x10);
            assert!(tcp_checksum_ok(&out), "client RST checksum");
        }
    }
}

/// A restarted daemon's programs still answer the retransmission of a segment that the
/// earlier programs reset: RESET_FLOWS is adopted, and the new programs' `LAST_RESET`
/// starts at their load, so they look it up.
#[test]
fn retransmission_of_a_segment_reset_before_a_restart_is_answered() {
    require_root();
    let pins = fresh_pin_dir("resets");
    let bytes = Frame::tcp(PORT, &Http::get("/").bearer(UNKNOWN).bytes()).build();
    {
        let mut f = Fixture::pinned(&pins);
        f.dp.set_listener(listener_key(0), listener(mode::ENFORCE, deny_action::RESET))
            .unwrap();
        let (ret, _, v) = f.run(Hook::Xdp, &bytes);
        assert_eq!(
            (ret, v),
            (XDP_PASS, Some(Verdict::Unknown)),
            "RST to the server"
        );
    }
    let mut f = Fixture::pinned(&pins);
    let (ret, _, v) = f.run(Hook::Xdp, &bytes);
    assert_eq!((ret, v), (XDP_TX, None), "RST back to the client");
    drop(f);
    std::fs::remove_dir_all(&pins).unwrap();
}
