//! Adaptive pacing (Clark et al.'s dynamic rate limiting, driven by the
//! guest's own signal): while the VM runs on the source, a controller
//! watches how long the guest's vCPU threads wait for a CPU and paces the
//! pages the rounds move (raw pages on the link and references, each one a
//! 4 KiB read from shared storage at the destination) so that the wait the
//! migration adds stays within a budget: faster while the guest has
//! headroom, slower when it does not.
//!
//! The controller ([`PaceController::step`]) is pure; [`Pacing`] runs it
//! every [`PACE_INTERVAL`] on the samples of a [`GuestSignal`] (which the
//! VMM integration reads, e.g. QEMU's vCPU threads' `schedstat`) and sets
//! the shared page pace every data connection takes from.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::limiter::RateLimiter;

/// How often the controller looks at the guest.
pub const PACE_INTERVAL: Duration = Duration::from_millis(500);
/// The slowest pace the controller sets, bytes of pages per second: a
/// migration must end whatever the guest does.
pub const MIN_PACE: f64 = 32.0 * 1024.0 * 1024.0;
/// Above this pace the controller lets the pages go unpaced.
pub const MAX_PACE: f64 = 2048.0 * 1024.0 * 1024.0;

/// Cumulative CPU time of the guest's vCPU threads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuTimes {
    /// Nanoseconds they ran.
    pub ran_ns: u64,
    /// Nanoseconds they were runnable but waited for a CPU.
    pub waited_ns: u64,
}

impl CpuTimes {
    /// The share of their runnable time that the threads waited between
    /// `earlier` and `self` (0 when they were not runnable at all). Pure.
    pub fn wait_share_since(self, earlier: CpuTimes) -> f64 {
        let ran = self.ran_ns.saturating_sub(earlier.ran_ns);
        let waited = self.waited_ns.saturating_sub(earlier.waited_ns);
        let runnable = ran.saturating_add(waited);
        if runnable == 0 {
            0.0
        } else {
            #[allow(clippy::cast_precision_loss)] // a ratio
            let share = waited as f64 / runnable as f64;
            share
        }
    }
}

/// The guest's own signal of CPU pressure, read by the VMM integration.
pub trait GuestSignal: Send + std::fmt::Debug {
    /// The vCPU threads' cumulative times now (None: they cannot be read,
    /// e.g. the VMM exited; the controller then leaves the pace as it is).
    fn sample(&mut self) -> Option<CpuTimes>;
}

/// One decision of the controller, for the report.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct PaceStep {
    /// Milliseconds since the migration started.
    pub t_ms: u64,
    /// The vCPUs' wait share over the interval, percent.
    pub wait_pct: f64,
    /// Its excess over the guest's baseline before the migration, percent.
    pub impact_pct: f64,
    /// Page bytes the rounds moved per second over the interval, MB/s.
    pub moved_mbyte_s: f64,
    /// The pace set for the next interval, MB/s of pages (None: unpaced).
    pub pace_mbyte_s: Option<f64>,
}

/// The controller: additive-increase, proportional-decrease on the
/// guest's impact against a budget.
#[derive(Clone, Debug)]
pub struct PaceController {
    /// The wait share the migration may add, 0..1.
    budget: f64,
    /// The guest's wait share before the migration.
    baseline: f64,
    /// The pace now, bytes/s (None: unpaced).
    pace: Option<f64>,
}

impl PaceController {
    /// A controller that lets the migration add at most `budget` (0..1) to
    /// the guest's wait share `baseline`; it starts unpaced.
    pub fn new(budget: f64, baseline: f64) -> Self {
        Self {
            budget: budget.clamp(0.0, 1.0),
            baseline: baseline.clamp(0.0, 1.0),
            pace: None,
        }
    }

    /// The pace now, bytes/s (None: unpaced).
    pub fn pace(&self) -> Option<f64> {
        self.pace
    }

    /// Takes one interval's wait share and the page bytes per second moved
    /// in it; returns the pace for the next interval (pure):
    /// - over budget: the pace drops in proportion to the excess (to half
    ///   at most per step, never below [`MIN_PACE`]), from what was
    ///   actually moved when that is lower than the pace set (but not when
    ///   little moved at all: the pages did not hurt the guest then);
    /// - under half the budget: a paced migration speeds up by a quarter,
    ///   and goes unpaced past [`MAX_PACE`];
    /// - in between: the pace holds.
    pub fn step(&mut self, wait_share: f64, moved: f64) -> Option<f64> {
        let impact = (wait_share - self.baseline).max(0.0);
        if impact > self.budget {
            // From what was moved, unless little was (the round hashing or
            // draining): then the pages were not what hurt the guest.
            let from = match self.pace {
                Some(p) if moved >= p / 4.0 => p.min(moved),
                Some(p) => p,
                None => moved.max(2.0 * MIN_PACE),
            };
            let factor = (self.budget / impact).clamp(0.5, 0.9);
            self.pace = Some((from * factor).max(MIN_PACE));
        } else if impact < self.budget / 2.0 {
            if let Some(p) = self.pace {
                let up = p * 1.25;
                self.pace = (up < MAX_PACE).then_some(up);
            }
        }
        self.pace
    }

    /// The guest's wait share above its baseline.
    pub fn impact(&self, wait_share: f64) -> f64 {
        (wait_share - self.baseline).max(0.0)
    }
}

/// The running controller of a session: a task that samples the guest,
/// steps the controller and sets the page pace, until stopped (when the VM
/// pauses: its signal then means nothing).
#[derive(Debug)]
pub(crate) struct Pacing {
    /// The pace every data connection takes page bytes from.
    pub pace: Arc<RateLimiter>,
    /// Page bytes the data connections have sent.
    pub moved: Arc<AtomicU64>,
    steps: Arc<Mutex<Vec<PaceStep>>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Pacing {
    /// No controller: the pace stays unlimited.
    pub fn off() -> Self {
        Self {
            pace: Arc::new(RateLimiter::new(None)),
            moved: Arc::new(AtomicU64::new(0)),
            steps: Arc::default(),
            task: None,
        }
    }

    /// Starts the controller (on the current tokio runtime): the
    /// migration may add `budget` (0..1) to the guest's wait share
    /// `baseline` before it. A controller already running is replaced.
    pub fn start(&mut self, signal: Box<dyn GuestSignal>, budget: f64, baseline: f64) {
        self.pace.reopen();
        let run = PaceLoop {
            signal,
            ctl: PaceController::new(budget, baseline),
            pace: self.pace.clone(),
            moved: self.moved.clone(),
            steps: self.steps.clone(),
        };
        if let Some(old) = self.task.replace(tokio::spawn(run.run())) {
            old.abort();
        }
    }

    /// Stops the controller and lifts the pace (the VM no longer runs
    /// here, or the migration ends); returns its decisions.
    pub fn stop(&mut self) -> Vec<PaceStep> {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        // Closed under the limiter's lock: a step of the task still under
        // way on another thread cannot put a pace back.
        self.pace.close();
        self.steps.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// Reads of the guest's signal that may fail in a row before the pace is
/// lifted: a controller that cannot see the guest must not hold it back.
const BLIND_STEPS: u32 = 3;

/// The controller's task.
struct PaceLoop {
    signal: Box<dyn GuestSignal>,
    ctl: PaceController,
    pace: Arc<RateLimiter>,
    moved: Arc<AtomicU64>,
    steps: Arc<Mutex<Vec<PaceStep>>>,
}

impl PaceLoop {
    fn look(&mut self) -> (Option<CpuTimes>, Instant, u64) {
        (
            self.signal.sample(),
            Instant::now(),
            self.moved.load(Ordering::Relaxed),
        )
    }

    async fn run(mut self) {
        let started = Instant::now();
        let mut last = self.look();
        let mut blind = 0;
        let mut tick = tokio::time::interval(PACE_INTERVAL);
        // Late ticks are not made up in a burst: a near-empty interval
        // shows no wait and would speed the pace up exactly when the host
        // is overloaded.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let now = self.look();
            let secs = now.1.duration_since(last.1).as_secs_f64();
            if secs < PACE_INTERVAL.as_secs_f64() / 2.0 {
                continue;
            }
            let (Some(a), Some(b)) = (last.0, now.0) else {
                blind += 1;
                if blind == BLIND_STEPS {
                    tracing::warn!(
                        "the guest's vCPU threads cannot be read any more: the pages go unpaced"
                    );
                    self.pace.set_rate(None);
                }
                last = now;
                continue;
            };
            blind = 0;
            let share = b.wait_share_since(a);
            #[allow(clippy::cast_precision_loss)]
            let rate = now.2.saturating_sub(last.2) as f64 / secs;
            let set = self.ctl.step(share, rate);
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            self.pace.set_rate(set.map(|r| r as u64));
            let step = PaceStep {
                t_ms: crate::stats::millis(started.elapsed()),
                wait_pct: share * 100.0,
                impact_pct: self.ctl.impact(share) * 100.0,
                moved_mbyte_s: rate / 1e6,
                pace_mbyte_s: set.map(|r| r / 1e6),
            };
            tracing::debug!(
                wait_pct = step.wait_pct,
                impact_pct = step.impact_pct,
                moved_mbyte_s = step.moved_mbyte_s,
                pace_mbyte_s = ?step.pace_mbyte_s,
                "adaptive pace"
            );
            if let Ok(mut s) = self.steps.lock() {
                s.push(step);
            }
            last = now;
        }
    }
}

impl Drop for Pacing {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: f64 = 1e6;

    #[test]
    fn the_wait_share_is_the_waited_part_of_runnable_time() {
        let a = CpuTimes {
            ran_ns: 1_000,
            waited_ns: 100,
        };
        let b = CpuTimes {
            ran_ns: 1_800,
            waited_ns: 300,
        };
        assert!((b.wait_share_since(a) - 0.2).abs() < 1e-9);
        assert_eq!(a.wait_share_since(a), 0.0, "not runnable at all");
        assert_eq!(a.wait_share_since(b), 0.0, "a counter that went back");
    }

    #[test]
    fn over_budget_the_pace_drops_from_what_was_moved_and_never_below_the_floor() {
        let mut c = PaceController::new(0.10, 0.20);
        // Within the budget above the baseline: stays unpaced.
        assert_eq!(c.step(0.27, 400.0 * MB), None);
        // 40 % above the baseline against 10 %: halved from what was moved.
        assert_eq!(c.step(0.60, 400.0 * MB), Some(200.0 * MB));
        // 15 % against 10 %: two thirds, from the pace (less than moved).
        let p = c.step(0.35, 300.0 * MB).unwrap();
        assert!((p - 200.0 * MB / 1.5).abs() < 1.0, "{p}");
        // Slower moves than the pace: the drop starts from what was moved.
        let p = c.step(0.40, 50.0 * MB).unwrap();
        assert!((p - 32.0 * 1024.0 * 1024.0).abs() < 1.0, "floored: {p}");
        for _ in 0..10 {
            c.step(1.0, 1.0 * MB);
        }
        assert_eq!(c.pace(), Some(MIN_PACE));
    }

    /// A guest whose vCPUs wait `waited` of each `ran + waited` ns.
    #[derive(Debug)]
    struct Starved {
        now: CpuTimes,
        ran: u64,
        waited: u64,
    }

    impl GuestSignal for Starved {
        fn sample(&mut self) -> Option<CpuTimes> {
            self.now.ran_ns += self.ran;
            self.now.waited_ns += self.waited;
            Some(self.now)
        }
    }

    #[tokio::test]
    async fn a_starved_guest_gets_the_pages_paced_until_the_vm_pauses() {
        let mut p = Pacing::off();
        let guest = Starved {
            now: CpuTimes::default(),
            ran: 400,
            waited: 600,
        };
        p.start(Box::new(guest), 0.10, 0.05);
        // The rounds move 300 MB/s meanwhile.
        for _ in 0..12 {
            p.moved.fetch_add(30_000_000, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let paced = p.steps.lock().unwrap().clone();
        assert!(paced.len() >= 2, "{paced:?}");
        let first = paced[0];
        assert!((first.wait_pct - 60.0).abs() < 1e-6, "{first:?}");
        assert!((first.impact_pct - 55.0).abs() < 1e-6, "{first:?}");
        assert!(first.moved_mbyte_s > 100.0, "{first:?}");
        // Halved from what was moved, then halved again.
        let pace = |s: &PaceStep| s.pace_mbyte_s.unwrap();
        assert!((pace(&paced[0]) - first.moved_mbyte_s / 2.0).abs() < 1.0);
        assert!(pace(&paced[1]) < pace(&paced[0]));
        // The VM pauses: the pace is lifted and the decisions kept.
        let steps = p.stop();
        assert!(steps.len() >= paced.len());
        let start = std::time::Instant::now();
        p.pace.acquire(1 << 30).await;
        assert!(start.elapsed() < Duration::from_millis(100), "still paced");
    }

    #[test]
    fn with_headroom_the_pace_climbs_and_goes_unpaced_past_the_ceiling() {
        let mut c = PaceController::new(0.10, 0.0);
        c.step(0.5, 100.0 * MB);
        assert_eq!(c.pace(), Some(50.0 * MB));
        // Between half the budget and the budget: holds.
        assert_eq!(c.step(0.07, 50.0 * MB), Some(50.0 * MB));
        // Under half: a quarter more each step, then unpaced.
        assert_eq!(c.step(0.01, 50.0 * MB), Some(62.5 * MB));
        let mut steps = 0;
        while c.step(0.0, 0.0).is_some() {
            steps += 1;
            assert!(steps < 40);
        }
        assert_eq!(c.pace(), None);
        // Below the baseline counts as no impact at all.
        let mut c = PaceController::new(0.05, 0.30);
        assert_eq!(c.step(0.10, 500.0 * MB), None);
        assert_eq!(c.impact(0.10), 0.0);
    }
}
