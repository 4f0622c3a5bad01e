//! Bandwidth limit shared by all data connections (token bucket).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Token bucket in bytes; `None` rate means unlimited.
#[derive(Debug)]
pub struct RateLimiter {
    rate: Option<f64>,
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// How long to wait before `want` bytes may go, given the bucket state (pure).
pub fn wait_for(tokens: f64, want: f64, rate: f64) -> Duration {
    if tokens >= want || rate <= 0.0 {
        Duration::ZERO
    } else {
        Duration::from_secs_f64((want - tokens) / rate)
    }
}

impl RateLimiter {
    /// A limiter of `bytes_per_sec` (None = unlimited). Bursts up to 50 ms worth.
    pub fn new(bytes_per_sec: Option<u64>) -> Self {
        Self {
            #[allow(clippy::cast_precision_loss)] // rates are far below 2^52
            rate: bytes_per_sec.map(|r| r as f64),
            state: Mutex::new(Bucket {
                tokens: 0.0,
                last: Instant::now(),
            }),
        }
    }

    /// Waits until `bytes` may be sent, then takes them.
    pub async fn acquire(&self, bytes: usize) {
        let Some(rate) = self.rate else { return };
        #[allow(clippy::cast_precision_loss)]
        let want = bytes as f64;
        let wait = {
            let mut b = self.state.lock().expect("limiter lock is never poisoned");
            let now = Instant::now();
            let burst = rate * 0.05;
            b.tokens =
                (b.tokens + now.duration_since(b.last).as_secs_f64() * rate).min(burst.max(want));
            b.last = now;
            let w = wait_for(b.tokens, want, rate);
            // Take the tokens now (possibly going negative) so concurrent
            // callers queue up behind us instead of all waking together.
            b.tokens -= want;
            w
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_is_proportional_to_the_missing_tokens() {
        assert_eq!(wait_for(100.0, 50.0, 10.0), Duration::ZERO);
        assert_eq!(wait_for(0.0, 1000.0, 1000.0), Duration::from_secs(1));
        assert_eq!(wait_for(0.0, 1000.0, 0.0), Duration::ZERO);
    }

    #[tokio::test]
    async fn limits_the_long_run_rate() {
        let l = RateLimiter::new(Some(10 << 20));
        let t = Instant::now();
        for _ in 0..20 {
            l.acquire(256 << 10).await;
        }
        // 5 MiB at 10 MiB/s: at least ~0.45 s (the initial burst is 50 ms).
        assert!(
            t.elapsed() >= Duration::from_millis(400),
            "{:?}",
            t.elapsed()
        );
    }
}
