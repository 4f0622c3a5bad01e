//! Shared mappings of a VM's RAM files.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

/// Several files mapped shared and back to back in one range of our
/// address space: a VM's RAM whose memory backends (one per NUMA node) are
/// separate files, seen as one run of bytes. The range is reserved first
/// (`PROT_NONE`), aligned to `align` (a huge page on hugetlbfs), and each
/// file mapped over its part with `MAP_FIXED`; it is unmapped on drop.
pub(crate) struct Joined {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: `Joined` owns its mapping (nobody else unmaps it) and is only a
// pointer and a length; the wrappers below decide who reads and writes the
// bytes, as for memmap2's mappings.
unsafe impl Send for Joined {}
// SAFETY: as above; shared references only hand out reads (see `ReadMap`),
// or ask the kernel to fault pages in (`Populator`).
unsafe impl Sync for Joined {}

impl Joined {
    /// Maps `files` (each with its length, a multiple of `align`) back to
    /// back, read-only or read-write. An error says which file it met
    /// (its index; 0 for the reservation).
    pub(crate) fn map(
        files: &[(&File, usize)],
        align: usize,
        write: bool,
    ) -> Result<Self, (usize, io::Error)> {
        let len = files
            .iter()
            .try_fold(0usize, |a, (_, l)| a.checked_add(*l))
            .filter(|&l| l > 0)
            .ok_or_else(|| {
                (
                    0,
                    io::Error::new(io::ErrorKind::InvalidInput, "no RAM to map"),
                )
            })?;
        let align = align.max(crate::PAGE_SIZE);
        let reserve = len.checked_add(align).ok_or_else(|| {
            (
                0,
                io::Error::new(io::ErrorKind::InvalidInput, "RAM too large"),
            )
        })?;
        // SAFETY: a fresh inaccessible anonymous reservation at an address of
        // the kernel's choice; nothing else refers to it.
        let r = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reserve,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if r == libc::MAP_FAILED {
            return Err((0, io::Error::last_os_error()));
        }
        let raw = r as usize;
        let base = raw.next_multiple_of(align);
        // SAFETY: both pieces lie inside the reservation just made and
        // outside `base..base + len`, which we keep.
        unsafe {
            if base > raw {
                libc::munmap(r, base - raw);
            }
            let tail = raw + reserve - (base + len);
            if tail > 0 {
                libc::munmap((base + len) as *mut libc::c_void, tail);
            }
        }
        let joined = Self {
            ptr: base as *mut u8,
            len,
        };
        let prot = libc::PROT_READ | if write { libc::PROT_WRITE } else { 0 };
        let mut at = 0;
        for (i, (file, flen)) in files.iter().enumerate() {
            // SAFETY: `base + at .. + flen` lies inside our reservation (the
            // lengths sum to `len`), so MAP_FIXED replaces only our own
            // PROT_NONE pages; the file is a regular file whose length the
            // caller checked and that is never truncated while mapped
            // (dbmigrate writes RAM files in place only).
            let m = unsafe {
                libc::mmap(
                    (base + at) as *mut libc::c_void,
                    *flen,
                    prot,
                    libc::MAP_SHARED | libc::MAP_FIXED,
                    file.as_raw_fd(),
                    0,
                )
            };
            if m == libc::MAP_FAILED {
                let e = io::Error::last_os_error();
                // A failed MAP_FIXED may have unmapped its piece already,
                // and another thread may have mapped something there
                // since: unmap the files mapped before it and the
                // reservation after it, and leave that piece alone.
                std::mem::forget(joined);
                // SAFETY: both ranges lie inside our reservation and
                // outside the failed piece `base + at .. + flen`.
                unsafe {
                    if at > 0 {
                        libc::munmap(base as *mut libc::c_void, at);
                    }
                    let after = at + flen;
                    if after < len {
                        libc::munmap((base + after) as *mut libc::c_void, len - after);
                    }
                }
                return Err((i, e));
            }
            at += flen;
        }
        Ok(joined)
    }

    /// Faults in `len` bytes at `offset` for writing
    /// (`MADV_POPULATE_WRITE`, Linux 5.14) without changing them.
    fn populate_write(&self, offset: usize, len: usize) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        if offset.checked_add(len).is_none_or(|e| e > self.len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "populating beyond the RAM",
            ));
        }
        // SAFETY: the range lies inside our live mapping (checked above);
        // MADV_POPULATE_WRITE only faults pages in, leaving their bytes.
        let r =
            unsafe { libc::madvise(self.ptr.add(offset).cast(), len, libc::MADV_POPULATE_WRITE) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Joined {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the range this value owns; the wrappers
        // hand out no reference that outlives it.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

/// The source's read-only view of the RAM files ([`Joined`]).
///
/// The VMM keeps writing the files through its own mapping while we read: a
/// torn read is harmless because the dirty tracker reports that page again,
/// and the final round runs with the VM paused.
pub struct ReadMap(Joined);

impl ReadMap {
    /// Maps `files` read-only, back to back (see [`Joined::map`]).
    pub(crate) fn map(files: &[(&File, usize)], align: usize) -> Result<Self, (usize, io::Error)> {
        Joined::map(files, align, false).map(Self)
    }
}

impl std::ops::Deref for ReadMap {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: the pointer and length are those of our live mapping.
        // Concurrent writes by the VMM can change bytes under us, which is
        // the documented, intended behaviour of reading live guest memory.
        unsafe { std::slice::from_raw_parts(self.0.ptr, self.0.len) }
    }
}

/// The destination's read-write shared mapping of the RAM files. Its
/// owner reads and writes the bytes; [`Populator`]s made from it fault its
/// pages in from other threads and never read or write them. The mapping
/// lives until the owner and every populator are gone.
pub struct SharedMap(Arc<Joined>);

/// Faults pages of a [`SharedMap`] in for writing, from another thread.
pub struct Populator(Arc<Joined>);

impl SharedMap {
    /// Maps `files` (opened read-write) shared, back to back (see
    /// [`Joined::map`]).
    pub(crate) fn map(files: &[(&File, usize)], align: usize) -> Result<Self, (usize, io::Error)> {
        Joined::map(files, align, true).map(|j| Self(Arc::new(j)))
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
        // this Arc keeps alive; the files are never truncated while mapped.
        // The VMM writing the files through its own mapping changes bytes
        // under us, as for every view of live guest memory (see
        // `ReadMap`); populators never access the bytes.
        unsafe { std::slice::from_raw_parts(self.0.ptr, self.0.len) }
    }
}

impl std::ops::DerefMut for SharedMap {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for `deref`; `SharedMap` is not Clone, so `&mut self`
        // is the only way to these bytes in this process (a `Populator`
        // only asks the kernel to fault pages in, never reading or
        // writing them), and on the destination the VMM does not run the
        // guest until dbmigrate has finished writing.
        unsafe { std::slice::from_raw_parts_mut(self.0.ptr, self.0.len) }
    }
}

impl Populator {
    /// Faults in `len` bytes at `offset` for writing
    /// (`MADV_POPULATE_WRITE`, Linux 5.14) without changing them.
    pub(crate) fn populate_write(&self, offset: usize, len: usize) -> io::Result<()> {
        self.0.populate_write(offset, len)
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
