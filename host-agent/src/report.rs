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
    /// Bytes read from shared storage.
    pub storage_bytes: u64,
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
    /// Where the VM runs after the attempt: `source` or `destination` or `unknown`.
    pub vm_runs_on: String,
    /// Guest hints, when rebuild was on.
    pub hints: Option<HintReport>,
    /// Post-copy phase, if the VM was handed over by post-copy.
    pub postcopy: Option<dbmigrate_core::postcopy::PostcopyStats>,
    /// Engine details.
    pub stats: MigrationStats,
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
    pub last_scan: Option<crate::framescan::ScanStats>,
}

impl From<&crate::hints::LiveHints> for HintReport {
    fn from(l: &crate::hints::LiveHints) -> Self {
        use std::sync::atomic::Ordering::Relaxed;
        let c = &l.counters;
        let last_scan = l.last_scan.lock().ok().and_then(|s| s.clone());
        Self {
            finder: if last_scan.is_some() { "host" } else { "guest" },
            last_scan,
            refreshes: c.refreshes.load(Relaxed),
            last_count: c.last_count.load(Relaxed),
            dropped: c.dropped.load(Relaxed),
            failures: c.failures.load(Relaxed),
            last_fetch_ms: c.last_fetch_ms.load(Relaxed),
        }
    }
}
