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

use super::classify::{Click, Verdict};
use crate::log::{Log, LogPosition, PartitionBatch};
use crate::metrics::Metrics;
use crate::record::{
    AdRecord, ClickEvent, FraudVerdict, PartitionId, Payload, Topic, is_heartbeat,
};
use crate::time::{Tick, Time, now_ms};

/// What the source emits.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum SourceEvent {
    /// A click; retracted again at its time + horizon.
    Click(Click),
    /// A fraud verdict for an impression, with its arrival time; retracted again at its
    /// time + horizon.
    Verdict(Verdict),
    /// A catalog record and its offset (later offsets win); never retracted.
    Ad(u64, AdRecord),
    /// All records of the partition before `position` have times at most this one's.
    Position(PartitionId, LogPosition),
    /// This many clicks were read at this time; never retracted. The sink counts them
    /// (with the committed rows) for the dedup-drop metric.
    ClicksRead(u64),
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
    /// The catalog offset committed with the store's frontier: the catalog holds the
    /// frontier back until it has been read this far (see `PartitionState`).
    pub catalog_committed: u64,
    /// Set to make the source stop emitting and the reader stop.
    pub shutdown: Arc<AtomicBool>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

/// The log's records as one collection of [`SourceEvent`]s.
pub fn log_source<'s>(
    scope: Scope<'s, Time>,
    spec: SourceSpec,
) -> VecCollection<'s, Time, SourceEvent> {
    source::<_, CapacityContainerBuilder<Vec<(SourceEvent, Time, isize)>>, _, _>(
        scope,
        "LogSource",
        |cap, info| {
            let activator = scope.worker().sync_activator_for(info.address.to_vec());
            let (tx, rx) = crossbeam_channel::bounded::<Vec<PartitionBatch>>(16);
            let mut parts: BTreeMap<PartitionId, PartitionState> = spec
                .partitions
                .iter()
                .map(|(p, pos)| (*p, PartitionState::new(*pos, spec.tick)))
                .collect();
            let mut cap = if spec.partitions.is_empty() {
                None
            } else {
                Some(cap)
            };

            if cap.is_some() {
                let reader_spec = spec.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("log-reader-{}", scope.index()))
                    .spawn(move || read_loop(reader_spec, tx, activator));
                if let Err(e) = spawned {
                    // Without its reader this worker's partitions would look empty and the
                    // frontier would pass clicks never read: end the process instead.
                    panic!(
                        "cannot start the log reader thread of worker {}: {e}",
                        scope.index()
                    );
                }
            }

            let SourceSpec {
                tick,
                horizon_ms,
                ttl_ms,
                catalog_committed,
                shutdown,
                metrics,
                ..
            } = spec;
            move |output| {
                // On shutdown keep the capability: the engine drops the dataflow instead of
                // letting it complete. Released, it would let the frontier run ahead to the
                // pending expiry retractions (a horizon ahead), and the sink would commit a
                // frontier beyond every click still to come.
                if shutdown.load(Ordering::Acquire) {
                    return;
                }
                let Some(c) = cap.as_mut() else { return };
                let mut session = output.session(&*c);
                while let Ok(batches) = rx.try_recv() {
                    for batch in batches {
                        let catalog = batch.partition.topic == Topic::Ads;
                        let part = parts
                            .entry(batch.partition)
                            .or_insert_with(|| PartitionState::new(LogPosition::default(), tick));
                        let mut last_time = None;
                        // Clicks read per time, one `ClicksRead` per run of equal times.
                        let mut read: Option<(Time, u64)> = None;
                        for record in &batch.records {
                            // Record times are made monotone per partition, so a time never
                            // falls below the frontier already announced.
                            part.floor_ms = part.floor_ms.max(record.record_time_ms);
                            let mut time = tick.time_of(part.floor_ms);
                            if catalog {
                                // The catalog follows the clock (see `PartitionState`): its
                                // records land no earlier than what this source has announced.
                                time = time.max(*c.time());
                            }
                            last_time = Some(time);
                            if is_heartbeat(&record.payload) {
                                continue;
                            }
                            let at = RecordAt {
                                offset: record.offset,
                                record_time_ms: part.floor_ms,
                                time,
                            };
                            match decode(batch.partition.topic, at, &record.payload, ttl_ms) {
                                Some(event @ (SourceEvent::Click(_) | SourceEvent::Verdict(_))) => {
                                    if matches!(event, SourceEvent::Click(_)) {
                                        if matches!(read, Some((t, _)) if t == time) {
                                            if let Some((_, n)) = read.as_mut() {
                                                *n += 1;
                                            }
                                        } else if let Some((t, n)) = read.replace((time, 1)) {
                                            session.give((SourceEvent::ClicksRead(n), t, 1));
                                        }
                                    }
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
                        if let Some((t, n)) = read {
                            session.give((SourceEvent::ClicksRead(n), t, 1));
                        }
                        part.next_offset = batch.next.offset;
                        if let Some(time) = last_time {
                            part.frontier = part.frontier.max(time);
                            let position = LogPosition {
                                offset: batch.next.offset,
                                time_floor_ms: part.floor_ms,
                            };
                            session.give((
                                SourceEvent::Position(batch.partition, position),
                                time,
                                1,
                            ));
                        }
                        if let Some(w) = batch.idle_until_ms {
                            part.frontier = part.frontier.max(tick.time_of(w));
                        }
                    }
                }
                drop(session);
                let clock = tick.time_of(now_ms());
                let least = parts
                    .iter()
                    .map(|(p, part)| {
                        if p.topic == Topic::Ads && part.next_offset >= catalog_committed {
                            // Past the committed catalog: every further catalog record lands
                            // at or after the capability, so the catalog holds nothing back.
                            clock
                        } else {
                            part.frontier
                        }
                    })
                    .min();
                if let Some(least) = least
                    && least > *c.time()
                {
                    c.downgrade(&least);
                }
            }
        },
    )
    .as_collection()
}

/// What the source knows of one partition.
///
/// Clicks and verdicts get their time from their own record times (made monotone), a
/// pure function of the log, so a replay assigns the same ones; idle partitions advance
/// by heartbeats or the log's watermark. The catalog (`ads`) is read from offset 0 at
/// every start and must not need heartbeats, which would pile up there forever. So a
/// catalog record's time is its running-max record time *or the source's capability,
/// whichever is later*, and past the committed catalog offset the catalog partition
/// follows the worker's clock instead of holding the frontier back. That is a replay
/// that is exact where it matters: a committed catalog record (before the committed
/// offset) replays at a time no later than its original one, both before the committed
/// frontier, because the catalog holds the frontier back until it has been read again;
/// an uncommitted one lands at or after the committed frontier. The collections at every
/// time from the committed frontier on are therefore the original ones.
#[derive(Clone, Copy, Debug)]
struct PartitionState {
    /// Running max of record times.
    floor_ms: u64,
    /// No record of this partition will get a time before this.
    frontier: Time,
    /// The next offset to read.
    next_offset: u64,
}

impl PartitionState {
    fn new(start: LogPosition, tick: Tick) -> PartitionState {
        PartitionState {
            floor_ms: start.time_floor_ms,
            frontier: tick.time_of(start.time_floor_ms),
            next_offset: start.offset,
        }
    }
}

/// Where a record sits in its partition and the times the source gives it.
#[derive(Clone, Copy, Debug)]
struct RecordAt {
    offset: u64,
    /// The running max of record times.
    record_time_ms: u64,
    /// The timely time it is emitted at.
    time: Time,
}

fn decode(topic: Topic, at: RecordAt, payload: &[u8], ttl_ms: u64) -> Option<SourceEvent> {
    match topic {
        Topic::Clicks => ClickEvent::decode(payload)
            .ok()
            .map(|e| SourceEvent::Click(Click::from_event(e, at.record_time_ms, ttl_ms))),
        // A verdict carries its arrival time as data: the adjustment view compares it with
        // the finality of the window its click was billed in.
        Topic::FraudVerdicts => FraudVerdict::decode(payload).ok().map(|v| {
            SourceEvent::Verdict(Verdict {
                impression_id: v.impression_id,
                record_time_ms: at.record_time_ms,
                time: at.time,
            })
        }),
        Topic::Ads => AdRecord::decode(payload)
            .ok()
            .map(|r| SourceEvent::Ad(at.offset, r)),
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
