//! The randomised workload of the end-to-end tests, sent through a driver that retries
//! unacknowledged requests with the same tokens, click ids and event times (as a real SDK
//! would) and, in the crash test, SIGKILLs the server at random moments.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};

use super::oracle::{Ad, Oracle, SentClick};
use super::{ADMIN, Target, now_ms};

/// Kills planned at request numbers.
#[derive(Debug, Default)]
pub struct Chaos {
    pub kill_at_requests: BTreeSet<u64>,
    pub kills: u32,
}

/// Sends requests, restarting a dead server and retrying until acknowledged.
pub struct Driver<'a> {
    pub server: &'a mut dyn Target,
    pub chaos: Option<Chaos>,
    pub requests: u64,
    pub retries: u64,
    pub rng: StdRng,
    /// The thread delivering the last planned kill, until it has landed.
    pending_kill: Option<std::thread::JoinHandle<()>>,
}

/// How a request ended.
pub struct Acked {
    pub status: u16,
    pub body: Value,
    pub location: Option<String>,
    pub first_send_ms: u64,
    pub ack_ms: u64,
}

impl<'a> Driver<'a> {
    pub fn new(server: &'a mut dyn Target, seed: u64, chaos: Option<Chaos>) -> Driver<'a> {
        Driver {
            server,
            chaos,
            requests: 0,
            retries: 0,
            rng: StdRng::seed_from_u64(seed),
            pending_kill: None,
        }
    }

    /// Kills the server now (SIGKILL), from another thread after a random delay so the
    /// kill lands in the middle of whatever the server is doing.
    pub fn kill_soon(&mut self) {
        // Two kills planned a few requests apart could otherwise both pick the process the
        // first has not reached yet, and one restart would count for two kills: let the
        // earlier kill land and the victim be restarted before choosing the next.
        if let Some(earlier) = self.pending_kill.take() {
            let _ = earlier.join();
            // SIGKILL is delivered at once, but the process takes a moment to exit.
            std::thread::sleep(Duration::from_millis(100));
            self.server.heal();
        }
        let victims = self.server.victims();
        if victims.is_empty() {
            return;
        }
        let pid = victims[self.rng.random_range(0..victims.len())];
        let delay = Duration::from_millis(self.rng.random_range(0..40));
        self.pending_kill = Some(std::thread::spawn(move || {
            std::thread::sleep(delay);
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        }));
        if let Some(chaos) = self.chaos.as_mut() {
            chaos.kills += 1;
        }
    }

    fn maybe_kill(&mut self) {
        let planned = self
            .chaos
            .as_ref()
            .is_some_and(|c| c.kill_at_requests.contains(&self.requests));
        if planned {
            self.kill_soon();
        }
    }

    /// Sends one request until the server acknowledges it with `expect`. A transport
    /// error, a 5xx or a dead server means "not acknowledged": restart if dead, resend.
    pub fn request(
        &mut self,
        method: reqwest::Method,
        key: Option<&str>,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
        expect: u16,
    ) -> Acked {
        self.requests += 1;
        self.maybe_kill();
        let first_send_ms = now_ms();
        for attempt in 0..200 {
            if attempt > 0 {
                self.retries += 1;
                std::thread::sleep(Duration::from_millis(100));
                self.server.heal();
            }
            let mut req = super::client().request(method.clone(), self.server.url(path));
            if let Some(key) = key {
                req = req.bearer_auth(key);
            }
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            if let Some(body) = body {
                req = req.json(body);
            }
            let Ok(resp) = req.send() else { continue };
            let status = resp.status().as_u16();
            if status >= 500 {
                continue;
            }
            let location = resp
                .headers()
                .get("location")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let text = resp.text().unwrap_or_default();
            let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            assert_eq!(status, expect, "{path}: {text}");
            return Acked {
                status,
                body,
                location,
                first_send_ms,
                ack_ms: now_ms(),
            };
        }
        panic!("{path} never acknowledged\n{}", self.server.log_tail());
    }
}

/// Shape of the workload.
#[derive(Clone, Debug)]
pub struct WorkloadSpec {
    pub seed: u64,
    /// Distinct impressions clicked in each of the two phases.
    pub impressions_per_phase: usize,
    pub batch_size: usize,
    pub redirects: usize,
    /// Duplicates that can be counted before their original loses or wins against them
    /// (earlier event times sent later, later event times sent in the same batch) stay in
    /// the original's minute, so no legitimate update ever lowers a window's total (for
    /// tests that watch the store for drops).
    pub duplicates_stay_in_minute: bool,
}

/// One impression the test may click.
#[derive(Clone, Debug)]
pub struct Impression {
    pub id: String,
    pub token: String,
    pub ad: u64,
}

/// A click not yet sent.
#[derive(Clone, Debug)]
pub struct Planned {
    pub imp: Impression,
    pub event_ms: u64,
    pub click_id: String,
    pub ip: String,
    pub user: String,
}

/// The catalog: 2 advertisers, 4 campaigns, 40 ads.
pub fn setup_catalog(d: &mut Driver, oracle: &mut Oracle) -> Vec<(u64, u64)> {
    for adv in [1u64, 2] {
        d.request(
            reqwest::Method::POST,
            Some(ADMIN),
            "/v1/advertisers",
            Some(&json!({"advertiser_id": adv, "name": format!("advertiser {adv}")})),
            &[],
            201,
        );
    }
    let mut prices = Vec::new();
    for i in 0..40u64 {
        let ad = 1000 + i * 7;
        let advertiser = 1 + i % 2;
        let campaign = advertiser * 10 + (i / 2) % 2;
        let cpc = d.rng.random_range(10_000..500_000u64);
        put_ad(d, ad, advertiser, campaign, cpc, 201);
        oracle.ads.insert(
            ad,
            Ad {
                id: ad,
                campaign,
                advertiser,
            },
        );
        prices.push((ad, cpc));
    }
    prices
}

fn put_ad(d: &mut Driver, ad: u64, advertiser: u64, campaign: u64, cpc: u64, expect: u16) {
    d.request(
        reqwest::Method::PUT,
        Some(ADMIN),
        &format!("/v1/ads/{ad}"),
        Some(
            &json!({"advertiser_id": advertiser, "campaign_id": campaign,
                     "landing_url": format!("https://adv{advertiser}.example/ad/{ad}"),
                     "cpc_micros": cpc}),
        ),
        &[],
        expect,
    );
}

fn mint(d: &mut Driver, ads: &[(u64, u64)], n: usize) -> Vec<Impression> {
    let mut out = Vec::new();
    // Zipf-ish: ad i gets weight 1/(i+1).
    let weights: Vec<f64> = (0..ads.len()).map(|i| 1.0 / (i as f64 + 1.0)).collect();
    let total: f64 = weights.iter().sum();
    for (i, &(ad, _)) in ads.iter().enumerate() {
        let k = ((n as f64) * weights[i] / total).ceil() as usize;
        let mut left = k;
        while left > 0 {
            let count = left.min(1000);
            let r = d.request(
                reqwest::Method::POST,
                Some(super::AD_SERVER),
                "/v1/impressions",
                Some(&json!({"ad_id": ad, "user_id": "u-test", "count": count})),
                &[],
                201,
            );
            for imp in r.body["impressions"].as_array().expect("impressions") {
                out.push(Impression {
                    id: imp["impression_id"].as_str().expect("id").to_string(),
                    token: imp["token"].as_str().expect("token").to_string(),
                    ad,
                });
            }
            left -= count;
        }
    }
    out.shuffle(&mut d.rng);
    out.truncate(n);
    out
}

struct Ips(u32);
impl Ips {
    fn next(&mut self) -> String {
        self.0 += 1;
        format!(
            "10.{}.{}.{}",
            (self.0 >> 16) & 255,
            (self.0 >> 8) & 255,
            self.0 & 255
        )
    }
}

/// Builds the clicks of one phase relative to `now`: each impression once, 10% of them
/// twice (later or earlier event time, same or a later batch), some late, IP bursts.
fn plan_phase(
    rng: &mut StdRng,
    imps: &[Impression],
    ips: &mut Ips,
    phase: u32,
    carried: &mut Vec<Planned>,
    spec: &WorkloadSpec,
) -> Vec<Planned> {
    let now = now_ms();
    let mut out = Vec::new();
    let mut click_no = 0u64;
    let mut click_id = |rng: &mut StdRng| {
        click_no += 1;
        format!("p{phase}-{click_no}-{:04x}", rng.random_range(0..0xffffu32))
    };
    let (bursts, rest) = imps.split_at(3 * 8 + 5);
    // Three bursts of 8 clicks from one IP in one second (fraud with N = 5) and one
    // group of exactly 5 (not fraud).
    for (g, group) in bursts.chunks(8).enumerate() {
        let ip = format!("198.18.{}.{}", phase % 256, g);
        let second = (now - 5_000 - g as u64 * 1_000) / 1000 * 1000;
        for imp in group {
            out.push(Planned {
                imp: imp.clone(),
                event_ms: second + rng.random_range(0..1000),
                click_id: click_id(rng),
                ip: ip.clone(),
                user: format!("user-{}", rng.random_range(0..5000)),
            });
        }
    }
    for imp in rest {
        let late = rng.random_bool(0.03);
        let event_ms = if late {
            now - rng.random_range(300_000..480_000)
        } else {
            now - rng.random_range(0..15_000)
        };
        let first = Planned {
            imp: imp.clone(),
            event_ms,
            click_id: click_id(rng),
            ip: ips.next(),
            user: format!("user-{}", rng.random_range(0..5000)),
        };
        if rng.random_bool(0.12) {
            let mut dup = first.clone();
            dup.click_id = click_id(rng);
            if rng.random_bool(0.3) {
                dup.ip = ips.next();
            }
            match rng.random_range(0..4) {
                // A retry with a later event time in the same batch, ahead of its original.
                // An append that fails part-way leaves the clicks already queued in the
                // log and the client sends the batch again, so the retry can be counted
                // first and then lose to its original: a window it crossed into would drop
                // again, as the dedup rule says it must.
                0 => {
                    dup.event_ms = (first.event_ms + rng.random_range(1..10_000)).min(now);
                    if spec.duplicates_stay_in_minute {
                        dup.event_ms = dup.event_ms.min(first.event_ms / 60_000 * 60_000 + 59_999);
                    }
                    out.push(dup);
                }
                // The same event time (tie broken by click id).
                1 => out.push(dup),
                // An earlier event time arriving in the next phase: it wins, possibly in
                // an earlier minute, after the first copy was counted.
                2 => {
                    dup.event_ms = first.event_ms - rng.random_range(1..15_000);
                    if spec.duplicates_stay_in_minute {
                        dup.event_ms = dup.event_ms.max(first.event_ms / 60_000 * 60_000);
                    }
                    carried.push(dup);
                }
                // A later event time in the next phase: a plain duplicate.
                _ => {
                    dup.event_ms = (first.event_ms + rng.random_range(1..60_000)).min(now);
                    carried.push(dup);
                }
            }
        }
        out.push(first);
    }
    out
}

/// Sends `clicks` in batches through `POST /v1/clicks`, each batch until acknowledged with
/// every click accepted, and records them in the oracle at `prices` (ad, cpc).
pub fn send_clicks(
    d: &mut Driver,
    oracle: &mut Oracle,
    clicks: &[Planned],
    prices: &[(u64, u64)],
    batch_size: usize,
) {
    for batch in clicks.chunks(batch_size) {
        let items: Vec<Value> = batch
            .iter()
            .map(|c| {
                json!({"token": c.imp.token, "event_time": c.event_ms, "user_id": c.user,
                       "ip": c.ip, "click_id": c.click_id})
            })
            .collect();
        let r = d.request(
            reqwest::Method::POST,
            None,
            "/v1/clicks",
            Some(&Value::Array(items)),
            &[],
            202,
        );
        assert_eq!(r.body["accepted"], batch.len(), "{}", r.body);
        assert_eq!(r.body["rejected"], json!([]), "{}", r.body);
        for c in batch {
            let cpc = price(prices, c.imp.ad);
            oracle.clicks.push(SentClick {
                impression: c.imp.id.clone(),
                ad: c.imp.ad,
                event_ms: c.event_ms,
                exact_event: true,
                click_id: Some(c.click_id.clone()),
                ip: c.ip.clone(),
                cpc_micros: cpc,
                first_send_ms: r.first_send_ms,
                ack_ms: r.ack_ms,
            });
        }
    }
}

fn price(prices: &[(u64, u64)], ad: u64) -> u64 {
    prices
        .iter()
        .find(|(a, _)| *a == ad)
        .map(|(_, p)| *p)
        .expect("priced ad")
}

/// Browser clicks through `GET /c/{token}`, some twice, each from its own IP. Their event
/// time is the receive time, so they are sent away from minute boundaries and the oracle
/// uses only their minute.
fn send_redirects(
    d: &mut Driver,
    oracle: &mut Oracle,
    imps: &[Impression],
    ips: &mut Ips,
    prices: &[(u64, u64)],
) {
    for imp in imps {
        let copies = if d.rng.random_bool(0.2) { 2 } else { 1 };
        let ip = ips.next();
        for _ in 0..copies {
            while !(2_000..50_000).contains(&(now_ms() % 60_000)) {
                std::thread::sleep(Duration::from_millis(100));
            }
            let r = d.request(
                reqwest::Method::GET,
                None,
                &format!("/c/{}", imp.token),
                None,
                &[("x-forwarded-for", ip.as_str())],
                302,
            );
            let landing = r.location.expect("Location header");
            assert!(landing.contains(&format!("/ad/{}", imp.ad)), "{landing}");
            assert_eq!(
                r.first_send_ms / 60_000,
                r.ack_ms / 60_000,
                "redirect crossed a minute boundary; its minute is unknown"
            );
            oracle.clicks.push(SentClick {
                impression: imp.id.clone(),
                ad: imp.ad,
                event_ms: r.first_send_ms,
                exact_event: false,
                click_id: None,
                ip: ip.clone(),
                cpc_micros: price(prices, imp.ad),
                first_send_ms: r.first_send_ms,
                ack_ms: r.ack_ms,
            });
        }
    }
}

/// Sends fraud verdicts for `imps` in batches of 100, each until every verdict is
/// accepted, and records them in the oracle.
pub fn send_verdicts(d: &mut Driver, oracle: &mut Oracle, imps: &[String]) {
    for chunk in imps.chunks(100) {
        let body: Vec<Value> = chunk
            .iter()
            .map(|i| json!({"impression_id": i, "reason": "ml-score"}))
            .collect();
        let r = d.request(
            reqwest::Method::POST,
            Some(ADMIN),
            "/v1/fraud-verdicts",
            Some(&Value::Array(body)),
            &[],
            202,
        );
        assert_eq!(r.body["accepted"], chunk.len());
        oracle.verdicts.extend(chunk.iter().cloned());
    }
}

/// Runs the whole workload; `between` is called after phase one is sent (e.g. to wait
/// for it to be counted and check it). Returns the oracle and the last ack time.
pub fn run(
    d: &mut Driver,
    spec: &WorkloadSpec,
    between: impl FnMut(&mut Driver, &Oracle, u64),
) -> (Oracle, u64) {
    run_until(d, spec, between, || false)
}

/// Like [`run`], then keeps sending rounds of fresh clicks while `keep_going()` holds.
pub fn run_until(
    d: &mut Driver,
    spec: &WorkloadSpec,
    mut between: impl FnMut(&mut Driver, &Oracle, u64),
    keep_going: impl Fn() -> bool,
) -> (Oracle, u64) {
    let t = d.server.times().clone();
    let mut oracle = Oracle::new(
        t.lateness_s * 1000,
        t.ttl_s * 1000,
        t.max_clicks_per_ip_per_second,
    );
    let mut prices = setup_catalog(d, &mut oracle);
    let n = spec.impressions_per_phase;
    let imps = mint(d, &prices, 2 * n + spec.redirects);
    let (phase_a, rest) = imps.split_at(n);
    let (phase_b, redirect_imps) = rest.split_at(n);
    let mut ips = Ips(0);

    let mut carried = Vec::new();
    let mut rng = StdRng::seed_from_u64(spec.seed ^ 0xa5a5);
    let clicks_a = plan_phase(&mut rng, phase_a, &mut ips, 1, &mut carried, spec);
    send_clicks(d, &mut oracle, &clicks_a, &prices, spec.batch_size);
    let last_ack = oracle.clicks.iter().map(|c| c.ack_ms).max().unwrap_or(0);
    between(d, &oracle, last_ack);

    // Verdicts for clicks already counted (some billable, some late, some burst), and for
    // a few phase-two impressions before their clicks arrive.
    let mut flagged: Vec<String> = phase_a
        .iter()
        .step_by(60)
        .map(|i| i.id.clone())
        .chain(phase_b.iter().step_by(200).map(|i| i.id.clone()))
        .collect();
    flagged.sort();
    flagged.dedup();
    send_verdicts(d, &mut oracle, &flagged);

    // Price changes: spend uses the price at click time, so earlier clicks keep theirs.
    for i in 0..5 {
        let (ad, _) = prices[i * 3];
        let ad_def = oracle.ads[&ad];
        let cpc = d.rng.random_range(10_000..500_000u64);
        put_ad(d, ad, ad_def.advertiser, ad_def.campaign, cpc, 200);
        prices[i * 3].1 = cpc;
    }
    // Spend uses the price the click path knows; give the new prices time to get there.
    std::thread::sleep(d.server.catalog_lag());

    let mut carried_b = Vec::new();
    let mut clicks_b = plan_phase(&mut rng, phase_b, &mut ips, 2, &mut carried_b, spec);
    clicks_b.extend(carried);
    clicks_b.shuffle(&mut rng);
    send_clicks(d, &mut oracle, &clicks_b, &prices, spec.batch_size);
    // Phase two's own late-arriving copies (some with an earlier event time) go last.
    carried_b.shuffle(&mut rng);
    send_clicks(d, &mut oracle, &carried_b, &prices, spec.batch_size);
    send_redirects(d, &mut oracle, redirect_imps, &mut ips, &prices);
    let mut round = 3;
    while keep_going() {
        // Steady traffic until the caller says stop: fresh impressions, some duplicated.
        let imps = mint(d, &prices, 2_000);
        let clicks = plan_phase(&mut rng, &imps, &mut ips, round, &mut Vec::new(), spec);
        send_clicks(d, &mut oracle, &clicks, &prices, spec.batch_size);
        round += 1;
    }
    let last_ack = oracle.clicks.iter().map(|c| c.ack_ms).max().unwrap_or(0);
    (oracle, last_ack.max(now_ms()))
}
