//! Postgres for tests: a throwaway database on the machine's server (127.0.0.1:5432,
//! trust), or a private cluster of our own that a chaos test may stop and restart without
//! disturbing anyone else. Both talk to real Postgres over real connections.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn psql(port: u16, database: &str, sql: &str) -> Result<String, String> {
    let out = Command::new("psql")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
        .args(["-d", database, "-v", "ON_ERROR_STOP=1", "-At", "-c", sql])
        .output()
        .map_err(|e| format!("run psql: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}_{:x}",
        std::process::id(),
        super::now_ms() ^ (rand::random::<u32>() as u64)
    )
}

/// A fresh database on the machine's Postgres, dropped again at the end.
pub struct TestDb {
    /// Its name.
    pub name: String,
    port: u16,
}

impl TestDb {
    /// Creates `clickagg_t_<unique>` on 127.0.0.1:5432.
    pub fn create() -> TestDb {
        TestDb::create_on(5432)
    }

    /// Creates a fresh database on a server listening on `port`.
    pub fn create_on(port: u16) -> TestDb {
        let name = unique("clickagg_t");
        psql(port, "postgres", &format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("create database {name} on port {port}: {e}"));
        TestDb { name, port }
    }

    /// Its connection URL.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{}", self.port, self.name)
    }

    /// Runs SQL in it; the rows as `psql -At` prints them.
    pub fn query(&self, sql: &str) -> String {
        psql(self.port, &self.name, sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Runs SQL in it, returning the error text instead of panicking.
    pub fn try_query(&self, sql: &str) -> Result<String, String> {
        psql(self.port, &self.name, sql)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if std::env::var_os("CLICKAGG_KEEP_TEST_DIR").is_some() || std::thread::panicking() {
            eprintln!("test database kept: {}", self.url());
            return;
        }
        let _ = psql(
            self.port,
            "postgres",
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

/// The directory of the PostgreSQL server binaries (`initdb`, `pg_ctl`).
fn pg_bin() -> PathBuf {
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<PathBuf> = std::fs::read_dir(root)
        .unwrap_or_else(|e| panic!("{}: {e} (is PostgreSQL installed?)", root.display()))
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("pg_ctl").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .expect("no PostgreSQL server binaries under /usr/lib/postgresql")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A private PostgreSQL cluster in a temp directory, owned by the `postgres` OS user
/// (initdb refuses root), on its own port: tests may stop, crash and restart it.
pub struct PrivatePostgres {
    dir: PathBuf,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

impl PrivatePostgres {
    fn as_postgres(&self, program: &str, args: &[&str]) -> Result<(), String> {
        let out = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(pg_bin().join(program))
            .args(args)
            .output()
            .map_err(|e| format!("run {program}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{program} {args:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// Creates the cluster and starts it.
    pub fn start() -> PrivatePostgres {
        let dir = std::env::temp_dir().join(unique("clickagg-pg"));
        std::fs::create_dir_all(&dir).expect("pg dir");
        let status = Command::new("chown")
            .args(["postgres:postgres", &dir.display().to_string()])
            .status()
            .expect("chown");
        assert!(status.success(), "chown {} to postgres", dir.display());
        let pg = PrivatePostgres {
            dir,
            port: free_port(),
        };
        pg.as_postgres(
            "initdb",
            &[
                "-D",
                &pg.data().display().to_string(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
            ],
        )
        .unwrap_or_else(|e| panic!("initdb: {e}"));
        pg.start_server();
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn start_server(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200",
            self.port,
            self.dir.display()
        );
        self.as_postgres(
            "pg_ctl",
            &[
                "-D",
                &self.data().display().to_string(),
                "-l",
                &self.dir.join("server.log").display().to_string(),
                "-o",
                &options,
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
        .unwrap_or_else(|e| panic!("start private postgres: {e}"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while psql(self.port, "postgres", "SELECT 1").is_err() {
            assert!(Instant::now() < deadline, "private postgres not answering");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops it: `immediate` is a crash (no checkpoint), else a fast clean shutdown.
    pub fn stop(&self, immediate: bool) {
        let mode = if immediate { "immediate" } else { "fast" };
        self.as_postgres(
            "pg_ctl",
            &[
                "-D",
                &self.data().display().to_string(),
                "-m",
                mode,
                "-w",
                "stop",
            ],
        )
        .unwrap_or_else(|e| panic!("stop private postgres: {e}"));
    }

    /// Crashes it (immediate stop) and starts it again after `down`.
    pub fn restart(&self, down: Duration) {
        self.stop(true);
        std::thread::sleep(down);
        self.start_server();
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self.as_postgres(
            "pg_ctl",
            &[
                "-D",
                &self.data().display().to_string(),
                "-m",
                "immediate",
                "stop",
            ],
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
