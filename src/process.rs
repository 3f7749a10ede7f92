//! What every clickagg process shares: starting the dataflow from the store's recovery
//! point, building the HTTP state, and serving until SIGTERM or until the sink is fenced.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use parking_lot::RwLock;

use crate::cluster::ClusterSpec;
use crate::config::Config;
use crate::dataflow::classify::Rules;
use crate::dataflow::sink::SinkStatus;
use crate::dataflow::{Engine, EngineSpec};
use crate::log::Log;
use crate::metrics::Metrics;
use crate::secrets::Secrets;
use crate::server::{AppState, Role, router};
use crate::store::Store;
use crate::token::TokenSigner;

/// The file a process writes its bound HTTP address to (useful with port 0).
pub fn addr_path(config: &Config) -> std::path::PathBuf {
    config.data_dir.join("http.addr")
}

/// The dataflow's parameters from the config.
pub fn engine_spec(config: &Config) -> EngineSpec {
    let c = &config.cluster;
    EngineSpec {
        cluster: ClusterSpec {
            processes: c.processes.clone(),
            process: c.process,
            workers: config.workers,
            peer_timeout: c.peer_timeout,
            connect_timeout: c.connect_timeout,
        },
        tick: config.tick(),
        horizon_ms: config.horizon_ms(),
        ttl_ms: config.time.impression_ttl.as_millis() as u64,
        background_nice: config.background_nice,
        rules: Rules {
            lateness_ms: config.time.allowed_lateness.as_millis() as u64,
            max_clicks_per_ip_per_second: config.fraud.max_clicks_per_ip_per_second,
        },
        finality: config.finality(),
        idle_commit_interval: Duration::from_secs(1),
        views: config.views(),
    }
}

/// Starts the dataflow and its sink from the store's recovery point, off the async
/// executor (the store's calls block, and a cluster waits for its peers). From here on a
/// panicking dataflow thread ends the process (see [`crate::cluster`]).
pub async fn start_engine(
    config: Arc<Config>,
    log: Arc<dyn Log>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Engine> {
    crate::cluster::exit_on_dataflow_panic();
    let spec = engine_spec(&config);
    tokio::task::spawn_blocking(move || Engine::start(log, store, spec, metrics))
        .await?
        .context("starting the dataflow")
}

/// The state the HTTP handlers share, with the catalog loaded from the store.
pub async fn app_state(
    config: Arc<Config>,
    secrets: Secrets,
    log: Arc<dyn Log>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    sink: Option<Arc<SinkStatus>>,
) -> anyhow::Result<AppState> {
    let reader = Arc::clone(&store);
    let ads = tokio::task::spawn_blocking(move || reader.ads())
        .await?
        .context("loading the catalog")?;
    Ok(AppState {
        signer: TokenSigner::new(
            secrets.token_secret.as_bytes(),
            config.time.impression_ttl.as_millis() as u64,
        ),
        secrets: Arc::new(secrets),
        log,
        store,
        metrics,
        ads: Arc::new(RwLock::new(
            ads.into_iter().map(|a| (a.ad_id, Arc::new(a))).collect(),
        )),
        advertiser_keys: Arc::new(RwLock::new(HashMap::new())),
        catalog_writes: Arc::new(tokio::sync::Mutex::new(())),
        sink,
        finality: config.finality(),
        partitioner: config.click_partitioner(),
        config,
    })
}

/// Reloads the catalog from the store every `interval`, for processes that do not see
/// catalog writes themselves (another process's `PUT /v1/ads` changes a price).
pub fn spawn_catalog_refresh(state: &AppState, interval: Duration) {
    let (store, ads) = (Arc::clone(&state.store), Arc::clone(&state.ads));
    tokio::spawn(async move {
        let mut every = tokio::time::interval(interval);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let store = Arc::clone(&store);
            match tokio::task::spawn_blocking(move || store.ads()).await {
                Ok(Ok(fresh)) => {
                    *ads.write() = fresh.into_iter().map(|a| (a.ad_id, Arc::new(a))).collect();
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "catalog refresh failed; keeping the cached one")
                }
                Err(e) => tracing::warn!(error = %e, "catalog refresh task failed"),
            }
        }
    });
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    tracing::info!("shutting down");
}

/// After the HTTP server stopped (every acknowledged click is durable in the log), waits
/// until the sink has committed a frontier past this instant, so the store covers every
/// acknowledged click and a restart replays nothing new; gives up after `limit` (the
/// rest is then replayed on the next start, which is safe, only slower).
pub async fn flush_commits(status: &SinkStatus, tick: crate::time::Tick, limit: Duration) {
    if !status.commits() {
        return;
    }
    let target = tick.time_of(crate::time::now_ms());
    let started = std::time::Instant::now();
    while status.committed() <= target {
        if status.fenced().is_some() {
            return;
        }
        if started.elapsed() >= limit {
            tracing::warn!(
                committed_frontier = status.committed(),
                target,
                ?limit,
                "the sink did not commit every acknowledged click in time; the next start replays them"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::info!(
        committed_frontier = status.committed(),
        frontier = %crate::time::rfc3339(status.committed()),
        took_ms = started.elapsed().as_millis() as u64,
        "flushed: the committed frontier covers every acknowledged click"
    );
}

/// A bound HTTP listener, its address written to `<data_dir>/http.addr`.
pub async fn bind(config: &Config) -> anyhow::Result<(tokio::net::TcpListener, SocketAddr)> {
    let listener = tokio::net::TcpListener::bind(config.http.addr)
        .await
        .with_context(|| format!("binding {}", config.http.addr))?;
    let addr = listener.local_addr()?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating {}", config.data_dir.display()))?;
    std::fs::write(addr_path(config), addr.to_string())
        .with_context(|| format!("writing {}", addr_path(config).display()))?;
    Ok((listener, addr))
}

/// How long open requests may take to finish after SIGTERM before they are cut off.
/// Click requests are bounded by `http.append_timeout` anyway; this bounds the rest, so
/// a process stops well within the 10 s an orchestrator usually grants.
const DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// How long a stopping process waits for the sink to commit every acknowledged click.
pub const FLUSH_LIMIT: Duration = Duration::from_secs(3);

/// Serves `role`'s API until SIGTERM, or until the sink (if any) is fenced, which is an
/// error: another writer owns the store and this process must stop. On SIGTERM the
/// listener closes at once and open requests get [`DRAIN_LIMIT`] to finish.
pub async fn serve_api(
    listener: tokio::net::TcpListener,
    state: AppState,
    role: Role,
) -> anyhow::Result<()> {
    let sink = state.sink.clone();
    let fenced = Arc::new(parking_lot::Mutex::new(None));
    let (stopping, stopped) = tokio::sync::oneshot::channel::<()>();
    let stop = {
        let fenced = Arc::clone(&fenced);
        async move {
            match sink {
                Some(status) => tokio::select! {
                    _ = shutdown_signal() => {}
                    why = status.wait_fenced() => *fenced.lock() = Some(why),
                },
                None => shutdown_signal().await,
            }
            tracing::info!("stopped accepting connections; finishing open requests");
            let _ = stopping.send(());
        }
    };
    let server = crate::server::serve(listener, router(state, role), stop);
    tokio::select! {
        served = server => served?,
        _ = async {
            if stopped.await.is_ok() {
                tokio::time::sleep(DRAIN_LIMIT).await;
            } else {
                std::future::pending::<()>().await;
            }
        } => {
            tracing::warn!(limit = ?DRAIN_LIMIT, "requests still open after the drain limit; closing them unanswered");
        }
    }
    if let Some(why) = fenced.lock().take() {
        bail!("stopped: the sink was fenced ({why})");
    }
    Ok(())
}
