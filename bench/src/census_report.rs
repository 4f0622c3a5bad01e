//! The census table of a report: for the runs that took the guest's memory
//! census (`dbmigrate-precopy-census`), each kind of guest page with what
//! the guest held of it and how the migration sent it (medians over the
//! runs), so that a reader sees what the raw pages are.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde_json::Value;

/// Pages to MiB, one decimal.
fn mib(pages: f64) -> String {
    format!("{:.1}", pages * 4096.0 / f64::from(1 << 20))
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Columns of a census row, as the host agent reports them.
const COLUMNS: [&str; 5] = [
    "pages",
    "raw_pages",
    "compressed_pages",
    "ref_pages",
    "zero_pages",
];

/// The Markdown census table of `report`, or None if no run took one.
pub fn census_table(report: &Value) -> Option<String> {
    let runs: Vec<&Value> = crate::report::runs(report)
        .iter()
        .filter(|r| r["detail"]["census"]["rows"].is_array())
        .collect();
    if runs.is_empty() {
        return None;
    }
    // label -> column -> values over the runs (first-seen order kept).
    let mut order: Vec<String> = Vec::new();
    let mut cells: BTreeMap<String, [Vec<f64>; 5]> = BTreeMap::new();
    for run in &runs {
        for row in run["detail"]["census"]["rows"].as_array()? {
            let label = row["label"].as_str().unwrap_or("?").to_string();
            if !order.contains(&label) {
                order.push(label.clone());
            }
            let c = cells.entry(label).or_default();
            for (i, col) in COLUMNS.iter().enumerate() {
                c[i].push(row[col].as_f64().unwrap_or(0.0));
            }
        }
    }
    let total_raw: f64 = cells
        .values()
        .map(|c| median(c[1].clone()) + median(c[2].clone()))
        .sum();
    let mut md = format!(
        "\nWhat the raw pages are (`--page-census`, {} run(s), medians; MiB; a page sent in several rounds counts each time):\n\n\
         | kind of guest page | in the guest | sent raw | share of raw | sent as references | zero |\n|---|---|---|---|---|---|\n",
        runs.len()
    );
    for label in &order {
        let c = &cells[label];
        let raw = median(c[1].clone()) + median(c[2].clone());
        let share = if total_raw > 0.0 {
            format!("{:.0} %", 100.0 * raw / total_raw)
        } else {
            "-".into()
        };
        let _ = writeln!(
            md,
            "| {label} | {} | {} | {share} | {} | {} |",
            mib(median(c[0].clone())),
            mib(raw),
            mib(median(c[3].clone())),
            mib(median(c[4].clone()))
        );
    }
    let taken: Vec<f64> = runs
        .iter()
        .filter_map(|r| r["detail"]["census"]["taken_ms"].as_f64())
        .collect();
    let _ = writeln!(
        md,
        "\nThe guest agent took {:.0} ms (median) to take the census.",
        median(taken)
    );
    Some(md)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_table_takes_medians_per_kind_and_shares_of_the_raw_bytes() {
        let run = |raw: u64| {
            json!({"method": "dbmigrate-precopy-census", "detail": {"census": {"taken_ms": 300, "rows": [
                {"label": "free", "pages": 256, "raw_pages": raw, "compressed_pages": 0, "ref_pages": 0, "zero_pages": 10},
                {"label": "database server: buffer pool", "pages": 512, "raw_pages": 256, "compressed_pages": 0, "ref_pages": 200, "zero_pages": 0},
            ]}}})
        };
        let report =
            json!({"runs": [run(0), run(256), run(512), {"method": "none", "detail": {}}]});
        let md = census_table(&report).unwrap();
        assert!(md.contains("3 run(s)"), "{md}");
        assert!(
            md.contains("| free | 1.0 | 1.0 | 50 % | 0.0 | 0.0 |"),
            "{md}"
        );
        assert!(
            md.contains("| database server: buffer pool | 2.0 | 1.0 | 50 % | 0.8 | 0.0 |"),
            "{md}"
        );
        assert!(md.contains("took 300 ms"), "{md}");
        assert_eq!(census_table(&json!({"runs": [{"detail": {}}]})), None);
    }
}
