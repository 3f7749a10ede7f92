//! Issue 6, acceptance 1: after a known workload through the real `clickagg serve`,
//! `/metrics` holds exactly the accepted, rejected, duplicate (dedup drops), fraud and late
//! counts that an independent oracle computes from what the test sent; after a SIGKILL
//! and restart, replaying the log counts nothing twice.

mod common;

use std::time::{Duration, Instant};

use common::compare::{assert_matches_oracle, wait_counted};
use common::oracle::Class;
use common::workload::{Driver, WorkloadSpec};
use common::{Server, Target, TestTimes, metric};
use serde_json::json;

/// Polls `/metrics` until `expected` holds (the counters move right after the commit the
/// API already shows), then asserts every value exactly.
fn assert_metrics(server: &Server, expected: &[(&str, &str, f64)]) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = server.metrics();
        let all = expected
            .iter()
            .all(|(name, label, want)| metric(&text, name, label) == *want);
        if all || Instant::now() > deadline {
            for (name, label, want) in expected {
                assert_eq!(
                    metric(&text, name, label),
                    *want,
                    "{name}{{{label}}} in /metrics:\n{}",
                    text.lines()
                        .filter(|l| l.starts_with("clickagg_") && !l.contains("_bucket"))
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
            return text;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn metrics_equal_the_oracle_and_survive_a_restart() {
    let mut server = Server::start(TestTimes::default());
    let spec = WorkloadSpec {
        seed: 23,
        impressions_per_phase: 3_000,
        batch_size: 250,
        redirects: 10,
        duplicates_stay_in_minute: false,
    };
    let mut driver = Driver::new(&mut server, spec.seed, None);
    let (oracle, last_ack) = common::workload::run(&mut driver, &spec, |_, _, _| {});
    assert_eq!(driver.retries, 0, "no request may be retried in this test");

    // Clicks the tracker must refuse: 7 with a forged token, 3 with a malformed IP.
    let imp = server.impressions(oracle.ads.keys().copied().next().expect("an ad"), 1);
    let mut bad: Vec<serde_json::Value> = (0..7)
        .map(|i| json!({"token": format!("forged-{i}"), "ip": "10.9.9.9"}))
        .collect();
    bad.extend((0..3).map(|_| json!({"token": imp[0].1, "ip": "not-an-ip"})));
    let r = server.send(reqwest::Method::POST, "", "/v1/clicks", &json!(bad));
    assert_eq!(r.status(), 202);
    let body: serde_json::Value = r.json().expect("json");
    assert_eq!(body["accepted"], 0, "{body}");

    wait_counted(&server, &oracle, last_ack);
    assert_matches_oracle(&server, &oracle);

    // The oracle's numbers, from what was sent and acknowledged (shares no code with
    // the server).
    let counted = oracle.counted();
    let classes = oracle.class_counts();
    let sent = oracle.clicks.len() as f64;
    let duplicates = (oracle.clicks.len() - counted.len()) as f64;
    let of = |c| classes.get(&c).copied().unwrap_or(0) as f64;
    for c in [Class::Billable, Class::Fraud, Class::Late] {
        assert!(
            of(c) > 10.0,
            "the workload has few {c:?} clicks: {classes:?}"
        );
    }
    assert!(duplicates > 100.0, "only {duplicates} duplicates");
    eprintln!(
        "sent {sent} clicks: {duplicates} duplicates, {classes:?}; rejected 7 bad_token, 3 invalid_ip"
    );
    let text = assert_metrics(
        &server,
        &[
            ("clickagg_clicks_accepted_total", "", sent),
            (
                "clickagg_clicks_rejected_total",
                "reason=\"bad_token\"",
                7.0,
            ),
            (
                "clickagg_clicks_rejected_total",
                "reason=\"invalid_ip\"",
                3.0,
            ),
            ("clickagg_dataflow_clicks_total", "", sent),
            ("clickagg_dedup_dropped_clicks_total", "", duplicates),
            (
                "clickagg_classified_clicks",
                "class=\"billable\"",
                of(Class::Billable),
            ),
            (
                "clickagg_classified_clicks",
                "class=\"fraud\"",
                of(Class::Fraud),
            ),
            (
                "clickagg_classified_clicks",
                "class=\"late\"",
                of(Class::Late),
            ),
        ],
    );
    // The rest of the catalogue is there and sane.
    for name in [
        "clickagg_log_append_seconds_count",
        "clickagg_sink_commits_total",
        "clickagg_sink_rows_total",
        "clickagg_sink_commit_seconds_count",
        "clickagg_http_request_seconds_count",
    ] {
        assert!(metric(&text, name, "") > 0.0, "{name} missing or 0");
    }
    let lag = metric(&text, "clickagg_frontier_lag_seconds", "");
    assert!(
        text.contains("\nclickagg_frontier_lag_seconds ") && (0.0..10.0).contains(&lag),
        "frontier lag {lag}s after catching up"
    );
    assert!(
        text.contains("clickagg_consumer_lag_records{topic=\"clicks\""),
        "no per-partition consumer lag"
    );
    assert!(
        text.contains("clickagg_record_time_lag_seconds{topic=\"clicks\""),
        "no per-partition record-time lag"
    );

    // SIGKILL and restart: the log replays from before the committed frontier, but what
    // was committed is not counted again.
    server.restart();
    let t = common::now_ms();
    let ad = *oracle.ads.keys().next().expect("an ad");
    server.wait_complete_through(ad, t, Duration::from_secs(60));
    assert_metrics(
        &server,
        &[
            ("clickagg_clicks_accepted_total", "", 0.0),
            ("clickagg_dataflow_clicks_total", "", 0.0),
            ("clickagg_dedup_dropped_clicks_total", "", 0.0),
            ("clickagg_classified_clicks", "class=\"billable\"", 0.0),
            ("clickagg_classified_clicks", "class=\"fraud\"", 0.0),
            ("clickagg_classified_clicks", "class=\"late\"", 0.0),
        ],
    );
    // New clicks after the restart count from zero: 5 impressions, one clicked twice.
    let imps = server.impressions(ad, 5);
    let now = common::now_ms();
    let clicks: Vec<serde_json::Value> = imps
        .iter()
        .chain(imps.iter().take(1))
        .enumerate()
        .map(|(i, (_, token))| {
            json!({"token": token, "event_time": now - 1_000, "ip": format!("10.200.0.{i}"),
                   "click_id": format!("after-restart-{i}")})
        })
        .collect();
    let r = server.send(reqwest::Method::POST, "", "/v1/clicks", &json!(clicks));
    assert_eq!(r.status(), 202);
    let acked = common::now_ms();
    server.wait_complete_through(ad, acked, Duration::from_secs(60));
    assert_metrics(
        &server,
        &[
            ("clickagg_clicks_accepted_total", "", 6.0),
            ("clickagg_dataflow_clicks_total", "", 6.0),
            ("clickagg_dedup_dropped_clicks_total", "", 1.0),
            ("clickagg_classified_clicks", "class=\"billable\"", 5.0),
            ("clickagg_classified_clicks", "class=\"fraud\"", 0.0),
            ("clickagg_classified_clicks", "class=\"late\"", 0.0),
        ],
    );
}
