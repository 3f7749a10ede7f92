//! The behaviour every [`Store`] shares, as tests run against each store (SQLite and
//! Postgres), so that the two cannot drift. A store's test module instantiates them all
//! with [`conformance_tests!`] and a [`Backend`] that opens fresh stores.

use std::collections::{BTreeMap, HashMap};

use super::{
    Ad, AdjustmentTotals, ChangeBatch, FraudAdjustment, Measures, MetricScope, RecoveryPoint,
    Store, StoreError, Upserted, ViewChanges,
};
use crate::log::LogPosition;
use crate::record::{PartitionId, Topic};
use crate::time::{Granularity, Millis, Time};
use crate::views::{Datum, Row};

/// Progress retention every backend opens its stores with.
pub(crate) const RETENTION_MS: u64 = 1_000;

/// One fresh, empty backing store (a temporary directory, a new database).
pub(crate) trait Backend {
    /// Opens a store on it, with query pool size 2 and [`RETENTION_MS`]. Every call opens
    /// another handle on the same data, as a second process would.
    fn open(&self) -> Result<Box<dyn Store>, StoreError>;
    /// Runs SQL directly, to tamper with the store behind its back.
    fn execute(&self, sql: &str);
    /// The single integer an SQL query returns, to look behind the trait.
    fn query_i64(&self, sql: &str) -> i64;
}

/// Instantiates every conformance test for a backend expression, in a `conformance` module.
macro_rules! conformance_tests {
    ($backend:expr) => {
        mod conformance {
            #[allow(unused_imports)]
            use super::*;
            $crate::store::conformance::conformance_tests!(@each $backend;
                one_writer_per_store_and_a_dead_one_releases_it,
                rollups_equal_the_sum_of_stored_rows_through_updates_and_moves,
                a_rollup_window_emptied_across_commits_leaves_no_row,
                random_changes_keep_rollups_equal_to_the_stored_rows,
                recovery_point_replays_from_the_horizon_and_pins_the_tick,
                progress_is_pruned_beyond_the_retention,
                an_empty_store_answers_with_nothing,
                catalog_rules_hold,
                late_clicks_and_views_without_rollups_round_trip,
                fraud_adjustments_list_and_total_by_scope,
                reconcile_corrections_are_atomic_and_fix_the_rollups,
                a_view_table_that_differs_from_its_declaration_is_refused
            );
        }
    };
    (@each $backend:expr; $($name:ident),*) => {
        $(
            #[test]
            fn $name() {
                $crate::store::conformance::$name(&$backend);
            }
        )*
    };
}
pub(crate) use conformance_tests;

fn open(b: &dyn Backend) -> Box<dyn Store> {
    b.open().unwrap_or_else(|e| panic!("open: {e}"))
}

fn claimed(b: &dyn Backend) -> Box<dyn Store> {
    let s = open(b);
    s.claim_writer().expect("claim");
    s
}

fn view_index(name: &str) -> usize {
    crate::dataflows::VIEWS
        .iter()
        .position(|v| v.name == name)
        .expect("registered view")
}

fn partition(topic: Topic, partition: u32) -> PartitionId {
    PartitionId { topic, partition }
}

/// A batch of `ad_clicks` changes, with a position per upper.
pub(crate) fn batch(upper: Time, rows: Vec<(Row, Option<Row>)>) -> ChangeBatch {
    let mut b = ChangeBatch {
        upper,
        views: vec![ViewChanges::new(); crate::dataflows::VIEWS.len()],
        positions: BTreeMap::from([(
            partition(Topic::Clicks, 0),
            LogPosition {
                offset: upper,
                time_floor_ms: upper,
            },
        )]),
    };
    b.views[view_index("ad_clicks")] = rows.into_iter().collect();
    b
}

/// An `ad_clicks` row of advertiser 7.
pub(crate) fn minute_row(ad: u64, w: Millis, campaign: u64, clicks: i64, spend: i64) -> (Row, Row) {
    ad_clicks_row(ad, w, campaign, 7, [clicks, 0, 0, spend])
}

fn ad_clicks_row(ad: u64, w: Millis, campaign: u64, advertiser: u64, m: [i64; 4]) -> (Row, Row) {
    (
        vec![Datum::Id(ad), Datum::Time(w)],
        vec![
            Datum::Id(campaign),
            Datum::Id(advertiser),
            Datum::Int(m[0]),
            Datum::Int(m[1]),
            Datum::Int(m[2]),
            Datum::Int(m[3]),
        ],
    )
}

/// Only one store handle commits at a time, and its claim dies with it.
pub(crate) fn one_writer_per_store_and_a_dead_one_releases_it(b: &dyn Backend) {
    let first = open(b);
    assert!(
        matches!(
            first.commit(&batch(1_000, vec![])),
            Err(StoreError::Fenced(_))
        ),
        "no commit without a claim"
    );
    assert_eq!(first.claim_writer().expect("claim").generation, 1);
    assert_eq!(
        first.claim_writer().expect("claim again").generation,
        1,
        "claiming twice is one claim"
    );
    first.commit(&batch(1_000, vec![])).expect("commit");
    let second = open(b);
    assert!(matches!(second.claim_writer(), Err(StoreError::Fenced(_))));
    first
        .commit(&batch(1_500, vec![]))
        .expect("the first writer goes on after a refused claim");
    drop(first);
    assert_eq!(
        second
            .claim_writer()
            .expect("claim after release")
            .generation,
        2
    );
    second.commit(&batch(2_000, vec![])).expect("commit");
    assert_eq!(second.committed_frontier().expect("frontier"), Some(2_000));
}

/// Rollups follow updates, moves between campaigns and deletes; replays are skipped.
pub(crate) fn rollups_equal_the_sum_of_stored_rows_through_updates_and_moves(b: &dyn Backend) {
    let s = claimed(b);
    let (k1, v1) = minute_row(1, 60_000, 70, 3, 300);
    let (k2, v2) = minute_row(1, 120_000, 70, 2, 200);
    s.commit(&batch(
        1_000,
        vec![(k1.clone(), Some(v1)), (k2.clone(), Some(v2))],
    ))
    .expect("c1");
    // k1 grows, and the ad moves to campaign 71 for k2.
    let (_, v1b) = minute_row(1, 60_000, 70, 5, 500);
    let (_, v2b) = minute_row(1, 120_000, 71, 2, 200);
    s.commit(&batch(
        2_000,
        vec![(k1.clone(), Some(v1b)), (k2.clone(), Some(v2b))],
    ))
    .expect("c2");

    let five = s
        .click_series(MetricScope::Ad, 1, Granularity::FiveMinutes, 0, 600_000)
        .expect("series");
    assert_eq!(
        five,
        vec![(
            0,
            Measures {
                clicks: 7,
                spend_micros: 700,
                ..Default::default()
            }
        )]
    );
    let minutes = s
        .click_series(MetricScope::Ad, 1, Granularity::Minute, 0, 600_000)
        .expect("series");
    assert_eq!(
        minutes
            .iter()
            .map(|(w, m)| (*w, m.clicks))
            .collect::<Vec<_>>(),
        vec![(60_000, 5), (120_000, 2)],
        "per-ad minutes come from the view table"
    );
    let c70 = s
        .click_series(MetricScope::Campaign, 70, Granularity::Hour, 0, 3_600_000)
        .expect("series");
    assert_eq!(c70[0].1.clicks, 5);
    let c71 = s
        .click_series(MetricScope::Campaign, 71, Granularity::Minute, 0, 3_600_000)
        .expect("series");
    assert_eq!(
        c71,
        vec![(
            120_000,
            Measures {
                clicks: 2,
                spend_micros: 200,
                ..Default::default()
            }
        )]
    );

    // A replayed batch (same or older upper) is skipped, not applied twice.
    s.commit(&batch(
        2_000,
        vec![(k1.clone(), Some(minute_row(1, 60_000, 70, 99, 0).1))],
    ))
    .expect("dup");
    s.commit(&batch(
        1_500,
        vec![(k1.clone(), Some(minute_row(1, 60_000, 70, 98, 0).1))],
    ))
    .expect("older");
    let adv = s
        .click_series(MetricScope::Advertiser, 7, Granularity::Day, 0, 86_400_000)
        .expect("series");
    assert_eq!(adv[0].1.clicks, 7);
    assert_eq!(s.committed_frontier().expect("frontier"), Some(2_000));

    // Deleting a row takes it out of the rollups; deleting a missing one changes nothing.
    let (missing, _) = minute_row(1, 180_000, 70, 0, 0);
    s.commit(&batch(3_000, vec![(k1, None), (missing, None)]))
        .expect("c3");
    let adv = s
        .click_series(MetricScope::Advertiser, 7, Granularity::Day, 0, 86_400_000)
        .expect("series");
    assert_eq!(adv[0].1.clicks, 2);
    assert_eq!(s.committed_frontier().expect("frontier"), Some(3_000));
}

/// Rollup rows whose measures are all zero: there must be none.
const ZERO_ROLLUP_ROWS: &str = "SELECT count(*) FROM v_ad_clicks_rollup \
     WHERE clicks = 0 AND fraud_clicks = 0 AND late_clicks = 0 AND spend_micros = 0";

/// A window whose rows are deleted or moved away in a later commit has no rollup row,
/// the same as if the rows had never been committed: what is stored must not depend on
/// how the changes were split into commits (one worker and four commit at other times).
pub(crate) fn a_rollup_window_emptied_across_commits_leaves_no_row(b: &dyn Backend) {
    let s = claimed(b);
    let (k1, v1) = minute_row(1, 60_000, 70, 3, 300);
    let (k2, v2) = minute_row(1, 120_000, 70, 2, 200);
    s.commit(&batch(
        1_000,
        vec![(k1.clone(), Some(v1)), (k2.clone(), Some(v2))],
    ))
    .expect("c1");
    assert!(b.query_i64("SELECT count(*) FROM v_ad_clicks_rollup") > 0);
    // k1 goes, k2 moves to campaign 71: campaign 70 is left with nothing.
    let (_, v2b) = minute_row(1, 120_000, 71, 2, 200);
    s.commit(&batch(2_000, vec![(k1, None), (k2.clone(), Some(v2b))]))
        .expect("c2");
    for g in Granularity::ALL {
        let c70 = s
            .click_series(MetricScope::Campaign, 70, g, 0, 86_400_000)
            .expect("series");
        assert!(c70.is_empty(), "campaign 70 at {g:?}: {c70:?}");
    }
    let c71 = s
        .click_series(
            MetricScope::Campaign,
            71,
            Granularity::Minute,
            0,
            86_400_000,
        )
        .expect("series");
    assert_eq!(
        c71.iter().map(|(w, m)| (*w, m.clicks)).collect::<Vec<_>>(),
        vec![(120_000, 2)]
    );
    assert_eq!(b.query_i64(ZERO_ROLLUP_ROWS), 0);

    // The last row goes: no rollup row is left for any scope.
    s.commit(&batch(3_000, vec![(k2, None)])).expect("c3");
    assert_eq!(b.query_i64("SELECT count(*) FROM v_ad_clicks_rollup"), 0);
    for g in Granularity::ALL {
        let adv = s
            .click_series(MetricScope::Advertiser, 7, g, 0, 86_400_000)
            .expect("series");
        assert!(adv.is_empty(), "advertiser 7 at {g:?}: {adv:?}");
    }
}

/// A small deterministic generator (splitmix64), so a failure replays exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn nonzero(points: Vec<(Millis, Measures)>) -> Vec<(Millis, Measures)> {
    points
        .into_iter()
        .filter(|(_, m)| *m != Measures::default())
        .collect()
}

/// Many batches of upserts, campaign moves and deletes, with ids up to `u64::MAX`: every
/// rollup window and every top-ads total equals the sum of the rows a model says are stored.
pub(crate) fn random_changes_keep_rollups_equal_to_the_stored_rows(b: &dyn Backend) {
    let s = claimed(b);
    // (ad, advertiser, its campaigns)
    let ads: [(u64, u64, [u64; 2]); 5] = [
        (1, 7, [70, 71]),
        (2, 7, [70, 71]),
        (u64::MAX, 7, [70, 71]),
        (4, u64::MAX - 1, [80, u64::MAX - 2]),
        (5, u64::MAX - 1, [80, u64::MAX - 2]),
    ];
    for adv in [7, u64::MAX - 1] {
        s.create_advertiser(adv, "adv", &[adv as u8; 32])
            .expect("advertiser");
    }
    for (ad, adv, campaigns) in ads {
        s.upsert_ad(&Ad {
            ad_id: ad,
            advertiser_id: adv,
            campaign_id: campaigns[0],
            landing_url: "https://a.example/".into(),
            cpc_micros: 1,
        })
        .expect("ad");
    }
    let day = Granularity::Day.ms();
    let windows: Vec<Millis> = (0..130)
        .map(|m| m * 60_000)
        .chain((0..70).map(|m| day + m * 60_000))
        .collect();
    let mut rng = Rng(42);
    let mut model: BTreeMap<(u64, Millis), (u64, u64, [i64; 4])> = BTreeMap::new();
    for round in 0..24u64 {
        let mut rows: HashMap<Row, Option<Row>> = HashMap::new();
        for _ in 0..(10 + (round % 5) * 60) {
            let (ad, adv, campaigns) = ads[rng.below(ads.len() as u64) as usize];
            let w = windows[rng.below(windows.len() as u64) as usize];
            if rng.below(4) == 0 {
                rows.insert(vec![Datum::Id(ad), Datum::Time(w)], None);
                model.remove(&(ad, w));
            } else {
                let campaign = campaigns[rng.below(2) as usize];
                let m = [0, 1, 2, 3].map(|i| (rng.below(50) as i64) * (i + 1));
                let (k, v) = ad_clicks_row(ad, w, campaign, adv, m);
                rows.insert(k, Some(v));
                model.insert((ad, w), (campaign, adv, m));
            }
        }
        s.commit(&batch((round + 1) * 1_000, rows.into_iter().collect()))
            .expect("commit");
    }

    let sum = |filter: &dyn Fn(u64, u64, u64) -> bool, g: Granularity| {
        let mut out: BTreeMap<Millis, Measures> = BTreeMap::new();
        for (&(ad, w), &(campaign, adv, m)) in &model {
            if filter(ad, campaign, adv) {
                out.entry(g.align(w)).or_default().add(&Measures {
                    clicks: m[0],
                    fraud_clicks: m[1],
                    late_clicks: m[2],
                    spend_micros: m[3],
                });
            }
        }
        nonzero(out.into_iter().collect())
    };
    let mut checked = 0;
    for g in Granularity::ALL {
        for (ad, adv, campaigns) in ads {
            let series =
                |scope, id| nonzero(s.click_series(scope, id, g, 0, 2 * day).expect("series"));
            assert_eq!(
                series(MetricScope::Ad, ad),
                sum(&|a, _, _| a == ad, g),
                "ad {ad} at {g:?}"
            );
            for c in campaigns {
                assert_eq!(
                    series(MetricScope::Campaign, c),
                    sum(&|_, cc, _| cc == c, g),
                    "campaign {c} at {g:?}"
                );
            }
            let expected = sum(&|_, _, aa| aa == adv, g);
            assert_eq!(
                series(MetricScope::Advertiser, adv),
                expected,
                "advertiser {adv} at {g:?}"
            );
            checked += expected.len();
        }
    }
    assert!(
        checked > 50,
        "the model stored too little to check ({checked})"
    );

    // Top-ads totals over a range that is not aligned to hours or days.
    let (from, to) = (7 * 60_000, day + 53 * 60_000);
    for adv in [7, u64::MAX - 1] {
        let mut expected: BTreeMap<u64, Measures> = BTreeMap::new();
        for (&(ad, w), &(_, a, m)) in &model {
            if a == adv && w >= from && w < to {
                expected.entry(ad).or_default().add(&Measures {
                    clicks: m[0],
                    fraud_clicks: m[1],
                    late_clicks: m[2],
                    spend_micros: m[3],
                });
            }
        }
        let expected: Vec<(u64, Measures)> = expected
            .into_iter()
            .filter(|(_, m)| *m != Measures::default())
            .collect();
        let totals: Vec<(u64, Measures)> = s
            .ad_totals(adv, from, to)
            .expect("totals")
            .into_iter()
            .filter(|(_, m)| *m != Measures::default())
            .collect();
        assert!(!expected.is_empty());
        assert_eq!(totals, expected, "top ads of advertiser {adv}");
    }
}

/// The recovery point: the last commit, the replay positions one horizon back, a pinned tick.
pub(crate) fn recovery_point_replays_from_the_horizon_and_pins_the_tick(b: &dyn Backend) {
    let s = claimed(b);
    assert_eq!(
        s.recovery_point(200, 500).expect("empty"),
        RecoveryPoint::default()
    );
    for upper in [1_000, 1_400, 1_800, 2_200] {
        let mut c = batch(upper, vec![]);
        c.positions.insert(
            partition(Topic::FraudVerdicts, 3),
            LogPosition {
                offset: u64::MAX - upper,
                time_floor_ms: upper + 1,
            },
        );
        s.commit(&c).expect("commit");
    }
    let rp = s.recovery_point(200, 500).expect("rp");
    assert_eq!(rp.as_of, 2_200);
    assert_eq!(
        rp.committed,
        BTreeMap::from([
            (
                partition(Topic::Clicks, 0),
                LogPosition {
                    offset: 2_200,
                    time_floor_ms: 2_200
                }
            ),
            (
                partition(Topic::FraudVerdicts, 3),
                LogPosition {
                    offset: u64::MAX - 2_200,
                    time_floor_ms: 2_201
                }
            ),
        ])
    );
    // Last commit at or before 2200 - 500 = 1700 is 1400.
    assert_eq!(
        rp.replay_from
            .get(&partition(Topic::Clicks, 0))
            .map(|p| p.offset),
        Some(1_400)
    );
    let err = s.recovery_point(100, 500).expect_err("tick changed");
    assert!(
        matches!(err, StoreError::Inconsistent(_)) && err.to_string().contains("time.tick"),
        "{err}"
    );
    drop(s);
    let again = open(b);
    assert!(
        again.recovery_point(100, 500).is_err(),
        "the tick stays pinned for every later process"
    );
    assert_eq!(again.recovery_point(200, 500).expect("rp"), rp);
}

/// Progress rows older than the last one at or before `upper - retention` are pruned.
pub(crate) fn progress_is_pruned_beyond_the_retention(b: &dyn Backend) {
    let s = claimed(b);
    for upper in [1_000, 1_400, 1_800, 2_200, 2_600, 3_000] {
        s.commit(&batch(upper, vec![])).expect("commit");
    }
    // At 3000 with a retention of 1000, the last commit at or before 2000 is 1800.
    assert_eq!(RETENTION_MS, 1_000);
    assert_eq!(b.query_i64("SELECT count(*) FROM progress"), 4);
    assert_eq!(b.query_i64("SELECT min(upper) FROM progress"), 1_800);
    let rp = s.recovery_point(200, 1_000).expect("rp");
    assert_eq!(
        rp.replay_from.values().next().map(|p| p.offset),
        Some(1_800)
    );
    let rp = s.recovery_point(200, 1_300).expect("rp");
    assert!(
        rp.replay_from.is_empty(),
        "no commit left one horizon back: replay from the start"
    );
}

/// A new store has nothing committed and answers every query with nothing.
pub(crate) fn an_empty_store_answers_with_nothing(b: &dyn Backend) {
    let s = open(b);
    s.check().expect("check");
    assert_eq!(s.committed_frontier().expect("frontier"), None);
    assert_eq!(
        s.click_series(MetricScope::Campaign, 1, Granularity::Hour, 0, 86_400_000)
            .expect("series"),
        vec![]
    );
    assert_eq!(s.ad_totals(1, 0, 86_400_000).expect("totals"), vec![]);
    assert_eq!(s.late_clicks(1, 0, 86_400_000, 10).expect("late"), vec![]);
    let none = s
        .fraud_adjustments(MetricScope::Advertiser, 1, 0, 86_400_000, 10)
        .expect("adjustments");
    assert_eq!(
        (none.rows, none.totals),
        (vec![], AdjustmentTotals::default())
    );
    assert_eq!(s.ads().expect("ads"), vec![]);
    assert_eq!(s.ad(1).expect("ad"), None);
    assert!(!s.advertiser_exists(1).expect("exists"));
    assert_eq!(s.advertiser_for_key(&[0; 32]).expect("key"), None);
}

/// Advertisers, campaigns owned by one advertiser, ads that keep their advertiser.
pub(crate) fn catalog_rules_hold(b: &dyn Backend) {
    let s = claimed(b);
    let ad = Ad {
        ad_id: u64::MAX,
        advertiser_id: 7,
        campaign_id: 70,
        landing_url: "https://a.example/".into(),
        cpc_micros: 1,
    };
    assert!(matches!(s.check_ad(&ad), Err(StoreError::NotFound(_))));
    assert!(matches!(s.upsert_ad(&ad), Err(StoreError::NotFound(_))));
    s.create_advertiser(7, "A", &[1; 32]).expect("adv");
    s.create_advertiser(8, "B", &[2; 32]).expect("adv");
    assert!(matches!(
        s.create_advertiser(7, "A", &[3; 32]),
        Err(StoreError::Conflict(_))
    ));
    assert!(
        matches!(
            s.create_advertiser(9, "C", &[2; 32]),
            Err(StoreError::Conflict(_))
        ),
        "a key hash belongs to one advertiser"
    );
    assert!(s.advertiser_exists(7).expect("exists"));
    assert!(!s.advertiser_exists(9).expect("exists"));
    assert_eq!(s.check_ad(&ad).expect("check"), Upserted::Created);
    assert_eq!(
        s.ad(u64::MAX).expect("read"),
        None,
        "a check writes nothing"
    );
    assert_eq!(s.upsert_ad(&ad).expect("create"), Upserted::Created);
    assert_eq!(s.check_ad(&ad).expect("check"), Upserted::Updated);
    let moved = Ad {
        campaign_id: u64::MAX,
        cpc_micros: i64::MAX as u64,
        landing_url: "https://a.example/new".into(),
        ..ad.clone()
    };
    assert_eq!(s.upsert_ad(&moved).expect("update"), Upserted::Updated);
    assert_eq!(
        s.ad(u64::MAX).expect("read"),
        Some(moved.clone()),
        "u64 ids survive bit-casting"
    );
    assert_eq!(s.ads().expect("ads"), vec![moved.clone()]);
    let stolen = Ad {
        advertiser_id: 8,
        ..ad.clone()
    };
    assert!(matches!(s.check_ad(&stolen), Err(StoreError::Conflict(_))));
    assert!(matches!(s.upsert_ad(&stolen), Err(StoreError::Conflict(_))));
    let other = Ad {
        ad_id: 5,
        advertiser_id: 8,
        ..ad
    };
    assert!(
        matches!(s.upsert_ad(&other), Err(StoreError::Conflict(_))),
        "campaign 70 is 7's"
    );
    assert_eq!(
        s.ad(5).expect("read"),
        None,
        "a refused upsert writes nothing"
    );
    assert_eq!(s.advertiser_for_key(&[2; 32]).expect("key"), Some(8));
    assert_eq!(s.campaign_owner(70).expect("owner"), Some(7));
    assert_eq!(s.campaign_owner(u64::MAX).expect("owner"), Some(7));
    assert_eq!(s.campaign_owner(71).expect("owner"), None);
    let second = Ad {
        ad_id: 3,
        advertiser_id: 8,
        campaign_id: 80,
        ..moved.clone()
    };
    let first = Ad {
        ad_id: 2,
        ..second.clone()
    };
    s.upsert_ad(&second).expect("ad 3");
    s.upsert_ad(&first).expect("ad 2");
    assert_eq!(s.advertiser_ads(7).expect("ads of 7"), vec![moved]);
    assert_eq!(
        s.advertiser_ads(8).expect("ads of 8"),
        vec![first, second],
        "one advertiser's ads, by id"
    );
    assert_eq!(s.advertiser_ads(9).expect("ads of 9"), vec![]);
}

/// Text keys, ordering and limits of the late-clicks side output, and a view without rollups.
pub(crate) fn late_clicks_and_views_without_rollups_round_trip(b: &dyn Backend) {
    let s = claimed(b);
    let late = |w: Millis, imp: &str, t: Millis| -> (Row, Option<Row>) {
        (
            vec![Datum::Id(9), Datum::Time(w), Datum::Text(imp.into())],
            Some(vec![
                Datum::Text(format!("click-{imp}")),
                Datum::Time(t),
                Datum::Time(t + 900_000),
            ]),
        )
    };
    let users = |ad: u64, hour: Millis, n: i64| -> (Row, Option<Row>) {
        (
            vec![Datum::Id(ad), Datum::Time(hour)],
            Some(vec![Datum::Int(n)]),
        )
    };
    let mut c = batch(1_000, vec![]);
    c.views[view_index("late_clicks")] = [
        late(60_000, "ff", 61_000),
        late(60_000, "0a", 62_000),
        late(120_000, "01", 121_000),
    ]
    .into_iter()
    .collect();
    c.views[view_index("ad_hourly_users")] = [users(9, 0, 3), users(u64::MAX, 3_600_000, 1)]
        .into_iter()
        .collect();
    s.commit(&c).expect("commit");

    let ids = |v: Vec<super::LateClick>| -> Vec<String> {
        v.into_iter().map(|l| l.impression_id).collect()
    };
    assert_eq!(
        ids(s.late_clicks(9, 0, 180_000, 10).expect("late")),
        vec!["0a", "ff", "01"],
        "ordered by window, then impression"
    );
    assert_eq!(
        ids(s.late_clicks(9, 0, 180_000, 2).expect("late")),
        vec!["0a", "ff"]
    );
    assert_eq!(
        ids(s.late_clicks(9, 120_000, 180_000, 10).expect("late")),
        vec!["01"]
    );
    let first = &s.late_clicks(9, 0, 120_000, 1).expect("late")[0];
    assert_eq!(
        (
            first.click_id.as_str(),
            first.event_time_ms,
            first.record_time_ms
        ),
        ("click-0a", 62_000, 962_000)
    );

    let mut c = batch(2_000, vec![]);
    c.views[view_index("late_clicks")] = [(
        vec![Datum::Id(9), Datum::Time(60_000), Datum::Text("ff".into())],
        None,
    )]
    .into_iter()
    .collect();
    c.views[view_index("ad_hourly_users")] = [
        users(9, 0, 5),
        (vec![Datum::Id(u64::MAX), Datum::Time(3_600_000)], None),
    ]
    .into_iter()
    .collect();
    s.commit(&c).expect("commit");
    assert_eq!(
        ids(s.late_clicks(9, 0, 180_000, 10).expect("late")),
        vec!["0a", "01"]
    );
    assert_eq!(b.query_i64("SELECT count(*) FROM v_ad_hourly_users"), 1);
    assert_eq!(
        b.query_i64("SELECT users FROM v_ad_hourly_users WHERE ad_id = 9 AND window_start = 0"),
        5
    );
}

/// A stored fraud adjustment, as the dataflow's row and as the store reads it back.
fn adjustment(ad: u64, campaign: u64, advertiser: u64, w: Millis, imp: &str) -> FraudAdjustment {
    FraudAdjustment {
        ad_id: ad,
        campaign_id: campaign,
        advertiser_id: advertiser,
        impression_id: imp.into(),
        click_id: format!("click-{imp}"),
        window_start_ms: w,
        event_time_ms: w + 1_500,
        verdict_time_ms: w + 900_000,
        clicks: -1,
        fraud_clicks: 1,
        spend_micros: -(ad as i64 % 1_000) * 1_000,
    }
}

fn adjustment_row(a: &FraudAdjustment) -> (Row, Option<Row>) {
    (
        vec![
            Datum::Id(a.ad_id),
            Datum::Time(a.window_start_ms),
            Datum::Text(a.impression_id.clone()),
        ],
        Some(vec![
            Datum::Id(a.campaign_id),
            Datum::Id(a.advertiser_id),
            Datum::Text(a.click_id.clone()),
            Datum::Time(a.event_time_ms),
            Datum::Time(a.verdict_time_ms),
            Datum::Int(a.clicks),
            Datum::Int(a.fraud_clicks),
            Datum::Int(a.spend_micros),
        ]),
    )
}

/// Fraud adjustments by ad, campaign and advertiser: ordered, limited, range-filtered on
/// the billed window, with totals over the whole range; deleted rows are gone.
pub(crate) fn fraud_adjustments_list_and_total_by_scope(b: &dyn Backend) {
    let s = claimed(b);
    s.create_advertiser(7, "A", &[1; 32]).expect("adv");
    s.create_advertiser(8, "B", &[2; 32]).expect("adv");
    for (ad, advertiser, campaign) in [(u64::MAX, 7, 70), (2, 7, 71), (3, 8, 80)] {
        let ad = Ad {
            ad_id: ad,
            advertiser_id: advertiser,
            campaign_id: campaign,
            landing_url: "https://a.example/".into(),
            cpc_micros: 1,
        };
        s.upsert_ad(&ad).expect("ad");
    }
    let big = u64::MAX;
    let [a1, a2, a3, a4, b1] = [
        adjustment(big, 70, 7, 60_000, "0a"),
        adjustment(big, 70, 7, 60_000, "01"),
        adjustment(2, 71, 7, 120_000, "ff"),
        adjustment(big, 70, 7, 180_000, "03"),
        adjustment(3, 80, 8, 60_000, "02"),
    ];
    let view = view_index("fraud_adjustments");
    let mut c = batch(1_000, vec![]);
    c.views[view] = [&a1, &a2, &a3, &a4, &b1]
        .into_iter()
        .map(adjustment_row)
        .collect();
    s.commit(&c).expect("commit");

    let list = |scope, id, from, to, limit| {
        s.fraud_adjustments(scope, id, from, to, limit)
            .expect("adjustments")
    };
    let ad = list(MetricScope::Ad, big, 0, 240_000, 10);
    assert_eq!(
        ad.rows,
        vec![a2.clone(), a1.clone(), a4.clone()],
        "every field round-trips; ordered by window, then impression"
    );
    let spend = |v: &[&FraudAdjustment]| v.iter().map(|a| a.spend_micros).sum::<i64>();
    assert_eq!(
        ad.totals,
        AdjustmentTotals {
            adjustments: 3,
            clicks: -3,
            fraud_clicks: 3,
            spend_micros: spend(&[&a1, &a2, &a4]),
        }
    );
    let limited = list(MetricScope::Ad, big, 0, 240_000, 2);
    assert_eq!(limited.rows, vec![a2.clone(), a1.clone()]);
    assert_eq!(limited.totals, ad.totals, "totals cover what the limit cut");
    assert_eq!(
        list(MetricScope::Ad, big, 120_000, 240_000, 10).rows,
        vec![a4.clone()],
        "from inclusive"
    );
    assert_eq!(
        list(MetricScope::Ad, big, 0, 180_000, 10).rows,
        vec![a2.clone(), a1.clone()],
        "to exclusive"
    );
    let advertiser = list(MetricScope::Advertiser, 7, 0, 240_000, 10);
    assert_eq!(
        advertiser.rows,
        vec![a2.clone(), a1.clone(), a3.clone(), a4.clone()],
        "only the advertiser's ads, by window, ad, impression"
    );
    assert_eq!(advertiser.totals.adjustments, 4);
    assert_eq!(
        list(MetricScope::Campaign, 71, 0, 240_000, 10).rows,
        vec![a3.clone()]
    );
    assert_eq!(
        list(MetricScope::Advertiser, 8, 0, 240_000, 10).rows,
        vec![b1.clone()]
    );

    let mut c = batch(2_000, vec![]);
    c.views[view] = [(adjustment_row(&a1).0, None)].into_iter().collect();
    s.commit(&c).expect("commit");
    let after = list(MetricScope::Advertiser, 7, 0, 240_000, 10);
    assert_eq!(after.rows, vec![a2.clone(), a3.clone(), a4.clone()]);
    assert_eq!(
        (after.totals.adjustments, after.totals.spend_micros),
        (3, spend(&[&a2, &a3, &a4]))
    );
}

/// A view table whose columns differ from the declaration stops the store from opening.
pub(crate) fn a_view_table_that_differs_from_its_declaration_is_refused(b: &dyn Backend) {
    drop(open(b));
    b.execute("DROP TABLE v_ad_hourly_users");
    b.execute(
        "CREATE TABLE v_ad_hourly_users (ad_id BIGINT NOT NULL, window_start BIGINT NOT NULL, \
         visitors BIGINT NOT NULL, PRIMARY KEY (ad_id, window_start))",
    );
    match b.open() {
        Err(StoreError::Inconsistent(m)) => {
            assert!(
                m.contains("v_ad_hourly_users") && m.contains("visitors"),
                "{m}"
            )
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("opened a store whose view table differs from its view"),
    }
}

/// `reconcile --fix`: corrections are compare-and-set in one transaction, rollups follow
/// the corrected rows, adjustments are recorded; a stale expectation changes nothing;
/// retention drops rows and rollups before its cutoff.
pub(crate) fn reconcile_corrections_are_atomic_and_fix_the_rollups(b: &dyn Backend) {
    use super::WindowCorrection;
    let s = claimed(b);
    let (k1, v1) = minute_row(1, 60_000, 70, 3, 300);
    let (k2, v2) = minute_row(2, 120_000, 70, 2, 200);
    s.commit(&batch(1_000, vec![(k1, Some(v1)), (k2, Some(v2))]))
        .expect("commit");
    let (frontier, rows) = s.ad_click_windows(0, 600_000).expect("windows");
    assert_eq!(frontier, Some(1_000));
    assert_eq!(rows.len(), 2);
    assert_eq!(
        (rows[0].ad_id, rows[0].measures.clicks, rows[0].campaign_id),
        (1, 3, 70)
    );

    let m = |clicks, spend| Measures {
        clicks,
        spend_micros: spend,
        ..Default::default()
    };
    let fix = |ad, w, expected, corrected| WindowCorrection {
        ad_id: ad,
        window_start: w,
        campaign_id: 70,
        advertiser_id: 7,
        expected,
        corrected,
    };
    // A stale expectation: nothing at all changes (the good correction is rolled back too).
    let stale = [
        fix(1, 60_000, Some(m(3, 300)), m(4, 400)),
        fix(2, 120_000, Some(m(9, 900)), m(1, 100)),
    ];
    assert!(matches!(
        s.apply_corrections("r0", 5, &stale),
        Err(StoreError::Conflict(_))
    ));
    let (_, unchanged) = s.ad_click_windows(0, 600_000).expect("windows");
    assert_eq!(unchanged, rows);

    // Update one, delete one, insert one.
    let good = [
        fix(1, 60_000, Some(m(3, 300)), m(4, 400)),
        fix(2, 120_000, Some(m(2, 200)), Measures::default()),
        fix(3, 180_000, None, m(1, 50)),
    ];
    s.apply_corrections("r1", 5, &good).expect("fix");
    let (_, fixed) = s.ad_click_windows(0, 600_000).expect("windows");
    let got: Vec<(u64, i64)> = fixed.iter().map(|r| (r.ad_id, r.measures.clicks)).collect();
    assert_eq!(got, vec![(1, 4), (3, 1)]);
    let campaign = s
        .click_series(MetricScope::Campaign, 70, Granularity::Hour, 0, 3_600_000)
        .expect("series");
    assert_eq!(
        campaign[0].1,
        m(5, 450),
        "rollups are recomputed from the rows"
    );
    let ad2 = s
        .click_series(MetricScope::Ad, 2, Granularity::FiveMinutes, 0, 600_000)
        .expect("series");
    assert!(
        ad2.is_empty(),
        "a window whose only row was corrected away has no rollup row: {ad2:?}"
    );
    assert_eq!(b.query_i64(ZERO_ROLLUP_ROWS), 0);
    assert_eq!(b.query_i64("SELECT count(*) FROM reconcile_adjustments"), 3);
    assert_eq!(
        b.query_i64(
            "SELECT CAST(sum(clicks) AS BIGINT) FROM reconcile_adjustments WHERE run_id = 'r1'"
        ),
        1 - 2 + 1
    );

    // Retention: everything before the cutoff goes, rows and rollups.
    let dropped = s.drop_windows_before(86_400_000).expect("retention");
    assert!(dropped >= 2, "{dropped}");
    let (_, none) = s.ad_click_windows(0, 86_400_000).expect("windows");
    assert!(none.is_empty());
    let campaign = s
        .click_series(MetricScope::Campaign, 70, Granularity::Day, 0, 86_400_000)
        .expect("series");
    assert!(
        campaign.iter().all(|(_, x)| *x == Measures::default()),
        "{campaign:?}"
    );
}
