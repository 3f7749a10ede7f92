//! `clickagg loadgen`: a demo catalog and realistic traffic against a running server.
//!
//! Ads are drawn from a Zipf distribution; some clicks repeat an earlier impression
//! (duplicates, sometimes with an earlier event time), some carry event times beyond the
//! allowed lateness (late clicks), some go through the browser redirect, and now and then
//! one IP fires a burst within one second (the built-in fraud rule). It prints what it sent.

use std::collections::HashMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, Zipf};
use serde::Deserialize;
use serde_json::json;

use crate::progress::{Display, Progress};
use crate::time::now_ms;

/// What to send.
#[derive(Clone, Debug)]
pub struct LoadgenOptions {
    /// Where clicks go: the `serve` or `ingest` base URL.
    pub url: String,
    /// Where the catalog and impressions go (`query` in production); default `url`.
    pub query_url: Option<String>,
    /// Admin key (creates the catalog).
    pub admin_key: String,
    /// Ad-server key (mints impressions).
    pub ad_server_key: String,
    /// Clicks per second.
    pub rate: u64,
    /// Stop after this long (`None`: run until `clicks` or forever).
    pub duration: Option<Duration>,
    /// Stop after this many clicks.
    pub clicks: Option<u64>,
    /// Ads in the demo catalog.
    pub ads: u64,
    /// Advertisers in the demo catalog.
    pub advertisers: u64,
    /// Clicks per `POST /v1/clicks`.
    pub batch: usize,
    /// Share of clicks that repeat an earlier impression.
    pub duplicate_rate: f64,
    /// Share of clicks whose event time is `late_by` in the past.
    pub late_rate: f64,
    /// How far in the past late clicks happened (beyond the server's allowed lateness).
    pub late_by: Duration,
    /// Share of clicks sent through `GET /c/{token}`.
    pub redirect_rate: f64,
    /// One IP burst this often.
    pub burst_every: Duration,
    /// Clicks in a burst (above the server's per-IP limit).
    pub burst_size: usize,
    /// Random seed.
    pub seed: u64,
    /// Show a progress bar (else log progress every 10 s); see [`crate::progress`].
    pub progress: bool,
    /// Where the API keys of the advertisers it creates are saved ([`save_keys`]).
    pub keys_file: Option<PathBuf>,
}

impl Default for LoadgenOptions {
    fn default() -> Self {
        LoadgenOptions {
            url: "http://127.0.0.1:8080".into(),
            query_url: None,
            admin_key: String::new(),
            ad_server_key: String::new(),
            rate: 1_000,
            duration: Some(Duration::from_secs(60)),
            clicks: None,
            ads: 200,
            advertisers: 5,
            batch: 200,
            duplicate_rate: 0.1,
            late_rate: 0.02,
            late_by: Duration::from_secs(600),
            redirect_rate: 0.02,
            burst_every: Duration::from_secs(10),
            burst_size: 40,
            seed: 42,
            progress: true,
            keys_file: None,
        }
    }
}

/// What was sent and how the server answered.
#[derive(Debug, Default)]
pub struct LoadgenReport {
    /// Clicks sent in total.
    pub sent: u64,
    /// Clicks the server acknowledged.
    pub accepted: u64,
    /// Clicks the server refused.
    pub rejected: u64,
    /// Clicks that repeated an earlier impression.
    pub duplicates: u64,
    /// Clicks sent with a late event time.
    pub late: u64,
    /// Clicks sent in IP bursts.
    pub burst: u64,
    /// Clicks sent through the redirect.
    pub redirects: u64,
    /// Requests that failed (network or 5xx).
    pub failed_requests: u64,
    /// Wall time.
    pub elapsed: Duration,
}

impl fmt::Display for LoadgenReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        write!(
            f,
            "sent {} clicks in {:.1}s ({:.0}/s): {} accepted, {} rejected; {} duplicates, {} late, \
             {} in IP bursts, {} via redirect; {} failed requests",
            self.sent,
            secs,
            self.sent as f64 / secs,
            self.accepted,
            self.rejected,
            self.duplicates,
            self.late,
            self.burst,
            self.redirects,
            self.failed_requests
        )
    }
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    rejected: AtomicU64,
    failed: AtomicU64,
}

#[derive(Deserialize)]
struct Minted {
    impressions: Vec<MintedImpression>,
}

#[derive(Deserialize)]
struct MintedImpression {
    token: String,
}

#[derive(Deserialize)]
struct BatchAnswer {
    accepted: u64,
    rejected: Vec<serde_json::Value>,
}

/// A click remembered so it can be sent again as a duplicate.
#[derive(Clone)]
struct Sent {
    token: String,
    event_time: u64,
    user: String,
    ip: String,
}

struct Client {
    http: reqwest::Client,
    /// Where clicks go (`serve`, or `ingest` in production).
    url: String,
    /// Where the catalog and impressions go (`serve`, or `query` in production).
    query_url: String,
    admin: String,
    ad_server: String,
}

impl Client {
    async fn admin_json(
        &self,
        method: reqwest::Method,
        path: &str,
        body: serde_json::Value,
    ) -> anyhow::Result<(reqwest::StatusCode, serde_json::Value)> {
        let r = self
            .http
            .request(method, format!("{}{path}", self.query_url))
            .bearer_auth(&self.admin)
            .json(&body)
            .send()
            .await
            .with_context(|| path.to_string())?;
        let status = r.status();
        // Error bodies and 200s without JSON are fine: only a new advertiser's key is read.
        let body = r.json().await.unwrap_or(serde_json::Value::Null);
        Ok((status, body))
    }

    async fn mint(&self, ad_id: u64, user: &str, count: u32) -> anyhow::Result<Vec<String>> {
        let r = self
            .http
            .post(format!("{}/v1/impressions", self.query_url))
            .bearer_auth(&self.ad_server)
            .json(&json!({ "ad_id": ad_id, "user_id": user, "count": count }))
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("minting impressions for ad {ad_id}: {}", r.status());
        }
        Ok(r.json::<Minted>()
            .await?
            .impressions
            .into_iter()
            .map(|i| i.token)
            .collect())
    }
}

/// Creates the demo catalog: advertisers `1..=A`, ads `1..=N` in campaigns of 10 ads.
/// The API keys of advertisers it creates go to `keys_file`, if any (existing
/// advertisers keep theirs: the API shows a key only once).
async fn create_catalog(client: &Client, o: &LoadgenOptions) -> anyhow::Result<()> {
    let mut keys = Vec::new();
    for a in 1..=o.advertisers {
        let (status, body) = client
            .admin_json(
                reqwest::Method::POST,
                "/v1/advertisers",
                json!({ "advertiser_id": a, "name": format!("Advertiser {a}") }),
            )
            .await?;
        if !status.is_success() && status != reqwest::StatusCode::CONFLICT {
            bail!("creating advertiser {a}: {status}");
        }
        if let Some(key) = body["api_key"].as_str() {
            keys.push((a, key.to_owned()));
        }
    }
    if let Some(path) = &o.keys_file
        && !keys.is_empty()
    {
        save_keys(path, &keys)
            .with_context(|| format!("saving the demo advertisers' keys to {}", path.display()))?;
        tracing::info!(file = %path.display(), advertisers = keys.len(), "saved the demo advertisers' API keys");
    }
    for ad in 1..=o.ads {
        let campaign = 1_000 + (ad - 1) / 10;
        let advertiser = 1 + (campaign % o.advertisers);
        let (status, _) = client
            .admin_json(
                reqwest::Method::PUT,
                &format!("/v1/ads/{ad}"),
                json!({
                    "advertiser_id": advertiser,
                    "campaign_id": campaign,
                    "landing_url": format!("https://advertiser{advertiser}.example/ads/{ad}"),
                    "cpc_micros": 50_000 + (ad % 20) * 10_000,
                }),
            )
            .await?;
        if !status.is_success() {
            bail!("creating ad {ad}: {status}");
        }
    }
    Ok(())
}

/// Adds advertisers' API keys to the TOML file `path` (`[api_keys]`, by advertiser id),
/// keeping the keys already there; written whole to a temporary file first, mode 0600.
pub fn save_keys(path: &Path, keys: &[(u64, String)]) -> anyhow::Result<()> {
    let mut doc: toml::Table = match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text).context("parsing the existing file")?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => toml::Table::new(),
        Err(e) => return Err(e.into()),
    };
    let table = doc
        .entry("api_keys")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .context("api_keys is not a table")?;
    for (id, key) in keys {
        table.insert(id.to_string(), toml::Value::String(key.clone()));
    }
    let text = format!(
        "# API keys of the demo advertisers, by advertiser id, saved by clickagg loadgen / serve \
         --demo\n# when it created them (the API shows a key only once). Log in to /dashboard \
         with one.\n{}",
        toml::to_string(&doc)?
    );
    let tmp = path.with_extension("toml.tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options.open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The API key of advertiser `id` in a file written by [`save_keys`].
pub fn saved_key(path: &Path, id: u64) -> anyhow::Result<Option<String>> {
    let doc: toml::Table = toml::from_str(&std::fs::read_to_string(path)?)?;
    Ok(doc
        .get("api_keys")
        .and_then(|t| t.get(id.to_string()))
        .and_then(|v| v.as_str())
        .map(str::to_owned))
}

/// Sends traffic per `options` and reports what happened.
pub async fn run(options: LoadgenOptions) -> anyhow::Result<LoadgenReport> {
    if options.rate == 0 || options.ads == 0 || options.advertisers == 0 || options.batch == 0 {
        bail!("rate, ads, advertisers and batch must be positive");
    }
    let client = Arc::new(Client {
        http: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30))
            .build()?,
        url: options.url.trim_end_matches('/').to_owned(),
        query_url: options
            .query_url
            .as_deref()
            .unwrap_or(&options.url)
            .trim_end_matches('/')
            .to_owned(),
        admin: options.admin_key.clone(),
        ad_server: options.ad_server_key.clone(),
    });
    create_catalog(&client, &options).await?;

    let mut rng = StdRng::seed_from_u64(options.seed);
    let zipf = Zipf::new(options.ads as f64, 1.1).context("zipf")?;
    let counters = Arc::new(Counters::default());
    let mut report = LoadgenReport::default();
    let mut pools: HashMap<u64, Vec<String>> = HashMap::new();
    let mut recent: Vec<Sent> = Vec::with_capacity(10_000);
    let in_flight = Arc::new(tokio::sync::Semaphore::new(32));
    let mut tasks = tokio::task::JoinSet::new();

    let total = options
        .clicks
        .or_else(|| options.duration.map(|d| d.as_secs() * options.rate));
    let display = if options.progress {
        Display::Bar
    } else {
        Display::Log(Duration::from_secs(10))
    };
    let progress = Progress::start_with("loadgen", "clicks", total, display);

    let started = Instant::now();
    let mut last_burst = Instant::now();
    let slice = Duration::from_millis(100);
    let mut ticker = tokio::time::interval(slice);
    let per_slice = (options.rate as f64 * slice.as_secs_f64()).max(1.0);
    let mut carry = 0.0;
    loop {
        ticker.tick().await;
        if options.duration.is_some_and(|d| started.elapsed() >= d)
            || options.clicks.is_some_and(|n| report.sent >= n)
        {
            break;
        }
        carry += per_slice;
        let mut n = carry.floor() as u64;
        carry -= n as f64;
        if let Some(limit) = options.clicks {
            n = n.min(limit - report.sent);
        }
        let now = now_ms();
        let mut batch = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let click = if !recent.is_empty() && rng.random_bool(options.duplicate_rate) {
                report.duplicates += 1;
                let mut dup = recent[rng.random_range(0..recent.len())].clone();
                // Some duplicates claim an earlier event time than the first copy.
                if rng.random_bool(0.3) {
                    dup.event_time = dup.event_time.saturating_sub(rng.random_range(1..3_000));
                }
                dup
            } else {
                let ad = (zipf.sample(&mut rng) as u64).clamp(1, options.ads);
                let user = format!("u-{}", rng.random_range(0..100_000u32));
                let pool = pools.entry(ad).or_default();
                if pool.is_empty() {
                    *pool = client.mint(ad, &user, 50).await?;
                }
                let token = pool.pop().context("minted no impressions")?;
                let late = rng.random_bool(options.late_rate);
                if late {
                    report.late += 1;
                }
                let event_time = if late {
                    now.saturating_sub(options.late_by.as_millis() as u64)
                } else {
                    now.saturating_sub(rng.random_range(0..2_000))
                };
                let ip = format!(
                    "10.{}.{}.{}",
                    rng.random_range(0..256u32),
                    rng.random_range(0..256u32),
                    rng.random_range(1..255u32)
                );
                let sent = Sent {
                    token,
                    event_time,
                    user,
                    ip,
                };
                if recent.len() < 10_000 {
                    recent.push(sent.clone());
                } else {
                    let i = rng.random_range(0..recent.len());
                    recent[i] = sent.clone();
                }
                sent
            };
            batch.push(click);
        }
        if last_burst.elapsed() >= options.burst_every && options.burst_size > 0 {
            last_burst = Instant::now();
            let ad = (zipf.sample(&mut rng) as u64).clamp(1, options.ads);
            let tokens = client.mint(ad, "burst", options.burst_size as u32).await?;
            let ip = format!("192.0.2.{}", rng.random_range(1..255u32));
            let second = now - now % 1000;
            report.burst += tokens.len() as u64;
            batch.extend(tokens.into_iter().map(|token| Sent {
                token,
                event_time: second + rng.random_range(0..1000),
                user: "burst".into(),
                ip: ip.clone(),
            }));
        }
        report.sent += batch.len() as u64;
        progress.inc(batch.len() as u64);

        let (redirects, posts): (Vec<Sent>, Vec<Sent>) = batch
            .into_iter()
            .partition(|_| rng.random_bool(options.redirect_rate));
        report.redirects += redirects.len() as u64;
        for r in redirects {
            let (client, counters, permit) = (
                Arc::clone(&client),
                Arc::clone(&counters),
                Arc::clone(&in_flight).acquire_owned().await?,
            );
            tasks.spawn(async move {
                let result = client
                    .http
                    .get(format!("{}/c/{}", client.url, r.token))
                    .send()
                    .await;
                match result {
                    Ok(resp) if resp.status() == reqwest::StatusCode::FOUND => {
                        counters.accepted.fetch_add(1, Ordering::Relaxed)
                    }
                    Ok(resp) if resp.status().is_client_error() => {
                        counters.rejected.fetch_add(1, Ordering::Relaxed)
                    }
                    _ => counters.failed.fetch_add(1, Ordering::Relaxed),
                };
                drop(permit);
            });
        }
        for chunk in posts.chunks(options.batch) {
            let body: Vec<serde_json::Value> = chunk
                .iter()
                .map(|c| json!({ "token": c.token, "event_time": c.event_time, "user_id": c.user, "ip": c.ip }))
                .collect();
            let (client, counters, permit) = (
                Arc::clone(&client),
                Arc::clone(&counters),
                Arc::clone(&in_flight).acquire_owned().await?,
            );
            tasks.spawn(async move {
                let result = client
                    .http
                    .post(format!("{}/v1/clicks", client.url))
                    .json(&body)
                    .send()
                    .await;
                match result {
                    Ok(resp) if resp.status() == reqwest::StatusCode::ACCEPTED => {
                        if let Ok(a) = resp.json::<BatchAnswer>().await {
                            counters.accepted.fetch_add(a.accepted, Ordering::Relaxed);
                            counters
                                .rejected
                                .fetch_add(a.rejected.len() as u64, Ordering::Relaxed);
                        }
                    }
                    _ => {
                        counters.failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                drop(permit);
            });
        }
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    progress.finish();
    report.accepted = counters.accepted.load(Ordering::Relaxed);
    report.rejected = counters.rejected.load(Ordering::Relaxed);
    report.failed_requests = counters.failed.load(Ordering::Relaxed);
    report.elapsed = started.elapsed();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_keys_merge_and_stay_private() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("demo-advertisers.toml");
        save_keys(&path, &[(1, "ckv_one".into()), (2, "ckv_two".into())]).expect("save");
        save_keys(&path, &[(3, "ckv_three".into())]).expect("merge");
        assert_eq!(
            saved_key(&path, 1).expect("read").as_deref(),
            Some("ckv_one")
        );
        assert_eq!(
            saved_key(&path, 3).expect("read").as_deref(),
            Some("ckv_three")
        );
        assert_eq!(saved_key(&path, 4).expect("read"), None);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
