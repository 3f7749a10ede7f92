//! Issue 6, acceptance 2: SIGTERM under load. The real `clickagg serve` gets click
//! batches from several threads; SIGTERM in the middle must end it with status 0 within
//! 10 s, with the store already covering every acknowledged click (the last frontier was
//! committed before exit, read from the store file itself); after a restart every window
//! equals the oracle of the acknowledged clicks.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::compare::{assert_matches_oracle, wait_counted};
use common::oracle::{Oracle, SentClick};
use common::workload::{Driver, setup_catalog};
use common::{Server, Target, TestTimes, now_ms};
use serde_json::{Value, json};

#[test]
fn sigterm_under_load_exits_0_in_10s_and_loses_nothing() {
    let times = TestTimes::default();
    let mut server = Server::start(times.clone());
    let mut oracle = Oracle::new(
        times.lateness_s * 1000,
        times.ttl_s * 1000,
        times.max_clicks_per_ip_per_second,
    );
    let prices = {
        let mut driver = Driver::new(&mut server, 3, None);
        setup_catalog(&mut driver, &mut oracle)
    };
    // Impressions for ~4 threads x a few seconds of batches.
    let mut imps = Vec::new();
    for (ad, cpc) in prices.iter().take(8) {
        for (id, token) in server.impressions(*ad, 6_000) {
            imps.push((id, token, *ad, *cpc));
        }
    }
    let base = server.url("");
    let acked: Arc<Mutex<Vec<SentClick>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let threads = 4;
    let chunk = imps.len() / threads;
    let senders: Vec<_> = imps
        .chunks(chunk)
        .enumerate()
        .map(|(t, mine)| {
            let (mine, acked, stop, base) = (
                mine.to_vec(),
                Arc::clone(&acked),
                Arc::clone(&stop),
                base.clone(),
            );
            std::thread::spawn(move || {
                let client = common::client();
                let mut sent = 0usize;
                for batch in mine.chunks(100) {
                    if stop.load(Ordering::Acquire) {
                        break;
                    }
                    let first_send_ms = now_ms();
                    let items: Vec<Value> = batch
                        .iter()
                        .enumerate()
                        .map(|(i, (_, token, _, _))| {
                            json!({"token": token, "event_time": first_send_ms - 500,
                                   "ip": format!("10.{t}.{}.{}", (sent + i) / 250, (sent + i) % 250),
                                   "click_id": format!("t{t}-{}", sent + i)})
                        })
                        .collect();
                    let Ok(resp) = client
                        .post(format!("{base}/v1/clicks"))
                        .json(&Value::Array(items))
                        .send()
                    else {
                        // Refused or cut off: not acknowledged; the server is stopping.
                        break;
                    };
                    if resp.status() != 202 {
                        break;
                    }
                    let Ok(body) = resp.json::<Value>() else { break };
                    assert_eq!(body["accepted"], batch.len(), "{body}");
                    let ack_ms = now_ms();
                    let mut acked = acked.lock().expect("lock");
                    for (i, (id, _, ad, cpc)) in batch.iter().enumerate() {
                        acked.push(SentClick {
                            impression: id.clone(),
                            ad: *ad,
                            event_ms: first_send_ms - 500,
                            exact_event: true,
                            click_id: Some(format!("t{t}-{}", sent + i)),
                            ip: format!("10.{t}.{}.{}", (sent + i) / 250, (sent + i) % 250),
                            cpc_micros: *cpc,
                            first_send_ms,
                            ack_ms,
                        });
                    }
                    sent += batch.len();
                }
            })
        })
        .collect();

    // Let the load build up, then SIGTERM while batches are in flight.
    let warmup = Instant::now();
    while acked.lock().expect("lock").len() < 5_000 && warmup.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = acked.lock().expect("lock").len();
    let started = Instant::now();
    let status = server.proc.terminate(Duration::from_secs(10));
    let took = started.elapsed();
    stop.store(true, Ordering::Release);
    for s in senders {
        s.join().expect("sender thread");
    }
    let status = status.unwrap_or_else(|| {
        panic!(
            "serve did not exit within 10 s of SIGTERM\n{}",
            server.log_tail()
        )
    });
    assert!(
        status.success(),
        "serve exited with {status} after SIGTERM\n{}",
        server.log_tail()
    );
    let acked = acked.lock().expect("lock").clone();
    eprintln!(
        "SIGTERM after {before} acknowledged clicks; exit 0 in {took:?}; {} acknowledged in all",
        acked.len()
    );
    assert!(
        acked.len() >= before && before >= 1_000,
        "too little load before SIGTERM"
    );
    let last_ack = acked.iter().map(|c| c.ack_ms).max().expect("acks");
    oracle.clicks = acked;

    // Before any restart: the store file already covers every acknowledged click (the
    // last frontier was committed on the way out, not left for a replay).
    let store = rusqlite::Connection::open_with_flags(
        server.data_dir().join("store.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open store.db");
    let stored: i64 = store
        .query_row(
            "SELECT COALESCE(SUM(clicks + fraud_clicks + late_clicks), 0) FROM v_ad_clicks",
            [],
            |r| r.get(0),
        )
        .expect("sum v_ad_clicks");
    assert_eq!(
        stored as usize,
        oracle.counted().len(),
        "the store at exit does not hold every acknowledged impression"
    );
    drop(store);

    // Restart: the log holds every acknowledged click and the API equals the oracle.
    server.restart();
    wait_counted(&server, &oracle, last_ack);
    let windows = assert_matches_oracle(&server, &oracle);
    eprintln!("{windows} windows equal the oracle after SIGTERM and restart");
}
