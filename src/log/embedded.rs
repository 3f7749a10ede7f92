//! The embedded log: one SQLite database in WAL mode, written by one thread with group
//! commit, read by any number of readers through snapshot transactions.
//!
//! Why SQLite and not segment files: one fsync per group commit makes appends cheap, torn
//! tails and crash recovery are SQLite's problem, and a reader's snapshot gives records
//! and the watermark consistently in one read (see `bench/` for the measured rates).
//!
//! Each partition is its own table keyed by offset (`clicks_0`, `clicks_1`, ...,
//! `fraud_verdicts_0`, ..., `ads_0`), so every append lands at the right edge of its own
//! B-tree: SQLite then fills leaves completely and a group commit rewrites each touched
//! partition's last leaf once. One table keyed by `(topic, partition, offset)` appended
//! in the middle of the tree at every partition's tail, split half-full leaves and wrote
//! 2.4 times the bytes per record (bench/SERVING.md, session 22). A log in that older
//! shape is converted in place when a writer opens it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use parking_lot::{Condvar, Mutex};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::oneshot;

use super::{
    AppendFuture, AppendRecord, Appended, Log, LogError, LogPosition, LogReader, LogRecord,
    PartitionBatch,
};
use crate::record::{PartitionId, Topic};
use crate::time::{Millis, now_ms};

/// Appends waiting for the writer beyond this many are refused with `Overloaded`.
const QUEUE_DEPTH: usize = 4096;
/// One group commit writes at most this many records.
const GROUP_RECORDS: usize = 50_000;
/// One poll reads at most this many records per partition.
const READ_BATCH: usize = 8192;

/// The partition counts of a new log.
#[derive(Clone, Copy, Debug)]
pub struct EmbeddedLogOptions {
    /// Partitions of `clicks`.
    pub click_partitions: u32,
    /// Partitions of `fraud_verdicts`.
    pub verdict_partitions: u32,
    /// How often an idle writer advances the watermark to the clock. `None` for a
    /// backfill (`clickagg import`): the watermark then follows the appended records only,
    /// so a pause in the backfill never moves it past the historical times still to come.
    pub watermark_interval: Option<Duration>,
    /// How long an append may wait for its commit.
    pub append_timeout: Duration,
}

/// Commit notifications from the writer to readers.
struct Commits {
    seq: Mutex<u64>,
    changed: Condvar,
    writer_alive: AtomicBool,
}

impl Commits {
    fn current(&self) -> u64 {
        *self.seq.lock()
    }

    fn bump(&self) {
        *self.seq.lock() += 1;
        self.changed.notify_all();
    }

    fn wait_past(&self, seen: u64, max_wait: Duration) {
        let mut seq = self.seq.lock();
        if *seq == seen {
            self.changed.wait_for(&mut seq, max_wait);
        }
    }
}

struct AppendJob {
    records: Vec<AppendRecord>,
    reply: oneshot::Sender<Result<Vec<Appended>, LogError>>,
}

/// The embedded, durable, partitioned log.
pub struct EmbeddedLog {
    path: PathBuf,
    partitions: [u32; 3],
    jobs: Sender<AppendJob>,
    commits: Arc<Commits>,
    append_timeout: Duration,
}

impl EmbeddedLog {
    /// Opens (or creates) the log in `dir/log.db` and starts its writer thread.
    pub fn open(dir: &Path, options: EmbeddedLogOptions) -> Result<EmbeddedLog, LogError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| unavailable(&format!("create {}", dir.display()), e))?;
        let path = dir.join("log.db");
        let conn = open_conn(&path, false)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS log_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);",
        )
        .map_err(|e| unavailable("create log schema", e))?;

        let partitions = [options.click_partitions, options.verdict_partitions, 1];
        for topic in [Topic::Clicks, Topic::FraudVerdicts] {
            let key = format!("partitions_{}", topic.name());
            let want = partitions[topic.code() as usize];
            let have: Option<i64> = conn
                .query_row("SELECT value FROM log_meta WHERE key = ?1", [&key], |r| {
                    r.get(0)
                })
                .optional()
                .map_err(|e| unavailable("read log metadata", e))?;
            match have {
                None => {
                    conn.execute(
                        "INSERT INTO log_meta (key, value) VALUES (?1, ?2)",
                        params![key, want],
                    )
                    .map_err(|e| unavailable("write log metadata", e))?;
                }
                Some(have) if have != i64::from(want) => {
                    return Err(LogError::Inconsistent(format!(
                        "the log at {} has {have} {} partitions but the config asks for {want}; \
                         partition counts of an existing log cannot change",
                        path.display(),
                        topic.name()
                    )));
                }
                Some(_) => {}
            }
        }

        create_partition_tables(&conn, partitions)
            .map_err(|e| unavailable("create partition tables", e))?;
        convert_single_table(&conn, partitions, &path)?;
        let writer = Writer::new(conn, partitions)?;
        let commits = Arc::new(Commits {
            seq: Mutex::new(0),
            changed: Condvar::new(),
            writer_alive: AtomicBool::new(true),
        });
        let (jobs, rx) = crossbeam_channel::bounded(QUEUE_DEPTH);
        let thread_commits = Arc::clone(&commits);
        let interval = options.watermark_interval;
        std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || writer.run(rx, thread_commits, interval))
            .map_err(|e| unavailable("spawn log writer", e))?;

        Ok(EmbeddedLog {
            path,
            partitions,
            jobs,
            commits,
            append_timeout: options.append_timeout,
        })
    }
}

impl EmbeddedLog {
    /// Opens an existing log for reading only, without a writer thread: for tools such as
    /// `clickagg archive` that read the log of a running `serve` from another process
    /// (SQLite's WAL lets them). Appends fail; readers poll without commit notifications.
    pub fn open_read_only(dir: &Path) -> Result<EmbeddedLog, LogError> {
        let path = dir.join("log.db");
        if !path.exists() {
            return Err(LogError::Unavailable(format!(
                "no log at {}",
                path.display()
            )));
        }
        let conn = open_conn(&path, true)?;
        let mut partitions = [0u32, 0, 1];
        for topic in [Topic::Clicks, Topic::FraudVerdicts] {
            let key = format!("partitions_{}", topic.name());
            let n: i64 = conn
                .query_row("SELECT value FROM log_meta WHERE key = ?1", [&key], |r| {
                    r.get(0)
                })
                .map_err(|e| unavailable("read log metadata", e))?;
            partitions[topic.code() as usize] = u32::try_from(n).unwrap_or(0);
        }
        if has_single_table(&conn).map_err(|e| unavailable("read log schema", e))? {
            return Err(LogError::Unavailable(format!(
                "the log at {} is in the older single-table shape; open it once with a \
                 writer (`clickagg serve` or `clickagg import`) to convert it",
                path.display()
            )));
        }
        // No receiver: every append answers "log writer has stopped".
        let (jobs, _) = crossbeam_channel::bounded(1);
        Ok(EmbeddedLog {
            path,
            partitions,
            jobs,
            commits: Arc::new(Commits {
                seq: Mutex::new(0),
                changed: Condvar::new(),
                writer_alive: AtomicBool::new(false),
            }),
            append_timeout: Duration::from_secs(1),
        })
    }
}

impl Log for EmbeddedLog {
    fn partitions(&self, topic: Topic) -> u32 {
        self.partitions[topic.code() as usize]
    }

    fn append(&self, records: Vec<AppendRecord>) -> AppendFuture {
        let (reply, response) = oneshot::channel();
        let sent = self.jobs.try_send(AppendJob { records, reply });
        let timeout = self.append_timeout;
        Box::pin(async move {
            match sent {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => return Err(LogError::Overloaded),
                Err(TrySendError::Disconnected(_)) => {
                    return Err(LogError::Unavailable("log writer has stopped".into()));
                }
            }
            match tokio::time::timeout(timeout, response).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(LogError::Unavailable("log writer has stopped".into())),
                Err(_) => Err(LogError::Timeout(timeout)),
            }
        })
    }

    fn reader(
        &self,
        start: Vec<(PartitionId, LogPosition)>,
    ) -> Result<Box<dyn LogReader>, LogError> {
        let conn = open_conn(&self.path, true)?;
        conn.set_prepared_statement_cache_capacity(statement_cache(self.partitions));
        for (p, _) in &start {
            if p.partition >= self.partitions(p.topic) {
                return Err(LogError::Inconsistent(format!(
                    "no partition {p} in the log"
                )));
            }
        }
        Ok(Box::new(EmbeddedReader {
            conn,
            select_sql: start.iter().map(|(p, _)| select_records(*p)).collect(),
            parts: start,
            commits: Arc::clone(&self.commits),
        }))
    }

    fn end_offsets(&self) -> Result<Vec<(PartitionId, u64)>, LogError> {
        let conn = open_conn(&self.path, true)?;
        all_partitions(self.partitions)
            .map(|p| {
                let max: Option<i64> = conn
                    .query_row(&format!("SELECT max(offset) FROM {}", table(p)), [], |r| {
                        r.get(0)
                    })
                    .map_err(|e| unavailable("read end offsets", e))?;
                Ok((p, max.map_or(0, |m| m as u64 + 1)))
            })
            .collect()
    }

    fn check(&self) -> Result<(), LogError> {
        if !self.commits.writer_alive.load(Ordering::Acquire) {
            return Err(LogError::Unavailable("log writer has stopped".into()));
        }
        let conn = open_conn(&self.path, true)?;
        conn.query_row("SELECT count(*) FROM log_meta", [], |r| r.get::<_, i64>(0))
            .map_err(|e| unavailable("probe log", e))?;
        Ok(())
    }
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> LogError {
    LogError::Unavailable(format!("{what}: {e}"))
}

/// The table holding one partition's records.
fn table(p: PartitionId) -> String {
    format!("{}_{}", p.topic.name(), p.partition)
}

/// Every partition of a log with these partition counts, topic by topic.
fn all_partitions(partitions: [u32; 3]) -> impl Iterator<Item = PartitionId> {
    Topic::ALL.into_iter().flat_map(move |topic| {
        (0..partitions[topic.code() as usize])
            .map(move |partition| PartitionId { topic, partition })
    })
}

/// Room for one insert or select statement per partition plus the few fixed ones, so
/// cached statements are not evicted and prepared again on every group.
fn statement_cache(partitions: [u32; 3]) -> usize {
    partitions.iter().map(|&n| n as usize).sum::<usize>() + 16
}

fn create_partition_tables(conn: &Connection, partitions: [u32; 3]) -> rusqlite::Result<()> {
    let mut ddl = String::from("BEGIN;");
    for p in all_partitions(partitions) {
        ddl.push_str(&format!(
            "CREATE TABLE IF NOT EXISTS {} (
                 offset INTEGER PRIMARY KEY,
                 record_time_ms INTEGER NOT NULL,
                 payload BLOB NOT NULL
             );",
            table(p)
        ));
    }
    ddl.push_str("COMMIT;");
    conn.execute_batch(&ddl)
}

/// Whether the log still has the older single `records` table.
fn has_single_table(conn: &Connection) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'records'",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n > 0)
}

/// Moves the records of a log in the older shape (one `records` table keyed by topic,
/// partition and offset) into the per-partition tables, in one transaction: a crash
/// leaves either shape whole.
fn convert_single_table(
    conn: &Connection,
    partitions: [u32; 3],
    path: &Path,
) -> Result<(), LogError> {
    let convert = || -> Result<u64, LogError> {
        let sql = |e| unavailable("convert the log to per-partition tables", e);
        conn.execute_batch("BEGIN IMMEDIATE").map_err(sql)?;
        let mut moved = 0u64;
        for p in all_partitions(partitions) {
            moved += conn
                .execute(
                    &format!(
                        "INSERT INTO {} (offset, record_time_ms, payload)
                         SELECT offset, record_time_ms, payload FROM records
                         WHERE topic = ?1 AND partition = ?2 ORDER BY offset",
                        table(p)
                    ),
                    params![p.topic.code(), p.partition],
                )
                .map_err(sql)? as u64;
        }
        let total: i64 = conn
            .query_row("SELECT count(*) FROM records", [], |r| r.get(0))
            .map_err(sql)?;
        if total as u64 != moved {
            return Err(LogError::Inconsistent(format!(
                "the log at {} holds {} records of partitions this config does not have",
                path.display(),
                total as u64 - moved
            )));
        }
        conn.execute_batch("DROP TABLE records; COMMIT;")
            .map_err(sql)?;
        Ok(moved)
    };
    if !has_single_table(conn).map_err(|e| unavailable("read log schema", e))? {
        return Ok(());
    }
    match convert() {
        Ok(moved) => {
            tracing::info!(records = moved, log = %path.display(), "converted the log to one table per partition");
            Ok(())
        }
        Err(e) => {
            if !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK");
            }
            Err(e)
        }
    }
}

fn open_conn(path: &Path, read_only: bool) -> Result<Connection, LogError> {
    let flags = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    let conn = Connection::open_with_flags(path, flags)
        .map_err(|e| unavailable(&format!("open {}", path.display()), e))?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(|e| unavailable("set busy timeout", e))?;
    crate::sqlite::stable_plans(&conn).map_err(|e| unavailable("set stable plans", e))?;
    if !read_only {
        // WAL + FULL: every commit is fsynced before it is acknowledged.
        conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;")
            .map_err(|e| unavailable("set log pragmas", e))?;
    }
    Ok(conn)
}

/// The single writer: assigns offsets and record times and commits groups of appends.
struct Writer {
    conn: Connection,
    next_offset: Vec<Vec<u64>>,
    /// The insert into each partition's table, by topic code and partition.
    insert_sql: Vec<Vec<String>>,
    /// Running max of record times (and of the watermark) over the whole log: every record
    /// gets a time at least this, so times are monotone per partition too.
    last_time: Millis,
}

impl Writer {
    fn new(conn: Connection, partitions: [u32; 3]) -> Result<Writer, LogError> {
        conn.set_prepared_statement_cache_capacity(statement_cache(partitions));
        let mut next_offset: Vec<Vec<u64>> =
            partitions.iter().map(|&n| vec![0; n as usize]).collect();
        let mut insert_sql: Vec<Vec<String>> = partitions
            .iter()
            .map(|&n| Vec::with_capacity(n as usize))
            .collect();
        // Record times are monotone in every partition, so each partition's last record
        // holds its largest time, and the largest of those is the log's.
        let mut max_record: Millis = 0;
        for p in all_partitions(partitions) {
            let last: Option<(i64, i64)> = conn
                .query_row(
                    &format!(
                        "SELECT offset, record_time_ms FROM {} ORDER BY offset DESC LIMIT 1",
                        table(p)
                    ),
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
                .map_err(|e| unavailable("read log ends", e))?;
            if let Some((offset, time)) = last {
                next_offset[p.topic.code() as usize][p.partition as usize] = offset as u64 + 1;
                max_record = max_record.max(time as Millis);
            }
            insert_sql[p.topic.code() as usize].push(format!(
                "INSERT INTO {} (offset, record_time_ms, payload) VALUES (?1, ?2, ?3)",
                table(p)
            ));
        }
        let watermark: Option<i64> = conn
            .query_row(
                "SELECT value FROM log_meta WHERE key = 'watermark_ms'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| unavailable("read watermark", e))?;
        let last_time = max_record.max(watermark.unwrap_or(0) as Millis);
        Ok(Writer {
            conn,
            next_offset,
            insert_sql,
            last_time,
        })
    }

    fn run(mut self, jobs: Receiver<AppendJob>, commits: Arc<Commits>, interval: Option<Duration>) {
        let mut last_commit = Instant::now();
        loop {
            let received = match interval {
                Some(interval) => jobs.recv_timeout(interval),
                None => jobs.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            let first = match received {
                Ok(job) => Some(job),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let mut group = Vec::new();
            let mut n = 0;
            if let Some(job) = first {
                n += job.records.len();
                group.push(job);
                while n < GROUP_RECORDS {
                    match jobs.try_recv() {
                        Ok(job) => {
                            n += job.records.len();
                            group.push(job);
                        }
                        Err(_) => break,
                    }
                }
            } else if interval.is_some_and(|i| last_commit.elapsed() < i) {
                continue;
            }
            match self.commit(&group) {
                Ok(mut appended) => {
                    commits.bump();
                    for job in group.into_iter().rev() {
                        let rest = appended.split_off(appended.len() - job.records.len());
                        let _ = job.reply.send(Ok(rest));
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, records = n, "log group commit failed; appends refused");
                    for job in group {
                        let _ = job.reply.send(Err(LogError::Unavailable(e.to_string())));
                    }
                }
            }
            last_commit = Instant::now();
        }
        commits.writer_alive.store(false, Ordering::Release);
    }

    /// Writes one group and the new watermark in one transaction. A record without a
    /// record time of its own gets the clock's; every time is raised to the running max.
    fn commit(&mut self, group: &[AppendJob]) -> Result<Vec<Appended>, rusqlite::Error> {
        let clock = now_ms();
        let mut time = self.last_time;
        if group.is_empty() {
            time = time.max(clock);
        }
        let mut next = self.next_offset.clone();
        let mut appended = Vec::with_capacity(group.iter().map(|j| j.records.len()).sum());
        for record in group.iter().flat_map(|j| &j.records) {
            let p = record.partition;
            let slot = next
                .get_mut(p.topic.code() as usize)
                .and_then(|t| t.get_mut(p.partition as usize))
                .ok_or(rusqlite::Error::InvalidParameterName(format!(
                    "no partition {p}"
                )))?;
            time = time.max(record.record_time_ms.unwrap_or(clock));
            appended.push(Appended {
                partition: p,
                offset: *slot,
                record_time_ms: time,
            });
            *slot += 1;
        }
        // BEGIN, COMMIT and the watermark's upsert are cached statements: parsing them
        // again on every group commit was 5% of the writer's CPU under single GETs.
        self.conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
        let ended = self.insert(group, &appended, time).and_then(|()| {
            self.conn
                .prepare_cached("COMMIT")
                .and_then(|mut commit| commit.execute([]))
        });
        if let Err(e) = ended {
            // Leave no transaction open: the next group starts clean.
            if !self.conn.is_autocommit() {
                let _ = self.conn.execute_batch("ROLLBACK");
            }
            return Err(e);
        }
        self.next_offset = next;
        self.last_time = time;
        Ok(appended)
    }

    /// Inserts the group's records where `appended` placed them and sets the watermark.
    fn insert(
        &self,
        group: &[AppendJob],
        appended: &[Appended],
        time: Millis,
    ) -> rusqlite::Result<()> {
        for (record, at) in group.iter().flat_map(|j| &j.records).zip(appended) {
            // `commit` placed every record in a partition that exists.
            let sql = &self.insert_sql[at.partition.topic.code() as usize]
                [at.partition.partition as usize];
            self.conn.prepare_cached(sql)?.execute(params![
                at.offset as i64,
                at.record_time_ms as i64,
                record.payload
            ])?;
        }
        self.conn
            .prepare_cached(
                "INSERT INTO log_meta (key, value) VALUES ('watermark_ms', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )?
            .execute([time as i64])?;
        Ok(())
    }
}

/// Reads its partitions through snapshot transactions.
struct EmbeddedReader {
    conn: Connection,
    parts: Vec<(PartitionId, LogPosition)>,
    /// `select_records` of each of `parts`.
    select_sql: Vec<String>,
    commits: Arc<Commits>,
}

/// The next records of a partition from its table: 1 first offset, 2 limit.
fn select_records(p: PartitionId) -> String {
    format!(
        "SELECT offset, record_time_ms, payload FROM {} WHERE offset >= ?1 ORDER BY offset LIMIT ?2",
        table(p)
    )
}

impl EmbeddedReader {
    fn read_snapshot(&mut self) -> Result<(Vec<PartitionBatch>, bool), rusqlite::Error> {
        let tx = self.conn.transaction()?;
        let mut batches = Vec::with_capacity(self.parts.len());
        let mut any = false;
        {
            let watermark: Option<i64> = tx
                .query_row(
                    "SELECT value FROM log_meta WHERE key = 'watermark_ms'",
                    [],
                    |r| r.get(0),
                )
                .optional()?;
            for ((partition, pos), sql) in self.parts.iter_mut().zip(&self.select_sql) {
                let mut select = tx.prepare_cached(sql)?;
                let rows =
                    select.query_map(params![pos.offset as i64, READ_BATCH as i64], |r| {
                        Ok(LogRecord {
                            offset: r.get::<_, i64>(0)? as u64,
                            record_time_ms: r.get::<_, i64>(1)? as u64,
                            payload: r.get(2)?,
                        })
                    })?;
                let records = rows.collect::<Result<Vec<_>, _>>()?;
                if let Some(last) = records.last() {
                    pos.offset = last.offset + 1;
                    pos.time_floor_ms = pos.time_floor_ms.max(last.record_time_ms);
                }
                any |= !records.is_empty();
                let caught_up = records.len() < READ_BATCH;
                batches.push(PartitionBatch {
                    partition: *partition,
                    records,
                    next: *pos,
                    idle_until_ms: if caught_up {
                        watermark.map(|w| w as u64)
                    } else {
                        None
                    },
                });
            }
        }
        tx.commit()?;
        Ok((batches, any))
    }
}

impl LogReader for EmbeddedReader {
    fn poll(&mut self, max_wait: Duration) -> Result<Vec<PartitionBatch>, LogError> {
        let seen = self.commits.current();
        let (batches, any) = self
            .read_snapshot()
            .map_err(|e| unavailable("read log", e))?;
        if any {
            return Ok(batches);
        }
        self.commits.wait_past(seen, max_wait);
        let (batches, _) = self
            .read_snapshot()
            .map_err(|e| unavailable("read log", e))?;
        Ok(batches)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> EmbeddedLogOptions {
        EmbeddedLogOptions {
            click_partitions: 2,
            verdict_partitions: 1,
            watermark_interval: Some(Duration::from_millis(20)),
            append_timeout: Duration::from_secs(5),
        }
    }

    /// One poll of a new reader of click partitions 0 and 1 from their start.
    fn poll_clicks_0_and_1(log: &EmbeddedLog) -> Vec<PartitionBatch> {
        let mut reader = log
            .reader(vec![
                (part(0), LogPosition::default()),
                (part(1), LogPosition::default()),
            ])
            .expect("reader");
        reader.poll(Duration::from_millis(10)).expect("poll")
    }

    fn part(p: u32) -> PartitionId {
        PartitionId {
            topic: Topic::Clicks,
            partition: p,
        }
    }

    fn append(log: &EmbeddedLog, p: u32, payloads: &[&[u8]]) -> Vec<Appended> {
        let records = payloads
            .iter()
            .map(|b| AppendRecord {
                partition: part(p),
                key: None,
                record_time_ms: None,
                payload: b.to_vec(),
            })
            .collect();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(log.append(records)).expect("append")
    }

    #[test]
    fn appends_are_durable_ordered_and_monotone_across_reopen() {
        let dir = tempfile::tempdir().expect("tmp");
        let first = {
            let log = EmbeddedLog::open(dir.path(), options()).expect("open");
            let a = append(&log, 0, &[b"a", b"b"]);
            let b = append(&log, 1, &[b"c"]);
            assert_eq!(a.iter().map(|x| x.offset).collect::<Vec<_>>(), vec![0, 1]);
            assert_eq!(b[0].offset, 0);
            b[0].record_time_ms
        };
        let log = EmbeddedLog::open(dir.path(), options()).expect("reopen");
        let c = append(&log, 0, &[b"d"]);
        assert_eq!(c[0].offset, 2, "offsets continue after reopen");
        assert!(c[0].record_time_ms >= first, "record times never go back");

        let batches = poll_clicks_0_and_1(&log);
        let p0: Vec<&[u8]> = batches[0]
            .records
            .iter()
            .map(|r| r.payload.as_slice())
            .collect();
        assert_eq!(p0, vec![b"a" as &[u8], b"b", b"d"]);
        assert_eq!(batches[0].next.offset, 3);
        assert_eq!(batches[1].records.len(), 1);
        let w = batches[0]
            .idle_until_ms
            .expect("caught up readers see the watermark");
        assert!(w >= c[0].record_time_ms);
        assert_eq!(
            log.end_offsets().expect("ends")[..2],
            [(part(0), 3), (part(1), 1)]
        );
    }

    /// One large group across partitions: every record lands at its partition's next
    /// offset, in append order, with its own payload. The oracle is the input split by
    /// partition.
    #[test]
    fn a_group_of_many_records_keeps_each_partitions_order() {
        let dir = tempfile::tempdir().expect("tmp");
        let log = EmbeddedLog::open(dir.path(), options()).expect("open");
        let n = 133;
        let input: Vec<(u32, Vec<u8>)> = (0..n)
            .map(|i| (u32::from(i % 3 == 0), format!("r{i}").into_bytes()))
            .collect();
        let records = input
            .iter()
            .map(|(p, b)| AppendRecord {
                partition: part(*p),
                key: None,
                record_time_ms: None,
                payload: b.clone(),
            })
            .collect();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let appended = rt.block_on(log.append(records)).expect("append");
        let mut next = [0u64; 2];
        for ((p, _), a) in input.iter().zip(&appended) {
            assert_eq!((a.partition, a.offset), (part(*p), next[*p as usize]));
            next[*p as usize] += 1;
        }
        let mut reader = log
            .reader(vec![
                (part(0), LogPosition::default()),
                (part(1), LogPosition::default()),
            ])
            .expect("reader");
        let mut got: [Vec<Vec<u8>>; 2] = Default::default();
        for _ in 0..100 {
            if got[0].len() + got[1].len() >= n {
                break;
            }
            for batch in reader.poll(Duration::from_millis(10)).expect("poll") {
                let slot = &mut got[batch.partition.partition as usize];
                slot.extend(batch.records.into_iter().map(|r| r.payload));
            }
        }
        for p in 0..2u32 {
            let want: Vec<Vec<u8>> = input
                .iter()
                .filter(|(q, _)| *q == p)
                .map(|(_, b)| b.clone())
                .collect();
            assert_eq!(got[p as usize], want, "partition {p}");
        }
    }

    /// A reader's statement is planned once: polling again binds new offsets, which must
    /// not make SQLite parse and plan it anew (see `crate::sqlite::stable_plans`).
    #[test]
    fn a_reader_plans_its_select_once() {
        let dir = tempfile::tempdir().expect("tmp");
        let log = EmbeddedLog::open(dir.path(), options()).expect("open");
        append(&log, 0, &[b"a", b"b", b"c"]);
        let conn = open_conn(&log.path, true).expect("reader connection");
        let mut select = conn
            .prepare_cached(&select_records(part(0)))
            .expect("prepare");
        for (from, limit) in [(0i64, 2i64), (1, 4096), (2, 7), (0, 4096)] {
            let rows = select
                .query_map(params![from, limit], |r| r.get::<_, i64>(0))
                .expect("query")
                .collect::<Result<Vec<_>, _>>()
                .expect("rows");
            assert_eq!(rows.len() as i64, (3 - from).min(limit));
        }
        assert_eq!(
            select.get_status(rusqlite::StatementStatus::RePrepare),
            0,
            "the select was prepared again when its parameters changed"
        );
    }

    #[test]
    fn idle_watermark_advances_and_wakes_readers() {
        let dir = tempfile::tempdir().expect("tmp");
        let log = EmbeddedLog::open(dir.path(), options()).expect("open");
        append(&log, 0, &[b"x"]);
        let mut reader = log
            .reader(vec![(part(0), LogPosition::default())])
            .expect("reader");
        let w1 = reader.poll(Duration::from_millis(10)).expect("poll")[0]
            .idle_until_ms
            .expect("w");
        std::thread::sleep(Duration::from_millis(50));
        let w2 = reader.poll(Duration::from_millis(100)).expect("poll")[0]
            .idle_until_ms
            .expect("w");
        assert!(
            w2 > w1,
            "an idle log still advances its watermark ({w1} -> {w2})"
        );
    }

    #[test]
    fn explicit_record_times_are_kept_raised_to_the_running_max() {
        let dir = tempfile::tempdir().expect("tmp");
        let backfill = EmbeddedLogOptions {
            watermark_interval: None,
            ..options()
        };
        let log = EmbeddedLog::open(dir.path(), backfill).expect("open");
        let at = |p: u32, t: Millis| AppendRecord {
            partition: part(p),
            key: None,
            record_time_ms: Some(t),
            payload: t.to_string().into_bytes(),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let done = rt
            .block_on(log.append(vec![at(0, 1_000), at(1, 3_000), at(0, 2_000), at(0, 4_000)]))
            .expect("append");
        let times: Vec<Millis> = done.iter().map(|a| a.record_time_ms).collect();
        assert_eq!(
            times,
            vec![1_000, 3_000, 3_000, 4_000],
            "historical times are kept, raised to the running max over the log"
        );
        // No clock ticks in a backfill: after a pause the watermark is still the last time.
        std::thread::sleep(Duration::from_millis(60));
        let mut reader = log
            .reader(vec![(part(0), LogPosition::default())])
            .expect("reader");
        let batch = &reader.poll(Duration::from_millis(10)).expect("poll")[0];
        assert_eq!(batch.records.len(), 3);
        assert_eq!(batch.idle_until_ms, Some(4_000));
        drop(reader);
        drop(log);

        // A live log reopened on it goes on from the clock, and a late backfill record is
        // raised to what the log already holds.
        let log = EmbeddedLog::open(dir.path(), options()).expect("reopen");
        let live = append(&log, 0, &[b"live"]);
        assert!(live[0].record_time_ms.abs_diff(now_ms()) < 10_000);
        let late = rt.block_on(log.append(vec![at(1, 5_000)])).expect("append");
        assert!(late[0].record_time_ms >= live[0].record_time_ms);
    }

    /// A log written in the older shape (one `records` table; the DDL below is that
    /// shape's, verbatim) opens with every record where it was, offsets and times going
    /// on from it, and no `records` table left.
    fn older_log(dir: &Path, rows: &[(u8, u32, i64, i64, &[u8])]) {
        let conn = Connection::open(dir.join("log.db")).expect("create");
        conn.execute_batch(
            "CREATE TABLE records (
                 topic INTEGER NOT NULL,
                 partition INTEGER NOT NULL,
                 offset INTEGER NOT NULL,
                 record_time_ms INTEGER NOT NULL,
                 payload BLOB NOT NULL,
                 PRIMARY KEY (topic, partition, offset)
             ) WITHOUT ROWID;
             CREATE TABLE log_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
             INSERT INTO log_meta VALUES ('partitions_clicks', 2), ('partitions_fraud_verdicts', 1),
                                         ('watermark_ms', 9000);",
        )
        .expect("older schema");
        for (topic, partition, offset, time, payload) in rows {
            conn.execute(
                "INSERT INTO records VALUES (?1, ?2, ?3, ?4, ?5)",
                params![topic, partition, offset, time, payload],
            )
            .expect("older row");
        }
    }

    #[test]
    fn a_log_in_the_older_single_table_shape_is_converted_whole() {
        let dir = tempfile::tempdir().expect("tmp");
        older_log(
            dir.path(),
            &[
                (0, 0, 0, 1000, b"a"),
                (0, 1, 0, 2000, b"b"),
                (0, 0, 1, 3000, b"c"),
                (1, 0, 0, 3500, b"v"),
            ],
        );
        let log = EmbeddedLog::open(dir.path(), options()).expect("open converts");
        let conn = open_conn(&log.path, true).expect("conn");
        assert!(
            !has_single_table(&conn).expect("schema"),
            "records table left"
        );
        assert_eq!(
            log.end_offsets().expect("ends")[..3],
            [
                (part(0), 2),
                (part(1), 1),
                (
                    PartitionId {
                        topic: Topic::FraudVerdicts,
                        partition: 0
                    },
                    1
                )
            ]
        );
        let next = append(&log, 0, &[b"d"]);
        assert_eq!(
            next[0].offset, 2,
            "offsets go on from the converted records"
        );
        assert!(next[0].record_time_ms >= 9000, "times never go back");
        let batches = poll_clicks_0_and_1(&log);
        let read = |b: &PartitionBatch| -> Vec<(u64, u64, Vec<u8>)> {
            b.records
                .iter()
                .map(|r| (r.offset, r.record_time_ms, r.payload.clone()))
                .collect()
        };
        assert_eq!(
            read(&batches[0]),
            vec![
                (0, 1000, b"a".to_vec()),
                (1, 3000, b"c".to_vec()),
                (2, next[0].record_time_ms, b"d".to_vec())
            ]
        );
        assert_eq!(read(&batches[1]), vec![(0, 2000, b"b".to_vec())]);
    }

    #[test]
    fn an_older_log_with_records_outside_the_partitions_is_refused_and_left_whole() {
        let dir = tempfile::tempdir().expect("tmp");
        older_log(dir.path(), &[(0, 0, 0, 1000, b"a"), (0, 5, 0, 1000, b"x")]);
        let err = EmbeddedLog::open(dir.path(), options())
            .err()
            .expect("refused");
        assert!(
            matches!(err, LogError::Inconsistent(_)) && err.to_string().contains("1 records"),
            "{err}"
        );
        let conn = Connection::open(dir.path().join("log.db")).expect("open");
        let kept: i64 = conn
            .query_row("SELECT count(*) FROM records", [], |r| r.get(0))
            .expect("older table kept");
        assert_eq!(kept, 2);
        let err = EmbeddedLog::open_read_only(dir.path())
            .err()
            .expect("refused");
        assert!(
            err.to_string().contains("older single-table shape"),
            "{err}"
        );
    }

    #[test]
    fn partition_counts_cannot_change() {
        let dir = tempfile::tempdir().expect("tmp");
        drop(EmbeddedLog::open(dir.path(), options()).expect("open"));
        let mut other = options();
        other.click_partitions = 3;
        let err = EmbeddedLog::open(dir.path(), other).err().expect("refused");
        assert!(err.to_string().contains("partitions"), "{err}");
    }
}
