//! The late-clicks side output: every impression whose clicks all arrived later than the
//! allowed lateness, with its earliest click, so late clicks are stored, never dropped.

use crate::record::impression_hex;
use crate::time::{Granularity, minute_of};
use crate::views::ColumnType::{Id, Text, Time};
use crate::views::{Datum, ViewCollection, ViewDef, ViewInputs, WindowSpec, col};

/// The view.
pub const VIEW: ViewDef = ViewDef {
    name: "late_clicks",
    about: "clicks that arrived later than the allowed lateness, one per impression",
    key: &[
        col("ad_id", Id),
        col("window_start", Time),
        col("impression_id", Text),
    ],
    value: &[
        col("click_id", Text),
        col("event_time", Time),
        col("record_time", Time),
    ],
    window: WindowSpec {
        column: "window_start",
        length_ms: Granularity::Minute.ms(),
    },
    rollup: None,
    build,
};

fn build<'s>(inputs: &ViewInputs<'s>) -> ViewCollection<'s> {
    inputs.late.clone().map(|c| {
        (
            vec![
                Datum::Id(c.ad_id),
                Datum::Time(minute_of(c.event_time_ms)),
                Datum::Text(impression_hex(c.impression_id)),
            ],
            vec![
                Datum::Text(c.click_id.to_string()),
                Datum::Time(c.event_time_ms),
                Datum::Time(c.record_time_ms),
            ],
        )
    })
}
