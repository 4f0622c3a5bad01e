//! `bench compare`: the dirtier guest migrated by every method.
//!
//! Every method gets a freshly booted guest that has filled its memory and
//! finished one verification pass; after each migration the guest must finish
//! another full verification pass on the destination, and the errors it
//! finds are reported (`workload.errors`).

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use dbmigrate_testbed::{dirtier_guest, GuestImage, Testbed, Vm, VmOptions};
use serde_json::{json, Value};

use crate::methods::{check_methods, dbmigrate_mode, faults_cell, may_postcopy, postcopy_figures};
use crate::qemu::{measured_downtime, qemu_migrate, record_qemu_result, QemuWay};
use crate::{print_failures, Report, Run};

/// `bench compare`'s settings.
#[derive(clap::Args)]
pub(crate) struct DirtierArgs {
    /// Scenario name (report `scenario`, default file name).
    #[arg(long)]
    scenario: Option<String>,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 1024)]
    ram_mib: u64,
    /// Working set the guest keeps rewriting, MiB.
    #[arg(long, default_value_t = 16)]
    ws_mib: u64,
    /// Percent of free guest RAM the guest fills.
    #[arg(long, default_value_t = 80)]
    fill_pct: u64,
    /// Migration link shaping, Mbit/s.
    #[arg(long, default_value_t = 1000)]
    link_mbit: u32,
    /// Downtime target for every method, ms.
    #[arg(long, default_value_t = 300)]
    downtime_ms: u64,
    /// The guest kernel uses only this much of its RAM (`mem=`), the rest
    /// of the RAM file staying a hole: a large, sparse guest (with
    /// `--ram-mib 1048576`, the 1 TiB one the agents' memory is measured on).
    #[arg(long)]
    guest_mem_mib: Option<u64>,
    /// `receive --prealloc` of the dbmigrate methods (the agent's default
    /// if not given; `off` for a guest larger than this host's memory).
    #[arg(long)]
    prealloc: Option<String>,
    #[command(flatten)]
    run: crate::RunArgs,
}

/// Runs every method on the dirtier guest and writes the report.
pub(crate) fn compare(args: DirtierArgs) -> Result<()> {
    let DirtierArgs {
        scenario,
        ram_mib,
        ws_mib,
        fill_pct,
        link_mbit,
        downtime_ms,
        guest_mem_mib,
        prealloc,
        run: crate::RunArgs {
            timeout_s,
            methods,
            out,
        },
    } = args;
    let scenario = scenario.unwrap_or_else(|| format!("dirtier-ws{ws_mib}"));
    check_methods(&methods)?;
    let img = dirtier_guest()?;
    let tb = Testbed::new(link_mbit)?;
    let setup = Setup {
        tb: &tb,
        img: &img,
        ram_mib,
        ws_mib,
        fill_pct,
        link_mbit,
        downtime_ms,
        guest_mem_mib,
        prealloc,
        timeout: Duration::from_secs(timeout_s),
    };
    let mut runs = Vec::new();
    for m in &methods {
        eprintln!("== {scenario}: {m}");
        let run = run_method(&setup, m).with_context(|| format!("method {m}"))?;
        eprintln!(
            "   completed={} total_ms={:?} downtime_ms={:?} link_MB={} guest_ok={:?}",
            run.completed,
            run.total_ms,
            run.downtime_ms,
            run.link_bytes / 1_000_000,
            run.guest_verified_after
        );
        runs.push(run);
    }
    let report = Report {
        scenario: scenario.clone(),
        link_mbit,
        storage_mbit: None,
        hosts: None,
        host_cpus: None,
        vm: json!({"ram_mib": ram_mib, "guest_mem_mib": guest_mem_mib, "vcpus": 1, "workload": format!("dirtier ws={ws_mib}MiB fill={fill_pct}%")}),
        runs,
    };
    let path = out.unwrap_or_else(|| {
        dbmigrate_testbed::repo_root().join(format!("bench/results/{scenario}.json"))
    });
    std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    print_table(&report);
    eprintln!("report: {}", path.display());
    Ok(())
}

pub(crate) struct Setup<'a> {
    tb: &'a Testbed,
    img: &'a GuestImage,
    ram_mib: u64,
    ws_mib: u64,
    fill_pct: u64,
    link_mbit: u32,
    downtime_ms: u64,
    guest_mem_mib: Option<u64>,
    prealloc: Option<String>,
    timeout: Duration,
}

pub(crate) fn print_table(r: &Report) {
    println!(
        "\n{} — {} MiB guest, {} Mbit/s link\n",
        r.scenario, r.vm["ram_mib"], r.link_mbit
    );
    println!("| method | completed | total (ms) | downtime (ms) | link MB | network faults / longest stall | RAM verified | guest check after |");
    println!("|---|---|---|---|---|---|---|---|");
    let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    for run in &r.runs {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            run.method,
            run.completed,
            opt(run.total_ms),
            opt(run.downtime_ms),
            run.link_bytes / 1_000_000,
            faults_cell(run),
            run.ram_verified.map_or("n/a".into(), |b| b.to_string()),
            run.guest_verified_after.map_or("n/a".into(), |b| if b {
                "clean".to_string()
            } else {
                "ERRORS".to_string()
            })
        );
    }
    print_failures(r);
}

pub(crate) fn start_vms(
    s: &Setup<'_>,
    preload: bool,
    dst_incoming_extra: &[&str],
    postcopy: bool,
) -> Result<(Vm, Vm)> {
    let src = Vm::start(
        s.tb,
        &s.tb.src_ns,
        "src",
        s.img,
        &VmOptions {
            ram_mib: s.ram_mib,
            ws_mib: s.ws_mib,
            fill_pct: s.fill_pct,
            preload,
            mem_limit_mib: s.guest_mem_mib,
            ..VmOptions::default()
        },
    )?;
    src.wait_console("DIRTIER READY", Duration::from_secs(300))?;
    src.wait_heartbeat(Duration::from_secs(300), |h| h.passes >= 1)?;
    let dst = Vm::start(
        s.tb,
        &s.tb.dst_ns,
        "dst",
        s.img,
        &VmOptions {
            ram_mib: s.ram_mib,
            ws_mib: s.ws_mib,
            fill_pct: s.fill_pct,
            preload: false,
            incoming: true,
            extra: dst_incoming_extra.iter().map(|s| s.to_string()).collect(),
            postcopy_socket: postcopy.then(|| s.tb.dir.join("dst.uffd")),
            qemu_fills: !preload,
            mem_limit_mib: s.guest_mem_mib,
            ..VmOptions::default()
        },
    )?;
    Ok((src, dst))
}

/// After a completed migration: the guest on `dst` must complete two more
/// full verification passes; returns whether it found no error.
pub(crate) fn guest_check(src: &Vm, dst: &Vm) -> Option<bool> {
    let last = src.heartbeats().last().cloned()?;
    let h = dst
        .wait_heartbeat(Duration::from_secs(240), |h| {
            h.seq > last.seq && h.passes >= last.passes + 2
        })
        .ok()?;
    Some(h.errors == 0 && !dst.console().contains("DIRTIER ERROR"))
}

pub(crate) fn run_method(s: &Setup<'_>, method: &str) -> Result<Run> {
    let mut run = Run {
        method: method.into(),
        ..Run::default()
    };
    match method {
        m if dbmigrate_mode(m).is_some() => {
            let mode = dbmigrate_mode(m).expect("checked");
            let postcopy = may_postcopy(m);
            let (src, dst) = start_vms(s, true, &[], postcopy)?;
            let (se, de) = (src.watch_events()?, dst.watch_events()?);
            let before = s.tb.link_bytes()?;
            let mut recv = s.tb.receive_cmd(&dst)?;
            if postcopy {
                recv.arg("--postcopy-socket").arg(s.tb.dir.join("dst.uffd"));
            }
            if let Some(p) = &s.prealloc {
                recv.args(["--prealloc", p]);
            }
            // The source starts once the destination is set up, as an
            // operator would (QEMU's destination allocates at boot).
            // One log per method: a failed run's log must survive the next run.
            let recv_log = s.tb.dir.join(format!("receive-{method}.log"));
            let recv = dbmigrate_testbed::spawn_listening(&mut recv, &recv_log)?;
            let report_path = s.tb.dir.join("dbmigrate-report.json");
            let out =
                s.tb.migrate_cmd(&src, &report_path)?
                    .args([
                        "--downtime-ms",
                        &s.downtime_ms.to_string(),
                        "--progress",
                        "never",
                    ])
                    .args(mode)
                    .stdout(Stdio::null())
                    .stderr(Stdio::inherit())
                    .output()?;
            let recv_out = recv.wait_with_output()?;
            let dest: Value = serde_json::from_slice(&recv_out.stdout).unwrap_or(Value::Null);
            run.link_bytes = s.tb.link_bytes()? - before;
            let r: Value = serde_json::from_str(&std::fs::read_to_string(&report_path)?)?;
            run.completed = out.status.success() && r["completed"] == json!(true);
            run.total_ms = r["total_ms"].as_u64();
            run.downtime_ms = r["downtime_ms"].as_u64().filter(|_| run.completed);
            run.ram_verified = r["ram_verified"].as_bool();
            run.pages.raw = r["pages"]["raw"].as_u64().unwrap_or(0);
            run.pages.zero = r["pages"]["zero"].as_u64().unwrap_or(0);
            run.postcopy = postcopy_figures(&dest, &r);
            run.detail = json!({
                "stop_reason": r["stats"]["stop_reason"],
                "expected_downtime_ms": r["stats"]["expected_downtime_ms"],
                "verify_ms": r["stats"]["verify_ms"],
                "rounds": r["stats"]["rounds"],
                "postcopy": r["postcopy"],
                "destination": dest,
                "device_state_bytes": r["device_state_bytes"],
                "source_peak_own_bytes": r["agent_peak_own_bytes"],
                "error": r["error"],
                "destination_error": dbmigrate_testbed::agent_error(&recv_log),
            });
            measured_downtime(&mut run, &se, &de);
            if run.completed {
                run.guest_verified_after = guest_check(&src, &dst);
                run.workload.errors = run.guest_verified_after.map(|ok| u64::from(!ok));
            }
        }
        "qemu-precopy" | "qemu-postcopy" | "qemu-precopy-tls" => {
            let (src, dst) = start_vms(s, false, &[], false)?;
            let (se, de) = (src.watch_events()?, dst.watch_events()?);
            let mut dq = dst.qmp()?;
            let before = s.tb.link_bytes()?;
            let t = Instant::now();
            let info = qemu_migrate(
                &mut src.qmp()?,
                &mut dq,
                &format!("tcp:{}:7001", s.tb.dst_ip),
                &QemuWay::of(method, s.tb),
                s.link_mbit,
                s.downtime_ms,
                s.timeout,
            )?;
            run.link_bytes = s.tb.link_bytes()? - before;
            record_qemu_result(&mut run, &info);
            if run.completed {
                run.guest_verified_after = guest_check(&src, &dst);
                run.workload.errors = run.guest_verified_after.map(|ok| u64::from(!ok));
            }
            run.detail = json!({
                "status": info["status"],
                "expected_downtime_ms": info["expected-downtime"],
                "dirty_sync_count": info["ram"]["dirty-sync-count"],
                "ram_transferred": info["ram"]["transferred"],
                "elapsed_ms_when_stopped": dbmigrate_core::stats::millis(t.elapsed()),
            });
            measured_downtime(&mut run, &se, &de);
        }
        other => bail!("unknown method {other}"),
    }
    Ok(run)
}
