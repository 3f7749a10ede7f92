//! A real Kafka-protocol broker for integration tests: tansu with its SQLite storage, in
//! a child process on a free port with a data directory of its own, which a test can
//! `kill -9` and restart on the same directory and port.
//!
//! The binary comes from `CLICKAGG_TANSU`, else `$HOME/.cache/clickagg/tools/bin/tansu`,
//! else `tansu` on `PATH`; `.ci/install-broker` installs it. Only the SQLite engine is
//! used: tansu's memory engine reports wrong end offsets and skips ahead on seeks.

use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a broker may take to accept connections after it was started.
const STARTUP: Duration = Duration::from_secs(30);

/// A tansu broker in a child process; killed when dropped.
pub struct TestBroker {
    binary: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    starts: u32,
}

impl TestBroker {
    /// Starts a broker on a free port with a fresh data directory, and waits until it
    /// accepts connections. Panics with instructions when no tansu binary is found.
    pub fn start() -> TestBroker {
        let binary = find_tansu().or_else(install_tansu).unwrap_or_else(|| {
            panic!(
                "no tansu broker found (tried $CLICKAGG_TANSU, \
                 $HOME/.cache/clickagg/tools/bin/tansu and PATH) and .ci/install-broker \
                 could not install it"
            )
        });
        let dir = tempfile::Builder::new()
            .prefix("clickagg-tansu-")
            .tempdir()
            .expect("broker data dir");
        let port = free_port();
        let mut broker = TestBroker {
            binary,
            dir,
            port,
            child: None,
            starts: 0,
        };
        broker.spawn();
        broker
    }

    /// `host:port` for `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The broker's data directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether the broker process is running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// Kills the broker with SIGKILL (no shutdown of any kind) and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            // `Child::kill` sends SIGKILL on Unix.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the broker again on the same data directory and port.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// The broker's output so far (all runs), for failure messages.
    pub fn log(&self) -> String {
        (1..=self.starts)
            .map(|n| {
                let path = self.dir.path().join(format!("broker-{n}.log"));
                format!(
                    "--- run {n} ---\n{}",
                    std::fs::read_to_string(path).unwrap_or_default()
                )
            })
            .collect()
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let log = File::create(self.dir.path().join(format!("broker-{}.log", self.starts)))
            .expect("broker log file");
        let err = log.try_clone().expect("broker log file");
        let url = format!("tcp://{}", self.bootstrap());
        let mut command = Command::new(&self.binary);
        command
            .current_dir(self.dir.path())
            .arg("broker")
            .args(["--listener-url", &url])
            .args(["--advertised-listener-url", &url])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err);
        // tansu reads its flags from these too; a stray one must not redirect a test.
        for var in [
            "CLUSTER_ID",
            "LISTENER_URL",
            "ADVERTISED_LISTENER_URL",
            "STORAGE_ENGINE",
            "SCHEMA_REGISTRY",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ] {
            command.env_remove(var);
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.binary.display()));
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let addr: SocketAddr = self.bootstrap().parse().expect("address");
        let deadline = Instant::now() + STARTUP;
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            if !self.is_running() {
                panic!("tansu exited at start:\n{}", self.log());
            }
            if Instant::now() > deadline {
                panic!(
                    "tansu did not accept connections within {STARTUP:?}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The tansu binary, if there is one.
pub fn find_tansu() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("CLICKAGG_TANSU") {
        return Some(PathBuf::from(path));
    }
    if let Some(home) = std::env::var_os("HOME") {
        let path = Path::new(&home).join(".cache/clickagg/tools/bin/tansu");
        if path.is_file() {
            return Some(path);
        }
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join("tansu"))
        .find(|path| path.is_file())
}

/// Installs tansu with `.ci/install-broker` (once per machine; concurrent callers wait
/// for one install), so the test command works on a machine that has none yet.
fn install_tansu() -> Option<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/install-broker");
    eprintln!(
        "no tansu broker yet: running {} (one time, about 20 minutes)",
        script.display()
    );
    let status = Command::new(&script).status().ok()?;
    if !status.success() {
        eprintln!("{} failed: {status}", script.display());
        return None;
    }
    find_tansu()
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}
