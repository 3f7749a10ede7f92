//! The embedded store: SQLite in WAL mode. One writer connection (the sink and catalog
//! writes take turns), a pool of readers for the query API.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::types::{ToSqlOutput, Value, ValueRef};
use rusqlite::{
    Connection, OpenFlags, OptionalExtension, ToSql, Transaction, TransactionBehavior, params,
};

use super::common::{
    AD_COLUMNS, LAST_PROGRESS, RollupColumns, RollupDeltas, check_ad_rules, check_tick,
    column_defs, columns_differ, decode_positions, delete_empty_rollup_sql, deltas_in_key_order,
    encode_positions, fraud_adjustment_totals_sql, fraud_adjustments_sql, in_key_order,
    insert_campaign_sql, insert_progress_sql, late_clicks_sql, may_empty, minute_series_sql,
    minute_totals_sql, progress_at_sql, prune_progress_sql, rollup_series_sql, rollup_totals_sql,
    upsert_action, upsert_ad_sql,
};
use super::corrections;
use super::{
    Ad, AdjustmentTotals, Adjustments, ChangeBatch, FraudAdjustment, LateClick, Measures,
    MetricScope, RecoveryPoint, Store, StoreError, Upserted, ViewChanges, WriterClaim, decompose,
};
use super::{AdWindow, WindowCorrection};
use crate::time::{Granularity, Millis, Time, now_ms};
use crate::views::{ColumnType, Datum, Row, ViewDef};

mod embedded {
    refinery::embed_migrations!("src/store/migrations/sqlite");
}

/// Options of the SQLite store.
#[derive(Clone, Copy, Debug)]
pub struct SqliteOptions {
    /// Connections kept for queries.
    pub read_pool_size: u32,
    /// Progress rows older than the last one at or before `upper - this` are pruned.
    pub progress_retention_ms: u64,
    /// The writer connection's page cache, in MiB.
    pub cache_mib: u32,
}

/// SQL of one view, derived from its columns once at start.
struct ViewSql {
    select_value: String,
    upsert: String,
    /// For views with rollups, which read each key's old value first and so know whether
    /// the row exists: a plain insert or update skips the upsert's failed insert.
    insert: String,
    update: Option<String>,
    delete: String,
    rollup_upsert: Option<String>,
    rollup_delete_empty: Option<String>,
}

/// The SQLite store.
pub struct SqliteStore {
    path: std::path::PathBuf,
    /// The lock file held while this process is the writer, and its generation.
    claim: Mutex<Option<(std::fs::File, u64)>>,
    writer: Mutex<Connection>,
    readers: r2d2::Pool<SqliteConnectionManager>,
    views: &'static [ViewDef],
    sql: Vec<ViewSql>,
    progress_retention_ms: u64,
}

fn unavailable(what: &str) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
    move |e| StoreError::Unavailable(format!("{what}: {e}"))
}

/// SQLite spells the n-th parameter `?n`.
fn param(n: usize) -> String {
    format!("?{n}")
}

fn sql_type(ty: ColumnType) -> &'static str {
    match ty {
        ColumnType::Text => "TEXT",
        ColumnType::Id | ColumnType::Int | ColumnType::Time => "INTEGER",
    }
}

/// A statement parameter borrowed from a row or a rollup key: binding it copies nothing
/// to the heap, where a [`Value`] would copy every text (two per rollup row).
#[derive(Clone, Copy)]
enum Param<'a> {
    Int(i64),
    Text(&'a str),
}

impl<'a> Param<'a> {
    fn of(d: &'a Datum) -> Param<'a> {
        match d {
            Datum::Text(s) => Param::Text(s),
            other => Param::Int(other.as_i64().unwrap_or_default()),
        }
    }
}

impl ToSql for Param<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Param::Int(n) => ToSqlOutput::Borrowed(ValueRef::Integer(*n)),
            Param::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
        })
    }
}

/// A row's columns as parameters `?1, ?2, ...`.
fn row_params(row: &Row) -> impl Iterator<Item = Param<'_>> {
    row.iter().map(Param::of)
}

fn from_value(ty: ColumnType, v: ValueRef<'_>) -> Result<Datum, rusqlite::Error> {
    let int = || v.as_i64().map_err(rusqlite::Error::from);
    Ok(match ty {
        ColumnType::Id => Datum::Id(int()? as u64),
        ColumnType::Int => Datum::Int(int()?),
        ColumnType::Time => Datum::Time(int()? as u64),
        ColumnType::Text => Datum::Text(v.as_str().map_err(rusqlite::Error::from)?.to_owned()),
    })
}

fn view_sql(view: &ViewDef) -> ViewSql {
    let table = view.table();
    let key_cols: Vec<&str> = view.key.iter().map(|c| c.name).collect();
    let value_cols: Vec<&str> = view.value.iter().map(|c| c.name).collect();
    let key_match = key_cols
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{c} = ?{}", i + 1))
        .collect::<Vec<_>>()
        .join(" AND ");
    let all: Vec<&str> = key_cols.iter().chain(&value_cols).copied().collect();
    let placeholders = (1..=all.len())
        .map(|i| format!("?{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    let updates = upsert_action(&value_cols);
    let rollup_upsert = view.rollup.map(|r| {
        let measures = r.measures.join(", ");
        let placeholders = (1..=4 + r.measures.len()).map(|i| format!("?{i}")).collect::<Vec<_>>().join(", ");
        let sums = r.measures.iter().map(|m| format!("{m} = {m} + excluded.{m}")).collect::<Vec<_>>().join(", ");
        format!(
            "INSERT INTO {} (scope, scope_id, granularity, window_start, {measures}) VALUES ({placeholders})
             ON CONFLICT (scope, scope_id, granularity, window_start) DO UPDATE SET {sums}",
            view.rollup_table()
        )
    });
    let value_match = value_cols
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{c} = ?{}", key_cols.len() + i + 1))
        .collect::<Vec<_>>()
        .join(", ");
    ViewSql {
        insert: format!(
            "INSERT INTO {table} ({}) VALUES ({placeholders})",
            all.join(", ")
        ),
        update: (!value_cols.is_empty())
            .then(|| format!("UPDATE {table} SET {value_match} WHERE {key_match}")),
        select_value: format!(
            "SELECT {} FROM {table} WHERE {key_match}",
            if value_cols.is_empty() {
                "1".to_owned()
            } else {
                value_cols.join(", ")
            }
        ),
        upsert: format!(
            "INSERT INTO {table} ({}) VALUES ({placeholders}) ON CONFLICT ({}) DO {updates}",
            all.join(", "),
            key_cols.join(", ")
        ),
        delete: format!("DELETE FROM {table} WHERE {key_match}"),
        rollup_upsert,
        rollup_delete_empty: view
            .rollup
            .map(|r| delete_empty_rollup_sql(view, r.measures, param)),
    }
}

/// Creates a view's tables if missing, and refuses to run against a table whose
/// columns differ from the view's declaration.
fn ensure_view_tables(conn: &Connection, view: &ViewDef) -> Result<(), StoreError> {
    let table = view.table();
    let cols = column_defs(view, sql_type);
    let keys: Vec<&str> = view.key.iter().map(|c| c.name).collect();
    conn.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS {table} ({}, PRIMARY KEY ({})) WITHOUT ROWID;",
        cols.join(", "),
        keys.join(", ")
    ))
    .map_err(unavailable("create view table"))?;

    let mut stmt = conn
        .prepare(&format!(
            "SELECT name FROM pragma_table_info('{table}') ORDER BY cid"
        ))
        .map_err(unavailable("inspect view table"))?;
    let have: Vec<String> = stmt
        .query_map([], |r| r.get(0))
        .and_then(|rows| rows.collect())
        .map_err(unavailable("inspect view table"))?;
    let want: Vec<&str> = view.key.iter().chain(view.value).map(|c| c.name).collect();
    if have != want {
        return Err(columns_differ(&table, view.name, &have, &want));
    }

    if let Some(r) = &view.rollup {
        let measures: Vec<String> = r
            .measures
            .iter()
            .map(|m| format!("{m} INTEGER NOT NULL"))
            .collect();
        conn.execute_batch(&format!(
            "CREATE TABLE IF NOT EXISTS {} (scope TEXT NOT NULL, scope_id INTEGER NOT NULL,
             granularity TEXT NOT NULL, window_start INTEGER NOT NULL, {},
             PRIMARY KEY (scope, scope_id, granularity, window_start)) WITHOUT ROWID;",
            view.rollup_table(),
            measures.join(", ")
        ))
        .map_err(unavailable("create rollup table"))?;
    }
    Ok(())
}

fn open_writer(path: &Path, cache_mib: u32) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(unavailable("open store"))?;
    conn.busy_timeout(Duration::from_secs(10))
        .map_err(unavailable("busy timeout"))?;
    crate::sqlite::stable_plans(&conn).map_err(unavailable("stable plans"))?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;",
    )
    .map_err(unavailable("store pragmas"))?;
    // SQLite's default cache is 2 MiB: the view tables of an hour of the standard workload
    // are tens of MiB, so nearly every upsert read its pages back through the WAL index and
    // the OS. Negative: in KiB; SQLite allocates it as pages are read.
    conn.pragma_update(None, "cache_size", -(i64::from(cache_mib) * 1024))
        .map_err(unavailable("store cache size"))?;
    Ok(conn)
}

impl SqliteStore {
    /// Opens (or creates) the store at `path`, migrates it and derives the view tables.
    pub fn open(
        path: &Path,
        views: &'static [ViewDef],
        options: SqliteOptions,
    ) -> Result<SqliteStore, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Unavailable(format!("create {}: {e}", dir.display())))?;
        }
        let mut conn = open_writer(path, options.cache_mib)?;
        embedded::migrations::runner()
            .run(&mut conn)
            .map_err(|e| StoreError::Unavailable(format!("migrate store: {e}")))?;
        for view in views {
            view.validate().map_err(StoreError::Inconsistent)?;
            ensure_view_tables(&conn, view)?;
        }
        let manager = SqliteConnectionManager::file(path)
            .with_flags(OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
            .with_init(|c| {
                c.busy_timeout(Duration::from_secs(5))?;
                crate::sqlite::stable_plans(c)
            });
        let readers = r2d2::Pool::builder()
            .max_size(options.read_pool_size)
            .connection_timeout(Duration::from_secs(5))
            .build(manager)
            .map_err(|e| StoreError::Unavailable(format!("open store readers: {e}")))?;
        Ok(SqliteStore {
            path: path.to_owned(),
            claim: Mutex::new(None),
            writer: Mutex::new(conn),
            readers,
            views,
            sql: views.iter().map(view_sql).collect(),
            progress_retention_ms: options.progress_retention_ms,
        })
    }

    fn reader(&self) -> Result<r2d2::PooledConnection<SqliteConnectionManager>, StoreError> {
        self.readers
            .get()
            .map_err(|e| StoreError::Unavailable(format!("store connection: {e}")))
    }

    fn apply_view(
        tx: &Transaction<'_>,
        view: &ViewDef,
        sql: &ViewSql,
        changes: &ViewChanges,
    ) -> rusqlite::Result<()> {
        let mut deltas = RollupDeltas::new();
        let rollup_columns = RollupColumns::of(view);
        let mut delete = tx.prepare_cached(&sql.delete)?;
        let changes = in_key_order(changes);
        let Some(columns) = rollup_columns else {
            let mut upsert = tx.prepare_cached(&sql.upsert)?;
            for (key, new) in changes {
                match new {
                    Some(value) => {
                        let all = row_params(key).chain(row_params(value));
                        upsert.execute(rusqlite::params_from_iter(all))?
                    }
                    None => delete.execute(rusqlite::params_from_iter(row_params(key)))?,
                };
            }
            return Ok(());
        };
        let mut select = tx.prepare_cached(&sql.select_value)?;
        let mut insert = tx.prepare_cached(&sql.insert)?;
        let mut update = sql
            .update
            .as_ref()
            .map(|u| tx.prepare_cached(u))
            .transpose()?;
        for (key, new) in changes {
            let old: Option<Row> = select
                .query_row(rusqlite::params_from_iter(row_params(key)), |r| {
                    view.value
                        .iter()
                        .enumerate()
                        .map(|(i, c)| from_value(c.ty, r.get_ref(i)?))
                        .collect()
                })
                .optional()?;
            columns.add(key, old.as_ref(), -1, &mut deltas);
            columns.add(key, new.as_ref(), 1, &mut deltas);
            let all = |value| row_params(key).chain(row_params(value));
            match (old, new) {
                (None, Some(value)) => insert.execute(rusqlite::params_from_iter(all(value)))?,
                (Some(_), Some(value)) => match &mut update {
                    Some(update) => update.execute(rusqlite::params_from_iter(all(value)))?,
                    // Only key columns: the row is already what it should be.
                    None => 0,
                },
                (Some(_), None) => delete.execute(rusqlite::params_from_iter(row_params(key)))?,
                (None, None) => 0,
            };
        }
        if let (Some(r), Some(upsert), Some(delete_empty)) =
            (&view.rollup, &sql.rollup_upsert, &sql.rollup_delete_empty)
        {
            let mut rollup = tx.prepare_cached(upsert)?;
            let mut delete_empty = tx.prepare_cached(delete_empty)?;
            for ((scope, id, g, window), d) in deltas_in_key_order(deltas) {
                if d.iter().all(|x| *x == 0) {
                    continue;
                }
                let key = [
                    Param::Text(r.scopes[scope].0),
                    Param::Int(id as i64),
                    Param::Text(g.as_str()),
                    Param::Int(window as i64),
                ];
                let measures = d.iter().map(|x| Param::Int(*x));
                rollup.execute(rusqlite::params_from_iter(
                    key.iter().copied().chain(measures),
                ))?;
                if may_empty(&d) {
                    delete_empty.execute(rusqlite::params_from_iter(key))?;
                }
            }
        }
        Ok(())
    }
}

/// The generation of the last writer claim (0 before any).
fn read_generation(conn: &Connection) -> Result<u64, StoreError> {
    let value: Option<String> = conn
        .query_row(
            "SELECT value FROM settings WHERE key = 'writer_generation'",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(unavailable("read settings"))?;
    value.map_or(Ok(0), |v| {
        v.parse()
            .map_err(|_| StoreError::Inconsistent(format!("writer_generation is {v:?}")))
    })
}

fn conflict(e: rusqlite::Error, what: &str) -> StoreError {
    match e {
        rusqlite::Error::SqliteFailure(f, _)
            if f.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            StoreError::Conflict(format!("{what} already exists"))
        }
        e => StoreError::Unavailable(format!("{what}: {e}")),
    }
}

fn measures_at(r: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<Measures> {
    Ok(Measures {
        clicks: r.get(first)?,
        fraud_clicks: r.get(first + 1)?,
        late_clicks: r.get(first + 2)?,
        spend_micros: r.get(first + 3)?,
    })
}

impl SqliteStore {
    fn check_ad_in(conn: &Connection, ad: &Ad) -> Result<Upserted, StoreError> {
        let read = unavailable("read catalog");
        let advertiser: Option<i64> = conn
            .query_row(
                "SELECT advertiser_id FROM advertisers WHERE advertiser_id = ?1",
                [ad.advertiser_id as i64],
                |r| r.get(0),
            )
            .optional()
            .map_err(&read)?;
        let owner: Option<i64> = conn
            .query_row(
                "SELECT advertiser_id FROM campaigns WHERE campaign_id = ?1",
                [ad.campaign_id as i64],
                |r| r.get(0),
            )
            .optional()
            .map_err(&read)?;
        let existing: Option<i64> = conn
            .query_row(
                "SELECT advertiser_id FROM ads WHERE ad_id = ?1",
                [ad.ad_id as i64],
                |r| r.get(0),
            )
            .optional()
            .map_err(&read)?;
        check_ad_rules(
            ad,
            advertiser.is_some(),
            owner.map(|o| o as u64),
            existing.map(|a| a as u64),
        )
    }
}

impl Store for SqliteStore {
    fn recovery_point(&self, tick_ms: u64, horizon_ms: u64) -> Result<RecoveryPoint, StoreError> {
        let conn = self.writer.lock();
        let stored: Option<String> = conn
            .query_row(
                "SELECT value FROM settings WHERE key = 'tick_ms'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(unavailable("read settings"))?;
        match stored {
            None => {
                conn.execute(
                    "INSERT INTO settings (key, value) VALUES ('tick_ms', ?1)",
                    [tick_ms.to_string()],
                )
                .map_err(unavailable("write settings"))?;
            }
            Some(s) => check_tick(&s, tick_ms)?,
        }
        let last: Option<(i64, String)> = conn
            .query_row(LAST_PROGRESS, [], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
            .map_err(unavailable("read progress"))?;
        let Some((as_of, committed)) = last else {
            return Ok(RecoveryPoint::default());
        };
        let as_of = as_of as Time;
        let replay: Option<String> = conn
            .query_row(
                &progress_at_sql(param),
                [as_of.saturating_sub(horizon_ms) as i64],
                |r| r.get(0),
            )
            .optional()
            .map_err(unavailable("read progress"))?;
        Ok(RecoveryPoint {
            as_of,
            committed: decode_positions(&committed)?,
            replay_from: replay
                .as_deref()
                .map(decode_positions)
                .transpose()?
                .unwrap_or_default(),
        })
    }

    fn claim_writer(&self) -> Result<WriterClaim, StoreError> {
        let mut claim = self.claim.lock();
        if let Some((_, generation)) = &*claim {
            return Ok(WriterClaim {
                generation: *generation,
            });
        }
        // An OS lock, not a row: the kernel drops it when the process dies, however it
        // dies, so a restart after kill -9 claims at once and two live processes never
        // share a data directory.
        let lock_path = self.path.with_extension("writer.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| StoreError::Unavailable(format!("open {}: {e}", lock_path.display())))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Fenced(format!(
                    "another process is already the writer of {} (it holds {}); \
                     one data directory serves one process",
                    self.path.display(),
                    lock_path.display()
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(StoreError::Unavailable(format!(
                    "lock {}: {e}",
                    lock_path.display()
                )));
            }
        }
        let mut conn = self.writer.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(unavailable("begin claim"))?;
        let generation = read_generation(&tx)? + 1;
        tx.execute(
            "INSERT INTO settings (key, value) VALUES ('writer_generation', ?1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [generation.to_string()],
        )
        .map_err(unavailable("write settings"))?;
        tx.commit().map_err(unavailable("commit claim"))?;
        *claim = Some((file, generation));
        Ok(WriterClaim { generation })
    }

    fn commit(&self, batch: &ChangeBatch) -> Result<(), StoreError> {
        let started = Instant::now();
        let mine = self.claim.lock().as_ref().map(|(_, g)| *g).ok_or_else(|| {
            StoreError::Fenced("this process has not claimed the store (claim_writer)".into())
        })?;
        let mut conn = self.writer.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(unavailable("begin commit"))?;
        let current = read_generation(&tx)?;
        if current != mine {
            return Err(StoreError::Fenced(format!(
                "writer generation {current} has replaced this one ({mine})"
            )));
        }
        let last: Option<i64> = tx
            .query_row("SELECT max(upper) FROM progress", [], |r| r.get(0))
            .map_err(unavailable("read progress"))?;
        if last.is_some_and(|l| l as u64 >= batch.upper) {
            return Ok(());
        }
        for ((view, sql), changes) in self.views.iter().zip(&self.sql).zip(&batch.views) {
            Self::apply_view(&tx, view, sql, changes).map_err(unavailable("write view"))?;
        }
        tx.execute(
            &insert_progress_sql(param),
            params![
                batch.upper as i64,
                encode_positions(&batch.positions),
                now_ms() as i64
            ],
        )
        .map_err(unavailable("write progress"))?;
        tx.execute(
            &prune_progress_sql(param),
            [batch.upper.saturating_sub(self.progress_retention_ms) as i64],
        )
        .map_err(unavailable("prune progress"))?;
        tx.commit().map_err(unavailable("commit"))?;
        tracing::debug!(upper = batch.upper, rows = batch.rows(), elapsed = ?started.elapsed(), "sink commit");
        Ok(())
    }

    fn committed_frontier(&self) -> Result<Option<Time>, StoreError> {
        let conn = self.reader()?;
        let last: Option<i64> = conn
            .query_row("SELECT max(upper) FROM progress", [], |r| r.get(0))
            .map_err(unavailable("read progress"))?;
        Ok(last.map(|l| l as Time))
    }

    fn check(&self) -> Result<(), StoreError> {
        self.reader()?
            .query_row("SELECT 1", [], |r| r.get::<_, i64>(0))
            .map_err(unavailable("probe store"))?;
        Ok(())
    }

    fn create_advertiser(
        &self,
        advertiser_id: u64,
        name: &str,
        key_hash: &[u8; 32],
    ) -> Result<(), StoreError> {
        self.writer
            .lock()
            .execute(
                "INSERT INTO advertisers (advertiser_id, name, api_key_hash, created_at_ms) VALUES (?1, ?2, ?3, ?4)",
                params![advertiser_id as i64, name, key_hash.as_slice(), now_ms() as i64],
            )
            .map_err(|e| conflict(e, &format!("advertiser {advertiser_id}")))?;
        Ok(())
    }

    fn advertiser_for_key(&self, key_hash: &[u8; 32]) -> Result<Option<u64>, StoreError> {
        let id: Option<i64> = self
            .reader()?
            .query_row(
                "SELECT advertiser_id FROM advertisers WHERE api_key_hash = ?1",
                [key_hash.as_slice()],
                |r| r.get(0),
            )
            .optional()
            .map_err(unavailable("read advertisers"))?;
        Ok(id.map(|i| i as u64))
    }

    fn check_ad(&self, ad: &Ad) -> Result<Upserted, StoreError> {
        Self::check_ad_in(&self.writer.lock(), ad)
    }

    fn upsert_ad(&self, ad: &Ad) -> Result<Upserted, StoreError> {
        let mut conn = self.writer.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(unavailable("begin catalog write"))?;
        let outcome = Self::check_ad_in(&tx, ad)?;
        let write = unavailable("write catalog");
        tx.execute(
            &insert_campaign_sql(param),
            params![ad.campaign_id as i64, ad.advertiser_id as i64],
        )
        .map_err(&write)?;
        tx.execute(
            &upsert_ad_sql(param),
            params![
                ad.ad_id as i64,
                ad.advertiser_id as i64,
                ad.campaign_id as i64,
                ad.landing_url,
                ad.cpc_micros as i64,
                now_ms() as i64
            ],
        )
        .map_err(&write)?;
        tx.commit().map_err(&write)?;
        Ok(outcome)
    }

    fn ad(&self, ad_id: u64) -> Result<Option<Ad>, StoreError> {
        self.reader()?
            .query_row(
                &format!("SELECT {AD_COLUMNS} FROM ads WHERE ad_id = ?1"),
                [ad_id as i64],
                ad_from_row,
            )
            .optional()
            .map_err(unavailable("read ads"))
    }

    fn ads(&self) -> Result<Vec<Ad>, StoreError> {
        let conn = self.reader()?;
        let mut stmt = conn
            .prepare(&format!("SELECT {AD_COLUMNS} FROM ads"))
            .map_err(unavailable("read ads"))?;
        stmt.query_map([], ad_from_row)
            .and_then(|rows| rows.collect())
            .map_err(unavailable("read ads"))
    }

    fn advertiser_ads(&self, advertiser_id: u64) -> Result<Vec<Ad>, StoreError> {
        let conn = self.reader()?;
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {AD_COLUMNS} FROM ads WHERE advertiser_id = ?1"
            ))
            .map_err(unavailable("read ads"))?;
        let mut ads: Vec<Ad> = stmt
            .query_map([advertiser_id as i64], ad_from_row)
            .and_then(|rows| rows.collect())
            .map_err(unavailable("read ads"))?;
        // Ids are stored bit-cast to i64, so SQL would order ids above i64::MAX first.
        ads.sort_by_key(|a| a.ad_id);
        Ok(ads)
    }

    fn campaign_owner(&self, campaign_id: u64) -> Result<Option<u64>, StoreError> {
        let owner: Option<i64> = self
            .reader()?
            .query_row(
                "SELECT advertiser_id FROM campaigns WHERE campaign_id = ?1",
                [campaign_id as i64],
                |r| r.get(0),
            )
            .optional()
            .map_err(unavailable("read campaigns"))?;
        Ok(owner.map(|o| o as u64))
    }

    fn advertiser_exists(&self, advertiser_id: u64) -> Result<bool, StoreError> {
        let n: i64 = self
            .reader()?
            .query_row(
                "SELECT count(*) FROM advertisers WHERE advertiser_id = ?1",
                [advertiser_id as i64],
                |r| r.get(0),
            )
            .map_err(unavailable("read advertisers"))?;
        Ok(n > 0)
    }

    fn click_series(
        &self,
        scope: MetricScope,
        id: u64,
        granularity: Granularity,
        from: Millis,
        to: Millis,
    ) -> Result<Vec<(Millis, Measures)>, StoreError> {
        let conn = self.reader()?;
        let (sql, args): (String, Vec<Value>) =
            if scope == MetricScope::Ad && granularity == Granularity::Minute {
                (
                    minute_series_sql(param),
                    vec![
                        Value::Integer(id as i64),
                        Value::Integer(from as i64),
                        Value::Integer(to as i64),
                    ],
                )
            } else {
                (
                    rollup_series_sql(param),
                    vec![
                        Value::Text(scope.as_str().into()),
                        Value::Integer(id as i64),
                        Value::Text(granularity.as_str().into()),
                        Value::Integer(from as i64),
                        Value::Integer(to as i64),
                    ],
                )
            };
        let mut stmt = conn
            .prepare_cached(&sql)
            .map_err(unavailable("read series"))?;
        stmt.query_map(rusqlite::params_from_iter(args), |r| {
            Ok((r.get::<_, i64>(0)? as Millis, measures_at(r, 1)?))
        })
        .and_then(|rows| rows.collect())
        .map_err(unavailable("read series"))
    }

    fn ad_totals(
        &self,
        advertiser_id: u64,
        from: Millis,
        to: Millis,
    ) -> Result<Vec<(u64, Measures)>, StoreError> {
        let conn = self.reader()?;
        let mut totals: BTreeMap<u64, Measures> = BTreeMap::new();
        for (g, a, b) in decompose(from, to) {
            let (sql, args) = if g == Granularity::Minute {
                (
                    minute_totals_sql(param),
                    vec![
                        Value::Integer(advertiser_id as i64),
                        Value::Integer(a as i64),
                        Value::Integer(b as i64),
                    ],
                )
            } else {
                (
                    rollup_totals_sql(param),
                    vec![
                        Value::Text(g.as_str().into()),
                        Value::Integer(advertiser_id as i64),
                        Value::Integer(a as i64),
                        Value::Integer(b as i64),
                    ],
                )
            };
            let mut stmt = conn
                .prepare_cached(&sql)
                .map_err(unavailable("read totals"))?;
            let rows = stmt
                .query_map(rusqlite::params_from_iter(args), |r| {
                    Ok((r.get::<_, i64>(0)? as u64, measures_at(r, 1)?))
                })
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(unavailable("read totals"))?;
            for (ad, m) in rows {
                totals.entry(ad).or_default().add(&m);
            }
        }
        Ok(totals.into_iter().collect())
    }

    fn late_clicks(
        &self,
        ad_id: u64,
        from: Millis,
        to: Millis,
        limit: usize,
    ) -> Result<Vec<LateClick>, StoreError> {
        let conn = self.reader()?;
        let mut stmt = conn
            .prepare_cached(&late_clicks_sql(param))
            .map_err(unavailable("read late clicks"))?;
        stmt.query_map(
            params![ad_id as i64, from as i64, to as i64, limit as i64],
            |r| {
                Ok(LateClick {
                    impression_id: r.get(0)?,
                    click_id: r.get(1)?,
                    event_time_ms: r.get::<_, i64>(2)? as Millis,
                    record_time_ms: r.get::<_, i64>(3)? as Millis,
                })
            },
        )
        .and_then(|rows| rows.collect())
        .map_err(unavailable("read late clicks"))
    }

    fn fraud_adjustments(
        &self,
        scope: MetricScope,
        id: u64,
        from: Millis,
        to: Millis,
        limit: usize,
    ) -> Result<Adjustments, StoreError> {
        let mut conn = self.reader()?;
        let read = unavailable("read fraud adjustments");
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let range = (id as i64, from as i64, to as i64);
        // One snapshot, so the totals are those of the rows listed.
        let tx = conn.transaction().map_err(&read)?;
        let rows = tx
            .prepare_cached(&fraud_adjustments_sql(scope, param))
            .and_then(|mut stmt| {
                stmt.query_map(
                    params![range.0, range.1, range.2, limit],
                    adjustment_from_row,
                )?
                .collect::<Result<Vec<_>, _>>()
            })
            .map_err(&read)?;
        let totals = tx
            .prepare_cached(&fraud_adjustment_totals_sql(scope, param))
            .and_then(|mut stmt| {
                stmt.query_row(params![range.0, range.1, range.2], |r| {
                    Ok(AdjustmentTotals {
                        adjustments: r.get(0)?,
                        clicks: r.get(1)?,
                        fraud_clicks: r.get(2)?,
                        spend_micros: r.get(3)?,
                    })
                })
            })
            .map_err(&read)?;
        tx.finish().map_err(&read)?;
        Ok(Adjustments { rows, totals })
    }

    fn ad_click_windows(
        &self,
        from: Millis,
        to: Millis,
    ) -> Result<(Option<Time>, Vec<AdWindow>), StoreError> {
        let view = corrections::required_ad_clicks(self.views)?;
        let read = unavailable("read ad_clicks windows");
        let mut conn = self.reader()?;
        // One read transaction: SQLite's WAL snapshot makes the rows those of the frontier.
        let tx = conn.transaction().map_err(&read)?;
        let frontier: Option<i64> = tx
            .query_row("SELECT max(upper) FROM progress", [], |r| r.get(0))
            .map_err(&read)?;
        let rows = tx
            .prepare(&format!(
                "SELECT ad_id, window_start, campaign_id, advertiser_id, clicks, fraud_clicks, \
                 late_clicks, spend_micros FROM {} WHERE window_start >= ?1 AND window_start < ?2 \
                 ORDER BY ad_id, window_start",
                view.table()
            ))
            .and_then(|mut stmt| {
                stmt.query_map(params![from as i64, to as i64], |r| {
                    Ok(AdWindow {
                        ad_id: r.get::<_, i64>(0)? as u64,
                        window_start: r.get::<_, i64>(1)? as u64,
                        campaign_id: r.get::<_, i64>(2)? as u64,
                        advertiser_id: r.get::<_, i64>(3)? as u64,
                        measures: Measures {
                            clicks: r.get(4)?,
                            fraud_clicks: r.get(5)?,
                            late_clicks: r.get(6)?,
                            spend_micros: r.get(7)?,
                        },
                    })
                })?
                .collect::<Result<Vec<_>, _>>()
            })
            .map_err(&read)?;
        tx.finish().map_err(&read)?;
        Ok((frontier.map(|f| f as Time), rows))
    }

    fn apply_corrections(
        &self,
        run_id: &str,
        applied_at_ms: Millis,
        fixes: &[WindowCorrection],
    ) -> Result<(), StoreError> {
        let view = corrections::required_ad_clicks(self.views)?;
        let sql = corrections::correction_sql(view, param);
        let write = unavailable("apply corrections");
        let mut conn = self.writer.lock();
        conn.execute_batch(&sql.create).map_err(&write)?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&write)?;
        for c in fixes {
            let m = |x: &Measures| [x.clicks, x.fraud_clicks, x.late_clicks, x.spend_micros];
            let (ad, w) = (c.ad_id as i64, c.window_start as i64);
            let new = m(&c.corrected);
            let changed = match c.expected {
                Some(old) => {
                    let old = m(&old);
                    if c.corrected == Measures::default() {
                        tx.execute(&sql.delete, params![ad, w, old[0], old[1], old[2], old[3]])
                    } else {
                        tx.execute(
                            &sql.update,
                            params![
                                new[0], new[1], new[2], new[3], ad, w, old[0], old[1], old[2],
                                old[3]
                            ],
                        )
                    }
                }
                None => tx.execute(
                    &sql.insert,
                    params![
                        ad,
                        w,
                        c.campaign_id as i64,
                        c.advertiser_id as i64,
                        new[0],
                        new[1],
                        new[2],
                        new[3]
                    ],
                ),
            }
            .map_err(&write)?;
            if changed != 1 {
                // Dropping the transaction rolls every correction back.
                return Err(StoreError::Conflict(format!(
                    "ad {} window {} changed since it was reconciled; nothing was corrected, run reconcile again",
                    c.ad_id, c.window_start
                )));
            }
            let before = c.expected.map(|x| m(&x)).unwrap_or_default();
            tx.execute(
                &sql.record,
                params![
                    run_id,
                    ad,
                    w,
                    c.campaign_id as i64,
                    c.advertiser_id as i64,
                    new[0] - before[0],
                    new[1] - before[1],
                    new[2] - before[2],
                    new[3] - before[3],
                    applied_at_ms as i64
                ],
            )
            .map_err(&write)?;
        }
        for (i, scope, id, g, start) in corrections::rollup_windows(fixes) {
            tx.execute(
                &sql.rollup[i],
                params![
                    scope,
                    id as i64,
                    g.as_str(),
                    start as i64,
                    (start + g.ms()) as i64
                ],
            )
            .map_err(&write)?;
            tx.execute(
                &sql.rollup_delete_empty,
                params![scope, id as i64, g.as_str(), start as i64],
            )
            .map_err(&write)?;
        }
        tx.commit().map_err(&write)
    }

    fn drop_windows_before(&self, cutoff: Millis) -> Result<u64, StoreError> {
        let write = unavailable("drop old windows");
        let mut conn = self.writer.lock();
        if let Some(view) = corrections::ad_clicks(self.views) {
            conn.execute_batch(&corrections::correction_sql(view, param).create)
                .map_err(&write)?;
        }
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&write)?;
        let mut dropped = 0u64;
        for stmt in corrections::retention_sql(self.views, param) {
            dropped += tx.execute(&stmt, params![cutoff as i64]).map_err(&write)? as u64;
        }
        tx.commit().map_err(&write)?;
        Ok(dropped)
    }
}

/// A [`FraudAdjustment`] from a row of [`super::common::ADJUSTMENT_COLUMNS`].
fn adjustment_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<FraudAdjustment> {
    Ok(FraudAdjustment {
        ad_id: r.get::<_, i64>(0)? as u64,
        campaign_id: r.get::<_, i64>(1)? as u64,
        advertiser_id: r.get::<_, i64>(2)? as u64,
        impression_id: r.get(3)?,
        click_id: r.get(4)?,
        window_start_ms: r.get::<_, i64>(5)? as Millis,
        event_time_ms: r.get::<_, i64>(6)? as Millis,
        verdict_time_ms: r.get::<_, i64>(7)? as Millis,
        clicks: r.get(8)?,
        fraud_clicks: r.get(9)?,
        spend_micros: r.get(10)?,
    })
}

fn ad_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Ad> {
    Ok(Ad {
        ad_id: r.get::<_, i64>(0)? as u64,
        advertiser_id: r.get::<_, i64>(1)? as u64,
        campaign_id: r.get::<_, i64>(2)? as u64,
        landing_url: r.get(3)?,
        cpc_micros: r.get::<_, i64>(4)? as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance::{Backend, RETENTION_MS, conformance_tests};

    /// A store in a temporary directory of its own.
    struct TempStore(tempfile::TempDir);

    impl TempStore {
        fn new() -> TempStore {
            TempStore(tempfile::tempdir().expect("tmp"))
        }

        fn path(&self) -> std::path::PathBuf {
            self.0.path().join("store.db")
        }
    }

    impl Backend for TempStore {
        fn open(&self) -> Result<Box<dyn Store>, StoreError> {
            Ok(Box::new(SqliteStore::open(
                &self.path(),
                crate::dataflows::VIEWS,
                SqliteOptions {
                    read_pool_size: 2,
                    progress_retention_ms: RETENTION_MS,
                    cache_mib: 8,
                },
            )?))
        }

        fn execute(&self, sql: &str) {
            Connection::open(self.path())
                .and_then(|c| c.execute_batch(sql))
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
        }

        fn query_i64(&self, sql: &str) -> i64 {
            Connection::open(self.path())
                .and_then(|c| c.query_row(sql, [], |r| r.get(0)))
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
        }
    }

    conformance_tests!(TempStore::new());
}
