//! The standard workload of `../shared/peers`, made on this machine when missing: a venv with
//! DuckDB under `~/.cache/clickagg/peers`, `gen_clicks.py` for the clicks, `truth_duckdb.py`
//! for the exact answer. Shared by the benches that read the file.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A number from the environment, else `default`.
pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `~/.cache/clickagg`.
pub fn cache_root() -> PathBuf {
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    home.join(".cache/clickagg")
}

/// Where the peers' scripts come from: `CLICKAGG_PEERS_SRC`, else `../shared/peers` next to
/// the repository.
pub fn peers_src() -> PathBuf {
    std::env::var_os("CLICKAGG_PEERS_SRC").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/peers"),
        PathBuf::from,
    )
}

/// `~/.cache/clickagg/peers`: venvs, data, copies of the scripts.
pub fn peers_dir() -> PathBuf {
    cache_root().join("peers")
}

fn run(what: &str, cmd: &mut Command) {
    eprintln!("[workload] {what}: {cmd:?}");
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    assert!(status.success(), "{what} failed: {status}");
}

/// The base venv (DuckDB, NumPy, PyArrow), created when missing; its python.
pub fn base_python() -> PathBuf {
    let venv = peers_dir().join("venv-base");
    let python = venv.join("bin/python");
    if !python.exists() {
        std::fs::create_dir_all(peers_dir()).expect("create the peers cache dir");
        run(
            "create venv-base",
            Command::new("python3").args(["-m", "venv"]).arg(&venv),
        );
        run(
            "install duckdb numpy pyarrow",
            Command::new(venv.join("bin/pip"))
                .args(["install", "-q", "duckdb", "numpy", "pyarrow"]),
        );
    }
    python
}

/// The clicks file and its truth.
pub struct Workload {
    /// The clicks, `click_id,impression_id,ad_id,campaign_id,user_id,ip,event_time_ms`.
    pub clicks: PathBuf,
    /// `ad_id,window_start_ms,cnt`.
    pub truth: PathBuf,
    /// How many clicks.
    pub n: u64,
}

impl Workload {
    /// The `n`-click workload (seed 42), generated when missing. The standard one (5M) is
    /// `data/clicks.csv`; other sizes are `data/clicks-<n>.csv`.
    pub fn ensure(n: u64) -> Workload {
        let data = peers_dir().join("data");
        let stem = if n == 5_000_000 {
            "clicks".to_string()
        } else {
            format!("clicks-{n}")
        };
        let clicks = data.join(format!("{stem}.csv"));
        let truth = data.join(if n == 5_000_000 {
            "truth.csv".to_string()
        } else {
            format!("truth-{n}.csv")
        });
        if !clicks.exists() {
            std::fs::create_dir_all(&data).expect("create the data dir");
            run(
                "generate the clicks",
                Command::new(base_python())
                    .arg(peers_src().join("gen_clicks.py"))
                    .args(["--n", &n.to_string(), "--seed", "42", "--no-jsonl", "--out"])
                    .arg(data.join(&stem)),
            );
        }
        if !truth.exists() {
            run(
                "compute the truth",
                Command::new(base_python())
                    .arg(peers_src().join("truth_duckdb.py"))
                    .arg(&clicks)
                    .arg(&truth)
                    .arg("2"),
            );
        }
        Workload { clicks, truth, n }
    }

    /// The md5 of the clicks file (`md5sum`), naming what was imported from it.
    pub fn md5(&self) -> String {
        let out = Command::new("md5sum")
            .arg(&self.clicks)
            .output()
            .expect("run md5sum");
        assert!(out.status.success(), "md5sum {}", self.clicks.display());
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .expect("md5sum output")
            .to_owned()
    }

    /// The exact answer: count per (ad, window start).
    pub fn truth(&self) -> BTreeMap<(u64, u64), i64> {
        let text = std::fs::read_to_string(&self.truth).expect("read the truth");
        text.lines()
            .skip(1)
            .map(|line| {
                let f: Vec<u64> = line
                    .split(',')
                    .map(|x| x.parse().unwrap_or_else(|_| panic!("truth line {line:?}")))
                    .collect();
                ((f[0], f[1]), f[2] as i64)
            })
            .collect()
    }
}

/// Compares per-(ad, window) counts with the truth: `Err` lists the first differences.
pub fn compare(
    got: &BTreeMap<(u64, u64), i64>,
    truth: &BTreeMap<(u64, u64), i64>,
) -> Result<(), String> {
    let mut diffs = Vec::new();
    let mut count = 0;
    for key in got
        .keys()
        .chain(truth.keys())
        .collect::<std::collections::BTreeSet<_>>()
    {
        let (g, t) = (got.get(key).copied(), truth.get(key).copied());
        if g != t {
            count += 1;
            if diffs.len() < 10 {
                diffs.push(format!(
                    "(ad {}, window {}): got {g:?}, truth {t:?}",
                    key.0, key.1
                ));
            }
        }
    }
    if count == 0 {
        Ok(())
    } else {
        Err(format!(
            "{count} (ad, window) rows differ from the truth (got {} rows / {} clicks, truth {} \
             rows / {} clicks); first: {}",
            got.len(),
            got.values().sum::<i64>(),
            truth.len(),
            truth.values().sum::<i64>(),
            diffs.join("; ")
        ))
    }
}

/// Writes `ad_id,window_start_ms,cnt`.
pub fn write_counts(path: &Path, counts: &BTreeMap<(u64, u64), i64>) {
    let mut text = String::from("ad_id,window_start_ms,cnt\n");
    for ((ad, w), n) in counts {
        text.push_str(&format!("{ad},{w},{n}\n"));
    }
    std::fs::write(path, text).expect("write counts");
}

/// This process's resident set now and at its peak (since the last [`reset_peak_rss`]), MiB.
pub fn rss_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Resets the peak RSS to the current RSS (Linux `clear_refs` 5).
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// What the machine is: cores, CPU model, RAM.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or("unknown CPU".to_owned(), |m| m.trim().to_owned());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    format!(
        "{cores} cores, {model}, {mem_gib:.1} GiB RAM, load average {}",
        loadavg()
    )
}

/// The 1, 5 and 15 minute load averages, for the record.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}
