//! The storage side of a run's physical bound: how fast a plain
//! sequential read of the VM's disk goes from the destination host on this
//! bed, through the same path the rebuild reads (NBD from the storage
//! server, or the local block device), with no hashing and no RAM to fill.
//! Measured on the idle bed before the VMs start, so it is the best rate
//! the storage side offers: the bound it gives is a lower bound on time.

use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use dbmigrate_core::addr::DiskOffset;
use dbmigrate_testbed::DbBed;
use serde::{Deserialize, Serialize};

use crate::db::DbSetup;
use crate::hosts::Host;

/// Bytes a probe reads: about what a first round rebuilds of the 2 GiB VM.
pub(crate) const PROBE_BYTES: u64 = 1 << 30;

/// One read (the rebuild's longest, 1 MiB).
const READ: usize = 1 << 20;

/// Reads kept in flight per thread, and threads: as the rebuild's readers.
const IN_FLIGHT: usize = 8;
const THREADS: u64 = 4;

/// What a probe measured.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
pub(crate) struct Probe {
    pub bytes: u64,
    pub ms: u64,
    pub mbyte_per_s: f64,
}

/// `bench storage-probe`: [`measure`], printed as JSON.
pub(crate) fn probe_here(storage: &str, bytes: u64) -> Result<()> {
    println!("{}", serde_json::to_string(&measure(storage, bytes)?)?);
    Ok(())
}

/// Reads `bytes` (at most the disk, in whole reads) from the start of
/// `storage` (an `nbd://` address or a path) in 1 MiB reads, several
/// threads with several reads in flight each.
pub(crate) fn measure(storage: &str, bytes: u64) -> Result<Probe> {
    let disk = dbmigrate_core::storage::open(&[storage.to_string()], Duration::from_secs(10))
        .context("opening the disk to probe")?
        .context("no disk to probe")?;
    let size = disk.disk_sizes().first().copied().unwrap_or(0);
    let bytes = bytes.min(size) / READ as u64 * READ as u64;
    if bytes == 0 {
        bail!("the disk {storage} holds less than one read ({size} bytes)");
    }
    let chunks = bytes / READ as u64;
    let next = Arc::new(AtomicU64::new(0));
    let from = Instant::now();
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            let (disk, next) = (disk.clone(), next.clone());
            std::thread::spawn(move || -> Result<()> {
                let mut bufs = vec![vec![0u8; READ]; IN_FLIGHT];
                loop {
                    let first = next.fetch_add(IN_FLIGHT as u64, Ordering::Relaxed);
                    if first >= chunks {
                        return Ok(());
                    }
                    let n = usize::try_from(chunks - first)
                        .map_or(IN_FLIGHT, |left| left.min(IN_FLIGHT));
                    let mut reads: Vec<(DiskOffset, &mut [u8])> = bufs
                        .iter_mut()
                        .take(n)
                        .enumerate()
                        .map(|(i, b)| (DiskOffset((first + i as u64) * READ as u64), &mut b[..]))
                        .collect();
                    disk.read_many(0, &mut reads)?;
                }
            })
        })
        .collect();
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("a probe thread panicked"))??;
    }
    let ms = dbmigrate_core::stats::millis(from.elapsed()).max(1);
    Ok(Probe {
        bytes,
        ms,
        mbyte_per_s: bytes as f64 / 1e3 / ms as f64,
    })
}

/// Runs the probe from the destination host of `bed` (pinned as the
/// destination is) against `storage`, the disk as the rebuild reads it.
pub(crate) fn probe(s: &DbSetup, bed: &DbBed, storage: &str) -> Result<Probe> {
    let bench = std::env::current_exe().context("finding the bench binary")?;
    let mut c = bed.tb.in_ns(&bed.tb.dst_ns, &bench);
    c.args(["storage-probe", "--storage", storage, "--bytes"])
        .arg(PROBE_BYTES.to_string())
        .stdin(Stdio::null());
    let out = s
        .hosts
        .wrap(Host::Destination, c)
        .output()
        .context("running the storage probe")?;
    if !out.status.success() {
        bail!(
            "the storage probe of {storage} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("reading the storage probe's answer")
}

/// The physical bound of design §6 (ms): the first round's bytes on the
/// migration link (the pages no disk holds, as they crossed) over its
/// rate, the pages a disk holds over the storage side's measured rate,
/// whichever takes longer (pure).
pub(crate) fn physical_bound_ms(
    link_bytes: u64,
    rebuildable_bytes: u64,
    link_bytes_per_s: f64,
    storage_bytes_per_s: f64,
) -> f64 {
    let link = link_bytes as f64 / link_bytes_per_s.max(1.0);
    let storage = rebuildable_bytes as f64 / storage_bytes_per_s.max(1.0);
    link.max(storage) * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_is_the_slower_side() {
        // 125 MB over 125 MB/s: 1 s; 1 GB over 400 MB/s: 2.5 s.
        assert_eq!(
            physical_bound_ms(125_000_000, 1_000_000_000, 125e6, 400e6),
            2500.0
        );
        assert_eq!(physical_bound_ms(500_000_000, 0, 125e6, 400e6), 4000.0);
        assert_eq!(physical_bound_ms(0, 0, 125e6, 0.0), 0.0);
    }

    #[test]
    fn a_probe_reads_a_file_and_reports_its_rate() {
        let dir = std::env::temp_dir().join(format!("dbm-probe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("disk.img");
        std::fs::write(&img, vec![7u8; 3 * READ + 100]).unwrap();
        let p = measure(&img.to_string_lossy(), 1 << 40).unwrap();
        assert_eq!(p.bytes, 3 * READ as u64);
        assert!(p.ms >= 1 && p.mbyte_per_s > 0.0);
        assert_eq!(
            measure(&img.to_string_lossy(), READ as u64).unwrap().bytes,
            READ as u64
        );
        assert!(measure(&dir.join("missing").to_string_lossy(), 1 << 20).is_err());
        std::fs::write(&img, [0u8; 100]).unwrap();
        let short = measure(&img.to_string_lossy(), 1 << 20).unwrap_err();
        assert!(short.to_string().contains("less than one read"), "{short}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
