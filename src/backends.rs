//! Opening the production backends from the config: the Kafka log and the Postgres
//! store. A process may start before its broker or database is up (a restart after a
//! crash, a machine coming back), so opening retries with backoff for a bounded time and
//! then fails with the last error.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::config::{Config, LogKind, StoreKind};
use crate::log::kafka::{KafkaLog, KafkaLogOptions};
use crate::store::postgres::{PostgresOptions, PostgresStore};

/// How long a starting process waits for Kafka before giving up (Postgres: the
/// `store.startup_timeout` key).
const STARTUP_PATIENCE: Duration = Duration::from_secs(60);

/// Refuses a config that is not for the production processes.
pub fn require_production(config: &Config, command: &str) -> anyhow::Result<()> {
    if config.log.kind != LogKind::Kafka || config.store.kind != StoreKind::Postgres {
        bail!(
            "`clickagg {command}` runs on Kafka and Postgres: set log.kind = \"kafka\" and \
             store.kind = \"postgres\" (see config/production.toml), or run `clickagg serve` \
             for the embedded pipeline"
        );
    }
    Ok(())
}

/// The Kafka log's options from the config.
pub fn kafka_options(config: &Config) -> KafkaLogOptions {
    let log = &config.log;
    let mut options = KafkaLogOptions::new(log.kafka_brokers.clone());
    options.topic_prefix = log.topic_prefix.clone();
    options.click_partitions = log.click_partitions;
    options.verdict_partitions = log.verdict_partitions;
    options.replication_factor = Some(log.kafka_replication_factor);
    options.min_insync_replicas = Some(log.kafka_min_insync_replicas);
    options.retention = Some(log.kafka_retention);
    options.append_timeout = config.http.append_timeout;
    options.delivery_timeout = log.kafka_delivery_timeout.max(config.http.append_timeout);
    options.max_in_flight_records = log.kafka_max_in_flight_records;
    options.properties = log
        .kafka_properties
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    options
}

/// Runs `open` until it succeeds or `patience` has passed, off the executor. An error
/// `permanent` calls hopeless (a malformed URL) fails at once: retrying cannot help.
async fn patiently<T: Send + 'static, E: std::fmt::Display + Send + 'static>(
    what: &'static str,
    patience: Duration,
    permanent: fn(&E) -> bool,
    open: impl Fn() -> Result<T, E> + Send + Sync + 'static,
) -> anyhow::Result<T> {
    let open = Arc::new(open);
    let started = Instant::now();
    let mut backoff = Duration::from_millis(200);
    loop {
        let attempt = Arc::clone(&open);
        match tokio::task::spawn_blocking(move || attempt()).await? {
            Ok(v) => return Ok(v),
            Err(e) if permanent(&e) => bail!("cannot open {what}: {e}"),
            Err(e) if started.elapsed() + backoff < patience => {
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot open {what} yet");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(e) => bail!(
                "cannot open {what} (gave up after {}): {e}",
                humantime::format_duration(Duration::from_millis(
                    started.elapsed().as_millis() as u64
                ))
            ),
        }
    }
}

/// Store errors that no retry fixes: a malformed URL or a schema that contradicts us.
fn store_error_is_permanent(e: &crate::store::StoreError) -> bool {
    matches!(e, crate::store::StoreError::Inconsistent(_))
}

fn never_permanent<E>(_: &E) -> bool {
    false
}

/// Opens the Kafka log, creating missing topics and checking partition counts.
pub async fn open_log(config: &Config) -> anyhow::Result<KafkaLog> {
    let options = kafka_options(config);
    patiently(
        "the Kafka log",
        STARTUP_PATIENCE,
        never_permanent,
        move || KafkaLog::open(options.clone()),
    )
    .await
    .with_context(|| format!("Kafka at {}", config.log.kafka_brokers))
}

/// Opens (and migrates) the Postgres store.
pub async fn open_store(config: &Config) -> anyhow::Result<PostgresStore> {
    let url = config.store.postgres_url.clone();
    let views = config.views();
    let options = PostgresOptions {
        pool_size: config.store.read_pool_size,
        progress_retention_ms: config.horizon_ms(),
    };
    patiently(
        "the Postgres store",
        config.store.startup_timeout,
        store_error_is_permanent,
        move || PostgresStore::open(&url, views, options),
    )
    .await
    .with_context(|| {
        format!(
            "Postgres store unreachable (store.postgres_url {}, store.startup_timeout {})",
            crate::store::postgres::redacted_url(&config.store.postgres_url),
            humantime::format_duration(config.store.startup_timeout)
        )
    })
}

/// `clickagg migrate`: the store's schema and view tables, and the Kafka topics.
pub async fn migrate(config: &Config) -> anyhow::Result<()> {
    let url = config.store.postgres_url.clone();
    let views = config.views();
    let applied = patiently(
        "the Postgres store",
        config.store.startup_timeout,
        store_error_is_permanent,
        move || crate::store::postgres::migrate(&url, views),
    )
    .await?;
    println!(
        "postgres: {}",
        if applied.is_empty() {
            "schema up to date".to_owned()
        } else {
            format!("applied {}", applied.join(", "))
        }
    );
    let log = open_log(config).await?;
    println!(
        "kafka: topics {}, {}, {} ready ({} and {} partitions)",
        log.topic_name(crate::record::Topic::Clicks),
        log.topic_name(crate::record::Topic::FraudVerdicts),
        log.topic_name(crate::record::Topic::Ads),
        config.log.click_partitions,
        config.log.verdict_partitions
    );
    Ok(())
}
