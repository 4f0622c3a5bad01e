//! The VM's page faults in post-copy: the userfaultfd over QEMU's RAM
//! mapping, the thread that reads it, zero pages, and the RAM owner's
//! post-copy state.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use super::applier::ApplyInput;
use super::DestError;
use crate::bitmap::PageBitmap;
use crate::PAGE_SIZE;

/// One of QEMU's RAM mappings registered with the descriptor: a RAM
/// file's, whose bytes sit at `start` in the run of the RAM files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultRange {
    /// Address of the mapping in QEMU.
    pub base: u64,
    /// Its length.
    pub len: u64,
    /// Where its first byte is in the run of RAM files.
    pub start: u64,
}

/// The VM's page faults, for post-copy: the userfaultfd registered over
/// QEMU's RAM mappings (one per RAM file), the mappings, and the fault unit.
#[derive(Debug)]
pub struct FaultSource {
    /// The descriptor.
    pub uffd: OwnedFd,
    /// The mappings, in the run's order.
    pub ranges: Vec<FaultRange>,
    /// The bytes one fault is served in: 4 KiB on tmpfs (missing-page
    /// faults: a page is filled through the file, then its waiter woken), a
    /// huge page on hugetlbfs (minor faults: every 4 KiB of the huge page
    /// is written through this agent's mapping, then the whole of it is
    /// mapped into QEMU).
    pub unit: u64,
}

impl FaultSource {
    /// A RAM of one file, mapped at `base` for `len` bytes.
    pub fn single(uffd: OwnedFd, base: u64, len: u64, unit: u64) -> Self {
        Self {
            uffd,
            ranges: vec![FaultRange {
                base,
                len,
                start: 0,
            }],
            unit,
        }
    }

    /// The mapping that holds address `a`.
    fn range_of(&self, a: u64) -> Option<&FaultRange> {
        self.ranges
            .iter()
            .find(|r| a >= r.base && a - r.base < r.len)
    }

    /// The RAM page a fault address in QEMU's mappings falls in, if it is
    /// one of the first `pages`.
    pub(super) fn page_at(&self, at: u64, pages: u64) -> Option<u64> {
        self.range_of(at)
            .map(|r| (r.start + (at - r.base)) / PAGE_SIZE as u64)
            .filter(|&p| p < pages)
    }

    /// The start of the fault unit holding address `a` (each mapping
    /// starts on a unit boundary); `a` itself outside the mappings.
    pub(super) fn unit_start(&self, a: u64) -> u64 {
        match self.range_of(a) {
            Some(r) => a - (a - r.base) % self.unit.max(1),
            None => a,
        }
    }

    /// 4 KiB pages per fault unit.
    pub(super) fn unit_pages(&self) -> u64 {
        (self.unit / PAGE_SIZE as u64).max(1)
    }

    /// Minor-fault mode (hugetlbfs).
    pub(super) fn minor(&self) -> bool {
        self.unit > PAGE_SIZE as u64
    }

    /// The address in QEMU of the fault unit whose first page is `first`,
    /// if a mapping holds it.
    pub(super) fn addr_of(&self, first: u64) -> Option<u64> {
        let at = first * PAGE_SIZE as u64;
        self.ranges
            .iter()
            .find(|r| at >= r.start && at - r.start < r.len)
            .map(|r| r.base + (at - r.start))
    }

    /// A mapping that does not start on a fault unit, if one does not.
    pub(super) fn misaligned(&self) -> Option<u64> {
        self.ranges
            .iter()
            .map(|r| r.base)
            .find(|b| b % self.unit.max(1) != 0)
    }
}

/// Post-copy state of the RAM owner, from the switch on.
#[derive(Debug)]
pub(super) struct Post {
    /// Pages whose final content has not been placed yet.
    pub(super) missing: PageBitmap,
    /// Missing pages asked of the source.
    pub(super) requested: PageBitmap,
    /// Faulting units (by their first page) and since when they wait.
    pub(super) waiting: HashMap<u64, Instant>,
    pub(super) faults: Arc<FaultSource>,
    pub(super) since: Instant,
}

/// Lets a fault on a unit that waits for nothing go on: a hole on tmpfs
/// is filled with zeros, a huge page is mapped into QEMU as the file holds
/// it; or, if that happened since the fault, the vCPU is only woken.
pub(super) fn serve_present(f: &FaultSource, at: u64) -> Result<(), DestError> {
    let placed = if f.minor() {
        dbmigrate_uffd::continue_range(&f.uffd, at, f.unit).map_err(|source| DestError::Faults {
            doing: "mapping a huge page into QEMU (UFFDIO_CONTINUE)",
            source,
        })?
    } else {
        dbmigrate_uffd::zeropage(&f.uffd, at, PAGE_SIZE as u64).map_err(|source| {
            DestError::Faults {
                doing: "placing a zero page",
                source,
            }
        })?
    };
    if !placed {
        wake(f, at)?;
    }
    Ok(())
}

/// The unit at `at` now holds its final content (written through the
/// file on tmpfs, through this agent's mapping on hugetlbfs): its waiters go on.
pub(super) fn release(f: &FaultSource, at: u64) -> Result<(), DestError> {
    if f.minor() {
        return serve_present(f, at);
    }
    wake(f, at)
}

fn wake(f: &FaultSource, at: u64) -> Result<(), DestError> {
    dbmigrate_uffd::wake(&f.uffd, at, f.unit).map_err(|source| DestError::Faults {
        doing: "waking a faulting vCPU",
        source,
    })
}

/// Reads the VM's page faults until `stop` is set.
pub(super) fn fault_reader(
    f: Arc<FaultSource>,
    tx: mpsc::Sender<ApplyInput>,
    stop: Arc<AtomicBool>,
) {
    let mut addrs = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        match dbmigrate_uffd::read_faults(&f.uffd, 100, &mut addrs) {
            Ok(_) if addrs.is_empty() => {}
            Ok(_) => {
                if tx
                    .blocking_send(ApplyInput::Faults(std::mem::take(&mut addrs)))
                    .is_err()
                {
                    return;
                }
            }
            Err(e) => {
                let _ = tx.blocking_send(ApplyInput::Failed(DestError::Faults {
                    doing: "reading page faults",
                    source: e,
                }));
                return;
            }
        }
    }
}

#[cfg(test)]
impl Post {
    /// A post-copy state with `missing` pages, over a descriptor that
    /// serves no faults (for tests of the phases).
    pub(super) fn for_tests(missing: PageBitmap) -> Self {
        let fd = std::fs::File::open("/dev/null").expect("/dev/null");
        Self {
            requested: PageBitmap::new(missing.len()),
            missing,
            waiting: HashMap::new(),
            faults: Arc::new(FaultSource::single(fd.into(), 0, 0, PAGE_SIZE as u64)),
            since: Instant::now(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_addresses_of_two_mappings_are_pages_of_one_run() {
        let fd: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let p = PAGE_SIZE as u64;
        // File 0 (3 pages) mapped high, file 1 (5 pages) mapped low.
        let f = FaultSource {
            uffd: fd,
            ranges: vec![
                FaultRange {
                    base: 0x9000_0000,
                    len: 3 * p,
                    start: 0,
                },
                FaultRange {
                    base: 0x1000_0000,
                    len: 5 * p,
                    start: 3 * p,
                },
            ],
            unit: p,
        };
        assert_eq!(f.page_at(0x9000_0000 + 2 * p + 5, 8), Some(2));
        assert_eq!(f.page_at(0x1000_0000, 8), Some(3));
        assert_eq!(f.page_at(0x1000_0000 + 4 * p, 8), Some(7));
        assert_eq!(f.page_at(0x1000_0000 + 5 * p, 8), None, "past file 1");
        assert_eq!(f.page_at(0x5000, 8), None);
        assert_eq!(f.addr_of(3), Some(0x1000_0000));
        assert_eq!(f.addr_of(1), Some(0x9000_0000 + p));
        assert_eq!(f.addr_of(8), None);
        assert_eq!(f.unit_start(0x1000_0000 + p + 7), 0x1000_0000 + p);
        assert_eq!(f.misaligned(), None);
    }
}
