//! `clickagg reconcile`: re-aggregates the raw click archive in a plain batch computation
//! and compares it with the store per (ad, minute).
//!
//! This is the independent path billing trusts, so it shares no code with `src/dataflow`
//! or `dataflows/`: it is ordinary Rust over the archived records, written from the rules
//! in `docs/design-notes.md` (classification, finality). It evaluates the rules *as of*
//! the store's committed frontier C, read in the same snapshot as the rows: a record
//! counts when its timely time (record time rounded up to a tick) is before C, and a
//! verdict moves a click only if it came before the click's minute was final, because the
//! sink freezes final windows.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::archive::parquet::{ArchivedClick, ArchivedVerdict, read_clicks, read_verdicts};
use crate::archive::{Archive, ArchiveError, TOPICS};
use crate::config::Config;
use crate::record::{PartitionId, Topic};
use crate::store::{AdWindow, Measures, Store, StoreError, WindowCorrection};
use crate::time::{Millis, now_ms, rfc3339};

/// What went wrong in a reconciliation.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The archive failed.
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The archive does not yet hold everything the store counted.
    #[error(
        "the archive is behind the store: {partition} is archived through {archived} but the store's frontier is {frontier}; run `clickagg archive` (or wait for serve's archiver) and try again"
    )]
    ArchiveBehind {
        /// The lagging partition.
        partition: PartitionId,
        /// Its coverage.
        archived: String,
        /// The store's frontier.
        frontier: String,
    },
    /// The discrepancy table could not be written.
    #[error("cannot write {path}: {source}")]
    Table {
        /// Where.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The rules of the batch computation, from the config.
#[derive(Clone, Copy, Debug)]
pub struct Rules {
    /// Tick in ms (timely time = record time rounded up to it).
    pub tick_ms: u64,
    /// Impression TTL in ms.
    pub ttl_ms: u64,
    /// Allowed lateness in ms.
    pub lateness_ms: u64,
    /// Correction window in ms.
    pub correction_ms: u64,
    /// More counted clicks than this per IP and second are fraud.
    pub max_per_ip_second: u64,
}

impl Rules {
    /// The rules a config runs with.
    pub fn of(config: &Config) -> Rules {
        Rules {
            tick_ms: (config.time.tick.as_millis() as u64).max(1),
            ttl_ms: config.time.impression_ttl.as_millis() as u64,
            lateness_ms: config.time.allowed_lateness.as_millis() as u64,
            correction_ms: config.time.correction_window.as_millis() as u64,
            max_per_ip_second: config.fraud.max_clicks_per_ip_per_second,
        }
    }

    fn timely(&self, record_ms: Millis) -> u64 {
        record_ms.div_ceil(self.tick_ms) * self.tick_ms
    }

    /// When a minute starting at `w` is final (the sink stores no change from then on).
    fn minute_final_at(&self, w: Millis) -> u64 {
        w + 60_000 + self.ttl_ms + self.correction_ms
    }
}

/// Measures per (ad, minute) of the archived records, as of timely time `as_of`.
pub fn aggregate(
    clicks: &[ArchivedClick],
    verdicts: &[ArchivedVerdict],
    rules: &Rules,
    as_of: u64,
) -> BTreeMap<(u64, Millis), Measures> {
    // A click as the rules see it: event time clamped into [record - TTL, record].
    struct Seen<'a> {
        ad: u64,
        event: Millis,
        on_time: bool,
        click_id: &'a str,
        ip: IpAddr,
        cpc: i64,
    }
    let mut by_impression: HashMap<u128, Vec<Seen<'_>>> = HashMap::new();
    for c in clicks {
        if rules.timely(c.record_time_ms) >= as_of {
            continue;
        }
        let r = c.record_time_ms;
        let event = c
            .event
            .event_time_ms
            .clamp(r.saturating_sub(rules.ttl_ms), r);
        by_impression
            .entry(c.event.impression_id)
            .or_default()
            .push(Seen {
                ad: c.event.ad_id,
                event,
                on_time: r - event <= rules.lateness_ms,
                click_id: &c.event.click_id,
                ip: c.event.ip,
                cpc: c.event.cpc_micros as i64,
            });
    }
    // One click per impression: the earliest on-time one by (event time, click id), else
    // the earliest late one.
    let mut winners: Vec<(u128, Seen<'_>)> = Vec::with_capacity(by_impression.len());
    for (imp, copies) in by_impression {
        let on_time = copies.iter().any(|s| s.on_time);
        if let Some(w) = copies
            .into_iter()
            .filter(|s| s.on_time == on_time)
            .min_by(|a, b| (a.event, a.click_id).cmp(&(b.event, b.click_id)))
        {
            winners.push((imp, w));
        }
    }
    // IP bursts among the counted on-time clicks: the whole group is fraud.
    let mut per_ip_second: HashMap<(IpAddr, u64), u64> = HashMap::new();
    for (_, w) in winners.iter().filter(|(_, w)| w.on_time) {
        *per_ip_second.entry((w.ip, w.event / 1000)).or_default() += 1;
    }
    // The first verdict of each impression, by timely time.
    let mut first_verdict: HashMap<u128, u64> = HashMap::new();
    for v in verdicts {
        let t = rules.timely(v.record_time_ms);
        if t >= as_of {
            continue;
        }
        let e = first_verdict.entry(v.verdict.impression_id).or_insert(t);
        *e = (*e).min(t);
    }
    let mut out: BTreeMap<(u64, Millis), Measures> = BTreeMap::new();
    for (imp, w) in winners {
        let minute = w.event - w.event % 60_000;
        let m = out.entry((w.ad, minute)).or_default();
        if !w.on_time {
            m.late_clicks += 1;
            continue;
        }
        let burst = per_ip_second
            .get(&(w.ip, w.event / 1000))
            .is_some_and(|n| *n > rules.max_per_ip_second);
        // A verdict from the minute's final_at on is a billing adjustment, not a change.
        let verdict = first_verdict
            .get(&imp)
            .is_some_and(|t| *t < rules.minute_final_at(minute));
        if burst || verdict {
            m.fraud_clicks += 1;
        } else {
            m.clicks += 1;
            m.spend_micros += w.cpc;
        }
    }
    out
}

/// Options of one reconciliation.
#[derive(Clone, Debug)]
pub struct ReconcileOptions {
    /// First minute compared (inclusive).
    pub from: Millis,
    /// End of the compared minutes (exclusive).
    pub to: Millis,
    /// Write corrections into the store.
    pub fix: bool,
    /// Where the discrepancy table goes (CSV).
    pub table: PathBuf,
    /// How long to wait for the archive to catch up with the store.
    pub wait: Duration,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
}

/// One (ad, minute) where the archive and the store disagree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Discrepancy {
    /// The ad.
    pub ad_id: u64,
    /// The minute.
    pub window_start: Millis,
    /// What the store holds (`None`: no row).
    pub store: Option<Measures>,
    /// What the archive re-aggregates to.
    pub archive: Measures,
}

/// What a reconciliation found.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    /// The store frontier compared as of.
    pub as_of: u64,
    /// Raw clicks and verdicts read from the archive.
    pub clicks_read: usize,
    /// Verdicts read.
    pub verdicts_read: usize,
    /// (ad, minute) windows compared.
    pub windows: usize,
    /// Equal windows.
    pub equal: usize,
    /// The differing windows.
    pub differing: Vec<Discrepancy>,
    /// Sum of |billable clicks difference| over the differing windows.
    pub clicks_off: i64,
    /// Corrections written (with `fix`).
    pub fixed: usize,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "as of {}: {} clicks and {} verdicts re-aggregated; windows compared {}, equal {}, differing {}, clicks off {}, fixed {}",
            rfc3339(self.as_of),
            self.clicks_read,
            self.verdicts_read,
            self.windows,
            self.equal,
            self.differing.len(),
            self.clicks_off,
            self.fixed
        )
    }
}

/// Runs a reconciliation of `[from, to)` between the archive and the store.
pub async fn run(
    config: &Config,
    archive: &Archive,
    store: Arc<dyn Store>,
    options: &ReconcileOptions,
) -> Result<Summary, ReconcileError> {
    let rules = Rules::of(config);
    let (from, to) = (options.from - options.from % 60_000, options.to);
    let s = Arc::clone(&store);
    let (frontier, rows) = tokio::task::spawn_blocking(move || s.ad_click_windows(from, to))
        .await
        .map_err(ArchiveError::from)??;
    let as_of = frontier.unwrap_or(0);
    tracing::info!(as_of = %rfc3339(as_of), rows = rows.len(), "store snapshot read");
    wait_for_archive(config, archive, as_of, options.wait).await?;

    // Clicks that can land in [from, to), their impressions' other copies (one TTL apart
    // at most) and verdicts up to the minutes' final_at; a margin of an hour each side.
    let lo = from.saturating_sub(2 * rules.ttl_ms + rules.lateness_ms + 3_600_000);
    let hi = to + 2 * rules.ttl_ms + rules.correction_ms + 2 * 3_600_000;
    let files: Vec<_> = archive
        .files()
        .await?
        .into_iter()
        .filter(|f| f.hour_ms + 3_600_000 > lo && f.hour_ms < hi)
        .collect();
    let bar = progress_bar(options.progress, files.len() as u64);
    let mut clicks = Vec::new();
    let mut verdicts = Vec::new();
    let started = Instant::now();
    for (i, f) in files.iter().enumerate() {
        let Some(bytes) = archive.get(&f.path).await? else {
            continue;
        };
        let topic = f.topic;
        let decoded = tokio::task::spawn_blocking(move || match topic {
            Topic::Clicks => read_clicks(bytes).map(|c| (c, Vec::new())),
            _ => read_verdicts(bytes).map(|v| (Vec::new(), v)),
        })
        .await
        .map_err(ArchiveError::from)??;
        clicks.extend(decoded.0);
        verdicts.extend(decoded.1);
        bar.inc(1);
        if !options.progress && (i + 1) % 500 == 0 {
            tracing::info!(files = i + 1, of = files.len(), "reading the archive");
        }
    }
    bar.finish_and_clear();
    tracing::info!(files = files.len(), clicks = clicks.len(), verdicts = verdicts.len(), elapsed = ?started.elapsed(), "archive read");

    let (clicks_read, verdicts_read) = (clicks.len(), verdicts.len());
    let batch = tokio::task::spawn_blocking(move || aggregate(&clicks, &verdicts, &rules, as_of))
        .await
        .map_err(ArchiveError::from)?;
    let stored: BTreeMap<(u64, Millis), AdWindow> = rows
        .into_iter()
        .map(|r| ((r.ad_id, r.window_start), r))
        .collect();
    let mut keys: Vec<(u64, Millis)> = batch
        .keys()
        .filter(|(_, w)| *w >= from && *w < to)
        .chain(stored.keys())
        .copied()
        .collect();
    keys.sort_unstable();
    keys.dedup();
    let mut summary = Summary {
        as_of,
        clicks_read,
        verdicts_read,
        windows: keys.len(),
        ..Summary::default()
    };
    for key in keys {
        let archived = batch.get(&key).copied().unwrap_or_default();
        let held = stored.get(&key).map(|r| r.measures);
        if held.unwrap_or_default() == archived {
            summary.equal += 1;
        } else {
            summary.clicks_off += (held.unwrap_or_default().clicks - archived.clicks).abs();
            summary.differing.push(Discrepancy {
                ad_id: key.0,
                window_start: key.1,
                store: held,
                archive: archived,
            });
        }
    }
    write_table(&options.table, &summary.differing)?;

    if options.fix && !summary.differing.is_empty() {
        let mut fixes = Vec::with_capacity(summary.differing.len());
        for d in &summary.differing {
            let (campaign_id, advertiser_id) = match stored.get(&(d.ad_id, d.window_start)) {
                Some(r) => (r.campaign_id, r.advertiser_id),
                None => {
                    let s = Arc::clone(&store);
                    let ad = d.ad_id;
                    let found = tokio::task::spawn_blocking(move || s.ad(ad))
                        .await
                        .map_err(ArchiveError::from)??;
                    let ad =
                        found.ok_or_else(|| StoreError::NotFound(format!("ad {}", d.ad_id)))?;
                    (ad.campaign_id, ad.advertiser_id)
                }
            };
            fixes.push(WindowCorrection {
                ad_id: d.ad_id,
                window_start: d.window_start,
                campaign_id,
                advertiser_id,
                expected: d.store,
                corrected: d.archive,
            });
        }
        let run_id = format!("reconcile-{}", now_ms());
        let n = fixes.len();
        tokio::task::spawn_blocking(move || store.apply_corrections(&run_id, now_ms(), &fixes))
            .await
            .map_err(ArchiveError::from)??;
        summary.fixed = n;
    }
    Ok(summary)
}

fn progress_bar(show: bool, len: u64) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "reading archive {bar:40} {pos}/{len} files ({elapsed})",
    ) {
        bar.set_style(style);
    }
    bar
}

/// Waits until every partition's archive covers the store's frontier.
async fn wait_for_archive(
    config: &Config,
    archive: &Archive,
    frontier: u64,
    wait: Duration,
) -> Result<(), ReconcileError> {
    let started = Instant::now();
    loop {
        let files = archive.files().await?;
        let mut behind = None;
        for (topic, _) in TOPICS {
            let n = match topic {
                Topic::Clicks => config.log.click_partitions,
                _ => config.log.verdict_partitions,
            };
            for partition in 0..n {
                let p = PartitionId { topic, partition };
                let covered = archive
                    .progress(p, &files)
                    .await?
                    .map_or(0, |g| g.covered_through_ms);
                if covered < frontier {
                    behind = Some((p, covered));
                }
            }
        }
        let Some((partition, covered)) = behind else {
            return Ok(());
        };
        if started.elapsed() >= wait {
            return Err(ReconcileError::ArchiveBehind {
                partition,
                archived: rfc3339(covered),
                frontier: rfc3339(frontier),
            });
        }
        tracing::info!(%partition, archived = %rfc3339(covered), frontier = %rfc3339(frontier), "waiting for the archive to catch up");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Writes the discrepancy table as CSV (written whole to a temp file, then renamed).
fn write_table(path: &std::path::Path, rows: &[Discrepancy]) -> Result<(), ReconcileError> {
    let fail = |source| ReconcileError::Table {
        path: path.to_owned(),
        source,
    };
    let mut text = String::from(
        "ad_id,window_start,store_clicks,archive_clicks,store_fraud_clicks,archive_fraud_clicks,store_late_clicks,archive_late_clicks,store_spend_micros,archive_spend_micros,store_row\n",
    );
    for d in rows {
        let s = d.store.unwrap_or_default();
        let a = d.archive;
        text.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{},{}\n",
            d.ad_id,
            rfc3339(d.window_start),
            s.clicks,
            a.clicks,
            s.fraud_clicks,
            a.fraud_clicks,
            s.late_clicks,
            a.late_clicks,
            s.spend_micros,
            a.spend_micros,
            if d.store.is_some() {
                "present"
            } else {
                "missing"
            }
        ));
    }
    let tmp = path.with_extension("csv.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(fail)?;
    f.write_all(text.as_bytes()).map_err(fail)?;
    f.sync_all().map_err(fail)?;
    std::fs::rename(&tmp, path).map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{ClickEvent, FraudVerdict};

    fn click(imp: u128, offset: u64, record: u64, event: u64, id: &str, ip: &str) -> ArchivedClick {
        ArchivedClick {
            partition: 0,
            offset,
            record_time_ms: record,
            event: ClickEvent {
                impression_id: imp,
                ad_id: 1,
                issued_at_ms: 0,
                event_time_ms: event,
                click_id: id.into(),
                user_id: "u".into(),
                ip: ip.parse().expect("ip"),
                cpc_micros: 10,
            },
        }
    }

    #[test]
    fn dedup_lateness_verdicts_and_finality() {
        let rules = Rules {
            tick_ms: 100,
            ttl_ms: 600_000,
            lateness_ms: 120_000,
            correction_ms: 60_000,
            max_per_ip_second: 5,
        };
        let base = 1_764_000_000_000; // a minute boundary
        let clicks = vec![
            // Impression 1: a duplicate with an earlier event time wins, in the earlier minute.
            click(1, 0, base + 70_000, base + 65_000, "b", "10.0.0.1"),
            click(1, 1, base + 71_000, base + 5_000, "a", "10.0.0.1"),
            // Impression 2: late (record - event > lateness).
            click(2, 2, base + 200_000, base + 1_000, "c", "10.0.0.2"),
            // Impression 3: billable, then a verdict after its minute is final.
            click(3, 3, base + 10_000, base + 10_000, "d", "10.0.0.3"),
            // Impression 4: a verdict before final: fraud.
            click(4, 4, base + 20_000, base + 20_000, "e", "10.0.0.4"),
        ];
        let verdicts = vec![
            ArchivedVerdict {
                partition: 0,
                offset: 0,
                record_time_ms: base + 60_000 + 600_000 + 60_000 + 1,
                verdict: FraudVerdict {
                    impression_id: 3,
                    reason: "x".into(),
                },
            },
            ArchivedVerdict {
                partition: 0,
                offset: 1,
                record_time_ms: base + 30_000,
                verdict: FraudVerdict {
                    impression_id: 4,
                    reason: "x".into(),
                },
            },
        ];
        let out = aggregate(&clicks, &verdicts, &rules, u64::MAX);
        let m = out[&(1, base)];
        assert_eq!(
            (m.clicks, m.fraud_clicks, m.late_clicks, m.spend_micros),
            (2, 1, 1, 20)
        );
        assert!(
            !out.contains_key(&(1, base + 60_000)),
            "the duplicate moved the click"
        );
        // As of before the duplicate arrived, the first copy counts in its own minute.
        let early = aggregate(&clicks, &verdicts, &rules, base + 70_100);
        assert_eq!(early[&(1, base + 60_000)].clicks, 1);
    }
}
