//! Stopping and continuing a tracked process (soft-dirty needs it frozen).

use std::io;

fn signal(pid: u32, sig: libc::c_int) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: kill only sends a signal; a wrong pid yields an error, never UB.
    if unsafe { libc::kill(pid, sig) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sends SIGSTOP and waits (up to 1 s) until every thread is stopped.
pub(crate) fn freeze(pid: u32) -> io::Result<()> {
    signal(pid, libc::SIGSTOP)?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    loop {
        let mut all_stopped = true;
        for t in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            let stat = std::fs::read_to_string(t?.path().join("stat")).unwrap_or_default();
            // The state follows the parenthesised command name.
            let state = stat.rsplit_once(") ").and_then(|(_, r)| r.chars().next());
            if !matches!(state, Some('T' | 't' | 'Z' | 'X')) {
                all_stopped = false;
                break;
            }
        }
        if all_stopped {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            let _ = thaw(pid);
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "threads did not stop within 1 s",
            ));
        }
        std::thread::yield_now();
    }
}

/// Sends SIGCONT.
pub(crate) fn thaw(pid: u32) -> io::Result<()> {
    signal(pid, libc::SIGCONT)
}

/// Sets the nice value of every thread of this process (Linux keeps one per
/// thread; threads started later inherit their creator's).
pub(crate) fn renice_all_threads(nice: i32) -> io::Result<()> {
    for t in std::fs::read_dir("/proc/self/task")? {
        let Some(tid) = t?
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<libc::id_t>().ok())
        else {
            continue;
        };
        // A thread that ended meanwhile yields ESRCH.
        if let Err(e) = renice_thread(tid, nice) {
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(e);
            }
        }
    }
    Ok(())
}

/// Sets the calling thread's nice value only.
pub(crate) fn renice_this_thread(nice: i32) -> io::Result<()> {
    // SAFETY: gettid has no preconditions and cannot fail.
    let tid = unsafe { libc::gettid() };
    let tid =
        libc::id_t::try_from(tid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    renice_thread(tid, nice)
}

/// Linux applies `setpriority(PRIO_PROCESS, tid)` to that one thread.
fn renice_thread(tid: libc::id_t, nice: i32) -> io::Result<()> {
    // SAFETY: setpriority takes integers only; a bad thread id is an error.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
