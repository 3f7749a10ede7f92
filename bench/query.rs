//! Query: latency of the advertiser metrics API on the real `clickagg serve` binary over
//! loopback, with 10,000 ads x 1 day of per-minute data in the embedded store (SQLite).
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
//! created through the HTTP API; then, with the server stopped, EVERY minute of yesterday
//! (UTC) of every ad gets an `ad_clicks` row (14,400,000 rows, dense: the worst case for
//! query (a)) written through `Store::commit`, the sink's own write path, which maintains
//! the 5-minute, hourly and daily rollups per ad, campaign and advertiser in the same
//! transactions. Row values are a fixed function of (ad, minute): hot ads (low ids) have up
//! to 1000 clicks a minute, cold ones 1-2; ~25% of rows carry a fraud click, ~6% a late
//! one. The server is then started again on that store. Before and after the timed runs,
//! sampled answers are compared with the same function summed by plain loops (the oracle).
//!
//! Knobs: `QUERY_RATE` (500), `QUERY_SECS` per query (20), `QUERY_ADS` (10000),
//! `QUERY_CONNECTIONS` (64), `QUERY_CLIENT_THREADS` (1).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/load.rs"]
mod load;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clickagg::store::sqlite::{SqliteOptions, SqliteStore};
use clickagg::store::{ChangeBatch, Measures, Store};
use clickagg::views::Datum;
use hyper::StatusCode;
use load::{Pace, Plan, Shot};
use serde_json::Value;

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

fn create_catalog(server: &Server, ads: u64) {
    for a in 1..=ADVERTISERS {
        server.create_advertiser(a);
    }
    let threads = 8;
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                for ad in (1..=ads).skip(t).step_by(threads) {
                    server.put_ad(ad, advertiser_of(ad), campaign_of(ad), cpc_of(ad) as u64);
                }
            });
        }
    });
}

/// Writes every minute of `day` of every ad through `Store::commit`; returns the last upper.
fn fill(store_path: &std::path::Path, ads: u64, day: u64) -> u64 {
    let store = SqliteStore::open(
        store_path,
        clickagg::views::enabled(&[]),
        SqliteOptions {
            read_pool_size: 1,
            progress_retention_ms: DAY,
        },
    )
    .expect("open store");
    store.claim_writer().expect("claim store");
    let point = store.recovery_point(TICK_MS, 0).expect("recovery point");
    let ads_per_commit = 50;
    let mut upper = point.as_of;
    let started = Instant::now();
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
    }
    eprintln!(
        "  (filled {} rows in {:.1}s)",
        ads * 1_440,
        started.elapsed().as_secs_f64()
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
fn check_oracle(server: &Server, ads: u64, day: u64, seed: u64) -> usize {
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
    server: &Server,
    name: &str,
    pace: Pace,
    requests: u64,
    connections: usize,
    threads: usize,
    path: Arc<dyn Fn(u64) -> String + Send + Sync>,
) {
    let pid = server.pid().expect("server pid");
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
    let mut o = load::run_blocking(
        threads,
        load::addr_of(&server.proc.base),
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
    let (p50, p99, max) = (o.latency_ms(0.5), o.latency_ms(0.99), o.latency_ms(1.0));
    let (s50, s99) = (o.service_ms(0.5), o.service_ms(0.99));
    println!(
        "  {name:<18} {pace}: {} answers in {secs:.1}s ({:.0}/s); p50 {p50:.2} ms  p99 {p99:.2} ms  max {max:.2} ms \
         (service p50 {s50:.2} p99 {s99:.2}); refused {} errors {} unsent {}; cores used: server {server_cores:.2}, client {client_cores:.2}, other processes {other_cores:.2}",
        o.ok,
        o.requests_per_s(),
        o.bad,
        o.errors,
        o.unsent
    );
    if let Some(p) = &o.first_problem {
        println!("  {:<18} first problem: {p}", "");
    }
    let pace_tag = match pace {
        Pace::Closed => "closed".to_owned(),
        Pace::Open { rate } => format!("open rate_req_s={rate:.0}"),
    };
    println!(
        "BENCH name={name} pace={pace_tag} req_per_s={:.0} p50_ms={p50:.3} p99_ms={p99:.3} max_ms={max:.3} refused={} errors={} unsent={} server_cores={server_cores:.2} client_cores={client_cores:.2} other_cores={other_cores:.2}",
        o.requests_per_s(),
        o.bad,
        o.errors,
        o.unsent
    );
}

fn file_mib(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len()) / (1 << 20)
}

fn main() {
    let rate = env_or("QUERY_RATE", 500) as f64;
    let secs = env_or("QUERY_SECS", 20) as f64;
    let ads = env_or("QUERY_ADS", 10_000);
    let connections = env_or("QUERY_CONNECTIONS", 64) as usize;
    let threads = env_or("QUERY_CLIENT_THREADS", 1) as usize;
    let day = now_ms() / DAY * DAY - DAY;

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
    let last_upper = fill(&store_path, ads, day);
    server.restart();
    server.wait_complete_through(1, last_upper, Duration::from_secs(120));
    let pid = server.pid().expect("server pid");
    println!(
        "query: clickagg serve (embedded SQLite store, read pool 8), {ads} ads x 1440 minutes = {} ad_clicks rows \
         (dense, day {}), store {} MiB + WAL {} MiB; load average {}",
        ads * 1_440,
        clickagg::time::rfc3339(day),
        file_mib(&store_path),
        file_mib(&store_path.with_extension("db-wal")),
        load::loadavg()
    );
    let checked = check_oracle(&server, ads, day, 1);

    let requests = (rate * secs) as u64;
    let ad_query: Arc<dyn Fn(u64) -> String + Send + Sync> =
        Arc::new(move |i| ad_path(1 + mix(i) % ads, day));
    let advertiser_query: Arc<dyn Fn(u64) -> String + Send + Sync> =
        Arc::new(move |i| advertiser_path(1 + mix(i) % ADVERTISERS, day));
    let open = Pace::Open { rate };
    measure(
        &server,
        "query_ad_1m_24h",
        open,
        requests,
        connections,
        threads,
        Arc::clone(&ad_query),
    );
    measure(
        &server,
        "query_adv_1d_30d",
        open,
        requests,
        connections,
        threads,
        Arc::clone(&advertiser_query),
    );
    measure(
        &server,
        "query_ad_1m_24h_max",
        Pace::Closed,
        3_000,
        32,
        threads,
        ad_query,
    );
    measure(
        &server,
        "query_adv_1d_30d_max",
        Pace::Closed,
        20_000,
        32,
        threads,
        advertiser_query,
    );

    let checked = checked + check_oracle(&server, ads, day, 2);
    let (rss, hwm) = (
        load::status_kib(pid, "VmRSS:") / 1024,
        load::status_kib(pid, "VmHWM:") / 1024,
    );
    println!("  oracle: {checked} sampled answers equal the plain sums of the inserted rows");
    println!("  server RSS {rss} MiB (peak {hwm} MiB)");
    println!(
        "BENCH name=query_oracle checked={checked} exact=true rows={}",
        ads * 1_440
    );
}
