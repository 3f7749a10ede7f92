//! The worker tier as a timely cluster of several `clickagg worker` processes on
//! loopback (issue "Worker processes across machines"), against a real tansu broker and
//! Postgres:
//! - acceptance 1: two processes x two workers store exactly what one process x one
//!   worker stores for the same log, and that equals the oracle;
//! - acceptance 2: SIGKILL one of the two worker processes at a random moment, three
//!   times; the other exits by itself within 10 s saying why; restarting both ends with
//!   every count equal to the oracle.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::cluster::{Cluster, WorkerSet};
use common::compare::{assert_matches_oracle, wait_counted};
use common::postgres::TestDb;
use common::workload::{Driver, WorkloadSpec};
use common::{Target, TestTimes};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// How long a surviving worker process may take to notice its peer is gone.
const EXIT_LIMIT: Duration = Duration::from_secs(10);

/// Every view table (and rollup table) of the store, each as its rows in order.
fn view_tables(db: &TestDb) -> Vec<(String, String)> {
    let mut tables = Vec::new();
    for view in clickagg::views::enabled(&[]) {
        tables.push(view.table());
        if view.rollup.is_some() {
            tables.push(view.rollup_table());
        }
    }
    tables
        .into_iter()
        .map(|t| {
            let rows = db.query(&format!("SELECT r::text FROM {t} r ORDER BY 1"));
            (t, rows)
        })
        .collect()
}

/// The store's committed frontier.
fn committed_frontier(db: &TestDb) -> u64 {
    db.query("SELECT COALESCE(max(upper), 0) FROM progress")
        .trim()
        .parse()
        .expect("a frontier")
}

#[test]
fn two_processes_of_two_workers_store_what_one_worker_stores() {
    let seed = 31 + std::process::id() as u64 % 1000;
    let (one, two) = (TestDb::create(), TestDb::create());
    let mut cluster = Cluster::start_with(TestTimes::default(), &one.url(), 1, 1);
    let spec = WorkloadSpec {
        seed,
        impressions_per_phase: 8_000,
        batch_size: 400,
        redirects: 50,
        duplicates_stay_in_minute: false,
    };
    let mut driver = Driver::new(&mut cluster, spec.seed, None);
    let (oracle, last_ack) = common::workload::run(&mut driver, &spec, |_, _, _| {});
    wait_counted(&cluster, &oracle, last_ack);
    let windows = assert_matches_oracle(&cluster, &oracle);

    // Nothing but heartbeats may reach the log from here on; then the 1 x 1 result is
    // fixed, and the 2 x 2 cluster must arrive at exactly the same rows.
    cluster.ingest.lock().terminate(Duration::from_secs(20));
    cluster.worker.lock().terminate(Duration::from_secs(20));
    let frontier = committed_frontier(&one);
    // A stopped worker must not have committed beyond the clicks it read: a dataflow
    // dropped on shutdown is no frontier.
    assert!(
        frontier <= common::now_ms() + 5_000,
        "SIGTERM committed a frontier {} s in the future",
        (frontier - common::now_ms()) / 1000
    );
    let expected = view_tables(&one);

    let started = Instant::now();
    let pair: WorkerSet = cluster.other_worker_set("pair", &two.url(), 2, 2);
    pair.start_all();
    let deadline = Instant::now() + Duration::from_secs(180);
    while committed_frontier(&two) < frontier {
        assert!(
            Instant::now() < deadline,
            "the 2 x 2 cluster did not reach frontier {frontier}\n{}",
            pair.log_tail()
        );
        assert!(
            !pair.any_down(),
            "a worker process died\n{}",
            pair.log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let caught_up = started.elapsed();
    let got = view_tables(&two);
    pair.kill_all();

    let rows: usize = expected.iter().map(|(_, r)| r.lines().count()).sum();
    assert!(
        rows >= windows && windows > 100,
        "too few rows to compare: {rows} rows, {windows} windows"
    );
    for ((table, want), (_, have)) in expected.iter().zip(&got) {
        if want != have {
            let (w, h): (Vec<&str>, Vec<&str>) = (want.lines().collect(), have.lines().collect());
            let missing: Vec<&&str> = w.iter().filter(|r| !h.contains(r)).take(5).collect();
            let extra: Vec<&&str> = h.iter().filter(|r| !w.contains(r)).take(5).collect();
            panic!(
                "table {table} differs between 1 x 1 and 2 x 2 ({} vs {} rows); \
                 only in 1 x 1: {missing:?}; only in 2 x 2: {extra:?}",
                w.len(),
                h.len()
            );
        }
    }
    println!(
        "seed {seed}: {} clicks; 1 x 1 equals the oracle in {windows} windows; 2 x 2 \
         reproduced all {rows} rows of {} tables exactly (caught up in {caught_up:?})",
        oracle.clicks.len(),
        expected.len()
    );
}

/// Kills one random worker process of the pair `kills` times; each time checks the
/// other one exits by itself within [`EXIT_LIMIT`] saying why, then restarts both.
/// Returns how long each survivor took to exit.
fn kill_peers(
    kills: usize,
    seed: u64,
    workers: Arc<WorkerSet>,
    done: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<Duration>> {
    std::thread::spawn(move || {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut exits = Vec::new();
        for kill in 0..kills {
            std::thread::sleep(Duration::from_millis(rng.random_range(1_000..5_000)));
            let victim = rng.random_range(0..workers.procs.len());
            let survivor = (victim + 1) % workers.procs.len();
            workers.procs[victim].lock().kill();
            let killed = Instant::now();
            let mut other = workers.procs[survivor].lock();
            let status = other.wait_exit(EXIT_LIMIT + Duration::from_secs(5));
            let took = killed.elapsed();
            let status = status.unwrap_or_else(|| {
                panic!(
                    "kill {kill}: worker process {survivor} still runs {took:?} after process \
                     {victim} was killed\n{}",
                    other.log_tail()
                )
            });
            assert!(
                took <= EXIT_LIMIT,
                "kill {kill}: process {survivor} took {took:?} to exit"
            );
            assert!(!status.success(), "the survivor must exit with an error");
            let log = other.log_tail();
            assert!(
                log.contains("peer worker process") && log.contains("Restart every process"),
                "the survivor must say why it exits:\n{log}"
            );
            drop(other);
            exits.push(took);
            workers.start_all();
        }
        done.store(true, Ordering::Release);
        exits
    })
}

#[test]
fn killing_one_worker_process_stops_the_other_and_a_restart_is_exact() {
    let seed = 41 + std::process::id() as u64 % 1000;
    let db = TestDb::create();
    let mut cluster = Cluster::start_with(TestTimes::default(), &db.url(), 2, 2);
    let workers = Arc::new(WorkerSet {
        procs: cluster.workers.procs.clone(),
    });
    let spec = WorkloadSpec {
        seed,
        impressions_per_phase: 8_000,
        batch_size: 250,
        redirects: 0,
        duplicates_stay_in_minute: true,
    };
    let done = Arc::new(AtomicBool::new(false));
    let killer = Mutex::new(None);
    let started = Instant::now();
    let mut driver = Driver::new(&mut cluster, seed, None);
    let (oracle, last_ack) = common::workload::run_until(
        &mut driver,
        &spec,
        |_, _, _| {
            *killer.lock() = Some(kill_peers(3, seed, Arc::clone(&workers), Arc::clone(&done)));
        },
        || !done.load(Ordering::Acquire),
    );
    let exits = killer
        .lock()
        .take()
        .expect("killer started")
        .join()
        .expect("every survivor exited in time, saying why");
    cluster.heal();
    wait_counted(&cluster, &oracle, last_ack);
    let windows = assert_matches_oracle(&cluster, &oracle);
    assert_eq!(exits.len(), 3);
    println!(
        "seed {seed}: 3 SIGKILLs of one of 2 worker processes; the other exited after \
         {exits:?}; {} clicks in {:?}; after restarts {windows} windows equal the oracle",
        oracle.clicks.len(),
        started.elapsed()
    );
    assert!(cluster.victims().len() >= 3, "ingest and both workers run");
}
