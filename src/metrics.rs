//! Prometheus metrics, one registry per process, rendered at `GET /metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

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
    /// Updates waiting in arrangement batchers for their time to come (mostly the
    /// horizon's expiry retractions), over all workers.
    pub arrangement_batcher_records: Gauge,
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
            "arrangement_batcher_records",
            "Updates waiting in arrangement batchers for their time (expiry retractions), all workers",
            m.arrangement_batcher_records.clone(),
        );
        Metrics { registry, ..m }
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
