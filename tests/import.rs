//! `clickagg import`: a historical CSV of clicks (duplicates, some with an earlier event
//! time than the first copy, and some late clicks) imported into a fresh data directory,
//! then counted by the real `clickagg serve`; what the query API answers per (ad, minute)
//! must equal an oracle computed here from the rows. Bad rows stop the import with their
//! line number, or are skipped and counted.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use clickagg::record::{ClickEvent, Payload};
use common::{ADMIN, Proc, Target, TestTimes, key_env, log_records, parse_rfc3339};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// 2023-11-14T22:13:20Z: long before the clock of any test run.
const T0: u64 = 1_700_000_000_000;
const CPC: u64 = 1_500;
const ADS: u64 = 40;

#[derive(Clone, Debug)]
struct Row {
    click_id: u64,
    impression_id: u64,
    ad_id: u64,
    user_id: u64,
    ip: String,
    event_time_ms: u64,
}

fn campaign_of(ad: u64) -> u64 {
    100 + ad % 5
}

/// Rows in arrival order over `minutes` of arrival clock: every impression's first copy
/// arrives up to 5 s after its event time; 10% duplicates repeat an earlier impression
/// (so some carry an earlier event time than its first copy); `late` impressions and
/// `late` duplicates arrive 200 s after their event time.
fn workload(seed: u64, originals: usize, minutes: u64, late: usize) -> Vec<Row> {
    let mut rng = StdRng::seed_from_u64(seed);
    let span = minutes * 60_000;
    // Every tenth click repeats an impression: 10% duplicates.
    let total = originals * 10 / 9;
    let mut rows: Vec<Row> = Vec::with_capacity(total);
    let mut firsts: Vec<usize> = Vec::new();
    for i in 0..total {
        let arrival = T0 + i as u64 * span / total as u64;
        let jitter = rng.random_range(0..=5_000);
        let row = if i % 10 == 9 {
            // Up to ~6 s back: within the 5 s jitter, many copies carry an earlier time.
            let back = rng.random_range(1..=firsts.len().min(300));
            let first = rows[firsts[firsts.len() - back]].clone();
            Row {
                click_id: i as u64,
                event_time_ms: arrival - jitter,
                ..first
            }
        } else {
            firsts.push(i);
            let ad = 1 + (rng.random_range(0..ADS * ADS) as f64).sqrt() as u64;
            Row {
                click_id: i as u64,
                impression_id: rng.random_range(1..1u64 << 40),
                ad_id: ad.min(ADS),
                user_id: rng.random_range(0..5_000),
                // One IP per impression: the burst rule (5 per IP and second) stays quiet.
                ip: format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255),
                event_time_ms: arrival - jitter,
            }
        };
        rows.push(row);
    }
    // Late clicks: new impressions, and late copies of impressions counted on time.
    let originals: Vec<Row> = firsts.iter().map(|&i| rows[i].clone()).collect();
    for k in 0..late {
        let at = rng.random_range(total / 2..total);
        let i = rows.len();
        let arrival = rows[at].event_time_ms;
        let late_copy = k % 2 == 1;
        let row = if late_copy {
            Row {
                click_id: i as u64,
                event_time_ms: arrival - 200_000,
                ..originals[rng.random_range(0..originals.len() / 2)].clone()
            }
        } else {
            Row {
                click_id: i as u64,
                impression_id: (1u64 << 41) + k as u64,
                ad_id: 1 + k as u64 % ADS,
                user_id: 1,
                ip: format!("10.250.0.{k}"),
                event_time_ms: arrival - 200_000,
            }
        };
        rows.insert(at, row);
    }
    rows
}

fn write_csv(path: &Path, rows: &[Row], extra_lines: &[(usize, &str)]) {
    let mut text =
        String::from("click_id,impression_id,ad_id,campaign_id,user_id,ip,event_time_ms\n");
    for (i, r) in rows.iter().enumerate() {
        for (_, line) in extra_lines.iter().filter(|(at, _)| *at == i) {
            text.push_str(line);
            text.push('\n');
        }
        text.push_str(&format!(
            "{},{},{},{},{},{},{}\n",
            r.click_id,
            r.impression_id,
            r.ad_id,
            campaign_of(r.ad_id),
            r.user_id,
            r.ip,
            r.event_time_ms
        ));
    }
    std::fs::write(path, text).expect("write csv");
}

/// Each row with the record time the import must give it: the latest event time of the
/// rows up to its own, in file order.
fn with_record_times(rows: &[Row]) -> impl Iterator<Item = (&Row, u64)> {
    rows.iter().scan(0, |so_far, r| {
        *so_far = (*so_far).max(r.event_time_ms);
        Some((r, *so_far))
    })
}

/// Per (ad, minute): (billable, late), by the rules of `src/dataflow/classify.rs` applied
/// to the import's record times ([`with_record_times`]).
fn oracle(rows: &[Row], lateness_ms: u64) -> BTreeMap<(u64, u64), (i64, i64)> {
    // Per impression: (on time?, event time, click id as text, ad).
    let mut copies: BTreeMap<u64, Vec<(bool, u64, String, u64)>> = BTreeMap::new();
    for (r, record_time) in with_record_times(rows) {
        copies.entry(r.impression_id).or_default().push((
            record_time - r.event_time_ms <= lateness_ms,
            r.event_time_ms,
            r.click_id.to_string(),
            r.ad_id,
        ));
    }
    let mut counts: BTreeMap<(u64, u64), (i64, i64)> = BTreeMap::new();
    for all in copies.values() {
        let earliest = |on_time: bool| {
            all.iter()
                .filter(|c| c.0 == on_time)
                .min_by(|a, b| (a.1, &a.2).cmp(&(b.1, &b.2)))
        };
        let (winner, late) = match earliest(true) {
            Some(c) => (c, false),
            None => (earliest(false).expect("a copy"), true),
        };
        let entry = counts
            .entry((winner.3, winner.1 / 60_000 * 60_000))
            .or_default();
        if late {
            entry.1 += 1;
        } else {
            entry.0 += 1;
        }
    }
    counts
}

/// A data directory with a config file, for `import` and then `serve`.
struct Deployment {
    dir: tempfile::TempDir,
    times: TestTimes,
    serve: Option<Proc>,
}

impl Deployment {
    fn new() -> Deployment {
        let dir = tempfile::Builder::new()
            .prefix("clickagg-import-")
            .tempdir()
            .expect("temp dir");
        let times = TestTimes::default();
        std::fs::write(dir.path().join("clickagg.toml"), times.config_toml(2))
            .expect("write config");
        Deployment {
            dir,
            times,
            serve: None,
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn import(&self, csv: &Path, extra: &[&str]) -> Output {
        let config = self.dir.path().join("clickagg.toml");
        Command::new(env!("CARGO_BIN_EXE_clickagg"))
            .arg("import")
            .arg("--config")
            .arg(&config)
            .arg(csv)
            .args(["--batch", "700", "--cpc-micros", &CPC.to_string()])
            .args(extra)
            .envs(key_env())
            .env("CLICKAGG_DATA_DIR", self.data_dir())
            .env("RUST_LOG", "info")
            .output()
            .expect("run clickagg import")
    }

    fn serve(&mut self) {
        let config = self.dir.path().join("clickagg.toml").display().to_string();
        let mut proc = Proc::new(
            "serve",
            &["serve", "--config", &config],
            key_env(),
            self.data_dir(),
            self.dir.path().join("server.log"),
        );
        proc.start(Duration::from_secs(120));
        self.serve = Some(proc);
    }

    fn proc(&self) -> &Proc {
        self.serve.as_ref().expect("serve started")
    }
}

impl Target for Deployment {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.proc().base)
    }
    fn times(&self) -> &TestTimes {
        &self.times
    }
    fn heal(&mut self) {}
    fn victims(&self) -> Vec<u32> {
        self.proc().pid().into_iter().collect()
    }
    fn log_tail(&self) -> String {
        self.serve
            .as_ref()
            .map(|p| p.log_tail())
            .unwrap_or_default()
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        if let Some(p) = self.serve.as_mut() {
            p.kill();
        }
        if std::thread::panicking() {
            let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("temp dir"));
            eprintln!("test data kept in {}", dir.keep().display());
        }
    }
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn imported_history_is_counted_like_live_traffic() {
    let rows = workload(5, 20_000, 8, 40);
    let mut d = Deployment::new();
    let csv = d.dir.path().join("clicks.csv");
    write_csv(&csv, &rows, &[]);

    // The workload has what the test is about.
    let mut first_event: BTreeMap<u64, u64> = BTreeMap::new();
    let mut earlier_dups = 0;
    for r in &rows {
        match first_event.get(&r.impression_id) {
            Some(&t) if r.event_time_ms < t => earlier_dups += 1,
            Some(_) => {}
            None => {
                first_event.insert(r.impression_id, r.event_time_ms);
            }
        }
    }
    let duplicates = rows.len() - first_event.len();
    assert!(
        duplicates * 100 >= rows.len() * 9,
        "{duplicates} duplicates"
    );
    assert!(
        earlier_dups > 100,
        "only {earlier_dups} duplicates with an earlier event time"
    );

    let out = d.import(&csv, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("{} clicks imported", rows.len())),
        "{}",
        text(&out)
    );
    let stored = log_records(&d.data_dir(), 0);
    assert_eq!(stored.len(), rows.len(), "every click is in the log");
    let last_event = rows.iter().map(|r| r.event_time_ms).max().expect("rows");
    assert_eq!(
        stored.iter().map(|(t, _)| *t).max(),
        Some(last_event),
        "record times are the file's event times, not the clock"
    );
    // Each click's record time is its file order's running max: not raised by the catalog
    // records of ads that first appear after it in the same batch.
    let want_times: BTreeMap<String, u64> = with_record_times(&rows)
        .map(|(r, time)| (r.click_id.to_string(), time))
        .collect();
    let wrong: Vec<(String, u64, Option<u64>)> = stored
        .iter()
        .map(|(time, payload)| {
            let click = ClickEvent::decode(payload).expect("a click payload");
            let want = want_times.get(&click.click_id).copied();
            (click.click_id, *time, want)
        })
        .filter(|(_, time, want)| *want != Some(*time))
        .collect();
    assert!(
        wrong.is_empty(),
        "{} clicks' record times are not their file order's running max, e.g. (click, stored, expected) {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(3)]
    );

    d.serve();
    let lateness_ms = d.times.lateness_s * 1000;
    let want = oracle(&rows, lateness_ms);
    d.wait_complete_through(1, last_event + 1_000, Duration::from_secs(120));

    let (from, to) = (T0 / 86_400_000 * 86_400_000, T0 + 86_400_000);
    let mut got: BTreeMap<(u64, u64), (i64, i64)> = BTreeMap::new();
    for ad in 1..=ADS {
        let body = d.get_json(&format!(
            "/v1/ads/{ad}/clicks?granularity=1m&from={from}&to={to}"
        ));
        for p in body["points"].as_array().expect("points") {
            let n = |k: &str| p[k].as_i64().unwrap_or_else(|| panic!("{k} in {p}"));
            assert_eq!(n("fraud_clicks"), 0, "no fraud in this workload: {p}");
            assert_eq!(n("spend_micros"), n("clicks") * CPC as i64, "{p}");
            if n("clicks") != 0 || n("late_clicks") != 0 {
                let start = parse_rfc3339(p["window_start"].as_str().expect("start"));
                got.insert((ad, start), (n("clicks"), n("late_clicks")));
            }
        }
    }
    assert_eq!(got, want, "per (ad, minute): (billable, late)");
    let late: i64 = want.values().map(|v| v.1).sum();
    assert!(late >= 15, "the workload has late impressions: {late}");

    // The catalog came from the file: each ad's campaign holds exactly its ads' clicks.
    for campaign in 100..105 {
        let body = d.get_json(&format!(
            "/v1/campaigns/{campaign}/clicks?granularity=1d&from={from}&to={to}"
        ));
        let clicks: i64 = body["points"]
            .as_array()
            .expect("points")
            .iter()
            .map(|p| p["clicks"].as_i64().expect("clicks"))
            .sum();
        let expected: i64 = want
            .iter()
            .filter(|((ad, _), _)| campaign_of(*ad) == campaign)
            .map(|(_, v)| v.0)
            .sum();
        assert_eq!(clicks, expected, "campaign {campaign}");
    }
    let r = d.get(ADMIN, "/v1/ads/1");
    assert_eq!(r.status(), 200);
}

#[test]
fn bad_rows_stop_the_import_with_their_line_or_are_skipped_and_counted() {
    let rows = workload(9, 2_000, 2, 0);
    let d = Deployment::new();
    let csv = d.dir.path().join("clicks.csv");
    // Line 1 is the header, so row i is on line i + 2, and a bad line before row i shifts it.
    let bad = [
        (100, "100,5,7,101,1,not-an-ip,1700000000000"),
        (500, "500,5,seven,101,1,10.0.0.1,1700000000000"),
        (900, "900,5,7,101"),
    ];
    write_csv(&csv, &rows, &bad);

    let out = d.import(&csv, &[]);
    assert!(
        !out.status.success(),
        "a bad row stops the import\n{}",
        text(&out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("line 102") && stderr.contains("ip"),
        "names the line and the column\n{}",
        text(&out)
    );
    let before = log_records(&d.data_dir(), 0).len();
    assert_eq!(
        before, 100,
        "rows before the bad one are imported, none after"
    );
    assert!(
        stderr.contains("100 clicks before it were imported"),
        "{}",
        text(&out)
    );

    let out = d.import(&csv, &["--on-bad-row", "skip", "--dry-run"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        log_records(&d.data_dir(), 0).len(),
        before,
        "a dry run appends nothing"
    );

    let out = d.import(&csv, &["--on-bad-row", "skip"]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "{} rows, {} clicks imported, 3 bad rows skipped",
            rows.len() + 3,
            rows.len()
        )),
        "{}",
        text(&out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    for line in ["line 102", "line 503", "line 904"] {
        assert!(stderr.contains(line), "{line} reported\n{}", text(&out));
    }
    assert_eq!(log_records(&d.data_dir(), 0).len(), before + rows.len());

    // A file without the columns is refused before anything is read.
    let wrong = d.dir.path().join("wrong.csv");
    std::fs::write(&wrong, "id,ad,ts\n1,2,3\n").expect("write");
    let out = d.import(&wrong, &[]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no column \"click_id\""),
        "{}",
        text(&out)
    );
}
