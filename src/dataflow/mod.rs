//! The dataflow: log source -> classify -> views -> click sink, on timely workers.

pub mod arrangements;
pub mod bursts;
pub mod classify;
pub mod count;
pub mod dedup;
pub mod demux;
pub mod distinct;
pub mod harness;
pub mod lookup;
pub mod packed;
pub mod pending;
pub mod sink;
pub mod source;
pub mod updates;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use differential_dataflow::{AsCollection, VecCollection};
use prometheus_client::metrics::gauge::Gauge;
use timely::communication::WorkerGuards;
use timely::dataflow::operators::Probe;

use self::classify::{Rules, classify, latest_ads};
use self::demux::{SourceStreams, split_events};
use self::sink::{
    Consolidator, Handoff, SinkRecord, SinkSpec, SinkStatus, click_sink, spawn_writer,
};
use self::source::{Replay, SourceSpec, log_source};
use crate::cluster::{ClusterSpec, Heartbeat, Liveness, Watchdog, agree_on_recovery};
use crate::log::{ADS_PARTITION, Log, LogPosition, all_partitions};
use crate::metrics::Metrics;
use crate::record::{PartitionId, Topic};
use crate::store::{RecoveryPoint, Store};
use crate::time::{Finality, Tick, Time};
use crate::views::{ViewDef, ViewInputs};

/// Gauges of the state the in-place operators hold (arrangements report theirs through
/// differential's logging, `arrangements.rs`), and how large it is expected to grow.
#[derive(Clone, Debug, Default)]
pub struct StateGauges {
    /// Impressions the dedup holds a winner for.
    pub dedup_impressions: Gauge,
    /// Updates the in-place operators hold back until their time is complete.
    pub pending_updates: Gauge,
    /// Impressions this worker's dedup makes room for before it starts:
    /// its share of the clicks the replay will read (see [`expected_impressions`]).
    pub expected_impressions: usize,
}

/// Room is reserved for at most this many impressions per worker: tables of 8M slots, the
/// size the dedup's reaches anyway past 3.5M impressions. The hint
/// is the replay's clicks, which a horizon of live traffic matches (each click one
/// impression, a few duplicates); a hint far too high would cost memory, since the slots
/// in use are spread over the whole table.
const MAX_RESERVED_IMPRESSIONS: usize = 4 << 20;

/// A worker's share of the clicks between the replay's start positions (`starts`, from
/// [`start_positions`]) and the log's end: an upper bound on the impressions its dedup
/// holds once the replay is read (each click has one impression, and the replay starts a
/// horizon back, so nothing older is live). 0 when the log cannot say: the tables then
/// grow as they fill.
pub fn expected_impressions(
    log: &dyn Log,
    starts: &[(PartitionId, LogPosition)],
    peers: usize,
) -> usize {
    let ends = match log.end_offsets() {
        Ok(ends) => ends,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the log's end offsets; the dedup's table grows as it fills");
            return 0;
        }
    };
    let starts: std::collections::BTreeMap<PartitionId, LogPosition> =
        starts.iter().copied().collect();
    replay_share(&ends, &starts, peers)
}

/// A worker's share of the click records between `starts` and `ends`, at most
/// [`MAX_RESERVED_IMPRESSIONS`].
fn replay_share(
    ends: &[(PartitionId, u64)],
    starts: &std::collections::BTreeMap<PartitionId, LogPosition>,
    peers: usize,
) -> usize {
    let clicks: u64 = ends
        .iter()
        .filter(|(p, _)| p.topic == Topic::Clicks)
        .map(|(p, end)| end.saturating_sub(starts.get(p).map_or(0, |s| s.offset)))
        .sum();
    let share = clicks / peers.max(1) as u64;
    usize::try_from(share).map_or(MAX_RESERVED_IMPRESSIONS, |n| {
        n.min(MAX_RESERVED_IMPRESSIONS)
    })
}

/// The inputs every view reads, built from the source's events; `state` reports what the
/// in-place operators hold.
pub fn view_inputs<'s>(
    events: &SourceStreams<'s>,
    rules: Rules,
    finality: Finality,
    state: StateGauges,
) -> ViewInputs<'s> {
    let pending_updates = state.pending_updates.clone();
    let classification = classify(events.clicks.clone(), events.verdicts.clone(), rules, state);
    let classified = classification
        .billable
        .clone()
        .concat(classification.fraud.clone())
        .concat(classification.late.clone());
    ViewInputs {
        classified,
        billable: classification.billable,
        fraud: classification.fraud,
        late: classification.late,
        first_verdicts: classification.first_verdicts,
        burst_flagged: classification.burst_flagged,
        ads: latest_ads(events.ads.clone()),
        finality,
        pending_updates,
    }
}

/// Every view's rows, tagged with the view's index, as one collection for the sink.
pub fn view_records<'s>(
    inputs: &ViewInputs<'s>,
    views: &'static [ViewDef],
) -> VecCollection<'s, Time, SinkRecord> {
    let scope = inputs.classified.scope();
    let each = views.iter().enumerate().map(|(i, view)| {
        (view.build)(inputs).map(move |(key, value)| SinkRecord::Row {
            view: i as u16,
            key,
            value,
        })
    });
    differential_dataflow::collection::concatenate(scope, each)
}

/// How to run the dataflow.
#[derive(Clone, Debug)]
pub struct EngineSpec {
    /// The processes of the worker cluster and the worker threads in each.
    pub cluster: ClusterSpec,
    /// The tick.
    pub tick: Tick,
    /// The horizon in ms (a whole number of ticks).
    pub horizon_ms: u64,
    /// The impression TTL in ms.
    pub ttl_ms: u64,
    /// Nice value of the worker threads (`thread_priority`); 0 leaves them as started.
    pub background_nice: i32,
    /// Classification rules.
    pub rules: Rules,
    /// When windows become final.
    pub finality: Finality,
    /// Commits without row changes at most this often.
    pub idle_commit_interval: Duration,
    /// The views to build; the store must have been opened with the same list.
    pub views: &'static [ViewDef],
}

/// The running dataflow and its sink writer.
pub struct Engine {
    guards: Option<WorkerGuards<()>>,
    shutdown: Arc<AtomicBool>,
    handoff: Arc<Handoff>,
    writer: Option<JoinHandle<()>>,
    heartbeat: Option<Arc<Heartbeat>>,
    /// What the sink has committed (in process 0) or seen (in the others).
    pub status: Arc<SinkStatus>,
    /// How far this process's readers have replayed the log since the start.
    pub replay: Arc<Replay>,
}

/// How many of this process's workers read partitions (and so run a log reader): worker
/// `w` (global index) reads partitions `i` with `i % peers == w`.
fn local_readers(cluster: &ClusterSpec, partitions: usize) -> usize {
    let first = cluster.process * cluster.workers;
    (first..first + cluster.workers)
        .filter(|&w| w < partitions)
        .count()
}

/// The engine could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot start the dataflow: {0}")]
pub struct EngineError(String);

/// How much merge work an arrangement does per scheduling beyond what new batches pay
/// for, while it holds more than one batch.
const IDLE_MERGE_EFFORT: usize = 4_096;

/// Timely worker settings for our dataflows: arrangements keep merging while they hold
/// more than one non-empty batch, not only when new updates arrive. Expired clicks leave
/// as `+1`/`-1` pairs that only a merge consolidates; without this they wait for the next
/// large merge, and the state (and RSS) swings in a wide sawtooth around its level.
pub fn worker_config() -> timely::WorkerConfig {
    let exert: differential_dataflow::trace::ExertionLogic =
        Arc::new(|layers: &[(usize, usize, usize)]| {
            let mut non_empty = 0;
            for (_level, count, length) in layers {
                if *count > 1 {
                    return Some(IDLE_MERGE_EFFORT);
                }
                if *length > 0 {
                    non_empty += 1;
                    if non_empty > 1 {
                        return Some(IDLE_MERGE_EFFORT);
                    }
                }
            }
            None
        });
    let mut config = timely::WorkerConfig::default();
    config.set("differential/default_exert_logic".to_owned(), exert);
    config
}

/// Where each partition starts: catalog changes from the beginning (they never expire),
/// clicks and verdicts from the recovery point's replay positions.
pub fn start_positions(log: &dyn Log, recovery: &RecoveryPoint) -> Vec<(PartitionId, LogPosition)> {
    all_partitions(log)
        .into_iter()
        .map(|p| {
            let pos = match p.topic {
                Topic::Ads => LogPosition::default(),
                _ => recovery.replay_from.get(&p).copied().unwrap_or_default(),
            };
            (p, pos)
        })
        .collect()
}

impl Engine {
    /// Starts the workers and, in the committing process, claims the store, reads its
    /// recovery point and starts the sink writer. Blocks until every peer process of a
    /// cluster has connected.
    pub fn start(
        log: Arc<dyn Log>,
        store: Arc<dyn Store>,
        spec: EngineSpec,
        metrics: Arc<Metrics>,
    ) -> Result<Engine, EngineError> {
        let views = spec.views;
        let shutdown = Arc::new(AtomicBool::new(false));
        let handoff = Arc::new(Handoff::default());
        let (status, writer, recovery) = if spec.cluster.is_committer() {
            // Claim first: a stale writer is fenced before we read what it committed.
            let claim = store
                .claim_writer()
                .map_err(|e| EngineError(format!("cannot become the store's writer: {e}")))?;
            tracing::info!(
                generation = claim.generation,
                "claimed the store as its one writer"
            );
            let recovery = store
                .recovery_point(spec.tick.ms(), spec.horizon_ms)
                .map_err(|e| EngineError(format!("reading the committed progress: {e}")))?;
            tracing::info!(
                committed_frontier = recovery.as_of,
                replay_from = ?recovery.replay_from,
                horizon_ms = spec.horizon_ms,
                "recovery point"
            );
            let status = Arc::new(SinkStatus::new(recovery.as_of));
            let consolidator = Consolidator::new(
                recovery.as_of,
                recovery.committed.clone(),
                spec.finality,
                views,
            );
            let writer = spawn_writer(
                store,
                Arc::clone(&handoff),
                consolidator,
                Arc::clone(&status),
                Arc::clone(&metrics),
                spec.background_nice,
            )
            .map_err(|e| EngineError(format!("sink writer thread: {e}")))?;
            (status, Some(writer), Some(recovery))
        } else {
            (Arc::new(SinkStatus::follower()), None, None)
        };

        let replay = Replay::new(
            local_readers(&spec.cluster, all_partitions(&*log).len()),
            Arc::clone(&status),
        );
        let heartbeat = Watchdog::start(&spec.cluster)
            .map_err(|e| EngineError(format!("watchdog thread: {e}")))?;
        if spec.cluster.is_distributed() {
            tracing::info!(
                process = spec.cluster.process,
                processes = ?spec.cluster.processes,
                workers_per_process = spec.cluster.workers,
                "connecting to the other worker processes"
            );
        }
        let config = timely::Config {
            communication: spec.cluster.communication(),
            worker: worker_config(),
        };
        let stop = Arc::clone(&shutdown);
        let (sink_handoff, sink_status, running, replaying) = (
            Arc::clone(&handoff),
            Arc::clone(&status),
            heartbeat.clone(),
            Arc::clone(&replay),
        );
        let background_nice = spec.background_nice;
        let guards = timely::execute(config, move |worker| {
            crate::thread_priority::lower_this_thread(background_nice, "timely worker");
            let mut liveness = running
                .as_ref()
                .map(|h| Liveness::build(worker, Arc::clone(h)));
            if let Some(h) = &running {
                h.running();
            }
            let mine = (worker.index() == 0).then(|| recovery.clone()).flatten();
            let Some(recovery) = agree_on_recovery(worker, mine, liveness.as_mut()) else {
                tracing::error!("worker 0 sent no recovery point; stopping this worker");
                return;
            };
            sink_status.set_recovery_target(recovery.as_of);
            let (index, peers) = (worker.index(), worker.peers());
            if index == 0 {
                tracing::info!(
                    as_of = recovery.as_of,
                    replay_from = ?recovery.replay_from,
                    peers,
                    "starting dataflow"
                );
            }
            let starts = start_positions(&*log, &recovery);
            let mine: Vec<(PartitionId, LogPosition)> = starts
                .iter()
                .enumerate()
                .filter(|(i, _)| i % peers == index)
                .map(|(_, p)| *p)
                .collect();
            let source_spec = SourceSpec {
                log: Arc::clone(&log),
                partitions: mine,
                tick: spec.tick,
                horizon_ms: spec.horizon_ms,
                ttl_ms: spec.ttl_ms,
                catalog_committed: recovery
                    .committed
                    .get(&ADS_PARTITION)
                    .map_or(0, |p| p.offset),
                shutdown: Arc::clone(&stop),
                metrics: Arc::clone(&metrics),
                replay: Arc::clone(&replaying),
            };
            let sink_spec = SinkSpec {
                handoff: Arc::clone(&sink_handoff),
                as_of: recovery.as_of,
                idle_commit_interval: spec.idle_commit_interval,
                status: Arc::clone(&sink_status),
            };
            let (rules, finality) = (spec.rules, spec.finality);
            let state = StateGauges {
                dedup_impressions: metrics.dedup_impressions.clone(),
                pending_updates: metrics.pending_updates.clone(),
                expected_impressions: expected_impressions(&*log, &starts, peers),
            };
            arrangements::report_sizes(worker, &metrics);
            worker.dataflow::<Time, _, _>(move |scope| {
                // The sink's input frontier paces the source (see `source::MAX_STEP`).
                let done = timely::dataflow::ProbeHandle::new();
                let events = split_events(log_source(scope, source_spec, done.clone()));
                let inputs = view_inputs(&events, rules, finality, state);
                let records = view_records(&inputs, views).concat(events.progress);
                let records = records.inner.probe_with(&done).as_collection();
                click_sink(records, sink_spec);
            });
            while !stop.load(Ordering::Acquire) {
                worker.step_or_park(Some(Duration::from_millis(100)));
                if let Some(l) = liveness.as_mut() {
                    l.tick();
                }
            }
            // Dropped, not completed: timely would otherwise step the dataflows until
            // their frontiers are empty, and the sink would commit that empty frontier.
            for dataflow in worker.installed_dataflows() {
                worker.drop_dataflow(dataflow);
            }
        })
        .map_err(EngineError)?;
        Ok(Engine {
            guards: Some(guards),
            shutdown,
            handoff,
            writer,
            heartbeat,
            status,
            replay,
        })
    }

    /// Stops the workers, then lets the writer finish what it holds.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(h) = &self.heartbeat {
            h.stopping();
        }
        self.shutdown.store(true, Ordering::Release);
        if let Some(guards) = self.guards.take() {
            for r in guards.join() {
                if let Err(e) = r {
                    tracing::error!(error = %e, "dataflow worker failed");
                }
            }
        }
        self.handoff.close();
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            tracing::error!("sink writer panicked");
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_worker_reserves_its_share_of_the_clicks_the_replay_reads() {
        let clicks = |partition| PartitionId {
            topic: Topic::Clicks,
            partition,
        };
        let verdicts = PartitionId {
            topic: Topic::FraudVerdicts,
            partition: 0,
        };
        let ends = [(clicks(0), 1_000), (clicks(1), 600), (verdicts, 5_000)];
        let at = |offset| LogPosition {
            offset,
            time_floor_ms: 0,
        };
        // Partition 0 replays from 400, partition 1 from its start; verdicts do not count.
        let starts = [(clicks(0), at(400)), (verdicts, at(0))]
            .into_iter()
            .collect();
        assert_eq!(replay_share(&ends, &starts, 1), 1_200);
        assert_eq!(replay_share(&ends, &starts, 2), 600);
        // A start past the end (a log that was truncated) reserves nothing for it.
        let starts = [(clicks(0), at(2_000)), (clicks(1), at(600))]
            .into_iter()
            .collect();
        assert_eq!(replay_share(&ends, &starts, 1), 0);
        let huge = [(clicks(0), u64::MAX)];
        assert_eq!(
            replay_share(&huge, &Default::default(), 1),
            MAX_RESERVED_IMPRESSIONS
        );
    }

    #[test]
    fn local_readers_are_the_workers_that_get_a_partition() {
        let mut cluster = ClusterSpec::single(4);
        assert_eq!(local_readers(&cluster, 20), 4);
        assert_eq!(local_readers(&cluster, 3), 3);
        cluster.processes = vec!["a:1".into(), "b:1".into()];
        cluster.process = 1;
        // Global workers 4..8 of 8; with 6 partitions only 4 and 5 read any.
        assert_eq!(local_readers(&cluster, 6), 2);
        assert_eq!(local_readers(&cluster, 3), 0);
    }
}
