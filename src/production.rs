//! The production processes on Kafka and Postgres: `ingest` (click paths and verdicts
//! into the log), `worker` (the dataflow and its sink), `query` (catalog, impressions
//! and advertiser metrics from the store). Each runs until SIGTERM.

use std::sync::Arc;

use crate::config::Config;
use crate::log::Log;
use crate::metrics::Metrics;
use crate::process::{app_state, bind, serve_api, spawn_catalog_refresh, start_engine};
use crate::secrets::Secrets;
use crate::server::Role;
use crate::store::Store;

/// `clickagg ingest`: verifies tokens, appends clicks and verdicts to the log and answers
/// once they are durable. Reads the catalog from the store, refreshed periodically.
pub async fn ingest(
    config: Arc<Config>,
    log: Arc<dyn Log>,
    store: Arc<dyn Store>,
) -> anyhow::Result<()> {
    let secrets = Secrets::from_config(&config)?;
    let metrics = Arc::new(Metrics::new());
    let state = app_state(Arc::clone(&config), secrets, log, store, metrics, None).await?;
    spawn_catalog_refresh(&state, config.http.catalog_refresh);
    let (listener, addr) = bind(&config).await?;
    tracing::info!(%addr, "ingest: serving the click paths and fraud verdicts");
    serve_api(listener, state, Role::Ingest).await
}

/// `clickagg query`: the catalog, impressions and advertiser metrics. Catalog writes go
/// to the log (for the dataflow) before the store (for the click path).
pub async fn query(
    config: Arc<Config>,
    log: Arc<dyn Log>,
    store: Arc<dyn Store>,
) -> anyhow::Result<()> {
    let secrets = Secrets::from_config(&config)?;
    let metrics = Arc::new(Metrics::new());
    let state = app_state(Arc::clone(&config), secrets, log, store, metrics, None).await?;
    spawn_catalog_refresh(&state, config.http.catalog_refresh);
    let (listener, addr) = bind(&config).await?;
    tracing::info!(%addr, "query: serving the catalog, impressions and metrics");
    serve_api(listener, state, Role::Query).await
}

/// `clickagg worker`: the dataflow over the log and its sink into the store, plus the
/// operations endpoints (health, readiness, metrics) on `http.addr`.
pub async fn worker(
    config: Arc<Config>,
    log: Arc<dyn Log>,
    store: Arc<dyn Store>,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let engine = start_engine(
        Arc::clone(&config),
        Arc::clone(&log),
        Arc::clone(&store),
        Arc::clone(&metrics),
    )
    .await?;
    // The worker serves no authenticated route; its keys are random and never used.
    let secrets = Secrets::unusable();
    let state = app_state(
        Arc::clone(&config),
        secrets,
        log,
        store,
        metrics,
        Some(Arc::clone(&engine.status)),
    )
    .await?;
    let (listener, addr) = bind(&config).await?;
    tracing::info!(%addr, workers = config.workers, "worker: dataflow running; operations endpoints up");
    let served = serve_api(listener, state, Role::Worker).await;
    if served.is_ok() {
        crate::process::flush_commits(&engine.status, config.tick(), crate::process::FLUSH_LIMIT)
            .await;
    }
    tokio::task::spawn_blocking(move || engine.shutdown()).await?;
    served
}
