//! glibc allocator settings.

/// Bytes of free memory at the top of a heap that glibc keeps instead of
/// returning them to the kernel.
const TRIM_THRESHOLD: libc::c_int = 1 << 30;

/// Allocations from this size on get their own mapping (glibc's upper
/// limit; below it they come from, and go back to, the heaps).
const MMAP_THRESHOLD: libc::c_int = 32 << 20;

/// Sets both thresholds; false if glibc refused either.
pub(crate) fn keep_freed_memory() -> bool {
    // SAFETY: mallopt only changes allocator parameters, takes integers,
    // and reports a refused value by returning 0.
    let trim = unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) };
    // SAFETY: as above.
    let mmap = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) };
    trim == 1 && mmap == 1
}
