//! How the agents' own heap treats freed memory.
//!
//! The destination frees as many bytes as it receives: page batches, the
//! pages decoded from them and storage reads, each freed by the RAM writer
//! on another thread. With glibc's defaults the free memory at the top of a
//! thread's heap goes back to the kernel once it passes 128 KiB (a limit
//! that adapts up to 64 MiB), and every later allocation there costs a page
//! fault and a zeroed page per 4 KiB: 12 % of the destination agent's CPU in
//! a first round (perf, sysbench VM), inside `Message::decode`.

/// Keeps freed memory for reuse instead of returning it to the kernel (the
/// heap stays at its peak size, which the migration's queues bound). Call
/// at start-up, before other threads. False if the allocator refused.
pub fn keep_freed_memory() -> bool {
    crate::sys::malloc::keep_freed_memory()
}
