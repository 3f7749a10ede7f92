//! The independent oracle: the click semantics of design.md computed plainly, with maps
//! and sorting, from what the test sent. Shares no code with the dataflow.

use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Window lengths of the API, in ms.
pub const GRANULARITIES: [(&str, u64); 4] = [
    ("1m", 60_000),
    ("5m", 300_000),
    ("1h", 3_600_000),
    ("1d", 86_400_000),
];

/// An ad of the test catalog.
#[derive(Clone, Copy, Debug)]
pub struct Ad {
    pub id: u64,
    pub campaign: u64,
    pub advertiser: u64,
}

/// One click the server acknowledged.
#[derive(Clone, Debug)]
pub struct SentClick {
    pub impression: String,
    pub ad: u64,
    /// Event time. For a browser redirect only its minute is known (see `exact_event`).
    pub event_ms: u64,
    /// Whether `event_ms` is the exact event time (batch) or the send time (redirect).
    pub exact_event: bool,
    /// Known for batch clicks; redirects get an id from the tracker.
    pub click_id: Option<String>,
    pub ip: String,
    pub cpc_micros: u64,
    /// When the request carrying it was first sent and finally acknowledged: the record
    /// time lies in between.
    pub first_send_ms: u64,
    pub ack_ms: u64,
}

/// How the counted click of an impression is classified.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Class {
    Billable,
    Fraud,
    Late,
}

/// The four measures of a window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Measures {
    pub clicks: i64,
    pub fraud_clicks: i64,
    pub late_clicks: i64,
    pub spend_micros: i64,
}

impl Measures {
    fn add(&mut self, class: Class, cpc: u64) {
        match class {
            Class::Billable => {
                self.clicks += 1;
                self.spend_micros += cpc as i64;
            }
            Class::Fraud => self.fraud_clicks += 1,
            Class::Late => self.late_clicks += 1,
        }
    }

    pub fn is_zero(&self) -> bool {
        *self == Measures::default()
    }
}

/// The counted click of one impression.
#[derive(Clone, Debug)]
pub struct Counted {
    pub click: SentClick,
    pub class: Class,
}

/// What the test sent, and the expected answer.
#[derive(Clone, Debug, Default)]
pub struct Oracle {
    pub ads: BTreeMap<u64, Ad>,
    pub clicks: Vec<SentClick>,
    pub verdicts: BTreeSet<String>,
    pub lateness_ms: u64,
    pub ttl_ms: u64,
    pub max_per_ip_second: usize,
}

impl Oracle {
    /// An empty oracle for the given rules.
    pub fn new(lateness_ms: u64, ttl_ms: u64, max_per_ip_second: u64) -> Oracle {
        Oracle {
            lateness_ms,
            ttl_ms,
            max_per_ip_second: max_per_ip_second as usize,
            ..Oracle::default()
        }
    }

    /// Whether a click arrived within the allowed lateness. Panics when the record time
    /// (somewhere between first send and acknowledgement) leaves it undecidable: the
    /// workload keeps every click far from the boundary, so that is a broken test run.
    fn on_time(&self, c: &SentClick) -> bool {
        assert!(
            c.event_ms + self.ttl_ms > c.ack_ms,
            "workload sent a click older than the TTL"
        );
        if c.ack_ms.saturating_sub(c.event_ms) <= self.lateness_ms {
            true
        } else if c.first_send_ms.saturating_sub(c.event_ms) > self.lateness_ms {
            false
        } else {
            panic!("click {c:?} is too close to the lateness bound to judge; the run was too slow")
        }
    }

    /// The counted click of every impression with a click.
    pub fn counted(&self) -> BTreeMap<String, Counted> {
        let mut by_impression: HashMap<&str, Vec<&SentClick>> = HashMap::new();
        for c in &self.clicks {
            by_impression.entry(&c.impression).or_default().push(c);
        }
        let earliest = |cs: &[&SentClick]| -> SentClick {
            let mut cs = cs.to_vec();
            cs.sort_by(|a, b| (a.event_ms, &a.click_id).cmp(&(b.event_ms, &b.click_id)));
            cs[0].clone()
        };
        let mut out = BTreeMap::new();
        for (imp, cs) in by_impression {
            let on_time: Vec<&SentClick> = cs.iter().copied().filter(|c| self.on_time(c)).collect();
            let (click, class) = if on_time.is_empty() {
                (earliest(&cs), Class::Late)
            } else {
                (earliest(&on_time), Class::Billable)
            };
            out.insert(imp.to_string(), Counted { click, class });
        }
        // IP rule: more than N counted on-time clicks from one IP in one second of event time.
        let mut per_ip_second: HashMap<(String, u64), Vec<String>> = HashMap::new();
        for (imp, c) in &out {
            if c.class == Class::Billable {
                per_ip_second
                    .entry((c.click.ip.clone(), c.click.event_ms / 1000))
                    .or_default()
                    .push(imp.clone());
            }
        }
        for imps in per_ip_second.values() {
            if imps.len() > self.max_per_ip_second {
                for imp in imps {
                    out.get_mut(imp).expect("counted").class = Class::Fraud;
                }
            }
        }
        for imp in &self.verdicts {
            if let Some(c) = out.get_mut(imp)
                && c.class == Class::Billable
            {
                c.class = Class::Fraud;
            }
        }
        out
    }

    /// Expected measures per window of `granularity_ms` for one scope ("ad", "campaign",
    /// "advertiser"), keyed by (scope id, window start).
    pub fn series(&self, scope: &str, granularity_ms: u64) -> BTreeMap<(u64, u64), Measures> {
        let mut out: BTreeMap<(u64, u64), Measures> = BTreeMap::new();
        for c in self.counted().values() {
            let ad = self.ads[&c.click.ad];
            let id = match scope {
                "ad" => ad.id,
                "campaign" => ad.campaign,
                "advertiser" => ad.advertiser,
                other => panic!("unknown scope {other}"),
            };
            let window = c.click.event_ms / granularity_ms * granularity_ms;
            out.entry((id, window))
                .or_default()
                .add(c.class, c.click.cpc_micros);
        }
        out.retain(|_, m| !m.is_zero());
        out
    }

    /// Expected per-ad totals of one advertiser over [from, to) by event time.
    pub fn ad_totals(&self, advertiser: u64, from: u64, to: u64) -> BTreeMap<u64, Measures> {
        let mut out: BTreeMap<u64, Measures> = BTreeMap::new();
        for c in self.counted().values() {
            let ad = self.ads[&c.click.ad];
            if ad.advertiser == advertiser && (from..to).contains(&c.click.event_ms) {
                out.entry(ad.id)
                    .or_default()
                    .add(c.class, c.click.cpc_micros);
            }
        }
        out.retain(|_, m| !m.is_zero());
        out
    }

    /// Expected late clicks of an ad: impression -> event time.
    pub fn late_clicks(&self, ad: u64) -> BTreeMap<String, u64> {
        self.counted()
            .into_iter()
            .filter(|(_, c)| c.class == Class::Late && c.click.ad == ad)
            .map(|(imp, c)| (imp, c.click.event_ms))
            .collect()
    }

    /// Counts of classes, for the test's own report.
    pub fn class_counts(&self) -> BTreeMap<Class, usize> {
        let mut out = BTreeMap::new();
        for c in self.counted().values() {
            *out.entry(c.class).or_default() += 1;
        }
        out
    }
}
