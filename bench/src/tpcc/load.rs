//! `bench tpcc load`: creates the schema and the initial population of
//! clause 4.3.3.1 for a number of warehouses, with multi-row INSERTs over a
//! few connections (one warehouse at a time each).

use anyhow::{bail, Context, Result};
use mysql_async::prelude::Queryable;
use mysql_async::Conn;

use super::{
    cents, last_name, Rng, Target, CUSTOMERS, C_LAST_LOAD, DISTRICTS, FIRST_NEW_ORDER, ITEMS,
    ORDERS,
};

/// The schema, from `sql/`.
pub const SCHEMA: &str = include_str!("../../../sql/tpcc-schema.sql");

/// Rows per INSERT statement.
const BATCH_ROWS: usize = 500;

/// Attempts of a deadlocked unit (a warehouse's stock, a district) before
/// the load gives up.
const ATTEMPTS: u32 = 5;

/// Collects rows into multi-row INSERTs.
struct Batch<'c> {
    conn: &'c mut Conn,
    head: String,
    sql: String,
    rows: usize,
}

impl<'c> Batch<'c> {
    fn new(conn: &'c mut Conn, table: &str, columns: &str) -> Self {
        let head = format!("INSERT INTO {table} ({columns}) VALUES ");
        Self {
            conn,
            sql: head.clone(),
            head,
            rows: 0,
        }
    }

    /// Adds one row, `values` being the SQL inside the parentheses. The
    /// loader's strings are alphanumeric, so they need no escaping.
    async fn row(&mut self, values: &str) -> Result<()> {
        if self.rows > 0 {
            self.sql.push(',');
        }
        self.sql.push('(');
        self.sql.push_str(values);
        self.sql.push(')');
        self.rows += 1;
        if self.rows >= BATCH_ROWS {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        if self.rows > 0 {
            let sql = std::mem::replace(&mut self.sql, self.head.clone());
            self.conn.query_drop(sql).await.context("inserting rows")?;
            self.rows = 0;
        }
        Ok(())
    }
}

/// Splits the schema file into statements (pure).
pub fn statements(schema: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in schema.lines() {
        let l = line.trim();
        if l.starts_with("--") || l.is_empty() {
            continue;
        }
        cur.push_str(line);
        cur.push('\n');
        if l.ends_with(';') {
            out.push(cur.trim().trim_end_matches(';').to_string());
            cur.clear();
        }
    }
    out
}

async fn session(conn: &mut Conn) -> Result<()> {
    conn.query_drop("SET SESSION unique_checks = 0, foreign_key_checks = 0")
        .await?;
    Ok(())
}

/// Creates the database and schema and loads `warehouses` warehouses over
/// `jobs` connections.
pub async fn load(target: &Target, warehouses: u32, jobs: u32, seed: u64) -> Result<()> {
    if warehouses == 0 || warehouses > 10_000 {
        bail!("--warehouses must be 1..=10000, not {warehouses}");
    }
    let mut conn = Conn::new(target.opts(false))
        .await
        .with_context(|| format!("connecting to the server at {}", target.describe()))?;
    let db = &target.db;
    if !db.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        bail!("database name `{db}`: use letters, digits and _");
    }
    conn.query_drop(format!("DROP DATABASE IF EXISTS {db}"))
        .await?;
    conn.query_drop(format!("CREATE DATABASE {db}")).await?;
    conn.query_drop(format!("USE {db}")).await?;
    for s in statements(SCHEMA) {
        conn.query_drop(&s)
            .await
            .with_context(|| format!("creating the schema: {s}"))?;
    }
    session(&mut conn).await?;
    let mut rng = Rng::new(seed);
    load_items(&mut conn, &mut rng).await?;
    conn.disconnect().await?;

    let jobs = jobs.clamp(1, warehouses);
    let mut tasks = tokio::task::JoinSet::new();
    for j in 0..jobs {
        let target = target.clone();
        tasks.spawn(async move {
            let mut conn = Conn::new(target.opts(true)).await?;
            session(&mut conn).await?;
            let mut w = j + 1;
            while w <= warehouses {
                let mut rng = Rng::new(seed ^ (u64::from(w) << 32));
                load_warehouse(&mut conn, &mut rng, w)
                    .await
                    .with_context(|| format!("loading warehouse {w}"))?;
                eprintln!("tpcc load: warehouse {w} of {warehouses}");
                w += jobs;
            }
            conn.disconnect().await?;
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.context("loader task")??;
    }
    Ok(())
}

async fn load_items(conn: &mut Conn, rng: &mut Rng) -> Result<()> {
    conn.query_drop("BEGIN").await?;
    let mut b = Batch::new(conn, "item", "i_id, i_im_id, i_name, i_price, i_data");
    for i in 1..=ITEMS {
        let v = format!(
            "{i},{},'{}',{},'{}'",
            rng.range(1, 10_000),
            rng.astring(14, 24),
            cents(rng.range(100, 10_000)),
            rng.data_with_original()
        );
        b.row(&v).await?;
    }
    b.flush().await?;
    conn.query_drop("COMMIT").await?;
    Ok(())
}

fn address(rng: &mut Rng) -> String {
    format!(
        "'{}','{}','{}','{}','{}'",
        rng.astring(10, 20),
        rng.astring(10, 20),
        rng.astring(10, 20),
        rng.astring(2, 2),
        rng.zip()
    )
}

fn tax(rng: &mut Rng) -> String {
    format!("0.{:04}", rng.range(0, 2000))
}

async fn load_warehouse(conn: &mut Conn, rng: &mut Rng, w: u32) -> Result<()> {
    in_transaction(conn, rng, w, None).await?;
    for d in 1..=DISTRICTS {
        in_transaction(conn, rng, w, Some(d)).await?;
    }
    Ok(())
}

/// Loads warehouse `w`'s row and stock (`district` None) or one of its
/// districts in one transaction. Two loader connections can deadlock in
/// InnoDB (seen with two jobs on a fast machine: error 1213 while loading
/// the second warehouse); the unit is then run again from the same random
/// state, so that the data does not depend on the retries.
async fn in_transaction(
    conn: &mut Conn,
    rng: &mut Rng,
    w: u32,
    district: Option<u32>,
) -> Result<()> {
    let mut attempt = 1;
    loop {
        let start = rng.clone();
        conn.query_drop("BEGIN").await?;
        let unit = match district {
            None => load_warehouse_and_stock(conn, rng, w).await,
            Some(d) => load_district(conn, rng, w, d).await,
        };
        let done = match unit {
            Ok(()) => conn.query_drop("COMMIT").await.map_err(anyhow::Error::from),
            Err(e) => Err(e),
        };
        match done {
            Err(e) if attempt < ATTEMPTS && retryable(&e) => {
                // InnoDB rolled the transaction back; make sure of it.
                let _ = conn.query_drop("ROLLBACK").await;
                *rng = start;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// A deadlock or lock wait timeout anywhere in `e`'s chain.
fn retryable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<mysql_async::Error>()
            .is_some_and(super::driver::is_retryable)
    })
}

async fn load_warehouse_and_stock(conn: &mut Conn, rng: &mut Rng, w: u32) -> Result<()> {
    let v = format!(
        "{w},'{}',{},{},300000.00",
        rng.astring(6, 10),
        address(rng),
        tax(rng)
    );
    conn.query_drop(format!(
        "INSERT INTO warehouse (w_id, w_name, w_street_1, w_street_2, w_city, w_state, w_zip, w_tax, w_ytd) VALUES ({v})"
    ))
    .await?;
    {
        let mut b = Batch::new(
            conn,
            "stock",
            "s_i_id, s_w_id, s_quantity, s_dist_01, s_dist_02, s_dist_03, s_dist_04, s_dist_05, \
             s_dist_06, s_dist_07, s_dist_08, s_dist_09, s_dist_10, s_ytd, s_order_cnt, s_remote_cnt, s_data",
        );
        for i in 1..=ITEMS {
            let dists: Vec<String> = (0..10)
                .map(|_| format!("'{}'", rng.astring(24, 24)))
                .collect();
            let v = format!(
                "{i},{w},{},{},0,0,0,'{}'",
                rng.range(10, 100),
                dists.join(","),
                rng.data_with_original()
            );
            b.row(&v).await?;
        }
        b.flush().await?;
    }
    Ok(())
}

async fn load_district(conn: &mut Conn, rng: &mut Rng, w: u32, d: u32) -> Result<()> {
    let v = format!(
        "{d},{w},'{}',{},{},30000.00,{}",
        rng.astring(6, 10),
        address(rng),
        tax(rng),
        ORDERS + 1
    );
    conn.query_drop(format!(
        "INSERT INTO district (d_id, d_w_id, d_name, d_street_1, d_street_2, d_city, d_state, d_zip, d_tax, d_ytd, d_next_o_id) VALUES ({v})"
    ))
    .await?;
    {
        let mut b = Batch::new(
            conn,
            "customer",
            "c_id, c_d_id, c_w_id, c_first, c_middle, c_last, c_street_1, c_street_2, c_city, c_state, c_zip, \
             c_phone, c_since, c_credit, c_credit_lim, c_discount, c_balance, c_ytd_payment, c_payment_cnt, \
             c_delivery_cnt, c_data",
        );
        for c in 1..=CUSTOMERS {
            let last = if c <= 1000 {
                last_name(u64::from(c - 1))
            } else {
                last_name(rng.nurand(255, C_LAST_LOAD, 0, 999))
            };
            let v = format!(
                "{c},{d},{w},'{}','OE','{last}',{},'{}',NOW(),'{}',50000.00,0.{:04},-10.00,10.00,1,0,'{}'",
                rng.astring(8, 16),
                address(rng),
                rng.nstring(16),
                if rng.range(1, 10) == 1 { "BC" } else { "GC" },
                rng.range(0, 5000),
                rng.astring(300, 500)
            );
            b.row(&v).await?;
        }
        b.flush().await?;
    }
    {
        let mut b = Batch::new(
            conn,
            "history",
            "h_c_id, h_c_d_id, h_c_w_id, h_d_id, h_w_id, h_date, h_amount, h_data",
        );
        for c in 1..=CUSTOMERS {
            let v = format!("{c},{d},{w},{d},{w},NOW(),10.00,'{}'", rng.astring(12, 24));
            b.row(&v).await?;
        }
        b.flush().await?;
    }
    // O_C_ID is a random permutation of the customers.
    let mut customers: Vec<u32> = (1..=CUSTOMERS).collect();
    for i in (1..customers.len()).rev() {
        let j = rng.index(i + 1);
        customers.swap(i, j);
    }
    let mut line_counts = Vec::with_capacity(ORDERS as usize);
    {
        let mut b = Batch::new(
            conn,
            "orders",
            "o_id, o_d_id, o_w_id, o_c_id, o_entry_d, o_carrier_id, o_ol_cnt, o_all_local",
        );
        for o in 1..=ORDERS {
            let carrier = if o < FIRST_NEW_ORDER {
                rng.range(1, 10).to_string()
            } else {
                "NULL".into()
            };
            let lines = rng.range(5, 15);
            line_counts.push(lines);
            let v = format!(
                "{o},{d},{w},{},NOW(),{carrier},{lines},1",
                customers[(o - 1) as usize]
            );
            b.row(&v).await?;
        }
        b.flush().await?;
    }
    {
        let mut b = Batch::new(
            conn,
            "order_line",
            "ol_o_id, ol_d_id, ol_w_id, ol_number, ol_i_id, ol_supply_w_id, ol_delivery_d, ol_quantity, \
             ol_amount, ol_dist_info",
        );
        for (o, &lines) in (1..=ORDERS).zip(&line_counts) {
            let delivered = o < FIRST_NEW_ORDER;
            for n in 1..=lines {
                let v = format!(
                    "{o},{d},{w},{n},{},{w},{},5,{},'{}'",
                    rng.range(1, u64::from(ITEMS)),
                    if delivered { "NOW()" } else { "NULL" },
                    if delivered {
                        "0.00".to_string()
                    } else {
                        cents(rng.range(1, 999_999))
                    },
                    rng.astring(24, 24)
                );
                b.row(&v).await?;
            }
        }
        b.flush().await?;
    }
    let mut b = Batch::new(conn, "new_order", "no_o_id, no_d_id, no_w_id");
    for o in FIRST_NEW_ORDER..=ORDERS {
        b.row(&format!("{o},{d},{w}")).await?;
    }
    b.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_has_nine_tables() {
        let s = statements(SCHEMA);
        assert_eq!(s.len(), 9);
        assert!(s.iter().all(|s| s.starts_with("CREATE TABLE")));
        assert!(s.iter().all(|s| !s.ends_with(';')));
    }

    #[test]
    fn a_deadlock_under_context_is_retried_other_errors_are_not() {
        let server = |code| {
            anyhow::Error::from(mysql_async::Error::Server(mysql_async::ServerError {
                code,
                message: String::new(),
                state: String::new(),
            }))
            .context("inserting rows")
        };
        assert!(retryable(&server(1213)));
        assert!(retryable(&server(1205)));
        assert!(!retryable(&server(1062)));
        assert!(!retryable(&anyhow::anyhow!("connection lost")));
    }
}
