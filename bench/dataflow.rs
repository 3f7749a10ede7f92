//! Dataflow throughput: the standard 5M-click workload (`../shared/peers`: Zipf over 10k
//! ads, 10% duplicates incl. earlier-event-time ones, one hour of event time) imported
//! into an embedded log once, then the real engine (source, dedup, late and fraud
//! classification, every registered view, the sink committing to the store) from an empty
//! store until the committed frontier covers the whole log. Prints clicks/s, wall time and
//! peak RSS for each worker count and store, and checks every run's stored per-(ad, minute)
//! totals (billable + fraud + late) exactly against the DuckDB truth: a wrong answer fails.
//!
//! `cargo bench --bench dataflow`. Knobs: `DATAFLOW_CLICKS` (default 5000000; other sizes
//! are generated as `clicks-<n>.csv`), `DATAFLOW_WORKERS` (default `1,2`),
//! `DATAFLOW_STORES` (default `sqlite,postgres`), `DATAFLOW_PG` (default
//! `postgres://postgres@127.0.0.1:5432`; a fresh database per run),
//! `DATAFLOW_DISABLED_VIEWS` (default none; e.g. `ad_hourly_users` for the work the peers
//! do: the views the API reads, without distinct users per hour), `DATAFLOW_TICK`
//! (default the config's 200 ms; the design allows 100 ms to 1 s: how much of the work is
//! per tick rather than per click).
//!
//! Settings: the defaults of `config/default.toml` (tick 200 ms, impression TTL 30 min,
//! allowed lateness 5 min, correction window 30 min, 4 click partitions, every view on),
//! except the horizon: the import gives each click the latest event time so far as record
//! time (see `docs/import.md`), so the log holds one hour of 2023; when the backlog is read
//! the log's watermark jumps to today. With the default horizon (2.5 h) every click would
//! also expire within the run, work that live traffic does only 2.5 h later. The horizon
//! is set to the data's age plus a day, so the run ends in the state live traffic has
//! after its first hour: every impression live, nothing expired, nothing late.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "workload.rs"]
mod workload;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clickagg::config::Config;
use clickagg::dataflow::Engine;
use clickagg::log::Log;
use clickagg::log::embedded::{EmbeddedLog, EmbeddedLogOptions};
use clickagg::metrics::Metrics;
use clickagg::record::Topic;
use clickagg::store::Store;
use clickagg::store::postgres::{PostgresOptions, PostgresStore};
use clickagg::store::sqlite::{SqliteOptions, SqliteStore};
use workload::{Workload, compare, machine, reset_peak_rss, rss_mib, write_counts};

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The same jemalloc options as the `clickagg` binary.
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8] = clickagg::JEMALLOC_CONF;

const CLICK_PARTITIONS: u32 = 4;

fn env_list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_owned())
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

/// The config of a run: defaults, `workers`, a horizon covering the data's age.
fn config(data_dir: &Path, workers: usize, first_record_ms: u64) -> Config {
    let age_days = clickagg::time::now_ms().saturating_sub(first_record_ms) / 86_400_000 + 2;
    let disabled: Vec<String> = env_list("DATAFLOW_DISABLED_VIEWS", "")
        .into_iter()
        .map(|v| format!("{v:?}"))
        .collect();
    let tick = std::env::var("DATAFLOW_TICK")
        .map(|t| format!("tick = {t:?}\n"))
        .unwrap_or_default();
    let text = format!(
        "data_dir = {data_dir:?}\nworkers = {workers}\n\n[time]\n{tick}horizon = \"{age_days}days\"\n\n\
         [log]\nclick_partitions = {CLICK_PARTITIONS}\n\n[archive]\nenabled = false\n\n\
         [views]\ndisabled = [{disabled}]\n",
        data_dir = data_dir.display().to_string(),
        disabled = disabled.join(", "),
    );
    Config::from_toml(&text, "bench/dataflow.rs").expect("bench config")
}

/// What the import left in the log: clicks, least and greatest record time.
struct Imported {
    dir: PathBuf,
    clicks: u64,
    first_ms: u64,
    last_ms: u64,
}

/// Clicks in the log and their first and last record times, over the `clicks_N` tables.
fn log_extent(dir: &Path) -> (u64, u64, u64) {
    let conn = rusqlite::Connection::open_with_flags(
        dir.join("log.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open log.db");
    let tables: Vec<String> = conn
        .prepare(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name GLOB 'clicks_[0-9]*'",
        )
        .expect("prepare")
        .query_map([], |r| r.get(0))
        .expect("tables")
        .map(|r| r.expect("table"))
        .collect();
    let (mut clicks, mut first, mut last) = (0u64, u64::MAX, 0u64);
    for table in tables {
        let (n, lo, hi) = conn
            .query_row(
                &format!("SELECT count(*), min(record_time_ms), max(record_time_ms) FROM {table}"),
                [],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)? as u64,
                        r.get::<_, Option<i64>>(1)?,
                        r.get::<_, Option<i64>>(2)?,
                    ))
                },
            )
            .expect("log extent");
        clicks += n;
        if let (Some(lo), Some(hi)) = (lo, hi) {
            first = first.min(lo as u64);
            last = last.max(hi as u64);
        }
    }
    (clicks, if clicks == 0 { 0 } else { first }, last)
}

/// Bumped when the import writes a different log from the same file, so that a log an
/// older import left in the cache is not read again: 2 since new ads no longer raise the
/// record times of the clicks before them (session 31).
const IMPORT_VERSION: u32 = 2;

/// The workload imported into an embedded log, once per file content (by md5) and
/// import version.
fn imported(workload: &Workload) -> Imported {
    let dir = workload::cache_root().join("bench").join(format!(
        "log-{}-p{CLICK_PARTITIONS}-i{IMPORT_VERSION}",
        workload.md5()
    ));
    let marker = dir.join("imported");
    if !marker.exists() {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the log cache dir");
        let config = config(&dir, 1, clickagg::time::now_ms());
        let log = EmbeddedLog::open(
            &dir,
            EmbeddedLogOptions {
                click_partitions: CLICK_PARTITIONS,
                verdict_partitions: config.log.verdict_partitions,
                watermark_interval: None,
                append_timeout: Duration::from_secs(120),
            },
        )
        .expect("open the log");
        let store = SqliteStore::open(
            &dir.join("import-store.db"),
            config.views(),
            SqliteOptions {
                read_pool_size: 1,
                progress_retention_ms: config.horizon_ms(),
                cache_mib: config.store.sqlite_cache_mib,
            },
        )
        .expect("open the import's store");
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let options = clickagg::import::ImportOptions {
            file: workload.clicks.clone(),
            batch: 20_000,
            cpc_micros: 100_000,
            ..Default::default()
        };
        let summary = clickagg::import::import(
            &log,
            &store,
            &config.click_partitioner(),
            &options,
            runtime.handle(),
        )
        .expect("import the workload");
        println!("import (once per file): {summary}");
        std::fs::write(&marker, summary.to_string()).expect("write the marker");
    }
    let (clicks, first_ms, last_ms) = log_extent(&dir);
    assert_eq!(clicks, workload.n, "the cached log holds the whole file");
    Imported {
        dir,
        clicks,
        first_ms,
        last_ms,
    }
}

/// A store for one run, and what to drop afterwards.
enum RunStore {
    Sqlite { _dir: tempfile::TempDir },
    Postgres { admin: String, name: String },
}

impl RunStore {
    fn open(kind: &str, config: &Config, workers: usize) -> (RunStore, Arc<dyn Store>) {
        match kind {
            "sqlite" => {
                let dir = tempfile::Builder::new()
                    .prefix("clickagg-bench-store-")
                    .tempdir()
                    .expect("temp dir");
                let store = SqliteStore::open(
                    &dir.path().join("store.db"),
                    config.views(),
                    SqliteOptions {
                        read_pool_size: 2,
                        progress_retention_ms: config.horizon_ms(),
                        cache_mib: config.store.sqlite_cache_mib,
                    },
                )
                .expect("open SQLite store");
                (RunStore::Sqlite { _dir: dir }, Arc::new(store))
            }
            "postgres" => {
                let admin = std::env::var("DATAFLOW_PG")
                    .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
                let name = format!("clickagg_bench_{}_{workers}", std::process::id());
                let mut client =
                    postgres::Client::connect(&format!("{admin}/postgres"), postgres::NoTls)
                        .unwrap_or_else(|e| panic!("connect to Postgres at {admin}: {e}"));
                for sql in [
                    format!("DROP DATABASE IF EXISTS {name}"),
                    format!("CREATE DATABASE {name}"),
                ] {
                    client
                        .batch_execute(&sql)
                        .expect("create the bench database");
                }
                let store = PostgresStore::open(
                    &format!("{admin}/{name}"),
                    config.views(),
                    PostgresOptions {
                        pool_size: 2,
                        progress_retention_ms: config.horizon_ms(),
                    },
                )
                .expect("open Postgres store");
                (RunStore::Postgres { admin, name }, Arc::new(store))
            }
            other => panic!("DATAFLOW_STORES: unknown store {other:?} (sqlite, postgres)"),
        }
    }
}

impl Drop for RunStore {
    fn drop(&mut self) {
        if let RunStore::Postgres { admin, name } = self
            && let Ok(mut client) =
                postgres::Client::connect(&format!("{admin}/postgres"), postgres::NoTls)
        {
            let _ = client.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
        }
    }
}

/// One run's figures.
struct Run {
    store: String,
    workers: usize,
    wall: Duration,
    peak_rss_mib: f64,
    arranged: i64,
    /// CPU seconds per thread kind during the run (less sensitive to a noisy neighbour
    /// than the wall time, which is what the comparison of two builds needs).
    cpu: BTreeMap<String, f64>,
    /// Store transactions the sink made, and the view rows they wrote.
    commits: u64,
    rows: u64,
}

/// CPU seconds of this process's threads so far, by name with a trailing worker or
/// partition number dropped (`timely:work-0` and `timely:work-1` stay apart).
fn thread_cpu() -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (name, secs) in common::thread_cpu_seconds(std::process::id()) {
        let kind = if name.starts_with("timely:work") {
            name
        } else {
            name.trim_end_matches(|c: char| c.is_ascii_digit() || c == '-')
                .to_owned()
        };
        *out.entry(kind).or_default() += secs;
    }
    out
}

/// `after - before`, the threads that used at least 0.05 s.
fn cpu_spent(
    before: &BTreeMap<String, f64>,
    after: BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    after
        .into_iter()
        .map(|(k, a)| {
            let spent = a - before.get(&k).copied().unwrap_or(0.0);
            (k, spent)
        })
        .filter(|(_, s)| *s >= 0.05)
        .collect()
}

/// `name 1.2 s, ...`, largest first.
fn cpu_text(cpu: &BTreeMap<String, f64>) -> String {
    let mut v: Vec<_> = cpu.iter().collect();
    v.sort_by(|a, b| b.1.total_cmp(a.1));
    v.iter()
        .map(|(k, s)| format!("{k} {s:.1} s"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn run(kind: &str, workers: usize, imported: &Imported, truth: &BTreeMap<(u64, u64), i64>) -> Run {
    let config = config(&imported.dir, workers, imported.first_ms);
    let log: Arc<dyn Log> = Arc::new(
        EmbeddedLog::open(
            &imported.dir,
            EmbeddedLogOptions {
                click_partitions: CLICK_PARTITIONS,
                verdict_partitions: config.log.verdict_partitions,
                watermark_interval: Some(config.time.tick),
                append_timeout: config.http.append_timeout,
            },
        )
        .expect("open the log"),
    );
    let (_guard, store) = RunStore::open(kind, &config, workers);
    let metrics = Arc::new(Metrics::new());
    let spec = clickagg::process::engine_spec(&config);
    let tick = spec.tick;
    // Every record lands at a time at most this; the frontier passing it covers the log.
    let last_time = tick.time_of(imported.last_ms);

    reset_peak_rss();
    let cpu_before = thread_cpu();
    let started = Instant::now();
    let engine = Engine::start(
        Arc::clone(&log),
        Arc::clone(&store),
        spec,
        Arc::clone(&metrics),
    )
    .expect("start the engine");
    let every = Duration::from_secs(workload::env_u64("DATAFLOW_REPORT_SECS", 10));
    let mut next_report = every;
    while engine.status.committed() <= last_time {
        std::thread::sleep(Duration::from_millis(20));
        if let Some(e) = engine.status.last_error() {
            eprintln!("[dataflow] sink error (retrying): {e}");
        }
        if started.elapsed() >= next_report {
            next_report += every;
            eprintln!(
                "[dataflow] {kind} {workers}w: {:.0}s, committed frontier {}, sink input frontier {}, RSS {:.0} MiB",
                started.elapsed().as_secs_f64(),
                clickagg::time::rfc3339(engine.status.committed()),
                clickagg::time::rfc3339(engine.status.observed()),
                rss_mib().0,
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(1800),
            "the committed frontier did not cover the log within 30 minutes"
        );
    }
    let wall = started.elapsed();
    let (_, peak_rss_mib) = rss_mib();
    let arranged = metrics.arrangement_records.get();
    let (commits, rows) = (metrics.sink_commits.get(), metrics.sink_rows.get());
    // Before the shutdown: the engine's threads' figures go when they end.
    let cpu = cpu_spent(&cpu_before, thread_cpu());
    engine.shutdown();

    // Exactly once: every click partition is committed to its end.
    let recovery = store
        .recovery_point(tick.ms(), config.horizon_ms())
        .expect("recovery point");
    for (partition, end) in log.end_offsets().expect("end offsets") {
        if partition.topic == Topic::Clicks {
            let committed = recovery.committed.get(&partition).map_or(0, |p| p.offset);
            assert_eq!(committed, end, "{partition} committed to its end");
        }
    }
    check(kind, workers, &*store, imported, truth);
    Run {
        store: kind.to_owned(),
        workers,
        wall,
        peak_rss_mib,
        arranged,
        cpu,
        commits,
        rows,
    }
}

/// Exports the stored per-(ad, minute) totals and compares them with the truth.
fn check(
    kind: &str,
    workers: usize,
    store: &dyn Store,
    imported: &Imported,
    truth: &BTreeMap<(u64, u64), i64>,
) {
    let day = 86_400_000;
    let (from, to) = (
        imported.first_ms / day * day - day,
        (imported.last_ms / day + 2) * day,
    );
    let (_, rows) = store.ad_click_windows(from, to).expect("read ad_clicks");
    let mut got: BTreeMap<(u64, u64), i64> = BTreeMap::new();
    for r in rows {
        let m = r.measures;
        let n = m.clicks + m.fraud_clicks + m.late_clicks;
        if n != 0 {
            *got.entry((r.ad_id, r.window_start)).or_default() += n;
        }
    }
    let out = workload::cache_root()
        .join("bench")
        .join(format!("out-dataflow-{kind}-{workers}w.csv"));
    write_counts(&out, &got);
    match compare(&got, truth) {
        Ok(()) => println!(
            "  {kind} {workers}w: MATCH the truth ({} rows, {} clicks; {})",
            got.len(),
            got.values().sum::<i64>(),
            out.display()
        ),
        Err(e) => panic!(
            "WRONG ANSWER from {kind} with {workers} workers: {e} ({})",
            out.display()
        ),
    }
}

fn main() {
    let n = std::env::var("DATAFLOW_CLICKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000_000);
    let workers: Vec<usize> = env_list("DATAFLOW_WORKERS", "1,2")
        .iter()
        .map(|w| w.parse().expect("DATAFLOW_WORKERS: numbers"))
        .collect();
    let stores = env_list("DATAFLOW_STORES", "sqlite,postgres");
    println!("dataflow bench on {}", machine());
    let settings = config(Path::new("."), 1, 0);
    let views = settings.views();
    println!(
        "views: {}; tick {} ms",
        views.iter().map(|v| v.name).collect::<Vec<_>>().join(", "),
        settings.time.tick.as_millis()
    );
    let workload = Workload::ensure(n);
    let imported = imported(&workload);
    let truth = workload.truth();
    println!(
        "workload: {} ({} clicks, {} (ad, minute) rows in the truth)",
        workload.clicks.display(),
        imported.clicks,
        truth.len()
    );
    let mut runs = Vec::new();
    for store in &stores {
        for &w in &workers {
            let r = run(store, w, &imported, &truth);
            println!(
                "  {store} {w}w: {:.1}s, {:.0} clicks/s, peak RSS {:.0} MiB",
                r.wall.as_secs_f64(),
                imported.clicks as f64 / r.wall.as_secs_f64(),
                r.peak_rss_mib
            );
            println!("  CPU by thread: {}", cpu_text(&r.cpu));
            println!(
                "  sink: {} commits, {} view rows written ({:.0} per commit)",
                r.commits,
                r.rows,
                r.rows as f64 / r.commits.max(1) as f64
            );
            let tag = if store == "sqlite" { "" } else { "pg_" };
            println!(
                "BENCH name=dataflow_{tag}w{w} clicks_per_s={:.0} wall_s={:.1} peak_rss_mib={:.0}",
                imported.clicks as f64 / r.wall.as_secs_f64(),
                r.wall.as_secs_f64(),
                r.peak_rss_mib
            );
            runs.push(r);
        }
    }
    println!();
    println!(
        "{:<10} {:>7} {:>9} {:>12} {:>13} {:>16}",
        "store", "workers", "wall s", "clicks/s", "peak RSS MiB", "arranged recs"
    );
    for r in &runs {
        println!(
            "{:<10} {:>7} {:>9.1} {:>12.0} {:>13.0} {:>16}",
            r.store,
            r.workers,
            r.wall.as_secs_f64(),
            imported.clicks as f64 / r.wall.as_secs_f64(),
            r.peak_rss_mib,
            r.arranged
        );
    }
    println!(
        "(every run matched the truth exactly; load average now {})",
        workload::loadavg()
    );
}
