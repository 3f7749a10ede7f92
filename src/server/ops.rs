//! Operations: health, readiness, Prometheus metrics.

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use super::error::ApiError;
use super::{AppState, blocking};

/// `GET /healthz`: the process is up.
pub async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

/// `GET /readyz`: log and store reachable, recovery finished.
pub async fn readyz(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let log = state.log.clone();
    blocking(move || log.check()).await?;
    let store = state.store.clone();
    let frontier = blocking(move || {
        store.check()?;
        store.committed_frontier()
    })
    .await?;
    if let Some(sink) = &state.sink {
        if let Some(e) = sink.last_error() {
            return Err(ApiError::unavailable(
                "sink_failing",
                format!("sink commits failing: {e}"),
                2,
            ));
        }
        if !sink.recovered() {
            return Err(ApiError::unavailable(
                "recovering",
                "replaying the log up to the committed frontier",
                1,
            ));
        }
    }
    Ok(Json(serde_json::json!({
        "status": "ready",
        "committed_frontier": frontier.map(crate::time::rfc3339),
    })))
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    // Lags are measured at scrape time; only a process with a sink has positions.
    let ends = if state.sink.is_some() {
        let log = state.log.clone();
        match tokio::task::spawn_blocking(move || log.end_offsets()).await {
            Ok(Ok(ends)) => Some(ends),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "no end offsets for the lag metrics");
                None
            }
            Err(e) => {
                tracing::debug!(error = %e, "end offsets task failed");
                None
            }
        }
    } else {
        None
    };
    state
        .metrics
        .refresh_lags(ends.as_deref(), crate::time::now_ms());
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

/// `GET /openapi.json`: the contract, generated from the handlers' types
/// ([`super::openapi`]).
pub async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        super::openapi::document(),
    )
}
