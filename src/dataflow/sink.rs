//! The click sink: commits view changes and log positions together, once per frontier
//! advance, through one writer.
//!
//! All view rows and position markers are exchanged to worker 0, whose `ClickSink`
//! operator sees the global frontier. When it passes `upper`, every change at a time
//! before `upper` is final; the operator consolidates them into absolute values per key
//! and hands one [`ChangeBatch`] to the writer thread, which commits it with the
//! positions in ONE store transaction. The operator never blocks: while the writer is
//! busy (or the store is down), later batches fold into the one waiting, so the backlog
//! is bounded by the number of distinct keys, and the committed frontier holds.
//!
//! Recovery: the operator stays silent below the committed frontier `as_of`, and rows of
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

/// The slot between the sink operator and the writer thread.
#[derive(Default)]
pub struct Handoff {
    state: Mutex<(Option<(ChangeBatch, Tally)>, bool)>,
    ready: Condvar,
}

impl Handoff {
    /// Offers a batch; folds it into one the writer has not taken yet.
    pub fn offer(&self, batch: ChangeBatch, tally: Tally) {
        let mut state = self.state.lock();
        match &mut state.0 {
            Some((waiting, waiting_tally)) => {
                waiting.absorb(batch);
                waiting_tally.absorb(tally);
            }
            slot @ None => *slot = Some((batch, tally)),
        }
        self.ready.notify_one();
    }

    /// No more batches will come.
    pub fn close(&self) {
        self.state.lock().1 = true;
        self.ready.notify_all();
    }

    /// Waits for a batch; `None` once closed and drained.
    pub fn take(&self) -> Option<(ChangeBatch, Tally)> {
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

    /// A batch if one is waiting.
    pub fn try_take(&self) -> Option<(ChangeBatch, Tally)> {
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
    /// Positions committed with `as_of`.
    pub positions: BTreeMap<PartitionId, LogPosition>,
    /// When windows become final.
    pub finality: Finality,
    /// The view registry.
    pub views: &'static [ViewDef],
    /// Batches without row changes are committed at most this often.
    pub idle_commit_interval: Duration,
    /// Where the sink reports the frontier it sees.
    pub status: Arc<SinkStatus>,
}

/// Installs the sink on worker 0 for `records`.
pub fn click_sink(records: VecCollection<'_, Time, SinkRecord>, spec: SinkSpec) {
    let SinkSpec {
        handoff,
        as_of,
        mut positions,
        finality,
        views,
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
    // Updates by time, so the ones before a new `upper` split off without moving the rest.
    let mut pending: BTreeMap<Time, Vec<(SinkRecord, isize)>> = BTreeMap::new();
    let mut last_upper = as_of;
    let mut last_keys = 0;
    let mut last_offer = Instant::now();
    let classes = ClassColumns::of(views);
    // Found once: by column name for every row update, it was 9% of this operator.
    let windows: Vec<Option<usize>> = views.iter().map(ViewDef::window_index).collect();
    let mut tally = Tally::default();
    let to_worker_zero = Exchange::new(|_: &(SinkRecord, Time, isize)| 0u64);
    records
        .inner
        .sink(to_worker_zero, "ClickSink", move |(input, frontier)| {
            input.for_each(|_, data| {
                for (record, time, diff) in data.drain(..) {
                    pending.entry(time).or_default().push((record, diff));
                }
            });
            if let Some(&f) = frontier.frontier().as_option() {
                status.observe(f);
            }
            if !committer {
                pending.clear();
                return;
            }
            // An empty frontier means the dataflow is shutting down: what is in flight will
            // be replayed on restart, so nothing is committed for it.
            let Some(&upper) = frontier.frontier().as_option() else {
                return;
            };
            if upper <= last_upper {
                return;
            }
            let later = pending.split_off(&upper);
            let ready = std::mem::replace(&mut pending, later);

            // Sized like the last commit's, so a large commit does not rehash as it fills.
            let mut rows: HashMap<(u16, Row), Vec<(Row, isize)>> =
                HashMap::with_capacity(last_keys);
            let ready = ready
                .into_iter()
                .flat_map(|(time, updates)| updates.into_iter().map(move |(r, d)| (r, time, d)));
            for (record, time, diff) in ready {
                if time < as_of {
                    continue;
                }
                match record {
                    SinkRecord::ClicksRead(n) => {
                        tally.clicks_read += n * diff.max(0) as u64;
                    }
                    SinkRecord::Position(p, pos) => {
                        let e = positions.entry(p).or_insert(pos);
                        if pos.offset >= e.offset {
                            *e = pos;
                        }
                    }
                    SinkRecord::Row { view, key, value } => {
                        let Some((def, window)) =
                            views.get(view as usize).zip(windows.get(view as usize))
                        else {
                            continue;
                        };
                        let final_at = window
                            .and_then(|i| window_start(&key, i))
                            .map(|w| finality.final_at(w, def.window.length_ms))
                            .unwrap_or(Time::MAX);
                        if time >= final_at {
                            continue;
                        }
                        accumulate(rows.entry((view, key)).or_default(), value, diff);
                    }
                }
            }
            last_upper = upper;
            last_keys = rows.len();

            // Sized per view up front: grown as they fill, these maps' rehashing was 1% of
            // a worker's time in `bench/dataflow.rs`.
            let mut per_view = vec![0usize; views.len()];
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
                if let Some(c) = classes.filter(|c| c.view == view) {
                    c.count(&updates, &mut tally);
                }
                // Off unless asked for: every row the sink hands over, with its net updates.
                tracing::debug!(
                    target: "clickagg::sink::rows",
                    upper,
                    view = views[view as usize].name,
                    ?key,
                    ?updates,
                    "row"
                );
                if let Some(change) = absolute_value(views[view as usize].name, &key, updates) {
                    changes[view as usize].insert(key, change);
                }
            }
            let changed = changes.iter().any(|c| !c.is_empty());
            if changed || last_offer.elapsed() >= idle_commit_interval {
                last_offer = Instant::now();
                handoff.offer(
                    ChangeBatch {
                        upper,
                        views: changes,
                        positions: positions.clone(),
                    },
                    std::mem::take(&mut tally),
                );
            }
        });
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

/// Starts the writer thread that commits what the sink operator hands off.
pub fn spawn_writer(
    store: Arc<dyn Store>,
    handoff: Arc<Handoff>,
    status: Arc<SinkStatus>,
    metrics: Arc<Metrics>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("sink-writer".into()).spawn(move || {
        while let Some((mut batch, mut tally)) = handoff.take() {
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
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                        if let Some((later, later_tally)) = handoff.try_take() {
                            batch.absorb(later);
                            tally.absorb(later_tally);
                        }
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
    fn handoff_folds_batches_the_writer_has_not_taken() {
        let h = Handoff::default();
        let read = |n| Tally {
            clicks_read: n,
            ..Default::default()
        };
        h.offer(
            ChangeBatch {
                upper: 1,
                ..Default::default()
            },
            read(3),
        );
        h.offer(
            ChangeBatch {
                upper: 2,
                ..Default::default()
            },
            read(4),
        );
        assert_eq!(
            h.try_take().map(|(b, t)| (b.upper, t.clicks_read)),
            Some((2, 7))
        );
        h.close();
        assert!(h.take().is_none());
    }
}
