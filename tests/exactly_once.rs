//! Acceptance 1 and 2 of the embedded pipeline: a randomised workload through the real
//! `clickagg serve` binary, compared window by window with an independent oracle; then
//! the same workload while the server is SIGKILLed three times.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::oracle::{GRANULARITIES, Measures, Oracle};
use common::workload::{Chaos, Driver, WorkloadSpec};
use common::{Server, TestTimes, parse_rfc3339};
use rand::{RngExt, SeedableRng};
use serde_json::Value;

fn measures(p: &Value) -> Measures {
    let n = |k: &str| p[k].as_i64().unwrap_or_else(|| panic!("{k} in {p}"));
    Measures {
        clicks: n("clicks"),
        fraud_clicks: n("fraud_clicks"),
        late_clicks: n("late_clicks"),
        spend_micros: n("spend_micros"),
    }
}

/// The query range that covers the whole run at every granularity.
fn span(oracle: &Oracle) -> (u64, u64) {
    let day = 86_400_000;
    let min = oracle
        .clicks
        .iter()
        .map(|c| c.event_ms)
        .min()
        .expect("clicks");
    let max = oracle
        .clicks
        .iter()
        .map(|c| c.ack_ms)
        .max()
        .expect("clicks");
    (min / day * day, (max / day + 1) * day)
}

/// Every series point of every ad, campaign and advertiser at every granularity, every
/// advertiser's top ads and every ad's late clicks equal the oracle. Returns how many
/// windows were compared.
fn assert_matches_oracle(server: &Server, oracle: &Oracle) -> usize {
    let (from, to) = span(oracle);
    let ids = |scope: &str| -> BTreeSet<u64> {
        oracle
            .ads
            .values()
            .map(|a| match scope {
                "ad" => a.id,
                "campaign" => a.campaign,
                _ => a.advertiser,
            })
            .collect()
    };
    let mut compared = 0;
    for (scope, path) in [
        ("ad", "ads"),
        ("campaign", "campaigns"),
        ("advertiser", "advertisers"),
    ] {
        for (g, g_ms) in GRANULARITIES {
            let expected = oracle.series(scope, g_ms);
            for id in ids(scope) {
                let body = server.get_json(&format!(
                    "/v1/{path}/{id}/clicks?granularity={g}&from={from}&to={to}"
                ));
                assert_eq!(body["granularity"], g);
                let got: BTreeMap<u64, Measures> = body["points"]
                    .as_array()
                    .expect("points")
                    .iter()
                    .map(|p| {
                        (
                            parse_rfc3339(p["window_start"].as_str().expect("start")),
                            measures(p),
                        )
                    })
                    .filter(|(_, m)| !m.is_zero())
                    .collect();
                let want: BTreeMap<u64, Measures> = expected
                    .range((id, 0)..(id + 1, 0))
                    .map(|((_, w), m)| (*w, *m))
                    .collect();
                assert_eq!(got, want, "{scope} {id} at {g}");
                compared += want.len();
            }
        }
    }
    for advertiser in ids("advertiser") {
        let body = server.get_json(&format!(
            "/v1/advertisers/{advertiser}/top-ads?from={from}&to={to}&limit=1000"
        ));
        let ads = body["ads"].as_array().expect("ads");
        let got: BTreeMap<u64, Measures> = ads
            .iter()
            .map(|a| (a["ad_id"].as_u64().expect("ad_id"), measures(a)))
            .filter(|(_, m)| !m.is_zero())
            .collect();
        assert_eq!(
            got,
            oracle.ad_totals(advertiser, from, to),
            "top ads of {advertiser}"
        );
        let order: Vec<i64> = ads
            .iter()
            .map(|a| a["clicks"].as_i64().expect("clicks"))
            .collect();
        assert!(
            order.windows(2).all(|w| w[0] >= w[1]),
            "top ads not by clicks: {order:?}"
        );
    }
    for ad in oracle.ads.keys() {
        let body = server.get_json(&format!("/v1/ads/{ad}/late-clicks?from={from}&to={to}"));
        let got: BTreeMap<String, u64> = body["late_clicks"]
            .as_array()
            .expect("late_clicks")
            .iter()
            .map(|c| {
                (
                    c["impression_id"].as_str().expect("impression").to_string(),
                    parse_rfc3339(c["event_time"].as_str().expect("event_time")),
                )
            })
            .collect();
        assert_eq!(got, oracle.late_clicks(*ad), "late clicks of ad {ad}");
    }
    compared
}

fn wait_counted(server: &Server, oracle: &Oracle, through: u64) -> Duration {
    let ad = *oracle.ads.keys().next().expect("ads");
    server.wait_complete_through(ad, through, Duration::from_secs(120))
}

#[test]
fn randomised_workload_equals_oracle() {
    let mut server = Server::start(TestTimes::default());
    let spec = WorkloadSpec {
        seed: 7,
        impressions_per_phase: 25_000,
        batch_size: 500,
        redirects: 300,
        check_between_phases: true,
    };
    let started = Instant::now();
    let mut driver = Driver::new(&mut server, spec.seed, None);
    let (oracle, last_ack) = common::workload::run(&mut driver, &spec, |d, oracle, last_ack| {
        // Phase one counted before verdicts arrive: the verdicts below must then subtract.
        wait_counted(d.server, oracle, last_ack);
        let windows = assert_matches_oracle(d.server, oracle);
        assert!(windows > 100, "phase one compared only {windows} windows");
    });
    let retries = driver.retries;
    assert_eq!(retries, 0, "no request should need a retry without crashes");
    wait_counted(&server, &oracle, last_ack);
    let windows = assert_matches_oracle(&server, &oracle);

    let counts = oracle.class_counts();
    eprintln!(
        "sent {} clicks for {} impressions in {:?}: {counts:?}; {windows} windows compared",
        oracle.clicks.len(),
        oracle.counted().len(),
        started.elapsed()
    );
    assert!(oracle.clicks.len() >= 50_000);
    let impressions = oracle.counted().len();
    let duplicates = oracle.clicks.len() - impressions;
    assert!(
        duplicates * 10 >= oracle.clicks.len(),
        "only {duplicates} of {} clicks are duplicates; the issue asks for 10%",
        oracle.clicks.len()
    );
    for class in [
        common::oracle::Class::Billable,
        common::oracle::Class::Fraud,
        common::oracle::Class::Late,
    ] {
        assert!(
            counts.get(&class).copied().unwrap_or(0) > 20,
            "few {class:?}: {counts:?}"
        );
    }
}

#[test]
fn sigkill_three_times_equals_oracle() {
    let mut server = Server::start(TestTimes::default());
    let seed = 11 + std::process::id() as u64 % 1000;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // The workload makes 230 to 260 requests (catalog, impressions, click batches,
    // verdicts, price changes); two kills land among the click batches at random, the
    // third while the dataflow catches up after the last click.
    let mut kills = BTreeSet::new();
    while kills.len() < 2 {
        kills.insert(rng.random_range(60..200u64));
    }
    let spec = WorkloadSpec {
        seed,
        impressions_per_phase: 25_000,
        batch_size: 500,
        redirects: 0,
        check_between_phases: false,
    };
    eprintln!("seed {seed}, kills before requests {kills:?}");
    let mut driver = Driver::new(
        &mut server,
        seed,
        Some(Chaos {
            kill_at_requests: kills,
            kills: 0,
        }),
    );
    let (oracle, last_ack) = common::workload::run(&mut driver, &spec, |_, _, _| {});
    std::thread::sleep(Duration::from_millis(rng.random_range(0..1500)));
    driver.kill_soon();
    let kills = driver.chaos.as_ref().map(|c| c.kills).unwrap_or(0);
    let (retries, requests) = (driver.retries, driver.requests);
    std::thread::sleep(Duration::from_millis(200));
    server.restart();
    assert_eq!(kills, 3);
    assert_eq!(
        server.starts, 4,
        "the server must have been restarted after each kill"
    );
    eprintln!("{requests} requests, {retries} of them retried");

    wait_counted(&server, &oracle, last_ack);
    let windows = assert_matches_oracle(&server, &oracle);
    eprintln!("{windows} windows equal the oracle after 3 SIGKILLs");

    // Every acknowledged click is in the log (at least once; the dataflow dedups).
    let logged: BTreeSet<String> = common::log_records(&server.data_dir(), 0)
        .into_iter()
        .map(|(_, payload)| {
            use clickagg::record::Payload;
            clickagg::record::ClickEvent::decode(&payload)
                .expect("decodable click")
                .click_id
        })
        .collect();
    let missing: Vec<&String> = oracle
        .clicks
        .iter()
        .filter_map(|c| c.click_id.as_ref())
        .filter(|id| !logged.contains(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged clicks missing",
        missing.len()
    );
}
