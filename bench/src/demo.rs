//! `bench demo`: the main demo. The MariaDB VM under sysbench migrates
//! between two hosts with dbmigrate, its clean buffer-pool pages rebuilt
//! from shared storage, and (with `--with-qemu`) QEMU's own pre-copy moves
//! a fresh copy of the same VM over the same link beside it. The runs are
//! `compare-db`'s (the same bed, load and checks), written to a scratch
//! report; what the demo prints is read from it.

use std::path::Path;

use anyhow::{Context, Result};
use clap::Parser;
use serde_json::Value;

/// Runs the demo's methods and prints what happened.
pub(crate) fn run(with_qemu: bool, ram_mib: u64) -> Result<()> {
    let out = std::env::temp_dir().join(format!("dbmigrate-demo-{}.json", std::process::id()));
    let pool = format!("{}M", ram_mib * 5 / 8);
    println!(
        "== two hosts (network namespaces) joined by a 1 Gbit/s link, a storage host serving the VM's disk over NBD, a client host running sysbench"
    );
    println!("== the MariaDB VM ({ram_mib} MiB, buffer pool {pool}) boots on the source; sysbench oltp_read_write runs against it");
    crate::run(command(with_qemu, ram_mib, &out)?)?;
    let failed = summary(&out)?;
    anyhow::ensure!(
        failed.is_empty(),
        "the demo's migration did not come out right: {}",
        failed.join("; ")
    );
    Ok(())
}

/// The `compare-db` command the demo runs (pure).
fn command(with_qemu: bool, ram_mib: u64, out: &Path) -> Result<crate::Cli> {
    let methods = if with_qemu {
        "qemu-precopy,dbmigrate-precopy"
    } else {
        "dbmigrate-precopy"
    };
    let pool = format!("{}M", ram_mib * 5 / 8);
    let args = [
        "bench",
        "compare-db",
        "--scenario",
        "demo",
        "--methods",
        methods,
        "--ram-mib",
        &ram_mib.to_string(),
        "--pool",
        &pool,
        "--timeout-s",
        "40",
        "--out",
        &out.to_string_lossy(),
    ];
    Ok(crate::Cli::try_parse_from(args)?)
}

/// Prints each run; returns what went wrong (a run that did not complete,
/// RAM not byte-exact, the database not checked).
fn summary(path: &Path) -> Result<Vec<String>> {
    let mut failed = Vec::new();
    let r: Value = serde_json::from_str(
        &std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
    )?;
    println!();
    for run in r["runs"].as_array().map(Vec::as_slice).unwrap_or_default() {
        let method = run["method"].as_str().unwrap_or("?");
        let who = if method.starts_with("qemu") {
            "QEMU's own pre-copy"
        } else {
            "dbmigrate pre-copy"
        };
        if run["completed"] != Value::Bool(true) {
            let d = &run["detail"];
            let why = if d["run_error"].is_null() {
                &d["error"]
            } else {
                &d["run_error"]
            };
            println!("{who}: did not complete: {why}");
            failed.push(format!("{who} did not complete"));
            continue;
        }
        // dbmigrate compares all of RAM at the switch; QEMU's runs have no
        // such check (null), only the database's.
        let ram_ok = method.starts_with("qemu") || run["ram_verified"] == Value::Bool(true);
        if !ram_ok || run["guest_verified_after"] != Value::Bool(true) {
            failed.push(format!("{who}: RAM or database not verified"));
        }
        let ms = |k: &str| run[k].as_u64().unwrap_or(0);
        let w = &run["workload"];
        println!("{who}:");
        println!(
            "  total {:.1} s, downtime {} ms, {} MB over the migration link",
            ms("total_ms") as f64 / 1000.0,
            ms("downtime_ms"),
            ms("link_bytes") / 1_000_000
        );
        let rebuilt = run["pages"]["rebuilt"].as_u64().unwrap_or(0);
        if rebuilt > 0 {
            println!(
                "  {rebuilt} pages ({} MB) rebuilt on the destination from shared storage ({} MB read there), each checked against the source's hash; {} sent raw",
                rebuilt * 4096 / 1_000_000,
                ms("storage_bytes") / 1_000_000,
                run["pages"]["raw"].as_u64().unwrap_or(0)
            );
        }
        println!(
            "  RAM byte-exact: {}; database checked on the destination (CHECK TABLE): {}",
            run["ram_verified"].as_bool().map_or("not checked", yes),
            run["guest_verified_after"]
                .as_bool()
                .map_or("not checked", yes)
        );
        println!(
            "  sysbench kept going: {:.1} transactions/s before, {:.1} during the migration, {} errors",
            w["tps_before"].as_f64().unwrap_or(0.0),
            w["tps_during"].as_f64().unwrap_or(0.0),
            w["errors"].as_u64().unwrap_or(0)
        );
    }
    println!(
        "\n(full report: {}; `bench compare-db` runs every method, see the README's Benchmarks)",
        path.display()
    );
    Ok(failed)
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "NO"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_runs_a_valid_compare_db_and_summarises_a_report() {
        assert!(command(false, 2048, Path::new("/tmp/x.json")).is_ok());
        assert!(command(true, 4096, Path::new("/tmp/x.json")).is_ok());
        let report =
            dbmigrate_testbed::repo_root().join("bench/results/mariadb-sysbench-libvirt.json");
        assert_eq!(summary(&report).unwrap(), Vec::<String>::new());
        assert!(summary(Path::new("/nonexistent.json")).is_err());
        let bad = std::env::temp_dir().join(format!("demo-bad-{}.json", std::process::id()));
        std::fs::write(
            &bad,
            r#"{"runs": [{"method": "dbmigrate-precopy", "completed": false, "detail": {"run_error": "boot hung"}},
                         {"method": "qemu-precopy", "completed": true, "ram_verified": null, "guest_verified_after": false},
                         {"method": "qemu-precopy", "completed": true, "ram_verified": null, "guest_verified_after": true},
                         {"method": "dbmigrate-precopy", "completed": true, "ram_verified": null, "guest_verified_after": true}]}"#,
        )
        .unwrap();
        let failed = summary(&bad).unwrap();
        assert_eq!(failed.len(), 3, "{failed:?}");
        assert!(failed[2].starts_with("dbmigrate"), "{failed:?}");
        std::fs::remove_file(&bad).unwrap();
    }
}
