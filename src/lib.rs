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
