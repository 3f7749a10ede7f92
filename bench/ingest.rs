//! Ingest: clicks/s and latency of `GET /c/{token}` (302, not followed) and of batched
//! `POST /v1/clicks`, on the real `clickagg serve` binary over loopback, with durability on
//! (every acknowledged click is in an fsynced group commit of the embedded log).
//!
//! `cargo bench --bench ingest` (release build). Every click carries its own valid signed
//! impression, minted beforehand through `POST /v1/impressions` (Zipf over the ads), so
//! the server verifies, prices and logs each one for real. Each path runs twice:
//! closed loop (connections send back to back: the most the server sustains) and open
//! loop at the target rate (latency from each request's due time: queueing behind a stall
//! is counted), with the worst latency of each second of the phase, so one stall and a
//! queue that never drains tell apart. Afterwards the bench checks that every click the
//! server acknowledged is what `/metrics` counts as accepted and, once the committed
//! frontier passes the last acknowledgement, what the query API counts: a fast server
//! that drops clicks fails.
//!
//! Knobs (environment): `INGEST_GET_CLICKS` closed-loop GETs (default 200000),
//! `INGEST_GET_RATE` open-loop GETs/s (20000), `INGEST_BATCH_CLICKS` closed-loop clicks per
//! batch size (600000), `INGEST_BATCH_RATE` open-loop clicks/s (50000), `INGEST_OPEN_SECS`
//! (10), `INGEST_BATCHES` batch sizes (`100,1000`), `INGEST_CONNECTIONS` for GETs (64),
//! `INGEST_CLIENT_THREADS` (1), `INGEST_WORKERS` timely workers (2), `INGEST_CONFIG` extra
//! TOML appended to the server's config (`$'[archive]\nenabled = false'`).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/load.rs"]
mod load;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::{Method, StatusCode};
use load::{Outcome, Pace, Plan, Shot};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand_distr::{Distribution, Zipf};
use serde_json::Value;

use common::{Server, Target, TestTimes, env_or, metric, now_ms};

const ADS: u64 = 1_000;
const ADVERTISERS: u64 = 10;

fn advertiser_of(ad: u64) -> u64 {
    1 + ((ad - 1) / 10) % ADVERTISERS
}

/// The catalog: advertisers 1..=10, ads 1..=1000 in campaigns of 10.
fn create_catalog(server: &Server) {
    for a in 1..=ADVERTISERS {
        server.create_advertiser(a);
    }
    for ad in 1..=ADS {
        let campaign = 1_000 + (ad - 1) / 10;
        server.put_ad(ad, advertiser_of(ad), campaign, 50_000 + (ad % 20) * 10_000);
    }
}

/// `n` fresh impressions, ads drawn Zipf(1.1) over the catalog, shuffled: (ad, token).
fn mint(server: &Server, n: usize, seed: u64) -> Vec<(u64, String)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let zipf = Zipf::new(ADS as f64, 1.1).expect("zipf");
    let mut per_ad: BTreeMap<u64, usize> = BTreeMap::new();
    for _ in 0..n {
        *per_ad.entry(zipf.sample(&mut rng) as u64).or_default() += 1;
    }
    let jobs: Vec<(u64, usize)> = per_ad.into_iter().collect();
    let threads = 4;
    let mut tokens: Vec<(u64, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let jobs = &jobs;
                s.spawn(move || {
                    let mut out = Vec::new();
                    for (ad, k) in jobs.iter().skip(t).step_by(threads) {
                        out.extend(
                            server
                                .impressions(*ad, *k)
                                .into_iter()
                                .map(|(_, tok)| (*ad, tok)),
                        );
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("minting thread"))
            .collect()
    });
    tokens.shuffle(&mut rng);
    tokens
}

fn ip_of(i: u64) -> String {
    format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, 1 + i % 250)
}

/// What one phase measured.
struct Phase {
    name: String,
    clicks_per_click_request: u64,
    outcome: Outcome,
    /// Cores used during the phase: server, bench client, other processes.
    cores: (f64, f64, f64),
    /// Server CPU µs per acknowledged click, by thread group.
    per_click: String,
    rss_mib: u64,
    acked: BTreeMap<u64, u64>,
}

impl Phase {
    fn print(&mut self, pace: Pace) {
        let o = &mut self.outcome;
        let secs = o.elapsed.as_secs_f64();
        println!(
            "  {:<22} {pace}: {} requests, {} clicks acknowledged in {secs:.2}s = {:.0} clicks/s ({:.0} req/s)",
            self.name,
            o.ok,
            o.units,
            o.units_per_s(),
            o.requests_per_s()
        );
        let (p50, p99, max) = (o.latency_ms(0.5), o.latency_ms(0.99), o.latency_ms(1.0));
        let (s50, s99) = (o.service_ms(0.5), o.service_ms(0.99));
        println!(
            "  {:<22} latency per request p50 {p50:.2} ms  p99 {p99:.2} ms  max {max:.2} ms (service time p50 {s50:.2} p99 {s99:.2})",
            ""
        );
        let worst: Vec<String> = o
            .worst_by_second_us
            .iter()
            .map(|us| format!("{:.0}", *us as f64 / 1000.0))
            .collect();
        println!(
            "  {:<22} worst latency by second of the phase (from Unix ms {}), ms: {}",
            "",
            o.started_unix_ms,
            worst.join(" ")
        );
        println!(
            "  {:<22} refused {} · transport errors {} · unsent {} · cores used: server {:.2}, bench client {:.2}, other processes {:.2} · server RSS {} MiB",
            "", o.bad, o.errors, o.unsent, self.cores.0, self.cores.1, self.cores.2, self.rss_mib
        );
        println!(
            "  {:<22} server CPU µs per click (during the phase): {}",
            "", self.per_click
        );
        if let Some(p) = &o.first_problem {
            println!("  {:<22} first problem: {p}", "");
        }
        let pace_tag = pace.bench_fields();
        println!(
            "BENCH name={} pace={pace_tag} batch={} clicks_per_s={:.0} req_per_s={:.0} p50_ms={p50:.3} p99_ms={p99:.3} max_ms={max:.3} refused={} errors={} unsent={} server_cores={:.2} client_cores={:.2} other_cores={:.2} rss_mib={}",
            self.name,
            self.clicks_per_click_request,
            o.units_per_s(),
            o.requests_per_s(),
            o.bad,
            o.errors,
            o.unsent,
            self.cores.0,
            self.cores.1,
            self.cores.2,
            self.rss_mib
        );
    }
}

/// Sends `tokens` as GET redirects or as batches of `batch`, paced as `pace`.
fn run_phase(
    server: &Server,
    name: &str,
    tokens: Vec<(u64, String)>,
    batch: Option<usize>,
    pace: Pace,
    connections: usize,
    threads: usize,
) -> Phase {
    let pid = server.pid().expect("server pid");
    let per_request = batch.unwrap_or(1);
    let requests = tokens.len().div_ceil(per_request) as u64;
    let tokens = Arc::new(tokens);
    let make: load::Make = {
        let tokens = Arc::clone(&tokens);
        match batch {
            None => Arc::new(move |i| {
                let mut shot = Shot::get(format!("/c/{}", tokens[i as usize].1));
                shot.headers.push(("x-forwarded-for", ip_of(i)));
                shot
            }),
            Some(size) => Arc::new(move |i| {
                let start = i as usize * size;
                let chunk = &tokens[start..(start + size).min(tokens.len())];
                let now = now_ms();
                let mut body = String::with_capacity(chunk.len() * 150);
                body.push('[');
                for (j, (_, token)) in chunk.iter().enumerate() {
                    if j > 0 {
                        body.push(',');
                    }
                    body.push_str(&format!(
                        r#"{{"token":"{token}","event_time":{now},"ip":"{}"}}"#,
                        ip_of((start + j) as u64)
                    ));
                }
                body.push(']');
                Shot {
                    method: Method::POST,
                    path: "/v1/clicks".into(),
                    headers: vec![("content-type", "application/json".into())],
                    body: Bytes::from(body),
                }
            }),
        }
    };
    let judge: load::Judge = match batch {
        None => Arc::new(|status, _| (status == StatusCode::FOUND).then_some(1)),
        Some(_) => Arc::new(|status, body| {
            if status != StatusCode::ACCEPTED {
                return None;
            }
            let v: Value = serde_json::from_slice(body).ok()?;
            let rejected = v["rejected"].as_array()?.len();
            (rejected == 0).then(|| v["accepted"].as_u64())?
        }),
    };
    let deadline = pace.deadline(requests, Duration::from_secs(300));
    let split = load::CpuSplit::start(pid);
    let groups = load::cpu_by_group(pid);
    let outcome = load::run_blocking(
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
    let per_click = load::per_unit(&groups, &load::cpu_by_group(pid), outcome.units);
    let cores = split.cores(outcome.elapsed.as_secs_f64());
    // Which clicks were acknowledged: all of a phase when nothing failed, else unknown
    // per click; the verification then compares totals only.
    let mut acked = BTreeMap::new();
    if outcome.bad == 0 && outcome.errors == 0 && outcome.unsent == 0 {
        for (ad, _) in tokens.iter() {
            *acked.entry(advertiser_of(*ad)).or_default() += 1;
        }
    }
    Phase {
        name: name.into(),
        clicks_per_click_request: per_request as u64,
        outcome,
        cores,
        per_click,
        rss_mib: load::status_kib(pid, "VmRSS:") / 1024,
        acked,
    }
}

/// Sum of every counted click (billable, fraud, late) per advertiser over the days around now.
fn counted(server: &Server) -> BTreeMap<u64, (i64, i64)> {
    let day = 86_400_000;
    let (from, to) = (now_ms() / day * day - day, now_ms() / day * day + 2 * day);
    (1..=ADVERTISERS)
        .map(|a| {
            let body = server.get_json(&format!(
                "/v1/advertisers/{a}/clicks?granularity=1d&from={from}&to={to}"
            ));
            let (mut all, mut billable) = (0, 0);
            for p in body["points"].as_array().into_iter().flatten() {
                let n = |k: &str| p[k].as_i64().unwrap_or(0);
                all += n("clicks") + n("fraud_clicks") + n("late_clicks");
                billable += n("clicks");
            }
            (a, (all, billable))
        })
        .collect()
}

fn main() {
    let get_clicks = env_or("INGEST_GET_CLICKS", 200_000) as usize;
    let get_rate = env_or("INGEST_GET_RATE", 20_000) as f64;
    let batch_clicks = env_or("INGEST_BATCH_CLICKS", 600_000) as usize;
    let batch_rate = env_or("INGEST_BATCH_RATE", 50_000) as f64;
    let open_secs = env_or("INGEST_OPEN_SECS", 10) as f64;
    let connections = env_or("INGEST_CONNECTIONS", 64) as usize;
    let threads = env_or("INGEST_CLIENT_THREADS", 1) as usize;
    let workers = env_or("INGEST_WORKERS", 2) as usize;
    let sizes: Vec<usize> = std::env::var("INGEST_BATCHES")
        .unwrap_or_else(|_| "100,1000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();

    // Extra TOML for the server's config, to measure with a part switched off
    // (e.g. "[archive]\nenabled = false").
    let extra = std::env::var("INGEST_CONFIG").unwrap_or_default();
    let server = Server::start_configured(
        TestTimes {
            tick_ms: 200,
            ..TestTimes::default()
        },
        workers,
        &extra,
    );
    let pid = server.pid().expect("server pid");
    create_catalog(&server);
    println!(
        "ingest: clickagg serve ({workers} timely workers, tick 200ms), {ADS} ads, load average {}",
        load::loadavg()
    );
    println!(
        "  durability: embedded log = SQLite WAL with synchronous=FULL, one fsync per group commit; \
         a click is acknowledged (302/202) only after its group commit returned"
    );
    println!(
        "  client: this process, hyper HTTP/1.1 keep-alive, {threads} tokio thread(s), shares the machine's {} cores with the server",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    let mut phases = Vec::new();
    let mut seed = 1;
    let mut next_tokens = |n: usize| {
        seed += 1;
        let started = Instant::now();
        let t = mint(&server, n, seed);
        eprintln!(
            "  (minted {n} impressions in {:.1}s)",
            started.elapsed().as_secs_f64()
        );
        t
    };

    // Single clicks: GET /c/{token}.
    let tokens = next_tokens(get_clicks);
    let mut p = run_phase(
        &server,
        "ingest_get",
        tokens,
        None,
        Pace::Closed,
        connections,
        threads,
    );
    p.print(Pace::Closed);
    phases.push(p);
    let pace = Pace::Open { rate: get_rate };
    let tokens = next_tokens((get_rate * open_secs) as usize);
    let mut p = run_phase(
        &server,
        "ingest_get_at_rate",
        tokens,
        None,
        pace,
        connections,
        threads,
    );
    p.print(pace);
    phases.push(p);

    // Batches: POST /v1/clicks.
    for &size in &sizes {
        let conns = (connections / 4).max(4);
        let tokens = next_tokens(batch_clicks);
        let name = format!("ingest_batch{size}");
        let mut p = run_phase(
            &server,
            &name,
            tokens,
            Some(size),
            Pace::Closed,
            conns,
            threads,
        );
        p.print(Pace::Closed);
        phases.push(p);
        let pace = Pace::Open {
            rate: batch_rate / size as f64,
        };
        let tokens = next_tokens((batch_rate * open_secs) as usize);
        let name = format!("ingest_batch{size}_at_rate");
        let mut p = run_phase(&server, &name, tokens, Some(size), pace, conns, threads);
        p.print(pace);
        phases.push(p);
    }

    // Verification: acknowledged == accepted by the server == counted in the store.
    let last_ack = now_ms();
    let acked: u64 = phases.iter().map(|p| p.outcome.units).sum();
    let accepted = metric(&server.metrics(), "clickagg_clicks_accepted_total", "") as u64;
    let started = Instant::now();
    server.wait_complete_through(1, last_ack, Duration::from_secs(600));
    let drained = started.elapsed();
    let counted = counted(&server);
    let counted_all: i64 = counted.values().map(|(all, _)| all).sum();
    let billable: i64 = counted.values().map(|(_, b)| b).sum();
    let per_advertiser_known = phases.iter().all(|p| !p.acked.is_empty());
    let mut expected: BTreeMap<u64, i64> = BTreeMap::new();
    for p in &phases {
        for (a, n) in &p.acked {
            *expected.entry(*a).or_default() += *n as i64;
        }
    }
    let per_advertiser_ok = !per_advertiser_known
        || expected
            .iter()
            .all(|(a, n)| counted.get(a).map(|c| c.0) == Some(*n));
    let ok = accepted == acked && counted_all == acked as i64 && per_advertiser_ok;
    println!(
        "  verification: {acked} clicks acknowledged to the client, {accepted} accepted per /metrics, \
         {counted_all} counted in the query API ({billable} billable) once the frontier passed the last ack \
         ({:.1}s after the load stopped); per advertiser {}: {}",
        drained.as_secs_f64(),
        if per_advertiser_known {
            "checked"
        } else {
            "not checkable (some requests failed)"
        },
        if ok { "EXACT" } else { "MISMATCH" }
    );
    let (rss, hwm) = (
        load::status_kib(pid, "VmRSS:") / 1024,
        load::status_kib(pid, "VmHWM:") / 1024,
    );
    println!("  server RSS now {rss} MiB, peak (VmHWM) {hwm} MiB");
    println!(
        "BENCH name=ingest_verify acked={acked} accepted_metric={accepted} counted={counted_all} drain_s={:.1} exact={ok}",
        drained.as_secs_f64()
    );
    println!("BENCH name=ingest_rss rss_mib={rss} peak_mib={hwm}");
    assert!(ok, "acknowledged clicks were not all counted");
}
