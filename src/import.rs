//! `clickagg import`: a backfill. Loads a CSV of clicks into the configured log (embedded or
//! Kafka), with the catalog records of the ads it sees, so the dataflow counts them as if
//! they had arrived live.
//!
//! The file has a header and the columns `click_id, impression_id, ad_id, campaign_id,
//! user_id, ip, event_time_ms` (any order, extra columns ignored): the format of the
//! standard workload (`../shared/peers/gen_clicks.py`). Rows are in arrival order.
//!
//! **Record time.** The log stamps live clicks with its clock, and the dataflow clamps
//! event times into `[record time - TTL, record time]` and calls a click late when
//! `record time - event time` exceeds the allowed lateness. Historical clicks stamped with
//! today's clock would all be clamped and late. So each row's record time is *the latest
//! event time in the file up to and including that row*: what the tracker's clock would
//! have said had the clicks arrived live in file order, give or take the file's disorder.
//! It never goes back, never lies in a click's future, and a click that came later than
//! the lateness behind the clicks before it is late, as it would have been live. The log
//! raises it further to the running max it already holds (see
//! [`crate::log::AppendRecord::record_time_ms`]): import into a fresh log, or one whose
//! records are older than the file; clicks imported behind newer records are counted at
//! those records' time, and so are late when that is more than the lateness after them.
//! For the embedded log, stop `serve` first: the log has one writer.
//!
//! **Ids.** `impression_id` (an unsigned integer) is the dedup key as is; `click_id` and
//! `user_id` are kept as text; `issued_at` is the event time (the file has no impressions).
//!
//! **Catalog.** Every ad is written once, before its first click: an ad the store already
//! has keeps its record (and price); a new one gets the file's campaign, the advertiser
//! `--advertiser-id` (created if missing, as `POST /v1/advertisers` would, its API key
//! printed once), price `--cpc-micros` and a placeholder landing URL. One advertiser for
//! the whole file because the file names none; a campaign another advertiser owns stops
//! the import with that row's line. Each catalog record goes into the log (so the views'
//! join finds the ad) and the store (so the query API serves it), log first, as
//! `PUT /v1/ads` does.
//!
//! **Re-running** after a failure appends the rows again; the dataflow keeps one click per
//! impression, so the counts do not change as long as the repeat stays within the horizon
//! of the first copy's record time.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Deserialize;

use crate::config::{Config, LogKind, StoreKind};
use crate::log::embedded::{EmbeddedLog, EmbeddedLogOptions};
use crate::log::{ADS_PARTITION, AppendFuture, AppendRecord, ClickPartitioner, Log, LogError};
use crate::record::{AdRecord, ClickEvent, Payload};
use crate::store::sqlite::SqliteStore;
use crate::store::{Ad, Store, StoreError};
use crate::time::Millis;

/// The columns a file must have.
pub const COLUMNS: [&str; 7] = [
    "click_id",
    "impression_id",
    "ad_id",
    "campaign_id",
    "user_id",
    "ip",
    "event_time_ms",
];

/// Appends in flight at once: the next batch is parsed while the log commits the last.
const IN_FLIGHT: usize = 4;

/// What to do with a row that does not parse.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnBadRow {
    /// Stop at the first bad row (rows before it are imported).
    Stop,
    /// Skip it, count it, go on.
    Skip,
}

/// How to import.
#[derive(Clone, Debug)]
pub struct ImportOptions {
    /// The CSV file.
    pub file: PathBuf,
    /// Clicks per append.
    pub batch: usize,
    /// What to do with bad rows.
    pub on_bad_row: OnBadRow,
    /// Only parse and check the file; append nothing.
    pub dry_run: bool,
    /// The advertiser of ads the store does not know yet.
    pub advertiser_id: u64,
    /// The price of ads the store does not know yet.
    pub cpc_micros: u64,
    /// Landing URL of new ads; `{ad_id}` is replaced by the ad's id.
    pub landing_url: String,
    /// Log progress every this many rows.
    pub progress_every: u64,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            file: PathBuf::new(),
            batch: 10_000,
            on_bad_row: OnBadRow::Stop,
            dry_run: false,
            advertiser_id: 1,
            cpc_micros: 0,
            landing_url: "https://example.invalid/imported/ad/{ad_id}".into(),
            progress_every: 500_000,
        }
    }
}

/// What an import did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImportSummary {
    /// Data rows read (good and bad).
    pub rows: u64,
    /// Clicks appended (or, in a dry run, that would have been).
    pub clicks: u64,
    /// Rows skipped as bad.
    pub bad_rows: u64,
    /// Ads new to the catalog, written to the log and the store.
    pub ads_created: u64,
    /// Ads the store already had.
    pub ads_known: u64,
    /// The least and greatest record time given, if any row was good.
    pub record_times: Option<(Millis, Millis)>,
    /// The API key of the advertiser, when the import created it (shown once).
    pub new_advertiser_key: Option<String>,
    /// Wall time.
    pub elapsed: Duration,
}

impl std::fmt::Display for ImportSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        write!(
            f,
            "{} rows, {} clicks imported, {} bad rows skipped, {} ads created, {} ads already \
             known, in {:.1}s ({:.0} rows/s)",
            self.rows,
            self.clicks,
            self.bad_rows,
            self.ads_created,
            self.ads_known,
            secs,
            self.rows as f64 / secs
        )?;
        if let Some((first, last)) = self.record_times {
            write!(
                f,
                "; record times {} .. {}",
                crate::time::rfc3339(first),
                crate::time::rfc3339(last)
            )?;
        }
        Ok(())
    }
}

/// Why an import stopped.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The file cannot be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: csv::Error,
    },
    /// The header lacks a column.
    #[error("{path}: the header has no column {column:?} (needs {COLUMNS:?})")]
    Header {
        /// The file.
        path: PathBuf,
        /// The missing column.
        column: &'static str,
    },
    /// A row is malformed (and bad rows stop the import).
    #[error(
        "{path} line {line}: {reason} ({imported} clicks before it were imported; \
         --on-bad-row skip goes past bad rows)"
    )]
    BadRow {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// What is wrong.
        reason: String,
        /// Clicks appended before it.
        imported: u64,
    },
    /// The catalog refused an ad.
    #[error("{path} line {line}: ad {ad_id}: {source}")]
    Catalog {
        /// The file.
        path: PathBuf,
        /// The line of the ad's first click.
        line: u64,
        /// The ad.
        ad_id: u64,
        /// Why.
        source: StoreError,
    },
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// An append failed; clicks before it are durable.
    #[error(
        "log append failed after {imported} clicks were imported: {source} (re-running \
         the import is safe: the dataflow counts each impression once)"
    )]
    Log {
        /// Clicks acknowledged before the failure.
        imported: u64,
        /// Why.
        source: LogError,
    },
    /// The import's worker thread failed.
    #[error("import thread: {0}")]
    Thread(String),
}

/// One row of the file, borrowed from the CSV record.
#[derive(Deserialize)]
struct Row<'a> {
    click_id: &'a str,
    impression_id: u64,
    ad_id: u64,
    campaign_id: u64,
    user_id: &'a str,
    ip: &'a str,
    event_time_ms: u64,
}

/// A row checked and turned into a click.
struct Parsed {
    click: ClickEvent,
    campaign_id: u64,
}

fn parse_row(record: &csv::StringRecord, headers: &csv::StringRecord) -> Result<Parsed, String> {
    let row: Row<'_> = record
        .deserialize(Some(headers))
        .map_err(|e| match e.kind() {
            csv::ErrorKind::Deserialize { err, .. } => match err.field() {
                Some(i) => format!(
                    "column {:?}: {}",
                    headers.get(i as usize).unwrap_or("?"),
                    err.kind()
                ),
                None => err.kind().to_string(),
            },
            _ => e.to_string(),
        })?;
    let ip: IpAddr = row
        .ip
        .parse()
        .map_err(|_| format!("column \"ip\": {:?} is not an IP address", row.ip))?;
    if row.click_id.is_empty() || row.user_id.is_empty() {
        return Err("click_id and user_id must not be empty".into());
    }
    Ok(Parsed {
        click: ClickEvent {
            impression_id: u128::from(row.impression_id),
            ad_id: row.ad_id,
            issued_at_ms: row.event_time_ms,
            event_time_ms: row.event_time_ms,
            click_id: row.click_id.to_owned(),
            user_id: row.user_id.to_owned(),
            ip,
            // Filled from the catalog once the ad is known.
            cpc_micros: 0,
        },
        campaign_id: row.campaign_id,
    })
}

/// Opens the configured log for a backfill: the embedded log's watermark follows the
/// imported records only, never the clock.
pub async fn open_log(config: &Config) -> anyhow::Result<Arc<dyn Log>> {
    Ok(match config.log.kind {
        LogKind::Embedded => {
            let (dir, options) = (
                config.data_dir.clone(),
                EmbeddedLogOptions {
                    click_partitions: config.log.click_partitions,
                    verdict_partitions: config.log.verdict_partitions,
                    watermark_interval: None,
                    append_timeout: config.http.append_timeout.max(Duration::from_secs(60)),
                },
            );
            Arc::new(tokio::task::spawn_blocking(move || EmbeddedLog::open(&dir, options)).await??)
        }
        LogKind::Kafka => Arc::new(crate::backends::open_log(config).await?),
    })
}

/// Opens the configured store; a SQLite store keeps `sqlite_read_pool_size` connections
/// for queries.
pub async fn open_store(
    config: &Config,
    sqlite_read_pool_size: u32,
) -> anyhow::Result<Arc<dyn Store>> {
    Ok(match config.store.kind {
        StoreKind::Sqlite => {
            let path = crate::serve::store_path(config);
            let views = config.views();
            let options = crate::serve::store_options(config, sqlite_read_pool_size);
            Arc::new(
                tokio::task::spawn_blocking(move || SqliteStore::open(&path, views, options))
                    .await?
                    .context("opening the SQLite store")?,
            )
        }
        StoreKind::Postgres => Arc::new(crate::backends::open_store(config).await?),
    })
}

/// `clickagg import`: opens the configured log and store and imports the file.
pub async fn run(config: &Config, options: ImportOptions) -> anyhow::Result<ImportSummary> {
    let store = open_store(config, 1).await?;
    let log = open_log(config).await?;
    let partitioner = config.click_partitioner();
    let handle = tokio::runtime::Handle::current();
    let summary = tokio::task::spawn_blocking(move || {
        import(&*log, &*store, &partitioner, &options, &handle)
    })
    .await
    .map_err(|e| ImportError::Thread(e.to_string()))??;
    Ok(summary)
}

/// The catalog as the import builds it: each ad's price, once it is in the log.
struct Catalog<'a> {
    store: &'a dyn Store,
    options: &'a ImportOptions,
    prices: HashMap<u64, u64>,
    advertiser_ready: bool,
}

impl Catalog<'_> {
    /// The price of `ad`, writing its catalog record first if the import has not seen it.
    fn price(
        &mut self,
        log: &dyn Log,
        handle: &tokio::runtime::Handle,
        parsed: &Parsed,
        record_time: Millis,
        summary: &mut ImportSummary,
    ) -> Result<u64, StoreError> {
        let ad_id = parsed.click.ad_id;
        if let Some(&price) = self.prices.get(&ad_id) {
            return Ok(price);
        }
        let price = match self.store.ad(ad_id)? {
            Some(known) => {
                summary.ads_known += 1;
                known.cpc_micros
            }
            None => {
                self.create(log, handle, ad_id, parsed.campaign_id, record_time, summary)?;
                self.options.cpc_micros
            }
        };
        self.prices.insert(ad_id, price);
        Ok(price)
    }

    fn create(
        &mut self,
        log: &dyn Log,
        handle: &tokio::runtime::Handle,
        ad_id: u64,
        campaign_id: u64,
        record_time: Millis,
        summary: &mut ImportSummary,
    ) -> Result<(), StoreError> {
        let advertiser_id = self.options.advertiser_id;
        if !self.advertiser_ready {
            if !self.store.advertiser_exists(advertiser_id)? {
                let key = crate::secrets::generate_key("ckv_");
                self.store.create_advertiser(
                    advertiser_id,
                    "imported",
                    &crate::secrets::hash_key(&key),
                )?;
                summary.new_advertiser_key = Some(key);
            }
            self.advertiser_ready = true;
        }
        let ad = Ad {
            ad_id,
            advertiser_id,
            campaign_id,
            landing_url: self
                .options
                .landing_url
                .replace("{ad_id}", &ad_id.to_string()),
            cpc_micros: self.options.cpc_micros,
        };
        self.store.check_ad(&ad)?;
        let record = AdRecord {
            ad_id,
            campaign_id,
            advertiser_id,
        };
        // Log first, as `PUT /v1/ads` does; at the backfill's record time (no later than
        // the clicks not yet appended, see `import`), since a clock time would raise the
        // log's running max and with it every click after it.
        handle
            .block_on(log.append(vec![AppendRecord {
                partition: ADS_PARTITION,
                key: Some(ad_id),
                record_time_ms: Some(record_time),
                payload: record.encode(),
            }]))
            .map_err(|e| StoreError::Unavailable(format!("appending the catalog record: {e}")))?;
        self.store.upsert_ad(&ad)?;
        summary.ads_created += 1;
        Ok(())
    }
}

/// Appends in flight, oldest first, with the clicks each carries.
struct Appends<'a> {
    log: &'a dyn Log,
    handle: &'a tokio::runtime::Handle,
    pending: VecDeque<(AppendFuture, u64)>,
    acknowledged: u64,
}

impl Appends<'_> {
    fn push(&mut self, batch: Vec<AppendRecord>) -> Result<(), LogError> {
        let n = batch.len() as u64;
        let mut batch = Some(batch);
        while let Some(records) = batch.take() {
            if self.pending.len() >= IN_FLIGHT {
                self.wait_oldest()?;
            }
            let retry = records.clone();
            let future = self.log.append(records);
            if self.pending.is_empty() {
                // Nothing to wait for: a refusal now is final, unless it is backpressure.
                match self.handle.block_on(future) {
                    Ok(_) => self.acknowledged += n,
                    Err(LogError::Overloaded) => {
                        std::thread::sleep(Duration::from_millis(50));
                        batch = Some(retry);
                    }
                    Err(e) => return Err(e),
                }
            } else {
                self.pending.push_back((future, n));
            }
        }
        Ok(())
    }

    fn wait_oldest(&mut self) -> Result<(), LogError> {
        if let Some((future, n)) = self.pending.pop_front() {
            self.handle.block_on(future)?;
            self.acknowledged += n;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), LogError> {
        while !self.pending.is_empty() {
            self.wait_oldest()?;
        }
        Ok(())
    }
}

/// Imports `options.file` into `log` and `store`. Blocks: run it off the async executor
/// (appends are awaited through `handle`).
pub fn import(
    log: &dyn Log,
    store: &dyn Store,
    partitioner: &ClickPartitioner,
    options: &ImportOptions,
    handle: &tokio::runtime::Handle,
) -> Result<ImportSummary, ImportError> {
    let started = Instant::now();
    let path = options.file.clone();
    let io = |source| ImportError::Io {
        path: path.clone(),
        source,
    };
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_path(&path)
        .map_err(io)?;
    let headers = reader.headers().map_err(io)?.clone();
    check_header(&path, &headers)?;
    // Bytes of the file, so a bar (or, off a terminal, a log line every few seconds) shows
    // how far the import is and when it will end.
    let size = std::fs::metadata(&path).map(|m| m.len()).ok();
    let progress = crate::progress::Progress::start("import", "bytes", size);
    let mut counted_bytes = 0u64;

    let mut summary = ImportSummary::default();
    let mut catalog = Catalog {
        store,
        options,
        prices: HashMap::new(),
        advertiser_ready: false,
    };
    let mut appends = Appends {
        log,
        handle,
        pending: VecDeque::new(),
        acknowledged: 0,
    };
    let log_error = |imported, source| ImportError::Log { imported, source };
    let batch_size = options.batch.max(1);
    let mut batch: Vec<AppendRecord> = Vec::with_capacity(batch_size);
    let mut record = csv::StringRecord::new();
    let mut record_time: Option<Millis> = None;
    let mut first_time = None;
    let mut stopped = None;
    loop {
        let line = reader.position().line();
        match reader.read_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => {
                // A row the CSV reader itself refuses (unequal lengths, bad UTF-8).
                summary.rows += 1;
                if bad_row(&path, line, e.to_string(), options, &mut summary) {
                    stopped = Some((line, e.to_string()));
                    break;
                }
                continue;
            }
        }
        summary.rows += 1;
        let line = record.position().map_or(line, |p| p.line());
        let mut parsed = match parse_row(&record, &headers) {
            Ok(p) => p,
            Err(reason) => {
                if bad_row(&path, line, reason.clone(), options, &mut summary) {
                    stopped = Some((line, reason));
                    break;
                }
                continue;
            }
        };
        let time = record_time.map_or(parsed.click.event_time_ms, |t| {
            t.max(parsed.click.event_time_ms)
        });
        record_time = Some(time);
        first_time.get_or_insert(time);
        summary.clicks += 1;
        if options.dry_run {
            continue;
        }
        // A new ad's record goes to the log before the clicks still in `batch`: at the
        // first of their times, so that it does not raise the log's running max, and
        // with it their record times, to this row's (every click of a 20,000-row batch
        // got the time of its batch's last new ad, and the dataflow then saw 20,000
        // clicks at one time where live traffic has them over 150 ticks).
        let ad_time = batch.first().and_then(|r| r.record_time_ms).unwrap_or(time);
        parsed.click.cpc_micros = catalog
            .price(log, handle, &parsed, ad_time, &mut summary)
            .map_err(|source| ImportError::Catalog {
                path: path.clone(),
                line,
                ad_id: parsed.click.ad_id,
                source,
            })?;
        let c = &parsed.click;
        batch.push(AppendRecord {
            partition: partitioner.partition(c.ad_id, c.impression_id),
            key: Some(c.ad_id),
            record_time_ms: Some(time),
            payload: c.encode(),
        });
        if batch.len() >= batch_size {
            let full = std::mem::replace(&mut batch, Vec::with_capacity(batch_size));
            appends
                .push(full)
                .map_err(|e| log_error(appends.acknowledged, e))?;
        }
        if summary.rows % 4096 == 0 {
            let at = reader.position().byte();
            progress.inc(at.saturating_sub(counted_bytes));
            counted_bytes = at;
        }
        if summary.rows % options.progress_every.max(1) == 0 {
            let secs = started.elapsed().as_secs_f64().max(1e-9);
            tracing::info!(
                rows = summary.rows,
                clicks = summary.clicks,
                bad_rows = summary.bad_rows,
                ads = catalog.prices.len(),
                rows_per_s = (summary.rows as f64 / secs) as u64,
                "importing"
            );
        }
    }
    if !batch.is_empty() {
        appends
            .push(batch)
            .map_err(|e| log_error(appends.acknowledged, e))?;
    }
    appends
        .finish()
        .map_err(|e| log_error(appends.acknowledged, e))?;
    if let Some((line, reason)) = stopped {
        return Err(ImportError::BadRow {
            path,
            line,
            reason,
            imported: appends.acknowledged,
        });
    }
    progress.inc(reader.position().byte().saturating_sub(counted_bytes));
    progress.finish();
    summary.record_times = first_time.zip(record_time);
    summary.elapsed = started.elapsed();
    Ok(summary)
}

fn check_header(path: &Path, headers: &csv::StringRecord) -> Result<(), ImportError> {
    for column in COLUMNS {
        if !headers.iter().any(|h| h == column) {
            return Err(ImportError::Header {
                path: path.to_owned(),
                column,
            });
        }
    }
    Ok(())
}

/// Counts a bad row and logs it (the first few); true when it stops the import (the rows
/// before it are still appended).
fn bad_row(
    path: &Path,
    line: u64,
    reason: String,
    options: &ImportOptions,
    summary: &mut ImportSummary,
) -> bool {
    if options.on_bad_row == OnBadRow::Stop {
        return true;
    }
    summary.bad_rows += 1;
    const LOGGED: u64 = 20;
    if summary.bad_rows <= LOGGED {
        tracing::warn!("{} line {line}: {reason}; row skipped", path.display());
    } else if summary.bad_rows == LOGGED + 1 {
        tracing::warn!("more bad rows; only their count is reported from here on");
    }
    false
}
