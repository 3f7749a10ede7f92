//! Soak: steady click traffic into `clickagg serve` for a long time with a short horizon,
//! sampling the server's RSS, the number of updates its arrangements hold and the
//! impressions its dedup holds in place. With every click retracted again at record time +
//! horizon and the arrangements compacting, all three must level off once a horizon of
//! traffic has passed and stay there.
//!
//! `cargo bench --bench soak`. Knobs: `SOAK_SECS` (default 600), `SOAK_RATE` clicks/s
//! (default 5000), `SOAK_SAMPLE_SECS` (default 10), `SOAK_WORKERS` (default 2). The
//! server runs with impression TTL 10s, lateness 5s, correction window 15s, the hourly
//! and adjustment views (one-hour windows) switched off, so the horizon is its minimum, 1m 35.4s (the one-minute windows
//! alone take 60s of it).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use clickagg::loadgen::LoadgenOptions;
use common::{AD_SERVER, ADMIN, Server, TestTimes, env_or, metric};

fn rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmRSS:")
}

/// A size line of `/proc/<pid>/status`, in MiB.
fn status_mib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

/// One sample: seconds since the start, RSS, arrangement records, batcher records,
/// clicks accepted, impressions in the dedup.
type Sample = (u64, f64, f64, f64, f64, f64);

fn spread(values: &[f64]) -> (f64, f64, f64) {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(0.0, f64::max);
    let mean = values.iter().sum::<f64>() / values.len().max(1) as f64;
    (min, max, mean)
}

fn main() {
    let secs = env_or("SOAK_SECS", 600);
    let rate = env_or("SOAK_RATE", 5_000);
    let every = env_or("SOAK_SAMPLE_SECS", 10);
    let workers = env_or("SOAK_WORKERS", 2) as usize;
    let times = TestTimes {
        tick_ms: 200,
        lateness_s: 5,
        ttl_s: 10,
        correction_s: 15,
        max_clicks_per_ip_per_second: 20,
    };
    let server = Server::start_configured(
        times,
        workers,
        "[views]\ndisabled = [\"ad_hourly_users\", \"fraud_adjustments\"]\n",
    );
    let pid = server.pid().expect("server pid");
    let options = LoadgenOptions {
        url: server.proc.base.clone(),
        admin_key: ADMIN.into(),
        ad_server_key: AD_SERVER.into(),
        rate,
        duration: Some(Duration::from_secs(secs)),
        batch: 500,
        late_by: Duration::from_secs(8),
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

    println!(
        "soak: {rate} clicks/s for {secs}s into clickagg serve ({workers} workers, horizon 1m 35.4s)"
    );
    println!(
        "{:>6} {:>10} {:>10} {:>14} {:>14} {:>12} {:>12} {:>10}",
        "t (s)", "RSS MiB", "anon MiB", "arranged", "in batchers", "accepted", "dedup", "held back"
    );
    let started = Instant::now();
    let mut samples: Vec<Sample> = Vec::new();
    while started.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_secs(every));
        let text = server.metrics();
        let sample = (
            started.elapsed().as_secs(),
            rss_mib(pid),
            metric(&text, "clickagg_arrangement_records", ""),
            metric(&text, "clickagg_arrangement_batcher_records", ""),
            metric(&text, "clickagg_clicks_accepted_total", ""),
            metric(&text, "clickagg_dedup_impressions", ""),
        );
        println!(
            "{:>6} {:>10.1} {:>10.1} {:>14.0} {:>14.0} {:>12.0} {:>12.0} {:>10.0}",
            sample.0,
            sample.1,
            status_mib(pid, "RssAnon:"),
            sample.2,
            sample.3,
            sample.4,
            sample.5,
            metric(&text, "clickagg_pending_updates", "")
        );
        samples.push(sample);
    }
    let report = load.join().expect("load thread").expect("load generator");
    println!("load: {report}");

    let steady: Vec<&Sample> = samples.iter().filter(|s| s.0 >= 180).collect();
    if steady.is_empty() {
        println!("(run longer than 3 minutes for the steady-state summary)");
        return;
    }
    let (rss_min, rss_max, rss_mean) = spread(&steady.iter().map(|s| s.1).collect::<Vec<_>>());
    let (arr_min, arr_max, arr_mean) = spread(&steady.iter().map(|s| s.2).collect::<Vec<_>>());
    let rss_dev = (rss_max - rss_mean).max(rss_mean - rss_min) / rss_mean * 100.0;
    let arr_dev = (arr_max - arr_mean).max(arr_mean - arr_min) / arr_mean.max(1.0) * 100.0;
    let (dedup_min, dedup_max, dedup_mean) =
        spread(&steady.iter().map(|s| s.5).collect::<Vec<_>>());
    let dedup_dev =
        (dedup_max - dedup_mean).max(dedup_mean - dedup_min) / dedup_mean.max(1.0) * 100.0;
    // Per minute: the mean and the peak of the samples. A single sample may catch a large
    // merge in flight (it holds its input and output batches until it completes); the
    // per-minute figures show whether the level itself moves.
    let mut minutes: std::collections::BTreeMap<u64, Vec<f64>> = Default::default();
    for s in &steady {
        minutes.entry(s.0 / 60).or_default().push(s.1);
    }
    let means: Vec<f64> = minutes.values().map(|v| spread(v).2).collect();
    let peaks: Vec<f64> = minutes.values().map(|v| spread(v).1).collect();
    let dev = |v: &[f64]| {
        let (min, max, mean) = spread(v);
        (max - mean).max(mean - min) / mean * 100.0
    };
    println!("after minute 3 ({} samples):", steady.len());
    println!(
        "  RSS per minute: means {:.0}..{:.0} MiB (+-{:.1}%), peaks {:.0}..{:.0} MiB (+-{:.1}%)",
        spread(&means).0,
        spread(&means).1,
        dev(&means),
        spread(&peaks).0,
        spread(&peaks).1,
        dev(&peaks)
    );
    println!(
        "  RSS samples: min {rss_min:.1}, max {rss_max:.1}, mean {rss_mean:.1} MiB: within +-{rss_dev:.1}% of the mean ({})",
        if rss_dev <= 10.0 {
            "within +-10%"
        } else {
            "OUTSIDE +-10%"
        }
    );
    println!(
        "  arrangement records: min {arr_min:.0}, max {arr_max:.0}, mean {arr_mean:.0}: within +-{arr_dev:.1}% of the mean, \
         while {:.0} clicks were accepted in that time",
        steady.last().map_or(0.0, |s| s.4) - steady.first().map_or(0.0, |s| s.4)
    );
    println!(
        "  dedup impressions: min {dedup_min:.0}, max {dedup_max:.0}, mean {dedup_mean:.0}: within +-{dedup_dev:.1}% of the mean"
    );
}
