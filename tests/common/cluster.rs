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

/// ingest + worker(s) + query on a broker and a Postgres database.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub times: TestTimes,
    pub broker: TestBroker,
    pub postgres_url: String,
    pub config_path: PathBuf,
    pub ingest: Shared,
    /// Worker process 0 (the one that commits), also in `workers`.
    pub worker: Shared,
    /// Every process of the worker cluster.
    pub workers: WorkerSet,
    pub query: Shared,
}

/// The processes of one timely worker cluster, started and restarted together.
pub struct WorkerSet {
    pub procs: Vec<Shared>,
}

impl WorkerSet {
    /// Starts every process (each waits for its peers), then waits until all are ready.
    pub fn start_all(&self) {
        for p in &self.procs {
            p.lock().start_detached();
        }
        for p in &self.procs {
            p.lock().wait_ready(START_LIMIT);
        }
    }

    /// SIGKILLs every process that still runs.
    pub fn kill_all(&self) {
        for p in &self.procs {
            p.lock().kill();
        }
    }

    /// Whether any process of the set is down.
    pub fn any_down(&self) -> bool {
        self.procs.iter().any(|p| !p.lock().alive())
    }

    /// The pids of the running processes.
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().filter_map(|p| p.lock().pid()).collect()
    }

    /// Every process's last log lines.
    pub fn log_tail(&self) -> String {
        self.procs
            .iter()
            .map(|p| p.lock().log_tail())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A free loopback port (bound, then released for a child process to take).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The config of every process: Kafka, Postgres, `workers` threads per worker process,
/// and a `[cluster]` of `cluster` (host:port) when there are several worker processes.
fn config_text(times: &TestTimes, workers: usize, cluster: &[String]) -> String {
    let mut text = format!(
        "{}\n[log]\nkind = \"kafka\"\nclick_partitions = 4\nverdict_partitions = 2\n\n\
         [store]\nkind = \"postgres\"\n",
        times.config_toml_with(
            workers,
            &format!("catalog_refresh = \"{}ms\"\n", CATALOG_REFRESH.as_millis())
        )
    );
    if cluster.len() > 1 {
        let list: Vec<String> = cluster.iter().map(|a| format!("{a:?}")).collect();
        text.push_str(&format!("\n[cluster]\nprocesses = [{}]\n", list.join(", ")));
    }
    text
}

impl Cluster {
    /// Starts a broker, migrates `postgres_url`, then starts query, ingest and a worker
    /// process with `workers` timely workers.
    pub fn start(times: TestTimes, postgres_url: &str, workers: usize) -> Cluster {
        Cluster::start_with(times, postgres_url, workers, 1)
    }

    /// Like [`Cluster::start`], with a worker cluster of `processes` processes of
    /// `workers` threads each.
    pub fn start_with(
        times: TestTimes,
        postgres_url: &str,
        workers: usize,
        processes: usize,
    ) -> Cluster {
        let broker = TestBroker::start();
        let dir = tempfile::Builder::new()
            .prefix("clickagg-cluster-")
            .tempdir()
            .expect("temp dir");
        let config_path = dir.path().join("production.toml");
        std::fs::write(&config_path, config_text(&times, workers, &[])).expect("write config");
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
        let workers = worker_set(dir.path(), &times, &env, "worker", workers, processes);
        workers.start_all();
        Cluster {
            dir,
            times,
            broker,
            postgres_url,
            config_path,
            ingest,
            worker: Arc::clone(&workers.procs[0]),
            workers,
            query,
        }
    }

    /// A second worker cluster (not started) of `processes` x `workers` on the same log,
    /// committing into `postgres_url`, which this migrates.
    pub fn other_worker_set(
        &self,
        name: &str,
        postgres_url: &str,
        workers: usize,
        processes: usize,
    ) -> WorkerSet {
        let env = cluster_env(&self.broker, postgres_url);
        let set = worker_set(self.dir.path(), &self.times, &env, name, workers, processes);
        migrate(&self.dir.path().join(format!("{name}.toml")), &env);
        set
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
    new_process_with(dir, config_path, env, &[role], name)
}

/// A process running `args` (the role and its flags) with `--config config_path`.
fn new_process_with(
    dir: &std::path::Path,
    config_path: &std::path::Path,
    env: &[(String, String)],
    args: &[&str],
    name: &str,
) -> Proc {
    let config = config_path.display().to_string();
    let mut all = args.to_vec();
    all.extend(["--config", &config]);
    Proc::new(
        name,
        &all,
        env.to_vec(),
        dir.join(name),
        dir.join(format!("{name}.log")),
    )
}

/// The worker processes `name` (one, or `name-0`, `name-1`, ... for a cluster), with
/// their config written to `<dir>/<name>.toml`.
fn worker_set(
    dir: &std::path::Path,
    times: &TestTimes,
    env: &[(String, String)],
    name: &str,
    workers: usize,
    processes: usize,
) -> WorkerSet {
    let addrs: Vec<String> = (0..processes)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let config_path = dir.join(format!("{name}.toml"));
    std::fs::write(&config_path, config_text(times, workers, &addrs)).expect("write config");
    let procs = (0..processes)
        .map(|i| {
            let index = i.to_string();
            let p = if processes == 1 {
                new_process_with(dir, &config_path, env, &["worker"], name)
            } else {
                let pname = format!("{name}-{i}");
                new_process_with(
                    dir,
                    &config_path,
                    env,
                    &["worker", "--process", &index],
                    &pname,
                )
            };
            Arc::new(Mutex::new(p))
        })
        .collect();
    WorkerSet { procs }
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
        for p in [&self.query, &self.ingest] {
            let mut p = p.lock();
            if !p.alive() {
                p.start(START_LIMIT);
            }
        }
        // A worker cluster is restarted whole: timely has no way to rejoin one process.
        if self.workers.any_down() {
            self.workers.kill_all();
            self.workers.start_all();
        }
    }

    fn victims(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self.ingest.lock().pid().into_iter().collect();
        pids.extend(self.workers.pids());
        pids
    }

    fn catalog_lag(&self) -> Duration {
        CATALOG_REFRESH + Duration::from_millis(700)
    }

    fn log_tail(&self) -> String {
        [&self.query, &self.ingest]
            .iter()
            .map(|p| p.lock().log_tail())
            .chain([self.workers.log_tail()])
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for p in [&self.query, &self.ingest] {
            p.lock().kill();
        }
        self.workers.kill_all();
        if std::env::var_os("CLICKAGG_KEEP_TEST_DIR").is_some() || std::thread::panicking() {
            let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("temp dir"));
            eprintln!("cluster logs kept in {}", dir.keep().display());
        }
    }
}
