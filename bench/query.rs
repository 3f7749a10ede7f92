//! Query: latency of the advertiser metrics API over loopback, with 10,000 ads x 1 day of
//! per-minute data in the store, on either of the two deployments (`QUERY_STORE`):
//!
//! - `sqlite` (the default): the real `clickagg serve` binary on its embedded SQLite store;
//! - `postgres`: production mode, the real `clickagg query` process reading a fresh
//!   database on the machine's Postgres (127.0.0.1:5432), configured like the production
//!   test cluster (`tests/common/cluster.rs`: Kafka log on a tansu broker, Postgres store).
//!
//! `cargo bench --bench query` (release build). Two queries, each at a fixed 500
//! requests/s (open loop: request i is due at start + i/500 and its latency counts from
//! that due time, so a stall is paid by every request queued behind it):
//! (a) `GET /v1/ads/{ad}/clicks?granularity=1m` over one whole day: 1440 points of a
//!     random ad (uniform over the 10,000);
//! (b) `GET /v1/advertisers/{id}/clicks?granularity=1d` over 30 days ending with that day:
//!     a random advertiser (uniform over 100, each with 10 campaigns of 10 ads).
//! A closed-loop run of each (32 connections) shows the most queries/s the server answers.
//!
//! What is in the store: the catalog (100 advertisers, 1000 campaigns, 10,000 ads) is
//! created through the HTTP API (of `serve`, or of the cluster's `query`, which serves the
//! catalog routes); then, with every process that writes the store stopped, EVERY minute
//! of yesterday (UTC) of every ad gets an `ad_clicks` row (14,400,000 rows, dense: the
//! worst case for query (a)) written through `Store::commit`, the sink's own write path
//! (`SqliteStore` or `PostgresStore`, after `claim_writer`), which maintains the 5-minute,
//! hourly and daily rollups per ad, campaign and advertiser in the same transactions, 50
//! ads per commit. Row values are a fixed function of (ad, minute): hot ads (low ids) have
//! up to 1000 clicks a minute, cold ones 1-2; ~25% of rows carry a fraud click, ~6% a late
//! one. Before and after the timed runs, sampled answers are compared with the same
//! function summed by plain loops (the oracle).
//!
//! Then the measured process starts again on that store. `sqlite`: `serve` with its
//! (idle) dataflow. `postgres`: only `query` (with production's 2 s catalog refresh, not
//! the test cluster's 500 ms); the cluster's worker and ingest stay stopped, so no sink
//! commit competes with the queries, and the database is vacuumed, analyzed and
//! checkpointed first, the state autovacuum keeps a long-running store in (otherwise it
//! would start on the fresh 14.4M rows in the middle of the timed runs). In `postgres`
//! mode the CPU of the database's backends is reported beside the query process's, and
//! is not part of "other processes".
//!
//! Knobs: `QUERY_STORE` (`sqlite` or `postgres`), `QUERY_RATE` (500), `QUERY_SECS` per
//! query (20), `QUERY_ADS` (10000), `QUERY_CONNECTIONS` (64), `QUERY_CLIENT_THREADS` (1);
//! `QUERY_AB_BIN=<clickagg>` then runs query (a) again `QUERY_AB_ROUNDS` (2) times on
//! each build in turn, this bench's and that one, on the same store.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/load.rs"]
mod load;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clickagg::config::Config;
use clickagg::store::postgres::{PostgresOptions, PostgresStore};
use clickagg::store::sqlite::{SqliteOptions, SqliteStore};
use clickagg::store::{ChangeBatch, Measures, Store};
use clickagg::views::Datum;
use hyper::StatusCode;
use load::{Pace, Plan, Shot};
use serde_json::Value;

use common::cluster::{CATALOG_REFRESH, Cluster, START_LIMIT};
use common::postgres::TestDb;
use common::{ADMIN, Server, Target, TestTimes, env_or, now_ms, parse_rfc3339};

const DAY: u64 = 86_400_000;
const MINUTE: u64 = 60_000;
const ADVERTISERS: u64 = 100;
const TICK_MS: u64 = 200;

fn campaign_of(ad: u64) -> u64 {
    1_000 + (ad - 1) / 10
}

fn advertiser_of(ad: u64) -> u64 {
    1 + (campaign_of(ad) - 1_000) % ADVERTISERS
}

fn cpc_of(ad: u64) -> i64 {
    50_000 + (ad % 20) as i64 * 10_000
}

fn mix(mut x: u64) -> u64 {
    // splitmix64: a fixed, well-spread function of (ad, minute).
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The measures of ad `ad` in minute `m` (0..1440) of the data day: the oracle's source.
fn measures(ad: u64, m: u64) -> Measures {
    let h = mix(ad * 1_000_003 + m);
    let clicks = 1 + (h % (1 + 1_000 / ad)) as i64;
    Measures {
        clicks,
        fraud_clicks: i64::from((h >> 20).is_multiple_of(4)),
        late_clicks: i64::from((h >> 30).is_multiple_of(16)),
        spend_micros: clicks * cpc_of(ad),
    }
}

fn create_catalog(target: &(dyn Target + Sync), ads: u64) {
    for a in 1..=ADVERTISERS {
        target.create_advertiser(a);
    }
    let threads = 8;
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                for ad in (1..=ads).skip(t).step_by(threads) {
                    target.put_ad(ad, advertiser_of(ad), campaign_of(ad), cpc_of(ad) as u64);
                }
            });
        }
    });
}

/// Writes every minute of `day` of every ad through `Store::commit`, as the one writer;
/// returns the last upper.
fn fill(store: &dyn Store, ads: u64, day: u64) -> u64 {
    store.claim_writer().expect("claim store");
    let point = store.recovery_point(TICK_MS, 0).expect("recovery point");
    let ads_per_commit = 50;
    let mut upper = point.as_of;
    let started = Instant::now();
    let mut reported = Instant::now();
    for first in (1..=ads).step_by(ads_per_commit) {
        let mut rows = HashMap::new();
        for ad in first..(first + ads_per_commit as u64).min(ads + 1) {
            for m in 0..1_440 {
                let x = measures(ad, m);
                rows.insert(
                    vec![Datum::Id(ad), Datum::Time(day + m * MINUTE)],
                    Some(vec![
                        Datum::Id(campaign_of(ad)),
                        Datum::Id(advertiser_of(ad)),
                        Datum::Int(x.clicks),
                        Datum::Int(x.fraud_clicks),
                        Datum::Int(x.late_clicks),
                        Datum::Int(x.spend_micros),
                    ]),
                );
            }
        }
        upper += TICK_MS;
        store
            .commit(&ChangeBatch {
                upper,
                views: vec![rows],
                positions: point.committed.clone(),
            })
            .expect("commit rows");
        // A long fill (Postgres on a busy machine) shows its rate while it runs.
        if reported.elapsed() > Duration::from_secs(30) {
            reported = Instant::now();
            let rows = (first + ads_per_commit as u64 - 1).min(ads) * 1_440;
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "  (fill: {rows} of {} rows in {secs:.0}s, {:.0} rows/s)",
                ads * 1_440,
                rows as f64 / secs
            );
        }
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "  (filled {} rows in {secs:.1}s, {:.0} rows/s)",
        ads * 1_440,
        (ads * 1_440) as f64 / secs
    );
    upper
}

fn points(body: &Value) -> Vec<(u64, Measures)> {
    body["points"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let n = |k: &str| p[k].as_i64().unwrap_or(i64::MIN);
            (
                parse_rfc3339(p["window_start"].as_str().unwrap_or("")),
                Measures {
                    clicks: n("clicks"),
                    fraud_clicks: n("fraud_clicks"),
                    late_clicks: n("late_clicks"),
                    spend_micros: n("spend_micros"),
                },
            )
        })
        .collect()
}

fn ad_path(ad: u64, day: u64) -> String {
    format!(
        "/v1/ads/{ad}/clicks?granularity=1m&from={day}&to={}",
        day + DAY
    )
}

fn advertiser_path(a: u64, day: u64) -> String {
    format!(
        "/v1/advertisers/{a}/clicks?granularity=1d&from={}&to={}",
        day - 29 * DAY,
        day + DAY
    )
}

/// Compares sampled answers with plain sums of `measures`; returns how many were checked.
fn check_oracle(server: &dyn Target, ads: u64, day: u64, seed: u64) -> usize {
    let mut checked = 0;
    for k in 0..40 {
        let ad = 1 + mix(seed * 7_919 + k) % ads;
        let want: Vec<(u64, Measures)> = (0..1_440)
            .map(|m| (day + m * MINUTE, measures(ad, m)))
            .collect();
        let got = points(&server.get_json(&ad_path(ad, day)));
        assert_eq!(got, want, "ad {ad}: series differs from the rows inserted");
        checked += 1;
    }
    let mut per_advertiser: BTreeMap<u64, Measures> = BTreeMap::new();
    for ad in 1..=ads {
        let total = per_advertiser.entry(advertiser_of(ad)).or_default();
        for m in 0..1_440 {
            total.add(&measures(ad, m));
        }
    }
    for k in 0..20 {
        let a = 1 + mix(seed * 104_729 + k) % ADVERTISERS;
        let want = vec![(day, per_advertiser.get(&a).copied().unwrap_or_default())];
        let got = points(&server.get_json(&advertiser_path(a, day)));
        assert_eq!(
            got, want,
            "advertiser {a}: series differs from the rows inserted"
        );
        checked += 1;
    }
    checked
}

fn measure(
    deployment: &Deployment,
    name: &str,
    pace: Pace,
    requests: u64,
    connections: usize,
    threads: usize,
    path: Arc<dyn Fn(u64) -> String + Send + Sync>,
) {
    let (pid, base) = deployment.server();
    let make: load::Make = Arc::new(move |i| {
        let mut shot = Shot::get(path(i));
        shot.headers
            .push(("authorization", format!("Bearer {ADMIN}")));
        shot
    });
    // Every answer must be a 200 with points (the data day always has some).
    let judge: load::Judge = Arc::new(|status, body| {
        let with_points: &[u8] = b"\"points\":[{";
        (status == StatusCode::OK && body.windows(with_points.len()).any(|w| w == with_points))
            .then_some(1)
    });
    let deadline = pace.deadline(requests, Duration::from_secs(120));
    let split = load::CpuSplit::start(pid);
    let backend_cpu = deployment.backends().map(BackendCpu::start);
    let mut o = load::run_blocking(
        threads,
        load::addr_of(&base),
        Plan {
            connections,
            pace,
            requests,
            deadline,
        },
        make,
        judge,
    );
    let secs = o.elapsed.as_secs_f64().max(1e-9);
    let (server_cores, client_cores, other_cores) = split.cores(secs);
    // The database's backends are part of a query's cost in production mode: counted on
    // their own, not among the other processes.
    let postgres_cores = backend_cpu.map(|b| b.cores(secs));
    let other_cores = (other_cores - postgres_cores.unwrap_or(0.0)).max(0.0);
    let postgres_part = postgres_cores
        .map(|c| format!(", postgres {c:.2}"))
        .unwrap_or_default();
    let postgres_field = postgres_cores
        .map(|c| format!(" postgres_cores={c:.2}"))
        .unwrap_or_default();
    let (p50, p99, max) = (o.latency_ms(0.5), o.latency_ms(0.99), o.latency_ms(1.0));
    let (s50, s99) = (o.service_ms(0.5), o.service_ms(0.99));
    println!(
        "  {name:<18} {pace}: {} answers in {secs:.1}s ({:.0}/s); p50 {p50:.2} ms  p99 {p99:.2} ms  max {max:.2} ms \
         (service p50 {s50:.2} p99 {s99:.2}); refused {} errors {} unsent {}; cores used: server {server_cores:.2}{postgres_part}, client {client_cores:.2}, other processes {other_cores:.2}",
        o.ok,
        o.requests_per_s(),
        o.bad,
        o.errors,
        o.unsent
    );
    if let Some(p) = &o.first_problem {
        println!("  {:<18} first problem: {p}", "");
    }
    let pace_tag = pace.bench_fields();
    println!(
        "BENCH name={} pace={pace_tag} req_per_s={:.0} p50_ms={p50:.3} p99_ms={p99:.3} max_ms={max:.3} refused={} errors={} unsent={} server_cores={server_cores:.2}{postgres_field} client_cores={client_cores:.2} other_cores={other_cores:.2}",
        deployment.bench_name(name),
        o.requests_per_s(),
        o.bad,
        o.errors,
        o.unsent
    );
}

fn file_mib(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len()) / (1 << 20)
}

/// The process under test, started again on its filled store.
enum Deployment {
    /// `clickagg serve` on its embedded SQLite store.
    Sqlite(Server),
    /// The `query` process of a production cluster (its worker and ingest stopped) on a
    /// fresh Postgres database. The cluster is declared first so that it drops first:
    /// its processes end before the database goes.
    Postgres { cluster: Cluster, db: TestDb },
}

/// CPU use of some Postgres backends (processes) during a run.
struct BackendCpu(Vec<(u32, f64)>);

impl BackendCpu {
    /// Starts measuring `pids`.
    fn start(pids: Vec<u32>) -> BackendCpu {
        BackendCpu(
            pids.into_iter()
                .map(|pid| (pid, load::cpu_seconds(Some(pid))))
                .collect(),
        )
    }

    /// Cores used since the start over `secs`. A backend that ended meanwhile took its
    /// figures with it and counts zero.
    fn cores(&self, secs: f64) -> f64 {
        let used: f64 = self
            .0
            .iter()
            .map(|&(pid, before)| (load::cpu_seconds(Some(pid)) - before).max(0.0))
            .sum();
        used / secs
    }
}

impl Deployment {
    fn target(&self) -> &(dyn Target + Sync) {
        match self {
            Deployment::Sqlite(server) => server,
            Deployment::Postgres { cluster, .. } => cluster,
        }
    }

    /// The measured process: its pid and base URL.
    fn server(&self) -> (u32, String) {
        match self {
            Deployment::Sqlite(server) => {
                (server.pid().expect("server pid"), server.proc.base.clone())
            }
            Deployment::Postgres { cluster, .. } => {
                let query = cluster.query.lock();
                (query.pid().expect("query pid"), query.base.clone())
            }
        }
    }

    /// The Postgres backends serving the store's database now (`None`: no such store):
    /// the query process's pool, which keeps its connections open, so the same backends
    /// serve a whole run.
    fn backends(&self) -> Option<Vec<u32>> {
        match self {
            Deployment::Sqlite(_) => None,
            Deployment::Postgres { db, .. } => Some(
                db.query(
                    "SELECT pid FROM pg_stat_activity \
                     WHERE datname = current_database() AND pid <> pg_backend_pid()",
                )
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect(),
            ),
        }
    }

    /// Starts the measured process again on `binary` (`None`: the bench's own build) and
    /// waits until it answers: the way to compare two builds on one filled store.
    fn restart_with(&mut self, binary: Option<std::ffi::OsString>) {
        match self {
            Deployment::Sqlite(server) => {
                server.proc.kill();
                server.proc.use_binary(binary);
                server.proc.start(START_LIMIT);
            }
            Deployment::Postgres { cluster, .. } => {
                let mut query = cluster.query.lock();
                query
                    .terminate(Duration::from_secs(30))
                    .expect("clickagg query stops on SIGTERM");
                query.use_binary(binary);
                query.start(START_LIMIT);
            }
        }
    }

    /// What the measured process is called in the table.
    fn process_name(&self) -> &'static str {
        match self {
            Deployment::Sqlite(_) => "server",
            Deployment::Postgres { .. } => "query process",
        }
    }

    /// A `BENCH` line's name: Postgres figures are `query_pg_*`, as in bench/dataflow.rs.
    fn bench_name(&self, name: &str) -> String {
        match self {
            Deployment::Sqlite(_) => name.to_owned(),
            Deployment::Postgres { .. } => name.replacen("query_", "query_pg_", 1),
        }
    }
}

/// `serve` on its own store: catalog through its API, rows written while it is stopped.
fn start_sqlite(ads: u64, day: u64) -> Deployment {
    let mut server = Server::start_with(
        TestTimes {
            tick_ms: TICK_MS,
            ..TestTimes::default()
        },
        2,
    );
    let started = Instant::now();
    create_catalog(&server, ads);
    eprintln!(
        "  (catalog of {ads} ads in {:.1}s)",
        started.elapsed().as_secs_f64()
    );
    server
        .proc
        .terminate(Duration::from_secs(30))
        .expect("server stops on SIGTERM");
    let store_path = server.data_dir().join("store.db");
    let store = SqliteStore::open(
        &store_path,
        clickagg::views::enabled(&[]),
        SqliteOptions {
            read_pool_size: 1,
            progress_retention_ms: DAY,
            cache_mib: 64,
        },
    )
    .expect("open store");
    let last_upper = fill(&store, ads, day);
    drop(store);
    server.restart();
    server.wait_complete_through(1, last_upper, Duration::from_secs(120));
    println!(
        "query: clickagg serve (embedded SQLite store, read pool 8), {ads} ads x 1440 minutes = {} ad_clicks rows \
         (dense, day {}), store {} MiB + WAL {} MiB; load average {}",
        ads * 1_440,
        clickagg::time::rfc3339(day),
        file_mib(&store_path),
        file_mib(&store_path.with_extension("db-wal")),
        load::loadavg()
    );
    Deployment::Sqlite(server)
}

/// The config the cluster's processes run with, as they read it (file and environment).
fn cluster_config(cluster: &Cluster) -> Config {
    let env = cluster.env();
    Config::load_with_env(Some(&cluster.config_path), |var| {
        env.iter().find(|(k, _)| k == var).map(|(_, v)| v.clone())
    })
    .expect("the cluster's config loads")
}

/// Gives the cluster's config the catalog refresh of config/production.toml: the test
/// cluster reloads the catalog every 500 ms so that tests see price changes soon, a load
/// on the query process (10,000 ads each time) that production does not carry.
fn use_production_catalog_refresh(cluster: &Cluster) {
    let text = std::fs::read_to_string(&cluster.config_path).expect("read the cluster's config");
    let test = format!("catalog_refresh = \"{}ms\"", CATALOG_REFRESH.as_millis());
    assert!(
        text.contains(&test),
        "the cluster's config has no {test:?}: tests/common/cluster.rs changed"
    );
    std::fs::write(
        &cluster.config_path,
        text.replace(&test, "catalog_refresh = \"2s\""),
    )
    .expect("write the cluster's config");
}

/// A production cluster on a fresh database: catalog through `query`'s API, rows written
/// with the worker (the writer) and ingest stopped, then `query` alone started again.
fn start_postgres(ads: u64, day: u64) -> Deployment {
    let db = TestDb::create();
    let cluster = Cluster::start(
        TestTimes {
            tick_ms: TICK_MS,
            ..TestTimes::default()
        },
        &db.url(),
        2,
    );
    let started = Instant::now();
    // The catalog routes are the query role's; the cluster sends them to `query`.
    create_catalog(&cluster, ads);
    eprintln!(
        "  (catalog of {ads} ads in {:.1}s)",
        started.elapsed().as_secs_f64()
    );
    // The worker holds the writer claim the fill needs; ingest would keep reloading the
    // catalog beside the measured process and is not what this bench measures.
    for p in cluster.workers.procs.iter().chain([&cluster.ingest]) {
        let mut p = p.lock();
        p.terminate(Duration::from_secs(30))
            .unwrap_or_else(|| panic!("clickagg {} stops on SIGTERM", p.name));
    }
    use_production_catalog_refresh(&cluster);
    let config = cluster_config(&cluster);
    // Opened as `clickagg worker` opens it (backends::open_store), with a one-connection
    // pool: only recovery_point uses it.
    let store = PostgresStore::open(
        &db.url(),
        config.views(),
        PostgresOptions {
            pool_size: 1,
            progress_retention_ms: config.horizon_ms(),
        },
    )
    .expect("open the Postgres store");
    let last_upper = fill(&store, ads, day);
    drop(store);
    let settled = Instant::now();
    // VACUUM refuses to run in a transaction: one statement per psql call.
    db.query("VACUUM ANALYZE");
    db.query("CHECKPOINT");
    eprintln!(
        "  (vacuum, analyze and checkpoint in {:.1}s)",
        settled.elapsed().as_secs_f64()
    );
    {
        let mut query = cluster.query.lock();
        query
            .terminate(Duration::from_secs(30))
            .expect("clickagg query stops on SIGTERM");
        query.start(START_LIMIT);
    }
    // No worker advances the frontier: the fill's last commit is the committed one.
    cluster.wait_complete_through(1, last_upper - TICK_MS, Duration::from_secs(120));
    let version = db.query("SHOW server_version");
    println!(
        "query: clickagg query (Postgres {} store, query pool {}, catalog refresh {:?}), {ads} ads x 1440 minutes = {} \
         ad_clicks rows (dense, day {}), database {} MiB (vacuumed, analyzed); load average {}",
        version.split_whitespace().next().unwrap_or("?"),
        config.store.read_pool_size,
        config.http.catalog_refresh,
        ads * 1_440,
        clickagg::time::rfc3339(day),
        db.query("SELECT pg_database_size(current_database()) / 1048576"),
        load::loadavg()
    );
    Deployment::Postgres { cluster, db }
}

fn main() {
    let rate = env_or("QUERY_RATE", 500) as f64;
    let secs = env_or("QUERY_SECS", 20) as f64;
    let ads = env_or("QUERY_ADS", 10_000);
    let connections = env_or("QUERY_CONNECTIONS", 64) as usize;
    let threads = env_or("QUERY_CLIENT_THREADS", 1) as usize;
    let day = now_ms() / DAY * DAY - DAY;

    let store = std::env::var("QUERY_STORE").unwrap_or_else(|_| "sqlite".to_owned());
    let mut deployment = match store.as_str() {
        "sqlite" => start_sqlite(ads, day),
        "postgres" => start_postgres(ads, day),
        other => panic!("QUERY_STORE={other:?}: expected sqlite or postgres"),
    };
    let checked = check_oracle(deployment.target(), ads, day, 1);

    let requests = (rate * secs) as u64;
    let ad_query: Arc<dyn Fn(u64) -> String + Send + Sync> =
        Arc::new(move |i| ad_path(1 + mix(i) % ads, day));
    let advertiser_query: Arc<dyn Fn(u64) -> String + Send + Sync> =
        Arc::new(move |i| advertiser_path(1 + mix(i) % ADVERTISERS, day));
    let open = Pace::Open { rate };
    measure(
        &deployment,
        "query_ad_1m_24h",
        open,
        requests,
        connections,
        threads,
        Arc::clone(&ad_query),
    );
    measure(
        &deployment,
        "query_adv_1d_30d",
        open,
        requests,
        connections,
        threads,
        Arc::clone(&advertiser_query),
    );
    measure(
        &deployment,
        "query_ad_1m_24h_max",
        Pace::Closed,
        3_000,
        32,
        threads,
        Arc::clone(&ad_query),
    );
    measure(
        &deployment,
        "query_adv_1d_30d_max",
        Pace::Closed,
        20_000,
        32,
        threads,
        advertiser_query,
    );

    // Two builds on the same store, interleaved (the machine's load drifts): the build
    // under test (`QUERY_AB_BIN`) against this bench's own, for the ad query.
    let mut checked = checked;
    if let Some(b) = std::env::var_os("QUERY_AB_BIN") {
        let rounds = env_or("QUERY_AB_ROUNDS", 2);
        println!(
            "  A/B: a = {}, b = {}, {rounds} rounds of query_ad_1m_24h at {rate}/s",
            common::clickagg_bin().to_string_lossy(),
            b.to_string_lossy()
        );
        for round in 1..=rounds {
            for (label, binary) in [("a", None), ("b", Some(b.clone()))] {
                deployment.restart_with(binary);
                checked += check_oracle(deployment.target(), ads, day, 3 + round);
                measure(
                    &deployment,
                    &format!("query_ad_1m_24h_{label}{round}"),
                    open,
                    requests,
                    connections,
                    threads,
                    Arc::clone(&ad_query),
                );
            }
        }
    }

    let checked = checked + check_oracle(deployment.target(), ads, day, 2);
    let (pid, _) = deployment.server();
    let (rss, hwm) = (
        load::status_kib(pid, "VmRSS:") / 1024,
        load::status_kib(pid, "VmHWM:") / 1024,
    );
    println!("  oracle: {checked} sampled answers equal the plain sums of the inserted rows");
    println!(
        "  {} RSS {rss} MiB (peak {hwm} MiB)",
        deployment.process_name()
    );
    println!(
        "BENCH name={} checked={checked} exact=true rows={}",
        deployment.bench_name("query_oracle"),
        ads * 1_440
    );
}
