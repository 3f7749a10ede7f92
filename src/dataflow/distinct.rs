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
use hashbrown::hash_map::Entry;
use prometheus_client::metrics::gauge::Gauge;

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

/// Per group, the count of each of its values, and how many of them are positive.
///
/// Nested by group rather than one map of `(group, value)` pairs: the pairs' one table
/// grew to hundreds of megabytes, and its rehashing as it grew was 11% of a worker in
/// `bench/dataflow.rs` (each doubling moves every pair, out of cache). A group's own table
/// is small, and the busy groups' tables stay in cache; a group's count is kept beside
/// its values, so a change costs no second map.
struct DistinctCounts<G, V> {
    groups: HashMap<G, Group<V>>,
    /// Groups changed in the current time, to emit each one's change once.
    touched: Vec<G>,
}

/// One group's values and the number of them with a positive count.
struct Group<V> {
    values: HashMap<V, isize>,
    present: i64,
    /// `present` before the current time, once the time has changed the group.
    before: Option<i64>,
}

impl<G, V> Default for DistinctCounts<G, V> {
    fn default() -> Self {
        DistinctCounts {
            groups: HashMap::new(),
            touched: Vec::new(),
        }
    }
}

impl<G: Hash + Eq + Clone, V: Hash + Eq + Clone> DistinctCounts<G, V> {
    /// Applies the updates of one time; `emit` gets `((group, old count), -1)` and
    /// `((group, new count), +1)` for every group whose count changed, leaving out zeros.
    fn apply(&mut self, updates: Vec<((G, V), isize)>, mut emit: impl FnMut((G, i64), isize)) {
        for ((group, value), diff) in updates {
            let g = match self.groups.entry(group) {
                Entry::Occupied(e) => {
                    if e.get().before.is_none() {
                        self.touched.push(e.key().clone());
                    }
                    e.into_mut()
                }
                Entry::Vacant(e) => {
                    self.touched.push(e.key().clone());
                    e.insert(Group {
                        values: HashMap::new(),
                        present: 0,
                        before: None,
                    })
                }
            };
            // The count before this time, kept at the group's first update in it.
            g.before.get_or_insert(g.present);
            if let Some(change) = change_count(&mut g.values, value, diff) {
                g.present += change as i64;
            }
        }
        for group in self.touched.drain(..) {
            let Some(g) = self.groups.get_mut(&group) else {
                continue;
            };
            let before = g.before.take().unwrap_or(g.present);
            let after = g.present;
            if g.values.is_empty() {
                self.groups.remove(&group);
            }
            if before == after {
                continue;
            }
            if before != 0 {
                emit((group.clone(), before), -1);
            }
            if after != 0 {
                emit((group, after), 1);
            }
        }
    }
}

/// Adds `diff` to the count of `key`; the key with `+1` when it appears, `-1` when it
/// leaves.
fn apply<K: Hash + Eq + Clone>(
    counts: &mut HashMap<K, isize>,
    key: K,
    diff: isize,
) -> Option<(K, isize)> {
    let change = change_count(counts, key.clone(), diff)?;
    Some((key, change))
}

/// Adds `diff` to the count of `key`: `+1` when the key appears, `-1` when it leaves. A
/// key whose count returns to zero leaves the map.
fn change_count<K: Hash + Eq>(
    counts: &mut HashMap<K, isize>,
    key: K,
    diff: isize,
) -> Option<isize> {
    match counts.entry(key) {
        Entry::Occupied(mut e) => {
            let before = *e.get() > 0;
            *e.get_mut() += diff;
            let after = *e.get() > 0;
            if *e.get() == 0 {
                e.remove();
            }
            (before != after).then_some(if after { 1 } else { -1 })
        }
        Entry::Vacant(e) => {
            if diff != 0 {
                e.insert(diff);
            }
            (diff > 0).then_some(1)
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
                // State follows the live pairs: a group whose counts are all zero leaves.
                let live_groups: std::collections::BTreeSet<u8> =
                    plain.iter().filter(|(_, n)| **n != 0).map(|((g, _), _)| *g).collect();
                let kept: std::collections::BTreeSet<u8> = distinct.groups.keys().copied().collect();
                prop_assert_eq!(kept, live_groups);
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
