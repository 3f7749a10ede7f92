//! How big the dataflow's state is: the updates its arrangements hold, from
//! differential's own logging, as gauges in the process's metrics. Bounded state is a
//! promise (every click leaves again at time + horizon, arrangements compact); these
//! numbers are how an operator, and the soak benchmark, check it.

use differential_dataflow::logging::{DifferentialEvent, DifferentialEventBuilder};
use timely::worker::Worker;

use crate::metrics::Metrics;

/// Makes every arrangement this worker builds from now on report its size to `metrics`.
/// Call before building the dataflow: arrangements pick up the logger when created.
pub fn report_sizes(worker: &mut Worker, metrics: &Metrics) {
    let (records, batcher) = (
        metrics.arrangement_records.clone(),
        metrics.arrangement_batcher_records.clone(),
    );
    let Some(mut register) = worker.log_register() else {
        return;
    };
    register.insert::<DifferentialEventBuilder, _>(
        "differential/arrange",
        move |_time, events: &mut Option<Vec<_>>| {
            for (_, event) in events.iter_mut().flat_map(|e| e.drain(..)) {
                // Batch, completed merge and drop events balance (see differential's
                // `DifferentialEvent`): their sum is what the traces hold right now.
                let delta = match event {
                    DifferentialEvent::Batch(b) => b.length as i64,
                    DifferentialEvent::Merge(m) => m
                        .complete
                        .map_or(0, |c| c as i64 - m.length1 as i64 - m.length2 as i64),
                    DifferentialEvent::Drop(d) => -(d.length as i64),
                    DifferentialEvent::Batcher(b) => {
                        batcher.inc_by(b.records_diff as i64);
                        0
                    }
                    _ => 0,
                };
                records.inc_by(delta);
            }
        },
    );
}
