//! `bench compare-fleet`: several MariaDB VMs on one host, each under its
//! own client load, leave it for the other host over the one migration
//! link (and the shared storage):
//!
//! - `batch`: every migration starts at once;
//! - `evict`: the host is emptied one VM after another, the usual policy of
//!   a host being drained for maintenance.
//!
//! The run's `total_ms` is the time until the last VM left (its migration
//! completed); `downtime_ms` is the longest single VM's; per-VM times are in
//! `detail.per_vm`, and the workload figures are over all VMs together.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use dbmigrate_testbed::{DbBed, MariadbGuest};
use serde_json::json;

use crate::db::{self, DbSetup};
use crate::{timeline, Pages, Run};

/// How the host is emptied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// All migrations at once.
    Batch,
    /// One after another.
    Evict,
}

impl Policy {
    /// Name in reports and scenario names.
    pub fn name(self) -> &'static str {
        match self {
            Policy::Batch => "batch",
            Policy::Evict => "evict",
        }
    }
}

/// One VM's migration within the fleet run.
struct Leg {
    run: Run,
    /// Start and end, µs since the epoch.
    started_us: u64,
    ended_us: u64,
}

/// Runs every method with `vms` VMs; returns the runs.
pub fn compare(
    s: &DbSetup,
    vms: u32,
    policy: Policy,
    methods: &[String],
) -> Result<(Vec<Run>, MariadbGuest)> {
    let guest = db::guest_for(s)?;
    let mut runs = Vec::new();
    for m in methods {
        eprintln!("== {} of {vms} VMs: {m}", policy.name());
        let bed = DbBed::with_vms(&guest, s.link_mbit, s.storage_mbit, vms)?;
        let run = run_fleet(s, &guest, &bed, policy, m).with_context(|| format!("method {m}"))?;
        eprintln!(
            "   completed={} last VM left after {:?} ms, longest downtime {:?} ms, link_MB={} errors={:?}",
            run.completed,
            run.total_ms,
            run.downtime_ms,
            run.link_bytes / 1_000_000,
            run.workload.errors
        );
        runs.push(run);
    }
    Ok((runs, guest))
}

/// `Some(true)` if every value is, `Some(false)` if any is false, else None (pure).
fn all_true(v: impl IntoIterator<Item = Option<bool>>) -> Option<bool> {
    let mut all = Some(true);
    for x in v {
        match x {
            Some(false) => return Some(false),
            None => all = None,
            Some(true) => {}
        }
    }
    all
}

fn run_fleet(
    s: &DbSetup,
    guest: &MariadbGuest,
    bed: &DbBed,
    policy: Policy,
    method: &str,
) -> Result<Run> {
    let n = bed.slots.len();
    let dbm = crate::dbmigrate_mode(method).is_some();
    let postcopy = crate::may_postcopy(method);
    // Every source boots before any is waited for: their pools load together.
    let mut srcs = Vec::new();
    for i in 0..n {
        srcs.push(bed.start_slot_vm(i, guest, true, false, s.ram_mib, &s.pool, dbm, None, false)?);
    }
    let mut vms = Vec::new();
    for (i, src) in srcs.into_iter().enumerate() {
        src.wait_console("DBM-READY pool", Duration::from_secs(900))?;
        let (dst, sock) = db::start_destination(s, guest, bed, i, postcopy, !dbm)?;
        vms.push((src, dst, sock));
    }
    // Every destination agent sets up before the loads start, as QEMU's
    // destinations do at boot.
    let receivers = vms
        .iter()
        .enumerate()
        .map(|(i, (_, dst, sock))| {
            db::start_receiver(s, bed, i, dst, sock.as_deref(), method).map(std::sync::Mutex::new)
        })
        .collect::<Result<Vec<_>>>()?;
    // Evicting one by one takes up to n migrations' time.
    let span = match policy {
        Policy::Batch => s.timeout.as_secs(),
        Policy::Evict => s.timeout.as_secs() * n as u64,
    };
    let load_secs = s.warmup_s + span + s.after_s;
    let mut loads = Vec::new();
    for (i, slot) in bed.slots.iter().enumerate() {
        loads.push(crate::load::start_load(
            s,
            guest,
            bed,
            &slot.vm_ip,
            &format!("vm{i}"),
            load_secs,
        )?);
    }
    std::thread::sleep(Duration::from_secs(s.warmup_s));
    let mig_from = timeline::now_us();
    let before = bed.tb.link_bytes()?;
    let leg = |i: usize| -> Leg {
        let (src, dst, _) = &vms[i];
        let recv = receivers[i].lock().ok().and_then(|mut r| r.take());
        let started_us = timeline::now_us();
        let run = db::migrate_slot(s, bed, i, src, dst, recv, method).unwrap_or_else(|e| {
            eprintln!("   VM {i}: {e:#}");
            Run {
                method: method.into(),
                detail: json!({ "error": format!("{e:#}") }),
                ..Run::default()
            }
        });
        Leg {
            run,
            started_us,
            ended_us: timeline::now_us(),
        }
    };
    let legs: Vec<Leg> = match policy {
        Policy::Evict => (0..n).map(leg).collect(),
        Policy::Batch => std::thread::scope(|sc| {
            let handles: Vec<_> = (0..n).map(|i| sc.spawn(move || leg(i))).collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .map_err(|_| anyhow::anyhow!("a migration thread panicked"))
                })
                .collect::<Result<Vec<Leg>>>()
        })?,
    };
    let mig_to = timeline::now_us();
    let link_total = bed.tb.link_bytes()? - before;
    let rel_ms = |us: u64| us.saturating_sub(mig_from) / 1000;
    let completed = legs.iter().all(|l| l.run.completed);
    let mut run = Run {
        method: method.into(),
        completed,
        total_ms: completed
            .then(|| rel_ms(legs.iter().map(|l| l.ended_us).max().unwrap_or(mig_to))),
        downtime_ms: if completed {
            legs.iter().filter_map(|l| l.run.downtime_ms).max()
        } else {
            None
        },
        link_bytes: link_total,
        storage_bytes: legs.iter().map(|l| l.run.storage_bytes).sum(),
        pages: Pages {
            raw: legs.iter().map(|l| l.run.pages.raw).sum(),
            zero: legs.iter().map(|l| l.run.pages.zero).sum(),
            rebuilt: legs.iter().map(|l| l.run.pages.rebuilt).sum(),
            rebuild_mismatch: legs.iter().map(|l| l.run.pages.rebuild_mismatch).sum(),
        },
        ram_verified: all_true(legs.iter().map(|l| l.run.ram_verified)),
        ..Run::default()
    };
    // The timeline marks the last VM's switchover.
    let last_switch = legs
        .iter()
        .filter_map(|l| db::switch_ms(&l.run).map(|ms| rel_ms(l.started_us) + ms))
        .max();
    let results = loads
        .into_iter()
        .map(crate::load::wait_load)
        .collect::<Result<Vec<_>>>()?;
    crate::load::fill_workload(&mut run, results, mig_from, mig_to, last_switch);
    run.workload.warmup_s = Some(s.warmup_s);
    let mut per_vm = Vec::new();
    for (i, mut l) in legs.into_iter().enumerate() {
        let slot = &bed.slots[i];
        db::check_after(s, bed, &slot.vm_ip, &vms[i].1, &mut l.run);
        per_vm.push(json!({
            "vm": slot.src_name,
            "completed": l.run.completed,
            "started_ms": rel_ms(l.started_us),
            "left_ms": l.run.completed.then(|| rel_ms(l.ended_us)),
            "total_ms": l.run.total_ms,
            "downtime_ms": l.run.downtime_ms,
            "method_link_bytes": l.run.link_bytes,
            "storage_bytes": l.run.storage_bytes,
            "ram_verified": l.run.ram_verified,
            "database_ok_after": l.run.guest_verified_after,
            "postcopy": l.run.postcopy,
            "detail": l.run.detail,
        }));
        run.guest_verified_after = match (run.guest_verified_after, l.run.guest_verified_after) {
            (_, Some(false)) | (Some(false), _) => Some(false),
            (_, Some(true)) if i == 0 => Some(true),
            (Some(true), Some(true)) => Some(true),
            _ => None,
        };
    }
    run.detail = json!({ "policy": policy.name(), "vms": n, "per_vm": per_vm });
    drop(vms);
    Ok(run)
}

/// Checks a fleet size.
pub fn check_vms(vms: u32) -> Result<()> {
    if !(2..=8).contains(&vms) {
        bail!("--vms must be 2 to 8 (each VM needs its RAM on both hosts), not {vms}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_true_needs_every_answer() {
        assert_eq!(all_true([Some(true), Some(true)]), Some(true));
        assert_eq!(all_true([Some(true), None]), None);
        assert_eq!(all_true([None, Some(false)]), Some(false));
        assert_eq!(all_true([]), Some(true));
    }
}
