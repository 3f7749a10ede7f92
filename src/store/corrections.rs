//! SQL of `clickagg reconcile` and `clickagg compact` that the SQLite and Postgres stores
//! share: only the placeholder syntax differs, so it is generated here from one text.

use std::collections::BTreeSet;

use super::WindowCorrection;
use crate::time::{Granularity, Millis};
use crate::views::ViewDef;

/// The table where `reconcile --fix` records what it changed.
pub(crate) const ADJUSTMENTS_TABLE: &str = "reconcile_adjustments";

/// Statements of the corrections, in a store's placeholder syntax.
pub(crate) struct CorrectionSql {
    /// Creates the adjustments table if missing.
    pub create: String,
    /// Compare-and-set of one row: 1..4 new measures, 5 ad, 6 window, 7..10 expected.
    pub update: String,
    /// Compare-and-delete: 1 ad, 2 window, 3..6 expected.
    pub delete: String,
    /// Insert where no row is: 1 ad, 2 window, 3 campaign, 4 advertiser, 5..8 measures.
    pub insert: String,
    /// Recomputes one rollup window from the rows: 1 scope, 2 id, 3 granularity,
    /// 4 window start, 5 window end.
    pub rollup: [String; 3],
    /// Deletes the recomputed window's row if it is all zero: 1 scope, 2 id,
    /// 3 granularity, 4 window start.
    pub rollup_delete_empty: String,
    /// Records one adjustment: 1 run, 2 ad, 3 window, 4 campaign, 5 advertiser,
    /// 6..9 deltas, 10 applied at.
    pub record: String,
}

const MEASURES: [&str; 4] = ["clicks", "fraud_clicks", "late_clicks", "spend_micros"];

/// The statements for the `ad_clicks` view.
pub(crate) fn correction_sql(view: &ViewDef, param: fn(usize) -> String) -> CorrectionSql {
    let table = view.table();
    let p = |i: usize| param(i);
    let set = MEASURES
        .iter()
        .enumerate()
        .map(|(i, m)| format!("{m} = {}", p(i + 1)))
        .collect::<Vec<_>>()
        .join(", ");
    let expect = |first: usize| {
        MEASURES
            .iter()
            .enumerate()
            .map(|(i, m)| format!("{m} = {}", p(first + i)))
            .collect::<Vec<_>>()
            .join(" AND ")
    };
    let sums = MEASURES
        .iter()
        .map(|m| format!("CAST(COALESCE(SUM({m}), 0) AS BIGINT)"))
        .collect::<Vec<_>>()
        .join(", ");
    let assign = MEASURES
        .iter()
        .map(|m| format!("{m} = excluded.{m}"))
        .collect::<Vec<_>>()
        .join(", ");
    let rollup = |column: &str| {
        format!(
            "INSERT INTO {rollup} (scope, scope_id, granularity, window_start, {measures})
             SELECT CAST({p1} AS TEXT), CAST({p2} AS BIGINT), CAST({p3} AS TEXT), CAST({p4} AS BIGINT), {sums} FROM {table}
             WHERE {column} = {p2} AND window_start >= {p4} AND window_start < {p5}
             ON CONFLICT (scope, scope_id, granularity, window_start) DO UPDATE SET {assign}",
            rollup = view.rollup_table(),
            measures = MEASURES.join(", "),
            p1 = p(1),
            p2 = p(2),
            p3 = p(3),
            p4 = p(4),
            p5 = p(5),
        )
    };
    CorrectionSql {
        create: format!(
            "CREATE TABLE IF NOT EXISTS {ADJUSTMENTS_TABLE} (
                 run_id TEXT NOT NULL, ad_id BIGINT NOT NULL, window_start BIGINT NOT NULL,
                 campaign_id BIGINT NOT NULL, advertiser_id BIGINT NOT NULL,
                 clicks BIGINT NOT NULL, fraud_clicks BIGINT NOT NULL,
                 late_clicks BIGINT NOT NULL, spend_micros BIGINT NOT NULL,
                 applied_at_ms BIGINT NOT NULL,
                 PRIMARY KEY (run_id, ad_id, window_start))"
        ),
        update: format!(
            "UPDATE {table} SET {set} WHERE ad_id = {} AND window_start = {} AND {}",
            p(5),
            p(6),
            expect(7)
        ),
        delete: format!(
            "DELETE FROM {table} WHERE ad_id = {} AND window_start = {} AND {}",
            p(1),
            p(2),
            expect(3)
        ),
        insert: format!(
            "INSERT INTO {table} (ad_id, window_start, campaign_id, advertiser_id, {}) \
             VALUES ({}) ON CONFLICT (ad_id, window_start) DO NOTHING",
            MEASURES.join(", "),
            (1..=8).map(p).collect::<Vec<_>>().join(", ")
        ),
        rollup: [
            rollup("ad_id"),
            rollup("campaign_id"),
            rollup("advertiser_id"),
        ],
        rollup_delete_empty: super::common::delete_empty_rollup_sql(view, &MEASURES, param),
        record: format!(
            "INSERT INTO {ADJUSTMENTS_TABLE} (run_id, ad_id, window_start, campaign_id, \
             advertiser_id, {}, applied_at_ms) VALUES ({})",
            MEASURES.join(", "),
            (1..=10).map(p).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// A rollup window to recompute: (index into [`CorrectionSql::rollup`], scope name,
/// scope id, granularity, window start).
pub(crate) type RollupWindow = (usize, &'static str, u64, Granularity, Millis);

/// Every rollup window the corrected rows fall in (the store keeps no ad-minute rollup).
pub(crate) fn rollup_windows(corrections: &[WindowCorrection]) -> BTreeSet<RollupWindow> {
    let mut out = BTreeSet::new();
    for c in corrections {
        for (i, scope, id) in [
            (0, "ad", c.ad_id),
            (1, "campaign", c.campaign_id),
            (2, "advertiser", c.advertiser_id),
        ] {
            for g in Granularity::ALL {
                if i == 0 && g == Granularity::Minute {
                    continue;
                }
                out.insert((i, scope, id, g, g.align(c.window_start)));
            }
        }
    }
    out
}

/// Statements deleting everything before a cutoff (1): view rows by their window
/// column, rollup rows, and recorded adjustments.
pub(crate) fn retention_sql(views: &[ViewDef], param: fn(usize) -> String) -> Vec<String> {
    let mut out = Vec::new();
    for v in views {
        out.push(format!(
            "DELETE FROM {} WHERE {} < {}",
            v.table(),
            v.window.column,
            param(1)
        ));
        if v.rollup.is_some() {
            out.push(format!(
                "DELETE FROM {} WHERE window_start < {}",
                v.rollup_table(),
                param(1)
            ));
        }
    }
    out.push(format!(
        "DELETE FROM {ADJUSTMENTS_TABLE} WHERE window_start < {}",
        param(1)
    ));
    out
}

/// The `ad_clicks` view among a store's views.
pub(crate) fn ad_clicks(views: &[ViewDef]) -> Option<&ViewDef> {
    views.iter().find(|v| v.name == "ad_clicks")
}

/// The `ad_clicks` view, which reconciliation reads and corrects; an error without it.
pub(crate) fn required_ad_clicks(views: &[ViewDef]) -> Result<&ViewDef, super::StoreError> {
    ad_clicks(views)
        .ok_or_else(|| super::StoreError::Inconsistent("the store has no ad_clicks view".into()))
}
