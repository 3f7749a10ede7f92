//! `clickagg serve`: the whole pipeline in one process on the embedded log and SQLite.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use parking_lot::RwLock;

use crate::config::{Config, LogKind, StoreKind};
use crate::dataflow::classify::Rules;
use crate::dataflow::{Engine, EngineSpec};
use crate::log::Log;
use crate::log::embedded::{EmbeddedLog, EmbeddedLogOptions};
use crate::metrics::Metrics;
use crate::secrets::Secrets;
use crate::server::{AppState, router};
use crate::store::Store;
use crate::store::sqlite::{SqliteOptions, SqliteStore};
use crate::token::TokenSigner;

/// Where `serve` keeps its SQLite store.
pub fn store_path(config: &Config) -> PathBuf {
    config.data_dir.join("store.db")
}

/// The file `serve` writes its bound HTTP address to (useful with port 0).
pub fn addr_path(config: &Config) -> PathBuf {
    config.data_dir.join("http.addr")
}

/// The dataflow's parameters from the config.
pub fn engine_spec(config: &Config, recovery: crate::store::RecoveryPoint) -> EngineSpec {
    EngineSpec {
        workers: config.workers,
        tick: config.tick(),
        horizon_ms: config.horizon_ms(),
        ttl_ms: config.time.impression_ttl.as_millis() as u64,
        rules: Rules {
            lateness_ms: config.time.allowed_lateness.as_millis() as u64,
            max_clicks_per_ip_per_second: config.fraud.max_clicks_per_ip_per_second,
        },
        finality: config.finality(),
        recovery,
        idle_commit_interval: Duration::from_secs(1),
    }
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

/// Runs everything until Ctrl-C or SIGTERM; with `demo`, also a load generator.
pub async fn run(
    config: Config,
    demo: Option<crate::loadgen::LoadgenOptions>,
) -> anyhow::Result<()> {
    if config.log.kind != LogKind::Embedded || config.store.kind != StoreKind::Sqlite {
        bail!(
            "`clickagg serve` runs on the embedded log and SQLite (log.kind = \"embedded\", store.kind = \
             \"sqlite\"); Kafka and Postgres are for the production processes `ingest`, `worker` and \
             `query`, which are not built yet"
        );
    }
    let config = Arc::new(config);
    let (secrets, secrets_path) = Secrets::load_or_generate(&config)?;
    let metrics = Arc::new(Metrics::new());

    let log: Arc<dyn Log> = Arc::new(
        EmbeddedLog::open(
            &config.data_dir,
            EmbeddedLogOptions {
                click_partitions: config.log.click_partitions,
                verdict_partitions: config.log.verdict_partitions,
                watermark_interval: config.time.tick,
                append_timeout: config.http.append_timeout,
            },
        )
        .context("opening the embedded log")?,
    );
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(
            &store_path(&config),
            crate::views::registry(),
            SqliteOptions {
                read_pool_size: config.store.read_pool_size,
                progress_retention_ms: config.horizon_ms(),
            },
        )
        .context("opening the SQLite store")?,
    );
    let recovery = store
        .recovery_point(config.tick().ms(), config.horizon_ms())
        .context("reading the committed progress")?;
    tracing::info!(
        committed_frontier = recovery.as_of,
        replay_from = ?recovery.replay_from,
        horizon_ms = config.horizon_ms(),
        "recovery point"
    );
    let engine = Engine::start(
        Arc::clone(&log),
        Arc::clone(&store),
        engine_spec(&config, recovery),
        Arc::clone(&metrics),
    )?;

    let ads = store.ads().context("loading the catalog")?;
    let state = AppState {
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
        sink: Some(Arc::clone(&engine.status)),
        finality: config.finality(),
        config: Arc::clone(&config),
    };

    let listener = tokio::net::TcpListener::bind(config.http.addr)
        .await
        .with_context(|| format!("binding {}", config.http.addr))?;
    let addr = listener.local_addr()?;
    std::fs::write(addr_path(&config), addr.to_string())?;
    print_banner(&config, &addr, &secrets_path);

    if let Some(mut options) = demo {
        options.url = format!("http://{addr}");
        options.admin_key = state.secrets.admin_key.clone();
        options.ad_server_key = state.secrets.ad_server_key.clone();
        tokio::spawn(async move {
            match crate::loadgen::run(options).await {
                Ok(report) => tracing::info!(%report, "demo traffic finished"),
                Err(e) => tracing::error!(error = %e, "demo traffic failed"),
            }
        });
    }

    let status = Arc::clone(&engine.status);
    let fenced = Arc::new(parking_lot::Mutex::new(None));
    let stop = {
        let fenced = Arc::clone(&fenced);
        async move {
            tokio::select! {
                _ = shutdown_signal() => {}
                why = status.wait_fenced() => *fenced.lock() = Some(why),
            }
        }
    };
    crate::server::serve(listener, router(state), stop).await?;
    tokio::task::spawn_blocking(move || engine.shutdown()).await?;
    if let Some(why) = fenced.lock().take() {
        bail!("stopped: the sink was fenced ({why})");
    }
    Ok(())
}

fn print_banner(config: &Config, addr: &std::net::SocketAddr, secrets_path: &std::path::Path) {
    let key_source = if config.keys.admin_key.is_empty() {
        format!("admin_key in {}", secrets_path.display())
    } else {
        "the configured admin key (keys.admin_key / CLICKAGG_ADMIN_KEY)".to_owned()
    };
    println!("clickagg is serving on http://{addr}");
    println!("  data directory: {}", config.data_dir.display());
    println!("  admin key:      {key_source}");
    println!("  try:");
    println!(
        "    ADMIN=$(sed -n 's/^admin_key = \"\\(.*\\)\"$/\\1/p' {})",
        secrets_path.display()
    );
    println!(
        "    curl -s -H \"Authorization: Bearer $ADMIN\" -X POST http://{addr}/v1/advertisers \\"
    );
    println!(
        "         -H 'Content-Type: application/json' -d '{{\"advertiser_id\": 7, \"name\": \"Acme\"}}'"
    );
    println!(
        "    curl -s -H \"Authorization: Bearer $ADMIN\" 'http://{addr}/v1/advertisers/7/clicks?granularity=1m'"
    );
}
