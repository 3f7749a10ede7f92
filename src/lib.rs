//! clickagg: exactly-once ad-click aggregation on timely and differential dataflow.
//!
//! The data path: trackers append clicks to the [`log`]; the [`dataflow`] reads the log,
//! deduplicates, classifies and aggregates clicks into [`views`], and its sink commits
//! view changes with log positions into the [`store`] in one transaction; the [`server`]
//! answers advertisers from the store.

pub mod archive;
pub mod backends;
pub mod cluster;
pub mod compact;
pub mod config;
pub mod dataflow;
#[path = "../dataflows/mod.rs"]
pub mod dataflows;
pub mod import;
pub mod loadgen;
pub mod log;
pub mod metrics;
pub mod preflight;
pub mod process;
pub mod production;
pub mod progress;
pub mod reconcile;
pub mod record;
pub mod secrets;
pub mod serve;
pub mod server;
mod sqlite;
pub mod store;
pub mod thread_priority;
pub mod time;
pub mod token;
pub mod tools;
pub mod views;

/// jemalloc's options for the `clickagg` binary and the benches that run its dataflow in
/// process (each exports them as `_rjem_malloc_conf`): purge freed pages after about a
/// second (not ten) from background threads, so RSS follows the live state instead of
/// lagging it by a variable amount. `_RJEM_MALLOC_CONF` in the environment still
/// overrides these.
///
/// `muzzy_decay_ms:0` returns a decayed page with one `MADV_DONTNEED` instead of an
/// `MADV_FREE` and, a second later, an `MADV_DONTNEED`: each is a TLB shootdown that
/// interrupts the timely workers, and the purging thread's CPU in `bench/dataflow.rs` fell
/// from 4.1-5.2 s to 1.7-2.5 s, the workers' with it (bench/README.md, session 23).
///
/// `slab_sizes:4097-16384:16` makes the slabs of the 5 to 14 KiB size classes 16 pages long.
/// Timely's containers are 8 KiB, and by default a slab of that class holds one region, so every
/// container a thread's cache could not serve took an extent from the arena and gave it back
/// when freed: allocation was 14% of a worker's instructions under callgrind, most of it
/// refilling the thread's cache. With eight regions per slab a worker ran 7% fewer
/// instructions, and with 2 workers `bench/dataflow.rs` ran 6-7% faster, the purging
/// thread's CPU halved (bench/README.md, session 32).
pub const JEMALLOC_CONF: &[u8] =
    b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0,slab_sizes:4097-16384:16\0";
