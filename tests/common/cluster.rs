//! A production deployment in separate OS processes: a tansu broker, a Postgres
//! database, and `clickagg ingest`, `clickagg worker` and `clickagg query` configured
//! for them (after `clickagg migrate`). Each process sits behind a mutex so a chaos
//! thread can kill and restart it while the test's driver keeps sending.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::broker::TestBroker;
use super::{Proc, Target, TestTimes, key_env};

/// How often the cluster's ingest reloads the catalog (prices) from the store.
pub const CATALOG_REFRESH: Duration = Duration::from_millis(500);

/// How long a (re)started process may take to become ready.
pub const START_LIMIT: Duration = Duration::from_secs(120);

/// A shared handle on one process of the cluster.
pub type Shared = Arc<Mutex<Proc>>;

/// ingest + worker + query on a broker and a Postgres database.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub times: TestTimes,
    pub broker: TestBroker,
    pub postgres_url: String,
    pub config_path: PathBuf,
    pub ingest: Shared,
    pub worker: Shared,
    pub query: Shared,
}

impl Cluster {
    /// Starts a broker, migrates `postgres_url`, then starts query, ingest and a worker
    /// process with `workers` timely workers.
    pub fn start(times: TestTimes, postgres_url: &str, workers: usize) -> Cluster {
        let broker = TestBroker::start();
        let dir = tempfile::Builder::new()
            .prefix("clickagg-cluster-")
            .tempdir()
            .expect("temp dir");
        let config_path = dir.path().join("production.toml");
        std::fs::write(
            &config_path,
            format!(
                "{}\n[log]\nkind = \"kafka\"\nclick_partitions = 4\nverdict_partitions = 2\n\n\
                 [store]\nkind = \"postgres\"\n",
                times.config_toml_with(
                    workers,
                    &format!("catalog_refresh = \"{}ms\"\n", CATALOG_REFRESH.as_millis())
                )
            ),
        )
        .expect("write config");
        let postgres_url = postgres_url.to_owned();
        let env = cluster_env(&broker, &postgres_url);
        migrate(&config_path, &env);
        let spawn = |role: &str| {
            let mut p = new_process(dir.path(), &config_path, &env, role, role);
            p.start(START_LIMIT);
            Arc::new(Mutex::new(p))
        };
        // Ingest before the worker: ingest's heartbeats move the worker's frontier.
        let query = spawn("query");
        let ingest = spawn("ingest");
        let worker = spawn("worker");
        Cluster {
            dir,
            times,
            broker,
            postgres_url,
            config_path,
            ingest,
            worker,
            query,
        }
    }

    /// The environment every process of this cluster runs with.
    pub fn env(&self) -> Vec<(String, String)> {
        cluster_env(&self.broker, &self.postgres_url)
    }

    /// A new (not started) process of `role` with its own data directory and log;
    /// `name` tells apart several of one role.
    pub fn process_named(&self, role: &str, name: &str) -> Proc {
        new_process(self.dir.path(), &self.config_path, &self.env(), role, name)
    }

    fn base(p: &Shared) -> String {
        p.lock().base.clone()
    }
}

fn cluster_env(broker: &TestBroker, postgres_url: &str) -> Vec<(String, String)> {
    let mut env = key_env();
    env.push(("CLICKAGG_KAFKA_BROKERS".into(), broker.bootstrap()));
    env.push(("CLICKAGG_POSTGRES_URL".into(), postgres_url.to_owned()));
    env
}

fn new_process(
    dir: &std::path::Path,
    config_path: &std::path::Path,
    env: &[(String, String)],
    role: &str,
    name: &str,
) -> Proc {
    Proc::new(
        name,
        &[role, "--config", &config_path.display().to_string()],
        env.to_vec(),
        dir.join(name),
        dir.join(format!("{name}.log")),
    )
}

/// Runs `clickagg migrate` to completion (schema and topics).
fn migrate(config_path: &std::path::Path, env: &[(String, String)]) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_clickagg"))
        .args(["migrate", "--config", &config_path.display().to_string()])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("run clickagg migrate");
    assert!(
        out.status.success(),
        "clickagg migrate failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether `path` belongs to ingest (the click paths and verdicts) rather than query.
pub fn is_ingest_path(path: &str) -> bool {
    path.starts_with("/c/")
        || path.starts_with("/v1/clicks")
        || path.starts_with("/v1/fraud-verdicts")
}

impl Target for Cluster {
    fn url(&self, path: &str) -> String {
        let p = if is_ingest_path(path) {
            &self.ingest
        } else {
            &self.query
        };
        format!("{}{path}", Cluster::base(p))
    }

    fn times(&self) -> &TestTimes {
        &self.times
    }

    fn heal(&mut self) {
        for p in [&self.query, &self.ingest, &self.worker] {
            let mut p = p.lock();
            if !p.alive() {
                p.start(START_LIMIT);
            }
        }
    }

    fn victims(&self) -> Vec<u32> {
        [&self.ingest, &self.worker]
            .iter()
            .filter_map(|p| p.lock().pid())
            .collect()
    }

    fn catalog_lag(&self) -> Duration {
        CATALOG_REFRESH + Duration::from_millis(700)
    }

    fn log_tail(&self) -> String {
        [&self.query, &self.ingest, &self.worker]
            .iter()
            .map(|p| p.lock().log_tail())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for p in [&self.query, &self.ingest, &self.worker] {
            p.lock().kill();
        }
        if std::env::var_os("CLICKAGG_KEEP_TEST_DIR").is_some() || std::thread::panicking() {
            let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("temp dir"));
            eprintln!("cluster logs kept in {}", dir.keep().display());
        }
    }
}
