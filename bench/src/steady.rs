//! When the load has reached its steady state and the migration may start.
//!
//! A database under a fresh load is not yet at its usual rate: the buffer
//! pool is still filling, the first connections are warming their caches.
//! A migration started then is compared with a guest that would have sped
//! up on its own. The rule: over the last `window_s` whole seconds (e.g.
//! 20), the rate of each block of `block_s` seconds (e.g. 5) lies within
//! `tolerance` (e.g. ±10 %) of the window's mean; checked once a second
//! from the per-transaction logs both loads write as they run. After
//! `max_s` the migration starts anyway, and the report says the load did
//! not settle. Blocks, not single seconds: at the 20-30 transactions a
//! second of the MariaDB VM under TCG, one second's count varies by more
//! than 10 % around a flat mean (a smoke run at a steady 30 tps had
//! seconds of 27 and 34), while a warm-up's ramp still moves a 5 s block
//! by more. `block_s` 1 judges every second.

use std::time::Duration;

use crate::timeline;

/// The steady-state rule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rule {
    /// Least warm-up, seconds (the load's first seconds are never judged alone).
    pub min_s: u64,
    /// Longest warm-up, seconds: the migration starts then, steady or not.
    pub max_s: u64,
    /// Seconds judged (the last ones).
    pub window_s: usize,
    /// Seconds averaged into one block (a window of 20 in blocks of 5: 4 blocks).
    pub block_s: usize,
    /// Largest distance of one second's rate from their mean, as a fraction of the mean.
    pub tolerance: f64,
}

/// Whether, over the last `window` rates of `rates` (one a second), the
/// mean rate of each `block` of seconds lies within `tolerance` × their
/// mean of the mean (pure); the blocks are counted back from the last
/// second (a first partial block counts by its own mean). Fewer rates than
/// `window`, a zero window, or a mean of zero (no transaction) are not steady.
pub fn is_steady(rates: &[f64], window: usize, block: usize, tolerance: f64) -> bool {
    if window == 0 || rates.len() < window {
        return false;
    }
    let last = &rates[rates.len() - window..];
    let mean = last.iter().sum::<f64>() / window as f64;
    mean > 0.0
        && last.rchunks(block.max(1)).all(|b| {
            let m = b.iter().sum::<f64>() / b.len() as f64;
            (m - mean).abs() <= tolerance * mean
        })
}

/// What the warm-up came to.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Warmup {
    /// Seconds from the load's start to the migration's.
    pub secs: u64,
    /// Whether the rule was met (false: the cap ended the warm-up).
    pub steady: bool,
}

/// The decision after `elapsed_s` whole seconds of load with these rates
/// (pure): Some when the warm-up is over.
pub fn decide(rule: &Rule, rates: &[f64], elapsed_s: u64) -> Option<Warmup> {
    if elapsed_s < rule.min_s {
        return None;
    }
    if is_steady(rates, rule.window_s, rule.block_s, rule.tolerance) {
        return Some(Warmup {
            secs: elapsed_s,
            steady: true,
        });
    }
    (elapsed_s >= rule.max_s.max(rule.min_s)).then_some(Warmup {
        secs: elapsed_s,
        steady: false,
    })
}

/// Waits until the loads whose transactions `dirs` hold (their
/// per-transaction logs, growing as they run; started at `start_us`) are
/// steady by `rule`, or its cap: rates of every load together.
pub fn wait(rule: &Rule, dirs: &[&std::path::Path], start_us: u64) -> Warmup {
    loop {
        let elapsed_s = timeline::now_us().saturating_sub(start_us) / 1_000_000;
        let mut txns = Vec::new();
        for d in dirs {
            // A log not yet made counts as no transaction.
            txns.extend(timeline::read_dir(d).unwrap_or_default());
        }
        let secs = u32::try_from(elapsed_s).unwrap_or(u32::MAX);
        let rates: Vec<f64> = timeline::seconds(&txns, start_us, secs, false)
            .iter()
            .map(|s| s.tps)
            .collect();
        if let Some(w) = decide(rule, &rates, elapsed_s) {
            return w;
        }
        // On to the next whole second of load.
        let into = timeline::now_us().saturating_sub(start_us) % 1_000_000;
        std::thread::sleep(Duration::from_micros(1_000_000 - into + 20_000));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: Rule = Rule {
        min_s: 15,
        max_s: 120,
        window_s: 20,
        block_s: 1,
        tolerance: 0.10,
    };

    #[test]
    fn steady_when_the_last_seconds_stay_near_their_mean() {
        let mut rates = vec![2.0, 5.0, 9.0]; // warming up
        rates.extend(std::iter::repeat_n(20.0, 19));
        assert!(
            !is_steady(&rates, 20, 1, 0.10),
            "a ramp second is in the window"
        );
        rates.push(21.0);
        assert!(is_steady(&rates, 20, 1, 0.10));
        // One second 15 % below the mean breaks it.
        let mut dip = vec![20.0; 20];
        dip[7] = 17.0;
        assert!(!is_steady(&dip, 20, 1, 0.10));
        dip[7] = 18.5;
        assert!(is_steady(&dip, 20, 1, 0.10));
    }

    #[test]
    fn blocks_smooth_single_seconds_but_not_a_ramp() {
        // A flat 30 tps with the single-second swings of a smoke run.
        let flat = [
            32.0, 30.0, 29.0, 28.0, 29.0, 30.0, 31.0, 33.0, 32.0, 30.0, 31.0, 30.0, 32.0, 30.0,
            30.0, 27.0, 32.0, 30.0, 30.0, 34.0,
        ];
        assert!(!is_steady(&flat, 20, 1, 0.10));
        assert!(is_steady(&flat, 20, 5, 0.10));
        // 20 to 30 tps over the window: the first and last blocks are off.
        let ramp: Vec<f64> = (0..20).map(|i| 20.0 + f64::from(i) * 0.5).collect();
        assert!(!is_steady(&ramp, 20, 5, 0.10));
        // The first 5 s of the window still at 18 tps, then 30.
        let mut step = vec![18.0; 5];
        step.extend([30.0; 15]);
        assert!(!is_steady(&step, 20, 5, 0.10));
    }

    #[test]
    fn too_few_seconds_or_no_transactions_are_not_steady() {
        assert!(!is_steady(&[20.0; 19], 20, 5, 0.10));
        assert!(!is_steady(&[0.0; 30], 20, 5, 0.10));
        assert!(!is_steady(&[20.0; 30], 0, 5, 0.10));
    }

    #[test]
    fn decision_waits_for_the_least_and_stops_at_the_cap() {
        let flat = vec![20.0; 25];
        assert_eq!(decide(&RULE, &flat[..14], 14), None, "below min_s");
        assert_eq!(
            decide(&RULE, &flat, 25),
            Some(Warmup {
                secs: 25,
                steady: true
            })
        );
        let noisy: Vec<f64> = (0..130)
            .map(|i| if i % 2 == 0 { 10.0 } else { 30.0 })
            .collect();
        assert_eq!(decide(&RULE, &noisy[..119], 119), None);
        assert_eq!(
            decide(&RULE, &noisy[..120], 120),
            Some(Warmup {
                secs: 120,
                steady: false
            })
        );
        // A cap at or below the least: a fixed warm-up of min_s.
        let fixed = Rule { max_s: 0, ..RULE };
        assert_eq!(
            decide(&fixed, &noisy[..15], 15),
            Some(Warmup {
                secs: 15,
                steady: false
            })
        );
    }
}
