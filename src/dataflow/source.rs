//! The log source: a timely operator that reads this worker's partitions and emits their
//! records at their record times, rounded up to ticks.
//!
//! Reading happens on a thread of its own so the worker never blocks on disk or network;
//! batches cross over a bounded channel and wake the operator. The operator holds one
//! capability at the least frontier of its partitions: a partition's frontier is the time
//! of its last record, or its watermark once the reader has caught up, so idle partitions
//! advance with the clock. Every time is a pure function of the log, so a replay assigns
//! the same ones.
//!
//! Clicks and verdicts leave the collection again a horizon after their time. Their
//! retractions are not sent ahead at future times: those would wait, a full copy of every
//! live click, in the batcher of the first arrangement, which re-merges everything it
//! holds each time it seals a batch. Instead a second reader of the same partitions, the
//! [`ExpiryCursor`], follows a horizon behind the first and reads each record again
//! when its retraction is due: the log is the queue. The source never lets its
//! capability pass a retraction that cursor has not read yet.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use differential_dataflow::{AsCollection, VecCollection};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::Scope;
use timely::dataflow::operators::generic::operator::source;

use super::classify::{Click, Verdict};
use super::sink::SinkStatus;
use crate::log::{Log, LogPosition, PartitionBatch};
use crate::metrics::Metrics;
use crate::progress::{Counter, Display, Progress};
use crate::record::{
    AdRecord, ClickEventRef, FraudVerdict, PartitionId, Payload, Topic, is_heartbeat,
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
    /// Replay progress of this process's readers.
    pub replay: Arc<Replay>,
}

/// How far the dataflow of this process has replayed the log as it stood at start: the
/// replay from the recovery point's positions to the log end, shown as progress
/// ([`crate::progress`]). Each log reader learns its partitions' ends off the worker;
/// its source operator counts the records it hands to the dataflow (an atomic add per
/// batch) and, once it has handed over all of them, waits until the sink's input
/// frontier has passed them: only then has the replay gone through the whole dataflow.
#[derive(Debug)]
pub struct Replay {
    progress: Mutex<Option<Progress>>,
    counter: Counter,
    /// Where the sink's frontier is seen.
    sink: Arc<SinkStatus>,
    /// Readers that have not yet said how much they replay.
    unregistered: AtomicUsize,
    /// Sources still handing replayed records to the dataflow.
    ingesting: AtomicUsize,
    /// Sources whose replay has not yet reached the sink.
    behind: AtomicUsize,
}

impl Replay {
    /// The replay of `readers` sources (one per worker with partitions).
    pub fn new(readers: usize, sink: Arc<SinkStatus>) -> Arc<Replay> {
        let progress = Progress::start_with(
            "replay",
            "records",
            None,
            Display::auto(Duration::from_secs(5)),
        );
        let replay = Arc::new(Replay {
            counter: progress.counter(),
            progress: Mutex::new(Some(progress)),
            sink,
            unregistered: AtomicUsize::new(readers),
            ingesting: AtomicUsize::new(readers),
            behind: AtomicUsize::new(readers),
        });
        if readers == 0 {
            replay.finish();
        }
        replay
    }

    /// Whether every source's replay has reached the sink.
    pub fn caught_up(&self) -> bool {
        self.behind.load(Ordering::Acquire) == 0
    }

    fn register(&self, records: u64) {
        self.counter.add_total(records);
        if self.unregistered.fetch_sub(1, Ordering::AcqRel) == 1 {
            let total = self.counter.total().unwrap_or(0);
            if total > 0 {
                tracing::info!(
                    records = total,
                    "replaying the log from the recovery point to its end"
                );
            }
        }
    }

    fn source_ingested(&self) {
        if self.ingesting.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.counter
                .set_stage("all read; waiting for the dataflow to pass them");
        }
    }

    fn source_caught_up(&self) {
        if self.behind.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.finish();
        }
    }

    fn finish(&self) {
        if let Some(progress) = self.progress.lock().take() {
            progress.finish();
        }
    }
}

/// What one reader still has to replay in one partition.
#[derive(Clone, Copy, Debug)]
struct ReplayTarget {
    /// Handed to the dataflow up to here.
    at: u64,
    /// The partition's end when the reader started.
    end: u64,
}

/// Where each of `partitions` ends now, from where it starts: what a reader replays.
fn replay_targets(
    log: &dyn Log,
    partitions: &[(PartitionId, LogPosition)],
) -> BTreeMap<PartitionId, ReplayTarget> {
    let ends: BTreeMap<PartitionId, u64> = match log.end_offsets() {
        Ok(ends) => ends.into_iter().collect(),
        Err(e) => {
            // Progress only: the replay itself does not depend on it.
            tracing::warn!(error = %e, "no log end offsets; replay progress not shown");
            BTreeMap::new()
        }
    };
    partitions
        .iter()
        .filter_map(|(p, start)| {
            let end = *ends.get(p)?;
            (end > start.offset).then_some((
                *p,
                ReplayTarget {
                    at: start.offset,
                    end,
                },
            ))
        })
        .collect()
}

/// Counts what `batch` adds to the replay; true once every target is reached.
fn advance_replay(
    targets: &mut BTreeMap<PartitionId, ReplayTarget>,
    batch: &PartitionBatch,
    counter: &Counter,
) -> bool {
    if let Some(t) = targets.get_mut(&batch.partition) {
        let reached = batch.next.offset.min(t.end);
        if reached > t.at {
            counter.inc(reached - t.at);
            t.at = reached;
        }
        if t.at >= t.end {
            targets.remove(&batch.partition);
        }
    }
    targets.is_empty()
}

/// Targets a reader thread hands to its source operator (once, before any batch).
type SharedTargets = Arc<Mutex<Option<BTreeMap<PartitionId, ReplayTarget>>>>;

/// Where one source's replay stands.
#[derive(Debug)]
enum ReplayPhase {
    /// The reader has not sent its targets yet.
    Waiting,
    /// Handing records over; `until` is the latest time handed over so far.
    Ingesting {
        targets: BTreeMap<PartitionId, ReplayTarget>,
        until: Time,
    },
    /// Everything handed over; done once the sink's frontier is beyond `until`.
    Draining(Time),
    Done,
}

/// One source operator's part of the replay.
struct SourceReplay {
    replay: Arc<Replay>,
    from_reader: SharedTargets,
    phase: ReplayPhase,
}

impl SourceReplay {
    /// Before each message from the reader: its targets precede its first batch.
    fn receive(&mut self) {
        if matches!(self.phase, ReplayPhase::Waiting)
            && let Some(targets) = self.from_reader.lock().take()
        {
            self.phase = ReplayPhase::Ingesting { targets, until: 0 };
        }
    }

    /// A batch handed to the dataflow, its last record at `time`.
    fn ingested(&mut self, batch: &PartitionBatch, time: Option<Time>) {
        if let ReplayPhase::Ingesting { targets, until } = &mut self.phase {
            *until = (*until).max(time.unwrap_or(0));
            if advance_replay(targets, batch, &self.replay.counter) {
                self.phase = ReplayPhase::Draining(*until);
                self.replay.source_ingested();
            }
        }
    }

    /// After each activation: has the sink seen everything replayed?
    fn check(&mut self) {
        if let ReplayPhase::Ingesting { targets, until } = &self.phase
            && targets.is_empty()
        {
            self.phase = ReplayPhase::Draining(*until);
            self.replay.source_ingested();
        }
        if let ReplayPhase::Draining(until) = self.phase
            && self.replay.sink.observed() > until
        {
            self.phase = ReplayPhase::Done;
            self.replay.source_caught_up();
        }
    }
}

/// Records one worker's source takes from its reader in one step (whole polls, so it may
/// go over by one poll).
///
/// The source takes a step only once the dataflow (as the probe `done` on its output sees
/// it) has finished every time before the source's capability. So a backlog (a restart
/// after an outage, a backfill) is processed in steps of about this size, instead of being
/// read into memory whole and then sorted and joined at once: what is in flight stays
/// bounded and each step's batches stay small. It cannot stall: the worker whose source
/// holds the least capability always finds the dataflow caught up with it. Live traffic
/// never fills a step, so it is not delayed.
pub const MAX_STEP: u64 = 262_144;

/// The log's records as one collection of [`SourceEvent`]s, paced by `done`: a probe on
/// the dataflow's output (see [`MAX_STEP`]).
pub fn log_source<'s>(
    scope: Scope<'s, Time>,
    spec: SourceSpec,
    done: timely::dataflow::ProbeHandle<Time>,
) -> VecCollection<'s, Time, SourceEvent> {
    source::<_, CapacityContainerBuilder<Vec<(SourceEvent, Time, isize)>>, _, _>(
        scope,
        "LogSource",
        |cap, info| {
            let activator = scope.worker().sync_activator_for(info.address.to_vec());
            let wake = scope.worker().activator_for(info.address.clone());
            let (tx, rx) = crossbeam_channel::bounded::<Vec<PartitionBatch>>(16);
            // The expiry reader runs ahead only as far as this channel holds. It is a
            // horizon behind the log's end, so each of its polls comes back full (up to a
            // read batch per partition): 16 of them, as the first reader has, would hold
            // about a horizon of records at 5k clicks/s. Two are enough, since what it
            // reads is already on disk or in the broker's cache.
            let (expiry_tx, expiry_rx) = crossbeam_channel::bounded::<Vec<PartitionBatch>>(2);
            let mut expiry: BTreeMap<PartitionId, ExpiryCursor> = spec
                .partitions
                .iter()
                .filter(|(p, _)| p.topic != Topic::Ads)
                .map(|(p, pos)| (*p, ExpiryCursor::new(*pos)))
                .collect();
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

            let mut replay = SourceReplay {
                replay: Arc::clone(&spec.replay),
                from_reader: SharedTargets::default(),
                phase: ReplayPhase::Waiting,
            };
            if cap.is_some() {
                let reader_spec = spec.clone();
                let targets = Arc::clone(&replay.from_reader);
                let spawned = std::thread::Builder::new()
                    .name(format!("log-reader-{}", scope.index()))
                    .spawn(move || {
                        let start = reader_spec.partitions.clone();
                        read_loop(reader_spec, start, Some(targets), tx, activator)
                    });
                if let Err(e) = spawned {
                    // Without its reader this worker's partitions would look empty and the
                    // frontier would pass clicks never read: end the process instead.
                    panic!(
                        "cannot start the log reader thread of worker {}: {e}",
                        scope.index()
                    );
                }
            }
            if !expiry.is_empty() {
                let reader_spec = spec.clone();
                let start: Vec<_> = expiry.iter().map(|(p, e)| (*p, e.start)).collect();
                let activator = scope.worker().sync_activator_for(info.address.to_vec());
                let spawned = std::thread::Builder::new()
                    .name(format!("log-expiry-{}", scope.index()))
                    .spawn(move || read_loop(reader_spec, start, None, expiry_tx, activator));
                if let Err(e) = spawned {
                    // Without it the capability could never pass the first retraction.
                    panic!(
                        "cannot start the expiry reader thread of worker {}: {e}",
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
                // letting it complete. Released, it would let the frontier run ahead, and the
                // sink would commit a frontier beyond every click still to come.
                if shutdown.load(Ordering::Acquire) {
                    return;
                }
                let Some(c) = cap.as_mut() else { return };
                if done.less_than(c.time()) {
                    // The last step is still being processed; the reader's wake-ups stop
                    // once its channel is full, so look again soon.
                    wake.activate_after(Duration::from_millis(1));
                    return;
                }
                let mut step: u64 = 0;
                let mut session = output.session(&*c);
                while step < MAX_STEP
                    && let Ok(batches) = rx.try_recv()
                {
                    replay.receive();
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
                            step += 1;
                            let at = RecordAt {
                                offset: record.offset,
                                record_time_ms: part.floor_ms,
                                time,
                            };
                            // Off unless asked for: which time a replay gives each record is
                            // what a divergence between two runs comes down to.
                            let event = decode(batch.partition.topic, at, &record.payload, ttl_ms);
                            tracing::trace!(
                                target: "clickagg::source::records",
                                partition = %batch.partition,
                                offset = record.offset,
                                record_time_ms = part.floor_ms,
                                time,
                                ?event,
                                "record"
                            );
                            match event {
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
                                    // Retracted at time + horizon by the expiry cursor.
                                    session.give((event, time, 1));
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
                        replay.ingested(&batch, last_time);
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
                if step >= MAX_STEP {
                    wake.activate_after(Duration::from_millis(1));
                }
                replay.check();
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
                let Some(least) = least else { return };
                // Every retraction due before the new capability must be read and sent
                // first; what the expiry reader has not brought yet holds it back.
                let read_up_to = |p: &PartitionId| parts.get(p).map_or(0, |s| s.next_offset);
                while expiry
                    .iter()
                    .any(|(p, e)| !e.covers(least, read_up_to(p), tick, horizon_ms))
                    && let Ok(batches) = expiry_rx.try_recv()
                {
                    for batch in batches {
                        if let Some(cursor) = expiry.get_mut(&batch.partition) {
                            cursor.read(&batch, tick, horizon_ms, ttl_ms);
                        }
                    }
                }
                let until = expiry
                    .iter()
                    .filter(|(p, e)| !e.covers(least, read_up_to(p), tick, horizon_ms))
                    .map(|(_, e)| e.unread_bound(tick, horizon_ms))
                    .fold(least, Time::min);
                let mut session = output.session(&*c);
                for cursor in expiry.values_mut() {
                    while cursor.due.front().is_some_and(|(at, _)| *at < until) {
                        if let Some((at, event)) = cursor.due.pop_front() {
                            session.give((event, at, -1));
                        }
                    }
                }
                drop(session);
                if until > *c.time() {
                    c.downgrade(&until);
                }
            }
        },
    )
    .as_collection()
}

/// The second reader of one click or verdict partition: it reads each record again a
/// horizon after the first reader, giving it the same time (its running-max record time
/// from the same start, rounded up to a tick), and holds the retractions read but not yet
/// due. What it holds is at most the rest of one poll.
#[derive(Debug)]
struct ExpiryCursor {
    /// Where it started (where the first reader started).
    start: LogPosition,
    /// Running max of record times.
    floor_ms: u64,
    /// The next offset to read.
    next_offset: u64,
    /// Retractions read and not yet sent, with the times they are due at, in order.
    due: VecDeque<(Time, SourceEvent)>,
}

impl ExpiryCursor {
    fn new(start: LogPosition) -> ExpiryCursor {
        ExpiryCursor {
            start,
            floor_ms: start.time_floor_ms,
            next_offset: start.offset,
            due: VecDeque::new(),
        }
    }

    /// No retraction still unread comes before this time: the next record's time is at
    /// least the last one's.
    fn unread_bound(&self, tick: Tick, horizon_ms: u64) -> Time {
        tick.time_of(self.floor_ms) + horizon_ms
    }

    /// Whether every retraction due before `until` has been read, given that the first
    /// reader has read the partition up to `read_up_to` (everything after that has a time
    /// of at least the capability, so its retraction comes a horizon later).
    fn covers(&self, until: Time, read_up_to: u64, tick: Tick, horizon_ms: u64) -> bool {
        self.next_offset >= read_up_to || self.unread_bound(tick, horizon_ms) >= until
    }

    /// Reads a batch, stamping records exactly as the first reader did.
    fn read(&mut self, batch: &PartitionBatch, tick: Tick, horizon_ms: u64, ttl_ms: u64) {
        for record in &batch.records {
            self.floor_ms = self.floor_ms.max(record.record_time_ms);
            if is_heartbeat(&record.payload) {
                continue;
            }
            let time = tick.time_of(self.floor_ms);
            let at = RecordAt {
                offset: record.offset,
                record_time_ms: self.floor_ms,
                time,
            };
            // The first reader counted and logged what does not decode.
            if let Some(event) = decode(batch.partition.topic, at, &record.payload, ttl_ms) {
                self.due.push_back((time + horizon_ms, event));
            }
        }
        self.next_offset = self.next_offset.max(batch.next.offset);
    }
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
        Topic::Clicks => ClickEventRef::decode(payload)
            .ok()
            .map(|e| SourceEvent::Click(Click::from_payload(e, at.record_time_ms, ttl_ms))),
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

/// A reader thread: polls `start`'s partitions and hands batches to the operator. The
/// first reader of a source also tells it what it has to replay (`replay`).
fn read_loop(
    spec: SourceSpec,
    start: Vec<(PartitionId, LogPosition)>,
    replay: Option<SharedTargets>,
    tx: crossbeam_channel::Sender<Vec<PartitionBatch>>,
    activator: timely::scheduling::SyncActivator,
) {
    let wait = Duration::from_millis(spec.tick.ms()).min(Duration::from_millis(250));
    // Records of one tick share one time, so reading them in fewer, larger batches gives
    // the dataflow the same input for much less per-batch work: single-click traffic
    // makes small group commits, and reading after each one cost ~4x the CPU per click
    // (bench/ingest.rs). An eighth of a tick between reads costs that much freshness.
    // A backlog (catch-up, replay) is read without pause: only a poll that came back
    // small, i.e. a reader that has caught up, waits for the next one.
    let min_gap = Duration::from_millis(spec.tick.ms() / 8);
    const CAUGHT_UP_BELOW: usize = 1024;
    let mut last_read = Instant::now();
    let mut last_records = 0usize;
    let mut backoff = Duration::from_millis(100);
    let mut reader = loop {
        if spec.shutdown.load(Ordering::Acquire) {
            return;
        }
        match spec.log.reader(start.clone()) {
            Ok(r) => break r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot open log reader; retrying");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    };
    backoff = Duration::from_millis(100);
    // Before the first batch goes out, so the operator has them when it arrives.
    if let Some(replay) = replay {
        let targets = replay_targets(&*spec.log, &start);
        spec.replay
            .register(targets.values().map(|t| t.end - t.at).sum());
        *replay.lock() = Some(targets);
    }
    while !spec.shutdown.load(Ordering::Acquire) {
        if last_records < CAUGHT_UP_BELOW
            && let Some(rest) = min_gap.checked_sub(last_read.elapsed())
        {
            std::thread::sleep(rest);
        }
        last_read = Instant::now();
        match reader.poll(wait) {
            Ok(batches) => {
                backoff = Duration::from_millis(100);
                last_records = batches.iter().map(|b| b.records.len()).sum();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::{Display, Progress};
    use crate::record::ClickEvent;

    fn batch(partition: u32, next: u64) -> PartitionBatch {
        PartitionBatch {
            partition: PartitionId {
                topic: Topic::Clicks,
                partition,
            },
            records: Vec::new(),
            next: LogPosition {
                offset: next,
                time_floor_ms: 0,
            },
            idle_until_ms: None,
        }
    }

    #[test]
    fn replay_counts_up_to_the_end_seen_at_start_and_no_further() {
        let progress = Progress::start_with("test", "records", None, Display::Quiet);
        let counter = progress.counter();
        let part = |partition| PartitionId {
            topic: Topic::Clicks,
            partition,
        };
        let mut targets = BTreeMap::from([
            (part(0), ReplayTarget { at: 10, end: 50 }),
            (part(1), ReplayTarget { at: 0, end: 5 }),
        ]);
        assert!(!advance_replay(&mut targets, &batch(0, 30), &counter));
        assert!(!advance_replay(&mut targets, &batch(1, 5), &counter));
        assert_eq!(counter.done(), 20 + 5);
        // Records appended after the start are live traffic, not replay.
        assert!(advance_replay(&mut targets, &batch(0, 80), &counter));
        assert_eq!(counter.done(), 40 + 5);
        assert!(advance_replay(&mut targets, &batch(0, 90), &counter));
        assert_eq!(counter.done(), 45);
        progress.finish();
    }

    /// The log of a test, whose expiry readers (the readers without the catalog) are slow:
    /// a few records per poll, so the first reader is always far ahead of them and the
    /// source must hold its capability back for them.
    struct SlowExpiryLog(Arc<crate::log::embedded::EmbeddedLog>);

    impl Log for SlowExpiryLog {
        fn partitions(&self, topic: Topic) -> u32 {
            self.0.partitions(topic)
        }
        fn append(&self, records: Vec<crate::log::AppendRecord>) -> crate::log::AppendFuture {
            self.0.append(records)
        }
        fn reader(
            &self,
            start: Vec<(PartitionId, LogPosition)>,
        ) -> Result<Box<dyn crate::log::LogReader>, crate::log::LogError> {
            let inner = self.0.reader(start.clone())?;
            if start.iter().any(|(p, _)| p.topic == Topic::Ads) {
                return Ok(inner);
            }
            Ok(Box::new(SlowReader {
                inner,
                held: VecDeque::new(),
            }))
        }
        fn end_offsets(&self) -> Result<Vec<(PartitionId, u64)>, crate::log::LogError> {
            self.0.end_offsets()
        }
        fn check(&self) -> Result<(), crate::log::LogError> {
            self.0.check()
        }
    }

    /// Hands out at most 200 records per poll, after a pause.
    struct SlowReader {
        inner: Box<dyn crate::log::LogReader>,
        held: VecDeque<PartitionBatch>,
    }

    impl crate::log::LogReader for SlowReader {
        fn poll(
            &mut self,
            max_wait: Duration,
        ) -> Result<Vec<PartitionBatch>, crate::log::LogError> {
            std::thread::sleep(Duration::from_millis(2));
            if self.held.is_empty() {
                self.held.extend(self.inner.poll(max_wait)?);
            }
            let Some(mut batch) = self.held.pop_front() else {
                return Ok(Vec::new());
            };
            if batch.records.len() > 200 {
                let rest = batch.records.split_off(200);
                let last = &batch.records[199];
                let next = LogPosition {
                    offset: last.offset + 1,
                    time_floor_ms: last.record_time_ms,
                };
                self.held.push_front(PartitionBatch {
                    partition: batch.partition,
                    records: rest,
                    next: batch.next,
                    idle_until_ms: batch.idle_until_ms,
                });
                batch.next = next;
                batch.idle_until_ms = None;
            }
            Ok(vec![batch])
        }
    }

    /// Every click and verdict the source emits once at its time and
    /// retracted exactly once at time + horizon when that is before the frontier reached,
    /// never under a capability beyond its time, however far the expiry reader lags; from
    /// the start of the log and from a position in the middle (a recovery point).
    #[test]
    fn every_click_is_retracted_once_at_its_time_plus_horizon() {
        use crate::log::embedded::{EmbeddedLog, EmbeddedLogOptions};
        use crate::log::{AppendRecord, LogRecord};
        use std::cell::RefCell;
        use std::rc::Rc;

        let dir = tempfile::tempdir().expect("tmp");
        let options = |watermark_interval| EmbeddedLogOptions {
            click_partitions: 2,
            verdict_partitions: 1,
            watermark_interval,
            append_timeout: Duration::from_secs(5),
        };
        let (tick, horizon_ms, ttl_ms) = (Tick::new(Duration::from_millis(200)), 20_000, 5_000);
        // 30k clicks over 60 s of record time ending 30 s ago, then 40 verdicts: all but
        // the last ~10 s of them fall due before the clock.
        let t0 = now_ms() - 90_000;
        let clicks = 30_000u64;
        let click_part = |p| PartitionId {
            topic: Topic::Clicks,
            partition: p,
        };
        let verdicts = PartitionId {
            topic: Topic::FraudVerdicts,
            partition: 0,
        };
        let mut records: Vec<AppendRecord> = (0..clicks)
            .map(|i| AppendRecord {
                partition: click_part((i % 2) as u32),
                key: None,
                record_time_ms: Some(t0 + i * 60_000 / clicks),
                payload: ClickEvent {
                    impression_id: u128::from(i % 27_000),
                    ad_id: i % 7,
                    issued_at_ms: t0,
                    event_time_ms: t0 + i * 60_000 / clicks - i % 9_000,
                    click_id: format!("c{i}"),
                    user_id: format!("u{}", i % 501),
                    ip: std::net::IpAddr::from([10, 0, (i / 256 % 256) as u8, i as u8]),
                    cpc_micros: 1_000 + i % 3,
                }
                .encode(),
            })
            .collect();
        records.extend((0..40u64).map(|i| {
            AppendRecord {
                partition: verdicts,
                key: None,
                record_time_ms: Some(t0 + i * 1_500),
                payload: FraudVerdict {
                    impression_id: u128::from(i * 13),
                    reason: "test".into(),
                }
                .encode(),
            }
        }));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        // Appended as a backfill, without the idle clock: a log that ticks every 20 ms
        // would, on a machine slow enough to build these records in more than a tick,
        // first move its watermark to the clock and raise every record's time to it.
        let appended = {
            let backfill = EmbeddedLog::open(dir.path(), options(None)).expect("log");
            rt.block_on(backfill.append(records)).expect("append")
        };
        assert!(
            appended.iter().all(|a| a.record_time_ms < t0 + 61_000),
            "the records keep their own times"
        );
        let log = Arc::new(
            EmbeddedLog::open(dir.path(), options(Some(Duration::from_millis(20)))).expect("log"),
        );
        // The oracle reads the log as written, record by record.
        let mut reader = log
            .reader(vec![
                (click_part(0), LogPosition::default()),
                (click_part(1), LogPosition::default()),
                (verdicts, LogPosition::default()),
            ])
            .expect("reader");
        let mut written: BTreeMap<PartitionId, Vec<LogRecord>> = BTreeMap::new();
        while written.values().map(Vec::len).sum::<usize>() < appended.len() {
            for batch in reader.poll(Duration::from_millis(50)).expect("poll") {
                written
                    .entry(batch.partition)
                    .or_default()
                    .extend(batch.records);
            }
        }

        for resume_at in [0usize, 4_321] {
            let start: Vec<(PartitionId, LogPosition)> = written
                .iter()
                .map(|(p, recs)| {
                    let from = resume_at.min(recs.len());
                    let floor = if from == 0 {
                        0
                    } else {
                        recs[from - 1].record_time_ms
                    };
                    let offset = recs
                        .get(from)
                        .map_or_else(|| recs[recs.len() - 1].offset + 1, |r| r.offset);
                    (
                        *p,
                        LogPosition {
                            offset,
                            time_floor_ms: floor,
                        },
                    )
                })
                .collect();
            // Independent oracle: +1 at each record's tick, -1 a horizon later.
            let mut expected: BTreeMap<(SourceEvent, Time), isize> = BTreeMap::new();
            for (p, recs) in &written {
                for r in recs.iter().skip(resume_at) {
                    if is_heartbeat(&r.payload) {
                        continue;
                    }
                    let time = tick.time_of(r.record_time_ms);
                    let event = if p.topic == Topic::Clicks {
                        let e = ClickEvent::decode(&r.payload).expect("click");
                        SourceEvent::Click(Click::from_event(e, r.record_time_ms, ttl_ms))
                    } else {
                        SourceEvent::Verdict(Verdict {
                            impression_id: FraudVerdict::decode(&r.payload)
                                .expect("verdict")
                                .impression_id,
                            record_time_ms: r.record_time_ms,
                            time,
                        })
                    };
                    *expected.entry((event.clone(), time)).or_default() += 1;
                    *expected.entry((event, time + horizon_ms)).or_default() -= 1;
                }
            }
            let until = tick.time_of(now_ms() - 1_000);
            expected.retain(|(_, t), d| *t < until && *d != 0);
            assert!(
                expected.values().filter(|d| **d < 0).count() > 20_000,
                "the oracle must hold many retractions"
            );

            let sink = Arc::new(SinkStatus::new(0));
            let mut partitions = start;
            partitions.push((crate::log::ADS_PARTITION, LogPosition::default()));
            let spec = SourceSpec {
                log: Arc::new(SlowExpiryLog(Arc::clone(&log))),
                partitions,
                tick,
                horizon_ms,
                ttl_ms,
                catalog_committed: 0,
                shutdown: Arc::new(AtomicBool::new(false)),
                metrics: Arc::new(Metrics::new()),
                replay: Replay::new(1, Arc::clone(&sink)),
            };
            let shutdown = Arc::clone(&spec.shutdown);
            let got = timely::execute_directly(move |worker| {
                let got: Rc<RefCell<BTreeMap<(SourceEvent, Time), isize>>> = Rc::default();
                let collected = Rc::clone(&got);
                let probe = timely::dataflow::ProbeHandle::new();
                let done = probe.clone();
                worker.dataflow::<Time, _, _>(|scope| {
                    use timely::dataflow::operators::Probe;
                    use timely::dataflow::operators::core::Inspect;
                    log_source(scope, spec, done)
                        .inner
                        .inspect_core(move |event| {
                            let Ok((stamp, updates)) = event else { return };
                            for (e, t, d) in updates {
                                // An update before its message's capability would be one
                                // the frontier had already passed: lost to the arrangements.
                                assert!(
                                    stamp.iter().all(|cap| cap <= t),
                                    "update at {t} sent under capability {stamp:?}"
                                );
                                if matches!(e, SourceEvent::Click(_) | SourceEvent::Verdict(_)) {
                                    *collected.borrow_mut().entry((e.clone(), *t)).or_default() +=
                                        *d;
                                }
                            }
                        })
                        .probe_with(&probe);
                });
                let deadline = Instant::now() + Duration::from_secs(60);
                while probe.less_than(&until) {
                    assert!(Instant::now() < deadline, "the frontier stalled");
                    worker.step_or_park(Some(Duration::from_millis(5)));
                }
                shutdown.store(true, Ordering::Release);
                for dataflow in worker.installed_dataflows() {
                    worker.drop_dataflow(dataflow);
                }
                got.take()
            });
            let mut got = got;
            got.retain(|(_, t), d| *t < until && *d != 0);
            assert_eq!(
                got.len(),
                expected.len(),
                "updates before {until} (resumed at {resume_at})"
            );
            assert!(
                got == expected,
                "the source's updates differ from the oracle's (resumed at {resume_at})"
            );
        }
    }

    #[test]
    fn replay_ends_only_once_the_sink_has_seen_the_replayed_records() {
        let sink = Arc::new(SinkStatus::new(0));
        let replay = Replay::new(1, Arc::clone(&sink));
        let mut source = SourceReplay {
            replay: Arc::clone(&replay),
            from_reader: SharedTargets::default(),
            phase: ReplayPhase::Waiting,
        };
        let target = ReplayTarget { at: 0, end: 10 };
        *source.from_reader.lock() = Some(BTreeMap::from([(batch(0, 0).partition, target)]));
        source.receive();
        source.ingested(&batch(0, 6), Some(600));
        source.check();
        source.ingested(&batch(0, 10), Some(1_000));
        source.check();
        assert!(
            !replay.caught_up(),
            "handed over, but not yet through the dataflow"
        );
        sink.observe(1_000);
        source.check();
        assert!(!replay.caught_up(), "the sink has not passed time 1000 yet");
        sink.observe(1_100);
        source.check();
        assert!(replay.caught_up());
    }
}
