//! The userfaultfd and `PAGEMAP_SCAN` calls behind dbmigrate's dirty tracking.
//!
//! Shared by the preload library (which registers QEMU's RAM mapping with
//! asynchronous write-protect from inside QEMU) and the agent (which scans
//! and re-arms that mapping from outside through `/proc/PID/pagemap`).
//! Layouts and numbers follow `linux/userfaultfd.h` and `linux/fs.h` (6.7+).
//! No allocation happens in [`register_wp_async`]: it runs inside QEMU's
//! `mmap` interposer.

#![deny(missing_docs)]

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `UFFD_API`.
const UFFD_API: u64 = 0xAA;
/// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`: write-protect works on shmem (our RAM files).
pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// `UFFD_FEATURE_WP_UNPOPULATED`: pages never faulted in are protected too.
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// `UFFD_FEATURE_WP_ASYNC`: the kernel resolves write faults itself and only records them.
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
const UFFD_USER_MODE_ONLY: libc::c_int = 1;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;

/// `_IOWR(type, nr, size)`.
const fn iowr(ty: u64, nr: u64, size: u64) -> u64 {
    (3 << 30) | (size << 16) | (ty << 8) | nr
}
const UFFDIO_API: u64 = iowr(0xAA, 0x3F, 24);
const UFFDIO_REGISTER: u64 = iowr(0xAA, 0x00, 32);
const UFFDIO_WRITEPROTECT: u64 = iowr(0xAA, 0x06, 24);
/// `PAGEMAP_SCAN = _IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: u64 = iowr(b'f' as u64, 16, 96);

/// `PM_SCAN_WP_MATCHING`: write-protect the pages reported.
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// `PM_SCAN_CHECK_WPASYNC`: fail with EPERM unless the range has async WP.
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
/// `PAGE_IS_WRITTEN`: written since last write-protected.
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

#[repr(C)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// One `struct page_region` returned by `PAGEMAP_SCAN`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageRegion {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// Categories of the pages (masked by the return mask).
    pub categories: u64,
}

/// Which step of the registration failed.
#[derive(Debug)]
pub struct RegisterError {
    /// The step (`userfaultfd`, `UFFDIO_API`, `UFFDIO_REGISTER`, `UFFDIO_WRITEPROTECT`).
    pub step: &'static str,
    /// The errno.
    pub error: io::Error,
}

impl std::fmt::Display for RegisterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} failed: {}", self.step, self.error)
    }
}

impl std::error::Error for RegisterError {}

fn step<T>(step: &'static str, r: libc::c_long, ok: T) -> Result<T, RegisterError> {
    if r < 0 {
        Err(RegisterError {
            step,
            error: io::Error::last_os_error(),
        })
    } else {
        Ok(ok)
    }
}

/// Registers `addr..addr+len` of the calling process for asynchronous
/// write-protect tracking and protects all of it. The returned descriptor
/// must stay open for as long as tracking is wanted.
pub fn register_wp_async(addr: u64, len: u64) -> Result<OwnedFd, RegisterError> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: userfaultfd takes only flags and returns a new descriptor or -1.
    let mut fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd < 0 {
        // Unprivileged processes may only get user-mode-only descriptors.
        // SAFETY: as above.
        fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags | UFFD_USER_MODE_ONLY) };
    }
    let raw = step("userfaultfd", fd, fd)?;
    let raw = libc::c_int::try_from(raw).map_err(|_| RegisterError {
        step: "userfaultfd",
        error: io::Error::from_raw_os_error(libc::EBADF),
    })?;
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    let uffd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut api = UffdioApi {
        api: UFFD_API,
        features: UFFD_FEATURE_WP_ASYNC
            | UFFD_FEATURE_WP_UNPOPULATED
            | UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes a `struct uffdio_api` we own.
    let r = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API, &mut api as *mut UffdioApi) };
    step("UFFDIO_API", libc::c_long::from(r), ())?;
    let mut reg = UffdioRegister {
        range: UffdioRange { start: addr, len },
        mode: UFFDIO_REGISTER_MODE_WP,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER reads and writes a `struct uffdio_register` we own;
    // it only changes how faults in the caller's range are handled.
    let r = unsafe {
        libc::ioctl(
            uffd.as_raw_fd(),
            UFFDIO_REGISTER,
            &mut reg as *mut UffdioRegister,
        )
    };
    step("UFFDIO_REGISTER", libc::c_long::from(r), ())?;
    let mut wp = UffdioWriteprotect {
        range: UffdioRange { start: addr, len },
        mode: UFFDIO_WRITEPROTECT_MODE_WP,
    };
    // SAFETY: UFFDIO_WRITEPROTECT reads a `struct uffdio_writeprotect` we own;
    // with WP_ASYNC, later writes are resolved by the kernel, never blocked.
    let r = unsafe {
        libc::ioctl(
            uffd.as_raw_fd(),
            UFFDIO_WRITEPROTECT,
            &mut wp as *mut UffdioWriteprotect,
        )
    };
    step("UFFDIO_WRITEPROTECT", libc::c_long::from(r), ())?;
    Ok(uffd)
}

/// One `PAGEMAP_SCAN` call on `pagemap` (a `/proc/PID/pagemap` file) over
/// `start..end`, reporting written pages into `out` and, with
/// [`PM_SCAN_WP_MATCHING`] in `flags`, re-protecting them. Returns the number
/// of regions filled and the address where the walk stopped.
pub fn pagemap_scan(
    pagemap: &File,
    start: u64,
    end: u64,
    flags: u64,
    out: &mut [PageRegion],
) -> io::Result<(usize, u64)> {
    let mut arg = PmScanArg {
        size: std::mem::size_of::<PmScanArg>() as u64,
        flags,
        start,
        end,
        walk_end: 0,
        vec: out.as_mut_ptr() as u64,
        vec_len: out.len() as u64,
        max_pages: 0,
        category_inverted: 0,
        category_mask: PAGE_IS_WRITTEN,
        category_anyof_mask: 0,
        return_mask: PAGE_IS_WRITTEN,
    };
    // SAFETY: PAGEMAP_SCAN reads `arg` and writes at most `vec_len` regions
    // into `out`, which we own mutably for the duration of the call.
    let r = unsafe {
        libc::ioctl(
            pagemap.as_raw_fd(),
            PAGEMAP_SCAN,
            &mut arg as *mut PmScanArg,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = usize::try_from(r).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    Ok((n.min(out.len()), arg.walk_end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(UFFDIO_API, 0xC018_AA3F);
        assert_eq!(UFFDIO_REGISTER, 0xC020_AA00);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xC018_AA06);
        assert_eq!(PAGEMAP_SCAN, 0xC060_6610);
        assert_eq!(std::mem::size_of::<PmScanArg>(), 96);
        assert_eq!(std::mem::size_of::<PageRegion>(), 24);
    }
}
