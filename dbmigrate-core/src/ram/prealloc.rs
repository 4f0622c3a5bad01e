//! Allocating the destination's RAM files in the background.
//!
//! Allocating a guest's RAM up front costs 0.5-2.7 CPU s per GiB on this
//! project's test host (a nested VM whose host lends memory page by page
//! on first touch) and delays the moment the destination listens. Done by
//! a few threads while the first round arrives, it costs no wait: the RAM
//! is split in 2 MiB chunks that the threads claim in ascending order;
//! each is allocated (`fallocate`) and faulted in through the owner's
//! mapping (`MADV_POPULATE_WRITE` from the thread, through a
//! [`Populator`] that never reads or writes the bytes). The RAM's owner
//! writes a page through its mapping once the page's chunk is done and
//! through the file before (a full-page write to a tmpfs hole allocates
//! the page without zeroing it first).
//! Neither changes what the other wrote: allocation keeps data and
//! touching a page does not change it.
//!
//! Stopping it ([`Background::stop`]) waits for the chunks in hand (at
//! most one per thread); the chunks never reached stay holes, allocated
//! when first written, as without preallocation.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use super::files::{io_error, RamFiles};
use super::RamError;
use crate::sys::mmap::Populator;

/// What a failed allocation says it was doing.
const ALLOCATING: &str = "allocating the guest's RAM in the background (is the RAM filesystem, e.g. /dev/shm, big enough for the guest?)";

/// Bytes allocated and touched at a time.
pub const CHUNK_BYTES: usize = 2 << 20;

/// The allocating threads and what they have done.
pub(crate) struct Background {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

struct Shared {
    files: RamFiles,
    populator: Populator,
    len: usize,
    chunk: usize,
    /// One flag per chunk: allocated and touched.
    done: Vec<AtomicBool>,
    /// The next chunk to claim.
    next: AtomicUsize,
    stop: AtomicBool,
    /// Set with `error` by the first thread that failed.
    failed: AtomicBool,
    error: Mutex<Option<RamError>>,
    /// Threads still working.
    alive: AtomicUsize,
    started: Instant,
}

impl Background {
    /// Starts `threads` threads (at least one) allocating `len` bytes of
    /// `files` (descriptors of their own) [`CHUNK_BYTES`] at a time,
    /// faulting them in through `populator`.
    pub(crate) fn start(
        files: RamFiles,
        populator: Populator,
        len: usize,
        threads: usize,
    ) -> io::Result<Self> {
        let chunk = CHUNK_BYTES;
        let chunks = len.div_ceil(chunk);
        let shared = Arc::new(Shared {
            files,
            populator,
            len,
            chunk,
            done: (0..chunks).map(|_| AtomicBool::new(false)).collect(),
            next: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            error: Mutex::new(None),
            alive: AtomicUsize::new(0),
            started: Instant::now(),
        });
        let n = threads.clamp(1, 16);
        let mut handles = Vec::with_capacity(n);
        for i in 0..n {
            let s = shared.clone();
            shared.alive.fetch_add(1, Ordering::AcqRel);
            let spawned = std::thread::Builder::new()
                .name(format!("ram-alloc-{i}"))
                .spawn(move || s.work());
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    shared.alive.fetch_sub(1, Ordering::AcqRel);
                    if handles.is_empty() {
                        return Err(e);
                    }
                    // Fewer threads only make it slower.
                    break;
                }
            }
        }
        Ok(Self {
            shared,
            threads: handles,
        })
    }

    /// True if every byte of `offset..offset+len` is in chunks already
    /// allocated and touched.
    pub(crate) fn covers(&self, offset: usize, len: usize) -> bool {
        covered(&self.shared.done, self.shared.chunk, offset, len)
    }

    /// True once a thread failed (the error is returned by [`Self::stop`]).
    pub(crate) fn failed(&self) -> bool {
        self.shared.failed.load(Ordering::Acquire)
    }

    /// Stops the threads and waits for them; the first error any of them
    /// met, if one did.
    pub(crate) fn stop(mut self) -> Result<(), RamError> {
        let panicked = self.halt();
        let error = match self.shared.error.lock() {
            Ok(mut e) => e.take(),
            Err(_) => None,
        };
        match (error, panicked) {
            (Some(e), _) => Err(e),
            (None, true) => Err(RamError::Io {
                path: self.shared.files.path(0).into(),
                doing: ALLOCATING,
                source: io::Error::other("an allocating thread panicked"),
            }),
            (None, false) => Ok(()),
        }
    }

    /// Stops and joins the threads; true if one of them panicked.
    fn halt(&mut self) -> bool {
        self.shared.stop.store(true, Ordering::Release);
        let mut panicked = false;
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                self.shared.failed.store(true, Ordering::Release);
                panicked = true;
            }
        }
        panicked
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.halt();
    }
}

impl Shared {
    fn work(&self) {
        while !self.stop.load(Ordering::Acquire) {
            let c = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(flag) = self.done.get(c) else { break };
            let offset = c * self.chunk;
            let len = self.chunk.min(self.len - offset);
            let r = self
                .files
                .allocate(offset as u64, len as u64, ALLOCATING)
                .and_then(|()| {
                    self.populator
                        .populate_write(offset, len)
                        .map_err(io_error(self.files.path_at(offset as u64), ALLOCATING))
                });
            if let Err(e) = r {
                if let Ok(mut slot) = self.error.lock() {
                    slot.get_or_insert(e);
                }
                self.failed.store(true, Ordering::Release);
                self.stop.store(true, Ordering::Release);
                break;
            }
            flag.store(true, Ordering::Release);
        }
        if self.alive.fetch_sub(1, Ordering::AcqRel) == 1 {
            let done = self
                .done
                .iter()
                .filter(|d| d.load(Ordering::Acquire))
                .count();
            tracing::info!(
                ms = crate::stats::millis(self.started.elapsed()),
                chunks = done,
                of = self.done.len(),
                "background allocation of the guest's RAM ended"
            );
        }
    }
}

/// True if every chunk that `offset..offset+len` touches is done. Pure.
fn covered(done: &[AtomicBool], chunk: usize, offset: usize, len: usize) -> bool {
    if len == 0 {
        return true;
    }
    let first = offset / chunk;
    let last = (offset + len - 1) / chunk;
    (first..=last).all(|c| done.get(c).is_some_and(|d| d.load(Ordering::Acquire)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_is_covered_only_when_all_its_chunks_are_done() {
        let done: Vec<AtomicBool> = [true, false, true]
            .into_iter()
            .map(AtomicBool::new)
            .collect();
        let c = CHUNK_BYTES;
        assert!(covered(&done, c, 0, c));
        assert!(covered(&done, c, 4096, 4096));
        assert!(!covered(&done, c, c - 4096, 8192), "straddles chunk 1");
        assert!(!covered(&done, c, c, 4096));
        assert!(covered(&done, c, 2 * c, c));
        assert!(!covered(&done, c, 3 * c, 4096), "beyond the RAM");
        assert!(covered(&done, c, 5 * c, 0));
    }
}
