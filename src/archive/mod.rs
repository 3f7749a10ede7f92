//! The raw click archive: every click and fraud verdict of the log as Parquet, partitioned
//! by hour of record time, in a local directory or an S3-compatible object store.
//!
//! Layout (readable by DuckDB, Polars and Spark as it is, hive-style partitions):
//!
//! ```text
//! clicks/date=YYYY-MM-DD/hour=HH/part-<partition>-<first offset>.parquet
//! verdicts/date=YYYY-MM-DD/hour=HH/part-<partition>-<first offset>.parquet
//! _manifest/<topic>-<partition>.json     where the archiver resumes (a hint, see below)
//! ```
//!
//! Exactly once per offset range: a file holds a contiguous range of one partition's
//! offsets, its name is derived from the offset of its first record, and its footer records
//! the next offset after its range. Files are published with a create-only put (an atomic
//! rename or hard link locally, a single PUT on S3), so a crash mid-write leaves no file,
//! and a second writer of the same range finds the name taken. A restart resumes from the
//! newest file's footer (or the manifest, whichever is further), so a file is never
//! written twice and no offset is skipped. See `docs/archive.md`.

mod archiver;
pub mod parquet;

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Deserializer, Serialize};
use tempfile::NamedTempFile;

use crate::record::{PartitionId, Topic};
use crate::time::Millis;

pub use archiver::{ArchiveRun, run_archiver};

/// The `[archive]` section of the config.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchiveConfig {
    /// Whether `serve` runs an archiver.
    pub enabled: bool,
    /// A local directory or `s3://bucket/prefix`; empty means `<data_dir>/archive`.
    pub location: String,
    /// A partition's open file is written at the latest this long after its first record.
    #[serde(deserialize_with = "duration")]
    pub flush_interval: Duration,
    /// Records per file at most.
    pub max_records_per_file: usize,
}

/// The `[retention]` section of the config.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Archived raw records older than this (by hour of record time) are deleted.
    #[serde(deserialize_with = "duration")]
    pub raw: Duration,
    /// Store rows whose window started longer ago than this are deleted.
    #[serde(deserialize_with = "duration")]
    pub aggregates: Duration,
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(s.trim()).map_err(|e| {
        serde::de::Error::custom(format!("{s:?} is not a duration like 30s or 7d ({e})"))
    })
}

/// Checks the archive and retention settings; the error names the key.
pub fn validate_config(
    archive: &ArchiveConfig,
    retention: &RetentionConfig,
) -> Result<(), (&'static str, String)> {
    if archive.flush_interval < Duration::from_millis(10) {
        return Err(("archive.flush_interval", "must be at least 10ms".into()));
    }
    if archive.max_records_per_file == 0 {
        return Err(("archive.max_records_per_file", "must be at least 1".into()));
    }
    if retention.raw < Duration::from_secs(3600) {
        return Err(("retention.raw", "must be at least 1h".into()));
    }
    // Aggregates are deleted by whole days, and a window must be final long before it goes.
    if retention.aggregates < Duration::from_secs(2 * 86_400) {
        return Err(("retention.aggregates", "must be at least 2 days".into()));
    }
    Ok(())
}

/// What went wrong with the archive.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The object store failed.
    #[error("archive store: {0}")]
    Store(#[from] object_store::Error),
    /// The archive location is not usable.
    #[error("archive location {location:?}: {message}")]
    Location {
        /// The configured location.
        location: String,
        /// Why.
        message: String,
    },
    /// A Parquet file could not be written or read.
    #[error("parquet: {0}")]
    Parquet(String),
    /// The log failed.
    #[error(transparent)]
    Log(#[from] crate::log::LogError),
    /// Another archiver published a file for the same offset range first.
    #[error("{0} was written by another archiver; resuming after it")]
    Taken(String),
    /// A blocking task failed.
    #[error("archive task failed: {0}")]
    Task(String),
    /// A file being written could not be spooled to local disk or published from there.
    #[error("archive spool {path}: {source}")]
    Spool {
        /// The spool file or directory.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

impl From<tokio::task::JoinError> for ArchiveError {
    fn from(e: tokio::task::JoinError) -> ArchiveError {
        ArchiveError::Task(e.to_string())
    }
}

fn spool_err(path: &FsPath) -> impl FnOnce(std::io::Error) -> ArchiveError + '_ {
    move |source| ArchiveError::Spool {
        path: path.display().to_string(),
        source,
    }
}

/// The directory of a local archive where open files are written, beside the topics'
/// directories (which readers and the archiver list) so that publishing is a link.
pub const SPOOL_DIR: &str = "_spool";

/// The archived topics and their directory names.
pub const TOPICS: [(Topic, &str); 2] = [
    (Topic::Clicks, "clicks"),
    (Topic::FraudVerdicts, "verdicts"),
];

/// The directory of a topic in the archive.
pub fn topic_dir(topic: Topic) -> &'static str {
    match topic {
        Topic::FraudVerdicts => "verdicts",
        _ => "clicks",
    }
}

/// The hour (ms since the epoch, aligned) of a record time.
pub fn hour_of(t: Millis) -> Millis {
    t - t % 3_600_000
}

/// `date=YYYY-MM-DD/hour=HH` of an hour.
pub fn hour_dir(hour_ms: Millis) -> String {
    let secs = (hour_ms / 1000) as i64;
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(t) => format!(
            "date={:04}-{:02}-{:02}/hour={:02}",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour()
        ),
        Err(_) => "date=1970-01-01/hour=00".to_owned(),
    }
}

/// Parses the hour back out of a `.../date=YYYY-MM-DD/hour=HH/...` path.
pub fn parse_hour(path: &str) -> Option<Millis> {
    let date = path.split('/').find_map(|s| s.strip_prefix("date="))?;
    let hour: u8 = path
        .split('/')
        .find_map(|s| s.strip_prefix("hour="))?
        .parse()
        .ok()?;
    let format = time::macros::format_description!("[year]-[month]-[day]");
    let day = time::Date::parse(date, &format).ok()?;
    let t = day.with_hms(hour, 0, 0).ok()?.assume_utc();
    u64::try_from(t.unix_timestamp()).ok().map(|s| s * 1000)
}

/// The path of the file whose first record is `first_offset` of `partition`, in `hour`.
pub fn file_path(partition: PartitionId, hour_ms: Millis, first_offset: u64) -> String {
    format!(
        "{}/{}/part-{:05}-{:020}.parquet",
        topic_dir(partition.topic),
        hour_dir(hour_ms),
        partition.partition,
        first_offset
    )
}

/// One archived file, from its path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileName {
    /// Relative path in the archive.
    pub path: String,
    /// The topic.
    pub topic: Topic,
    /// The log partition.
    pub partition: u32,
    /// The offset of its first record.
    pub first_offset: u64,
    /// The hour of its records' record times.
    pub hour_ms: Millis,
}

/// Parses an archive path made by [`file_path`]; anything else is `None`.
pub fn parse_file_path(path: &str) -> Option<FileName> {
    let (dir, _) = path.split_once('/')?;
    let topic = TOPICS.iter().find(|(_, d)| *d == dir)?.0;
    let name = path.rsplit('/').next()?;
    let stem = name.strip_prefix("part-")?.strip_suffix(".parquet")?;
    let (partition, first) = stem.split_once('-')?;
    Some(FileName {
        path: path.to_owned(),
        topic,
        partition: partition.parse().ok()?,
        first_offset: first.parse().ok()?,
        hour_ms: parse_hour(path)?,
    })
}

/// Where the archiver stands in one partition.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Every record before this offset is archived (or a heartbeat).
    pub next_offset: u64,
    /// The running max of record times through `next_offset`.
    pub time_floor_ms: Millis,
    /// Every record of the partition with a record time before this is archived.
    pub covered_through_ms: Millis,
}

/// An archive location: an object store and the prefix inside it.
#[derive(Clone, Debug)]
pub struct Archive {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    /// The directory of a local archive, which files are published into by a hard link.
    local_dir: Option<PathBuf>,
    /// Where files are written while they are open: `_spool` in a local archive (so a
    /// published file is linked, not copied), `<data_dir>/archive-spool` for S3.
    spool: PathBuf,
    /// For messages.
    pub location: String,
}

impl Archive {
    /// Opens the configured location: a local directory (created if missing), or an
    /// `s3://bucket/prefix` URL with credentials from the `AWS_*` environment.
    pub fn open(location: &str, data_dir: &FsPath) -> Result<Archive, ArchiveError> {
        let bad = |message: String| ArchiveError::Location {
            location: location.to_owned(),
            message,
        };
        if let Some(rest) = location.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let store = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .build()
                .map_err(|e| bad(e.to_string()))?;
            return Ok(Archive {
                store: Arc::new(store),
                prefix: Path::from(prefix.trim_matches('/')),
                local_dir: None,
                spool: data_dir.join("archive-spool"),
                location: location.to_owned(),
            });
        }
        if location.contains("://") {
            return Err(bad(
                "only local directories and s3:// URLs are supported".into()
            ));
        }
        let dir = if location.is_empty() {
            data_dir.join("archive")
        } else {
            FsPath::new(location).to_owned()
        };
        std::fs::create_dir_all(&dir).map_err(|e| bad(format!("create {}: {e}", dir.display())))?;
        // Readers and the archiver treat a published file as durable, so every put is
        // fsynced before its rename.
        let store = object_store::local::LocalFileSystem::new_with_prefix(&dir)
            .map_err(|e| bad(e.to_string()))?
            .with_fsync(true);
        Ok(Archive {
            store: Arc::new(store),
            prefix: Path::default(),
            spool: dir.join(SPOOL_DIR),
            location: dir.display().to_string(),
            local_dir: Some(dir),
        })
    }

    fn full(&self, rel: &str) -> Path {
        if self.prefix.as_ref().is_empty() {
            Path::from(rel)
        } else {
            Path::from(format!("{}/{rel}", self.prefix.as_ref()))
        }
    }

    fn relative(&self, full: &Path) -> String {
        let s = full.as_ref();
        let p = self.prefix.as_ref();
        if p.is_empty() {
            s.to_owned()
        } else {
            s.strip_prefix(p)
                .unwrap_or(s)
                .trim_start_matches('/')
                .to_owned()
        }
    }

    /// Publishes a new file; [`ArchiveError::Taken`] when the name exists already.
    pub async fn put_new(&self, rel: &str, bytes: Vec<u8>) -> Result<(), ArchiveError> {
        let options = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&self.full(rel), PutPayload::from(bytes), options)
            .await
        {
            Ok(_) => Ok(()),
            Err(object_store::Error::AlreadyExists { .. }) => {
                Err(ArchiveError::Taken(rel.to_owned()))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A new spool file for a file about to be written (blocking).
    pub fn spool_file(&self) -> Result<NamedTempFile, ArchiveError> {
        std::fs::create_dir_all(&self.spool).map_err(spool_err(&self.spool))?;
        tempfile::Builder::new()
            .prefix("part-")
            .suffix(".parquet.tmp")
            .tempfile_in(&self.spool)
            .map_err(spool_err(&self.spool))
    }

    /// Deletes spool files nobody has written to for `idle`: left by an archiver that
    /// crashed while a file was open, whose records a resume reads again (blocking).
    pub fn clear_stale_spool(&self, idle: Duration) -> Result<usize, ArchiveError> {
        let entries = match std::fs::read_dir(&self.spool) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(spool_err(&self.spool)(e)),
        };
        let mut removed = 0;
        for entry in entries {
            let entry = entry.map_err(spool_err(&self.spool))?;
            let stale = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age >= idle);
            if stale && std::fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Publishes a spooled file as a new file; [`ArchiveError::Taken`] when the name exists
    /// already. A local archive links the spool file into place (create-only, like the
    /// store's own put, with the file and its directory fsynced); S3 takes it in one PUT.
    pub async fn publish(&self, rel: &str, file: NamedTempFile) -> Result<(), ArchiveError> {
        let Some(dir) = &self.local_dir else {
            let path = file.path().to_owned();
            let bytes = tokio::task::spawn_blocking(move || std::fs::read(file.path()))
                .await?
                .map_err(spool_err(&path))?;
            return self.put_new(rel, bytes).await;
        };
        let target = dir.join(rel);
        let taken = rel.to_owned();
        tokio::task::spawn_blocking(move || {
            file.as_file().sync_all().map_err(spool_err(file.path()))?;
            let parent = target.parent().unwrap_or(&target).to_owned();
            std::fs::create_dir_all(&parent).map_err(spool_err(&parent))?;
            match std::fs::hard_link(file.path(), &target) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return Err(ArchiveError::Taken(taken));
                }
                Err(e) => return Err(spool_err(&target)(e)),
            }
            std::fs::File::open(&parent)
                .and_then(|d| d.sync_all())
                .map_err(spool_err(&parent))
        })
        .await?
    }

    /// Writes (or replaces) a small file atomically.
    pub async fn put(&self, rel: &str, bytes: Vec<u8>) -> Result<(), ArchiveError> {
        self.store
            .put(&self.full(rel), PutPayload::from(bytes))
            .await?;
        Ok(())
    }

    /// Reads a file, or `None` when it does not exist.
    pub async fn get(&self, rel: &str) -> Result<Option<bytes::Bytes>, ArchiveError> {
        match self.store.get(&self.full(rel)).await {
            Ok(r) => Ok(Some(r.bytes().await?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Every file under a directory (recursively), relative paths.
    pub async fn list(&self, dir: &str) -> Result<Vec<String>, ArchiveError> {
        let prefix = self.full(dir);
        let metas: Vec<_> = self.store.list(Some(&prefix)).try_collect().await?;
        Ok(metas.iter().map(|m| self.relative(&m.location)).collect())
    }

    /// Every archived data file.
    pub async fn files(&self) -> Result<Vec<FileName>, ArchiveError> {
        let mut out = Vec::new();
        for (_, dir) in TOPICS {
            out.extend(
                self.list(dir)
                    .await?
                    .iter()
                    .filter_map(|p| parse_file_path(p)),
            );
        }
        out.sort_by(|a, b| {
            (a.topic, a.partition, a.first_offset).cmp(&(b.topic, b.partition, b.first_offset))
        });
        Ok(out)
    }

    /// Deletes a file.
    pub async fn delete(&self, rel: &str) -> Result<(), ArchiveError> {
        match self.store.delete(&self.full(rel)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The manifest entry of a partition.
    pub async fn manifest(&self, p: PartitionId) -> Result<Option<Progress>, ArchiveError> {
        let Some(bytes) = self.get(&manifest_path(p)).await? else {
            return Ok(None);
        };
        // A manifest is only a hint (the files' footers are the truth), so an unreadable
        // one is ignored rather than fatal.
        Ok(serde_json::from_slice(&bytes).ok())
    }

    /// Writes the manifest entry of a partition.
    pub async fn write_manifest(
        &self,
        p: PartitionId,
        progress: Progress,
    ) -> Result<(), ArchiveError> {
        let bytes = serde_json::to_vec(&progress).map_err(|e| ArchiveError::Task(e.to_string()))?;
        self.put(&manifest_path(p), bytes).await
    }

    /// Where the archive of a partition stands: the newest file's footer or the manifest,
    /// whichever is further. `None` when nothing of it was archived.
    pub async fn progress(
        &self,
        p: PartitionId,
        files: &[FileName],
    ) -> Result<Option<Progress>, ArchiveError> {
        let mut best = self.manifest(p).await?;
        let newest = files
            .iter()
            .filter(|f| f.topic == p.topic && f.partition == p.partition)
            .max_by_key(|f| f.first_offset);
        if let Some(f) = newest {
            let bytes = self.get(&f.path).await?.ok_or_else(|| {
                ArchiveError::Parquet(format!("{} vanished while resuming", f.path))
            })?;
            let footer = tokio::task::spawn_blocking(move || parquet::footer(bytes)).await??;
            if best.is_none_or(|b| footer.next_offset > b.next_offset) {
                best = Some(Progress {
                    next_offset: footer.next_offset,
                    time_floor_ms: footer.time_floor_ms,
                    covered_through_ms: footer.time_floor_ms,
                });
            }
        }
        Ok(best)
    }
}

/// The manifest path of a partition.
pub fn manifest_path(p: PartitionId) -> String {
    format!("_manifest/{}-{}.json", p.topic.name(), p.partition)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_round_trip() {
        let p = PartitionId {
            topic: Topic::Clicks,
            partition: 3,
        };
        let hour = hour_of(1_764_000_123_456);
        let path = file_path(p, hour, 42);
        assert_eq!(
            path,
            "clicks/date=2025-11-24/hour=16/part-00003-00000000000000000042.parquet"
        );
        let f = parse_file_path(&path).expect("parses");
        assert_eq!(
            (f.topic, f.partition, f.first_offset, f.hour_ms),
            (Topic::Clicks, 3, 42, hour)
        );
        assert_eq!(parse_file_path("clicks/x.parquet#1"), None);
    }

    fn spooled(archive: &Archive, bytes: &[u8]) -> NamedTempFile {
        use std::io::Write;
        let mut file = archive.spool_file().expect("spool file");
        file.write_all(bytes).expect("write spool");
        file
    }

    #[tokio::test]
    async fn a_spooled_file_is_published_once_and_listed_and_its_spool_file_goes() {
        let dir = tempfile::tempdir().expect("dir");
        let archive = Archive::open("", dir.path()).expect("archive");
        let p = PartitionId {
            topic: Topic::Clicks,
            partition: 1,
        };
        let path = file_path(p, hour_of(1_764_000_000_000), 7);
        archive
            .publish(&path, spooled(&archive, b"first"))
            .await
            .expect("published");
        let second = archive.publish(&path, spooled(&archive, b"second")).await;
        assert!(
            matches!(&second, Err(ArchiveError::Taken(t)) if *t == path),
            "{second:?}"
        );
        let got = archive.get(&path).await.expect("get").expect("exists");
        assert_eq!(&got[..], b"first");
        let files = archive.files().await.expect("files");
        assert_eq!(files.len(), 1, "{files:?}");
        assert_eq!((files[0].partition, files[0].first_offset), (1, 7));
        let left = std::fs::read_dir(dir.path().join("archive").join(SPOOL_DIR))
            .expect("spool dir")
            .count();
        assert_eq!(left, 0, "spool files are removed once published or refused");
    }

    #[test]
    fn only_idle_spool_files_are_cleared() {
        let dir = tempfile::tempdir().expect("dir");
        let archive = Archive::open("", dir.path()).expect("archive");
        assert_eq!(archive.clear_stale_spool(Duration::ZERO).expect("none"), 0);
        let (_, left) = spooled(&archive, b"crashed").keep().expect("keep");
        let live = spooled(&archive, b"open");
        assert_eq!(
            archive
                .clear_stale_spool(Duration::from_secs(3600))
                .expect("clear"),
            0
        );
        assert!(left.exists() && live.path().exists());
        assert_eq!(archive.clear_stale_spool(Duration::ZERO).expect("clear"), 2);
        assert!(!left.exists());
    }
}
