//! Acceptance of issue 7 (the raw click archive): through the real `clickagg serve` and
//! `clickagg archive` / `reconcile` binaries on the embedded log and SQLite store.
//!
//! 1. After a randomised run with SIGKILLs of `serve` (whose archiver runs inside it) and
//!    of a standalone `clickagg archive`, the archive holds every logged click and verdict
//!    exactly once: count and checksum per partition equal the log's.
//! 2. `reconcile` reports 0 differences on a clean run, finds exactly the 3 rows the test
//!    corrupts in the store, and `--fix` restores them (the API equals the oracle again).
//! 3. DuckDB (PyPI `duckdb`) reads the archive as it is, and its totals equal the oracle's.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::compare::{assert_matches_oracle, span, wait_counted};
use common::workload::{Chaos, Driver, WorkloadSpec};
use common::{Server, TestTimes};
use rand::{RngExt, SeedableRng};

const ARCHIVE_CONFIG: &str = "[archive]\nflush_interval = \"300ms\"\nmax_records_per_file = 3000\n";

fn config_path(server: &Server) -> PathBuf {
    server.dir.path().join("clickagg.toml")
}

/// Runs `clickagg <args>` against the server's config and data directory, to completion.
fn clickagg(server: &Server, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_clickagg"))
        .args(args)
        .arg("--config")
        .arg(config_path(server))
        .env("CLICKAGG_DATA_DIR", server.data_dir())
        .env("RUST_LOG", "info")
        .current_dir(server.dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run clickagg {args:?}: {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A checksum of one record that does not depend on order: summed per partition.
fn record_hash(partition: u32, offset: u64, key: &str, time: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in format!("{partition}|{offset}|{key}|{time}").bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Per partition of a topic: (records, summed hash, every offset).
type Tally = BTreeMap<u32, (u64, u64, Vec<u64>)>;

fn tally(entries: impl Iterator<Item = (u32, u64, String, u64)>) -> Tally {
    let mut out = Tally::new();
    for (p, offset, key, time) in entries {
        let e = out.entry(p).or_default();
        e.0 += 1;
        e.1 = e.1.wrapping_add(record_hash(p, offset, &key, time));
        e.2.push(offset);
    }
    out
}

/// The log's clicks (topic 0) or verdicts (topic 1), read straight from `log.db`.
fn log_tally(data_dir: &Path, topic: u8) -> Tally {
    use clickagg::record::{ClickEvent, FraudVerdict, Payload, impression_hex};
    let rows: Vec<(u32, u64, Vec<u8>)> = common::log_rows(data_dir, topic)
        .into_iter()
        .map(|(partition, offset, _, payload)| (partition, offset, payload))
        .collect();
    tally(rows.into_iter().map(|(p, offset, payload)| {
        if topic == 0 {
            let c = ClickEvent::decode(&payload).expect("click decodes");
            (
                p,
                offset,
                format!("{}|{}", impression_hex(c.impression_id), c.click_id),
                c.event_time_ms,
            )
        } else {
            let v = FraudVerdict::decode(&payload).expect("verdict decodes");
            (p, offset, impression_hex(v.impression_id), 0)
        }
    }))
}

/// Every `.parquet` file under a directory.
fn parquet_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries {
        let path = e.expect("dir entry").path();
        if path.is_dir() {
            out.extend(parquet_files(&path));
        } else if path.extension().is_some_and(|x| x == "parquet") {
            out.push(path);
        }
    }
    out
}

/// The archive's clicks or verdicts, read file by file from Parquet.
fn archive_tally(archive: &Path, topic: u8) -> Tally {
    use clickagg::archive::parquet::{read_clicks, read_verdicts};
    use clickagg::record::impression_hex;
    let dir = archive.join(if topic == 0 { "clicks" } else { "verdicts" });
    let mut entries = Vec::new();
    for f in parquet_files(&dir) {
        let bytes = bytes::Bytes::from(std::fs::read(&f).expect("read parquet"));
        if topic == 0 {
            for c in read_clicks(bytes).expect("clicks parquet") {
                entries.push((
                    c.partition,
                    c.offset,
                    format!(
                        "{}|{}",
                        impression_hex(c.event.impression_id),
                        c.event.click_id
                    ),
                    c.event.event_time_ms,
                ));
            }
        } else {
            for v in read_verdicts(bytes).expect("verdicts parquet") {
                entries.push((
                    v.partition,
                    v.offset,
                    impression_hex(v.verdict.impression_id),
                    0,
                ));
            }
        }
    }
    tally(entries.into_iter())
}

fn assert_exactly_once(data_dir: &Path) -> (u64, u64) {
    let archive = data_dir.join("archive");
    let mut totals = (0, 0);
    for topic in [0u8, 1] {
        let logged = log_tally(data_dir, topic);
        let archived = archive_tally(&archive, topic);
        for (p, (n, sum, offsets)) in &archived {
            let distinct: BTreeSet<&u64> = offsets.iter().collect();
            assert_eq!(
                distinct.len() as u64,
                *n,
                "topic {topic} partition {p}: an offset is archived twice"
            );
            let _ = sum;
        }
        let strip = |t: &Tally| -> BTreeMap<u32, (u64, u64)> {
            t.iter().map(|(p, (n, s, _))| (*p, (*n, *s))).collect()
        };
        assert_eq!(
            strip(&archived),
            strip(&logged),
            "topic {topic}: per-partition (count, checksum) of the archive differ from the log's"
        );
        let n: u64 = logged.values().map(|v| v.0).sum();
        if topic == 0 {
            totals.0 = n;
        } else {
            totals.1 = n;
        }
    }
    totals
}

#[test]
fn archive_holds_every_logged_click_exactly_once_across_sigkills() {
    let mut server = Server::start_configured(TestTimes::default(), 2, ARCHIVE_CONFIG);
    let seed = 31 + std::process::id() as u64 % 1000;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut kills = BTreeSet::new();
    while kills.len() < 3 {
        kills.insert(rng.random_range(40..140u64));
    }
    eprintln!("seed {seed}, serve SIGKILLed before requests {kills:?}");
    let spec = WorkloadSpec {
        seed,
        impressions_per_phase: 12_000,
        batch_size: 500,
        redirects: 0,
        duplicates_stay_in_minute: false,
    };
    let mut driver = Driver::new(
        &mut server,
        seed,
        Some(Chaos {
            kill_at_requests: kills,
            kills: 0,
        }),
    );
    let (oracle, last_ack) = common::workload::run(&mut driver, &spec, |_, _, _| {});
    let kills = driver.chaos.as_ref().map(|c| c.kills).unwrap_or(0);
    assert_eq!(kills, 3, "three SIGKILLs of serve");
    server.restart();
    wait_counted(&server, &oracle, last_ack);
    // Let the in-serve archiver work a little, then kill it mid-flight once more.
    std::thread::sleep(Duration::from_millis(rng.random_range(100..1200)));
    server.kill();

    // A standalone archiver over the (now still) log, SIGKILLed at random moments.
    for round in 0..3 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_clickagg"))
            .args(["archive", "--config"])
            .arg(config_path(&server))
            .env("CLICKAGG_DATA_DIR", server.data_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn clickagg archive");
        let ms = rng.random_range(30..600);
        std::thread::sleep(Duration::from_millis(ms));
        child.kill().expect("SIGKILL the archiver");
        let _ = child.wait();
        eprintln!("standalone archiver {round} SIGKILLed after {ms} ms");
    }
    let out = clickagg(&server, &["archive", "--once"]);
    assert!(
        out.status.success(),
        "archive --once failed: {}",
        text(&out)
    );

    let (clicks, verdicts) = assert_exactly_once(&server.data_dir());
    assert!(
        clicks as usize >= oracle.clicks.len(),
        "every acknowledged click is logged"
    );
    eprintln!(
        "archive == log exactly once: {clicks} clicks, {verdicts} verdicts, {} files",
        parquet_files(&server.data_dir().join("archive")).len()
    );
}

fn corrupt_rows(store: &Path, n: usize) -> Vec<(u64, u64)> {
    let conn = rusqlite::Connection::open(store).expect("open store.db");
    conn.busy_timeout(Duration::from_secs(10))
        .expect("busy timeout");
    let picked: Vec<(u64, u64)> = conn
        .prepare("SELECT ad_id, window_start FROM v_ad_clicks WHERE clicks > 2 ORDER BY window_start DESC, ad_id LIMIT ?1")
        .expect("prepare")
        .query_map([n as i64], |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)))
        .expect("query")
        .map(|r| r.expect("row"))
        .collect();
    assert_eq!(picked.len(), n);
    for (i, (ad, w)) in picked.iter().enumerate() {
        // Three kinds of damage: clicks, spend, fraud.
        let sql = match i {
            0 => {
                "UPDATE v_ad_clicks SET clicks = clicks + 5 WHERE ad_id = ?1 AND window_start = ?2"
            }
            1 => {
                "UPDATE v_ad_clicks SET spend_micros = spend_micros - 1000 WHERE ad_id = ?1 AND window_start = ?2"
            }
            _ => {
                "UPDATE v_ad_clicks SET fraud_clicks = fraud_clicks + 1, clicks = clicks - 1 WHERE ad_id = ?1 AND window_start = ?2"
            }
        };
        assert_eq!(
            conn.execute(sql, [*ad as i64, *w as i64]).expect("corrupt"),
            1
        );
    }
    picked
}

/// (ad, window start) of the rows of a discrepancy table.
fn table_rows(path: &Path) -> BTreeSet<(u64, u64)> {
    let text = std::fs::read_to_string(path).expect("discrepancy table");
    text.lines()
        .skip(1)
        .map(|l| {
            let mut f = l.split(',');
            let ad: u64 = f.next().and_then(|x| x.parse().ok()).expect("ad_id");
            let w = common::parse_rfc3339(f.next().expect("window_start"));
            (ad, w)
        })
        .collect()
}

fn duckdb(script: &str) -> String {
    let has_duckdb = || {
        Command::new("python3")
            .args(["-c", "import duckdb"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    // Installed on first use, like the test broker, so `cargo test --release` works on a
    // new machine; PyPI is reachable there.
    if !has_duckdb() {
        let _ = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "duckdb"])
            .status();
    }
    assert!(
        has_duckdb(),
        "this test needs DuckDB for Python and could not install it: `python3 -m pip install duckdb`"
    );
    let out = Command::new("python3")
        .args(["-c", script])
        .output()
        .expect("run python3");
    assert!(out.status.success(), "duckdb script failed: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn reconcile_finds_and_fixes_corruption_and_duckdb_reads_the_archive() {
    let mut server = Server::start_configured(TestTimes::default(), 2, ARCHIVE_CONFIG);
    let spec = WorkloadSpec {
        seed: 17,
        impressions_per_phase: 12_000,
        batch_size: 500,
        redirects: 100,
        duplicates_stay_in_minute: false,
    };
    let mut driver = Driver::new(&mut server, spec.seed, None);
    let (oracle, last_ack) = common::workload::run(&mut driver, &spec, |d, oracle, last_ack| {
        wait_counted(d.server, oracle, last_ack);
    });
    wait_counted(&server, &oracle, last_ack);
    assert_matches_oracle(&server, &oracle);
    let (from, to) = span(&oracle);
    let (from, to) = (from.to_string(), to.to_string());
    let table = server.dir.path().join("discrepancies.csv");
    let table_arg = table.display().to_string();
    let reconcile = |extra: &[&str]| {
        let mut args = vec![
            "reconcile",
            "--from",
            &from,
            "--to",
            &to,
            "--table",
            &table_arg,
        ];
        args.extend_from_slice(extra);
        clickagg(&server, &args)
    };

    // 2a. A clean run: no differences, exit 0.
    let clean = reconcile(&[]);
    let clean_text = text(&clean);
    assert!(clean.status.success(), "clean reconcile: {clean_text}");
    assert!(clean_text.contains("differing 0"), "{clean_text}");
    assert!(table_rows(&table).is_empty());
    eprintln!("{}", String::from_utf8_lossy(&clean.stdout));

    // 2b. Three rows corrupted directly in the store: exactly those three are found.
    let corrupted: BTreeSet<(u64, u64)> = corrupt_rows(&server.data_dir().join("store.db"), 3)
        .into_iter()
        .collect();
    let found = reconcile(&[]);
    assert_eq!(
        found.status.code(),
        Some(2),
        "differences exit 2: {}",
        text(&found)
    );
    assert!(text(&found).contains("differing 3"), "{}", text(&found));
    assert_eq!(
        table_rows(&table),
        corrupted,
        "the discrepancy table names exactly the corrupted rows"
    );

    // 2c. --fix restores them in one transaction and records adjustments.
    let fixed = reconcile(&["--fix"]);
    assert!(fixed.status.success(), "fix: {}", text(&fixed));
    assert!(text(&fixed).contains("fixed 3"), "{}", text(&fixed));
    let again = reconcile(&[]);
    assert!(
        again.status.success() && text(&again).contains("differing 0"),
        "{}",
        text(&again)
    );
    assert_matches_oracle(&server, &oracle);
    let conn = rusqlite::Connection::open(server.data_dir().join("store.db")).expect("store");
    let recorded: i64 = conn
        .query_row("SELECT count(*) FROM reconcile_adjustments", [], |r| {
            r.get(0)
        })
        .expect("adjustments");
    assert_eq!(recorded, 3);

    // 3. DuckDB reads the archive as it is; its totals equal the oracle's.
    server.kill();
    let out = clickagg(&server, &["archive", "--once"]);
    assert!(out.status.success(), "archive --once: {}", text(&out));
    let archive = server.data_dir().join("archive");
    let script = format!(
        "import duckdb\n\
         c = duckdb.connect()\n\
         g = '{dir}/clicks/*/*/*.parquet'\n\
         n, imps, cpc = c.execute(\"SELECT count(*), count(DISTINCT impression_id), sum(cpc_micros) FROM read_parquet(?, hive_partitioning = true)\", [g]).fetchone()\n\
         print('totals', n, imps, cpc)\n\
         for ad, k in c.execute(\"SELECT ad_id, count(*) FROM read_parquet(?, hive_partitioning = true) GROUP BY ad_id ORDER BY ad_id\", [g]).fetchall():\n    print('ad', ad, k)\n\
         v = c.execute(\"SELECT count(DISTINCT impression_id) FROM read_parquet(?)\", ['{dir}/verdicts/*/*/*.parquet']).fetchone()[0]\n\
         print('verdicts', v)\n",
        dir = archive.display()
    );
    let answer = duckdb(&script);
    let mut per_ad: BTreeMap<u64, u64> = BTreeMap::new();
    for c in &oracle.clicks {
        *per_ad.entry(c.ad).or_default() += 1;
    }
    let cpc: u64 = oracle.clicks.iter().map(|c| c.cpc_micros).sum();
    let mut expected = format!(
        "totals {} {} {}\n",
        oracle.clicks.len(),
        oracle.counted().len(),
        cpc
    );
    for (ad, k) in &per_ad {
        expected.push_str(&format!("ad {ad} {k}\n"));
    }
    expected.push_str(&format!("verdicts {}\n", oracle.verdicts.len()));
    assert_eq!(
        answer, expected,
        "DuckDB's totals over the archive equal the oracle's"
    );
    eprintln!("duckdb: {}", answer.lines().next().unwrap_or_default());
}
