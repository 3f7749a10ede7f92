//! Acceptance 5 of issue 4, against the real `clickagg serve` binary: a verdict that
//! arrives after a window is final leaves the window exactly as billed and produces a
//! billing adjustment row instead. The controls: a verdict before the window is final moves
//! the click to fraud in its window and adjusts nothing, and neither does a late verdict
//! for a click the IP-burst rule had already flagged, one for an impression without a
//! click, or a second one for an impression already adjusted.

mod common;

use std::time::{Duration, Instant};

use common::{ADMIN, Server, Target, TestTimes, now_ms, parse_rfc3339};
use reqwest::Method;
use serde_json::{Value, json};

const AD: u64 = 10;
const CPC: i64 = 250_000;
const MINUTE: u64 = 60_000;

/// Short TTL and correction window, so a window is final seconds after it ends.
fn times() -> TestTimes {
    TestTimes {
        tick_ms: 100,
        lateness_s: 5,
        ttl_s: 5,
        correction_s: 5,
        max_clicks_per_ip_per_second: 5,
    }
}

/// Waits until the wall clock is 50 to 55 seconds into a minute, so clicks sent now land
/// in a window that is final 10 s (TTL + correction) after the next minute starts.
fn wait_for_the_end_of_a_minute() {
    loop {
        let second = now_ms() % MINUTE;
        if (50_000..55_000).contains(&second) {
            return;
        }
        let wait = (50_000 + MINUTE - second) % MINUTE;
        std::thread::sleep(Duration::from_millis(wait.clamp(10, 1_000)));
    }
}

/// The 1-minute point of the ad's window `w`, if it has one.
fn minute_point(server: &Server, w: u64) -> Option<Value> {
    let body = server.get_json(&format!(
        "/v1/ads/{AD}/clicks?granularity=1m&from={w}&to={}",
        w + MINUTE
    ));
    body["points"].as_array().and_then(|p| p.first()).cloned()
}

/// The ad's 1-hour point holding `w` (a rollup of the stored minutes).
fn hour_point(server: &Server, w: u64) -> Value {
    let hour = w - w % 3_600_000;
    let body = server.get_json(&format!(
        "/v1/ads/{AD}/clicks?granularity=1h&from={hour}&to={}",
        hour + 3_600_000
    ));
    body["points"][0].clone()
}

fn measures(point: &Value) -> [i64; 4] {
    ["clicks", "fraud_clicks", "late_clicks", "spend_micros"]
        .map(|m| point[m].as_i64().unwrap_or(-1))
}

fn send_verdicts(server: &Server, imps: &[&str]) {
    let body: Vec<Value> = imps
        .iter()
        .map(|imp| json!({"impression_id": imp, "reason": "test"}))
        .collect();
    let r = server.send(
        Method::POST,
        ADMIN,
        "/v1/fraud-verdicts",
        &Value::Array(body),
    );
    assert_eq!(r.status(), 202, "verdicts");
}

/// Polls `f` every 50 ms until it gives something, or fails after `limit`.
fn eventually<T>(
    server: &Server,
    what: &str,
    limit: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "{what} not within {limit:?}\n{}",
            server.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_verdict_after_the_correction_window_adjusts_billing_and_leaves_the_frozen_window() {
    let server = Server::start(times());
    let owner = server.create_advertiser(1);
    let stranger = server.create_advertiser(2);
    server.put_ad(AD, 1, 100, CPC as u64);
    wait_for_the_end_of_a_minute();
    // Minted now: a token lives for the TTL, 5 s.
    let imps = server.impressions(AD, 9);
    let id = |i: usize| imps[i].0.as_str();
    // 0: billed, then a verdict after the freeze. 1: a verdict before the freeze.
    // 2..=7: six clicks from one IP in one second (the limit is 5), so burst fraud.
    // 8: no click, a verdict after the freeze.
    let event_time = now_ms();
    let w = event_time - event_time % MINUTE;
    let clicks: Vec<Value> = (0..8)
        .map(|i| {
            let ip = if i < 2 {
                format!("198.51.100.{i}")
            } else {
                "203.0.113.9".into()
            };
            json!({"token": imps[i].1, "event_time": event_time, "ip": ip,
                   "click_id": format!("click-{i}")})
        })
        .collect();
    let r = server.send(Method::POST, ADMIN, "/v1/clicks", &Value::Array(clicks));
    assert_eq!(r.status(), 202);
    let accepted: Value = r.json().expect("json");
    assert_eq!(accepted["accepted"], 8, "{accepted}");
    send_verdicts(&server, &[id(1)]);
    assert!(
        now_ms() < w + MINUTE + (times().ttl_s + times().correction_s) * 1000,
        "the early verdict must come before the window is final"
    );

    // The window freezes as billed: click 0 billable, click 1 and the burst fraud.
    let frozen = eventually(&server, "the window final", Duration::from_secs(90), || {
        minute_point(&server, w).filter(|p| p["final"] == true)
    });
    assert_eq!(measures(&frozen), [1, 7, 0, CPC], "{frozen}");
    let hour_before = hour_point(&server, w);
    let adjustments_path = format!("/v1/ads/{AD}/fraud-adjustments?from={w}");
    let none = server.get_json(&adjustments_path);
    assert_eq!(
        none["adjustments"],
        json!([]),
        "a verdict in time adjusts nothing: {none}"
    );

    // After the freeze: verdicts for the billed click (twice), a burst click and an
    // impression without a click.
    let sent = now_ms();
    send_verdicts(&server, &[id(0), id(2), id(8)]);
    send_verdicts(&server, &[id(0)]);
    let acked = now_ms();
    server.wait_complete_through(AD, acked, Duration::from_secs(30));

    let after = minute_point(&server, w).expect("the window");
    assert_eq!(after, frozen, "the frozen window did not change");
    assert_eq!(
        hour_point(&server, w),
        hour_before,
        "nor its hour, a rollup of the stored minutes"
    );

    let body = server.get_json(&adjustments_path);
    let rows = body["adjustments"].as_array().expect("adjustments");
    assert_eq!(
        rows.len(),
        1,
        "one adjustment, for the billed click: {body}"
    );
    let row = &rows[0];
    assert_eq!(row["ad_id"], AD);
    assert_eq!(row["campaign_id"], 100);
    assert_eq!(row["impression_id"], id(0));
    assert_eq!(row["click_id"], "click-0");
    assert_eq!(
        parse_rfc3339(row["window_start"].as_str().expect("window")),
        w
    );
    assert_eq!(
        parse_rfc3339(row["event_time"].as_str().expect("event")),
        event_time
    );
    let verdict_time = parse_rfc3339(row["verdict_time"].as_str().expect("verdict time"));
    assert!(
        (sent..=acked).contains(&verdict_time),
        "the first verdict's record time: {verdict_time} not in {sent}..={acked}"
    );
    assert_eq!(
        [&row["clicks"], &row["fraud_clicks"], &row["spend_micros"]],
        [&json!(-1), &json!(1), &json!(-CPC)]
    );
    assert_eq!(
        row["final"], false,
        "open for the rest of the adjustment period"
    );
    assert_eq!(
        body["totals"],
        json!({"adjustments": 1, "clicks": -1, "fraud_clicks": 1, "spend_micros": -CPC})
    );
    assert_eq!(body["truncated"], false);

    // The advertiser's listing holds the same; its owner reads both, another advertiser
    // neither (404, as for a missing one).
    let by_advertiser = server.get_json(&format!("/v1/advertisers/1/fraud-adjustments?from={w}"));
    assert_eq!(by_advertiser["adjustments"], body["adjustments"]);
    assert_eq!(by_advertiser["totals"], body["totals"]);
    for path in [
        adjustments_path.clone(),
        "/v1/advertisers/1/fraud-adjustments".into(),
    ] {
        assert_eq!(
            server.get(&owner, &path).status(),
            200,
            "owner reading {path}"
        );
        assert_eq!(
            server.get(&stranger, &path).status(),
            404,
            "stranger reading {path}"
        );
    }
}

#[test]
fn switched_off_adjustments_answer_view_disabled() {
    let server =
        Server::start_configured(times(), 1, "[views]\ndisabled = [\"fraud_adjustments\"]\n");
    server.create_advertiser(1);
    server.put_ad(AD, 1, 100, 1_000);
    for path in [
        format!("/v1/ads/{AD}/fraud-adjustments"),
        "/v1/advertisers/1/fraud-adjustments".to_owned(),
    ] {
        let r = server.get(ADMIN, &path);
        assert_eq!(r.status(), 501, "{path}");
        let body: Value = r.json().expect("json");
        assert_eq!(body["error"], "view_disabled", "{path}: {body}");
    }
    // The metrics still work.
    assert_eq!(
        server.get(ADMIN, &format!("/v1/ads/{AD}/clicks")).status(),
        200
    );
}
