//! Billing adjustments for late fraud verdicts: one row per impression whose counted click
//! was billable when its window froze, and whose first verdict came only after that.
//!
//! The sink never changes a final window (`docs/design-notes.md`, Finality), so a verdict
//! that arrives at or after the billed minute's `final_at` leaves `ad_clicks` as it was
//! billed. This view books the correction instead, against the window the click was billed
//! in: clicks -1, fraud_clicks +1, spend_micros -cpc.
//!
//! Why the row's window is the billed minute, declared one hour long:
//! - The row appears when the verdict arrives, after the billed minute froze, so its own
//!   window must still be open then, or the sink would drop it too. With the window
//!   `[w, w + 1h)` the row is final at `final_at(w, 1h)`, 59 minutes after the billed minute
//!   froze at `final_at(w, 1m)`. That is the *adjustment period*: a verdict arriving in it
//!   makes an adjustment; a later one makes none (the view leaves it out, and the sink
//!   would drop it anyway), so what the view computes is what the store keeps.
//! - Once stored, the row must not change. After the freeze nothing but the catalog can
//!   change it: no later copy of the click can win the impression, no burst can form in
//!   its second, and the first verdict stays first. What remains is expiry (the click, a
//!   verdict that came before it, a burst partner), and each of those is retracted at or
//!   after `w - impression_ttl + horizon`, which is at or after `final_at(w, 1h)` because
//!   the minimum horizon covers the longest view window, this one. The sink ignores them.
//! - The declaration tells the truth: the row's click has its event time in `[w, w + 1m)`.

use crate::dataflow::classify::Verdict;
use crate::dataflow::lookup::join_in_place;
use crate::record::impression_hex;
use crate::time::{Finality, Granularity, minute_of};
use crate::views::ColumnType::{Id, Int, Text, Time};
use crate::views::{ClassifiedClick, Datum, ViewCollection, ViewDef, ViewInputs, WindowSpec, col};

/// The view.
pub const VIEW: ViewDef = ViewDef {
    name: "fraud_adjustments",
    about: "billable clicks of frozen windows that a later fraud verdict named, one per impression",
    key: &[
        col("ad_id", Id),
        col("window_start", Time),
        col("impression_id", Text),
    ],
    value: &[
        col("campaign_id", Id),
        col("advertiser_id", Id),
        col("click_id", Text),
        col("event_time", Time),
        col("verdict_time", Time),
        col("clicks", Int),
        col("fraud_clicks", Int),
        col("spend_micros", Int),
    ],
    window: WindowSpec {
        column: "window_start",
        length_ms: ADJUSTABLE_MS,
    },
    rollup: None,
    build,
};

/// How long after the billed minute starts its adjustments stay open: the billed minute,
/// then 59 minutes of adjustment period once it is final.
pub const ADJUSTABLE_MS: u64 = Granularity::Hour.ms();

/// The window `ad_clicks` bills a click in.
const BILLED_MS: u64 = Granularity::Minute.ms();

fn build<'s>(inputs: &ViewInputs<'s>) -> ViewCollection<'s> {
    let finality = inputs.finality;
    let adjusted = inputs
        .fraud
        .clone()
        .map(|c| (c.impression_id, c))
        .antijoin(inputs.burst_flagged.clone()) // fraud by a verdict alone
        .join(inputs.first_verdicts.clone())
        .filter(move |(_, (click, first))| came_after_freeze(finality, click, first))
        .map(|(_, (click, first))| (click.ad_id, (click, first)));
    join_in_place(adjusted, inputs.ads.clone(), inputs.pending_updates.clone()).map(
        |(_, ((click, first), ad))| {
            (
                vec![
                    Datum::Id(click.ad_id),
                    Datum::Time(minute_of(click.event_time_ms)),
                    Datum::Text(impression_hex(click.impression_id)),
                ],
                vec![
                    Datum::Id(ad.campaign_id),
                    Datum::Id(ad.advertiser_id),
                    Datum::Text(click.click_id.to_string()),
                    Datum::Time(click.event_time_ms),
                    Datum::Time(first.record_time_ms),
                    Datum::Int(-1),
                    Datum::Int(1),
                    Datum::Int(-(click.cpc_micros as i64)),
                ],
            )
        },
    )
}

/// Whether the impression's first verdict reached the dataflow at or after the click's
/// billed minute froze (so the click was billed), and before this view's row froze.
///
/// Both sides compare timely times, exactly as the sink does: a verdict at time `t` changes
/// `ad_clicks` unless `t >= final_at`, so each verdict either changed the window or is an
/// adjustment, never both and never neither (within the adjustment period).
fn came_after_freeze(finality: Finality, click: &ClassifiedClick, first: &Verdict) -> bool {
    let billed = minute_of(click.event_time_ms);
    let froze = finality.final_at(billed, BILLED_MS);
    let closes = finality.final_at(billed, ADJUSTABLE_MS);
    froze <= first.time && first.time < closes
}
