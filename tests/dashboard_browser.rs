//! Issue 6, acceptance 5: the advertiser dashboard (`GET /dashboard`) in headless
//! Chromium, driven by Playwright (`tests/browser/dashboard.mjs`), against a real
//! `clickagg serve --demo` whose demo traffic keeps running throughout.
//!
//! The test logs in as an advertiser of its own, whose clicks it sent itself (on-time,
//! duplicated, late, an IP burst, verdicts) and which the demo traffic never touches, so
//! once the committed frontier has passed the last acknowledged click its numbers are
//! frozen. The page's totals, every chart point and the top-ads rows must then equal
//! what the API answers for the same range, exactly, and the API must equal the
//! independent oracle. A bad key must show an error; a demo advertiser's numbers must
//! move without a reload. A screenshot is written to `$CARGO_TARGET_TMPDIR`.
//!
//! Debian's `chromium` (apt-get) and npm's `playwright-core` (into
//! `~/.cache/clickagg/node`) are installed when missing; the test fails with a clear
//! message when it cannot install them.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::oracle::{Ad, Measures, Oracle};
use common::workload::{Driver, Impression, Planned, send_clicks, send_verdicts};
use common::{Server, Target, TestTimes, now_ms, parse_rfc3339};
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};

/// The playwright-core release the driver script is written against.
const PLAYWRIGHT_CORE: &str = "1.65.1";

/// The test's own advertiser, campaigns and ads (the demo uses ids 1-5, 1000+ and 1-200).
const ADVERTISER: u64 = 9_001;
const CAMPAIGN: u64 = 90_011;
const OTHER_CAMPAIGN: u64 = 90_012;
/// (ad, campaign, cpc micros, on-time clicks)
const ADS: [(u64, u64, u64, usize); 4] = [
    (900_101, CAMPAIGN, 250_000, 40),
    (900_102, CAMPAIGN, 100_000, 15),
    (900_103, CAMPAIGN, 50_000, 5),
    (900_201, OTHER_CAMPAIGN, 300_000, 10),
];
/// The ad the page shows: it gets the late clicks, the IP burst and the verdicts too.
const HOT_AD: u64 = 900_101;

/// The demo advertiser whose live numbers the page must refresh.
const DEMO_ADVERTISER: u64 = 1;

#[test]
fn dashboard_shows_exactly_what_the_api_answers() {
    let chromium = chromium();
    let node_modules = playwright_core();

    // Lateness 5 min, so on-time clicks can span several minutes of the chart.
    let times = TestTimes {
        lateness_s: 300,
        ttl_s: 1_800,
        ..TestTimes::default()
    };
    let mut server = Server::start_with_args(times, 2, "", &["--demo", "--demo-rate", "100"]);
    let demo_key = demo_key(&server);
    let (key, oracle, last_ack) = send_own_clicks(&mut server);
    server.wait_complete_through(HOT_AD, last_ack, Duration::from_secs(60));

    let out_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let screenshot = out_dir.join("dashboard.png");
    let demo_screenshot = out_dir.join("dashboard-demo.png");
    for f in [&screenshot, &demo_screenshot] {
        let _ = std::fs::remove_file(f);
    }
    let page = run_browser(&json!({
        "node_modules": node_modules,
        "chromium": chromium,
        "base": server.url(""),
        "key": key,
        "ad": HOT_AD.to_string(),
        "campaign": CAMPAIGN.to_string(),
        "demo_key": demo_key,
        "demo_advertiser": DEMO_ADVERTISER.to_string(),
        "screenshot": screenshot,
        "demo_screenshot": demo_screenshot,
        "out": out_dir.join("dashboard.json"),
    }));

    check_page_served(&page);
    check_bad_key(&page);
    assert_eq!(
        page["who"].as_str(),
        Some(format!("advertiser {ADVERTISER}").as_str())
    );
    let scopes: Vec<&str> = page["scopes"]
        .as_array()
        .expect("scopes")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let mut expected = vec![
        format!("advertiser:{ADVERTISER}"),
        format!("campaign:{CAMPAIGN}"),
        format!("campaign:{OTHER_CAMPAIGN}"),
    ];
    expected.extend(ADS.iter().map(|(ad, ..)| format!("ad:{ad}")));
    assert_eq!(
        scopes, expected,
        "the advertiser's campaigns and ads to pick"
    );

    let ad = &page["ad"];
    let shown = check_view(&server, &key, &oracle, ad, "ad", HOT_AD);
    assert!(
        shown.clicks > 0 && shown.fraud_clicks > 0 && shown.late_clicks > 0,
        "the page must show billable, fraud and late clicks of ad {HOT_AD}: {shown:?}"
    );
    check_top_ads(&server, &key, &oracle, ad);
    let campaign = check_view(
        &server,
        &key,
        &oracle,
        &page["campaign"],
        "campaign",
        CAMPAIGN,
    );
    assert!(campaign.clicks > shown.clicks, "{campaign:?} vs {shown:?}");
    check_top_ads(&server, &key, &oracle, &page["campaign"]);
    assert_eq!(
        page["after_reload"]["totals"], page["campaign"]["totals"],
        "a reload keeps the session and the chosen campaign"
    );
    check_storage(&page, &key);
    check_live_demo(&page);

    let errors: Vec<&str> = page["console_errors"]
        .as_array()
        .expect("console errors")
        .iter()
        .filter_map(Value::as_str)
        // The bad key's 401 is logged by Chromium as a failed resource load.
        .filter(|e| !e.starts_with("Failed to load resource"))
        .collect();
    assert!(
        errors.is_empty(),
        "script or CSP errors on the page: {errors:?}"
    );

    for f in [&screenshot, &demo_screenshot] {
        let (width, height) = png_size(f);
        assert!(
            width >= 1_000 && height >= 600,
            "{}: {width}x{height}",
            f.display()
        );
    }
    eprintln!(
        "dashboard_browser: ad {HOT_AD} page == API == oracle: {} billable, {} fraud, {} late, \
         spend {} micros over {} per-minute points; campaign {CAMPAIGN}: {} billable, {} fraud, \
         {} late; screenshots {} and {}",
        shown.clicks,
        shown.fraud_clicks,
        shown.late_clicks,
        shown.spend_micros,
        ad["points"].as_array().map_or(0, Vec::len) / 3,
        campaign.clicks,
        campaign.fraud_clicks,
        campaign.late_clicks,
        screenshot.display(),
        demo_screenshot.display()
    );
}

// ---- what the test sends -----------------------------------------------------------------

/// Creates the test's advertiser and ads and sends their clicks: on time over the last
/// ~3 minutes, some twice, a few late (10 minutes old), an 8-click burst from one IP in
/// one second (fraud with at most 5 per IP and second), and verdicts for two counted
/// clicks. Returns the advertiser's key, the oracle and the last acknowledgement time.
fn send_own_clicks(server: &mut Server) -> (String, Oracle, u64) {
    let key = server.create_advertiser(ADVERTISER);
    let t = server.times().clone();
    let mut oracle = Oracle::new(
        t.lateness_s * 1000,
        t.ttl_s * 1000,
        t.max_clicks_per_ip_per_second,
    );
    for (ad, campaign, cpc, _) in ADS {
        server.put_ad(ad, ADVERTISER, campaign, cpc);
        oracle.ads.insert(
            ad,
            Ad {
                id: ad,
                campaign,
                advertiser: ADVERTISER,
            },
        );
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    let now = now_ms();
    let mut planned: Vec<(u64, String, String, u64, String)> = Vec::new(); // ad, impression, token, event, ip
    let mut ip_no = 0u32;
    let mut next_ip = || {
        ip_no += 1;
        // Benchmarking range, far from the demo's 10.x and 192.0.2.x senders: the IP rule
        // counts per IP across all ads.
        format!("198.18.{}.{}", ip_no / 250, 1 + ip_no % 250)
    };
    for (ad, _, _, on_time) in ADS {
        let late = if ad == HOT_AD { 5 } else { 1 };
        let burst = if ad == HOT_AD { 8 } else { 0 };
        let imps = server.impressions(ad, on_time + late + burst);
        let mut imps = imps.into_iter();
        for (imp, token) in imps.by_ref().take(on_time) {
            planned.push((
                ad,
                imp,
                token,
                now - rng.random_range(2_000..200_000),
                next_ip(),
            ));
        }
        for (imp, token) in imps.by_ref().take(late) {
            let event = now - rng.random_range(600_000..720_000);
            planned.push((ad, imp, token, event, next_ip()));
        }
        let second = (now - 60_000) / 1000 * 1000;
        for (imp, token) in imps.by_ref().take(burst) {
            let event = second + rng.random_range(0..1000);
            planned.push((ad, imp, token, event, "198.19.0.1".into()));
        }
    }
    // Repeats of some on-time clicks, later and earlier: each impression counts once.
    let repeats: Vec<_> = planned
        .iter()
        .filter(|(ad, ..)| *ad == HOT_AD)
        .take(6)
        .enumerate()
        .map(|(i, (ad, imp, token, event, ip))| {
            let shift = if i % 2 == 0 { 1_500 } else { 0 };
            let event = if i % 3 == 0 {
                event.saturating_sub(shift)
            } else {
                event + shift
            };
            (*ad, imp.clone(), token.clone(), event, ip.clone())
        })
        .collect();
    planned.extend(repeats);

    let prices: Vec<(u64, u64)> = ADS.iter().map(|a| (a.0, a.2)).collect();
    let clicks: Vec<Planned> = planned
        .iter()
        .enumerate()
        .map(|(k, (ad, imp, token, event, ip))| Planned {
            imp: Impression {
                id: imp.clone(),
                token: token.clone(),
                ad: *ad,
            },
            event_ms: *event,
            click_id: format!("c-{k}"),
            ip: ip.clone(),
            user: format!("u-{k}"),
        })
        .collect();
    let mut driver = Driver::new(server, 6, None);
    send_clicks(&mut driver, &mut oracle, &clicks, &prices, 25);
    // Verdicts for two on-time clicks of the hot ad (their windows are still open).
    let flagged: Vec<String> = planned
        .iter()
        .filter(|(ad, ..)| *ad == HOT_AD)
        .skip(10)
        .step_by(7)
        .take(2)
        .map(|(_, imp, ..)| imp.clone())
        .collect();
    send_verdicts(&mut driver, &mut oracle, &flagged);
    (key, oracle, now_ms())
}

/// The demo's advertiser key, from the file `serve --demo` saves them to.
fn demo_key(server: &Server) -> String {
    let path = server.data_dir().join("demo-advertisers.toml");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(key)) = clickagg::loadgen::saved_key(&path, DEMO_ADVERTISER) {
            return key;
        }
        assert!(
            Instant::now() < deadline,
            "serve --demo saved no key of advertiser {DEMO_ADVERTISER} in {}\n{}",
            path.display(),
            server.log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

// ---- the checks --------------------------------------------------------------------------

fn check_page_served(page: &Value) {
    let http = &page["http"];
    assert_eq!(http["status"], 200, "{http}");
    assert_eq!(http["content_type"], "text/html; charset=utf-8", "{http}");
    let csp = http["csp"].as_str().unwrap_or_default();
    assert!(
        csp.contains("script-src 'sha256-") && csp.contains("connect-src 'self'"),
        "{csp}"
    );
}

fn check_bad_key(page: &Value) {
    let bad = &page["bad_key"];
    let error = bad["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("Login failed") && error.contains("unknown API key"),
        "a bad key must say why on the page: {bad}"
    );
    assert_eq!(bad["dashboard_visible"], false, "{bad}");
    assert_eq!(bad["stored"]["session"], Value::Null, "{bad}");
}

/// The key lives in sessionStorage while logged in, nowhere else, and goes at logout.
fn check_storage(page: &Value, key: &str) {
    let during = &page["logged_in_storage"];
    let session = during["session"].as_str().unwrap_or_default();
    assert!(session.contains(key), "{during}");
    assert_eq!(during["local_storage_items"], 0, "{during}");
    assert_eq!(during["cookies"], "", "{during}");
    let after = &page["after_logout_storage"];
    assert_eq!(after["session"], Value::Null, "{after}");
}

/// One view of the page (`scope` "ad" or "campaign"): its points and totals equal the
/// API's series for the same range, which equals the oracle's. Returns the totals.
fn check_view(
    server: &Server,
    key: &str,
    oracle: &Oracle,
    view: &Value,
    scope: &str,
    id: u64,
) -> Measures {
    assert_eq!(view["scope"], format!("{scope}:{id}"), "{view}");
    assert_eq!(view["granularity"], "1m", "{view}");
    assert_eq!(view["error"], "", "{view}");
    let (from, to) = (
        view["from"].as_u64().expect("from"),
        view["to"].as_u64().expect("to"),
    );
    assert_eq!((to - from) / 60_000, 60, "the last hour per minute");
    let size = view["chart_size"].as_array().expect("chart size");
    assert!(
        size[0].as_f64().unwrap_or(0.0) > 600.0 && size[1].as_f64().unwrap_or(0.0) > 150.0,
        "the chart is drawn: {size:?}"
    );

    // The page: 60 windows x 3 series, keyed by window.
    let points = view["points"].as_array().expect("points");
    assert_eq!(points.len(), 60 * 3, "every window of every series");
    let mut page: BTreeMap<u64, Measures> = BTreeMap::new();
    for p in points {
        let window = parse_rfc3339(p["window"].as_str().expect("window"));
        assert!((from..to).contains(&window), "{p}");
        let m = page.entry(window).or_default();
        let value = p["value"].as_i64().expect("value");
        match p["series"].as_str() {
            Some("billable") => m.clicks = value,
            Some("fraud") => m.fraud_clicks = value,
            Some("late") => m.late_clicks = value,
            other => panic!("unknown series {other:?}"),
        }
    }
    page.retain(|_, m| !m.is_zero());

    // The API, read independently for the same range.
    let path = match scope {
        "ad" => format!("/v1/ads/{id}/clicks"),
        _ => format!("/v1/campaigns/{id}/clicks"),
    };
    let series = api(
        server,
        key,
        &format!("{path}?from={from}&to={to}&granularity=1m"),
    );
    let mut api_points: BTreeMap<u64, Measures> = BTreeMap::new();
    let mut api_total = Measures::default();
    for p in series["points"].as_array().expect("points") {
        let m = Measures {
            clicks: p["clicks"].as_i64().expect("clicks"),
            fraud_clicks: p["fraud_clicks"].as_i64().expect("fraud"),
            late_clicks: p["late_clicks"].as_i64().expect("late"),
            spend_micros: p["spend_micros"].as_i64().expect("spend"),
        };
        add(&mut api_total, &m);
        api_points.insert(
            parse_rfc3339(p["window_start"].as_str().expect("window")),
            Measures {
                spend_micros: 0,
                ..m
            },
        );
    }
    api_points.retain(|_, m| !m.is_zero());
    assert_eq!(
        page, api_points,
        "{scope} {id}: chart points differ from the API"
    );

    let shown = Measures {
        clicks: total(view, "billable"),
        fraud_clicks: total(view, "fraud"),
        late_clicks: total(view, "late"),
        spend_micros: total(view, "spend_micros"),
    };
    assert_eq!(shown, api_total, "{scope} {id}: totals differ from the API");

    // And the API equals the oracle of what was sent.
    let mut expected_points: BTreeMap<u64, Measures> = BTreeMap::new();
    let mut expected_total = Measures::default();
    for ((of, window), m) in oracle.series(scope, 60_000) {
        if of == id && (from..to).contains(&window) {
            add(&mut expected_total, &m);
            expected_points.insert(
                window,
                Measures {
                    spend_micros: 0,
                    ..m
                },
            );
        }
    }
    expected_points.retain(|_, m| !m.is_zero());
    assert_eq!(
        api_points, expected_points,
        "{scope} {id}: API differs from the oracle"
    );
    assert_eq!(
        api_total, expected_total,
        "{scope} {id}: API totals differ from the oracle"
    );
    shown
}

/// A total as the page shows it: its data value, and the same number in its text.
fn total(view: &Value, name: &str) -> i64 {
    let t = &view["totals"][name];
    let value = t["value"].as_i64().unwrap_or_else(|| panic!("{name}: {t}"));
    let text: String = t["text"]
        .as_str()
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_digit() || *c == '-')
        .collect();
    let expected_text = if name == "spend_micros" {
        // Shown in currency units with two decimals.
        format!("{}", value / 10_000)
    } else {
        value.to_string()
    };
    assert_eq!(text, expected_text, "{name}: the text shows the value: {t}");
    value
}

fn add(sum: &mut Measures, m: &Measures) {
    sum.clicks += m.clicks;
    sum.fraud_clicks += m.fraud_clicks;
    sum.late_clicks += m.late_clicks;
    sum.spend_micros += m.spend_micros;
}

/// The top-ads rows equal the API's for the same range, which equal the oracle's.
fn check_top_ads(server: &Server, key: &str, oracle: &Oracle, view: &Value) {
    let (from, to) = (
        view["from"].as_u64().expect("from"),
        view["to"].as_u64().expect("to"),
    );
    let rows = |ads: &Value| -> Vec<(u64, Measures)> {
        ads.as_array()
            .expect("ads")
            .iter()
            .map(|a| {
                let id = match &a["ad_id"] {
                    Value::String(s) => s.parse().expect("ad id"),
                    v => v.as_u64().expect("ad id"),
                };
                (
                    id,
                    Measures {
                        clicks: a["clicks"].as_i64().expect("clicks"),
                        fraud_clicks: a["fraud_clicks"].as_i64().expect("fraud"),
                        late_clicks: a["late_clicks"].as_i64().expect("late"),
                        spend_micros: a["spend_micros"].as_i64().expect("spend"),
                    },
                )
            })
            .collect()
    };
    let shown = rows(&view["top_ads"]);
    let top = api(
        server,
        key,
        &format!("/v1/advertisers/{ADVERTISER}/top-ads?from={from}&to={to}&limit=10"),
    );
    assert_eq!(shown, rows(&top["ads"]), "top ads differ from the API");
    let mut expected: Vec<(u64, Measures)> =
        oracle.ad_totals(ADVERTISER, from, to).into_iter().collect();
    expected.sort_by(|(a, x), (b, y)| {
        (y.clicks, y.spend_micros, a).cmp(&(x.clicks, x.spend_micros, b))
    });
    assert_eq!(shown, expected, "top ads differ from the oracle");
    assert_eq!(shown.len(), ADS.len());
}

/// The demo advertiser's numbers, under live traffic, changed on the page without a
/// reload, and were never blank.
fn check_live_demo(page: &Value) {
    let demo = &page["demo"];
    let (first, later) = (&demo["first"], &demo["later"]);
    let billable = |v: &Value| v["totals"]["billable"]["value"].as_i64().unwrap_or(0);
    assert!(
        billable(first) > 0,
        "demo advertiser shows no clicks: {first}"
    );
    assert!(
        later["refreshes"].as_u64() > first["refreshes"].as_u64(),
        "the page did not refresh by itself"
    );
    assert_ne!(
        billable(first),
        billable(later),
        "live numbers did not move"
    );
    assert!(
        !later["top_ads"].as_array().expect("top ads").is_empty(),
        "{later}"
    );
}

fn api(server: &Server, key: &str, path: &str) -> Value {
    let r = server.get(key, path);
    let status = r.status();
    let body: Value = r.json().expect("json");
    assert_eq!(status, 200, "GET {path}: {body}");
    body
}

/// Width and height from a PNG's IHDR; panics unless the file is a non-trivial PNG.
fn png_size(path: &Path) -> (u32, u32) {
    let bytes =
        std::fs::read(path).unwrap_or_else(|e| panic!("no screenshot at {}: {e}", path.display()));
    assert!(
        bytes.len() > 20_000,
        "{}: only {} bytes",
        path.display(),
        bytes.len()
    );
    assert_eq!(
        &bytes[..8],
        b"\x89PNG\r\n\x1a\n",
        "{} is not a PNG",
        path.display()
    );
    assert_eq!(&bytes[12..16], b"IHDR");
    let be = |i: usize| u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    (be(16), be(20))
}

// ---- the browser and its driver ----------------------------------------------------------

/// Runs the driver script; what the page showed, as JSON.
fn run_browser(config: &Value) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/dashboard.mjs");
    let out = PathBuf::from(config["out"].as_str().expect("out"));
    let _ = std::fs::remove_file(&out);
    let mut child = Command::new("node")
        .arg(&script)
        .arg(config.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run node (Node.js 18 or newer is needed): {e}"));
    let deadline = Instant::now() + Duration::from_secs(240);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for node") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the browser script did not finish in 240 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = child.wait_with_output().expect("node output");
    let report = std::fs::read_to_string(&out).unwrap_or_default();
    assert!(
        status.success(),
        "the browser script failed ({status}):\nstdout:\n{}\nstderr:\n{}\nwhat it saw:\n{report}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(&report).unwrap_or_else(|e| panic!("{}: {e}: {report}", out.display()))
}

/// Debian's Chromium: `$CLICKAGG_CHROMIUM`, else `/usr/bin/chromium`, installed with
/// apt-get when missing.
fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("CLICKAGG_CHROMIUM") {
        return PathBuf::from(path);
    }
    let path = PathBuf::from("/usr/bin/chromium");
    if !path.exists() {
        eprintln!("no /usr/bin/chromium: installing Debian's chromium (once per machine)");
        let install = || {
            Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends", "chromium"])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status()
                .is_ok_and(|s| s.success())
        };
        if !install() {
            // A fresh machine may have no package lists yet.
            let _ = Command::new("apt-get").arg("update").status();
            install();
        }
    }
    assert!(
        path.exists(),
        "this test needs Debian's chromium at /usr/bin/chromium and could not install it: \
         run `apt-get install -y chromium` as root (or set CLICKAGG_CHROMIUM)"
    );
    path
}

/// npm's playwright-core in `~/.cache/clickagg/node`, installed when missing; its
/// `node_modules` directory.
fn playwright_core() -> PathBuf {
    let home = std::env::var_os("HOME").expect("HOME");
    let dir = Path::new(&home).join(".cache/clickagg/node");
    let manifest = dir.join("node_modules/playwright-core/package.json");
    let installed = || {
        std::fs::read_to_string(&manifest)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .is_some_and(|m| m["version"] == PLAYWRIGHT_CORE)
    };
    if !installed() {
        eprintln!(
            "installing playwright-core {PLAYWRIGHT_CORE} from npm into {}",
            dir.display()
        );
        std::fs::create_dir_all(&dir).expect("node cache dir");
        let status = Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--prefix"])
            .arg(&dir)
            .arg(format!("playwright-core@{PLAYWRIGHT_CORE}"))
            // playwright-core downloads no browser, but make sure: we use Debian's.
            .env("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
            .stdin(Stdio::null())
            .status();
        if let Err(e) = &status {
            eprintln!("npm: {e}");
        }
    }
    assert!(
        installed(),
        "this test needs npm's playwright-core {PLAYWRIGHT_CORE} and could not install it: \
         `npm install --prefix ~/.cache/clickagg/node playwright-core@{PLAYWRIGHT_CORE}`"
    );
    dir.join("node_modules")
}
