//! What every SQLite connection of clickagg (the embedded log's and the store's) is
//! opened with, beyond its own pragmas.

use rusqlite::Connection;
use rusqlite::config::DbConfig;

/// Turns on the query planner stability guarantee: a statement keeps the plan it was
/// prepared with, whatever values are bound to it.
///
/// Without it SQLite (3.53 here) reads a bound `LIMIT ?` as a constant when it plans, so
/// binding that parameter again expires the statement and the next step parses and plans
/// it anew: every poll of a log reader (`... ORDER BY offset LIMIT ?4`) did, once per
/// partition, which was 13% of the HTTP threads' CPU in the ingest bench (the archiver
/// reads the log there). We keep no `sqlite_stat` tables, so no plan ever depended on a
/// bound value anyway.
pub(crate) fn stable_plans(conn: &Connection) -> rusqlite::Result<()> {
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use rusqlite::{Connection, StatementStatus, params};

    /// How often `SELECT ... LIMIT ?` is prepared again over three runs with new values.
    fn reprepares(conn: &Connection) -> i32 {
        conn.execute_batch(
            "CREATE TABLE t (k INTEGER PRIMARY KEY); INSERT INTO t VALUES (1), (2), (3);",
        )
        .expect("schema");
        let mut select = conn
            .prepare_cached("SELECT k FROM t WHERE k >= ?1 ORDER BY k LIMIT ?2")
            .expect("prepare");
        for (from, limit) in [(1, 2), (2, 5), (1, 9)] {
            select
                .query_map(params![from, limit], |r| r.get::<_, i64>(0))
                .expect("query")
                .for_each(drop);
        }
        select.get_status(StatementStatus::RePrepare)
    }

    #[test]
    fn stable_plans_stop_sqlite_preparing_a_statement_again_for_new_bindings() {
        let plain = Connection::open_in_memory().expect("open");
        assert!(
            reprepares(&plain) > 0,
            "this SQLite no longer plans LIMIT ? by its bound value: stable_plans may go"
        );
        let stable = Connection::open_in_memory().expect("open");
        super::stable_plans(&stable).expect("qpsg");
        assert_eq!(reprepares(&stable), 0);
    }
}
