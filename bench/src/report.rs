//! `bench report`: turns benchmark reports (`shared/bench-report.md`
//! format) into SVG plots and a Markdown summary.
//!
//! Per report: bars of total time and downtime per method
//! (`<scenario>-times.svg`) and, for database scenarios, the workload's
//! throughput and p99 latency second by second with each method's
//! migration start, switchover and end marked (`<scenario>-timeline.svg`).
//! Database scenarios with the guest's cost also get a table of it, a
//! summary per method over the repetitions, and the cumulative work since
//! the migration's start (`<scenario>-work.svg`, [`crate::cost_report`]).
//! Reports are read as plain JSON so that older files without timelines
//! still make their bars and table.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde_json::Value;

/// Line colours, one per method in report order.
const COLOURS: [RGBColor; 6] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
];

pub(crate) fn colour(i: usize) -> RGBColor {
    COLOURS[i % COLOURS.len()]
}

/// What a run's workload rate is called and where it is: TPC-C reports
/// tpmC, the others transactions per second (pure).
fn rate_of(report: &Value) -> (&'static str, &'static str, &'static str) {
    let tpcc = runs(report)
        .iter()
        .any(|r| r["workload"]["tpmc_during"].is_number());
    if tpcc {
        ("tpmC", "tpmc_before", "tpmc_during")
    } else {
        ("tps", "tps_before", "tps_during")
    }
}

pub(crate) fn runs(report: &Value) -> &[Value] {
    report["runs"].as_array().map_or(&[], Vec::as_slice)
}

/// The runs that migrated: a reference run (`detail.reference`, e.g.
/// `compare-db`'s storage reads) has no migration time to compare (pure).
fn migrations(report: &Value) -> Vec<&Value> {
    runs(report)
        .iter()
        .filter(|r| r["detail"]["reference"].is_null())
        .collect()
}

fn cell_f(v: &Value) -> String {
    v.as_f64().map_or("-".into(), |x| format!("{x:.1}"))
}

fn cell_u(v: &Value) -> String {
    v.as_u64().map_or("-".into(), |x| x.to_string())
}

/// The Markdown table of one report (pure).
pub fn markdown_table(report: &Value) -> String {
    let (rate, before, during) = rate_of(report);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| method | completed | total (ms) | downtime (ms) | link MB | storage MB | {rate} before | {rate} during | p90 / p99 during (ms) | client errors | checked after |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|");
    for r in runs(report) {
        let w = &r["workload"];
        let after = match r["guest_verified_after"].as_bool() {
            Some(true) => "OK",
            Some(false) => "FAILED",
            None => "n/a",
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} / {} | {} | {} |",
            r["method"].as_str().unwrap_or("?"),
            r["completed"].as_bool().unwrap_or(false),
            match r["detail"]["read_ms"].as_u64() {
                Some(ms) if !r["detail"]["reference"].is_null() =>
                    format!("no migration (read {ms})"),
                _ if r["method"] == crate::guest_cost::CONTROL => "no migration (control)".into(),
                _ => cell_u(&r["total_ms"]),
            },
            cell_u(&r["downtime_ms"]),
            r["link_bytes"].as_u64().unwrap_or(0) / 1_000_000,
            r["storage_bytes"].as_u64().unwrap_or(0) / 1_000_000,
            cell_f(&w[before]),
            cell_f(&w[during]),
            cell_f(&w["p90_ms_during"]),
            cell_f(&w["p99_ms_during"]),
            cell_u(&w["errors"]),
            after
        );
    }
    s
}

/// The series' legend of `chart`, boxed, at `at` (every plot's style).
pub(crate) fn draw_legend<'a, DB, CT>(
    chart: &mut ChartContext<'a, DB, CT>,
    at: SeriesLabelPosition,
) -> Result<()>
where
    DB: DrawingBackend + 'a,
    CT: plotters::coord::CoordTranslate,
{
    chart
        .configure_series_labels()
        .position(at)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .label_font(("sans-serif", 12))
        .draw()
        .map_err(plot_err)
}

pub(crate) fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing: {e:?}")
}

/// Bars of total time (s) and downtime (ms) per method.
fn times_svg(report: &Value, path: &Path) -> Result<()> {
    let runs = migrations(report);
    let scenario = report["scenario"].as_str().unwrap_or("?");
    let names: Vec<String> = runs
        .iter()
        .map(|r| r["method"].as_str().unwrap_or("?").to_string())
        .collect();
    let root = SVGBackend::new(path, (1200, 400)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let root = root
        .titled(&format!("{scenario}: migration time"), ("sans-serif", 20))
        .map_err(plot_err)?;
    let (left, right) = root.split_horizontally(600);
    for (area, key, scale, title) in [
        (&left, "total_ms", 1000.0, "total time (s)"),
        (&right, "downtime_ms", 1.0, "downtime (ms)"),
    ] {
        let values: Vec<Option<f64>> = runs
            .iter()
            .map(|r| r[key].as_f64().map(|v| v / scale))
            .collect();
        let top = values.iter().flatten().fold(0.0f64, |m, &v| m.max(v)) * 1.15 + 1e-9;
        let n = runs.len().max(1);
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 15))
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..top)
            .map_err(plot_err)?;
        // Labels only at the bar centres (whole numbers on the axis).
        let label = |x: &f64| {
            names
                .iter()
                .enumerate()
                .find(|(i, _)| (x - *i as f64).abs() < 0.01)
                .map(|(_, n)| n.clone())
                .unwrap_or_default()
        };
        chart
            .configure_mesh()
            .disable_x_mesh()
            .light_line_style(TRANSPARENT)
            .x_labels(n * 2 + 1)
            .x_label_formatter(&label)
            .x_label_style(("sans-serif", 12))
            .draw()
            .map_err(plot_err)?;
        for (i, v) in values.iter().enumerate() {
            let x = i as f64;
            match v {
                Some(v) => {
                    chart
                        .draw_series(std::iter::once(Rectangle::new(
                            [(x - 0.35, 0.0), (x + 0.35, *v)],
                            colour(i).filled(),
                        )))
                        .map_err(plot_err)?;
                    chart
                        .draw_series(std::iter::once(Text::new(
                            if scale > 1.0 {
                                format!("{v:.1}")
                            } else {
                                format!("{v:.0}")
                            },
                            (x, *v + top * 0.01),
                            TextStyle::from(("sans-serif", 13).into_font())
                                .pos(Pos::new(HPos::Center, VPos::Bottom)),
                        )))
                        .map_err(plot_err)?;
                }
                None => {
                    chart
                        .draw_series(std::iter::once(Text::new(
                            "did not complete",
                            (x, top * 0.05),
                            TextStyle::from(("sans-serif", 12).into_font())
                                .pos(Pos::new(HPos::Center, VPos::Bottom)),
                        )))
                        .map_err(plot_err)?;
                }
            }
        }
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

/// A run's timeline, seconds shifted so that its migration starts at 0:
/// (rate points, p99 points, switchover, end).
type Shifted = (Vec<(f64, f64)>, Vec<(f64, f64)>, Option<f64>, Option<f64>);

/// Timeline points of a run relative to its migration start (pure). TPC-C
/// rates are tpmC per second.
pub fn shifted(run: &Value, tpcc: bool) -> Option<Shifted> {
    let tl = &run["timeline"];
    let start = tl["migration_start_s"].as_f64()?;
    let mut rate = Vec::new();
    let mut p99 = Vec::new();
    for s in tl["seconds"].as_array()? {
        let t = s["t"].as_f64()? - start;
        let r = if tpcc { &s["tpmc"] } else { &s["tps"] };
        rate.push((t, r.as_f64().unwrap_or(0.0)));
        if let Some(p) = s["p99_ms"].as_f64() {
            p99.push((t, p));
        }
    }
    Some((
        rate,
        p99,
        tl["switchover_s"].as_f64().map(|v| v - start),
        tl["end_s"].as_f64().map(|v| v - start),
    ))
}

/// Throughput and p99 latency through the migration, one line per method.
fn timeline_svg(report: &Value, path: &Path) -> Result<bool> {
    let (rate, _, _) = rate_of(report);
    let tpcc = rate == "tpmC";
    // A method's repetitions share the colour of its first run and one legend entry.
    let all = runs(report);
    let first_of = |m: &Value| all.iter().position(|r| r["method"] == *m).unwrap_or(0);
    let lines: Vec<(String, usize, bool, Shifted)> = all
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let first = first_of(&r["method"]);
            Some((
                r["method"].as_str().unwrap_or("?").to_string(),
                first,
                first == i,
                shifted(r, tpcc)?,
            ))
        })
        .collect();
    if lines.is_empty() {
        return Ok(false);
    }
    let scenario = report["scenario"].as_str().unwrap_or("?");
    let t_min = lines
        .iter()
        .flat_map(|l| l.3 .0.first().map(|p| p.0))
        .fold(0.0f64, f64::min);
    let t_max = lines
        .iter()
        .flat_map(|l| l.3 .0.last().map(|p| p.0))
        .fold(1.0f64, f64::max);
    let rate_max = lines
        .iter()
        .flat_map(|l| l.3 .0.iter().map(|p| p.1))
        .fold(1.0f64, f64::max)
        * 1.1;
    let p99_max = lines
        .iter()
        .flat_map(|l| l.3 .1.iter().map(|p| p.1))
        .fold(1.0f64, f64::max)
        * 1.1;
    let root = SVGBackend::new(path, (1000, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let root = root
        .titled(
            &format!("{scenario}: the workload through the migration (t = 0: migration starts; | switchover, ▼ end)"),
            ("sans-serif", 17),
        )
        .map_err(plot_err)?;
    let (top, bottom) = root.split_vertically(330);
    for (area, which, y_max, desc) in [
        (&top, 0, rate_max, format!("{rate} per second")),
        (&bottom, 1, p99_max, "p99 latency (ms)".to_string()),
    ] {
        let mut chart = ChartBuilder::on(area)
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(t_min..t_max, 0f64..y_max)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .light_line_style(TRANSPARENT)
            .x_desc("seconds since the migration started")
            .y_desc(desc)
            .draw()
            .map_err(plot_err)?;
        for (name, i, labelled, (rate_pts, p99_pts, switch, end)) in &lines {
            let c = colour(*i);
            let pts = if which == 0 { rate_pts } else { p99_pts };
            let series = chart
                .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))
                .map_err(plot_err)?;
            if *labelled {
                series.label(name.clone()).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3))
                });
            }
            if let Some(sw) = switch {
                chart
                    .draw_series(std::iter::once(PathElement::new(
                        vec![(*sw, 0.0), (*sw, y_max)],
                        c.stroke_width(1),
                    )))
                    .map_err(plot_err)?;
            }
            if let Some(e) = end {
                chart
                    .draw_series(std::iter::once(TriangleMarker::new(
                        (*e, y_max * 0.97),
                        6,
                        c.filled(),
                    )))
                    .map_err(plot_err)?;
            }
        }
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(0.0, 0.0), (0.0, y_max)],
                BLACK.stroke_width(1),
            )))
            .map_err(plot_err)?;
        draw_legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    }
    root.present().map_err(plot_err)?;
    Ok(true)
}

/// One line per report: each method's total time (s), "-" where it did not complete (pure).
pub fn overview(reports: &[Value]) -> String {
    let mut methods: Vec<String> = Vec::new();
    for r in reports {
        for run in migrations(r) {
            let m = run["method"].as_str().unwrap_or("?").to_string();
            if !methods.contains(&m) {
                methods.push(m);
            }
        }
    }
    let mut s = format!("| scenario | {} |\n|---|", methods.join(" | "));
    s += &"---|".repeat(methods.len());
    s.push('\n');
    for r in reports {
        let _ = write!(s, "| {} |", r["scenario"].as_str().unwrap_or("?"));
        for m in &methods {
            let cell = migrations(r)
                .into_iter()
                .find(|x| x["method"] == m.as_str())
                .map_or(" |".to_string(), |x| match x["total_ms"].as_f64() {
                    Some(ms) if x["completed"] == Value::Bool(true) => {
                        let failed = x["guest_verified_after"] == Value::Bool(false);
                        format!(
                            " {:.1} s{} |",
                            ms / 1000.0,
                            if failed { " (guest failed after)" } else { "" }
                        )
                    }
                    _ => " did not complete |".to_string(),
                });
            s += &cell;
        }
        s.push('\n');
    }
    s
}

/// Writes plots and `summary.md` for `inputs` into `out_dir`; returns the files written.
pub fn write(inputs: &[PathBuf], out_dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let mut written = Vec::new();
    let mut reports = Vec::new();
    for input in inputs {
        let text = std::fs::read_to_string(input)
            .with_context(|| format!("reading {}", input.display()))?;
        let report: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a benchmark report (JSON)", input.display()))?;
        if !report["runs"].is_array() {
            anyhow::bail!(
                "{} has no `runs` array: not a benchmark report (format: shared/bench-report.md)",
                input.display()
            );
        }
        reports.push(report);
    }
    let mut md = format!(
        "# Benchmark summary\n\nMade by `bench report` from the JSON reports; times in ms unless said otherwise.\n\nTotal migration time per scenario and method:\n\n{}",
        overview(&reports)
    );
    for report in reports {
        let scenario = report["scenario"].as_str().unwrap_or("report").replace(
            |c: char| !c.is_ascii_alphanumeric() && c != '-' && c != '_',
            "_",
        );
        let _ = write!(
            md,
            "\n## {scenario}\n\n{} MiB guest, migration link {} Mbit/s, storage {}; workload: {}.\n\n{}",
            report["vm"]["ram_mib"],
            report["link_mbit"],
            report["storage_mbit"]
                .as_u64()
                .map_or("unused".into(), |m| format!("{m} Mbit/s")),
            report["vm"]["workload"].as_str().unwrap_or("?"),
            markdown_table(&report)
        );
        let times = out_dir.join(format!("{scenario}-times.svg"));
        times_svg(&report, &times).with_context(|| format!("plotting {}", times.display()))?;
        let _ = writeln!(md, "\n![{scenario}: migration time]({scenario}-times.svg)");
        written.push(times);
        for table in [
            crate::cost_report::method_summary(&report),
            crate::cost_report::cost_table(&report),
            crate::census_report::census_table(&report),
        ]
        .into_iter()
        .flatten()
        {
            let _ = write!(md, "\n{table}");
        }
        let work = out_dir.join(format!("{scenario}-work.svg"));
        if crate::cost_report::work_svg(&report, &work)
            .with_context(|| format!("plotting {}", work.display()))?
        {
            let _ = writeln!(
                md,
                "\n![{scenario}: work done since the migration started]({scenario}-work.svg)"
            );
            written.push(work);
        }
        let tl = out_dir.join(format!("{scenario}-timeline.svg"));
        if timeline_svg(&report, &tl).with_context(|| format!("plotting {}", tl.display()))? {
            let _ = writeln!(
                md,
                "\n![{scenario}: workload timeline]({scenario}-timeline.svg)"
            );
            written.push(tl);
        }
    }
    let summary = out_dir.join("summary.md");
    std::fs::write(&summary, md).with_context(|| format!("writing {}", summary.display()))?;
    written.push(summary);
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Value {
        json!({
            "scenario": "mariadb-tpcc",
            "link_mbit": 1000,
            "storage_mbit": 10000,
            "vm": {"ram_mib": 2048, "workload": "TPC-C"},
            "runs": [
                {"method": "qemu-precopy", "completed": true, "total_ms": 15000, "downtime_ms": 250,
                 "link_bytes": 1_400_000_000u64, "storage_bytes": 0, "guest_verified_after": true,
                 "workload": {"errors": 0, "tps_before": 20.0, "tps_during": 18.0, "p90_ms_during": 80.0,
                              "p99_ms_during": 300.0, "tpmc_before": 500.0, "tpmc_during": 450.0},
                 "timeline": {"migration_start_s": 15.0, "switchover_s": 29.0, "end_s": 30.0,
                              "seconds": [{"t": 14, "tps": 20.0, "p90_ms": 50.0, "p99_ms": 90.0, "errors": 0, "tpmc": 480.0},
                                          {"t": 16, "tps": 10.0, "p90_ms": 70.0, "p99_ms": null, "errors": 0, "tpmc": 240.0}]}},
                {"method": "dbmigrate-precopy", "completed": false, "total_ms": null, "downtime_ms": null,
                 "link_bytes": 0, "storage_bytes": 0, "workload": {"errors": 2}},
                {"method": "storage-read", "completed": true, "total_ms": null, "downtime_ms": null,
                 "link_bytes": 0, "storage_bytes": 2_700_000_000u64, "workload": {"errors": 0},
                 "detail": {"reference": "no migration"}}
            ]
        })
    }

    #[test]
    fn table_uses_tpmc_for_tpcc() {
        let t = markdown_table(&sample());
        assert!(t.contains("| tpmC before | tpmC during |"));
        assert!(t.contains("| qemu-precopy | true | 15000 | 250 | 1400 | 0 | 500.0 | 450.0 | 80.0 / 300.0 | 0 | OK |"));
        assert!(
            t.contains("| dbmigrate-precopy | false | - | - | 0 | 0 | - | - | - / - | 2 | n/a |")
        );
    }

    #[test]
    fn timelines_start_at_migration_start() {
        let r = sample();
        let (rate, p99, sw, end) = shifted(&r["runs"][0], true).unwrap();
        assert_eq!(rate, vec![(-1.0, 480.0), (1.0, 240.0)]);
        assert_eq!(p99, vec![(-1.0, 90.0)]);
        assert_eq!((sw, end), (Some(14.0), Some(15.0)));
        assert!(shifted(&r["runs"][1], true).is_none());
    }

    #[test]
    fn writes_plots_and_summary() {
        let dir = std::env::temp_dir().join(format!("bench-report-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let input = dir.join("r.json");
        std::fs::write(&input, sample().to_string()).unwrap();
        let out = write(std::slice::from_ref(&input), &dir.join("out")).unwrap();
        let o = overview(&[sample()]);
        assert!(
            o.contains("| mariadb-tpcc | 15.0 s | did not complete |\n"),
            "{o}"
        );
        assert!(
            !o.contains("storage-read"),
            "a reference run is no migration: {o}"
        );
        assert_eq!(out.len(), 3);
        let svg = std::fs::read_to_string(dir.join("out/mariadb-tpcc-timeline.svg")).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("qemu-precopy"));
        let md = std::fs::read_to_string(dir.join("out/summary.md")).unwrap();
        assert!(md.contains("## mariadb-tpcc") && md.contains("mariadb-tpcc-times.svg"));
        std::fs::write(&input, "{\"scenario\": 1}").unwrap();
        let e = write(&[input], &dir.join("out")).unwrap_err();
        assert!(format!("{e:#}").contains("no `runs` array"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
