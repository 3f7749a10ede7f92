//! Billable, fraud and late clicks and spend per (ad, minute), with rollups to 5 minutes,
//! 1 hour and 1 day per ad, campaign and advertiser. The API's metrics read this view.

use differential_dataflow::difference::{IsZero, Monoid, Multiply, Semigroup};
use serde::{Deserialize, Serialize};

use crate::dataflow::count::count_in_place;
use crate::dataflow::lookup::join_in_place;
use crate::time::{Granularity, minute_of};
use crate::views::ColumnType::{Id, Int, Time};
use crate::views::{
    ClassifiedClick, ClickClass, Datum, RollupSpec, ViewCollection, ViewDef, ViewInputs,
    WindowSpec, col,
};

/// The view.
pub const VIEW: ViewDef = ViewDef {
    name: "ad_clicks",
    about: "clicks, fraud clicks, late clicks and spend per ad and minute",
    key: &[col("ad_id", Id), col("window_start", Time)],
    value: &[
        col("campaign_id", Id),
        col("advertiser_id", Id),
        col("clicks", Int),
        col("fraud_clicks", Int),
        col("late_clicks", Int),
        col("spend_micros", Int),
    ],
    window: WindowSpec {
        column: "window_start",
        length_ms: Granularity::Minute.ms(),
    },
    rollup: Some(RollupSpec {
        scopes: &[
            ("ad", "ad_id"),
            ("campaign", "campaign_id"),
            ("advertiser", "advertiser_id"),
        ],
        granularities: &Granularity::ALL,
        measures: &["clicks", "fraud_clicks", "late_clicks", "spend_micros"],
        skip: &[("ad", Granularity::Minute)],
    }),
    build,
};

/// The counters of one click, used as a difference so `count_total` sums them.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct ClickCounts {
    /// Billable clicks.
    pub clicks: i64,
    /// Fraud clicks.
    pub fraud_clicks: i64,
    /// Late clicks.
    pub late_clicks: i64,
    /// Spend of the billable clicks.
    pub spend_micros: i64,
}

impl ClickCounts {
    /// What one classified click adds.
    pub fn of(c: &ClassifiedClick) -> ClickCounts {
        match c.class {
            ClickClass::Billable => ClickCounts {
                clicks: 1,
                spend_micros: c.cpc_micros as i64,
                ..Default::default()
            },
            ClickClass::Fraud => ClickCounts {
                fraud_clicks: 1,
                ..Default::default()
            },
            ClickClass::Late => ClickCounts {
                late_clicks: 1,
                ..Default::default()
            },
        }
    }
}

impl IsZero for ClickCounts {
    fn is_zero(&self) -> bool {
        *self == ClickCounts::default()
    }
}

impl Semigroup for ClickCounts {
    fn plus_equals(&mut self, rhs: &Self) {
        self.clicks += rhs.clicks;
        self.fraud_clicks += rhs.fraud_clicks;
        self.late_clicks += rhs.late_clicks;
        self.spend_micros += rhs.spend_micros;
    }
}

impl Monoid for ClickCounts {
    fn zero() -> Self {
        ClickCounts::default()
    }
}

impl Multiply<isize> for ClickCounts {
    type Output = ClickCounts;
    fn multiply(self, rhs: &isize) -> ClickCounts {
        let k = *rhs as i64;
        ClickCounts {
            clicks: self.clicks * k,
            fraud_clicks: self.fraud_clicks * k,
            late_clicks: self.late_clicks * k,
            spend_micros: self.spend_micros * k,
        }
    }
}

fn build<'s>(inputs: &ViewInputs<'s>) -> ViewCollection<'s> {
    let clicks = inputs
        .classified
        .clone()
        .explode(|c| Some(((c.ad_id, minute_of(c.event_time_ms)), ClickCounts::of(&c))))
        // Two-stage counts: sum each worker's clicks per (ad, minute) before the exchange,
        // so a hot ad sends one partial sum per batch to its key's worker, not every click.
        .consolidate_stream();
    let counts = count_in_place(clicks, inputs.pending_updates.clone())
        .map(|((ad, minute), counts)| (ad, (minute, counts)));
    // The counts change at almost every tick, the catalog hardly ever: joined in place,
    // not through an arrangement of every count change.
    join_in_place(counts, inputs.ads.clone(), inputs.pending_updates.clone()).map(
        |(ad, ((minute, n), ad_record))| {
            (
                vec![Datum::Id(ad), Datum::Time(minute)],
                vec![
                    Datum::Id(ad_record.campaign_id),
                    Datum::Id(ad_record.advertiser_id),
                    Datum::Int(n.clicks),
                    Datum::Int(n.fraud_clicks),
                    Datum::Int(n.late_clicks),
                    Datum::Int(n.spend_micros),
                ],
            )
        },
    )
}
