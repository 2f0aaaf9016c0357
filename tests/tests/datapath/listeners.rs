//! What a listener decides: observe mode, its defaults for missing, unknown and incomplete
//! requests, and which listener judges a packet (the `PORTS` words, then LISTENERS).

use agent_common::{default_policy, deny_action, mode, ListenerConfig, Verdict};
use rampart_tests::packet::Http;

use crate::{listener, listener_key, req, Fate, Fixture, Hook, REVOKED, UNKNOWN};

#[test]
fn observe_mode_passes_and_counts() {
    let mut f = Fixture::new(listener(mode::OBSERVE, deny_action::DROP));
    for hook in [Hook::Xdp, Hook::Tc] {
        assert_eq!(
            f.fate(hook, &req(Http::get("/").bearer(UNKNOWN))),
            (Fate::Passes, Some(Verdict::Unknown))
        );
        assert_eq!(
            f.fate(hook, &req(Http::get("/"))),
            (Fate::Passes, Some(Verdict::Missing))
        );
        assert_eq!(
            f.fate(hook, &req(Http::get("/").bearer(REVOKED))),
            (Fate::Passes, Some(Verdict::Revoked))
        );
    }
}

#[test]
fn configurable_defaults_for_missing_unknown_incomplete() {
    let mut l = listener(mode::ENFORCE, deny_action::DROP);
    l.on_missing = default_policy::ALLOW;
    l.on_unknown = default_policy::ALLOW;
    l.on_incomplete = default_policy::ALLOW;
    let mut f = Fixture::new(l);
    for hook in [Hook::Xdp, Hook::Tc] {
        assert_eq!(
            f.fate(hook, &req(Http::get("/"))),
            (Fate::Passes, Some(Verdict::Missing))
        );
        assert_eq!(
            f.fate(hook, &req(Http::get("/").bearer(UNKNOWN))),
            (Fate::Passes, Some(Verdict::Unknown))
        );
        // Defaults never cover the other verdicts.
        assert_eq!(
            f.fate(hook, &req(Http::get("/").bearer(REVOKED))),
            (Fate::Drops, Some(Verdict::Revoked))
        );
    }
}

/// Which listener judges a packet, through the `PORTS` words: a listener alone on its
/// port is read from the word, others from LISTENERS, with an interface's own listener
/// before the every-interface one. Test runs happen on the loopback device (ifindex 1).
#[test]
fn listener_precedence_through_port_words() {
    // Every network namespace's loopback device has ifindex 1.
    const LOOPBACK: u32 = 1;
    let mut f = Fixture::new(listener(mode::ENFORCE, deny_action::DROP));
    // Listener 1 lets requests without a token through; listener 0 (every interface,
    // set by the fixture) drops them.
    let lenient = ListenerConfig {
        id: 1,
        on_missing: default_policy::ALLOW,
        ..listener(mode::ENFORCE, deny_action::DROP)
    };
    let missing = req(Http::get("/"));
    let judged_by = |f: &mut Fixture, hook| {
        let before = [0, 1].map(|id| f.dp.verdict_counts(id).unwrap()[Verdict::Missing as usize]);
        let (fate, _) = f.fate(hook, &missing);
        let after = [0, 1].map(|id| f.dp.verdict_counts(id).unwrap()[Verdict::Missing as usize]);
        let by: Vec<u32> = (0..2)
            .filter(|&i| after[i] != before[i])
            .map(|i| i as u32)
            .collect();
        (fate, by)
    };
    for hook in [Hook::Xdp, Hook::Tc] {
        // The every-interface listener alone: from the word.
        assert_eq!(judged_by(&mut f, hook), (Fate::Drops, vec![0]));
        // Another interface's listener: the word holds it, this interface's packets are
        // looked up in LISTENERS and find the every-interface listener.
        f.dp.set_listener(listener_key(999), lenient).unwrap();
        assert_eq!(judged_by(&mut f, hook), (Fate::Drops, vec![0]));
        // This interface's own listener comes first, wherever it is kept.
        f.dp.set_listener(listener_key(LOOPBACK), lenient).unwrap();
        assert_eq!(judged_by(&mut f, hook), (Fate::Passes, vec![1]));
        f.dp.remove_listener(&listener_key(999)).unwrap();
        assert_eq!(judged_by(&mut f, hook), (Fate::Passes, vec![1]));
        // Only another interface's listener: nobody judges this packet.
        f.dp.remove_listener(&listener_key(LOOPBACK)).unwrap();
        f.dp.remove_listener(&listener_key(0)).unwrap();
        f.dp.set_listener(listener_key(999), lenient).unwrap();
        assert_eq!(judged_by(&mut f, hook), (Fate::Passes, vec![]));
        // Back to the fixture's listener alone.
        f.dp.remove_listener(&listener_key(999)).unwrap();
        f.dp.set_listener(listener_key(0), listener(mode::ENFORCE, deny_action::DROP))
            .unwrap();
    }
}
