//! `clickagg serve`: the whole pipeline in one process on the embedded log and SQLite.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};

use crate::config::{Config, LogKind, StoreKind};
use crate::log::Log;
use crate::log::embedded::{EmbeddedLog, EmbeddedLogOptions};
use crate::metrics::Metrics;
use crate::process::{app_state, bind, serve_api, start_engine};
use crate::secrets::Secrets;
use crate::server::Role;
use crate::store::Store;
use crate::store::sqlite::{SqliteOptions, SqliteStore};

/// Where `serve` keeps its SQLite store.
pub fn store_path(config: &Config) -> PathBuf {
    config.data_dir.join("store.db")
}

/// The SQLite store's options from the config, with `read_pool_size` connections for
/// queries (`serve` takes the configured number; the one-shot commands fewer).
pub fn store_options(config: &Config, read_pool_size: u32) -> SqliteOptions {
    SqliteOptions {
        read_pool_size,
        progress_retention_ms: config.horizon_ms(),
        cache_mib: config.store.sqlite_cache_mib,
    }
}

/// Where the demo traffic saves the API keys of the advertisers it creates.
pub fn demo_keys_path(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("demo-advertisers.toml")
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
             `query`"
        );
    }
    // Named at once: a data directory we cannot create or write (a typo, a read-only
    // mount) would otherwise surface as an obscure SQLite or secrets-file error.
    crate::preflight::check_data_dir(&config.data_dir)?;
    let config = Arc::new(config);
    let (secrets, secrets_path) = Secrets::load_or_generate(&config)?;
    let metrics = Arc::new(Metrics::new());

    let log: Arc<dyn Log> = Arc::new(
        EmbeddedLog::open(
            &config.data_dir,
            EmbeddedLogOptions {
                click_partitions: config.log.click_partitions,
                verdict_partitions: config.log.verdict_partitions,
                watermark_interval: Some(config.time.tick),
                append_timeout: config.http.append_timeout,
            },
        )
        .context("opening the embedded log")?,
    );
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(
            &store_path(&config),
            config.views(),
            store_options(&config, config.store.read_pool_size),
        )
        .context("opening the SQLite store")?,
    );
    crate::tools::spawn_serve_archiver(&config, Arc::clone(&log))?;
    let engine = start_engine(
        Arc::clone(&config),
        Arc::clone(&log),
        Arc::clone(&store),
        Arc::clone(&metrics),
    )
    .await?;
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
    print_banner(&config, &addr, &secrets_path, demo.is_some());

    if let Some(mut options) = demo {
        options.url = format!("http://{addr}");
        options.admin_key = state.secrets.admin_key.clone();
        options.ad_server_key = state.secrets.ad_server_key.clone();
        options.keys_file = Some(demo_keys_path(&config.data_dir));
        tokio::spawn(async move {
            match crate::loadgen::run(options).await {
                Ok(report) => tracing::info!(%report, "demo traffic finished"),
                Err(e) => tracing::error!(error = %e, "demo traffic failed"),
            }
        });
    }

    let served = serve_api(listener, state, Role::All).await;
    if served.is_ok() {
        crate::process::flush_commits(&engine.status, config.tick(), crate::process::FLUSH_LIMIT)
            .await;
    }
    tokio::task::spawn_blocking(move || engine.shutdown()).await?;
    tracing::info!("stopped");
    served
}

fn print_banner(
    config: &Config,
    addr: &std::net::SocketAddr,
    secrets_path: &std::path::Path,
    demo: bool,
) {
    let key_source = if config.keys.admin_key.is_empty() {
        format!("admin_key in {}", secrets_path.display())
    } else {
        "the configured admin key (keys.admin_key / CLICKAGG_ADMIN_KEY)".to_owned()
    };
    println!("clickagg is serving on http://{addr}");
    println!("  data directory: {}", config.data_dir.display());
    println!("  admin key:      {key_source}");
    println!("  dashboard:      http://{addr}/dashboard (log in with an advertiser's API key)");
    if demo {
        println!(
            "  demo keys:      the demo advertisers' API keys are in {}",
            demo_keys_path(&config.data_dir).display()
        );
    }
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
