//! The storage-read references of `compare-db`: no migration, the
//! destination host reads the VM's disk from shared storage.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use dbmigrate_testbed::{DbBed, MariadbGuest};
use serde_json::json;

use crate::db::{consistent, under_load, DbSetup};
use crate::hosts::Host;
use crate::Run;

/// A reference run, not a migration: while the load runs, the
/// destination host reads the VM's whole disk from shared storage
/// (`qemu-img convert` over NBD into a scratch file it then deletes), the
/// kind of read a rebuild makes of the buffer pool, with no migration, no
/// hashing and no dbmigrate process. Through the VM's own storage server,
/// or (`separate`) a second read-only one on the same file. The "during"
/// window is the read; `storage_bytes` what the destination's storage
/// link received meanwhile.
pub(crate) fn run(
    s: &DbSetup,
    guest: &MariadbGuest,
    bed: &DbBed,
    method: &str,
    separate: bool,
) -> Result<Run> {
    let src = bed.start_slot_vm(
        0, guest, true, false, s.ram_mib, &s.pool, false, None, false,
    )?;
    s.hosts.pin_bed(bed)?;
    src.wait_console("DBM-READY pool", Duration::from_secs(900))?;
    let second = if separate {
        Some(bed.second_storage_server(0, 10_900)?)
    } else {
        None
    };
    s.hosts.pin_bed(bed)?;
    let url = second
        .as_ref()
        .map_or_else(|| bed.nbd_from_dst.clone(), |(_, url)| url.clone());
    let mut run = under_load(s, guest, bed, || {
        Ok((read(s, bed, method, separate, &url)?, None))
    })?;
    // The VM never moved: its database is checked where it runs.
    run.guest_verified_after = run.completed.then(|| consistent(s, bed, &bed.vm_ip));
    if let Some((mut server, _)) = second {
        let _ = server.kill();
        let _ = server.wait();
    }
    drop(src);
    Ok(run)
}

/// Reads the disk at `url` from the destination host; the run without its workload.
fn read(s: &DbSetup, bed: &DbBed, method: &str, separate: bool, url: &str) -> Result<Run> {
    let scratch = PathBuf::from(format!("/dev/shm/{}-storage-read.img", bed.tb.tag));
    let rx_before = bed.dst_storage_rx_bytes()?;
    let from = std::time::Instant::now();
    let mut convert = bed.tb.in_ns(&bed.tb.dst_ns, Path::new("qemu-img"));
    convert.args(["convert", "-f", "raw", "-O", "raw", "-m", "4", "-W"]);
    if s.storage_read_mbyte_s > 0 {
        convert.args([
            "-r",
            &format!("{}", u64::from(s.storage_read_mbyte_s) * 1_000_000),
        ]);
    }
    convert.arg(url).arg(&scratch).stdin(Stdio::null());
    let out = s
        .hosts
        .wrap(Host::Destination, convert)
        .output()
        .context("running qemu-img convert (install qemu-utils)")?;
    let read_ms = dbmigrate_core::stats::millis(from.elapsed());
    let _ = std::fs::remove_file(&scratch);
    let storage_bytes = bed.dst_storage_rx_bytes()?.saturating_sub(rx_before);
    if !out.status.success() {
        eprintln!(
            "   the storage read failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(Run {
        method: method.into(),
        completed: out.status.success(),
        storage_bytes,
        detail: json!({
            "reference": "no migration: the destination host read the VM's whole disk over NBD (qemu-img convert) while the load ran; the during window is the read",
            "storage_server": if separate { "a second, read-only qemu-nbd on the same file" } else { "the VM's own qemu-nbd" },
            "read_ms": read_ms,
            "read_rate_limit_mbyte_per_s": (s.storage_read_mbyte_s > 0).then_some(s.storage_read_mbyte_s),
            "read_mbyte_per_s": storage_bytes as f64 / 1e3 / read_ms.max(1) as f64,
        }),
        ..Run::default()
    })
}
