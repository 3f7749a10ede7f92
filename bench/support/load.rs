//! A lean HTTP/1.1 load client for the serving benchmarks: many keep-alive connections on
//! hyper's client connection API (no pool, no redirects followed), in one of two paces:
//!
//! - closed loop: every connection sends its next request as soon as the previous answer
//!   is in; this finds the most the server sustains, and latency counts from the send;
//! - open loop: request `i` is due at `start + i / rate` whatever happened before, any
//!   free connection sends it at once when due (or as soon as one frees up), and its
//!   latency counts from the DUE time, not the send. A server that stalls thus pays for
//!   every request queued behind the stall (no coordinated omission, the wrk2 way). A
//!   pacer thread releases each request when due with `nanosleep` precision (tens of µs;
//!   tokio's millisecond timer wheel alone added ~1.5 ms to every figure); whatever client
//!   slack remains counts against the server, never for it. Service time (send -> answer)
//!   is reported beside it.
//!
//! Also: the CPU seconds a process used, from `/proc`, so a figure can say which side
//! of a shared 2-core machine spent what.
#![allow(dead_code)]

#[path = "../workload.rs"]
mod workload;
// Not every bench that includes this module prints it (as with `dead_code` above).
#[allow(unused_imports)]
pub use workload::loadavg;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;

/// How requests are paced.
#[derive(Clone, Copy, Debug)]
pub enum Pace {
    /// Each connection sends back to back.
    Closed,
    /// Fixed schedule of `rate` requests per second.
    Open { rate: f64 },
}

impl Pace {
    /// How long a run of `requests` may take: `closed` for a closed loop; twice the
    /// schedule plus 10 s for an open one.
    pub fn deadline(&self, requests: u64, closed: Duration) -> Duration {
        match self {
            Pace::Closed => closed,
            Pace::Open { rate } => Duration::from_secs_f64(requests as f64 / rate * 2.0 + 10.0),
        }
    }

    /// The pace as the fields of a machine-readable `BENCH` line.
    pub fn bench_fields(&self) -> String {
        match self {
            Pace::Closed => "closed".to_owned(),
            Pace::Open { rate } => format!("open rate_req_s={rate:.0}"),
        }
    }
}

impl std::fmt::Display for Pace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pace::Closed => write!(f, "closed loop"),
            Pace::Open { rate } => write!(f, "open loop at {rate:.0} req/s"),
        }
    }
}

/// One request to send.
pub struct Shot {
    pub method: Method,
    pub path: String,
    pub headers: Vec<(&'static str, String)>,
    pub body: Bytes,
}

impl Shot {
    /// A GET of `path`.
    pub fn get(path: String) -> Shot {
        Shot {
            method: Method::GET,
            path,
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }
}

/// Builds request number `i`.
pub type Make = Arc<dyn Fn(u64) -> Shot + Send + Sync>;
/// Judges an answer: `Some(units acknowledged)` when it is what the bench expects.
pub type Judge = Arc<dyn Fn(StatusCode, &Bytes) -> Option<u64> + Send + Sync>;

/// What to run.
pub struct Plan {
    pub connections: usize,
    pub pace: Pace,
    /// Requests to send in all.
    pub requests: u64,
    /// Give up sending new requests after this long (a server that cannot keep up).
    pub deadline: Duration,
}

/// What happened.
#[derive(Default)]
pub struct Outcome {
    /// Requests answered as expected.
    pub ok: u64,
    /// Units (clicks) the expected answers acknowledged.
    pub units: u64,
    /// Answers the judge refused.
    pub bad: u64,
    /// Transport failures.
    pub errors: u64,
    /// Requests not sent because the deadline passed.
    pub unsent: u64,
    /// Latency in µs of every answered request: from due time (open) or send (closed).
    pub latency_us: Vec<u64>,
    /// Send -> answer in µs.
    pub service_us: Vec<u64>,
    /// The worst latency in µs of the requests due (open loop) or sent (closed) in each
    /// second of the phase: shows whether a high p99 is one stall or spread over the run.
    pub worst_by_second_us: Vec<u64>,
    /// First send to last answer.
    pub elapsed: Duration,
    /// When the phase's schedule started, in Unix ms: lines the seconds of
    /// `worst_by_second_us` up with other timelines (`bench/stall_probe.py`).
    pub started_unix_ms: u64,
    /// The first refused answer or transport error, for the report.
    pub first_problem: Option<String>,
}

impl Outcome {
    fn merge(&mut self, o: Outcome) {
        self.ok += o.ok;
        self.units += o.units;
        self.bad += o.bad;
        self.errors += o.errors;
        self.latency_us.extend(o.latency_us);
        self.service_us.extend(o.service_us);
        for (second, worst) in o.worst_by_second_us.into_iter().enumerate() {
            note_worst(&mut self.worst_by_second_us, second, worst);
        }
        if self.first_problem.is_none() {
            self.first_problem = o.first_problem;
        }
    }

    /// Answered requests per second.
    pub fn requests_per_s(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Acknowledged units per second.
    pub fn units_per_s(&self) -> f64 {
        self.units as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Latency percentile in ms (sorts lazily).
    pub fn latency_ms(&mut self, p: f64) -> f64 {
        percentile_ms(&mut self.latency_us, p)
    }

    /// Service-time percentile in ms.
    pub fn service_ms(&mut self, p: f64) -> f64 {
        percentile_ms(&mut self.service_us, p)
    }
}

/// Raises `worst[second]` to `us`, growing the list as needed.
fn note_worst(worst: &mut Vec<u64>, second: usize, us: u64) {
    if worst.len() <= second {
        worst.resize(second + 1, 0);
    }
    worst[second] = worst[second].max(us);
}

/// The `p` quantile (0..=1) of µs samples, in ms; 0 when empty.
pub fn percentile_ms(samples: &mut [u64], p: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    if !samples.is_sorted() {
        samples.sort_unstable();
    }
    let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[i] as f64 / 1000.0
}

async fn connect(addr: SocketAddr) -> Result<SendRequest<Full<Bytes>>, String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

async fn send(
    sender: &mut SendRequest<Full<Bytes>>,
    host: &str,
    shot: Shot,
) -> Result<(StatusCode, Bytes), String> {
    let mut request = Request::builder()
        .method(shot.method)
        .uri(shot.path)
        .header("host", host);
    for (name, value) in shot.headers {
        request = request.header(name, value);
    }
    let request = request
        .body(Full::new(shot.body))
        .map_err(|e| format!("request: {e}"))?;
    sender
        .ready()
        .await
        .map_err(|e| format!("connection: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("send: {e}"))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok((status, body))
}

struct Shared {
    addr: SocketAddr,
    host: String,
    /// Closed loop: the next request number.
    next: AtomicU64,
    /// Requests handed to a connection.
    taken: AtomicU64,
    /// Open loop: request numbers released by the pacer when due (`None`: all sent).
    due: Option<tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<u64>>>,
    interval: Option<Duration>,
    plan: Plan,
    start: Instant,
    make: Make,
    judge: Judge,
}

impl Shared {
    /// The next request to send: released by the pacer (open) or at once (closed).
    async fn take(&self) -> Option<u64> {
        let i = match &self.due {
            Some(rx) => rx.lock().await.recv().await,
            None => {
                let i = self.next.fetch_add(1, Ordering::Relaxed);
                (i < self.plan.requests && self.start.elapsed() <= self.plan.deadline).then_some(i)
            }
        };
        if i.is_some() {
            self.taken.fetch_add(1, Ordering::Relaxed);
        }
        i
    }
}

/// Releases request `i` at `start + i * interval` (open loop), from a plain thread so
/// the release is as punctual as the OS sleeps; stops at the deadline.
fn pace(
    tx: tokio::sync::mpsc::UnboundedSender<u64>,
    start: Instant,
    interval: Duration,
    requests: u64,
    deadline: Duration,
) {
    for i in 0..requests {
        let due = start + interval.mul_f64(i as f64);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        if start.elapsed() > deadline || tx.send(i).is_err() {
            return;
        }
    }
}

async fn connection(shared: Arc<Shared>) -> Outcome {
    let mut out = Outcome::default();
    let mut sender = match connect(shared.addr).await {
        Ok(s) => Some(s),
        Err(e) => {
            out.errors += 1;
            out.first_problem = Some(e);
            None
        }
    };
    while let Some(i) = shared.take().await {
        let due = shared.interval.map(|d| shared.start + d.mul_f64(i as f64));
        if sender.is_none() {
            match connect(shared.addr).await {
                Ok(s) => sender = Some(s),
                Err(e) => {
                    out.errors += 1;
                    out.first_problem.get_or_insert(e);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let Some(s) = sender.as_mut() else { continue };
        let sent = Instant::now();
        match send(s, &shared.host, (shared.make)(i)).await {
            Ok((status, body)) => {
                let done = Instant::now();
                match (shared.judge)(status, &body) {
                    Some(units) => {
                        out.ok += 1;
                        out.units += units;
                        let from = due.unwrap_or(sent);
                        let latency = done.duration_since(from).as_micros() as u64;
                        out.latency_us.push(latency);
                        let second = from.saturating_duration_since(shared.start).as_secs();
                        note_worst(&mut out.worst_by_second_us, second as usize, latency);
                        out.service_us
                            .push(done.duration_since(sent).as_micros() as u64);
                    }
                    None => {
                        out.bad += 1;
                        out.first_problem.get_or_insert_with(|| {
                            format!(
                                "{status}: {}",
                                String::from_utf8_lossy(&body[..body.len().min(300)])
                            )
                        });
                    }
                }
            }
            Err(e) => {
                out.errors += 1;
                out.first_problem.get_or_insert(e);
                sender = None;
            }
        }
    }
    out
}

/// Runs `plan` against `addr`: request `i` from `make(i)`, each answer through `judge`.
pub async fn run(addr: SocketAddr, plan: Plan, make: Make, judge: Judge) -> Outcome {
    let connections = plan.connections;
    let interval = match plan.pace {
        Pace::Open { rate } => Some(Duration::from_secs_f64(1.0 / rate)),
        Pace::Closed => None,
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (requests, deadline) = (plan.requests, plan.deadline);
    // The open loop starts a moment ahead, once the connections are up.
    let lead = interval.map_or(Duration::ZERO, |_| Duration::from_millis(50));
    let start = Instant::now() + lead;
    let started_unix_ms = (std::time::SystemTime::now() + lead)
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let shared = Arc::new(Shared {
        addr,
        host: addr.to_string(),
        next: AtomicU64::new(0),
        taken: AtomicU64::new(0),
        due: interval.map(|_| tokio::sync::Mutex::new(rx)),
        interval,
        plan,
        start,
        make,
        judge,
    });
    let tasks: Vec<_> = (0..connections)
        .map(|_| tokio::spawn(connection(Arc::clone(&shared))))
        .collect();
    let mut total = Outcome::default();
    if let Some(interval) = interval {
        let pacer = std::thread::spawn(move || pace(tx, start, interval, requests, deadline));
        // The pacer sleeps in its own thread; waiting for it here would block a runtime
        // worker, so poll its end.
        while !pacer.is_finished() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        pacer.join().expect("pacer thread");
    } else {
        drop(tx);
    }
    for task in tasks {
        match task.await {
            Ok(o) => total.merge(o),
            Err(e) => {
                total.errors += 1;
                total.first_problem.get_or_insert(format!("task: {e}"));
            }
        }
    }
    total.elapsed = shared.start.elapsed();
    total.started_unix_ms = started_unix_ms;
    total.unsent = requests.saturating_sub(shared.taken.load(Ordering::Relaxed));
    total
}

/// Runs `plan` on a fresh tokio runtime with `threads` worker threads (the benches' own
/// main thread stays blocking).
pub fn run_blocking(
    threads: usize,
    addr: SocketAddr,
    plan: Plan,
    make: Make,
    judge: Judge,
) -> Outcome {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .expect("client runtime");
    runtime.block_on(run(addr, plan, make, judge))
}

/// The socket address of a base URL such as `http://127.0.0.1:4312`.
pub fn addr_of(base: &str) -> SocketAddr {
    base.trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .unwrap_or_else(|e| panic!("address of {base}: {e}"))
}

/// CPU seconds (user + system) a process has used so far; `None`: this process.
pub fn cpu_seconds(pid: Option<u32>) -> f64 {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat; here 0-based after the state (field 3).
    (ticks(11) + ticks(12)) / 100.0
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS:`, `VmHWM:`).
pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// Where a server thread's CPU goes, by its name: the HTTP side (tokio workers and the
/// blocking pool), the log writer (group commits), the dataflow (timely workers, log
/// readers, sink) and the rest.
fn thread_group(comm: &str) -> &'static str {
    if comm.starts_with("tokio") {
        "http"
    } else if comm == "log-writer" {
        "log writer"
    } else if comm.starts_with("timely") || comm.starts_with("log-reader") || comm == "sink-writer"
    {
        "dataflow"
    } else {
        "other"
    }
}

/// CPU seconds a process's threads have used so far, by [`thread_group`]. Threads that
/// ended are missing, so compare two samples of long-lived threads only.
pub fn cpu_by_group(pid: u32) -> std::collections::BTreeMap<&'static str, f64> {
    let mut out = std::collections::BTreeMap::new();
    for (name, secs) in crate::common::thread_cpu_seconds(pid) {
        *out.entry(thread_group(&name)).or_default() += secs;
    }
    out
}

/// `after - before` per group, as "group X µs" per unit of work (`units` clicks).
pub fn per_unit(
    before: &std::collections::BTreeMap<&'static str, f64>,
    after: &std::collections::BTreeMap<&'static str, f64>,
    units: u64,
) -> String {
    after
        .iter()
        .map(|(g, a)| {
            let spent = a - before.get(g).copied().unwrap_or(0.0);
            format!("{g} {:.1}", spent * 1e6 / units.max(1) as f64)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// CPU seconds the whole machine has been busy (all cores, every process), from
/// `/proc/stat`: with [`cpu_seconds`] of the server and of this process, what OTHER
/// processes took during a measurement (load average counts our own threads too).
pub fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: all but idle and iowait are busy.
    [0, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|i| ticks.get(*i))
        .sum::<f64>()
        / 100.0
}

/// CPU use during a measurement: the server's, this process's, everyone else's.
pub struct CpuSplit {
    server: f64,
    client: f64,
    machine: f64,
    pid: u32,
}

impl CpuSplit {
    /// Starts measuring.
    pub fn start(pid: u32) -> CpuSplit {
        CpuSplit {
            server: cpu_seconds(Some(pid)),
            client: cpu_seconds(None),
            machine: machine_busy_seconds(),
            pid,
        }
    }

    /// Cores used since the start over `secs`: (server, bench client, other processes).
    pub fn cores(&self, secs: f64) -> (f64, f64, f64) {
        let server = cpu_seconds(Some(self.pid)) - self.server;
        let client = cpu_seconds(None) - self.client;
        let machine = machine_busy_seconds() - self.machine;
        let secs = secs.max(1e-9);
        (
            server / secs,
            client / secs,
            (machine - server - client).max(0.0) / secs,
        )
    }
}
