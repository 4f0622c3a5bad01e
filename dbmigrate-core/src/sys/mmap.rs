//! Shared mappings of a VM's RAM file.

use std::fs::File;
use std::io;
use std::sync::Arc;

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

/// The destination's read-write shared mapping of a RAM file. Its owner
/// reads and writes the bytes; [`Populator`]s made from it fault its
/// pages in from other threads and never read or write them. The mapping
/// lives until the owner and every populator are gone.
pub struct SharedMap(Arc<memmap2::MmapRaw>);

/// Faults pages of a [`SharedMap`] in for writing, from another thread.
pub struct Populator(Arc<memmap2::MmapRaw>);

impl SharedMap {
    /// Maps `len` bytes of `file` (opened read-write) shared.
    pub(crate) fn map(file: &File, len: usize) -> io::Result<Self> {
        let raw = memmap2::MmapOptions::new().len(len).map_raw(file)?;
        Ok(Self(Arc::new(raw)))
    }

    /// A handle that faults this mapping's pages in.
    pub(crate) fn populator(&self) -> Populator {
        Populator(self.0.clone())
    }
}

impl std::ops::Deref for SharedMap {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: the pointer and length are those of a live mapping that
        // this Arc keeps alive; the file is never truncated while mapped.
        // The VMM writing the file through its own mapping changes bytes
        // under us, as for every view of live guest memory (see
        // `map_shared_ro`); populators never access the bytes.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr(), self.0.len()) }
    }
}

impl std::ops::DerefMut for SharedMap {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for `deref`; `SharedMap` is not Clone, so `&mut self`
        // is the only way to these bytes in this process (a `Populator`
        // only asks the kernel to fault pages in, never reading or
        // writing them), and on the destination the VMM does not run the
        // guest until dbmigrate has finished writing.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr(), self.0.len()) }
    }
}

impl Populator {
    /// Faults in `len` bytes at `offset` for writing
    /// (`MADV_POPULATE_WRITE`, Linux 5.14) without changing them.
    pub(crate) fn populate_write(&self, offset: usize, len: usize) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.0
            .advise_range(memmap2::Advice::PopulateWrite, offset, len)
    }
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
