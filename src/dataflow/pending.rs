//! Updates held back until their time is complete, for the operators that keep their
//! state in place (`dedup`, `bursts`): they apply a time's updates only once no more can
//! arrive for it, in time order, and hold one capability, at the earliest time held back.

use std::collections::BTreeMap;

use prometheus_client::metrics::gauge::Gauge;
use timely::dataflow::operators::{Capability, InputCapability};

use crate::time::Time;

/// Updates by their own time, and a capability at or before the earliest of them.
#[derive(Debug)]
pub struct Pending<D> {
    by_time: BTreeMap<Time, Vec<D>>,
    capability: Option<Capability<Time>>,
    held: Gauge,
}

impl<D> Pending<D> {
    /// Nothing held back yet; `held` counts the updates held back (shared by operators).
    pub fn new(held: Gauge) -> Pending<D> {
        Pending {
            by_time: BTreeMap::new(),
            capability: None,
            held,
        }
    }

    /// Holds back the updates of one message received under `cap`.
    pub fn stash(&mut self, cap: &InputCapability<Time>, updates: impl Iterator<Item = (Time, D)>) {
        if let Some(least) = cap.least()
            && self.capability.as_ref().is_none_or(|c| least < c.time())
        {
            self.capability = cap.retain_least(0);
        }
        let mut n = 0;
        for (time, update) in updates {
            self.by_time.entry(time).or_default().push(update);
            n += 1;
        }
        self.held.inc_by(n);
    }

    /// The earliest time held back.
    pub fn earliest(&self) -> Option<Time> {
        self.by_time.keys().next().copied()
    }

    /// A capability for `time`, if this holds one at or before it.
    pub fn capability_for(&self, time: Time) -> Option<Capability<Time>> {
        self.capability
            .as_ref()
            .filter(|c| *c.time() <= time)
            .map(|c| c.delayed(&time))
    }

    /// Takes the updates of `time` out.
    pub fn take(&mut self, time: Time) -> Vec<D> {
        let updates = self.by_time.remove(&time).unwrap_or_default();
        self.held.dec_by(updates.len() as i64);
        updates
    }

    /// The updates held back for times after `time`, earliest first.
    pub fn after(&self, time: Time) -> impl DoubleEndedIterator<Item = &D> {
        self.by_time
            .range(time.saturating_add(1)..)
            .flat_map(|(_, updates)| updates.iter())
    }

    /// Moves the capability up to the earliest time still held back, or drops it.
    pub fn settle(&mut self) {
        match (self.earliest(), self.capability.as_mut()) {
            (Some(next), Some(c)) => c.downgrade(&next),
            _ => self.capability = None,
        }
    }
}

impl<D> Drop for Pending<D> {
    fn drop(&mut self) {
        let n: usize = self.by_time.values().map(Vec::len).sum();
        self.held.dec_by(n as i64);
    }
}
