//! The guest's cost in `bench report` and `compare-db`'s terminal: each
//! run's work in the scenario's window ([`crate::guest_cost`]), a summary
//! per method over its repetitions (median and min-max), and the
//! cumulative-work plot (`<scenario>-work.svg`: each run's transactions
//! since its migration's start beside the control's). Reports are read as
//! plain JSON: one without these figures has no such table or plot.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use plotters::prelude::*;
use serde_json::Value;

use crate::guest_cost::{self, spread, Spread, CONTROL};
use crate::report::{colour, plot_err, runs};

fn cell_f(v: &Value) -> String {
    v.as_f64().map_or("-".into(), |x| format!("{x:.1}"))
}

fn cell_u(v: &Value) -> String {
    v.as_u64().map_or("-".into(), |x| x.to_string())
}

/// Whether the report has the guest's cost (a window was worked out).
fn has_cost(report: &Value) -> bool {
    runs(report)
        .iter()
        .any(|r| r["workload"]["window_s"].is_number())
}

/// One line per run: warm-up, work done and lost in the window, latency
/// and the longest stall there (pure; None for a report without them).
pub fn cost_table(report: &Value) -> Option<String> {
    if !has_cost(report) {
        return None;
    }
    let window = runs(report)
        .iter()
        .find_map(|r| r["workload"]["window_s"].as_u64())?;
    let against = if runs(report).iter().any(|r| r["method"] == CONTROL) {
        "against the control run (`none`, no migration)"
    } else {
        "no control run (`none`), so no work lost"
    };
    let mut s = format!(
        "Guest's cost in the {window} s window from the migration's start (the slowest migration + 10 s), {against}:\n\n"
    );
    s += "| method | repeat | warm-up (s) | work done | work lost | lost % | p90 / p99 in window (ms) | longest stall (s) |\n";
    s += "|---|---|---|---|---|---|---|---|\n";
    for r in runs(report) {
        let w = &r["workload"];
        let warm = match (w["warmup_s"].as_u64(), w["warmup_steady"].as_bool()) {
            (Some(s), Some(false)) => format!("{s} (not steady)"),
            (Some(s), _) => s.to_string(),
            _ => "-".into(),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {warm} | {} | {} | {} | {} / {} | {} |",
            r["method"].as_str().unwrap_or("?"),
            cell_u(&r["repeat"]),
            cell_u(&w["work_done"]),
            cell_f(&w["work_lost"]),
            cell_f(&w["work_lost_pct"]),
            cell_f(&w["p90_ms_window"]),
            cell_f(&w["p99_ms_window"]),
            cell_u(&w["longest_stall_s"]),
        );
    }
    Some(s)
}

/// The spread of one figure over a method's runs (`scale` divides it),
/// as "median (min–max)", or "median" when they are all the same (pure).
fn spread_cell(values: &[f64], scale: f64, digits: usize) -> String {
    let v: Vec<f64> = values.iter().map(|x| x / scale).collect();
    match spread(&v) {
        None => "-".into(),
        Some(Spread { median, min, max }) if v.len() == 1 || min == max => {
            format!("{median:.digits$}")
        }
        Some(Spread { median, min, max }) => {
            format!("{median:.digits$} ({min:.digits$}–{max:.digits$})")
        }
    }
}

/// The methods of a report in their first run's order, each with its runs (pure).
fn by_method(report: &Value) -> Vec<(String, Vec<&Value>)> {
    let mut out: Vec<(String, Vec<&Value>)> = Vec::new();
    for r in runs(report) {
        let m = r["method"].as_str().unwrap_or("?").to_string();
        match out.iter_mut().find(|(name, _)| *name == m) {
            Some((_, v)) => v.push(r),
            None => out.push((m, vec![r])),
        }
    }
    out
}

/// Per method over its repetitions: median and min-max of total time,
/// downtime, link bytes and work lost, over the completed runs (work lost
/// over every run with a window) (pure; None for a report whose runs
/// carry no `repeat`, as before repetitions existed).
pub fn method_summary(report: &Value) -> Option<String> {
    if !runs(report).iter().any(|r| r["repeat"].is_number()) {
        return None;
    }
    let mut s = String::from("Per method, median (min–max) over its runs; times and bytes over the completed ones:\n\n| method | runs | completed | total (s) | downtime (ms) | link MB | work lost | work lost % |\n|---|---|---|---|---|---|---|---|\n");
    for (m, rs) in by_method(report) {
        let done: Vec<&&Value> = rs
            .iter()
            .filter(|r| r["completed"].as_bool() == Some(true))
            .collect();
        let fig = |runs: &[&&Value], f: &dyn Fn(&Value) -> Option<f64>| -> Vec<f64> {
            runs.iter().filter_map(|r| f(r)).collect()
        };
        let all: Vec<&&Value> = rs.iter().collect();
        let migrates = m != CONTROL && rs.iter().all(|r| r["detail"]["reference"].is_null());
        let _ = writeln!(
            s,
            "| {m} | {} | {} | {} | {} | {} | {} | {} |",
            rs.len(),
            done.len(),
            if migrates {
                spread_cell(&fig(&done, &|r| r["total_ms"].as_f64()), 1000.0, 1)
            } else {
                "no migration".into()
            },
            spread_cell(&fig(&done, &|r| r["downtime_ms"].as_f64()), 1.0, 0),
            // Whole MB, as the run table shows them.
            spread_cell(
                &fig(&done, &|r| r["link_bytes"]
                    .as_u64()
                    .map(|b| (b / 1_000_000) as f64)),
                1.0,
                0
            ),
            spread_cell(&fig(&all, &|r| r["workload"]["work_lost"].as_f64()), 1.0, 0),
            spread_cell(
                &fig(&all, &|r| r["workload"]["work_lost_pct"].as_f64()),
                1.0,
                1
            ),
        );
    }
    Some(s)
}

/// A run's transactions since the window's start, second by second:
/// (seconds since the migration's start at each second's end, cumulative
/// transactions), up to the window's end (pure; None without a timeline
/// or a window).
pub fn cumulative(run: &Value) -> Option<Vec<(f64, f64)>> {
    let tl = &run["timeline"];
    let start = tl["migration_start_s"].as_f64()?;
    let window = run["workload"]["window_s"].as_u64()?;
    let range = guest_cost::window_buckets(start, window);
    let seconds = tl["seconds"].as_array()?;
    let mut total = 0.0;
    let mut pts = vec![(range.start as f64 - start, 0.0)];
    for s in seconds.get(range.start..range.end.min(seconds.len()))? {
        total += s["tps"].as_f64().unwrap_or(0.0);
        pts.push((s["t"].as_f64()? - start, total));
    }
    Some(pts)
}

/// One line of the work plot: method, colour, points.
type Line = (String, RGBColor, Vec<(f64, f64)>);

/// The cumulative-work plot: every run's line, coloured by method, the
/// control runs in black; false when no run has a window.
pub fn work_svg(report: &Value, path: &Path) -> Result<bool> {
    let methods = by_method(report);
    let mut lines: Vec<Line> = Vec::new();
    for (i, (m, rs)) in methods.iter().enumerate() {
        let c = if m == CONTROL { BLACK } else { colour(i) };
        for r in rs {
            if let Some(pts) = cumulative(r) {
                lines.push((m.clone(), c, pts));
            }
        }
    }
    if lines.is_empty() {
        return Ok(false);
    }
    let scenario = report["scenario"].as_str().unwrap_or("?");
    let x_max = lines
        .iter()
        .flat_map(|l| l.2.last().map(|p| p.0))
        .fold(1.0f64, f64::max);
    let y_max = lines
        .iter()
        .flat_map(|l| l.2.last().map(|p| p.1))
        .fold(1.0f64, f64::max)
        * 1.08;
    let root = SVGBackend::new(path, (1000, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{scenario}: work done since the migration started (control `none` in black)"),
            ("sans-serif", 17),
        )
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .light_line_style(TRANSPARENT)
        .x_desc("seconds since the migration started (the scenario's window)")
        .y_desc("transactions since then")
        .draw()
        .map_err(plot_err)?;
    let mut labelled: Vec<String> = Vec::new();
    for (m, c, pts) in &lines {
        let c = *c;
        let series = chart
            .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))
            .map_err(plot_err)?;
        if !labelled.contains(m) {
            labelled.push(m.clone());
            series.label(m.clone()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3))
            });
        }
    }
    crate::report::draw_legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
    root.present().map_err(plot_err)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(method: &str, repeat: u32, total_ms: Option<u64>, lost: f64, tps: &[f64]) -> Value {
        let seconds: Vec<Value> = tps
            .iter()
            .enumerate()
            .map(|(i, t)| json!({"t": i + 1, "tps": t}))
            .collect();
        json!({
            "method": method, "repeat": repeat, "completed": method == CONTROL || total_ms.is_some(),
            "total_ms": total_ms, "downtime_ms": total_ms.map(|_| 200), "link_bytes": 1_000_000_000u64,
            "detail": if method == CONTROL { json!({"reference": "control"}) } else { json!({}) },
            "workload": {"window_s": 3, "work_done": 30, "work_lost": lost, "work_lost_pct": lost,
                         "warmup_s": 25, "warmup_steady": repeat == 0},
            "timeline": {"migration_start_s": 2.0, "seconds": seconds}
        })
    }

    fn sample() -> Value {
        json!({"scenario": "s", "runs": [
            run(CONTROL, 0, None, 0.0, &[10.0; 6]),
            run("qemu-precopy", 0, Some(4_000), 12.0, &[10.0, 10.0, 0.0, 5.0, 10.0, 10.0]),
            run(CONTROL, 1, None, 0.0, &[10.0; 6]),
            run("qemu-precopy", 1, Some(6_000), 20.0, &[10.0; 6]),
            run("qemu-precopy", 2, None, 30.0, &[10.0; 6]),
        ]})
    }

    #[test]
    fn the_summary_takes_medians_and_ranges_per_method() {
        let s = method_summary(&sample()).unwrap();
        assert!(
            s.contains("| qemu-precopy | 3 | 2 | 5.0 (4.0–6.0) | 200 | 1000 | 20 (12–30) | 20.0 (12.0–30.0) |"),
            "{s}"
        );
        assert!(
            s.contains("| none | 2 | 2 | no migration | - | 1000 | 0 | 0.0 |"),
            "{s}"
        );
        let old = json!({"runs": [{"method": "qemu-precopy", "total_ms": 1}]});
        assert_eq!(
            method_summary(&old),
            None,
            "a report from before repetitions"
        );
        assert_eq!(cost_table(&old), None);
    }

    #[test]
    fn the_cost_table_has_a_line_per_run() {
        let t = cost_table(&sample()).unwrap();
        assert!(t.contains("3 s window"));
        assert!(t.contains("| qemu-precopy | 1 | 25 (not steady) | 30 | 20.0 | 20.0 | - / - | - |"));
        assert!(t.contains("| none | 0 | 25 | 30 | 0.0 | 0.0 |"));
    }

    #[test]
    fn cumulative_work_counts_from_the_window_start() {
        let r = &sample()["runs"][1];
        // Window buckets 2..5 (t = 3, 4, 5): 0, 5, 10 transactions.
        assert_eq!(
            cumulative(r).unwrap(),
            vec![(0.0, 0.0), (1.0, 0.0), (2.0, 5.0), (3.0, 15.0)]
        );
        assert_eq!(cumulative(&json!({"method": "x"})), None);
    }
}
