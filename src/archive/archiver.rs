//! The archiver: reads the clicks and verdicts of the log and publishes them as Parquet
//! files, one contiguous offset range of one partition and one hour per file.
//!
//! It never blocks the executor: log polls, Parquet encoding and footer reads run on the
//! blocking pool. It keeps its position only in the archive itself (file footers and the
//! manifest), so a crash at any point is followed by a resume right after the last file
//! that was published; a file half-written when the crash came was never published.

use std::collections::BTreeMap;
use std::io::BufWriter;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tempfile::NamedTempFile;

use super::parquet::{ArchivedClick, ArchivedVerdict, FileKind, FileWriter, Footer, Rows};
use super::{Archive, ArchiveConfig, ArchiveError, Progress, TOPICS, file_path, hour_of};
use crate::log::{Log, LogPosition, LogReader, PartitionBatch};
use crate::record::{ClickEvent, FraudVerdict, PartitionId, Payload, Topic, is_heartbeat};
use crate::time::Millis;

/// How one archiver run ends.
#[derive(Clone, Debug, Default)]
pub struct ArchiveRun {
    /// Stop once every partition is archived up to the log's end offsets taken at the
    /// start (`clickagg archive --once`); otherwise run until `stop` is set.
    pub once: bool,
    /// Set to stop a run that is not `once`.
    pub stop: Option<Arc<std::sync::atomic::AtomicBool>>,
}

/// What a run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ArchiveStats {
    /// Files published.
    pub files: u64,
    /// Records in them.
    pub records: u64,
}

/// Rows an open file collects before they go to its writer: enough for the Parquet
/// encoder to work in large batches, few enough that the buffer stays small.
const WRITE_ROWS: usize = 4096;

/// A poll that returns fewer records than this means the reader has caught up with the log.
const CAUGHT_UP_BELOW: usize = 1024;

/// The longest a caught-up archiver waits between polls (less with a short flush interval).
const MAX_POLL_GAP: Duration = Duration::from_secs(1);

/// Records of one file not yet handed to its writer.
enum Buffer {
    Clicks(Vec<ArchivedClick>),
    Verdicts(Vec<ArchivedVerdict>),
}

impl Buffer {
    fn len(&self) -> usize {
        match self {
            Buffer::Clicks(v) => v.len(),
            Buffer::Verdicts(v) => v.len(),
        }
    }

    fn kind(&self) -> FileKind {
        match self {
            Buffer::Clicks(_) => FileKind::Clicks,
            Buffer::Verdicts(_) => FileKind::Verdicts,
        }
    }

    /// The rows, leaving an empty buffer of the same kind.
    fn take(&mut self) -> Buffer {
        match self {
            Buffer::Clicks(v) => Buffer::Clicks(std::mem::take(v)),
            Buffer::Verdicts(v) => Buffer::Verdicts(std::mem::take(v)),
        }
    }

    fn rows(&self) -> Rows<'_> {
        match self {
            Buffer::Clicks(v) => Rows::Clicks(v),
            Buffer::Verdicts(v) => Rows::Verdicts(v),
        }
    }
}

/// A file's writer, into a spool file of the archive.
type SpoolWriter = FileWriter<BufWriter<NamedTempFile>>;

/// An open file: its first record, its hour, its records, since when it is open.
///
/// Its rows go to a spool file in Parquet row groups as they come ([`spill`]), so what it
/// holds in memory is at most [`WRITE_ROWS`] records and one row group, however long it
/// stays open. (Holding the records until the file was written made the serving process's
/// RSS climb by a minute of traffic and drop at each publish: the soak's sawtooth.)
struct Open {
    first_offset: u64,
    hour_ms: Millis,
    /// Records not yet handed to the writer.
    rows: Buffer,
    /// Records in the file, written or not.
    records: u64,
    /// The writer, from the first spill on.
    file: Option<SpoolWriter>,
    since: Instant,
}

/// One partition's state.
struct Part {
    /// The offset after the last record read.
    next: u64,
    /// Running max of record times through `next`.
    floor: Millis,
    /// Every record before this record time is published (valid while `open` is `None`).
    covered: Millis,
    open: Option<Open>,
    /// What the manifest last said, and when it was written.
    manifest: Progress,
    manifest_at: Instant,
}

/// Runs archiver passes until stopped, restarting a failed pass after a backoff. A pass
/// fails when the log or the archive store does, or when another archiver published a
/// file first; the next pass resumes from what the archive holds.
pub async fn run_archiver(
    log: Arc<dyn Log>,
    archive: Archive,
    config: ArchiveConfig,
    run: ArchiveRun,
) -> Result<ArchiveStats, ArchiveError> {
    let mut total = ArchiveStats::default();
    // A file is published or dropped within a flush interval of its opening, so a spool
    // file idle for several intervals belongs to no live archiver.
    let idle = config
        .flush_interval
        .saturating_mul(4)
        .max(Duration::from_secs(600));
    let spool = archive.clone();
    let cleared = tokio::task::spawn_blocking(move || spool.clear_stale_spool(idle)).await;
    match cleared.map_err(ArchiveError::from).and_then(|r| r) {
        Ok(0) => {}
        Ok(n) => tracing::info!(files = n, "archiver removed spool files left by a crash"),
        Err(e) => tracing::warn!(error = %e, "cannot clear the archive spool"),
    }
    let mut backoff = Duration::from_millis(200);
    loop {
        match pass(&log, &archive, &config, &run, &mut total).await {
            Ok(()) => return Ok(total),
            Err(e @ ArchiveError::Taken(_)) => {
                tracing::warn!(error = %e, "archiver resyncs");
            }
            Err(e) if run.once => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "archiver pass failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
        if stopped(&run) {
            return Ok(total);
        }
    }
}

fn stopped(run: &ArchiveRun) -> bool {
    run.stop
        .as_ref()
        .is_some_and(|s| s.load(std::sync::atomic::Ordering::Acquire))
}

async fn pass(
    log: &Arc<dyn Log>,
    archive: &Archive,
    config: &ArchiveConfig,
    run: &ArchiveRun,
    total: &mut ArchiveStats,
) -> Result<(), ArchiveError> {
    let files = archive.files().await?;
    let mut parts: BTreeMap<PartitionId, Part> = BTreeMap::new();
    for (topic, _) in TOPICS {
        for partition in 0..log.partitions(topic) {
            let p = PartitionId { topic, partition };
            let progress = archive.progress(p, &files).await?.unwrap_or_default();
            parts.insert(
                p,
                Part {
                    next: progress.next_offset,
                    floor: progress.time_floor_ms,
                    covered: progress.covered_through_ms,
                    open: None,
                    manifest: progress,
                    manifest_at: Instant::now(),
                },
            );
        }
    }
    let stop_at: Option<BTreeMap<PartitionId, u64>> = if run.once {
        let l = Arc::clone(log);
        let ends = tokio::task::spawn_blocking(move || l.end_offsets()).await??;
        Some(
            ends.into_iter()
                .filter(|(p, _)| parts.contains_key(p))
                .collect(),
        )
    } else {
        None
    };
    let start: Vec<(PartitionId, LogPosition)> = parts
        .iter()
        .map(|(p, s)| {
            (
                *p,
                LogPosition {
                    offset: s.next,
                    time_floor_ms: s.floor,
                },
            )
        })
        .collect();
    tracing::info!(location = %archive.location, partitions = parts.len(), "archiver resumes");
    let l = Arc::clone(log);
    let mut reader: Box<dyn LogReader> =
        tokio::task::spawn_blocking(move || l.reader(start)).await??;

    // Files are written a flush interval after they open, so reading the log after every
    // group commit bought nothing and cost CPU: with single-click traffic that is up to a
    // thousand polls a second, each a transaction over every partition (0.15 cores at
    // 2,000 GETs/s, `INGEST_CONFIG` in bench/ingest.rs). A caught-up archiver waits
    // between polls; a backlog is read without pause.
    let min_gap = (config.flush_interval / 8).min(MAX_POLL_GAP);
    let mut last_poll = Instant::now();
    let mut last_records = usize::MAX;
    loop {
        if last_records < CAUGHT_UP_BELOW
            && let Some(rest) = min_gap.checked_sub(last_poll.elapsed())
        {
            tokio::time::sleep(rest).await;
        }
        last_poll = Instant::now();
        let (r, polled) = tokio::task::spawn_blocking(move || {
            let polled = reader.poll(Duration::from_millis(200));
            (reader, polled)
        })
        .await?;
        reader = r;
        let polled = polled?;
        last_records = polled.iter().map(|b| b.records.len()).sum();
        for batch in polled {
            let Some(part) = parts.get_mut(&batch.partition) else {
                continue;
            };
            take_batch(archive, config, batch, part, total).await?;
        }
        let done = stop_at.as_ref().is_some_and(|ends| {
            ends.iter()
                .all(|(p, end)| parts.get(p).is_none_or(|s| s.next >= *end))
        });
        for (p, part) in parts.iter_mut() {
            let due = part
                .open
                .as_ref()
                .is_some_and(|o| done || o.since.elapsed() >= config.flush_interval);
            if due {
                flush(archive, *p, part, total).await?;
            }
            let moved = part.next > part.manifest.next_offset
                || part.covered > part.manifest.covered_through_ms;
            if part.open.is_none()
                && moved
                && (done || part.manifest_at.elapsed() >= config.flush_interval)
            {
                write_manifest(archive, *p, part).await;
            }
        }
        if done || stopped(run) {
            return Ok(());
        }
    }
}

/// Adds one polled batch to its partition, publishing files as they fill or change hour.
async fn take_batch(
    archive: &Archive,
    config: &ArchiveConfig,
    batch: PartitionBatch,
    part: &mut Part,
    total: &mut ArchiveStats,
) -> Result<(), ArchiveError> {
    let p = batch.partition;
    for record in batch.records {
        if record.offset < part.next {
            continue;
        }
        let floor = part.floor.max(record.record_time_ms);
        let hour = hour_of(floor);
        if part.open.as_ref().is_some_and(|o| o.hour_ms != hour) {
            // One hour per file: the hour changed, so the open file is complete.
            flush(archive, p, part, total).await?;
        }
        if !is_heartbeat(&record.payload) {
            let rows = match p.topic {
                Topic::Clicks => ClickEvent::decode(&record.payload).map(|event| {
                    Buffer::Clicks(vec![ArchivedClick {
                        partition: p.partition,
                        offset: record.offset,
                        record_time_ms: floor,
                        event,
                    }])
                }),
                _ => FraudVerdict::decode(&record.payload).map(|verdict| {
                    Buffer::Verdicts(vec![ArchivedVerdict {
                        partition: p.partition,
                        offset: record.offset,
                        record_time_ms: floor,
                        verdict,
                    }])
                }),
            };
            match rows {
                Ok(row) => {
                    let open = part.open.get_or_insert_with(|| Open {
                        first_offset: record.offset,
                        hour_ms: hour,
                        rows: match row {
                            Buffer::Clicks(_) => Buffer::Clicks(Vec::new()),
                            Buffer::Verdicts(_) => Buffer::Verdicts(Vec::new()),
                        },
                        records: 0,
                        file: None,
                        since: Instant::now(),
                    });
                    match (&mut open.rows, row) {
                        (Buffer::Clicks(v), Buffer::Clicks(mut r)) => v.append(&mut r),
                        (Buffer::Verdicts(v), Buffer::Verdicts(mut r)) => v.append(&mut r),
                        _ => {}
                    }
                    open.records += 1;
                    if open.rows.len() >= WRITE_ROWS {
                        spill(archive, open).await?;
                    }
                }
                Err(e) => {
                    tracing::warn!(partition = %p, offset = record.offset, error = %e, "not archiving a record that does not decode");
                }
            }
        }
        part.next = record.offset + 1;
        part.floor = floor;
        if part
            .open
            .as_ref()
            .is_some_and(|o| o.records >= config.max_records_per_file as u64)
        {
            flush(archive, p, part, total).await?;
        }
    }
    part.next = part.next.max(batch.next.offset);
    if part.open.is_none() {
        part.covered = part.covered.max(part.floor);
        if let Some(w) = batch.idle_until_ms {
            part.covered = part.covered.max(w);
        }
    }
    Ok(())
}

/// Publishes the open file of a partition, then its manifest.
async fn flush(
    archive: &Archive,
    p: PartitionId,
    part: &mut Part,
    total: &mut ArchiveStats,
) -> Result<(), ArchiveError> {
    let Some(open) = part.open.take() else {
        return Ok(());
    };
    let footer = Footer {
        next_offset: part.next,
        time_floor_ms: part.floor,
        records: open.records,
    };
    let path = file_path(p, open.hour_ms, open.first_offset);
    let Open { rows, file, .. } = open;
    let spooled = {
        let archive = archive.clone();
        tokio::task::spawn_blocking(move || {
            write_rows(&archive, file, rows)?
                .finish(footer)?
                .into_inner()
                .map_err(|e| ArchiveError::Spool {
                    path: archive.location.clone(),
                    source: e.into_error(),
                })
        })
        .await??
    };
    archive.publish(&path, spooled).await?;
    total.files += 1;
    total.records += footer.records;
    part.covered = part.covered.max(part.floor);
    tracing::debug!(%path, records = footer.records, next_offset = footer.next_offset, "archived");
    write_manifest(archive, p, part).await;
    Ok(())
}

/// Hands the records an open file has collected to its writer, on the blocking pool.
/// On an error the file is gone with its records; the pass fails and the next one reads
/// them again from the log.
async fn spill(archive: &Archive, open: &mut Open) -> Result<(), ArchiveError> {
    let rows = open.rows.take();
    let file = open.file.take();
    let archive = archive.clone();
    let file = tokio::task::spawn_blocking(move || write_rows(&archive, file, rows)).await??;
    open.file = Some(file);
    Ok(())
}

/// Writes rows to an open file's writer, starting one in a new spool file for its first
/// rows (blocking).
fn write_rows(
    archive: &Archive,
    file: Option<SpoolWriter>,
    rows: Buffer,
) -> Result<SpoolWriter, ArchiveError> {
    let mut file = match file {
        Some(file) => file,
        None => FileWriter::new(BufWriter::new(archive.spool_file()?), rows.kind())?,
    };
    file.write(rows.rows())?;
    Ok(file)
}

/// Records where a partition stands. Only a hint for resuming (the footers are the
/// truth), so a failure is logged, not fatal.
async fn write_manifest(archive: &Archive, p: PartitionId, part: &mut Part) {
    let progress = Progress {
        next_offset: part.next,
        time_floor_ms: part.floor,
        covered_through_ms: part.covered,
    };
    match archive.write_manifest(p, progress).await {
        Ok(()) => {
            part.manifest = progress;
            part.manifest_at = Instant::now();
        }
        Err(e) => tracing::warn!(partition = %p, error = %e, "cannot write the archive manifest"),
    }
}
