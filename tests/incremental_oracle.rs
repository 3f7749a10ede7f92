//! Acceptance 3 (issue 2): incremental == from scratch.
//!
//! In the style of differential's `tests/reduce_oracle.rs`: random clicks, verdicts and
//! catalog changes over many ticks (with the horizon's retractions, so expiry is
//! exercised too) go through the real classification and views; at every time, the
//! accumulated output of each view must equal a plain recomputation from the inputs live
//! at that time (for the dedup: from the copies that arrived since the impression's last
//! counted click expired). The oracle below shares no code with the dataflow.
//!
//! Verdicts come early (before the click's window is final), late (after it: billing
//! adjustments) and very late (past the adjustment period), under a short horizon that
//! makes clicks and verdicts expire amid the action and a long one that keeps the clicks
//! until the very late verdicts arrive.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use clickagg::dataflow::classify::{Click, Rules, Verdict};
use clickagg::dataflow::harness::{rows_at, run_views, source_updates};
use clickagg::dataflow::source::SourceEvent;
use clickagg::dataflows::VIEWS;
use clickagg::record::AdRecord;
use clickagg::time::Finality;
use clickagg::views::{Datum, Row};
use proptest::prelude::*;

const TICK: u64 = 100;
/// Clicks and verdicts expire amid the action.
const SHORT_HORIZON: u64 = 8_000;
/// Clicks outlive the adjustment period of their windows.
const LONG_HORIZON: u64 = 3_700_000;
const LATENESS: u64 = 3_000;
const MAX_PER_IP: u64 = 2;
const FINALITY: Finality = Finality {
    ttl_ms: 2_000,
    correction_ms: 3_000,
};
/// Just before an hour boundary, so minutes and hours both roll over.
const BASE: u64 = 3_600_000 - 10_000;
const MINUTE: u64 = 60_000;
/// The window length of `fraud_adjustments`: its rows close this long after the billed
/// minute starts (plus TTL and correction), the end of the adjustment period.
const ADJUSTABLE: u64 = 3_600_000;

fn time_of(record_ms: u64) -> u64 {
    record_ms.div_ceil(TICK) * TICK
}

#[derive(Clone, Debug)]
struct ClickSpec {
    imp: u128,
    record: u64,
    age: u64,
    click: u8,
    user: u8,
    ip: u8,
    cpc: u64,
}

#[derive(Clone, Debug)]
struct Scenario {
    horizon: u64,
    clicks: Vec<ClickSpec>,
    verdicts: Vec<(u128, u64)>,
    ads: Vec<(u64, u64, u64, u64)>, // (ad, campaign, advertiser, record)
}

fn ad_of(imp: u128) -> u64 {
    (imp % 3) as u64 + 1
}

fn click_spec() -> impl Strategy<Value = ClickSpec> {
    (
        0u128..10,
        0u64..20_000,
        prop_oneof![4 => 0u64..2_000, 1 => 3_001u64..10_000],
        0u8..4,
        0u8..3,
        0u8..3,
        1u64..5,
    )
        .prop_map(|(imp, r, age, click, user, ip, cpc)| ClickSpec {
            imp,
            record: BASE + r,
            age,
            click,
            user,
            ip,
            cpc,
        })
}

/// A verdict's record time after `BASE`: while its clicks arrive, around the moment their
/// windows freeze (`froze` of the minute before the hour and of the one after), and around
/// the end of their adjustment periods (`closes` of both).
fn verdict_offset() -> impl Strategy<Value = u64> {
    let froze = |w: u64| FINALITY.final_at(w, MINUTE) - BASE;
    let closes = |w: u64| FINALITY.final_at(w, ADJUSTABLE) - BASE;
    let (w0, w1) = (3_540_000, 3_600_000);
    prop_oneof![
        3 => 0u64..20_000,
        3 => froze(w0) - 3_000..froze(w0) + 12_000,
        2 => froze(w1) - 2_000..froze(w1) + 2_000,
        1 => closes(w0) - 2_000..closes(w0) + 2_000,
        1 => closes(w1) - 2_000..closes(w1) + 2_000,
    ]
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        prop_oneof![Just(SHORT_HORIZON), Just(LONG_HORIZON)],
        prop::collection::vec(click_spec(), 0..40),
        prop::collection::vec((0u128..10, verdict_offset()), 0..8),
        prop::collection::vec((1u64..4, 10u64..13, 0u64..20_000), 0..5),
    )
        .prop_map(|(horizon, clicks, verdicts, updates)| {
            // Every ad is in the catalog from the start; some later move campaign.
            let mut ads: Vec<(u64, u64, u64, u64)> =
                (1..=3).map(|ad| (ad, 10, 100 + ad % 2, BASE)).collect();
            ads.extend(
                updates
                    .into_iter()
                    .map(|(ad, campaign, r)| (ad, campaign, 100 + ad % 2, BASE + r)),
            );
            Scenario {
                horizon,
                clicks,
                verdicts: verdicts
                    .into_iter()
                    .map(|(imp, r)| (imp, BASE + r))
                    .collect(),
                ads,
            }
        })
}

fn click_of(c: &ClickSpec) -> Click {
    Click {
        impression_id: c.imp,
        ad_id: ad_of(c.imp),
        event_time_ms: c.record - c.age,
        record_time_ms: c.record,
        click_id: format!("c{}", c.click).into(),
        user_id: user_id(c.user).into(),
        ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, c.ip)),
        cpc_micros: c.cpc,
    }
}

/// Distinct users get distinct ids, in the three forms a view's `CompactId` tells apart:
/// a canonical decimal ("7", kept as a number), the same digits with a leading zero
/// ("07", kept as text: another user) and text ("u7").
fn user_id(user: u8) -> String {
    let n = user / 3;
    match user % 3 {
        0 => format!("{n}"),
        1 => format!("0{n}"),
        _ => format!("u{n}"),
    }
}

fn events(s: &Scenario) -> Vec<(SourceEvent, u64)> {
    let mut out: Vec<(SourceEvent, u64)> = Vec::new();
    for c in &s.clicks {
        out.push((SourceEvent::Click(click_of(c)), time_of(c.record)));
    }
    for (imp, r) in &s.verdicts {
        let verdict = Verdict {
            impression_id: *imp,
            record_time_ms: *r,
            time: time_of(*r),
        };
        out.push((SourceEvent::Verdict(verdict), time_of(*r)));
    }
    // Catalog offsets follow record time, as in a log partition.
    let mut ads = s.ads.clone();
    ads.sort_by_key(|a| a.3);
    for (offset, (ad, campaign, advertiser, r)) in ads.into_iter().enumerate() {
        let record = AdRecord {
            ad_id: ad,
            campaign_id: campaign,
            advertiser_id: advertiser,
        };
        out.push((SourceEvent::Ad(offset as u64, record), time_of(r)));
    }
    out
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Billable,
    Fraud,
    Late,
}

/// The plain recomputation of every view from what is live at time `t`.
fn oracle(s: &Scenario, t: u64) -> Vec<BTreeMap<(Row, Row), isize>> {
    let live = |time: u64| time <= t && t < time + s.horizon;
    // The live verdicts of each impression, by arrival: (timely time, record time).
    let mut verdicts: BTreeMap<u128, BTreeSet<(u64, u64)>> = BTreeMap::new();
    for (imp, r) in &s.verdicts {
        if live(time_of(*r)) {
            verdicts.entry(*imp).or_default().insert((time_of(*r), *r));
        }
    }
    let mut catalog: BTreeMap<u64, (u64, u64, u64)> = BTreeMap::new(); // ad -> (record, campaign, advertiser)
    let mut ads = s.ads.clone();
    ads.sort_by_key(|a| a.3);
    for (ad, campaign, advertiser, r) in ads {
        if time_of(r) <= t {
            catalog.insert(ad, (r, campaign, advertiser));
        }
    }

    // Dedup: per impression, the best click by (not on time, event, click id, click) among
    // the copies that arrived since the impression last had no counted click. A copy that
    // loses when it arrives is never counted later: when the counted click expires, the
    // impression has none until its next copy arrives (`src/dataflow/dedup.rs`; the
    // horizon keeps that out of every window the store keeps).
    let on_time = |c: &Click| c.record_time_ms - c.event_time_ms <= LATENESS;
    let rank = |c: &Click| (!on_time(c), c.event_time_ms, c.click_id.clone(), c.clone());
    let mut arrivals: BTreeMap<u128, BTreeMap<u64, Vec<Click>>> = BTreeMap::new();
    for c in &s.clicks {
        if time_of(c.record) <= t {
            arrivals
                .entry(c.imp)
                .or_default()
                .entry(time_of(c.record))
                .or_default()
                .push(click_of(c));
        }
    }
    let expired = |c: &Click, at: u64| time_of(c.record_time_ms) + s.horizon <= at;
    let mut winners: Vec<(Click, bool)> = Vec::new();
    for by_time in arrivals.values() {
        let mut counted: Option<Click> = None;
        for (time, copies) in by_time {
            if counted.as_ref().is_some_and(|w| expired(w, *time)) {
                counted = None;
            }
            counted = counted
                .into_iter()
                .chain(copies.iter().cloned())
                .min_by_key(|c| rank(c));
        }
        if let Some(c) = counted.filter(|w| !expired(w, t)) {
            let on = on_time(&c);
            winners.push((c, on));
        }
    }
    let mut per_ip_second: HashMap<(IpAddr, u64), u64> = HashMap::new();
    for (c, on_time) in &winners {
        if *on_time {
            *per_ip_second
                .entry((c.ip, c.event_time_ms / 1000))
                .or_default() += 1;
        }
    }
    let burst = |c: &Click| per_ip_second[&(c.ip, c.event_time_ms / 1000)] > MAX_PER_IP;
    // Verdicts that had arrived by `until` (all of them: `u64::MAX`).
    let verdict_before = |c: &Click, until: u64| {
        verdicts
            .get(&c.impression_id)
            .is_some_and(|v| v.iter().any(|(time, _)| *time < until))
    };
    let class_with = |c: &Click, on_time: bool, until: u64| {
        if !on_time {
            Class::Late
        } else if verdict_before(c, until) || burst(c) {
            Class::Fraud
        } else {
            Class::Billable
        }
    };
    let classified: Vec<(Click, Class)> = winners
        .iter()
        .map(|(c, on_time)| (c.clone(), class_with(c, *on_time, u64::MAX)))
        .collect();

    // ad_clicks
    let mut counts: BTreeMap<(u64, u64), [i64; 4]> = BTreeMap::new();
    for (c, class) in &classified {
        let e = counts
            .entry((c.ad_id, c.event_time_ms / 60_000 * 60_000))
            .or_default();
        match class {
            Class::Billable => {
                e[0] += 1;
                e[3] += c.cpc_micros as i64;
            }
            Class::Fraud => e[1] += 1,
            Class::Late => e[2] += 1,
        }
    }
    let mut ad_clicks = BTreeMap::new();
    for ((ad, w), n) in counts {
        if let Some((_, campaign, advertiser)) = catalog.get(&ad) {
            let key = vec![Datum::Id(ad), Datum::Time(w)];
            let value = vec![
                Datum::Id(*campaign),
                Datum::Id(*advertiser),
                Datum::Int(n[0]),
                Datum::Int(n[1]),
                Datum::Int(n[2]),
                Datum::Int(n[3]),
            ];
            ad_clicks.insert((key, value), 1);
        }
    }

    // late_clicks
    let mut late = BTreeMap::new();
    for (c, class) in &classified {
        if *class == Class::Late {
            let key = vec![
                Datum::Id(c.ad_id),
                Datum::Time(c.event_time_ms / 60_000 * 60_000),
                Datum::Text(format!("{:032x}", c.impression_id)),
            ];
            let value = vec![
                Datum::Text(c.click_id.to_string()),
                Datum::Time(c.event_time_ms),
                Datum::Time(c.record_time_ms),
            ];
            late.insert((key, value), 1);
        }
    }

    // ad_hourly_users
    let mut users: BTreeMap<(u64, u64), BTreeSet<String>> = BTreeMap::new();
    for (c, class) in &classified {
        if *class == Class::Billable {
            users
                .entry((c.ad_id, c.event_time_ms / 3_600_000 * 3_600_000))
                .or_default()
                .insert(c.user_id.to_string());
        }
    }
    let hourly = users
        .into_iter()
        .map(|((ad, h), u)| {
            (
                (
                    vec![Datum::Id(ad), Datum::Time(h)],
                    vec![Datum::Int(u.len() as i64)],
                ),
                1,
            )
        })
        .collect();

    // fraud_adjustments: a click billable when its minute froze, whose impression's first
    // verdict came after that, within the adjustment period.
    let mut adjustments = BTreeMap::new();
    for (c, on_time) in &winners {
        let w = c.event_time_ms / MINUTE * MINUTE;
        let (froze, closes) = (
            FINALITY.final_at(w, MINUTE),
            FINALITY.final_at(w, ADJUSTABLE),
        );
        let billed = class_with(c, *on_time, froze) == Class::Billable;
        let first = verdicts
            .get(&c.impression_id)
            .and_then(|v| v.first().copied());
        let (Some((first_time, first_record)), Some((_, campaign, advertiser))) =
            (first, catalog.get(&c.ad_id))
        else {
            continue;
        };
        if billed && froze <= first_time && first_time < closes {
            let key = vec![
                Datum::Id(c.ad_id),
                Datum::Time(w),
                Datum::Text(format!("{:032x}", c.impression_id)),
            ];
            let value = vec![
                Datum::Id(*campaign),
                Datum::Id(*advertiser),
                Datum::Text(c.click_id.to_string()),
                Datum::Time(c.event_time_ms),
                Datum::Time(first_record),
                Datum::Int(-1),
                Datum::Int(1),
                Datum::Int(-(c.cpc_micros as i64)),
            ];
            adjustments.insert((key, value), 1);
        }
    }

    let mut by_name: HashMap<&str, BTreeMap<(Row, Row), isize>> = HashMap::from([
        ("ad_clicks", ad_clicks),
        ("late_clicks", late),
        ("ad_hourly_users", hourly),
        ("fraud_adjustments", adjustments),
    ]);
    VIEWS
        .iter()
        .map(|v| {
            by_name
                .remove(v.name)
                .unwrap_or_else(|| panic!("the oracle has no recomputation of view {}", v.name))
        })
        .collect()
}

fn check(s: &Scenario) -> Result<(), TestCaseError> {
    let updates = source_updates(&events(s), s.horizon);
    let mut times: BTreeSet<u64> = updates.iter().map(|(_, t, _)| *t).collect();
    times.insert(0);
    let rules = Rules {
        lateness_ms: LATENESS,
        max_clicks_per_ip_per_second: MAX_PER_IP,
    };
    let output = run_views(updates, rules, FINALITY, VIEWS);
    for t in times {
        let expected = oracle(s, t);
        for (i, view) in VIEWS.iter().enumerate() {
            let actual = rows_at(&output, i, t);
            prop_assert_eq!(&actual, &expected[i], "view {} at time {}", view.name, t);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn views_equal_recomputation_at_every_time(s in scenario()) {
        check(&s)?;
    }
}

/// A hand-written case that has every rule fire at least once, so the property above can
/// never pass vacuously on a generator that stopped producing interesting inputs.
#[test]
fn every_rule_fires_in_the_fixed_case() {
    let c = |imp, record: u64, age, click, ip| ClickSpec {
        imp,
        record: BASE + record,
        age,
        click,
        user: click,
        ip,
        cpc: 3,
    };
    let s = Scenario {
        horizon: SHORT_HORIZON,
        clicks: vec![
            c(0, 1_000, 500, 1, 0),
            c(0, 2_000, 1_600, 0, 0), // earlier duplicate, arrives later: wins
            c(3, 1_200, 5_000, 0, 1), // late, alone: a late click
            c(6, 1_300, 100, 0, 2),   // three clicks in one second from ip 2: fraud
            c(9, 1_350, 150, 1, 2),
            c(1, 1_400, 200, 2, 2),
            c(4, 9_000, 100, 0, 1), // after the hour boundary
        ],
        verdicts: vec![(4, BASE + 12_000)],
        ads: (1..=3)
            .map(|ad| (ad, 10, 100, BASE))
            .chain([(2, 11, 100, BASE + 15_000)])
            .collect(),
    };
    check(&s).expect("incremental equals recomputation");
    let measures = |views: &[BTreeMap<(Row, Row), isize>]| -> Vec<[i64; 4]> {
        views[0]
            .keys()
            .map(|(_, v)| {
                let n: Vec<i64> = v[2..]
                    .iter()
                    .filter_map(|d| {
                        if let Datum::Int(n) = d {
                            Some(*n)
                        } else {
                            None
                        }
                    })
                    .collect();
                [n[0], n[1], n[2], n[3]]
            })
            .collect()
    };
    let early = oracle(&s, time_of(BASE + 2_000));
    let m = measures(&early);
    assert_eq!(
        m.iter().map(|n| n[1]).sum::<i64>(),
        3,
        "the IP burst made three clicks fraud: {m:?}"
    );
    assert!(m.iter().any(|n| n[2] == 1), "a late click: {m:?}");
    assert!(
        m.iter().any(|n| n[0] == 1 && n[3] == 3),
        "a billable click and its spend: {m:?}"
    );
    assert!(!early[1].is_empty(), "late side output filled");
    let verdict = measures(&oracle(&s, time_of(BASE + 12_000)));
    assert_eq!(
        verdict,
        vec![[0, 1, 0, 0]],
        "the verdict moved the hour's only click to fraud"
    );
    // `check` compared the output at the retraction times too; by then all has expired.
    let after = oracle(&s, time_of(BASE + 15_000) + SHORT_HORIZON);
    assert!(
        after.iter().all(BTreeMap::is_empty),
        "the horizon retracts every click and verdict"
    );
}

/// The impressions of the `fraud_adjustments` rows the oracle expects at `t`.
fn adjusted_at(s: &Scenario, t: u64) -> Vec<u128> {
    let i = VIEWS
        .iter()
        .position(|v| v.name == "fraud_adjustments")
        .expect("registered");
    oracle(s, t)[i]
        .keys()
        .map(|(key, _)| match &key[2] {
            Datum::Text(imp) => u128::from_str_radix(imp, 16).expect("hex impression"),
            other => panic!("impression column holds {other:?}"),
        })
        .collect()
}

/// A hand-written case for the adjustments: each way a verdict can come late, and each
/// way it makes no adjustment, so the property cannot pass vacuously for that view.
#[test]
fn late_verdicts_make_adjustments_in_the_fixed_case() {
    let c = |imp, record: u64, age, ip| ClickSpec {
        imp,
        record: BASE + record,
        age,
        click: 0,
        user: 0,
        ip,
        cpc: 3,
    };
    // Every click below is in the minute before the hour: it freezes at `froze`, and its
    // adjustments close at `closes`.
    let w0 = 3_540_000;
    let froze = FINALITY.final_at(w0, MINUTE);
    let closes = FINALITY.final_at(w0, ADJUSTABLE);
    let s = Scenario {
        horizon: LONG_HORIZON,
        clicks: vec![
            c(0, 2_000, 100, 0),   // billable; a verdict after the freeze: adjusted
            c(3, 3_000, 100, 1),   // a verdict before the freeze: fraud in its window
            c(6, 1_300, 100, 2),   // three clicks in one second from ip 2: a burst
            c(9, 1_350, 150, 2),   //
            c(1, 1_400, 200, 2),   //
            c(5, 1_500, 5_000, 1), // late
            c(2, 4_000, 100, 0),   // a verdict past the adjustment period
            c(7, 5_000, 100, 1),   // a verdict at the end of the adjustment period
        ],
        verdicts: vec![
            (0, froze + 5_000),
            (0, froze + 15_000), // a second verdict adds nothing
            (3, froze - 1_000),
            (3, froze + 10_000),
            (6, froze + 5_000),
            (5, froze + 5_000),
            (8, froze + 5_000), // names no click
            (2, closes),
            (7, closes - TICK),
        ],
        ads: (1..=3).map(|ad| (ad, 10, 100, BASE)).collect(),
    };
    check(&s).expect("incremental equals recomputation");
    assert!(adjusted_at(&s, froze + 4_900).is_empty());
    assert_eq!(adjusted_at(&s, froze + 5_000), vec![0]);
    assert_eq!(adjusted_at(&s, froze + 20_000), vec![0]);
    assert_eq!(adjusted_at(&s, closes), vec![0, 7]);
    // Expiry retracts them again (the sink ignores that: their rows are final by then).
    assert!(adjusted_at(&s, BASE + 5_000 + LONG_HORIZON).is_empty());
}
