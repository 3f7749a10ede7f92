//! The IP-burst rule in place: per `(IP, second of event time)` the impressions whose
//! counted on-time click falls in it; when there are more than the limit, all of them are
//! flagged.
//!
//! A `reduce` would keep every group's members in an input arrangement (one update per
//! on-time winner, the largest arrangement left once the dedup kept its state in place)
//! and rewrite its largest batch about once a horizon. This operator keeps the groups in a
//! small hash map per second and updates them as times complete: the same output at every
//! time, no merges.

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

/// The groups of one second of event time, by IP.
type Second = HashMap<IpAddr, Members>;

/// Impressions whose counted click shares its IP and second (`members`, see [`group_of`])
/// with more than `max` others'.
/// `held_back` counts the updates it holds back until their time is complete.
pub fn ip_bursts<'s>(
    members: VecCollection<'s, Time, (Group, u128)>,
    max: u64,
    held_back: Gauge,
) -> VecCollection<'s, Time, u128> {
    let by_group = |(group, _): &(Group, u128)| group.hashed();
    // One small map per second rather than one map of every group: clicks arrive close to
    // their event time, so the seconds a time touches are few and their maps stay in
    // cache, where one map of millions of groups took a cache miss per click (the rule was
    // 16% of a worker in `bench/dataflow.rs`). A second's map leaves when its last member
    // expires.
    let mut seconds: HashMap<u64, Second> = HashMap::new();
    apply_complete_times_routed(
        members,
        "IpBursts",
        by_group,
        held_back,
        move |mut updates, out| {
            // Sorted only so that each group's changes are adjacent; integers compare
            // faster than `IpAddr`s, and the impression's order does not matter.
            updates.sort_unstable_by_key(|(((ip, second), _), _)| (*second, ip_bits(ip)));
            for same_second in updates.chunk_by(|a, b| a.0.0.1 == b.0.0.1) {
                let second = same_second[0].0.0.1;
                let groups = seconds.entry(second).or_default();
                for changes in same_second.chunk_by(|a, b| a.0.0.0 == b.0.0.0) {
                    apply_group(groups, changes, max, out);
                }
                if groups.is_empty() {
                    seconds.remove(&second);
                }
            }
        },
    )
}

/// An IP as one integer, to sort by. An IPv4 address and the IPv6 address `::a.b.c.d`
/// share one, which only splits their changes into more runs of one IP: [`apply_group`]
/// applies each run in turn, and the output is the same.
fn ip_bits(ip: &IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(v4.to_bits()),
        IpAddr::V6(v6) => v6.to_bits(),
    }
}

/// Applies a run of one group's changes of a time (one IP and second; all of them but
/// where [`ip_bits`] splits them) and emits the change of its flagged members. One lookup
/// per run: the entry is changed in place.
fn apply_group(
    groups: &mut Second,
    changes: &[((Group, u128), isize)],
    max: u64,
    out: &mut Vec<(u128, isize)>,
) {
    let apply = |mut members: Option<Members>| {
        for ((_, imp), diff) in changes {
            members = update(members, *imp, *diff);
        }
        members
    };
    let (before, after) = match groups.entry(changes[0].0.0.0) {
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
    // Nearly every group is under the limit before and after, so both lists are empty:
    // compared as slices, two empty `Vec`s went to `memcmp` with dangling pointers, and
    // glibc's AVX-512 `memcmp` masks its load of zero bytes from them, which on Intel
    // costs a microcode assist each time (5% of a worker's samples under perf with 2
    // workers, bench/README.md, session 33).
    if (before.is_empty() && after.is_empty()) || before == after {
        return;
    }
    out.extend(before.into_iter().map(|imp| (imp, -1)));
    out.extend(after.into_iter().map(|imp| (imp, 1)));
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

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
    fn an_ipv4_address_and_its_ipv6_compatible_form_share_a_sort_key() {
        let v4 = Ipv4Addr::new(10, 0, 0, 0);
        assert_eq!(
            ip_bits(&IpAddr::V4(v4)),
            ip_bits(&IpAddr::V6(v4.to_ipv6_compatible()))
        );
        assert_ne!(IpAddr::V4(v4), IpAddr::V6(v4.to_ipv6_compatible()));
    }

    #[test]
    fn impressions_keep_all_their_bits() {
        let imp = (7u128 << 100) | 42;
        assert_eq!(join(split(imp)), imp);
    }
}

#[cfg(test)]
mod operator_tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::net::Ipv4Addr;
    use std::sync::{Arc, Mutex};

    use differential_dataflow::AsCollection;
    use proptest::prelude::*;
    use timely::dataflow::operators::capture::{Capture, Extract};
    use timely::dataflow::operators::vec::unordered_input::UnorderedInput;

    use super::*;

    const MAX: u64 = 2;

    /// Every output update of [`ip_bursts`] for `updates`, run to completion.
    fn run(updates: Vec<((Group, u128), Time, isize)>) -> Vec<(u128, Time, isize)> {
        let (send, recv) = std::sync::mpsc::channel();
        let send = Mutex::new(send);
        let updates = Arc::new(Mutex::new(Some(updates)));
        timely::execute_directly(move |worker| {
            let send = send.lock().map(|s| s.clone()).expect("sender");
            let (mut input, capability) = worker.dataflow::<Time, _, _>(|scope| {
                let ((input, capability), stream) =
                    scope.new_unordered_input::<((Group, u128), Time, isize)>();
                ip_bursts(stream.as_collection(), MAX, Gauge::default())
                    .inner
                    .capture_into(send);
                (input, capability)
            });
            let updates = updates.lock().map(|mut u| u.take()).expect("updates");
            input
                .activate()
                .session(&capability)
                .give_iterator(updates.unwrap_or_default().into_iter());
            drop(capability);
        });
        recv.extract().into_iter().flat_map(|(_, b)| b).collect()
    }

    proptest! {
        /// At every time the flagged impressions are exactly those of the groups that the
        /// live members at that time put over the limit: a plain recount of every group,
        /// against the operator's per-second maps changed in place. Every member leaves
        /// again, so the last time must flag nothing. IP 3 is the IPv6 address that sorts
        /// as IP 0 does (`::10.0.0.0`), so their changes interleave.
        #[test]
        fn flags_equal_a_recount_of_the_live_groups(
            members in prop::collection::vec((0u8..4, 0u64..3, 0u64..6, 1u64..6), 0..40)
        ) {
            let members: Vec<(Group, u128, Time, Time)> = members
                .into_iter()
                .enumerate()
                .map(|(i, (ip, second, added, lives))| {
                    let ip = match ip {
                        3 => IpAddr::V6(Ipv4Addr::new(10, 0, 0, 0).to_ipv6_compatible()),
                        n => IpAddr::V4(Ipv4Addr::new(10, 0, 0, n)),
                    };
                    ((ip, second), i as u128, added, added + lives)
                })
                .collect();
            let updates = members
                .iter()
                .flat_map(|&(g, imp, added, removed)| [((g, imp), added, 1), ((g, imp), removed, -1)])
                .collect();
            let output = run(updates);
            for at in 0..=12 {
                let mut groups: BTreeMap<Group, Vec<u128>> = BTreeMap::new();
                for &(g, imp, added, removed) in &members {
                    if added <= at && at < removed {
                        groups.entry(g).or_default().push(imp);
                    }
                }
                let expected: BTreeSet<u128> = groups
                    .into_values()
                    .filter(|imps| imps.len() as u64 > MAX)
                    .flatten()
                    .collect();
                let mut got: BTreeMap<u128, isize> = BTreeMap::new();
                for &(imp, time, diff) in &output {
                    if time <= at {
                        *got.entry(imp).or_default() += diff;
                    }
                }
                got.retain(|_, n| *n != 0);
                prop_assert!(got.values().all(|n| *n == 1), "each flagged once at {at}: {got:?}");
                let got: BTreeSet<u128> = got.into_keys().collect();
                prop_assert_eq!(got, expected, "flagged at {}", at);
            }
        }
    }
}
