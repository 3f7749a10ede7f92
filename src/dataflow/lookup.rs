//! `join` in place, for a small side that rarely changes: the catalog.
//!
//! Differential's `join` arranges both inputs. The views join their rows with the ad
//! catalog (`ad_clicks` its counts, for the campaign and advertiser of each ad), and the
//! counts change a key at almost every tick: each change is a retraction and an addition
//! that the join's left arrangement sorts into a batch, merges again and again as the trace
//! grows, and holds for the catalog's sake, while the catalog itself changes when an ad is
//! created or moved. Here both sides live in hash maps updated as times complete: a left
//! update is one lookup of its key's right values, and a change of a key's right side
//! visits that key's left records. The output at every time is `join`'s.

use std::hash::Hash;

use differential_dataflow::hashable::Hashable;
use differential_dataflow::{AsCollection, ExchangeData, VecCollection};
use hashbrown::HashMap;
use hashbrown::hash_map::Entry;
use prometheus_client::metrics::gauge::Gauge;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;

use super::pending::Pending;
use super::updates::add_update;
use crate::time::Time;

/// What the operator emits: the joined records with their times and differences.
type JoinedOut<K, V, W> = CapacityContainerBuilder<Vec<((K, (V, W)), Time, isize)>>;

/// One side's update, held back until its time is complete.
enum Side<K, V, W> {
    Left(K, V, isize),
    Right(K, W, isize),
}

/// `left.join(right)`, with both sides' state in place; `held_back` counts the updates it
/// holds back until their time is complete.
pub fn join_in_place<'s, K, V, W>(
    left: VecCollection<'s, Time, (K, V)>,
    right: VecCollection<'s, Time, (K, W)>,
    held_back: Gauge,
) -> VecCollection<'s, Time, (K, (V, W))>
where
    K: ExchangeData + Hashable + Hash + Eq,
    V: ExchangeData + Hash + Eq,
    W: ExchangeData,
{
    // Both sides of a key meet on the worker differential's join would send them to.
    let by_key_left = Exchange::new(|((k, _), _, _): &((K, V), Time, isize)| k.hashed().into());
    let by_key_right = Exchange::new(|((k, _), _, _): &((K, W), Time, isize)| k.hashed().into());
    left.inner
        .binary_frontier::<_, JoinedOut<K, V, W>, _, _, _, _>(
            right.inner,
            by_key_left,
            by_key_right,
            "JoinInPlace",
            move |_capability, _info| {
                let mut pending: Pending<Side<K, V, W>> = Pending::new(held_back);
                let mut state = Joined::default();
                let mut out = Vec::new();
                move |(left, left_frontier), (right, right_frontier), output| {
                    left.for_each(|cap, data| {
                        let updates = data
                            .drain(..)
                            .map(|((k, v), t, d)| (t, Side::Left(k, v, d)));
                        pending.stash(&cap, updates);
                    });
                    right.for_each(|cap, data| {
                        let updates = data
                            .drain(..)
                            .map(|((k, w), t, d)| (t, Side::Right(k, w, d)));
                        pending.stash(&cap, updates);
                    });
                    let complete =
                        |t: &Time| !left_frontier.less_equal(t) && !right_frontier.less_equal(t);
                    pending.drain_complete(complete, |time, at, updates| {
                        state.apply(updates, |joined, diff| out.push((joined, time, diff)));
                        output.session(&at[0]).give_iterator(out.drain(..));
                    });
                }
            },
        )
        .as_collection()
}

/// Both sides' live records.
struct Joined<K, V, W> {
    /// Each key's live left records with their multiplicities, found by key when the
    /// right side of the key changes.
    left: HashMap<K, HashMap<V, isize>>,
    /// Each key's live right values: few per key (the catalog holds one).
    right: HashMap<K, Vec<(W, isize)>>,
    /// How many keys of `left` hold no record.
    empty: usize,
}

impl<K, V, W> Default for Joined<K, V, W> {
    fn default() -> Self {
        Joined {
            left: HashMap::new(),
            right: HashMap::new(),
            empty: 0,
        }
    }
}

impl<K, V, W> Joined<K, V, W>
where
    K: Hash + Eq + Clone,
    V: Hash + Eq + Clone,
    W: Clone + PartialEq,
{
    /// Applies the updates of one time; `emit` gets the join's output changes at it:
    /// the left as it was before the time against the right's changes, then the left's
    /// changes against the right as it is after them (`L x dR + dL x R'`).
    fn apply(&mut self, updates: Vec<Side<K, V, W>>, mut emit: impl FnMut((K, (V, W)), isize)) {
        let mut right_changes: HashMap<K, Vec<(W, isize)>> = HashMap::new();
        let mut left_changes = Vec::with_capacity(updates.len());
        for update in updates {
            match update {
                Side::Left(k, v, d) => left_changes.push((k, v, d)),
                Side::Right(k, w, d) => add_update(right_changes.entry(k).or_default(), w, d),
            }
        }
        for (k, changes) in right_changes {
            if let Some(records) = self.left.get(&k) {
                for (v, m) in records {
                    for (w, d) in &changes {
                        emit((k.clone(), (v.clone(), w.clone())), m * d);
                    }
                }
            }
            let values = self.right.entry(k.clone()).or_default();
            for (w, d) in changes {
                add_update(values, w, d);
            }
            if values.is_empty() {
                self.right.remove(&k);
            }
        }
        for (k, v, d) in left_changes {
            if d == 0 {
                continue;
            }
            if let Some(values) = self.right.get(&k) {
                for (w, n) in values {
                    emit((k.clone(), (v.clone(), w.clone())), d * n);
                }
            }
            let records = match self.left.entry(k) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => {
                    self.empty += 1;
                    e.insert(HashMap::new())
                }
            };
            let was_empty = records.is_empty();
            match records.entry(v) {
                Entry::Occupied(mut e) => {
                    *e.get_mut() += d;
                    if *e.get() == 0 {
                        e.remove();
                    }
                }
                Entry::Vacant(e) => {
                    e.insert(d);
                }
            }
            match (was_empty, records.is_empty()) {
                (true, false) => self.empty -= 1,
                (false, true) => self.empty += 1,
                _ => {}
            }
        }
        // A key whose records all left keeps its empty map for a while (a count's
        // retraction and addition at one time often come in that order); once such keys
        // are half of all, they go, so the state follows the live records.
        if self.empty > self.left.len() / 2 {
            self.left.retain(|_, records| !records.is_empty());
            self.empty = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    type Out = BTreeMap<(u8, (u8, u8)), isize>;

    /// The plain join of the two sides' accumulated multisets.
    fn plain_join(left: &BTreeMap<(u8, u8), isize>, right: &BTreeMap<(u8, u8), isize>) -> Out {
        let mut out = Out::new();
        for (&(k, v), &m) in left {
            for (&(k2, w), &n) in right {
                if k == k2 && m * n != 0 {
                    *out.entry((k, (v, w))).or_default() += m * n;
                }
            }
        }
        out.retain(|_, d| *d != 0);
        out
    }

    fn side() -> impl Strategy<Value = (bool, u8, u8, isize)> {
        (any::<bool>(), 0u8..3, 0u8..3, -2isize..3)
    }

    proptest! {
        /// The output, accumulated over times, is the plain join of the inputs accumulated
        /// over the same times, at every time: what differential's `join` holds.
        #[test]
        fn output_accumulates_to_the_plain_join(
            times in prop::collection::vec(prop::collection::vec(side(), 0..10), 1..15)
        ) {
            let mut state: Joined<u8, u8, u8> = Joined::default();
            let (mut left, mut right) = (BTreeMap::new(), BTreeMap::new());
            let mut held = Out::new();
            for updates in times {
                let mut sides = Vec::new();
                for &(is_left, k, x, d) in &updates {
                    let whole = if is_left { &mut left } else { &mut right };
                    *whole.entry((k, x)).or_insert(0) += d;
                    sides.push(if is_left { Side::Left(k, x, d) } else { Side::Right(k, x, d) });
                }
                left.retain(|_, d: &mut isize| *d != 0);
                right.retain(|_, d: &mut isize| *d != 0);
                state.apply(sides, |joined, diff| *held.entry(joined).or_default() += diff);
                held.retain(|_, d| *d != 0);
                prop_assert_eq!(&held, &plain_join(&left, &right));
            }
        }
    }

    #[test]
    fn a_catalog_change_moves_every_live_row_of_its_key() {
        let mut state: Joined<u8, u8, u8> = Joined::default();
        let mut out = Vec::new();
        state.apply(
            vec![
                Side::Right(1, 10, 1),
                Side::Left(1, 5, 1),
                Side::Left(2, 6, 1),
            ],
            |j, d| out.push((j, d)),
        );
        assert_eq!(out, vec![((1, (5, 10)), 1)], "key 2 has no right value yet");
        out.clear();
        state.apply(
            vec![Side::Right(1, 10, -1), Side::Right(1, 11, 1)],
            |j, d| out.push((j, d)),
        );
        out.sort();
        assert_eq!(out, vec![((1, (5, 10)), -1), ((1, (5, 11)), 1)]);
    }
}
