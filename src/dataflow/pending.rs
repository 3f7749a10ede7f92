//! Updates held back until their time is complete, for the operators that keep their
//! state in place (`dedup` and its fraud join, `bursts`, `distinct`, `count`): they apply a
//! time's updates only once no more can arrive for it, in time order, and hold one
//! capability per output port, at the earliest time held back. Those with one output
//! (`distinct`, `count`, `bursts`) are built by [`apply_complete_times`].

use std::collections::BTreeMap;

use differential_dataflow::hashable::Hashable;
use differential_dataflow::{AsCollection, ExchangeData, VecCollection};
use prometheus_client::metrics::gauge::Gauge;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::{Capability, InputCapability};

use crate::time::Time;

/// An operator with state in place, keyed like its input: exchanges the updates by key,
/// holds them back until their time is complete, and hands each complete time's updates,
/// earliest first, to `apply`, which pushes the output's changes at that time to `out`.
pub fn apply_complete_times<'s, K, R, O>(
    input: VecCollection<'s, Time, K, R>,
    name: &str,
    held_back: Gauge,
    apply: impl FnMut(Vec<(K, R)>, &mut Vec<(O, isize)>) + 'static,
) -> VecCollection<'s, Time, O>
where
    K: ExchangeData + Hashable,
    R: ExchangeData,
    O: ExchangeData,
{
    let by_key = |key: &K| key.hashed().into();
    apply_complete_times_routed(input, name, by_key, held_back, apply)
}

/// [`apply_complete_times`] with the updates exchanged by `route` (a hash of the part of
/// the record that decides which worker holds its state) instead of by the whole record.
pub fn apply_complete_times_routed<'s, K, R, O>(
    input: VecCollection<'s, Time, K, R>,
    name: &str,
    route: impl Fn(&K) -> u64 + 'static,
    held_back: Gauge,
    mut apply: impl FnMut(Vec<(K, R)>, &mut Vec<(O, isize)>) + 'static,
) -> VecCollection<'s, Time, O>
where
    K: ExchangeData,
    R: ExchangeData,
    O: ExchangeData,
{
    let by_key = Exchange::new(move |(key, _, _): &(K, Time, R)| route(key));
    input
        .inner
        .unary_frontier::<CapacityContainerBuilder<Vec<(O, Time, isize)>>, _, _, _>(
            by_key,
            name,
            move |_capability, _info| {
                let mut pending: Pending<(K, R)> = Pending::new(held_back);
                let mut out = Vec::new();
                move |(input, frontier), output| {
                    input.for_each(|cap, data| {
                        pending.stash(&cap, data.drain(..).map(|(k, t, r)| (t, (k, r))));
                    });
                    let complete = |t: &Time| !frontier.less_equal(t);
                    pending.drain_complete(complete, |time, at, updates| {
                        apply(updates, &mut out);
                        let mut session = output.session(&at[0]);
                        session.give_iterator(out.drain(..).map(|(o, d)| (o, time, d)));
                    });
                }
            },
        )
        .as_collection()
}

/// At most this many updates' room is reserved for a new time ahead of its updates.
const MAX_EXPECTED: usize = 4096;

/// Updates by their own time, and a capability per output port at or before the earliest
/// of them.
#[derive(Debug)]
pub struct Pending<D> {
    by_time: BTreeMap<Time, Vec<D>>,
    /// One per output port, all at the same time; empty when nothing is held back.
    capabilities: Vec<Capability<Time>>,
    outputs: usize,
    held: Gauge,
    /// The size of the last time taken, the capacity a new time's updates start with: a
    /// time of a few hundred clicks grown push by push reallocates and copies about ten
    /// times, the largest copies into fresh pages (3.4% of a worker's time in
    /// `bench/dataflow.rs`).
    expected: usize,
}

impl<D> Pending<D> {
    /// Nothing held back yet, for an operator with one output; `held` counts the updates
    /// held back (shared by operators).
    pub fn new(held: Gauge) -> Pending<D> {
        Pending::with_outputs(held, 1)
    }

    /// Nothing held back yet, for an operator with `outputs` output ports.
    pub fn with_outputs(held: Gauge, outputs: usize) -> Pending<D> {
        Pending {
            by_time: BTreeMap::new(),
            capabilities: Vec::new(),
            outputs,
            held,
            expected: 0,
        }
    }

    /// Holds back the updates of one message received under `cap`.
    pub fn stash(&mut self, cap: &InputCapability<Time>, updates: impl Iterator<Item = (Time, D)>) {
        if let Some(least) = cap.least()
            && self.capabilities.first().is_none_or(|c| least < c.time())
        {
            self.capabilities = (0..self.outputs)
                .filter_map(|port| cap.retain_least(port))
                .collect();
        }
        let mut n = 0;
        let expected = self.expected;
        // A message's updates mostly share one time: one map lookup per run of equal
        // times, not one per update.
        let mut updates = updates.peekable();
        while let Some((time, update)) = updates.next() {
            let held = self
                .by_time
                .entry(time)
                .or_insert_with(|| Vec::with_capacity(expected));
            held.push(update);
            n += 1;
            while let Some((_, update)) = updates.next_if(|(t, _)| *t == time) {
                held.push(update);
                n += 1;
            }
        }
        self.held.inc_by(n);
    }

    /// The earliest time held back.
    pub fn earliest(&self) -> Option<Time> {
        self.by_time.keys().next().copied()
    }

    /// Capabilities for `time`, one per output port, if this holds them at or before it.
    pub fn capabilities_for(&self, time: Time) -> Option<Vec<Capability<Time>>> {
        let first = self.capabilities.first()?;
        (*first.time() <= time)
            .then(|| self.capabilities.iter().map(|c| c.delayed(&time)).collect())
    }

    /// Hands the updates of each complete time (`complete`: no more can arrive for it) to
    /// `apply`, earliest first, with capabilities, one per output port, at the first time
    /// this call completes; then moves the capabilities up to what is still held back.
    ///
    /// The outputs of every time completed together go out under the first one's
    /// capabilities: a differential update carries its own time, and its message's time
    /// need only not be later. One capability and one run of messages per call, instead of
    /// one per time, keeps timely's progress tracking from sorting a change per time and
    /// port (10% of a worker's instructions in a replay, `bench/callgrind_dataflow.sh`),
    /// and fills the output's containers instead of sending one per time.
    pub fn drain_complete(
        &mut self,
        complete: impl Fn(&Time) -> bool,
        mut apply: impl FnMut(Time, &[Capability<Time>], Vec<D>),
    ) {
        let mut at: Option<Vec<Capability<Time>>> = None;
        while let Some(time) = self.earliest().filter(|t| complete(t)) {
            if at.is_none() {
                at = self.capabilities_for(time);
            }
            let Some(capabilities) = at.as_deref() else {
                break;
            };
            let updates = self.take(time);
            apply(time, capabilities, updates);
        }
        drop(at);
        self.settle();
    }

    /// Takes the updates of `time` out.
    pub fn take(&mut self, time: Time) -> Vec<D> {
        let updates = self.by_time.remove(&time).unwrap_or_default();
        self.held.dec_by(updates.len() as i64);
        if !updates.is_empty() {
            self.expected = updates.len().min(MAX_EXPECTED);
        }
        updates
    }

    /// The updates held back for times after `time`, earliest first.
    pub fn after(&self, time: Time) -> impl DoubleEndedIterator<Item = &D> {
        self.by_time
            .range(time.saturating_add(1)..)
            .flat_map(|(_, updates)| updates.iter())
    }

    /// Moves the capabilities up to the earliest time still held back, or drops them.
    pub fn settle(&mut self) {
        match self.earliest() {
            Some(next) => self
                .capabilities
                .iter_mut()
                .for_each(|c| c.downgrade(&next)),
            None => self.capabilities.clear(),
        }
    }
}

impl<D> Drop for Pending<D> {
    fn drop(&mut self) {
        let n: usize = self.by_time.values().map(Vec::len).sum();
        self.held.dec_by(n as i64);
    }
}
