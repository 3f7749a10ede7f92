//! The source's events split by kind in one pass, each moved to its own stream.
//!
//! Timely hands a stream with several consumers a clone of every batch for all but the
//! last of them. The source's stream has four (clicks, verdicts, catalog, and the sink's
//! positions), and a `flat_map` per kind would copy every click three times only to drop
//! the copies again. This operator moves each event into the one stream of its kind.

use differential_dataflow::{AsCollection, VecCollection};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;

use super::classify::{Click, Verdict};
use super::sink::SinkRecord;
use super::source::SourceEvent;
use crate::record::AdRecord;
use crate::time::Time;

/// The source's events by kind.
pub struct SourceStreams<'s> {
    /// Clicks (retracted a horizon later).
    pub clicks: VecCollection<'s, Time, Click>,
    /// Fraud verdicts (retracted a horizon later).
    pub verdicts: VecCollection<'s, Time, Verdict>,
    /// Catalog records with their offsets.
    pub ads: VecCollection<'s, Time, (u64, AdRecord)>,
    /// Positions and click counts, for the sink.
    pub progress: VecCollection<'s, Time, SinkRecord>,
}

/// An output of an operator with several: `(data, time, diff)` in vectors.
pub(crate) type Out<D> = OutputBuilder<Time, CapacityContainerBuilder<Vec<(D, Time, isize)>>>;

/// Splits `events` by kind, moving each into its stream.
pub fn split_events<'s>(events: VecCollection<'s, Time, SourceEvent>) -> SourceStreams<'s> {
    let mut builder = OperatorBuilder::new("SplitEvents".to_owned(), events.inner.scope());
    let mut input = builder.new_input(events.inner, Pipeline);
    let (clicks_out, clicks) = builder.new_output();
    let (verdicts_out, verdicts) = builder.new_output();
    let (ads_out, ads) = builder.new_output();
    let (progress_out, progress) = builder.new_output();
    let mut clicks_out: Out<Click> = OutputBuilder::from(clicks_out);
    let mut verdicts_out: Out<Verdict> = OutputBuilder::from(verdicts_out);
    let mut ads_out: Out<(u64, AdRecord)> = OutputBuilder::from(ads_out);
    let mut progress_out: Out<SinkRecord> = OutputBuilder::from(progress_out);
    builder.build(move |_initial_capabilities| {
        move |_frontiers| {
            let (mut c, mut v, mut a, mut p) = (
                clicks_out.activate(),
                verdicts_out.activate(),
                ads_out.activate(),
                progress_out.activate(),
            );
            input.for_each(|cap, data| {
                let (mut c, mut v, mut a, mut p) = (
                    c.session(&cap),
                    v.session(&cap),
                    a.session(&cap),
                    p.session(&cap),
                );
                for (event, time, diff) in data.drain(..) {
                    match event {
                        SourceEvent::Click(click) => c.give((click, time, diff)),
                        SourceEvent::Verdict(verdict) => v.give((verdict, time, diff)),
                        SourceEvent::Ad(offset, ad) => a.give(((offset, ad), time, diff)),
                        SourceEvent::Position(part, pos) => {
                            p.give((SinkRecord::Position(part, pos), time, diff))
                        }
                        SourceEvent::ClicksRead(n) => {
                            p.give((SinkRecord::ClicksRead(n), time, diff))
                        }
                    }
                }
            });
        }
    });
    SourceStreams {
        clicks: clicks.as_collection(),
        verdicts: verdicts.as_collection(),
        ads: ads.as_collection(),
        progress: progress.as_collection(),
    }
}
