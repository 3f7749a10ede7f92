//! Acceptance 4, 5 and 6 of the embedded pipeline, against the real `clickagg serve`
//! binary on loopback: every bad input of `../shared/api.md` gets its status and JSON
//! error code, is counted in `/metrics` and changes nothing; advertisers see only their
//! own ads, campaigns and totals; and an acknowledged click is visible within seconds.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clickagg::token::{Impression, TokenSigner};
use common::{AD_SERVER, ADMIN, Server, TOKEN_SECRET, Target, TestTimes, client, metric, now_ms};
use reqwest::Method;
use serde_json::{Value, json};

/// One row of the bad-input table.
struct Case {
    name: &'static str,
    method: Method,
    path: String,
    key: Option<&'static str>,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    status: u16,
    error: &'static str,
}

fn case(
    name: &'static str,
    method: Method,
    path: impl Into<String>,
    key: Option<&'static str>,
    body: Option<Value>,
    status: u16,
    error: &'static str,
) -> Case {
    Case {
        name,
        method,
        path: path.into(),
        key,
        content_type: body.as_ref().map(|_| "application/json"),
        body: body.map(|b| b.to_string().into_bytes()).unwrap_or_default(),
        status,
        error,
    }
}

fn raw(
    name: &'static str,
    path: &str,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    status: u16,
    error: &'static str,
) -> Case {
    Case {
        name,
        method: Method::POST,
        path: path.to_owned(),
        key: None,
        content_type,
        body,
        status,
        error,
    }
}

/// A token signed with the test servers' secret, to forge ones they must refuse (expired,
/// or for an ad that does not exist).
fn forged_token(ad_id: u64, issued_at_ms: u64) -> String {
    TokenSigner::new(TOKEN_SECRET, TestTimes::default().ttl_s * 1000).sign(&Impression {
        impression_id: 0x1234_5678_9abc_def0_1122_3344_5566_7788,
        ad_id,
        issued_at_ms,
        user_id: "u-forged".into(),
    })
}

fn count_records(server: &Server, topic: u8) -> usize {
    common::log_records(&server.data_dir(), topic).len()
}

#[test]
fn every_bad_input_gets_its_status_and_code_and_changes_nothing() {
    let server = Server::start(TestTimes::default());
    let advertiser_key = server.create_advertiser(1);
    server.put_ad(10, 1, 100, 250_000);
    let (_, good_token) = server.impressions(10, 1).remove(0);
    let ads_before = count_records(&server, 2);
    let ttl_ms = TestTimes::default().ttl_s * 1000;
    let expired = forged_token(10, now_ms() - 2 * ttl_ms);
    let unknown_ad = forged_token(999, now_ms());
    let tampered = {
        let mut t = good_token.clone().into_bytes();
        let last = t.len() - 1;
        t[last] = if t[last] == b'A' { b'B' } else { b'A' };
        String::from_utf8(t).expect("ascii token")
    };
    let ad = |advertiser: Value| {
        json!({"advertiser_id": advertiser, "campaign_id": 100,
               "landing_url": "https://a.example/x", "cpc_micros": 1})
    };
    let too_many: Vec<Value> = (0..10_001).map(|_| json!({"token": "x"})).collect();
    let cases = vec![
        // Click tracking: GET /c/{token}.
        case(
            "garbage token",
            Method::GET,
            "/c/not-a-token",
            None,
            None,
            400,
            "bad_token",
        ),
        case(
            "tampered token",
            Method::GET,
            format!("/c/{tampered}"),
            None,
            None,
            400,
            "bad_token",
        ),
        case(
            "expired token",
            Method::GET,
            format!("/c/{expired}"),
            None,
            None,
            410,
            "expired_token",
        ),
        case(
            "token of an unknown ad",
            Method::GET,
            format!("/c/{unknown_ad}"),
            None,
            None,
            404,
            "unknown_ad",
        ),
        // POST /v1/clicks, whole request refused.
        raw(
            "malformed JSON",
            "/v1/clicks",
            Some("application/json"),
            b"[{\"token\": ".to_vec(),
            400,
            "malformed_json",
        ),
        raw(
            "JSON that is not a click",
            "/v1/clicks",
            Some("application/json"),
            b"42".to_vec(),
            400,
            "invalid_request",
        ),
        raw(
            "not JSON at all",
            "/v1/clicks",
            Some("text/plain"),
            b"hello".to_vec(),
            415,
            "unsupported_media_type",
        ),
        raw(
            "oversized body",
            "/v1/clicks",
            Some("application/json"),
            vec![b' '; 9 * 1024 * 1024],
            413,
            "payload_too_large",
        ),
        case(
            "more than 10,000 clicks",
            Method::POST,
            "/v1/clicks",
            None,
            Some(Value::Array(too_many)),
            413,
            "batch_too_large",
        ),
        // Auth.
        case(
            "no key",
            Method::POST,
            "/v1/advertisers",
            None,
            Some(json!({"advertiser_id": 2, "name": "B"})),
            401,
            "unauthorized",
        ),
        case(
            "unknown key",
            Method::GET,
            "/v1/ads/10",
            Some("nope"),
            None,
            401,
            "unauthorized",
        ),
        case(
            "advertiser key on an admin route",
            Method::POST,
            "/v1/fraud-verdicts",
            Some("ADVERTISER"),
            Some(json!([])),
            403,
            "forbidden",
        ),
        case(
            "advertiser key minting impressions",
            Method::POST,
            "/v1/impressions",
            Some("ADVERTISER"),
            Some(json!({"ad_id": 10})),
            403,
            "forbidden",
        ),
        // Catalog.
        case(
            "advertiser twice",
            Method::POST,
            "/v1/advertisers",
            Some(ADMIN),
            Some(json!({"advertiser_id": 1, "name": "again"})),
            409,
            "advertiser_exists",
        ),
        case(
            "advertiser without a name",
            Method::POST,
            "/v1/advertisers",
            Some(ADMIN),
            Some(json!({"advertiser_id": 3})),
            422,
            "invalid_request",
        ),
        case(
            "advertiser id not a u64",
            Method::POST,
            "/v1/advertisers",
            Some(ADMIN),
            Some(json!({"advertiser_id": -3, "name": "n"})),
            422,
            "invalid_request",
        ),
        case(
            "unknown field",
            Method::POST,
            "/v1/advertisers",
            Some(ADMIN),
            Some(json!({"advertiser_id": 3, "name": "n", "colour": 1})),
            422,
            "invalid_request",
        ),
        case(
            "ad of an unknown advertiser",
            Method::PUT,
            "/v1/ads/11",
            Some(ADMIN),
            Some(ad(json!(77))),
            422,
            "unknown_advertiser",
        ),
        case(
            "ad with a bad landing URL",
            Method::PUT,
            "/v1/ads/11",
            Some(ADMIN),
            Some(
                json!({"advertiser_id": 1, "campaign_id": 100, "landing_url": "javascript:alert(1)", "cpc_micros": 1}),
            ),
            422,
            "invalid_landing_url",
        ),
        case(
            "ad id not a number",
            Method::PUT,
            "/v1/ads/abc",
            Some(ADMIN),
            Some(ad(json!(1))),
            400,
            "invalid_path",
        ),
        case(
            "ad id beyond u64",
            Method::GET,
            "/v1/ads/18446744073709551616",
            Some(ADMIN),
            None,
            400,
            "invalid_path",
        ),
        case(
            "unknown ad",
            Method::GET,
            "/v1/ads/12345",
            Some(ADMIN),
            None,
            404,
            "not_found",
        ),
        // Impressions.
        case(
            "impression of an unknown ad",
            Method::POST,
            "/v1/impressions",
            Some(AD_SERVER),
            Some(json!({"ad_id": 999})),
            404,
            "unknown_ad",
        ),
        case(
            "zero impressions",
            Method::POST,
            "/v1/impressions",
            Some(AD_SERVER),
            Some(json!({"ad_id": 10, "count": 0})),
            422,
            "invalid_request",
        ),
        // Verdicts.
        case(
            "verdict with a bad impression id",
            Method::POST,
            "/v1/fraud-verdicts",
            Some(ADMIN),
            Some(json!([{"impression_id": "xyz", "reason": "r"}])),
            422,
            "invalid_impression_id",
        ),
        case(
            "verdicts not a list",
            Method::POST,
            "/v1/fraud-verdicts",
            Some(ADMIN),
            Some(json!({"impression_id": "00"})),
            422,
            "invalid_request",
        ),
        // Metrics queries.
        case(
            "unknown granularity",
            Method::GET,
            "/v1/ads/10/clicks?granularity=2m",
            Some(ADMIN),
            None,
            400,
            "invalid_granularity",
        ),
        case(
            "unparsable time",
            Method::GET,
            "/v1/ads/10/clicks?from=yesterday",
            Some(ADMIN),
            None,
            400,
            "invalid_time",
        ),
        case(
            "from after to",
            Method::GET,
            "/v1/ads/10/clicks?from=2000000&to=1000000",
            Some(ADMIN),
            None,
            400,
            "invalid_range",
        ),
        case(
            "too many windows",
            Method::GET,
            "/v1/ads/10/clicks?from=0&to=86400000000&granularity=1m",
            Some(ADMIN),
            None,
            400,
            "range_too_large",
        ),
        case(
            "top-ads limit out of range",
            Method::GET,
            "/v1/advertisers/1/top-ads?limit=0",
            Some(ADMIN),
            None,
            400,
            "invalid_limit",
        ),
        case(
            "fraud-adjustments limit out of range",
            Method::GET,
            "/v1/ads/10/fraud-adjustments?limit=10001",
            Some(ADMIN),
            None,
            400,
            "invalid_limit",
        ),
        case(
            "fraud-adjustments from after to",
            Method::GET,
            "/v1/advertisers/1/fraud-adjustments?from=2000000&to=1000000",
            Some(ADMIN),
            None,
            400,
            "invalid_range",
        ),
        case(
            "campaign id not a number",
            Method::GET,
            "/v1/campaigns/x/clicks",
            Some(ADMIN),
            None,
            400,
            "invalid_path",
        ),
        // Routing.
        case(
            "unknown route",
            Method::GET,
            "/v2/anything",
            None,
            None,
            404,
            "not_found",
        ),
        case(
            "wrong method",
            Method::DELETE,
            "/v1/clicks",
            None,
            None,
            405,
            "method_not_allowed",
        ),
    ];

    let mut expected_errors: BTreeMap<&str, u64> = BTreeMap::new();
    for c in &cases {
        let key = match c.key {
            Some("ADVERTISER") => Some(advertiser_key.as_str()),
            other => other,
        };
        let mut request = client().request(c.method.clone(), server.url(&c.path));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        if let Some(ct) = c.content_type {
            request = request.header("content-type", ct);
        }
        if !c.body.is_empty() {
            request = request.body(c.body.clone());
        }
        let response = request
            .send()
            .unwrap_or_else(|e| panic!("{}: transport error {e}", c.name));
        let status = response.status().as_u16();
        assert!(
            response.headers().get("location").is_none(),
            "{}: a refused request must not redirect",
            c.name
        );
        let text = response.text().expect("body");
        let body: Value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{}: error body is not JSON: {text:?}", c.name));
        assert_eq!(
            (status, body["error"].as_str()),
            (c.status, Some(c.error)),
            "{}: {text}",
            c.name
        );
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{}: no message in {text}",
            c.name
        );
        *expected_errors.entry(c.error).or_default() += 1;
    }

    // Per-click errors of a batch: 202, the good ones accepted, each bad one named.
    let batch = json!([
        {"token": good_token, "event_time": now_ms() - 1000, "ip": "203.0.113.9", "click_id": "ok-1"},
        {"token": "garbage"},
        {"token": expired},
        {"token": unknown_ad},
        {"token": good_token, "event_time": "last tuesday"},
        {"token": good_token, "ip": "999.1.1.1"},
        {"token": good_token, "click_id": ""},
        {"token": good_token, "user_id": "u".repeat(500)},
        {"event_time": 5},
        "not an object",
        {"token": tampered},
    ]);
    let r = server.send(Method::POST, ADMIN, "/v1/clicks", &batch);
    assert_eq!(r.status(), 202);
    let body: Value = r.json().expect("json");
    assert_eq!(body["accepted"], 1, "{body}");
    let rejected: Vec<(u64, String)> = body["rejected"]
        .as_array()
        .expect("rejected")
        .iter()
        .map(|x| {
            (
                x["index"].as_u64().expect("index"),
                x["error"].as_str().expect("error").to_owned(),
            )
        })
        .collect();
    let want_rejected: Vec<(u64, &str)> = vec![
        (1, "bad_token"),
        (2, "expired_token"),
        (3, "unknown_ad"),
        (4, "invalid_event_time"),
        (5, "invalid_ip"),
        (6, "invalid_click_id"),
        (7, "invalid_user_id"),
        (8, "invalid_click"),
        (9, "invalid_click"),
        (10, "bad_token"),
    ];
    assert_eq!(
        rejected,
        want_rejected
            .iter()
            .map(|(i, e)| (*i, e.to_string()))
            .collect::<Vec<_>>()
    );

    // Counted in metrics: every error answer by code, every refused click by reason.
    let text = server.metrics();
    for (code, n) in &expected_errors {
        let got = metric(
            &text,
            "clickagg_http_errors_total",
            &format!("reason=\"{code}\""),
        );
        assert_eq!(got, *n as f64, "http_errors_total for {code}\n{text}");
    }
    let mut rejected_clicks: BTreeMap<&str, u64> = BTreeMap::new();
    for (_, e) in &want_rejected {
        *rejected_clicks.entry(e).or_default() += 1;
    }
    for c in cases.iter().filter(|c| c.path.starts_with("/c/")) {
        *rejected_clicks.entry(c.error).or_default() += 1;
    }
    for (reason, n) in &rejected_clicks {
        let got = metric(
            &text,
            "clickagg_clicks_rejected_total",
            &format!("reason=\"{reason}\""),
        );
        assert_eq!(got, *n as f64, "clicks_rejected_total for {reason}\n{text}");
    }
    assert_eq!(metric(&text, "clickagg_clicks_accepted_total", ""), 1.0);

    // Nothing else changed: one click (the good one) in the log, no verdicts, the catalog
    // as it was; and the server is still up and ready.
    assert_eq!(
        count_records(&server, 0),
        1,
        "only the one good click is logged"
    );
    assert_eq!(count_records(&server, 1), 0, "no verdict was logged");
    assert_eq!(
        count_records(&server, 2),
        ads_before,
        "the catalog is unchanged"
    );
    let ready = client().get(server.url("/readyz")).send().expect("readyz");
    assert_eq!(ready.status(), 200);
}

/// A message with every run of digits replaced by `#`, to compare texts about two ids.
fn without_digits(message: &Value) -> String {
    let mut out = String::new();
    for c in message.as_str().unwrap_or_default().chars() {
        if !c.is_ascii_digit() {
            out.push(c);
        } else if !out.ends_with('#') {
            out.push('#');
        }
    }
    out
}

/// Everything advertiser `a` may ask about advertiser `b`'s objects.
fn foreign_paths(ad: u64, campaign: u64, advertiser: u64) -> Vec<String> {
    vec![
        format!("/v1/ads/{ad}"),
        format!("/v1/ads/{ad}/clicks?granularity=1m"),
        format!("/v1/ads/{ad}/late-clicks"),
        format!("/v1/ads/{ad}/fraud-adjustments"),
        format!("/v1/campaigns/{campaign}/clicks?granularity=1h"),
        format!("/v1/advertisers/{advertiser}/clicks?granularity=1d"),
        format!("/v1/advertisers/{advertiser}/top-ads"),
        format!("/v1/advertisers/{advertiser}/fraud-adjustments"),
        format!("/v1/advertisers/{advertiser}/ads"),
    ]
}

#[test]
fn advertisers_see_only_their_own_ads_campaigns_and_totals() {
    let server = Server::start(TestTimes::default());
    let key_a = server.create_advertiser(1);
    let key_b = server.create_advertiser(2);
    server.put_ad(10, 1, 100, 1_000);
    server.put_ad(20, 2, 200, 7_000);
    // Clicks for both, so B's numbers exist and would leak if isolation failed.
    let now = now_ms();
    let mut clicks = Vec::new();
    for (ad, n) in [(10u64, 3usize), (20, 5)] {
        for (i, (_, token)) in server.impressions(ad, n).into_iter().enumerate() {
            clicks.push(json!({"token": token, "event_time": now - 500,
                               "ip": format!("198.51.100.{i}"), "click_id": format!("{ad}-{i}")}));
        }
    }
    let r = server.send(Method::POST, ADMIN, "/v1/clicks", &Value::Array(clicks));
    assert_eq!(r.status(), 202);
    server.wait_complete_through(10, now_ms(), Duration::from_secs(30));

    let missing_paths = foreign_paths(9020, 9200, 9002);
    for (path, missing_path) in foreign_paths(20, 200, 2).into_iter().zip(missing_paths) {
        // B's objects, asked by A: 404, exactly as if they did not exist.
        let foreign = server.get(&key_a, &path);
        assert_eq!(foreign.status(), 404, "A reading {path}");
        let foreign: Value = foreign.json().expect("json");
        assert_eq!(foreign["error"], "not_found", "{path}: {foreign}");
        let missing = server.get(&key_a, &missing_path);
        assert_eq!(missing.status(), 404, "A reading {missing_path}");
        let missing: Value = missing.json().expect("json");
        assert_eq!(
            without_digits(&foreign["message"]),
            without_digits(&missing["message"]),
            "{path}: another tenant's object must read like a missing one"
        );
        // B itself and the admin read them.
        assert_eq!(server.get(&key_b, &path).status(), 200, "B reading {path}");
        assert_eq!(
            server.get(ADMIN, &path).status(),
            200,
            "admin reading {path}"
        );
    }
    for path in foreign_paths(10, 100, 1) {
        assert_eq!(server.get(&key_b, &path).status(), 404, "B reading {path}");
        assert_eq!(server.get(&key_a, &path).status(), 200, "A reading {path}");
    }

    // A's own totals hold only A's clicks: 3 billable at A's price, none of B's.
    let body: Value = server
        .get(&key_a, "/v1/advertisers/1/clicks?granularity=1d")
        .json()
        .expect("json");
    let points = body["points"].as_array().expect("points");
    let clicks: i64 = points
        .iter()
        .map(|p| p["clicks"].as_i64().unwrap_or(0))
        .sum();
    let spend: i64 = points
        .iter()
        .map(|p| p["spend_micros"].as_i64().unwrap_or(0))
        .sum();
    assert_eq!((clicks, spend), (3, 3_000), "{body}");
    let top: Value = server
        .get(&key_a, "/v1/advertisers/1/top-ads")
        .json()
        .expect("json");
    let ads: Vec<u64> = top["ads"]
        .as_array()
        .expect("ads")
        .iter()
        .map(|a| a["ad_id"].as_u64().expect("ad_id"))
        .collect();
    assert_eq!(ads, vec![10], "{top}");
    // An advertiser key cannot manage the catalog or send verdicts.
    let r = server.send(
        Method::PUT,
        &key_a,
        "/v1/ads/21",
        &json!({"advertiser_id": 1, "campaign_id": 100, "landing_url": "https://a.example/", "cpc_micros": 1}),
    );
    assert_eq!(r.status(), 403);
}

#[test]
fn an_acknowledged_click_is_visible_within_seconds() {
    let server = Server::start(TestTimes::default());
    server.create_advertiser(1);
    server.put_ad(10, 1, 100, 1_000);
    let tokens = server.impressions(10, 20);
    let mut latencies = Vec::new();
    for (i, (_, token)) in tokens.iter().enumerate() {
        let sent = Instant::now();
        let r = client()
            .get(server.url(&format!("/c/{token}")))
            .header("x-forwarded-for", format!("198.51.100.{i}"))
            .send()
            .expect("click");
        assert_eq!(r.status(), 302);
        loop {
            let body = server.get_json("/v1/ads/10/clicks?granularity=1d");
            let clicks: i64 = body["points"]
                .as_array()
                .expect("points")
                .iter()
                .map(|p| p["clicks"].as_i64().unwrap_or(0))
                .sum();
            if clicks > i as i64 {
                assert_eq!(clicks, i as i64 + 1, "{body}");
                break;
            }
            // Loose on purpose (the issue asks 2 s; bench/ prints the real figure).
            assert!(
                sent.elapsed() < Duration::from_secs(5),
                "click {i} not visible after 5 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        latencies.push(sent.elapsed());
    }
    latencies.sort();
    eprintln!(
        "click -> visible: p50 {:?}, max {:?} over {} clicks",
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1],
        latencies.len()
    );
}

/// Clicks of ad 10 counted so far, over the last day.
fn counted(server: &Server) -> i64 {
    let body = server.get_json("/v1/ads/10/clicks?granularity=1d");
    body["points"]
        .as_array()
        .expect("points")
        .iter()
        .map(|p| p["clicks"].as_i64().unwrap_or(0))
        .sum()
}

#[test]
fn a_stopped_server_commits_no_frontier_beyond_its_clicks() {
    // Regression: on SIGTERM the dataflow used to run to completion, its frontier passing
    // through the pending expiry retractions a horizon ahead; the sink committed such a
    // frontier, and after a restart every new click (earlier than it) was ignored.
    let mut server = Server::start(TestTimes::default());
    server.create_advertiser(1);
    server.put_ad(10, 1, 100, 1_000);
    let tokens = server.impressions(10, 4);
    let click = |server: &Server, i: usize| {
        let r = client()
            .get(server.url(&format!("/c/{}", tokens[i].1)))
            .header("x-forwarded-for", format!("198.51.100.{i}"))
            .send()
            .expect("click");
        assert_eq!(r.status(), 302);
    };
    for i in 0..2 {
        click(&server, i);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while counted(&server) < 2 {
        assert!(
            Instant::now() < deadline,
            "the first clicks were not counted"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = server
        .proc
        .terminate(Duration::from_secs(10))
        .expect("serve exits within 10 s of SIGTERM");
    assert!(status.success(), "serve exited with {status}");
    server.proc.start(Duration::from_secs(120));
    let ready = server.get_json("/readyz");
    let frontier = common::parse_rfc3339(ready["committed_frontier"].as_str().expect("frontier"));
    assert!(
        frontier <= common::now_ms() + 2_000,
        "the stopped server committed a frontier {} ms ahead",
        frontier.saturating_sub(common::now_ms())
    );
    for i in 2..4 {
        click(&server, i);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while counted(&server) < 4 {
        assert!(
            Instant::now() < deadline,
            "clicks after the restart were not counted: {}",
            counted(&server)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(counted(&server), 4);
}

/// A batch longer than the server's append chunk (256 clicks) is checked and logged in
/// chunks, each handed to the log while the next is checked. Whatever the chunking, the
/// answer must name exactly the refused indices, and the log must hold every accepted
/// click once, in request order within each partition: the oracle is the request itself.
#[test]
fn a_batch_of_several_append_chunks_is_logged_whole_in_request_order() {
    use clickagg::record::{ClickEvent, Payload};

    let server = Server::start(TestTimes::default());
    server.create_advertiser(1);
    server.put_ad(10, 1, 100, 1_000);
    // An empty batch: nothing to log, nothing accepted.
    let r = server.send(Method::POST, AD_SERVER, "/v1/clicks", &json!([]));
    assert_eq!(r.status(), 202);
    let body: Value = r.json().expect("json");
    assert_eq!(body, json!({"accepted": 0, "rejected": []}));

    let n = 700;
    let tokens = server.impressions(10, n);
    // Refusals on both sides of every chunk boundary, and at both ends.
    let bad: Vec<usize> = vec![0, 255, 256, 257, 511, 512, 699];
    let batch: Vec<Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, (_, token))| {
            let ip = if bad.contains(&i) {
                "not-an-ip"
            } else {
                "203.0.113.9"
            };
            json!({"token": token, "ip": ip, "click_id": format!("c-{i:04}")})
        })
        .collect();
    let r = server.send(Method::POST, AD_SERVER, "/v1/clicks", &Value::Array(batch));
    assert_eq!(r.status(), 202);
    let body: Value = r.json().expect("json");
    assert_eq!(body["accepted"], n - bad.len(), "{body}");
    let rejected: Vec<u64> = body["rejected"]
        .as_array()
        .expect("rejected")
        .iter()
        .map(|x| {
            assert_eq!(x["error"], "invalid_ip", "{x}");
            x["index"].as_u64().expect("index")
        })
        .collect();
    assert_eq!(rejected, bad.iter().map(|&i| i as u64).collect::<Vec<_>>());

    // The log, read straight from its file in offset order (one ad: one partition): each
    // accepted click once, none refused, in the order of the request.
    let logged: Vec<(u32, String)> = common::log_rows(&server.data_dir(), 0)
        .into_iter()
        .map(|(partition, _, _, payload)| {
            let click = ClickEvent::decode(&payload).expect("a click record");
            (partition, click.click_id)
        })
        .collect();
    assert!(
        logged.windows(2).all(|w| w[0].0 == w[1].0),
        "one ad's clicks share a partition"
    );
    let ids: Vec<&str> = logged.iter().map(|(_, id)| id.as_str()).collect();
    let want: Vec<String> = (0..n)
        .filter(|i| !bad.contains(i))
        .map(|i| format!("c-{i:04}"))
        .collect();
    assert_eq!(ids, want.iter().map(String::as_str).collect::<Vec<_>>());
}
