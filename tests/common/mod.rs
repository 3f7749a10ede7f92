//! Shared pieces of the integration tests: the real `clickagg serve` binary in a child
//! process, a blocking HTTP client, and the workload a test sends.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reqwest::blocking::{Client, Response};
use serde_json::{Value, json};

pub mod broker;
pub mod cluster;
pub mod compare;
pub mod oracle;
pub mod postgres;
pub mod process;
pub mod workload;

pub use process::Proc;

/// The admin key every test server runs with.
pub const ADMIN: &str = "test-admin-key";
/// The ad-server key every test server runs with.
pub const AD_SERVER: &str = "test-ad-server-key";
/// The token secret every test server runs with.
pub const TOKEN_SECRET: &[u8] = b"test-token-secret-0123456789abcdef";

/// The `clickagg` binary the tests and benches start: `CLICKAGG_BIN` when set (bench/run-all
/// points it at a private copy, since the shared target directory's `release/clickagg` is
/// rewritten by whichever worktree builds last), else the one cargo built for this crate.
pub fn clickagg_bin() -> std::ffi::OsString {
    std::env::var_os("CLICKAGG_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_clickagg").into())
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// CPU seconds (user + system) each live thread of process `pid` has used so far, with
/// the thread's name. Threads that ended are missing, so compare two samples of
/// long-lived threads only.
pub fn thread_cpu_seconds(pid: u32) -> Vec<(String, f64)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| {
            let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
            // comm is in parentheses and may hold spaces: split after the last ')'.
            let (open, close) = (stat.find('(')?, stat.rfind(')')?);
            let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
            // After comm: utime and stime are fields 14 and 15 of stat (1-based).
            let ticks: f64 = [11, 12]
                .iter()
                .filter_map(|i| fields.get(*i)?.parse::<f64>().ok())
                .sum();
            Some((stat[open + 1..close].to_owned(), ticks / 100.0))
        })
        .collect()
}

/// A benchmark knob: the number in environment variable `name`, else `default`.
pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Timing rules of a test server (short, so tests see them act).
#[derive(Clone, Debug)]
pub struct TestTimes {
    pub tick_ms: u64,
    pub lateness_s: u64,
    pub ttl_s: u64,
    pub correction_s: u64,
    pub max_clicks_per_ip_per_second: u64,
}

impl Default for TestTimes {
    fn default() -> Self {
        TestTimes {
            tick_ms: 100,
            lateness_s: 120,
            ttl_s: 900,
            correction_s: 120,
            max_clicks_per_ip_per_second: 5,
        }
    }
}

impl TestTimes {
    /// The `[time]` and `[fraud]` sections (and `workers`) of a config file.
    pub fn config_toml(&self, workers: usize) -> String {
        self.config_toml_with(workers, "")
    }

    /// Like [`TestTimes::config_toml`], with extra lines in the `[http]` section.
    pub fn config_toml_with(&self, workers: usize, http: &str) -> String {
        format!(
            "workers = {workers}\n\n[http]\ntrust_forwarded_for = true\n{http}\n\
             [time]\ntick = \"{tick}ms\"\nimpression_ttl = \"{ttl}s\"\nallowed_lateness = \"{late}s\"\n\
             correction_window = \"{corr}s\"\n\n[fraud]\nmax_clicks_per_ip_per_second = {n}\n",
            tick = self.tick_ms,
            ttl = self.ttl_s,
            late = self.lateness_s,
            corr = self.correction_s,
            n = self.max_clicks_per_ip_per_second,
        )
    }
}

/// The keys every test process runs with.
pub fn key_env() -> Vec<(String, String)> {
    vec![
        ("CLICKAGG_ADMIN_KEY".into(), ADMIN.into()),
        ("CLICKAGG_AD_SERVER_KEY".into(), AD_SERVER.into()),
        (
            "CLICKAGG_TOKEN_SECRET".into(),
            String::from_utf8_lossy(TOKEN_SECRET).into_owned(),
        ),
    ]
}

/// A deployment the tests talk to over HTTP: one `serve`, or a production cluster.
pub trait Target {
    /// The URL of `path` on the process that serves it.
    fn url(&self, path: &str) -> String;
    /// The timing rules it runs with.
    fn times(&self) -> &TestTimes;
    /// Restarts whatever process has died (after a kill), waiting until it is ready.
    fn heal(&mut self);
    /// The processes chaos may kill.
    fn victims(&self) -> Vec<u32>;
    /// What the processes last logged.
    fn log_tail(&self) -> String;
    /// How long a catalog change (a new price) may take to reach the click path: `serve`
    /// updates its own cache, a production ingest reloads every `http.catalog_refresh`.
    fn catalog_lag(&self) -> Duration {
        Duration::ZERO
    }

    /// GET with a key; panics on a transport error.
    fn get(&self, key: &str, path: &str) -> Response {
        client()
            .get(self.url(path))
            .bearer_auth(key)
            .send()
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// GET as admin, expecting 200 and JSON.
    fn get_json(&self, path: &str) -> Value {
        let r = self.get(ADMIN, path);
        let status = r.status();
        let body: Value = r.json().expect("json body");
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    /// Sends JSON with a method and a key; panics on a transport error.
    fn send(&self, method: reqwest::Method, key: &str, path: &str, body: &Value) -> Response {
        client()
            .request(method, self.url(path))
            .bearer_auth(key)
            .json(body)
            .send()
            .unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// Creates an advertiser, returning its API key.
    fn create_advertiser(&self, id: u64) -> String {
        let r = self.send(
            reqwest::Method::POST,
            ADMIN,
            "/v1/advertisers",
            &json!({"advertiser_id": id, "name": format!("adv {id}")}),
        );
        assert_eq!(r.status(), 201);
        let body: Value = r.json().expect("json");
        body["api_key"].as_str().expect("api_key").to_string()
    }

    /// Creates or updates an ad.
    fn put_ad(&self, ad: u64, advertiser: u64, campaign: u64, cpc_micros: u64) {
        let r = self.send(
            reqwest::Method::PUT,
            ADMIN,
            &format!("/v1/ads/{ad}"),
            &json!({"advertiser_id": advertiser, "campaign_id": campaign,
                    "landing_url": format!("https://adv{advertiser}.example/ad/{ad}"),
                    "cpc_micros": cpc_micros}),
        );
        assert!(
            r.status() == 200 || r.status() == 201,
            "put ad: {}",
            r.status()
        );
    }

    /// Mints `n` impressions of an ad: (impression id hex, token).
    fn impressions(&self, ad: u64, n: usize) -> Vec<(String, String)> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let k = (n - out.len()).min(1000);
            let r = self.send(
                reqwest::Method::POST,
                AD_SERVER,
                "/v1/impressions",
                &json!({"ad_id": ad, "user_id": "u-test", "count": k}),
            );
            assert_eq!(r.status(), 201);
            let body: Value = r.json().expect("json");
            for imp in body["impressions"].as_array().expect("impressions") {
                out.push((
                    imp["impression_id"].as_str().expect("id").to_string(),
                    imp["token"].as_str().expect("token").to_string(),
                ));
            }
        }
        out
    }

    /// `complete_through` in ms, seen through an ad's series: every click acknowledged by
    /// then is counted.
    fn complete_through(&self, ad: u64) -> Option<u64> {
        let body = self.get_json(&format!("/v1/ads/{ad}/clicks?granularity=1d"));
        body["complete_through"].as_str().map(parse_rfc3339)
    }

    /// Waits until `complete_through` reaches `t`: every click acknowledged by `t` counted.
    fn wait_complete_through(&self, ad: u64, t: u64, limit: Duration) -> Duration {
        let start = Instant::now();
        loop {
            if self.complete_through(ad).is_some_and(|c| c >= t) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < limit,
                "frontier did not pass {t} within {limit:?}\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The text of `/metrics` of the process serving `path`'s side.
    fn metrics_of(&self, path: &str) -> String {
        client()
            .get(self.url(path))
            .send()
            .and_then(|r| r.text())
            .unwrap_or_else(|e| panic!("metrics: {e}"))
    }
}

/// A `clickagg serve` child process on a data directory that outlives restarts.
pub struct Server {
    pub dir: tempfile::TempDir,
    pub times: TestTimes,
    pub proc: Proc,
}

impl Server {
    /// Starts a server (2 workers) on a fresh data directory and waits until it is ready.
    pub fn start(times: TestTimes) -> Server {
        Server::start_with(times, 2)
    }

    /// Starts a server with `workers` timely workers.
    pub fn start_with(times: TestTimes, workers: usize) -> Server {
        Server::start_configured(times, workers, "")
    }

    /// Starts a server whose config also has `extra` (whole TOML tables, e.g. `[views]`).
    pub fn start_configured(times: TestTimes, workers: usize, extra: &str) -> Server {
        Server::start_with_args(times, workers, extra, &[])
    }

    /// Starts `clickagg serve` with more command-line arguments (e.g. `--demo`).
    pub fn start_with_args(times: TestTimes, workers: usize, extra: &str, args: &[&str]) -> Server {
        let dir = tempfile::Builder::new()
            .prefix("clickagg-test-")
            .tempdir()
            .expect("temp dir");
        let config_path = dir.path().join("clickagg.toml");
        std::fs::write(
            &config_path,
            format!("{}\n{extra}", times.config_toml(workers)),
        )
        .expect("write config");
        let config_arg = config_path.display().to_string();
        let mut argv = vec!["serve", "--config", config_arg.as_str()];
        argv.extend_from_slice(args);
        let mut proc = Proc::new(
            "serve",
            &argv,
            key_env(),
            dir.path().join("data"),
            dir.path().join("server.log"),
        );
        proc.start(Duration::from_secs(120));
        Server { dir, times, proc }
    }

    /// The data directory (embedded log and store).
    pub fn data_dir(&self) -> PathBuf {
        self.proc.data_dir.clone()
    }

    /// How often the server was started.
    pub fn starts(&self) -> u32 {
        self.proc.starts
    }

    /// The OS id of the running server process.
    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// SIGKILLs the server (no chance to flush or commit).
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Starts the server again on the same data directory.
    pub fn restart(&mut self) {
        self.proc.kill();
        self.proc.start(Duration::from_secs(120));
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.proc.alive()
    }

    /// The text of `/metrics`.
    pub fn metrics(&self) -> String {
        self.metrics_of("/metrics")
    }
}

impl Target for Server {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.proc.base)
    }

    fn times(&self) -> &TestTimes {
        &self.times
    }

    fn heal(&mut self) {
        if !self.proc.alive() {
            self.restart();
        }
    }

    fn victims(&self) -> Vec<u32> {
        self.proc.pid().into_iter().collect()
    }

    fn log_tail(&self) -> String {
        self.proc.log_tail()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.proc.kill();
        if std::env::var_os("CLICKAGG_KEEP_TEST_DIR").is_some() || std::thread::panicking() {
            let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("temp dir"));
            eprintln!("test data kept in {}", dir.keep().display());
        }
    }
}

/// A blocking client with sane timeouts that never follows redirects.
pub fn client() -> Client {
    Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http client")
}

/// Parses an RFC 3339 time into ms.
pub fn parse_rfc3339(s: &str) -> u64 {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("bad time {s:?}: {e}"));
    (t.unix_timestamp_nanos() / 1_000_000) as u64
}

/// A sample's value in Prometheus text: the first line of `name` whose labels contain
/// `label` (e.g. `reason="bad_token"`), or 0 when absent.
pub fn metric(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| label.is_empty() || l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Every record of a topic in the embedded log, partition by partition in offset order:
/// (partition, offset, record time, payload). Read straight from the log file (one table
/// per partition, `clicks_0`, `clicks_1`, ...) so a test can check what is durable
/// without the server.
pub fn log_rows(data_dir: &Path, topic: u8) -> Vec<(u32, u64, u64, Vec<u8>)> {
    let name = clickagg::record::Topic::from_code(topic)
        .unwrap_or_else(|| panic!("no topic {topic}"))
        .name();
    let conn = rusqlite::Connection::open_with_flags(
        data_dir.join("log.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open log.db");
    let mut out = Vec::new();
    for partition in 0u32.. {
        let table = format!("{name}_{partition}");
        let exists: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
                [&table],
                |r| r.get(0),
            )
            .expect("schema");
        if exists == 0 {
            break;
        }
        let mut stmt = conn
            .prepare(&format!(
                "SELECT offset, record_time_ms, payload FROM {table} ORDER BY offset"
            ))
            .expect("prepare");
        out.extend(
            stmt.query_map([], |r| {
                Ok((
                    partition,
                    r.get::<_, i64>(0)? as u64,
                    r.get::<_, i64>(1)? as u64,
                    r.get(2)?,
                ))
            })
            .expect("query")
            .map(|r| r.expect("row")),
        );
    }
    out
}

/// Every record of a topic in the embedded log: (record time, payload).
pub fn log_records(data_dir: &Path, topic: u8) -> Vec<(u64, Vec<u8>)> {
    log_rows(data_dir, topic)
        .into_iter()
        .map(|(_, _, time, payload)| (time, payload))
        .collect()
}
