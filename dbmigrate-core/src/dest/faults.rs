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
/// QEMU's RAM mapping (missing mode) and that mapping's address and length.
#[derive(Debug)]
pub struct FaultSource {
    /// The descriptor.
    pub uffd: OwnedFd,
    /// Address of the RAM mapping in QEMU.
    pub base: u64,
    /// Its length.
    pub len: u64,
}

impl FaultSource {
    /// The RAM page a (page-aligned) fault address in QEMU's mapping
    /// falls in, if it is one of the first `pages`.
    pub(super) fn page_at(&self, at: u64, pages: u64) -> Option<u64> {
        at.checked_sub(self.base)
            .map(|o| o / PAGE_SIZE as u64)
            .filter(|&p| p < pages)
    }
}

/// Post-copy state of the RAM owner, from the switch on.
#[derive(Debug)]
pub(super) struct Post {
    /// Pages whose final content has not been placed yet.
    pub(super) missing: PageBitmap,
    /// Missing pages asked of the source.
    pub(super) requested: PageBitmap,
    /// Faulting pages and since when they wait.
    pub(super) waiting: HashMap<u64, Instant>,
    pub(super) faults: Arc<FaultSource>,
    pub(super) since: Instant,
}

/// Fills a faulting page with zeros, or only wakes the vCPU if the page
/// was filled since the fault.
pub(super) fn serve_zero(f: &FaultSource, at: u64) -> Result<(), DestError> {
    let filled = dbmigrate_uffd::zeropage(&f.uffd, at, PAGE_SIZE as u64).map_err(|source| {
        DestError::Faults {
            doing: "placing a zero page",
            source,
        }
    })?;
    if !filled {
        dbmigrate_uffd::wake(&f.uffd, at, PAGE_SIZE as u64).map_err(|source| {
            DestError::Faults {
                doing: "waking a faulting vCPU",
                source,
            }
        })?;
    }
    Ok(())
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
            }),
            since: Instant::now(),
        }
    }
}
