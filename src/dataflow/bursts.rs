//! The IP-burst rule in place: per `(IP, second of event time)` the impressions whose
//! counted on-time click falls in it; when there are more than the limit, all of them are
//! flagged.
//!
//! A `reduce` would keep every group's members in an input arrangement (one update per
//! on-time winner, the largest arrangement left once the dedup kept its state in place)
//! and rewrite its largest batch about once a horizon. This operator keeps the groups in a
//! hash map and updates them as times complete: the same output at every time, no merges.

use std::net::IpAddr;

use differential_dataflow::VecCollection;
use differential_dataflow::hashable::Hashable;
use hashbrown::HashMap;
use hashbrown::hash_map::Entry;
use prometheus_client::metrics::gauge::Gauge;

use super::classify::Click;
use super::pending::apply_complete_times_routed;
use super::updates::add_update;
use crate::time::Time;

/// An IP and a second of event time.
pub type Group = (IpAddr, u64);

/// The group of a counted click.
pub fn group_of(c: &Click) -> Group {
    (c.ip, c.event_time_ms / 1000)
}

/// An impression as two words: 8-byte alignment keeps a group's slot at 56 bytes (a
/// `u128` would align the slot to 16 and pad it to 64 or more).
type Imp = [u64; 2];

fn split(imp: u128) -> Imp {
    [(imp >> 64) as u64, imp as u64]
}

fn join([high, low]: Imp) -> u128 {
    (u128::from(high) << 64) | u128::from(low)
}

/// The impressions of one group, with their multiplicities. A counted click is one
/// impression once, and most groups hold one: that case needs no allocation.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Members {
    One(Imp),
    Many(Vec<(Imp, isize)>),
}

impl Members {
    fn iter(&self) -> impl Iterator<Item = (u128, isize)> + '_ {
        let (one, many) = match self {
            Members::One(imp) => (Some((join(*imp), 1)), None),
            Members::Many(all) => (None, Some(all.iter().map(|(imp, n)| (join(*imp), *n)))),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }
}

/// The members of a group the rule flags: all of them, when more than `max`.
fn flagged(members: Option<&Members>, max: u64) -> Vec<u128> {
    let Some(members) = members else {
        return Vec::new();
    };
    let count: isize = members.iter().map(|(_, n)| n).sum();
    if count <= isize::try_from(max).unwrap_or(isize::MAX) {
        return Vec::new();
    }
    members
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(imp, _)| imp)
        .collect()
}

/// The group with `diff` more copies of `imp`; `None` when it is left empty.
fn update(members: Option<Members>, imp: u128, diff: isize) -> Option<Members> {
    let mut all: Vec<(Imp, isize)> = match members {
        None if diff == 1 => return Some(Members::One(split(imp))),
        None => Vec::new(),
        Some(Members::One(one)) => vec![(one, 1)],
        Some(Members::Many(all)) => all,
    };
    add_update(&mut all, split(imp), diff);
    match all.as_slice() {
        [] => None,
        [(one, 1)] => Some(Members::One(*one)),
        _ => Some(Members::Many(all)),
    }
}

/// Impressions whose counted click shares its IP and second (`members`, see [`group_of`])
/// with more than `max` others'.
/// `held_back` counts the updates it holds back until their time is complete; `expected`
/// is how many groups to make room for before the first (at most one per impression).
pub fn ip_bursts<'s>(
    members: VecCollection<'s, Time, (Group, u128)>,
    max: u64,
    held_back: Gauge,
    expected: usize,
) -> VecCollection<'s, Time, u128> {
    let by_group = |(group, _): &(Group, u128)| group.hashed();
    // Reserved: grown from empty during a replay, the map's rehashing was 9% of a worker's
    // time in `bench/dataflow.rs` (most groups hold one impression, so it grows with them).
    let mut groups: HashMap<Group, Members> = HashMap::with_capacity(expected);
    apply_complete_times_routed(
        members,
        "IpBursts",
        by_group,
        held_back,
        move |mut updates, out| {
            updates.sort_unstable_by_key(|(member, _)| *member);
            for changes in updates.chunk_by(|a, b| a.0.0 == b.0.0) {
                let apply = |mut members: Option<Members>| {
                    for ((_, imp), diff) in changes {
                        members = update(members, *imp, *diff);
                    }
                    members
                };
                // One lookup per group and time: the entry is changed in place.
                let (before, after) = match groups.entry(changes[0].0.0) {
                    Entry::Occupied(group) => {
                        let before = flagged(Some(group.get()), max);
                        let mut after = Vec::new();
                        group.replace_entry_with(|_, members| {
                            let members = apply(Some(members));
                            after = flagged(members.as_ref(), max);
                            members
                        });
                        (before, after)
                    }
                    Entry::Vacant(group) => {
                        let members = apply(None);
                        let after = flagged(members.as_ref(), max);
                        if let Some(members) = members {
                            group.insert(members);
                        }
                        (Vec::new(), after)
                    }
                };
                if before != after {
                    out.extend(before.into_iter().map(|imp| (imp, -1)));
                    out.extend(after.into_iter().map(|imp| (imp, 1)));
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_flags_all_its_members_only_above_the_limit() {
        let mut members = update(None, 1, 1);
        assert_eq!(members, Some(Members::One(split(1))));
        members = update(members, 2, 1);
        assert!(flagged(members.as_ref(), 2).is_empty());
        members = update(members, 3, 1);
        let mut all = flagged(members.as_ref(), 2);
        all.sort_unstable();
        assert_eq!(all, [1, 2, 3]);
        members = update(members, 2, -1);
        assert!(flagged(members.as_ref(), 2).is_empty());
        members = update(members, 3, -1);
        assert_eq!(members, Some(Members::One(split(1))));
        assert_eq!(update(members, 1, -1), None);
    }

    #[test]
    fn impressions_keep_all_their_bits() {
        let imp = (7u128 << 100) | 42;
        assert_eq!(join(split(imp)), imp);
    }
}
