//! `distinct` in place: each key once while its count is positive, from a hash map of
//! counts updated as times complete, not from an arrangement.
//!
//! Differential's `distinct_total` arranges its input: one update per record, sorted in
//! batches and merged again and again as the trace grows, to answer, for each key a time
//! changes, what its count was before. A hash map of counts answers the same in one lookup
//! and is changed in place; its size follows the live keys (a key whose count returns to
//! zero leaves). The output at every time is `distinct_total`'s. Views read it like any
//! collection.
//!
//! [`count_distinct_in_place`] counts each group's distinct values in the same operator:
//! `dataflows/ad_hourly_users.rs` has about one `(ad, hour, user)` triple per counted
//! click, and `distinct` followed by `count` would exchange and hold back every change
//! twice (once by triple, once by `(ad, hour)`), and keep a second map.

use std::hash::Hash;

use differential_dataflow::hashable::Hashable;
use differential_dataflow::{ExchangeData, VecCollection};
use hashbrown::HashMap;
use prometheus_client::metrics::gauge::Gauge;

use super::count::Sums;
use super::pending::{apply_complete_times, apply_complete_times_routed};
use crate::time::Time;

/// The keys of `input` with a positive count, each once; `held_back` counts the updates it
/// holds back until their time is complete.
pub fn distinct_in_place<'s, K>(
    input: VecCollection<'s, Time, K>,
    held_back: Gauge,
) -> VecCollection<'s, Time, K>
where
    K: ExchangeData + Hash + Eq,
{
    let mut counts: HashMap<K, isize> = HashMap::new();
    apply_complete_times(input, "DistinctInPlace", held_back, move |updates, out| {
        for (key, diff) in updates {
            if let Some(change) = apply(&mut counts, key, diff) {
                out.push(change);
            }
        }
    })
}

/// For each group of `input`, the number of its distinct values with a positive count,
/// while that number is not zero: `distinct_in_place` then `count_in_place` on the group,
/// in one operator; `held_back` counts the updates it holds back.
pub fn count_distinct_in_place<'s, G, V>(
    input: VecCollection<'s, Time, (G, V)>,
    held_back: Gauge,
) -> VecCollection<'s, Time, (G, i64)>
where
    G: ExchangeData + Hash + Eq,
    V: ExchangeData + Hash + Eq,
{
    let mut distinct = DistinctCounts::default();
    // Every value of a group on the worker that holds the group's count.
    let by_group = |(group, _): &(G, V)| group.hashed();
    apply_complete_times_routed(
        input,
        "CountDistinctInPlace",
        by_group,
        held_back,
        move |updates, out| distinct.apply(updates, |change, diff| out.push((change, diff))),
    )
}

/// The counts of live `(group, value)` pairs, and per group the number of them.
struct DistinctCounts<G, V> {
    pairs: HashMap<(G, V), isize>,
    groups: Sums<G, i64>,
}

impl<G, V> Default for DistinctCounts<G, V> {
    fn default() -> Self {
        DistinctCounts {
            pairs: HashMap::new(),
            groups: Sums::default(),
        }
    }
}

impl<G: Hash + Eq + Clone, V: Hash + Eq + Clone> DistinctCounts<G, V> {
    /// Applies the updates of one time; `emit` gets `((group, old count), -1)` and
    /// `((group, new count), +1)` for every group whose count changed, leaving out zeros.
    fn apply(&mut self, updates: Vec<((G, V), isize)>, emit: impl FnMut((G, i64), isize)) {
        // A pair that appears or leaves changes its group's count by one; the sums take
        // all of a time's changes before they emit.
        let pairs = &mut self.pairs;
        let changes = updates.into_iter().filter_map(|(pair, diff)| {
            apply(pairs, pair, diff).map(|((group, _), change)| (group, change as i64))
        });
        self.groups.apply(changes, emit);
    }
}

/// Adds `diff` to the count of `key`; the key with `+1` when it appears, `-1` when it
/// leaves.
fn apply<K: Hash + Eq + Clone>(
    counts: &mut HashMap<K, isize>,
    key: K,
    diff: isize,
) -> Option<(K, isize)> {
    if let Some(count) = counts.get_mut(&key) {
        let before = *count > 0;
        *count += diff;
        let after = *count > 0;
        if *count == 0 {
            counts.remove(&key);
        }
        return (before != after).then_some((key, if after { 1 } else { -1 }));
    }
    match diff {
        0 => None,
        d if d > 0 => {
            counts.insert(key.clone(), d);
            Some((key, 1))
        }
        d => {
            counts.insert(key, d);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_key_appears_with_its_first_count_and_leaves_with_its_last() {
        let mut counts = HashMap::new();
        assert_eq!(apply(&mut counts, "u", 1), Some(("u", 1)));
        assert_eq!(apply(&mut counts, "u", 1), None);
        assert_eq!(apply(&mut counts, "u", -1), None);
        assert_eq!(apply(&mut counts, "u", -1), Some(("u", -1)));
        assert!(counts.is_empty(), "a key with count zero leaves the map");
    }

    #[test]
    fn a_group_counts_each_value_once_while_its_count_is_positive() {
        let mut distinct = DistinctCounts::default();
        let mut changes = |updates: Vec<((u8, u8), isize)>| {
            let mut out = Vec::new();
            distinct.apply(updates, |c, d| out.push((c, d)));
            out.sort();
            out
        };
        assert_eq!(changes(vec![((1, 10), 1), ((1, 10), 1)]), vec![((1, 1), 1)]);
        assert_eq!(
            changes(vec![((1, 11), 1), ((2, 10), 1)]),
            vec![((1, 1), -1), ((1, 2), 1), ((2, 1), 1)]
        );
        // One of two copies of (1, 10) retracted: still one value of group 1.
        assert_eq!(changes(vec![((1, 10), -1)]), vec![]);
        assert_eq!(
            changes(vec![((1, 10), -1), ((1, 11), -1)]),
            vec![((1, 2), -1)]
        );
    }

    proptest! {
        /// The output, summed over times, is at every time the plain count of each group's
        /// values with a positive count, computed from the whole input so far, zeros absent.
        #[test]
        fn output_accumulates_to_the_plain_distinct_counts(
            times in prop::collection::vec(
                prop::collection::vec(((0u8..4, 0u8..5), -2isize..3), 0..12),
                1..20,
            )
        ) {
            let mut distinct = DistinctCounts::default();
            let mut plain: BTreeMap<(u8, u8), isize> = BTreeMap::new();
            let mut held: BTreeMap<(u8, i64), isize> = BTreeMap::new();
            for updates in times {
                for &(pair, d) in &updates {
                    *plain.entry(pair).or_default() += d;
                }
                distinct.apply(updates, |c, d| *held.entry(c).or_default() += d);
                held.retain(|_, d| *d != 0);
                let mut per_group: BTreeMap<u8, i64> = BTreeMap::new();
                for (&(g, _), &n) in &plain {
                    if n > 0 {
                        *per_group.entry(g).or_default() += 1;
                    }
                }
                let expected: BTreeMap<(u8, i64), isize> =
                    per_group.into_iter().map(|(g, n)| ((g, n), 1)).collect();
                prop_assert_eq!(&held, &expected);
            }
        }
    }

    #[test]
    fn a_negative_count_is_not_present_until_it_is_positive_again() {
        // Within a time a retraction may come before its addition.
        let mut counts = HashMap::new();
        assert_eq!(apply(&mut counts, 7, -1), None);
        assert_eq!(apply(&mut counts, 7, 1), None);
        assert!(counts.is_empty());
        assert_eq!(apply(&mut counts, 7, 2), Some((7, 1)));
        assert_eq!(apply(&mut counts, 7, -2), Some((7, -1)));
    }
}
