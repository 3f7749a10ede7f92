//! What the log carries: clicks, fraud verdicts and catalog changes, and their encoding.
//!
//! Payloads are postcard behind a one-byte format version, so a record written today
//! stays readable when a field is added tomorrow (a new version, a new decoder arm).

use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::time::Millis;

/// The three streams of the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Topic {
    /// Clicks from the tracker and the SDK batch API.
    Clicks,
    /// Fraud verdicts by impression.
    FraudVerdicts,
    /// Catalog changes (ad -> campaign, advertiser).
    Ads,
}

impl Topic {
    /// Every topic, in the order partitions are enumerated.
    pub const ALL: [Topic; 3] = [Topic::Clicks, Topic::FraudVerdicts, Topic::Ads];

    /// The topic name (also the Kafka topic).
    pub const fn name(self) -> &'static str {
        match self {
            Topic::Clicks => "clicks",
            Topic::FraudVerdicts => "fraud_verdicts",
            Topic::Ads => "ads",
        }
    }

    /// A small stable number for storage.
    pub const fn code(self) -> u8 {
        match self {
            Topic::Clicks => 0,
            Topic::FraudVerdicts => 1,
            Topic::Ads => 2,
        }
    }

    /// The topic with the given code.
    pub fn from_code(code: u8) -> Option<Topic> {
        Topic::ALL.into_iter().find(|t| t.code() == code)
    }
}

/// One partition of one topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PartitionId {
    /// The topic.
    pub topic: Topic,
    /// The partition number within the topic.
    pub partition: u32,
}

impl fmt::Display for PartitionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.topic.name(), self.partition)
    }
}

/// A click as the tracker received it. Event time is the client's, not yet clamped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClickEvent {
    /// The impression the click belongs to (its dedup key).
    pub impression_id: u128,
    /// The ad, from the signed token.
    pub ad_id: u64,
    /// When the impression was issued, from the signed token.
    pub issued_at_ms: Millis,
    /// Client event time, or the receive time when the client gave none.
    pub event_time_ms: Millis,
    /// The client's click id, or one the tracker generated.
    pub click_id: String,
    /// The user, from the request or the token.
    pub user_id: String,
    /// The client IP.
    pub ip: IpAddr,
    /// The ad's cost per click when the click arrived: billing uses the price at click time.
    pub cpc_micros: u64,
}

/// An external verdict that an impression's clicks are fraud.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FraudVerdict {
    /// The flagged impression.
    pub impression_id: u128,
    /// Why (e.g. `ml-score`).
    pub reason: String,
}

/// The part of an ad the dataflow needs: where its clicks roll up to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AdRecord {
    /// The ad.
    pub ad_id: u64,
    /// Its campaign.
    pub campaign_id: u64,
    /// Its advertiser.
    pub advertiser_id: u64,
}

/// A record that could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The payload is empty or carries an unknown format version.
    #[error("unknown record format version {0:?}")]
    Version(Option<u8>),
    /// The payload does not match the format.
    #[error("malformed record: {0}")]
    Malformed(#[from] postcard::Error),
}

const FORMAT_V1: u8 = 1;

/// The payload of a heartbeat: a record that carries no event, only its record time.
///
/// A log whose writers cannot promise a watermark (Kafka, with several ingest processes
/// and their own clocks) lets idle partitions advance by appending a heartbeat to each
/// partition every tick. The source folds its record time into the partition's running
/// max, so later records never get an earlier time, and a replay assigns the same ones.
/// Format version 0 is reserved for it; no event encodes to it.
pub const HEARTBEAT: &[u8] = &[0];

/// Whether a payload is a [`HEARTBEAT`].
pub fn is_heartbeat(payload: &[u8]) -> bool {
    payload == HEARTBEAT
}

/// Encoding of log payloads.
pub trait Payload: Serialize + for<'de> Deserialize<'de> {
    /// The topic records of this type go to.
    const TOPIC: Topic;

    /// Encodes with the current format version.
    fn encode(&self) -> Vec<u8> {
        let mut out = vec![FORMAT_V1];
        // Serialising plain structs into a Vec cannot fail.
        if let Ok(body) = postcard::to_stdvec(self) {
            out.extend_from_slice(&body);
        }
        out
    }

    /// Decodes any known format version.
    fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        Ok(postcard::from_bytes(body_v1(bytes)?)?)
    }
}

/// The postcard body of a payload of format version 1.
fn body_v1(bytes: &[u8]) -> Result<&[u8], DecodeError> {
    match bytes.split_first() {
        Some((&FORMAT_V1, body)) => Ok(body),
        other => Err(DecodeError::Version(other.map(|(v, _)| *v))),
    }
}

/// A [`ClickEvent`] read in place from its payload: the ids borrow the payload's bytes,
/// so the dataflow's source makes its inline ids from them without allocating two
/// strings per click first. Its fields are `ClickEvent`'s, in the same order: postcard
/// encodes by position, so the two read the same bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub struct ClickEventRef<'a> {
    /// See [`ClickEvent::impression_id`].
    pub impression_id: u128,
    /// See [`ClickEvent::ad_id`].
    pub ad_id: u64,
    /// See [`ClickEvent::issued_at_ms`].
    pub issued_at_ms: Millis,
    /// See [`ClickEvent::event_time_ms`].
    pub event_time_ms: Millis,
    /// See [`ClickEvent::click_id`].
    pub click_id: &'a str,
    /// See [`ClickEvent::user_id`].
    pub user_id: &'a str,
    /// See [`ClickEvent::ip`].
    pub ip: IpAddr,
    /// See [`ClickEvent::cpc_micros`].
    pub cpc_micros: u64,
}

impl<'a> ClickEventRef<'a> {
    /// Decodes a click payload of any known format version.
    pub fn decode(bytes: &'a [u8]) -> Result<ClickEventRef<'a>, DecodeError> {
        Ok(postcard::from_bytes(body_v1(bytes)?)?)
    }

    /// The borrowed view of an owned click.
    pub fn of(e: &'a ClickEvent) -> ClickEventRef<'a> {
        // Destructured in full: a field added to `ClickEvent` stops the build here, where
        // this twin must gain it too (postcard would otherwise leave it unread).
        let ClickEvent {
            impression_id,
            ad_id,
            issued_at_ms,
            event_time_ms,
            click_id,
            user_id,
            ip,
            cpc_micros,
        } = e;
        ClickEventRef {
            impression_id: *impression_id,
            ad_id: *ad_id,
            issued_at_ms: *issued_at_ms,
            event_time_ms: *event_time_ms,
            click_id,
            user_id,
            ip: *ip,
            cpc_micros: *cpc_micros,
        }
    }
}

impl Payload for ClickEvent {
    const TOPIC: Topic = Topic::Clicks;
}
impl Payload for FraudVerdict {
    const TOPIC: Topic = Topic::FraudVerdicts;
}
impl Payload for AdRecord {
    const TOPIC: Topic = Topic::Ads;
}

/// Formats a 128-bit impression id as the 32 hex characters of the API.
pub fn impression_hex(id: u128) -> String {
    format!("{id:032x}")
}

/// Parses the 32 hex characters of an impression id.
pub fn parse_impression_hex(s: &str) -> Option<u128> {
    if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u128::from_str_radix(s, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clicks_round_trip_and_versions_are_checked() {
        let c = ClickEvent {
            impression_id: 0xdead_beef_u128 << 64 | 7,
            ad_id: u64::MAX,
            issued_at_ms: 1,
            event_time_ms: 2,
            click_id: "c-1".into(),
            user_id: "u-1".into(),
            ip: "2001:db8::1".parse().expect("ip"),
            cpc_micros: 250_000,
        };
        let bytes = c.encode();
        assert_eq!(ClickEvent::decode(&bytes).expect("decodes"), c);
        assert!(matches!(
            ClickEvent::decode(&[9, 1, 2]),
            Err(DecodeError::Version(Some(9)))
        ));
        assert!(matches!(
            ClickEvent::decode(&[]),
            Err(DecodeError::Version(None))
        ));
        assert!(ClickEvent::decode(&bytes[..5]).is_err());
    }

    proptest::proptest! {
        /// Read in place, an encoded click has exactly the owned decoding's fields (the
        /// oracle: `ClickEvent::decode`, serde's derived reader of the same struct).
        #[test]
        fn a_click_read_in_place_equals_the_owned_decoding(
            imp in proptest::num::u128::ANY,
            ad in proptest::num::u64::ANY,
            issued in proptest::num::u64::ANY,
            event in proptest::num::u64::ANY,
            click_id in "\\PC{0,40}",
            user_id in "\\PC{0,40}",
            v6 in proptest::bool::ANY,
            ip_bits in proptest::num::u128::ANY,
            cpc in proptest::num::u64::ANY,
        ) {
            let ip = if v6 {
                IpAddr::from(ip_bits.to_be_bytes())
            } else {
                IpAddr::from((ip_bits as u32).to_be_bytes())
            };
            let c = ClickEvent {
                impression_id: imp,
                ad_id: ad,
                issued_at_ms: issued,
                event_time_ms: event,
                click_id,
                user_id,
                ip,
                cpc_micros: cpc,
            };
            let bytes = c.encode();
            let owned = ClickEvent::decode(&bytes).expect("decodes");
            proptest::prop_assert_eq!(ClickEventRef::decode(&bytes).expect("reads in place"), ClickEventRef::of(&owned));
            proptest::prop_assert!(ClickEventRef::decode(&bytes[..bytes.len() - 1]).is_err());
            proptest::prop_assert!(matches!(ClickEventRef::decode(&[9, 1]), Err(DecodeError::Version(Some(9)))));
        }
    }

    #[test]
    fn impression_hex_is_strict() {
        let id = 0x0123_4567_89ab_cdef_0011_2233_4455_6677u128;
        let s = impression_hex(id);
        assert_eq!(s.len(), 32);
        assert_eq!(parse_impression_hex(&s), Some(id));
        assert_eq!(parse_impression_hex("+123"), None);
        assert_eq!(parse_impression_hex(&format!("{s}0")), None);
    }
}
