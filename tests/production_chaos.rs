//! Production mode, acceptance 2, 3 and 4: under steady load through ingest -> Kafka ->
//! worker -> Postgres -> query (separate OS processes), SIGKILL the worker process or the
//! ingest process, or crash-restart Postgres, at 10 random moments, restarting what died.
//! At the end every (ad, window) equals the oracle exactly (0 lost, 0 double counted);
//! every click that got a 202 is in the Kafka topic; and a poller that watched the store
//! throughout never saw the committed frontier go back.
//!
//! The poller also checks that no window's count went backwards. The workload keeps
//! every legitimate update monotone (`WorkloadSpec::duplicates_stay_in_minute`), so a drop
//! is a wrong value the store held for a moment. When the check fails, the processes'
//! logs are kept in `$TMPDIR/clickagg-chaos-<seed>`; `CLICKAGG_CHAOS_SEED` replays a run's
//! fault schedule and workload, and `CLICKAGG_TEST_RUST_LOG=info,clickagg::sink::rows=debug,
//! clickagg::source::records=trace` has the logs show every row the sink commits and the
//! time the source gives every record.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clickagg::log::kafka::{KafkaLog, KafkaLogOptions};
use clickagg::log::{Log, LogPosition, all_partitions};
use clickagg::record::{ClickEvent, Payload, Topic, is_heartbeat};
use common::cluster::{Cluster, START_LIMIT, Shared};
use common::compare::{assert_matches_oracle, measures, span, wait_counted};
use common::oracle::{Measures, Oracle};
use common::postgres::{PrivatePostgres, TestDb};
use common::workload::{Driver, WorkloadSpec};
use common::{ADMIN, Target, TestTimes, client, parse_rfc3339};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::Value;

/// One fault the chaos thread injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillWorker,
    KillIngest,
    RestartPostgres,
}

/// Injects `n` faults at random moments, restarting what died, then sets `done`.
fn chaos(
    n: usize,
    seed: u64,
    worker: Shared,
    ingest: Shared,
    postgres: Arc<PrivatePostgres>,
    done: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<(Fault, Duration)>> {
    std::thread::spawn(move || {
        let mut rng = StdRng::seed_from_u64(seed);
        let started = Instant::now();
        let mut faults = Vec::new();
        for _ in 0..n {
            std::thread::sleep(Duration::from_millis(rng.random_range(1_000..4_000)));
            let fault = match rng.random_range(0..3) {
                0 => Fault::KillWorker,
                1 => Fault::KillIngest,
                _ => Fault::RestartPostgres,
            };
            faults.push((fault, started.elapsed()));
            match fault {
                Fault::KillWorker | Fault::KillIngest => {
                    let victim = if fault == Fault::KillWorker {
                        &worker
                    } else {
                        &ingest
                    };
                    victim.lock().kill();
                    std::thread::sleep(Duration::from_millis(rng.random_range(100..1_500)));
                    victim.lock().start(START_LIMIT);
                }
                Fault::RestartPostgres => {
                    postgres.restart(Duration::from_millis(rng.random_range(200..2_000)));
                }
            }
        }
        done.store(true, Ordering::Release);
        faults
    })
}

/// What the poller saw go wrong: (ad, window) whose total or fraud count dropped, and a
/// committed frontier that went back.
#[derive(Debug, Default)]
struct Regressions {
    polls: u64,
    /// Window values actually read (an answer that failed is not an observation).
    observations: u64,
    /// Windows whose count dropped.
    drops: Vec<String>,
    /// Times `complete_through` went back.
    frontier_drops: Vec<String>,
}

/// Watches every ad's per-minute series until `stop`: the workload keeps every update
/// legitimate-monotone (earlier duplicates stay in their minute, verdicts only turn
/// billable into fraud), so a window's clicks + fraud + late and its fraud count may only
/// grow, and `complete_through` may only advance. A sink that wrote a replay's partial
/// state would show up as a drop.
fn poller(
    query: Shared,
    ads: Vec<u64>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Regressions> {
    std::thread::spawn(move || {
        let http = client();
        let base = query.lock().base.clone();
        let mut seen: BTreeMap<(u64, u64), Measures> = BTreeMap::new();
        let mut frontier = 0u64;
        let mut out = Regressions::default();
        // Every event time of the run lies within these hours.
        let from = common::now_ms() - 3 * 3_600_000;
        while !stop.load(Ordering::Acquire) {
            for ad in &ads {
                let Ok(r) = http
                    .get(format!(
                        "{base}/v1/ads/{ad}/clicks?granularity=1m&from={from}"
                    ))
                    .bearer_auth(ADMIN)
                    .timeout(Duration::from_secs(5))
                    .send()
                else {
                    continue;
                };
                if !r.status().is_success() {
                    continue; // Postgres restarting: no answer is not a wrong answer.
                }
                let Ok(body) = r.json::<Value>() else {
                    continue;
                };
                if let Some(c) = body["complete_through"].as_str().map(parse_rfc3339) {
                    if c < frontier {
                        out.frontier_drops
                            .push(format!("complete_through went back {frontier} -> {c}"));
                    }
                    frontier = frontier.max(c);
                }
                for p in body["points"].as_array().into_iter().flatten() {
                    let w = parse_rfc3339(p["window_start"].as_str().unwrap_or_default());
                    let now = measures(p);
                    let total = |m: &Measures| m.clicks + m.fraud_clicks + m.late_clicks;
                    if let Some(before) = seen.get(&(*ad, w))
                        && (total(&now) < total(before) || now.fraud_clicks < before.fraud_clicks)
                    {
                        out.drops
                            .push(format!("ad {ad} window {w}: {before:?} -> {now:?}"));
                    }
                    seen.insert((*ad, w), now);
                    out.observations += 1;
                }
            }
            out.polls += 1;
            std::thread::sleep(Duration::from_millis(100));
        }
        out
    })
}

/// Every click id in the clicks topic, read from offset 0 to the end.
fn clicks_in_kafka(cluster: &Cluster) -> BTreeSet<String> {
    let mut options = KafkaLogOptions::new(cluster.broker.bootstrap());
    options.click_partitions = 4;
    options.verdict_partitions = 2;
    let log = KafkaLog::open(options).expect("open the log to read it back");
    let ends: BTreeMap<_, u64> = log
        .end_offsets()
        .expect("end offsets")
        .into_iter()
        .filter(|(p, _)| p.topic == Topic::Clicks)
        .collect();
    let starts = all_partitions(&log)
        .into_iter()
        .filter(|p| p.topic == Topic::Clicks)
        .map(|p| (p, LogPosition::default()))
        .collect();
    let mut reader = log.reader(starts).expect("reader");
    let mut next: BTreeMap<_, u64> = ends.keys().map(|p| (*p, 0)).collect();
    let mut ids = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while next.iter().any(|(p, n)| *n < ends[p]) {
        assert!(
            Instant::now() < deadline,
            "could not read the topic to its end"
        );
        for batch in reader.poll(Duration::from_millis(200)).expect("poll") {
            for record in &batch.records {
                if !is_heartbeat(&record.payload) {
                    let click = ClickEvent::decode(&record.payload).expect("decodable click");
                    ids.insert(click.click_id);
                }
            }
            next.insert(batch.partition, batch.next.offset);
        }
    }
    ids
}

/// Clicks the store is missing and clicks it has twice, summed over every (ad, minute).
fn lost_and_duplicated(cluster: &Cluster, oracle: &Oracle) -> (i64, i64) {
    let expected = oracle.series("ad", 60_000);
    let total = |m: &Measures| m.clicks + m.fraud_clicks + m.late_clicks;
    let (mut lost, mut duplicated) = (0, 0);
    let (from, to) = span(oracle);
    for ad in oracle.ads.keys() {
        let body = cluster.get_json(&format!(
            "/v1/ads/{ad}/clicks?granularity=1m&from={from}&to={to}"
        ));
        let got: BTreeMap<u64, Measures> = body["points"]
            .as_array()
            .expect("points")
            .iter()
            .map(|p| {
                (
                    parse_rfc3339(p["window_start"].as_str().expect("start")),
                    measures(p),
                )
            })
            .collect();
        let windows: BTreeSet<u64> = got
            .keys()
            .copied()
            .chain(expected.range((*ad, 0)..(*ad + 1, 0)).map(|((_, w), _)| *w))
            .collect();
        for w in windows {
            let want = expected.get(&(*ad, w)).map(total).unwrap_or(0);
            let have = got.get(&w).map(total).unwrap_or(0);
            lost += (want - have).max(0);
            duplicated += (have - want).max(0);
        }
    }
    (lost, duplicated)
}

#[test]
fn chaos_kills_and_postgres_restarts_lose_and_double_nothing() {
    // CLICKAGG_CHAOS_SEED replays a printed run's fault schedule and workload.
    let seed = std::env::var("CLICKAGG_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5 + std::process::id() as u64 % 1000);
    let postgres = Arc::new(PrivatePostgres::start());
    let db = TestDb::create_on(postgres.port);
    let mut cluster = Cluster::start(TestTimes::default(), &db.url(), 2);
    let spec = WorkloadSpec {
        seed,
        impressions_per_phase: 10_000,
        batch_size: 250,
        redirects: 0,
        duplicates_stay_in_minute: true,
    };
    let chaos_done = Arc::new(AtomicBool::new(false));
    let poll_stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let faults = Mutex::new(None);
    let polled = Mutex::new(None);
    let (worker, ingest, query) = (
        Arc::clone(&cluster.worker),
        Arc::clone(&cluster.ingest),
        Arc::clone(&cluster.query),
    );
    let mut driver = Driver::new(&mut cluster, seed, None);
    let (oracle, last_ack) = common::workload::run_until(
        &mut driver,
        &spec,
        |_, oracle, _| {
            // The catalog exists now: start watching, then start the faults.
            let ads: Vec<u64> = oracle.ads.keys().copied().collect();
            *polled.lock() = Some(poller(query.clone(), ads, Arc::clone(&poll_stop)));
            *faults.lock() = Some(chaos(
                10,
                seed,
                worker.clone(),
                ingest.clone(),
                Arc::clone(&postgres),
                Arc::clone(&chaos_done),
            ));
        },
        || !chaos_done.load(Ordering::Acquire),
    );
    let retries = driver.retries;
    let faults = faults
        .lock()
        .take()
        .expect("chaos started")
        .join()
        .expect("chaos thread");
    cluster.heal();
    wait_counted(&cluster, &oracle, last_ack);
    poll_stop.store(true, Ordering::Release);
    let regressions = polled
        .lock()
        .take()
        .expect("poller started")
        .join()
        .expect("poller thread");

    let (lost, duplicated) = lost_and_duplicated(&cluster, &oracle);
    let count = |f: Fault| faults.iter().filter(|(x, _)| *x == f).count();
    println!("chaos run (seed {seed}, {:?}):", started.elapsed());
    println!(
        "| faults | worker SIGKILLs | ingest SIGKILLs | Postgres restarts | clicks sent | retried requests | lost | duplicated | store regressions seen |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {} | {} | {} | {} | {retries} | {lost} | {duplicated} | {} in {} window reads |",
        faults.len(),
        count(Fault::KillWorker),
        count(Fault::KillIngest),
        count(Fault::RestartPostgres),
        oracle.clicks.len(),
        regressions.drops.len(),
        regressions.observations
    );
    eprintln!("faults at: {faults:?}");
    assert_eq!(faults.len(), 10);
    assert_eq!((lost, duplicated), (0, 0), "clicks lost / double counted");
    assert!(
        regressions.frontier_drops.is_empty(),
        "the committed frontier went back: {:?}",
        regressions.frontier_drops
    );
    if !regressions.drops.is_empty() {
        let shown = &regressions.drops[..regressions.drops.len().min(10)];
        // The processes' logs go when the cluster does; keep them for the diagnosis.
        let kept = std::env::temp_dir().join(format!("clickagg-chaos-{seed}"));
        if std::fs::create_dir_all(&kept).is_ok() {
            for entry in std::fs::read_dir(cluster.dir.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                if entry.path().extension().is_some_and(|e| e == "log") {
                    let _ = std::fs::copy(entry.path(), kept.join(entry.file_name()));
                }
            }
            eprintln!("process logs kept in {}", kept.display());
        }
        panic!("the store went backwards (seed {seed}): {shown:?}");
    }
    assert!(
        regressions.polls > 10 && regressions.observations > 1_000,
        "the poller barely saw the store: {} polls, {} window values",
        regressions.polls,
        regressions.observations
    );

    // Acceptance 2, in full: every window of every scope, top ads and late clicks.
    let windows = assert_matches_oracle(&cluster, &oracle);
    eprintln!(
        "{windows} windows equal the oracle after {} faults",
        faults.len()
    );

    // Acceptance 3: every acknowledged click is in Kafka, ingest kills notwithstanding.
    let in_kafka = clicks_in_kafka(&cluster);
    let missing: Vec<&String> = oracle
        .clicks
        .iter()
        .filter_map(|c| c.click_id.as_ref())
        .filter(|id| !in_kafka.contains(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged clicks are not in the topic, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
}
