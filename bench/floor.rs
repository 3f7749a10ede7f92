//! The floor: the standard workload's hash-map work done by one plain loop, with no
//! dataflow, log, store or serialization around it. It is what one core needs at least
//! for the state the dataflow keeps per click, and so the bound against which the
//! dataflow's CPU per click is read (`bench/README.md`, "The floor").
//!
//! The clicks are read from the CSV into memory first (not timed), in file order, which is
//! the order the dataflow bench imports them. Then, timed, each click in turn:
//! - **dedup**: the winner per impression in a hash map, by the dataflow's rule (earliest
//!   event time, then smallest click id); a new winner takes its predecessor's count back;
//! - **counts**: clicks per `(ad, minute)` in a hash map (`ad_clicks`' work);
//! - **full** adds what the other views and rules keep per click: distinct users per
//!   `(ad, hour)` (a count per `(ad, hour, user)` and per `(ad, hour)`, `ad_hourly_users`)
//!   and the clicks per `(ip, second)` of the IP-burst rule.
//!
//! Each pass's per-`(ad, minute)` counts are checked exactly against the DuckDB truth.
//!
//! `cargo bench --bench floor`. Knob: `FLOOR_CLICKS` (default 5000000).

#[path = "workload.rs"]
mod workload;

use std::collections::BTreeMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::time::Instant;

use hashbrown::HashMap;
use workload::{Workload, compare, env_u64, machine};

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// One click of the file, as the dataflow's `Click` holds its fields.
struct Click {
    click_id: u64,
    impression_id: u128,
    ad_id: u64,
    user_id: u64,
    ip: IpAddr,
    event_time_ms: u64,
}

/// The fields of a winner that its counts depend on.
#[derive(Clone, Copy)]
struct Winner {
    event_time_ms: u64,
    click_id: u64,
    ad_id: u64,
    user_id: u64,
}

fn read_clicks(workload: &Workload) -> Vec<Click> {
    let text = std::fs::read_to_string(&workload.clicks).expect("read the clicks");
    text.lines()
        .skip(1)
        .map(|line| {
            let f: Vec<&str> = line.split(',').collect();
            let num = |i: usize| -> u64 {
                f[i].parse()
                    .unwrap_or_else(|_| panic!("field {i} of {line:?}"))
            };
            Click {
                click_id: num(0),
                impression_id: u128::from(num(1)),
                ad_id: num(2),
                user_id: num(4),
                ip: f[5].parse().unwrap_or_else(|_| panic!("ip of {line:?}")),
                event_time_ms: num(6),
            }
        })
        .collect()
}

fn add<K: Hash + Eq>(map: &mut HashMap<K, i64>, key: K, diff: i64) -> i64 {
    let n = map.entry(key).or_default();
    *n += diff;
    *n
}

/// The state one pass keeps.
#[derive(Default)]
struct State {
    winners: HashMap<u128, Winner>,
    per_minute: HashMap<(u64, u64), i64>,
    user_clicks: HashMap<(u64, u64, u64), i64>,
    users: HashMap<(u64, u64), i64>,
    ip_seconds: HashMap<(IpAddr, u64), i64>,
}

impl State {
    /// Adds (`+1`) or takes back (`-1`) a winner's contribution.
    fn count(&mut self, w: &Winner, diff: i64, full: bool) {
        let minute = w.event_time_ms / 60_000 * 60_000;
        add(&mut self.per_minute, (w.ad_id, minute), diff);
        if full {
            let hour = w.event_time_ms / 3_600_000 * 3_600_000;
            let n = add(&mut self.user_clicks, (w.ad_id, hour, w.user_id), diff);
            // The user enters with its first click and leaves with its last.
            if (diff > 0 && n == 1) || (diff < 0 && n == 0) {
                add(&mut self.users, (w.ad_id, hour), diff);
            }
        }
    }

    fn click(&mut self, c: &Click, full: bool) {
        if full {
            add(&mut self.ip_seconds, (c.ip, c.event_time_ms / 1000), 1);
        }
        let new = Winner {
            event_time_ms: c.event_time_ms,
            click_id: c.click_id,
            ad_id: c.ad_id,
            user_id: c.user_id,
        };
        match self.winners.get_mut(&c.impression_id) {
            None => {
                self.winners.insert(c.impression_id, new);
                self.count(&new, 1, full);
            }
            Some(old) if (new.event_time_ms, new.click_id) < (old.event_time_ms, old.click_id) => {
                let old = std::mem::replace(old, new);
                self.count(&old, -1, full);
                self.count(&new, 1, full);
            }
            Some(_) => {}
        }
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let n = env_u64("FLOOR_CLICKS", 5_000_000);
    let workload = Workload::ensure(n);
    let truth = workload.truth();
    println!("floor bench on {}", machine());
    let clicks = read_clicks(&workload);
    println!("{} clicks read into memory (not timed)", clicks.len());
    println!(
        "{:<8} {:>8} {:>12} {:>10} {:>12}",
        "pass", "wall s", "clicks/s", "ns/click", "map entries"
    );
    for (name, full) in [("counts", false), ("full", true)] {
        let started = Instant::now();
        let mut state = State::default();
        for c in &clicks {
            state.click(c, full);
        }
        let secs = started.elapsed().as_secs_f64();
        let got: BTreeMap<(u64, u64), i64> = state
            .per_minute
            .iter()
            .filter(|(_, n)| **n != 0)
            .map(|(k, n)| (*k, *n))
            .collect();
        if let Err(e) = compare(&got, &truth) {
            panic!("floor pass {name}: {e}");
        }
        let entries = state.winners.len()
            + state.per_minute.len()
            + state.user_clicks.len()
            + state.users.len()
            + state.ip_seconds.len();
        let per_s = clicks.len() as f64 / secs;
        let ns = secs * 1e9 / clicks.len() as f64;
        println!("{name:<8} {secs:>8.2} {per_s:>12.0} {ns:>10.0} {entries:>12}");
        println!("BENCH name=floor_{name} clicks_per_s={per_s:.0} ns_per_click={ns:.0}");
    }
    println!("(both passes matched the truth exactly)");
}
