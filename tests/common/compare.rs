//! Comparing what a deployment answers with the oracle: every window of every scope at
//! every granularity, the top ads and the late clicks.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::Value;

use super::oracle::{GRANULARITIES, Measures, Oracle};
use super::{Target, parse_rfc3339};

pub fn measures(p: &Value) -> Measures {
    let n = |k: &str| p[k].as_i64().unwrap_or_else(|| panic!("{k} in {p}"));
    Measures {
        clicks: n("clicks"),
        fraud_clicks: n("fraud_clicks"),
        late_clicks: n("late_clicks"),
        spend_micros: n("spend_micros"),
    }
}

/// The query range that covers the whole run at every granularity.
pub fn span(oracle: &Oracle) -> (u64, u64) {
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
pub fn assert_matches_oracle(server: &dyn Target, oracle: &Oracle) -> usize {
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

pub fn wait_counted(server: &dyn Target, oracle: &Oracle, through: u64) -> Duration {
    let ad = *oracle.ads.keys().next().expect("ads");
    server.wait_complete_through(ad, through, Duration::from_secs(120))
}
