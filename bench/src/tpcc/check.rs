//! `bench tpcc check`: the consistency conditions of clause 3.3.2, as
//! written in `sql/tpcc-consistency.sql`.

use anyhow::{Context, Result};
use mysql_async::prelude::Queryable;
use mysql_async::Conn;
use serde::Serialize;

use super::Target;

/// The conditions, from `sql/`.
pub const CONDITIONS: &str = include_str!("../../../sql/tpcc-consistency.sql");

/// Conditions the spec requires after a run; the others scan every order.
pub const REQUIRED: u32 = 4;

/// `(number, name, query)` of every condition in `sql` (pure).
pub fn conditions(sql: &str) -> Vec<(u32, String, String)> {
    let mut out: Vec<(u32, String, String)> = Vec::new();
    for line in sql.lines() {
        if let Some(rest) = line.trim().strip_prefix("-- condition ") {
            let (n, name) = rest.split_once(':').unwrap_or((rest, ""));
            if let Ok(n) = n.trim().parse() {
                out.push((n, name.trim().to_string(), String::new()));
            }
        } else if !line.trim_start().starts_with("--") {
            if let Some(last) = out.last_mut() {
                last.2.push_str(line);
                last.2.push('\n');
            }
        }
    }
    for c in &mut out {
        c.2 = c.2.trim().trim_end_matches(';').to_string();
    }
    out
}

/// One condition's result.
#[derive(Serialize, Clone, Debug)]
pub struct Verdict {
    pub condition: u32,
    pub name: String,
    /// Rows (warehouses, districts, orders...) that break it.
    pub violations: u64,
}

/// Checks conditions 1..=4, or all with `full`.
pub async fn check(target: &Target, full: bool) -> Result<Vec<Verdict>> {
    let mut conn = Conn::new(target.opts(true))
        .await
        .with_context(|| format!("connecting to {}", target.describe()))?;
    let mut out = Vec::new();
    for (n, name, query) in conditions(CONDITIONS) {
        if !full && n > REQUIRED {
            continue;
        }
        let v: Option<u64> = conn
            .query_first(&query)
            .await
            .with_context(|| format!("checking consistency condition {n} ({name})"))?;
        out.push(Verdict {
            condition: n,
            name,
            violations: v.unwrap_or(0),
        });
    }
    let _ = conn.disconnect().await;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nine_conditions_in_order() {
        let c = conditions(CONDITIONS);
        assert_eq!(c.len(), 9);
        for (i, (n, name, q)) in c.iter().enumerate() {
            assert_eq!(*n as usize, i + 1);
            assert!(!name.is_empty());
            assert!(q.starts_with("SELECT COUNT(*)"), "{q}");
            assert!(!q.contains(';'));
        }
    }
}
