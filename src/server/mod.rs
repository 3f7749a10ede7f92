//! The HTTP API of `../shared/api.md`: click tracking, catalog, impressions, verdicts,
//! advertiser metrics and operations, on one axum router.

pub mod auth;
pub mod catalog;
pub mod clicks;
pub mod dashboard;
pub mod error;
pub mod extract;
pub mod json;
pub mod openapi;
pub mod ops;
pub mod query;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{get, post, put};
use parking_lot::RwLock;

use self::error::{ApiError, ErrorCode};
use crate::config::Config;
use crate::dataflow::sink::SinkStatus;
use crate::log::Log;
use crate::metrics::{Metrics, ReasonLabel, RouteLabels};
use crate::secrets::Secrets;
use crate::store::{Ad, Store};
use crate::time::Finality;
use crate::token::TokenSigner;

/// Everything a handler may need.
#[derive(Clone)]
pub struct AppState {
    /// The configuration.
    pub config: Arc<Config>,
    /// Keys and the token secret.
    pub secrets: Arc<Secrets>,
    /// The log clicks, verdicts and catalog changes go to.
    pub log: Arc<dyn Log>,
    /// The store the API reads.
    pub store: Arc<dyn Store>,
    /// Signs and checks impression tokens.
    pub signer: TokenSigner,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The catalog as the click path needs it, in memory.
    pub ads: Arc<RwLock<HashMap<u64, Arc<Ad>>>>,
    /// Advertiser key hashes already resolved.
    pub advertiser_keys: Arc<RwLock<HashMap<[u8; 32], u64>>>,
    /// Serialises catalog writes (log then store) so two PUTs cannot interleave.
    pub catalog_writes: Arc<tokio::sync::Mutex<()>>,
    /// The sink's progress, where this process runs the dataflow.
    pub sink: Option<Arc<SinkStatus>>,
    /// When windows become final.
    pub finality: Finality,
    /// Which partition a click goes to.
    pub partitioner: crate::log::ClickPartitioner,
}

impl AppState {
    /// An ad for the click path: from memory, else from the store (and remembered).
    pub async fn ad(&self, ad_id: u64) -> Result<Option<Arc<Ad>>, ApiError> {
        if let Some(ad) = self.ads.read().get(&ad_id) {
            return Ok(Some(Arc::clone(ad)));
        }
        let store = Arc::clone(&self.store);
        let found = blocking(move || store.ad(ad_id)).await?;
        Ok(found.map(|ad| {
            let ad = Arc::new(ad);
            self.ads.write().insert(ad_id, Arc::clone(&ad));
            ad
        }))
    }
}

/// Runs blocking store work off the async executor.
pub async fn blocking<T, E, F>(f: F) -> Result<T, ApiError>
where
    F: FnOnce() -> Result<T, E> + Send + 'static,
    T: Send + 'static,
    E: Into<ApiError> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result.map_err(Into::into),
        Err(e) => Err(ApiError::internal(format!("background task failed: {e}"))),
    }
}

/// Counts every answer by route and status, and errors by code.
async fn observe(State(metrics): State<Arc<Metrics>>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let started = Instant::now();
    let response = next.run(request).await;
    let labels = RouteLabels {
        route,
        status: response.status().as_u16(),
    };
    metrics.http_requests.get_or_create(&labels).inc();
    metrics
        .http_request_seconds
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    if let Some(ErrorCode(code)) = response.extensions().get::<ErrorCode>() {
        metrics
            .http_errors
            .get_or_create(&ReasonLabel {
                reason: (*code).to_owned(),
            })
            .inc();
    }
    response
}

async fn not_found() -> ApiError {
    ApiError::not_found("route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this path",
    )
}

/// Which part of the API a process serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Everything on one port: `clickagg serve`.
    All,
    /// The click paths and fraud verdicts, which go to the log: `clickagg ingest`.
    Ingest,
    /// Catalog, impressions and advertiser metrics, from the store: `clickagg query`.
    Query,
    /// Operations only (health, readiness, metrics): `clickagg worker`.
    Worker,
}

/// The API of one process role.
pub fn router(state: AppState, role: Role) -> Router {
    let limit = axum::extract::DefaultBodyLimit::max(state.config.http.max_body_bytes);
    let metrics = Arc::clone(&state.metrics);
    let ingest = matches!(role, Role::All | Role::Ingest);
    let query = matches!(role, Role::All | Role::Query);
    let mut app = Router::new();
    if ingest {
        app = app
            .route("/c/{token}", get(clicks::redirect))
            .route("/v1/clicks", post(clicks::batch))
            .route("/v1/fraud-verdicts", post(catalog::fraud_verdicts));
    }
    if query {
        app = app
            .route("/v1/impressions", post(catalog::impressions))
            .route("/v1/advertisers", post(catalog::create_advertiser))
            .route("/v1/me", get(catalog::me))
            .route(
                "/v1/advertisers/{advertiser_id}/ads",
                get(catalog::advertiser_ads),
            )
            .route("/v1/ads/{ad_id}", put(catalog::put_ad).get(catalog::get_ad))
            .route("/v1/ads/{ad_id}/clicks", get(query::ad_clicks))
            .route("/v1/ads/{ad_id}/late-clicks", get(query::ad_late_clicks))
            .route(
                "/v1/ads/{ad_id}/fraud-adjustments",
                get(query::ad_fraud_adjustments),
            )
            .route(
                "/v1/campaigns/{campaign_id}/clicks",
                get(query::campaign_clicks),
            )
            .route(
                "/v1/advertisers/{advertiser_id}/clicks",
                get(query::advertiser_clicks),
            )
            .route(
                "/v1/advertisers/{advertiser_id}/top-ads",
                get(query::top_ads),
            )
            .route(
                "/v1/advertisers/{advertiser_id}/fraud-adjustments",
                get(query::advertiser_fraud_adjustments),
            )
            .route("/openapi.json", get(ops::openapi))
            .route("/dashboard", get(dashboard::page));
    }
    app.route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(limit)
        .layer(axum::middleware::from_fn_with_state(metrics, observe))
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}
