//! The source's decisions, as pure functions of what the rounds observed:
//! when to stop the rounds and pause the VM, and whether to hand it over
//! by post-copy.

use std::time::Duration;

use crate::PAGE_SIZE_U64;

/// When to stop iterating.
#[derive(Clone, Debug)]
pub struct StopPolicy {
    /// Largest acceptable pause.
    pub downtime_target: Duration,
    /// Fixed part of the pause besides the last pages: device state, verification.
    pub switchover_overhead: Duration,
    /// Give up iterating after this many rounds.
    pub max_rounds: u32,
    /// Give up iterating once this many times the RAM size has been sent.
    pub max_bytes_factor: f64,
    /// Give up after this many consecutive rounds in which the dirty set did not shrink.
    pub stall_rounds: u32,
}

impl Default for StopPolicy {
    fn default() -> Self {
        Self {
            downtime_target: Duration::from_millis(300),
            switchover_overhead: Duration::ZERO,
            max_rounds: 30,
            max_bytes_factor: 3.0,
            // Two rounds in which the dirty set did not shrink: the writable
            // working set is reached, and more rounds only resend it.
            stall_rounds: 2,
        }
    }
}

/// What one round showed, as input to [`decide`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RoundObservation {
    /// Bytes sent in the round.
    pub bytes: u64,
    /// Pages sent in the round.
    pub pages: u64,
    /// Wall time of the round.
    pub elapsed: Duration,
    /// Pages dirtied meanwhile (the next round's work).
    pub dirty_after: u64,
    /// Pages of the round found unchanged since they were sent, and not
    /// sent again (RAM on huge pages, whose writes are seen 2 MiB at a
    /// time): the share of a dirty set that actually goes is the rest.
    pub unchanged: u64,
}

impl RoundObservation {
    /// The pages of what is dirty now that should go: all of them, but
    /// where the round found pages unchanged, only its share of changed
    /// ones (pure).
    fn dirty_to_send(&self) -> u64 {
        if self.unchanged == 0 || self.pages == 0 {
            return self.dirty_after;
        }
        let changed = self.pages.saturating_sub(self.unchanged);
        let share = u128::from(self.dirty_after) * u128::from(changed) / u128::from(self.pages);
        u64::try_from(share).unwrap_or(self.dirty_after)
    }
}

/// Why pre-copy stops iterating.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The remaining pages fit in the downtime target.
    Converged,
    /// The round limit was reached.
    MaxRounds,
    /// The byte limit was reached.
    MaxBytes,
    /// The writable working set stopped shrinking.
    NotShrinking,
    /// Post-copy mode: the first round is sent, the rest follows the VM.
    FirstRound,
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StopReason::Converged => "converged",
            StopReason::MaxRounds => "round limit reached",
            StopReason::MaxBytes => "byte limit reached",
            StopReason::NotShrinking => "dirty set stopped shrinking",
            StopReason::FirstRound => "post-copy after the first round",
        })
    }
}

/// Outcome of [`decide`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Decision {
    /// Run another live round.
    Continue {
        /// Pause expected if we stopped now.
        expected_downtime: Duration,
    },
    /// Pause the VM and copy the rest.
    Stop {
        /// Why.
        reason: StopReason,
        /// Pause expected.
        expected_downtime: Duration,
    },
}

/// Link rate in bytes/s judged from the rounds: the best rate of any round that
/// moved enough data to measure, else the configured limit, else the last round.
pub fn link_rate(history: &[RoundObservation], limit: Option<u64>) -> f64 {
    const MEASURABLE: u64 = 4 << 20;
    #[allow(clippy::cast_precision_loss)]
    let rate = |o: &RoundObservation| o.bytes as f64 / o.elapsed.as_secs_f64().max(1e-6);
    let best = history
        .iter()
        .filter(|o| o.bytes >= MEASURABLE)
        .map(rate)
        .fold(0.0, f64::max);
    if best > 0.0 {
        return best;
    }
    #[allow(clippy::cast_precision_loss)]
    if let Some(l) = limit {
        return l as f64;
    }
    history.last().map(rate).filter(|r| *r > 0.0).unwrap_or(1e9)
}

/// Bytes a page of the final round costs on the wire: mostly raw pages,
/// a full page plus its entry header.
const FINAL_PAGE_BYTES: u64 = PAGE_SIZE_U64 + 13;

/// The pause expected after one more round, which takes `round` to send
/// what `last` left dirty at `rate` bytes/s while the guest dirties pages
/// at the rate it did during `last`.
fn next_pause(last: &RoundObservation, round: Duration, rate: f64, overhead: Duration) -> Duration {
    #[allow(clippy::cast_precision_loss)]
    let dirty_per_s = last.dirty_to_send() as f64 / last.elapsed.as_secs_f64().max(1e-3);
    #[allow(clippy::cast_precision_loss)]
    let next_bytes = dirty_per_s * round.as_secs_f64() * FINAL_PAGE_BYTES as f64;
    Duration::from_secs_f64(next_bytes / rate) + overhead
}

/// The stop decision after a round (pure).
pub fn decide(
    policy: &StopPolicy,
    history: &[RoundObservation],
    ram_bytes: u64,
    limit: Option<u64>,
) -> Decision {
    let Some(last) = history.last() else {
        return Decision::Continue {
            expected_downtime: Duration::MAX,
        };
    };
    let rate = link_rate(history, limit);
    #[allow(clippy::cast_precision_loss)]
    let bytes_left = (last.dirty_to_send() * FINAL_PAGE_BYTES) as f64;
    let data_time = Duration::from_secs_f64(bytes_left / rate);
    let expected_downtime = data_time + policy.switchover_overhead;
    let stop = |reason| Decision::Stop {
        reason,
        expected_downtime,
    };
    let rounds = u32::try_from(history.len()).unwrap_or(u32::MAX);
    if last.dirty_after == 0 {
        return stop(StopReason::Converged);
    }
    if expected_downtime <= policy.downtime_target {
        // Within the target, one more short round is still worth it when
        // it should at least halve the pause (the first round is long, so
        // what it left dirty is mostly pages written once, not again in a
        // short round); a pause already below a quarter of the target is
        // left alone.
        let worth_it = expected_downtime > policy.downtime_target / 4
            && rounds < policy.max_rounds
            && next_pause(last, data_time, rate, policy.switchover_overhead) * 2
                < expected_downtime;
        return if worth_it {
            Decision::Continue { expected_downtime }
        } else {
            stop(StopReason::Converged)
        };
    }
    if rounds >= policy.max_rounds {
        return stop(StopReason::MaxRounds);
    }
    let sent: u64 = history.iter().map(|o| o.bytes).sum();
    #[allow(clippy::cast_precision_loss)]
    if sent as f64 >= policy.max_bytes_factor * ram_bytes as f64 {
        return stop(StopReason::MaxBytes);
    }
    // Latest consecutive rounds whose dirty set did not shrink by at least 5 %.
    let stalled = history
        .windows(2)
        .rev()
        .take_while(|w| w[1].dirty_after * 100 >= w[0].dirty_after * 95)
        .count();
    if policy.stall_rounds > 0 && stalled >= policy.stall_rounds as usize {
        return stop(StopReason::NotShrinking);
    }
    Decision::Continue { expected_downtime }
}

/// How the VM is handed over.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Rounds until the stop decision, then stop-and-copy: the source stays
    /// authoritative until the destination has every page.
    #[default]
    Precopy,
    /// One round, then the VM runs on the destination, which fetches what
    /// is still missing.
    Postcopy,
    /// Pre-copy that switches to post-copy when the stop decision says the
    /// rounds will not fit the downtime target.
    Hybrid,
}

/// After the stop decision: hand over by post-copy rather than stop-and-copy? (pure)
pub fn switch_to_postcopy(mode: Mode, reason: StopReason, destination_can: bool) -> bool {
    destination_can
        && match mode {
            Mode::Precopy => false,
            Mode::Postcopy => true,
            Mode::Hybrid => reason != StopReason::Converged,
        }
}

/// Whether round `round` may send references to shared storage (pure).
/// Only the first: a page in a later round was written since the first
/// round read it, and a written page of a database cache is, nearly
/// always, modified and not yet on disk. Its reference would cost a
/// storage read, a mismatch and the page raw after all (in the sysbench
/// reports of stop 27, 97-100 % of the later rounds' references
/// mismatched), and in the stop-and-copy round a second pass while the
/// VM is paused. Later rounds send such pages raw.
pub fn references_in_round(round: u32) -> bool {
    round == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    #[test]
    fn only_the_first_round_sends_references() {
        assert!(references_in_round(0));
        assert!(!references_in_round(1));
        assert!(!references_in_round(u32::MAX));
    }

    fn obs(bytes: u64, ms: u64, dirty: u64) -> RoundObservation {
        RoundObservation {
            bytes,
            pages: bytes / 4096,
            elapsed: Duration::from_millis(ms),
            dirty_after: dirty,
            unchanged: 0,
        }
    }

    #[test]
    fn on_huge_pages_only_the_share_of_changed_pages_counts() {
        let p = StopPolicy::default();
        // 51,200 pages dirty (100 huge pages): 210 MB, about 2 s at the
        // link's 100 MB/s; but the last round found 15 of every 16 pages
        // it read unchanged, so about 13 MB go: well within 300 ms.
        let mut last = obs(17 * MB, 100, 51_200);
        last.unchanged = last.pages * 15 / 16;
        assert_eq!(last.dirty_to_send(), 3_200);
        let h = [obs(800 * MB, 8000, 60_000), last];
        match decide(&p, &h, 1024 * MB, None) {
            Decision::Stop {
                reason: StopReason::Converged,
                expected_downtime,
            } => assert!(expected_downtime < Duration::from_millis(300)),
            d => panic!("{d:?}"),
        }
        last.unchanged = 0;
        assert_eq!(last.dirty_to_send(), 51_200, "tmpfs: every dirty page goes");
    }

    #[test]
    fn converges_when_the_rest_fits_the_target() {
        let p = StopPolicy::default();
        // 800 MB at 100 MB/s, then 4096 dirty pages = 16.8 MB -> ~170 ms,
        // dirtied so fast (in 0.2 s) that another round would not shrink it.
        let h = [obs(800 * MB, 8000, 4096), obs(17 * MB, 200, 4096)];
        match decide(&p, &h, 1024 * MB, None) {
            Decision::Stop {
                reason: StopReason::Converged,
                expected_downtime,
            } => assert!(expected_downtime < Duration::from_millis(200)),
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn one_more_round_when_it_halves_the_pause() {
        let p = StopPolicy::default();
        // The same 170 ms left, but dirtied over 8 s: a 170 ms round leaves
        // about 87 pages, a pause of a few ms.
        let h = [obs(800 * MB, 8000, 4096)];
        assert!(matches!(
            decide(&p, &h, 1024 * MB, None),
            Decision::Continue { .. }
        ));
        let h = [obs(800 * MB, 8000, 4096), obs(17 * MB, 170, 87)];
        match decide(&p, &h, 1024 * MB, None) {
            Decision::Stop {
                reason: StopReason::Converged,
                expected_downtime,
            } => assert!(expected_downtime < Duration::from_millis(10)),
            d => panic!("{d:?}"),
        }
        // Already below a quarter of the target: stop.
        let h = [obs(800 * MB, 8000, 1500)];
        assert!(matches!(
            decide(&p, &h, 1024 * MB, None),
            Decision::Stop {
                reason: StopReason::Converged,
                ..
            }
        ));
        // No round left: stop.
        let p1 = StopPolicy {
            max_rounds: 1,
            ..StopPolicy::default()
        };
        assert!(matches!(
            decide(&p1, &[obs(800 * MB, 8000, 4096)], 1024 * MB, None),
            Decision::Stop {
                reason: StopReason::Converged,
                ..
            }
        ));
    }

    #[test]
    fn continues_while_shrinking_and_counts_overhead() {
        let mut p = StopPolicy::default();
        let h = [obs(800 * MB, 8000, 20_000)];
        assert!(matches!(
            decide(&p, &h, 1024 * MB, None),
            Decision::Continue { .. }
        ));
        // A large fixed overhead alone prevents convergence.
        p.switchover_overhead = Duration::from_millis(400);
        let h = [obs(800 * MB, 8000, 10)];
        assert!(matches!(
            decide(&p, &h, 1024 * MB, None),
            Decision::Continue { .. }
        ));
    }

    #[test]
    fn stops_when_the_working_set_stops_shrinking() {
        let p = StopPolicy::default();
        let mut h = vec![obs(800 * MB, 8000, 16_384)];
        for _ in 0..p.stall_rounds {
            assert!(matches!(
                decide(&p, &h, 1024 * MB, None),
                Decision::Continue { .. }
            ));
            h.push(obs(67 * MB, 670, 16_384));
        }
        match decide(&p, &h, 1024 * MB, None) {
            Decision::Stop {
                reason: StopReason::NotShrinking,
                expected_downtime,
            } => {
                // 64 MiB at ~100 MB/s.
                let ms = expected_downtime.as_millis();
                assert!((600..750).contains(&ms), "{ms}");
            }
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn round_and_byte_limits() {
        let p = StopPolicy {
            max_rounds: 2,
            stall_rounds: 0,
            ..StopPolicy::default()
        };
        let h = [obs(100 * MB, 1000, 100_000), obs(100 * MB, 1000, 50_000)];
        assert!(matches!(
            decide(&p, &h, 1024 * MB, None),
            Decision::Stop {
                reason: StopReason::MaxRounds,
                ..
            }
        ));
        let p = StopPolicy {
            max_bytes_factor: 0.05,
            stall_rounds: 0,
            ..StopPolicy::default()
        };
        assert!(matches!(
            decide(&p, &h[..1], 1024 * MB, None),
            Decision::Stop {
                reason: StopReason::MaxBytes,
                ..
            }
        ));
    }

    #[test]
    fn link_rate_prefers_measurable_rounds() {
        let h = [obs(100 * MB, 1000, 0), obs(MB / 2, 1, 0)];
        let r = link_rate(&h, Some(1));
        assert!((r - 100.0 * MB as f64).abs() < 1.0);
        assert_eq!(link_rate(&[obs(MB, 1000, 0)], Some(5000)), 5000.0);
        assert_eq!(link_rate(&[], None), 1e9);
    }

    #[test]
    fn nothing_dirty_means_converged() {
        let p = StopPolicy::default();
        assert!(matches!(
            decide(&p, &[obs(MB, 10, 0)], MB, None),
            Decision::Stop {
                reason: StopReason::Converged,
                ..
            }
        ));
    }

    #[test]
    fn hybrid_switches_only_when_pre_copy_would_not_converge() {
        use StopReason::*;
        assert!(!switch_to_postcopy(Mode::Hybrid, Converged, true));
        for r in [MaxRounds, MaxBytes, NotShrinking] {
            assert!(switch_to_postcopy(Mode::Hybrid, r, true));
            assert!(!switch_to_postcopy(Mode::Precopy, r, true));
            // Never without a destination that can serve faults.
            assert!(!switch_to_postcopy(Mode::Hybrid, r, false));
        }
        assert!(switch_to_postcopy(Mode::Postcopy, FirstRound, true));
    }
}
