//! The JSON report written at the end of a migration: one `runs` entry of
//! the benchmark report format, plus the engine's detailed statistics.

use dbmigrate_core::stats::MigrationStats;
use serde::Serialize;

/// Pages by class, as in the benchmark report.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PageCounts {
    /// Sent as raw (or compressed) pages.
    pub raw: u64,
    /// Zero pages (never sent as data).
    pub zero: u64,
    /// Rebuilt from shared storage (not in pre-copy without hints).
    pub rebuilt: u64,
    /// Rebuild attempts that did not match.
    pub rebuild_mismatch: u64,
}

/// Result of one `dbmigrate migrate`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MigrationReport {
    /// `dbmigrate-precopy`.
    pub method: String,
    /// True when the destination runs the VM.
    pub completed: bool,
    /// Migration start to destination running.
    pub total_ms: u64,
    /// VM paused to VM running again.
    pub downtime_ms: u64,
    /// When the source VM was paused for the switchover, ms after the start
    /// (null if it never was).
    pub paused_at_ms: Option<u64>,
    /// Bytes between the agents, both directions (device state not included; see `device_state_bytes`).
    pub link_bytes: u64,
    /// Page counts.
    pub pages: PageCounts,
    /// Full-RAM digests matched at switchover.
    pub ram_verified: Option<bool>,
    /// Bytes QEMU sent for device state.
    pub device_state_bytes: u64,
    /// Where the downtime of a stop-and-copy went (None otherwise).
    pub downtime_parts: Option<DowntimeParts>,
    /// Guest-physical ranges backed by the RAM file, as QEMU reported them.
    pub gpa_layout: Vec<crate::qemu::GpaRange>,
    /// Dirty tracker used.
    pub tracker: String,
    /// Error that stopped the migration, if any.
    pub error: Option<String>,
    /// Where the VM runs after the attempt.
    pub vm_runs_on: VmLocation,
    /// Guest hints, when rebuild was on.
    pub hints: Option<HintReport>,
    /// Post-copy phase, if the VM was handed over by post-copy.
    pub postcopy: Option<dbmigrate_core::source::PostcopyStats>,
    /// Engine details.
    pub stats: MigrationStats,
    /// The source agent's peak resident memory (`VmHWM`), bytes.
    pub agent_peak_rss_bytes: Option<u64>,
    /// The source agent's peak memory of its own (anonymous memory and
    /// page tables, not the guest's RAM file it maps), bytes.
    pub agent_peak_own_bytes: Option<u64>,
    /// CPU time the source agent used (user and system), ms.
    pub agent_cpu_ms: Option<u64>,
    /// The adaptive pace's setting (its decisions are in `stats.pacing`).
    pub guest_impact: Option<GuestImpact>,
    /// The guest's memory census and what was sent of each kind of page
    /// (`--page-census`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub census: Option<crate::census::CensusReport>,
    /// What was done to libvirt's view of the source domain (`--libvirt`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub libvirt: Option<crate::libvirt::LibvirtReport>,
}

/// The adaptive pace of a migration.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct GuestImpact {
    /// The wait share the migration may add to the guest's vCPUs, percent.
    pub budget_pct: f64,
    /// Their wait share in the half second before the migration, percent.
    pub baseline_wait_pct: f64,
}

/// This process's peak resident memory, from `/proc/self/status`.
pub fn peak_rss_bytes() -> Option<u64> {
    parse_vm_hwm(&std::fs::read_to_string("/proc/self/status").ok()?)
}

/// The most memory this process has held of its own (anonymous memory
/// and page tables, sampled by [`sample_own_memory`]): what the agent
/// costs its host beyond the guest's RAM file it maps (pages of that file
/// count in [`peak_rss_bytes`] but belong to the guest).
static PEAK_OWN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Samples this process's own memory every 25 ms on a thread of its own
/// until the process ends (the peak: [`peak_own_memory_bytes`]).
pub fn sample_own_memory() {
    let spawned = std::thread::Builder::new()
        .name("own-memory".into())
        .spawn(|| loop {
            if let Some(b) = std::fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|s| parse_own_memory(&s))
            {
                PEAK_OWN.fetch_max(b, std::sync::atomic::Ordering::Relaxed);
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot sample the agent's own memory");
    }
}

/// The peak sampled by [`sample_own_memory`], if it ran.
pub fn peak_own_memory_bytes() -> Option<u64> {
    let b = PEAK_OWN.load(std::sync::atomic::Ordering::Relaxed);
    (b > 0).then_some(b)
}

/// `RssAnon:` plus `VmPTE:` of a `/proc/PID/status` text, in bytes.
fn parse_own_memory(status: &str) -> Option<u64> {
    Some(status_bytes(status, "RssAnon:")? + status_bytes(status, "VmPTE:")?)
}

/// The destination agent's CPU time when it began to listen, ms.
static CPU_AT_LISTEN: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

/// Notes, once, the CPU time used so far: what the destination agent spent
/// before it listened (allocating the guest's RAM), which is not the
/// migration's.
pub fn note_cpu_at_listen() {
    if let Some(c) = cpu_ms() {
        let _ = CPU_AT_LISTEN.set(c);
    }
}

/// The CPU time noted by [`note_cpu_at_listen`], ms.
pub fn cpu_at_listen_ms() -> Option<u64> {
    CPU_AT_LISTEN.get().copied()
}

/// CPU time this process has used so far (user and system), ms: what a
/// migration cost its host, beside its bytes.
pub fn cpu_ms() -> Option<u64> {
    dbmigrate_core::stats::process_cpu_ms(None)
}

/// The `VmHWM:` line of a `/proc/PID/status` text, in bytes.
fn parse_vm_hwm(status: &str) -> Option<u64> {
    status_bytes(status, "VmHWM:")
}

/// The value of a `/proc/PID/status` line starting with `key`, given in
/// kB, in bytes.
fn status_bytes(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    let mut words = line[key.len()..].split_whitespace();
    let kib: u64 = words.next()?.parse().ok()?;
    (words.next() == Some("kB")).then_some(kib * 1024)
}

/// Where the VM runs after an attempt (`source`, `destination` or
/// `unknown` in the report).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VmLocation {
    /// The source runs it (or will, once rolled back): nothing was handed over.
    #[default]
    Source,
    /// The destination runs it.
    Destination,
    /// Commit was sent but not confirmed, or the rollback failed: the
    /// operator must look before resuming either side.
    Unknown,
}

impl VmLocation {
    /// The agent's exit status for an attempt that ended here, failed or
    /// not: 0 on success, 1 when the VM stays on the source, 3 when
    /// nobody knows.
    pub fn exit_code(self, failed: bool) -> u8 {
        match (failed, self) {
            (false, _) => 0,
            (true, VmLocation::Source) => 1,
            (true, VmLocation::Destination | VmLocation::Unknown) => 3,
        }
    }
}

/// The steps of a stop-and-copy, in the order they run while the VM is paused.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DowntimeParts {
    /// The last round: pages dirtied since the previous one.
    pub final_round_ms: u64,
    /// Hashing the paused RAM and the destination's comparison.
    pub verify_ms: u64,
    /// QEMU's device-state migration.
    pub device_state_ms: u64,
    /// Commit until the destination says the VM runs.
    pub commit_ms: u64,
}

/// What the guest agent's hints amounted to.
#[derive(Clone, Debug, Default, Serialize)]
pub struct HintReport {
    /// Hint sets received.
    pub refreshes: u64,
    /// Hinted pages in the newest set.
    pub last_count: u64,
    /// Hints dropped on arrival (outside RAM, foreign disk, not clean).
    pub dropped: u64,
    /// Requests that failed.
    pub failures: u64,
    /// Time the newest set took, ms.
    pub last_fetch_ms: u64,
    /// Who found the pages: `host` (guest RAM scanned here) or `guest`.
    pub finder: &'static str,
    /// What the newest host-side scan found.
    pub last_scan: Option<dbmigrate_innodb::scan::ScanStats>,
    /// QEMU's index of each of the guest's disk indexes, matched by serial
    /// or WWN (null: no disk of QEMU is that one).
    pub disks: Vec<Option<u16>>,
}

impl From<&crate::hints::LiveHints> for HintReport {
    fn from(l: &crate::hints::LiveHints) -> Self {
        use std::sync::atomic::Ordering::Relaxed;
        let c = &l.counters;
        let last_scan = l.last_scan.lock().ok().and_then(|s| s.clone());
        Self {
            finder: if last_scan.is_some() { "host" } else { "guest" },
            last_scan,
            disks: l.disk_map.clone(),
            refreshes: c.refreshes.load(Relaxed),
            last_count: c.last_count.load(Relaxed),
            dropped: c.dropped.load(Relaxed),
            failures: c.failures.load(Relaxed),
            last_fetch_ms: c.last_fetch_ms.load(Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_memory_is_anonymous_memory_and_page_tables() {
        let status = "VmHWM:\t 2000 kB\nRssAnon:\t  300 kB\nRssFile:\t 9000 kB\nVmPTE:\t  20 kB\n";
        assert_eq!(parse_own_memory(status), Some(320 * 1024));
        assert_eq!(parse_own_memory("RssAnon: 3 kB\n"), None);
        assert_eq!(parse_own_memory("RssAnon: 3 MB\nVmPTE: 1 kB\n"), None);
    }

    #[test]
    fn peak_resident_memory_is_read_from_vm_hwm() {
        let status = "Name:\tdbmigrate\nVmPeak:\t  900 kB\nVmHWM:\t   4096 kB\nVmRSS:\t 100 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(4096 * 1024));
        assert_eq!(parse_vm_hwm("VmRSS:\t1 kB\n"), None);
        assert_eq!(parse_vm_hwm("VmHWM:\t12 MB\n"), None);
        assert!(peak_rss_bytes().is_some_and(|b| b > 0));
        assert!(cpu_ms().is_some());
    }

    #[test]
    fn where_the_vm_runs_decides_the_exit_status_and_reads_as_before() {
        assert_eq!(VmLocation::Destination.exit_code(false), 0);
        assert_eq!(VmLocation::Source.exit_code(true), 1);
        assert_eq!(VmLocation::Unknown.exit_code(true), 3);
        // A VM handed over whose check failed afterwards: not the source's.
        assert_eq!(VmLocation::Destination.exit_code(true), 3);
        let json = serde_json::to_string(&VmLocation::Unknown).unwrap();
        assert_eq!(json, "\"unknown\"");
    }
}
