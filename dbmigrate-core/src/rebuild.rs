//! Rebuilding pages from shared storage instead of sending them.
//!
//! A hint says that a guest page should equal 4 KiB of one of the VM's disks.
//! Hints are untrusted: the source checks them ([`check_hint`]) and sends,
//! instead of the page, a reference (disk, offset, xxh3-128 of the RAM
//! content); the destination reads storage, hashes, and writes the page only
//! if the hash matches, otherwise it asks for the real page. A wrong hint can
//! slow a migration, never corrupt one.

use thiserror::Error;

use crate::addr::{DiskOffset, PageIndex};
use crate::PAGE_SIZE_U64;

/// Where a page's content may be found on shared storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Hint {
    /// Index of the VM's disk (as the agents both number them).
    pub disk: u16,
    /// Byte offset on that disk.
    pub offset: DiskOffset,
}

/// Why a hint was not followed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum HintReject {
    /// The disk is not one of this VM's.
    #[error("disk {disk} is not one of the VM's {disks} disks")]
    ForeignDisk {
        /// The disk named.
        disk: u16,
        /// How many the VM has.
        disks: usize,
    },
    /// Not on a page boundary.
    #[error("offset {offset} is not 4 KiB aligned")]
    Misaligned {
        /// The offset.
        offset: DiskOffset,
    },
    /// Past the end of the disk.
    #[error("offset {offset} + 4 KiB is beyond the disk's {size} bytes")]
    OutOfRange {
        /// The offset.
        offset: DiskOffset,
        /// Disk size.
        size: u64,
    },
}

/// Accepts a hint only if it names one of `disk_sizes` and a whole aligned page inside it.
pub fn check_hint(h: Hint, disk_sizes: &[u64]) -> Result<(), HintReject> {
    let size = *disk_sizes
        .get(usize::from(h.disk))
        .ok_or(HintReject::ForeignDisk {
            disk: h.disk,
            disks: disk_sizes.len(),
        })?;
    if h.offset.0 % PAGE_SIZE_U64 != 0 {
        return Err(HintReject::Misaligned { offset: h.offset });
    }
    if h.offset
        .0
        .checked_add(PAGE_SIZE_U64)
        .is_none_or(|end| end > size)
    {
        return Err(HintReject::OutOfRange {
            offset: h.offset,
            size,
        });
    }
    Ok(())
}

/// Hints for the source, per page of the RAM file.
pub trait HintSource: Send + Sync + std::fmt::Debug {
    /// The hint for `page`, if any.
    fn hint(&self, page: PageIndex) -> Option<Hint>;

    /// Said once no round of the session will ask again (only the first
    /// round sends references: [`crate::source::references_in_round`]): a
    /// source that keeps itself fresh may stop.
    fn no_longer_needed(&self) {}
}

/// Hashes a page number for a [`PageMap`]: one multiplication. The keys
/// are the map's own page numbers, not a peer's choice, and the default
/// SipHash cost more than the rest of a per-page lookup in a round.
#[derive(Clone, Copy, Debug, Default)]
pub struct PageHasher(u64);

impl std::hash::Hasher for PageHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        // Fibonacci hashing: consecutive pages spread over the high bits
        // (control bytes) and stay distinct in the low bits (bucket index).
        self.0 = (self.0 ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// A map keyed by page of the RAM file.
pub type PageMap<V> =
    std::collections::HashMap<PageIndex, V, std::hash::BuildHasherDefault<PageHasher>>;

/// A table of hints indexed by page.
#[derive(Clone, Debug, Default)]
pub struct HintTable {
    hints: PageMap<Hint>,
}

impl HintTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }
    /// Sets the hint of `page`.
    pub fn insert(&mut self, page: PageIndex, hint: Hint) {
        self.hints.insert(page, hint);
    }
    /// Number of hinted pages.
    pub fn len(&self) -> usize {
        self.hints.len()
    }
    /// True when no page is hinted.
    pub fn is_empty(&self) -> bool {
        self.hints.is_empty()
    }
}

impl HintSource for HintTable {
    fn hint(&self, page: PageIndex) -> Option<Hint> {
        self.hints.get(&page).copied()
    }
}

/// One reference the destination must resolve.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefRequest {
    /// RAM page.
    pub page: u64,
    /// The page's message version when the reference arrived.
    pub version: u32,
    /// Where to read.
    pub hint: Hint,
    /// Expected xxh3-128 of the page.
    pub hash: u128,
}

/// One storage read: `pages` blocks of a disk from `offset`, serving the
/// requests in `reqs` (each at its own block of the read).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Run {
    /// Disk the run is on.
    pub disk: u16,
    /// Disk offset of the first block.
    pub offset: DiskOffset,
    /// Blocks to read, gaps between the requested ones included.
    pub pages: usize,
    /// The requests, sorted by offset; several may share a block.
    pub reqs: Vec<RefRequest>,
}

impl Run {
    /// The block of the read that holds `req`.
    pub fn slot(&self, req: &RefRequest) -> usize {
        usize::try_from((req.hint.offset.0 - self.offset.0) / PAGE_SIZE_U64)
            .expect("inside the run")
    }
}

/// Groups requests into runs of the same disk (sorted by disk and offset),
/// so that one read serves many pages. A run reads through gaps of up to
/// `max_gap` blocks that nobody asked for: on this kind of storage a
/// request costs far more than the bytes it carries, and a warm buffer pool
/// leaves mostly small holes (a page not cached) between long stretches of
/// cached pages. A run never reads more than `max_run` blocks. Pure.
pub fn coalesce(mut reqs: Vec<RefRequest>, max_run: usize, max_gap: usize) -> Vec<Run> {
    reqs.sort_by_key(|r| (r.hint.disk, r.hint.offset));
    let max_run = max_run.max(1) as u64;
    let mut runs: Vec<Run> = Vec::new();
    for r in reqs {
        if let Some(run) = runs.last_mut() {
            let (at, start) = (r.hint.offset.0, run.offset.0);
            let end = start + run.pages as u64 * PAGE_SIZE_U64;
            let joins = run.disk == r.hint.disk
                && (at - start) % PAGE_SIZE_U64 == 0
                && at < end + (max_gap as u64 + 1) * PAGE_SIZE_U64
                && (at - start) / PAGE_SIZE_U64 < max_run;
            if joins {
                let blocks = (at - start) / PAGE_SIZE_U64 + 1;
                run.pages = run
                    .pages
                    .max(usize::try_from(blocks).expect("below max_run"));
                run.reqs.push(r);
                continue;
            }
        }
        runs.push(Run {
            disk: r.hint.disk,
            offset: r.hint.offset,
            pages: 1,
            reqs: vec![r],
        });
    }
    runs
}

/// Whether to read shared storage now. A read that failed (a cut storage
/// link, a dead server) costs its I/O timeout; without this every further
/// read would cost one too, while the source waits. After a failure storage
/// is left alone for a while, doubling from [`StorageBreaker::FIRST_PAUSE`]
/// up to [`StorageBreaker::LONGEST_PAUSE`]; meanwhile references are asked
/// of the source at once. The first read after a pause probes storage again.
#[derive(Debug)]
pub struct StorageBreaker {
    paused_until: Option<std::time::Instant>,
    pause: std::time::Duration,
}

impl Default for StorageBreaker {
    fn default() -> Self {
        Self {
            paused_until: None,
            pause: Self::FIRST_PAUSE,
        }
    }
}

impl StorageBreaker {
    /// Pause after the first failure.
    pub const FIRST_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);
    /// Longest pause after repeated failures.
    pub const LONGEST_PAUSE: std::time::Duration = std::time::Duration::from_secs(16);

    /// Storage may be read at `now`.
    pub fn allows(&self, now: std::time::Instant) -> bool {
        self.paused_until.is_none_or(|until| now >= until)
    }

    /// A read failed at `now`: pause, longer each time in a row.
    pub fn failed(&mut self, now: std::time::Instant) {
        self.paused_until = Some(now + self.pause);
        self.pause = (self.pause * 2).min(Self::LONGEST_PAUSE);
    }

    /// A read succeeded: storage is healthy again.
    pub fn succeeded(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_are_checked() {
        let disks = [1 << 20, 8192];
        assert_eq!(
            check_hint(
                Hint {
                    disk: 0,
                    offset: DiskOffset(4096)
                },
                &disks
            ),
            Ok(())
        );
        assert_eq!(
            check_hint(
                Hint {
                    disk: 1,
                    offset: DiskOffset(4096)
                },
                &disks
            ),
            Ok(())
        );
        assert!(matches!(
            check_hint(
                Hint {
                    disk: 1,
                    offset: DiskOffset(8192)
                },
                &disks
            ),
            Err(HintReject::OutOfRange { .. })
        ));
        assert!(matches!(
            check_hint(
                Hint {
                    disk: 0,
                    offset: DiskOffset(100)
                },
                &disks
            ),
            Err(HintReject::Misaligned { .. })
        ));
        assert!(matches!(
            check_hint(
                Hint {
                    disk: 2,
                    offset: DiskOffset(0)
                },
                &disks
            ),
            Err(HintReject::ForeignDisk { .. })
        ));
        assert!(matches!(
            check_hint(
                Hint {
                    disk: 0,
                    offset: DiskOffset(u64::MAX - 4095)
                },
                &disks
            ),
            Err(HintReject::OutOfRange { .. })
        ));
    }

    #[test]
    fn storage_is_left_alone_longer_after_each_failure_and_healthy_after_a_read() {
        use std::time::{Duration, Instant};
        let t = Instant::now();
        let mut b = StorageBreaker::default();
        assert!(b.allows(t));
        b.failed(t);
        assert!(!b.allows(t + Duration::from_millis(999)));
        assert!(b.allows(t + Duration::from_secs(1)));
        // The probe fails too: the next pause is twice as long.
        let t2 = t + Duration::from_secs(1);
        b.failed(t2);
        assert!(!b.allows(t2 + Duration::from_millis(1999)));
        assert!(b.allows(t2 + Duration::from_secs(2)));
        for _ in 0..10 {
            b.failed(t2);
        }
        assert!(b.allows(t2 + StorageBreaker::LONGEST_PAUSE));
        b.succeeded();
        assert!(b.allows(t2));
        b.failed(t2);
        assert!(b.allows(t2 + StorageBreaker::FIRST_PAUSE));
    }

    #[test]
    fn coalescing_merges_adjacent_pages_and_small_gaps() {
        let r = |page, disk, offset| RefRequest {
            page,
            version: 1,
            hint: Hint { disk, offset },
            hash: 0,
        };
        let reqs = vec![
            r(1, 0, DiskOffset(8192)),
            r(2, 0, DiskOffset(4096)),
            r(3, 1, DiskOffset(12288)),
            r(4, 0, DiskOffset(0)),
            r(5, 0, DiskOffset(20480)),
            r(6, 0, DiskOffset(20480)),
            r(7, 0, DiskOffset(5 * 4096 + 100)),
        ];
        // (disk, offset, blocks, [(RAM page, block)]) of each run.
        type Shape = (u16, u64, usize, Vec<(u64, usize)>);
        let shape = |runs: &[Run]| -> Vec<Shape> {
            runs.iter()
                .map(|run| {
                    let reqs = run.reqs.iter().map(|x| (x.page, run.slot(x))).collect();
                    (run.disk, run.offset.0, run.pages, reqs)
                })
                .collect()
        };
        // Without gaps: only consecutive blocks; the same block twice
        // (two RAM pages with one content) is read once.
        assert_eq!(
            shape(&coalesce(reqs.clone(), 16, 0)),
            vec![
                (0, 0, 3, vec![(4, 0), (2, 1), (1, 2)]),
                (0, 20480, 1, vec![(5, 0), (6, 0)]),
                (0, 20580, 1, vec![(7, 0)]),
                (1, 12288, 1, vec![(3, 0)]),
            ]
        );
        // A gap of two blocks is read through when two are allowed; a
        // misaligned offset and another disk still start their own run.
        assert_eq!(
            shape(&coalesce(reqs.clone(), 16, 2)),
            vec![
                (0, 0, 6, vec![(4, 0), (2, 1), (1, 2), (5, 5), (6, 5)]),
                (0, 20580, 1, vec![(7, 0)]),
                (1, 12288, 1, vec![(3, 0)]),
            ]
        );
        assert_eq!(shape(&coalesce(reqs.clone(), 16, 1))[0].2, 3);
        // The longest read bounds a run, gaps included.
        assert_eq!(
            shape(&coalesce(reqs, 5, 2))[1],
            (0, 20480, 1, vec![(5, 0), (6, 0)])
        );
        assert_eq!(
            coalesce(
                vec![r(1, 0, DiskOffset(0)), r(2, 0, DiskOffset(4096))],
                1,
                0
            )
            .len(),
            2
        );
    }
}
