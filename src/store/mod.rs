//! The store: view tables, rollups, progress and the catalog, behind one trait.
//!
//! The sink's contract is [`Store::commit`]: the changes of a frontier interval and the
//! log positions that produced them in ONE transaction, so a crash leaves either both or
//! neither. Recovery reads them back with [`Store::recovery_point`].

mod common;
#[cfg(test)]
pub(crate) mod conformance;
mod corrections;
pub mod postgres;
pub mod sqlite;

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::log::LogPosition;
use crate::record::PartitionId;
use crate::time::{Granularity, Millis, Time};
use crate::views::Row;

/// Absolute changes of one view: for each changed key its new value, or `None` to delete.
pub type ViewChanges = HashMap<Row, Option<Row>>;

/// Everything the sink commits for one advance of the frontier.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChangeBatch {
    /// The new frontier: every change at a time before it is included.
    pub upper: Time,
    /// Changes per view, indexed like the registry.
    pub views: Vec<ViewChanges>,
    /// For every partition, where a replay must start to see every record at `upper` or later.
    pub positions: BTreeMap<PartitionId, LogPosition>,
}

impl ChangeBatch {
    /// Folds a later batch into this one: later values win, positions only move forward.
    pub fn absorb(&mut self, later: ChangeBatch) {
        self.upper = self.upper.max(later.upper);
        if self.views.len() < later.views.len() {
            self.views.resize_with(later.views.len(), HashMap::new);
        }
        for (mine, theirs) in self.views.iter_mut().zip(later.views) {
            mine.extend(theirs);
        }
        for (p, pos) in later.positions {
            let e = self.positions.entry(p).or_insert(pos);
            if pos.offset >= e.offset {
                *e = pos;
            }
        }
    }

    /// Number of row changes.
    pub fn rows(&self) -> usize {
        self.views.iter().map(HashMap::len).sum()
    }
}

/// Where a restarted pipeline resumes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryPoint {
    /// The committed frontier F: the sink stays silent until the dataflow reaches it.
    pub as_of: Time,
    /// Positions committed with F.
    pub committed: BTreeMap<PartitionId, LogPosition>,
    /// Positions of the last commit at or before `F - horizon`: the replay starts here.
    pub replay_from: BTreeMap<PartitionId, LogPosition>,
}

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store is down or failed; try again later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The request contradicts stored data.
    #[error("{0}")]
    Conflict(String),
    /// Something the request refers to does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The stored data contradicts the configuration.
    #[error("store inconsistent: {0}")]
    Inconsistent(String),
    /// Another writer (sink) holds the store; this one must not commit and must stop.
    #[error("fenced: {0}")]
    Fenced(String),
}

/// Proof that this process is the store's one sink writer, from [`Store::claim_writer`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriterClaim {
    /// Incremented by every successful claim; commits check it in their transaction.
    pub generation: u64,
}

/// An ad in the catalog.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Ad {
    /// The ad.
    pub ad_id: u64,
    /// Its advertiser (fixed once created).
    pub advertiser_id: u64,
    /// Its campaign (owned by the same advertiser).
    pub campaign_id: u64,
    /// Where clicks are redirected.
    pub landing_url: String,
    /// Cost per click in micros.
    pub cpc_micros: u64,
}

/// Whether an upsert created or changed a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Upserted {
    /// A new row.
    Created,
    /// An existing row, changed or not.
    Updated,
}

/// Whose clicks a series sums.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricScope {
    /// One ad.
    Ad,
    /// One campaign.
    Campaign,
    /// One advertiser.
    Advertiser,
}

impl MetricScope {
    /// The scope's name in the rollup table.
    pub fn as_str(self) -> &'static str {
        match self {
            MetricScope::Ad => "ad",
            MetricScope::Campaign => "campaign",
            MetricScope::Advertiser => "advertiser",
        }
    }
}

/// Click measures of one window or one total.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Measures {
    /// Billable clicks.
    pub clicks: i64,
    /// Fraud clicks.
    pub fraud_clicks: i64,
    /// Late clicks.
    pub late_clicks: i64,
    /// Spend of the billable clicks.
    pub spend_micros: i64,
}

impl Measures {
    /// Adds another measure componentwise.
    pub fn add(&mut self, o: &Measures) {
        self.clicks += o.clicks;
        self.fraud_clicks += o.fraud_clicks;
        self.late_clicks += o.late_clicks;
        self.spend_micros += o.spend_micros;
    }
}

/// One late click as stored in the side output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LateClick {
    /// The impression, 32 hex characters.
    pub impression_id: String,
    /// The click id.
    pub click_id: String,
    /// Event time.
    pub event_time_ms: Millis,
    /// Record time.
    pub record_time_ms: Millis,
}

/// One billing adjustment as stored (`fraud_adjustments`): a click billed in a window
/// that froze before the first verdict naming its impression arrived.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FraudAdjustment {
    /// The ad.
    pub ad_id: u64,
    /// Its campaign (while the row is open, it follows the ad's campaign).
    pub campaign_id: u64,
    /// Its advertiser.
    pub advertiser_id: u64,
    /// The impression, 32 hex characters.
    pub impression_id: String,
    /// The billed click.
    pub click_id: String,
    /// Start of the minute the click was billed in.
    pub window_start_ms: Millis,
    /// The click's event time.
    pub event_time_ms: Millis,
    /// Record time of the impression's first verdict.
    pub verdict_time_ms: Millis,
    /// Change to billable clicks (-1).
    pub clicks: i64,
    /// Change to fraud clicks (+1).
    pub fraud_clicks: i64,
    /// Change to spend (minus the click's price).
    pub spend_micros: i64,
}

/// Sums over fraud adjustments.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AdjustmentTotals {
    /// How many.
    pub adjustments: i64,
    /// Change to billable clicks.
    pub clicks: i64,
    /// Change to fraud clicks.
    pub fraud_clicks: i64,
    /// Change to spend.
    pub spend_micros: i64,
}

/// The fraud adjustments of a range: the first ones up to a limit, totals over all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Adjustments {
    /// By billed window, then ad, then impression.
    pub rows: Vec<FraudAdjustment>,
    /// Over every adjustment in the range, listed or not.
    pub totals: AdjustmentTotals,
}

/// One `ad_clicks` row (an ad's minute), as `clickagg reconcile` compares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdWindow {
    /// The ad.
    pub ad_id: u64,
    /// Start of the minute.
    pub window_start: Millis,
    /// The ad's campaign, as stored with the row.
    pub campaign_id: u64,
    /// The ad's advertiser, as stored with the row.
    pub advertiser_id: u64,
    /// The row's measures.
    pub measures: Measures,
}

/// A correction of one ad's minute by `clickagg reconcile --fix`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowCorrection {
    /// The ad.
    pub ad_id: u64,
    /// Start of the minute.
    pub window_start: Millis,
    /// The ad's campaign (for the rollups and a new row).
    pub campaign_id: u64,
    /// The ad's advertiser (for the rollups and a new row).
    pub advertiser_id: u64,
    /// What the store held when reconciled (`None`: no row); the correction applies only
    /// if the row still holds exactly this, so a concurrent sink commit is never undone.
    pub expected: Option<Measures>,
    /// The re-aggregated measures (all zero: the row goes).
    pub corrected: Measures,
}

/// The store behind the sink and the query API.
pub trait Store: Send + Sync + 'static {
    /// Reads the committed frontier and positions; checks the store was written with
    /// the same tick (times must replay identically).
    fn recovery_point(&self, tick_ms: u64, horizon_ms: u64) -> Result<RecoveryPoint, StoreError>;

    /// Makes this process the store's only sink writer, or fails with
    /// [`StoreError::Fenced`] while another live writer holds it. Called once, before the
    /// dataflow starts; a writer that dies (even by SIGKILL) releases its claim, so a
    /// restart can claim again at once. After a successful claim, [`Store::commit`]
    /// checks in its own transaction that the claim still stands, and fails with
    /// `Fenced` (never retried) once it does not.
    fn claim_writer(&self) -> Result<WriterClaim, StoreError>;

    /// Commits changes and progress in one transaction. A batch whose `upper` is not
    /// beyond the committed frontier is already stored and is skipped. Requires a
    /// successful [`Store::claim_writer`] by this process.
    fn commit(&self, batch: &ChangeBatch) -> Result<(), StoreError>;

    /// The committed frontier, if anything was committed.
    fn committed_frontier(&self) -> Result<Option<Time>, StoreError>;

    /// Whether the store answers.
    fn check(&self) -> Result<(), StoreError>;

    /// Creates an advertiser with the hash of its API key.
    fn create_advertiser(
        &self,
        advertiser_id: u64,
        name: &str,
        key_hash: &[u8; 32],
    ) -> Result<(), StoreError>;

    /// The advertiser an API key hash belongs to.
    fn advertiser_for_key(&self, key_hash: &[u8; 32]) -> Result<Option<u64>, StoreError>;

    /// Checks an ad could be upserted: its advertiser exists and owns the campaign, and an
    /// existing ad keeps its advertiser.
    fn check_ad(&self, ad: &Ad) -> Result<Upserted, StoreError>;

    /// Inserts or updates an ad (checked as [`Store::check_ad`]).
    fn upsert_ad(&self, ad: &Ad) -> Result<Upserted, StoreError>;

    /// One ad.
    fn ad(&self, ad_id: u64) -> Result<Option<Ad>, StoreError>;

    /// Every ad.
    fn ads(&self) -> Result<Vec<Ad>, StoreError>;

    /// One advertiser's ads, by id.
    fn advertiser_ads(&self, advertiser_id: u64) -> Result<Vec<Ad>, StoreError>;

    /// The advertiser owning a campaign.
    fn campaign_owner(&self, campaign_id: u64) -> Result<Option<u64>, StoreError>;

    /// Whether an advertiser exists.
    fn advertiser_exists(&self, advertiser_id: u64) -> Result<bool, StoreError>;

    /// Per-window measures of one ad, campaign or advertiser in `[from, to)`.
    fn click_series(
        &self,
        scope: MetricScope,
        id: u64,
        granularity: Granularity,
        from: Millis,
        to: Millis,
    ) -> Result<Vec<(Millis, Measures)>, StoreError>;

    /// Totals per ad of one advertiser in `[from, to)` (minute-aligned).
    fn ad_totals(
        &self,
        advertiser_id: u64,
        from: Millis,
        to: Millis,
    ) -> Result<Vec<(u64, Measures)>, StoreError>;

    /// Late clicks of one ad with event times in `[from, to)`.
    fn late_clicks(
        &self,
        ad_id: u64,
        from: Millis,
        to: Millis,
        limit: usize,
    ) -> Result<Vec<LateClick>, StoreError>;

    /// Fraud adjustments of one ad, campaign or advertiser whose billed windows start in
    /// `[from, to)`: at most `limit` of them, and the totals of all.
    fn fraud_adjustments(
        &self,
        scope: MetricScope,
        id: u64,
        from: Millis,
        to: Millis,
        limit: usize,
    ) -> Result<Adjustments, StoreError>;

    /// The committed frontier and every `ad_clicks` row with a minute in `[from, to)`,
    /// read in one snapshot, so the rows are exactly those of that frontier.
    fn ad_click_windows(
        &self,
        from: Millis,
        to: Millis,
    ) -> Result<(Option<Time>, Vec<AdWindow>), StoreError>;

    /// Applies `clickagg reconcile --fix` corrections in ONE transaction: sets each row,
    /// recomputes the rollup windows it falls in from the rows, and records each change in
    /// `reconcile_adjustments` under `run_id`. Fails with [`StoreError::Conflict`] (and
    /// changes nothing) when a row no longer holds its `expected` value.
    fn apply_corrections(
        &self,
        run_id: &str,
        applied_at_ms: Millis,
        corrections: &[WindowCorrection],
    ) -> Result<(), StoreError>;

    /// Retention: deletes every view row, rollup row and reconcile adjustment whose window
    /// starts before `cutoff` (a day boundary); returns how many rows went.
    fn drop_windows_before(&self, cutoff: Millis) -> Result<u64, StoreError>;
}

/// Splits `[from, to)` into the fewest windows of the given granularities, coarsest inner.
/// `from` and `to` must be aligned to the finest granularity.
pub fn decompose(from: Millis, to: Millis) -> Vec<(Granularity, Millis, Millis)> {
    fn go(
        from: Millis,
        to: Millis,
        grans: &[Granularity],
        out: &mut Vec<(Granularity, Millis, Millis)>,
    ) {
        if from >= to {
            return;
        }
        let Some((&g, finer)) = grans.split_last() else {
            return;
        };
        let inner_from = from.div_ceil(g.ms()) * g.ms();
        let inner_to = g.align(to);
        if finer.is_empty() || inner_from >= inner_to {
            if finer.is_empty() {
                out.push((g, from, to));
            } else {
                go(from, to, finer, out);
            }
            return;
        }
        go(from, inner_from, finer, out);
        out.push((g, inner_from, inner_to));
        go(inner_to, to, finer, out);
    }
    let mut out = Vec::new();
    go(from, to, &Granularity::ALL, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decompose_covers_exactly_with_coarse_windows() {
        let day = Granularity::Day.ms();
        let from = 3 * day - 7 * 60_000; // 23:53 of day 2
        let to = 5 * day + 3_600_000 + 12 * 60_000; // 01:12 of day 5
        let parts = decompose(from, to);
        let mut t = from;
        for (g, a, b) in &parts {
            assert_eq!(*a, t, "contiguous");
            assert_eq!(a % g.ms(), 0, "aligned");
            assert_eq!((b - a) % g.ms(), 0, "whole windows");
            t = *b;
        }
        assert_eq!(t, to);
        assert!(parts.contains(&(Granularity::Day, 3 * day, 5 * day)));
        assert!(parts.len() <= 6, "{parts:?}");
        assert_eq!(decompose(60_000, 60_000), vec![]);
    }

    #[test]
    fn absorb_keeps_the_latest_value_and_furthest_positions() {
        let p = PartitionId {
            topic: crate::record::Topic::Clicks,
            partition: 0,
        };
        let k = vec![crate::views::Datum::Id(1)];
        let mut a = ChangeBatch {
            upper: 10,
            views: vec![HashMap::from([(
                k.clone(),
                Some(vec![crate::views::Datum::Int(1)]),
            )])],
            positions: BTreeMap::from([(
                p,
                LogPosition {
                    offset: 5,
                    time_floor_ms: 9,
                },
            )]),
        };
        a.absorb(ChangeBatch {
            upper: 20,
            views: vec![HashMap::from([(k.clone(), None)])],
            positions: BTreeMap::from([(
                p,
                LogPosition {
                    offset: 7,
                    time_floor_ms: 19,
                },
            )]),
        });
        assert_eq!(a.upper, 20);
        assert_eq!(a.views[0][&k], None);
        assert_eq!(a.positions[&p].offset, 7);
    }
}
