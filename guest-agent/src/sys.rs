//! The FIEMAP ioctl: where a file's bytes sit on its block device.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// `FS_IOC_FIEMAP = _IOWR('f', 11, struct fiemap)`.
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
/// Flush dirty data first so delayed allocations get real blocks.
const FIEMAP_FLAG_SYNC: u32 = 1;
/// The extent is the file's last.
pub const FIEMAP_EXTENT_LAST: u32 = 0x1;
const HEADER_WORDS: usize = 4; // struct fiemap: 32 bytes before the extents
const EXTENT_WORDS: usize = 7; // struct fiemap_extent: 56 bytes
const BATCH: usize = 256;

/// One mapped extent of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Offset in the file.
    pub logical: u64,
    /// Offset on the device.
    pub physical: u64,
    /// Length in bytes.
    pub length: u64,
    /// `FIEMAP_EXTENT_*` flags.
    pub flags: u32,
}

/// All extents of `file`, in file order. With `sync`, its dirty data is
/// written first so that delayed allocations get real blocks; without,
/// those come back flagged delayed (and are left unhinted).
pub fn extents(file: &File, sync: bool) -> io::Result<Vec<Extent>> {
    let mut out = Vec::new();
    let mut start = 0u64;
    loop {
        // u64 words keep the buffer aligned for the kernel's struct layout.
        let mut buf = vec![0u64; HEADER_WORDS + BATCH * EXTENT_WORDS];
        buf[0] = start; // fm_start
        buf[1] = u64::MAX - start; // fm_length
                                   // fm_flags (low half) | fm_mapped_extents (high half, output)
        buf[2] = if sync { u64::from(FIEMAP_FLAG_SYNC) } else { 0 };
        // fm_extent_count (low half) | fm_reserved
        buf[3] = BATCH as u64;
        // SAFETY: FS_IOC_FIEMAP reads the header and writes at most
        // fm_extent_count extents into the buffer that follows it, which is
        // sized for exactly that many; the buffer outlives the call.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP, buf.as_mut_ptr()) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        #[allow(clippy::cast_possible_truncation)] // the high half of word 2 is a u32 field
        let mapped = ((buf[2] >> 32) as usize).min(BATCH);
        if mapped == 0 {
            return Ok(out);
        }
        for i in 0..mapped {
            let e = &buf[HEADER_WORDS + i * EXTENT_WORDS..HEADER_WORDS + (i + 1) * EXTENT_WORDS];
            #[allow(clippy::cast_possible_truncation)] // fe_flags is the low u32 of word 5
            let flags = e[5] as u32;
            let ext = Extent {
                logical: e[0],
                physical: e[1],
                length: e[2],
                flags,
            };
            out.push(ext);
            if flags & FIEMAP_EXTENT_LAST != 0 {
                return Ok(out);
            }
            start = ext.logical.saturating_add(ext.length);
        }
    }
}

/// Most pieces per `process_vm_readv` call (the kernel's `UIO_MAXIOV`).
const MAX_IOV: usize = 1024;

/// Reads `pieces` (remote address, length) of process `pid` into `out`, one
/// after another, in as few system calls as possible. Returns, per piece,
/// whether it was read (a piece the process unmapped meanwhile is not).
pub fn read_pieces(pid: u32, pieces: &[(u64, usize)], out: &mut [u8]) -> io::Result<Vec<bool>> {
    let total: usize = pieces.iter().map(|p| p.1).sum();
    if out.len() < total {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "output buffer too small",
        ));
    }
    let pid =
        libc::pid_t::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut ok = vec![false; pieces.len()];
    let mut i = 0;
    let mut at = 0;
    while i < pieces.len() {
        let n = (pieces.len() - i).min(MAX_IOV);
        let mut local = Vec::with_capacity(n);
        let mut remote = Vec::with_capacity(n);
        let mut off = at;
        for &(addr, len) in &pieces[i..i + n] {
            let addr =
                usize::try_from(addr).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            local.push(libc::iovec {
                iov_base: out[off..].as_mut_ptr().cast(),
                iov_len: len,
            });
            remote.push(libc::iovec {
                iov_base: addr as *mut libc::c_void,
                iov_len: len,
            });
            off += len;
        }
        // SAFETY: every local iovec points into `out` (bounds checked by the
        // slicing above and the total length check) and stays valid for the
        // call; the remote iovecs are only addresses in the other process,
        // which the kernel checks; n <= UIO_MAXIOV.
        let r = unsafe {
            libc::process_vm_readv(
                pid,
                local.as_ptr(),
                n as libc::c_ulong,
                remote.as_ptr(),
                n as libc::c_ulong,
                0,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EFAULT) {
                // The first piece is unreadable: skip it and go on.
                at += pieces[i].1;
                i += 1;
                continue;
            }
            return Err(e);
        }
        // Pieces are filled in order; a short read stops at an unreadable one.
        let mut got = usize::try_from(r).unwrap_or(0);
        let mut done = 0;
        while done < n && got >= pieces[i + done].1 {
            got -= pieces[i + done].1;
            ok[i + done] = true;
            at += pieces[i + done].1;
            done += 1;
        }
        if done < n {
            // Skip the piece that stopped the read.
            at += pieces[i + done].1;
            done += 1;
        }
        i += done;
    }
    Ok(ok)
}

/// A file mapped read-only: its resident pages are the page cache's own,
/// which this process can then find in its pagemap.
pub struct FileMap {
    ptr: *mut libc::c_void,
    len: usize,
}

impl FileMap {
    /// Maps the first `len` bytes of `file` (nothing is read).
    pub fn new(file: &File, len: usize) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "an empty file"));
        }
        // SAFETY: a new read-only shared mapping of an open file at an
        // address the kernel picks; nothing else refers to that range, and
        // Drop unmaps exactly it.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { ptr, len })
    }

    /// The mapping's address in this process.
    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }

    /// Which of the mapping's pages are in the page cache (`mincore`: no
    /// page is read).
    pub fn resident(&self) -> io::Result<Vec<bool>> {
        let mut vec = vec![0u8; self.len.div_ceil(4096)];
        // SAFETY: the range is exactly this live mapping, and `vec` holds
        // one byte per page of it, as mincore writes.
        let r = unsafe { libc::mincore(self.ptr, self.len, vec.as_mut_ptr()) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(vec.iter().map(|b| b & 1 == 1).collect())
    }
}

impl Drop for FileMap {
    fn drop(&mut self) {
        // SAFETY: unmaps the range `new` mapped, once; no reference into it
        // outlives `self` (the type hands out only its address).
        unsafe {
            libc::munmap(self.ptr, self.len);
        }
    }
}
