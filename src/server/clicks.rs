//! Click tracking: `GET /c/{token}` (browser redirect) and `POST /v1/clicks` (SDK batches).
//! A click is acknowledged only once the log says it is durable.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::AppState;
use super::error::ApiError;
use super::extract::ApiPath;
use super::json::{parse_json, read_json_bytes};
use crate::log::{AppendFuture, AppendRecord};
use crate::record::{ClickEvent, Payload};
use crate::store::Ad;
use crate::time::{Millis, now_ms, parse_rfc3339};
use crate::token::{Impression, TokenError};

/// The most clicks one `POST /v1/clicks` may carry.
pub const MAX_BATCH: usize = 10_000;
/// A batch goes to the log in chunks of this many checked clicks, each as soon as it is
/// checked: the log commits one chunk while the handler checks the next, so a large
/// batch waits about for the longer of the two, not for their sum.
const APPEND_CHUNK: usize = 256;
const MAX_ID_LEN: usize = 128;

/// A generated click id: 128 random bits, hex.
fn new_click_id() -> String {
    format!(
        "{:032x}",
        rand::rng().next_u64() as u128 | ((rand::rng().next_u64() as u128) << 64)
    )
}

fn token_error(e: TokenError) -> ApiError {
    match e {
        TokenError::Expired => ApiError::new(
            StatusCode::GONE,
            "expired_token",
            "the impression token has expired",
        ),
        TokenError::Malformed | TokenError::BadSignature => {
            ApiError::bad_request("bad_token", "the impression token is not valid")
        }
    }
}

/// The client IP of a browser click: the peer, or the first `X-Forwarded-For` hop when
/// the deployment says a trusted proxy sets it.
fn client_ip(headers: &HeaderMap, peer: SocketAddr, trust_forwarded_for: bool) -> IpAddr {
    if trust_forwarded_for
        && let Some(ip) = headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.trim().parse().ok())
    {
        return ip;
    }
    peer.ip()
}

/// Hands clicks to the log. The log queues them at once, in call order; the future
/// resolves once they are durable.
fn start_append(state: &AppState, clicks: &[(ClickEvent, Arc<Ad>)]) -> AppendFuture {
    let records = clicks
        .iter()
        .map(|(c, _)| AppendRecord {
            partition: state.partitioner.partition(c.ad_id, c.impression_id),
            key: Some(c.ad_id),
            record_time_ms: None,
            payload: c.encode(),
        })
        .collect();
    state.log.append(records)
}

/// Waits for appends started at `started`, in order, and records the wait.
async fn finish_appends(
    state: &AppState,
    started: Instant,
    appends: Vec<AppendFuture>,
    clicks: usize,
) -> Result<(), ApiError> {
    let mut failed = None;
    // Every append is awaited, even after one fails: the others may still be in flight.
    for append in appends {
        if let Err(e) = append.await {
            failed.get_or_insert(e);
        }
    }
    state
        .metrics
        .log_append_seconds
        .observe(started.elapsed().as_secs_f64());
    match failed {
        None => Ok(()),
        Some(e) => {
            tracing::warn!(error = %e, clicks, "clicks not acknowledged");
            Err(ApiError::from(e))
        }
    }
}

/// Appends clicks and waits until they are durable.
async fn append_clicks(state: &AppState, clicks: &[(ClickEvent, Arc<Ad>)]) -> Result<(), ApiError> {
    if clicks.is_empty() {
        return Ok(());
    }
    let started = Instant::now();
    let append = start_append(state, clicks);
    finish_appends(state, started, vec![append], clicks.len()).await
}

/// Checks a token and finds its ad, counting rejections.
async fn resolve(
    state: &AppState,
    token: &str,
    now: Millis,
) -> Result<(Impression, Arc<Ad>), ApiError> {
    let imp = state.signer.verify(token, now).map_err(token_error)?;
    let ad = state.ad(imp.ad_id).await?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_ad",
            format!("ad {} does not exist", imp.ad_id),
        )
    })?;
    Ok((imp, ad))
}

/// `GET /c/{token}`: records the click, then redirects to the landing page.
pub async fn redirect(
    State(state): State<AppState>,
    ApiPath(token): ApiPath<String>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let now = now_ms();
    let (imp, ad) = match resolve(&state, &token, now).await {
        Ok(found) => found,
        Err(e) => {
            state.metrics.reject_click(e.code);
            return Err(e);
        }
    };
    let click = ClickEvent {
        impression_id: imp.impression_id,
        ad_id: imp.ad_id,
        issued_at_ms: imp.issued_at_ms,
        event_time_ms: now,
        click_id: new_click_id(),
        user_id: imp.user_id,
        ip: client_ip(&headers, peer, state.config.http.trust_forwarded_for),
        cpc_micros: ad.cpc_micros,
    };
    let landing = ad.landing_url.clone();
    append_clicks(&state, &[(click, ad)]).await?;
    state.metrics.clicks_accepted.inc();
    let location = HeaderValue::from_str(&landing)
        .map_err(|_| ApiError::internal("stored landing URL is not a valid header"))?;
    Ok((
        StatusCode::FOUND,
        [
            (header::LOCATION, location),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
    )
        .into_response())
}

/// A time in a request: epoch milliseconds or an RFC 3339 string.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum TimeIn {
    /// Epoch milliseconds.
    Millis(u64),
    /// RFC 3339.
    Text(String),
}

impl TimeIn {
    /// Epoch milliseconds, if valid.
    pub fn millis(&self) -> Option<Millis> {
        match self {
            TimeIn::Millis(ms) => Some(*ms),
            TimeIn::Text(s) => parse_rfc3339(s),
        }
    }
}

/// One click of `POST /v1/clicks`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClickIn {
    /// The impression token.
    pub token: String,
    /// Client event time; defaults to the receive time.
    #[serde(default)]
    pub event_time: Option<TimeIn>,
    /// The user; defaults to the token's.
    #[serde(default)]
    pub user_id: Option<String>,
    /// The client IP; defaults to the caller's address.
    #[serde(default)]
    pub ip: Option<String>,
    /// A client click id, which makes retries recognisable.
    #[serde(default)]
    pub click_id: Option<String>,
}

/// A refused click of a batch.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Rejected {
    /// Its index in the request.
    pub index: usize,
    /// The error code.
    pub error: &'static str,
}

/// The answer to `POST /v1/clicks`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct BatchResult {
    /// Clicks now durable.
    pub accepted: usize,
    /// Clicks refused, by index.
    pub rejected: Vec<Rejected>,
}

async fn check_click(
    state: &AppState,
    value: &RawValue,
    now: Millis,
    peer: IpAddr,
) -> Result<Result<(ClickEvent, Arc<Ad>), &'static str>, ApiError> {
    let Ok(click) = serde_json::from_str::<ClickIn>(value.get()) else {
        return Ok(Err("invalid_click"));
    };
    let (imp, ad) = match resolve(state, &click.token, now).await {
        Ok(found) => found,
        // The store being down is not the click's fault: refuse the whole request.
        Err(e) if e.status.is_server_error() => return Err(e),
        Err(e) => return Ok(Err(e.code)),
    };
    Ok(validate(click, imp, ad, now, peer))
}

fn validate(
    click: ClickIn,
    imp: Impression,
    ad: Arc<Ad>,
    now: Millis,
    peer: IpAddr,
) -> Result<(ClickEvent, Arc<Ad>), &'static str> {
    let event_time_ms = match &click.event_time {
        None => now,
        Some(t) => t.millis().ok_or("invalid_event_time")?,
    };
    let ip = match &click.ip {
        None => peer,
        Some(s) => s.trim().parse().map_err(|_| "invalid_ip")?,
    };
    let click_id = match click.click_id {
        Some(id) if id.is_empty() || id.len() > MAX_ID_LEN => return Err("invalid_click_id"),
        Some(id) => id,
        None => new_click_id(),
    };
    let user_id = match click.user_id {
        Some(u) if u.len() > MAX_ID_LEN => return Err("invalid_user_id"),
        Some(u) => u,
        None => imp.user_id,
    };
    Ok((
        ClickEvent {
            impression_id: imp.impression_id,
            ad_id: imp.ad_id,
            issued_at_ms: imp.issued_at_ms,
            event_time_ms,
            click_id,
            user_id,
            ip,
            cpc_micros: ad.cpc_micros,
        },
        ad,
    ))
}

/// `POST /v1/clicks`: one click or an array of up to 10,000; answers once the accepted
/// ones are durable.
pub async fn batch(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Result<(StatusCode, Json<BatchResult>), ApiError> {
    let bytes = read_json_bytes(request, &state).await?;
    let items = batch_items(&bytes)?;
    if items.len() > MAX_BATCH {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "batch_too_large",
            format!("{} clicks in one request; at most {MAX_BATCH}", items.len()),
        ));
    }
    let now = now_ms();
    let n = items.len();
    // The append wait is measured from the first chunk handed to the log, as for a GET.
    let mut started = None;
    let mut appends = Vec::new();
    let mut chunk = Vec::with_capacity(APPEND_CHUNK.min(items.len()));
    let mut rejected = Vec::new();
    for (index, item) in items.into_iter().enumerate() {
        // A server error here leaves earlier chunks in the log unacknowledged; a retry
        // of the whole batch is safe, as after a log timeout (the dedup keeps one click
        // per impression).
        match check_click(&state, item, now, peer.ip()).await? {
            Ok(click) => chunk.push(click),
            Err(error) => {
                state.metrics.reject_click(error);
                rejected.push(Rejected { index, error });
            }
        }
        if chunk.len() == APPEND_CHUNK || (index + 1 == n && !chunk.is_empty()) {
            started.get_or_insert_with(Instant::now);
            appends.push(start_append(&state, &chunk));
            chunk.clear();
        }
    }
    let accepted = n - rejected.len();
    if let Some(started) = started {
        finish_appends(&state, started, appends, accepted).await?;
    }
    state.metrics.clicks_accepted.inc_by(accepted as u64);
    Ok((
        StatusCode::ACCEPTED,
        Json(BatchResult { accepted, rejected }),
    ))
}

/// The clicks of a `POST /v1/clicks` body, each still unparsed: one object or an array.
/// Each is parsed on its own later, so one bad click is refused alone.
fn batch_items(bytes: &[u8]) -> Result<Vec<&RawValue>, ApiError> {
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => parse_json::<Vec<&RawValue>>(bytes),
        Some(b'{') => parse_json::<&RawValue>(bytes).map(|one| vec![one]),
        // Malformed text stays a 400 malformed_json; other JSON is the wrong shape.
        _ => {
            parse_json::<serde::de::IgnoredAny>(bytes)?;
            Err(ApiError::bad_request(
                "invalid_request",
                "expected a click object or an array of them",
            ))
        }
    }
}
