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

/// The VM's page faults, for post-copy: the userfaultfd registered over
/// QEMU's RAM mapping and that mapping's address, length and fault unit.
#[derive(Debug)]
pub struct FaultSource {
    /// The descriptor.
    pub uffd: OwnedFd,
    /// Address of the RAM mapping in QEMU.
    pub base: u64,
    /// Its length.
    pub len: u64,
    /// The bytes one fault is served in: 4 KiB on tmpfs (missing-page
    /// faults: a page is filled through the file, then its waiter woken), a
    /// huge page on hugetlbfs (minor faults: every 4 KiB of the huge page
    /// is written through this agent's mapping, then the whole of it is
    /// mapped into QEMU).
    pub unit: u64,
}

impl FaultSource {
    /// The RAM page a fault address in QEMU's mapping falls in, if it is
    /// one of the first `pages`.
    pub(super) fn page_at(&self, at: u64, pages: u64) -> Option<u64> {
        at.checked_sub(self.base)
            .map(|o| o / PAGE_SIZE as u64)
            .filter(|&p| p < pages)
    }

    /// The start of the fault unit holding address `a` (the mapping starts
    /// on a unit boundary).
    pub(super) fn unit_start(&self, a: u64) -> u64 {
        a - a.wrapping_sub(self.base) % self.unit.max(1)
    }

    /// 4 KiB pages per fault unit.
    pub(super) fn unit_pages(&self) -> u64 {
        (self.unit / PAGE_SIZE as u64).max(1)
    }

    /// Minor-fault mode (hugetlbfs).
    pub(super) fn minor(&self) -> bool {
        self.unit > PAGE_SIZE as u64
    }

    /// The address of the fault unit whose first page is `first`.
    pub(super) fn addr_of(&self, first: u64) -> u64 {
        self.base + first * PAGE_SIZE as u64
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
            faults: Arc::new(FaultSource {
                uffd: fd.into(),
                base: 0,
                len: 0,
                unit: PAGE_SIZE as u64,
            }),
            since: Instant::now(),
        }
    }
}
