//! Skew: one ad gets half of all clicks. With two timely workers, how evenly is the work
//! shared? Prints each worker's CPU time (its timely thread plus its log reader thread)
//! for the hot ad unsalted and salted (`log.hot_ads`), and checks the counts per ad
//! exactly against what was sent. Counting is two-stage either way (pre-aggregated per
//! worker before the exchange to the key's worker).
//!
//! `cargo bench --bench skew`. Knobs: `SKEW_CLICKS` (default 400000), `SKEW_SALT`
//! (`both`, `on` or `off`; default `both`).

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{ADMIN, Server, Target, TestTimes, client, now_ms};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};

const HOT_AD: u64 = 1;
const ADS: u64 = 100;

/// CPU seconds of the worker and log-reader threads, per worker index.
fn cpu_by_worker(pid: u32) -> BTreeMap<usize, f64> {
    let mut out = BTreeMap::new();
    for (name, secs) in common::thread_cpu_seconds(pid) {
        let worker = ["timely:work-", "log-reader-"]
            .iter()
            .find_map(|p| name.strip_prefix(p)?.parse::<usize>().ok());
        if let Some(worker) = worker {
            *out.entry(worker).or_default() += secs;
        }
    }
    out
}

struct Outcome {
    cpu: BTreeMap<usize, f64>,
    exact: bool,
    clicks: usize,
    elapsed: Duration,
}

fn run(clicks: usize, salted: bool) -> Outcome {
    let extra = format!(
        "[log]\nclick_partitions = 8\nhot_ads = [{}]\nhot_ad_spread = 8\n",
        if salted {
            HOT_AD.to_string()
        } else {
            String::new()
        }
    );
    let server = Server::start_configured(TestTimes::default(), 2, &extra);
    let pid = server.pid().expect("pid");
    server.create_advertiser(1);
    for ad in 1..=ADS {
        server.put_ad(ad, 1, 100 + ad / 10, 1_000);
    }
    // Half the impressions are the hot ad's, the rest spread over the others.
    let mut tokens: Vec<(u64, String)> = Vec::with_capacity(clicks);
    for (_, t) in server.impressions(HOT_AD, clicks / 2) {
        tokens.push((HOT_AD, t));
    }
    let per_cold = (clicks - tokens.len()).div_ceil((ADS - 1) as usize);
    for ad in 2..=ADS {
        let n = per_cold.min(clicks - tokens.len());
        for (_, t) in server.impressions(ad, n) {
            tokens.push((ad, t));
        }
    }
    let mut rng = StdRng::seed_from_u64(7);
    let mut sent: BTreeMap<u64, i64> = BTreeMap::new();
    let before = cpu_by_worker(pid);
    let started = Instant::now();
    let http = client();
    let mut last_ack = 0;
    for (i, chunk) in tokens.chunks(1_000).enumerate() {
        let now = now_ms();
        let batch: Vec<Value> = chunk
            .iter()
            .enumerate()
            .map(|(j, (_, t))| {
                json!({"token": t, "event_time": now, "click_id": format!("{i}-{j}"),
                       "ip": format!("10.{}.{}.{}", rng.random_range(0..256), rng.random_range(0..256), rng.random_range(0..256))})
            })
            .collect();
        let r = http
            .post(server.url("/v1/clicks"))
            .json(&batch)
            .send()
            .expect("send clicks");
        assert_eq!(r.status(), 202, "clicks refused");
        last_ack = now_ms();
        for (ad, _) in chunk {
            *sent.entry(*ad).or_default() += 1;
        }
    }
    server.wait_complete_through(HOT_AD, last_ack, Duration::from_secs(300));
    let elapsed = started.elapsed();
    let after = cpu_by_worker(pid);
    let cpu = after
        .iter()
        .map(|(w, s)| (*w, s - before.get(w).copied().unwrap_or(0.0)))
        .collect();
    let day = 86_400_000;
    let top: Value = server
        .get(
            ADMIN,
            &format!(
                "/v1/advertisers/1/top-ads?limit=1000&from={}&to={}",
                now_ms() / day * day - day,
                now_ms() / day * day + day
            ),
        )
        .json()
        .expect("top ads");
    let counted: BTreeMap<u64, i64> = top["ads"]
        .as_array()
        .expect("ads")
        .iter()
        .map(|a| {
            (
                a["ad_id"].as_u64().unwrap_or(0),
                a["clicks"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    Outcome {
        cpu,
        exact: counted == sent,
        clicks: tokens.len(),
        elapsed,
    }
}

fn main() {
    let clicks = common::env_or("SKEW_CLICKS", 400_000) as usize;
    let modes: Vec<bool> = match std::env::var("SKEW_SALT").as_deref() {
        Ok("on") => vec![true],
        Ok("off") => vec![false],
        _ => vec![false, true],
    };
    println!("skew: {clicks} clicks, ad {HOT_AD} = 50%, 2 workers, 8 click partitions");
    println!(
        "{:>10} {:>14} {:>14} {:>8} {:>12} {:>10}",
        "hot ad", "worker 0 CPU s", "worker 1 CPU s", "ratio", "counts exact", "clicks/s"
    );
    for salted in modes {
        let o = run(clicks, salted);
        let w0 = o.cpu.get(&0).copied().unwrap_or(0.0);
        let w1 = o.cpu.get(&1).copied().unwrap_or(0.0);
        println!(
            "{:>10} {:>14.2} {:>14.2} {:>8.2} {:>12} {:>10.0}",
            if salted { "salted" } else { "unsalted" },
            w0,
            w1,
            w0.max(w1) / w0.min(w1).max(1e-9),
            if o.exact { "yes" } else { "NO" },
            o.clicks as f64 / o.elapsed.as_secs_f64()
        );
    }
}
