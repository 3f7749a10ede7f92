//! `count_total` in place: the sum of each key's differences, from a hash map of sums
//! updated as times complete, not from an arrangement.
//!
//! Differential's `count_total` arranges its input and, for every key a batch touches,
//! seeks the key in the trace and replays its history to learn the count before; the
//! trace's batches are merged again and again as they pile up. The views' counts change
//! a key at almost every tick (the standard file spreads 5M clicks over 18,000 ticks and
//! 400k (ad, minute) keys), so that is about one trace update, one seek and its share of
//! merging per click. A hash map of sums answers the same in one lookup and is changed in
//! place; its size follows the live keys (a key whose sum returns to zero leaves). The
//! output at every time is `count_total`'s: the old sum retracted and the new one added,
//! for each key whose sum changed at that time.

use std::hash::Hash;

use differential_dataflow::difference::Semigroup;
use differential_dataflow::{ExchangeData, VecCollection};
use hashbrown::HashMap;
use hashbrown::hash_map::Entry;
use prometheus_client::metrics::gauge::Gauge;

use super::pending::apply_complete_times;
use crate::time::Time;

/// Each key of `input` with the sum of its differences, while that sum is not zero;
/// `held_back` counts the updates it holds back until their time is complete.
pub fn count_in_place<'s, K, R>(
    input: VecCollection<'s, Time, K, R>,
    held_back: Gauge,
) -> VecCollection<'s, Time, (K, R), isize>
where
    K: ExchangeData + Hash + Eq,
    R: ExchangeData + Semigroup,
{
    let mut sums = Sums::default();
    apply_complete_times(input, "CountInPlace", held_back, move |updates, out| {
        sums.apply(updates, |change, diff| out.push((change, diff)));
    })
}

/// The live sums, and the changes of one time gathered per key before they are applied.
struct Sums<K, R> {
    live: HashMap<K, R>,
    /// Reused from time to time: a key's updates within a time are summed here first, so
    /// the key changes once per time, as `count_total`'s output does.
    delta: HashMap<K, R>,
}

impl<K, R> Default for Sums<K, R> {
    fn default() -> Self {
        Sums {
            live: HashMap::new(),
            delta: HashMap::new(),
        }
    }
}

impl<K: Hash + Eq + Clone, R: Semigroup> Sums<K, R> {
    /// Applies the updates of one time; `emit` gets `((key, old sum), -1)` and
    /// `((key, new sum), +1)` for every key whose sum changed, leaving out zero sums.
    fn apply(
        &mut self,
        updates: impl IntoIterator<Item = (K, R)>,
        mut emit: impl FnMut((K, R), isize),
    ) {
        for (key, diff) in updates {
            match self.delta.entry(key) {
                Entry::Occupied(mut e) => e.get_mut().plus_equals(&diff),
                Entry::Vacant(e) => {
                    e.insert(diff);
                }
            }
        }
        for (key, diff) in self.delta.drain() {
            if diff.is_zero() {
                continue;
            }
            match self.live.entry(key) {
                Entry::Occupied(mut e) => {
                    emit((e.key().clone(), e.get().clone()), -1);
                    e.get_mut().plus_equals(&diff);
                    if e.get().is_zero() {
                        e.remove();
                    } else {
                        emit((e.key().clone(), e.get().clone()), 1);
                    }
                }
                Entry::Vacant(e) => {
                    emit((e.key().clone(), diff.clone()), 1);
                    e.insert(diff);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    fn changes(sums: &mut Sums<u8, i64>, updates: Vec<(u8, i64)>) -> Vec<((u8, i64), isize)> {
        let mut out = Vec::new();
        sums.apply(updates, |c, d| out.push((c, d)));
        out.sort();
        out
    }

    #[test]
    fn a_key_changes_once_per_time_and_leaves_at_zero() {
        let mut sums = Sums::default();
        assert_eq!(changes(&mut sums, vec![(1, 2), (1, 3)]), vec![((1, 5), 1)]);
        assert_eq!(
            changes(&mut sums, vec![(1, -1)]),
            vec![((1, 4), 1), ((1, 5), -1)]
        );
        assert_eq!(changes(&mut sums, vec![(1, 2), (1, -2)]), vec![]);
        assert_eq!(changes(&mut sums, vec![(1, -4)]), vec![((1, 4), -1)]);
        assert!(
            sums.live.is_empty(),
            "a key whose sum is zero leaves the map"
        );
    }

    proptest! {
        /// The output, summed over times, is the plain per-key sum at every time, with
        /// zero sums absent (what `count_total` holds).
        #[test]
        fn output_accumulates_to_the_plain_sums(
            times in prop::collection::vec(prop::collection::vec((0u8..6, -3i64..4), 0..12), 1..20)
        ) {
            let mut sums = Sums::default();
            let mut plain: BTreeMap<u8, i64> = BTreeMap::new();
            let mut held: BTreeMap<(u8, i64), isize> = BTreeMap::new();
            for updates in times {
                for &(k, d) in &updates {
                    *plain.entry(k).or_default() += d;
                }
                sums.apply(updates, |c, d| *held.entry(c).or_default() += d);
                held.retain(|_, d| *d != 0);
                let expected: BTreeMap<(u8, i64), isize> = plain
                    .iter()
                    .filter(|(_, s)| **s != 0)
                    .map(|(k, s)| ((*k, *s), 1))
                    .collect();
                prop_assert_eq!(&held, &expected);
            }
        }
    }
}
