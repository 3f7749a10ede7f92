//! The `clickagg` binary: `serve`, `loadgen`, `config check`, and the production
//! processes `ingest`, `worker`, `query` and `migrate`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use clickagg::config::Config;
use clickagg::loadgen::LoadgenOptions;

// jemalloc rather than the system allocator: the dataflow's arrangements merge large
// batches from many threads, and glibc's per-thread arenas fragment and keep that memory,
// so RSS creeps; jemalloc (with background purging) hands it back and stays level.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options: [`clickagg::JEMALLOC_CONF`].
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8] = clickagg::JEMALLOC_CONF;

#[derive(Parser)]
#[command(
    name = "clickagg",
    version,
    about = "Exactly-once ad-click aggregation on timely and differential dataflow"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run everything in one process: click tracker, dataflow, sink and query API.
    Serve {
        /// A TOML config file (keys left out take the defaults of config/default.toml).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Also send demo traffic to this server, so the numbers move.
        #[arg(long)]
        demo: bool,
        /// Clicks per second of the demo traffic.
        #[arg(long, default_value_t = 200)]
        demo_rate: u64,
    },
    /// Create a demo catalog and send realistic click traffic to a server.
    Loadgen(Box<LoadgenArgs>),
    /// Check a config file (and the environment) without starting anything.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Production: the click paths and fraud verdicts, appended to Kafka.
    Ingest(ProductionArgs),
    /// Production: the dataflow over Kafka and its sink into Postgres (one process of the
    /// worker cluster that `[cluster] processes` describes).
    Worker(WorkerArgs),
    /// Production: catalog, impressions and advertiser metrics from Postgres.
    Query(ProductionArgs),
    /// Production: create or upgrade the Postgres schema and the Kafka topics.
    Migrate(ProductionArgs),
    /// Archive raw clicks and verdicts from the log as Parquet (see docs/archive.md).
    Archive {
        /// The TOML config file (the log and `[archive]` it names).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Stop once the log's end (as of the start) is archived.
        #[arg(long)]
        once: bool,
    },
    /// Re-aggregate the archive and compare it with the store per (ad, minute).
    Reconcile {
        /// The TOML config file.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// First minute (RFC 3339 or epoch ms); default one day before --to.
        #[arg(long)]
        from: Option<String>,
        /// End, exclusive (RFC 3339 or epoch ms); default now.
        #[arg(long)]
        to: Option<String>,
        /// Write corrections into the store (one transaction) and record them.
        #[arg(long)]
        fix: bool,
        /// Where the discrepancy table (CSV) goes.
        #[arg(long, default_value = "reconcile-discrepancies.csv")]
        table: PathBuf,
        /// How long to wait for the archive to catch up with the store.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "2m")]
        wait: Duration,
    },
    /// Backfill: load a CSV of clicks (and their ads) into the configured log, with record
    /// times from the file's event times (see docs/import.md).
    Import(ImportArgs),
    /// Drop archive partitions and store rows past their retention (`[retention]`).
    Compact {
        /// The TOML config file.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Only report what would go.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Epoch ms of an RFC 3339 time or an integer.
fn parse_time(s: &str) -> anyhow::Result<u64> {
    s.parse::<u64>()
        .ok()
        .or_else(|| clickagg::time::parse_rfc3339(s))
        .with_context(|| format!("{s:?} is neither RFC 3339 nor epoch milliseconds"))
}

/// Exit status of `reconcile` when it found differences it did not fix.
const EXIT_DIFFERENCES: u8 = 2;

#[derive(Args)]
struct ProductionArgs {
    /// The TOML config file (see config/production.toml).
    #[arg(long, short)]
    config: Option<PathBuf>,
}

#[derive(Args)]
struct WorkerArgs {
    /// The TOML config file (see config/production.toml and config/cluster.toml).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Which entry of `[cluster] processes` this process is (default 0, or
    /// CLICKAGG_CLUSTER_PROCESS).
    #[arg(long)]
    process: Option<usize>,
}

#[derive(Args)]
struct ImportArgs {
    /// The TOML config file (the log and store it names).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// The CSV file: header, then click_id,impression_id,ad_id,campaign_id,user_id,ip,
    /// event_time_ms in arrival order.
    file: PathBuf,
    /// Clicks per log append.
    #[arg(long, default_value_t = 10_000)]
    batch: usize,
    /// What a malformed row does: stop the import, or be skipped and counted.
    #[arg(long, value_enum, default_value_t = clickagg::import::OnBadRow::Stop)]
    on_bad_row: clickagg::import::OnBadRow,
    /// Only read and check the file; append nothing.
    #[arg(long)]
    dry_run: bool,
    /// The advertiser of ads the store does not have yet (created if missing).
    #[arg(long, default_value_t = 1)]
    advertiser_id: u64,
    /// The cost per click of ads the store does not have yet.
    #[arg(long, default_value_t = 0)]
    cpc_micros: u64,
    /// The landing URL of ads the store does not have yet; {ad_id} is replaced.
    #[arg(long, default_value = "https://example.invalid/imported/ad/{ad_id}")]
    landing_url: String,
    /// Log progress every this many rows.
    #[arg(long, default_value_t = 500_000)]
    progress_every: u64,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Load and validate a config file; print the effective settings.
    Check {
        /// The file (omit to check the defaults).
        file: Option<PathBuf>,
        /// Only validate the file; do not check that the store and data directory are
        /// reachable.
        #[arg(long)]
        offline: bool,
    },
}

#[derive(Args)]
struct LoadgenArgs {
    /// Where clicks go: `serve`'s base URL, or `ingest`'s in production.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Where the catalog and impressions go in production (`query`); default --url.
    #[arg(long)]
    query_url: Option<String>,
    /// Admin key (default: read from <data-dir>/secrets.toml).
    #[arg(long, env = "CLICKAGG_ADMIN_KEY", hide_env_values = true)]
    admin_key: Option<String>,
    /// Ad-server key (default: read from <data-dir>/secrets.toml).
    #[arg(long, env = "CLICKAGG_AD_SERVER_KEY", hide_env_values = true)]
    ad_server_key: Option<String>,
    /// Where the server keeps generated secrets.
    #[arg(long, env = "CLICKAGG_DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
    /// Clicks per second.
    #[arg(long, default_value_t = 1_000)]
    rate: u64,
    /// How long to run, e.g. 60s or 10m.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    duration: Duration,
    /// Stop after this many clicks instead.
    #[arg(long)]
    clicks: Option<u64>,
    /// Ads in the demo catalog (Zipf popularity).
    #[arg(long, default_value_t = 200)]
    ads: u64,
    /// Advertisers in the demo catalog.
    #[arg(long, default_value_t = 5)]
    advertisers: u64,
    /// Clicks per POST /v1/clicks.
    #[arg(long, default_value_t = 200)]
    batch: usize,
    /// Share of clicks repeating an earlier impression.
    #[arg(long, default_value_t = 0.1)]
    duplicate_rate: f64,
    /// Share of clicks with an event time beyond the allowed lateness.
    #[arg(long, default_value_t = 0.02)]
    late_rate: f64,
    /// How old late clicks are.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10m")]
    late_by: Duration,
    /// Share of clicks sent through GET /c/{token}.
    #[arg(long, default_value_t = 0.02)]
    redirect_rate: f64,
    /// Seconds between IP bursts (0 disables them).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    burst_every: Duration,
    /// Clicks per IP burst.
    #[arg(long, default_value_t = 40)]
    burst_size: usize,
    /// Random seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Where the API keys of the advertisers it creates are saved (default
    /// <data-dir>/demo-advertisers.toml when that directory exists), for /dashboard.
    #[arg(long)]
    keys_file: Option<PathBuf>,
}

/// A validated config for a production process.
fn production_config(path: Option<&std::path::Path>, command: &str) -> anyhow::Result<Arc<Config>> {
    let config = Config::load(path)?;
    clickagg::backends::require_production(&config, command)?;
    Ok(Arc::new(config))
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(clickagg::progress::log_writer);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn read_secret(
    data_dir: &std::path::Path,
    given: Option<String>,
    field: &str,
) -> anyhow::Result<String> {
    if let Some(key) = given {
        return Ok(key);
    }
    let path = clickagg::secrets::secrets_path(data_dir);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "no --{} given and cannot read {}",
            field.replace('_', "-"),
            path.display()
        )
    })?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    table
        .get(field)
        .and_then(|v| v.as_str())
        .map(str::to_owned)
        .with_context(|| format!("{} has no {field}", path.display()))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve {
            config,
            demo,
            demo_rate,
        } => {
            let config = Config::load(config.as_deref())?;
            let demo = demo.then(|| LoadgenOptions {
                rate: demo_rate,
                duration: None,
                progress: false,
                ..LoadgenOptions::default()
            });
            clickagg::serve::run(config, demo).await
        }
        Command::Loadgen(a) => {
            let options = LoadgenOptions {
                url: a.url,
                query_url: a.query_url,
                admin_key: read_secret(&a.data_dir, a.admin_key, "admin_key")?,
                ad_server_key: read_secret(&a.data_dir, a.ad_server_key, "ad_server_key")?,
                rate: a.rate,
                duration: if a.clicks.is_some() {
                    None
                } else {
                    Some(a.duration)
                },
                clicks: a.clicks,
                ads: a.ads,
                advertisers: a.advertisers,
                batch: a.batch,
                duplicate_rate: a.duplicate_rate,
                late_rate: a.late_rate,
                late_by: a.late_by,
                redirect_rate: a.redirect_rate,
                burst_every: if a.burst_every.is_zero() {
                    Duration::MAX
                } else {
                    a.burst_every
                },
                burst_size: a.burst_size,
                seed: a.seed,
                progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
                keys_file: a.keys_file.or_else(|| {
                    a.data_dir
                        .is_dir()
                        .then(|| clickagg::serve::demo_keys_path(&a.data_dir))
                }),
            };
            let report = clickagg::loadgen::run(options).await?;
            println!("{report}");
            Ok(())
        }
        Command::Config {
            command: ConfigCommand::Check { file, offline },
        } => {
            let config = Config::load(file.as_deref())?;
            if !offline {
                let probed = config.clone();
                tokio::task::spawn_blocking(move || clickagg::preflight::check_store(&probed))
                    .await??;
            }
            println!(
                "config ok: {}",
                file.as_deref()
                    .map_or("built-in defaults".into(), |p| p.display().to_string())
            );
            println!(
                "  horizon: {} (minimum {})",
                humantime::format_duration(Duration::from_millis(config.horizon_ms())),
                humantime::format_duration(config.min_horizon())
            );
            println!(
                "  store: {}",
                if offline {
                    "not checked (--offline)"
                } else {
                    "reachable"
                }
            );
            println!("  {config:#?}");
            Ok(())
        }
        Command::Ingest(a) => {
            let config = production_config(a.config.as_deref(), "ingest")?;
            // The store first: it is named quickly when unreachable (store.startup_timeout).
            let store = clickagg::backends::open_store(&config).await?;
            let log = clickagg::backends::open_log(&config).await?;
            // Heartbeats keep idle partitions (and so the dashboards) moving.
            let heartbeats = log.spawn_heartbeats(config.time.tick)?;
            let result = clickagg::production::ingest(config, Arc::new(log), Arc::new(store)).await;
            heartbeats.stop().await;
            result
        }
        Command::Worker(a) => {
            let mut config = Config::load(a.config.as_deref())?;
            if let Some(process) = a.process {
                config.cluster.process = process;
                config.validate()?;
            }
            clickagg::backends::require_production(&config, "worker")?;
            let config = Arc::new(config);
            // The store first: it is named quickly when unreachable (store.startup_timeout).
            let store = clickagg::backends::open_store(&config).await?;
            let log = clickagg::backends::open_log(&config).await?;
            // Also here, so the frontier moves (and the tail commits) with no ingest running.
            let heartbeats = log.spawn_heartbeats(config.time.tick)?;
            let result = clickagg::production::worker(config, Arc::new(log), Arc::new(store)).await;
            heartbeats.stop().await;
            result
        }
        Command::Query(a) => {
            let config = production_config(a.config.as_deref(), "query")?;
            // The store first: it is named quickly when unreachable (store.startup_timeout).
            let store = clickagg::backends::open_store(&config).await?;
            let log = clickagg::backends::open_log(&config).await?;
            clickagg::production::query(config, Arc::new(log), Arc::new(store)).await
        }
        Command::Migrate(a) => {
            let config = production_config(a.config.as_deref(), "migrate")?;
            clickagg::backends::migrate(&config).await
        }
        Command::Archive { config, once } => {
            let config = Config::load(config.as_deref())?;
            clickagg::tools::archive(&config, once).await
        }
        Command::Reconcile {
            config,
            from,
            to,
            fix,
            table,
            wait,
        } => {
            let config = Config::load(config.as_deref())?;
            let to = match to {
                Some(t) => parse_time(&t)?,
                None => clickagg::time::now_ms(),
            };
            let from = match from {
                Some(f) => parse_time(&f)?,
                None => to.saturating_sub(86_400_000),
            };
            let summary = clickagg::tools::reconcile(&config, from, to, fix, table, wait).await?;
            if !summary.differing.is_empty() && summary.fixed == 0 {
                return Err(Differences(summary.differing.len()).into());
            }
            Ok(())
        }
        Command::Import(a) => {
            let config = Config::load(a.config.as_deref())?;
            let options = clickagg::import::ImportOptions {
                file: a.file,
                batch: a.batch,
                on_bad_row: a.on_bad_row,
                dry_run: a.dry_run,
                advertiser_id: a.advertiser_id,
                cpc_micros: a.cpc_micros,
                landing_url: a.landing_url,
                progress_every: a.progress_every,
            };
            let summary = clickagg::import::run(&config, options).await?;
            if let Some(key) = &summary.new_advertiser_key {
                println!(
                    "created advertiser {} for the imported ads; its API key (shown once): {key}",
                    a.advertiser_id
                );
            }
            println!("import: {summary}");
            Ok(())
        }
        Command::Compact { config, dry_run } => {
            let config = Config::load(config.as_deref())?;
            clickagg::tools::compact(&config, clickagg::time::now_ms(), dry_run).await
        }
    }
}

/// `reconcile` found differences (and did not fix them): a distinct exit status.
#[derive(Debug, thiserror::Error)]
#[error("reconcile found {0} differing windows")]
struct Differences(usize);

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<Differences>() => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_DIFFERENCES)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
