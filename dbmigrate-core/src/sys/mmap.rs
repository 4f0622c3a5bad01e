//! Shared mappings of a VM's RAM file.

use std::fs::File;
use std::io;

/// Maps `file` read-only and shared.
///
/// The VMM keeps writing the file through its own mapping while we read: a
/// torn read is harmless because the dirty tracker reports that page again,
/// and the final round runs with the VM paused.
pub(crate) fn map_shared_ro(file: &File, len: usize) -> io::Result<memmap2::Mmap> {
    // SAFETY: the mapping is of a regular file we opened; its length is checked
    // by the caller against the file size, and the file is never truncated while
    // mapped (dbmigrate writes RAM files in place only). Concurrent writes by
    // the VMM can change bytes under us, which is the documented, intended
    // behaviour of reading live guest memory.
    unsafe { memmap2::MmapOptions::new().len(len).map(file) }
}

/// Maps `file` read-write and shared (destination side).
pub(crate) fn map_shared_rw(file: &File, len: usize) -> io::Result<memmap2::MmapMut> {
    // SAFETY: as for `map_shared_ro`; on the destination the VMM does not run
    // the guest until dbmigrate has finished writing, so nobody else writes.
    unsafe { memmap2::MmapOptions::new().len(len).map_mut(file) }
}

/// A small anonymous shared mapping of our own, used by the trackers' self-tests.
pub(crate) struct TestMapping {
    ptr: *mut libc::c_void,
    len: usize,
}

impl TestMapping {
    /// Maps `pages` pages of shared anonymous memory (shmem, like a VM's RAM file).
    pub(crate) fn new(pages: usize) -> std::io::Result<Self> {
        let len = pages * crate::PAGE_SIZE;
        // SAFETY: a fresh anonymous mapping at an address of the kernel's choice;
        // nothing else refers to it.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { ptr, len })
    }

    pub(crate) fn addr(&self) -> u64 {
        self.ptr as u64
    }

    pub(crate) fn len(&self) -> u64 {
        self.len as u64
    }

    /// Writes one byte into `page` (volatile, so it really happens).
    pub(crate) fn write_page(&self, page: usize) {
        assert!(
            page * crate::PAGE_SIZE < self.len,
            "test page inside the mapping"
        );
        // SAFETY: the address is inside our live mapping (checked above).
        unsafe {
            std::ptr::write_volatile(self.ptr.cast::<u8>().add(page * crate::PAGE_SIZE), 0x5a);
        }
    }
}

impl Drop for TestMapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping we created; no references outlive self.
        unsafe {
            libc::munmap(self.ptr, self.len);
        }
    }
}

/// Faults in every page of `map` for writing, so that later writes land in
/// memory that is already there (`MADV_POPULATE_WRITE`, Linux 5.14).
pub(crate) fn populate_write(map: &mut memmap2::MmapMut) -> io::Result<()> {
    if map.is_empty() {
        return Ok(());
    }
    // SAFETY: the range is exactly our live mapping; MADV_POPULATE_WRITE
    // only faults pages in (as a write would, without changing their
    // content) and never unmaps or moves anything.
    let r = unsafe {
        libc::madvise(
            map.as_mut_ptr().cast(),
            map.len(),
            libc::MADV_POPULATE_WRITE,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Allocates and faults in `len` bytes of `file` at `offset` through a
/// short-lived mapping of that range alone, so that a thread that does
/// not own the RAM's mapping can pay the first touch of each page (the
/// owner's mapping then only maps pages that are already there). The
/// content of the pages is not changed.
pub(crate) fn populate_file_range(file: &File, offset: u64, len: usize) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    // SAFETY: a shared mapping of a range of a regular file we opened,
    // inside its size (the caller's range is checked against the RAM's
    // length); it lives only for this call and is never handed out.
    let mut map = unsafe {
        memmap2::MmapOptions::new()
            .offset(offset)
            .len(len)
            .map_mut(file)?
    };
    populate_write(&mut map)
}
