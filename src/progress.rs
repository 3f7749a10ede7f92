//! Progress of long operations (log replay on recovery, load generation): an `indicatif`
//! bar when stderr is a terminal, else a `tracing` line at intervals.
//!
//! Counting is one relaxed atomic add, so the hot path (a reader thread, a send loop)
//! pays nothing more; drawing and logging happen on a thread of the operation's own,
//! which wakes a few times a second. Log lines written through [`log_writer`] suspend
//! the bars while they print, so a terminal shows both without garbling either.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Display {
    /// An `indicatif` bar on stderr.
    Bar,
    /// A `tracing` info line this often.
    Log(Duration),
    /// Nothing until the end (the summary line is still logged).
    Quiet,
}

impl Display {
    /// A bar when stderr is a terminal, else a log line every `every`.
    pub fn auto(every: Duration) -> Display {
        if std::io::stderr().is_terminal() {
            Display::Bar
        } else {
            Display::Log(every)
        }
    }
}

/// What a running operation has done so far.
#[derive(Debug)]
struct Inner {
    name: &'static str,
    unit: &'static str,
    done: AtomicU64,
    /// 0 while unknown.
    total: AtomicU64,
    finished: AtomicBool,
    started: Instant,
    /// What the operation is doing now, if it says (set rarely, read by the display).
    stage: parking_lot::Mutex<&'static str>,
}

/// A cheap, cloneable handle that counts work from any thread.
#[derive(Clone, Debug)]
pub struct Counter(Arc<Inner>);

impl Counter {
    /// `n` more units done.
    pub fn inc(&self, n: u64) {
        self.0.done.fetch_add(n, Ordering::Relaxed);
    }

    /// `n` more units to do (totals that become known piece by piece).
    pub fn add_total(&self, n: u64) {
        self.0.total.fetch_add(n, Ordering::Relaxed);
    }

    /// Says what the operation is doing now (shown beside the bar and in log lines).
    pub fn set_stage(&self, stage: &'static str) {
        *self.0.stage.lock() = stage;
    }

    /// Units done so far.
    pub fn done(&self) -> u64 {
        self.0.done.load(Ordering::Relaxed)
    }

    /// Units to do, if known.
    pub fn total(&self) -> Option<u64> {
        Some(self.0.total.load(Ordering::Relaxed)).filter(|&t| t > 0)
    }
}

/// A running operation's progress display; ends (with a summary line) when finished or
/// dropped.
#[derive(Debug)]
pub struct Progress {
    counter: Counter,
    ticker: Option<JoinHandle<()>>,
}

impl Progress {
    /// Starts showing the progress of `name` (counting `unit`s, out of `total` if known)
    /// as [`Display::auto`] decides.
    pub fn start(name: &'static str, unit: &'static str, total: Option<u64>) -> Progress {
        Progress::start_with(name, unit, total, Display::auto(Duration::from_secs(10)))
    }

    /// Starts showing progress in the given way.
    pub fn start_with(
        name: &'static str,
        unit: &'static str,
        total: Option<u64>,
        display: Display,
    ) -> Progress {
        let counter = Counter(Arc::new(Inner {
            name,
            unit,
            done: AtomicU64::new(0),
            total: AtomicU64::new(total.unwrap_or(0)),
            finished: AtomicBool::new(false),
            started: Instant::now(),
            stage: parking_lot::Mutex::new(""),
        }));
        let inner = Arc::clone(&counter.0);
        let ticker = std::thread::Builder::new()
            .name(format!("progress-{name}"))
            .spawn(move || tick(&inner, display))
            .map_err(|e| tracing::warn!(error = %e, operation = name, "no progress display"))
            .ok();
        Progress { counter, ticker }
    }

    /// A handle for counting from other threads.
    pub fn counter(&self) -> Counter {
        self.counter.clone()
    }

    /// `n` more units done.
    pub fn inc(&self, n: u64) {
        self.counter.inc(n);
    }

    /// `n` more units to do.
    pub fn add_total(&self, n: u64) {
        self.counter.add_total(n);
    }

    /// Ends the display and logs a summary line (none when there was nothing to do).
    pub fn finish(mut self) {
        self.stop(true);
    }

    /// Ends the display without a summary (the operation was abandoned).
    pub fn abandon(mut self) {
        self.stop(false);
    }

    fn stop(&mut self, summary: bool) {
        let Some(ticker) = self.ticker.take() else {
            return;
        };
        let inner = &self.counter.0;
        inner.finished.store(true, Ordering::Release);
        ticker.thread().unpark();
        let _ = ticker.join();
        let (done, total) = (self.counter.done(), self.counter.total());
        if !summary || (done == 0 && total.is_none()) {
            return;
        }
        let secs = inner.started.elapsed().as_secs_f64();
        tracing::info!(
            operation = inner.name,
            done,
            total,
            unit = inner.unit,
            seconds = format!("{secs:.1}"),
            per_second = (done as f64 / secs.max(1e-9)).round() as u64,
            "{} finished: {done} {} in {secs:.1}s",
            inner.name,
            inner.unit
        );
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop(false);
    }
}

/// The display thread: redraws the bar, or logs every so often, until finished.
fn tick(inner: &Inner, display: Display) {
    let started = Instant::now();
    let mut bar: Option<ProgressBar> = None;
    let mut last_log = Instant::now();
    let pause = match display {
        Display::Bar => Duration::from_millis(100),
        Display::Log(_) | Display::Quiet => Duration::from_millis(500),
    };
    loop {
        std::thread::park_timeout(pause);
        let finished = inner.finished.load(Ordering::Acquire);
        let done = inner.done.load(Ordering::Relaxed);
        let total = Some(inner.total.load(Ordering::Relaxed)).filter(|&t| t > 0);
        match display {
            // Created on the first tick: an operation that finishes at once never flashes.
            Display::Bar if !finished => {
                let b = bar.get_or_insert_with(|| {
                    let b = new_bar();
                    b.set_style(style(inner, false));
                    b
                });
                if let Some(t) = total
                    && b.length() != Some(t)
                {
                    if b.length().is_none() {
                        b.set_style(style(inner, true));
                    }
                    b.set_length(t);
                }
                b.set_position(done);
                let stage = *inner.stage.lock();
                if b.message() != stage {
                    b.set_message(stage);
                }
            }
            Display::Log(every) if !finished && last_log.elapsed() >= every => {
                last_log = Instant::now();
                let secs = started.elapsed().as_secs_f64();
                tracing::info!(
                    operation = inner.name,
                    done,
                    total,
                    unit = inner.unit,
                    percent = total.map(|t| format!("{:.1}", 100.0 * done as f64 / t as f64)),
                    per_second = (done as f64 / secs.max(1e-9)).round() as u64,
                    eta_seconds = eta(done, total, started.elapsed()).map(|d| d.as_secs()),
                    stage = *inner.stage.lock(),
                    "{} progress",
                    inner.name
                );
            }
            _ => {}
        }
        if finished {
            break;
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
        bars().remove(&b);
        ACTIVE_BARS.fetch_sub(1, Ordering::AcqRel);
    }
}

fn new_bar() -> ProgressBar {
    ACTIVE_BARS.fetch_add(1, Ordering::AcqRel);
    bars().add(ProgressBar::with_draw_target(
        None,
        ProgressDrawTarget::hidden(),
    ))
}

/// A bar with a length, or a spinner while the total is unknown.
fn style(inner: &Inner, with_total: bool) -> ProgressStyle {
    let (name, unit) = (inner.name, inner.unit);
    let template = if with_total {
        format!(
            "{{spinner}} {name} [{{elapsed_precise}}] {{bar:40}} {{human_pos}}/{{human_len}} \
             {unit} ({{rate}}, eta {{eta}}) {{msg}}"
        )
    } else {
        format!("{{spinner}} {name} [{{elapsed_precise}}] {{human_pos}} {unit} ({{rate}}) {{msg}}")
    };
    ProgressStyle::with_template(&template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        // Whole units per second: indicatif's `per_sec` prints four decimals.
        .with_key(
            "rate",
            |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{:.0}/s", state.per_sec());
            },
        )
}

/// How long until `total` at the average rate so far.
pub fn eta(done: u64, total: Option<u64>, elapsed: Duration) -> Option<Duration> {
    let total = total?;
    if done == 0 {
        return None;
    }
    let left = total.saturating_sub(done) as f64;
    Some(Duration::from_secs_f64(
        elapsed.as_secs_f64() * left / done as f64,
    ))
}

/// Every bar of the process, drawn together on stderr.
fn bars() -> &'static MultiProgress {
    static BARS: OnceLock<MultiProgress> = OnceLock::new();
    BARS.get_or_init(MultiProgress::new)
}

/// Bars on screen now: log lines go around them only then.
static ACTIVE_BARS: AtomicUsize = AtomicUsize::new(0);

/// Writes log lines to stderr, above any progress bar on screen.
#[derive(Debug, Default)]
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if ACTIVE_BARS.load(Ordering::Acquire) == 0 {
            return std::io::stderr().write(buf);
        }
        bars().suspend(|| std::io::stderr().write_all(buf).map(|()| buf.len()))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// The `tracing` writer of the binary: stderr, kept apart from progress bars.
pub fn log_writer() -> LogWriter {
    LogWriter
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_from_many_threads_and_learns_its_total_late() {
        let progress = Progress::start_with("test", "items", None, Display::Quiet);
        assert_eq!(progress.counter().total(), None);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let c = progress.counter();
                std::thread::spawn(move || {
                    c.add_total(1_000);
                    for _ in 0..1_000 {
                        c.inc(1);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("counting thread");
        }
        assert_eq!(progress.counter().done(), 4_000);
        assert_eq!(progress.counter().total(), Some(4_000));
        progress.finish();
    }

    #[test]
    fn finishing_stops_the_display_thread_promptly() {
        let progress = Progress::start_with(
            "test",
            "items",
            Some(10),
            Display::Log(Duration::from_secs(60)),
        );
        progress.inc(3);
        let started = Instant::now();
        progress.finish();
        assert!(
            started.elapsed() < Duration::from_millis(400),
            "finish waited for a tick"
        );
    }

    #[test]
    fn eta_follows_the_average_rate() {
        assert_eq!(eta(0, Some(10), Duration::from_secs(5)), None);
        assert_eq!(eta(5, None, Duration::from_secs(5)), None);
        assert_eq!(
            eta(25, Some(100), Duration::from_secs(10)),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            eta(100, Some(100), Duration::from_secs(10)),
            Some(Duration::ZERO)
        );
    }
}
