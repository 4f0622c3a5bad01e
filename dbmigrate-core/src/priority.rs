//! The agents' CPU priority. Migration work is bulk work: while the guest
//! runs beside it, it should take the CPU the vCPUs leave, not share it with
//! them; when the guest waits for the migration (paused, or faulting on
//! pages in post-copy) it should run at full priority.

use std::io;

/// This process's nice value as the kernel reports it for its main thread.
pub fn current_nice() -> io::Result<i32> {
    nice_in("/proc/self/stat")
}

/// The nice value in a `/proc/.../stat` file.
fn nice_in(stat_path: &str) -> io::Result<i32> {
    let stat = std::fs::read_to_string(stat_path)?;
    // Fields after the parenthesised command name: state is field 3, nice
    // is field 19.
    stat.rsplit_once(") ")
        .and_then(|(_, rest)| rest.split_whitespace().nth(16))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unreadable {stat_path}"),
            )
        })
}

/// Sets every thread of this process, and those it starts later, to `nice`.
pub fn set_nice(nice: i32) -> io::Result<()> {
    crate::sys::process::renice_all_threads(nice)
}

/// Sets the calling thread, and the threads it starts later, to `nice`.
pub fn set_this_thread_nice(nice: i32) -> io::Result<()> {
    crate::sys::process::renice_this_thread(nice)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_thread_takes_the_new_nice_value_and_back() {
        let before = current_nice().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<i32>();
        let worker = std::thread::spawn(move || {
            // Wait until the main thread has reniced the process, then
            // report this thread's own value.
            rx.recv().unwrap();
            ready_tx
                .send(nice_in("/proc/thread-self/stat").unwrap())
                .unwrap();
        });
        let lower = (before + 3).min(19);
        set_nice(lower).unwrap();
        assert_eq!(current_nice().unwrap(), lower);
        tx.send(()).unwrap();
        assert_eq!(
            ready_rx.recv().unwrap(),
            lower,
            "a thread started before the call"
        );
        worker.join().unwrap();
        // Going back up needs CAP_SYS_NICE; the tests run as root.
        set_nice(before).unwrap();
        assert_eq!(current_nice().unwrap(), before);
    }
}
