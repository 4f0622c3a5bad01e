//! userfaultfd asynchronous write-protect, scanned with `PAGEMAP_SCAN`.

use std::fs::File;

use dbmigrate_uffd::{pagemap_scan, PageRegion, PM_SCAN_CHECK_WPASYNC, PM_SCAN_WP_MATCHING};

use super::{mark_regions, DirtyError, DirtyTracker, TrackedRange, TrackerKind};
use crate::bitmap::PageBitmap;
use crate::sys;

/// Tracks a range that the preload library registered inside the VMM.
pub struct UffdWpTracker {
    range: TrackedRange,
    pagemap: File,
    regions: Vec<PageRegion>,
    scratch: PageBitmap,
}

impl UffdWpTracker {
    /// Opens `/proc/PID/pagemap` and checks that the range is registered.
    pub fn open(range: TrackedRange) -> Result<Self, DirtyError> {
        let pagemap = File::open(format!("/proc/{}/pagemap", range.pid)).map_err(|source| {
            DirtyError::Proc {
                pid: range.pid,
                doing: "open /proc/PID/pagemap",
                source,
            }
        })?;
        let pages = (range.end - range.start) / 4096;
        let mut t = Self {
            range,
            pagemap,
            regions: vec![PageRegion::default(); 4096],
            scratch: PageBitmap::new(pages),
        };
        // A scan without WP_MATCHING changes nothing; CHECK_WPASYNC makes it
        // fail with EPERM if the preload library did not register the range.
        t.scan(PM_SCAN_CHECK_WPASYNC, None)?;
        Ok(t)
    }

    fn scan(&mut self, flags: u64, mut dirty: Option<&mut PageBitmap>) -> Result<u64, DirtyError> {
        let mut pos = self.range.start;
        let mut total = 0;
        while pos < self.range.end {
            let (n, walk_end) =
                pagemap_scan(&self.pagemap, pos, self.range.end, flags, &mut self.regions)
                    .map_err(|source| match source.raw_os_error() {
                        Some(libc::EPERM) => DirtyError::NotRegistered {
                            pid: self.range.pid,
                        },
                        _ => DirtyError::Scan {
                            pid: self.range.pid,
                            source,
                        },
                    })?;
            let target = match dirty.as_deref_mut() {
                Some(d) => d,
                None => &mut self.scratch,
            };
            total += mark_regions(&self.range, &self.regions[..n], target)?;
            if walk_end <= pos || walk_end > self.range.end {
                // The kernel must make progress inside the range.
                return Err(DirtyError::OutOfRange {
                    start: pos,
                    end: walk_end,
                });
            }
            pos = walk_end;
        }
        Ok(total)
    }
}

impl DirtyTracker for UffdWpTracker {
    fn kind(&self) -> TrackerKind {
        TrackerKind::UffdWp
    }

    fn reset(&mut self) -> Result<(), DirtyError> {
        self.scan(PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC, None)?;
        self.scratch.clear();
        Ok(())
    }

    fn collect(&mut self, dirty: &mut PageBitmap) -> Result<u64, DirtyError> {
        // One call reports the written pages and write-protects them again,
        // atomically per page: a write is either reported now or later.
        self.scan(PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC, Some(dirty))
    }
}

/// Registers a small shared mapping of our own and checks that a write is
/// reported exactly.
pub(super) fn self_test() -> Result<(), DirtyError> {
    let pid = std::process::id();
    let mem = sys::mmap::TestMapping::new(16).map_err(|source| DirtyError::Proc {
        pid,
        doing: "map test memory",
        source,
    })?;
    let _uffd =
        dbmigrate_uffd::register_wp_async(mem.addr(), mem.len()).map_err(|e| DirtyError::Scan {
            pid,
            source: e.error,
        })?;
    let range = TrackedRange {
        pid,
        start: mem.addr(),
        end: mem.addr() + mem.len(),
    };
    let mut t = UffdWpTracker::open(range)?;
    t.reset()?;
    mem.write_page(3);
    let mut bm = PageBitmap::new(16);
    t.collect(&mut bm)?;
    if bm.iter().collect::<Vec<_>>() != vec![3] {
        return Err(DirtyError::Scan {
            pid,
            source: std::io::Error::other("self-test write was not reported exactly"),
        });
    }
    // The collect re-protected the page: nothing is left to report.
    bm.clear();
    if t.collect(&mut bm)? != 0 || !bm.is_clear() {
        return Err(DirtyError::Scan {
            pid,
            source: std::io::Error::other("self-test write was reported twice"),
        });
    }
    Ok(())
}

/// Whether the kernel knows `PAGEMAP_SCAN` at all (a plain scan of a few
/// pages of our own, without write-protect flags).
pub(super) fn pagemap_scan_works() -> bool {
    let Ok(mem) = sys::mmap::TestMapping::new(4) else {
        return false;
    };
    let Ok(pagemap) = File::open("/proc/self/pagemap") else {
        return false;
    };
    let mut out = [PageRegion::default(); 4];
    pagemap_scan(&pagemap, mem.addr(), mem.addr() + mem.len(), 0, &mut out).is_ok()
}
