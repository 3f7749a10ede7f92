//! Advertiser metrics: per-window series, top ads, late clicks and fraud adjustments, read
//! from the store.

use std::collections::HashMap;

use axum::Json;
use axum::extract::State;
use serde::Serialize;

use super::clicks::TimeIn;
use super::error::ApiError;
use super::extract::{ApiPath, ApiQuery};
use super::{AppState, auth::Caller, blocking};
use crate::dataflows::fraud_adjustments;
use crate::store::{AdjustmentTotals, FraudAdjustment, Measures, MetricScope};
use crate::time::{Granularity, Millis, minute_of, now_ms, rfc3339};

/// A series may hold at most this many windows.
const MAX_POINTS: u64 = 50_000;

/// One window of a series.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Point {
    /// Window start, RFC 3339.
    pub window_start: String,
    /// Billable clicks.
    pub clicks: i64,
    /// Fraud clicks.
    pub fraud_clicks: i64,
    /// Late clicks.
    pub late_clicks: i64,
    /// Spend of the billable clicks.
    pub spend_micros: i64,
    /// Whether the window can no longer change.
    #[serde(rename = "final")]
    pub is_final: bool,
}

/// A series answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Series {
    /// The window length.
    pub granularity: &'static str,
    /// First window start (aligned), RFC 3339.
    pub from: String,
    /// End (exclusive, aligned), RFC 3339.
    pub to: String,
    /// Every click with a record time at or before this instant is counted; a client
    /// whose click was acknowledged by then sees it (the committed frontier minus a tick,
    /// because record times are rounded up to ticks).
    pub complete_through: Option<String>,
    /// Windows with activity, in order.
    pub points: Vec<Point>,
}

fn param_time(params: &HashMap<String, String>, name: &str) -> Result<Option<Millis>, ApiError> {
    let Some(raw) = params.get(name) else {
        return Ok(None);
    };
    let parsed = match raw.parse::<u64>() {
        Ok(ms) => TimeIn::Millis(ms),
        Err(_) => TimeIn::Text(raw.clone()),
    };
    parsed.millis().map(Some).ok_or_else(|| {
        ApiError::bad_request(
            "invalid_time",
            format!("{name}={raw:?} is neither RFC 3339 nor milliseconds since the epoch"),
        )
    })
}

/// `from`, `to` (aligned down) and the granularity of a metrics request.
fn range(
    params: &HashMap<String, String>,
    default_span: impl Fn(Granularity) -> u64,
) -> Result<(Granularity, Millis, Millis), ApiError> {
    let g = match params.get("granularity") {
        None => Granularity::Minute,
        Some(s) => Granularity::parse(s).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_granularity",
                format!("granularity={s:?}; use 1m, 5m, 1h or 1d"),
            )
        })?,
    };
    let to = param_time(params, "to")?.unwrap_or_else(|| now_ms() + g.ms());
    let from = param_time(params, "from")?.unwrap_or_else(|| to.saturating_sub(default_span(g)));
    if from > to {
        return Err(ApiError::bad_request("invalid_range", "from is after to"));
    }
    let (from, to) = (g.align(from), g.align(to));
    if (to - from) / g.ms() > MAX_POINTS {
        return Err(ApiError::bad_request(
            "range_too_large",
            format!("more than {MAX_POINTS} windows of {g}; use a coarser granularity"),
        ));
    }
    Ok((g, from, to))
}

/// The record time through which a committed frontier `f` has counted every click: a
/// record at `r` has timely time `ceil(r / tick) * tick`, which is below `f` for every
/// `r <= f - tick`.
pub fn complete_through(frontier: u64, tick_ms: u64) -> Millis {
    frontier.saturating_sub(tick_ms)
}

fn default_span(g: Granularity) -> u64 {
    match g {
        Granularity::Minute => 3_600_000,
        Granularity::FiveMinutes | Granularity::Hour => 86_400_000,
        Granularity::Day => 30 * 86_400_000,
    }
}

async fn series(
    state: &AppState,
    scope: MetricScope,
    id: u64,
    params: &HashMap<String, String>,
) -> Result<Json<Series>, ApiError> {
    let (g, from, to) = range(params, default_span)?;
    let store = state.store.clone();
    let (rows, frontier) = blocking(move || {
        let rows = store.click_series(scope, id, g, from, to)?;
        Ok::<_, crate::store::StoreError>((rows, store.committed_frontier()?))
    })
    .await?;
    let committed = frontier.unwrap_or(0);
    let points = rows
        .into_iter()
        .map(|(w, m)| Point {
            window_start: rfc3339(w),
            clicks: m.clicks,
            fraud_clicks: m.fraud_clicks,
            late_clicks: m.late_clicks,
            spend_micros: m.spend_micros,
            is_final: state.finality.is_final(w, g.ms(), committed),
        })
        .collect();
    Ok(Json(Series {
        granularity: g.as_str(),
        from: rfc3339(from),
        to: rfc3339(to),
        complete_through: frontier.map(|f| rfc3339(complete_through(f, state.config.tick().ms()))),
        points,
    }))
}

/// `GET /v1/ads/{ad_id}/clicks`.
pub async fn ad_clicks(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(ad_id): ApiPath<u64>,
    ApiQuery(params): ApiQuery<HashMap<String, String>>,
) -> Result<Json<Series>, ApiError> {
    let store = state.store.clone();
    let owner = blocking(move || store.ad(ad_id))
        .await?
        .map(|a| a.advertiser_id);
    caller.require_reader_of(owner, &format!("ad {ad_id}"))?;
    series(&state, MetricScope::Ad, ad_id, &params).await
}

/// `GET /v1/campaigns/{campaign_id}/clicks`.
pub async fn campaign_clicks(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(campaign_id): ApiPath<u64>,
    ApiQuery(params): ApiQuery<HashMap<String, String>>,
) -> Result<Json<Series>, ApiError> {
    let store = state.store.clone();
    let owner = blocking(move || store.campaign_owner(campaign_id)).await?;
    caller.require_reader_of(owner, &format!("campaign {campaign_id}"))?;
    series(&state, MetricScope::Campaign, campaign_id, &params).await
}

/// The advertiser itself if it exists: the owner of its own data.
pub(super) async fn advertiser_owner(
    state: &AppState,
    advertiser_id: u64,
) -> Result<Option<u64>, ApiError> {
    let store = state.store.clone();
    let exists = blocking(move || store.advertiser_exists(advertiser_id)).await?;
    Ok(exists.then_some(advertiser_id))
}

/// `GET /v1/advertisers/{advertiser_id}/clicks`.
pub async fn advertiser_clicks(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(advertiser_id): ApiPath<u64>,
    ApiQuery(params): ApiQuery<HashMap<String, String>>,
) -> Result<Json<Series>, ApiError> {
    let owner = advertiser_owner(&state, advertiser_id).await?;
    caller.require_reader_of(owner, &format!("advertiser {advertiser_id}"))?;
    series(&state, MetricScope::Advertiser, advertiser_id, &params).await
}

/// One ad of a top list.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AdTotalOut {
    /// The ad.
    pub ad_id: u64,
    /// Billable clicks.
    pub clicks: i64,
    /// Spend.
    pub spend_micros: i64,
    /// Fraud clicks.
    pub fraud_clicks: i64,
    /// Late clicks.
    pub late_clicks: i64,
}

/// The top-ads answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TopAds {
    /// First minute, RFC 3339.
    pub from: String,
    /// End (exclusive), RFC 3339.
    pub to: String,
    /// Ads by billable clicks, most first.
    pub ads: Vec<AdTotalOut>,
}

/// `GET /v1/advertisers/{advertiser_id}/top-ads`.
pub async fn top_ads(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(advertiser_id): ApiPath<u64>,
    ApiQuery(mut params): ApiQuery<HashMap<String, String>>,
) -> Result<Json<TopAds>, ApiError> {
    let owner = advertiser_owner(&state, advertiser_id).await?;
    caller.require_reader_of(owner, &format!("advertiser {advertiser_id}"))?;
    let limit = match params.get("limit") {
        None => 10,
        Some(s) => s
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request("invalid_limit", "limit must be between 1 and 1000")
            })?,
    };
    params.remove("granularity");
    let (_, from, to) = range(&params, |_| 86_400_000)?;
    let store = state.store.clone();
    let mut totals = blocking(move || store.ad_totals(advertiser_id, from, to)).await?;
    totals.sort_by(|(a, x), (b, y)| {
        (y.clicks, y.spend_micros, a).cmp(&(x.clicks, x.spend_micros, b))
    });
    totals.truncate(limit);
    Ok(Json(TopAds {
        from: rfc3339(from),
        to: rfc3339(to),
        ads: totals
            .into_iter()
            .map(|(ad_id, m): (u64, Measures)| AdTotalOut {
                ad_id,
                clicks: m.clicks,
                spend_micros: m.spend_micros,
                fraud_clicks: m.fraud_clicks,
                late_clicks: m.late_clicks,
            })
            .collect(),
    }))
}

/// One stored late click.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LateClickOut {
    /// The impression.
    pub impression_id: String,
    /// The click id.
    pub click_id: String,
    /// Event time, RFC 3339.
    pub event_time: String,
    /// Record time, RFC 3339.
    pub record_time: String,
}

/// The late-clicks answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LateClicksOut {
    /// The ad.
    pub ad_id: u64,
    /// Its late clicks (at most 10,000).
    pub late_clicks: Vec<LateClickOut>,
}

/// `GET /v1/ads/{ad_id}/late-clicks`: the late-clicks side output of one ad.
pub async fn ad_late_clicks(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(ad_id): ApiPath<u64>,
    ApiQuery(mut params): ApiQuery<HashMap<String, String>>,
) -> Result<Json<LateClicksOut>, ApiError> {
    let store = state.store.clone();
    let owner = blocking(move || store.ad(ad_id))
        .await?
        .map(|a| a.advertiser_id);
    caller.require_reader_of(owner, &format!("ad {ad_id}"))?;
    params.remove("granularity");
    let (_, from, to) = range(&params, |_| 86_400_000)?;
    let store = state.store.clone();
    let rows = blocking(move || store.late_clicks(ad_id, from, to, 10_000)).await?;
    let clicks: Vec<LateClickOut> = rows
        .into_iter()
        .map(|r| LateClickOut {
            impression_id: r.impression_id,
            click_id: r.click_id,
            event_time: rfc3339(r.event_time_ms),
            record_time: rfc3339(r.record_time_ms),
        })
        .collect();
    Ok(Json(LateClicksOut {
        ad_id,
        late_clicks: clicks,
    }))
}

/// Fraud adjustments listed per answer at most (the totals cover them all).
const MAX_ADJUSTMENTS: usize = 10_000;

/// One fraud adjustment: a billed click of a frozen window that a later verdict named.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AdjustmentOut {
    /// The ad.
    pub ad_id: u64,
    /// Its campaign.
    pub campaign_id: u64,
    /// The impression.
    pub impression_id: String,
    /// The billed click.
    pub click_id: String,
    /// The minute the click was billed in (its window stays as billed), RFC 3339.
    pub window_start: String,
    /// The click's event time, RFC 3339.
    pub event_time: String,
    /// When the first verdict naming the impression was recorded, RFC 3339.
    pub verdict_time: String,
    /// Change to billable clicks (-1).
    pub clicks: i64,
    /// Change to fraud clicks (+1).
    pub fraud_clicks: i64,
    /// Change to spend (minus the click's price).
    pub spend_micros: i64,
    /// Whether the adjustment can no longer change (its adjustment period is over).
    #[serde(rename = "final")]
    pub is_final: bool,
}

/// A fraud-adjustments answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AdjustmentsOut {
    /// First billed minute, RFC 3339.
    pub from: String,
    /// End of the billed minutes (exclusive), RFC 3339.
    pub to: String,
    /// As in a series: every verdict recorded by then is accounted for.
    pub complete_through: Option<String>,
    /// By billed window, then ad, then impression.
    pub adjustments: Vec<AdjustmentOut>,
    /// Over every adjustment in the range, listed or not.
    pub totals: AdjustmentTotals,
    /// Whether the range holds more adjustments than listed.
    pub truncated: bool,
}

/// `from` and `to` of a listing over billed minutes: aligned down; by default the 30 days
/// up to the end of the current minute. Unlike a series, the span is not limited: the
/// answer is bounded by its row limit.
fn listing_range(params: &HashMap<String, String>) -> Result<(Millis, Millis), ApiError> {
    let to = param_time(params, "to")?.unwrap_or_else(|| now_ms() + 60_000);
    let from = param_time(params, "from")?.unwrap_or_else(|| to.saturating_sub(30 * 86_400_000));
    if from > to {
        return Err(ApiError::bad_request("invalid_range", "from is after to"));
    }
    Ok((minute_of(from), minute_of(to)))
}

fn adjustment_out(state: &AppState, committed: u64, a: FraudAdjustment) -> AdjustmentOut {
    let open_ms = fraud_adjustments::VIEW.window.length_ms;
    AdjustmentOut {
        ad_id: a.ad_id,
        campaign_id: a.campaign_id,
        impression_id: a.impression_id,
        click_id: a.click_id,
        window_start: rfc3339(a.window_start_ms),
        event_time: rfc3339(a.event_time_ms),
        verdict_time: rfc3339(a.verdict_time_ms),
        clicks: a.clicks,
        fraud_clicks: a.fraud_clicks,
        spend_micros: a.spend_micros,
        is_final: state
            .finality
            .is_final(a.window_start_ms, open_ms, committed),
    }
}

async fn adjustments(
    state: &AppState,
    scope: MetricScope,
    id: u64,
    params: &HashMap<String, String>,
) -> Result<Json<AdjustmentsOut>, ApiError> {
    if !state
        .config
        .views()
        .iter()
        .any(|v| v.name == "fraud_adjustments")
    {
        return Err(ApiError::new(
            axum::http::StatusCode::NOT_IMPLEMENTED,
            "view_disabled",
            "this deployment switched off the fraud_adjustments view (views.disabled)",
        ));
    }
    let (from, to) = listing_range(params)?;
    let limit = match params.get("limit") {
        None => MAX_ADJUSTMENTS,
        Some(s) => s
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_ADJUSTMENTS).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_limit",
                    format!("limit must be between 1 and {MAX_ADJUSTMENTS}"),
                )
            })?,
    };
    let store = state.store.clone();
    let (found, frontier) = blocking(move || {
        let found = store.fraud_adjustments(scope, id, from, to, limit)?;
        Ok::<_, crate::store::StoreError>((found, store.committed_frontier()?))
    })
    .await?;
    let committed = frontier.unwrap_or(0);
    let truncated = (found.rows.len() as i64) < found.totals.adjustments;
    Ok(Json(AdjustmentsOut {
        from: rfc3339(from),
        to: rfc3339(to),
        complete_through: frontier.map(|f| rfc3339(complete_through(f, state.config.tick().ms()))),
        adjustments: found
            .rows
            .into_iter()
            .map(|a| adjustment_out(state, committed, a))
            .collect(),
        totals: found.totals,
        truncated,
    }))
}

/// `GET /v1/ads/{ad_id}/fraud-adjustments`: billing adjustments of one ad.
pub async fn ad_fraud_adjustments(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(ad_id): ApiPath<u64>,
    ApiQuery(params): ApiQuery<HashMap<String, String>>,
) -> Result<Json<AdjustmentsOut>, ApiError> {
    let store = state.store.clone();
    let owner = blocking(move || store.ad(ad_id))
        .await?
        .map(|a| a.advertiser_id);
    caller.require_reader_of(owner, &format!("ad {ad_id}"))?;
    adjustments(&state, MetricScope::Ad, ad_id, &params).await
}

/// `GET /v1/advertisers/{advertiser_id}/fraud-adjustments`: billing adjustments of all of
/// one advertiser's ads.
pub async fn advertiser_fraud_adjustments(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(advertiser_id): ApiPath<u64>,
    ApiQuery(params): ApiQuery<HashMap<String, String>>,
) -> Result<Json<AdjustmentsOut>, ApiError> {
    let owner = advertiser_owner(&state, advertiser_id).await?;
    caller.require_reader_of(owner, &format!("advertiser {advertiser_id}"))?;
    adjustments(&state, MetricScope::Advertiser, advertiser_id, &params).await
}
