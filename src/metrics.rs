//! Prometheus metrics, one registry per process, rendered at `GET /metrics`.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;

use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::dataflow::sink::{CLASSES, Tally};
use crate::log::LogPosition;
use crate::record::PartitionId;

/// The `reason` label of a rejection.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// The error code, as in the JSON error body.
    pub reason: String,
}

/// The labels of an answered HTTP request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// The route pattern, e.g. `/v1/ads/{ad_id}/clicks`.
    pub route: String,
    /// The status code.
    pub status: u16,
}

/// The `class` label of counted clicks: `billable`, `fraud` or `late`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabel {
    /// The class.
    pub class: String,
}

/// The labels of a log partition.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabels {
    /// The topic: `clicks`, `fraud_verdicts` or `ads`.
    pub topic: String,
    /// The partition number.
    pub partition: u32,
}

/// A gauge of seconds (fractional).
pub type SecondsGauge = Gauge<f64, AtomicU64>;

/// Every metric of a clickagg process.
pub struct Metrics {
    registry: Registry,
    /// Clicks acknowledged (durable in the log).
    pub clicks_accepted: Counter,
    /// Clicks refused, by reason.
    pub clicks_rejected: Family<ReasonLabel, Counter>,
    /// Requests answered with an error, by error code.
    pub http_errors: Family<ReasonLabel, Counter>,
    /// Requests by route and status.
    pub http_requests: Family<RouteLabels, Counter>,
    /// Request latency by route.
    pub http_request_seconds: Family<RouteLabels, Histogram>,
    /// Time from handing clicks to the log to their acknowledgement.
    pub log_append_seconds: Histogram,
    /// Impressions minted.
    pub impressions_issued: Counter,
    /// Fraud verdicts accepted.
    pub verdicts_accepted: Counter,
    /// Log records the dataflow could not decode (skipped, deterministically on replay).
    pub records_undecodable: Counter,
    /// Store transactions committed by the sink.
    pub sink_commits: Counter,
    /// Failed sink commits (retried with backoff).
    pub sink_commit_errors: Counter,
    /// Rows upserted or deleted by the sink.
    pub sink_rows: Counter,
    /// Sink commit latency.
    pub sink_commit_seconds: Histogram,
    /// The committed frontier, ms since the epoch.
    pub committed_frontier_ms: Gauge,
    /// Updates held in the dataflow's arrangements (its state), over all workers.
    pub arrangement_records: Gauge,
    /// Impressions the dedup holds a counted click for (its state, kept in place rather
    /// than in an arrangement), over all workers.
    pub dedup_impressions: Gauge,
    /// Updates the in-place operators (dedup, fraud join, IP bursts) hold back until their
    /// time is complete, over all workers.
    pub pending_updates: Gauge,
    /// Updates waiting in arrangement batchers for their time to come (mostly the
    /// horizon's expiry retractions), over all workers.
    pub arrangement_batcher_records: Gauge,
    /// Clicks read from the log and committed through the sink.
    pub dataflow_clicks: Counter,
    /// Committed clicks that dedup dropped (another click of the impression counts).
    pub dedup_dropped: Counter,
    /// Counted clicks that entered a committed window, by class.
    pub classified_added: Family<ClassLabel, Counter>,
    /// Counted clicks that left a committed window (moved or reclassified), by class.
    pub classified_removed: Family<ClassLabel, Counter>,
    /// Net counted clicks committed by this process since it started, by class.
    pub classified: Family<ClassLabel, Gauge>,
    /// Now minus the committed frontier.
    pub frontier_lag_seconds: SecondsGauge,
    /// Records in the log after the committed position, per partition.
    pub consumer_lag_records: Family<PartitionLabels, Gauge>,
    /// Now minus the record time at the committed position, while records wait behind it.
    pub record_time_lag_seconds: Family<PartitionLabels, SecondsGauge>,
    /// The committed positions, for the lag gauges (filled by the sink writer).
    committed_positions: Mutex<BTreeMap<PartitionId, LogPosition>>,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl Metrics {
    /// A registry with every metric registered.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("clickagg");
        let m = Metrics {
            clicks_accepted: Counter::default(),
            clicks_rejected: Family::default(),
            http_errors: Family::default(),
            http_requests: Family::default(),
            http_request_seconds: Family::new_with_constructor(latency_histogram),
            log_append_seconds: latency_histogram(),
            impressions_issued: Counter::default(),
            verdicts_accepted: Counter::default(),
            records_undecodable: Counter::default(),
            sink_commits: Counter::default(),
            sink_commit_errors: Counter::default(),
            sink_rows: Counter::default(),
            sink_commit_seconds: latency_histogram(),
            committed_frontier_ms: Gauge::default(),
            arrangement_records: Gauge::default(),
            arrangement_batcher_records: Gauge::default(),
            dedup_impressions: Gauge::default(),
            pending_updates: Gauge::default(),
            dataflow_clicks: Counter::default(),
            dedup_dropped: Counter::default(),
            classified_added: Family::default(),
            classified_removed: Family::default(),
            classified: Family::default(),
            frontier_lag_seconds: SecondsGauge::default(),
            consumer_lag_records: Family::default(),
            record_time_lag_seconds: Family::default(),
            committed_positions: Mutex::new(BTreeMap::new()),
            registry: Registry::default(),
        };
        registry.register(
            "clicks_accepted",
            "Clicks acknowledged after they were durable",
            m.clicks_accepted.clone(),
        );
        registry.register(
            "clicks_rejected",
            "Clicks refused, by reason",
            m.clicks_rejected.clone(),
        );
        registry.register(
            "http_errors",
            "Requests answered with an error, by error code",
            m.http_errors.clone(),
        );
        registry.register(
            "http_requests",
            "Requests by route and status",
            m.http_requests.clone(),
        );
        registry.register(
            "http_request_seconds",
            "Request latency by route and status",
            m.http_request_seconds.clone(),
        );
        registry.register(
            "log_append_seconds",
            "Log append latency until durable",
            m.log_append_seconds.clone(),
        );
        registry.register(
            "impressions_issued",
            "Impressions minted",
            m.impressions_issued.clone(),
        );
        registry.register(
            "fraud_verdicts_accepted",
            "Fraud verdicts accepted",
            m.verdicts_accepted.clone(),
        );
        registry.register(
            "log_records_undecodable",
            "Log records the dataflow could not decode and skipped",
            m.records_undecodable.clone(),
        );
        registry.register(
            "sink_commits",
            "Store transactions committed by the sink",
            m.sink_commits.clone(),
        );
        registry.register(
            "sink_commit_errors",
            "Failed sink commits, retried",
            m.sink_commit_errors.clone(),
        );
        registry.register(
            "sink_rows",
            "Rows written or deleted by the sink",
            m.sink_rows.clone(),
        );
        registry.register(
            "sink_commit_seconds",
            "Sink commit latency",
            m.sink_commit_seconds.clone(),
        );
        registry.register(
            "committed_frontier_ms",
            "The committed frontier (record time, ms since the epoch)",
            m.committed_frontier_ms.clone(),
        );
        registry.register(
            "arrangement_records",
            "Updates held in the dataflow's arrangements (its state), all workers",
            m.arrangement_records.clone(),
        );
        registry.register(
            "dedup_impressions",
            "Impressions the dedup holds a counted click for (its state), all workers",
            m.dedup_impressions.clone(),
        );
        registry.register(
            "pending_updates",
            "Updates the in-place operators hold back until their time is complete, all workers",
            m.pending_updates.clone(),
        );
        registry.register(
            "arrangement_batcher_records",
            "Updates waiting in arrangement batchers for their time (expiry retractions), all workers",
            m.arrangement_batcher_records.clone(),
        );
        registry.register(
            "dataflow_clicks",
            "Clicks read from the log and committed by the sink (each once, replays excluded)",
            m.dataflow_clicks.clone(),
        );
        registry.register(
            "dedup_dropped_clicks",
            "Committed clicks dropped by dedup: another click of the same impression counts",
            m.dedup_dropped.clone(),
        );
        registry.register(
            "classified_clicks_added",
            "Counted clicks that entered a committed ad_clicks window, by class",
            m.classified_added.clone(),
        );
        registry.register(
            "classified_clicks_removed",
            "Counted clicks that left a committed ad_clicks window (moved or reclassified), by class",
            m.classified_removed.clone(),
        );
        registry.register(
            "classified_clicks",
            "Net counted clicks committed by this process since it started (added - removed), by class",
            m.classified.clone(),
        );
        registry.register(
            "frontier_lag_seconds",
            "Now minus the committed frontier",
            m.frontier_lag_seconds.clone(),
        );
        registry.register(
            "consumer_lag_records",
            "Records in the log after the committed position, per partition",
            m.consumer_lag_records.clone(),
        );
        registry.register(
            "record_time_lag_seconds",
            "Now minus the record time at the committed position while records wait, per partition",
            m.record_time_lag_seconds.clone(),
        );
        for (class, _) in CLASSES {
            let label = ClassLabel {
                class: class.to_owned(),
            };
            // Present from the start, so a dashboard shows 0 rather than nothing.
            m.classified_added.get_or_create(&label).inc_by(0);
            m.classified_removed.get_or_create(&label).inc_by(0);
            m.classified.get_or_create(&label).set(0);
        }
        Metrics { registry, ..m }
    }

    /// Records a successful sink commit: its positions and what it changed.
    pub fn record_commit(&self, positions: &BTreeMap<PartitionId, LogPosition>, tally: &Tally) {
        self.dataflow_clicks.inc_by(tally.clicks_read);
        self.dedup_dropped.inc_by(tally.dedup_dropped());
        for (i, (class, _)) in CLASSES.iter().enumerate() {
            let label = ClassLabel {
                class: (*class).to_owned(),
            };
            self.classified_added
                .get_or_create(&label)
                .inc_by(tally.added[i]);
            self.classified_removed
                .get_or_create(&label)
                .inc_by(tally.removed[i]);
            self.classified
                .get_or_create(&label)
                .inc_by(tally.added[i] as i64 - tally.removed[i] as i64);
        }
        self.committed_positions.lock().clone_from(positions);
    }

    /// Updates the lag gauges from the log's end offsets (or, without them, only the
    /// frontier lag). Called when `/metrics` is scraped.
    pub fn refresh_lags(&self, end_offsets: Option<&[(PartitionId, u64)]>, now_ms: u64) {
        let frontier = self.committed_frontier_ms.get();
        if frontier > 0 {
            self.frontier_lag_seconds
                .set(now_ms.saturating_sub(frontier as u64) as f64 / 1000.0);
        }
        let Some(ends) = end_offsets else { return };
        let committed = self.committed_positions.lock().clone();
        if committed.is_empty() {
            // Not the committing process (or nothing committed yet): no positions to
            // measure from.
            return;
        }
        for (p, end) in ends {
            let pos = committed.get(p).copied().unwrap_or_default();
            let labels = PartitionLabels {
                topic: p.topic.name().to_owned(),
                partition: p.partition,
            };
            let behind = end.saturating_sub(pos.offset);
            self.consumer_lag_records
                .get_or_create(&labels)
                .set(behind as i64);
            let age = if behind == 0 || pos.time_floor_ms == 0 {
                0.0
            } else {
                now_ms.saturating_sub(pos.time_floor_ms) as f64 / 1000.0
            };
            self.record_time_lag_seconds.get_or_create(&labels).set(age);
        }
    }

    /// Counts a rejected click.
    pub fn reject_click(&self, reason: &str) {
        self.clicks_rejected
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
