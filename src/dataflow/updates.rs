//! A short list of updates, kept consolidated as they come: for the few values one key
//! holds at a time (a view row's values within a commit, an IP group's members), where a
//! linear scan beats sorting the list later or hashing each value.

/// Adds `diff` copies of `item`: to its entry if it has one, dropping the entry when its
/// count reaches zero, otherwise as a new entry.
pub fn add_update<T: PartialEq>(updates: &mut Vec<(T, isize)>, item: T, diff: isize) {
    if diff == 0 {
        return;
    }
    match updates.iter().position(|(t, _)| *t == item) {
        Some(i) => {
            updates[i].1 += diff;
            if updates[i].1 == 0 {
                updates.swap_remove(i);
            }
        }
        None => updates.push((item, diff)),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// The list holds exactly the items whose differences do not sum to zero, with
        /// those sums: what consolidating all the updates at once gives.
        #[test]
        fn equals_consolidating_at_once(updates in prop::collection::vec((0u8..5, -2isize..3), 0..40)) {
            let mut list = Vec::new();
            let mut plain: BTreeMap<u8, isize> = BTreeMap::new();
            for &(item, diff) in &updates {
                add_update(&mut list, item, diff);
                *plain.entry(item).or_default() += diff;
            }
            list.sort();
            let expected: Vec<(u8, isize)> = plain.into_iter().filter(|(_, d)| *d != 0).collect();
            prop_assert_eq!(list, expected);
        }
    }
}
