//! The production log: Kafka topics `clicks`, `fraud_verdicts` and `ads`, through
//! `rdkafka` (librdkafka).
//!
//! Contract, the same as the embedded log's (`super::embedded`):
//!
//! - **Appends are acknowledged only when durable.** The producer is idempotent with
//!   `acks=all`; an append resolves only after the delivery report of every one of its
//!   records, and fails as a whole if any record fails. A record that was acknowledged is in
//!   the topic; a failed append may still have written some of its records, which is
//!   harmless because the dataflow deduplicates by impression.
//! - **Bounded, never silent.** Records waiting for their delivery report are counted
//!   against a budget (records and bytes). An append that does not fit is refused whole
//!   and at once with `Overloaded`, before anything of it is queued; no report within the
//!   append timeout gives `Timeout`; a broker error gives `Unavailable`.
//! - **Record time** is the message timestamp (CreateTime), set to the ingest clock when
//!   the record is produced, or to the record's own time for a backfill
//!   (`AppendRecord::record_time_ms`, `clickagg import`). Several ingest processes with
//!   their own clocks write to one partition, so the reader makes record times monotone
//!   with a running max, exactly as the source does, starting from the position's floor:
//!   a replay assigns the same times.
//! - **Idle partitions** advance through [`HEARTBEAT`] records (see
//!   [`KafkaLog::spawn_heartbeats`]), never through a reader-side clock, because only what
//!   is in the log is replayed identically.
//! - **Progress lives in the store**, not in consumer-group offsets: readers assign their
//!   partitions manually at explicit offsets and never commit. A position whose records
//!   are gone (retention, a recreated topic) stops the reader with `Inconsistent`; it
//!   never skips ahead.
//!
//! "Durable" means what `acks=all` means: on a real cluster, written to
//! `min.insync.replicas` brokers (set `replication_factor` 3 and `min_insync_replicas` 2),
//! not fsynced. The tests use tansu with SQLite storage, which survives `kill -9`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{Client, ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio::sync::oneshot;

use super::{
    AppendFuture, AppendRecord, Appended, Log, LogError, LogPosition, LogReader, LogRecord,
    PartitionBatch,
};
use crate::record::{HEARTBEAT, PartitionId, Topic};
use crate::time::{Millis, now_ms};

/// How to reach the Kafka cluster and how to lay out and use its topics.
#[derive(Clone)]
pub struct KafkaLogOptions {
    /// Bootstrap servers, `host:port[,host:port...]`.
    pub brokers: String,
    /// Prepended to every topic name (`<prefix>clicks`), to share a cluster; usually empty.
    pub topic_prefix: String,
    /// Partitions of `clicks`.
    pub click_partitions: u32,
    /// Partitions of `fraud_verdicts`.
    pub verdict_partitions: u32,
    /// Replication factor of topics this log creates; `None` = the broker's default.
    pub replication_factor: Option<u16>,
    /// `min.insync.replicas` of topics this log creates; `None` = the broker's default.
    pub min_insync_replicas: Option<u16>,
    /// `retention.ms` of `clicks` and `fraud_verdicts` when this log creates them; `None`
    /// = the broker's default. It must cover the horizon plus the longest outage, since
    /// recovery replays from one horizon back. `ads` is always created with infinite
    /// retention, because the catalog is replayed from offset 0.
    pub retention: Option<Duration>,
    /// How long an append may wait for its delivery reports.
    pub append_timeout: Duration,
    /// How long librdkafka keeps trying to deliver a record (`message.timeout.ms`), at
    /// least `append_timeout`. A record whose append timed out may still be delivered
    /// until then, and holds its share of the in-flight budget meanwhile. Keep it long:
    /// when it expires, the idempotent producer bumps its epoch on its own, which a real
    /// Kafka accepts but tansu 0.6 does not (its storage panics and stops serving
    /// produce requests until restarted).
    pub delivery_timeout: Duration,
    /// Records produced but not yet acknowledged, at most.
    pub max_in_flight_records: usize,
    /// Payload bytes produced but not yet acknowledged, at most.
    pub max_in_flight_bytes: usize,
    /// How long the producer waits to fill a batch (`linger.ms`).
    pub linger: Duration,
    /// `client.id`; readers use `<client_id>-reader` as their (never joined) group id.
    pub client_id: String,
    /// Time limit of metadata requests: opening, `check` and `end_offsets`.
    pub metadata_timeout: Duration,
    /// Records one reader poll returns at most, over all its partitions.
    pub max_poll_records: usize,
    /// How long the broker may hold a fetch when there is no data (`fetch.wait.max.ms`).
    pub fetch_wait_max: Duration,
    /// Extra librdkafka properties (security, tuning), applied over the defaults; they
    /// cannot weaken the guarantees above (idempotence, acks, offset handling).
    pub properties: Vec<(String, String)>,
}

impl KafkaLogOptions {
    /// Options with defaults for everything but the brokers.
    pub fn new(brokers: impl Into<String>) -> KafkaLogOptions {
        KafkaLogOptions {
            brokers: brokers.into(),
            topic_prefix: String::new(),
            click_partitions: 8,
            verdict_partitions: 2,
            replication_factor: None,
            min_insync_replicas: None,
            retention: None,
            append_timeout: Duration::from_secs(5),
            // Kafka's own default `delivery.timeout.ms`.
            delivery_timeout: Duration::from_secs(120),
            max_in_flight_records: 200_000,
            max_in_flight_bytes: 256 << 20,
            linger: Duration::from_millis(5),
            client_id: "clickagg".into(),
            metadata_timeout: Duration::from_secs(5),
            max_poll_records: 65_536,
            fetch_wait_max: Duration::from_millis(100),
            properties: Vec::new(),
        }
    }

    /// Whether a librdkafka property holds a credential, whose value must not be logged.
    fn is_secret(key: &str) -> bool {
        ["password", "secret", "token", "key.pem", "jaas"]
            .iter()
            .any(|s| key.contains(s))
    }

    fn validate(&self) -> Result<(), LogError> {
        let bad = |what: &str| Err(LogError::Inconsistent(format!("kafka log options: {what}")));
        if self.brokers.trim().is_empty() {
            return bad("no brokers given");
        }
        if self.click_partitions == 0 || self.verdict_partitions == 0 {
            return bad("partition counts must be at least 1");
        }
        if self.max_in_flight_records == 0 || self.max_in_flight_bytes == 0 {
            return bad("the in-flight bounds must be positive");
        }
        if self.append_timeout <= self.linger || self.append_timeout < Duration::from_millis(10) {
            return bad("the append timeout must exceed linger and be at least 10ms");
        }
        if self.delivery_timeout < self.append_timeout {
            return bad("the delivery timeout must be at least the append timeout");
        }
        if self.max_poll_records == 0 {
            return bad("max_poll_records must be positive");
        }
        Ok(())
    }
}

// By hand, so that credentials among `properties` never reach a log line.
impl std::fmt::Debug for KafkaLogOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let properties: Vec<(&str, &str)> = self
            .properties
            .iter()
            .map(|(k, v)| {
                let shown = if Self::is_secret(k) { "<redacted>" } else { v };
                (k.as_str(), shown)
            })
            .collect();
        f.debug_struct("KafkaLogOptions")
            .field("brokers", &self.brokers)
            .field("topic_prefix", &self.topic_prefix)
            .field("click_partitions", &self.click_partitions)
            .field("verdict_partitions", &self.verdict_partitions)
            .field("replication_factor", &self.replication_factor)
            .field("min_insync_replicas", &self.min_insync_replicas)
            .field("retention", &self.retention)
            .field("append_timeout", &self.append_timeout)
            .field("delivery_timeout", &self.delivery_timeout)
            .field("max_in_flight_records", &self.max_in_flight_records)
            .field("max_in_flight_bytes", &self.max_in_flight_bytes)
            .field("linger", &self.linger)
            .field("client_id", &self.client_id)
            .field("metadata_timeout", &self.metadata_timeout)
            .field("max_poll_records", &self.max_poll_records)
            .field("fetch_wait_max", &self.fetch_wait_max)
            .field("properties", &properties)
            .finish()
    }
}

/// Librdkafka properties that carry this log's guarantees; `properties` cannot override them.
const PRODUCER_GUARANTEES: [(&str, &str); 3] = [
    ("enable.idempotence", "true"),
    ("acks", "all"),
    ("allow.auto.create.topics", "false"),
];
const CONSUMER_GUARANTEES: [(&str, &str); 5] = [
    ("enable.auto.commit", "false"),
    ("enable.auto.offset.store", "false"),
    // A position whose records are gone (retention) must stop the reader, not skip.
    ("auto.offset.reset", "error"),
    ("isolation.level", "read_uncommitted"),
    ("allow.auto.create.topics", "false"),
];

/// The Kafka log. Cheap to clone; clones share one producer.
#[derive(Clone)]
pub struct KafkaLog {
    inner: Arc<Inner>,
}

struct Inner {
    options: KafkaLogOptions,
    /// Full topic names, indexed by `Topic::code`.
    names: [String; 3],
    partitions: [u32; 3],
    producer: RwLock<Arc<KafkaProducer>>,
    budget: Arc<Budget>,
    /// Running max of the record times this process stamped.
    last_time: AtomicU64,
}

type KafkaProducer = ThreadedProducer<ProducerCtx>;

impl KafkaLog {
    /// Connects, creates missing topics and checks the partition counts of existing ones.
    ///
    /// Blocks for up to a few metadata timeouts; call it at startup.
    pub fn open(options: KafkaLogOptions) -> Result<KafkaLog, LogError> {
        options.validate()?;
        let names = Topic::ALL.map(|t| format!("{}{}", options.topic_prefix, t.name()));
        let partitions = [options.click_partitions, options.verdict_partitions, 1];
        let budget = Arc::new(Budget {
            records: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            max_records: options.max_in_flight_records,
            max_bytes: options.max_in_flight_bytes,
        });
        let producer = build_producer(&options, &budget)?;
        ensure_topics(&options, producer.client(), &names, partitions)?;
        tracing::info!(
            brokers = %options.brokers,
            clicks = %names[0],
            click_partitions = partitions[0],
            verdicts = %names[1],
            verdict_partitions = partitions[1],
            ads = %names[2],
            "kafka log open"
        );
        Ok(KafkaLog {
            inner: Arc::new(Inner {
                options,
                names,
                partitions,
                producer: RwLock::new(Arc::new(producer)),
                budget,
                last_time: AtomicU64::new(0),
            }),
        })
    }

    /// The Kafka topic that carries `topic` (with the prefix).
    pub fn topic_name(&self, topic: Topic) -> &str {
        &self.inner.names[topic.code() as usize]
    }

    /// Appends a [`HEARTBEAT`] to every partition of `clicks` and `fraud_verdicts` every
    /// `interval`, on the current tokio runtime, until the returned handle is stopped or
    /// dropped.
    ///
    /// A heartbeat carries only its record time, so the source advances an idle partition
    /// with the ingest clock, and a replay sees the same heartbeats. `ads` gets none: it is
    /// replayed from offset 0 at every start and would accumulate them forever; the source
    /// instead lets the catalog follow its own clock once past the committed catalog
    /// offset (see `dataflow::source`). Ingest and worker processes run this at the tick.
    /// A heartbeat that fails (overload, outage) is skipped, never queued up.
    pub fn spawn_heartbeats(&self, interval: Duration) -> Result<Heartbeats, LogError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| LogError::Unavailable(format!("heartbeats need a tokio runtime: {e}")))?;
        let interval = interval.max(Duration::from_millis(1));
        let log = self.clone();
        let (stop, mut stopped) = oneshot::channel::<()>();
        let task = runtime.spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut failing = false;
            loop {
                let beat = async {
                    ticker.tick().await;
                    log.append(log.heartbeat_records()).await
                };
                tokio::select! {
                    _ = &mut stopped => break,
                    result = beat => match result {
                        Ok(_) if failing => {
                            failing = false;
                            tracing::info!("kafka heartbeats flowing again");
                        }
                        Ok(_) => {}
                        // Log a failure once per outage, not once per tick.
                        Err(e) if !failing => {
                            failing = true;
                            tracing::warn!(error = %e, "kafka heartbeat failed; idle partitions stall until it succeeds");
                        }
                        Err(e) => tracing::debug!(error = %e, "kafka heartbeat failed"),
                    },
                }
            }
        });
        Ok(Heartbeats {
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// One heartbeat record for every partition of `clicks` and `fraud_verdicts`.
    fn heartbeat_records(&self) -> Vec<AppendRecord> {
        [Topic::Clicks, Topic::FraudVerdicts]
            .into_iter()
            .flat_map(|topic| {
                (0..self.partitions(topic)).map(move |partition| AppendRecord {
                    partition: PartitionId { topic, partition },
                    key: None,
                    record_time_ms: None,
                    payload: HEARTBEAT.to_vec(),
                })
            })
            .collect()
    }
}

impl Inner {
    /// Queues every record of an append, or none of them.
    fn start_append(
        &self,
        records: &[AppendRecord],
    ) -> Result<oneshot::Receiver<Result<Vec<Appended>, LogError>>, LogError> {
        for r in records {
            if r.partition.partition >= self.partitions[r.partition.topic.code() as usize] {
                return Err(LogError::Inconsistent(format!(
                    "append to {}, which the log does not have",
                    r.partition
                )));
            }
        }
        let n = records.len();
        let bytes: usize = records.iter().map(|r| r.payload.len()).sum();
        if !self.budget.try_acquire(n, bytes) {
            return Err(LogError::Overloaded);
        }
        let producer = match self.producer() {
            Ok(p) => p,
            Err(e) => {
                self.budget.release(n, bytes);
                return Err(e);
            }
        };
        // Record times from this process's clock (one per append), or the backfill's own
        // (`AppendRecord::record_time_ms`), never going back within this process. Readers
        // make them monotone per partition across producers (see the module docs).
        let now = now_ms();
        let mut running = self.last_time.load(Ordering::Acquire);
        let times: Vec<Millis> = records
            .iter()
            .map(|r| {
                running = running.max(r.record_time_ms.unwrap_or(now));
                running
            })
            .collect();
        self.last_time.fetch_max(running, Ordering::AcqRel);
        let (done, receiver) = oneshot::channel();
        let pending = Arc::new(Pending {
            state: Mutex::new(PendingState {
                results: records
                    .iter()
                    .zip(&times)
                    .map(|(r, &time)| Appended {
                        partition: r.partition,
                        offset: 0,
                        record_time_ms: time,
                    })
                    .collect(),
                remaining: n,
                error: None,
                done: Some(done),
            }),
        });
        for (i, (r, &time)) in records.iter().zip(&times).enumerate() {
            let ticket = Box::new(Ticket {
                pending: Arc::clone(&pending),
                index: i,
                bytes: r.payload.len(),
            });
            let key = r.key.map(u64::to_be_bytes);
            let mut record = BaseRecord::<[u8], [u8], Box<Ticket>>::with_opaque_to(
                &self.names[r.partition.topic.code() as usize],
                ticket,
            )
            .partition(r.partition.partition as i32)
            .payload(r.payload.as_slice())
            .timestamp(time as i64);
            if let Some(key) = &key {
                record = record.key(key.as_slice());
            }
            if let Err((e, record)) = producer.send(record) {
                // Records i.. were never queued and get no delivery report: release their
                // budget here. Records before i are queued and finish on their own.
                drop(record);
                let unsent = n - i;
                let unsent_bytes: usize = records[i..].iter().map(|r| r.payload.len()).sum();
                self.budget.release(unsent, unsent_bytes);
                let error = match e {
                    KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => {
                        LogError::Overloaded
                    }
                    e => LogError::Unavailable(format!("produce to {}: {e}", r.partition)),
                };
                let mut state = pending.state.lock();
                state.remaining -= unsent;
                // The caller gets the error now, not through the channel.
                state.done = None;
                state
                    .error
                    .get_or_insert(LogError::Unavailable(error.to_string()));
                return Err(error);
            }
        }
        Ok(receiver)
    }

    /// The producer, replaced by a fresh one if it hit a fatal error (an idempotent
    /// producer that lost its sequence state cannot go on, but a new one can).
    fn producer(&self) -> Result<Arc<KafkaProducer>, LogError> {
        let current = Arc::clone(&self.producer.read());
        let Some((code, reason)) = current.client().fatal_error() else {
            return Ok(current);
        };
        let mut slot = self.producer.write();
        if Arc::ptr_eq(&slot, &current) {
            tracing::error!(%code, %reason, "kafka producer hit a fatal error; replacing it");
            let fresh = Arc::new(build_producer(&self.options, &self.budget)?);
            let old = std::mem::replace(&mut *slot, fresh);
            // Dropping a producer purges its queue and waits for its threads: not here.
            drop(current);
            let _ = std::thread::Builder::new()
                .name("kafka-producer-drop".into())
                .spawn(move || drop(old));
        }
        Ok(Arc::clone(&slot))
    }
}

impl Log for KafkaLog {
    fn partitions(&self, topic: Topic) -> u32 {
        self.inner.partitions[topic.code() as usize]
    }

    fn append(&self, records: Vec<AppendRecord>) -> AppendFuture {
        if records.is_empty() {
            return Box::pin(async { Ok(Vec::new()) });
        }
        // Queue synchronously: `Overloaded` comes at once, and appends keep call order.
        let started = self.inner.start_append(&records);
        let timeout = self.inner.options.append_timeout;
        Box::pin(async move {
            let receiver = started?;
            match tokio::time::timeout(timeout, receiver).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(LogError::Unavailable("kafka producer has stopped".into())),
                Err(_) => Err(LogError::Timeout(timeout)),
            }
        })
    }

    fn reader(
        &self,
        start: Vec<(PartitionId, LogPosition)>,
    ) -> Result<Box<dyn LogReader>, LogError> {
        Ok(Box::new(KafkaReader::new(&self.inner, start)?))
    }

    fn end_offsets(&self) -> Result<Vec<(PartitionId, u64)>, LogError> {
        let producer = self.inner.producer()?;
        let deadline = Instant::now() + self.inner.options.metadata_timeout;
        let mut out = Vec::new();
        for topic in Topic::ALL {
            let name = &self.inner.names[topic.code() as usize];
            for partition in 0..self.partitions(topic) {
                let remaining = deadline.saturating_duration_since(Instant::now());
                let (_, high) = producer
                    .client()
                    .fetch_watermarks(name, partition as i32, remaining)
                    .map_err(|e| {
                        LogError::Unavailable(format!("end offset of {name}/{partition}: {e}"))
                    })?;
                out.push((PartitionId { topic, partition }, high.max(0) as u64));
            }
        }
        Ok(out)
    }

    fn check(&self) -> Result<(), LogError> {
        let producer = self.inner.producer()?;
        let name = &self.inner.names[Topic::Clicks.code() as usize];
        topic_partitions(producer.client(), name, self.inner.options.metadata_timeout)?
            .map(|_| ())
            .ok_or_else(|| LogError::Unavailable(format!("topic {name} does not exist")))
    }
}

/// Stops the heartbeats of [`KafkaLog::spawn_heartbeats`]; dropping it stops them too.
pub struct Heartbeats {
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Heartbeats {
    /// Stops after the heartbeat in progress, if any, has finished.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Heartbeats {
    fn drop(&mut self) {
        // A heartbeat already queued still completes in librdkafka; only the loop ends.
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Records and bytes produced and not yet reported on.
struct Budget {
    records: AtomicUsize,
    bytes: AtomicUsize,
    max_records: usize,
    max_bytes: usize,
}

impl Budget {
    fn try_acquire(&self, records: usize, bytes: usize) -> bool {
        let grab = |counter: &AtomicUsize, n: usize, max: usize| {
            counter
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                    cur.checked_add(n).filter(|&total| total <= max)
                })
                .is_ok()
        };
        if !grab(&self.records, records, self.max_records) {
            return false;
        }
        if !grab(&self.bytes, bytes, self.max_bytes) {
            self.records.fetch_sub(records, Ordering::AcqRel);
            return false;
        }
        true
    }

    fn release(&self, records: usize, bytes: usize) {
        self.records.fetch_sub(records, Ordering::AcqRel);
        self.bytes.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// One append waiting for its delivery reports.
struct Pending {
    state: Mutex<PendingState>,
}

struct PendingState {
    results: Vec<Appended>,
    remaining: usize,
    error: Option<LogError>,
    done: Option<oneshot::Sender<Result<Vec<Appended>, LogError>>>,
}

/// The delivery opaque of one record.
struct Ticket {
    pending: Arc<Pending>,
    index: usize,
    bytes: usize,
}

/// The producer's callbacks: delivery reports settle appends and free the budget.
struct ProducerCtx {
    budget: Arc<Budget>,
    delivery_timeout: Duration,
}

impl ClientContext for ProducerCtx {
    fn error(&self, error: KafkaError, reason: &str) {
        // Broker outages surface here repeatedly; appends report them to callers.
        tracing::warn!(%error, reason, "kafka producer");
    }
}

impl ProducerContext for ProducerCtx {
    type DeliveryOpaque = Box<Ticket>;

    fn delivery(&self, result: &DeliveryResult<'_>, ticket: Box<Ticket>) {
        self.budget.release(1, ticket.bytes);
        let mut state = ticket.pending.state.lock();
        let state = &mut *state;
        match result {
            Ok(message) if message.offset() >= 0 => {
                // The record time stays the one we stamped: topics are created with
                // CreateTime, and the timestamp in a delivery report is not trustworthy
                // (librdkafka's mock broker reports a fixed LogAppendTime).
                if let Some(slot) = state.results.get_mut(ticket.index) {
                    slot.offset = message.offset() as u64;
                }
            }
            Ok(message) => {
                state.error.get_or_insert(LogError::Unavailable(format!(
                    "{}/{}: the broker reported no offset",
                    message.topic(),
                    message.partition()
                )));
            }
            Err((error, message)) => {
                state.error.get_or_insert(match error {
                    KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut) => {
                        LogError::Timeout(self.delivery_timeout)
                    }
                    e => LogError::Unavailable(format!(
                        "{}/{}: {e}",
                        message.topic(),
                        message.partition()
                    )),
                });
            }
        }
        state.remaining = state.remaining.saturating_sub(1);
        if state.remaining == 0
            && let Some(done) = state.done.take()
        {
            let outcome = match state.error.take() {
                Some(e) => Err(e),
                None => Ok(std::mem::take(&mut state.results)),
            };
            // The caller may have given up (timeout); then nobody listens.
            let _ = done.send(outcome);
        }
    }
}

/// Callbacks of readers and admin clients: log through `tracing` at a fitting level.
struct QuietCtx;

impl ClientContext for QuietCtx {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "kafka client");
    }
}

impl ConsumerContext for QuietCtx {}

/// The settings every client shares; finish with [`finish_config`].
fn base_config(options: &KafkaLogOptions) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &options.brokers)
        .set("client.id", &options.client_id)
        // librdkafka backs reconnects off to 10s by default; a restarted broker should be
        // used again within a second.
        .set("reconnect.backoff.max.ms", "1000");
    config
}

/// Applies the caller's properties over our defaults, then the guarantees over both.
fn finish_config(
    mut config: ClientConfig,
    options: &KafkaLogOptions,
    guarantees: &[(&str, &str)],
) -> ClientConfig {
    for (key, value) in &options.properties {
        config.set(key, value);
    }
    for &(key, value) in guarantees {
        config.set(key, value);
    }
    config
}

fn build_producer(
    options: &KafkaLogOptions,
    budget: &Arc<Budget>,
) -> Result<KafkaProducer, LogError> {
    let delivery_ms = options.delivery_timeout.as_millis().max(1);
    let mut config = base_config(options);
    config
        // The append's own timer answers the caller; librdkafka keeps trying longer (see
        // `delivery_timeout`), within the budget.
        .set("message.timeout.ms", delivery_ms.to_string())
        .set("request.timeout.ms", delivery_ms.min(30_000).to_string())
        // Our budget is the real bound; librdkafka's must never be the tighter one.
        .set(
            "queue.buffering.max.messages",
            (options.max_in_flight_records.saturating_add(1024))
                .min(i32::MAX as usize)
                .to_string(),
        )
        .set(
            "queue.buffering.max.kbytes",
            (options.max_in_flight_bytes / 1024 + 1024)
                .min(i32::MAX as usize)
                .to_string(),
        )
        .set("linger.ms", options.linger.as_millis().to_string());
    finish_config(config, options, &PRODUCER_GUARANTEES)
        .create_with_context(ProducerCtx {
            budget: Arc::clone(budget),
            delivery_timeout: options.delivery_timeout,
        })
        .map_err(|e| LogError::Unavailable(format!("create kafka producer: {e}")))
}

/// The partition count of a topic, `None` if it does not exist.
fn topic_partitions<C: ClientContext>(
    client: &Client<C>,
    name: &str,
    timeout: Duration,
) -> Result<Option<u32>, LogError> {
    let metadata = client
        .fetch_metadata(Some(name), timeout)
        .map_err(|e| LogError::Unavailable(format!("kafka metadata of {name}: {e}")))?;
    let Some(topic) = metadata.topics().iter().find(|t| t.name() == name) else {
        return Ok(None);
    };
    match topic.error().map(RDKafkaErrorCode::from) {
        None => Ok(Some(topic.partitions().len() as u32)),
        Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic) => {
            Ok(None)
        }
        Some(code) => Err(LogError::Unavailable(format!(
            "kafka metadata of {name}: {code}"
        ))),
    }
}

fn mismatch(name: &str, have: u32, want: u32) -> LogError {
    LogError::Inconsistent(format!(
        "kafka topic {name} has {have} partitions but the config asks for {want}; \
         partition counts of an existing log cannot change"
    ))
}

/// Creates missing topics, refuses existing ones with other partition counts.
fn ensure_topics<C: ClientContext>(
    options: &KafkaLogOptions,
    client: &Client<C>,
    names: &[String; 3],
    partitions: [u32; 3],
) -> Result<(), LogError> {
    let timeout = options.metadata_timeout;
    let mut missing = Vec::new();
    for (name, &want) in names.iter().zip(&partitions) {
        match topic_partitions(client, name, timeout)? {
            Some(have) if have != want => return Err(mismatch(name, have, want)),
            Some(_) => {}
            None => missing.push((name.as_str(), want)),
        }
    }
    if missing.is_empty() {
        return Ok(());
    }

    let admin: AdminClient<DefaultClientContext> =
        finish_config(base_config(options), options, &[])
            .create()
            .map_err(|e| LogError::Unavailable(format!("create kafka admin client: {e}")))?;
    let retention_ms = options
        .retention
        .map(|r| r.as_millis().to_string())
        .unwrap_or_default();
    let min_isr = options
        .min_insync_replicas
        .map(|n| n.to_string())
        .unwrap_or_default();
    let replication = TopicReplication::Fixed(options.replication_factor.map_or(-1, i32::from));
    let new_topics: Vec<NewTopic<'_>> = missing
        .iter()
        .map(|&(name, want)| {
            // Record times are the producer's timestamps, never the broker's clock.
            let mut topic = NewTopic::new(name, want as i32, replication_clone(&replication))
                .set("message.timestamp.type", "CreateTime");
            if name == names[Topic::Ads.code() as usize] {
                // The catalog is replayed from offset 0 on every start: keep it all.
                topic = topic.set("retention.ms", "-1");
            } else if !retention_ms.is_empty() {
                topic = topic.set("retention.ms", &retention_ms);
            }
            if !min_isr.is_empty() {
                topic = topic.set("min.insync.replicas", &min_isr);
            }
            topic
        })
        .collect();
    let admin_options = AdminOptions::new()
        .operation_timeout(Some(timeout))
        .request_timeout(Some(timeout));
    let results = futures::executor::block_on(admin.create_topics(&new_topics, &admin_options))
        .map_err(|e| {
            let names: Vec<&str> = missing.iter().map(|&(name, _)| name).collect();
            LogError::Unavailable(format!(
                "create kafka topics {}: {e}; does the broker support CreateTopics?",
                names.join(", ")
            ))
        })?;
    for result in results {
        match result {
            Ok(name) => tracing::info!(topic = %name, "created kafka topic"),
            // Another process created it meanwhile; its partition count is checked below.
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(LogError::Unavailable(format!(
                    "cannot create kafka topic {name}: {code}; create it with the configured \
                     partition count, or fix the broker"
                )));
            }
        }
    }

    // Creation propagates asynchronously: wait until metadata shows every topic.
    let deadline = Instant::now() + timeout;
    for (name, want) in missing {
        loop {
            match topic_partitions(client, name, timeout)? {
                Some(have) if have == want => break,
                Some(have) => return Err(mismatch(name, have, want)),
                None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                None => {
                    return Err(LogError::Unavailable(format!(
                        "kafka topic {name} was created but does not show in metadata"
                    )));
                }
            }
        }
    }
    Ok(())
}

fn replication_clone<'a>(r: &TopicReplication<'a>) -> TopicReplication<'a> {
    match r {
        TopicReplication::Fixed(n) => TopicReplication::Fixed(*n),
        TopicReplication::Variable(a) => TopicReplication::Variable(a),
    }
}

/// One assigned partition of a reader.
struct ReadPart {
    partition: PartitionId,
    pos: LogPosition,
    records: Vec<LogRecord>,
}

/// Reads a fixed set of partitions through one consumer with a manual assignment.
struct KafkaReader {
    consumer: Option<BaseConsumer<QuietCtx>>,
    names: [String; 3],
    parts: Vec<ReadPart>,
    /// `slots[topic code][partition]` = index into `parts`.
    slots: [Vec<Option<usize>>; 3],
    max_records: usize,
    /// Set once the log cannot serve a position any more; reported on every poll.
    broken: Option<String>,
}

impl KafkaReader {
    fn new(inner: &Inner, start: Vec<(PartitionId, LogPosition)>) -> Result<Self, LogError> {
        let mut slots: [Vec<Option<usize>>; 3] = inner.partitions.map(|n| vec![None; n as usize]);
        let mut parts = Vec::with_capacity(start.len());
        let mut assignment = TopicPartitionList::with_capacity(start.len());
        for (partition, pos) in start {
            let slot = slots[partition.topic.code() as usize]
                .get_mut(partition.partition as usize)
                .ok_or_else(|| {
                    LogError::Inconsistent(format!("read {partition}, which the log does not have"))
                })?;
            if slot.is_some() {
                return Err(LogError::Inconsistent(format!(
                    "partition {partition} given twice to one reader"
                )));
            }
            *slot = Some(parts.len());
            assignment
                .add_partition_offset(
                    &inner.names[partition.topic.code() as usize],
                    partition.partition as i32,
                    Offset::Offset(pos.offset as i64),
                )
                .map_err(|e| LogError::Unavailable(format!("assign {partition}: {e}")))?;
            parts.push(ReadPart {
                partition,
                pos,
                records: Vec::new(),
            });
        }
        let consumer = if parts.is_empty() {
            None
        } else {
            let options = &inner.options;
            let mut config = base_config(options);
            config
                // Required by librdkafka for `assign`; the group is never joined and no
                // offset is ever committed to it.
                .set("group.id", format!("{}-reader", options.client_id))
                .set("enable.partition.eof", "false")
                .set(
                    "fetch.wait.max.ms",
                    options.fetch_wait_max.as_millis().max(1).to_string(),
                );
            let consumer: BaseConsumer<QuietCtx> =
                finish_config(config, options, &CONSUMER_GUARANTEES)
                    .create_with_context(QuietCtx)
                    .map_err(|e| LogError::Unavailable(format!("create kafka consumer: {e}")))?;
            consumer
                .assign(&assignment)
                .map_err(|e| LogError::Unavailable(format!("assign kafka partitions: {e}")))?;
            Some(consumer)
        };
        Ok(KafkaReader {
            consumer,
            names: inner.names.clone(),
            parts,
            slots,
            max_records: inner.options.max_poll_records,
            broken: None,
        })
    }
}

/// Where one message goes, and what it becomes.
fn route(
    names: &[String; 3],
    slots: &[Vec<Option<usize>>; 3],
    message: &BorrowedMessage<'_>,
) -> Option<usize> {
    let topic = message.topic();
    let code = names.iter().position(|n| n == topic)?;
    let partition = usize::try_from(message.partition()).ok()?;
    slots[code].get(partition).copied().flatten()
}

impl LogReader for KafkaReader {
    /// Returns one batch per partition that has new records, in offset order.
    ///
    /// `idle_until_ms` is always `None`: Kafka has no watermark every producer honours
    /// (each ingest process has its own clock), so idle partitions advance through the
    /// heartbeat records in the log instead, which a replay sees again.
    fn poll(&mut self, max_wait: Duration) -> Result<Vec<PartitionBatch>, LogError> {
        if let Some(why) = &self.broken {
            return Err(LogError::Inconsistent(why.clone()));
        }
        let Some(consumer) = &self.consumer else {
            std::thread::sleep(max_wait);
            return Ok(Vec::new());
        };
        let deadline = Instant::now() + max_wait;
        let mut taken = 0;
        let mut failure = None;
        while taken < self.max_records {
            // Wait only while nothing has come; then drain what is already fetched.
            let wait = if taken == 0 {
                deadline.saturating_duration_since(Instant::now())
            } else {
                Duration::ZERO
            };
            match consumer.poll(wait) {
                Some(Ok(message)) => {
                    let Some(slot) = route(&self.names, &self.slots, &message) else {
                        tracing::warn!(
                            topic = message.topic(),
                            partition = message.partition(),
                            "kafka returned a record of a partition this reader does not read"
                        );
                        continue;
                    };
                    let part = &mut self.parts[slot];
                    let offset = message.offset();
                    if offset < part.pos.offset as i64 {
                        continue;
                    }
                    // Running max: several ingest clocks write to one partition.
                    if let Some(t) = message.timestamp().to_millis().filter(|&t| t > 0) {
                        part.pos.time_floor_ms = part.pos.time_floor_ms.max(t as Millis);
                    }
                    part.records.push(LogRecord {
                        offset: offset as u64,
                        record_time_ms: part.pos.time_floor_ms,
                        payload: message.payload().unwrap_or_default().to_vec(),
                    });
                    part.pos.offset = offset as u64 + 1;
                    taken += 1;
                }
                Some(Err(error)) => match classify(&error) {
                    ReadError::Transient => {
                        tracing::debug!(%error, "kafka reader: transient error, retrying");
                        if Instant::now() >= deadline {
                            break;
                        }
                    }
                    ReadError::Lost => {
                        let why = format!(
                            "a reader position is no longer in the log ({error}); records were \
                             removed (retention?) or the topic was recreated"
                        );
                        tracing::error!("{why}");
                        self.broken = Some(why.clone());
                        failure = Some(LogError::Inconsistent(why));
                        break;
                    }
                    ReadError::Failed => {
                        failure = Some(LogError::Unavailable(format!("kafka read: {error}")));
                        break;
                    }
                },
                None if taken == 0 && Instant::now() < deadline => {}
                None => break,
            }
        }
        // Records already read are handed over first; the error comes with the next poll
        // if it persists (a lost position does: `broken` is sticky).
        if taken == 0
            && let Some(e) = failure
        {
            return Err(e);
        }
        Ok(self
            .parts
            .iter_mut()
            .filter(|p| !p.records.is_empty())
            .map(|p| PartitionBatch {
                partition: p.partition,
                records: std::mem::take(&mut p.records),
                next: p.pos,
                idle_until_ms: None,
            })
            .collect())
    }
}

enum ReadError {
    /// librdkafka retries on its own (connection loss, leader change).
    Transient,
    /// The position cannot be served: never skip ahead silently.
    Lost,
    /// Anything else.
    Failed,
}

fn classify(error: &KafkaError) -> ReadError {
    let code = match error {
        KafkaError::MessageConsumption(code) | KafkaError::Global(code) => *code,
        _ => return ReadError::Failed,
    };
    match code {
        RDKafkaErrorCode::AutoOffsetReset | RDKafkaErrorCode::OffsetOutOfRange => ReadError::Lost,
        RDKafkaErrorCode::BrokerTransportFailure
        | RDKafkaErrorCode::AllBrokersDown
        | RDKafkaErrorCode::Resolve
        | RDKafkaErrorCode::OperationTimedOut
        | RDKafkaErrorCode::RequestTimedOut
        | RDKafkaErrorCode::NotLeaderForPartition
        | RDKafkaErrorCode::LeaderNotAvailable
        | RDKafkaErrorCode::NotCoordinator
        | RDKafkaErrorCode::CoordinatorNotAvailable => ReadError::Transient,
        _ => ReadError::Failed,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};

    use super::*;
    use crate::record::is_heartbeat;

    type Mock = MockCluster<'static, DefaultProducerContext>;

    /// A one-broker mock cluster with the topics of a log (2 click, 1 verdict partitions).
    fn mock(click_partitions: i32) -> Mock {
        let mock = MockCluster::new(1).expect("mock cluster");
        mock.create_topic("clicks", click_partitions, 1)
            .expect("topic");
        mock.create_topic("fraud_verdicts", 1, 1).expect("topic");
        mock.create_topic("ads", 1, 1).expect("topic");
        mock
    }

    fn options(mock: &Mock) -> KafkaLogOptions {
        KafkaLogOptions {
            click_partitions: 2,
            verdict_partitions: 1,
            append_timeout: Duration::from_secs(3),
            metadata_timeout: Duration::from_secs(3),
            linger: Duration::from_millis(1),
            fetch_wait_max: Duration::from_millis(10),
            ..KafkaLogOptions::new(mock.bootstrap_servers())
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    fn clicks(p: u32) -> PartitionId {
        PartitionId {
            topic: Topic::Clicks,
            partition: p,
        }
    }

    fn records(p: PartitionId, payloads: &[&[u8]]) -> Vec<AppendRecord> {
        payloads
            .iter()
            .map(|b| AppendRecord {
                partition: p,
                key: None,
                record_time_ms: None,
                payload: b.to_vec(),
            })
            .collect()
    }

    /// Polls until `n` records arrived (heartbeats included) or 10 s passed.
    fn read(
        reader: &mut dyn LogReader,
        n: usize,
    ) -> (
        BTreeMap<PartitionId, Vec<LogRecord>>,
        BTreeMap<PartitionId, LogPosition>,
    ) {
        let mut got: BTreeMap<PartitionId, Vec<LogRecord>> = BTreeMap::new();
        let mut next = BTreeMap::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while got.values().map(Vec::len).sum::<usize>() < n && Instant::now() < deadline {
            for batch in reader.poll(Duration::from_millis(100)).expect("poll") {
                assert!(!batch.records.is_empty(), "only partitions with records");
                assert_eq!(batch.idle_until_ms, None);
                let last = batch.records.last().expect("nonempty");
                assert_eq!(batch.next.offset, last.offset + 1);
                assert_eq!(batch.next.time_floor_ms, last.record_time_ms);
                next.insert(batch.partition, batch.next);
                got.entry(batch.partition)
                    .or_default()
                    .extend(batch.records);
            }
        }
        (got, next)
    }

    #[test]
    fn backfill_record_times_become_message_timestamps() {
        let mock = mock(2);
        let log = KafkaLog::open(options(&mock)).expect("open");
        let rt = runtime();
        let at = |p: u32, t: Millis| AppendRecord {
            record_time_ms: Some(t),
            ..records(clicks(p), &[b"old"]).remove(0)
        };
        let done = rt
            .block_on(log.append(vec![at(0, 5_000), at(1, 9_000), at(0, 7_000)]))
            .expect("append");
        let times: Vec<Millis> = done.iter().map(|a| a.record_time_ms).collect();
        assert_eq!(
            times,
            vec![5_000, 9_000, 9_000],
            "raised to the running max"
        );
        let mut reader = log
            .reader(vec![
                (clicks(0), LogPosition::default()),
                (clicks(1), LogPosition::default()),
            ])
            .expect("reader");
        let (got, _) = read(&mut *reader, 3);
        let read_times =
            |p: u32| -> Vec<Millis> { got[&clicks(p)].iter().map(|r| r.record_time_ms).collect() };
        assert_eq!(read_times(0), vec![5_000, 9_000]);
        assert_eq!(read_times(1), vec![9_000]);
    }

    #[test]
    fn append_then_read_round_trips_offsets_times_and_payloads() {
        let mock = mock(2);
        let log = KafkaLog::open(options(&mock)).expect("open");
        let rt = runtime();
        let mut input = records(clicks(0), &[b"a", b"b"]);
        input.extend(records(clicks(1), &[b"c"]));
        input.extend(records(clicks(0), &[b"d"]));
        let first = rt.block_on(log.append(input)).expect("append");
        let second = rt
            .block_on(log.append(records(clicks(1), &[b"e", b"f"])))
            .expect("append");
        // In input order, offsets per partition in append order.
        let placed: Vec<(u32, u64)> = first
            .iter()
            .chain(&second)
            .map(|a| (a.partition.partition, a.offset))
            .collect();
        assert_eq!(placed, vec![(0, 0), (0, 1), (1, 0), (0, 2), (1, 1), (1, 2)]);
        assert!(
            first
                .iter()
                .all(|a| a.record_time_ms == first[0].record_time_ms)
        );
        assert!(second[0].record_time_ms >= first[0].record_time_ms);
        assert!(first[0].record_time_ms.abs_diff(now_ms()) < 10_000);

        let mut reader = log
            .reader(vec![
                (clicks(0), LogPosition::default()),
                (clicks(1), LogPosition::default()),
            ])
            .expect("reader");
        let (got, next) = read(&mut *reader, 6);
        let as_read = |p: u32| -> Vec<(u64, Millis, Vec<u8>)> {
            got[&clicks(p)]
                .iter()
                .map(|r| (r.offset, r.record_time_ms, r.payload.clone()))
                .collect()
        };
        let appended = |p: u32, payloads: &[&[u8]]| -> Vec<(u64, Millis, Vec<u8>)> {
            first
                .iter()
                .chain(&second)
                .filter(|a| a.partition == clicks(p))
                .zip(payloads)
                .map(|(a, b)| (a.offset, a.record_time_ms, b.to_vec()))
                .collect()
        };
        assert_eq!(as_read(0), appended(0, &[b"a", b"b", b"d"]));
        assert_eq!(as_read(1), appended(1, &[b"c", b"e", b"f"]));
        assert_eq!(next[&clicks(0)].offset, 3);
        assert_eq!(next[&clicks(1)].offset, 3);

        let ends = log.end_offsets().expect("end offsets");
        assert_eq!(
            ends,
            vec![
                (clicks(0), 3),
                (clicks(1), 3),
                (
                    PartitionId {
                        topic: Topic::FraudVerdicts,
                        partition: 0
                    },
                    0
                ),
                (super::super::ADS_PARTITION, 0),
            ]
        );
        log.check().expect("reachable");
    }

    #[test]
    fn reads_from_a_mid_partition_position_with_its_floor() {
        let mock = mock(2);
        let log = KafkaLog::open(options(&mock)).expect("open");
        let rt = runtime();
        let done = rt
            .block_on(log.append(records(clicks(0), &[b"0", b"1", b"2", b"3"])))
            .expect("append");
        let t = done[0].record_time_ms;
        // A floor above the records' times, as a committed position may carry.
        let start = LogPosition {
            offset: 2,
            time_floor_ms: t + 1_000,
        };
        let mut reader = log.reader(vec![(clicks(0), start)]).expect("reader");
        let (got, next) = read(&mut *reader, 2);
        let got = &got[&clicks(0)];
        assert_eq!(
            got.iter().map(|r| r.offset).collect::<Vec<_>>(),
            vec![2, 3],
            "starts exactly at the position"
        );
        assert_eq!(got[1].payload, b"3");
        assert!(got.iter().all(|r| r.record_time_ms == t + 1_000));
        assert_eq!(
            next[&clicks(0)],
            LogPosition {
                offset: 4,
                time_floor_ms: t + 1_000
            }
        );
        // Nothing more: an empty poll returns no batch, after waiting.
        let began = Instant::now();
        assert!(
            reader
                .poll(Duration::from_millis(200))
                .expect("poll")
                .is_empty()
        );
        assert!(began.elapsed() >= Duration::from_millis(150));
    }

    #[test]
    fn record_times_are_a_running_max_over_producers_clocks() {
        let mock = mock(2);
        let log = KafkaLog::open(options(&mock)).expect("open");
        let rt = runtime();
        let ours = rt
            .block_on(log.append(records(clicks(1), &[b"fast clock"])))
            .expect("append")[0];
        // Another ingest process whose clock is 5 s behind, then one 5 s ahead.
        let other: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", mock.bootstrap_servers())
            .create()
            .expect("producer");
        for (payload, time) in [
            (b"slow clock" as &[u8], ours.record_time_ms - 5_000),
            (b"ahead", ours.record_time_ms + 5_000),
        ] {
            rt.block_on(
                other.send(
                    FutureRecord::<(), [u8]>::to("clicks")
                        .partition(1)
                        .payload(payload)
                        .timestamp(time as i64),
                    Duration::from_secs(1),
                ),
            )
            .expect("produce");
        }
        let mut reader = log
            .reader(vec![(clicks(1), LogPosition::default())])
            .expect("reader");
        let (got, next) = read(&mut *reader, 3);
        let times: Vec<Millis> = got[&clicks(1)].iter().map(|r| r.record_time_ms).collect();
        let t = ours.record_time_ms;
        assert_eq!(
            times,
            vec![t, t, t + 5_000],
            "never back below the running max"
        );
        assert_eq!(next[&clicks(1)].time_floor_ms, t + 5_000);
    }

    #[test]
    fn heartbeats_reach_every_partition_and_stop() {
        let mock = mock(2);
        let log = KafkaLog::open(options(&mock)).expect("open");
        let rt = runtime();
        let all: Vec<(PartitionId, LogPosition)> = super::super::all_partitions(&log)
            .into_iter()
            .filter(|p| p.topic != Topic::Ads)
            .map(|p| (p, LogPosition::default()))
            .collect();
        assert_eq!(all.len(), 3);
        let beats = {
            let _guard = rt.enter();
            log.spawn_heartbeats(Duration::from_millis(20))
                .expect("heartbeats")
        };
        let mut reader = log.reader(all.clone()).expect("reader");
        // Drive the runtime while reading on this thread.
        let (got, _) = rt.block_on(async {
            tokio::task::spawn_blocking(move || read(&mut *reader, 3 * 3))
                .await
                .expect("reader")
        });
        for (p, _) in &all {
            let rs = &got[p];
            assert!(rs.len() >= 2, "{p} got {} heartbeats", rs.len());
            assert!(rs.iter().all(|r| is_heartbeat(&r.payload)));
            assert!(
                rs.windows(2)
                    .all(|w| w[0].record_time_ms <= w[1].record_time_ms),
                "heartbeat times advance"
            );
        }
        rt.block_on(beats.stop());
        std::thread::sleep(Duration::from_millis(100));
        let before = log.end_offsets().expect("ends");
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(log.end_offsets().expect("ends"), before, "stopped");
        let ads_end = before
            .iter()
            .find(|(p, _)| p.topic == Topic::Ads)
            .map(|(_, end)| *end);
        assert_eq!(ads_end, Some(0), "the catalog gets no heartbeats");
    }

    #[test]
    fn records_are_keyed_by_ad() {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let mock = mock(2);
        let log = KafkaLog::open(options(&mock)).expect("open");
        let rt = runtime();
        let keyed = |key| AppendRecord {
            partition: clicks(1),
            key,
            record_time_ms: None,
            payload: b"click".to_vec(),
        };
        rt.block_on(log.append(vec![keyed(Some(42)), keyed(None)]))
            .expect("append");
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", mock.bootstrap_servers())
            .set("group.id", "key-check")
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("clicks", 1, Offset::Beginning)
            .expect("tpl");
        consumer.assign(&tpl).expect("assign");
        let mut keys = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while keys.len() < 2 && std::time::Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                keys.push(m.key().map(<[u8]>::to_vec));
            }
        }
        assert_eq!(keys, vec![Some(42u64.to_be_bytes().to_vec()), None]);
    }

    #[test]
    fn partition_count_mismatch_is_refused() {
        let mock = mock(3);
        let err = KafkaLog::open(options(&mock)).err().expect("refused");
        let text = err.to_string();
        assert!(matches!(err, LogError::Inconsistent(_)), "{text}");
        assert!(
            text.contains("clicks") && text.contains("has 3") && text.contains("asks for 2"),
            "{text}"
        );
    }

    #[test]
    fn missing_topics_are_not_auto_created_by_metadata_requests() {
        // The mock cannot CreateTopics; opening must fail rather than let a metadata
        // request auto-create `clicks` with the broker's default partition count.
        let mock = MockCluster::new(1).expect("mock");
        let err = KafkaLog::open(options(&mock)).err().expect("cannot create");
        assert!(err.to_string().contains("clicks"), "{err}");
        let probe: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", mock.bootstrap_servers())
            .create()
            .expect("probe");
        let md = probe
            .fetch_metadata(None, Duration::from_secs(2))
            .expect("metadata");
        assert!(
            md.topics().iter().all(|t| t.name() != "clicks"),
            "auto-created"
        );
    }

    #[test]
    fn a_full_budget_refuses_appends_at_once_and_whole() {
        let mock = mock(2);
        let log = KafkaLog::open(KafkaLogOptions {
            max_in_flight_records: 4,
            append_timeout: Duration::from_secs(2),
            ..options(&mock)
        })
        .expect("open");
        let rt = runtime();
        let began = Instant::now();
        let too_big = rt.block_on(log.append(records(clicks(0), &[b"1", b"2", b"3", b"4", b"5"])));
        assert!(matches!(too_big, Err(LogError::Overloaded)), "{too_big:?}");
        // With the broker down, three records stay in flight and hold the budget.
        mock.broker_down(1).expect("down");
        let pending = log.append(records(clicks(0), &[b"1", b"2", b"3"]));
        let refused = rt.block_on(log.append(records(clicks(1), &[b"4", b"5"])));
        assert!(matches!(refused, Err(LogError::Overloaded)), "{refused:?}");
        assert!(
            began.elapsed() < Duration::from_millis(500),
            "refused at once"
        );
        // Timed out appends give their budget back once librdkafka drops them.
        let timed_out = rt.block_on(pending);
        assert!(
            matches!(timed_out, Err(LogError::Timeout(_))),
            "{timed_out:?}"
        );
        mock.broker_up(1).expect("up");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match rt.block_on(log.append(records(clicks(1), &[b"6", b"7", b"8", b"9"]))) {
                Ok(done) => {
                    assert_eq!(done.len(), 4);
                    break;
                }
                Err(e) => assert!(Instant::now() < deadline, "budget never came back: {e}"),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    #[test]
    fn appends_to_a_down_broker_fail_within_the_timeout() {
        let mock = mock(2);
        let log = KafkaLog::open(KafkaLogOptions {
            append_timeout: Duration::from_millis(500),
            ..options(&mock)
        })
        .expect("open");
        let rt = runtime();
        rt.block_on(log.append(records(clicks(0), &[b"ok"])))
            .expect("up");
        mock.broker_down(1).expect("down");
        let began = Instant::now();
        let result = rt.block_on(log.append(records(clicks(0), &[b"lost?"])));
        let took = began.elapsed();
        assert!(
            matches!(result, Err(LogError::Timeout(_) | LogError::Unavailable(_))),
            "{result:?}"
        );
        assert!(took < Duration::from_millis(1_500), "took {took:?}");
        assert!(log.check().is_err(), "check sees the outage");
    }

    #[test]
    fn a_vanished_cluster_fails_appends_and_an_absent_one_fails_open() {
        let mock = mock(2);
        let opts = KafkaLogOptions {
            append_timeout: Duration::from_millis(500),
            metadata_timeout: Duration::from_millis(500),
            ..options(&mock)
        };
        let log = KafkaLog::open(opts.clone()).expect("open");
        drop(mock); // closes the port
        let rt = runtime();
        let began = Instant::now();
        let result = rt.block_on(log.append(records(clicks(1), &[b"x"])));
        assert!(result.is_err(), "{result:?}");
        assert!(began.elapsed() < Duration::from_millis(1_500));

        let began = Instant::now();
        let err = KafkaLog::open(opts).err().expect("nothing listens");
        assert!(matches!(err, LogError::Unavailable(_)), "{err}");
        assert!(
            began.elapsed() < Duration::from_secs(3),
            "{:?}",
            began.elapsed()
        );
    }

    #[test]
    fn a_reader_closes_promptly_while_the_broker_is_down() {
        let mock = mock(2);
        let log = KafkaLog::open(options(&mock)).expect("open");
        let mut reader = log
            .reader(vec![(clicks(0), LogPosition::default())])
            .expect("reader");
        assert!(
            reader
                .poll(Duration::from_millis(100))
                .expect("poll")
                .is_empty()
        );
        mock.broker_down(1).expect("down");
        let began = Instant::now();
        assert!(
            reader
                .poll(Duration::from_millis(300))
                .expect("transient errors are waited out")
                .is_empty()
        );
        drop(reader);
        assert!(
            began.elapsed() < Duration::from_secs(3),
            "{:?}",
            began.elapsed()
        );
    }

    /// The reader's own cost, on the in-process mock broker; run with
    /// `cargo test --release --lib -- --ignored --nocapture mock_read_throughput`.
    /// The mock keeps only 5 MB per partition, so records are appended and read in rounds.
    #[test]
    #[ignore]
    fn mock_read_throughput() {
        let mock = mock(2);
        let log = KafkaLog::open(KafkaLogOptions {
            max_in_flight_records: 1_000_000,
            linger: Duration::from_millis(20),
            append_timeout: Duration::from_secs(60),
            ..options(&mock)
        })
        .expect("open");
        let rt = runtime();
        let (rounds, per_round) = (25, 40_000);
        let payload = vec![7u8; 100];
        let mut reader = log
            .reader(vec![
                (clicks(0), LogPosition::default()),
                (clicks(1), LogPosition::default()),
            ])
            .expect("reader");
        let (mut append_s, mut read_s, mut n) = (0.0, 0.0, 0);
        for _ in 0..rounds {
            let began = Instant::now();
            let pending: Vec<_> = (0..per_round / 10_000)
                .map(|a| {
                    log.append(
                        (0..10_000)
                            .map(|i| AppendRecord {
                                partition: clicks(((a + i) % 2) as u32),
                                key: None,
                                record_time_ms: None,
                                payload: payload.clone(),
                            })
                            .collect(),
                    )
                })
                .collect();
            for p in pending {
                rt.block_on(p).expect("append");
            }
            append_s += began.elapsed().as_secs_f64();
            let began = Instant::now();
            let target = n + per_round;
            while n < target {
                for b in reader.poll(Duration::from_millis(500)).expect("poll") {
                    n += b.records.len();
                }
            }
            read_s += began.elapsed().as_secs_f64();
        }
        println!(
            "mock broker, 100-byte records, 2 partitions: append {n} in {append_s:.2}s = \
             {:.0}/s; read {n} in {read_s:.2}s = {:.0}/s",
            n as f64 / append_s,
            n as f64 / read_s
        );
    }

    #[test]
    fn option_debug_hides_credentials() {
        let options = KafkaLogOptions {
            properties: vec![
                ("security.protocol".into(), "SASL_SSL".into()),
                ("sasl.password".into(), "hunter2".into()),
            ],
            ..KafkaLogOptions::new("b:9092")
        };
        let shown = format!("{options:?}");
        assert!(
            shown.contains("SASL_SSL") && shown.contains("sasl.password"),
            "{shown}"
        );
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn appends_to_unknown_partitions_are_refused() {
        let mock = mock(2);
        let log = KafkaLog::open(options(&mock)).expect("open");
        let rt = runtime();
        let err = rt
            .block_on(log.append(records(clicks(2), &[b"x"])))
            .expect_err("refused");
        assert!(matches!(err, LogError::Inconsistent(_)), "{err}");
        assert!(
            log.reader(vec![(clicks(7), LogPosition::default())])
                .is_err()
        );
    }
}
