//! Migration statistics: typed, printable for logs, serialisable for reports.

use std::fmt;

use serde::Serialize;

/// What one pre-copy round moved.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct RoundStats {
    /// Round number (0 = first full pass).
    pub round: u32,
    /// Pages considered in the round.
    pub pages: u64,
    /// Pages sent as raw 4 KiB.
    pub raw_pages: u64,
    /// Pages sent as zero markers (or skipped in round 0 because the destination starts zeroed).
    pub zero_pages: u64,
    /// Pages sent zstd-compressed.
    pub compressed_pages: u64,
    /// Pages sent as references to shared storage.
    pub ref_pages: u64,
    /// Hints refused (unknown disk, misaligned, out of range); those pages went raw.
    pub rejected_hints: u64,
    /// References the destination could not match with storage (sent raw afterwards).
    pub rebuild_mismatch: u64,
    /// Bytes written to the data connections (frames included).
    pub bytes: u64,
    /// Wall time of the round.
    pub elapsed_ms: u64,
    /// Pages found dirty after the round (what the next round must send).
    pub dirty_after: u64,
    /// Pages written while the round ran, before it read them: the round
    /// sent them with that write, and the next one does not send them again.
    pub written_before_read: u64,
    /// Pages reported written whose bytes were those the destination
    /// holds already: not sent (RAM on huge pages, whose writes are
    /// tracked 2 MiB at a time).
    pub unchanged_pages: u64,
    /// Link rate measured over the round, Mbit/s.
    pub rate_mbit: f64,
}

impl fmt::Display for RoundStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "round {}: {} pages ({} raw, {} zero, {} zstd, {} ref), {:.1} MiB in {} ms ({:.0} Mbit/s), {} dirty after",
            self.round,
            self.pages,
            self.raw_pages,
            self.zero_pages,
            self.compressed_pages,
            self.ref_pages,
            mib(self.bytes),
            self.elapsed_ms,
            self.rate_mbit,
            self.dirty_after
        )
    }
}

/// Totals of one migration.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MigrationStats {
    /// Every round, the final stop-and-copy round last.
    pub rounds: Vec<RoundStats>,
    /// Why pre-copy stopped iterating.
    pub stop_reason: Option<String>,
    /// Downtime predicted when the stop decision was taken.
    pub expected_downtime_ms: Option<u64>,
    /// Bytes the source wrote to the destination agent (all connections).
    pub bytes_sent: u64,
    /// Bytes the source read from the destination agent.
    pub bytes_received: u64,
    /// Time to hash and compare RAM at switchover.
    pub verify_ms: Option<u64>,
    /// Whether the RAM digests matched (None: not checked).
    pub ram_verified: Option<bool>,
    /// Digest chunks that differed.
    pub mismatched_chunks: u32,
    /// The adaptive pace's decisions while the VM ran on the source (empty
    /// when it was off).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pacing: Vec<crate::source::PaceStep>,
}

impl MigrationStats {
    /// Raw, zero and compressed pages summed over rounds.
    pub fn page_totals(&self) -> (u64, u64, u64) {
        self.rounds.iter().fold((0, 0, 0), |(r, z, c), s| {
            (r + s.raw_pages, z + s.zero_pages, c + s.compressed_pages)
        })
    }
}

impl fmt::Display for MigrationStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (raw, zero, zstd) = self.page_totals();
        write!(
            f,
            "{} rounds, {:.1} MiB sent ({raw} raw, {zero} zero, {zstd} zstd pages), stop: {}, verified: {}",
            self.rounds.len(),
            mib(self.bytes_sent),
            self.stop_reason.as_deref().unwrap_or("-"),
            match self.ram_verified {
                Some(true) => "yes",
                Some(false) => "MISMATCH",
                None => "not checked",
            }
        )
    }
}

#[allow(clippy::cast_precision_loss)] // display only
fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// Whole milliseconds of `d`, as the reports count them (saturating).
pub fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// CPU time a process has used so far (user and system), ms, from
/// `/proc/PID/stat` (`None`: this process).
pub fn process_cpu_ms(pid: Option<u32>) -> Option<u64> {
    let path = pid.map_or_else(
        || "/proc/self/stat".to_string(),
        |p| format!("/proc/{p}/stat"),
    );
    parse_stat_cpu_ms(&std::fs::read_to_string(path).ok()?)
}

/// utime + stime of a `/proc/PID/stat` line, ms (pure). The fields are
/// counted after the command name, which may hold spaces and parentheses;
/// their unit is USER_HZ, 100 per second on Linux.
fn parse_stat_cpu_ms(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace().skip(11);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(utime.saturating_add(stime).saturating_mul(10))
}

/// Mbit/s for `bytes` over `ms` milliseconds.
#[allow(clippy::cast_precision_loss)]
pub fn mbit_per_s(bytes: u64, ms: f64) -> f64 {
    if ms <= 0.0 {
        0.0
    } else {
        bytes as f64 * 8.0 / 1e6 / (ms / 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_after_the_command_name() {
        // A command name with a space and a parenthesis; utime 250 and
        // stime 50 ticks are the 14th and 15th fields.
        let stat = "4242 (tokio (rt) x) S 1 4242 4242 0 -1 4194560 500 0 0 0 250 50 0 0 20 0 3 0";
        assert_eq!(parse_stat_cpu_ms(stat), Some(3000));
        assert_eq!(parse_stat_cpu_ms("4242 (x) S 1"), None);
        assert_eq!(parse_stat_cpu_ms("no parenthesis"), None);
        assert!(process_cpu_ms(None).is_some());
        assert_eq!(process_cpu_ms(Some(u32::MAX)), None);
    }
}
