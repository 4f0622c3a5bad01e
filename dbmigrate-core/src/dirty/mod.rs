//! Dirty-page tracking of a memory range mapped in another process (the VMM),
//! from outside that process.
//!
//! Two backends sit behind [`DirtyTracker`]:
//! - `uffd-wp`: userfaultfd asynchronous write-protect, registered inside the
//!   VMM by the `dbmigrate-preload` library, scanned and re-armed by the agent
//!   with `ioctl(PAGEMAP_SCAN)` on `/proc/PID/pagemap` (Linux >= 6.7);
//! - `soft-dirty`: `/proc/PID/clear_refs` + pagemap bit 55 (distribution kernels
//!   built with `CONFIG_MEM_SOFT_DIRTY`).

use crate::bitmap::PageBitmap;

/// Which mechanism a tracker uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrackerKind {
    /// userfaultfd async write-protect + PAGEMAP_SCAN.
    UffdWp,
    /// clear_refs + pagemap soft-dirty bit.
    SoftDirty,
}

/// The address range of the tracked mapping inside the tracked process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrackedRange {
    /// Process that maps the memory.
    pub pid: u32,
    /// First virtual address of the mapping (page aligned).
    pub start: u64,
    /// One past the last address (page aligned).
    pub end: u64,
}

/// Reports which pages of a tracked range were written since the last call.
pub trait DirtyTracker: Send {
    /// Mechanism in use.
    fn kind(&self) -> TrackerKind;
    /// Forgets every write so far; only writes after this call are reported.
    fn reset(&mut self) -> Result<(), DirtyError>;
    /// Marks in `dirty` (page index relative to the range start) every page
    /// written since the last `reset`/`collect`, re-arms tracking for them,
    /// and returns how many pages it marked.
    fn collect(&mut self, dirty: &mut PageBitmap) -> Result<u64, DirtyError>;
}

mod run;
mod soft_dirty;
mod uffd_wp;

use std::path::{Path, PathBuf};

use thiserror::Error;

pub use run::RunTracker;
pub use soft_dirty::SoftDirtyTracker;
pub use uffd_wp::UffdWpTracker;

/// Dirty-tracking failures, each naming the fix.
#[derive(Debug, Error)]
pub enum DirtyError {
    /// `/proc/PID/...` could not be read.
    #[error("cannot {doing} for process {pid} (is it running, and is the agent root?)")]
    Proc {
        /// Tracked process.
        pid: u32,
        /// What was done.
        doing: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The RAM file is not mapped by that process.
    #[error(
        "process {pid} has no mapping of {path}: is this the QEMU that uses that memory backend?"
    )]
    NoMapping {
        /// Process.
        pid: u32,
        /// RAM file.
        path: PathBuf,
    },
    /// The mapping is not registered for async write-protect.
    #[error("QEMU (pid {pid}) has no userfaultfd write-protect registration on its RAM mapping: start QEMU with `LD_PRELOAD=<dir>/libdbmigrate_preload.so DBMIGRATE_TRACK_PATH=<ram file, or a pattern matching every memory backend's file>` (see `dbmigrate env`), on Linux 6.7 or newer")]
    NotRegistered {
        /// Process.
        pid: u32,
    },
    /// One of several RAM mappings has no userfaultfd write-protect.
    #[error("QEMU (pid {pid}) has no userfaultfd write-protect registration on RAM mapping {index} of {of} ({why}): a VM with several memory backends needs every one registered by the preload library, so DBMIGRATE_TRACK_PATH must be a pattern that matches every backend's mem-path (e.g. /dev/shm/vm1-node*), on Linux 6.7 or newer; soft-dirty cannot track several mappings apart")]
    NotAllRegistered {
        /// Process.
        pid: u32,
        /// Which mapping, in the run's order.
        index: usize,
        /// How many.
        of: usize,
        /// What the attempt said.
        why: String,
    },
    /// `PAGEMAP_SCAN` failed.
    #[error("PAGEMAP_SCAN on process {pid} failed (needs Linux 6.7 or newer)")]
    Scan {
        /// Process.
        pid: u32,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The kernel reported an address outside the tracked range.
    #[error("kernel reported pages {start:#x}-{end:#x} outside the tracked range")]
    OutOfRange {
        /// Region start.
        start: u64,
        /// Region end.
        end: u64,
    },
    /// The host kernel lacks soft-dirty tracking.
    #[error("this kernel has no soft-dirty tracking: use a kernel built with CONFIG_MEM_SOFT_DIRTY, or Linux 6.7+ with the preload library (userfaultfd write-protect)")]
    SoftDirtyUnsupported,
    /// No mechanism works.
    #[error("no dirty-page tracking works for process {pid}: userfaultfd-wp: {uffd}; soft-dirty: {soft}")]
    NoTracker {
        /// Process.
        pid: u32,
        /// Why uffd-wp failed.
        uffd: String,
        /// Why soft-dirty failed.
        soft: String,
    },
}

/// Which tracking mechanisms this host supports, found by trying them on our own memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HostSupport {
    /// userfaultfd async write-protect with PAGEMAP_SCAN works: a write to a
    /// registered page of our own is reported exactly, and only once.
    pub uffd_wp_async: bool,
    /// The `PAGEMAP_SCAN` ioctl exists (Linux 6.7+), whether or not
    /// userfaultfd write-protect works with it.
    pub pagemap_scan: bool,
    /// Soft-dirty bits work.
    pub soft_dirty: bool,
}

impl std::fmt::Display for HostSupport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let yn = |b| if b { "yes" } else { "no" };
        write!(
            f,
            "dirty tracking: PAGEMAP_SCAN: {}; userfaultfd async write-protect: {}; soft-dirty: {}; dbmigrate will use {}",
            yn(self.pagemap_scan),
            yn(self.uffd_wp_async),
            yn(self.soft_dirty),
            if self.uffd_wp_async {
                "userfaultfd write-protect (QEMU needs the preload library)"
            } else if self.soft_dirty {
                "soft-dirty"
            } else {
                "nothing: migration is not possible on this kernel"
            }
        )
    }
}

/// Tries each mechanism on memory of this process: a small shared mapping is
/// registered (or soft-dirty bits cleared), one page written, and the tracker
/// must report exactly that page.
pub fn host_support() -> HostSupport {
    HostSupport {
        uffd_wp_async: uffd_wp::self_test().is_ok(),
        pagemap_scan: uffd_wp::pagemap_scan_works(),
        soft_dirty: soft_dirty::self_test().is_ok(),
    }
}

/// Opens the best tracker for `range`: userfaultfd write-protect, else
/// soft-dirty. When neither works the error carries what each attempt said
/// (for a QEMU started without the preload library on a 6.7+ kernel, the
/// userfaultfd part names the fix).
pub fn open_tracker(range: TrackedRange) -> Result<Box<dyn DirtyTracker>, DirtyError> {
    let uffd = match UffdWpTracker::open(range) {
        Ok(t) => return Ok(Box::new(t)),
        Err(e) => e,
    };
    match SoftDirtyTracker::open(range) {
        Ok(t) => {
            tracing::warn!(
                pid = range.pid,
                "using soft-dirty tracking (the process is stopped for a few ms per round): {uffd}"
            );
            Ok(Box::new(t))
        }
        Err(soft) => Err(DirtyError::NoTracker {
            pid: range.pid,
            uffd: uffd.to_string(),
            soft: soft.to_string(),
        }),
    }
}

/// Opens a tracker for each of `ranges` (the mappings of a RAM made of
/// several files, in the run's order, see [`RunTracker`]); one range gets
/// its tracker as it is.
/// Several ranges take userfaultfd write-protect each: soft-dirty bits are
/// cleared for the whole process at once, so trackers of several ranges
/// would wipe each other's writes.
pub fn open_run_tracker(ranges: &[TrackedRange]) -> Result<Box<dyn DirtyTracker>, DirtyError> {
    if let [one] = ranges {
        return open_tracker(*one);
    }
    let mut parts: Vec<(Box<dyn DirtyTracker>, u64)> = Vec::with_capacity(ranges.len());
    for (i, r) in ranges.iter().enumerate() {
        let t = UffdWpTracker::open(*r).map_err(|e| DirtyError::NotAllRegistered {
            pid: r.pid,
            index: i,
            of: ranges.len(),
            why: e.to_string(),
        })?;
        parts.push((Box::new(t), (r.end - r.start) / 4096));
    }
    Ok(Box::new(RunTracker::new(parts)))
}

/// Finds `path` in `/proc/PID/maps`: the address range where it is mapped from offset 0.
pub fn find_mapping(pid: u32, path: &Path) -> Result<TrackedRange, DirtyError> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(|source| {
        DirtyError::Proc {
            pid,
            doing: "read /proc/PID/maps",
            source,
        }
    })?;
    let want = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    parse_maps(&maps, &want)
        .map(|(start, end)| TrackedRange { pid, start, end })
        .ok_or_else(|| DirtyError::NoMapping {
            pid,
            path: path.to_path_buf(),
        })
}

/// The first run of adjacent VMAs mapping `path` contiguously from file offset 0.
fn parse_maps(maps: &str, path: &Path) -> Option<(u64, u64)> {
    let want = path.to_str()?;
    let mut found: Option<(u64, u64)> = None;
    for line in maps.lines() {
        // start-end perms offset dev inode path
        let mut f = line.splitn(6, ' ');
        let (Some(range), Some(_perms), Some(off), Some(_dev), Some(_inode), Some(p)) =
            (f.next(), f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        if p.trim_start() != want {
            continue;
        }
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(a), Ok(b), Ok(off)) = (
            u64::from_str_radix(a, 16),
            u64::from_str_radix(b, 16),
            u64::from_str_radix(off, 16),
        ) else {
            continue;
        };
        match found {
            None if off == 0 => found = Some((a, b)),
            Some((s, e)) if a == e && off == e - s => found = Some((s, b)),
            _ => {}
        }
    }
    found
}

/// Marks page indexes of `regions` (addresses) relative to `range` in `dirty`.
fn mark_regions(
    range: &TrackedRange,
    regions: &[dbmigrate_uffd::PageRegion],
    dirty: &mut PageBitmap,
) -> Result<u64, DirtyError> {
    let mut n = 0;
    for r in regions {
        if r.start < range.start || r.end > range.end || r.end < r.start {
            return Err(DirtyError::OutOfRange {
                start: r.start,
                end: r.end,
            });
        }
        let first = (r.start - range.start) / 4096;
        let last = (r.end - range.start).div_ceil(4096);
        dirty.set_range(first, last);
        n += last - first;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dbmigrate_uffd::PageRegion;

    #[test]
    fn maps_parsing_merges_adjacent_vmas() {
        let maps = "\
7f0000000000-7f0000100000 rw-s 00000000 00:1a 123 /dev/shm/other
7f1000000000-7f1000200000 rw-s 00000000 00:1a 124 /dev/shm/vm ram
7f1000200000-7f1000400000 rw-s 00200000 00:1a 124 /dev/shm/vm ram
7f2000000000-7f2000001000 r--p 00000000 00:1a 124 /dev/shm/vm ram
";
        assert_eq!(
            parse_maps(maps, Path::new("/dev/shm/vm ram")),
            Some((0x7f10_0000_0000, 0x7f10_0040_0000))
        );
        assert_eq!(parse_maps(maps, Path::new("/dev/shm/none")), None);
    }

    #[test]
    fn maps_parsing_needs_offset_zero_and_contiguity() {
        // QEMU's layout: an anonymous reservation, then the file mapped over
        // part of it; a VMA with a gap or a wrong offset ends the run.
        let maps = "\
7f0000000000-7f0000200000 ---p 00000000 00:00 0 
7f0000200000-7f0000400000 rw-s 00200000 00:1a 9 /dev/shm/ram
7f0000400000-7f0000600000 rw-s 00000000 00:1a 9 /dev/shm/ram
7f0000600000-7f0000800000 rw-s 00200000 00:1a 9 /dev/shm/ram
7f0000900000-7f0000a00000 rw-s 00400000 00:1a 9 /dev/shm/ram
7f0000a00000-7f0000b00000 rw-s 00700000 00:1a 9 /dev/shm/ram
";
        assert_eq!(
            parse_maps(maps, Path::new("/dev/shm/ram")),
            Some((0x7f00_0040_0000, 0x7f00_0080_0000))
        );
        // A prefix of the path, or the file once deleted, is not the file.
        let maps = "\
7f0000000000-7f0000200000 rw-s 00000000 00:1a 9 /dev/shm/ram2
7f0000200000-7f0000400000 rw-s 00000000 00:1a 9 /dev/shm/ram (deleted)
";
        assert_eq!(parse_maps(maps, Path::new("/dev/shm/ram")), None);
        // Garbage lines are skipped.
        assert_eq!(
            parse_maps("nonsense\n\nzz-yy rw-s 0 0 0 /x\n", Path::new("/x")),
            None
        );
    }

    #[test]
    fn empty_and_inverted_regions() {
        let range = TrackedRange {
            pid: 1,
            start: 0x10000,
            end: 0x20000,
        };
        let mut bm = PageBitmap::new(16);
        let empty = [PageRegion {
            start: 0x13000,
            end: 0x13000,
            categories: 2,
        }];
        assert_eq!(mark_regions(&range, &empty, &mut bm).unwrap(), 0);
        assert!(bm.is_clear());
        let inverted = [PageRegion {
            start: 0x14000,
            end: 0x13000,
            categories: 2,
        }];
        assert!(matches!(
            mark_regions(&range, &inverted, &mut bm),
            Err(DirtyError::OutOfRange { .. })
        ));
        let below = [PageRegion {
            start: 0xf000,
            end: 0x11000,
            categories: 2,
        }];
        assert!(mark_regions(&range, &below, &mut bm).is_err());
        // Whole range, unaligned end rounds up to the page it touches.
        let all = [PageRegion {
            start: 0x10000,
            end: 0x1f800,
            categories: 2,
        }];
        assert_eq!(mark_regions(&range, &all, &mut bm).unwrap(), 16);
        assert_eq!(bm.count(), 16);
    }

    #[test]
    fn host_support_display_names_the_choice() {
        let s = HostSupport {
            uffd_wp_async: true,
            pagemap_scan: true,
            soft_dirty: false,
        };
        let text = s.to_string();
        assert!(text.contains("soft-dirty: no"), "{text}");
        assert!(text.contains("will use userfaultfd"), "{text}");
    }

    #[test]
    fn regions_become_relative_pages_and_are_bounded() {
        let range = TrackedRange {
            pid: 1,
            start: 0x10000,
            end: 0x20000,
        };
        let mut bm = PageBitmap::new(16);
        let regs = [PageRegion {
            start: 0x12000,
            end: 0x14000,
            categories: 2,
        }];
        assert_eq!(mark_regions(&range, &regs, &mut bm).unwrap(), 2);
        assert_eq!(bm.iter().collect::<Vec<_>>(), vec![2, 3]);
        let bad = [PageRegion {
            start: 0x1f000,
            end: 0x21000,
            categories: 2,
        }];
        assert!(mark_regions(&range, &bad, &mut bm).is_err());
    }
}
