//! The worker tier as a timely cluster: several `clickagg worker` processes, each with
//! `workers` threads, connected over TCP as `[cluster] processes` lists them.
//!
//! Timely has no elasticity and no failure recovery: when a process dies its peers would
//! wait for its progress forever. We own that story, crash-only: a process that loses a
//! peer exits at once with a clear message, and restarting every process recovers
//! exactly once from the store, as after any crash (see `docs/deploy.md`). Two ways to
//! notice a lost peer:
//! - its TCP connection breaks (the process died, the machine rebooted): timely's
//!   network threads panic, and [`exit_on_dataflow_panic`] turns that into an exit;
//! - it goes silent (a machine vanished without closing its sockets, a partition): the
//!   [`Liveness`] dataflow, whose frontier only moves while every worker of every
//!   process keeps advancing its clock input, stalls, and the [`Watchdog`] exits after
//!   `peer_timeout`.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use timely::dataflow::operators::vec::{Broadcast, Input};
use timely::dataflow::operators::{Inspect, Probe, probe};
use timely::worker::Worker;

use crate::store::RecoveryPoint;

/// The exit status of a worker process that lost a peer process or could not reach one.
pub const EXIT_PEER_LOST: i32 = 3;

/// The shape of the cluster and this process's place in it.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    /// `host:port` of every process; empty or one entry: a single process.
    pub processes: Vec<String>,
    /// This process's index into `processes`.
    pub process: usize,
    /// Timely worker threads per process.
    pub workers: usize,
    /// Silence from the cluster longer than this ends the process.
    pub peer_timeout: Duration,
    /// How long to wait at start for every peer to connect.
    pub connect_timeout: Duration,
}

impl ClusterSpec {
    /// One process of `workers` threads.
    pub fn single(workers: usize) -> ClusterSpec {
        ClusterSpec {
            processes: Vec::new(),
            process: 0,
            workers,
            peer_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(300),
        }
    }

    /// Whether several processes form the cluster.
    pub fn is_distributed(&self) -> bool {
        self.processes.len() > 1
    }

    /// Whether this process holds worker 0, whose `ClickSink` is the store's one writer.
    pub fn is_committer(&self) -> bool {
        self.process == 0
    }

    /// Timely workers across all processes.
    pub fn peers(&self) -> usize {
        self.workers * self.processes.len().max(1)
    }

    /// The timely communication config: built from ours, never from argv.
    pub fn communication(&self) -> timely::CommunicationConfig {
        if self.is_distributed() {
            timely::CommunicationConfig::Cluster {
                threads: self.workers,
                process: self.process,
                addresses: self.processes.clone(),
                report: false,
                zerocopy: false,
            }
        } else {
            timely::CommunicationConfig::Process(self.workers)
        }
    }
}

/// Makes a panic on any timely thread (a worker, or a network thread whose peer hung up)
/// end the process: the dataflow cannot continue without that thread, and a process
/// that stays up without it would look healthy while counting nothing. The store holds
/// only whole commits, so a restart recovers exactly once.
pub fn exit_on_dataflow_panic() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        previous(info);
        let thread = std::thread::current();
        let name = thread.name().unwrap_or_default();
        if !name.starts_with("timely:") {
            return;
        }
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("(no message)");
        if message.contains("timely communication error") || message.contains("poisoned") {
            tracing::error!(
                thread = name,
                cause = message,
                "lost the connection to a peer worker process; exiting. Restart every \
                 process of the worker cluster: they recover from the store"
            );
        } else {
            tracing::error!(
                thread = name,
                cause = message,
                "a dataflow thread panicked; exiting so a restart recovers from the store"
            );
        }
        std::process::exit(EXIT_PEER_LOST);
    }));
}

/// Where the watchdog is: waiting for peers, running, or stopping on purpose.
const CONNECTING: u8 = 0;
const RUNNING: u8 = 1;
const STOPPING: u8 = 2;

/// What every worker thread reports for the [`Watchdog`]: the liveness frontier it sees.
#[derive(Debug)]
pub struct Heartbeat {
    phase: AtomicU8,
    frontier: AtomicU64,
}

impl Heartbeat {
    fn new() -> Heartbeat {
        Heartbeat {
            phase: AtomicU8::new(CONNECTING),
            frontier: AtomicU64::new(0),
        }
    }

    /// The cluster is connected and the dataflow runs.
    pub fn running(&self) {
        let _ =
            self.phase
                .compare_exchange(CONNECTING, RUNNING, Ordering::AcqRel, Ordering::Acquire);
    }

    /// The process is shutting down on purpose: silence is expected now.
    pub fn stopping(&self) {
        self.phase.store(STOPPING, Ordering::Release);
    }

    fn observe(&self, frontier: u64) {
        self.frontier.fetch_max(frontier, Ordering::AcqRel);
    }
}

/// Ends the process when the cluster does not connect within `connect_timeout`, or when
/// the liveness frontier stands still for `peer_timeout`.
pub struct Watchdog;

impl Watchdog {
    /// Starts the watchdog thread for a distributed cluster; `None` for one process.
    pub fn start(spec: &ClusterSpec) -> std::io::Result<Option<Arc<Heartbeat>>> {
        if !spec.is_distributed() {
            return Ok(None);
        }
        let heartbeat = Arc::new(Heartbeat::new());
        let watched = Arc::clone(&heartbeat);
        let spec = spec.clone();
        std::thread::Builder::new()
            .name("clickagg-watchdog".into())
            .spawn(move || watch(&spec, &watched))?;
        Ok(Some(heartbeat))
    }
}

fn watch(spec: &ClusterSpec, heartbeat: &Heartbeat) {
    let started = Instant::now();
    let (mut last, mut since) = (0, Instant::now());
    let mut phase = CONNECTING;
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let now_phase = heartbeat.phase.load(Ordering::Acquire);
        if now_phase != phase {
            // Silence is measured from when the dataflow started, not from our start.
            (phase, since) = (now_phase, Instant::now());
        }
        match phase {
            CONNECTING if started.elapsed() > spec.connect_timeout => {
                tracing::error!(
                    process = spec.process,
                    processes = ?spec.processes,
                    waited = %humantime::format_duration(spec.connect_timeout),
                    "the worker cluster did not form: not every peer process connected; \
                     exiting. Start every process listed in cluster.processes"
                );
                std::process::exit(EXIT_PEER_LOST);
            }
            RUNNING => {
                let now = heartbeat.frontier.load(Ordering::Acquire);
                if now != last {
                    (last, since) = (now, Instant::now());
                } else if since.elapsed() > spec.peer_timeout {
                    tracing::error!(
                        process = spec.process,
                        processes = ?spec.processes,
                        silent_for = %humantime::format_duration(spec.peer_timeout),
                        "no progress from a peer worker process: it is gone or unreachable; \
                         exiting. Restart every process of the worker cluster: they \
                         recover from the store"
                    );
                    std::process::exit(EXIT_PEER_LOST);
                }
            }
            STOPPING => return,
            _ => {}
        }
    }
}

/// A dataflow whose frontier is the oldest second any worker of any process has reached
/// on its own clock: it moves only while every peer is alive and heard from.
pub struct Liveness {
    input: timely::dataflow::operators::vec::input::Handle<u64, ()>,
    probe: probe::Handle<u64>,
    started: Instant,
    heartbeat: Arc<Heartbeat>,
}

impl Liveness {
    /// Builds the liveness dataflow on this worker (every worker must).
    pub fn build(worker: &mut Worker, heartbeat: Arc<Heartbeat>) -> Liveness {
        let (input, probe) = worker.dataflow::<u64, _, _>(|scope| {
            let (input, stream) = scope.new_input::<()>();
            let (probe, _) = stream.probe();
            (input, probe)
        });
        Liveness {
            input,
            probe,
            started: Instant::now(),
            heartbeat,
        }
    }

    /// Advances this worker's clock input and reports the cluster-wide frontier.
    pub fn tick(&mut self) {
        let second = self.started.elapsed().as_secs() + 1;
        if second > *self.input.time() {
            self.input.advance_to(second);
        }
        if let Some(f) = self.probe.with_frontier(|f| f.first().copied()) {
            self.heartbeat.observe(f);
        }
    }
}

/// Gives every worker of every process the recovery point that process 0 read from the
/// store after claiming it, so all start from the same frontier and positions.
pub fn agree_on_recovery(
    worker: &mut Worker,
    mine: Option<RecoveryPoint>,
    mut liveness: Option<&mut Liveness>,
) -> Option<RecoveryPoint> {
    let received = Rc::new(RefCell::new(None));
    let (mut input, probe) = worker.dataflow::<u64, _, _>(|scope| {
        let (input, stream) = scope.new_input::<RecoveryPoint>();
        let seen = Rc::clone(&received);
        let (probe, _) = stream
            .broadcast()
            .inspect(move |r: &RecoveryPoint| *seen.borrow_mut() = Some(r.clone()))
            .probe();
        (input, probe)
    });
    if let Some(point) = mine {
        input.send(point);
    }
    drop(input);
    while !probe.done() {
        worker.step_or_park(Some(Duration::from_millis(50)));
        if let Some(l) = liveness.as_deref_mut() {
            l.tick();
        }
    }
    received.take()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_process_is_not_distributed_and_commits() {
        let spec = ClusterSpec::single(2);
        assert!(!spec.is_distributed());
        assert!(spec.is_committer());
        assert_eq!(spec.peers(), 2);
        assert!(matches!(
            spec.communication(),
            timely::CommunicationConfig::Process(2)
        ));
    }

    #[test]
    fn a_second_process_is_not_the_committer() {
        let spec = ClusterSpec {
            processes: vec!["a:1".into(), "b:2".into()],
            process: 1,
            ..ClusterSpec::single(3)
        };
        assert!(spec.is_distributed());
        assert!(!spec.is_committer());
        assert_eq!(spec.peers(), 6);
        match spec.communication() {
            timely::CommunicationConfig::Cluster {
                threads,
                process,
                addresses,
                ..
            } => assert_eq!((threads, process, addresses.len()), (3, 1, 2)),
            other => panic!("expected a cluster config, got {other:?}"),
        }
    }

    #[test]
    fn every_worker_gets_the_recovery_point_of_worker_zero() {
        let point = RecoveryPoint {
            as_of: 4_200,
            ..RecoveryPoint::default()
        };
        let sent = point.clone();
        let got = timely::execute(timely::Config::process(3), move |worker| {
            let mine = (worker.index() == 0).then(|| sent.clone());
            agree_on_recovery(worker, mine, None)
        })
        .expect("execute")
        .join();
        assert_eq!(got.len(), 3);
        for r in got {
            assert_eq!(r.expect("worker ran"), Some(point.clone()));
        }
    }
}
