//! The guest's own signal of CPU pressure for the adaptive pace: how long
//! QEMU's vCPU threads (from QMP `query-cpus-fast`) ran and how long they
//! waited for a CPU, from `/proc/PID/task/TID/schedstat`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use dbmigrate_core::source::{CpuTimes, GuestSignal};

use crate::qmp::Qmp;

/// QEMU's vCPU threads, read for [`GuestSignal`].
#[derive(Debug)]
pub struct VcpuThreads {
    files: Vec<PathBuf>,
}

impl VcpuThreads {
    /// The vCPU threads of the QEMU process `pid` behind `qmp` (one thread
    /// for all of them under single-threaded TCG).
    pub async fn of(qmp: &mut Qmp, pid: u32) -> Result<Self> {
        let cpus = qmp
            .execute("query-cpus-fast", None)
            .await
            .context("asking QEMU for its vCPU threads (query-cpus-fast)")?;
        let tids = thread_ids(&cpus);
        if tids.is_empty() {
            bail!("QEMU listed no vCPU thread in query-cpus-fast");
        }
        let files = tids
            .iter()
            .map(|t| PathBuf::from(format!("/proc/{pid}/task/{t}/schedstat")))
            .collect();
        let mut me = Self { files };
        if me.sample().is_none() {
            bail!("cannot read the vCPU threads' schedstat under /proc/{pid}/task (a kernel without CONFIG_SCHED_INFO?)");
        }
        Ok(me)
    }
}

impl GuestSignal for VcpuThreads {
    /// The sum over the threads that can be read (a thread that went away
    /// drops out); None when none can.
    fn sample(&mut self) -> Option<CpuTimes> {
        let times: Vec<CpuTimes> = self
            .files
            .iter()
            .filter_map(|f| parse_schedstat(&std::fs::read_to_string(f).ok()?))
            .collect();
        if times.len() < self.files.len() {
            // The sums would jump backwards: read only the threads left.
            self.files.retain(|f| f.exists());
        }
        (!times.is_empty()).then(|| {
            times.iter().fold(CpuTimes::default(), |s, t| CpuTimes {
                ran_ns: s.ran_ns.saturating_add(t.ran_ns),
                waited_ns: s.waited_ns.saturating_add(t.waited_ns),
            })
        })
    }
}

/// The distinct `thread-id`s of a `query-cpus-fast` answer (pure).
pub fn thread_ids(cpus: &serde_json::Value) -> Vec<u64> {
    let mut ids: Vec<u64> = cpus
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c.get("thread-id")?.as_u64())
                .collect()
        })
        .unwrap_or_default();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// `schedstat`'s first two fields: ns on a CPU, ns waiting on a run queue (pure).
pub fn parse_schedstat(s: &str) -> Option<CpuTimes> {
    let mut f = s.split_whitespace().map(str::parse::<u64>);
    Some(CpuTimes {
        ran_ns: f.next()?.ok()?,
        waited_ns: f.next()?.ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_threads_and_their_times_are_read() {
        let cpus = serde_json::json!([
            {"cpu-index": 0, "thread-id": 4242, "target": "x86_64"},
            {"cpu-index": 1, "thread-id": 4242, "target": "x86_64"},
            {"cpu-index": 2, "thread-id": 4250}
        ]);
        assert_eq!(thread_ids(&cpus), vec![4242, 4250]);
        assert!(thread_ids(&serde_json::json!({"error": 1})).is_empty());
        assert_eq!(
            parse_schedstat("123456 7890 42\n"),
            Some(CpuTimes {
                ran_ns: 123_456,
                waited_ns: 7890
            })
        );
        assert_eq!(parse_schedstat("12 x 1"), None);
        assert_eq!(parse_schedstat(""), None);
        // This very thread's file reads.
        let mine = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
        assert!(parse_schedstat(&mine).is_some(), "{mine}");
    }
}
