//! Bandwidth limit shared by all data connections (token bucket).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Token bucket in bytes; `None` rate means unlimited. The rate may change
/// while it is used ([`RateLimiter::set_rate`]).
#[derive(Debug)]
pub struct RateLimiter {
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    rate: Option<f64>,
    tokens: f64,
    last: Instant,
    /// Unlimited for good: later [`RateLimiter::set_rate`] calls are ignored.
    closed: bool,
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
            state: Mutex::new(Bucket {
                #[allow(clippy::cast_precision_loss)] // rates are far below 2^52
                rate: bytes_per_sec.map(|r| r as f64),
                tokens: 0.0,
                last: Instant::now(),
                closed: false,
            }),
        }
    }

    /// Changes the rate (None = unlimited) unless the limiter was
    /// [closed](RateLimiter::close); the bucket starts empty.
    pub fn set_rate(&self, bytes_per_sec: Option<u64>) {
        let mut b = self.state.lock().expect("limiter lock is never poisoned");
        if b.closed {
            return;
        }
        #[allow(clippy::cast_precision_loss)]
        let rate = bytes_per_sec.map(|r| r as f64);
        if b.rate != rate {
            b.rate = rate;
            b.tokens = b.tokens.min(0.0);
            b.last = Instant::now();
        }
    }

    /// Makes the limiter unlimited for good, whatever [`RateLimiter::set_rate`]
    /// a controller still running calls afterwards (or [`RateLimiter::reopen`]).
    pub fn close(&self) {
        let mut b = self.state.lock().expect("limiter lock is never poisoned");
        b.rate = None;
        b.closed = true;
    }

    /// Lets [`RateLimiter::set_rate`] act again after [`RateLimiter::close`].
    pub fn reopen(&self) {
        self.state
            .lock()
            .expect("limiter lock is never poisoned")
            .closed = false;
    }

    /// Waits until `bytes` may be sent, then takes them.
    pub async fn acquire(&self, bytes: usize) {
        #[allow(clippy::cast_precision_loss)]
        let want = bytes as f64;
        let wait = {
            let mut b = self.state.lock().expect("limiter lock is never poisoned");
            let Some(rate) = b.rate else { return };
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

/// A blocking pace for threads that read (the destination's storage
/// readers): each read books the next `bytes / rate` of the clock and
/// starts when its slot ends, so the readers together keep to the rate,
/// whatever their number, with no burst at the start.
#[derive(Debug)]
pub struct Pacer {
    rate: f64,
    next: Mutex<Option<Instant>>,
}

/// The end of the slot a read of `bytes` books, which is when it may start
/// and where the next slot begins: the slot lasts `bytes / rate` from the
/// booked clock `next`, or from `now` if the clock is behind it (idle time
/// is not saved up) (pure).
pub fn pace_slot(next: Option<Instant>, now: Instant, bytes: u64, rate: f64) -> Instant {
    let start = next.map_or(now, |n| n.max(now));
    #[allow(clippy::cast_precision_loss)] // read sizes are far below 2^52
    let len = Duration::from_secs_f64(bytes as f64 / rate.max(1.0));
    start + len
}

impl Pacer {
    /// A pace of `bytes_per_sec`, or None for no pace (0 is no pace too).
    pub fn new(bytes_per_sec: Option<u64>) -> Option<Self> {
        #[allow(clippy::cast_precision_loss)]
        bytes_per_sec.filter(|&r| r > 0).map(|r| Self {
            rate: r as f64,
            next: Mutex::new(None),
        })
    }

    /// Books `bytes` and sleeps until their slot ends.
    pub fn take(&self, bytes: u64) {
        let now = Instant::now();
        let ready = {
            let mut next = self.next.lock().expect("pacer lock is never poisoned");
            let ready = pace_slot(*next, now, bytes, self.rate);
            *next = Some(ready);
            ready
        };
        let wait = ready.saturating_duration_since(now);
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_book_consecutive_slots_and_idle_time_is_not_saved() {
        let t = Instant::now();
        let ms = Duration::from_millis;
        // First read: 1 MB at 100 MB/s books the next 10 ms.
        let n = pace_slot(None, t, 1_000_000, 1e8);
        assert_eq!(n, t + ms(10));
        // A second read at once books the 20 ms after that.
        let n = pace_slot(Some(n), t, 2_000_000, 1e8);
        assert_eq!(n, t + ms(30));
        // After a pause, the clock starts again from now: no burst.
        let later = t + ms(100);
        assert_eq!(pace_slot(Some(n), later, 1_000_000, 1e8), later + ms(10));
        assert!(Pacer::new(Some(0)).is_none() && Pacer::new(None).is_none());
    }

    #[test]
    fn pacer_keeps_threads_to_the_rate() {
        let p = std::sync::Arc::new(Pacer::new(Some(10_000_000)).expect("a rate"));
        let t = Instant::now();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let p = p.clone();
                std::thread::spawn(move || {
                    for _ in 0..5 {
                        p.take(250_000);
                    }
                })
            })
            .collect();
        for th in threads {
            th.join().expect("reader thread");
        }
        // 5 MB at 10 MB/s: the last read starts after 0.5 s.
        assert!(
            t.elapsed() >= Duration::from_millis(480),
            "{:?}",
            t.elapsed()
        );
    }

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
