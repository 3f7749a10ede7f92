//! The click sink: commits view changes and log positions together, once per frontier
//! advance, through one writer.
//!
//! All view rows and position markers are exchanged to worker 0, whose `ClickSink`
//! operator sees the global frontier. When it passes `upper`, every change at a time
//! before `upper` is final; the operator hands those updates to the writer thread as a
//! [`SinkBatch`], and the writer consolidates them into absolute values per key
//! ([`Consolidator`]) and commits them with the positions in ONE store transaction. The
//! operator never blocks: while the writer is busy, later batches wait in the hand-off and
//! join the next commit, and while the store is down the writer consolidates them as they
//! come, so the backlog is bounded by the number of distinct keys, and the committed
//! frontier holds.
//!
//! Recovery: the sink stays silent below the committed frontier `as_of`, and rows of
//! windows that are final at an update's time are not stored (those updates are expiry
//! retractions of the horizon, or corrections too late to take).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use differential_dataflow::VecCollection;
// A commit hashes every row update of its times once: SipHash's resistance to chosen keys
// buys nothing for keys the dataflow made.
use hashbrown::HashMap;
use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::Operator;

use super::updates::add_update;
use crate::log::LogPosition;
use crate::metrics::Metrics;
use crate::record::PartitionId;
use crate::store::{ChangeBatch, Store, StoreError, ViewChanges};
use crate::time::{Finality, Time};
use crate::views::{Datum, Row, ViewDef, window_start};

/// What flows into the sink.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum SinkRecord {
    /// A row of the view with this index in the registry.
    Row {
        /// Index of the view.
        view: u16,
        /// Key columns.
        key: Row,
        /// Value columns.
        value: Row,
    },
    /// A source position (see `SourceEvent::Position`).
    Position(PartitionId, LogPosition),
    /// Clicks read from the log (see `SourceEvent::ClicksRead`).
    ClicksRead(u64),
}

/// The classes of counted clicks, as the `ad_clicks` view's columns hold them.
pub const CLASSES: [(&str, &str); 3] = [
    ("billable", "clicks"),
    ("fraud", "fraud_clicks"),
    ("late", "late_clicks"),
];

/// What a committed batch changed, for the metrics: counted once per commit, and only
/// for times at or after the recovered frontier, so a replay never counts twice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Clicks read from the log.
    pub clicks_read: u64,
    /// Per class of [`CLASSES`]: clicks that entered and left windows of `ad_clicks`.
    pub added: [u64; 3],
    /// See `added`.
    pub removed: [u64; 3],
}

impl Tally {
    /// Adds a later tally (batches fold while the writer is busy).
    pub fn absorb(&mut self, other: Tally) {
        self.clicks_read += other.clicks_read;
        for i in 0..CLASSES.len() {
            self.added[i] += other.added[i];
            self.removed[i] += other.removed[i];
        }
    }

    /// Clicks read that did not become a counted impression: duplicates dropped by dedup.
    /// Every new counted impression comes with a click read in the same batch, and a
    /// counted click only moves between classes or windows otherwise (removals of a
    /// window that is final are never committed), so this is never negative.
    pub fn dedup_dropped(&self) -> u64 {
        let added: u64 = self.added.iter().sum();
        let removed: u64 = self.removed.iter().sum();
        (self.clicks_read + removed).saturating_sub(added)
    }
}

/// Where the class counts sit in the `ad_clicks` view's values.
#[derive(Clone, Copy, Debug)]
struct ClassColumns {
    view: u16,
    columns: [usize; 3],
}

impl ClassColumns {
    fn of(views: &[ViewDef]) -> Option<ClassColumns> {
        let view = views.iter().position(|v| v.name == "ad_clicks")?;
        let def = &views[view];
        let mut columns = [0; 3];
        for (i, (_, column)) in CLASSES.iter().enumerate() {
            columns[i] = def.value.iter().position(|c| c.name == *column)?;
        }
        Some(ClassColumns {
            view: view as u16,
            columns,
        })
    }

    /// Adds one key's updates to the tally: its net change per class.
    fn count(&self, updates: &[(Row, isize)], tally: &mut Tally) {
        for (i, &column) in self.columns.iter().enumerate() {
            let net: i64 = updates
                .iter()
                .map(|(value, diff)| match value.get(column) {
                    Some(Datum::Int(n)) => *n * *diff as i64,
                    _ => 0,
                })
                .sum();
            if net > 0 {
                tally.added[i] += net as u64;
            } else {
                tally.removed[i] += net.unsigned_abs();
            }
        }
    }
}

/// The updates the sink operator hands to the writer thread: every record at a time
/// before `upper` that it had not handed over yet, in the containers they arrived in.
#[derive(Debug, Default)]
pub struct SinkBatch {
    /// Every update at a time before it is included.
    pub upper: Time,
    /// The updates, in arrival order: a key's updates come from one upstream operator
    /// through one channel, so they are in time order.
    pub updates: Vec<Vec<(SinkRecord, Time, isize)>>,
}

impl SinkBatch {
    /// Appends a later batch.
    fn append(&mut self, mut later: SinkBatch) {
        self.upper = self.upper.max(later.upper);
        self.updates.append(&mut later.updates);
    }
}

/// The slot between the sink operator and the writer thread.
#[derive(Default)]
pub struct Handoff {
    state: Mutex<(Option<SinkBatch>, bool)>,
    ready: Condvar,
}

impl Handoff {
    /// Offers a batch; appends it to one the writer has not taken yet.
    pub fn offer(&self, batch: SinkBatch) {
        let mut state = self.state.lock();
        match &mut state.0 {
            Some(waiting) => waiting.append(batch),
            slot @ None => *slot = Some(batch),
        }
        self.ready.notify_one();
    }

    /// No more batches will come.
    pub fn close(&self) {
        self.state.lock().1 = true;
        self.ready.notify_all();
    }

    /// Waits for a batch; `None` once closed and drained.
    pub fn take(&self) -> Option<SinkBatch> {
        let mut state = self.state.lock();
        loop {
            if let Some(batch) = state.0.take() {
                return Some(batch);
            }
            if state.1 {
                return None;
            }
            self.ready.wait(&mut state);
        }
    }

    /// Waits for a batch until `deadline`; `None` once it has passed, or once closed and
    /// drained.
    pub fn take_until(&self, deadline: Instant) -> Option<SinkBatch> {
        let mut state = self.state.lock();
        loop {
            if let Some(batch) = state.0.take() {
                return Some(batch);
            }
            if state.1 || self.ready.wait_until(&mut state, deadline).timed_out() {
                return state.0.take();
            }
        }
    }

    /// A batch if one is waiting.
    pub fn try_take(&self) -> Option<SinkBatch> {
        self.state.lock().0.take()
    }
}

/// What the sink has committed, for readiness and metrics.
#[derive(Debug, Default)]
pub struct SinkStatus {
    committed: AtomicU64,
    /// The highest input frontier this process's sink operators have seen.
    observed: AtomicU64,
    /// Not the committing process: recovery is over once `observed` passes the target.
    follower: AtomicBool,
    any_commit: AtomicBool,
    recovery_target: AtomicU64,
    last_error: Mutex<Option<String>>,
    fenced: Mutex<Option<String>>,
}

impl SinkStatus {
    /// A status that must reach `as_of` before recovery counts as finished.
    pub fn new(as_of: Time) -> SinkStatus {
        let status = SinkStatus::default();
        status.recovery_target.store(as_of, Ordering::Release);
        status.committed.store(as_of, Ordering::Release);
        status
    }

    /// The status of a process that does not commit (a worker cluster's process > 0);
    /// recovery is over once the dataflow passes the target set by
    /// [`SinkStatus::set_recovery_target`].
    pub fn follower() -> SinkStatus {
        let status = SinkStatus::default();
        status.follower.store(true, Ordering::Release);
        status.recovery_target.store(Time::MAX, Ordering::Release);
        status
    }

    /// The frontier that recovery must pass, once known.
    pub fn set_recovery_target(&self, as_of: Time) {
        self.recovery_target.store(as_of, Ordering::Release);
    }

    /// Records the sink's input frontier.
    pub fn observe(&self, frontier: Time) {
        self.observed.fetch_max(frontier, Ordering::AcqRel);
    }

    /// The highest input frontier the sink has seen in this process.
    pub fn observed(&self) -> Time {
        self.observed.load(Ordering::Acquire)
    }

    /// The committed frontier as of the last successful commit (or the recovered one).
    pub fn committed(&self) -> Time {
        self.committed.load(Ordering::Acquire)
    }

    /// Whether the sink has committed beyond the recovered frontier: recovery is over.
    pub fn recovered(&self) -> bool {
        if self.follower.load(Ordering::Acquire) {
            return self.observed() > self.recovery_target.load(Ordering::Acquire);
        }
        self.any_commit.load(Ordering::Acquire)
            && self.committed.load(Ordering::Acquire) > self.recovery_target.load(Ordering::Acquire)
    }

    /// Whether this process commits (process 0), rather than following.
    pub fn commits(&self) -> bool {
        !self.follower.load(Ordering::Acquire)
    }

    /// The last commit error, until the next success.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().clone()
    }

    /// Why the writer stopped for good: another writer holds the store.
    pub fn fenced(&self) -> Option<String> {
        self.fenced.lock().clone()
    }

    /// Resolves once the writer has been fenced, with the reason: the process must stop.
    pub async fn wait_fenced(&self) -> String {
        loop {
            if let Some(why) = self.fenced() {
                return why;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// What the sink operator needs.
#[derive(Clone)]
pub struct SinkSpec {
    /// Hand-off to the writer thread.
    pub handoff: Arc<Handoff>,
    /// The committed frontier to stay silent below.
    pub as_of: Time,
    /// Batches without row changes are committed at most this often.
    pub idle_commit_interval: Duration,
    /// Where the sink reports the frontier it sees.
    pub status: Arc<SinkStatus>,
}

/// Installs the sink on worker 0 for `records`.
///
/// The operator only keeps time: it holds the updates until the frontier passes them and
/// hands them over as they came. Consolidating them into rows ([`Consolidator`]) is most
/// of a sink's work, and the writer thread does it, beside the workers rather than on
/// worker 0, which would otherwise do it on top of its share of the dataflow.
pub fn click_sink(records: VecCollection<'_, Time, SinkRecord>, spec: SinkSpec) {
    let SinkSpec {
        handoff,
        as_of,
        idle_commit_interval,
        status,
    } = spec;
    // Every worker builds the same dataflow, so every worker has a `ClickSink`; the
    // exchange routes all rows to worker 0, and only that one may hand batches to the
    // writer. Another worker's instance sees the same frontier but none of the rows: were
    // it to commit, its empty batch would claim an `upper` whose changes it never saw, and
    // the store would then skip worker 0's real batch for that `upper` as already stored.
    // Worker indexes are global across a cluster's processes: only process 0 has worker 0.
    let committer = records.inner.scope().index() == 0;
    // The input's containers, kept whole: most hold updates of one time and are handed
    // over whole at the next frontier.
    let mut pending: Vec<Vec<(SinkRecord, Time, isize)>> = Vec::new();
    let mut last_upper = as_of;
    // Until the frontier passes `as_of`, a replay brings updates that were committed
    // before the restart: dropped as they come rather than held until then.
    let mut replaying = true;
    let mut last_offer = Instant::now();
    let to_worker_zero = Exchange::new(|_: &(SinkRecord, Time, isize)| 0u64);
    records
        .inner
        .sink(to_worker_zero, "ClickSink", move |(input, frontier)| {
            input.for_each(|_, data| {
                if replaying {
                    data.retain(|(_, time, _)| *time >= as_of);
                }
                if committer && !data.is_empty() {
                    pending.push(std::mem::take(data));
                }
            });
            let Some(&upper) = frontier.frontier().as_option() else {
                // An empty frontier means the dataflow is shutting down: what is in flight
                // will be replayed on restart, so nothing is committed for it.
                return;
            };
            status.observe(upper);
            replaying &= upper <= as_of;
            if !committer || upper <= last_upper {
                return;
            }
            last_upper = upper;
            let updates = take_before(&mut pending, upper);
            let rows = updates
                .iter()
                .flatten()
                .any(|(record, _, _)| matches!(record, SinkRecord::Row { .. }));
            if rows || last_offer.elapsed() >= idle_commit_interval {
                last_offer = Instant::now();
                handoff.offer(SinkBatch { upper, updates });
            }
        });
}

/// The containers of updates at times before `upper`, split off from `pending`.
fn take_before(
    pending: &mut Vec<Vec<(SinkRecord, Time, isize)>>,
    upper: Time,
) -> Vec<Vec<(SinkRecord, Time, isize)>> {
    let mut ready = Vec::with_capacity(pending.len());
    pending.retain_mut(|container| {
        if container.iter().all(|(_, time, _)| *time < upper) {
            ready.push(std::mem::take(container));
            return false;
        }
        let (before, after): (Vec<_>, Vec<_>) =
            container.drain(..).partition(|(_, time, _)| *time < upper);
        if !before.is_empty() {
            ready.push(before);
        }
        *container = after;
        true
    });
    ready
}

/// Folds the sink's updates into the new absolute value of each changed key, in the
/// writer thread, and keeps the furthest position of each partition.
pub struct Consolidator {
    as_of: Time,
    upper: Time,
    positions: BTreeMap<PartitionId, LogPosition>,
    finality: Finality,
    views: &'static [ViewDef],
    // Found once: by column name for every row update, it was 9% of the sink.
    windows: Vec<Option<usize>>,
    classes: Option<ClassColumns>,
    rows: HashMap<(u16, Row), Vec<(Row, isize)>>,
    last_keys: usize,
    tally: Tally,
}

impl Consolidator {
    /// A consolidator that skips updates below the committed frontier `as_of`, whose
    /// positions were committed with it.
    pub fn new(
        as_of: Time,
        positions: BTreeMap<PartitionId, LogPosition>,
        finality: Finality,
        views: &'static [ViewDef],
    ) -> Consolidator {
        Consolidator {
            as_of,
            upper: as_of,
            positions,
            finality,
            views,
            windows: views.iter().map(ViewDef::window_index).collect(),
            classes: ClassColumns::of(views),
            rows: HashMap::new(),
            last_keys: 0,
            tally: Tally::default(),
        }
    }

    /// Adds the updates of a batch.
    pub fn add(&mut self, batch: SinkBatch) {
        self.upper = self.upper.max(batch.upper);
        if self.rows.is_empty() {
            // Sized like the last commit's, so a large commit does not rehash as it fills.
            self.rows.reserve(self.last_keys);
        }
        for (record, time, diff) in batch.updates.into_iter().flatten() {
            if time < self.as_of {
                continue;
            }
            match record {
                SinkRecord::ClicksRead(n) => {
                    self.tally.clicks_read += n * diff.max(0) as u64;
                }
                SinkRecord::Position(p, pos) => {
                    let e = self.positions.entry(p).or_insert(pos);
                    if pos.offset >= e.offset {
                        *e = pos;
                    }
                }
                SinkRecord::Row { view, key, value } => {
                    let Some((def, window)) = self
                        .views
                        .get(view as usize)
                        .zip(self.windows.get(view as usize))
                    else {
                        continue;
                    };
                    let final_at = window
                        .and_then(|i| window_start(&key, i))
                        .map(|w| self.finality.final_at(w, def.window.length_ms))
                        .unwrap_or(Time::MAX);
                    if time >= final_at {
                        continue;
                    }
                    accumulate(self.rows.entry((view, key)).or_default(), value, diff);
                }
            }
        }
    }

    /// The changes added since the last call, as absolute values up to the highest
    /// `upper` added, with the positions and the tally of what they changed.
    pub fn take(&mut self) -> (ChangeBatch, Tally) {
        let rows = std::mem::take(&mut self.rows);
        self.last_keys = rows.len();
        // Sized per view up front: grown as they fill, these maps' rehashing was 1% of
        // a worker's time in `bench/dataflow.rs`.
        let mut per_view = vec![0usize; self.views.len()];
        for (view, _) in rows.keys() {
            if let Some(n) = per_view.get_mut(*view as usize) {
                *n += 1;
            }
        }
        let mut changes: Vec<ViewChanges> = per_view
            .into_iter()
            .map(ViewChanges::with_capacity)
            .collect();
        for ((view, key), updates) in rows {
            if let Some(c) = self.classes.filter(|c| c.view == view) {
                c.count(&updates, &mut self.tally);
            }
            let name = self.views[view as usize].name;
            // Off unless asked for: every row the sink hands over, with its net updates.
            tracing::debug!(
                target: "clickagg::sink::rows",
                upper = self.upper,
                view = name,
                ?key,
                ?updates,
                "row"
            );
            if let Some(change) = absolute_value(name, &key, updates) {
                changes[view as usize].insert(key, change);
            }
        }
        let batch = ChangeBatch {
            upper: self.upper,
            views: changes,
            positions: self.positions.clone(),
        };
        (batch, std::mem::take(&mut self.tally))
    }
}

/// Adds one update to a key's updates, consolidated as they come.
///
/// The updates of a commit arrive in time order, and a view holds one value per key at a
/// time, so a counting view's key brings `-old +v1`, then `-v1 +v2`, and so on: each
/// retraction cancels the addition before it, and the list stays at two or three entries
/// however many ticks the commit covers, instead of one entry per update to sort later.
fn accumulate(updates: &mut Vec<(Row, isize)>, value: Row, diff: isize) {
    add_update(updates, value, diff);
}

/// The new absolute value of a key from its consolidated updates: the value left with a
/// positive count, `None` to delete, or nothing to do when the updates cancel out.
fn absolute_value(view: &str, key: &Row, mut updates: Vec<(Row, isize)>) -> Option<Option<Row>> {
    differential_dataflow::consolidation::consolidate(&mut updates);
    let mut present = updates.iter().filter(|(_, d)| *d > 0);
    match (present.next(), present.next()) {
        (None, _) if updates.is_empty() => None,
        (None, _) => Some(None),
        (Some((value, 1)), None) => Some(Some(value.clone())),
        (Some(first), _) => {
            // A view must hold at most one value per key; keep the stored row sane and loud.
            tracing::error!(view, ?key, updates = ?updates, "view produced several values for one key");
            Some(Some(first.0.clone()))
        }
    }
}

/// Positions as `clicks/0=120 clicks/1=98 ...` for a log line.
fn positions_text(positions: &BTreeMap<PartitionId, LogPosition>) -> String {
    positions
        .iter()
        .map(|(p, pos)| format!("{p}={}", pos.offset))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Starts the writer thread that consolidates what the sink operator hands off and
/// commits it, at the workers' nice value `nice`.
pub fn spawn_writer(
    store: Arc<dyn Store>,
    handoff: Arc<Handoff>,
    mut consolidator: Consolidator,
    status: Arc<SinkStatus>,
    metrics: Arc<Metrics>,
    nice: i32,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("sink-writer".into()).spawn(move || {
        // The workers' priority, not above it: the writer is background work like them,
        // and at a higher priority it took a core from them whenever it ran (1 s of a
        // worker's 10 s spent waiting to run in `bench/dataflow.rs`, session 29).
        crate::thread_priority::lower_this_thread(nice, "sink writer");
        while let Some(first) = handoff.take() {
            consolidator.add(first);
            // What came while this thread consolidated joins the same transaction.
            while let Some(more) = handoff.try_take() {
                consolidator.add(more);
            }
            let (mut batch, mut tally) = consolidator.take();
            let mut backoff = Duration::from_millis(100);
            loop {
                let started = Instant::now();
                match store.commit(&batch) {
                    Ok(()) => {
                        metrics.sink_commits.inc();
                        metrics.sink_rows.inc_by(batch.rows() as u64);
                        metrics.sink_commit_seconds.observe(started.elapsed().as_secs_f64());
                        metrics.committed_frontier_ms.set(batch.upper as i64);
                        metrics.record_commit(&batch.positions, &tally);
                        status.committed.store(batch.upper, Ordering::Release);
                        status.any_commit.store(true, Ordering::Release);
                        *status.last_error.lock() = None;
                        // One line per commit: the frontier and the positions it covers.
                        tracing::info!(
                            upper = batch.upper,
                            frontier = %crate::time::rfc3339(batch.upper),
                            rows = batch.rows(),
                            clicks_read = tally.clicks_read,
                            positions = %positions_text(&batch.positions),
                            took_ms = started.elapsed().as_millis() as u64,
                            "committed"
                        );
                        break;
                    }
                    Err(StoreError::Fenced(why)) => {
                        // Another writer owns the store now: committing more would corrupt
                        // it, and retrying cannot help. Stop; the process exits on this.
                        tracing::error!(reason = %why, upper = batch.upper, "sink fenced; no further commits");
                        *status.fenced.lock() = Some(why);
                        return;
                    }
                    Err(e) => {
                        metrics.sink_commit_errors.inc();
                        tracing::warn!(error = %e, upper = batch.upper, retry_in = ?backoff, "sink commit failed; frontier held");
                        *status.last_error.lock() = Some(e.to_string());
                        // Consolidated as they come while the store is down, the updates
                        // waiting stay bounded by the number of distinct keys.
                        let retry_at = Instant::now() + backoff;
                        while let Some(later) = handoff.take_until(retry_at) {
                            consolidator.add(later);
                            let (later, later_tally) = consolidator.take();
                            batch.absorb(later);
                            tally.absorb(later_tally);
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::views::Datum;

    #[test]
    fn a_chain_of_ticks_accumulates_to_the_first_retraction_and_the_last_value() {
        let v = |n| vec![Datum::Int(n)];
        let mut updates = Vec::new();
        for (value, diff) in [(0, -1), (1, 1), (2, 1), (1, -1), (2, -1), (3, 1)] {
            accumulate(&mut updates, v(value), diff);
        }
        updates.sort();
        assert_eq!(updates, vec![(v(0), -1), (v(3), 1)]);
    }

    proptest::proptest! {
        /// Accumulating as updates come gives the same absolute value as consolidating
        /// them all at once (the plain oracle).
        #[test]
        fn accumulating_agrees_with_consolidating_at_once(
            raw in proptest::collection::vec((0i64..4, proptest::prop_oneof![proptest::strategy::Just(-1isize), proptest::strategy::Just(1isize), -3isize..4]), 0..20)
        ) {
            let k = vec![Datum::Id(1)];
            let raw: Vec<(Row, isize)> = raw.into_iter().map(|(n, d)| (vec![Datum::Int(n)], d)).collect();
            let mut accumulated = Vec::new();
            for (value, diff) in raw.clone() {
                accumulate(&mut accumulated, value, diff);
            }
            let mut consolidated = raw.clone();
            differential_dataflow::consolidation::consolidate(&mut consolidated);
            accumulated.sort();
            proptest::prop_assert_eq!(&accumulated, &consolidated);
            proptest::prop_assert_eq!(absolute_value("t", &k, accumulated), absolute_value("t", &k, raw));
        }
    }

    #[test]
    fn absolute_values_follow_the_positive_update() {
        let k = vec![Datum::Id(1)];
        let v = |n| vec![Datum::Int(n)];
        assert_eq!(
            absolute_value("t", &k, vec![(v(1), -1), (v(2), 1)]),
            Some(Some(v(2)))
        );
        assert_eq!(absolute_value("t", &k, vec![(v(1), -1)]), Some(None));
        assert_eq!(absolute_value("t", &k, vec![(v(1), -1), (v(1), 1)]), None);
        assert_eq!(
            absolute_value(
                "t",
                &k,
                vec![(v(1), 1), (v(1), -1), (v(2), 1), (v(2), -1), (v(3), 1)]
            ),
            Some(Some(v(3)))
        );
    }

    #[test]
    fn handoff_appends_batches_the_writer_has_not_taken() {
        let h = Handoff::default();
        let read = |n| vec![(SinkRecord::ClicksRead(n), 0, 1)];
        h.offer(SinkBatch {
            upper: 1,
            updates: vec![read(3)],
        });
        h.offer(SinkBatch {
            upper: 2,
            updates: vec![read(4)],
        });
        let waiting = h.try_take().map(|b| (b.upper, b.updates));
        assert_eq!(waiting, Some((2, vec![read(3), read(4)])));
        assert!(
            h.take_until(Instant::now() + Duration::from_millis(10))
                .is_none()
        );
        h.close();
        assert!(h.take().is_none());
    }

    #[test]
    fn take_before_splits_off_exactly_the_updates_before_upper() {
        let u = |t: Time| (SinkRecord::ClicksRead(t), t, 1);
        let mut pending = vec![vec![u(1), u(2)], vec![u(3), u(5), u(4)], vec![u(6)]];
        let ready = take_before(&mut pending, 4);
        assert_eq!(ready, vec![vec![u(1), u(2)], vec![u(3)]]);
        assert_eq!(pending, vec![vec![u(5), u(4)], vec![u(6)]]);
    }

    /// A key's value over time for the consolidator test: `Some(users)` or absent.
    type Timeline = Vec<(Time, usize, Option<i64>)>;

    /// The value of every key after the steps at times before `until` and before the
    /// key's window is final: what the store must hold once that much is committed.
    fn stored_after(
        steps: &Timeline,
        keys: &[Row],
        finality: Finality,
        until: Time,
    ) -> BTreeMap<Row, Row> {
        let mut store = BTreeMap::new();
        for &(time, k, value) in steps {
            let window = window_start(&keys[k], 1).unwrap_or(0);
            if time >= until || time >= finality.final_at(window, 3_600_000) {
                continue;
            }
            match value {
                Some(n) => store.insert(keys[k].clone(), vec![Datum::Int(n)]),
                None => store.remove(&keys[k]),
            };
        }
        store
    }

    proptest::proptest! {
        /// Batches cut at random uppers, in random containers, consolidated and committed
        /// (or folded) at random points, leave a store that holds every key's value as of
        /// the last upper, from the store as of `as_of`: the plain replay of each key's
        /// timeline is the oracle.
        #[test]
        fn consolidated_commits_leave_each_key_at_its_value_as_of_the_upper(
            steps in proptest::collection::vec((1u64..400_000, 0usize..4, proptest::option::weighted(0.8, 0i64..4)), 1..40),
            cuts in proptest::collection::vec((0u64..12_000_000, 1usize..4, proptest::bool::ANY), 1..8),
            as_of_cut in 0usize..8,
        ) {
            // `ad_hourly_users`: key (ad, hour), value (users); its window is an hour.
            let views = crate::views::registry();
            let view = views.iter().position(|v| v.name == "ad_hourly_users").unwrap_or(0) as u16;
            let finality = Finality { ttl_ms: 0, correction_ms: 0 };
            let keys: Vec<Row> = (0..4u64)
                .map(|k| vec![Datum::Id(k % 2), Datum::Time((k / 2) * 3_600_000)])
                .collect();
            let mut time = 0;
            let mut current: Vec<Option<i64>> = vec![None; keys.len()];
            let mut timeline: Timeline = Vec::new();
            let mut updates = Vec::new();
            for (step, k, value) in steps {
                time += step;
                timeline.push((time, k, value));
                let row = |n: i64| SinkRecord::Row { view, key: keys[k].clone(), value: vec![Datum::Int(n)] };
                if let Some(old) = current[k] {
                    updates.push((row(old), time, -1));
                }
                if let Some(new) = value {
                    updates.push((row(new), time, 1));
                }
                current[k] = value;
            }
            let mut uppers: Vec<Time> = cuts.iter().map(|c| c.0).collect();
            uppers.sort_unstable();
            uppers.dedup();
            let as_of = if as_of_cut < uppers.len() { uppers[as_of_cut] } else { 0 };
            let mut store = stored_after(&timeline, &keys, finality, as_of);
            let mut consolidator = Consolidator::new(as_of, BTreeMap::new(), finality, views);
            let mut folded: Option<ChangeBatch> = None;
            let mut rest = updates.as_slice();
            for (i, &upper) in uppers.iter().enumerate() {
                let n = rest.iter().take_while(|(_, t, _)| *t < upper).count();
                let (now, later) = rest.split_at(n);
                rest = later;
                let per_container = cuts[i % cuts.len()].1;
                consolidator.add(SinkBatch {
                    upper,
                    updates: now.chunks(per_container).map(<[_]>::to_vec).collect(),
                });
                if upper <= as_of {
                    continue;
                }
                let (batch, _) = consolidator.take();
                proptest::prop_assert_eq!(batch.upper, upper);
                match folded.as_mut() {
                    Some(f) => f.absorb(batch),
                    None => folded = Some(batch),
                }
                if cuts[i % cuts.len()].2 || i + 1 == uppers.len() {
                    for (key, change) in folded.take().map(|b| b.views).unwrap_or_default().swap_remove(view as usize) {
                        match change {
                            Some(value) => store.insert(key, value),
                            None => store.remove(&key),
                        };
                    }
                }
            }
            let last = uppers.last().copied().unwrap_or(0).max(as_of);
            proptest::prop_assert_eq!(store, stored_after(&timeline, &keys, finality, last));
        }
    }
}
