//! `distinct` in place: each key once while its count is positive, from a hash map of
//! counts updated as times complete, not from an arrangement.
//!
//! Differential's `distinct_total` arranges its input: one update per record, sorted in
//! batches and merged again and again as the trace grows, to answer, for each key a time
//! changes, what its count was before. A hash map of counts answers the same in one lookup
//! and is changed in place; its size follows the live keys (a key whose count returns to
//! zero leaves). The output at every time is `distinct_total`'s. Views read it like any
//! collection, e.g. `dataflows/ad_hourly_users.rs`, whose `(ad, hour, user)` triples
//! are about one per counted click.

use std::hash::Hash;

use differential_dataflow::{ExchangeData, VecCollection};
use hashbrown::HashMap;
use prometheus_client::metrics::gauge::Gauge;

use super::pending::apply_complete_times;
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
