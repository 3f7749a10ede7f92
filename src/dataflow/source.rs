//! The log source: a timely operator that reads this worker's partitions and emits their
//! records at their record times, rounded up to ticks.
//!
//! Reading happens on a thread of its own so the worker never blocks on disk or network;
//! batches cross over a bounded channel and wake the operator. The operator holds one
//! capability at the least frontier of its partitions: a partition's frontier is the time
//! of its last record, or its watermark once the reader has caught up, so idle partitions
//! advance with the clock. Every time is a pure function of the log, so a replay assigns
//! the same ones.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use differential_dataflow::{AsCollection, VecCollection};
use serde::{Deserialize, Serialize};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::Scope;
use timely::dataflow::operators::generic::operator::source;

use super::classify::Click;
use crate::log::{Log, LogPosition, PartitionBatch};
use crate::metrics::Metrics;
use crate::record::{
    AdRecord, ClickEvent, FraudVerdict, PartitionId, Payload, Topic, is_heartbeat,
};
use crate::time::{Tick, Time};

/// What the source emits.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum SourceEvent {
    /// A click; retracted again at its time + horizon.
    Click(Click),
    /// A fraud verdict for an impression; retracted again at its time + horizon.
    Verdict(u128),
    /// A catalog record and its offset (later offsets win); never retracted.
    Ad(u64, AdRecord),
    /// All records of the partition before `position` have times at most this one's.
    Position(PartitionId, LogPosition),
}

/// What one source reads and how it stamps records.
#[derive(Clone)]
pub struct SourceSpec {
    /// The log.
    pub log: Arc<dyn Log>,
    /// This worker's partitions and where to start reading them.
    pub partitions: Vec<(PartitionId, LogPosition)>,
    /// Record times are rounded up to this tick.
    pub tick: Tick,
    /// Clicks and verdicts are retracted this long after their time.
    pub horizon_ms: u64,
    /// The impression TTL (event times are clamped to record time - TTL).
    pub ttl_ms: u64,
    /// Set to make the source drop its capability and the reader stop.
    pub shutdown: Arc<AtomicBool>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

/// The log's records as one collection of [`SourceEvent`]s.
pub fn log_source<'s>(
    scope: Scope<'s, Time>,
    spec: SourceSpec,
) -> VecCollection<'s, Time, SourceEvent> {
    source::<_, CapacityContainerBuilder<Vec<(SourceEvent, Time, isize)>>, _, _>(scope, "LogSource", |cap, info| {
        let activator = scope.worker().sync_activator_for(info.address.to_vec());
        let (tx, rx) = crossbeam_channel::bounded::<Vec<PartitionBatch>>(16);
        // Per partition: the running max of record times, and the partition's frontier.
        let mut parts: BTreeMap<PartitionId, (u64, Time)> = spec
            .partitions
            .iter()
            .map(|(p, pos)| (*p, (pos.time_floor_ms, spec.tick.time_of(pos.time_floor_ms))))
            .collect();
        let mut cap = if spec.partitions.is_empty() { None } else { Some(cap) };

        if cap.is_some() {
            let reader_spec = spec.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("log-reader-{}", scope.index()))
                .spawn(move || read_loop(reader_spec, tx, activator));
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start log reader thread; this worker reads nothing");
                cap = None;
            }
        }

        let SourceSpec {
            tick,
            horizon_ms,
            ttl_ms,
            shutdown,
            metrics,
            ..
        } = spec;
        move |output| {
            if shutdown.load(Ordering::Acquire) {
                cap = None;
            }
            let Some(c) = cap.as_mut() else { return };
            let mut session = output.session(&*c);
            while let Ok(batches) = rx.try_recv() {
                for batch in batches {
                    let (floor_ms, frontier) = parts.entry(batch.partition).or_default();
                    let mut last_time = None;
                    for record in &batch.records {
                        // Record times are made monotone per partition, so a time never
                        // falls below the frontier already announced.
                        *floor_ms = (*floor_ms).max(record.record_time_ms);
                        let time = tick.time_of(*floor_ms);
                        last_time = Some(time);
                        if is_heartbeat(&record.payload) {
                            continue;
                        }
                        match decode(batch.partition.topic, record.offset, *floor_ms, &record.payload, ttl_ms) {
                            Some(event @ (SourceEvent::Click(_) | SourceEvent::Verdict(_))) => {
                                session.give((event.clone(), time, 1));
                                session.give((event, time + horizon_ms, -1));
                            }
                            Some(event) => session.give((event, time, 1)),
                            None => {
                                metrics.records_undecodable.inc();
                                tracing::warn!(
                                    partition = %batch.partition,
                                    offset = record.offset,
                                    "skipping a log record that does not decode"
                                );
                            }
                        }
                    }
                    if let Some(time) = last_time {
                        *frontier = (*frontier).max(time);
                        let position = LogPosition {
                            offset: batch.next.offset,
                            time_floor_ms: *floor_ms,
                        };
                        session.give((SourceEvent::Position(batch.partition, position), time, 1));
                    }
                    if let Some(w) = batch.idle_until_ms {
                        *frontier = (*frontier).max(tick.time_of(w));
                    }
                }
            }
            drop(session);
            if let Some(least) = parts.values().map(|(_, frontier)| *frontier).min()
                && least > *c.time()
            {
                c.downgrade(&least);
            }
        }
    })
    .as_collection()
}

fn decode(
    topic: Topic,
    offset: u64,
    record_time_ms: u64,
    payload: &[u8],
    ttl_ms: u64,
) -> Option<SourceEvent> {
    match topic {
        Topic::Clicks => ClickEvent::decode(payload)
            .ok()
            .map(|e| SourceEvent::Click(Click::from_event(e, record_time_ms, ttl_ms))),
        Topic::FraudVerdicts => FraudVerdict::decode(payload)
            .ok()
            .map(|v| SourceEvent::Verdict(v.impression_id)),
        Topic::Ads => AdRecord::decode(payload)
            .ok()
            .map(|r| SourceEvent::Ad(offset, r)),
    }
}

/// The reader thread: polls the log and hands batches to the operator.
fn read_loop(
    spec: SourceSpec,
    tx: crossbeam_channel::Sender<Vec<PartitionBatch>>,
    activator: timely::scheduling::SyncActivator,
) {
    let wait = Duration::from_millis(spec.tick.ms()).min(Duration::from_millis(250));
    let mut backoff = Duration::from_millis(100);
    let mut reader = loop {
        if spec.shutdown.load(Ordering::Acquire) {
            return;
        }
        match spec.log.reader(spec.partitions.clone()) {
            Ok(r) => break r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot open log reader; retrying");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    };
    backoff = Duration::from_millis(100);
    while !spec.shutdown.load(Ordering::Acquire) {
        match reader.poll(wait) {
            Ok(batches) => {
                backoff = Duration::from_millis(100);
                if tx.send(batches).is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "log read failed; retrying");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
        // The operator also checks for shutdown when woken, so wake it even on errors.
        if activator.activate().is_err() {
            return;
        }
    }
    let _ = activator.activate();
}
