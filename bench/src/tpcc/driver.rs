//! `bench tpcc run`: terminals running the five transactions (clause 2) in
//! the standard mix (at least 43% Payment, 4% each of Order-Status,
//! Delivery and Stock-Level, the rest New-Order), each terminal bound to a
//! home warehouse. Every finished transaction goes to the terminal's
//! latency log (see `timeline`); the run ends with a JSON summary.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mysql_async::prelude::Queryable;
use mysql_async::Conn;
use serde::Serialize;

use super::{cents, last_name, Rng, Target, CUSTOMERS, C_ID, C_ITEM, C_LAST_RUN, DISTRICTS, ITEMS};
use crate::timeline;

/// The five transactions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    NewOrder,
    Payment,
    OrderStatus,
    Delivery,
    StockLevel,
}

impl Kind {
    /// Name in latency logs and reports.
    pub fn name(self) -> &'static str {
        match self {
            Kind::NewOrder => timeline::NEW_ORDER,
            Kind::Payment => "payment",
            Kind::OrderStatus => "order_status",
            Kind::Delivery => "delivery",
            Kind::StockLevel => "stock_level",
        }
    }

    /// The standard mix: a number in 1..=100 picks the transaction (pure).
    pub fn pick(n: u64) -> Kind {
        match n {
            0..=45 => Kind::NewOrder,
            46..=88 => Kind::Payment,
            89..=92 => Kind::OrderStatus,
            93..=96 => Kind::Delivery,
            _ => Kind::StockLevel,
        }
    }

    /// Keying time and mean think time (clause 5.2.5), seconds.
    fn think(self) -> (f64, f64) {
        match self {
            Kind::NewOrder => (18.0, 12.0),
            Kind::Payment => (3.0, 12.0),
            Kind::OrderStatus => (2.0, 10.0),
            Kind::Delivery => (2.0, 5.0),
            Kind::StockLevel => (2.0, 5.0),
        }
    }
}

/// Settings of a run.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub terminals: u32,
    pub duration: Duration,
    pub think: bool,
    pub latency_dir: Option<PathBuf>,
    /// The terminals end before their next transaction once this file exists.
    pub stop_file: Option<PathBuf>,
    pub seed: u64,
}

/// What one transaction did.
enum Outcome {
    Committed,
    /// New-Order's intended 1% rollback (an unused item number).
    RolledBack,
}

/// Per-transaction summary.
#[derive(Serialize, Default, Clone)]
pub struct KindSummary {
    pub count: u64,
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

/// The run's summary (stdout of `bench tpcc run`).
#[derive(Serialize, Default)]
pub struct Summary {
    pub warehouses: u32,
    pub terminals: u32,
    pub seconds: f64,
    /// New-Order transactions per minute (rolled-back ones included, as the spec counts them).
    pub tpmc: f64,
    pub transactions: u64,
    pub errors: u64,
    /// Deadlocks and lock-wait timeouts that were retried.
    pub retries: u64,
    pub rollbacks: u64,
    pub by_kind: BTreeMap<&'static str, KindSummary>,
    /// First errors seen, for the operator.
    pub error_samples: Vec<String>,
}

struct Terminal {
    conn: Conn,
    rng: Rng,
    w: u32,
    d: u32,
    warehouses: u32,
}

pub(crate) fn is_retryable(e: &mysql_async::Error) -> bool {
    // 1213 deadlock, 1205 lock wait timeout: the spec's drivers retry them.
    matches!(e, mysql_async::Error::Server(s) if s.code == 1213 || s.code == 1205)
}

impl Terminal {
    /// A customer by last name (60%) or by id (40%): (c_w, c_d, by-name key).
    fn customer_key(&mut self) -> CustomerKey {
        if self.rng.range(1, 100) <= 60 {
            CustomerKey::Name(last_name(self.rng.nurand(255, C_LAST_RUN, 0, 999)))
        } else {
            CustomerKey::Id(self.rng.nurand(1023, C_ID, 1, u64::from(CUSTOMERS)))
        }
    }

    async fn customer_id(
        &mut self,
        w: u32,
        d: u32,
        key: CustomerKey,
    ) -> Result<Option<u64>, mysql_async::Error> {
        match key {
            CustomerKey::Id(c) => Ok(Some(c)),
            CustomerKey::Name(name) => {
                let ids: Vec<u64> = self
                    .conn
                    .exec(
                        "SELECT c_id FROM customer WHERE c_w_id = ? AND c_d_id = ? AND c_last = ? ORDER BY c_first",
                        (w, d, name),
                    )
                    .await?;
                // The customer at position ceil(n/2) (clause 2.5.2.2).
                Ok(ids.get(ids.len().saturating_sub(1) / 2).copied())
            }
        }
    }

    fn other_warehouse(&mut self) -> u32 {
        if self.warehouses == 1 {
            return self.w;
        }
        let o = self.rng.range32(1, self.warehouses - 1);
        if o >= self.w {
            o + 1
        } else {
            o
        }
    }

    async fn new_order(&mut self) -> Result<Outcome, mysql_async::Error> {
        let (w, d) = (self.w, self.rng.range32(1, DISTRICTS));
        let c = self.rng.nurand(1023, C_ID, 1, u64::from(CUSTOMERS));
        let n = self.rng.range(5, 15);
        let rollback = self.rng.range(1, 100) == 1;
        let mut lines: Vec<(u64, u32, u64)> = (0..n)
            .map(|i| {
                let item = if rollback && i == n - 1 {
                    u64::from(ITEMS) + 1
                } else {
                    self.rng.nurand(8191, C_ITEM, 1, u64::from(ITEMS))
                };
                let supply = if self.rng.range(1, 100) == 1 {
                    self.other_warehouse()
                } else {
                    w
                };
                (item, supply, self.rng.range(1, 10))
            })
            .collect();
        let all_local = lines.iter().all(|l| l.1 == w);
        // Rows locked in one order everywhere, so that terminals do not
        // deadlock on stock; the unused item stays last.
        let unused = rollback.then(|| lines.pop()).flatten();
        lines.sort_by_key(|l| (l.1, l.0));
        lines.extend(unused);
        let conn = &mut self.conn;
        conn.query_drop("BEGIN").await?;
        let _: Option<String> = conn
            .exec_first("SELECT w_tax FROM warehouse WHERE w_id = ?", (w,))
            .await?;
        let (_d_tax, o_id): (String, u64) = conn
            .exec_first(
                "SELECT d_tax, d_next_o_id FROM district WHERE d_w_id = ? AND d_id = ? FOR UPDATE",
                (w, d),
            )
            .await?
            .ok_or_else(|| missing("district"))?;
        conn.exec_drop(
            "UPDATE district SET d_next_o_id = d_next_o_id + 1 WHERE d_w_id = ? AND d_id = ?",
            (w, d),
        )
        .await?;
        let _: Option<(String, String, String)> = conn
            .exec_first(
                "SELECT c_discount, c_last, c_credit FROM customer WHERE c_w_id = ? AND c_d_id = ? AND c_id = ?",
                (w, d, c),
            )
            .await?;
        conn.exec_drop(
            "INSERT INTO orders (o_id, o_d_id, o_w_id, o_c_id, o_entry_d, o_carrier_id, o_ol_cnt, o_all_local) VALUES (?, ?, ?, ?, NOW(), NULL, ?, ?)",
            (o_id, d, w, c, n, u8::from(all_local)),
        )
        .await?;
        conn.exec_drop(
            "INSERT INTO new_order (no_o_id, no_d_id, no_w_id) VALUES (?, ?, ?)",
            (o_id, d, w),
        )
        .await?;
        for (number, &(item, supply, qty)) in (1u64..).zip(&lines) {
            let price: Option<(u64, String)> = conn
                .exec_first(
                    "SELECT CAST(ROUND(i_price * 100) AS UNSIGNED), i_data FROM item WHERE i_id = ?",
                    (item,),
                )
                .await?;
            let Some((price_cents, _)) = price else {
                // Clause 2.4.2.3: an unused item number rolls the order back.
                conn.query_drop("ROLLBACK").await?;
                return Ok(Outcome::RolledBack);
            };
            let dist_col = format!("s_dist_{d:02}");
            let (s_qty, _s_data, dist): (i64, String, String) = conn
                .exec_first(
                    format!("SELECT s_quantity, s_data, {dist_col} FROM stock WHERE s_i_id = ? AND s_w_id = ? FOR UPDATE"),
                    (item, supply),
                )
                .await?
                .ok_or_else(|| missing("stock"))?;
            let q = i64::try_from(qty).unwrap_or(10);
            let new_qty = if s_qty >= q + 10 {
                s_qty - q
            } else {
                s_qty - q + 91
            };
            conn.exec_drop(
                "UPDATE stock SET s_quantity = ?, s_ytd = s_ytd + ?, s_order_cnt = s_order_cnt + 1, s_remote_cnt = s_remote_cnt + ? WHERE s_i_id = ? AND s_w_id = ?",
                (new_qty, qty, u8::from(supply != w), item, supply),
            )
            .await?;
            conn.exec_drop(
                "INSERT INTO order_line (ol_o_id, ol_d_id, ol_w_id, ol_number, ol_i_id, ol_supply_w_id, ol_delivery_d, ol_quantity, ol_amount, ol_dist_info) VALUES (?, ?, ?, ?, ?, ?, NULL, ?, ?, ?)",
                (o_id, d, w, number, item, supply, qty, cents(price_cents * qty), dist),
            )
            .await?;
        }
        conn.query_drop("COMMIT").await?;
        Ok(Outcome::Committed)
    }

    async fn payment(&mut self) -> Result<Outcome, mysql_async::Error> {
        let (w, d) = (self.w, self.rng.range32(1, DISTRICTS));
        let (c_w, c_d) = if self.warehouses == 1 || self.rng.range(1, 100) <= 85 {
            (w, d)
        } else {
            (self.other_warehouse(), self.rng.range32(1, DISTRICTS))
        };
        let key = self.customer_key();
        let amount = cents(self.rng.range(100, 500_000));
        self.conn.query_drop("BEGIN").await?;
        let Some(c) = self.customer_id(c_w, c_d, key).await? else {
            self.conn.query_drop("ROLLBACK").await?;
            return Ok(Outcome::RolledBack);
        };
        let conn = &mut self.conn;
        conn.exec_drop(
            "UPDATE warehouse SET w_ytd = w_ytd + ? WHERE w_id = ?",
            (&amount, w),
        )
        .await?;
        let _: Option<(String, String)> = conn
            .exec_first("SELECT w_name, w_city FROM warehouse WHERE w_id = ?", (w,))
            .await?;
        conn.exec_drop(
            "UPDATE district SET d_ytd = d_ytd + ? WHERE d_w_id = ? AND d_id = ?",
            (&amount, w, d),
        )
        .await?;
        let (credit,): (String,) = conn
            .exec_first(
                "SELECT c_credit FROM customer WHERE c_w_id = ? AND c_d_id = ? AND c_id = ? FOR UPDATE",
                (c_w, c_d, c),
            )
            .await?
            .ok_or_else(|| missing("customer"))?;
        if credit == "BC" {
            let note = format!("{c} {c_d} {c_w} {d} {w} {amount} ");
            conn.exec_drop(
                "UPDATE customer SET c_balance = c_balance - ?, c_ytd_payment = c_ytd_payment + ?, c_payment_cnt = c_payment_cnt + 1, c_data = LEFT(CONCAT(?, c_data), 500) WHERE c_w_id = ? AND c_d_id = ? AND c_id = ?",
                (&amount, &amount, note, c_w, c_d, c),
            )
            .await?;
        } else {
            conn.exec_drop(
                "UPDATE customer SET c_balance = c_balance - ?, c_ytd_payment = c_ytd_payment + ?, c_payment_cnt = c_payment_cnt + 1 WHERE c_w_id = ? AND c_d_id = ? AND c_id = ?",
                (&amount, &amount, c_w, c_d, c),
            )
            .await?;
        }
        conn.exec_drop(
            "INSERT INTO history (h_c_id, h_c_d_id, h_c_w_id, h_d_id, h_w_id, h_date, h_amount, h_data) VALUES (?, ?, ?, ?, ?, NOW(), ?, 'payment')",
            (c, c_d, c_w, d, w, &amount),
        )
        .await?;
        conn.query_drop("COMMIT").await?;
        Ok(Outcome::Committed)
    }

    async fn order_status(&mut self) -> Result<Outcome, mysql_async::Error> {
        let (w, d) = (self.w, self.rng.range32(1, DISTRICTS));
        let key = self.customer_key();
        self.conn.query_drop("BEGIN").await?;
        if let Some(c) = self.customer_id(w, d, key).await? {
            let conn = &mut self.conn;
            let _: Option<(String, String)> = conn
                .exec_first(
                    "SELECT c_first, c_balance FROM customer WHERE c_w_id = ? AND c_d_id = ? AND c_id = ?",
                    (w, d, c),
                )
                .await?;
            let last: Option<u64> = conn
                .exec_first(
                    "SELECT o_id FROM orders WHERE o_w_id = ? AND o_d_id = ? AND o_c_id = ? ORDER BY o_id DESC LIMIT 1",
                    (w, d, c),
                )
                .await?;
            if let Some(o) = last {
                let _: Vec<(u64, u32, u32, String)> = conn
                    .exec(
                        "SELECT ol_i_id, ol_supply_w_id, ol_quantity, ol_amount FROM order_line WHERE ol_w_id = ? AND ol_d_id = ? AND ol_o_id = ?",
                        (w, d, o),
                    )
                    .await?;
            }
        }
        self.conn.query_drop("COMMIT").await?;
        Ok(Outcome::Committed)
    }

    async fn delivery(&mut self) -> Result<Outcome, mysql_async::Error> {
        let w = self.w;
        let carrier = self.rng.range(1, 10);
        let conn = &mut self.conn;
        conn.query_drop("BEGIN").await?;
        for d in 1..=DISTRICTS {
            let oldest: Option<Option<u64>> = conn
                .exec_first(
                    "SELECT MIN(no_o_id) FROM new_order WHERE no_w_id = ? AND no_d_id = ? FOR UPDATE",
                    (w, d),
                )
                .await?;
            // Clause 2.7.4.2: a district with nothing to deliver is skipped.
            let Some(Some(o)) = oldest else { continue };
            conn.exec_drop(
                "DELETE FROM new_order WHERE no_w_id = ? AND no_d_id = ? AND no_o_id = ?",
                (w, d, o),
            )
            .await?;
            let (c,): (u64,) = conn
                .exec_first(
                    "SELECT o_c_id FROM orders WHERE o_w_id = ? AND o_d_id = ? AND o_id = ?",
                    (w, d, o),
                )
                .await?
                .ok_or_else(|| missing("orders"))?;
            conn.exec_drop(
                "UPDATE orders SET o_carrier_id = ? WHERE o_w_id = ? AND o_d_id = ? AND o_id = ?",
                (carrier, w, d, o),
            )
            .await?;
            conn.exec_drop(
                "UPDATE order_line SET ol_delivery_d = NOW() WHERE ol_w_id = ? AND ol_d_id = ? AND ol_o_id = ?",
                (w, d, o),
            )
            .await?;
            let total: Option<Option<String>> = conn
                .exec_first(
                    "SELECT SUM(ol_amount) FROM order_line WHERE ol_w_id = ? AND ol_d_id = ? AND ol_o_id = ?",
                    (w, d, o),
                )
                .await?;
            conn.exec_drop(
                "UPDATE customer SET c_balance = c_balance + ?, c_delivery_cnt = c_delivery_cnt + 1 WHERE c_w_id = ? AND c_d_id = ? AND c_id = ?",
                (total.flatten().unwrap_or_else(|| "0".into()), w, d, c),
            )
            .await?;
        }
        conn.query_drop("COMMIT").await?;
        Ok(Outcome::Committed)
    }

    async fn stock_level(&mut self) -> Result<Outcome, mysql_async::Error> {
        let (w, d) = (self.w, self.d);
        let threshold = self.rng.range(10, 20);
        let conn = &mut self.conn;
        conn.query_drop("BEGIN").await?;
        let (next,): (u64,) = conn
            .exec_first(
                "SELECT d_next_o_id FROM district WHERE d_w_id = ? AND d_id = ?",
                (w, d),
            )
            .await?
            .ok_or_else(|| missing("district"))?;
        let _: Option<u64> = conn
            .exec_first(
                "SELECT COUNT(DISTINCT s_i_id) FROM order_line JOIN stock ON s_i_id = ol_i_id AND s_w_id = ol_w_id \
                 WHERE ol_w_id = ? AND ol_d_id = ? AND ol_o_id >= ? AND ol_o_id < ? AND s_quantity < ?",
                (w, d, next.saturating_sub(20), next, threshold),
            )
            .await?;
        conn.query_drop("COMMIT").await?;
        Ok(Outcome::Committed)
    }

    async fn run(&mut self, kind: Kind) -> Result<Outcome, mysql_async::Error> {
        let r = match kind {
            Kind::NewOrder => self.new_order().await,
            Kind::Payment => self.payment().await,
            Kind::OrderStatus => self.order_status().await,
            Kind::Delivery => self.delivery().await,
            Kind::StockLevel => self.stock_level().await,
        };
        if r.is_err() {
            // Leave no transaction open behind a failed statement.
            let _ = self.conn.query_drop("ROLLBACK").await;
        }
        r
    }
}

enum CustomerKey {
    Id(u64),
    Name(String),
}

fn missing(table: &str) -> mysql_async::Error {
    mysql_async::Error::Other(format!("a row of {table} the transaction needs is missing").into())
}

/// One terminal's results.
#[derive(Default)]
struct TerminalResult {
    latencies: BTreeMap<Kind, Vec<u64>>,
    errors: u64,
    retries: u64,
    rollbacks: u64,
    error_samples: Vec<String>,
}

async fn terminal(
    target: Target,
    cfg: RunConfig,
    index: u32,
    warehouses: u32,
    until: Instant,
) -> Result<TerminalResult> {
    let conn = Conn::new(target.opts(true))
        .await
        .with_context(|| format!("terminal {index}: connecting to {}", target.describe()))?;
    let mut log = match &cfg.latency_dir {
        Some(dir) => Some(
            std::fs::File::create(dir.join(format!("tpcc.{index}")))
                .context("creating the latency log")?,
        ),
        None => None,
    };
    let mut t = Terminal {
        conn,
        rng: Rng::new(cfg.seed ^ (u64::from(index) << 40) ^ 0x5eed),
        w: index % warehouses + 1,
        d: (index / warehouses) % DISTRICTS + 1,
        warehouses,
    };
    let mut res = TerminalResult::default();
    while Instant::now() < until && !cfg.stop_file.as_ref().is_some_and(|f| f.exists()) {
        let kind = Kind::pick(t.rng.range(1, 100));
        if cfg.think {
            let (keying, think) = kind.think();
            let u = (t.rng.range(1, 1_000_000) as f64) / 1e6;
            let pause = keying + (-u.ln() * think).min(think * 10.0);
            tokio::time::sleep(Duration::from_secs_f64(pause)).await;
        }
        let started = Instant::now();
        let mut attempts = 0;
        let outcome = loop {
            match t.run(kind).await {
                Err(e) if is_retryable(&e) && attempts < 10 => {
                    attempts += 1;
                    res.retries += 1;
                }
                r => break r,
            }
        };
        let latency_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let name = match &outcome {
            Ok(o) => {
                if matches!(o, Outcome::RolledBack) {
                    res.rollbacks += 1;
                }
                res.latencies.entry(kind).or_default().push(latency_us);
                kind.name()
            }
            Err(e) => {
                res.errors += 1;
                if res.error_samples.len() < 5 {
                    res.error_samples.push(format!("{}: {e}", kind.name()));
                }
                timeline::ERROR
            }
        };
        if let Some(f) = log.as_mut() {
            let _ = writeln!(f, "{} {latency_us} {name}", timeline::now_us());
        }
        if let Err(e) = &outcome {
            if matches!(e, mysql_async::Error::Io(_) | mysql_async::Error::Driver(_)) {
                // The connection is gone: open a new one, as a client would.
                tokio::time::sleep(Duration::from_millis(500)).await;
                if let Ok(c) = Conn::new(target.opts(true)).await {
                    t.conn = c;
                }
            }
        }
    }
    let _ = t.conn.disconnect().await;
    Ok(res)
}

fn summarize(mut lat: Vec<u64>) -> KindSummary {
    lat.sort_unstable();
    let ms = |v: Option<u64>| v.map(|us| us as f64 / 1000.0);
    KindSummary {
        count: lat.len() as u64,
        p50_ms: ms(timeline::percentile(&lat, 50)),
        p90_ms: ms(timeline::percentile(&lat, 90)),
        p99_ms: ms(timeline::percentile(&lat, 99)),
        max_ms: ms(lat.last().copied()),
    }
}

/// Runs the terminals for the configured time.
pub async fn run(target: &Target, cfg: &RunConfig) -> Result<Summary> {
    if cfg.terminals == 0 {
        bail!("--terminals must be at least 1");
    }
    let mut conn = match Conn::new(target.opts(true)).await {
        Err(mysql_async::Error::Server(e)) if e.code == 1049 => bail!(
            "database `{}` does not exist on {}: load it first with `bench tpcc load`",
            target.db,
            target.describe()
        ),
        r => r.with_context(|| format!("connecting to {}", target.describe()))?,
    };
    let warehouses: Option<u32> = conn
        .query_first("SELECT COUNT(*) FROM warehouse")
        .await
        .context("counting warehouses (is the TPC-C database loaded? `bench tpcc load`)")?;
    let _ = conn.disconnect().await;
    let warehouses = warehouses
        .filter(|&w| w > 0)
        .context("the warehouse table is empty: load the database first with `bench tpcc load`")?;
    if let Some(dir) = &cfg.latency_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let start = Instant::now();
    let until = start + cfg.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..cfg.terminals {
        tasks.spawn(terminal(target.clone(), cfg.clone(), i, warehouses, until));
    }
    let mut all = TerminalResult::default();
    while let Some(r) = tasks.join_next().await {
        let r = r.context("terminal task")??;
        for (k, v) in r.latencies {
            all.latencies.entry(k).or_default().extend(v);
        }
        all.errors += r.errors;
        all.retries += r.retries;
        all.rollbacks += r.rollbacks;
        all.error_samples.extend(r.error_samples);
    }
    let secs = start.elapsed().as_secs_f64();
    let new_orders = all.latencies.get(&Kind::NewOrder).map_or(0, Vec::len);
    let mut s = Summary {
        warehouses,
        terminals: cfg.terminals,
        seconds: secs,
        tpmc: new_orders as f64 * 60.0 / secs,
        errors: all.errors,
        retries: all.retries,
        rollbacks: all.rollbacks,
        error_samples: all.error_samples,
        ..Summary::default()
    };
    for (k, v) in all.latencies {
        s.transactions += v.len() as u64;
        s.by_kind.insert(k.name(), summarize(v));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_mix() {
        let mut n = BTreeMap::new();
        for i in 1..=100 {
            *n.entry(Kind::pick(i)).or_insert(0) += 1;
        }
        assert_eq!(n[&Kind::NewOrder], 45);
        assert_eq!(n[&Kind::Payment], 43);
        assert_eq!(n[&Kind::OrderStatus], 4);
        assert_eq!(n[&Kind::Delivery], 4);
        assert_eq!(n[&Kind::StockLevel], 4);
    }

    #[test]
    fn retries_only_lock_conflicts() {
        let server = |code| {
            mysql_async::Error::Server(mysql_async::ServerError {
                code,
                message: String::new(),
                state: String::new(),
            })
        };
        assert!(is_retryable(&server(1213)));
        assert!(is_retryable(&server(1205)));
        assert!(!is_retryable(&server(1062)));
        assert!(!is_retryable(&missing("x")));
    }
}
