//! The guest's cost of a migration as the database's users feel it: the
//! work done in a fixed window from the migration's start, against a
//! control run that did not migrate.
//!
//! The window is the same for every run of a scenario: the slowest
//! completed migration (`total_ms`, rounded up to a second) plus 10 s, so
//! that every method's window holds its whole migration and the same time
//! after it. It is counted in the per-second timeline's buckets: bucket i
//! holds the transactions that ended in second [i, i+1) of the load (its
//! `t` is i + 1), and the window's first bucket is the first whose middle
//! is at or after the migration's start. Work done is the transactions of
//! those buckets; work lost the control's median work done minus a run's;
//! the longest stall the longest run of buckets with no transaction; the
//! percentiles are over every transaction of the same span (from the
//! run's transaction log, kept until all runs are done).

use std::ops::Range;

use crate::timeline::{self, Second, Txn};
use crate::Run;

/// A count or a second kept as f64 (a second's transactions, a start in
/// seconds), as a whole number; below zero is zero (pure).
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn whole(x: f64) -> u64 {
    // Saturating: NaN and negatives are 0, far beyond a run's figures is u64::MAX.
    x.round().max(0.0) as u64
}

/// Seconds after the slowest migration that every window also holds.
pub const AFTER_SLOWEST_S: u64 = 10;

/// The method of a control run: the same load and timeline, no migration.
pub const CONTROL: &str = "none";

/// The window's buckets for a migration that started `start_s` seconds
/// into the load (pure).
pub fn window_buckets(start_s: f64, window_s: u64) -> Range<usize> {
    let first = usize::try_from(whole((start_s - 0.5).ceil())).unwrap_or(usize::MAX / 2);
    first..first + usize::try_from(window_s).unwrap_or(usize::MAX / 2)
}

/// The window, seconds: the slowest completed migration rounded up to a
/// whole second plus [`AFTER_SLOWEST_S`] (`fallback_ms` when none
/// completed), but no longer than the shortest timeline after its
/// migration start (`covered_s`, whole seconds), so that it is the same
/// window for every run (pure).
pub fn window_s(totals_ms: &[u64], fallback_ms: u64, covered_s: &[u64]) -> u64 {
    let slowest = totals_ms.iter().copied().max().unwrap_or(fallback_ms);
    let want = slowest.div_ceil(1000) + AFTER_SLOWEST_S;
    covered_s.iter().copied().fold(want, u64::min)
}

/// Whole seconds of `seconds` from the window's first bucket on (pure).
pub fn covered_s(seconds: &[Second], start_s: f64) -> u64 {
    let first = window_buckets(start_s, 0).start;
    seconds.len().saturating_sub(first) as u64
}

/// Transactions in the window's buckets, None if the timeline ends before it does (pure).
pub fn work_done(seconds: &[Second], window: &Range<usize>) -> Option<u64> {
    let b = seconds.get(window.clone())?;
    Some(b.iter().map(|s| whole(s.tps)).sum())
}

/// Longest run of consecutive buckets of the window with no transaction, seconds (pure).
pub fn longest_stall_s(seconds: &[Second], window: &Range<usize>) -> Option<u64> {
    let b = seconds.get(window.clone())?;
    let (mut run, mut longest) = (0u64, 0u64);
    for s in b {
        run = if s.tps == 0.0 { run + 1 } else { 0 };
        longest = longest.max(run);
    }
    Some(longest)
}

/// Median, least and greatest of some figures.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

/// The [`Spread`] of `v`; the median of an even count is the mean of the middle two (pure).
pub fn spread(v: &[f64]) -> Option<Spread> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let median = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    Some(Spread {
        median,
        min: s[0],
        max: s[n - 1],
    })
}

/// Work lost against the control's median work done: transactions and
/// percent of the control's (pure).
pub fn work_lost(control_median: f64, done: u64) -> (f64, Option<f64>) {
    let lost = control_median - done as f64;
    let pct = (control_median > 0.0).then(|| (lost / control_median * 1000.0).round() / 10.0);
    (lost, pct)
}

/// Fills every run's window figures, once all runs are done: the window
/// from the completed migrations (`fallback_ms`, the migration time limit,
/// when none completed), work lost from the control runs (none if there
/// is no control run). Runs without a timeline are left as they are.
pub fn apply(runs: &mut [Run], fallback_ms: u64) {
    let totals: Vec<u64> = runs
        .iter()
        .filter(|r| r.completed && r.method != CONTROL)
        .filter_map(|r| r.total_ms)
        .collect();
    let covered: Vec<u64> = runs
        .iter()
        .filter_map(|r| r.timeline.as_ref())
        .map(|t| covered_s(&t.seconds, t.migration_start_s))
        .collect();
    if covered.is_empty() {
        return;
    }
    let w = window_s(&totals, fallback_ms, &covered);
    for r in runs.iter_mut() {
        let Some(tl) = &r.timeline else { continue };
        let range = window_buckets(tl.migration_start_s, w);
        r.workload.window_s = Some(w);
        r.workload.work_done = work_done(&tl.seconds, &range);
        r.workload.longest_stall_s = longest_stall_s(&tl.seconds, &range);
        if let Some(raw) = &r.raw_load {
            let from = raw.start_us + range.start as u64 * 1_000_000;
            let stats = timeline::window(&raw.txns, from, from + w * 1_000_000);
            r.workload.p90_ms_window = stats.p90_ms;
            r.workload.p99_ms_window = stats.p99_ms;
        }
    }
    let control: Vec<f64> = runs
        .iter()
        .filter(|r| r.method == CONTROL)
        .filter_map(|r| r.workload.work_done.map(|d| d as f64))
        .collect();
    let Some(c) = spread(&control) else { return };
    for r in runs.iter_mut() {
        if let Some(done) = r.workload.work_done {
            let (lost, pct) = work_lost(c.median, done);
            r.workload.work_lost = Some(lost);
            r.workload.work_lost_pct = pct;
        }
    }
}

/// A run's transactions, kept in memory until every run of the
/// comparison is done (the window is known only then).
#[derive(Clone, Debug, Default)]
pub struct RawLoad {
    /// When the load started, µs since the epoch (bucket 0 starts here).
    pub start_us: u64,
    pub txns: Vec<Txn>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Timeline, Workload};

    fn secs(tps: &[f64]) -> Vec<Second> {
        tps.iter()
            .enumerate()
            .map(|(i, &t)| Second {
                t: u32::try_from(i + 1).unwrap(),
                tps: t,
                p90_ms: None,
                p99_ms: None,
                errors: 0,
                tpmc: None,
            })
            .collect()
    }

    #[test]
    fn the_window_starts_at_the_first_bucket_centred_after_the_start() {
        assert_eq!(window_buckets(20.0, 5), 20..25);
        assert_eq!(window_buckets(20.4, 5), 20..25);
        assert_eq!(window_buckets(20.6, 5), 21..26);
        assert_eq!(window_buckets(0.0, 3), 0..3);
    }

    #[test]
    fn the_window_is_the_slowest_migration_plus_ten_seconds_within_every_timeline() {
        assert_eq!(window_s(&[6_200, 14_001, 9_000], 60_000, &[100, 90]), 25);
        assert_eq!(window_s(&[], 60_000, &[100]), 70, "none completed");
        assert_eq!(
            window_s(&[14_000], 60_000, &[18, 90]),
            18,
            "a short timeline"
        );
        assert_eq!(covered_s(&secs(&[1.0; 30]), 20.2), 10);
        assert_eq!(covered_s(&secs(&[1.0; 10]), 20.2), 0);
    }

    #[test]
    fn work_and_stalls_in_the_window() {
        let s = secs(&[10.0, 10.0, 0.0, 0.0, 0.0, 4.0, 0.0, 10.0]);
        assert_eq!(work_done(&s, &(1..8)), Some(24));
        assert_eq!(longest_stall_s(&s, &(1..8)), Some(3));
        assert_eq!(longest_stall_s(&s, &(0..2)), Some(0));
        assert_eq!(work_done(&s, &(5..9)), None, "past the timeline's end");
    }

    #[test]
    fn medians_and_work_lost() {
        let s = spread(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(spread(&[4.0, 1.0, 2.0, 10.0]).unwrap().median, 3.0);
        assert_eq!(spread(&[]), None);
        assert_eq!(work_lost(400.0, 300), (100.0, Some(25.0)));
        assert_eq!(work_lost(400.0, 410), (-10.0, Some(-2.5)));
        assert_eq!(work_lost(0.0, 0), (0.0, None));
    }

    fn run(method: &str, total_ms: Option<u64>, start_s: f64, tps: &[f64]) -> Run {
        Run {
            method: method.into(),
            completed: total_ms.is_some(),
            total_ms,
            timeline: Some(Timeline {
                migration_start_s: start_s,
                seconds: secs(tps),
                ..Timeline::default()
            }),
            workload: Workload::default(),
            ..Run::default()
        }
    }

    #[test]
    fn every_run_gets_the_same_window_and_the_controls_median() {
        let mut tps = vec![10.0; 40];
        let control_a = run(CONTROL, None, 20.0, &tps);
        tps[25] = 14.0;
        let control_b = run(CONTROL, None, 20.0, &tps);
        let mut slow = vec![10.0; 40];
        for t in &mut slow[22..25] {
            *t = 0.0;
        }
        let mut runs = vec![
            control_a,
            run("qemu-precopy", Some(4_500), 20.2, &slow),
            run("dbmigrate-precopy", Some(2_000), 20.0, &[10.0; 40]),
            control_b,
        ];
        apply(&mut runs, 60_000);
        let w: Vec<&Workload> = runs.iter().map(|r| &r.workload).collect();
        assert!(w.iter().all(|w| w.window_s == Some(15)));
        assert_eq!(w[0].work_done, Some(150));
        assert_eq!(w[3].work_done, Some(154));
        assert_eq!(w[1].work_done, Some(120));
        assert_eq!(w[1].longest_stall_s, Some(3));
        assert_eq!(w[1].work_lost, Some(32.0));
        assert_eq!(w[1].work_lost_pct, Some(21.1));
        assert_eq!(w[2].work_lost, Some(2.0));
        assert_eq!(w[0].work_lost, Some(2.0));
    }
}
