//! Runs the classification and the views over a fixed list of timed events, in one
//! worker, and returns every output update: how view tests (and the guide's example)
//! check a view against an oracle without a log, a store or a clock.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use differential_dataflow::AsCollection;
use timely::dataflow::operators::capture::{Capture, Extract};
use timely::dataflow::operators::vec::unordered_input::UnorderedInput;

use super::classify::Rules;
use super::demux::split_events;
use super::sink::SinkRecord;
use super::source::SourceEvent;
use super::{view_inputs, view_records};
use crate::time::{Finality, Time};
use crate::views::{Row, ViewDef};

/// The updates the log source would emit for `events`: each at its time, and clicks and
/// verdicts retracted again at time + horizon.
pub fn source_updates(
    events: &[(SourceEvent, Time)],
    horizon_ms: u64,
) -> Vec<(SourceEvent, Time, isize)> {
    let mut out = Vec::with_capacity(events.len() * 2);
    for (event, time) in events {
        out.push((event.clone(), *time, 1));
        if matches!(event, SourceEvent::Click(_) | SourceEvent::Verdict(_)) {
            out.push((event.clone(), time + horizon_ms, -1));
        }
    }
    out
}

/// Every output update of `views` for the input `updates`, run to completion.
pub fn run_views(
    updates: Vec<(SourceEvent, Time, isize)>,
    rules: Rules,
    finality: Finality,
    views: &'static [ViewDef],
) -> Vec<(SinkRecord, Time, isize)> {
    let (send, recv) = std::sync::mpsc::channel();
    let send = Arc::new(Mutex::new(send));
    let updates = Mutex::new(Some(updates));
    timely::execute_directly(move |worker| {
        let send = match send.lock() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        let (mut input, capability) = worker.dataflow::<Time, _, _>(|scope| {
            let ((input, capability), stream) =
                scope.new_unordered_input::<(SourceEvent, Time, isize)>();
            let events = split_events(stream.as_collection());
            let inputs = view_inputs(&events, rules, finality, Default::default());
            view_records(&inputs, views).inner.capture_into(send);
            (input, capability)
        });
        let updates = match updates.lock() {
            Ok(mut u) => u.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        input
            .activate()
            .session(&capability)
            .give_iterator(updates.unwrap_or_default().into_iter());
        drop(capability);
    });
    recv.extract()
        .into_iter()
        .flat_map(|(_, batch)| batch)
        .collect()
}

/// The rows of view `view` accumulated at time `at`: `(key, value) -> count`.
pub fn rows_at(
    output: &[(SinkRecord, Time, isize)],
    view: usize,
    at: Time,
) -> BTreeMap<(Row, Row), isize> {
    let mut rows = BTreeMap::new();
    for (record, time, diff) in output {
        if let SinkRecord::Row {
            view: v,
            key,
            value,
        } = record
            && *v as usize == view
            && *time <= at
        {
            *rows.entry((key.clone(), value.clone())).or_insert(0) += diff;
        }
    }
    rows.retain(|_, n| *n != 0);
    rows
}
