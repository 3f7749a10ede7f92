//! Configuration: a TOML file layered with `CLICKAGG_*` environment variables.
//!
//! Unknown keys and impossible values are rejected when the process starts, with a
//! message naming the key, so a typo never silently falls back to a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::time::{Finality, Tick};

/// The built-in defaults, identical to `config/default.toml`.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// A configuration problem, always naming the key or variable at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML is malformed, has an unknown key, or a value of the wrong type.
    #[error("invalid config{origin}: {message}")]
    Parse {
        /// Where the text came from.
        origin: String,
        /// The parser's message, which names the key.
        message: String,
    },
    /// An environment variable could not be parsed.
    #[error("invalid environment variable {var}={value:?}: {message}")]
    Env {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// Why it was rejected.
        message: String,
    },
    /// A value is out of range or contradicts another one.
    #[error("invalid config value {key}: {message}")]
    Invalid {
        /// The key, as written in the TOML file.
        key: &'static str,
        /// Why it was rejected.
        message: String,
    },
}

/// The whole configuration of a clickagg process.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Directory of the embedded log, the SQLite store and generated secrets.
    pub data_dir: PathBuf,
    /// Timely worker threads in this process.
    pub workers: usize,
    /// Nice value of the threads off the click path, the timely workers and the archiver
    /// (Linux, 0 to 19): above 0, the HTTP threads and the log writer get a core first.
    pub background_nice: i32,
    /// The HTTP server.
    pub http: HttpConfig,
    /// Keys and the token secret.
    pub keys: KeysConfig,
    /// Ticks, TTL, lateness, correction window and horizon.
    pub time: TimeConfig,
    /// Built-in fraud rules.
    pub fraud: FraudConfig,
    /// The click log.
    pub log: LogConfig,
    /// The result store.
    pub store: StoreConfig,
    /// Which views run.
    pub views: ViewsConfig,
    /// The raw click archive (Parquet) and its archiver.
    pub archive: crate::archive::ArchiveConfig,
    /// How long archived raw records and stored aggregates are kept (`clickagg compact`).
    pub retention: crate::archive::RetentionConfig,
    /// The timely cluster of `clickagg worker` processes.
    pub cluster: ClusterConfig,
}

/// The processes of a `clickagg worker` timely cluster; empty `processes` = one process.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// `host:port` of every worker process, in process order; process `i` listens on
    /// entry `i` and connects to the others. Empty: a single process.
    pub processes: Vec<String>,
    /// Which entry of `processes` this process is (`clickagg worker --process I`);
    /// never read from a file, since every machine shares one.
    #[serde(skip)]
    pub process: usize,
    /// A worker process that hears nothing from a peer process for this long exits.
    #[serde(deserialize_with = "duration")]
    pub peer_timeout: Duration,
    /// How long a starting process waits for all its peers to connect before it exits.
    #[serde(deserialize_with = "duration")]
    pub connect_timeout: Duration,
}

impl ClusterConfig {
    /// How many worker processes form the cluster.
    pub fn process_count(&self) -> usize {
        self.processes.len().max(1)
    }
}

/// Which of the registered views (`dataflows/`) run.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ViewsConfig {
    /// Views switched off (not those the API reads). A view's window length enters the
    /// minimum horizon, so switching off `ad_hourly_users` allows a horizon below an hour.
    pub disabled: Vec<String>,
}

/// The HTTP server.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Listen address; port 0 picks a free port (written to `<data_dir>/http.addr`).
    pub addr: SocketAddr,
    /// Largest accepted request body in bytes.
    pub max_body_bytes: usize,
    /// Take the client IP of `GET /c/{token}` from `X-Forwarded-For` (behind a proxy).
    pub trust_forwarded_for: bool,
    /// How long a click request waits for the log before answering 503.
    #[serde(deserialize_with = "duration")]
    pub append_timeout: Duration,
    /// How often a process without the catalog in its own log (`ingest`) reloads it from
    /// the store, so price and landing-URL changes reach the click path.
    #[serde(deserialize_with = "duration")]
    pub catalog_refresh: Duration,
}

/// Keys and the token secret; empty values are generated into the data directory.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysConfig {
    /// The admin key (catalog, verdicts, every advertiser's metrics).
    pub admin_key: String,
    /// The ad-server key, which may mint impressions.
    pub ad_server_key: String,
    /// The HMAC-SHA256 secret that signs impression tokens.
    pub token_secret: String,
}

/// The time parameters of the exactly-once design (see `docs/design-notes.md`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeConfig {
    /// Record times are rounded up to this before they become timely times.
    #[serde(deserialize_with = "duration")]
    pub tick: Duration,
    /// How long an impression token accepts clicks.
    #[serde(deserialize_with = "duration")]
    pub impression_ttl: Duration,
    /// A click whose record time exceeds its event time by more than this is late.
    #[serde(deserialize_with = "duration")]
    pub allowed_lateness: Duration,
    /// How long after its last possible click a window still takes fraud corrections.
    #[serde(deserialize_with = "duration")]
    pub correction_window: Duration,
    /// How long every click and verdict stays in the dataflow; `auto` = the minimum.
    #[serde(deserialize_with = "horizon")]
    pub horizon: Option<Duration>,
}

/// Built-in fraud rules.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FraudConfig {
    /// More clicks than this from one IP within one second (of event time) are fraud.
    pub max_clicks_per_ip_per_second: u64,
}

/// Which log carries clicks, verdicts and catalog changes.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogKind {
    /// The embedded SQLite log in the data directory.
    Embedded,
    /// Kafka topics (production).
    Kafka,
}

/// The click log.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `embedded` or `kafka`.
    pub kind: LogKind,
    /// Partitions of the `clicks` topic.
    pub click_partitions: u32,
    /// Partitions of the `fraud_verdicts` topic.
    pub verdict_partitions: u32,
    /// Kafka bootstrap servers, for `kind = "kafka"`.
    pub kafka_brokers: String,
    /// Prefix of the Kafka topic names (`<prefix>clicks`, ...), to share a cluster.
    pub topic_prefix: String,
    /// Ads whose clicks spread over several partitions (by impression hash).
    pub hot_ads: Vec<u64>,
    /// Over how many `clicks` partitions each hot ad spreads.
    pub hot_ad_spread: u32,
    /// Replication factor of the topics `migrate` creates (3 for real durability).
    pub kafka_replication_factor: u16,
    /// `min.insync.replicas` of the topics `migrate` creates.
    pub kafka_min_insync_replicas: u16,
    /// How long Kafka keeps clicks and verdicts; must exceed the horizon (recovery replays
    /// one horizon back) plus the longest outage to survive.
    #[serde(deserialize_with = "duration")]
    pub kafka_retention: Duration,
    /// How long the producer keeps retrying a record after its append timed out.
    #[serde(deserialize_with = "duration")]
    pub kafka_delivery_timeout: Duration,
    /// Records produced but not yet acknowledged, at most (then 503).
    pub kafka_max_in_flight_records: usize,
    /// Extra librdkafka properties (TLS, SASL, tuning); they cannot weaken idempotence,
    /// acks or offset handling.
    pub kafka_properties: std::collections::BTreeMap<String, String>,
}

/// Which store holds results, progress and the catalog.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// SQLite in the data directory.
    Sqlite,
    /// Postgres (production).
    Postgres,
}

/// The result store.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `sqlite` or `postgres`.
    pub kind: StoreKind,
    /// Postgres connection URL, for `kind = "postgres"`.
    pub postgres_url: String,
    /// Connections the query API keeps open.
    pub read_pool_size: u32,
    /// The SQLite store's writer page cache, in MiB.
    pub sqlite_cache_mib: u32,
    /// How long a starting production process retries an unreachable Postgres before it
    /// exits with the last error (a restart may race the database coming back).
    #[serde(deserialize_with = "duration")]
    pub startup_timeout: Duration,
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

fn horizon<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    parse_horizon(&s).map_err(serde::de::Error::custom)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.starts_with('-') {
        return Err(format!("{s:?} is negative; durations must be positive"));
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration like 500ms, 30s or 2h ({e})"))
}

fn parse_horizon(s: &str) -> Result<Option<Duration>, String> {
    if s.trim() == "auto" {
        Ok(None)
    } else {
        parse_duration(s).map(Some)
    }
}

/// An environment override: the variable and how it changes the config.
struct EnvOverride {
    var: &'static str,
    apply: fn(&mut Config, &str) -> Result<(), String>,
}

fn parse<T: std::str::FromStr>(s: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    s.trim().parse::<T>().map_err(|e| e.to_string())
}

/// Every `CLICKAGG_*` variable and the key it overrides.
const ENV_OVERRIDES: &[EnvOverride] = &[
    EnvOverride {
        var: "CLICKAGG_HTTP_ADDR",
        apply: |c, v| {
            c.http.addr = parse(v)?;
            Ok(())
        },
    },
    EnvOverride {
        var: "CLICKAGG_DATA_DIR",
        apply: |c, v| {
            c.data_dir = PathBuf::from(v);
            Ok(())
        },
    },
    EnvOverride {
        var: "CLICKAGG_ADMIN_KEY",
        apply: |c, v| {
            c.keys.admin_key = v.to_owned();
            Ok(())
        },
    },
    EnvOverride {
        var: "CLICKAGG_AD_SERVER_KEY",
        apply: |c, v| {
            c.keys.ad_server_key = v.to_owned();
            Ok(())
        },
    },
    EnvOverride {
        var: "CLICKAGG_TOKEN_SECRET",
        apply: |c, v| {
            c.keys.token_secret = v.to_owned();
            Ok(())
        },
    },
    EnvOverride {
        var: "CLICKAGG_TICK",
        apply: |c, v| {
            c.time.tick = parse_duration(v)?;
            Ok(())
        },
    },
    EnvOverride {
        var: "CLICKAGG_ALLOWED_LATENESS",
        apply: |c, v| {
            c.time.allowed_lateness = parse_duration(v)?;
            Ok(())
        },
    },
    EnvOverride {
        var: "CLICKAGG_IMPRESSION_TTL",
        apply: |c, v| {
            c.time.impression_ttl = parse_duration(v)?;
            Ok(())
        },
    },
    EnvOverride {
        var: "CLICKAGG_CORRECTION_WINDOW",
        apply: |c, v| {
            c.time.correction_window = parse_duration(v)?;
            Ok(())
        },
    },
    EnvOverride {
        var: "CLICKAGG_HORIZON",
        apply: |c, v| {
            c.time.horizon = parse_horizon(v)?;
            Ok(())
        },
    },
    EnvOverride {
        var: "CLICKAGG_FRAUD_MAX_CLICKS_PER_IP_PER_SECOND",
        apply: |c, v| {
            c.fraud.max_clicks_per_ip_per_second = parse(v)?;
            Ok(())
        },
    },
    EnvOverride {
        var: "CLICKAGG_WORKERS",
        apply: |c, v| {
            c.workers = parse(v)?;
            Ok(())
        },
    },
    EnvOverride {
        var: "CLICKAGG_BACKGROUND_NICE",
        apply: |c, v| {
            c.background_nice = parse(v)?;
            Ok(())
        },
    },
    EnvOverride {
        var: "CLICKAGG_CLUSTER_PROCESS",
        apply: |c, v| {
            c.cluster.process = parse(v)?;
            Ok(())
        },
    },
    EnvOverride {
        var: "CLICKAGG_KAFKA_BROKERS",
        apply: |c, v| {
            c.log.kafka_brokers = v.to_owned();
            Ok(())
        },
    },
    EnvOverride {
        var: "CLICKAGG_TOPIC_PREFIX",
        apply: |c, v| {
            c.log.topic_prefix = v.to_owned();
            Ok(())
        },
    },
    EnvOverride {
        var: "CLICKAGG_LOG_KIND",
        apply: |c, v| {
            c.log.kind = match v.trim() {
                "embedded" => LogKind::Embedded,
                "kafka" => LogKind::Kafka,
                other => return Err(format!("{other:?} is neither embedded nor kafka")),
            };
            Ok(())
        },
    },
    EnvOverride {
        var: "CLICKAGG_STORE_KIND",
        apply: |c, v| {
            c.store.kind = match v.trim() {
                "sqlite" => StoreKind::Sqlite,
                "postgres" => StoreKind::Postgres,
                other => return Err(format!("{other:?} is neither sqlite nor postgres")),
            };
            Ok(())
        },
    },
    EnvOverride {
        var: "CLICKAGG_STORE_STARTUP_TIMEOUT",
        apply: |c, v| {
            c.store.startup_timeout = parse_duration(v)?;
            Ok(())
        },
    },
    EnvOverride {
        var: "CLICKAGG_POSTGRES_URL",
        apply: |c, v| {
            c.store.postgres_url = v.to_owned();
            Ok(())
        },
    },
];

/// The `CLICKAGG_*` variables that override the config, for docs and `--help`.
pub fn env_variables() -> impl Iterator<Item = &'static str> {
    ENV_OVERRIDES.iter().map(|o| o.var)
}

impl Config {
    /// The built-in defaults with the environment applied.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(path, |var| std::env::var(var).ok())
    }

    /// Loads a file (or the defaults), applies overrides from `env`, and validates.
    pub fn load_with_env(
        path: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut config = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                Self::from_toml(&text, &format!(" in {}", path.display()))?
            }
            None => Self::from_toml(DEFAULT_TOML, " (built-in defaults)")?,
        };
        for o in ENV_OVERRIDES {
            if let Some(value) = env(o.var) {
                (o.apply)(&mut config, &value).map_err(|message| ConfigError::Env {
                    var: o.var,
                    value: value.clone(),
                    message,
                })?;
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text; every key must be present in the file or in the defaults.
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        // A file only needs the keys it changes: merge it over the defaults first, so
        // an unknown key still fails (deny_unknown_fields) while a missing one does not.
        let parse_err = |e: toml::de::Error| ConfigError::Parse {
            origin: origin.to_owned(),
            message: e.to_string().trim().to_owned(),
        };
        let mut base: toml::Table = toml::from_str(DEFAULT_TOML).map_err(parse_err)?;
        let file: toml::Table = toml::from_str(text).map_err(parse_err)?;
        // Named with its full path (`time.tick_ms`) on the first line: serde's message
        // names only the last segment, against the merged text's line numbers.
        if let Some(key) = unknown_key(&file, &base, "") {
            return Err(ConfigError::Parse {
                origin: origin.to_owned(),
                message: format!("unknown key {key}"),
            });
        }
        merge(&mut base, file);
        let text = toml::to_string(&base).map_err(|e| ConfigError::Parse {
            origin: origin.to_owned(),
            message: e.to_string(),
        })?;
        toml::from_str(&text).map_err(|e: toml::de::Error| ConfigError::Parse {
            origin: origin.to_owned(),
            // The merged text's line numbers mean nothing to the user: name the key.
            message: match e.span().and_then(|span| key_at(&text, span.start)) {
                Some(key) => format!("{key}: {}", e.message().trim()),
                None => e.to_string().trim().to_owned(),
            },
        })
    }

    /// Checks ranges and the relations between the time parameters.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: String| Err(ConfigError::Invalid { key, message });
        if self.workers == 0 || self.workers > 256 {
            return invalid(
                "workers",
                format!("{} is not between 1 and 256", self.workers),
            );
        }
        if !(0..=19).contains(&self.background_nice) {
            return invalid(
                "background_nice",
                format!("{} is not between 0 and 19", self.background_nice),
            );
        }
        if let Err(message) = crate::views::check_disabled(&self.views.disabled) {
            return invalid("views.disabled", message);
        }
        let t = &self.time;
        if t.tick < Duration::from_millis(10) || t.tick > Duration::from_secs(10) {
            return invalid(
                "time.tick",
                format!("{:?} is not between 10ms and 10s", t.tick),
            );
        }
        if t.impression_ttl < t.tick {
            return invalid("time.impression_ttl", "must be at least one tick".into());
        }
        if t.allowed_lateness.is_zero() {
            return invalid("time.allowed_lateness", "must be positive".into());
        }
        if let Some(h) = t.horizon {
            let min = self.min_horizon();
            if h < min {
                return invalid(
                    "time.horizon",
                    format!(
                        "{} is below the minimum {} = 2 x impression_ttl + correction_window + \
                         longest view window + 2 ticks; use \"auto\" or raise it",
                        humantime::format_duration(h),
                        humantime::format_duration(min)
                    ),
                );
            }
        }
        if self.fraud.max_clicks_per_ip_per_second == 0 {
            return invalid(
                "fraud.max_clicks_per_ip_per_second",
                "must be at least 1".into(),
            );
        }
        if self.log.click_partitions == 0 || self.log.click_partitions > 1024 {
            return invalid("log.click_partitions", "must be between 1 and 1024".into());
        }
        if self.log.verdict_partitions == 0 || self.log.verdict_partitions > 1024 {
            return invalid(
                "log.verdict_partitions",
                "must be between 1 and 1024".into(),
            );
        }
        if self.http.max_body_bytes < 1024 {
            return invalid("http.max_body_bytes", "must be at least 1024".into());
        }
        if self.http.catalog_refresh < Duration::from_millis(100) {
            return invalid("http.catalog_refresh", "must be at least 100ms".into());
        }
        if !self
            .log
            .topic_prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            || self.log.topic_prefix.len() > 200
        {
            return invalid(
                "log.topic_prefix",
                "may hold only letters, digits, '.', '_' and '-' (at most 200)".into(),
            );
        }
        if self.log.hot_ad_spread == 0 || self.log.hot_ad_spread > self.log.click_partitions {
            return invalid(
                "log.hot_ad_spread",
                "must be between 1 and log.click_partitions".into(),
            );
        }
        if self.log.kafka_replication_factor == 0 {
            return invalid("log.kafka_replication_factor", "must be at least 1".into());
        }
        if self.log.kafka_min_insync_replicas == 0
            || self.log.kafka_min_insync_replicas > self.log.kafka_replication_factor
        {
            return invalid(
                "log.kafka_min_insync_replicas",
                "must be between 1 and log.kafka_replication_factor".into(),
            );
        }
        if self.log.kind == LogKind::Kafka
            && self.log.kafka_retention.as_millis() <= u128::from(self.horizon_ms())
        {
            return invalid(
                "log.kafka_retention",
                format!(
                    "{} does not exceed the horizon {}; recovery replays one horizon of log",
                    humantime::format_duration(self.log.kafka_retention),
                    humantime::format_duration(Duration::from_millis(self.horizon_ms()))
                ),
            );
        }
        if self.log.kafka_max_in_flight_records == 0 {
            return invalid(
                "log.kafka_max_in_flight_records",
                "must be at least 1".into(),
            );
        }
        if self.store.read_pool_size == 0 {
            return invalid("store.read_pool_size", "must be at least 1".into());
        }
        if !(1..=65_536).contains(&self.store.sqlite_cache_mib) {
            return invalid(
                "store.sqlite_cache_mib",
                "must be between 1 and 65536 (MiB)".into(),
            );
        }
        if self.store.startup_timeout > Duration::from_secs(3600) {
            return invalid("store.startup_timeout", "must be at most 1h".into());
        }
        if self.store.kind == StoreKind::Postgres
            && let Err(e) = self.store.postgres_url.parse::<postgres::Config>()
        {
            // The message never echoes the URL: it may hold a password.
            return invalid(
                "store.postgres_url",
                format!("not a Postgres URL like postgres://user@host:5432/db ({e})"),
            );
        }
        crate::archive::validate_config(&self.archive, &self.retention)
            .map_err(|(key, message)| ConfigError::Invalid { key, message })?;
        self.validate_cluster()
    }

    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: String| Err(ConfigError::Invalid { key, message });
        let c = &self.cluster;
        if c.processes.len() > 256 {
            return invalid("cluster.processes", "at most 256 processes".into());
        }
        for (i, p) in c.processes.iter().enumerate() {
            let port = p
                .rsplit_once(':')
                .map(|(host, port)| (host, port.parse::<u16>()));
            if !matches!(port, Some((host, Ok(port))) if !host.is_empty() && port != 0) {
                return invalid(
                    "cluster.processes",
                    format!("entry {i} ({p:?}) is not host:port with a fixed port"),
                );
            }
            if c.processes[..i].contains(p) {
                return invalid("cluster.processes", format!("{p:?} is listed twice"));
            }
        }
        if c.process >= c.process_count() {
            return invalid(
                "cluster.process",
                format!(
                    "process {} does not exist: cluster.processes lists {} (counting from 0)",
                    c.process,
                    c.process_count()
                ),
            );
        }
        if c.peer_timeout < Duration::from_secs(1) {
            return invalid("cluster.peer_timeout", "must be at least 1s".into());
        }
        if c.connect_timeout < Duration::from_secs(1) {
            return invalid("cluster.connect_timeout", "must be at least 1s".into());
        }
        if c.processes.len() > 1
            && (self.log.kind != LogKind::Kafka || self.store.kind != StoreKind::Postgres)
        {
            return invalid(
                "cluster.processes",
                "a cluster of several worker processes needs log.kind = \"kafka\" and \
                 store.kind = \"postgres\" (every process reads the same log; one writes \
                 the shared store)"
                    .into(),
            );
        }
        Ok(())
    }

    /// How clicks are spread over the `clicks` partitions.
    pub fn click_partitioner(&self) -> crate::log::ClickPartitioner {
        crate::log::ClickPartitioner::new(
            self.log.click_partitions,
            &self.log.hot_ads,
            self.log.hot_ad_spread,
        )
    }

    /// The views that run: the registry minus `views.disabled`.
    pub fn views(&self) -> &'static [crate::views::ViewDef] {
        crate::views::enabled(&self.views.disabled)
    }

    /// The tick.
    pub fn tick(&self) -> Tick {
        Tick::new(self.time.tick)
    }

    /// The smallest horizon that keeps dedup exact and windows stable (see `docs/design-notes.md`).
    pub fn min_horizon(&self) -> Duration {
        let t = &self.time;
        2 * t.impression_ttl
            + t.correction_window
            + Duration::from_millis(crate::views::longest_window_ms(self.views()))
            + 2 * t.tick
    }

    /// The horizon in ms, a whole number of ticks.
    pub fn horizon_ms(&self) -> u64 {
        let h = self.time.horizon.unwrap_or_else(|| self.min_horizon());
        self.tick().round_up(h)
    }

    /// When windows become final.
    pub fn finality(&self) -> Finality {
        Finality {
            ttl_ms: self.time.impression_ttl.as_millis() as u64,
            correction_ms: self.time.correction_window.as_millis() as u64,
        }
    }
}

/// The dotted key whose value starts at byte `at` of TOML `text` (as `toml` writes it:
/// one `[section]` header per table, one `key = value` per line).
fn key_at(text: &str, at: usize) -> Option<String> {
    let before = text.get(..at)?;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = &text[line_start..];
    let (key, _) = line.split_once('=')?;
    let key = key.trim().trim_matches('"');
    let section = before[..line_start]
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix('[')?.strip_suffix(']'));
    Some(match section {
        Some(section) => format!("{section}.{key}"),
        None => key.to_owned(),
    })
}

/// Tables whose keys are free-form (passed through), not checked against the defaults.
const FREE_FORM_TABLES: &[&str] = &["log.kafka_properties"];

/// The first key of `file` (as a dotted path) that the defaults do not have.
fn unknown_key(file: &toml::Table, base: &toml::Table, prefix: &str) -> Option<String> {
    for (k, v) in file {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match (base.get(k), v) {
            (None, _) => return Some(path),
            (Some(toml::Value::Table(b)), toml::Value::Table(o))
                if !FREE_FORM_TABLES.contains(&path.as_str()) =>
            {
                if let Some(found) = unknown_key(o, b, &path) {
                    return Some(found);
                }
            }
            _ => {}
        }
    }
    None
}

fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().map_err(|source| ConfigError::Read {
            path: PathBuf::from("tmp"),
            source,
        })?;
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::load_with_env(Some(&path), move |var| {
            env.iter().find(|(k, _)| k == var).map(|(_, v)| v.clone())
        })
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::load_with_env(None, |_| None).expect("defaults load");
        assert_eq!(c.log.kind, LogKind::Embedded);
        assert!(c.horizon_ms() >= c.min_horizon().as_millis() as u64);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = load("[time]\ntick_ms = 5\n", &[]).expect_err("unknown key");
        assert!(
            err.to_string().contains("unknown key time.tick_ms"),
            "{err}"
        );
        let err = load("[nope]\nx = 1\n", &[]).expect_err("unknown table");
        assert!(err.to_string().contains("unknown key nope"), "{err}");
        load(
            "[log.kafka_properties]\n\"socket.timeout.ms\" = \"100\"\n",
            &[],
        )
        .expect("free-form librdkafka properties");
    }

    #[test]
    fn the_sqlite_cache_is_64_mib_unless_set_and_must_be_positive() {
        assert_eq!(load("", &[]).expect("defaults").store.sqlite_cache_mib, 64);
        let c = load("[store]\nsqlite_cache_mib = 256\n", &[]).expect("set");
        assert_eq!(c.store.sqlite_cache_mib, 256);
        let err = load("[store]\nsqlite_cache_mib = 0\n", &[]).expect_err("zero");
        assert!(err.to_string().contains("store.sqlite_cache_mib"), "{err}");
    }

    #[test]
    fn background_nice_is_a_nice_value_and_yields_in_serve_only() {
        assert_eq!(load("", &[]).expect("defaults").background_nice, 10);
        let c = load("", &[("CLICKAGG_BACKGROUND_NICE", "0")]).expect("env override");
        assert_eq!(c.background_nice, 0);
        for bad in ["background_nice = 20\n", "background_nice = -1\n"] {
            let err = load(bad, &[]).expect_err("out of range");
            assert!(err.to_string().contains("background_nice"), "{err}");
        }
        for file in ["production.toml", "cluster.toml"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("config")
                .join(file);
            let c = Config::load_with_env(Some(&path), |_| None).expect(file);
            assert_eq!(c.background_nice, 0, "{file}: no click path to yield to");
        }
    }

    #[test]
    fn views_can_be_switched_off_but_not_the_apis() {
        let err = load("[views]\ndisabled = [\"nope\"]\n", &[]).expect_err("unknown");
        assert!(err.to_string().contains("views.disabled") && err.to_string().contains("nope"));
        let err = load("[views]\ndisabled = [\"ad_clicks\"]\n", &[]).expect_err("required");
        assert!(err.to_string().contains("query API"), "{err}");
        // Without the hourly view, a horizon of a few minutes is allowed.
        let short = "[time]\nimpression_ttl = \"20s\"\ncorrection_window = \"30s\"\n\
                     allowed_lateness = \"10s\"\nhorizon = \"3m\"\n";
        assert!(load(short, &[]).is_err(), "the one-hour views need an hour");
        let c = load(
            &format!("{short}[views]\ndisabled = [\"ad_hourly_users\", \"fraud_adjustments\"]\n"),
            &[],
        )
        .expect("valid without the one-hour views");
        assert!(c.views().iter().all(|v| v.name != "ad_hourly_users"));
        assert!(
            c.min_horizon() < Duration::from_secs(180),
            "{:?}",
            c.min_horizon()
        );
    }

    #[test]
    fn a_worker_cluster_is_checked_at_start() {
        let prod = "[log]\nkind = \"kafka\"\n[store]\nkind = \"postgres\"\n";
        let two = "[cluster]\nprocesses = [\"10.0.0.1:2101\", \"10.0.0.2:2101\"]\n";
        let c = load(
            &format!("{prod}{two}"),
            &[("CLICKAGG_CLUSTER_PROCESS", "1")],
        )
        .expect("a valid cluster");
        assert_eq!((c.cluster.process, c.cluster.process_count()), (1, 2));

        let err = load(
            &format!("{prod}{two}"),
            &[("CLICKAGG_CLUSTER_PROCESS", "2")],
        )
        .expect_err("no third process");
        assert!(err.to_string().contains("cluster.process"), "{err}");
        let err = load(two, &[]).expect_err("a cluster needs kafka and postgres");
        assert!(err.to_string().contains("kafka"), "{err}");
        for bad in [
            "[\"nohost\"]",
            "[\"a:0\"]",
            "[\"a:1\", \"a:1\"]",
            "[\":5\"]",
        ] {
            let err = load(&format!("{prod}[cluster]\nprocesses = {bad}\n"), &[]).expect_err(bad);
            assert!(
                err.to_string().contains("cluster.processes"),
                "{bad}: {err}"
            );
        }
        let err = load(&format!("{prod}[cluster]\npeer_timeout = \"10ms\"\n"), &[])
            .expect_err("too short");
        assert!(err.to_string().contains("cluster.peer_timeout"), "{err}");
    }

    #[test]
    fn negative_duration_is_named() {
        let err = load("[time]\nhorizon = \"-5m\"\n", &[]).expect_err("negative");
        let msg = err.to_string();
        assert!(
            msg.lines()
                .next()
                .is_some_and(|l| l.contains("time.horizon: \"-5m\" is negative")),
            "{msg}"
        );
    }

    #[test]
    fn short_horizon_is_rejected_with_the_minimum() {
        let err = load("[time]\nhorizon = \"5m\"\n", &[]).expect_err("too short");
        assert!(err.to_string().contains("time.horizon"), "{err}");
    }

    #[test]
    fn env_overrides_file_and_names_bad_values() {
        let c = load(
            "workers = 3\n",
            &[
                ("CLICKAGG_WORKERS", "2"),
                ("CLICKAGG_ALLOWED_LATENESS", "45s"),
            ],
        )
        .expect("loads");
        assert_eq!(c.workers, 2);
        assert_eq!(c.time.allowed_lateness, Duration::from_secs(45));
        let err = load("", &[("CLICKAGG_HTTP_ADDR", "nowhere")]).expect_err("bad addr");
        assert!(err.to_string().contains("CLICKAGG_HTTP_ADDR"), "{err}");
    }
}
