//! Freshness: how long after its acknowledgement a click shows up in the query API, under
//! steady background traffic, on the real `clickagg serve` binary over loopback.
//!
//! `cargo bench --bench freshness` (release build). Knobs, as environment variables:
//! `FRESHNESS_RATE` background clicks/s (default 20000), `FRESHNESS_SECS` measuring time
//! (default 30), `FRESHNESS_WORKERS` timely workers (default 2). Prints p50/p90/p99/max
//! of ack -> visible, the background load achieved, and the server's peak RSS.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use clickagg::loadgen::LoadgenOptions;
use common::{AD_SERVER, ADMIN, Server, Target, TestTimes, client, env_or};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn visible_clicks(server: &Server, ad: u64) -> i64 {
    server.get_json(&format!("/v1/ads/{ad}/clicks?granularity=1d"))["points"]
        .as_array()
        .map(|ps| ps.iter().map(|p| p["clicks"].as_i64().unwrap_or(0)).sum())
        .unwrap_or(0)
}

fn main() {
    let rate = env_or("FRESHNESS_RATE", 20_000);
    let secs = env_or("FRESHNESS_SECS", 30);
    let workers = env_or("FRESHNESS_WORKERS", 2);
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

    // The probe: its own advertiser and ad, one browser click at a time.
    let probe_ad = 9_999_999;
    server.create_advertiser(9_999);
    server.put_ad(probe_ad, 9_999, 99_990, 1_000);
    std::thread::sleep(Duration::from_secs(3));
    let tokens = server.impressions(probe_ad, 1_000);
    let http = client();
    let mut latencies = Vec::new();
    let mut peak_rss = 0;
    let started = Instant::now();
    for (i, (_, token)) in tokens.iter().enumerate() {
        if started.elapsed() > Duration::from_secs(secs) {
            break;
        }
        let response = http
            .get(server.url(&format!("/c/{token}")))
            .header("x-forwarded-for", format!("10.200.{}.{}", i / 250, i % 250))
            .send()
            .expect("probe click");
        assert_eq!(response.status(), 302, "probe click refused");
        let acked = Instant::now();
        while visible_clicks(&server, probe_ad) <= i as i64 {
            assert!(
                acked.elapsed() < Duration::from_secs(60),
                "probe click {i} not visible after 60 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        latencies.push(acked.elapsed());
        peak_rss = peak_rss.max(rss_kib(pid, "VmRSS:"));
        std::thread::sleep(Duration::from_millis(100));
    }
    let report = load
        .join()
        .expect("load thread")
        .expect("load generator failed");
    latencies.sort();
    println!("freshness: click acknowledged -> visible in GET /v1/ads/{{id}}/clicks");
    println!(
        "  background load: target {rate} clicks/s, achieved {:.0}/s ({} accepted, {} failed requests)",
        report.sent as f64 / report.elapsed.as_secs_f64(),
        report.accepted,
        report.failed_requests
    );
    println!(
        "  {} probes, {workers} workers, tick 200ms: p50 {:?}  p90 {:?}  p99 {:?}  max {:?}",
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.9),
        percentile(&latencies, 0.99),
        latencies[latencies.len() - 1]
    );
    println!(
        "  server RSS: peak {} MiB (VmHWM {} MiB)",
        peak_rss / 1024,
        rss_kib(pid, "VmHWM:") / 1024
    );
}
