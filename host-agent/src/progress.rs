//! Progress display for an operator at a terminal: rounds, bytes, rate,
//! what is left. Hidden when stderr is not a terminal (logs carry the same).

use dbmigrate_core::source::Decision;
use dbmigrate_core::stats::RoundStats;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A spinner line updated after every round.
pub struct Progress {
    bar: ProgressBar,
    ram_bytes: u64,
}

impl Progress {
    /// Shows progress if `enabled` and stderr is a terminal.
    pub fn new(enabled: bool, ram_bytes: u64) -> Self {
        let bar = if enabled {
            ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        bar.set_message("round 0: first pass over guest RAM");
        Self { bar, ram_bytes }
    }

    /// After a round.
    pub fn round(&self, r: &RoundStats, d: &Decision) {
        let remaining_mib = (r.dirty_after * 4096) >> 20;
        let eta = match d {
            Decision::Continue { expected_downtime }
            | Decision::Stop {
                expected_downtime, ..
            } => expected_downtime.as_millis(),
        };
        self.bar.set_message(format!(
            "round {} done: {} MiB in {} ms at {:.0} Mbit/s | {} MiB dirty left of {} MiB RAM | downtime if stopped now ~{} ms",
            r.round,
            r.bytes >> 20,
            r.elapsed_ms,
            r.rate_mbit,
            remaining_mib,
            self.ram_bytes >> 20,
            eta
        ));
    }

    /// A one-off line.
    pub fn note(&self, msg: &str) {
        self.bar.set_message(msg.to_string());
    }

    /// Ends the display.
    pub fn finish(&self, msg: &str) {
        self.bar.finish_with_message(msg.to_string());
    }
}
