//! Distinct users with a billable click, per ad and hour of event time.
//!
//! Added the way `docs/adding-a-view.md` describes, as the guide's worked example: the API
//! does not read it yet; its table `v_ad_hourly_users` is there for whoever needs it.

use crate::dataflow::distinct::count_distinct_in_place;
use crate::time::Granularity;
use crate::views::ColumnType::{Id, Int, Time};
use crate::views::{CompactId, Datum, ViewCollection, ViewDef, ViewInputs, WindowSpec, col};

/// The view.
pub const VIEW: ViewDef = ViewDef {
    name: "ad_hourly_users",
    about: "distinct users with a billable click per ad and hour",
    key: &[col("ad_id", Id), col("window_start", Time)],
    value: &[col("users", Int)],
    window: WindowSpec {
        column: "window_start",
        length_ms: Granularity::Hour.ms(),
    },
    rollup: None,
    build,
};

fn build<'s>(inputs: &ViewInputs<'s>) -> ViewCollection<'s> {
    let users = inputs.billable.clone().map(|c| {
        (
            (c.ad_id, Granularity::Hour.align(c.event_time_ms)),
            // Compact: the operator keeps every user of a group in a map.
            CompactId::of(&c.user_id),
        )
    });
    // Each user once per (ad, hour), counted in place: no arrangement of every triple.
    count_distinct_in_place(users, inputs.pending_updates.clone()).map(|((ad, hour), users)| {
        (
            vec![Datum::Id(ad), Datum::Time(hour)],
            vec![Datum::Int(users)],
        )
    })
}
