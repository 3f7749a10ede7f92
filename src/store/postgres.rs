//! The production store: Postgres. A pool serves the query API and catalog writes; the
//! sink writer has a session of its own that holds the writer lock and runs the commits.
//!
//! Semantics are those of [`super::sqlite::SqliteStore`], checked by the shared suite in
//! `src/store/conformance.rs`. What differs is how the stores keep one writer:
//!
//! - **Claim.** [`Store::claim_writer`] takes a session advisory lock on the writer's own
//!   connection and increments `writer_fence.generation`. Postgres drops the lock when the
//!   session ends, so a writer killed with SIGKILL is claimable again at once, while a
//!   second live worker set is refused with [`StoreError::Fenced`] naming the holder.
//! - **Fence.** Every commit locks the fence row (`FOR UPDATE`) and checks the generation
//!   is still its own, in the same transaction as its writes. A claim bumps the generation
//!   under the same row lock, so once anyone else has claimed, this writer can never commit
//!   again, whatever happened to its lock.
//! - **Lost session.** If the server restarts or ends the writer's session, the next commit
//!   reconnects and re-takes the lock: with the lock and an unchanged generation it carries
//!   on (nobody claimed meanwhile, since a claim bumps the generation); otherwise it is
//!   fenced for good. While the server is down, commits fail with
//!   [`StoreError::Unavailable`] and the sink retries.
//!
//! The sync `postgres` client runs its own small runtime and panics when it blocks on a
//! thread that drives an async runtime. The trait's methods must therefore be called from
//! plain threads or `tokio::task::spawn_blocking`; [`PostgresStore::open`], [`migrate`] and
//! dropping the store are safe anywhere.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use postgres::error::SqlState;
use postgres::types::ToSql;
use postgres::{Client, Config, NoTls, Statement, Transaction};

use super::common::{
    AD_COLUMNS, LAST_PROGRESS, RollupColumns, RollupDeltas, check_ad_rules, check_tick,
    column_defs, columns_differ, decode_positions, deltas_in_key_order, encode_positions,
    fraud_adjustment_totals_sql, fraud_adjustments_sql, in_key_order, insert_campaign_sql,
    insert_progress_sql, late_clicks_sql, may_empty, minute_series_sql, minute_totals_sql,
    progress_at_sql, prune_progress_sql, rollup_series_sql, rollup_totals_sql, upsert_action,
    upsert_ad_sql,
};
use super::corrections;
use super::{
    Ad, AdjustmentTotals, Adjustments, ChangeBatch, FraudAdjustment, LateClick, Measures,
    MetricScope, RecoveryPoint, Store, StoreError, Upserted, ViewChanges, WriterClaim, decompose,
};
use super::{AdWindow, WindowCorrection};
use crate::time::{Granularity, Millis, Time, now_ms, rfc3339};
use crate::views::{Column, ColumnType, Datum, Row, ViewDef};

mod embedded {
    refinery::embed_migrations!("src/store/migrations/postgres");
}

/// First key of every advisory lock this store takes ("clka"), so they cannot collide
/// with other applications' locks in the same database.
const LOCK_CLASS: i32 = 0x636c_6b61;
/// Second key: the one sink writer.
const WRITER_LOCK: i32 = 1;
/// Second key: migrations and view tables, so concurrent starts do not race on DDL.
const MIGRATION_LOCK: i32 = 2;
/// Second key: catalog writes, which check rules across tables before they write.
const CATALOG_LOCK: i32 = 3;

/// Used when the URL sets no `connect_timeout`: a down server must fail a commit, not hang it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a claim waits for a lock that a just-ended session may still hold.
const CLAIM_GRACE: Duration = Duration::from_secs(1);
/// The `application_name` prefix of writer sessions.
const WRITER_APP: &str = "clickagg-writer";

/// Options of the Postgres store.
#[derive(Clone, Copy, Debug)]
pub struct PostgresOptions {
    /// Pooled connections for queries and catalog writes (the sink writer has its own).
    pub pool_size: u32,
    /// Progress rows older than the last one at or before `upper - this` are pruned.
    pub progress_retention_ms: u64,
}

/// SQL of one view, derived from its columns once at start. Every statement takes one
/// array per column and handles all rows of a commit in one round trip.
struct ViewSql {
    select_old: String,
    upsert: String,
    delete: String,
    rollup_upsert: Option<String>,
    rollup_delete_empty: Option<String>,
}

/// The writer's session and its prepared statements.
struct WriterConn {
    client: Client,
    statements: HashMap<String, Statement>,
}

impl WriterConn {
    /// Releases the writer lock at once, rather than whenever the server notices the
    /// closed socket, so that the next claimant does not have to wait.
    fn release(mut self) {
        if !self.client.is_closed()
            && let Err(e) = self.client.execute(
                "SELECT pg_advisory_unlock($1, $2)",
                &[&LOCK_CLASS, &WRITER_LOCK],
            )
        {
            tracing::debug!(error = %describe(&e), "releasing the writer lock");
        }
    }
}

/// The sink writer's state.
#[derive(Default)]
struct Writer {
    /// The generation of this process's claim, once claimed.
    generation: Option<u64>,
    /// Why this store was fenced. Sticky: a fenced writer never commits again.
    fenced: Option<String>,
    /// The writer session; it holds the writer lock while it lives.
    conn: Option<WriterConn>,
}

/// Who this process is, as other processes see it when they are refused.
struct Identity {
    /// `application_name` of the writer session, unique to this store instance.
    app_name: String,
    /// Stored in `writer_fence.holder` by a claim.
    holder: String,
}

/// The Postgres store.
pub struct PostgresStore {
    config: Config,
    identity: Identity,
    /// Always `Some` until dropped; taken by `Drop` to close it off any async runtime.
    pool: Option<r2d2::Pool<Manager>>,
    writer: Mutex<Writer>,
    views: &'static [ViewDef],
    sql: Vec<ViewSql>,
    progress_retention_ms: u64,
}

/// The error with its causes: `postgres::Error` alone says only "db error".
fn describe(e: &postgres::Error) -> String {
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

fn db(what: &'static str) -> impl Fn(postgres::Error) -> StoreError {
    move |e| StoreError::Unavailable(format!("{what}: {}", describe(&e)))
}

/// A connection failure of the pool, with its causes.
#[derive(Debug)]
struct PoolError(String);

impl std::fmt::Display for PoolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PoolError {}

/// A pooled connection and the read statements prepared on it.
struct Session {
    client: Client,
    /// By SQL text. A dashboard query prepared once per connection is one round trip and
    /// no parse or plan on the server; unprepared, every call parsed, planned and
    /// described it first, in a round trip of its own.
    statements: HashMap<String, Statement>,
    /// When the pool last took it back unbroken.
    returned: Instant,
}

/// A session the pool took back unbroken this recently is lent again without the
/// round trip that tests it (HikariCP's `aliveBypassWindowMs`, 500 ms there): under load
/// every read otherwise paid one more round trip, and the server one more statement, for
/// a check that only matters after a connection sat idle.
const TRUSTED_AFTER_USE: Duration = Duration::from_secs(1);

impl Session {
    /// Runs `sql`, prepared on this connection once. A statement the server no longer
    /// accepts (its table's columns changed under it: "cached plan must not change
    /// result type") is prepared again, once.
    fn query_cached(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<postgres::Row>, postgres::Error> {
        let statement = self.prepared(sql)?;
        match self.client.query(&statement, params) {
            Err(e) if e.code() == Some(&SqlState::FEATURE_NOT_SUPPORTED) => {
                self.statements.remove(sql);
                let statement = self.prepared(sql)?;
                self.client.query(&statement, params)
            }
            answer => answer,
        }
    }

    fn prepared(&mut self, sql: &str) -> Result<Statement, postgres::Error> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql)?;
        self.statements.insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }
}

impl std::ops::Deref for Session {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}

impl std::ops::DerefMut for Session {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.client
    }
}

/// Opens the pool's connections. Not `r2d2_postgres`: its errors lose their causes.
struct Manager(Config);

impl r2d2::ManageConnection for Manager {
    type Connection = Session;
    type Error = PoolError;

    fn connect(&self) -> Result<Session, PoolError> {
        let client = self.0.connect(NoTls).map_err(|e| PoolError(describe(&e)))?;
        Ok(Session {
            client,
            statements: HashMap::new(),
            returned: Instant::now(),
        })
    }

    fn is_valid(&self, conn: &mut Session) -> Result<(), PoolError> {
        conn.client
            .is_valid(CONNECT_TIMEOUT)
            .map_err(|e| PoolError(describe(&e)))
    }

    // r2d2 asks this of every connection handed back, so it also stamps the hand-back.
    fn has_broken(&self, conn: &mut Session) -> bool {
        conn.returned = Instant::now();
        conn.client.is_closed()
    }
}

/// Postgres spells the n-th parameter `$n`.
fn param(n: usize) -> String {
    format!("${n}")
}

fn pg_type(ty: ColumnType) -> &'static str {
    match ty {
        ColumnType::Text => "TEXT",
        ColumnType::Id | ColumnType::Int | ColumnType::Time => "BIGINT",
    }
}

/// How `information_schema.columns.data_type` names [`pg_type`]'s types.
fn info_schema_type(ty: ColumnType) -> &'static str {
    match ty {
        ColumnType::Text => "text",
        ColumnType::Id | ColumnType::Int | ColumnType::Time => "bigint",
    }
}

/// Runs `f` where the sync client may block: here, or on a helper thread when this thread
/// drives an async runtime (the client's own runtime would panic there).
fn off_runtime<T: Send>(f: impl FnOnce() -> Result<T, StoreError> + Send) -> Result<T, StoreError> {
    if tokio::runtime::Handle::try_current().is_err() {
        return f();
    }
    std::thread::scope(|s| {
        let handle = std::thread::Builder::new()
            .name("postgres-blocking".into())
            .spawn_scoped(s, f)
            .map_err(|e| StoreError::Unavailable(format!("spawn a Postgres thread: {e}")))?;
        handle
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// The URL's host, port and database for messages, never its user or password.
pub fn redacted_url(url: &str) -> String {
    match Config::from_str(url) {
        Ok(c) => {
            let hosts: Vec<String> = c
                .get_hosts()
                .iter()
                .zip(c.get_ports().iter().chain(std::iter::repeat(&5432)))
                .map(|(h, port)| match h {
                    postgres::config::Host::Tcp(h) => format!("{h}:{port}"),
                    #[cfg(unix)]
                    postgres::config::Host::Unix(p) => p.display().to_string(),
                })
                .collect();
            format!(
                "postgres://{}/{}",
                hosts.join(","),
                c.get_dbname().unwrap_or("")
            )
        }
        Err(_) => "(not a Postgres URL)".to_owned(),
    }
}

/// Connects once (with the store's connect timeout) and disconnects: is the store there?
pub fn probe(url: &str) -> Result<(), StoreError> {
    let config = parse_config(url)?;
    off_runtime(move || {
        let client = config.connect(NoTls).map_err(db("connect to Postgres"))?;
        drop(client);
        Ok(())
    })
}

fn parse_config(url: &str) -> Result<Config, StoreError> {
    // The error never echoes the URL: it may hold a password.
    let mut config = Config::from_str(url)
        .map_err(|e| StoreError::Inconsistent(format!("invalid Postgres URL: {}", describe(&e))))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    Ok(config)
}

/// `unnest($n::T[], ...) AS u(c, ...)` over the given columns, parameters from `$first`.
fn unnest<'a>(cols: impl Iterator<Item = (&'a str, &'static str)>, first: usize) -> String {
    let (names, arrays): (Vec<&str>, Vec<String>) = cols
        .enumerate()
        .map(|(i, (name, ty))| (name, format!("${}::{ty}[]", first + i)))
        .unzip();
    format!("unnest({}) AS u({})", arrays.join(", "), names.join(", "))
}

fn typed(cols: &[Column]) -> impl Iterator<Item = (&str, &'static str)> {
    cols.iter().map(|c| (c.name, pg_type(c.ty)))
}

fn view_sql(view: &ViewDef) -> ViewSql {
    let table = view.table();
    let keys: Vec<&str> = view.key.iter().map(|c| c.name).collect();
    let values: Vec<&str> = view.value.iter().map(|c| c.name).collect();
    let all: Vec<&str> = keys.iter().chain(&values).copied().collect();
    let key_match = keys
        .iter()
        .map(|c| format!("t.{c} = u.{c}"))
        .collect::<Vec<_>>()
        .join(" AND ");
    let updates = upsert_action(&values);
    let rollup_upsert = view.rollup.map(|r| {
        let rollup = view.rollup_table();
        let cols = [
            ("scope", "TEXT"),
            ("scope_id", "BIGINT"),
            ("granularity", "TEXT"),
            ("window_start", "BIGINT"),
        ]
        .into_iter()
        .chain(r.measures.iter().map(|m| (*m, "BIGINT")));
        let sums = r
            .measures
            .iter()
            .map(|m| format!("{m} = {rollup}.{m} + excluded.{m}"))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "INSERT INTO {rollup} (scope, scope_id, granularity, window_start, {}) \
             SELECT * FROM {} \
             ON CONFLICT (scope, scope_id, granularity, window_start) DO UPDATE SET {sums}",
            r.measures.join(", "),
            unnest(cols, 1)
        )
    });
    // See `delete_empty_rollup_sql`: the same rule for all keys of a commit at once.
    let rollup_delete_empty = view.rollup.map(|r| {
        let zero = r
            .measures
            .iter()
            .map(|m| format!("t.{m} = 0"))
            .collect::<Vec<_>>()
            .join(" AND ");
        let key = [
            ("scope", "TEXT"),
            ("scope_id", "BIGINT"),
            ("granularity", "TEXT"),
            ("window_start", "BIGINT"),
        ];
        let key_match = key
            .iter()
            .map(|(c, _)| format!("t.{c} = u.{c}"))
            .collect::<Vec<_>>()
            .join(" AND ");
        format!(
            "DELETE FROM {} t USING {} WHERE {key_match} AND {zero}",
            view.rollup_table(),
            unnest(key.into_iter(), 1)
        )
    });
    ViewSql {
        select_old: format!(
            "SELECT {} FROM {table} t JOIN {} ON {key_match}",
            all.iter()
                .map(|c| format!("t.{c}"))
                .collect::<Vec<_>>()
                .join(", "),
            unnest(typed(view.key), 1)
        ),
        upsert: format!(
            "INSERT INTO {table} ({}) SELECT * FROM {} ON CONFLICT ({}) DO {updates}",
            all.join(", "),
            unnest(typed(view.key).chain(typed(view.value)), 1),
            keys.join(", ")
        ),
        delete: format!(
            "DELETE FROM {table} t USING {} WHERE {key_match}",
            unnest(typed(view.key), 1)
        ),
        rollup_upsert,
        rollup_delete_empty,
    }
}

/// The columns of a table in the current schema: `(name, data_type)` in order.
fn table_columns(client: &mut Client, table: &str) -> Result<Vec<(String, String)>, StoreError> {
    let rows = client
        .query(
            "SELECT column_name::TEXT, data_type::TEXT FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position",
            &[&table],
        )
        .map_err(db("inspect view table"))?;
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<Result<_, postgres::Error>>()
        .map_err(db("inspect view table"))
}

/// Refuses a table whose columns (names, then types) differ from the declared ones.
fn check_columns(
    client: &mut Client,
    table: &str,
    view: &ViewDef,
    want: &[(&str, &str)],
) -> Result<(), StoreError> {
    let have = table_columns(client, table)?;
    let names: Vec<String> = have.iter().map(|(n, _)| n.clone()).collect();
    let want_names: Vec<&str> = want.iter().map(|(n, _)| *n).collect();
    if names != want_names {
        return Err(columns_differ(table, view.name, &names, &want_names));
    }
    for ((name, ty), (_, want_ty)) in have.iter().zip(want) {
        if ty != want_ty {
            return Err(StoreError::Inconsistent(format!(
                "column {name} of table {table} is {ty} but view {} needs {want_ty}; \
                 a changed view needs a new name or a migration of its table",
                view.name
            )));
        }
    }
    Ok(())
}

/// Creates a view's tables if missing, and refuses to run against a table whose columns
/// differ from the view's declaration.
fn ensure_view_tables(client: &mut Client, view: &ViewDef) -> Result<(), StoreError> {
    let table = view.table();
    let keys: Vec<&str> = view.key.iter().map(|c| c.name).collect();
    client
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {table} ({}, PRIMARY KEY ({}))",
            column_defs(view, pg_type).join(", "),
            keys.join(", ")
        ))
        .map_err(db("create view table"))?;
    let want: Vec<(&str, &str)> = view
        .key
        .iter()
        .chain(view.value)
        .map(|c| (c.name, info_schema_type(c.ty)))
        .collect();
    check_columns(client, &table, view, &want)?;

    if let Some(r) = &view.rollup {
        // The series the rollups skip (an ad's minutes) are read from this table by key
        // prefix and window range. The sink writes a minute's rows for every ad together,
        // so one ad's day lies on 1,440 different heap pages; with the measures in the
        // index Postgres answers from about 15 index pages instead (EXPLAIN ANALYZE of
        // a 24 h series: 7.4 ms -> 0.3 ms; `bench/query.rs` with QUERY_STORE=postgres).
        client
            .batch_execute(&format!(
                "CREATE INDEX IF NOT EXISTS {table}_series ON {table} ({}) INCLUDE ({})",
                keys.join(", "),
                r.measures.join(", ")
            ))
            .map_err(db("create view series index"))?;
        let rollup = view.rollup_table();
        let measures: Vec<String> = r
            .measures
            .iter()
            .map(|m| format!("{m} BIGINT NOT NULL"))
            .collect();
        client
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {rollup} (scope TEXT NOT NULL, scope_id BIGINT NOT NULL, \
                 granularity TEXT NOT NULL, window_start BIGINT NOT NULL, {}, \
                 PRIMARY KEY (scope, scope_id, granularity, window_start))",
                measures.join(", ")
            ))
            .map_err(db("create rollup table"))?;
        let want: Vec<(&str, &str)> = [
            ("scope", "text"),
            ("scope_id", "bigint"),
            ("granularity", "text"),
            ("window_start", "bigint"),
        ]
        .into_iter()
        .chain(r.measures.iter().map(|m| (*m, "bigint")))
        .collect();
        check_columns(client, &rollup, view, &want)?;
    }
    Ok(())
}

/// A read-only transaction on one snapshot, for reads whose parts must agree.
fn snapshot(client: &mut Client) -> Result<Transaction<'_>, postgres::Error> {
    client
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
}

/// Applies the migrations and derives the view tables, under an advisory lock so that
/// processes starting together do not race on the DDL. Returns the migrations applied.
fn migrate_with(client: &mut Client, views: &[ViewDef]) -> Result<Vec<String>, StoreError> {
    for view in views {
        view.validate().map_err(StoreError::Inconsistent)?;
    }
    client
        .execute(
            "SELECT pg_advisory_lock($1, $2)",
            &[&LOCK_CLASS, &MIGRATION_LOCK],
        )
        .map_err(db("lock for migrations"))?;
    let migrated = (|| {
        let report = embedded::migrations::runner()
            .run(client)
            .map_err(|e| StoreError::Unavailable(format!("migrate store: {e}")))?;
        for view in views {
            ensure_view_tables(client, view)?;
        }
        Ok(report
            .applied_migrations()
            .iter()
            .map(|m| format!("V{}__{}", m.version(), m.name()))
            .collect())
    })();
    let unlocked = client.execute(
        "SELECT pg_advisory_unlock($1, $2)",
        &[&LOCK_CLASS, &MIGRATION_LOCK],
    );
    let applied = migrated?;
    unlocked.map_err(db("unlock after migrations"))?;
    Ok(applied)
}

/// Migrates the store at `url` and creates the views' tables; idempotent. Returns the
/// names of the migrations it applied (none when the store is up to date).
pub fn migrate(url: &str, views: &'static [ViewDef]) -> Result<Vec<String>, StoreError> {
    let config = parse_config(url)?;
    off_runtime(move || {
        let mut client = config.connect(NoTls).map_err(db("connect to Postgres"))?;
        migrate_with(&mut client, views)
    })
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "an unknown host".into())
}

/// Reads a view column as its datum.
fn datum(ty: ColumnType, row: &postgres::Row, i: usize) -> Result<Datum, postgres::Error> {
    Ok(match ty {
        ColumnType::Id => Datum::Id(row.try_get::<_, i64>(i)? as u64),
        ColumnType::Int => Datum::Int(row.try_get(i)?),
        ColumnType::Time => Datum::Time(row.try_get::<_, i64>(i)? as u64),
        ColumnType::Text => Datum::Text(row.try_get(i)?),
    })
}

/// One column's values for an `unnest` parameter.
enum Array<'a> {
    Int(Vec<i64>),
    Text(Vec<&'a str>),
}

impl<'a> Array<'a> {
    fn for_columns(cols: &[Column]) -> Vec<Array<'a>> {
        cols.iter()
            .map(|c| match c.ty {
                ColumnType::Text => Array::Text(Vec::new()),
                _ => Array::Int(Vec::new()),
            })
            .collect()
    }

    fn param(&self) -> &(dyn ToSql + Sync) {
        match self {
            Array::Int(v) => v,
            Array::Text(v) => v,
        }
    }
}

/// Appends a row to per-column arrays, refusing data that does not fit the declaration.
fn push_row<'a>(
    arrays: &mut [Array<'a>],
    view: &ViewDef,
    cols: &[Column],
    row: &'a Row,
) -> Result<(), StoreError> {
    if row.len() != cols.len() {
        return Err(StoreError::Inconsistent(format!(
            "view {} produced a row of {} columns where it declares {}",
            view.name,
            row.len(),
            cols.len()
        )));
    }
    for ((array, col), d) in arrays.iter_mut().zip(cols).zip(row) {
        let fits = match (array, d) {
            (Array::Text(v), Datum::Text(s)) => {
                v.push(s.as_str());
                true
            }
            (Array::Int(v), d) => d.as_i64().map(|x| v.push(x)).is_some(),
            (Array::Text(_), _) => false,
        };
        if !fits {
            return Err(StoreError::Inconsistent(format!(
                "view {} produced {d:?} for its {:?} column {}",
                view.name, col.ty, col.name
            )));
        }
    }
    Ok(())
}

fn params<'p>(arrays: &'p [Array<'_>]) -> Vec<&'p (dyn ToSql + Sync)> {
    arrays.iter().map(Array::param).collect()
}

/// A statement prepared once per writer session.
fn prepared(
    tx: &mut Transaction<'_>,
    statements: &mut HashMap<String, Statement>,
    sql: &str,
) -> Result<Statement, StoreError> {
    if let Some(s) = statements.get(sql) {
        return Ok(s.clone());
    }
    let s = tx.prepare(sql).map_err(db("prepare"))?;
    statements.insert(sql.to_owned(), s.clone());
    Ok(s)
}

fn apply_view(
    tx: &mut Transaction<'_>,
    statements: &mut HashMap<String, Statement>,
    view: &ViewDef,
    sql: &ViewSql,
    changes: &ViewChanges,
) -> Result<(), StoreError> {
    if changes.is_empty() {
        return Ok(());
    }
    let write = db("write view");
    let changes = in_key_order(changes);
    let mut deltas = RollupDeltas::new();
    if let Some(columns) = RollupColumns::of(view) {
        let mut keys = Array::for_columns(view.key);
        for (key, _) in &changes {
            push_row(&mut keys, view, view.key, key)?;
        }
        let select = prepared(tx, statements, &sql.select_old)?;
        let mut old: HashMap<Row, Row> = HashMap::with_capacity(changes.len());
        for r in tx.query(&select, &params(&keys)).map_err(&write)? {
            let n = view.key.len();
            let key = (view.key.iter().enumerate())
                .map(|(i, c)| datum(c.ty, &r, i))
                .collect::<Result<Row, _>>()
                .map_err(&write)?;
            let value = (view.value.iter().enumerate())
                .map(|(i, c)| datum(c.ty, &r, n + i))
                .collect::<Result<Row, _>>()
                .map_err(&write)?;
            old.insert(key, value);
        }
        for (key, new) in &changes {
            columns.add(key, old.get(*key), -1, &mut deltas);
            columns.add(key, new.as_ref(), 1, &mut deltas);
        }
    }

    let mut deletes = Array::for_columns(view.key);
    let mut upserts_key = Array::for_columns(view.key);
    let mut upserts_value = Array::for_columns(view.value);
    let (mut n_deletes, mut n_upserts) = (0, 0);
    for (key, new) in changes {
        match new {
            Some(value) => {
                push_row(&mut upserts_key, view, view.key, key)?;
                push_row(&mut upserts_value, view, view.value, value)?;
                n_upserts += 1;
            }
            None => {
                push_row(&mut deletes, view, view.key, key)?;
                n_deletes += 1;
            }
        }
    }
    if n_deletes > 0 {
        let delete = prepared(tx, statements, &sql.delete)?;
        tx.execute(&delete, &params(&deletes)).map_err(&write)?;
    }
    if n_upserts > 0 {
        let upsert = prepared(tx, statements, &sql.upsert)?;
        upserts_key.extend(upserts_value);
        tx.execute(&upsert, &params(&upserts_key)).map_err(&write)?;
    }

    if let (Some(r), Some(stmt), Some(delete_empty)) =
        (&view.rollup, &sql.rollup_upsert, &sql.rollup_delete_empty)
    {
        let mut emptied: (Vec<&str>, Vec<i64>, Vec<&str>, Vec<i64>) = Default::default();
        let mut scopes: Vec<&str> = Vec::with_capacity(deltas.len());
        let mut ids = Vec::with_capacity(deltas.len());
        let mut grans: Vec<&str> = Vec::with_capacity(deltas.len());
        let mut windows = Vec::with_capacity(deltas.len());
        let mut measures: Vec<Vec<i64>> = vec![Vec::with_capacity(deltas.len()); r.measures.len()];
        for ((scope, id, g, window), d) in deltas_in_key_order(deltas) {
            if d.iter().all(|x| *x == 0) {
                continue;
            }
            if may_empty(&d) {
                emptied.0.push(r.scopes[scope].0);
                emptied.1.push(id as i64);
                emptied.2.push(g.as_str());
                emptied.3.push(window as i64);
            }
            scopes.push(r.scopes[scope].0);
            ids.push(id as i64);
            grans.push(g.as_str());
            windows.push(window as i64);
            for (column, x) in measures.iter_mut().zip(d) {
                column.push(x);
            }
        }
        if !ids.is_empty() {
            let mut args: Vec<&(dyn ToSql + Sync)> = vec![&scopes, &ids, &grans, &windows];
            args.extend(measures.iter().map(|m| m as &(dyn ToSql + Sync)));
            let rollup = prepared(tx, statements, stmt)?;
            tx.execute(&rollup, &args).map_err(db("write rollup"))?;
        }
        if !emptied.0.is_empty() {
            let delete = prepared(tx, statements, delete_empty)?;
            let (scopes, ids, grans, windows) = &emptied;
            tx.execute(&delete, &[scopes, ids, grans, windows])
                .map_err(db("delete empty rollup rows"))?;
        }
    }
    Ok(())
}

fn measures_at(r: &postgres::Row, first: usize) -> Result<Measures, postgres::Error> {
    Ok(Measures {
        clicks: r.try_get(first)?,
        fraud_clicks: r.try_get(first + 1)?,
        late_clicks: r.try_get(first + 2)?,
        spend_micros: r.try_get(first + 3)?,
    })
}

fn ad_from_row(r: &postgres::Row) -> Result<Ad, postgres::Error> {
    Ok(Ad {
        ad_id: r.try_get::<_, i64>(0)? as u64,
        advertiser_id: r.try_get::<_, i64>(1)? as u64,
        campaign_id: r.try_get::<_, i64>(2)? as u64,
        landing_url: r.try_get(3)?,
        cpc_micros: r.try_get::<_, i64>(4)? as u64,
    })
}

/// Whom a refused claimant finds holding the writer lock.
fn describe_holder(client: &mut Client) -> Result<Option<(i32, String, String)>, StoreError> {
    let row = client
        .query_opt(
            &format!(
                "SELECT l.pid, coalesce(a.application_name, ''), \
                 coalesce(host(a.client_addr), 'a local socket') \
                 FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
                 WHERE l.locktype = 'advisory' AND l.classid = {LOCK_CLASS} \
                 AND l.objid = {WRITER_LOCK} AND l.objsubid = 2 AND l.granted \
                 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            ),
            &[],
        )
        .map_err(db("find the writer lock's holder"))?;
    row.map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
        .transpose()
        .map_err(db("find the writer lock's holder"))
}

impl PostgresStore {
    /// Connects to the store at `url`, migrates it, derives the view tables and opens the
    /// query pool. Safe to call from an async context.
    pub fn open(
        url: &str,
        views: &'static [ViewDef],
        options: PostgresOptions,
    ) -> Result<PostgresStore, StoreError> {
        let config = parse_config(url)?;
        off_runtime(move || {
            let mut client = config.connect(NoTls).map_err(db("connect to Postgres"))?;
            let applied = migrate_with(&mut client, views)?;
            if !applied.is_empty() {
                tracing::info!(?applied, "migrated the Postgres store");
            }
            drop(client);
            // `conn` probes a session that sat idle and trusts one just used.
            let pool = r2d2::Pool::builder()
                .test_on_check_out(false)
                .max_size(options.pool_size)
                .connection_timeout(CONNECT_TIMEOUT)
                .build(Manager(config.clone()))
                .map_err(|e| StoreError::Unavailable(format!("open store connections: {e}")))?;
            let nonce: u64 = rand::random();
            let pid = std::process::id();
            Ok(PostgresStore {
                config,
                identity: Identity {
                    app_name: format!("{WRITER_APP} {nonce:016x} pid {pid}"),
                    holder: format!("clickagg pid {pid} on {}", host_name()),
                },
                pool: Some(pool),
                writer: Mutex::new(Writer::default()),
                views,
                sql: views.iter().map(view_sql).collect(),
                progress_retention_ms: options.progress_retention_ms,
            })
        })
    }

    /// A pooled session that was in use within [`TRUSTED_AFTER_USE`] or answers a probe
    /// now. A session that fails the probe is closed, so the pool drops it on its return.
    fn conn(&self) -> Result<r2d2::PooledConnection<Manager>, StoreError> {
        let pool = self
            .pool
            .as_ref()
            .ok_or_else(|| StoreError::Unavailable("the store is closed".into()))?;
        let mut failed = None;
        for _ in 0..=pool.max_size() {
            let mut c = pool
                .get()
                .map_err(|e| StoreError::Unavailable(format!("store connection: {e}")))?;
            if c.returned.elapsed() < TRUSTED_AFTER_USE {
                return Ok(c);
            }
            match c.client.is_valid(CONNECT_TIMEOUT) {
                Ok(()) => return Ok(c),
                Err(e) => failed = Some(describe(&e)),
            }
        }
        Err(StoreError::Unavailable(format!(
            "store connection: every pooled session failed its probe, the last with: {}",
            failed.unwrap_or_default()
        )))
    }

    /// Runs a read on a pooled session, and again on another one while the session turns
    /// out closed (the server restarted, or ended it, since it was last used): a read can
    /// run twice, and a dashboard should not see an error for a connection that died idle.
    fn read<T>(
        &self,
        what: &'static str,
        mut f: impl FnMut(&mut Session) -> Result<T, postgres::Error>,
    ) -> Result<T, StoreError> {
        let attempts = self.pool.as_ref().map_or(1, |p| p.max_size() + 1);
        let mut closed = None;
        for _ in 0..attempts {
            let mut c = self.conn()?;
            match f(&mut c) {
                Err(e) if c.client.is_closed() => closed = Some(e),
                answer => return answer.map_err(db(what)),
            }
        }
        Err(closed.map_or_else(
            || StoreError::Unavailable(format!("{what}: no session")),
            db(what),
        ))
    }

    /// Opens a writer session and takes the writer lock on it, or explains who holds it.
    fn lock_session(&self) -> Result<WriterConn, StoreError> {
        let mut config = self.config.clone();
        config
            .application_name(&self.identity.app_name)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .keepalives_interval(Duration::from_secs(5))
            .keepalives_retries(3);
        let mut client = config.connect(NoTls).map_err(db("connect the writer"))?;
        // Server-side keepalives make Postgres end the session, and so release the lock,
        // within about 25 s of the writer's machine vanishing without closing its socket.
        client
            .batch_execute(
                "SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; \
                 SET tcp_keepalives_count = 3",
            )
            .map_err(db("configure the writer session"))?;
        let deadline = Instant::now() + CLAIM_GRACE;
        let mut ended_own_session = false;
        loop {
            let locked: bool = client
                .query_one(
                    "SELECT pg_try_advisory_lock($1, $2)",
                    &[&LOCK_CLASS, &WRITER_LOCK],
                )
                .and_then(|r| r.try_get(0))
                .map_err(db("take the writer lock"))?;
            if locked {
                return Ok(WriterConn {
                    client,
                    statements: HashMap::new(),
                });
            }
            let holder = describe_holder(&mut client)?;
            let own = match &holder {
                Some((pid, app, _)) if *app == self.identity.app_name => Some(*pid),
                _ => None,
            };
            if let Some(pid) = own
                && !ended_own_session
            {
                // Our own earlier session, cut off from us but not yet ended by the server:
                // end it rather than fence ourselves out.
                tracing::warn!(backend = pid, "ending this writer's stale Postgres session");
                client
                    .execute("SELECT pg_terminate_backend($1)", &[&pid])
                    .map_err(db("end the stale writer session"))?;
                ended_own_session = true;
                continue;
            }
            if Instant::now() >= deadline {
                return Err(match own {
                    // Not a rival: the next attempt will find the lock free.
                    Some(pid) => StoreError::Unavailable(format!(
                        "this writer's previous session (Postgres backend {pid}) still holds \
                         the writer lock after it was ended"
                    )),
                    None => self.refusal(&mut client, holder),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The `Fenced` error of a refused claim, naming the holder.
    fn refusal(&self, client: &mut Client, holder: Option<(i32, String, String)>) -> StoreError {
        let fence = client
            .query_one(
                "SELECT generation, holder, claimed_at_ms FROM writer_fence",
                &[],
            )
            .and_then(|r| {
                Ok((
                    r.try_get::<_, i64>(0)?,
                    r.try_get::<_, String>(1)?,
                    r.try_get::<_, i64>(2)?,
                ))
            });
        let claimed = match fence {
            Ok((g, who, at)) => format!(
                "{who} (writer generation {g}, claimed at {})",
                rfc3339(at as Millis)
            ),
            Err(e) => format!(
                "another process (its claim is unreadable: {})",
                describe(&e)
            ),
        };
        let session = match holder {
            Some((pid, app, addr)) => format!(
                "; its session is Postgres backend {pid} from {addr} ({app:?}). If that \
                 worker set is gone but its session lingers, end it with \
                 SELECT pg_terminate_backend({pid})"
            ),
            None => String::new(),
        };
        StoreError::Fenced(format!(
            "this store already has a live writer: {claimed}{session}. One store takes one \
             worker set; stop the other one before starting this one"
        ))
    }

    /// One commit transaction on the writer session.
    fn commit_in(
        &self,
        conn: &mut WriterConn,
        mine: u64,
        batch: &ChangeBatch,
    ) -> Result<(), StoreError> {
        let WriterConn { client, statements } = conn;
        let mut tx = client.transaction().map_err(db("begin commit"))?;
        let fence = prepared(
            &mut tx,
            statements,
            "SELECT generation, holder, (SELECT max(upper) FROM progress) \
             FROM writer_fence FOR UPDATE OF writer_fence",
        )?;
        let row = tx.query_one(&fence, &[]).map_err(db("read writer fence"))?;
        let (current, holder, last) = (|| {
            Ok::<_, postgres::Error>((
                row.try_get::<_, i64>(0)? as u64,
                row.try_get::<_, String>(1)?,
                row.try_get::<_, Option<i64>>(2)?,
            ))
        })()
        .map_err(db("read writer fence"))?;
        if current != mine {
            return Err(StoreError::Fenced(format!(
                "writer generation {current} ({holder}) has replaced this one ({mine})"
            )));
        }
        if last.is_some_and(|l| l as u64 >= batch.upper) {
            return tx.rollback().map_err(db("end skipped commit"));
        }
        for ((view, sql), changes) in self.views.iter().zip(&self.sql).zip(&batch.views) {
            apply_view(&mut tx, statements, view, sql, changes)?;
        }
        let insert = prepared(&mut tx, statements, &insert_progress_sql(param))?;
        tx.execute(
            &insert,
            &[
                &(batch.upper as i64),
                &encode_positions(&batch.positions),
                &(now_ms() as i64),
            ],
        )
        .map_err(db("write progress"))?;
        let prune = prepared(&mut tx, statements, &prune_progress_sql(param))?;
        tx.execute(
            &prune,
            &[&(batch.upper.saturating_sub(self.progress_retention_ms) as i64)],
        )
        .map_err(db("prune progress"))?;
        tx.commit().map_err(db("commit"))
    }

    /// Ends this writer for good: it keeps no lock a legitimate writer might need.
    fn fence(writer: &mut Writer, why: String) -> StoreError {
        tracing::error!(reason = %why, "the Postgres store fenced this writer");
        if let Some(conn) = writer.conn.take() {
            conn.release();
        }
        writer.fenced = Some(why.clone());
        StoreError::Fenced(why)
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        let conn = self.writer.get_mut().conn.take();
        let pool = self.pool.take();
        let closed = off_runtime(move || {
            if let Some(conn) = conn {
                conn.release();
            }
            drop(pool);
            Ok(())
        });
        if let Err(e) = closed {
            tracing::warn!(error = %e, "closing the Postgres store");
        }
    }
}

impl Store for PostgresStore {
    fn recovery_point(&self, tick_ms: u64, horizon_ms: u64) -> Result<RecoveryPoint, StoreError> {
        let mut c = self.conn()?;
        let settings = db("settings");
        c.execute(
            "INSERT INTO settings (key, value) VALUES ('tick_ms', $1) ON CONFLICT (key) DO NOTHING",
            &[&tick_ms.to_string()],
        )
        .map_err(&settings)?;
        let stored: String = c
            .query_one("SELECT value FROM settings WHERE key = 'tick_ms'", &[])
            .and_then(|r| r.try_get(0))
            .map_err(&settings)?;
        check_tick(&stored, tick_ms)?;
        let read = db("read progress");
        let last = c.query_opt(LAST_PROGRESS, &[]).map_err(&read)?;
        let Some(last) = last else {
            return Ok(RecoveryPoint::default());
        };
        let as_of = last.try_get::<_, i64>(0).map_err(&read)? as Time;
        let committed: String = last.try_get(1).map_err(&read)?;
        let replay: Option<String> = c
            .query_opt(
                &progress_at_sql(param),
                &[&(as_of.saturating_sub(horizon_ms) as i64)],
            )
            .map_err(&read)?
            .map(|r| r.try_get(0))
            .transpose()
            .map_err(&read)?;
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
        let mut writer = self.writer.lock();
        if let Some(why) = &writer.fenced {
            return Err(StoreError::Fenced(why.clone()));
        }
        if let Some(generation) = writer.generation {
            return Ok(WriterClaim { generation });
        }
        let mut conn = self.lock_session()?;
        let generation = conn
            .client
            .query_one(
                "UPDATE writer_fence SET generation = generation + 1, holder = $1, \
                 claimed_at_ms = $2 RETURNING generation",
                &[&self.identity.holder, &(now_ms() as i64)],
            )
            .and_then(|r| r.try_get::<_, i64>(0))
            .map_err(db("claim the writer"))? as u64;
        writer.generation = Some(generation);
        writer.conn = Some(conn);
        Ok(WriterClaim { generation })
    }

    fn commit(&self, batch: &ChangeBatch) -> Result<(), StoreError> {
        let started = Instant::now();
        let mut guard = self.writer.lock();
        let writer = &mut *guard;
        if let Some(why) = &writer.fenced {
            return Err(StoreError::Fenced(why.clone()));
        }
        let mine = writer.generation.ok_or_else(|| {
            StoreError::Fenced("this process has not claimed the store (claim_writer)".into())
        })?;
        // A commit is idempotent (a stored upper is skipped), so after a lost session it is
        // safe to try once more on a new one, even if the lost one had committed.
        for attempt in 0..2 {
            let conn = match writer.conn.take() {
                Some(conn) if !conn.client.is_closed() => conn,
                lost => {
                    if lost.is_some() {
                        tracing::warn!(
                            "the writer's Postgres session ended; re-taking the writer lock"
                        );
                    }
                    match self.lock_session() {
                        Ok(conn) => conn,
                        Err(StoreError::Fenced(why)) => return Err(Self::fence(writer, why)),
                        Err(e) => return Err(e),
                    }
                }
            };
            let conn = writer.conn.insert(conn);
            match self.commit_in(conn, mine, batch) {
                Ok(()) => {
                    tracing::debug!(upper = batch.upper, rows = batch.rows(), elapsed = ?started.elapsed(), "sink commit");
                    return Ok(());
                }
                Err(StoreError::Fenced(why)) => return Err(Self::fence(writer, why)),
                Err(e) if conn.client.is_closed() && attempt == 0 => {
                    tracing::warn!(error = %e, "the writer's Postgres session broke during a commit");
                }
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Unavailable(
            "the writer's Postgres session broke twice in one commit".into(),
        ))
    }

    fn committed_frontier(&self) -> Result<Option<Time>, StoreError> {
        let last: Option<i64> = self.read("read progress", |c| {
            match c
                .query_cached("SELECT max(upper) FROM progress", &[])?
                .first()
            {
                Some(r) => r.try_get(0),
                None => Ok(None),
            }
        })?;
        Ok(last.map(|l| l as Time))
    }

    fn check(&self) -> Result<(), StoreError> {
        self.read("probe store", |c| c.query_one("SELECT 1", &[]))?;
        Ok(())
    }

    fn create_advertiser(
        &self,
        advertiser_id: u64,
        name: &str,
        key_hash: &[u8; 32],
    ) -> Result<(), StoreError> {
        self.conn()?
            .execute(
                "INSERT INTO advertisers (advertiser_id, name, api_key_hash, created_at_ms) \
                 VALUES ($1, $2, $3, $4)",
                &[
                    &(advertiser_id as i64),
                    &name,
                    &key_hash.as_slice(),
                    &(now_ms() as i64),
                ],
            )
            .map_err(|e| match e.code() {
                Some(c) if *c == SqlState::UNIQUE_VIOLATION => {
                    StoreError::Conflict(format!("advertiser {advertiser_id} already exists"))
                }
                _ => {
                    StoreError::Unavailable(format!("advertiser {advertiser_id}: {}", describe(&e)))
                }
            })?;
        Ok(())
    }

    fn advertiser_for_key(&self, key_hash: &[u8; 32]) -> Result<Option<u64>, StoreError> {
        let read = db("read advertisers");
        let id: Option<i64> = self
            .conn()?
            .query_opt(
                "SELECT advertiser_id FROM advertisers WHERE api_key_hash = $1",
                &[&key_hash.as_slice()],
            )
            .map_err(&read)?
            .map(|r| r.try_get(0))
            .transpose()
            .map_err(&read)?;
        Ok(id.map(|i| i as u64))
    }

    fn check_ad(&self, ad: &Ad) -> Result<Upserted, StoreError> {
        check_ad_in(&mut self.conn()?.client, ad)
    }

    fn upsert_ad(&self, ad: &Ad) -> Result<Upserted, StoreError> {
        let mut c = self.conn()?;
        let write = db("write catalog");
        let mut tx = c.transaction().map_err(db("begin catalog write"))?;
        // Serialises catalog writes as SQLite's single writer does: the rules read three
        // tables, and two concurrent upserts must not both pass them.
        tx.execute(
            "SELECT pg_advisory_xact_lock($1, $2)",
            &[&LOCK_CLASS, &CATALOG_LOCK],
        )
        .map_err(&write)?;
        let outcome = check_ad_in(&mut tx, ad)?;
        tx.execute(
            &insert_campaign_sql(param),
            &[&(ad.campaign_id as i64), &(ad.advertiser_id as i64)],
        )
        .map_err(&write)?;
        tx.execute(
            &upsert_ad_sql(param),
            &[
                &(ad.ad_id as i64),
                &(ad.advertiser_id as i64),
                &(ad.campaign_id as i64),
                &ad.landing_url,
                &(ad.cpc_micros as i64),
                &(now_ms() as i64),
            ],
        )
        .map_err(&write)?;
        tx.commit().map_err(&write)?;
        Ok(outcome)
    }

    fn ad(&self, ad_id: u64) -> Result<Option<Ad>, StoreError> {
        let sql = format!("SELECT {AD_COLUMNS} FROM ads WHERE ad_id = $1");
        self.read("read ads", |c| {
            c.query_cached(&sql, &[&(ad_id as i64)])?
                .first()
                .map(ad_from_row)
                .transpose()
        })
    }

    fn ads(&self) -> Result<Vec<Ad>, StoreError> {
        let sql = format!("SELECT {AD_COLUMNS} FROM ads");
        self.read("read ads", |c| {
            c.query_cached(&sql, &[])?.iter().map(ad_from_row).collect()
        })
    }

    fn advertiser_ads(&self, advertiser_id: u64) -> Result<Vec<Ad>, StoreError> {
        let read = db("read ads");
        let mut ads: Vec<Ad> = self
            .conn()?
            .query(
                &format!("SELECT {AD_COLUMNS} FROM ads WHERE advertiser_id = $1"),
                &[&(advertiser_id as i64)],
            )
            .map_err(&read)?
            .iter()
            .map(ad_from_row)
            .collect::<Result<_, _>>()
            .map_err(&read)?;
        // Ids are stored bit-cast to i64, so SQL would order ids above i64::MAX first.
        ads.sort_by_key(|a| a.ad_id);
        Ok(ads)
    }

    fn campaign_owner(&self, campaign_id: u64) -> Result<Option<u64>, StoreError> {
        let owner: Option<i64> = self.read("read campaigns", |c| {
            c.query_cached(
                "SELECT advertiser_id FROM campaigns WHERE campaign_id = $1",
                &[&(campaign_id as i64)],
            )?
            .first()
            .map(|r| r.try_get(0))
            .transpose()
        })?;
        Ok(owner.map(|o| o as u64))
    }

    fn advertiser_exists(&self, advertiser_id: u64) -> Result<bool, StoreError> {
        self.read("read advertisers", |c| {
            let rows = c.query_cached(
                "SELECT advertiser_id FROM advertisers WHERE advertiser_id = $1",
                &[&(advertiser_id as i64)],
            )?;
            Ok(!rows.is_empty())
        })
    }

    fn click_series(
        &self,
        scope: MetricScope,
        id: u64,
        granularity: Granularity,
        from: Millis,
        to: Millis,
    ) -> Result<Vec<(Millis, Measures)>, StoreError> {
        let (id, from, to) = (id as i64, from as i64, to as i64);
        let minutes = scope == MetricScope::Ad && granularity == Granularity::Minute;
        let sql = if minutes {
            minute_series_sql(param)
        } else {
            rollup_series_sql(param)
        };
        self.read("read series", |c| {
            let rows = if minutes {
                c.query_cached(&sql, &[&id, &from, &to])?
            } else {
                c.query_cached(
                    &sql,
                    &[&scope.as_str(), &id, &granularity.as_str(), &from, &to],
                )?
            };
            rows.iter()
                .map(|r| Ok((r.try_get::<_, i64>(0)? as Millis, measures_at(r, 1)?)))
                .collect()
        })
    }

    fn ad_totals(
        &self,
        advertiser_id: u64,
        from: Millis,
        to: Millis,
    ) -> Result<Vec<(u64, Measures)>, StoreError> {
        let advertiser = advertiser_id as i64;
        let (minutes, rollups) = (minute_totals_sql(param), rollup_totals_sql(param));
        let totals = self.read("read totals", |c| {
            let mut totals: std::collections::BTreeMap<u64, Measures> = Default::default();
            for (g, a, b) in decompose(from, to) {
                let (a, b) = (a as i64, b as i64);
                let rows = if g == Granularity::Minute {
                    c.query_cached(&minutes, &[&advertiser, &a, &b])?
                } else {
                    c.query_cached(&rollups, &[&g.as_str(), &advertiser, &a, &b])?
                };
                for r in &rows {
                    let ad = r.try_get::<_, i64>(0)? as u64;
                    totals.entry(ad).or_default().add(&measures_at(r, 1)?);
                }
            }
            Ok(totals)
        })?;
        Ok(totals.into_iter().collect())
    }

    fn late_clicks(
        &self,
        ad_id: u64,
        from: Millis,
        to: Millis,
        limit: usize,
    ) -> Result<Vec<LateClick>, StoreError> {
        let read = db("read late clicks");
        let rows = self
            .conn()?
            .query(
                &late_clicks_sql(param),
                &[
                    &(ad_id as i64),
                    &(from as i64),
                    &(to as i64),
                    &(limit.min(i64::MAX as usize) as i64),
                ],
            )
            .map_err(&read)?;
        rows.iter()
            .map(|r| {
                Ok(LateClick {
                    impression_id: r.try_get(0)?,
                    click_id: r.try_get(1)?,
                    event_time_ms: r.try_get::<_, i64>(2)? as Millis,
                    record_time_ms: r.try_get::<_, i64>(3)? as Millis,
                })
            })
            .collect::<Result<_, postgres::Error>>()
            .map_err(&read)
    }

    fn fraud_adjustments(
        &self,
        scope: MetricScope,
        id: u64,
        from: Millis,
        to: Millis,
        limit: usize,
    ) -> Result<Adjustments, StoreError> {
        let read = db("read fraud adjustments");
        let (id, from, to) = (id as i64, from as i64, to as i64);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut c = self.conn()?;
        // One snapshot, so the totals are those of the rows listed.
        let mut tx = snapshot(&mut c).map_err(&read)?;
        let rows = tx
            .query(
                &fraud_adjustments_sql(scope, param),
                &[&id, &from, &to, &limit],
            )
            .map_err(&read)?
            .iter()
            .map(adjustment_from_row)
            .collect::<Result<Vec<_>, postgres::Error>>()
            .map_err(&read)?;
        let totals = tx
            .query_one(
                &fraud_adjustment_totals_sql(scope, param),
                &[&id, &from, &to],
            )
            .and_then(|t| totals_from_row(&t))
            .map_err(&read)?;
        tx.commit().map_err(&read)?;
        Ok(Adjustments { rows, totals })
    }

    fn ad_click_windows(
        &self,
        from: Millis,
        to: Millis,
    ) -> Result<(Option<Time>, Vec<AdWindow>), StoreError> {
        let view = corrections::required_ad_clicks(self.views)?;
        let read = db("read ad_clicks windows");
        let mut c = self.conn()?;
        // One snapshot, so the rows are exactly those of the frontier read with them.
        let mut tx = snapshot(&mut c).map_err(&read)?;
        let frontier: Option<i64> = tx
            .query_one("SELECT max(upper) FROM progress", &[])
            .and_then(|r| r.try_get(0))
            .map_err(&read)?;
        let rows = tx
            .query(
                &format!(
                    "SELECT ad_id, window_start, campaign_id, advertiser_id, clicks, fraud_clicks, \
                     late_clicks, spend_micros FROM {} WHERE window_start >= $1 AND window_start < $2 \
                     ORDER BY ad_id, window_start",
                    view.table()
                ),
                &[&(from as i64), &(to as i64)],
            )
            .map_err(&read)?
            .iter()
            .map(|r| {
                Ok(AdWindow {
                    ad_id: r.try_get::<_, i64>(0)? as u64,
                    window_start: r.try_get::<_, i64>(1)? as u64,
                    campaign_id: r.try_get::<_, i64>(2)? as u64,
                    advertiser_id: r.try_get::<_, i64>(3)? as u64,
                    measures: Measures {
                        clicks: r.try_get(4)?,
                        fraud_clicks: r.try_get(5)?,
                        late_clicks: r.try_get(6)?,
                        spend_micros: r.try_get(7)?,
                    },
                })
            })
            .collect::<Result<Vec<_>, postgres::Error>>()
            .map_err(&read)?;
        tx.commit().map_err(&read)?;
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
        let write = db("apply corrections");
        let mut c = self.conn()?;
        c.batch_execute(&sql.create).map_err(&write)?;
        let mut tx = c.transaction().map_err(&write)?;
        for fix in fixes {
            let m = |x: &Measures| [x.clicks, x.fraud_clicks, x.late_clicks, x.spend_micros];
            let (ad, w) = (fix.ad_id as i64, fix.window_start as i64);
            let (campaign, advertiser) = (fix.campaign_id as i64, fix.advertiser_id as i64);
            let new = m(&fix.corrected);
            let changed = match fix.expected {
                Some(old) => {
                    let old = m(&old);
                    if fix.corrected == Measures::default() {
                        tx.execute(&sql.delete, &[&ad, &w, &old[0], &old[1], &old[2], &old[3]])
                    } else {
                        tx.execute(
                            &sql.update,
                            &[
                                &new[0], &new[1], &new[2], &new[3], &ad, &w, &old[0], &old[1],
                                &old[2], &old[3],
                            ],
                        )
                    }
                }
                None => tx.execute(
                    &sql.insert,
                    &[
                        &ad,
                        &w,
                        &campaign,
                        &advertiser,
                        &new[0],
                        &new[1],
                        &new[2],
                        &new[3],
                    ],
                ),
            }
            .map_err(&write)?;
            if changed != 1 {
                // Dropping the transaction rolls every correction back.
                return Err(StoreError::Conflict(format!(
                    "ad {} window {} changed since it was reconciled; nothing was corrected, run reconcile again",
                    fix.ad_id, fix.window_start
                )));
            }
            let before = fix.expected.map(|x| m(&x)).unwrap_or_default();
            let deltas = [
                new[0] - before[0],
                new[1] - before[1],
                new[2] - before[2],
                new[3] - before[3],
            ];
            tx.execute(
                &sql.record,
                &[
                    &run_id,
                    &ad,
                    &w,
                    &campaign,
                    &advertiser,
                    &deltas[0],
                    &deltas[1],
                    &deltas[2],
                    &deltas[3],
                    &(applied_at_ms as i64),
                ],
            )
            .map_err(&write)?;
        }
        for (i, scope, id, g, start) in corrections::rollup_windows(fixes) {
            tx.execute(
                &sql.rollup[i],
                &[
                    &scope,
                    &(id as i64),
                    &g.as_str(),
                    &(start as i64),
                    &((start + g.ms()) as i64),
                ],
            )
            .map_err(&write)?;
            tx.execute(
                &sql.rollup_delete_empty,
                &[&scope, &(id as i64), &g.as_str(), &(start as i64)],
            )
            .map_err(&write)?;
        }
        tx.commit().map_err(&write)
    }

    fn drop_windows_before(&self, cutoff: Millis) -> Result<u64, StoreError> {
        let write = db("drop old windows");
        let mut c = self.conn()?;
        if let Some(view) = corrections::ad_clicks(self.views) {
            c.batch_execute(&corrections::correction_sql(view, param).create)
                .map_err(&write)?;
        }
        let mut tx = c.transaction().map_err(&write)?;
        let mut dropped = 0u64;
        for stmt in corrections::retention_sql(self.views, param) {
            dropped += tx.execute(&stmt, &[&(cutoff as i64)]).map_err(&write)?;
        }
        tx.commit().map_err(&write)?;
        Ok(dropped)
    }
}

/// [`AdjustmentTotals`] from a row of count, clicks, fraud clicks, spend.
fn totals_from_row(t: &postgres::Row) -> Result<AdjustmentTotals, postgres::Error> {
    Ok(AdjustmentTotals {
        adjustments: t.try_get(0)?,
        clicks: t.try_get(1)?,
        fraud_clicks: t.try_get(2)?,
        spend_micros: t.try_get(3)?,
    })
}

/// A [`FraudAdjustment`] from a row of [`super::common::ADJUSTMENT_COLUMNS`].
fn adjustment_from_row(r: &postgres::Row) -> Result<FraudAdjustment, postgres::Error> {
    Ok(FraudAdjustment {
        ad_id: r.try_get::<_, i64>(0)? as u64,
        campaign_id: r.try_get::<_, i64>(1)? as u64,
        advertiser_id: r.try_get::<_, i64>(2)? as u64,
        impression_id: r.try_get(3)?,
        click_id: r.try_get(4)?,
        window_start_ms: r.try_get::<_, i64>(5)? as Millis,
        event_time_ms: r.try_get::<_, i64>(6)? as Millis,
        verdict_time_ms: r.try_get::<_, i64>(7)? as Millis,
        clicks: r.try_get(8)?,
        fraud_clicks: r.try_get(9)?,
        spend_micros: r.try_get(10)?,
    })
}

/// The catalog rules, read in one round trip.
fn check_ad_in(c: &mut impl postgres::GenericClient, ad: &Ad) -> Result<Upserted, StoreError> {
    let read = db("read catalog");
    let row = c
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM advertisers WHERE advertiser_id = $1), \
             (SELECT advertiser_id FROM campaigns WHERE campaign_id = $2), \
             (SELECT advertiser_id FROM ads WHERE ad_id = $3)",
            &[
                &(ad.advertiser_id as i64),
                &(ad.campaign_id as i64),
                &(ad.ad_id as i64),
            ],
        )
        .map_err(&read)?;
    let advertiser: bool = row.try_get(0).map_err(&read)?;
    let campaign: Option<i64> = row.try_get(1).map_err(&read)?;
    let existing: Option<i64> = row.try_get(2).map_err(&read)?;
    check_ad_rules(
        ad,
        advertiser,
        campaign.map(|o| o as u64),
        existing.map(|a| a as u64),
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::conformance::{Backend, RETENTION_MS, batch, conformance_tests, minute_row};

    /// Where the tests find a server: a key-value connection string without `dbname`.
    fn server() -> String {
        std::env::var("CLICKAGG_TEST_POSTGRES")
            .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres".into())
    }

    fn admin() -> Client {
        let url = format!("{} dbname=postgres", server());
        Client::connect(&url, NoTls).unwrap_or_else(|e| {
            panic!("the Postgres tests need a server at {url:?} (set CLICKAGG_TEST_POSTGRES): {e}")
        })
    }

    /// A fresh database of its own, dropped at the end even when the test fails.
    struct TestDb {
        name: String,
    }

    impl TestDb {
        fn new() -> TestDb {
            let name = format!("clickagg_t_{:016x}", rand::random::<u64>());
            admin()
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .expect("create test database");
            TestDb { name }
        }

        fn url(&self) -> String {
            format!("{} dbname={}", server(), self.name)
        }

        fn client(&self) -> Client {
            Client::connect(&self.url(), NoTls).expect("connect")
        }

        fn store(&self) -> PostgresStore {
            PostgresStore::open(&self.url(), crate::dataflows::VIEWS, options())
                .unwrap_or_else(|e| panic!("open: {e}"))
        }

        /// Ends every session of this database whose application name starts with
        /// `prefix`, as a server restart or an operator would, waits until none is left,
        /// and says how many sessions it ended. r2d2 replaces a dropped connection from a
        /// background thread, so a session can appear after the first terminate (the cause
        /// of a "sessions did not end" seen once under load): each poll terminates whatever
        /// is still there.
        fn end_sessions(&self, prefix: &str) -> i64 {
            let mut admin = admin();
            let pattern = format!("{prefix}%");
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut ended = std::collections::HashSet::new();
            loop {
                let left = admin
                    .query(
                        "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity \
                         WHERE datname = $1 AND application_name LIKE $2 AND pid <> pg_backend_pid()",
                        &[&self.name, &pattern],
                    )
                    .expect("terminate");
                if left.is_empty() {
                    return ended.len() as i64;
                }
                for row in &left {
                    let pid: i32 = row.try_get(0).expect("pid");
                    if row.try_get(1).expect("terminated") {
                        ended.insert(pid);
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "sessions did not end: {} left after 10 s",
                    left.len()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }

        fn end_writer_sessions(&self) -> i64 {
            self.end_sessions(WRITER_APP)
        }

        fn allow_connections(&self, allow: bool) {
            admin()
                .batch_execute(&format!(
                    "ALTER DATABASE {} ALLOW_CONNECTIONS {allow}",
                    self.name
                ))
                .expect("alter database");
        }
    }

    impl Drop for TestDb {
        fn drop(&mut self) {
            let dropped = Client::connect(&format!("{} dbname=postgres", server()), NoTls)
                .and_then(|mut c| {
                    c.batch_execute(&format!(
                        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                        self.name
                    ))
                });
            if let Err(e) = dropped {
                eprintln!("could not drop test database {}: {e}", self.name);
            }
        }
    }

    fn options() -> PostgresOptions {
        PostgresOptions {
            pool_size: 2,
            progress_retention_ms: RETENTION_MS,
        }
    }

    impl Backend for TestDb {
        fn open(&self) -> Result<Box<dyn Store>, StoreError> {
            Ok(Box::new(PostgresStore::open(
                &self.url(),
                crate::dataflows::VIEWS,
                options(),
            )?))
        }

        fn execute(&self, sql: &str) {
            self.client()
                .batch_execute(sql)
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
        }

        fn query_i64(&self, sql: &str) -> i64 {
            self.client()
                .query_one(sql, &[])
                .and_then(|r| r.try_get(0))
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
        }
    }

    conformance_tests!(TestDb::new());

    fn fenced(r: Result<impl std::fmt::Debug, StoreError>) -> String {
        match r {
            Err(StoreError::Fenced(m)) => m,
            other => panic!("expected Fenced, got {other:?}"),
        }
    }

    #[test]
    fn a_second_worker_set_is_refused_with_the_holder_named_until_the_first_is_gone() {
        let db = TestDb::new();
        let first = db.store();
        assert_eq!(first.claim_writer().expect("claim").generation, 1);
        first.commit(&batch(1_000, vec![])).expect("commit");

        let second = db.store();
        let why = fenced(second.claim_writer());
        for part in [
            format!("clickagg pid {}", std::process::id()),
            "writer generation 1".into(),
            "pg_terminate_backend(".into(),
        ] {
            assert!(why.contains(&part), "{part:?} missing from: {why}");
        }
        fenced(second.commit(&batch(1_500, vec![])));
        first
            .commit(&batch(2_000, vec![]))
            .expect("the first worker set goes on");

        drop(first);
        assert_eq!(second.claim_writer().expect("claim").generation, 2);
        second.commit(&batch(3_000, vec![])).expect("commit");
        assert_eq!(second.committed_frontier().expect("frontier"), Some(3_000));
    }

    #[test]
    fn a_writer_whose_session_ends_takes_its_lock_again_and_carries_on() {
        let db = TestDb::new();
        let s = db.store();
        s.claim_writer().expect("claim");
        let (k, v) = minute_row(1, 60_000, 70, 3, 300);
        s.commit(&batch(1_000, vec![(k.clone(), Some(v))]))
            .expect("commit");
        for (round, upper) in [(1, 2_000), (2, 3_000)] {
            assert_eq!(db.end_writer_sessions(), 1, "round {round}");
            let (_, v) = minute_row(1, 60_000, 70, 3 + round, 300);
            s.commit(&batch(upper, vec![(k.clone(), Some(v))]))
                .expect("the next commit re-takes the lock");
            assert_eq!(s.committed_frontier().expect("frontier"), Some(upper));
        }
        let hour = s
            .click_series(MetricScope::Ad, 1, Granularity::Hour, 0, 3_600_000)
            .expect("series");
        assert_eq!(hour[0].1.clicks, 5);
        assert_eq!(s.claim_writer().expect("claim").generation, 1);
        let other = db.store();
        fenced(other.claim_writer());
    }

    #[test]
    fn a_writer_that_lost_its_lock_to_a_live_claimant_is_fenced_for_good() {
        let db = TestDb::new();
        let stale = db.store();
        stale.claim_writer().expect("claim");
        stale.commit(&batch(1_000, vec![])).expect("commit");
        db.end_writer_sessions();
        let live = db.store();
        assert_eq!(live.claim_writer().expect("claim").generation, 2);

        let why = fenced(stale.commit(&batch(2_000, minute_rows(1))));
        assert!(why.contains("writer generation 2"), "{why}");
        assert_eq!(live.committed_frontier().expect("frontier"), Some(1_000));
        live.commit(&batch(2_500, vec![]))
            .expect("the live writer commits");
        drop(live);
        fenced(stale.commit(&batch(3_000, vec![])));
        fenced(stale.claim_writer());
        assert_eq!(stale.committed_frontier().expect("frontier"), Some(2_500));
    }

    #[test]
    fn a_writer_whose_generation_moved_while_it_was_cut_off_is_fenced() {
        let db = TestDb::new();
        let stale = db.store();
        stale.claim_writer().expect("claim");
        stale.commit(&batch(1_000, vec![])).expect("commit");
        db.end_writer_sessions();
        // Another worker set claims, commits and goes away while the first is cut off.
        let other = db.store();
        assert_eq!(other.claim_writer().expect("claim").generation, 2);
        other.commit(&batch(2_000, vec![])).expect("commit");
        drop(other);

        // The stale writer gets the lock back, but its generation is gone.
        let why = fenced(stale.commit(&batch(3_000, minute_rows(1))));
        assert!(why.contains("writer generation 2"), "{why}");
        assert_eq!(stale.committed_frontier().expect("frontier"), Some(2_000));
        assert_eq!(
            db.query_i64("SELECT count(*) FROM v_ad_clicks"),
            0,
            "a fenced commit writes nothing"
        );
        // It let go of the lock, so a restart can claim at once.
        let restart = db.store();
        assert_eq!(restart.claim_writer().expect("claim").generation, 3);
    }

    #[test]
    fn commits_are_unavailable_while_the_database_is_unreachable_and_resume_after() {
        let db = TestDb::new();
        let s = db.store();
        s.claim_writer().expect("claim");
        s.commit(&batch(1_000, vec![])).expect("commit");
        db.allow_connections(false);
        db.end_sessions("");
        for _ in 0..2 {
            match s.commit(&batch(2_000, minute_rows(1))) {
                Err(StoreError::Unavailable(m)) => {
                    assert!(m.contains("not currently accepting connections"), "{m}")
                }
                other => panic!("expected Unavailable, got {other:?}"),
            }
        }
        assert!(matches!(s.check(), Err(StoreError::Unavailable(_))));
        db.allow_connections(true);
        s.commit(&batch(2_000, minute_rows(1)))
            .expect("commits resume with the server");
        assert_eq!(s.committed_frontier().expect("frontier"), Some(2_000));
        assert_eq!(s.claim_writer().expect("claim").generation, 1);
    }

    /// Pooled sessions the server ended while they sat idle (a restart, an operator's
    /// `pg_terminate_backend`) cost a read nothing, though the pool lends a session it just
    /// took back without probing it: the read moves on to a new session.
    #[test]
    fn reads_move_on_from_sessions_the_server_ended() {
        let db = TestDb::new();
        let s = db.store();
        s.claim_writer().expect("claim");
        s.commit(&batch(1_000, minute_rows(3))).expect("commit");
        for _ in 0..3 {
            assert_eq!(s.committed_frontier().expect("frontier"), Some(1_000));
            let ended = db.end_sessions("");
            assert!(ended >= 1, "the pool's sessions were ended ({ended})");
            assert_eq!(
                s.committed_frontier()
                    .expect("a read after its session was ended"),
                Some(1_000)
            );
            let series = s
                .click_series(MetricScope::Ad, 1, Granularity::Minute, 0, 3_600_000)
                .expect("a series read after its session was ended");
            assert!(!series.is_empty());
        }
    }

    #[test]
    fn a_writer_ends_its_own_stale_session_that_still_holds_the_lock() {
        let db = TestDb::new();
        let s = db.store();
        s.claim_writer().expect("claim");
        s.commit(&batch(1_000, vec![])).expect("commit");
        db.end_writer_sessions();
        // A session of this writer that the server still has but the writer has lost
        // track of, as after a network cut, still holding the lock.
        let mut config = Config::from_str(&db.url()).expect("config");
        config.application_name(&s.identity.app_name);
        let mut zombie = config.connect(NoTls).expect("connect");
        let locked: bool = zombie
            .query_one(
                "SELECT pg_try_advisory_lock($1, $2)",
                &[&LOCK_CLASS, &WRITER_LOCK],
            )
            .and_then(|r| r.try_get(0))
            .expect("lock");
        assert!(locked);

        s.commit(&batch(2_000, minute_rows(1)))
            .expect("the writer ends its stale session and carries on");
        assert!(
            zombie.query_one("SELECT 1", &[]).is_err(),
            "the stale session was ended"
        );
        assert_eq!(s.committed_frontier().expect("frontier"), Some(2_000));
        fenced(db.store().claim_writer());
    }

    /// Stops and restarts a real server under a writer. Ignored by default, since the shared
    /// server must not be stopped: point `CLICKAGG_TEST_POSTGRES` at a server of your own and
    /// `CLICKAGG_TEST_POSTGRES_CTL` at a script that takes `stop` or `start` (and waits).
    #[test]
    #[ignore = "stops its server: needs CLICKAGG_TEST_POSTGRES_CTL and a server of its own"]
    fn a_writer_rides_out_a_server_stop_and_restart() {
        let ctl = std::env::var("CLICKAGG_TEST_POSTGRES_CTL").expect("CLICKAGG_TEST_POSTGRES_CTL");
        let run = |action: &str| {
            let status = std::process::Command::new(&ctl)
                .arg(action)
                .status()
                .expect("run the control script");
            assert!(status.success(), "{ctl} {action}: {status}");
        };
        let db = TestDb::new();
        let s = db.store();
        s.claim_writer().expect("claim");
        s.commit(&batch(1_000, minute_rows(1))).expect("commit");

        run("stop");
        for upper in [2_000, 2_000] {
            match s.commit(&batch(upper, minute_rows(2))) {
                Err(StoreError::Unavailable(_)) => {}
                other => panic!("expected Unavailable while stopped, got {other:?}"),
            }
        }
        assert!(matches!(s.check(), Err(StoreError::Unavailable(_))));
        run("start");
        s.commit(&batch(2_000, minute_rows(2)))
            .expect("commits resume after a start");

        // A restart while idle: the writer's and the pool's sessions are all stale.
        run("stop");
        run("start");
        s.commit(&batch(3_000, minute_rows(3)))
            .expect("the first commit after a restart succeeds");
        assert_eq!(s.committed_frontier().expect("frontier"), Some(3_000));
        assert_eq!(db.query_i64("SELECT count(*) FROM v_ad_clicks"), 300);
        assert_eq!(s.claim_writer().expect("claim").generation, 1);
        fenced(db.store().claim_writer());
    }

    /// Set in the child process of the SIGKILL test: the store it claims and holds.
    const HOLD_CLAIM: &str = "CLICKAGG_TEST_HOLD_CLAIM";

    #[test]
    fn a_writer_killed_with_sigkill_is_claimable_again_at_once() {
        if let Ok(url) = std::env::var(HOLD_CLAIM) {
            // The child: claim, commit, say so, and wait to be killed.
            let s = PostgresStore::open(&url, crate::dataflows::VIEWS, options()).expect("open");
            s.claim_writer().expect("claim");
            s.commit(&batch(1_000, minute_rows(1))).expect("commit");
            println!("claimed and committed");
            std::thread::sleep(Duration::from_secs(60));
            return;
        }
        let db = TestDb::new();
        let mut child = std::process::Command::new(std::env::current_exe().expect("exe"))
            .args([
                "--exact",
                "store::postgres::tests::a_writer_killed_with_sigkill_is_claimable_again_at_once",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(HOLD_CLAIM, db.url())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn the holder");
        let stdout = child.stdout.take().expect("stdout");
        let claimed = std::io::BufRead::lines(std::io::BufReader::new(stdout))
            .map_while(Result::ok)
            .any(|l| l.contains("claimed and committed"));
        let second = db.store();
        let refused = second.claim_writer();
        let killed = child.kill();
        let _ = child.wait();
        assert!(claimed, "the holder never claimed");
        killed.expect("kill the holder");
        fenced(refused);

        let started = Instant::now();
        assert_eq!(second.claim_writer().expect("claim").generation, 2);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        second.commit(&batch(2_000, vec![])).expect("commit");
        assert_eq!(db.query_i64("SELECT count(*) FROM v_ad_clicks"), 100);
    }

    #[test]
    fn open_and_drop_are_safe_inside_an_async_runtime() {
        let db = TestDb::new();
        let url = db.url();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let s = Arc::new(
                PostgresStore::open(&url, crate::dataflows::VIEWS, options()).expect("open"),
            );
            let worker = Arc::clone(&s);
            tokio::task::spawn_blocking(move || {
                worker.claim_writer().expect("claim");
                worker
                    .commit(&batch(1_000, minute_rows(3)))
                    .expect("commit");
            })
            .await
            .expect("join");
            drop(s);
        });
        let again = db.store();
        assert_eq!(
            again.claim_writer().expect("claim").generation,
            2,
            "dropping inside the runtime released the lock"
        );
    }

    #[test]
    fn migrate_is_idempotent_and_concurrent_opens_do_not_race() {
        let db = TestDb::new();
        assert_eq!(
            migrate(&db.url(), crate::dataflows::VIEWS).expect("migrate"),
            vec!["V1__catalog_progress_and_fence".to_owned()]
        );
        assert_eq!(
            migrate(&db.url(), crate::dataflows::VIEWS).expect("again"),
            Vec::<String>::new()
        );
        assert_eq!(db.query_i64("SELECT count(*) FROM v_ad_clicks_rollup"), 0);

        let fresh = TestDb::new();
        std::thread::scope(|s| {
            let opens: Vec<_> = (0..3).map(|_| s.spawn(|| fresh.store())).collect();
            for o in opens {
                o.join().expect("open");
            }
        });
    }

    #[test]
    fn a_view_column_of_another_type_is_refused() {
        let db = TestDb::new();
        drop(db.store());
        db.execute("ALTER TABLE v_ad_hourly_users ALTER COLUMN users TYPE TEXT");
        match PostgresStore::open(&db.url(), crate::dataflows::VIEWS, options()) {
            Err(StoreError::Inconsistent(m)) => assert!(m.contains("users"), "{m}"),
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("opened a store whose view column has another type"),
        }
    }

    #[test]
    fn a_bad_url_is_refused_without_echoing_it() {
        match PostgresStore::open(
            "host=h password=s3cret port=notaport",
            crate::dataflows::VIEWS,
            options(),
        ) {
            Err(StoreError::Inconsistent(m)) => assert!(!m.contains("s3cret"), "{m}"),
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("opened with a bad URL"),
        }
    }

    /// `n` ads x 100 minutes of `ad_clicks` rows, spread over 10 campaigns.
    fn minute_rows(n: u64) -> Vec<(Row, Option<Row>)> {
        (0..n * 100)
            .map(|i| {
                let (k, v) = minute_row(i / 100, (i % 100) * 60_000, 70 + i % 10, 1, 10);
                (k, Some(v))
            })
            .collect()
    }

    #[test]
    fn an_ads_minute_series_is_read_from_the_series_index_alone() {
        let db = TestDb::new();
        let _store = db.store();
        let mut c = db.client();
        // A day of 200 ads, written minute by minute as the sink writes them, so one ad's
        // rows are spread over the heap; then the state autovacuum keeps a store in.
        c.batch_execute(
            "INSERT INTO v_ad_clicks (ad_id, window_start, campaign_id, advertiser_id, clicks, \
             fraud_clicks, late_clicks, spend_micros) \
             SELECT a, m * 60000, a / 10, a / 100, 1, 0, 0, 10 \
             FROM generate_series(0, 1439) m, generate_series(1, 200) a",
        )
        .expect("fill");
        // On its own: VACUUM cannot run in the implicit transaction of a batch.
        c.batch_execute("VACUUM ANALYZE v_ad_clicks")
            .expect("vacuum");
        let plan: Vec<String> = c
            .query(
                &format!("EXPLAIN {}", minute_series_sql(param)),
                &[&77i64, &0i64, &86_400_000i64],
            )
            .expect("explain")
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert!(
            plan.iter()
                .any(|l| l.contains("Index Only Scan using v_ad_clicks_series")),
            "{plan:#?}"
        );
        let n = c
            .query(&minute_series_sql(param), &[&77i64, &0i64, &86_400_000i64])
            .expect("series")
            .len();
        assert_eq!(n, 1_440);
    }

    /// Run with `--nocapture` to see the numbers.
    #[test]
    fn a_commit_of_10k_changed_rows_takes_well_under_a_second() {
        let db = TestDb::new();
        let s = db.store();
        s.claim_writer().expect("claim");
        let inserts = minute_rows(100);
        let updates: Vec<(Row, Option<Row>)> = inserts
            .iter()
            .map(|(k, _)| {
                let ad = match k[0] {
                    Datum::Id(a) => a,
                    _ => 0,
                };
                let w = match k[1] {
                    Datum::Time(t) => t,
                    _ => 0,
                };
                let (k, v) = minute_row(ad, w, 80 + ad % 10, 2, 20);
                (k, Some(v))
            })
            .collect();
        let mut times = Vec::new();
        for (upper, rows) in [(1_000, inserts), (2_000, updates)] {
            let n = rows.len();
            let started = Instant::now();
            s.commit(&batch(upper, rows)).expect("commit");
            let took = started.elapsed();
            eprintln!("postgres commit of {n} changed ad_clicks rows (with rollups): {took:?}");
            times.push(took);
        }
        let day = s
            .click_series(MetricScope::Advertiser, 7, Granularity::Day, 0, 86_400_000)
            .expect("series");
        assert_eq!(
            day[0].1,
            Measures {
                clicks: 20_000,
                spend_micros: 200_000,
                ..Default::default()
            }
        );
        let c70 = s
            .click_series(MetricScope::Campaign, 70, Granularity::Hour, 0, 86_400_000)
            .expect("series");
        assert!(
            c70.iter().all(|(_, m)| m.clicks == 0),
            "moved away: {c70:?}"
        );
        // Generous for debug builds on two shared cores; the release numbers are far lower.
        for took in times {
            assert!(took < Duration::from_secs(5), "{took:?}");
        }
    }
}
