//! Issue 6, acceptance 3: bad config files fail at start, with a message naming the
//! problem. Each case runs the real `clickagg` binary (the command that would use the
//! file, and `clickagg config check` on it) and expects a quick non-zero exit whose
//! stderr names the key; valid controls show the checks do not simply fail everything.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long a refusing process may take; the unreachable-store case waits
/// `store.startup_timeout` (2s here) plus one connect attempt.
const LIMIT: Duration = Duration::from_secs(30);

/// Runs `clickagg args...` with a private data dir and port; its output, or a panic if it
/// does not exit within [`LIMIT`] (a hang is a failure too).
fn clickagg(dir: &Path, args: &[&str]) -> (Output, Duration) {
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_clickagg"))
        .args(args)
        .env("CLICKAGG_HTTP_ADDR", "127.0.0.1:0")
        .env_remove("CLICKAGG_DATA_DIR")
        .env_remove("CLICKAGG_POSTGRES_URL")
        .env("RUST_LOG", "warn")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn clickagg");
    loop {
        match child.try_wait().expect("wait") {
            Some(_) => break,
            None if started.elapsed() > LIMIT => {
                let _ = child.kill();
                let out = child.wait_with_output().expect("output");
                panic!(
                    "clickagg {args:?} still running after {LIMIT:?}\nstderr:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    let out = child.wait_with_output().expect("output");
    (out, started.elapsed())
}

/// Asserts `clickagg args` failed with a message containing every one of `needles`.
fn assert_refused(dir: &Path, args: &[&str], needles: &[&str]) -> Duration {
    let (out, took) = clickagg(dir, args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "clickagg {args:?} succeeded but should refuse\nstdout:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let error_line = stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no `error:` line from clickagg {args:?}:\n{stderr}"));
    for needle in needles {
        assert!(
            error_line.contains(needle),
            "clickagg {args:?}: the error does not name {needle:?}:\n{error_line}"
        );
    }
    took
}

fn assert_ok(dir: &Path, args: &[&str]) -> String {
    let (out, _) = clickagg(dir, args);
    assert!(
        out.status.success(),
        "clickagg {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write config");
    path
}

/// A loopback port nobody listens on.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

fn production(url: &str) -> String {
    format!(
        "data_dir = \"data\"\n[keys]\nadmin_key = \"a\"\nad_server_key = \"b\"\ntoken_secret = \"c\"\n\
         [log]\nkind = \"kafka\"\nkafka_brokers = \"127.0.0.1:{}\"\n\
         [store]\nkind = \"postgres\"\npostgres_url = \"{url}\"\nstartup_timeout = \"2s\"\n",
        closed_port()
    )
}

#[test]
fn unknown_key_is_named() {
    let dir = tempfile::tempdir().expect("tmp");
    let f = write(
        dir.path(),
        "bad.toml",
        "[time]\ntick = \"200ms\"\ntick_ms = 5\n",
    );
    let f = f.to_str().expect("utf-8 path");
    assert_refused(
        dir.path(),
        &["serve", "-c", f],
        &["unknown key time.tick_ms", "bad.toml"],
    );
    assert_refused(dir.path(), &["config", "check", f], &["time.tick_ms"]);
    assert!(
        !dir.path().join("data").exists(),
        "serve created its data directory before rejecting the config"
    );
}

#[test]
fn negative_horizon_is_named() {
    let dir = tempfile::tempdir().expect("tmp");
    let f = write(dir.path(), "bad.toml", "[time]\nhorizon = \"-5m\"\n");
    let f = f.to_str().expect("utf-8 path");
    assert_refused(dir.path(), &["serve", "-c", f], &["horizon", "negative"]);
    assert_refused(
        dir.path(),
        &["config", "check", f],
        &["horizon", "negative"],
    );
    // Control: a valid horizon passes the same check.
    let ok = write(dir.path(), "ok.toml", "[time]\nhorizon = \"3h\"\n");
    let out = assert_ok(
        dir.path(),
        &["config", "check", ok.to_str().expect("utf-8 path")],
    );
    assert!(out.contains("horizon: 3h"), "{out}");
}

#[test]
fn unreachable_postgres_fails_fast_naming_the_store() {
    let dir = tempfile::tempdir().expect("tmp");
    let port = closed_port();
    let url = format!("postgres://postgres:hunter2@127.0.0.1:{port}/clickagg");
    let f = write(dir.path(), "prod.toml", &production(&url));
    let f = f.to_str().expect("utf-8 path");
    let where_ = format!("127.0.0.1:{port}");
    for command in ["worker", "query", "ingest"] {
        let took = assert_refused(
            dir.path(),
            &[command, "-c", f],
            &["store.postgres_url", &where_, "unreachable"],
        );
        assert!(
            took < Duration::from_secs(20),
            "{command} took {took:?} to give up"
        );
    }
    assert_refused(
        dir.path(),
        &["config", "check", f],
        &["store.postgres_url", &where_, "unreachable"],
    );
    // The password never reaches the message.
    let (out, _) = clickagg(dir.path(), &["config", "check", f]);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("hunter2"));

    // Control: the same file pointing at the real Postgres passes `config check`.
    let live = write(
        dir.path(),
        "live.toml",
        &production("postgres://postgres@127.0.0.1:5432/postgres"),
    );
    let out = assert_ok(
        dir.path(),
        &["config", "check", live.to_str().expect("utf-8 path")],
    );
    assert!(out.contains("store: reachable"), "{out}");
}

#[test]
fn malformed_postgres_url_is_named() {
    let dir = tempfile::tempdir().expect("tmp");
    let f = write(
        dir.path(),
        "prod.toml",
        &production("postgres://127.0.0.1:notaport/db"),
    );
    let f = f.to_str().expect("utf-8 path");
    assert_refused(dir.path(), &["worker", "-c", f], &["store.postgres_url"]);
    assert_refused(
        dir.path(),
        &["config", "check", "--offline", f],
        &["store.postgres_url"],
    );
}

#[test]
fn data_dir_that_cannot_be_created_is_named() {
    let dir = tempfile::tempdir().expect("tmp");
    // A regular file where a parent directory should be: not creatable, even for root.
    std::fs::write(dir.path().join("occupied"), b"not a directory").expect("write");
    let f = write(
        dir.path(),
        "bad.toml",
        "data_dir = \"occupied/data\"\n[http]\naddr = \"127.0.0.1:0\"\n",
    );
    let f = f.to_str().expect("utf-8 path");
    assert_refused(
        dir.path(),
        &["serve", "-c", f],
        &["data_dir", "occupied/data"],
    );
    assert_refused(
        dir.path(),
        &["config", "check", f],
        &["data_dir", "occupied/data"],
    );
    // Control: a creatable one passes `config check` (and is not created by it).
    let ok = write(dir.path(), "ok.toml", "data_dir = \"fresh/data\"\n");
    let out = assert_ok(
        dir.path(),
        &["config", "check", ok.to_str().expect("utf-8 path")],
    );
    assert!(out.contains("store: reachable"), "{out}");
    assert!(!dir.path().join("fresh").exists());
}
