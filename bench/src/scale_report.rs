//! `bench scale`: one scenario at several guest sizes. From reports of the
//! same load at different RAM sizes it takes each method's median total
//! time, fits a line to it against what the method moved (the link's
//! bytes for QEMU, whose copy is bound by the link; the bytes read from
//! storage plus the link's for dbmigrate, whose copy is mostly the
//! rebuild), and writes a table and a plot of time against guest RAM
//! (`<name>.svg`, `<name>.md`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use plotters::prelude::*;
use serde_json::Value;

use crate::report::{colour, draw_legend, plot_err, runs};

/// One method at one guest size: medians over its completed runs.
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    pub method: String,
    pub ram_gib: f64,
    pub runs: usize,
    pub total_s: f64,
    pub link_gb: f64,
    pub storage_gb: f64,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Each method's medians in one report (pure).
pub fn points(report: &Value) -> Vec<Point> {
    let ram_gib = report["vm"]["ram_mib"].as_f64().unwrap_or(0.0) / 1024.0;
    let mut methods: Vec<String> = Vec::new();
    for r in runs(report) {
        let m = r["method"].as_str().unwrap_or("?").to_string();
        if !methods.contains(&m) && r["detail"]["reference"].is_null() && m != "none" {
            methods.push(m);
        }
    }
    methods
        .into_iter()
        .filter_map(|m| {
            let done: Vec<&Value> = runs(report)
                .iter()
                .filter(|r| r["method"] == m.as_str() && r["completed"] == true)
                .collect();
            let col = |k: &str, scale: f64| {
                median(
                    done.iter()
                        .filter_map(|r| r[k].as_f64())
                        .map(|v| v / scale)
                        .collect(),
                )
            };
            Some(Point {
                runs: done.len(),
                total_s: col("total_ms", 1e3)?,
                link_gb: col("link_bytes", 1e9).unwrap_or(0.0),
                storage_gb: col("storage_bytes", 1e9).unwrap_or(0.0),
                method: m,
                ram_gib,
            })
        })
        .collect()
}

/// Least-squares line `y = a + b x` through `xy` (pure); None for fewer
/// than two distinct x.
pub fn fit(xy: &[(f64, f64)]) -> Option<(f64, f64)> {
    let n = xy.len() as f64;
    let (sx, sy) = xy.iter().fold((0.0, 0.0), |(a, b), &(x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let sxx: f64 = xy.iter().map(|&(x, _)| (x - mx) * (x - mx)).sum();
    if xy.len() < 2 || sxx < 1e-12 {
        return None;
    }
    let sxy: f64 = xy.iter().map(|&(x, y)| (x - mx) * (y - my)).sum();
    let b = sxy / sxx;
    Some((my - b * mx, b))
}

/// What a method's time is fitted against: the bytes it moved where its
/// copy spends the time (pure).
fn moved_gb(p: &Point) -> f64 {
    if p.method.starts_with("qemu") {
        p.link_gb
    } else {
        p.storage_gb + p.link_gb
    }
}

/// The table: per method and size the medians, then per method the fit
/// of its time against the bytes it moved and against the guest's RAM.
pub fn markdown(points: &[Point]) -> String {
    let mut s = String::from(
        "| method | RAM (GiB) | runs | total (s) | link GB | storage GB |\n|---|---|---|---|---|---|\n",
    );
    for p in points {
        let _ = writeln!(
            s,
            "| {} | {:.0} | {} | {:.1} | {:.2} | {:.2} |",
            p.method, p.ram_gib, p.runs, p.total_s, p.link_gb, p.storage_gb
        );
    }
    s.push_str("\nFits, least squares over the sizes (time in s; GB moved: the link's for QEMU, storage's plus the link's for dbmigrate):\n\n| method | sizes | s per GB moved | fixed s | s per GiB of RAM |\n|---|---|---|---|---|\n");
    for m in methods(points) {
        let of: Vec<&Point> = points.iter().filter(|p| p.method == m).collect();
        let moved: Vec<(f64, f64)> = of.iter().map(|p| (moved_gb(p), p.total_s)).collect();
        let ram: Vec<(f64, f64)> = of.iter().map(|p| (p.ram_gib, p.total_s)).collect();
        match (fit(&moved), fit(&ram)) {
            (Some((a, b)), Some((_, r))) => {
                let _ = writeln!(s, "| {m} | {} | {b:.2} | {a:.1} | {r:.2} |", of.len());
            }
            _ => {
                let _ = writeln!(s, "| {m} | {} | - | - | - |", of.len());
            }
        }
    }
    s
}

fn methods(points: &[Point]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for p in points {
        if !out.contains(&p.method) {
            out.push(p.method.clone());
        }
    }
    out
}

/// Median total time against guest RAM, a line per method.
fn svg(points: &[Point], title: &str, path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let x_max = points.iter().fold(1.0f64, |m, p| m.max(p.ram_gib)) * 1.1;
    let y_max = points.iter().fold(1.0f64, |m, p| m.max(p.total_s)) * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("guest RAM (GiB)")
        .y_desc("migration time, median (s)")
        .draw()
        .map_err(plot_err)?;
    for (i, m) in methods(points).iter().enumerate() {
        let c = colour(i);
        let line: Vec<(f64, f64)> = points
            .iter()
            .filter(|p| &p.method == m)
            .map(|p| (p.ram_gib, p.total_s))
            .collect();
        chart
            .draw_series(LineSeries::new(line.clone(), c.stroke_width(2)))
            .map_err(plot_err)?
            .label(m.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        chart
            .draw_series(line.iter().map(|&p| Circle::new(p, 4, c.filled())))
            .map_err(plot_err)?;
    }
    draw_legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

/// Adds `new` to `all`: a method at a size a report named earlier gave
/// is taken from the later one; only `methods` are kept (all if empty) (pure).
pub fn merge(all: &mut Vec<Point>, new: Vec<Point>, methods: &[String]) {
    for p in new {
        if !methods.is_empty() && !methods.contains(&p.method) {
            continue;
        }
        all.retain(|q| !(q.method == p.method && q.ram_gib == p.ram_gib));
        all.push(p);
    }
}

/// Reads `inputs` (reports of the sizes; a method at a size a later report
/// gives too is taken from the later one), keeps `methods` (all if
/// empty), writes `<out>.svg` and `<out>.md`; returns their paths.
pub fn write(inputs: &[PathBuf], methods: &[String], out: &Path) -> Result<Vec<PathBuf>> {
    if inputs.len() < 2 {
        bail!("bench scale takes reports of at least two guest sizes");
    }
    let mut all = Vec::new();
    for p in inputs {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        let report: Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))?;
        merge(&mut all, points(&report), methods);
    }
    all.sort_by(|a, b| {
        (&a.method, a.ram_gib)
            .partial_cmp(&(&b.method, b.ram_gib))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let name = out
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("scale")
        .to_string();
    let (svg_path, md_path) = (out.with_extension("svg"), out.with_extension("md"));
    svg(&all, &name, &svg_path).with_context(|| format!("plotting {}", svg_path.display()))?;
    let sources: Vec<String> = inputs
        .iter()
        .map(|p| format!("`{}`", p.display()))
        .collect();
    let md = format!(
        "# {name}\n\nFrom {}.\n\n{}\n![{name}]({})\n",
        sources.join(", "),
        markdown(&all),
        svg_path.file_name().and_then(|n| n.to_str()).unwrap_or("")
    );
    std::fs::write(&md_path, md).with_context(|| format!("writing {}", md_path.display()))?;
    Ok(vec![svg_path, md_path])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_line_through_points_on_a_line_is_that_line() {
        let (a, b) = fit(&[(1.0, 3.0), (2.0, 5.0), (4.0, 9.0)]).unwrap();
        assert!((a - 1.0).abs() < 1e-9 && (b - 2.0).abs() < 1e-9);
        assert!(fit(&[(1.0, 3.0)]).is_none());
        assert!(fit(&[(2.0, 3.0), (2.0, 4.0)]).is_none());
    }

    #[test]
    fn medians_per_method_over_completed_runs() {
        let report = json!({
            "vm": {"ram_mib": 8192},
            "runs": [
                {"method": "qemu-precopy", "completed": true, "total_ms": 60000, "link_bytes": 7e9},
                {"method": "qemu-precopy", "completed": true, "total_ms": 50000, "link_bytes": 6e9},
                {"method": "qemu-precopy", "completed": false, "total_ms": null, "link_bytes": 9e9},
                {"method": "dbmigrate-precopy", "completed": true, "total_ms": 15000, "link_bytes": 4e8, "storage_bytes": 5e9},
                {"method": "none", "completed": true, "total_ms": null},
            ]
        });
        let p = points(&report);
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].method, "qemu-precopy");
        assert_eq!((p[0].runs, p[0].total_s, p[0].ram_gib), (2, 55.0, 8.0));
        assert!((p[0].link_gb - 6.5).abs() < 1e-9);
        assert!((moved_gb(&p[1]) - 5.4).abs() < 1e-9);
        let md = markdown(&p);
        assert!(
            md.contains("| qemu-precopy | 8 | 2 | 55.0 | 6.50 | 0.00 |"),
            "{md}"
        );
        // A later report's figure for the same method and size wins; other
        // methods than those asked for are left out.
        let mut all = p.clone();
        let mut later = p[0].clone();
        later.total_s = 50.0;
        merge(&mut all, vec![later], &[]);
        assert_eq!(all.len(), 2);
        let q = all.iter().find(|q| q.method == "qemu-precopy").unwrap();
        assert_eq!(q.total_s, 50.0);
        let mut only = Vec::new();
        merge(&mut only, p, &["dbmigrate-precopy".to_string()]);
        assert_eq!(only.len(), 1);
    }
}
