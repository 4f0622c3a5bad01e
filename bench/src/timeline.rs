//! Per-transaction latency logs and the per-second timeline made of them.
//!
//! Both workloads write one line per finished transaction,
//! `<end, µs since the Unix epoch> <latency µs> <kind>`: sysbench through
//! the Lua wrapper in `bench/lua/` (kind `rw`), the TPC-C driver itself
//! (kinds `new_order`, `payment`, `order_status`, `delivery`,
//! `stock_level`; `error` for a transaction that failed). Wall-clock end
//! times let the bench line them up with the migration's own events.

use serde::{Deserialize, Serialize};

/// One finished transaction.
#[derive(Clone, Debug, PartialEq)]
pub struct Txn {
    /// End, µs since the Unix epoch.
    pub end_us: u64,
    /// Latency, µs.
    pub latency_us: u64,
    /// Transaction kind (`error` for a failed one).
    pub kind: String,
}

/// The error kind.
pub const ERROR: &str = "error";
/// TPC-C's new-order kind, counted for tpmC.
pub const NEW_ORDER: &str = "new_order";

/// Parses a latency log; malformed lines (a line cut by a killed writer) are skipped (pure).
pub fn parse_log(text: &str) -> Vec<Txn> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let end_us = w.next()?.parse().ok()?;
            let latency_us = w.next()?.parse().ok()?;
            let kind = w.next()?.to_string();
            w.next().is_none().then_some(Txn {
                end_us,
                latency_us,
                kind,
            })
        })
        .collect()
}

/// One second of the timeline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Second {
    /// Seconds since the workload started (this second ends at `t`).
    pub t: u32,
    /// Transactions finished in this second.
    pub tps: f64,
    /// 90th / 99th percentile latency of those, ms (null in a second with none).
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Failed transactions.
    pub errors: u64,
    /// New-order transactions per minute at this second's rate (TPC-C only).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tpmc: Option<f64>,
}

/// Nearest-rank percentile `p` (percent, 0..=100) of `sorted` (pure).
pub fn percentile(sorted: &[u64], p: u64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let n = sorted.len() as u64;
    let rank = (p.min(100) * n).div_ceil(100).clamp(1, n);
    sorted.get(usize::try_from(rank - 1).ok()?).copied()
}

fn ms(us: Option<u64>) -> Option<f64> {
    us.map(|v| (v as f64 / 1000.0 * 100.0).round() / 100.0)
}

/// Seconds `1..=secs` after `start_us` (pure). A transaction belongs to the
/// second its end falls in; tpmC is filled when `tpcc`.
pub fn seconds(txns: &[Txn], start_us: u64, secs: u32, tpcc: bool) -> Vec<Second> {
    let mut buckets: Vec<(Vec<u64>, u64, u64)> = vec![(Vec::new(), 0, 0); secs as usize];
    for t in txns {
        let Some(off) = t.end_us.checked_sub(start_us) else {
            continue;
        };
        let Some(b) = buckets.get_mut((off / 1_000_000) as usize) else {
            continue;
        };
        if t.kind == ERROR {
            b.2 += 1;
        } else {
            b.0.push(t.latency_us);
            b.1 += u64::from(t.kind == NEW_ORDER);
        }
    }
    buckets
        .into_iter()
        .enumerate()
        .map(|(i, (mut lat, new_orders, errors))| {
            lat.sort_unstable();
            Second {
                t: u32::try_from(i + 1).unwrap_or(u32::MAX),
                tps: lat.len() as f64,
                p90_ms: ms(percentile(&lat, 90)),
                p99_ms: ms(percentile(&lat, 99)),
                errors,
                tpmc: tpcc.then_some(new_orders as f64 * 60.0),
            }
        })
        .collect()
}

/// The workload over a window of time.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WindowStats {
    /// Transactions per second.
    pub tps: Option<f64>,
    /// Latency percentiles over every transaction in the window, ms.
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// New-order transactions per minute.
    pub tpmc: Option<f64>,
    /// Failed transactions.
    pub errors: u64,
}

/// Statistics of the transactions that ended in `[from_us, to_us)` (pure).
pub fn window(txns: &[Txn], from_us: u64, to_us: u64) -> WindowStats {
    if to_us <= from_us {
        return WindowStats::default();
    }
    let mut lat = Vec::new();
    let (mut new_orders, mut errors) = (0u64, 0u64);
    for t in txns
        .iter()
        .filter(|t| t.end_us >= from_us && t.end_us < to_us)
    {
        if t.kind == ERROR {
            errors += 1;
        } else {
            lat.push(t.latency_us);
            new_orders += u64::from(t.kind == NEW_ORDER);
        }
    }
    lat.sort_unstable();
    let secs = (to_us - from_us) as f64 / 1e6;
    let tpcc = txns.iter().any(|t| t.kind == NEW_ORDER);
    WindowStats {
        tps: Some(lat.len() as f64 / secs),
        p90_ms: ms(percentile(&lat, 90)),
        p99_ms: ms(percentile(&lat, 99)),
        tpmc: tpcc.then_some(new_orders as f64 * 60.0 / secs),
        errors,
    }
}

/// Reads every latency log in `dir` (one per client thread).
pub fn read_dir(dir: &std::path::Path) -> std::io::Result<Vec<Txn>> {
    let mut all = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_file() {
            all.extend(parse_log(&std::fs::read_to_string(&p)?));
        }
    }
    all.sort_by_key(|t| t.end_us);
    Ok(all)
}

/// Now, µs since the Unix epoch.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn txn(end_us: u64, latency_us: u64, kind: &str) -> Txn {
        Txn {
            end_us,
            latency_us,
            kind: kind.into(),
        }
    }

    #[test]
    fn log_lines() {
        let t = parse_log("100 20 rw\n\n150 30 new_order\nbad line\n160 4\n170 5 rw extra\n");
        assert_eq!(t, vec![txn(100, 20, "rw"), txn(150, 30, "new_order")]);
    }

    #[test]
    fn percentiles_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 90), Some(90));
        assert_eq!(percentile(&v, 99), Some(99));
        assert_eq!(percentile(&v, 100), Some(100));
        assert_eq!(percentile(&[7], 99), Some(7));
        assert_eq!(percentile(&[], 99), None);
        assert_eq!(percentile(&[1, 2], 0), Some(1));
    }

    #[test]
    fn seconds_bucket_by_end_time() {
        let s0 = 1_000_000_000;
        let txns = vec![
            txn(s0 + 100, 2_000, NEW_ORDER),
            txn(s0 + 900_000, 4_000, "payment"),
            txn(s0 + 1_000_000, 10_000, NEW_ORDER),
            txn(s0 + 1_500_000, 0, ERROR),
            txn(s0 - 1, 1, "payment"),
            txn(s0 + 5_000_000, 1, "payment"),
        ];
        let s = seconds(&txns, s0, 3, true);
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].t, 1);
        assert_eq!(s[0].tps, 2.0);
        assert_eq!(s[0].p90_ms, Some(4.0));
        assert_eq!(s[0].tpmc, Some(60.0));
        assert_eq!(s[1].tps, 1.0);
        assert_eq!(s[1].errors, 1);
        assert_eq!(s[1].p99_ms, Some(10.0));
        assert_eq!(s[2].tps, 0.0);
        assert_eq!(s[2].p99_ms, None);
        assert_eq!(seconds(&txns, s0, 1, false)[0].tpmc, None);
    }

    #[test]
    fn window_rates_and_percentiles() {
        let txns: Vec<Txn> = (0..20)
            .map(|i| {
                txn(
                    i * 100_000,
                    (i + 1) * 1000,
                    if i % 2 == 0 { NEW_ORDER } else { "payment" },
                )
            })
            .chain([txn(500_000, 0, ERROR)])
            .collect();
        let w = window(&txns, 0, 1_000_000);
        assert_eq!(w.tps, Some(10.0));
        assert_eq!(w.p90_ms, Some(9.0));
        assert_eq!(w.p99_ms, Some(10.0));
        assert_eq!(w.tpmc, Some(300.0));
        assert_eq!(w.errors, 1);
        assert_eq!(window(&txns, 5, 5), WindowStats::default());
    }
}
