//! `clickagg compact`: retention. Deletes archived raw records past `retention.raw` (whole
//! hour partitions, by record time) and store rows past `retention.aggregates` (whole
//! days, by window start).
//!
//! Both deletions only ever remove data that nothing will write again: an archive hour
//! older than the retention is long closed (the archiver writes only the current hour of
//! each partition, and resumes from its manifest, which compaction keeps), and a window
//! two years old has been final since its correction window ended.

use std::sync::Arc;

use crate::archive::{Archive, ArchiveError, hour_of};
use crate::config::Config;
use crate::store::{Store, StoreError};
use crate::time::{Granularity, Millis};

/// What went wrong in a compaction.
#[derive(Debug, thiserror::Error)]
pub enum CompactError {
    /// The archive failed.
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a compaction removed (or, in a dry run, would remove).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compacted {
    /// Archive files older than the raw cutoff.
    pub archive_files: usize,
    /// Archived hours they made up.
    pub archive_hours: usize,
    /// Store rows older than the aggregates cutoff (0 in a dry run).
    pub store_rows: u64,
    /// Raw records before this hour were dropped.
    pub raw_cutoff_ms: Millis,
    /// Windows before this day were dropped.
    pub aggregates_cutoff_ms: Millis,
}

/// The cutoffs for `now`: raw by whole hours, aggregates by whole days.
pub fn cutoffs(config: &Config, now: Millis) -> (Millis, Millis) {
    let raw = hour_of(now.saturating_sub(config.retention.raw.as_millis() as u64));
    let aggregates =
        Granularity::Day.align(now.saturating_sub(config.retention.aggregates.as_millis() as u64));
    (raw, aggregates)
}

/// Drops what is past its retention at `now`; with `dry_run`, only counts the archive.
pub async fn run(
    config: &Config,
    archive: &Archive,
    store: Option<Arc<dyn Store>>,
    now: Millis,
    dry_run: bool,
) -> Result<Compacted, CompactError> {
    let (raw_cutoff_ms, aggregates_cutoff_ms) = cutoffs(config, now);
    let old: Vec<_> = archive
        .files()
        .await?
        .into_iter()
        .filter(|f| f.hour_ms < raw_cutoff_ms)
        .collect();
    let mut hours: Vec<(crate::record::Topic, Millis)> =
        old.iter().map(|f| (f.topic, f.hour_ms)).collect();
    hours.sort_unstable();
    hours.dedup();
    let mut out = Compacted {
        archive_files: old.len(),
        archive_hours: hours.len(),
        raw_cutoff_ms,
        aggregates_cutoff_ms,
        ..Compacted::default()
    };
    if dry_run {
        return Ok(out);
    }
    for f in &old {
        archive.delete(&f.path).await?;
    }
    if let Some(store) = store {
        out.store_rows =
            tokio::task::spawn_blocking(move || store.drop_windows_before(aggregates_cutoff_ms))
                .await
                .map_err(ArchiveError::from)??;
    }
    tracing::info!(?out, "compacted");
    Ok(out)
}
