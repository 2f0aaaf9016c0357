//! Pins a restarted or upgraded daemon adopts: the revocation flag set on adopted tokens,
//! earlier TOKENS and TOKEN_STATE layouts moved over, PORTS rebuilt from LISTENERS.

use agent_common::{
    deny_action, gcra::NANOS_PER_SEC, mode, TokenInfo, TokenState, Verdict, TOKEN_ANY_SCOPE,
    TOKEN_REVOKED,
};
use rampart_tests::packet::Http;

use crate::{
    contract, fp, fresh_pin_dir, listener, listener_key, loaded, req, require_root, stage, Fate,
    Fixture, Hook, GOOD, NOW, SLOW, UNKNOWN,
};

/// The programs read a known token's revocation from its `TOKEN_REVOKED` flag. A policy
/// reload re-installs the token without it and must not un-revoke it; maps pinned by a
/// daemon that predates the flag must be flagged when a new daemon adopts them.
#[test]
fn revocation_flag_survives_reinstall_and_is_set_on_adopted_maps() {
    require_root();
    let pins = fresh_pin_dir("revflag");
    let frame = req(Http::get("/v1/x").bearer(GOOD));
    let any = TokenInfo {
        contract: 0,
        flags: TOKEN_ANY_SCOPE,
        ..Default::default()
    };

    let mut f = Fixture::pinned(&pins);
    f.dp.set_listener(listener_key(0), listener(mode::ENFORCE, deny_action::DROP))
        .unwrap();
    f.dp.set_contract(0, &contract(&[stage(0, 1_000_000, 1_000_000)], (0, 0)))
        .unwrap();
    f.dp.install_token(fp(GOOD), any).unwrap();
    assert_eq!(
        f.fate(Hook::Xdp, &frame),
        (Fate::Passes, Some(Verdict::Allow))
    );
    f.dp.revoke(fp(GOOD), NOW).unwrap();
    assert_eq!(
        f.fate(Hook::Xdp, &frame),
        (Fate::Drops, Some(Verdict::Revoked))
    );
    // A reload writes the policy's TokenInfo, which knows nothing of revocations.
    f.dp.install_token(fp(GOOD), any).unwrap();
    assert_eq!(
        f.fate(Hook::Xdp, &frame),
        (Fate::Drops, Some(Verdict::Revoked))
    );

    // What an older daemon leaves behind: the entry without the flag, written straight
    // into the pinned map. These programs would serve the token...
    {
        let map = aya::maps::MapData::from_pin(pins.join("TOKENS_V2")).expect("open pinned TOKENS");
        let mut tokens: aya::maps::HashMap<_, agent_common::Fingerprint, TokenInfo> =
            aya::maps::HashMap::try_from(aya::maps::Map::HashMap(map)).unwrap();
        let mut info = tokens.get(&fp(GOOD), 0).unwrap();
        info.flags &= !TOKEN_REVOKED;
        tokens.insert(fp(GOOD), info, 0).unwrap();
    }
    assert_eq!(
        f.fate(Hook::Xdp, &frame),
        (Fate::Passes, Some(Verdict::Allow))
    );
    drop(f);
    // ...and a daemon of this version adopting the maps flags it before anything runs.
    let mut f = Fixture::pinned(&pins);
    assert!(f
        .dp
        .token(&fp(GOOD))
        .is_some_and(|i| i.flags & TOKEN_REVOKED != 0));
    assert_eq!(
        f.fate(Hook::Xdp, &frame),
        (Fate::Drops, Some(Verdict::Revoked))
    );
    drop(f);
    std::fs::remove_dir_all(&pins).unwrap();
}

/// Maps an earlier daemon pinned in layouts this version no longer uses: TOKENS without
/// state slots (40-byte values) and TOKEN_STATE as a hash by fingerprint, either before
/// `TokenState::allowed` (56 bytes, pinned as `TOKEN_STATE`) or after (64 bytes, as
/// `TOKEN_STATE_V2`). Loading moves the tokens and their state into this version's maps,
/// removes the old pins, and the programs then judge with the moved state.
#[test]
fn earlier_tokens_and_token_state_pins_are_moved_into_the_new_layout() {
    require_root();
    for (state_pin, state_size) in [("TOKEN_STATE", 56u32), ("TOKEN_STATE_V2", 64)] {
        let pins = fresh_pin_dir(&format!("migrate-{state_size}"));
        std::fs::create_dir_all(&pins).unwrap();
        let old_tokens = pins.join("TOKENS");
        pin_hash_map(&old_tokens, 16, 40, 64);
        {
            let map = aya::maps::MapData::from_pin(&old_tokens).expect("open the v1 pin");
            let mut old: aya::maps::HashMap<_, agent_common::Fingerprint, [u64; 5]> =
                aya::maps::HashMap::try_from(aya::maps::Map::HashMap(map)).unwrap();
            // contract | flags << 32, scopes, not before, expires, ramp start
            let any_scope = u64::from(TOKEN_ANY_SCOPE) << 32;
            old.insert(
                fp(GOOD),
                [any_scope, 0, 0, NOW + 3600 * NANOS_PER_SEC, 0],
                0,
            )
            .unwrap();
            old.insert(fp(SLOW), [any_scope, 0, 0, 0, 0], 0).unwrap();
        }
        let old_state = pins.join(state_pin);
        pin_hash_map(&old_state, 16, state_size, 64);
        {
            let map = aya::maps::MapData::from_pin(&old_state).expect("open the old state pin");
            // tat, ramp start, penalty until, first seen, last seen, breaches,
            // contract | stage << 32 (and, in the 64-byte layout, allowed)
            let st = [NOW - 5, NOW - 100, 0, NOW - 100, NOW - 1, 7, 2 << 32, 11];
            if state_size == 56 {
                let mut old: aya::maps::HashMap<_, agent_common::Fingerprint, [u64; 7]> =
                    aya::maps::HashMap::try_from(aya::maps::Map::HashMap(map)).unwrap();
                let v1: [u64; 7] = st[..7].try_into().unwrap();
                old.insert(fp(GOOD), v1, 0).unwrap();
                // No token: dropped.
                old.insert(fp(UNKNOWN), v1, 0).unwrap();
            } else {
                let mut old: aya::maps::HashMap<_, agent_common::Fingerprint, [u64; 8]> =
                    aya::maps::HashMap::try_from(aya::maps::Map::HashMap(map)).unwrap();
                old.insert(fp(GOOD), st, 0).unwrap();
                old.insert(fp(UNKNOWN), st, 0).unwrap();
            }
        }
        let mut f = Fixture::pinned(&pins);
        assert!(!old_tokens.exists(), "the v1 TOKENS pin must be gone");
        assert!(!old_state.exists(), "the old {state_pin} pin must be gone");
        let good = f.dp.token(&fp(GOOD)).expect("GOOD moved into TOKENS");
        assert_eq!(good.flags, TOKEN_ANY_SCOPE);
        assert_eq!(good.expires_ns, NOW + 3600 * NANOS_PER_SEC);
        let slow = f.dp.token(&fp(SLOW)).expect("SLOW moved into TOKENS");
        assert_ne!(good.state_slot, slow.state_slot, "one state slot per token");
        let allowed = if state_size == 56 { 0 } else { 11 };
        let moved = TokenState {
            tat_ns: NOW - 5,
            ramp_start_ns: NOW - 100,
            first_seen_ns: NOW - 100,
            last_seen_ns: NOW - 1,
            breaches: 7,
            contract: 0,
            stage: 2,
            allowed,
            ..Default::default()
        };
        assert_eq!(f.dp.token_state(&fp(GOOD)), Some(moved));
        assert_eq!(f.dp.token_state(&fp(SLOW)), None, "SLOW was never seen");
        assert_eq!(f.dp.runtime_totals().unwrap().token_states, 1);
        // The programs read the moved state: the request counts in it, next to the
        // moved breaches, and its ramp start stays the moved one.
        f.dp.set_listener(listener_key(0), listener(mode::ENFORCE, deny_action::DROP))
            .unwrap();
        f.dp.set_contract(0, &contract(&[stage(0, 1_000_000, 1_000_000)], (0, 0)))
            .unwrap();
        let frame = req(Http::get("/v1/x").bearer(GOOD));
        assert_eq!(
            f.fate(Hook::Xdp, &frame),
            (Fate::Passes, Some(Verdict::Allow))
        );
        let after = f.dp.token_state(&fp(GOOD)).unwrap();
        assert_eq!(
            (
                after.allowed,
                after.breaches,
                after.ramp_start_ns,
                after.last_seen_ns
            ),
            (allowed + 1, 7, NOW - 100, NOW)
        );
        drop(f);
        std::fs::remove_dir_all(&pins).unwrap();
    }
}

/// A restarted (or upgraded) daemon adopts LISTENERS and rebuilds the `PORTS` words
/// from it before any program runs; an earlier version's `PORTS` pin (a bitmap) is
/// removed rather than adopted.
#[test]
fn adopted_listeners_are_judged_through_rebuilt_port_words() {
    require_root();
    let pins = fresh_pin_dir("ports");
    {
        let mut dp = loaded(Some(pins.clone()));
        dp.set_listener(listener_key(0), listener(mode::ENFORCE, deny_action::DROP))
            .unwrap();
    }
    std::fs::remove_file(pins.join("PORTS_V2")).unwrap();
    let legacy = pins.join("PORTS");
    pin_hash_map(&legacy, 4, 8, 1024);
    let mut f = Fixture::pinned(&pins);
    assert!(!legacy.exists(), "the earlier PORTS pin must be gone");
    assert!(pins.join("PORTS_V2").exists());
    for hook in [Hook::Xdp, Hook::Tc] {
        assert_eq!(
            f.fate(hook, &req(Http::get("/"))),
            (Fate::Drops, Some(Verdict::Missing))
        );
    }
    drop(f);
    std::fs::remove_dir_all(&pins).unwrap();
}

/// Creates a BPF hash map and pins it at `path` (what an earlier daemon left).
fn pin_hash_map(path: &std::path::Path, key_size: u32, value_size: u32, max_entries: u32) {
    use std::os::unix::ffi::OsStrExt as _;
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_HASH: u32 = 1;
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&BPF_MAP_TYPE_HASH.to_ne_bytes());
    attr[4..8].copy_from_slice(&key_size.to_ne_bytes());
    attr[8..12].copy_from_slice(&value_size.to_ne_bytes());
    attr[12..16].copy_from_slice(&max_entries.to_ne_bytes());
    // SAFETY: bpf(2) with a zero-padded attr of the size passed.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_CREATE, attr.as_ptr(), attr.len()) };
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    let cpath = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut attr = [0u8; 128];
    attr[0..8].copy_from_slice(&(cpath.as_ptr() as u64).to_ne_bytes());
    attr[8..12].copy_from_slice(&(fd as u32).to_ne_bytes());
    // SAFETY: as above; `cpath` outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, attr.as_ptr(), attr.len()) };
    assert_eq!(rc, 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
    // SAFETY: our own fd; the pin keeps the map.
    unsafe { libc::close(fd as i32) };
}
