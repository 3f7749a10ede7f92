//! The embedded log: appends per second and append latency (until durable, fsync on) for
//! single-record appends from many concurrent callers (browser redirects) and for
//! batches (SDK posts). Shows what group commit buys: one fsync per group.
//!
//! `cargo bench --bench log_append`. `LOG_APPEND_SECS` per scenario (default 5).

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clickagg::log::embedded::{EmbeddedLog, EmbeddedLogOptions};
use clickagg::log::{AppendRecord, Log, click_partition};
use clickagg::record::{ClickEvent, Payload};

fn click(i: u64) -> AppendRecord {
    let event = ClickEvent {
        impression_id: u128::from(i) * 0x9e37_79b9_7f4a_7c15,
        ad_id: i % 10_000,
        issued_at_ms: 1_764_000_000_000,
        event_time_ms: 1_764_000_000_000 + i,
        click_id: format!("{i:032x}"),
        user_id: format!("u-{}", i % 100_000),
        ip: std::net::Ipv4Addr::from((i as u32).wrapping_mul(2_654_435_761)).into(),
        cpc_micros: 250_000,
    };
    AppendRecord {
        partition: click_partition(event.ad_id, 4),
        key: Some(event.ad_id),
        record_time_ms: None,
        payload: event.encode(),
    }
}

struct Outcome {
    records: u64,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

async fn scenario(log: Arc<EmbeddedLog>, callers: u64, batch: u64, secs: u64) -> Outcome {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let tasks: Vec<_> = (0..callers)
        .map(|c| {
            let (log, stop) = (Arc::clone(&log), Arc::clone(&stop));
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut i = c << 32;
                while !stop.load(Ordering::Relaxed) {
                    let records = (0..batch).map(|k| click(i + k)).collect();
                    i += batch;
                    let t = Instant::now();
                    match log.append(records).await {
                        Ok(_) => latencies.push(t.elapsed()),
                        Err(e) => panic!("append failed: {e}"),
                    }
                }
                latencies
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.expect("task"));
    }
    let elapsed = started.elapsed();
    latencies.sort();
    Outcome {
        records: latencies.len() as u64 * batch,
        elapsed,
        latencies,
    }
}

/// CPU seconds (user + system) of this process's threads named `log-writer`.
fn writer_cpu_seconds() -> f64 {
    common::thread_cpu_seconds(std::process::id())
        .into_iter()
        .filter(|(name, _)| name == "log-writer")
        .map(|(_, secs)| secs)
        .sum()
}

/// Bytes this process has handed to `write`/`pwrite` so far (`wchar` of `/proc/self/io`):
/// SQLite's WAL frames and checkpoints.
fn bytes_written() -> f64 {
    std::fs::read_to_string("/proc/self/io")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("wchar:")?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1000.0
}

fn main() {
    let secs = std::env::var("LOG_APPEND_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!("embedded log (SQLite WAL, synchronous=FULL, group commit), {secs}s per scenario");
    println!(
        "{:>8} {:>6} {:>12} {:>9} {:>9} {:>9} {:>14} {:>14}",
        "callers",
        "batch",
        "records/s",
        "p50 ms",
        "p99 ms",
        "appends",
        "writer µs/rec",
        "written B/rec"
    );
    for (callers, batch) in [(1, 1), (64, 1), (512, 1), (4, 500), (16, 500)] {
        let dir = tempfile::tempdir().expect("tmp");
        let log = Arc::new(
            EmbeddedLog::open(
                dir.path(),
                EmbeddedLogOptions {
                    click_partitions: 4,
                    verdict_partitions: 2,
                    watermark_interval: Some(Duration::from_millis(200)),
                    append_timeout: Duration::from_secs(30),
                },
            )
            .expect("open log"),
        );
        let (cpu, written) = (writer_cpu_seconds(), bytes_written());
        let o = runtime.block_on(scenario(log, callers, batch, secs));
        let records = o.records.max(1) as f64;
        println!(
            "{callers:>8} {batch:>6} {:>12.0} {:>9.2} {:>9.2} {:>9} {:>14.1} {:>14.0}",
            o.records as f64 / o.elapsed.as_secs_f64(),
            pct(&o.latencies, 0.5),
            pct(&o.latencies, 0.99),
            o.latencies.len(),
            (writer_cpu_seconds() - cpu) * 1e6 / records,
            (bytes_written() - written) / records
        );
    }
}
