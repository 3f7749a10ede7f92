//! Lower scheduling priority for the threads off the click path.
//!
//! In `serve` the timely workers (with their log readers and the sink writer) and the
//! archiver share two cores with the HTTP threads
//! and the log writer. A click is acknowledged only after the writer's commit, so every
//! time the writer or a handler waits for a core behind the dataflow's burst at a tick,
//! requests queue; at 20k GETs/s those waits were the p99 (bench/SERVING.md, session 22).
//! A nice value above 0 on the background threads lets the click path run first while
//! leaving the background work all the idle CPU.

/// Sets the calling thread's nice value; `0` leaves it as it is. A failure is logged,
/// never fatal: the thread then runs at the priority it has.
pub fn lower_this_thread(nice: i32, what: &str) {
    if nice <= 0 {
        return;
    }
    if let Err(e) = set_this_threads_nice(nice) {
        tracing::warn!(nice, thread = what, error = %e, "cannot lower the thread's priority");
    }
}

/// On Linux `setpriority(PRIO_PROCESS, tid)` acts on that one thread, not the process.
#[cfg(target_os = "linux")]
fn set_this_threads_nice(nice: i32) -> std::io::Result<()> {
    // SAFETY: gettid has no preconditions; setpriority reads only its integer arguments.
    let done = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice)
    };
    if done == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn set_this_threads_nice(_nice: i32) -> std::io::Result<()> {
    Err(std::io::Error::other(
        "thread nice values are set on Linux only",
    ))
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn nice_of_this_thread() -> i32 {
        // SAFETY: as above.
        let tid = unsafe { libc::gettid() };
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).expect("stat");
        // Field 19 is the nice value; fields count from after the command's ')'.
        let rest = stat.rsplit_once(')').expect("comm").1;
        rest.split_whitespace()
            .nth(16)
            .expect("nice")
            .parse()
            .expect("number")
    }

    #[test]
    fn lowers_only_the_calling_thread() {
        let main_before = nice_of_this_thread();
        let lowered = std::thread::spawn(|| {
            lower_this_thread(7, "test");
            nice_of_this_thread()
        })
        .join()
        .expect("thread");
        assert_eq!(lowered, 7);
        assert_eq!(
            nice_of_this_thread(),
            main_before,
            "the caller's thread only"
        );
    }
}
