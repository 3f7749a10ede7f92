//! Freshness: how long after its acknowledgement a click shows up in the query API, under
//! steady background traffic, on the real `clickagg serve` binary over loopback.
//!
//! `cargo bench --bench freshness` (release build). Knobs, as environment variables:
//! `FRESHNESS_RATE` background clicks/s (default 20000), `FRESHNESS_SECS` measuring time
//! (default 30), `FRESHNESS_WORKERS` timely workers (default 2), `FRESHNESS_PROBES` probe
//! threads (default 4, each clicking its own ad one click at a time, so p99 rests on a few
//! hundred samples rather than a few dozen). Prints p50/p90/p99/max of ack -> visible, the
//! background load achieved (clicks acknowledged per second), and the server's peak RSS.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/load.rs"]
mod load;

use std::time::{Duration, Instant};

use clickagg::loadgen::LoadgenOptions;
use common::{AD_SERVER, ADMIN, Server, Target, TestTimes, client, env_or};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn visible_clicks(server: &Server, ad: u64) -> i64 {
    server.get_json(&format!("/v1/ads/{ad}/clicks?granularity=1d"))["points"]
        .as_array()
        .map(|ps| ps.iter().map(|p| p["clicks"].as_i64().unwrap_or(0)).sum())
        .unwrap_or(0)
}

/// Clicks ad `ad` once at a time until `secs` have passed since `started`, waiting for each
/// click to show up in the query API; returns ack -> visible of every click.
fn probe(server: &Server, ad: u64, lane: u64, started: Instant, secs: u64) -> Vec<Duration> {
    let tokens = server.impressions(ad, 1_000);
    let http = client();
    let mut latencies = Vec::new();
    for (i, (_, token)) in tokens.iter().enumerate() {
        if started.elapsed() > Duration::from_secs(secs) {
            break;
        }
        let response = http
            .get(server.url(&format!("/c/{token}")))
            .header(
                "x-forwarded-for",
                format!("10.{}.{}.{}", 200 + lane, i / 250, i % 250),
            )
            .send()
            .expect("probe click");
        assert_eq!(response.status(), 302, "probe click refused");
        let acked = Instant::now();
        while visible_clicks(server, ad) <= i as i64 {
            assert!(
                acked.elapsed() < Duration::from_secs(60),
                "probe click {i} of ad {ad} not visible after 60 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        latencies.push(acked.elapsed());
        std::thread::sleep(Duration::from_millis(100));
    }
    latencies
}

fn main() {
    let rate = env_or("FRESHNESS_RATE", 20_000);
    let secs = env_or("FRESHNESS_SECS", 30);
    let workers = env_or("FRESHNESS_WORKERS", 2);
    let probes = env_or("FRESHNESS_PROBES", 4);
    let server = Server::start_with(
        TestTimes {
            tick_ms: 200,
            ..TestTimes::default()
        },
        workers as usize,
    );
    let pid = server.pid().expect("server pid");

    // Background traffic: the project's own load generator, over HTTP, in this process.
    let options = LoadgenOptions {
        url: server.proc.base.clone(),
        admin_key: ADMIN.into(),
        ad_server_key: AD_SERVER.into(),
        rate,
        duration: Some(Duration::from_secs(secs + 5)),
        batch: 500,
        redirect_rate: 0.0,
        progress: false,
        ..LoadgenOptions::default()
    };
    let load = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(clickagg::loadgen::run(options))
    });

    // The probes: their own advertiser and ads, one browser click at a time each.
    server.create_advertiser(9_999);
    for p in 0..probes {
        server.put_ad(9_999_000 + p, 9_999, 99_990, 1_000);
    }
    std::thread::sleep(Duration::from_secs(3));
    let started = Instant::now();
    let split = load::CpuSplit::start(pid);
    let (mut latencies, peak_rss): (Vec<Duration>, u64) = std::thread::scope(|s| {
        let handles: Vec<_> = (0..probes)
            .map(|p| {
                let server = &server;
                s.spawn(move || probe(server, 9_999_000 + p, p, started, secs))
            })
            .collect();
        let mut peak = 0;
        while handles.iter().any(|h| !h.is_finished()) {
            peak = peak.max(load::status_kib(pid, "VmRSS:"));
            std::thread::sleep(Duration::from_millis(200));
        }
        let latencies = handles
            .into_iter()
            .flat_map(|h| h.join().expect("probe thread"))
            .collect();
        (latencies, peak)
    });
    let (server_cores, client_cores, other_cores) = split.cores(started.elapsed().as_secs_f64());
    let report = load
        .join()
        .expect("load thread")
        .expect("load generator failed");
    latencies.sort();
    println!("freshness: click acknowledged -> visible in GET /v1/ads/{{id}}/clicks");
    let achieved = report.accepted as f64 / report.elapsed.as_secs_f64();
    println!(
        "  background load: target {rate} clicks/s, achieved {achieved:.0} clicks/s acknowledged \
         ({} sent, {} accepted, {} rejected, {} failed requests in {:.1}s)",
        report.sent,
        report.accepted,
        report.rejected,
        report.failed_requests,
        report.elapsed.as_secs_f64()
    );
    let (p50, p90, p99, max) = (
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.9),
        percentile(&latencies, 0.99),
        latencies[latencies.len() - 1],
    );
    println!(
        "  {} probe clicks ({probes} probe threads), {workers} workers, tick 200ms: p50 {p50:?}  p90 {p90:?}  p99 {p99:?}  max {max:?}",
        latencies.len(),
    );
    println!(
        "  server RSS: peak {} MiB (VmHWM {} MiB)",
        peak_rss / 1024,
        load::status_kib(pid, "VmHWM:") / 1024
    );
    println!(
        "  cores used while probing: server {server_cores:.2}, bench (load generator + probes) {client_cores:.2}, other processes {other_cores:.2}"
    );
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "BENCH name=freshness load_target={rate} load_clicks_per_s={achieved:.0} probes={} p50_ms={:.1} p90_ms={:.1} p99_ms={:.1} max_ms={:.1} rss_peak_mib={} server_cores={server_cores:.2} client_cores={client_cores:.2} other_cores={other_cores:.2}",
        latencies.len(),
        ms(p50),
        ms(p90),
        ms(p99),
        ms(max),
        peak_rss / 1024
    );
}
