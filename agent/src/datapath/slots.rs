//! Which `TOKEN_STATE` slot each installed fingerprint owns.
//!
//! The programs reach a token's runtime state by the `state_slot` of its TOKENS entry (an
//! inlined array load, not a second hash lookup). Userspace owns the assignment: one slot
//! per installed fingerprint, rebuilt from TOKENS when a daemon adopts pinned maps.
//!
//! A freed slot is the one resource a stale reader could still touch: a program that read
//! a TOKENS entry just before its removal may write the old state once more, a few
//! microseconds later. So never-used slots go first, and freed ones are reused oldest
//! first, after every never-used one is taken: a slot rests for as long as the free list
//! is long. The facade zeroes a slot both when it frees it and when it hands it out.

use std::collections::{HashMap, HashSet, VecDeque};

use agent_common::Fingerprint;

#[derive(Debug, Default)]
pub(super) struct Slots {
    by_fp: HashMap<Fingerprint, u32>,
    /// Freed slots, oldest first.
    free: VecDeque<u32>,
    /// Slots from here up were never handed out.
    next: u32,
    cap: u32,
}

/// What `Slots::assign` found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Assigned {
    /// The fingerprint already had this slot.
    Kept(u32),
    /// A slot new to this fingerprint: its state must be zeroed before anything names it.
    New(u32),
}

impl Assigned {
    pub(super) fn slot(self) -> u32 {
        match self {
            Assigned::Kept(s) | Assigned::New(s) => s,
        }
    }
}

impl Slots {
    /// `cap` slots, the entries' claims honoured where they are valid: in range and not
    /// claimed by an earlier entry. Returns the fingerprints whose claim was not (they
    /// need a slot of their own through `assign`).
    pub(super) fn rebuild(
        cap: u32,
        entries: impl IntoIterator<Item = (Fingerprint, u32)>,
    ) -> (Slots, Vec<Fingerprint>) {
        let mut slots = Slots {
            cap,
            ..Slots::default()
        };
        let mut taken = HashSet::new();
        let mut homeless = Vec::new();
        for (fp, slot) in entries {
            if slot < cap && !slots.by_fp.contains_key(&fp) && taken.insert(slot) {
                slots.by_fp.insert(fp, slot);
                slots.next = slots.next.max(slot + 1);
            } else {
                homeless.push(fp);
            }
        }
        // Below `next`, the unclaimed slots may have been freed moments ago by the
        // daemon before this one: they wait behind the never-used ones.
        slots.free = (0..slots.next).filter(|s| !taken.contains(s)).collect();
        (slots, homeless)
    }

    pub(super) fn slot(&self, fp: &Fingerprint) -> Option<u32> {
        self.by_fp.get(fp).copied()
    }

    /// `fp`'s slot, assigning one if it has none; `None` when every slot is taken.
    pub(super) fn assign(&mut self, fp: Fingerprint) -> Option<Assigned> {
        if let Some(s) = self.slot(&fp) {
            return Some(Assigned::Kept(s));
        }
        let s = if self.next < self.cap {
            self.next += 1;
            self.next - 1
        } else {
            self.free.pop_front()?
        };
        self.by_fp.insert(fp, s);
        Some(Assigned::New(s))
    }

    /// Frees `fp`'s slot; returns it.
    pub(super) fn release(&mut self, fp: &Fingerprint) -> Option<u32> {
        let s = self.by_fp.remove(fp)?;
        self.free.push_back(s);
        Some(s)
    }

    /// Every assigned slot.
    pub(super) fn assigned(&self) -> impl Iterator<Item = (&Fingerprint, u32)> {
        self.by_fp.iter().map(|(fp, s)| (fp, *s))
    }

    /// Fingerprints with a slot: the installed tokens.
    pub(super) fn len(&self) -> usize {
        self.by_fp.len()
    }

    pub(super) fn capacity(&self) -> u32 {
        self.cap
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(n: u64) -> Fingerprint {
        Fingerprint([n, !n])
    }

    #[test]
    fn never_used_slots_go_first_then_freed_ones_oldest_first() {
        let (mut s, homeless) = Slots::rebuild(4, []);
        assert!(homeless.is_empty());
        assert_eq!(s.assign(fp(1)), Some(Assigned::New(0)));
        assert_eq!(s.assign(fp(2)), Some(Assigned::New(1)));
        assert_eq!(s.assign(fp(1)), Some(Assigned::Kept(0)));
        assert_eq!(s.release(&fp(2)), Some(1));
        assert_eq!(s.release(&fp(1)), Some(0));
        assert_eq!(s.release(&fp(1)), None);
        // Never-used 2 and 3 before the freed 1 and 0, which come back in freeing order.
        let got: Vec<u32> = (10..14).map(|n| s.assign(fp(n)).unwrap().slot()).collect();
        assert_eq!(got, [2, 3, 1, 0]);
        assert_eq!(s.assign(fp(99)), None, "every slot is taken");
        assert_eq!(s.slot(&fp(12)), Some(1));
        assert_eq!(s.assigned().count(), 4);
    }

    #[test]
    fn rebuild_keeps_valid_claims_and_sends_the_rest_back() {
        // fp 3 claims fp 1's slot, fp 4 a slot beyond the table, fp 1 appears twice.
        let (mut s, homeless) = Slots::rebuild(
            8,
            [(fp(1), 5), (fp(2), 2), (fp(3), 5), (fp(4), 8), (fp(1), 6)],
        );
        assert_eq!(homeless, [fp(3), fp(4), fp(1)]);
        assert_eq!(s.slot(&fp(1)), Some(5));
        assert_eq!(s.slot(&fp(2)), Some(2));
        assert_eq!(s.slot(&fp(3)), None);
        // Never used: 6 and 7. Possibly just freed: 0, 1, 3, 4, after those.
        let got: Vec<u32> = (10..16).map(|n| s.assign(fp(n)).unwrap().slot()).collect();
        assert_eq!(got, [6, 7, 0, 1, 3, 4]);
        assert_eq!(s.assign(fp(20)), None);
        assert_eq!(s.capacity(), 8);
    }
}
