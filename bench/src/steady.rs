//! When the load has reached its steady state and the migration may start.
//!
//! A database under a fresh load is not yet at its usual rate: the buffer
//! pool is still filling, the first connections are warming their caches.
//! A migration started then is compared with a guest that would have sped
//! up on its own. The rule: the last `window_s` whole seconds each lie
//! within `tolerance` of their mean (e.g. 20 s within ±10 %), checked
//! once a second from the per-transaction logs both loads write as they
//! run; after `max_s` the migration starts anyway, and the report says the
//! load did not settle.

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
    /// Largest distance of one second's rate from their mean, as a fraction of the mean.
    pub tolerance: f64,
}

/// Whether the last `window` rates of `rates` (one a second) each lie
/// within `tolerance` × their mean of the mean (pure). Fewer rates than
/// `window`, a zero window, or a mean of zero (no transaction) are not steady.
pub fn is_steady(rates: &[f64], window: usize, tolerance: f64) -> bool {
    if window == 0 || rates.len() < window {
        return false;
    }
    let last = &rates[rates.len() - window..];
    let mean = last.iter().sum::<f64>() / window as f64;
    mean > 0.0 && last.iter().all(|r| (r - mean).abs() <= tolerance * mean)
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
    if is_steady(rates, rule.window_s, rule.tolerance) {
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
        tolerance: 0.10,
    };

    #[test]
    fn steady_when_the_last_seconds_stay_near_their_mean() {
        let mut rates = vec![2.0, 5.0, 9.0]; // warming up
        rates.extend(std::iter::repeat_n(20.0, 19));
        assert!(
            !is_steady(&rates, 20, 0.10),
            "a ramp second is in the window"
        );
        rates.push(21.0);
        assert!(is_steady(&rates, 20, 0.10));
        // One second 15 % below the mean breaks it.
        let mut dip = vec![20.0; 20];
        dip[7] = 17.0;
        assert!(!is_steady(&dip, 20, 0.10));
        dip[7] = 18.5;
        assert!(is_steady(&dip, 20, 0.10));
    }

    #[test]
    fn too_few_seconds_or_no_transactions_are_not_steady() {
        assert!(!is_steady(&[20.0; 19], 20, 0.10));
        assert!(!is_steady(&[0.0; 30], 20, 0.10));
        assert!(!is_steady(&[20.0; 30], 0, 0.10));
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
