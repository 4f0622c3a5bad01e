//! The destination's RAM file on hugetlbfs: its pages (2 MiB) are
//! allocated, punched and mapped whole, and it has no `write(2)`, so every
//! page is stored through this agent's mapping into a huge page allocated
//! beforehand.

use super::{DestRam, Prepared, RamError};
use crate::PAGE_SIZE_U64;

impl DestRam {
    /// Makes sure the file holds the huge pages under `at..at+len` before
    /// this agent stores into them: a store into a page the file lacks
    /// would allocate it by a fault and, with no huge page free, kill the
    /// agent with SIGBUS, where `fallocate` says so as an error. Known
    /// allocated: everything after [`DestRam::zero_and_allocate`], or
    /// what a background allocation has reached.
    pub(super) fn ensure_allocated(&mut self, at: usize, len: usize) -> Result<(), RamError> {
        let known = match self.writer.background {
            None => self.writer.prepared == Prepared::ZeroedAllocated,
            Some(_) => self.allocated(at, len)?,
        };
        if known {
            return Ok(());
        }
        let unit = self.writer.file_page;
        let start = at as u64 / unit * unit;
        let end = ((at + len) as u64)
            .div_ceil(unit)
            .saturating_mul(unit)
            .min(self.len());
        self.files.allocate(
            start,
            end - start,
            "allocating huge pages (fallocate; are enough huge pages reserved for the guest?)",
        )
    }

    /// Makes sure the file holds the huge page of `page` (hugetlbfs; a
    /// no-op elsewhere): for a guest's fault on a page the file lacks,
    /// which can then be mapped into the guest like any other.
    pub fn hold_huge_page(&mut self, page: u64) -> Result<(), RamError> {
        let pages = self.pages();
        if page >= pages {
            return Err(RamError::OutOfRange { page, pages });
        }
        if !self.huge_pages() {
            return Ok(());
        }
        let at = usize::try_from(page * PAGE_SIZE_U64).expect("below len");
        self.ensure_allocated(at, 1)
    }

    /// Makes the huge page that holds `page` fault again in every process
    /// that mapped it (hugetlbfs only; a no-op elsewhere): its bytes are
    /// copied out, the page punched out of the file, which unmaps it
    /// everywhere, allocated again and the bytes written back through this
    /// mapping. For a post-copy destination whose QEMU touched a page
    /// before the switch that the switch makes missing again. (A touch in
    /// between faults as a missing page, served once the switch is done.)
    pub fn unmap_elsewhere(&mut self, page: u64) -> Result<(), RamError> {
        let pages = self.pages();
        if page >= pages {
            return Err(RamError::OutOfRange { page, pages });
        }
        if !self.huge_pages() {
            return Ok(());
        }
        let unit = usize::try_from(self.writer.file_page).expect("a page size fits");
        let at = usize::try_from(page * PAGE_SIZE_U64).expect("below len") / unit * unit;
        let end = (at + unit).min(self.map.len());
        let saved = self.map[at..end].to_vec();
        let (start, len) = (at as u64, (end - at) as u64);
        self.files
            .punch(start, len, "punching a huge page (fallocate)")?;
        self.files.allocate(
            start,
            len,
            "allocating a huge page again (fallocate; are enough huge pages reserved?)",
        )?;
        self.map[at..end].copy_from_slice(&saved);
        Ok(())
    }
}
