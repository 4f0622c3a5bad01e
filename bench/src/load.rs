//! The client load: sysbench or the TPC-C driver in the client host,
//! its per-transaction logs, and the workload figures made of them.
//!
//! A load is started for the longest it may need and ended by the bench
//! when the run has what it measures ([`RunningLoad::stop`]): both
//! clients end their connections' loops when a stop file appears (the
//! sysbench script through `DBM_STOP_FILE`, the TPC-C driver through
//! `--stop-file`), finish their transaction in flight and print their
//! summary as at a normal end.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use dbmigrate_testbed::{DbBed, MariadbGuest};

use crate::db::{DbLoad, DbSetup};
use crate::guest_cost::RawLoad;
use crate::hosts::Host;
use crate::timeline;
use crate::{Run, Timeline, Workload};

/// sysbench's closing count of ignored errors (pure).
pub fn parse_errors(log: &str) -> Option<u64> {
    log.lines()
        .find(|l| l.trim_start().starts_with("ignored errors:"))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|n| n.parse().ok())
}

pub(crate) fn spawn_to(mut c: std::process::Command, log: &Path) -> Result<Child> {
    let f = std::fs::File::create(log)?;
    c.stdout(f.try_clone()?).stderr(f).stdin(Stdio::null());
    Ok(c.spawn()?)
}

/// The client load while it runs.
pub(crate) struct RunningLoad {
    child: Child,
    /// Its stdout and stderr.
    log: PathBuf,
    /// Per-connection latency logs.
    latency_dir: PathBuf,
    /// Made to end the load early.
    stop_file: PathBuf,
    /// When the load was told to stop, µs since the epoch.
    stopped_us: Option<u64>,
    start_us: u64,
    secs: u64,
}

impl RunningLoad {
    /// The per-transaction logs, growing as the load runs.
    pub(crate) fn latency_dir(&self) -> &Path {
        &self.latency_dir
    }

    /// When the load started, µs since the epoch.
    pub(crate) fn start_us(&self) -> u64 {
        self.start_us
    }

    /// Ends the load now (its transactions in flight still finish); its
    /// timeline ends with the last whole second before.
    pub(crate) fn stop(&mut self) -> Result<()> {
        std::fs::write(&self.stop_file, b"stop\n")
            .with_context(|| format!("writing {}", self.stop_file.display()))?;
        self.stopped_us = Some(timeline::now_us());
        Ok(())
    }
}

/// Starts the client load on the VM at `vm_ip` for at most `secs` seconds
/// in the client namespace (on the client host's CPUs); `tag` names its files.
pub(crate) fn start_load(
    s: &DbSetup,
    guest: &MariadbGuest,
    bed: &DbBed,
    vm_ip: &str,
    tag: &str,
    secs: u64,
) -> Result<RunningLoad> {
    let dir = &bed.tb.dir;
    let latency_dir = dir.join(format!("latency-{tag}"));
    let _ = std::fs::remove_dir_all(&latency_dir);
    std::fs::create_dir_all(&latency_dir)?;
    let stop_file = dir.join(format!("stop-{tag}"));
    let _ = std::fs::remove_file(&stop_file);
    let secs32 = u32::try_from(secs).unwrap_or(3600);
    let mut cmd = match s.load {
        DbLoad::Sysbench => {
            let script = dir.join("oltp_read_write_timed.lua");
            std::fs::write(&script, SYSBENCH_TIMED)?;
            bed.sysbench_on(vm_ip, guest, &script.to_string_lossy(), s.threads, secs32)
        }
        DbLoad::Tpcc { .. } => {
            let mut c = tpcc_client(bed, "run", vm_ip)?;
            c.arg(format!("--terminals={}", s.threads))
                .arg(format!("--duration-s={secs}"))
                .arg("--latency-dir")
                .arg(&latency_dir)
                .arg("--stop-file")
                .arg(&stop_file);
            c
        }
    };
    cmd.env("DBM_LATENCY_DIR", &latency_dir)
        .env("DBM_STOP_FILE", &stop_file);
    let cmd = s.hosts.wrap(Host::Client, cmd);
    let log = dir.join(format!("load-{tag}.log"));
    let start_us = timeline::now_us();
    let child = spawn_to(cmd, &log)?;
    Ok(RunningLoad {
        child,
        log,
        latency_dir,
        stop_file,
        stopped_us: None,
        start_us,
        secs,
    })
}

/// `bench tpcc <sub>` (this binary) in the client namespace against the
/// TPC-C database of the VM at `vm_ip`, as the guest image's client user.
fn tpcc_client(bed: &DbBed, sub: &str, vm_ip: &str) -> Result<std::process::Command> {
    let bench = std::env::current_exe().context("finding the bench binary")?;
    let mut c = bed.client(&bench.to_string_lossy());
    tpcc_args(&mut c, sub, vm_ip);
    Ok(c)
}

/// The TPC-C consistency check, given at most `limit_s` seconds: a guest
/// whose kernel died with the database's I/O in flight never answers.
pub(crate) fn tpcc_check(bed: &DbBed, vm_ip: &str, limit_s: u64) -> Result<std::process::Command> {
    let bench = std::env::current_exe().context("finding the bench binary")?;
    let mut c = bed.client_within(&bench.to_string_lossy(), limit_s);
    tpcc_args(&mut c, "check", vm_ip);
    Ok(c)
}

fn tpcc_args(c: &mut std::process::Command, sub: &str, vm_ip: &str) {
    c.args(["tpcc", sub, "--host", vm_ip]).args([
        "--user",
        "sbtest",
        "--password",
        "sbtest",
        "--db",
        "tpcc",
    ]);
}

/// The sysbench script that logs every transaction (bench/lua/).
const SYSBENCH_TIMED: &str = include_str!("../lua/oltp_read_write_timed.lua");

/// What a finished load did.
pub(crate) struct LoadResult {
    txns: Vec<timeline::Txn>,
    errors: u64,
    ok: bool,
    start_us: u64,
    secs: u64,
}

/// Waits for the load to end (killing it 30 s after its end or its stop:
/// against a guest that crashed or hangs, its queries never return).
pub(crate) fn wait_load(mut load: RunningLoad) -> Result<LoadResult> {
    let end_us = load
        .stopped_us
        .unwrap_or(load.start_us + load.secs * 1_000_000);
    let deadline = Duration::from_micros(end_us) + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = load.child.try_wait()? {
            break st;
        }
        if Duration::from_micros(timeline::now_us()) > deadline {
            eprintln!("   the load still runs 30 s after its end: the guest is not answering; stopping it");
            let _ = load.child.kill();
            break load.child.wait()?;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = std::fs::read_to_string(&load.log).unwrap_or_default();
    let txns = timeline::read_dir(&load.latency_dir)?;
    // sysbench counts the errors it ignored and retried; the TPC-C driver
    // logs each failed transaction.
    let errors = match parse_errors(&out) {
        Some(n) if !txns.iter().any(|t| t.kind == timeline::NEW_ORDER) => n,
        _ => timeline::window(&txns, load.start_us, u64::MAX).errors,
    };
    if !status.success() {
        eprintln!(
            "   the load failed: {}",
            out.lines().rev().take(5).collect::<Vec<_>>().join(" | ")
        );
    }
    Ok(LoadResult {
        txns,
        errors,
        ok: status.success(),
        start_us: load.start_us,
        secs: load
            .stopped_us
            .map_or(load.secs, |at| at.saturating_sub(load.start_us) / 1_000_000),
    })
}

/// Fills the run's workload figures and timeline from the loads on every
/// VM of the run (their transactions together).
pub(crate) fn fill_workload(
    run: &mut Run,
    loads: Vec<LoadResult>,
    mig_from: u64,
    mig_to: u64,
    switch_ms: Option<u64>,
) {
    let start_us = loads.iter().map(|l| l.start_us).min().unwrap_or(mig_from);
    let secs = loads.iter().map(|l| l.secs).max().unwrap_or(0);
    let errors: u64 = loads.iter().map(|l| l.errors + u64::from(!l.ok)).sum();
    let mut txns: Vec<timeline::Txn> = loads.into_iter().flat_map(|l| l.txns).collect();
    txns.sort_by_key(|t| t.end_us);
    let tpcc = txns.iter().any(|t| t.kind == timeline::NEW_ORDER);
    let before = timeline::window(&txns, mig_from.saturating_sub(10_000_000), mig_from);
    let during = timeline::window(&txns, mig_from, mig_to.max(mig_from + 1_000_000));
    run.workload = Workload {
        errors: Some(errors),
        tps_before: before.tps,
        tps_during: during.tps,
        p90_ms_during: during.p90_ms,
        p99_ms_during: during.p99_ms,
        tpmc_before: before.tpmc,
        tpmc_during: during.tpmc,
        ..Workload::default()
    };
    let rel = |us: u64| (us.saturating_sub(start_us) as f64 / 1e4).round() / 100.0;
    let mig_start_s = rel(mig_from);
    run.timeline = Some(Timeline {
        migration_start_s: mig_start_s,
        switchover_s: switch_ms.map(|ms| mig_start_s + ms as f64 / 1000.0),
        end_s: rel(mig_to),
        seconds: timeline::seconds(
            &txns,
            start_us,
            u32::try_from(secs).unwrap_or(u32::MAX),
            tpcc,
        ),
    });
    run.raw_load = Some(RawLoad { start_us, txns });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysbench_error_count() {
        let log = "\
[ 1s ] thds: 2 tps: 27.96 qps: 577.12 (r/w/o: 404.18/115.83/57.11) lat (ms,99%): 110.66 err/s: 0.00 reconn/s: 0.00
    ignored errors:                      3      (0.00 per sec.)
";
        assert_eq!(parse_errors(log), Some(3));
        assert_eq!(parse_errors("no summary"), None);
    }
}
