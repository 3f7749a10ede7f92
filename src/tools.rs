//! The batch commands around the archive: `clickagg archive`, `reconcile` and `compact`,
//! and the archiver task `serve` runs. Each opens the log and store the config names.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;

use crate::archive::{Archive, ArchiveRun, run_archiver};
use crate::config::{Config, LogKind};
use crate::log::Log;
use crate::log::embedded::EmbeddedLog;
use crate::reconcile::{ReconcileOptions, Summary};
use crate::store::Store;
use crate::time::Millis;

/// Opens the configured archive location.
pub fn open_archive(config: &Config) -> anyhow::Result<Archive> {
    Ok(Archive::open(&config.archive.location, &config.data_dir)?)
}

/// Starts `serve`'s archiver (when `archive.enabled`) over its own log handle; it runs
/// until the process ends and never stops the server: failures are logged and retried.
/// It has a thread and runtime of its own, at `background_nice`, so that its Parquet
/// encoding and reads of the log yield a core to the click path.
pub fn spawn_serve_archiver(config: &Config, log: Arc<dyn Log>) -> anyhow::Result<()> {
    if !config.archive.enabled {
        tracing::info!("archive.enabled = false: no archiver");
        return Ok(());
    }
    let archive = open_archive(config)?;
    tracing::info!(location = %archive.location, "archiving raw clicks and verdicts");
    let settings = config.archive.clone();
    let nice = config.background_nice;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("archiver-io")
        .on_thread_start(move || crate::thread_priority::lower_this_thread(nice, "archiver"))
        .build()
        .context("the archiver's runtime")?;
    std::thread::Builder::new()
        .name("archiver".into())
        .spawn(move || {
            crate::thread_priority::lower_this_thread(nice, "archiver");
            let run = run_archiver(log, archive, settings, ArchiveRun::default());
            if let Err(e) = runtime.block_on(run) {
                tracing::error!(error = %e, "the archiver stopped");
            }
        })
        .context("the archiver's thread")?;
    Ok(())
}

async fn open_log(config: &Config) -> anyhow::Result<Arc<dyn Log>> {
    Ok(match config.log.kind {
        LogKind::Embedded => {
            let dir = config.data_dir.clone();
            Arc::new(
                tokio::task::spawn_blocking(move || EmbeddedLog::open_read_only(&dir))
                    .await?
                    .context("opening the embedded log (read-only)")?,
            )
        }
        LogKind::Kafka => Arc::new(crate::backends::open_log(config).await?),
    })
}

/// The configured store, with two query connections when it is SQLite.
async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    crate::import::open_store(config, 2).await
}

/// `clickagg archive`: archives the log until SIGINT/SIGTERM, or with `once` until it has
/// reached the log's end as of the start.
pub async fn archive(config: &Config, once: bool) -> anyhow::Result<()> {
    let log = open_log(config).await?;
    let archive = open_archive(config)?;
    let stop = Arc::new(AtomicBool::new(false));
    if !once {
        let s = Arc::clone(&stop);
        tokio::spawn(async move {
            crate::process::shutdown_signal().await;
            s.store(true, Ordering::Release);
        });
    }
    let run = ArchiveRun {
        once,
        stop: Some(stop),
    };
    let stats = run_archiver(log, archive.clone(), config.archive.clone(), run).await?;
    println!(
        "archived {} records in {} files to {}",
        stats.records, stats.files, archive.location
    );
    Ok(())
}

/// `clickagg reconcile`: returns the summary; the caller exits non-zero on differences.
pub async fn reconcile(
    config: &Config,
    from: Millis,
    to: Millis,
    fix: bool,
    table: PathBuf,
    wait: Duration,
) -> anyhow::Result<Summary> {
    let archive = open_archive(config)?;
    let store = open_store(config).await?;
    let options = ReconcileOptions {
        from,
        to,
        fix,
        table: table.clone(),
        wait,
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let summary = crate::reconcile::run(config, &archive, store, &options).await?;
    println!("{summary}");
    println!("discrepancy table: {}", table.display());
    Ok(summary)
}

/// `clickagg compact`.
pub async fn compact(config: &Config, now: Millis, dry_run: bool) -> anyhow::Result<()> {
    let archive = open_archive(config)?;
    let store = if dry_run {
        None
    } else {
        Some(open_store(config).await?)
    };
    let out = crate::compact::run(config, &archive, store, now, dry_run).await?;
    println!(
        "{}{} archive files ({} hours) before {}; {} store rows before {}",
        if dry_run { "would drop " } else { "dropped " },
        out.archive_files,
        out.archive_hours,
        crate::time::rfc3339(out.raw_cutoff_ms),
        if dry_run {
            "(not counted in a dry run)".to_owned()
        } else {
            out.store_rows.to_string()
        },
        crate::time::rfc3339(out.aggregates_cutoff_ms)
    );
    Ok(())
}
