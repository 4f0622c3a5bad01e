//! The userfaultfd and `PAGEMAP_SCAN` calls behind dbmigrate's dirty tracking
//! and post-copy.
//!
//! Shared by the preload library (which registers QEMU's RAM mapping from
//! inside QEMU: asynchronous write-protect on a source, missing-page faults
//! on a post-copy destination) and the agent (which scans and re-arms that
//! mapping from outside through `/proc/PID/pagemap`, or serves its faults
//! through the descriptor the library hands over a unix socket).
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
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_REGISTER_MODE_MINOR: u64 = 1 << 2;
/// `UFFD_FEATURE_MINOR_HUGETLBFS`: minor faults on hugetlbfs mappings.
const UFFD_FEATURE_MINOR_HUGETLBFS: u64 = 1 << 9;
/// `UFFDIO_CONTINUE = _IOWR(0xAA, 0x07, struct uffdio_continue)`.
const UFFDIO_CONTINUE: u64 = iowr(0xAA, 0x07, 32);
/// `UFFD_EVENT_PAGEFAULT`.
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// Size of `struct uffd_msg`.
const UFFD_MSG_LEN: usize = 32;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;

/// `_IOWR(type, nr, size)`.
const fn iowr(ty: u64, nr: u64, size: u64) -> u64 {
    (3 << 30) | (size << 16) | (ty << 8) | nr
}
const UFFDIO_API: u64 = iowr(0xAA, 0x3F, 24);
const UFFDIO_REGISTER: u64 = iowr(0xAA, 0x00, 32);
const UFFDIO_WRITEPROTECT: u64 = iowr(0xAA, 0x06, 24);
/// `UFFDIO_UNREGISTER = _IOR(0xAA, 0x01, struct uffdio_range)`.
const UFFDIO_UNREGISTER: u64 = (2 << 30) | (16 << 16) | (0xAA << 8) | 0x01;
/// `UFFDIO_ZEROPAGE = _IOWR(0xAA, 0x04, struct uffdio_zeropage)`.
const UFFDIO_ZEROPAGE: u64 = iowr(0xAA, 0x04, 32);
/// `UFFDIO_WAKE = _IOR(0xAA, 0x02, struct uffdio_range)`.
const UFFDIO_WAKE: u64 = (2 << 30) | (16 << 16) | (0xAA << 8) | 0x02;
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
    let uffd = open_and_register(
        UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
        UFFDIO_REGISTER_MODE_WP,
        addr,
        len,
    )?;
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

/// Registers `addr..addr+len` of the calling process for missing-page
/// faults: from now on, touching a page that the backing file does not hold
/// blocks the toucher until the descriptor's owner fills the page and wakes
/// it. Used on a post-copy destination; the descriptor must stay open.
pub fn register_missing(addr: u64, len: u64) -> Result<OwnedFd, RegisterError> {
    open_and_register(0, UFFDIO_REGISTER_MODE_MISSING, addr, len)
}

/// The page size of the file behind `fd` if it is on hugetlbfs, None for
/// any other file system: which registration a post-copy mapping of it
/// takes ([`register_minor`] or [`register_missing`]). The preload library
/// and the agent decide by this one test, so they agree. No allocation.
pub fn hugetlbfs_page_size(fd: &impl AsRawFd) -> io::Result<Option<u64>> {
    // SAFETY: an all-zero statfs is a valid value for fstatfs to overwrite.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs on a descriptor the caller owns writes one `struct
    // statfs`, which we own.
    if unsafe { libc::fstatfs(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((st.f_type == libc::HUGETLBFS_MAGIC)
        .then(|| u64::try_from(st.f_bsize).ok())
        .flatten())
}

/// Registers `addr..addr+len` of the calling process, a shared mapping of
/// a hugetlbfs file, for minor and missing-page faults: from now on,
/// touching a page that this mapping has not mapped yet blocks the toucher
/// until the descriptor's owner maps it ([`continue_range`]), whether the
/// file holds the page (a minor fault) or not (a missing one: the owner
/// allocates it in the file first). The owner fills the file through a
/// mapping of its own, 4 KiB at a time if it likes; the toucher sees the
/// page only whole. (Missing-page faults alone cannot do that on
/// hugetlbfs: a page is placed in one copy of its 2 MiB.) Used on a
/// post-copy destination; the descriptor must stay open.
pub fn register_minor(addr: u64, len: u64) -> Result<OwnedFd, RegisterError> {
    open_and_register(
        UFFD_FEATURE_MINOR_HUGETLBFS,
        UFFDIO_REGISTER_MODE_MINOR | UFFDIO_REGISTER_MODE_MISSING,
        addr,
        len,
    )
}

/// A new userfaultfd with `features`, registered over `addr..addr+len` in `mode`.
fn open_and_register(
    features: u64,
    mode: u64,
    addr: u64,
    len: u64,
) -> Result<OwnedFd, RegisterError> {
    let uffd = open_uffd()?;
    let mut api = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes a `struct uffdio_api` we own.
    let r = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API, &mut api as *mut UffdioApi) };
    step("UFFDIO_API", libc::c_long::from(r), ())?;
    register_range(&uffd, mode, addr, len)?;
    Ok(uffd)
}

/// Registers one more range of the calling process with `uffd` (made by
/// [`register_missing`] or [`register_minor`]) in the same way: a RAM made
/// of several files, each mapped on its own, served by one descriptor.
/// `huge`: a hugetlbfs mapping (the mode of [`register_minor`]).
pub fn register_more(
    uffd: &impl AsRawFd,
    huge: bool,
    addr: u64,
    len: u64,
) -> Result<(), RegisterError> {
    let mode = if huge {
        UFFDIO_REGISTER_MODE_MINOR | UFFDIO_REGISTER_MODE_MISSING
    } else {
        UFFDIO_REGISTER_MODE_MISSING
    };
    register_range(uffd, mode, addr, len)
}

fn register_range(
    uffd: &impl AsRawFd,
    mode: u64,
    addr: u64,
    len: u64,
) -> Result<(), RegisterError> {
    let mut reg = UffdioRegister {
        range: UffdioRange { start: addr, len },
        mode,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER reads and writes a `struct uffdio_register` we
    // own; it only changes how faults in the caller's range are handled.
    let r = unsafe {
        libc::ioctl(
            uffd.as_raw_fd(),
            UFFDIO_REGISTER,
            &mut reg as *mut UffdioRegister,
        )
    };
    step("UFFDIO_REGISTER", libc::c_long::from(r), ())
}

fn open_uffd() -> Result<OwnedFd, RegisterError> {
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
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Waits up to `timeout_ms` for page faults on `uffd` and appends the
/// faulting addresses to `out`. Returns false on timeout.
pub fn read_faults(uffd: &OwnedFd, timeout_ms: i32, out: &mut Vec<u64>) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: uffd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes one `pollfd` we own.
    let r = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(e)
        };
    }
    if r == 0 {
        return Ok(false);
    }
    let mut buf = [0u8; UFFD_MSG_LEN * 64];
    loop {
        // SAFETY: read writes at most `buf.len()` bytes into our buffer.
        let n = unsafe { libc::read(uffd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Ok(true);
            }
            return Err(e);
        }
        let n = usize::try_from(n).unwrap_or(0);
        if n == 0 {
            return Ok(true);
        }
        out.extend(parse_fault_messages(&buf[..n]));
        if n < buf.len() {
            return Ok(true);
        }
    }
}

/// Faulting addresses in a buffer of `struct uffd_msg` (other events and a
/// trailing partial message are skipped).
pub fn parse_fault_messages(buf: &[u8]) -> impl Iterator<Item = u64> + '_ {
    buf.chunks_exact(UFFD_MSG_LEN)
        .filter(|m| m[0] == UFFD_EVENT_PAGEFAULT)
        .map(|m| u64::from_ne_bytes(m[16..24].try_into().expect("8 bytes")))
}

/// Wakes the threads blocked on faults in `start..start+len` (the pages
/// were filled through the file).
pub fn wake(uffd: &OwnedFd, start: u64, len: u64) -> io::Result<()> {
    range_ioctl(uffd, UFFDIO_WAKE, start, len)
}

/// An ioctl that takes only a `struct uffdio_range`.
fn range_ioctl(uffd: &OwnedFd, request: u64, start: u64, len: u64) -> io::Result<()> {
    let mut range = UffdioRange { start, len };
    // SAFETY: `request` is UFFDIO_WAKE or UFFDIO_UNREGISTER, both of which
    // only read a `struct uffdio_range`, which we own.
    let r = unsafe { libc::ioctl(uffd.as_raw_fd(), request, &mut range as *mut UffdioRange) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[repr(C)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// Fills `start..start+len` with zeros if the pages are still missing and
/// wakes their waiters. Returns false, doing nothing, if a page there is
/// already present (filled since the fault was reported): then only wake.
pub fn zeropage(uffd: &OwnedFd, start: u64, len: u64) -> io::Result<bool> {
    let mut z = UffdioZeropage {
        range: UffdioRange { start, len },
        mode: 0,
        zeropage: 0,
    };
    // SAFETY: UFFDIO_ZEROPAGE reads and writes a `struct uffdio_zeropage` we own;
    // it only fills pages that are still missing in the registered range.
    let r = unsafe {
        libc::ioctl(
            uffd.as_raw_fd(),
            UFFDIO_ZEROPAGE,
            &mut z as *mut UffdioZeropage,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::EEXIST) {
            Ok(false)
        } else {
            Err(e)
        };
    }
    Ok(true)
}

#[repr(C)]
struct UffdioContinue {
    range: UffdioRange,
    mode: u64,
    mapped: i64,
}

/// Maps the file's pages at `start..start+len` (whole huge pages) into the
/// registering process and wakes their waiters (minor-fault mode, see
/// [`register_minor`]). Returns false, doing nothing, if the first page is
/// mapped there already (placed since the fault was reported): then only
/// wake. A range whose later pages are mapped is mapped up to them and the
/// call answers `Interrupted` with the bytes done in the message.
pub fn continue_range(uffd: &OwnedFd, start: u64, len: u64) -> io::Result<bool> {
    let mut c = UffdioContinue {
        range: UffdioRange { start, len },
        mode: 0,
        mapped: 0,
    };
    // SAFETY: UFFDIO_CONTINUE reads and writes a `struct uffdio_continue` we
    // own; it only maps pages the file already holds into the registered range.
    let r = unsafe {
        libc::ioctl(
            uffd.as_raw_fd(),
            UFFDIO_CONTINUE,
            &mut c as *mut UffdioContinue,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EEXIST) => Ok(false),
            Some(libc::EAGAIN) if c.mapped > 0 => Err(io::Error::new(
                io::ErrorKind::Interrupted,
                format!("UFFDIO_CONTINUE mapped {} of {len} bytes", c.mapped),
            )),
            _ => Err(e),
        };
    }
    Ok(true)
}

/// Ends missing-page handling for `start..start+len`: waiters are woken and
/// missing pages read as zeros again. Works from any process holding the
/// descriptor (it acts on the registering process's memory).
pub fn unregister(uffd: &OwnedFd, start: u64, len: u64) -> io::Result<()> {
    range_ioctl(uffd, UFFDIO_UNREGISTER, start, len)
}

/// Most payload bytes sent beside a descriptor: room for the post-copy
/// offer of a RAM of up to 64 files (the first mapping's address and
/// length and the fault unit, 24 bytes, then 16 bytes per further
/// mapping: 1032 bytes; see the preload library).
pub const MAX_FD_PAYLOAD: usize = 1088;

/// Sends `fd` and `payload` (at most [`MAX_FD_PAYLOAD`] bytes) over a unix
/// stream socket.
pub fn send_fd(sock: &impl AsRawFd, fd: &impl AsRawFd, payload: &[u8]) -> io::Result<()> {
    let payload = &payload[..payload.len().min(MAX_FD_PAYLOAD)];
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    };
    // Room for one descriptor's control message, u64-aligned.
    let mut cbuf = [0u64; 4];
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(4) } as usize;
    // SAFETY: the control buffer is 32 bytes, more than CMSG_SPACE(4), so
    // the first header and its 4-byte payload lie inside it.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(4) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>(), fd.as_raw_fd());
    }
    // SAFETY: msg points at our iovec and control buffer, both alive here.
    let r = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The process and user at the other end of a unix stream socket
/// (`SO_PEERCRED`: as they were when it connected).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCred {
    /// Its process id.
    pub pid: u32,
    /// Its user id.
    pub uid: u32,
}

/// Reads the peer's credentials of a connected unix stream socket.
pub fn peer_cred(sock: &impl AsRawFd) -> io::Result<PeerCred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::ucred>())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, which we own.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(PeerCred {
        pid: u32::try_from(cred.pid).unwrap_or(0),
        uid: cred.uid,
    })
}

/// Receives a descriptor and its payload sent with [`send_fd`].
pub fn recv_fd(sock: &impl AsRawFd) -> io::Result<(OwnedFd, Vec<u8>)> {
    let mut payload = [0u8; MAX_FD_PAYLOAD];
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: payload.len(),
    };
    let mut cbuf = [0u64; 4];
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cbuf);
    // SAFETY: msg points at our iovec and control buffer, both alive here.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = usize::try_from(n).unwrap_or(0);
    // SAFETY: the kernel filled `msg`; CMSG_FIRSTHDR returns null or a header
    // inside our control buffer.
    let c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    // SAFETY: `c` is checked non-null and lies inside `cbuf`; a SCM_RIGHTS
    // message carries at least one int after its header.
    let fd = unsafe {
        if c.is_null() || (*c).cmsg_level != libc::SOL_SOCKET || (*c).cmsg_type != libc::SCM_RIGHTS
        {
            None
        } else {
            Some(std::ptr::read_unaligned(
                libc::CMSG_DATA(c).cast::<libc::c_int>(),
            ))
        }
    };
    let Some(fd) = fd.filter(|&f| f >= 0) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the peer sent no descriptor",
        ));
    };
    // SAFETY: the kernel just installed `fd` in our table for us alone.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok((fd, payload[..n].to_vec()))
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
        assert_eq!(UFFDIO_WAKE, 0x8010_AA02);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010_AA01);
        assert_eq!(UFFDIO_ZEROPAGE, 0xC020_AA04);
        assert_eq!(std::mem::size_of::<PmScanArg>(), 96);
        assert_eq!(std::mem::size_of::<PageRegion>(), 24);
    }

    #[test]
    fn missing_faults_are_served_through_the_file_and_a_handed_over_descriptor() {
        use std::os::unix::fs::FileExt;
        use std::os::unix::net::UnixStream;
        const PAGE: usize = 4096;
        // SAFETY: memfd_create with a NUL-terminated name returns a new fd or -1.
        let fd = unsafe { libc::memfd_create(c"uffd-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fresh descriptor owned by nobody else.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.set_len(4 * PAGE as u64).unwrap();
        // SAFETY: a new shared mapping of our own memfd; unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4 * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let base = p as u64;
        let uffd = register_missing(base, 4 * PAGE as u64).unwrap();
        // The descriptor crosses a unix socket as it does from QEMU to the agent.
        let (a, b) = UnixStream::pair().unwrap();
        send_fd(&a, &uffd, &base.to_le_bytes()).unwrap();
        let (served, payload) = recv_fd(&b).unwrap();
        assert_eq!(payload, base.to_le_bytes());
        let toucher = std::thread::spawn(move || {
            // SAFETY: page 2 of the live mapping; the read blocks until served.
            unsafe { std::ptr::read_volatile((base as *const u8).add(2 * PAGE + 7)) }
        });
        let mut faults = Vec::new();
        while faults.is_empty() {
            assert!(
                read_faults(&served, 5000, &mut faults).unwrap(),
                "no fault reported"
            );
        }
        assert_eq!(faults[0] & !(PAGE as u64 - 1), base + 2 * PAGE as u64);
        file.write_all_at(&[9u8; PAGE], 2 * PAGE as u64).unwrap();
        wake(&served, base + 2 * PAGE as u64, PAGE as u64).unwrap();
        assert_eq!(toucher.join().unwrap(), 9);
        // A page already filled is left alone; a missing one gets zeros.
        assert!(!zeropage(&served, base + 2 * PAGE as u64, PAGE as u64).unwrap());
        assert!(zeropage(&served, base + PAGE as u64, PAGE as u64).unwrap());
        unregister(&served, base, 4 * PAGE as u64).unwrap();
        // SAFETY: page 3 of the live mapping, no longer registered: reads zero.
        let third = unsafe { std::ptr::read_volatile((base as *const u8).add(3 * PAGE)) };
        assert_eq!(third, 0);
        // SAFETY: page 2 of the live mapping, filled above.
        let second = unsafe { std::ptr::read_volatile((base as *const u8).add(2 * PAGE)) };
        assert_eq!(second, 9);
        drop(uffd);
        drop(served);
        // SAFETY: unmapping the mapping made above; nothing uses it any more.
        unsafe { libc::munmap(p, 4 * PAGE) };
    }
}
