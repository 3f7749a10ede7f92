//! Production mode, acceptance 1 and 5: the randomised workload through `clickagg
//! ingest` -> Kafka (a real tansu broker) -> `clickagg worker` (2 timely workers) ->
//! Postgres -> `clickagg query`, all separate OS processes, equals the oracle exactly;
//! and a second worker set started against the same store is refused while the first
//! keeps going.

mod common;

use std::time::{Duration, Instant};

use common::TestTimes;
use common::cluster::Cluster;
use common::compare::{assert_matches_oracle, wait_counted};
use common::postgres::TestDb;
use common::workload::{Driver, WorkloadSpec};

#[test]
fn kafka_to_postgres_equals_oracle_and_a_second_worker_set_is_refused() {
    let db = TestDb::create();
    let mut cluster = Cluster::start(TestTimes::default(), &db.url(), 2);
    let spec = WorkloadSpec {
        seed: 23,
        impressions_per_phase: 12_000,
        batch_size: 500,
        redirects: 100,
        duplicates_stay_in_minute: false,
    };
    let started = Instant::now();
    let mut intruder = cluster.process_named("worker", "second-worker");
    let mut driver = Driver::new(&mut cluster, spec.seed, None);
    let (oracle, last_ack) = common::workload::run(&mut driver, &spec, |d, oracle, last_ack| {
        // Phase one counted and exact before verdicts and price changes arrive.
        wait_counted(d.server, oracle, last_ack);
        let windows = assert_matches_oracle(d.server, oracle);
        assert!(windows > 50, "phase one compared only {windows} windows");

        // Acceptance 5: a second worker set on the same store is refused, clearly.
        intruder.start_detached();
        let status = intruder
            .wait_exit(Duration::from_secs(60))
            .expect("the second worker set must exit by itself");
        assert!(
            !status.success(),
            "the second worker set exited with success"
        );
        let log = intruder.log_tail();
        assert!(
            log.contains("fenced") && log.contains("writer"),
            "the refusal must say why: {log}"
        );
        assert!(
            d.server.victims().len() == 2,
            "the first worker set and ingest keep running"
        );
    });
    assert_eq!(
        driver.retries, 0,
        "no request should need a retry without faults"
    );
    wait_counted(&cluster, &oracle, last_ack);
    let windows = assert_matches_oracle(&cluster, &oracle);
    eprintln!(
        "{} clicks for {} impressions through ingest -> Kafka -> worker -> Postgres -> query \
         in {:?}: {:?}; {windows} windows equal the oracle",
        oracle.clicks.len(),
        oracle.counted().len(),
        started.elapsed(),
        oracle.class_counts()
    );
    assert!(
        cluster.worker.lock().alive(),
        "the first worker set kept going"
    );
}
