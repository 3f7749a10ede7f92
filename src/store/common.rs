//! What the SQLite and Postgres stores share beyond SQL: rollup deltas, the progress
//! encoding and the catalog and settings rules. Kept in one place so the stores cannot drift.

use std::collections::BTreeMap;

use super::{Ad, MetricScope, StoreError, Upserted, ViewChanges};
use crate::log::LogPosition;
use crate::record::PartitionId;
use crate::time::{Granularity, Millis};
use crate::views::{ColumnType, Datum, RollupSpec, Row, ViewDef, window_start};

/// Summed measure deltas per `(scope index, scope id, granularity, window start)`. Keyed
/// by the store's own numbers, so not SipHash: it was a tenth of the writer's rollup work.
pub(crate) type RollupDeltas = hashbrown::HashMap<RollupKey, Vec<i64>>;

/// `(scope index, scope id, granularity, window start)` of a rollup row.
pub(crate) type RollupKey = (usize, u64, Granularity, Millis);

/// A view's changes in key order, the order of its table's primary key: written in this
/// order, each row meets the index pages where the last one left them (SQLite's B-tree
/// and Postgres' index alike), not somewhere at random.
pub(crate) fn in_key_order(changes: &ViewChanges) -> Vec<(&Row, &Option<Row>)> {
    let mut changes: Vec<(&Row, &Option<Row>)> = changes.iter().collect();
    changes.sort_unstable_by(|a, b| a.0.cmp(b.0));
    changes
}

/// Rollup deltas sorted by key, for the same reason as [`in_key_order`]. Scopes and
/// granularities sort by their place in the view's declaration rather than by the names
/// the table stores, so this is the table's order within one scope's granularity.
pub(crate) fn deltas_in_key_order(deltas: RollupDeltas) -> Vec<(RollupKey, Vec<i64>)> {
    let mut deltas: Vec<_> = deltas.into_iter().collect();
    deltas.sort_unstable_by_key(|(key, _)| *key);
    deltas
}

/// The measures the query API reads from `ad_clicks` and its rollups, in [`super::Measures`] order.
const MEASURES: &str = "clicks, fraud_clicks, late_clicks, spend_micros";

/// A column's place in a view row: `(in key?, index)`, as [`ViewDef::column`] gives it.
type Place = (bool, usize);

/// Where a view's rollup reads its window, measures and scope ids: found by column name
/// once per commit, not for every row (the writer's second largest cost after SQLite).
pub(crate) struct RollupColumns<'v> {
    rollup: &'v RollupSpec,
    window: usize,
    measures: Vec<Option<Place>>,
    scopes: Vec<Option<Place>>,
}

impl<'v> RollupColumns<'v> {
    /// The places of `view`'s rollup columns; `None` for a view without rollups or window.
    pub(crate) fn of(view: &'v ViewDef) -> Option<RollupColumns<'v>> {
        let r = view.rollup.as_ref()?;
        Some(RollupColumns {
            rollup: r,
            window: view.window_index()?,
            measures: r.measures.iter().map(|m| view.column(m)).collect(),
            scopes: r.scopes.iter().map(|(_, c)| view.column(c)).collect(),
        })
    }

    /// Adds `sign` times a row's measures to the rollup windows it falls in.
    pub(crate) fn add(&self, key: &Row, value: Option<&Row>, sign: i64, deltas: &mut RollupDeltas) {
        let (r, Some(value)) = (self.rollup, value) else {
            return;
        };
        let Some(window) = window_start(key, self.window) else {
            return;
        };
        let get = |place: Option<Place>| -> Option<&Datum> {
            match place? {
                (true, i) => key.get(i),
                (false, i) => value.get(i),
            }
        };
        let measures: Vec<i64> = self
            .measures
            .iter()
            .map(|m| get(*m).and_then(Datum::as_i64).unwrap_or(0) * sign)
            .collect();
        for (s, ((scope, _), place)) in r.scopes.iter().zip(&self.scopes).enumerate() {
            let Some(Datum::Id(id)) = get(*place) else {
                continue;
            };
            for g in r.granularities {
                if r.skip.contains(&(*scope, *g)) {
                    continue;
                }
                let slot = deltas
                    .entry((s, *id, *g, g.align(window)))
                    .or_insert_with(|| vec![0; measures.len()]);
                for (acc, m) in slot.iter_mut().zip(&measures) {
                    *acc += m;
                }
            }
        }
    }
}

/// Deletes the rollup row of one key if every measure is zero: 1 scope, 2 scope id,
/// 3 granularity, 4 window start. A window whose rows were all deleted or moved away
/// must have no row, as if it had never been written: the stored rollups are then a
/// function of the stored rows, whatever commits the changes came in.
pub(crate) fn delete_empty_rollup_sql(
    view: &ViewDef,
    measures: &[&str],
    param: fn(usize) -> String,
) -> String {
    let zero = measures
        .iter()
        .map(|m| format!("{m} = 0"))
        .collect::<Vec<_>>()
        .join(" AND ");
    format!(
        "DELETE FROM {} WHERE scope = {} AND scope_id = {} AND granularity = {} \
         AND window_start = {} AND {zero}",
        view.rollup_table(),
        param(1),
        param(2),
        param(3),
        param(4)
    )
}

/// Whether a summed delta can have left a rollup row at zero: only a decrease can, as
/// every measure is a count or a sum of non-negative amounts.
pub(crate) fn may_empty(delta: &[i64]) -> bool {
    delta.iter().any(|x| *x < 0)
}

/// Column declarations of a view table, `name TYPE NOT NULL`, with the store's type names.
pub(crate) fn column_defs(view: &ViewDef, sql_type: fn(ColumnType) -> &'static str) -> Vec<String> {
    view.key
        .iter()
        .chain(view.value)
        .map(|c| format!("{} {} NOT NULL", c.name, sql_type(c.ty)))
        .collect()
}

/// The error for a table whose columns differ from what a view declares.
pub(crate) fn columns_differ(
    table: &str,
    view: &str,
    have: &[String],
    want: &[&str],
) -> StoreError {
    StoreError::Inconsistent(format!(
        "table {table} has columns {have:?} but view {view} declares {want:?}; \
         a changed view needs a new name or a migration of its table"
    ))
}

/// Checks the tick pinned in the store against the configured one.
pub(crate) fn check_tick(stored: &str, tick_ms: u64) -> Result<(), StoreError> {
    if stored == tick_ms.to_string() {
        return Ok(());
    }
    Err(StoreError::Inconsistent(format!(
        "the store was written with time.tick = {stored}ms, the config says {tick_ms}ms; \
         record times would replay differently, so the tick of a store cannot change"
    )))
}

/// The catalog rules for an ad upsert, given what the store holds: the advertiser must
/// exist, the campaign must be new or the advertiser's, and an ad keeps its advertiser.
pub(crate) fn check_ad_rules(
    ad: &Ad,
    advertiser_exists: bool,
    campaign_owner: Option<u64>,
    ad_owner: Option<u64>,
) -> Result<Upserted, StoreError> {
    if !advertiser_exists {
        return Err(StoreError::NotFound(format!(
            "advertiser {}",
            ad.advertiser_id
        )));
    }
    if let Some(owner) = campaign_owner
        && owner != ad.advertiser_id
    {
        return Err(StoreError::Conflict(format!(
            "campaign {} belongs to another advertiser",
            ad.campaign_id
        )));
    }
    match ad_owner {
        None => Ok(Upserted::Created),
        Some(a) if a == ad.advertiser_id => Ok(Upserted::Updated),
        Some(_) => Err(StoreError::Conflict(format!(
            "ad {} belongs to another advertiser; an ad's advertiser cannot change",
            ad.ad_id
        ))),
    }
}

/// Progress positions as stored: a JSON list of `(partition, position)`.
pub(crate) fn encode_positions(p: &BTreeMap<PartitionId, LogPosition>) -> String {
    serde_json::to_string(&p.iter().collect::<Vec<_>>()).unwrap_or_else(|_| "[]".into())
}

/// Reads positions written by [`encode_positions`].
pub(crate) fn decode_positions(s: &str) -> Result<BTreeMap<PartitionId, LogPosition>, StoreError> {
    let v: Vec<(PartitionId, LogPosition)> = serde_json::from_str(s)
        .map_err(|e| StoreError::Inconsistent(format!("progress positions: {e}")))?;
    Ok(v.into_iter().collect())
}

// SQL that both stores run, written once. Each store spells its own parameters.

/// Spells the n-th (1-based) statement parameter in a store's SQL dialect.
pub(crate) type Param = fn(usize) -> String;

/// The `ON CONFLICT (key) DO ...` action of a view upsert: overwrite the value columns.
pub(crate) fn upsert_action(values: &[&str]) -> String {
    if values.is_empty() {
        return "NOTHING".to_owned();
    }
    let sets: Vec<String> = values
        .iter()
        .map(|c| format!("{c} = excluded.{c}"))
        .collect();
    format!("UPDATE SET {}", sets.join(", "))
}

/// The columns an [`Ad`] is read from, in order.
pub(crate) const AD_COLUMNS: &str = "ad_id, advertiser_id, campaign_id, landing_url, cpc_micros";

/// Creates a campaign for its first ad: `(campaign_id, advertiser_id)`.
pub(crate) fn insert_campaign_sql(p: Param) -> String {
    format!(
        "INSERT INTO campaigns (campaign_id, advertiser_id) VALUES ({}, {}) \
         ON CONFLICT (campaign_id) DO NOTHING",
        p(1),
        p(2)
    )
}

/// Inserts or updates an ad: [`AD_COLUMNS`], then `updated_at_ms`.
pub(crate) fn upsert_ad_sql(p: Param) -> String {
    format!(
        "INSERT INTO ads ({AD_COLUMNS}, updated_at_ms) VALUES ({}, {}, {}, {}, {}, {}) \
         ON CONFLICT (ad_id) DO UPDATE SET campaign_id = excluded.campaign_id, \
         landing_url = excluded.landing_url, cpc_micros = excluded.cpc_micros, \
         updated_at_ms = excluded.updated_at_ms",
        p(1),
        p(2),
        p(3),
        p(4),
        p(5),
        p(6)
    )
}

/// The latest commit: `(upper, positions)`.
pub(crate) const LAST_PROGRESS: &str =
    "SELECT upper, positions FROM progress ORDER BY upper DESC LIMIT 1";

/// The positions of the last commit at or before a time.
pub(crate) fn progress_at_sql(p: Param) -> String {
    format!(
        "SELECT positions FROM progress WHERE upper <= {} ORDER BY upper DESC LIMIT 1",
        p(1)
    )
}

/// Records a commit: `(upper, positions, committed_at_ms)`.
pub(crate) fn insert_progress_sql(p: Param) -> String {
    format!(
        "INSERT INTO progress (upper, positions, committed_at_ms) VALUES ({}, {}, {})",
        p(1),
        p(2),
        p(3)
    )
}

/// Prunes the commits older than the last one at or before a time.
pub(crate) fn prune_progress_sql(p: Param) -> String {
    format!(
        "DELETE FROM progress WHERE upper < (SELECT max(upper) FROM progress WHERE upper <= {})",
        p(1)
    )
}

/// One ad's minutes from the view table: `(ad_id, from, to)`.
pub(crate) fn minute_series_sql(p: Param) -> String {
    format!(
        "SELECT window_start, {MEASURES} FROM {} WHERE ad_id = {} \
         AND window_start >= {} AND window_start < {} ORDER BY window_start",
        crate::dataflows::ad_clicks::VIEW.table(),
        p(1),
        p(2),
        p(3)
    )
}

/// One scope's windows from the rollups: `(scope, scope_id, granularity, from, to)`.
pub(crate) fn rollup_series_sql(p: Param) -> String {
    format!(
        "SELECT window_start, {MEASURES} FROM {} WHERE scope = {} AND scope_id = {} \
         AND granularity = {} AND window_start >= {} AND window_start < {} \
         ORDER BY window_start",
        crate::dataflows::ad_clicks::VIEW.rollup_table(),
        p(1),
        p(2),
        p(3),
        p(4),
        p(5)
    )
}

/// Per-ad sums of one advertiser's minutes: `(advertiser_id, from, to)`. The casts keep
/// the sums integers (Postgres sums BIGINT as NUMERIC).
pub(crate) fn minute_totals_sql(p: Param) -> String {
    format!(
        "SELECT ad_id, CAST(sum(clicks) AS BIGINT), CAST(sum(fraud_clicks) AS BIGINT), \
         CAST(sum(late_clicks) AS BIGINT), CAST(sum(spend_micros) AS BIGINT) \
         FROM {} WHERE advertiser_id = {} AND window_start >= {} AND window_start < {} \
         GROUP BY ad_id",
        crate::dataflows::ad_clicks::VIEW.table(),
        p(1),
        p(2),
        p(3)
    )
}

/// Per-ad sums of one advertiser's rollup windows: `(granularity, advertiser_id, from, to)`.
pub(crate) fn rollup_totals_sql(p: Param) -> String {
    format!(
        "SELECT r.scope_id, CAST(sum(r.clicks) AS BIGINT), CAST(sum(r.fraud_clicks) AS BIGINT), \
         CAST(sum(r.late_clicks) AS BIGINT), CAST(sum(r.spend_micros) AS BIGINT) \
         FROM {} r JOIN ads ON ads.ad_id = r.scope_id \
         WHERE r.scope = 'ad' AND r.granularity = {} AND ads.advertiser_id = {} \
         AND r.window_start >= {} AND r.window_start < {} GROUP BY r.scope_id",
        crate::dataflows::ad_clicks::VIEW.rollup_table(),
        p(1),
        p(2),
        p(3),
        p(4)
    )
}

/// One ad's late clicks: `(ad_id, from, to, limit)`.
pub(crate) fn late_clicks_sql(p: Param) -> String {
    format!(
        "SELECT impression_id, click_id, event_time, record_time FROM {} \
         WHERE ad_id = {} AND window_start >= {} AND window_start < {} \
         ORDER BY window_start, impression_id LIMIT {}",
        crate::dataflows::late_clicks::VIEW.table(),
        p(1),
        p(2),
        p(3),
        p(4)
    )
}

/// Which `fraud_adjustments` rows a scope reads, by the first parameter. An advertiser's
/// are found through its ads (an ad never changes advertiser), so the primary key serves.
fn adjustments_of(scope: MetricScope, p: Param) -> String {
    match scope {
        MetricScope::Ad => format!("ad_id = {}", p(1)),
        MetricScope::Campaign => format!("campaign_id = {}", p(1)),
        MetricScope::Advertiser => {
            format!(
                "ad_id IN (SELECT ad_id FROM ads WHERE advertiser_id = {})",
                p(1)
            )
        }
    }
}

/// The columns a [`super::FraudAdjustment`] is read from, in order.
pub(crate) const ADJUSTMENT_COLUMNS: &str = "ad_id, campaign_id, advertiser_id, impression_id, \
     click_id, window_start, event_time, verdict_time, clicks, fraud_clicks, spend_micros";

/// One scope's fraud adjustments: `(id, from, to, limit)`, [`ADJUSTMENT_COLUMNS`].
pub(crate) fn fraud_adjustments_sql(scope: MetricScope, p: Param) -> String {
    format!(
        "SELECT {ADJUSTMENT_COLUMNS} FROM {} WHERE {} \
         AND window_start >= {} AND window_start < {} \
         ORDER BY window_start, ad_id, impression_id LIMIT {}",
        crate::dataflows::fraud_adjustments::VIEW.table(),
        adjustments_of(scope, p),
        p(2),
        p(3),
        p(4)
    )
}

/// The totals of one scope's fraud adjustments: `(id, from, to)` -> count, clicks,
/// fraud clicks, spend. The casts keep the sums integers (Postgres sums BIGINT as NUMERIC).
pub(crate) fn fraud_adjustment_totals_sql(scope: MetricScope, p: Param) -> String {
    format!(
        "SELECT count(*), CAST(coalesce(sum(clicks), 0) AS BIGINT), \
         CAST(coalesce(sum(fraud_clicks), 0) AS BIGINT), \
         CAST(coalesce(sum(spend_micros), 0) AS BIGINT) \
         FROM {} WHERE {} AND window_start >= {} AND window_start < {}",
        crate::dataflows::fraud_adjustments::VIEW.table(),
        adjustments_of(scope, p),
        p(2),
        p(3)
    )
}
