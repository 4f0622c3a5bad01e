//! Sparse-file helpers: finding data extents, punching holes, allocating.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Where the next data (`SEEK_DATA`) or hole (`SEEK_HOLE`) starts at or after `offset`;
/// `None` when there is no more data (ENXIO).
fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let off = libc::off_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset beyond off_t"))?;
    // SAFETY: lseek on a descriptor we own; it only moves the file position,
    // which no other code of ours relies on (all I/O goes through mappings).
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(
        u64::try_from(r).expect("lseek returned a non-negative offset"),
    ))
}

/// Byte ranges of `file` (up to `len`) that hold data; holes read as zeros.
pub(crate) fn data_extents(file: &File, len: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < len {
        let Some(start) = seek(file, pos, libc::SEEK_DATA)? else {
            break;
        };
        if start >= len {
            break;
        }
        let end = seek(file, start, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        out.push((start, end));
        pos = end;
    }
    Ok(out)
}

/// Deallocates `offset..offset+len` so it reads as zeros, keeping the file size.
pub(crate) fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let off = libc::off_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset beyond off_t"))?;
    let len = libc::off_t::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "length beyond off_t"))?;
    // SAFETY: fallocate on a descriptor we own with KEEP_SIZE: the file is never
    // shrunk, so mappings of it (ours or the VMM's) stay valid; the range reads
    // as zeros afterwards.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Allocates every block of `offset..offset+len` that is a hole (mode 0
/// `fallocate`); allocated holes read as zeros, and existing data is kept.
pub(crate) fn allocate_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let off = libc::off_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset beyond off_t"))?;
    let len = libc::off_t::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "length beyond off_t"))?;
    // SAFETY: fallocate on a descriptor we own, mode 0 within the current
    // size: it only allocates blocks for holes and never changes data or size.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, off, len) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
