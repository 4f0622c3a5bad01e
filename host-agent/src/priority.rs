//! When the agent yields the CPU to the guest (`--nice`).

use dbmigrate_core::priority;

/// The agent's two priorities: bulk work beside a running guest, and the
/// priority it was started with, for when the guest waits on the agent.
#[derive(Clone, Copy, Debug)]
pub struct Priority {
    bulk: i32,
    full: i32,
}

impl Priority {
    /// Lowers the agent to `nice` (never above its starting priority) for
    /// the phases where the guest runs beside it. Call before any thread
    /// starts: threads inherit their creator's value.
    pub fn yield_to_guest(nice: i32) -> Self {
        let full = priority::current_nice().unwrap_or(0);
        let p = Self {
            bulk: nice.max(full),
            full,
        };
        if p.bulk != p.full {
            if let Err(e) = priority::set_nice(p.bulk) {
                tracing::warn!(nice = p.bulk, error = %e, "cannot lower the agent's priority; it shares the CPU with the guest");
            }
        }
        p
    }

    /// Back to the starting priority: the guest now waits on the agent
    /// (`why` says how, for the log).
    pub fn restore(&self, why: &str) {
        if self.bulk == self.full {
            return;
        }
        match priority::set_nice(self.full) {
            Ok(()) => tracing::debug!(nice = self.full, why, "agent back to full priority"),
            Err(e) => {
                tracing::warn!(nice = self.full, error = %e, why, "cannot restore the agent's priority (raising it needs CAP_SYS_NICE); the rest of the migration runs at nice {}", self.bulk);
            }
        }
    }
}
