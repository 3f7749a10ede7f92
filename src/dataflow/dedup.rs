//! The dedup: per impression, the click that counts, kept in place.
//!
//! A `reduce` would keep every live copy of every click twice: once in its input
//! arrangement and once, for the winner, in its output. The input arrangement is the
//! largest state of the dataflow, and differential rewrites its biggest batch about once
//! a horizon, holding both inputs and the output while it merges; that is the sawtooth the
//! soak benchmark measured in RSS. The dedup needs far less: the winner of each
//! impression and how many identical copies of it are live. So it keeps that in a hash
//! map, updated in place as times complete, the way Materialize's upsert operator keeps
//! its state, and emits the winner's changes as a collection. The fraud join
//! ([`FirstClicks::classify_on_time`]) reads the same map, so no arrangement holds the
//! winners either.
//!
//! What it forgets are the losers. A `reduce` promotes the next-best live copy when the
//! winner expires; this operator drops the impression instead. The horizon makes the two
//! the same wherever the sink can see it: a winner expires a horizon after its record
//! time, when every window a copy of its impression could count in is final (the copies of
//! one impression arrive within one TTL, and `horizon >= 2 x TTL + correction + window`,
//! see `docs/design-notes.md`), and the sink stores no change to a final window.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::rc::Rc;

use differential_dataflow::hashable::Hashable;
use differential_dataflow::{AsCollection, VecCollection};
use hashbrown::{DefaultHashBuilder, HashTable};
use prometheus_client::metrics::gauge::Gauge;
use timely::dataflow::Stream;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::Capability;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;

use super::StateGauges;
use super::bursts::{Group, group_of};
use super::classify::Click;
use super::demux::Out;
use super::packed::{ClickRef, PackedClicks};
use super::pending::Pending;
use crate::time::Time;
use crate::views::{ClassifiedClick, ClickClass};

/// The dedup's output: the changes of each impression's winner, split by what reads
/// them, and the winners themselves, which [`FirstClicks::classify_on_time`] reads in
/// place of an arrangement.
///
/// The split is made where the changes arise: a stream with several consumers is copied
/// for all but one of them, and a winner's click is the largest record of the dataflow.
pub struct FirstClicks<'s> {
    /// Winners that were on time, for the fraud join.
    pub on_time: VecCollection<'s, Time, Click>,
    /// Winners no copy of which arrived on time: counted as late.
    pub late: VecCollection<'s, Time, ClassifiedClick>,
    /// The IP-burst group of each on-time winner (see [`super::bursts`]).
    pub burst_keys: VecCollection<'s, Time, (Group, u128)>,
    winners: Rc<RefCell<Winners>>,
    pending_updates: Gauge,
}

/// One change of an impression's winner: `((impression, (on time, click)), time, diff)`.
pub type WinnerUpdate = ((u128, (bool, Click)), Time, isize);

/// Whether a slot is the one of `imp`, for lookups in the table of [`Winners`].
fn slot_of(clicks: &PackedClicks, imp: u128) -> impl Fn(&ClickRef) -> bool + '_ {
    move |at| clicks.impression(*at) == imp
}

/// Whether `(a, a_on_time)` beats `(b, b_on_time)`: on time before late, then the earliest
/// event time, then the smallest click id. The last resort, the whole click, makes the
/// order total, so the winner never depends on arrival order.
fn beats(a: &Click, a_on_time: bool, b: &Click, b_on_time: bool) -> bool {
    (!a_on_time, a.event_time_ms, &a.click_id, a) < (!b_on_time, b.event_time_ms, &b.click_id, b)
}

/// The winners of the impressions one worker owns.
///
/// The clicks are packed (see [`super::packed`]: about 30 bytes each in the standard
/// workload, every field kept) and a hash table of 8-byte references finds them by
/// impression: no per-entry allocation and no batch to merge. Whether a winner is on time
/// is not stored; it follows from the click.
#[derive(Debug, Default)]
pub struct Winners {
    lateness_ms: u64,
    hasher: DefaultHashBuilder,
    slots: HashTable<ClickRef>,
    clicks: PackedClicks,
}

impl Winners {
    /// No winners yet; clicks later than `lateness_ms` are late.
    pub fn new(lateness_ms: u64) -> Winners {
        Winners::with_capacity(lateness_ms, 0)
    }

    /// No winners yet, with room for `impressions` of them: a replay that fills the table
    /// from empty otherwise grows it a dozen times, and each growth reads every packed
    /// winner's impression again to hash it (a quarter of the dedup's time in
    /// `bench/dataflow.rs`).
    pub fn with_capacity(lateness_ms: u64, impressions: usize) -> Winners {
        Winners {
            lateness_ms,
            slots: HashTable::with_capacity(impressions),
            ..Winners::default()
        }
    }

    /// How many impressions have a winner.
    pub fn len(&self) -> usize {
        self.clicks.len()
    }

    /// Whether no impression has a winner.
    pub fn is_empty(&self) -> bool {
        self.clicks.is_empty()
    }

    /// The winner of `imp` and whether it was on time.
    pub fn get(&self, imp: u128) -> Option<(bool, Click)> {
        let hash = self.hasher.hash_one(imp);
        self.slots.find(hash, slot_of(&self.clicks, imp)).map(|at| {
            let click = self.clicks.get(*at);
            (click.on_time(self.lateness_ms), click)
        })
    }

    /// Applies the clicks (`+`) and expiries (`-`) of one completed time and hands each
    /// change of a winner to `emit`. Expiries go first: a click that arrives in the tick
    /// its impression's winner expires then starts the impression afresh.
    pub fn apply(
        &mut self,
        time: Time,
        mut updates: Vec<(Click, isize)>,
        mut emit: impl FnMut(WinnerUpdate),
    ) {
        updates.sort_unstable_by_key(|(_, diff)| *diff);
        for (click, diff) in updates {
            let copies = u32::try_from(diff.unsigned_abs()).unwrap_or(u32::MAX);
            if diff < 0 {
                self.expire(time, &click, copies, &mut emit);
            } else if diff > 0 {
                self.insert(time, click, copies, &mut emit);
            }
        }
    }

    fn output(lateness_ms: u64, click: Click) -> (u128, (bool, Click)) {
        (click.impression_id, (click.on_time(lateness_ms), click))
    }

    fn insert(
        &mut self,
        time: Time,
        click: Click,
        copies: u32,
        emit: &mut impl FnMut(WinnerUpdate),
    ) {
        let imp = click.impression_id;
        let hash = self.hasher.hash_one(imp);
        let Winners {
            slots,
            clicks,
            hasher,
            lateness_ms,
        } = self;
        let lateness_ms = *lateness_ms;
        let Some(slot) = slots.find_mut(hash, slot_of(clicks, imp)) else {
            let at = clicks.push(&click, copies);
            emit((Self::output(lateness_ms, click), time, 1));
            slots.insert_unique(hash, at, |at| hasher.hash_one(clicks.impression(*at)));
            return;
        };
        let at = *slot;
        let winner = clicks.get(at);
        if winner == click {
            clicks.set_copies(at, clicks.copies(at).saturating_add(copies));
        } else if beats(
            &click,
            click.on_time(lateness_ms),
            &winner,
            winner.on_time(lateness_ms),
        ) {
            *slot = clicks.push(&click, copies);
            clicks.remove(at, |moved, from, to| {
                relocate(slots, hasher, moved, from, to)
            });
            emit((Self::output(lateness_ms, winner), time, -1));
            emit((Self::output(lateness_ms, click), time, 1));
        }
    }

    fn expire(
        &mut self,
        time: Time,
        click: &Click,
        copies: u32,
        emit: &mut impl FnMut(WinnerUpdate),
    ) {
        let imp = click.impression_id;
        let hash = self.hasher.hash_one(imp);
        let Winners {
            slots,
            clicks,
            hasher,
            lateness_ms,
        } = self;
        // Only the winner's own copies matter: a loser leaves nothing behind.
        let Ok(entry) = slots.find_entry(hash, slot_of(clicks, imp)) else {
            return;
        };
        let at = *entry.get();
        if !clicks.holds(at, click) {
            return;
        }
        let left = clicks.copies(at).saturating_sub(copies);
        if left > 0 {
            clicks.set_copies(at, left);
            return;
        }
        entry.remove();
        clicks.remove(at, |moved, from, to| {
            relocate(slots, hasher, moved, from, to)
        });
        emit((Self::output(*lateness_ms, click.clone()), time, -1));
    }
}

/// Points the slot of `imp` from `from` to `to`, where the packed clicks moved it.
fn relocate(
    slots: &mut HashTable<ClickRef>,
    hasher: &DefaultHashBuilder,
    imp: u128,
    from: ClickRef,
    to: ClickRef,
) {
    if let Some(at) = slots.find_mut(hasher.hash_one(imp), |at| *at == from) {
        *at = to;
    }
}

/// Per impression, the click that counts, and whether it was on time: the dedup.
/// `state` reports the impressions it holds and the updates it holds back, and says how
/// many this worker should make room for.
pub fn first_clicks<'s>(
    clicks: VecCollection<'s, Time, Click>,
    lateness_ms: u64,
    state: StateGauges,
) -> FirstClicks<'s> {
    let StateGauges {
        dedup_impressions,
        pending_updates,
        expected_impressions,
    } = state;
    let held_back = pending_updates.clone();
    let winners = Rc::new(RefCell::new(Winners::with_capacity(
        lateness_ms,
        expected_impressions,
    )));
    let state = Rc::clone(&winners);
    // The same hash as differential's exchanges by impression, so the flags the fraud
    // join receives come to the worker that holds their impression's winner.
    let by_impression = Exchange::new(|(c, _, _): &(Click, Time, isize)| c.impression_id.hashed());
    let mut builder = OperatorBuilder::new("Dedup".to_owned(), clicks.inner.scope());
    let mut input = builder.new_input(clicks.inner, by_impression);
    let (on_time_out, on_time) = builder.new_output();
    let (late_out, late) = builder.new_output();
    let (bursts_out, burst_keys) = builder.new_output();
    let mut on_time_out: Out<Click> = OutputBuilder::from(on_time_out);
    let mut late_out: Out<ClassifiedClick> = OutputBuilder::from(late_out);
    let mut bursts_out: Out<(Group, u128)> = OutputBuilder::from(bursts_out);
    builder.build(move |_initial_capabilities| {
        let mut pending: Pending<(Click, isize)> = Pending::with_outputs(pending_updates, 3);
        let mut reported = 0i64;
        move |frontiers| {
            input.for_each(|cap, data| {
                let updates = data.drain(..).map(|(click, t, diff)| (t, (click, diff)));
                pending.stash(&cap, updates);
            });
            let (mut on_time, mut late, mut bursts) = (
                on_time_out.activate(),
                late_out.activate(),
                bursts_out.activate(),
            );
            let mut winners = state.borrow_mut();
            let complete = |t: &Time| !frontiers[0].less_equal(t);
            pending.drain_complete(complete, |time, caps, updates| {
                let (mut on_time, mut late, mut bursts) = (
                    on_time.session(&caps[0]),
                    late.session(&caps[1]),
                    bursts.session(&caps[2]),
                );
                winners.apply(time, updates, |((imp, (was_on_time, click)), t, diff)| {
                    if was_on_time {
                        bursts.give(((group_of(&click), imp), t, diff));
                        on_time.give((click, t, diff));
                    } else {
                        late.give((click.classified(ClickClass::Late), t, diff));
                    }
                });
            });
            let now = winners.len() as i64;
            dedup_impressions.inc_by(now - reported);
            reported = now;
        }
    });
    FirstClicks {
        on_time: on_time.as_collection(),
        late: late.as_collection(),
        burst_keys: burst_keys.as_collection(),
        winners,
        pending_updates: held_back,
    }
}

/// A change of an on-time winner as the fraud join receives it.
type Change = (Click, isize);

/// The on-time winners of `imps` as of the time before the `later` changes: the dedup's
/// winners now, with the on-time changes of later times undone, the last first.
///
/// The dedup's late changes are not among them, and need not be: the first on-time change
/// of an impression after the time says what its on-time winner was then (a retraction:
/// that click; an addition: none), and with no on-time change after it, whether its
/// winner was on time has not changed since.
fn on_time_winners_before<'a>(
    winners: &Winners,
    later: impl DoubleEndedIterator<Item = &'a Change>,
    imps: impl Iterator<Item = u128>,
) -> HashMap<u128, Option<Click>> {
    let mut at: HashMap<u128, Option<Click>> = imps
        .map(|imp| {
            let on_time = winners.get(imp).filter(|(on, _)| *on);
            (imp, on_time.map(|(_, c)| c))
        })
        .collect();
    for (click, diff) in later.rev() {
        if let Some(winner) = at.get_mut(&click.impression_id) {
            *winner = (*diff < 0).then(|| click.clone());
        }
    }
    at
}

/// The billable and fraud clicks: on-time winners, unflagged and flagged.
pub struct OnTimeClasses<'s> {
    /// On-time winners of impressions not flagged.
    pub billable: VecCollection<'s, Time, ClassifiedClick>,
    /// On-time winners of flagged impressions.
    pub fraud: VecCollection<'s, Time, ClassifiedClick>,
}

impl<'s> FirstClicks<'s> {
    /// The on-time winners classified by `flagged` (each impression at most once): a
    /// differential join (`Δwinners x flagged + winners' x Δflagged`) that reads the
    /// dedup's winners in place instead of an arrangement of them, and hands each change
    /// to billable or fraud (billable is on time minus flagged).
    ///
    /// It runs on the worker that holds the winners, after the dedup in each of its
    /// activations, so the dedup's map is ahead of the time being joined by exactly the
    /// changes this operator has received and not yet applied; undoing those gives the
    /// winners as of that time.
    pub fn classify_on_time(&self, flagged: VecCollection<'s, Time, u128>) -> OnTimeClasses<'s> {
        let winners = Rc::clone(&self.winners);
        let held = self.pending_updates.clone();
        let by_impression = Exchange::new(|(imp, _, _): &(u128, Time, isize)| imp.hashed());
        let mut builder = OperatorBuilder::new("FraudJoin".to_owned(), self.on_time.inner.scope());
        let mut input1 = builder.new_input(self.on_time.inner.clone(), Pipeline);
        let mut input2 = builder.new_input(flagged.inner, by_impression);
        let (billable_out, billable): (_, Stream<'s, Time, _>) = builder.new_output();
        let (fraud_out, fraud): (_, Stream<'s, Time, _>) = builder.new_output();
        let mut billable_out: Out<ClassifiedClick> = OutputBuilder::from(billable_out);
        let mut fraud_out: Out<ClassifiedClick> = OutputBuilder::from(fraud_out);
        builder.build(move |_initial_capabilities| {
            let mut changes: Pending<Change> = Pending::with_outputs(held.clone(), 2);
            let mut flags: Pending<(u128, isize)> = Pending::with_outputs(held, 2);
            let mut flagged: HashMap<u128, isize> = HashMap::new();
            move |frontiers| {
                input1.for_each(|cap, data| {
                    changes.stash(&cap, data.drain(..).map(|(c, t, r)| (t, (c, r))));
                });
                input2.for_each(|cap, data| {
                    flags.stash(&cap, data.drain(..).map(|(imp, t, r)| (t, (imp, r))));
                });
                let (mut billable, mut fraud) = (billable_out.activate(), fraud_out.activate());
                let complete =
                    |t: &Time| !frontiers[0].less_equal(t) && !frontiers[1].less_equal(t);
                // One set of capabilities, at the first time completed, for every time
                // completed in this activation (see `Pending::drain_complete`).
                let mut at: Option<Vec<Capability<Time>>> = None;
                while let Some(next) = changes.earliest().into_iter().chain(flags.earliest()).min()
                    && complete(&next)
                {
                    if at.is_none() {
                        at = changes
                            .capabilities_for(next)
                            .or_else(|| flags.capabilities_for(next));
                    }
                    let Some(caps) = at.as_deref() else {
                        break;
                    };
                    let mut billable = billable.session(&caps[0]);
                    let mut fraud = fraud.session(&caps[1]);
                    // New winners against the flags before this time.
                    for (click, diff) in changes.take(next) {
                        let n = flagged.get(&click.impression_id).copied().unwrap_or(0);
                        if n != 0 {
                            fraud.give((
                                click.clone().classified(ClickClass::Fraud),
                                next,
                                diff * n,
                            ));
                        }
                        if n != 1 {
                            billable.give((
                                click.classified(ClickClass::Billable),
                                next,
                                diff * (1 - n),
                            ));
                        }
                    }
                    // New flags against the winners as of this time.
                    let mut delta: HashMap<u128, isize> = HashMap::new();
                    for (imp, diff) in flags.take(next) {
                        *delta.entry(imp).or_default() += diff;
                    }
                    delta.retain(|_, d| *d != 0);
                    if delta.is_empty() {
                        continue;
                    }
                    let mut current = on_time_winners_before(
                        &winners.borrow(),
                        changes.after(next),
                        delta.keys().copied(),
                    );
                    for (imp, diff) in delta {
                        if let Some(Some(click)) = current.remove(&imp) {
                            fraud.give((click.clone().classified(ClickClass::Fraud), next, diff));
                            billable.give((click.classified(ClickClass::Billable), next, -diff));
                        }
                        let n = flagged.entry(imp).or_default();
                        *n += diff;
                        if *n == 0 {
                            flagged.remove(&imp);
                        }
                    }
                }
                changes.settle();
                flags.settle();
            }
        });
        OnTimeClasses {
            billable: billable.as_collection(),
            fraud: fraud.as_collection(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use smol_str::SmolStr;

    use super::*;

    fn click(imp: u128, event: u64, record: u64, id: &str) -> Click {
        Click {
            impression_id: imp,
            ad_id: 7,
            event_time_ms: event,
            record_time_ms: record,
            click_id: SmolStr::from(id),
            user_id: SmolStr::from("u"),
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            cpc_micros: 1,
        }
    }

    fn apply(
        w: &mut Winners,
        time: Time,
        updates: &[(Click, isize)],
    ) -> Vec<(bool, String, isize)> {
        let mut out = Vec::new();
        w.apply(time, updates.to_vec(), |((_, (on, c)), t, d)| {
            assert_eq!(t, time);
            out.push((on, c.click_id.to_string(), d));
        });
        out
    }

    #[test]
    fn an_earlier_copy_takes_over_and_a_later_one_is_dropped() {
        let mut w = Winners::new(1_000);
        assert_eq!(
            apply(&mut w, 10, &[(click(1, 500, 600, "b"), 1)]),
            [(true, "b".into(), 1)]
        );
        assert_eq!(apply(&mut w, 20, &[(click(1, 700, 800, "c"), 1)]), []);
        assert_eq!(
            apply(&mut w, 30, &[(click(1, 400, 900, "a"), 1)]),
            [(true, "b".into(), -1), (true, "a".into(), 1)]
        );
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn equal_event_times_go_to_the_smaller_click_id() {
        let mut w = Winners::new(1_000);
        apply(&mut w, 10, &[(click(1, 500, 600, "y"), 1)]);
        assert_eq!(
            apply(&mut w, 20, &[(click(1, 500, 700, "x"), 1)]),
            [(true, "y".into(), -1), (true, "x".into(), 1)]
        );
        assert_eq!(apply(&mut w, 30, &[(click(1, 500, 800, "z"), 1)]), []);
    }

    #[test]
    fn an_on_time_copy_beats_an_earlier_late_one() {
        let mut w = Winners::new(1_000);
        assert_eq!(
            apply(&mut w, 10, &[(click(1, 100, 5_000, "a"), 1)]),
            [(false, "a".into(), 1)]
        );
        assert_eq!(
            apply(&mut w, 20, &[(click(1, 4_500, 5_100, "b"), 1)]),
            [(false, "a".into(), -1), (true, "b".into(), 1)]
        );
    }

    #[test]
    fn only_the_winners_expiry_removes_the_impression() {
        let mut w = Winners::new(1_000);
        let (first, second) = (click(1, 500, 600, "a"), click(1, 700, 800, "b"));
        apply(&mut w, 10, &[(first.clone(), 1), (second.clone(), 1)]);
        assert_eq!(apply(&mut w, 90, &[(second, -1)]), []);
        assert_eq!(w.len(), 1);
        assert_eq!(apply(&mut w, 100, &[(first, -1)]), [(true, "a".into(), -1)]);
        assert!(w.is_empty());
    }

    #[test]
    fn identical_copies_leave_with_their_last_expiry() {
        let mut w = Winners::new(1_000);
        let c = click(1, 500, 600, "a");
        apply(&mut w, 10, &[(c.clone(), 1), (c.clone(), 1)]);
        assert_eq!(apply(&mut w, 90, &[(c.clone(), -1)]), []);
        assert_eq!(apply(&mut w, 91, &[(c, -1)]), [(true, "a".into(), -1)]);
        assert!(w.is_empty());
    }

    #[test]
    fn a_click_in_the_tick_its_winner_expires_starts_afresh() {
        let mut w = Winners::new(1_000);
        let (old, new) = (click(1, 100, 200, "a"), click(1, 5_000, 5_200, "b"));
        apply(&mut w, 10, &[(old.clone(), 1)]);
        assert_eq!(
            apply(&mut w, 90, &[(new, 1), (old, -1)]),
            [(true, "a".into(), -1), (true, "b".into(), 1)]
        );
    }

    #[test]
    fn the_winner_moved_into_a_removed_ones_place_is_still_found() {
        let mut w = Winners::new(1_000);
        let (a, b, c) = (
            click(1, 500, 600, "a"),
            click(2, 500, 600, "b"),
            click(3, 500, 600, "c"),
        );
        apply(&mut w, 10, &[(a.clone(), 1), (b, 1), (c.clone(), 1)]);
        assert_eq!(apply(&mut w, 90, &[(a, -1)]), [(true, "a".into(), -1)]);
        // Impression 3's click took impression 1's place: a better copy and its expiry
        // must still find it.
        let better = click(3, 400, 700, "c0");
        assert_eq!(
            apply(&mut w, 91, &[(better.clone(), 1)]),
            [(true, "c".into(), -1), (true, "c0".into(), 1)]
        );
        assert_eq!(apply(&mut w, 92, &[(c, -1)]), []);
        assert_eq!(
            apply(&mut w, 93, &[(better, -1)]),
            [(true, "c0".into(), -1)]
        );
        assert_eq!(w.len(), 1);
    }

    /// Many impressions over many chunks, with better copies, identical copies and
    /// expiries in random order: the emitted changes add up to the winners a plain map
    /// (the best live-at-arrival copy, dropped with its last copy) says, and every winner
    /// left is found after the chunks it sat in were compacted.
    #[test]
    fn winners_survive_compaction_and_match_a_plain_map() {
        let mut w = Winners::new(1_000);
        let mut oracle: HashMap<u128, (Click, u32)> = HashMap::new();
        let mut emitted: HashMap<Click, isize> = HashMap::new();
        let mut live: Vec<Click> = Vec::new();
        let mut x = 7u64;
        let mut next = |n: u64| {
            x = crate::log::mix64(x.wrapping_add(0x9e37_79b9_7f4a_7c15));
            x % n
        };
        for time in 1..=200_000u64 {
            let mut updates = Vec::new();
            let imp = u128::from(next(50_000));
            let event = 1_000_000 + time * 10 - next(3_000);
            let copy = click(imp, event, 1_000_000 + time * 10, &next(1_000).to_string());
            updates.push((copy.clone(), 1));
            if next(10) == 0 {
                updates.push((copy.clone(), 1));
                live.push(copy.clone());
            }
            live.push(copy);
            while live.len() > 60_000 || (!live.is_empty() && next(3) == 0) {
                let at = next(live.len() as u64) as usize;
                updates.push((live.swap_remove(at), -1));
            }
            // The plain map: expiries first, then the clicks.
            let mut sorted = updates.clone();
            sorted.sort_by_key(|(_, d)| *d);
            for (c, d) in &sorted {
                let entry = oracle.get_mut(&c.impression_id);
                match (entry, *d) {
                    (Some((winner, n)), -1) if winner == c => {
                        *n -= 1;
                        if *n == 0 {
                            oracle.remove(&c.impression_id);
                        }
                    }
                    (Some(_), -1) | (None, -1) => {}
                    (Some((winner, n)), _) if winner == c => *n += 1,
                    (Some((winner, n)), _) => {
                        let key = |c: &Click| {
                            (
                                !c.on_time(1_000),
                                c.event_time_ms,
                                c.click_id.clone(),
                                c.clone(),
                            )
                        };
                        if key(c) < key(winner) {
                            (*winner, *n) = (c.clone(), 1);
                        }
                    }
                    (None, _) => {
                        oracle.insert(c.impression_id, (c.clone(), 1));
                    }
                }
            }
            w.apply(time, updates, |((_, (_, c)), _, d)| {
                *emitted.entry(c).or_default() += d;
            });
        }
        emitted.retain(|_, d| *d != 0);
        assert!(
            w.clicks.chunks_freed() > 0,
            "no chunk was compacted or freed"
        );
        assert_eq!(w.len(), oracle.len());
        assert_eq!(emitted.len(), oracle.len());
        for (imp, (winner, _)) in &oracle {
            assert_eq!(emitted.get(winner), Some(&1));
            assert_eq!(w.get(*imp).map(|(_, c)| c).as_ref(), Some(winner));
        }
    }
}
