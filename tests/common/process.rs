//! One `clickagg` child process: spawned with a config file and environment, its output
//! in a log file, its HTTP address read from `<data_dir>/http.addr`, ready once
//! `/readyz` answers 200; killable with SIGKILL and restartable on the same data.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::client;

/// A `clickagg <role>` child process.
pub struct Proc {
    /// For messages: `serve`, `ingest`, `worker`, `query`.
    pub name: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// The process's data directory (its `http.addr` lands here).
    pub data_dir: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
    /// `http://<addr>` once started.
    pub base: String,
    /// How often it was started.
    pub starts: u32,
    /// The executable, when not [`super::clickagg_bin`] (a bench comparing two builds).
    binary: Option<std::ffi::OsString>,
}

impl Proc {
    /// A process description; nothing runs until [`Proc::start`].
    pub fn new(
        name: &str,
        args: &[&str],
        env: Vec<(String, String)>,
        data_dir: PathBuf,
        log_path: PathBuf,
    ) -> Proc {
        let mut env = env;
        env.push(("CLICKAGG_DATA_DIR".into(), data_dir.display().to_string()));
        env.push(("CLICKAGG_HTTP_ADDR".into(), "127.0.0.1:0".into()));
        // CLICKAGG_TEST_RUST_LOG turns on diagnostics (e.g. the sink's and source's
        // per-row traces) in every process a test starts.
        let filter = std::env::var("CLICKAGG_TEST_RUST_LOG").unwrap_or_else(|_| "info".into());
        env.push(("RUST_LOG".into(), filter));
        Proc {
            name: name.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            env,
            data_dir,
            log_path,
            child: None,
            base: String::new(),
            starts: 0,
            binary: None,
        }
    }

    /// Runs `binary` from the next start on (`None`: [`super::clickagg_bin`] again).
    #[allow(dead_code)] // only the query bench compares two builds
    pub fn use_binary(&mut self, binary: Option<std::ffi::OsString>) {
        self.binary = binary;
    }

    /// Starts it and waits (up to `limit`) until `/readyz` answers 200.
    pub fn start(&mut self, limit: Duration) {
        self.start_detached();
        self.wait_ready(limit);
    }

    /// Starts it without waiting for anything (e.g. a process expected to refuse).
    pub fn start_detached(&mut self) {
        // Two threads may heal the same process (a chaos thread restarting what it killed,
        // the driver restarting what it found dead): a second start must not spawn another
        // child over the first, which would run on, unkillable by the test, after it ends.
        if self.alive() {
            return;
        }
        let addr_file = self.data_dir.join("http.addr");
        let _ = std::fs::remove_file(&addr_file);
        std::fs::create_dir_all(&self.data_dir).expect("data dir");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("process log");
        let binary = self.binary.clone().unwrap_or_else(super::clickagg_bin);
        let child = Command::new(binary)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn clickagg {}: {e}", self.name));
        self.child = Some(child);
        self.starts += 1;
    }

    /// Waits (up to `limit`) until `/readyz` answers 200; panics if it exits meanwhile.
    pub fn wait_ready(&mut self, limit: Duration) {
        let addr_file = self.data_dir.join("http.addr");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "clickagg {} exited during start: {status}\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            if let Ok(addr) = std::fs::read_to_string(&addr_file) {
                let addr = addr.trim();
                if !addr.is_empty() {
                    self.base = format!("http://{addr}");
                    if self.ready() {
                        return;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "clickagg {} not ready in {limit:?}\n{}",
                self.name,
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether `/readyz` answers 200 now.
    pub fn ready(&self) -> bool {
        client()
            .get(format!("{}/readyz", self.base))
            .timeout(Duration::from_secs(2))
            .send()
            .map(|r| r.status().is_success())
            .unwrap_or(false)
    }

    /// The last lines it logged.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "--- last lines of {} ---\n{}",
            self.log_path.display(),
            lines[lines.len().saturating_sub(40)..].join("\n")
        )
    }

    /// Its OS process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL (no chance to flush or commit), and reap it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits up to `limit` for it to exit; its exit status.
    pub fn terminate(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Whether it is running.
    pub fn alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Waits up to `limit` for it to exit by itself; its exit status.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}
