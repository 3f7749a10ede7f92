//! `KafkaLog` against a real Kafka-protocol broker (tansu with SQLite storage) in a
//! separate process: acknowledged appends are readable with their offsets and times,
//! survive `kill -9` of the broker, fail within the timeout during an outage, and readers
//! resume exactly from a committed position.
//!
//! Needs the tansu binary: `.ci/install-broker` installs it.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clickagg::log::kafka::{KafkaLog, KafkaLogOptions};
use clickagg::log::{
    AppendRecord, Appended, Log, LogError, LogPosition, LogRecord, all_partitions,
};
use clickagg::record::{PartitionId, Topic, is_heartbeat};
use common::broker::TestBroker;

fn options(broker: &TestBroker) -> KafkaLogOptions {
    KafkaLogOptions {
        click_partitions: 3,
        verdict_partitions: 2,
        append_timeout: Duration::from_secs(3),
        metadata_timeout: Duration::from_secs(5),
        linger: Duration::from_millis(1),
        fetch_wait_max: Duration::from_millis(20),
        client_id: "clickagg-test".into(),
        ..KafkaLogOptions::new(broker.bootstrap())
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn part(topic: Topic, partition: u32) -> PartitionId {
    PartitionId { topic, partition }
}

/// `n` records spread over every partition, with payloads naming their batch and index.
fn batch(log: &KafkaLog, tag: &str, n: usize) -> Vec<AppendRecord> {
    let parts = all_partitions(log);
    (0..n)
        .map(|i| AppendRecord {
            partition: parts[i % parts.len()],
            key: None,
            record_time_ms: None,
            payload: format!("{tag}-{i}").into_bytes(),
        })
        .collect()
}

/// What the log acknowledged: per partition, offset -> (record time, payload).
type Acked = BTreeMap<PartitionId, BTreeMap<u64, (u64, Vec<u8>)>>;

fn remember(acked: &mut Acked, records: &[AppendRecord], done: &[Appended]) {
    assert_eq!(records.len(), done.len());
    for (r, a) in records.iter().zip(done) {
        assert_eq!(r.partition, a.partition, "results come in input order");
        let old = acked
            .entry(a.partition)
            .or_default()
            .insert(a.offset, (a.record_time_ms, r.payload.clone()));
        assert!(
            old.is_none(),
            "offset {} of {} acknowledged twice",
            a.offset,
            a.partition
        );
    }
}

/// Reads from `start` until every partition reached its end offset; returns the records.
fn read_to_end(
    log: &KafkaLog,
    start: Vec<(PartitionId, LogPosition)>,
) -> (
    BTreeMap<PartitionId, Vec<LogRecord>>,
    BTreeMap<PartitionId, LogPosition>,
) {
    let ends: BTreeMap<PartitionId, u64> = log
        .end_offsets()
        .expect("end offsets")
        .into_iter()
        .collect();
    let mut next: BTreeMap<PartitionId, LogPosition> = start.iter().copied().collect();
    let mut reader = log.reader(start).expect("reader");
    let mut got: BTreeMap<PartitionId, Vec<LogRecord>> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while next.iter().any(|(p, pos)| pos.offset < ends[p]) {
        assert!(
            Instant::now() < deadline,
            "read stalled at {next:?}, ends {ends:?}"
        );
        for b in reader.poll(Duration::from_millis(200)).expect("poll") {
            next.insert(b.partition, b.next);
            got.entry(b.partition).or_default().extend(b.records);
        }
    }
    (got, next)
}

fn from_start(log: &KafkaLog) -> Vec<(PartitionId, LogPosition)> {
    all_partitions(log)
        .into_iter()
        .map(|p| (p, LogPosition::default()))
        .collect()
}

/// Every acknowledged record is in `got` at its offset with its time and payload.
fn assert_all_acked_readable(acked: &Acked, got: &BTreeMap<PartitionId, Vec<LogRecord>>) {
    for (p, records) in acked {
        let read: BTreeMap<u64, &LogRecord> = got
            .get(p)
            .map(|rs| rs.iter().map(|r| (r.offset, r)).collect())
            .unwrap_or_default();
        for (offset, (time, payload)) in records {
            let r = read
                .get(offset)
                .unwrap_or_else(|| panic!("acknowledged {p}@{offset} is not in the log"));
            assert_eq!(&r.payload, payload, "{p}@{offset}");
            assert_eq!(r.record_time_ms, *time, "{p}@{offset}");
        }
    }
    for rs in got.values() {
        assert!(
            rs.windows(2).all(|w| w[0].offset < w[1].offset),
            "offset order"
        );
    }
}

#[test]
fn acknowledged_appends_are_readable_with_their_offsets_and_times() {
    let broker = TestBroker::start();
    let log = KafkaLog::open(options(&broker)).expect("open creates the topics");
    let rt = runtime();
    let mut acked = Acked::new();
    for round in 0..20 {
        let records = batch(&log, &format!("r{round}"), 37);
        let done = rt.block_on(log.append(records.clone())).expect("append");
        remember(&mut acked, &records, &done);
    }
    // Offsets are dense from 0 in every partition.
    for (p, records) in &acked {
        let offsets: Vec<u64> = records.keys().copied().collect();
        assert_eq!(
            offsets,
            (0..offsets.len() as u64).collect::<Vec<_>>(),
            "{p}"
        );
    }
    let ends: BTreeMap<PartitionId, u64> = log.end_offsets().expect("ends").into_iter().collect();
    for p in all_partitions(&log) {
        assert_eq!(ends[&p], acked[&p].len() as u64, "end offset of {p}");
    }
    let (got, next) = read_to_end(&log, from_start(&log));
    assert_all_acked_readable(&acked, &got);
    for p in all_partitions(&log) {
        assert_eq!(
            got[&p].len(),
            acked[&p].len(),
            "nothing more than acknowledged in {p}"
        );
        assert_eq!(next[&p].offset, ends[&p]);
    }
    log.check().expect("check");

    // The topics exist now with 3 click partitions; another count is refused.
    let err = KafkaLog::open(KafkaLogOptions {
        click_partitions: 4,
        ..options(&broker)
    })
    .err()
    .expect("a different partition count is refused");
    assert!(matches!(err, LogError::Inconsistent(_)), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("clicks") && text.contains('3') && text.contains('4'),
        "{text}"
    );
    // The same counts open fine, and a prefix gives a separate set of topics.
    KafkaLog::open(options(&broker)).expect("reopen");
    let other = KafkaLog::open(KafkaLogOptions {
        topic_prefix: "other.".into(),
        click_partitions: 4,
        ..options(&broker)
    })
    .expect("prefixed topics");
    assert_eq!(other.topic_name(Topic::Clicks), "other.clicks");
    assert!(
        other
            .end_offsets()
            .expect("ends")
            .iter()
            .all(|(_, end)| *end == 0)
    );
}

#[test]
fn acknowledged_records_survive_a_broker_kill_9() {
    let mut broker = TestBroker::start();
    let log = KafkaLog::open(options(&broker)).expect("open");
    let rt = runtime();
    let mut acked = Acked::new();
    for round in 0..10 {
        let records = batch(&log, &format!("before-{round}"), 50);
        let done = rt.block_on(log.append(records.clone())).expect("append");
        remember(&mut acked, &records, &done);
    }
    broker.kill9();
    broker.restart();

    // A fresh client (a restarted worker) reads every acknowledged record.
    let reader_log = KafkaLog::open(options(&broker)).expect("reopen after kill -9");
    let (got, _) = read_to_end(&reader_log, from_start(&reader_log));
    assert_all_acked_readable(&acked, &got);

    // The old producer goes on after the restart, after the surviving offsets.
    let records = batch(&log, "after", 20);
    let deadline = Instant::now() + Duration::from_secs(30);
    let done = loop {
        match rt.block_on(log.append(records.clone())) {
            Ok(done) => break done,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "no append after restart: {e}\n{}",
                    broker.log()
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    for a in &done {
        let before = acked.get(&a.partition).map_or(0, |m| m.len() as u64);
        assert!(
            a.offset >= before,
            "{}@{} reuses an offset",
            a.partition,
            a.offset
        );
    }
    remember(&mut acked, &records, &done);
    let (got, _) = read_to_end(&reader_log, from_start(&reader_log));
    assert_all_acked_readable(&acked, &got);
}

#[test]
fn appends_during_an_outage_fail_in_time_and_succeed_after_restart() {
    let mut broker = TestBroker::start();
    let opts = KafkaLogOptions {
        append_timeout: Duration::from_secs(1),
        metadata_timeout: Duration::from_secs(1),
        ..options(&broker)
    };
    let log = KafkaLog::open(opts.clone()).expect("open");
    let rt = runtime();
    let mut acked = Acked::new();
    let records = batch(&log, "up", 30);
    let done = rt.block_on(log.append(records.clone())).expect("append");
    remember(&mut acked, &records, &done);

    broker.kill9();
    for round in 0..3 {
        let began = Instant::now();
        let result = rt.block_on(log.append(batch(&log, &format!("down-{round}"), 10)));
        let took = began.elapsed();
        assert!(
            matches!(result, Err(LogError::Timeout(_) | LogError::Unavailable(_))),
            "append during the outage: {result:?}"
        );
        assert!(
            took < Duration::from_millis(2_000),
            "append took {took:?}, timeout is 1s"
        );
    }
    let began = Instant::now();
    assert!(log.check().is_err(), "check reports the outage");
    assert!(began.elapsed() < Duration::from_secs(3));

    broker.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    let records = batch(&log, "again", 30);
    let done = loop {
        match rt.block_on(log.append(records.clone())) {
            Ok(done) => break done,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "appends never recovered: {e}\n{}",
                    broker.log()
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    remember(&mut acked, &records, &done);
    log.check().expect("check after restart");
    let (got, _) = read_to_end(&log, from_start(&log));
    assert_all_acked_readable(&acked, &got);
}

#[test]
fn a_reader_resumes_exactly_from_a_committed_position() {
    let broker = TestBroker::start();
    let log = KafkaLog::open(KafkaLogOptions {
        max_poll_records: 25,
        ..options(&broker)
    })
    .expect("open");
    let rt = runtime();
    let p = part(Topic::Clicks, 1);
    let mut acked = Acked::new();
    for round in 0..8 {
        let records: Vec<AppendRecord> = (0..20)
            .map(|i| AppendRecord {
                partition: p,
                key: None,
                record_time_ms: None,
                payload: format!("{round}-{i}").into_bytes(),
            })
            .collect();
        let done = rt.block_on(log.append(records.clone())).expect("append");
        remember(&mut acked, &records, &done);
    }
    // Read part of the partition, then "commit" the position the source would store.
    let mut reader = log
        .reader(vec![(p, LogPosition::default())])
        .expect("reader");
    let mut seen = Vec::new();
    let mut committed = LogPosition::default();
    while seen.len() < 60 {
        for b in reader.poll(Duration::from_millis(200)).expect("poll") {
            assert!(b.records.len() <= 25, "bounded batches");
            committed = b.next;
            seen.extend(b.records);
        }
    }
    drop(reader);
    assert_eq!(committed.offset, seen.len() as u64);
    assert_eq!(
        committed.time_floor_ms,
        seen.last().expect("seen").record_time_ms
    );

    let (got, next) = read_to_end(&log, vec![(p, committed)]);
    let rest = &got[&p];
    assert_eq!(rest[0].offset, committed.offset, "resumes at the position");
    assert_eq!(
        seen.len() + rest.len(),
        acked[&p].len(),
        "nothing skipped, nothing repeated"
    );
    let mut all = seen;
    all.extend(rest.iter().cloned());
    assert_all_acked_readable(&acked, &BTreeMap::from([(p, all)]));
    assert_eq!(next[&p].offset, 160);
}

#[test]
fn heartbeats_advance_every_click_and_verdict_partition() {
    let broker = TestBroker::start();
    let log = KafkaLog::open(options(&broker)).expect("open");
    let rt = runtime();
    let beats = {
        let _guard = rt.enter();
        log.spawn_heartbeats(Duration::from_millis(50))
            .expect("heartbeats")
    };
    // The catalog gets none (it is replayed from offset 0 and would pile them up).
    let start: Vec<_> = from_start(&log)
        .into_iter()
        .filter(|(p, _)| p.topic != Topic::Ads)
        .collect();
    let parts = start.len();
    let mut reader = log.reader(start).expect("reader");
    let mut got: BTreeMap<PartitionId, Vec<LogRecord>> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < parts || got.values().any(|rs| rs.len() < 3) {
        assert!(
            Instant::now() < deadline,
            "heartbeats seen: {:?}",
            got.keys()
        );
        for b in reader.poll(Duration::from_millis(200)).expect("poll") {
            got.entry(b.partition).or_default().extend(b.records);
        }
    }
    for (p, rs) in &got {
        assert!(rs.iter().all(|r| is_heartbeat(&r.payload)), "{p}");
        assert!(
            rs.last().expect("some").record_time_ms > rs[0].record_time_ms,
            "{p}: heartbeat times advance"
        );
    }
    rt.block_on(beats.stop());
    let ads_end = log
        .end_offsets()
        .expect("ends")
        .into_iter()
        .find(|(p, _)| p.topic == Topic::Ads)
        .map(|(_, end)| end);
    assert_eq!(ads_end, Some(0), "the catalog gets no heartbeats");
}

/// Append and read rates on tansu; run with
/// `cargo test --release --test kafka_log -- --ignored --nocapture throughput`.
#[test]
#[ignore]
fn throughput() {
    let broker = TestBroker::start();
    let log = KafkaLog::open(KafkaLogOptions {
        linger: Duration::from_millis(5),
        append_timeout: Duration::from_secs(30),
        ..options(&broker)
    })
    .expect("open");
    let rt = runtime();
    let clicks: Vec<PartitionId> = (0..3).map(|i| part(Topic::Clicks, i)).collect();
    let total = 200_000usize;
    let per_append = 1_000usize;
    let payload = vec![7u8; 100];
    let began = Instant::now();
    rt.block_on(async {
        let mut pending = futures::stream::FuturesUnordered::new();
        for a in 0..total / per_append {
            let records = (0..per_append)
                .map(|i| AppendRecord {
                    partition: clicks[(a + i) % clicks.len()],
                    key: None,
                    record_time_ms: None,
                    payload: payload.clone(),
                })
                .collect();
            pending.push(log.append(records));
            if pending.len() >= 32 {
                use futures::StreamExt;
                pending.next().await.expect("one").expect("append");
            }
        }
        use futures::StreamExt;
        while let Some(r) = pending.next().await {
            r.expect("append");
        }
    });
    let append_s = began.elapsed().as_secs_f64();
    let began = Instant::now();
    let start = clicks
        .iter()
        .map(|p| (*p, LogPosition::default()))
        .collect();
    let mut reader = log.reader(start).expect("reader");
    let mut n = 0usize;
    while n < total {
        for b in reader.poll(Duration::from_millis(500)).expect("poll") {
            n += b.records.len();
        }
        assert!(began.elapsed() < Duration::from_secs(120), "read {n}");
    }
    let read_s = began.elapsed().as_secs_f64();
    println!(
        "tansu/sqlite, 100-byte records, 3 partitions: append {total} in {append_s:.2}s = {:.0}/s; \
         read {n} in {read_s:.2}s = {:.0}/s",
        total as f64 / append_s,
        n as f64 / read_s
    );
}
