//! Issue 6, acceptance 4: `GET /openapi.json` of the real `clickagg serve` documents every
//! route of `../shared/api.md`, and every documented operation, called for real, answers
//! with a status the document lists and a body that validates against the document's
//! schema for it (JSON Schema 2020-12 with the document's components).

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{AD_SERVER, ADMIN, Server, Target, TestTimes, now_ms};
use reqwest::Method;
use serde_json::{Value, json};

/// The routes of `../shared/api.md` (and the README's routes table, which adds the
/// late-clicks, fraud-adjustments, `/v1/me` and advertiser-ads routes). `GET /dashboard`
/// is an HTML page, not an API route, so the document leaves it out.
const CONTRACT: &[(&str, &str)] = &[
    ("get", "/c/{token}"),
    ("post", "/v1/clicks"),
    ("post", "/v1/impressions"),
    ("post", "/v1/advertisers"),
    ("get", "/v1/me"),
    ("get", "/v1/advertisers/{advertiser_id}/ads"),
    ("put", "/v1/ads/{ad_id}"),
    ("get", "/v1/ads/{ad_id}"),
    ("post", "/v1/fraud-verdicts"),
    ("get", "/v1/ads/{ad_id}/clicks"),
    ("get", "/v1/campaigns/{campaign_id}/clicks"),
    ("get", "/v1/advertisers/{advertiser_id}/clicks"),
    ("get", "/v1/advertisers/{advertiser_id}/top-ads"),
    ("get", "/v1/ads/{ad_id}/late-clicks"),
    ("get", "/v1/ads/{ad_id}/fraud-adjustments"),
    ("get", "/v1/advertisers/{advertiser_id}/fraud-adjustments"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
];

/// A validator for `schema`, resolving `#/components/...` against the document.
fn validator(doc: &Value, schema: &Value) -> jsonschema::Validator {
    let root = json!({"components": doc["components"], "allOf": [schema]});
    jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .build(&root)
        .unwrap_or_else(|e| panic!("schema {schema} does not compile: {e}"))
}

/// One real answer, checked against the document's operation `method path`.
fn check(doc: &Value, method: &str, path: &str, status: u16, content_type: &str, body: &str) {
    let op = &doc["paths"][path][method];
    assert!(op.is_object(), "{method} {path} is not documented");
    let response = &op["responses"][status.to_string()];
    assert!(
        response.is_object(),
        "{method} {path} answered {status}, which the document does not list: {body}"
    );
    let Some(content) = response["content"].as_object() else {
        assert!(
            body.is_empty(),
            "{method} {path} {status}: a body where none is documented"
        );
        return;
    };
    let media = content_type.split(';').next().unwrap_or("").trim();
    let Some(schema) = content.get(media).map(|m| &m["schema"]) else {
        panic!("{method} {path} {status}: content type {media} not documented: {content:?}");
    };
    if media != "application/json" {
        return;
    }
    let value: Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("{method} {path} {status}: not JSON ({e}): {body}"));
    let errors: Vec<String> = validator(doc, schema)
        .iter_errors(&value)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{method} {path} {status} does not match its schema:\n{}\nbody: {body}",
        errors.join("\n")
    );
}

struct Call<'a> {
    method: &'a str,
    template: &'a str,
    url: String,
    key: Option<&'a str>,
    body: Option<Value>,
    expect: u16,
}

fn call(server: &Server, doc: &Value, c: &Call) -> Value {
    let method = Method::from_bytes(c.method.to_uppercase().as_bytes()).expect("method");
    let mut req = common::client().request(method, server.url(&c.url));
    if let Some(key) = c.key {
        req = req.bearer_auth(key);
    }
    if let Some(body) = &c.body {
        req = req.json(body);
    }
    let resp = req
        .send()
        .unwrap_or_else(|e| panic!("{} {}: {e}", c.method, c.url));
    let status = resp.status().as_u16();
    let location = resp.headers().get("location").is_some();
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let text = resp.text().unwrap_or_default();
    assert_eq!(status, c.expect, "{} {}: {text}", c.method, c.url);
    if status == 302 {
        assert!(location, "302 without Location");
        let documented = &doc["paths"][c.template][c.method]["responses"]["302"]["headers"];
        assert!(
            documented.get("Location").is_some(),
            "Location not documented"
        );
    }
    check(doc, c.method, c.template, status, &content_type, &text);
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

#[test]
fn every_documented_route_answers_as_documented() {
    let server = Server::start(TestTimes::default());
    let doc: Value = common::client()
        .get(server.url("/openapi.json"))
        .send()
        .and_then(|r| {
            assert_eq!(r.status(), 200);
            r.json()
        })
        .expect("openapi.json");
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "{}",
        doc["openapi"]
    );

    // The document covers exactly the contract's routes.
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .expect("path item")
                .keys()
                .filter(|m| ["get", "put", "post", "delete", "patch"].contains(&m.as_str()))
                .map(move |m| (m.clone(), path.clone()))
        })
        .collect();
    let contract: BTreeSet<(String, String)> = CONTRACT
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(
        documented, contract,
        "documented routes differ from ../shared/api.md and the README's additions"
    );

    // The validator is not a rubber stamp: a wrong shape fails.
    let batch = &doc["paths"]["/v1/clicks"]["post"]["responses"]["202"]["content"]["application/json"]
        ["schema"];
    assert!(!validator(&doc, batch).is_valid(&json!({"accepted": "two", "rejected": []})));
    assert!(!validator(&doc, batch).is_valid(&json!({"rejected": []})));

    let mut called: BTreeSet<(String, String)> = BTreeSet::new();
    let mut run = |c: Call| {
        called.insert((c.method.to_string(), c.template.to_string()));
        call(&server, &doc, &c)
    };
    let created = run(Call {
        method: "post",
        template: "/v1/advertisers",
        url: "/v1/advertisers".into(),
        key: Some(ADMIN),
        body: Some(json!({"advertiser_id": 7, "name": "Acme"})),
        expect: 201,
    });
    let acme = created["api_key"].as_str().expect("api_key").to_owned();
    let ad = json!({"advertiser_id": 7, "campaign_id": 70,
                    "landing_url": "https://acme.example/shoes", "cpc_micros": 250000});
    for expect in [201, 200] {
        run(Call {
            method: "put",
            template: "/v1/ads/{ad_id}",
            url: "/v1/ads/42".into(),
            key: Some(ADMIN),
            body: Some(ad.clone()),
            expect,
        });
    }
    run(Call {
        method: "get",
        template: "/v1/ads/{ad_id}",
        url: "/v1/ads/42".into(),
        key: Some(acme.as_str()),
        body: None,
        expect: 200,
    });
    let me = run(Call {
        method: "get",
        template: "/v1/me",
        url: "/v1/me".into(),
        key: Some(acme.as_str()),
        body: None,
        expect: 200,
    });
    assert_eq!(me, json!({"role": "advertiser", "advertiser_id": 7}));
    let admin = run(Call {
        method: "get",
        template: "/v1/me",
        url: "/v1/me".into(),
        key: Some(ADMIN),
        body: None,
        expect: 200,
    });
    assert_eq!(admin, json!({"role": "admin", "advertiser_id": null}));
    run(Call {
        method: "get",
        template: "/v1/me",
        url: "/v1/me".into(),
        key: Some("not-a-key"),
        body: None,
        expect: 401,
    });
    let listed = run(Call {
        method: "get",
        template: "/v1/advertisers/{advertiser_id}/ads",
        url: "/v1/advertisers/7/ads".into(),
        key: Some(acme.as_str()),
        body: None,
        expect: 200,
    });
    assert_eq!(listed["ads"][0]["ad_id"], 42, "{listed}");
    for (key, expect) in [(None, 401), (Some(acme.as_str()), 404)] {
        run(Call {
            method: "get",
            template: "/v1/advertisers/{advertiser_id}/ads",
            url: "/v1/advertisers/8/ads".into(),
            key,
            body: None,
            expect,
        });
    }
    let one = run(Call {
        method: "post",
        template: "/v1/impressions",
        url: "/v1/impressions".into(),
        key: Some(AD_SERVER),
        body: Some(json!({"ad_id": 42, "user_id": "u-1"})),
        expect: 201,
    });
    let many = run(Call {
        method: "post",
        template: "/v1/impressions",
        url: "/v1/impressions".into(),
        key: Some(AD_SERVER),
        body: Some(json!({"ad_id": 42, "user_id": "u-2", "count": 3})),
        expect: 201,
    });
    let tokens: Vec<String> = many["impressions"]
        .as_array()
        .expect("impressions")
        .iter()
        .map(|i| i["token"].as_str().expect("token").to_owned())
        .collect();
    run(Call {
        method: "get",
        template: "/c/{token}",
        url: format!("/c/{}", one["token"].as_str().expect("token")),
        key: None,
        body: None,
        expect: 302,
    });
    run(Call {
        method: "get",
        template: "/c/{token}",
        url: "/c/not-a-token".into(),
        key: None,
        body: None,
        expect: 400,
    });
    let now = now_ms();
    let sent = run(Call {
        method: "post",
        template: "/v1/clicks",
        url: "/v1/clicks".into(),
        key: None,
        body: Some(json!([
            {"token": tokens[0], "event_time": now, "ip": "203.0.113.9", "click_id": "a"},
            {"token": tokens[1], "event_time": now - 600_000, "ip": "203.0.113.10"},
            {"token": "forged", "ip": "203.0.113.11"},
        ])),
        expect: 202,
    });
    assert_eq!(sent["accepted"], 2, "{sent}");
    run(Call {
        method: "post",
        template: "/v1/clicks",
        url: "/v1/clicks".into(),
        key: None,
        body: Some(json!({"token": tokens[2], "event_time": now, "ip": "203.0.113.12"})),
        expect: 202,
    });
    run(Call {
        method: "post",
        template: "/v1/fraud-verdicts",
        url: "/v1/fraud-verdicts".into(),
        key: Some(ADMIN),
        body: Some(
            json!([{"impression_id": many["impressions"][2]["impression_id"], "reason": "ml"}]),
        ),
        expect: 202,
    });
    server.wait_complete_through(42, now_ms(), Duration::from_secs(60));

    for (template, url) in [
        ("/v1/ads/{ad_id}/clicks", "/v1/ads/42/clicks?granularity=1m"),
        (
            "/v1/campaigns/{campaign_id}/clicks",
            "/v1/campaigns/70/clicks?granularity=5m",
        ),
        (
            "/v1/advertisers/{advertiser_id}/clicks",
            "/v1/advertisers/7/clicks?granularity=1h",
        ),
        (
            "/v1/advertisers/{advertiser_id}/top-ads",
            "/v1/advertisers/7/top-ads?limit=5",
        ),
        ("/v1/ads/{ad_id}/late-clicks", "/v1/ads/42/late-clicks"),
        (
            "/v1/ads/{ad_id}/fraud-adjustments",
            "/v1/ads/42/fraud-adjustments",
        ),
        (
            "/v1/advertisers/{advertiser_id}/fraud-adjustments",
            "/v1/advertisers/7/fraud-adjustments",
        ),
    ] {
        let body = run(Call {
            method: "get",
            template,
            url: url.into(),
            key: Some(acme.as_str()),
            body: None,
            expect: 200,
        });
        assert!(body.is_object(), "{url}: {body}");
        // And the documented errors: no key, someone else's id.
        run(Call {
            method: "get",
            template,
            url: url.into(),
            key: None,
            body: None,
            expect: 401,
        });
    }
    // The series and late clicks hold what was sent (so the schemas saw real rows).
    let series = common::client()
        .get(server.url("/v1/ads/42/clicks?granularity=1d"))
        .bearer_auth(&acme)
        .send()
        .and_then(|r| r.json::<Value>())
        .expect("series");
    let points = series["points"].as_array().expect("points");
    assert!(!points.is_empty(), "{series}");
    let late = common::client()
        .get(server.url("/v1/ads/42/late-clicks"))
        .bearer_auth(&acme)
        .send()
        .and_then(|r| r.json::<Value>())
        .expect("late");
    assert_eq!(
        late["late_clicks"].as_array().map(Vec::len),
        Some(1),
        "{late}"
    );
    run(Call {
        method: "get",
        template: "/v1/ads/{ad_id}",
        url: "/v1/ads/999".into(),
        key: Some(acme.as_str()),
        body: None,
        expect: 404,
    });
    for (template, expect) in [
        ("/healthz", 200),
        ("/readyz", 200),
        ("/metrics", 200),
        ("/openapi.json", 200),
    ] {
        run(Call {
            method: "get",
            template,
            url: template.into(),
            key: None,
            body: None,
            expect,
        });
    }
    assert_eq!(called, contract, "not every documented route was called");
}
