//! The core of the pipeline: deduplicate clicks by impression, set late clicks aside, and
//! subtract fraud. Every view reads its output, [`ClassifiedClick`].
//!
//! Semantics (the test oracles implement the same rules independently):
//! - a click is *on time* when `record time - event time <= allowed lateness`;
//! - each impression with an on-time click counts once: its earliest on-time click by
//!   `(event time, click id)`; every other click of it is a duplicate, in any window;
//! - an impression whose clicks are all late counts once as a late click (its earliest);
//! - a counted click is fraud when a verdict names its impression, or when more than N
//!   counted clicks share its IP and its second of event time; otherwise it is billable.
//!
//! Besides the classes, [`classify`] hands the views the two causes of fraud it decided
//! on: the first verdict of each impression (with its arrival time) and the impressions the
//! IP-burst rule flags. A view that asks *when* a click became fraud (the billing
//! adjustments of `dataflows/fraud_adjustments.rs`) reads them instead of deciding again.

use std::net::IpAddr;

use differential_dataflow::VecCollection;
use differential_dataflow::operators::ThresholdTotal;
use serde::{Deserialize, Serialize};
use smol_str::SmolStr;

use super::StateGauges;
use super::bursts::ip_bursts;
use super::dedup::first_clicks;
use crate::record::{AdRecord, ClickEvent, ClickEventRef};
use crate::time::{Millis, Time};
use crate::views::{ClassifiedClick, ClickClass};

/// A click as the dataflow sees it: decoded, with its event time clamped.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Click {
    /// The impression (dedup key).
    pub impression_id: u128,
    /// The ad.
    pub ad_id: u64,
    /// Event time, clamped into `[record time - TTL, record time]`.
    pub event_time_ms: Millis,
    /// Record time.
    pub record_time_ms: Millis,
    /// The click id (inline up to 23 bytes: no allocation per copy of the click).
    pub click_id: SmolStr,
    /// The user (inline up to 23 bytes).
    pub user_id: SmolStr,
    /// The client IP.
    pub ip: IpAddr,
    /// The price at click time.
    pub cpc_micros: u64,
}

impl Click {
    /// The click of a log record. Event times in the future are clamped to the record
    /// time; event times older than an impression's lifetime are clamped to
    /// `record time - TTL`, which bounds how late a click can land in a window.
    pub fn from_event(e: ClickEvent, record_time_ms: Millis, ttl_ms: u64) -> Click {
        Click::from_payload(ClickEventRef::of(&e), record_time_ms, ttl_ms)
    }

    /// [`Click::from_event`] of a click read in place from its payload.
    pub fn from_payload(e: ClickEventRef<'_>, record_time_ms: Millis, ttl_ms: u64) -> Click {
        let earliest = record_time_ms.saturating_sub(ttl_ms);
        Click {
            impression_id: e.impression_id,
            ad_id: e.ad_id,
            event_time_ms: e.event_time_ms.clamp(earliest, record_time_ms),
            record_time_ms,
            click_id: SmolStr::new(e.click_id),
            user_id: SmolStr::new(e.user_id),
            ip: e.ip,
            cpc_micros: e.cpc_micros,
        }
    }

    /// Whether it arrived within the allowed lateness.
    pub fn on_time(&self, lateness_ms: u64) -> bool {
        self.record_time_ms - self.event_time_ms <= lateness_ms
    }

    /// The click counted as `class`.
    pub fn classified(self, class: ClickClass) -> ClassifiedClick {
        ClassifiedClick {
            impression_id: self.impression_id,
            ad_id: self.ad_id,
            event_time_ms: self.event_time_ms,
            record_time_ms: self.record_time_ms,
            click_id: self.click_id,
            user_id: self.user_id,
            ip: self.ip,
            cpc_micros: self.cpc_micros,
            class,
        }
    }
}

/// A fraud verdict as the dataflow sees it: the impression it names, and when it came.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Verdict {
    /// The impression it names.
    pub impression_id: u128,
    /// Record time, made monotone per partition as a click's is.
    pub record_time_ms: Millis,
    /// The timely time it entered the dataflow at: its record time rounded up to a tick.
    /// The sink's finality rule compares timely times, so whether a verdict came before or
    /// after a window froze is decided on this time, not on the record time.
    pub time: Time,
}

/// What classification gives the views (see [`crate::views::ViewInputs`]).
pub struct Classification<'s> {
    /// The counted clicks of the impressions not flagged as fraud.
    pub billable: VecCollection<'s, Time, ClassifiedClick>,
    /// The counted clicks of flagged impressions.
    pub fraud: VecCollection<'s, Time, ClassifiedClick>,
    /// The counted clicks of impressions none of whose clicks came on time.
    pub late: VecCollection<'s, Time, ClassifiedClick>,
    /// Per impression with a live verdict, its earliest one by `(time, record time)`.
    pub first_verdicts: VecCollection<'s, Time, (u128, Verdict)>,
    /// The impressions whose counted click the IP-burst rule flags, each once.
    pub burst_flagged: VecCollection<'s, Time, u128>,
}

/// The parameters of the classification.
#[derive(Clone, Copy, Debug)]
pub struct Rules {
    /// Allowed lateness in ms.
    pub lateness_ms: u64,
    /// More counted clicks than this from one IP in one second are fraud.
    pub max_clicks_per_ip_per_second: u64,
}

/// One classified click per impression that has clicks, and the causes of its fraud.
/// `state` reports what the in-place operators hold.
pub fn classify<'s>(
    clicks: VecCollection<'s, Time, Click>,
    verdicts: VecCollection<'s, Time, Verdict>,
    rules: Rules,
    state: StateGauges,
) -> Classification<'s> {
    let firsts = first_clicks(clicks, rules.lateness_ms, state.clone());
    let first_verdicts = first_verdicts(verdicts);
    let burst_flagged = ip_bursts(
        firsts.burst_keys.clone(),
        rules.max_clicks_per_ip_per_second,
        state.pending_updates,
    );
    let flagged = first_verdicts
        .clone()
        .map(|(imp, _)| imp)
        .concat(burst_flagged.clone())
        .distinct_total();
    // One join for both classes, against the dedup's winners in place: no arrangement of
    // full clicks at all.
    let on_time = firsts.classify_on_time(flagged);
    Classification {
        billable: on_time.billable,
        fraud: on_time.fraud,
        late: firsts.late,
        first_verdicts,
        burst_flagged,
    }
}

/// Per impression, its earliest live verdict: later ones add nothing.
fn first_verdicts<'s>(
    verdicts: VecCollection<'s, Time, Verdict>,
) -> VecCollection<'s, Time, (u128, Verdict)> {
    verdicts
        .map(|v| (v.impression_id, v))
        .reduce(|_imp, all, out| {
            if let Some((first, _)) = all.iter().min_by_key(|(v, _)| (v.time, v.record_time_ms)) {
                out.push((**first, 1));
            }
        })
}

/// The catalog: the latest record of each ad (by log offset).
pub fn latest_ads<'s>(
    records: VecCollection<'s, Time, (u64, AdRecord)>,
) -> VecCollection<'s, Time, (u64, AdRecord)> {
    records
        .map(|(offset, r)| (r.ad_id, (offset, r)))
        .reduce(|_ad, versions, out| {
            if let Some(((_, latest), _)) = versions.iter().max_by_key(|((offset, _), _)| *offset) {
                out.push((latest.clone(), 1));
            }
        })
}
