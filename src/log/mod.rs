//! The log: durable, partitioned, offset-addressed streams of clicks, verdicts and catalog
//! changes. The dataflow reads it and the trackers append to it; neither knows whether it
//! is the embedded SQLite log or Kafka.

pub mod embedded;
pub mod kafka;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::record::{PartitionId, Topic};
use crate::time::Millis;

/// Where a reader resumes in one partition.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct LogPosition {
    /// The next offset to read.
    pub offset: u64,
    /// The record time of the record before `offset`; record times are made monotone by
    /// a running max, which a replay from here must start from to assign the same times.
    pub time_floor_ms: Millis,
}

/// One record read from the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogRecord {
    /// Its offset in the partition.
    pub offset: u64,
    /// Record time, monotone within the partition.
    pub record_time_ms: Millis,
    /// The encoded payload.
    pub payload: Vec<u8>,
}

/// A record to append.
#[derive(Clone, Debug)]
pub struct AppendRecord {
    /// The partition it goes to.
    pub partition: PartitionId,
    /// The ad it is about, as the message key where the log has keys (Kafka), so tools
    /// and consumers see clicks keyed by ad; the partition is chosen by the caller.
    pub key: Option<u64>,
    /// The record time to give it; `None` (every live append) takes the log's clock.
    ///
    /// For backfills (`clickagg import`), whose clicks happened long before they reach
    /// the log: at the clock, every one of them would be clamped to `record time - TTL`
    /// and classified late. Either way the log raises the time to its running max, so
    /// record times never go back within a partition; an explicit time below what the
    /// log already holds (live traffic, an earlier import) becomes that running max.
    pub record_time_ms: Option<Millis>,
    /// The encoded payload.
    pub payload: Vec<u8>,
}

/// Where an appended record landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    /// The partition.
    pub partition: PartitionId,
    /// Its offset.
    pub offset: u64,
    /// The record time the log assigned.
    pub record_time_ms: Millis,
}

/// What one poll read from one partition.
#[derive(Clone, Debug)]
pub struct PartitionBatch {
    /// The partition.
    pub partition: PartitionId,
    /// Records in offset order, possibly none.
    pub records: Vec<LogRecord>,
    /// Where the next poll continues.
    pub next: LogPosition,
    /// Set when the reader has caught up: every later record of this partition will have
    /// a record time of at least this, so an idle partition still advances the frontier.
    pub idle_until_ms: Option<Millis>,
}

/// Why the log could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The log is down or unreachable; try again later.
    #[error("log unavailable: {0}")]
    Unavailable(String),
    /// Too many appends are queued; try again later.
    #[error("log overloaded: too many appends in flight")]
    Overloaded,
    /// The append was not acknowledged in time; it may or may not be durable.
    #[error("log append not acknowledged within {0:?}")]
    Timeout(Duration),
    /// The log's contents contradict what the caller expects.
    #[error("log inconsistent: {0}")]
    Inconsistent(String),
}

/// A pending append: resolves once the records are durable.
pub type AppendFuture = Pin<Box<dyn Future<Output = Result<Vec<Appended>, LogError>> + Send>>;

/// A durable, partitioned, offset-addressed log.
pub trait Log: Send + Sync + 'static {
    /// How many partitions a topic has.
    fn partitions(&self, topic: Topic) -> u32;

    /// Appends records; the future resolves once every one of them is durable, or fails
    /// and then none of them was acknowledged.
    fn append(&self, records: Vec<AppendRecord>) -> AppendFuture;

    /// A reader over `start` positions, for one dataflow worker.
    fn reader(
        &self,
        start: Vec<(PartitionId, LogPosition)>,
    ) -> Result<Box<dyn LogReader>, LogError>;

    /// The next offset of every partition.
    fn end_offsets(&self) -> Result<Vec<(PartitionId, u64)>, LogError>;

    /// Whether the log is reachable right now.
    fn check(&self) -> Result<(), LogError>;
}

/// Reads a fixed set of partitions in offset order.
pub trait LogReader: Send {
    /// Returns what is new, waiting up to `max_wait` when nothing is.
    fn poll(&mut self, max_wait: Duration) -> Result<Vec<PartitionBatch>, LogError>;
}

/// Every partition of every topic of `log`, in a fixed order.
pub fn all_partitions(log: &dyn Log) -> Vec<PartitionId> {
    Topic::ALL
        .into_iter()
        .flat_map(|topic| {
            (0..log.partitions(topic)).map(move |partition| PartitionId { topic, partition })
        })
        .collect()
}

/// The partition of a click: by ad, so one ad's clicks stay in order together.
pub fn click_partition(ad_id: u64, partitions: u32) -> PartitionId {
    PartitionId {
        topic: Topic::Clicks,
        partition: (mix64(ad_id) % u64::from(partitions.max(1))) as u32,
    }
}

/// Spreads clicks over the `clicks` partitions: by ad, so one ad's clicks stay in order
/// together, except hot ads, whose clicks spread over `spread` consecutive partitions by
/// impression hash, so a viral ad does not pin one partition (and so one worker). All
/// clicks of one impression still share a partition.
#[derive(Clone, Debug)]
pub struct ClickPartitioner {
    partitions: u32,
    hot: std::collections::HashSet<u64>,
    spread: u32,
}

impl ClickPartitioner {
    /// Over `partitions` partitions, with `hot` ads spread over `spread` of them each.
    pub fn new(partitions: u32, hot: &[u64], spread: u32) -> ClickPartitioner {
        ClickPartitioner {
            partitions: partitions.max(1),
            hot: hot.iter().copied().collect(),
            spread: spread.clamp(1, partitions.max(1)),
        }
    }

    /// The partition of a click.
    pub fn partition(&self, ad_id: u64, impression_id: u128) -> PartitionId {
        let home = click_partition(ad_id, self.partitions);
        if !self.hot.contains(&ad_id) {
            return home;
        }
        let salt = (mix64(fold(impression_id)) % u64::from(self.spread)) as u32;
        PartitionId {
            partition: (home.partition + salt) % self.partitions,
            ..home
        }
    }
}

fn fold(id: u128) -> u64 {
    (id as u64) ^ ((id >> 64) as u64)
}

/// The partition of a fraud verdict: by impression.
pub fn verdict_partition(impression_id: u128, partitions: u32) -> PartitionId {
    let folded = fold(impression_id);
    PartitionId {
        topic: Topic::FraudVerdicts,
        partition: (mix64(folded) % u64::from(partitions.max(1))) as u32,
    }
}

/// The one partition of catalog changes.
pub const ADS_PARTITION: PartitionId = PartitionId {
    topic: Topic::Ads,
    partition: 0,
};

/// A fixed 64-bit mixer (splitmix64's finaliser): stable across versions and platforms.
pub fn mix64(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hot_ads_spread_by_impression_and_impressions_stay_together() {
        let p = ClickPartitioner::new(8, &[42], 4);
        let cold: std::collections::BTreeSet<u32> = (0..1000u128)
            .map(|i| p.partition(7, i * 7919).partition)
            .collect();
        assert_eq!(cold.len(), 1, "a cold ad keeps one partition");
        let hot: std::collections::BTreeSet<u32> = (0..1000u128)
            .map(|i| p.partition(42, i * 7919).partition)
            .collect();
        assert_eq!(
            hot.len(),
            4,
            "a hot ad spreads over `spread` partitions: {hot:?}"
        );
        for i in 0..100u128 {
            assert_eq!(
                p.partition(42, i),
                p.partition(42, i),
                "an impression stays put"
            );
        }
        assert_eq!(
            p.partition(7, 1),
            click_partition(7, 8),
            "cold ads are partitioned as before"
        );
    }
}
