//! A database comparison's report (`compare-db`, `compare-fleet`): the
//! JSON file and the table printed at the end.

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde_json::json;

use crate::{cost_report, db, faults_cell, fleet, print_failures, Report, Run};

/// Writes a database comparison's report and prints its table.
pub(crate) fn write_db_report(
    scenario: String,
    setup: &db::DbSetup,
    guest: &dbmigrate_testbed::MariadbGuest,
    fleet: Option<(fleet::Policy, u32)>,
    runs: Vec<Run>,
    out: Option<PathBuf>,
) -> Result<()> {
    let mut workload = match setup.load {
        db::DbLoad::Sysbench => format!(
            "MariaDB, buffer pool {}, sysbench oltp_read_write {} tables x {} rows, {} threads",
            setup.pool, guest.tables, guest.rows, setup.threads
        ),
        db::DbLoad::Tpcc { warehouses } => format!(
            "MariaDB, buffer pool {}, TPC-C {warehouses} warehouses, {} terminals, no think time",
            setup.pool, setup.threads
        ),
    };
    if setup.competing_streams > 0 {
        workload += &format!(
            "; congestion: {} competing TCP streams (iperf3) on the migration link",
            setup.competing_streams
        );
    }
    if setup.storage_read_mbyte_s > 0 {
        workload += &format!(
            "; reads from shared storage paced to {} MB/s",
            setup.storage_read_mbyte_s
        );
    }
    let rule = &setup.steady;
    if fleet.is_none() && rule.max_s > rule.min_s {
        workload += &format!(
            "; migration once the load is steady (the last {} s in blocks of {} s within ±{:.0} % of their mean, after {}-{} s of load), load until {} s after the migration's start",
            rule.window_s,
            rule.block_s,
            rule.tolerance * 100.0,
            rule.min_s,
            rule.max_s,
            setup.tail_s()
        );
    }
    if let Some((policy, vms)) = fleet {
        workload = format!(
            "{vms} VMs leave the host ({}), each: {workload}",
            match policy {
                fleet::Policy::Batch => "batch: all at once",
                fleet::Policy::Evict => "evict: one after another",
            }
        );
    }
    let report = Report {
        scenario: scenario.clone(),
        link_mbit: setup.link_mbit,
        storage_mbit: Some(setup.storage_mbit),
        vm: json!({
            "ram_mib": setup.ram_mib,
            "vcpus": 1,
            "workload": workload,
            "ram_backing": if setup.hugepages { "hugetlbfs, 2 MiB pages" } else { "tmpfs, 4 KiB pages" },
        }),
        hosts: Some(setup.hosts.name().into()),
        host_cpus: Some(setup.hosts.layout()),
        runs,
    };
    let path = out.unwrap_or_else(|| {
        dbmigrate_testbed::repo_root().join(format!("bench/results/{scenario}.json"))
    });
    std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    print_db_table(&report);
    eprintln!("report: {}", path.display());
    Ok(())
}

fn print_db_table(r: &Report) {
    println!(
        "\n{} — {} MiB guest, {} Mbit/s migration link, {:?} Mbit/s storage links\n",
        r.scenario, r.vm["ram_mib"], r.link_mbit, r.storage_mbit
    );
    let tpcc = r.runs.iter().any(|x| x.workload.tpmc_during.is_some());
    let rate = if tpcc { "tpmC" } else { "tps" };
    println!("| method | completed | total (ms) | downtime (ms) | link MB | storage MB | rebuilt pages | mismatches | network faults / longest stall | {rate} before | {rate} during | p90 / p99 during (ms) | client errors | database after |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    for run in &r.runs {
        let w = &run.workload;
        let (before, during) = if tpcc {
            (w.tpmc_before, w.tpmc_during)
        } else {
            (w.tps_before, w.tps_during)
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} | {} | {} |",
            run.method,
            run.completed,
            opt(run.total_ms),
            opt(run.downtime_ms),
            run.link_bytes / 1_000_000,
            run.storage_bytes / 1_000_000,
            run.pages.rebuilt,
            run.pages.rebuild_mismatch,
            faults_cell(run),
            f(before),
            f(during),
            f(w.p90_ms_during),
            f(w.p99_ms_during),
            opt(w.errors),
            run.guest_verified_after.map_or("n/a".into(), |b| if b {
                "OK".to_string()
            } else {
                "FAILED".to_string()
            })
        );
    }
    if let Ok(v) = serde_json::to_value(r) {
        for table in [cost_report::method_summary(&v), cost_report::cost_table(&v)]
            .into_iter()
            .flatten()
        {
            println!("\n{table}");
        }
    }
    for run in &r.runs {
        if let Some(b) = run.detail["physical_bound_ms"].as_f64() {
            println!("\nphysical bound for {} (design §6): {b:.0} ms", run.method);
        }
    }
    print_failures(r);
}
