//! The admin's catalog (advertisers, ads), the ad server's impressions, and verdicts.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::extract::ApiPath;
use super::json::JsonBody;
use super::{AppState, auth::Caller, blocking};
use crate::log::{ADS_PARTITION, AppendRecord, verdict_partition};
use crate::record::{AdRecord, FraudVerdict, Payload, Topic, impression_hex, parse_impression_hex};
use crate::secrets::{generate_key, hash_key};
use crate::store::{Ad, Upserted};
use crate::time::{now_ms, rfc3339};
use crate::token::{Impression, MAX_USER_ID};

/// Largest accepted cost per click: $1,000,000 in micros keeps sums far from overflow.
const MAX_CPC_MICROS: u64 = 1_000_000_000_000;
/// Most impressions one request may mint.
const MAX_IMPRESSIONS: u32 = 1_000;
/// Most verdicts one request may carry.
const MAX_VERDICTS: usize = 10_000;

/// `POST /v1/advertisers`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewAdvertiser {
    /// The advertiser's id.
    pub advertiser_id: u64,
    /// Display name.
    pub name: String,
}

/// The answer to `POST /v1/advertisers`: the key is shown once and stored only hashed.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CreatedAdvertiser {
    /// The advertiser's id.
    pub advertiser_id: u64,
    /// The API key.
    pub api_key: String,
}

/// Creates an advertiser and its API key.
pub async fn create_advertiser(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody<NewAdvertiser>,
) -> Result<(StatusCode, Json<CreatedAdvertiser>), ApiError> {
    caller.require_admin()?;
    if body.name.trim().is_empty() || body.name.len() > 256 {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "name must be 1 to 256 bytes",
        ));
    }
    let api_key = generate_key("ckv_");
    let hash = hash_key(&api_key);
    let store = state.store.clone();
    let id = body.advertiser_id;
    blocking(move || store.create_advertiser(id, &body.name, &hash))
        .await
        .map_err(|e| match e.status {
            StatusCode::CONFLICT => ApiError::new(
                StatusCode::CONFLICT,
                "advertiser_exists",
                format!("advertiser {id} already exists"),
            ),
            _ => e,
        })?;
    state.advertiser_keys.write().insert(hash, id);
    Ok((
        StatusCode::CREATED,
        Json(CreatedAdvertiser {
            advertiser_id: id,
            api_key,
        }),
    ))
}

/// `PUT /v1/ads/{ad_id}`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdIn {
    /// The owning advertiser (fixed once the ad exists).
    pub advertiser_id: u64,
    /// The campaign (owned by the same advertiser).
    pub campaign_id: u64,
    /// Where clicks are redirected: an absolute http(s) URL.
    pub landing_url: String,
    /// Cost per click in micros.
    pub cpc_micros: u64,
}

fn check_landing_url(url: &str) -> Result<(), ApiError> {
    let invalid = |why: &str| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_landing_url",
            format!("landing_url {why}"),
        )
    };
    let parsed = reqwest::Url::parse(url).map_err(|e| invalid(&format!("is not a URL: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(invalid("must be an absolute http or https URL"));
    }
    if url.len() > 2048 || url.chars().any(char::is_control) {
        return Err(invalid("is too long or has control characters"));
    }
    Ok(())
}

/// Creates or updates an ad: 201 when created, 200 when updated.
pub async fn put_ad(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(ad_id): ApiPath<u64>,
    JsonBody(body): JsonBody<AdIn>,
) -> Result<(StatusCode, Json<Ad>), ApiError> {
    caller.require_admin()?;
    check_landing_url(&body.landing_url)?;
    if body.cpc_micros > MAX_CPC_MICROS {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            format!("cpc_micros must be at most {MAX_CPC_MICROS}"),
        ));
    }
    let ad = Ad {
        ad_id,
        advertiser_id: body.advertiser_id,
        campaign_id: body.campaign_id,
        landing_url: body.landing_url,
        cpc_micros: body.cpc_micros,
    };
    let reference = |e: ApiError| match e.status {
        StatusCode::NOT_FOUND => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_advertiser",
            e.message,
        ),
        _ => e,
    };
    // The dataflow learns the catalog from the log and the click path from the store:
    // log first, so no click can be accepted for an ad the dataflow has not seen.
    let _serial = state.catalog_writes.lock().await;
    let (store, checked) = (state.store.clone(), ad.clone());
    blocking(move || store.check_ad(&checked))
        .await
        .map_err(reference)?;
    let record = AdRecord {
        ad_id,
        campaign_id: ad.campaign_id,
        advertiser_id: ad.advertiser_id,
    };
    state
        .log
        .append(vec![AppendRecord {
            partition: ADS_PARTITION,
            key: Some(ad_id),
            record_time_ms: None,
            payload: record.encode(),
        }])
        .await?;
    let (store, stored) = (state.store.clone(), ad.clone());
    let outcome = blocking(move || store.upsert_ad(&stored))
        .await
        .map_err(reference)?;
    state
        .ads
        .write()
        .insert(ad_id, std::sync::Arc::new(ad.clone()));
    let status = match outcome {
        Upserted::Created => StatusCode::CREATED,
        Upserted::Updated => StatusCode::OK,
    };
    Ok((status, Json(ad)))
}

/// `GET /v1/ads/{ad_id}`: the admin or the owner.
pub async fn get_ad(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(ad_id): ApiPath<u64>,
) -> Result<Json<Ad>, ApiError> {
    let store = state.store.clone();
    let ad = blocking(move || store.ad(ad_id)).await?;
    caller.require_reader_of(ad.as_ref().map(|a| a.advertiser_id), &format!("ad {ad_id}"))?;
    ad.map(Json)
        .ok_or_else(|| ApiError::not_found(format!("ad {ad_id}")))
}

/// `GET /v1/advertisers/{advertiser_id}/ads`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AdvertiserAds {
    /// The advertiser.
    pub advertiser_id: u64,
    /// Its ads, by id.
    pub ads: Vec<Ad>,
}

/// `GET /v1/advertisers/{advertiser_id}/ads`: the admin or the owner. The dashboard lists
/// these (and their campaigns) to pick from, including ads without clicks yet.
pub async fn advertiser_ads(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(advertiser_id): ApiPath<u64>,
) -> Result<Json<AdvertiserAds>, ApiError> {
    let owner = super::query::advertiser_owner(&state, advertiser_id).await?;
    caller.require_reader_of(owner, &format!("advertiser {advertiser_id}"))?;
    let store = state.store.clone();
    let ads = blocking(move || store.advertiser_ads(advertiser_id)).await?;
    Ok(Json(AdvertiserAds { advertiser_id, ads }))
}

/// `GET /v1/me`: what the presented key is.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Me {
    /// `admin`, `ad_server` or `advertiser`.
    pub role: String,
    /// The advertiser the key belongs to (advertiser keys only).
    pub advertiser_id: Option<u64>,
}

/// `GET /v1/me`: which kind of key was presented, and whose. A client that holds only a
/// key (the dashboard's login) learns from it which advertiser to show.
pub async fn me(caller: Caller) -> Result<Json<Me>, ApiError> {
    let (role, advertiser_id) = match caller {
        Caller::Admin => ("admin", None),
        Caller::AdServer => ("ad_server", None),
        Caller::Advertiser(id) => ("advertiser", Some(id)),
        Caller::Anonymous => return Err(ApiError::unauthorized("an API key is required")),
    };
    Ok(Json(Me {
        role: role.to_owned(),
        advertiser_id,
    }))
}

/// `POST /v1/impressions`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImpressionIn {
    /// The ad shown.
    pub ad_id: u64,
    /// The user it was shown to.
    #[serde(default)]
    pub user_id: String,
    /// Mint this many (returns `{"impressions": [...]}`).
    #[serde(default)]
    pub count: Option<u32>,
}

/// A minted impression.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ImpressionOut {
    /// 32 hex characters.
    pub impression_id: String,
    /// The signed token.
    pub token: String,
    /// `/c/<token>`.
    pub click_url: String,
    /// When clicks stop being accepted.
    pub expires_at: String,
}

/// Mints signed impressions for an ad.
pub async fn impressions(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody<ImpressionIn>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    caller.require_ad_server()?;
    let n = body.count.unwrap_or(1);
    if n == 0 || n > MAX_IMPRESSIONS {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            format!("count must be between 1 and {MAX_IMPRESSIONS}"),
        ));
    }
    if body.user_id.len() > MAX_USER_ID {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_user_id",
            format!("user_id is longer than {MAX_USER_ID} bytes"),
        ));
    }
    if state.ad(body.ad_id).await?.is_none() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_ad",
            format!("ad {} does not exist", body.ad_id),
        ));
    }
    let now = now_ms();
    let mut rng = rand::rng();
    let minted: Vec<ImpressionOut> = (0..n)
        .map(|_| {
            let imp = Impression {
                impression_id: (u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64()),
                ad_id: body.ad_id,
                issued_at_ms: now,
                user_id: body.user_id.clone(),
            };
            let token = state.signer.sign(&imp);
            ImpressionOut {
                impression_id: impression_hex(imp.impression_id),
                click_url: format!("/c/{token}"),
                token,
                expires_at: rfc3339(now + state.signer.ttl_ms()),
            }
        })
        .collect();
    state.metrics.impressions_issued.inc_by(u64::from(n));
    let body = match body.count {
        None => serde_json::to_value(&minted[0]),
        Some(_) => serde_json::to_value(serde_json::json!({ "impressions": minted })),
    }
    .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok((StatusCode::CREATED, Json(body)))
}

/// One verdict of `POST /v1/fraud-verdicts`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VerdictIn {
    /// 32 hex characters.
    pub impression_id: String,
    /// Why.
    #[serde(default)]
    pub reason: String,
}

/// Appends verdicts; the dataflow subtracts the impressions' counted clicks.
pub async fn fraud_verdicts(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody<Vec<VerdictIn>>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    caller.require_admin()?;
    if body.len() > MAX_VERDICTS {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "batch_too_large",
            format!(
                "{} verdicts in one request; at most {MAX_VERDICTS}",
                body.len()
            ),
        ));
    }
    let partitions = state.log.partitions(Topic::FraudVerdicts);
    let mut records = Vec::with_capacity(body.len());
    for (index, v) in body.into_iter().enumerate() {
        let impression_id = parse_impression_hex(&v.impression_id).ok_or_else(|| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_impression_id",
                format!("verdict {index}: impression_id must be 32 hex characters"),
            )
        })?;
        records.push(AppendRecord {
            partition: verdict_partition(impression_id, partitions),
            key: None,
            record_time_ms: None,
            payload: FraudVerdict {
                impression_id,
                reason: v.reason.chars().take(256).collect(),
            }
            .encode(),
        });
    }
    let n = records.len();
    if n > 0 {
        state.log.append(records).await?;
    }
    state.metrics.verdicts_accepted.inc_by(n as u64);
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "accepted": n })),
    ))
}
