//! Memory: bytes of dataflow state per live impression.
//!
//! Feeds `STATE_IMPRESSIONS` impressions (default 1,000,000; plus 10% duplicate clicks, some
//! with an earlier event time) through one timely worker exactly as the log source emits
//! them (each click inserted at its tick; its retraction is read from the log again when
//! due, so none is queued in the dataflow), lets the dataflow catch up and then step idle
//! until the largest merge in flight has finished (`STATE_IDLE_STEPS`, default 3000), so
//! the figure is the state, not a transient. It counts the heap bytes the dataflow then
//! holds with a counting global allocator (bytes requested from jemalloc, capacity
//! included; jemalloc's own rounding and metadata not). Two dataflows, each measured in a
//! fresh worker:
//!
//! - `dedup`: only the dedup (`dedup::first_clicks`): the winner per impression it keeps in
//!   place (the fraud join reads the same winners; there is no arrangement of them). This
//!   is "state per live impression in the dedup arrangement" of the benchmark issue
//!   (target <= 64 B).
//! - `pipeline`: everything the engine builds between source and sink: dedup, late and
//!   fraud classification, and every registered view.
//!
//! Clicks look like the standard workload's (decimal click and user ids, IPv4 from the
//! user, 10k ads, one hour). `cargo bench --bench state`.

#[path = "workload.rs"]
mod workload;

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use clickagg::dataflow::classify::{Click, Rules};
use clickagg::dataflow::dedup::first_clicks;
use clickagg::dataflow::source::SourceEvent;
use clickagg::record::ClickEvent;
use clickagg::time::{Finality, Time};
use differential_dataflow::input::Input;
use timely::dataflow::ProbeHandle;
use timely::dataflow::operators::Probe;

/// jemalloc, counting the bytes live at any moment.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);
static JEMALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { JEMALLOC.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { JEMALLOC.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { JEMALLOC.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { JEMALLOC.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const T0: u64 = 1_700_000_000_000;
const TICK: u64 = 200;
const TTL: u64 = 1_800_000;

/// The clicks of `impressions` impressions (plus 10% duplicates) over one hour, in arrival
/// order: (record time, click).
fn clicks(impressions: u64) -> Vec<(u64, Click)> {
    let total = impressions * 10 / 9;
    let mut out = Vec::with_capacity(total as usize);
    let mut x: u64 = 42;
    let mut next = || {
        x = clickagg::log::mix64(x.wrapping_add(0x9e37_79b9_7f4a_7c15));
        x
    };
    let mut firsts: Vec<(u128, u64, u64)> = Vec::with_capacity(impressions as usize);
    for i in 0..total {
        let arrival = T0 + i * 3_600_000 / total;
        let event = arrival - next() % 5_001;
        let (imp, ad, user) = if i % 10 == 9 && !firsts.is_empty() {
            let back = 1 + (next() as usize) % firsts.len().min(20_000);
            firsts[firsts.len() - back]
        } else {
            let f = (
                u128::from(next()) & ((1 << 40) - 1),
                next() % 10_000,
                next() % 1_000_000,
            );
            firsts.push(f);
            f
        };
        let h = (user.wrapping_mul(2_654_435_761)) % 4_294_967_296;
        let event = ClickEvent {
            impression_id: imp,
            ad_id: ad,
            issued_at_ms: event,
            event_time_ms: event,
            click_id: i.to_string(),
            user_id: user.to_string(),
            ip: std::net::IpAddr::V4(std::net::Ipv4Addr::new(
                (10 + (h >> 24) % 200) as u8,
                (h >> 16) as u8,
                (h >> 8) as u8,
                h as u8,
            )),
            cpc_micros: 100_000,
        };
        out.push((arrival, Click::from_event(event, arrival, TTL)));
    }
    out
}

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// Runs one dataflow over the clicks; returns (bytes held once caught up, seconds).
fn measure(pipeline: bool, impressions: u64) -> (isize, f64) {
    let input = clicks(impressions);
    let (tx, rx) = std::sync::mpsc::channel();
    let config = timely::Config {
        communication: timely::CommunicationConfig::Thread,
        worker: clickagg::dataflow::worker_config(),
    };
    let guards = timely::execute(config, move |worker| {
        let probe = ProbeHandle::new();
        let rules = Rules {
            lateness_ms: 300_000,
            max_clicks_per_ip_per_second: 20,
        };
        let finality = Finality {
            ttl_ms: TTL,
            correction_ms: 1_800_000,
        };
        let mut session = worker.dataflow::<Time, _, _>(|scope| {
            let (session, events) = scope.new_collection::<SourceEvent, isize>();
            if pipeline {
                let events = clickagg::dataflow::demux::split_events(events);
                let inputs =
                    clickagg::dataflow::view_inputs(&events, rules, finality, Default::default());
                clickagg::dataflow::view_records(&inputs, clickagg::views::registry())
                    .inner
                    .probe_with(&probe);
            } else {
                let clicks = events.flat_map(|e| match e {
                    SourceEvent::Click(c) => Some(c),
                    _ => None,
                });
                first_clicks(clicks, rules.lateness_ms, Default::default())
                    .on_time
                    .inner
                    .probe_with(&probe);
            }
            session
        });
        session.advance_to(T0);
        session.flush();
        while probe.less_than(&T0) {
            worker.step();
        }
        let baseline = live();
        let started = Instant::now();
        let mut last = T0;
        for (record_ms, click) in &input {
            let time = record_ms.div_ceil(TICK) * TICK;
            if time > last {
                session.advance_to(time);
                session.flush();
                // Live pacing: the dataflow finishes each second before the next one.
                if time / 1_000 > last / 1_000 {
                    while probe.less_than(session.time()) {
                        worker.step();
                    }
                }
                last = time;
            }
            // Nothing expires within the hour measured: the source's expiry cursor would
            // not send a retraction before time + horizon.
            session.update_at(SourceEvent::Click(click.clone()), time, 1);
        }
        session.advance_to(last + TICK);
        session.flush();
        while probe.less_than(&(last + TICK)) {
            worker.step();
        }
        // Let idle merging finish, as a live worker would between ticks.
        // Enough steps for the largest merge in flight to finish.
        for _ in 0..workload::env_u64("STATE_IDLE_STEPS", 3_000) {
            worker.step();
        }
        let held = live() - baseline;
        let _ = tx.send((held, started.elapsed().as_secs_f64()));
        // Drop the dataflow rather than run it to completion.
        for dataflow in worker.installed_dataflows() {
            worker.drop_dataflow(dataflow);
        }
    })
    .expect("timely");
    drop(guards);
    rx.recv_timeout(Duration::from_secs(3600))
        .expect("measurement")
}

fn main() {
    let impressions = workload::env_u64("STATE_IMPRESSIONS", 1_000_000);
    println!("state bench on {}", workload::machine());
    println!(
        "{impressions} live impressions ({} clicks, 10% duplicates), one worker",
        impressions * 10 / 9
    );
    for (name, pipeline) in [("dedup", false), ("pipeline", true)] {
        let (bytes, secs) = measure(pipeline, impressions);
        println!(
            "  {name:<9}: {:>8.1} MiB held, {:>6.0} bytes per live impression ({secs:.1}s){}",
            bytes as f64 / 1_048_576.0,
            bytes as f64 / impressions as f64,
            if pipeline { "" } else { "  (target <= 64 B)" }
        );
        println!(
            "BENCH name={} bytes_per_impression={:.0}",
            if pipeline { "state_pipeline" } else { "state" },
            bytes as f64 / impressions as f64
        );
    }
}
