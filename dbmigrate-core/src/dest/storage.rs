//! The storage readers: threads that read referenced pages from shared
//! storage, several pages per read where the disk offsets are consecutive,
//! verify each against its reference's hash and hand the results to the
//! RAM owner. Reads a faulting vCPU waits for go first.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::mpsc;
use xxhash_rust::xxh3::xxh3_128;

use super::applier::{ApplyInput, Resolved};
use super::streams::Heard;
use crate::addr::DiskOffset;
use crate::rebuild::{self, RefRequest};
use crate::storage::Storage;
use crate::verify;
use crate::PAGE_SIZE;

/// Bytes and reads the storage readers made.
#[derive(Default)]
pub(super) struct StorageTally {
    pub(super) bytes: AtomicU64,
    pub(super) reads: AtomicU64,
}

/// What the storage readers share.
pub(super) struct StorageReaders {
    storage: Arc<dyn Storage>,
    requests: Mutex<std::sync::mpsc::Receiver<RefRequest>>,
    /// Reads a vCPU waits for (post-copy), served before `requests`.
    urgent: Arc<Mutex<Vec<RefRequest>>>,
    results: mpsc::Sender<ApplyInput>,
    tally: Arc<StorageTally>,
    heard: Arc<Heard>,
    breaker: Mutex<rebuild::StorageBreaker>,
    buffers: Arc<ReadBuffers>,
    /// Pace of the background reads (see [`super::DestSession::set_storage_rate`]).
    pace: Option<crate::limiter::Pacer>,
    /// Blocks nobody asked for that a background read goes through (see
    /// [`super::DestSession::set_storage_read_gap`]).
    max_gap: usize,
}

/// The RAM owner's end of the storage readers.
pub(super) struct ReaderLink {
    /// Where references go to be read.
    pub(super) requests: std::sync::mpsc::Sender<RefRequest>,
    /// Reads a vCPU waits for, served before the others.
    pub(super) urgent: Arc<Mutex<Vec<RefRequest>>>,
    /// What was read.
    pub(super) tally: Arc<StorageTally>,
    /// Buffers handed back once their pages are in RAM.
    pub(super) buffers: Arc<ReadBuffers>,
    /// Sizes of the VM's disks, which bound every reference.
    pub(super) disk_sizes: Vec<u64>,
}

impl StorageReaders {
    /// Starts [`READERS`] reader threads over `storage`, results to
    /// `results`, background reads paced to `rate` bytes/s and reading
    /// through gaps of up to `max_gap` blocks.
    pub(super) fn start(
        storage: Arc<dyn Storage>,
        results: mpsc::Sender<ApplyInput>,
        heard: Arc<Heard>,
        rate: Option<u64>,
        max_gap: usize,
    ) -> ReaderLink {
        let (req_tx, req_rx) = std::sync::mpsc::channel::<RefRequest>();
        let link = ReaderLink {
            requests: req_tx,
            urgent: Arc::default(),
            tally: Arc::default(),
            buffers: Arc::default(),
            disk_sizes: storage.disk_sizes().to_vec(),
        };
        let readers = Arc::new(StorageReaders {
            storage,
            requests: Mutex::new(req_rx),
            urgent: link.urgent.clone(),
            results,
            tally: link.tally.clone(),
            heard,
            breaker: Mutex::new(rebuild::StorageBreaker::default()),
            buffers: link.buffers.clone(),
            pace: crate::limiter::Pacer::new(rate),
            max_gap,
        });
        for _ in 0..READERS {
            let r = readers.clone();
            std::thread::spawn(move || storage_worker(r));
        }
        link
    }
}

/// Storage read buffers, handed back by the applier once their pages are
/// in RAM. A fresh buffer costs a page fault and a zeroed page per 4 KiB
/// as the read fills it: a fifth of this agent's CPU in a first round
/// before buffers were reused (perf, sysbench VM).
#[derive(Default)]
pub(super) struct ReadBuffers(Mutex<Vec<Vec<u8>>>);

impl ReadBuffers {
    /// Buffers kept: as many as the readers and the applier's queue hold at once.
    const KEEP: usize = READERS * IN_FLIGHT + RESULTS_QUEUED;

    /// A buffer of `len` bytes (contents unspecified: the read overwrites them).
    fn take(&self, len: usize) -> Vec<u8> {
        let mut b = self
            .0
            .lock()
            .ok()
            .and_then(|mut free| free.pop())
            .unwrap_or_default();
        if b.capacity() < len {
            b = Vec::with_capacity(len.max(MAX_RUN * PAGE_SIZE));
        }
        b.resize(len, 0);
        b
    }

    pub(super) fn give(&self, b: Vec<u8>) {
        if let Ok(mut free) = self.0.lock() {
            if free.len() < Self::KEEP {
                free.push(b);
            }
        }
    }
}

/// Reads references from shared storage, several pages per read where the
/// disk offsets are consecutive, and hands the verified pages back. While
/// storage is failing, runs are handed back unread (the source sends them).
fn storage_worker(r: Arc<StorageReaders>) {
    // Large gathers let sorting find long runs: a warm buffer pool holds
    // most pages of a table, which sit next to each other on disk.
    const GATHER: usize = 2048;
    loop {
        let batch = {
            let Ok(rx) = r.requests.lock() else { return };
            let Ok(first) = rx.recv() else { return };
            let mut v = vec![first];
            while v.len() < GATHER {
                match rx.try_recv() {
                    Ok(req) => v.push(req),
                    Err(_) => break,
                }
            }
            v
        };
        let runs = rebuild::coalesce(batch, MAX_RUN, r.max_gap);
        tracing::trace!(
            refs = runs.iter().map(|r| r.reqs.len()).sum::<usize>(),
            runs = runs.len(),
            blocks = runs.iter().map(|r| r.pages).sum::<usize>(),
            "storage batch"
        );
        if serve_runs(&r, &runs, true).is_err() {
            return;
        }
    }
}

/// Longest storage read, in pages.
const MAX_RUN: usize = 256;

/// Blocks nobody asked for that a background read goes through rather
/// than splitting in two, unless the session says otherwise (see
/// [`rebuild::coalesce`] and [`super::DestSession::set_storage_read_gap`]).
/// 16: on the sysbench VM reading through gaps of up to 16 blocks reads
/// 1.32 GB for 1.01 GB of references in a tenth of the requests, and on
/// this CPU-bound machine the fewer requests won over the fewer bytes
/// (`bench/results/mariadb-sysbench-reads.json`, README "Storage reads
/// and compression").
pub const DEFAULT_READ_GAP: usize = 16;

/// Most blocks a read may go through unasked: a gap longer than a whole
/// read gains nothing.
pub const MAX_READ_GAP: usize = MAX_RUN;

/// Storage reader threads.
const READERS: usize = 4;

/// Reads kept in flight per reader: scattered 16 KiB frames would
/// otherwise cost a round trip each, and on a busy host a round trip is a
/// scheduling delay of the storage server.
const IN_FLIGHT: usize = 32;

/// Bytes kept in flight per reader: long runs need no more to keep the
/// storage link busy (8 MiB is several milliseconds at 10 Gbit/s), and each
/// byte in flight is buffer memory on both ends.
const IN_FLIGHT_BYTES: usize = 8 << 20;

/// Storage results queued for the applier.
pub(super) const RESULTS_QUEUED: usize = 16;

/// The applier stopped taking storage results: the readers stop too.
struct ApplierGone;

/// Pages a vCPU waits for whose storage read is still queued (post-copy):
/// read before anything else, so a fault never waits behind the background.
fn take_urgent(r: &StorageReaders) -> Vec<RefRequest> {
    r.urgent
        .lock()
        .map(|mut u| std::mem::take(&mut *u))
        .unwrap_or_default()
}

/// End of the group of runs from `start` that go to storage together (kept
/// in flight at once): runs of one disk, at most [`IN_FLIGHT`] of them and
/// [`IN_FLIGHT_BYTES`] between them, and always at least one.
fn group_end(runs: &[rebuild::Run], start: usize) -> usize {
    let disk = runs[start].disk;
    let mut bytes = 0;
    (start..runs.len())
        .take(IN_FLIGHT)
        .take_while(|&i| {
            bytes += runs[i].pages * PAGE_SIZE;
            runs[i].disk == disk && (i == start || bytes <= IN_FLIGHT_BYTES)
        })
        .last()
        .map_or(start + 1, |i| i + 1)
}

/// Reads `runs` (grouped by disk, several in flight), serving urgent
/// requests first between groups when `urgent_first` is set.
fn serve_runs(
    r: &StorageReaders,
    runs: &[rebuild::Run],
    urgent_first: bool,
) -> Result<(), ApplierGone> {
    let mut start = 0;
    while start < runs.len() {
        if urgent_first {
            let urgent = take_urgent(r);
            if !urgent.is_empty() {
                serve_runs(r, &rebuild::coalesce(urgent, MAX_RUN, 0), false)?;
            }
        }
        let end = group_end(runs, start);
        let group = &runs[start..end];
        start = end;
        // Background reads keep to the pace; urgent ones (a vCPU waits) never wait for it.
        if let (true, Some(pace)) = (urgent_first, &r.pace) {
            pace.take(group.iter().map(|run| (run.pages * PAGE_SIZE) as u64).sum());
        }
        read_group(r, group[0].disk, group)?;
    }
    Ok(())
}

/// One group of runs of `disk`, read at once and handed to the applier.
fn read_group(r: &StorageReaders, disk: u16, group: &[rebuild::Run]) -> Result<(), ApplierGone> {
    let mut bufs: Vec<Vec<u8>> = group
        .iter()
        .map(|run| r.buffers.take(run.pages * PAGE_SIZE))
        .collect();
    let allowed = r
        .breaker
        .lock()
        .map(|b| b.allows(Instant::now()))
        .unwrap_or(false);
    let read_ok = allowed
        && {
            let mut reads: Vec<(DiskOffset, &mut [u8])> = group
                .iter()
                .zip(bufs.iter_mut())
                .map(|(run, b)| (run.offset, b.as_mut_slice()))
                .collect();
            let read = r.storage.read_many(disk, &mut reads);
            if let Ok(mut b) = r.breaker.lock() {
                match &read {
                    Ok(()) => b.succeeded(),
                    Err(e) => {
                        let cause = std::error::Error::source(e)
                            .map(|c| format!(": {c}"))
                            .unwrap_or_default();
                        tracing::warn!(error = %format!("{e}{cause}"), "shared storage read failed; asking the source for the pages and leaving storage alone for a while");
                        b.failed(Instant::now());
                    }
                }
            }
            read.is_ok()
        };
    // The source waits while storage is read: that is progress, not silence.
    r.heard.touch();
    for (run, buf) in group.iter().zip(bufs) {
        if read_ok {
            r.tally.bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
            r.tally.reads.fetch_add(1, Ordering::Relaxed);
        }
        // One message per run, not per page: the applier is woken once.
        let pages = run
            .reqs
            .iter()
            .map(|req| {
                let slot = run.slot(req);
                let block = &buf[slot * PAGE_SIZE..(slot + 1) * PAGE_SIZE];
                Resolved {
                    page: req.page,
                    version: req.version,
                    ok: read_ok && xxh3_128(block) == req.hash,
                    slot,
                    hash: verify::low_half(req.hash),
                }
            })
            .collect();
        let done = ApplyInput::Resolved {
            pages,
            data: buf,
            unread: !read_ok,
        };
        r.results.blocking_send(done).map_err(|_| ApplierGone)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(disk: u16, pages: usize) -> rebuild::Run {
        rebuild::Run {
            disk,
            offset: DiskOffset(0),
            pages,
            reqs: Vec::new(),
        }
    }

    #[test]
    fn a_read_group_stops_at_another_disk_the_run_limit_or_the_byte_limit() {
        // Small runs: the count limit.
        let small: Vec<_> = (0..IN_FLIGHT + 5).map(|_| run(0, 1)).collect();
        assert_eq!(group_end(&small, 0), IN_FLIGHT);
        assert_eq!(group_end(&small, IN_FLIGHT), IN_FLIGHT + 5);
        // Another disk ends the group.
        let mixed = vec![run(0, 1), run(0, 1), run(1, 1), run(1, 1)];
        assert_eq!(group_end(&mixed, 0), 2);
        assert_eq!(group_end(&mixed, 2), 4);
        // Long runs: the byte limit, which a single run may exceed alone.
        let per_limit = IN_FLIGHT_BYTES / (MAX_RUN * PAGE_SIZE);
        let long: Vec<_> = (0..IN_FLIGHT).map(|_| run(0, MAX_RUN)).collect();
        assert_eq!(group_end(&long, 0), per_limit);
        let huge = vec![run(0, IN_FLIGHT_BYTES / PAGE_SIZE + 1), run(0, 1)];
        assert_eq!(group_end(&huge, 0), 1);
        assert_eq!(group_end(&huge, 1), 2);
    }

    #[test]
    fn read_buffers_are_reused_and_sized_to_the_read() {
        let pool = ReadBuffers::default();
        let mut b = pool.take(3 * PAGE_SIZE);
        assert_eq!(b.len(), 3 * PAGE_SIZE);
        b[0] = 7;
        let at = b.as_ptr();
        pool.give(b);
        let again = pool.take(PAGE_SIZE);
        assert_eq!((again.len(), again.as_ptr()), (PAGE_SIZE, at));
        pool.give(again);
        // Longer than any run: a new buffer of the asked length.
        let big = pool.take(2 * MAX_RUN * PAGE_SIZE);
        assert_eq!(big.len(), 2 * MAX_RUN * PAGE_SIZE);
        // The pool keeps no more than it can use at once.
        for _ in 0..ReadBuffers::KEEP + 3 {
            pool.give(Vec::new());
        }
        assert_eq!(pool.0.lock().unwrap().len(), ReadBuffers::KEEP);
    }
}
