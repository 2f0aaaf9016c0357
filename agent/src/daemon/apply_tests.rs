//! Tests of `apply`: what a reload writes into the datapath.

use agent_common::{Scope, TokenInfo};

use super::*;
use crate::policy::StaticToken;

fn contract(n: u32) -> Contract {
    Contract {
        n_stages: n,
        ..Default::default()
    }
}

/// Contracts that say the same when their names start alike.
fn policy(contracts: &[&str], scopes: &[&str], token: (&str, &[&str])) -> CompiledPolicy {
    let mut p = CompiledPolicy {
        contracts: contracts
            .iter()
            .map(|n| (n.to_string(), contract(u32::from(n.as_bytes()[0]))))
            .collect(),
        scopes: scopes
            .iter()
            .map(|n| (n.to_string(), Scope::default()))
            .collect(),
        tokens: Vec::new(),
    };
    let (_, mask) = p
        .scope_mask(&token.1.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .unwrap();
    p.tokens.push(StaticToken {
        fingerprint: Fingerprint([1, 2]),
        info: TokenInfo {
            contract: p.contract_index(token.0).unwrap(),
            scopes: mask,
            ..Default::default()
        },
        label: None,
    });
    p
}

#[test]
fn reload_keeps_every_index_in_place() {
    let old = policy(&["a", "b", "c"], &["r", "w"], ("c", &["w"]));
    // "a" and "r" dropped, "d" and "x" added, order shuffled.
    let new = policy(&["d", "c", "b"], &["x", "w"], ("c", &["w", "x"]));
    let s = stabilize(&old, new);
    assert_eq!(s.contract_index("b"), Some(1));
    assert_eq!(s.contract_index("c"), Some(2));
    assert_eq!(s.contract_index("d"), Some(3));
    assert_eq!(
        s.contract_index("a"),
        None,
        "a dropped name resolves to nothing"
    );
    assert_eq!(
        s.contracts[0].1,
        contract(u32::from(b'a')),
        "tombstone keeps the old definition"
    );
    assert_eq!(s.tokens[0].info.contract, 2);
    assert_eq!(s.scope_mask(&["w".into()]).unwrap().1, 0b10);
    assert_eq!(s.scope_mask(&["x".into()]).unwrap().1, 0b100);
    assert_eq!(s.tokens[0].info.scopes, 0b110);
    // A second reload keeps the tombstone (once) and the indexes.
    let again = stabilize(&s, policy(&["b", "c", "d"], &["w", "x"], ("d", &["x"])));
    assert_eq!(again.contracts.len(), 4);
    assert_eq!(again.contract_index("d"), Some(3));
    assert_eq!(again.tokens[0].info.scopes, 0b100);
}

/// A contract that says something else takes a new slot; the old slot keeps what it
/// said for the entries not yet rewritten, and the token names the new one.
#[test]
fn a_changed_definition_never_overwrites_its_slot() {
    let old = policy(&["a", "b"], &["r"], ("b", &["r"]));
    let mut new = policy(&["a", "b"], &["r"], ("b", &["r"]));
    new.contracts[1].1 = contract(99);
    new.scopes[0].1.prefix_len = 3;
    let s = stabilize(&old, new);
    assert_eq!(s.contracts[1].1, old.contracts[1].1, "old slot untouched");
    assert_eq!(s.contract_index("b"), Some(2));
    assert_eq!(s.contracts[2].1, contract(99));
    assert_eq!(s.tokens[0].info.contract, 2);
    assert_eq!(s.scopes[0].1, Scope::default(), "old scope slot untouched");
    assert_eq!(s.tokens[0].info.scopes, 0b10);
    let used = |c: &[&str], s: &[&str]| {
        let set = |names: &[&str]| names.iter().map(|n| n.to_string()).collect();
        let (c, s): (HashSet<String>, HashSet<String>) = (set(c), set(s));
        move || Ok((c, s))
    };
    let otherwise = |new: &CompiledPolicy, unresolved, in_use| {
        resolves_otherwise(&old, new, unresolved, in_use).unwrap()
    };
    assert!(otherwise(&s, 0, used(&["b"], &[])), "a used contract moved");
    assert!(otherwise(&s, 0, used(&[], &["r"])), "a used scope moved");
    assert!(!otherwise(&s, 0, used(&["a"], &[])), "nothing used moved");
    let added = stabilize(&old, policy(&["a", "b", "c"], &["r"], ("b", &["r"])));
    assert!(
        !otherwise(&added, 0, used(&["a", "b"], &["r"])),
        "a new name alone"
    );
    assert!(
        otherwise(&added, 1, used(&[], &[])),
        "a new name for a token that lacked one"
    );

    // Full tables reuse the tombstones of earlier reloads, never this reload's.
    let names: Vec<String> = (0..agent_common::MAX_SCOPES)
        .map(|i| format!("s{i}"))
        .collect();
    let full = |prefix: u32| {
        let mut p = policy(&["a"], &[], ("a", &["*"]));
        p.scopes = names
            .iter()
            .map(|n| {
                let scope = Scope {
                    prefix_len: prefix,
                    ..Scope::default()
                };
                (n.clone(), scope)
            })
            .collect();
        p
    };
    let mut first = full(1);
    first.tokens.clear();
    // Half the scopes redefined: 32 tombstones beside 64 live names would need 96
    // slots, so the table falls back to the compiled order.
    let mut half = full(1);
    half.tokens.clear();
    for (_, scope) in half.scopes.iter_mut().take(32) {
        scope.prefix_len = 2;
    }
    let fallback = stabilize(&first, half.clone());
    assert_eq!(fallback.scopes, half.scopes);
    // With tombstones from an earlier reload, those are reused.
    let mut fewer = first.clone();
    fewer.scopes.truncate(32);
    let with_tombstones = stabilize(&first, fewer);
    assert_eq!(with_tombstones.scopes.len(), 64);
    let mut back = full(1);
    back.tokens.clear();
    for (_, scope) in back.scopes.iter_mut().skip(32) {
        scope.prefix_len = 3;
    }
    let reused = stabilize(&with_tombstones, back.clone());
    assert_eq!(reused.scopes.len(), 64);
    assert_eq!(reused.scopes[..32], back.scopes[..32], "kept in place");
    assert_eq!(reused.scope_mask(&["s40".into()]).unwrap().1, 1 << 40);
}

/// A policy with `contracts` (name, stage count: two contracts say the same when
/// their counts match) and static `tokens` (fingerprint word, contract name).
fn listing(contracts: &[(&str, u32)], tokens: &[(u64, &str)]) -> CompiledPolicy {
    let contracts: Vec<(String, Contract)> = contracts
        .iter()
        .map(|(n, stages)| (n.to_string(), contract(*stages)))
        .collect();
    let tokens = tokens
        .iter()
        .map(|(fp, c)| StaticToken {
            fingerprint: Fingerprint([*fp, 0]),
            info: TokenInfo {
                contract: contracts.iter().position(|(n, _)| n == c).unwrap() as u32,
                ..Default::default()
            },
            label: None,
        })
        .collect();
    CompiledPolicy {
        contracts,
        scopes: Vec::new(),
        tokens,
    }
}

#[test]
fn a_reload_diff_names_what_changed_and_nothing_else() {
    let base: Vec<(u64, &str)> = (1..=1000).map(|i| (i, "a")).collect();
    let old = listing(&[("a", 1), ("b", 2)], &base);
    assert_eq!(diff_tokens(&old, &old), TokenDiff::default());
    // One token moved to "b", one removed, one added in the middle.
    let mut edited = base.clone();
    edited[10].1 = "b";
    edited.remove(500);
    edited.insert(700, (5000, "a"));
    let new = listing(&[("a", 1), ("b", 2)], &edited);
    let diff = diff_tokens(&old, &new);
    let changed: Vec<(u64, u32, Option<u32>)> = diff
        .changed
        .iter()
        .map(|(fp, info, was)| (fp.0[0], info.contract, *was))
        .collect();
    assert_eq!(changed, [(11, 1, Some(0)), (5000, 0, None)]);
    assert_eq!(diff.removed, [Fingerprint([501, 0])]);
}

#[test]
fn a_ramp_restarts_only_when_what_its_contract_says_changed() {
    let old = listing(&[("a", 1), ("b", 2)], &[(1, "a"), (2, "b"), (3, "a")]);
    let new = listing(
        &[("a", 1), ("b", 5)],
        &[(1, "a"), (2, "b"), (3, "b"), (4, "a")],
    );
    let issued = HashMap::from([
        (Fingerprint([9, 9]), "b".to_string()),
        (Fingerprint([8, 8]), "a".to_string()),
    ]);
    let mut restarts = ramp_restarts(&old, &new, &issued);
    restarts.sort_by_key(|f| f.0);
    // 1 and issued 8: "a" says the same. 2 and issued 9: "b" says otherwise now.
    // 3: moved from "a" to "b". 4: new to the policy, starts fresh anyway.
    assert_eq!(
        restarts,
        [
            Fingerprint([2, 0]),
            Fingerprint([3, 0]),
            Fingerprint([9, 9])
        ]
    );
}
