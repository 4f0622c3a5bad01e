//! Post-copy's background push: every page still pending once, the
//! neighbours of faults first, then a sweep that follows the VM's faults,
//! paced to a share of the link that grows at Commit.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::round::send_batch;
use super::session::WriterCmd;
use crate::bitmap::PageBitmap;
use crate::limiter::wait_for;
use crate::protocol::{connection_for_page, BatchBuilder, PageEncoder};
use crate::ram::SourceRam;

/// Share of the link the push may take before Commit. The pages it moves
/// then are pages the VM does not have to fault on after it resumes; the
/// rest of the link is left to QEMU's device state, which would otherwise
/// queue behind the push at the bottleneck and lengthen the pause.
const PRE_COMMIT_SHARE: f64 = 0.5;

/// Share of the link the push may take after Commit. Just below the link:
/// a push at full speed fills the bottleneck's queue (tens of
/// milliseconds of data on a shaped link), and every answer to a page
/// request on the control connection then waits behind it, while the
/// vCPU waits for the answer.
const POST_COMMIT_SHARE: f64 = 0.9;

/// The push's pace, set by the hand-over and read by the pusher thread.
pub(super) const PACED: u8 = 0;
pub(super) const FREE: u8 = 1;
pub(super) const STOPPED: u8 = 2;

/// Shared between the pusher thread and the request handler.
pub(super) struct PushQueue {
    /// Pages to push first (neighbours of faults).
    pub(super) hot: VecDeque<u64>,
    /// Pages already sent, on either connection.
    pub(super) sent: PageBitmap,
    /// Pages sent on the control connection. A page the push handed to a
    /// data connection may still be queued there behind the first round's
    /// last megabytes: a fault's neighbours go on the control connection
    /// unless they went that way already.
    pub(super) on_control: PageBitmap,
    /// The page the VM last waited for, not yet seen by the pusher: its
    /// sweep through the pending pages goes on from there (faults come in
    /// areas, and the sweep then covers the area ahead of the vCPU).
    pub(super) jump_to: Option<u64>,
}

/// The pages a push sends: a sweep through every pending page, ascending,
/// that starts at the bottom and jumps to wherever the VM last faulted,
/// wrapping around at the top, as QEMU's own post-copy does.
pub(super) struct PushOrder {
    pub(super) pending: Vec<u64>,
}

/// Where a push's sweep stands: the next index of `pending`.
#[derive(Default)]
struct Sweep {
    at: usize,
}

impl PushOrder {
    /// The next page to push that `sent` does not hold, after moving the
    /// sweep to `jump_to` if the VM faulted there (pure but for the sweep).
    fn next(
        &self,
        sweep: &mut Sweep,
        jump_to: Option<u64>,
        sent: impl Fn(u64) -> bool,
    ) -> Option<u64> {
        if let Some(fault) = jump_to {
            sweep.at = self.pending.partition_point(|&p| p < fault);
        }
        let n = self.pending.len();
        let i = (0..n)
            .map(|k| (sweep.at + k) % n)
            .find(|&i| !sent(self.pending[i]))?;
        sweep.at = i + 1;
        Some(self.pending[i])
    }
}

/// The background push: every pending page once, neighbours of faults
/// first, then `todo`'s order, paced to a share of `link` bytes/s (see
/// [`PushPace`]). Returns (pages, bytes), or None if a connection went away
/// or the push was stopped.
pub(super) fn push(
    ram: &SourceRam,
    todo: &PushOrder,
    queue: &Mutex<PushQueue>,
    txs: &[mpsc::Sender<WriterCmd>],
    compress: bool,
    pace: &AtomicU8,
    link: f64,
) -> Option<(u64, u64)> {
    const BATCH_BYTES: usize = 64 << 10;
    let conns = u16::try_from(txs.len()).expect("at most 16 connections");
    let mut builders: Vec<BatchBuilder> = (0..txs.len()).map(|_| BatchBuilder::new(0)).collect();
    let mut encoder = PageEncoder::new(compress);
    let (mut n, mut bytes) = (0u64, 0u64);
    let mut pacer = PushPace::new(link, Instant::now());
    let mut sweep = Sweep::default();
    loop {
        // Hot pages first; then the next page in order not sent yet.
        let next = {
            let mut q = queue.lock().ok()?;
            let mut pick = None;
            while let Some(h) = q.hot.pop_front() {
                if q.sent.set(h) {
                    pick = Some(h);
                    break;
                }
            }
            if pick.is_none() {
                let jump = q.jump_to.take();
                pick = todo.next(&mut sweep, jump, |p| q.sent.get(p));
                if let Some(p) = pick {
                    q.sent.set(p);
                }
            }
            pick
        };
        let Some(page) = next else { break };
        let Ok(data) = ram.page(page) else { continue };
        let c = usize::from(connection_for_page(page, conns) - 1);
        encoder.push(&mut builders[c], page, data);
        n += 1;
        // Small batches: a fault's neighbours must not wait behind a big one.
        if builders[c].is_full(BATCH_BYTES) {
            send_batch(&mut builders[c], 0, &txs[c], &mut bytes)?;
            pacer.keep(pace, bytes)?;
        }
    }
    for (b, tx) in builders.iter_mut().zip(txs) {
        if b.count() > 0 {
            send_batch(b, 0, tx, &mut bytes)?;
        }
    }
    Some((n, bytes))
}

/// The push's rate: [`PRE_COMMIT_SHARE`] of the link until Commit, then
/// [`POST_COMMIT_SHARE`], each phase counted from its own start (the
/// second must not spend in a burst what the first left unused).
struct PushPace {
    link: f64,
    committed: bool,
    since: Instant,
    bytes_at: u64,
}

impl PushPace {
    fn new(link: f64, now: Instant) -> Self {
        Self {
            link,
            committed: false,
            since: now,
            bytes_at: 0,
        }
    }

    /// How long to wait, at `now`, having pushed `bytes` in all, with the
    /// hand-over in state `pace`; None once the push is stopped.
    fn wait(&mut self, pace: u8, bytes: u64, now: Instant) -> Option<Duration> {
        let share = match pace {
            STOPPED => return None,
            FREE => {
                if !self.committed {
                    self.committed = true;
                    self.since = now;
                    self.bytes_at = bytes;
                }
                POST_COMMIT_SHARE
            }
            _ => PRE_COMMIT_SHARE,
        };
        Some(pace_wait(
            bytes - self.bytes_at,
            now.saturating_duration_since(self.since),
            self.link * share,
        ))
    }

    /// Sleeps while the push is ahead of its pace; None once it is stopped.
    fn keep(&mut self, pace: &AtomicU8, bytes: u64) -> Option<()> {
        loop {
            let wait = self.wait(pace.load(Ordering::Acquire), bytes, Instant::now())?;
            if wait.is_zero() {
                return Some(());
            }
            // Short naps: Commit must change the pace at once.
            std::thread::sleep(wait.min(Duration::from_millis(2)));
        }
    }
}

/// How long a paced sender that has sent `bytes` in `elapsed` waits to be
/// back at `rate` bytes/s (pure).
fn pace_wait(bytes: u64, elapsed: Duration, rate: f64) -> Duration {
    #[allow(clippy::cast_precision_loss)] // byte counts far below 2^52
    let allowed = elapsed.as_secs_f64() * rate;
    #[allow(clippy::cast_precision_loss)]
    let want = bytes as f64;
    if rate <= 0.0 {
        return Duration::from_secs(1);
    }
    wait_for(allowed, want, rate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_push_paces_each_phase_from_its_own_start() {
        let t0 = Instant::now();
        let link = 100e6;
        let mut p = PushPace::new(link, t0);
        // Before Commit: half the link. 50 MB after 1 s is on time.
        let at = |ms| t0 + Duration::from_millis(ms);
        assert_eq!(p.wait(PACED, 50_000_000, at(1000)), Some(Duration::ZERO));
        assert!(p.wait(PACED, 60_000_000, at(1000)).unwrap() > Duration::from_millis(150));
        // Commit at 1 s with 50 MB pushed: the new phase counts from there,
        // at 90 MB/s, not from the start (which would allow a 40 MB burst).
        assert_eq!(p.wait(FREE, 50_000_000, at(1000)), Some(Duration::ZERO));
        let w = p.wait(FREE, 59_000_000, at(1000)).unwrap();
        assert!(
            w > Duration::from_millis(90) && w < Duration::from_millis(110),
            "{w:?}"
        );
        assert_eq!(p.wait(FREE, 59_000_000, at(1100)), Some(Duration::ZERO));
        assert_eq!(p.wait(STOPPED, 59_000_000, at(1100)), None);
    }

    /// Drains a push order as the pusher does, `already_sent` gone on the
    /// control connection, with faults at the given steps, returning the
    /// pages in push order.
    fn drain(order: &PushOrder, already_sent: &[u64], faults: &[(usize, u64)]) -> Vec<u64> {
        let mut sent: std::collections::HashSet<u64> = already_sent.iter().copied().collect();
        let mut sweep = Sweep::default();
        let mut out = Vec::new();
        loop {
            let jump = faults.iter().find(|f| f.0 == out.len()).map(|f| f.1);
            if let Some(f) = jump {
                // The vCPU's page itself goes on the control connection.
                sent.insert(f);
            }
            let Some(p) = order.next(&mut sweep, jump, |p| sent.contains(&p)) else {
                return out;
            };
            sent.insert(p);
            out.push(p);
        }
    }

    #[test]
    fn the_push_sweeps_up_and_skips_pages_sent_on_the_control_connection() {
        let order = PushOrder {
            pending: vec![3, 9, 50, 70, 99],
        };
        assert_eq!(drain(&order, &[9, 70], &[]), vec![3, 50, 99]);
    }

    #[test]
    fn the_push_sweep_jumps_to_a_fault_and_wraps_around() {
        let order = PushOrder {
            pending: vec![10, 20, 30, 40, 50, 60],
        };
        // After two pages the VM faults on 45: the sweep goes on from 45
        // (50, 60), wraps to the bottom and sends each page once.
        assert_eq!(drain(&order, &[], &[(2, 45)]), vec![10, 20, 50, 60, 30, 40]);
        // A fault on a pending page: that page is not pushed again.
        assert_eq!(drain(&order, &[], &[(1, 40)]), vec![10, 50, 60, 20, 30]);
        // A fault above every pending page wraps to the bottom.
        assert_eq!(drain(&order, &[], &[(0, 99)]), vec![10, 20, 30, 40, 50, 60]);
    }

    #[test]
    fn paced_push_waits_until_it_is_back_at_its_rate() {
        // 1 MB at 1 MB/s: may go after one second, not before.
        assert_eq!(
            pace_wait(1_000_000, Duration::from_secs(1), 1e6),
            Duration::ZERO
        );
        assert_eq!(
            pace_wait(1_000_000, Duration::from_millis(500), 1e6),
            Duration::from_millis(500)
        );
        // No rate known: nothing goes before Commit.
        assert!(!pace_wait(1, Duration::from_secs(5), 0.0).is_zero());
    }
}
