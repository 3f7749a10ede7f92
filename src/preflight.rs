//! Start-up checks of what a config points at: the data directory can be created and
//! written, and the store answers. `serve` and `clickagg config check` run them, so a
//! wrong path or an unreachable database is named at once instead of surfacing later.

use std::path::{Path, PathBuf};

use crate::config::{Config, StoreKind};

/// What a start-up check found wrong; each names the config key at fault.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    /// `data_dir` cannot be created or written.
    #[error("data_dir {path} cannot be used: {why}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// The Postgres store does not answer.
    #[error("store.postgres_url {url} is unreachable: {why}")]
    Store {
        /// The URL without credentials.
        url: String,
        /// Why.
        why: String,
    },
}

/// Creates `dir` (and its parents) if missing and checks a file can be written in it.
pub fn check_data_dir(dir: &Path) -> Result<(), PreflightError> {
    let fail = |why: String| PreflightError::DataDir {
        path: dir.to_owned(),
        why,
    };
    std::fs::create_dir_all(dir).map_err(|e| fail(format!("cannot create it ({e})")))?;
    let probe = dir.join(format!(".clickagg-write-probe-{}", std::process::id()));
    std::fs::write(&probe, b"probe").map_err(|e| fail(format!("cannot write in it ({e})")))?;
    std::fs::remove_file(&probe).map_err(|e| fail(format!("cannot delete in it ({e})")))?;
    Ok(())
}

/// Whether `dir` could be created and written, without creating it: it exists as a
/// writable directory, or its nearest existing ancestor is one.
pub fn check_data_dir_without_creating(dir: &Path) -> Result<(), PreflightError> {
    let mut existing = dir;
    loop {
        match std::fs::metadata(existing) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => {
                return Err(PreflightError::DataDir {
                    path: dir.to_owned(),
                    why: format!(
                        "cannot create it ({} is not a directory)",
                        existing.display()
                    ),
                });
            }
            Err(_) => match existing.parent() {
                Some(p) if !p.as_os_str().is_empty() => existing = p,
                _ => return Ok(()),
            },
        }
    }
    // A probe file in the nearest existing directory: permissions, read-only mounts.
    check_data_dir(existing).map_err(|e| PreflightError::DataDir {
        path: dir.to_owned(),
        why: format!("{} is not writable ({e})", existing.display()),
    })
}

/// Checks the store the config names: Postgres answers a connection, or the SQLite data
/// directory is usable. Blocks (run it off the async executor).
pub fn check_store(config: &Config) -> Result<(), PreflightError> {
    match config.store.kind {
        StoreKind::Sqlite => check_data_dir_without_creating(&config.data_dir),
        StoreKind::Postgres => {
            crate::store::postgres::probe(&config.store.postgres_url).map_err(|e| {
                PreflightError::Store {
                    url: crate::store::postgres::redacted_url(&config.store.postgres_url),
                    why: e.to_string(),
                }
            })
        }
    }
}
