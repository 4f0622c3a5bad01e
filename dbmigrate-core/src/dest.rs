//! The destination end of a migration: receives pages into the RAM file,
//! compares digests at switchover and resumes the VM only on [`Message::Commit`].
//!
//! Every page index, length and count from the source is checked: a page
//! beyond the RAM aborts the session with a reason sent back to the source.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::sync::{mpsc, oneshot};
use xxhash_rust::xxh3::xxh3_128;

use crate::bitmap::{PageBitmap, PageQueue};
use crate::control::ControlWriter;
use crate::gate::Gate;
use crate::protocol::{self, Hello, Message, PageEncoding, PageEntry, ProtocolError, Welcome};
use crate::ram::{DestRam, Prepared, RamError};
use crate::rebuild::{self, RefRequest, Storage};
use crate::transport::{Conn, ConnReader};
use crate::verify;
use crate::PAGE_SIZE;

/// Errors of the destination side.
#[derive(Debug, Error)]
pub enum DestError {
    /// Transport or protocol failure.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The source's announcement does not fit this VM.
    #[error("refused the source: {reason}")]
    Refused {
        /// Why.
        reason: String,
    },
    /// The source gave up.
    #[error("source aborted the migration: {reason}")]
    SourceAborted {
        /// Its reason.
        reason: String,
    },
    /// The source sent something out of place.
    #[error("source sent {got} while the destination expected {expected}")]
    Unexpected {
        /// What came.
        got: &'static str,
        /// What was expected.
        expected: &'static str,
    },
    /// A page message was invalid.
    #[error("bad page from the source: {0}")]
    BadPage(String),
    /// RAM access failed.
    #[error(transparent)]
    Ram(#[from] RamError),
    /// The listener stopped accepting connections.
    #[error("the listener stopped accepting connections")]
    ListenerGone,
    /// A peer stayed silent too long.
    #[error("no word from the source agent for {secs} s while {doing}")]
    Timeout {
        /// Seconds waited.
        secs: u64,
        /// What was awaited.
        doing: &'static str,
    },
    /// A worker died.
    #[error("internal worker failed: {0}")]
    Worker(String),
    /// Serving the VM's page faults failed.
    #[error("serving page faults failed while {doing}")]
    Faults {
        /// What was being done.
        doing: &'static str,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The VM could not be resumed here after the switch to post-copy.
    #[error("the destination VM could not be resumed: {0}")]
    Resume(String),
}

/// Counters of what arrived.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct DestStats {
    /// Raw pages applied.
    pub raw_pages: u64,
    /// Zero pages applied.
    pub zero_pages: u64,
    /// Compressed pages applied.
    pub compressed_pages: u64,
    /// Bytes received on data connections.
    pub bytes_received: u64,
    /// Pages rebuilt from shared storage (reference matched).
    pub rebuilt_pages: u64,
    /// References whose storage content did not match (page asked for).
    pub rebuild_mismatch: u64,
    /// References refused as invalid (unknown disk, misaligned, out of range, no storage).
    pub rejected_refs: u64,
    /// Bytes read from shared storage.
    pub storage_bytes: u64,
    /// Reads made of shared storage (each a run of consecutive pages):
    /// `storage_bytes / storage_reads` is the mean read.
    pub storage_reads: u64,
    /// References not read because shared storage was failing (page asked for).
    pub storage_unread: u64,
    /// Time spent hashing at switchover.
    pub verify_ms: u64,
    /// Post-copy: page faults the VM took on missing pages.
    pub faults: u64,
    /// Post-copy: faults that had to wait for the source (network round trip).
    pub network_faults: u64,
    /// Post-copy: faults served from shared storage.
    pub storage_faults: u64,
    /// Post-copy: faults on pages that are zero (served at once).
    pub zero_faults: u64,
    /// Post-copy: longest time a fault waited for its page.
    pub longest_stall_us: u64,
    /// Post-copy: pages placed after the switch.
    pub postcopy_pages: u64,
    /// Post-copy: switch to last page placed.
    pub postcopy_ms: u64,
    /// Post-copy: every page was placed but the source went silent before
    /// the placed pages could be compared with its frozen RAM.
    pub postcopy_unverified: bool,
}

/// A source that passed the handshake, with its data connections.
pub struct DestSession {
    /// Messages of the control connection, read by their own task (reads
    /// are never cancelled halfway through a frame).
    ctrl_in: mpsc::Receiver<Result<Message, ProtocolError>>,
    ctrl_tx: ControlWriter,
    data: Vec<Conn>,
    hello: Hello,
    /// What the session's other connections must carry (id, certificate).
    peer: SessionPeer,
    peer_timeout: Duration,
    /// Pace of the background storage reads, bytes/s (None: as fast as they go).
    storage_rate: Option<u64>,
    /// What arrived.
    pub stats: DestStats,
}

/// A session's id and its source's certificate: a later connection belongs
/// to the session only if it carries both.
#[derive(Clone, Debug)]
pub struct SessionPeer {
    session: u64,
    cert: Option<Vec<u8>>,
}

impl SessionPeer {
    /// Whether `a` belongs to the session.
    pub fn owns(&self, a: &crate::gate::Admitted) -> bool {
        a.hello.session == self.session && a.conn.peer_certificate() == self.cert.as_deref()
    }
}

/// The VM's page faults, for post-copy: the userfaultfd registered over
/// QEMU's RAM mapping (missing mode) and that mapping's address and length.
pub struct FaultSource {
    /// The descriptor.
    pub uffd: OwnedFd,
    /// Address of the RAM mapping in QEMU.
    pub base: u64,
    /// Its length.
    pub len: u64,
}

impl FaultSource {
    /// The RAM page a (page-aligned) fault address in QEMU's mapping
    /// falls in, if it is one of the first `pages`.
    fn page_at(&self, at: u64, pages: u64) -> Option<u64> {
        at.checked_sub(self.base)
            .map(|o| o / PAGE_SIZE as u64)
            .filter(|&p| p < pages)
    }
}

/// Takes the first connection through `gate` that introduces itself as a
/// control connection as the source (the gate already dropped strangers),
/// checks its Hello against `ram_bytes`, answers whether this side can
/// serve post-copy faults, then waits for its data connections. Other
/// connections meanwhile are dropped with a warning.
pub async fn accept(
    gate: &mut Gate,
    ram_bytes: u64,
    postcopy: bool,
    peer_timeout: Duration,
) -> Result<DestSession, DestError> {
    let (ctrl, hello) = loop {
        let a = gate.next().await.ok_or(DestError::ListenerGone)?;
        if a.hello.conn_index == 0 {
            tracing::info!(peer = %a.peer, "source agent connected");
            break (a.conn, a.hello);
        }
        tracing::warn!(peer = %a.peer, conn = a.hello.conn_index, "ignored a connection before any control connection");
    };
    // Every later connection of the session must come from the same peer.
    let peer = SessionPeer {
        session: hello.session,
        cert: ctrl.peer_certificate().map(<[u8]>::to_vec),
    };
    let (ctrl_rx, mut ctrl_tx) = ctrl.split();
    if let Some(reason) = hello_problem(&hello, ram_bytes) {
        let _ = protocol::write_message(
            &mut ctrl_tx,
            &Message::Refuse {
                reason: reason.clone(),
            },
            "refusing",
        )
        .await;
        return Err(DestError::Refused { reason });
    }
    protocol::write_message(
        &mut ctrl_tx,
        &Message::Welcome(Welcome {
            version: protocol::PROTOCOL_VERSION,
            postcopy,
        }),
        "sending Welcome",
    )
    .await?;
    let mut slots: Vec<Option<Conn>> = (0..hello.data_connections).map(|_| None).collect();
    while slots.iter().any(Option::is_none) {
        let a = within(peer_timeout, "waiting for data connections", gate.next())
            .await?
            .ok_or(DestError::ListenerGone)?;
        match a.hello.conn_index.checked_sub(1).map(usize::from) {
            Some(i) if i < slots.len() && slots[i].is_none() && peer.owns(&a) => {
                slots[i] = Some(a.conn);
            }
            // Another session or peer, a duplicate: drop it, keep waiting.
            _ => {
                tracing::warn!(peer = %a.peer, conn = a.hello.conn_index, "ignored a stray connection")
            }
        }
    }
    let (in_tx, ctrl_in) = mpsc::channel(16);
    tokio::spawn(read_control(ctrl_rx, in_tx));
    Ok(DestSession {
        ctrl_in,
        ctrl_tx: ControlWriter::new(ctrl_tx, peer_timeout),
        data: slots.into_iter().flatten().collect(),
        hello,
        peer,
        peer_timeout,
        storage_rate: None,
        stats: DestStats::default(),
    })
}

/// Why a source's Hello does not fit this VM, if it does not.
fn hello_problem(hello: &Hello, ram_bytes: u64) -> Option<String> {
    if hello.ram_bytes != ram_bytes {
        Some(format!(
            "source RAM is {} bytes but the destination VM has {} bytes: start the destination QEMU with the same -m and memory backend size",
            hello.ram_bytes, ram_bytes
        ))
    } else if hello.page_size as usize != PAGE_SIZE {
        Some(format!(
            "page size {} is not supported (only {PAGE_SIZE})",
            hello.page_size
        ))
    } else if !(1..=16).contains(&hello.data_connections) {
        Some(format!(
            "{} data connections requested, 1 to 16 allowed",
            hello.data_connections
        ))
    } else {
        None
    }
}

/// What the RAM owner thread hands back once every stream ended.
struct Applied {
    ram: DestRam,
    digests: Vec<u128>,
    final_hash: Duration,
    stats: DestStats,
}

/// The preparation of a switch to post-copy: asked on the control
/// connection, and the data connections whose marker arrived.
#[derive(Default)]
struct PrepareState {
    stale: Option<PageBitmap>,
    marks: usize,
}

/// Inputs of the RAM owner thread.
enum ApplyInput {
    /// Pages from a data connection, in arrival order (or, after the
    /// switch, pages the VM waits for, from the control connection).
    Batch(Vec<PageEntry>),
    /// A data connection finished a round.
    Drain { round: u32 },
    /// A data connection reached the switch to post-copy.
    SwitchMark,
    /// The source will switch to post-copy (its VM still runs); these
    /// pages are pending already.
    PrepareSwitch(PageBitmap),
    /// A data connection delivered everything before the switch's preparation.
    PrepareMark,
    /// The source switched to post-copy: pages whose content is still to come.
    Switch(PageBitmap),
    /// The VM faulted on these addresses.
    Faults(Vec<u64>),
    /// A data connection ended after this many bytes.
    End { bytes: u64 },
    /// A data connection failed.
    Failed(DestError),
    /// A storage read of a run of references finished: the pages it
    /// resolves and the blocks read. `unread`: storage was not read
    /// (failing), every page is unmatched.
    Resolved {
        pages: Vec<Resolved>,
        data: Vec<u8>,
        unread: bool,
    },
}

/// One reference a storage read resolved.
struct Resolved {
    page: u64,
    /// The page's version when the reference arrived.
    version: u32,
    /// The block read matched the reference's hash.
    ok: bool,
    /// The block of the read that holds it.
    slot: usize,
    /// Its [`verify::page_hash`] when `ok` (the low half of the reference's).
    hash: u64,
}

/// When the session last made progress: a message from the source on any
/// connection, or a storage read done (the source waits for those).
struct Heard {
    t0: Instant,
    last_ms: AtomicU64,
}

impl Heard {
    fn new() -> Self {
        Self {
            t0: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let now = u64::try_from(self.t0.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.fetch_max(now, Ordering::Relaxed);
    }

    fn silence(&self) -> Duration {
        self.t0
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// Bytes and reads the storage readers made.
#[derive(Default)]
struct StorageTally {
    bytes: AtomicU64,
    reads: AtomicU64,
}

/// What the storage readers share.
struct StorageReaders {
    storage: Arc<dyn Storage>,
    requests: Mutex<std::sync::mpsc::Receiver<RefRequest>>,
    /// Reads a vCPU waits for (post-copy), served before `requests`.
    urgent: Arc<Mutex<Vec<RefRequest>>>,
    results: mpsc::Sender<ApplyInput>,
    tally: Arc<StorageTally>,
    heard: Arc<Heard>,
    breaker: Mutex<rebuild::StorageBreaker>,
    buffers: Arc<ReadBuffers>,
    /// Pace of the background reads (see [`DestSession::set_storage_rate`]).
    pace: Option<crate::limiter::Pacer>,
}

/// Storage read buffers, handed back by the applier once their pages are
/// in RAM. A fresh buffer costs a page fault and a zeroed page per 4 KiB
/// as the read fills it: a fifth of this agent's CPU in a first round
/// before buffers were reused (perf, sysbench VM).
#[derive(Default)]
struct ReadBuffers(Mutex<Vec<Vec<u8>>>);

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

    fn give(&self, b: Vec<u8>) {
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
        let runs = rebuild::coalesce(batch, MAX_RUN, MAX_GAP);
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

/// How long a finished post-copy waits for the source to close the control
/// connection (see [`DestSession::drain_until_closed`]).
const LINGER: Duration = Duration::from_secs(3);

/// Longest storage read, in pages.
const MAX_RUN: usize = 256;

/// Blocks nobody asked for that a background read goes through rather
/// than splitting in two (see [`rebuild::coalesce`]).
const MAX_GAP: usize = 16;

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
const RESULTS_QUEUED: usize = 16;

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
            let mut reads: Vec<(u64, &mut [u8])> = group
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

/// Post-copy state of the RAM owner, from the switch on.
struct Post {
    /// Pages whose final content has not been placed yet.
    missing: PageBitmap,
    /// Missing pages asked of the source.
    requested: PageBitmap,
    /// Faulting pages and since when they wait.
    waiting: HashMap<u64, Instant>,
    faults: Arc<FaultSource>,
    since: Instant,
}

/// The RAM owner: applies pages in arrival order, sends references to the
/// storage readers, answers drains, keeps the switchover digests and, after
/// a switch to post-copy, places each missing page once and serves faults.
struct Applier {
    ram: DestRam,
    conns: usize,
    version: Vec<u32>,
    dctx: zstd::bulk::Decompressor<'static>,
    disk_sizes: Vec<u64>,
    refs: Option<std::sync::mpsc::Sender<RefRequest>>,
    /// Storage reads a faulting vCPU waits for, served by the readers first.
    urgent_reads: Arc<Mutex<Vec<RefRequest>>>,
    /// The storage read in flight for each page, kept when this side can
    /// serve post-copy (a fault on it is read again, ahead of the queue).
    ref_of: HashMap<u64, RefRequest>,
    outstanding: u64,
    /// Pages with a storage read in flight for their current version.
    inflight: PageBitmap,
    /// Pages whose reference storage could not match: asked of the source.
    need: PageQueue,
    /// Hash of each page as last written: the switchover digests fold them.
    placed: Vec<u64>,
    faults: Option<Arc<FaultSource>>,
    marks: usize,
    switch: Option<PageBitmap>,
    /// Pages punched out when the source announced the switch (they were
    /// waiting for storage) and neither written nor faulted in since:
    /// holes that the switch need not punch again.
    holes: Option<PageBitmap>,
    post: Option<Post>,
    out: mpsc::UnboundedSender<Message>,
    /// What the storage readers read (final once no read is outstanding).
    storage: Arc<StorageTally>,
    read_buffers: Arc<ReadBuffers>,
    stats: DestStats,
}

impl Applier {
    fn entry(&mut self, e: PageEntry) -> Result<(), DestError> {
        let idx = usize::try_from(e.page).expect("page checked against RAM size by the reader");
        if let Some(post) = &self.post {
            // After the switch the source's RAM is frozen: every copy of a
            // page is the same, and the first one placed is final (the VM
            // may have written the page since).
            if !post.missing.get(e.page) {
                return Ok(());
            }
        }
        // Every message about a page supersedes the earlier ones, including a
        // storage read still in flight: it will find the version moved on.
        self.version[idx] = self.version[idx].wrapping_add(1);
        if self.inflight.get(e.page) {
            self.inflight.unset(e.page);
            self.ref_of.remove(&e.page);
        }
        match e.encoding {
            PageEncoding::Reference => {
                let (hint, hash) = protocol::decode_reference(&e.data)
                    .ok_or_else(|| DestError::BadPage(format!("page {}: bad reference", e.page)))?;
                let valid = rebuild::check_hint(hint, &self.disk_sizes);
                match (&self.refs, valid) {
                    (Some(_), Ok(())) if self.outstanding >= self.max_outstanding() => {
                        return Err(DestError::BadPage(format!(
                            "{} references wait for storage, more than twice the RAM's pages: the source sends references it does not wait for",
                            self.outstanding
                        )));
                    }
                    (Some(tx), Ok(())) => {
                        let req = RefRequest {
                            page: e.page,
                            version: self.version[idx],
                            hint,
                            hash,
                        };
                        tx.send(req)
                            .map_err(|_| DestError::Worker("storage readers stopped".into()))?;
                        if self.faults.is_some() {
                            self.ref_of.insert(e.page, req);
                        }
                        self.outstanding += 1;
                        self.inflight.set(e.page);
                    }
                    _ => {
                        self.stats.rejected_refs += 1;
                        self.unresolved(e.page);
                    }
                }
            }
            enc => {
                if let Some(h) = self.holes.as_mut() {
                    h.unset(e.page);
                }
                let hash = apply(&mut self.ram, &e, &mut self.dctx)?;
                self.record_placed(e.page, hash)?;
                match enc {
                    PageEncoding::Raw => self.stats.raw_pages += 1,
                    PageEncoding::Zero => self.stats.zero_pages += 1,
                    _ => self.stats.compressed_pages += 1,
                }
            }
        }
        Ok(())
    }

    /// Most storage reads that may wait at once: a source waits for a
    /// round's reads before the next round, so twice the RAM's pages (and a
    /// batch) is more than any round needs, and bounds the read queue a
    /// hostile source could grow with references to one page.
    fn max_outstanding(&self) -> u64 {
        2 * self.version.len() as u64 + protocol::MAX_BATCH_PAGES as u64
    }

    /// A page storage could not give: before the switch the source resends
    /// it in the next round; after, it is asked for at once.
    fn unresolved(&mut self, page: u64) {
        match self.post.as_mut() {
            Some(post) => {
                if post.requested.set(page) {
                    let _ = self.out.send(Message::PageRequest { pages: vec![page] });
                }
            }
            None => self.need.push(page),
        }
    }

    /// Records the hash of what `page` now holds and, after the switch,
    /// that it is placed: its waiters are woken.
    fn record_placed(&mut self, page: u64, hash: u64) -> Result<(), DestError> {
        self.placed[usize::try_from(page).expect("page inside RAM")] = hash;
        let Some(post) = self.post.as_mut() else {
            return Ok(());
        };
        post.missing.unset(page);
        self.stats.postcopy_pages += 1;
        if let Some(since) = post.waiting.remove(&page) {
            let stall = u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX);
            self.stats.longest_stall_us = self.stats.longest_stall_us.max(stall);
            if stall > 20_000 {
                tracing::debug!(
                    page,
                    stall_ms = stall / 1000,
                    ms_since_switch = post.since.elapsed().as_millis(),
                    "long stall"
                );
            }
            let f = &post.faults;
            dbmigrate_uffd::wake(&f.uffd, f.base + page * PAGE_SIZE as u64, PAGE_SIZE as u64)
                .map_err(|source| DestError::Faults {
                    doing: "waking a faulting vCPU",
                    source,
                })?;
        }
        Ok(())
    }

    /// Applies one storage read: pages whose hash matched and whose version
    /// is still current are written, consecutive RAM pages in one write
    /// (buffer-pool frames are 4 consecutive pages); a mismatch goes on the
    /// list of pages to ask the source for.
    fn resolved_run(
        &mut self,
        pages: &[Resolved],
        data: &[u8],
        unread: bool,
    ) -> Result<(), DestError> {
        self.outstanding -= pages.len() as u64;
        // (first RAM page, its block in `data`, count) of the pending write.
        let mut group: Option<(u64, usize, usize)> = None;
        let mut placed = Vec::new();
        for &Resolved {
            page,
            version,
            ok,
            slot: i,
            hash,
        } in pages
        {
            let idx = usize::try_from(page).expect("page checked when the reference arrived");
            if self.version[idx] != version {
                continue; // a newer message about this page already decided it
            }
            if self.post.as_ref().is_some_and(|p| !p.missing.get(page)) {
                continue; // placed by the urgent read of the same reference
            }
            if !self.ref_of.is_empty() {
                self.ref_of.remove(&page);
            }
            self.inflight.unset(page);
            if !ok {
                if unread {
                    self.stats.storage_unread += 1;
                } else {
                    self.stats.rebuild_mismatch += 1;
                }
                self.unresolved(page);
                continue;
            }
            self.stats.rebuilt_pages += 1;
            placed.push((page, hash));
            match &mut group {
                Some((first, at, n)) if *first + *n as u64 == page && *at + *n == i => *n += 1,
                _ => {
                    if let Some(g) = group.replace((page, i, 1)) {
                        self.write_group(g, data)?;
                    }
                }
            }
        }
        if let Some(g) = group {
            self.write_group(g, data)?;
        }
        // Waiters are woken only once their page is in the file.
        for (page, hash) in placed {
            self.record_placed(page, hash)?;
        }
        Ok(())
    }

    fn write_group(
        &mut self,
        (page, at, n): (u64, usize, usize),
        data: &[u8],
    ) -> Result<(), DestError> {
        if let Some(h) = self.holes.as_mut() {
            for p in page..page + n as u64 {
                h.unset(p);
            }
        }
        Ok(self
            .ram
            .write_pages(page, &data[at * PAGE_SIZE..(at + n) * PAGE_SIZE])?)
    }

    /// The source will switch to post-copy, and every page of the last
    /// round is in. The pages the source already knows it will send again
    /// (`stale`) and, in RAM allocated up front, the pages still waiting
    /// for storage (after a first round, most of the buffer pool) are
    /// punched out now, while the VM still runs on the source, instead of
    /// inside the pause; reads land through the file from here on, filling
    /// the holes. The switch punches only what changed since.
    fn prepare_switch(&mut self, stale: PageBitmap) -> Result<(), DestError> {
        if self.post.is_none() && self.holes.is_none() && self.faults.is_some() {
            let t = Instant::now();
            let mut holes = stale;
            if self.ram.prepared() == Prepared::ZeroedAllocated {
                self.ram.write_through_file();
                holes.union_with(&self.inflight);
            }
            punch(&mut self.ram, holes.iter())?;
            tracing::info!(
                punched = holes.count(),
                punch_ms = t.elapsed().as_millis(),
                "prepared the switch to post-copy"
            );
            self.holes = Some(holes);
        }
        let _ = self.out.send(Message::SwitchPrepared);
        Ok(())
    }

    /// The switch to post-copy, once every data connection passed its
    /// marker: pages the source will still send are made missing (their
    /// stale copies punched out, so that touching them faults), pages with a
    /// storage read in flight stay missing until it lands, and pages that
    /// storage could not give are asked for at once.
    fn switch_to_postcopy(&mut self, pending: PageBitmap) -> Result<(), DestError> {
        let Some(faults) = self.faults.clone() else {
            return Err(DestError::Unexpected {
                got: "Switch",
                expected: "pages (this destination cannot serve post-copy)",
            });
        };
        let mut missing = pending;
        for p in missing.iter() {
            let idx = usize::try_from(p).expect("bitmap sized to RAM");
            self.version[idx] = self.version[idx].wrapping_add(1);
            self.inflight.unset(p);
        }
        // Pages the source will still send may hold older copies. Pages
        // waiting for storage or asked of the source were never written in
        // post-copy's single round (a drained round leaves none): holes
        // already, unless the RAM was allocated up front.
        let allocated = self.ram.prepared() == Prepared::ZeroedAllocated;
        let pending_only = (!allocated).then(|| missing.clone());
        missing.union_with(&self.inflight);
        let need: Vec<u64> = self
            .need
            .take(usize::MAX)
            .into_iter()
            .filter(|&p| missing.set(p))
            .collect();
        if allocated {
            self.ram.write_through_file();
        }
        let stale = pending_only.as_ref().unwrap_or(&missing);
        let holes = self.holes.take();
        let punch_started = Instant::now();
        punch(
            &mut self.ram,
            stale
                .iter()
                .filter(|&p| holes.as_ref().is_none_or(|h| !h.get(p))),
        )?;
        let mut requested = PageBitmap::new(missing.len());
        for &p in &need {
            requested.set(p);
        }
        tracing::info!(
            missing = missing.count(),
            from_storage = self.inflight.count(),
            asked = need.len(),
            punch_ms = punch_started.elapsed().as_millis(),
            "switched to post-copy"
        );
        self.post = Some(Post {
            missing,
            requested,
            waiting: HashMap::new(),
            faults,
            since: Instant::now(),
        });
        let _ = self.out.send(Message::Switched);
        for chunk in need.chunks(protocol::MAX_NEED) {
            let _ = self.out.send(Message::PageRequest {
                pages: chunk.to_vec(),
            });
        }
        Ok(())
    }

    /// Serves page faults: a page that is not missing is zero (or was
    /// placed since the fault was reported); a missing one waits for its
    /// storage read or is asked of the source ahead of the background push.
    fn on_faults(&mut self, addrs: Vec<u64>) -> Result<(), DestError> {
        let Some(post) = self.post.as_mut() else {
            // Before the switch the VM does not run; QEMU itself touched a
            // page that holds no data yet: it reads as zero, as it would
            // without post-copy, and a later write through the file replaces it.
            if let Some(f) = &self.faults {
                for a in addrs {
                    let at = a & !(PAGE_SIZE as u64 - 1);
                    serve_zero(f, at)?;
                    // The zero page fills the hole.
                    if let Some(h) = self.holes.as_mut() {
                        if let Some(page) = f.page_at(at, h.len()) {
                            h.unset(page);
                        }
                    }
                }
            }
            return Ok(());
        };
        let f = post.faults.clone();
        let mut ask = Vec::new();
        for a in addrs {
            let at = a & !(PAGE_SIZE as u64 - 1);
            let Some(page) = f.page_at(at, post.missing.len()) else {
                continue; // not in RAM: cannot be ours
            };
            self.stats.faults += 1;
            if !post.missing.get(page) {
                self.stats.zero_faults += 1;
                serve_zero(&f, at)?;
                continue;
            }
            post.waiting.entry(page).or_insert_with(Instant::now);
            if self.inflight.get(page) {
                self.stats.storage_faults += 1;
                // Its read may be queued behind thousands of background
                // reads: read it again at once (the first to land is placed).
                // Its twin on the ordinary queue wakes an idle reader.
                if let (Some(req), Some(tx)) = (self.ref_of.remove(&page), &self.refs) {
                    if let Ok(mut u) = self.urgent_reads.lock() {
                        u.push(req);
                        self.outstanding += 1;
                    }
                    if tx.send(req).is_ok() {
                        self.outstanding += 1;
                    }
                }
            } else {
                self.stats.network_faults += 1;
                let first_ask = post.requested.set(page);
                tracing::debug!(
                    page,
                    ms_since_switch = post.since.elapsed().as_millis(),
                    already_asked = !first_ask,
                    "network-bound fault"
                );
                if first_ask {
                    ask.push(page);
                }
            }
        }
        if !ask.is_empty() {
            let _ = self.out.send(Message::PageRequest { pages: ask });
        }
        Ok(())
    }

    fn done(&self, ended: usize) -> bool {
        ended == self.conns
            && self.outstanding == 0
            && self.post.as_ref().is_none_or(|p| p.missing.is_clear())
    }

    fn run(
        mut self,
        mut rx: mpsc::Receiver<ApplyInput>,
        mut stored: mpsc::Receiver<ApplyInput>,
        mut urgent: mpsc::Receiver<ApplyInput>,
        rt: tokio::runtime::Handle,
        mut ended_session: oneshot::Receiver<()>,
    ) -> Result<Applied, DestError> {
        let (mut ended, mut drains, mut bytes) = (0usize, 0usize, 0u64);
        let mut drain_round = 0;
        let mut turn = false;
        let mut prepare = PrepareState::default();
        while !self.done(ended) {
            // After the switch, pages from the source come before storage
            // results: a page missing from the network costs the VM a round
            // trip, one from storage is read again at once when it faults.
            // Before, the two alternate so that neither stalls the round.
            turn = !turn;
            let data_first = self.post.is_some() || turn;
            let input = match urgent.try_recv().or_else(|_| {
                if data_first {
                    rx.try_recv().or_else(|_| stored.try_recv())
                } else {
                    stored.try_recv().or_else(|_| rx.try_recv())
                }
            }) {
                Ok(i) => i,
                Err(_) => {
                    rt.block_on(async {
                        tokio::select! {
                            biased;
                            // The session gave up (timeout, abort): stop
                            // waiting for inputs that will never come.
                            _ = &mut ended_session => None,
                            Some(i) = urgent.recv() => Some(i),
                            Some(i) = rx.recv() => Some(i),
                            Some(i) = stored.recv() => Some(i),
                            else => None,
                        }
                    })
                    .ok_or_else(|| {
                        DestError::Worker("the session ended before every page arrived".into())
                    })?
                }
            };
            match input {
                ApplyInput::Batch(pages) => {
                    for e in pages {
                        self.entry(e)?;
                    }
                }
                ApplyInput::Drain { round } => {
                    drains += 1;
                    drain_round = round;
                }
                ApplyInput::PrepareSwitch(stale) => prepare.stale = Some(stale),
                ApplyInput::PrepareMark => prepare.marks += 1,
                ApplyInput::SwitchMark => {
                    self.marks += 1;
                    tracing::debug!(marks = self.marks, "switch mark");
                }
                ApplyInput::Switch(pending) => {
                    tracing::debug!(
                        marks = self.marks,
                        outstanding = self.outstanding,
                        "switch bitmap"
                    );
                    self.switch = Some(pending);
                }
                ApplyInput::Faults(addrs) => self.on_faults(addrs)?,
                ApplyInput::End { bytes: b } => {
                    ended += 1;
                    bytes += b;
                }
                ApplyInput::Failed(e) => return Err(e),
                ApplyInput::Resolved {
                    pages,
                    data,
                    unread,
                } => {
                    self.resolved_run(&pages, &data, unread)?;
                    self.read_buffers.give(data);
                }
            }
            if prepare.marks == self.conns {
                if let Some(stale) = prepare.stale.take() {
                    prepare.marks = 0;
                    self.prepare_switch(stale)?;
                }
            }
            if self.marks == self.conns && self.switch.is_some() && self.post.is_none() {
                let pending = self.switch.take().expect("checked");
                self.switch_to_postcopy(pending)?;
            }
            if drains == self.conns && self.outstanding == 0 {
                drains = 0;
                let need = self.need.take(protocol::MAX_NEED);
                let _ = self.out.send(Message::Drained {
                    round: drain_round,
                    need,
                });
            }
        }
        self.refs = None; // lets the storage readers finish
        self.stats.bytes_received = bytes;
        self.stats.storage_bytes = self.storage.bytes.load(Ordering::Relaxed);
        self.stats.storage_reads = self.storage.reads.load(Ordering::Relaxed);
        match self.post.take() {
            Some(post) => {
                // Every page is placed: zero pages need no more serving.
                let f = &post.faults;
                dbmigrate_uffd::unregister(&f.uffd, f.base, f.len).map_err(|source| {
                    DestError::Faults {
                        doing: "ending fault handling",
                        source,
                    }
                })?;
                self.stats.postcopy_ms =
                    u64::try_from(post.since.elapsed().as_millis()).unwrap_or(u64::MAX);
            }
            None => {
                // A destination ready for post-copy that received by pre-copy:
                // its holes are zero pages, and nobody will serve their faults
                // once this agent is gone.
                if let Some(f) = &self.faults {
                    dbmigrate_uffd::unregister(&f.uffd, f.base, f.len).map_err(|source| {
                        DestError::Faults {
                            doing: "ending fault handling",
                            source,
                        }
                    })?;
                }
            }
        }
        let t = Instant::now();
        let digests = verify::fold_page_hashes(&self.placed, verify::CHUNK_PAGES);
        Ok(Applied {
            ram: self.ram,
            digests,
            final_hash: t.elapsed(),
            stats: self.stats,
        })
    }
}

/// Punches `pages` (ascending) out of the RAM file, a run of neighbours at a time.
fn punch(ram: &mut DestRam, pages: impl Iterator<Item = u64>) -> Result<(), DestError> {
    let mut run: Option<(u64, u64)> = None;
    for p in pages {
        match &mut run {
            Some((first, n)) if *first + *n == p => *n += 1,
            _ => {
                if let Some((first, n)) = run.replace((p, 1)) {
                    ram.zero_pages(first, n)?;
                }
            }
        }
    }
    if let Some((first, n)) = run {
        ram.zero_pages(first, n)?;
    }
    Ok(())
}

/// Fills a faulting page with zeros, or only wakes the vCPU if the page
/// was filled since the fault.
fn serve_zero(f: &FaultSource, at: u64) -> Result<(), DestError> {
    let filled = dbmigrate_uffd::zeropage(&f.uffd, at, PAGE_SIZE as u64).map_err(|source| {
        DestError::Faults {
            doing: "placing a zero page",
            source,
        }
    })?;
    if !filled {
        dbmigrate_uffd::wake(&f.uffd, at, PAGE_SIZE as u64).map_err(|source| {
            DestError::Faults {
                doing: "waking a faulting vCPU",
                source,
            }
        })?;
    }
    Ok(())
}

/// Reads the VM's page faults until `stop` is set.
fn fault_reader(f: Arc<FaultSource>, tx: mpsc::Sender<ApplyInput>, stop: Arc<AtomicBool>) {
    let mut addrs = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        match dbmigrate_uffd::read_faults(&f.uffd, 100, &mut addrs) {
            Ok(_) if addrs.is_empty() => {}
            Ok(_) => {
                if tx
                    .blocking_send(ApplyInput::Faults(std::mem::take(&mut addrs)))
                    .is_err()
                {
                    return;
                }
            }
            Err(e) => {
                let _ = tx.blocking_send(ApplyInput::Failed(DestError::Faults {
                    doing: "reading page faults",
                    source: e,
                }));
                return;
            }
        }
    }
}

/// Result of [`DestSession::receive`].
pub enum Received {
    /// Pre-copy ended: the RAM and whether it matched the source's at switchover.
    Complete {
        /// The RAM.
        ram: DestRam,
        /// Digests matched.
        matched: bool,
    },
    /// The source switched to post-copy: finish with [`DestSession::postcopy`].
    Postcopy(PostcopyRun),
}

/// A post-copy in progress (the RAM owner keeps running).
pub struct PostcopyRun {
    applier: tokio::task::JoinHandle<Result<Applied, DestError>>,
    urgent: mpsc::Sender<ApplyInput>,
    out: mpsc::UnboundedReceiver<Message>,
    stop: SessionStop,
    pages: u64,
}

/// Ends the session's helpers when dropped: the fault reader stops and the
/// RAM owner stops waiting, so that an abandoned session never keeps the
/// agent from exiting.
struct SessionStop {
    faults: Arc<AtomicBool>,
    _applier: oneshot::Sender<()>,
}

impl SessionStop {
    fn faults_done(&self) {
        self.faults.store(true, Ordering::Relaxed);
    }
}

impl Drop for SessionStop {
    fn drop(&mut self) {
        self.faults_done();
    }
}

/// Result of a finished post-copy.
#[derive(Clone, Debug)]
pub struct PostcopyOutcome {
    /// Every placed page matched the source's frozen RAM.
    pub matched: bool,
    /// The comparison took place (false: every page was placed and the VM
    /// runs, but the source went silent before sending its digests).
    pub compared: bool,
    /// Chunks that differed.
    pub mismatched_chunks: u32,
}

impl DestSession {
    /// What tells this session's later connections from others.
    pub fn peer(&self) -> SessionPeer {
        self.peer.clone()
    }

    /// The source's announcement.
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// Paces the rebuild's background storage reads to `bytes_per_sec`
    /// (None or 0: no pace): a guest whose host shares its cores or its
    /// storage with the rebuild loses less while the migration takes
    /// longer. Reads a vCPU waits for in post-copy are not paced: they go
    /// to the next reader that comes free.
    pub fn set_storage_rate(&mut self, bytes_per_sec: Option<u64>) {
        self.storage_rate = bytes_per_sec;
    }

    /// Receives pages until every data connection ended, rebuilding
    /// referenced pages from `storage`, then answers the source's digest
    /// comparison; or, if the source switches to post-copy (only offered
    /// when `faults` is given), returns as soon as the switch is done.
    pub async fn receive(
        &mut self,
        ram: DestRam,
        storage: Option<Arc<dyn Storage>>,
        faults: Option<FaultSource>,
    ) -> Result<Received, DestError> {
        let pages = ram.pages();
        let conns = self.data.len();
        let heard = Arc::new(Heard::new());
        let (tx, rx) = mpsc::channel::<ApplyInput>(64);
        let (urgent_tx, urgent_rx) = mpsc::channel::<ApplyInput>(64);
        let (stored_tx, stored_rx) = mpsc::channel::<ApplyInput>(RESULTS_QUEUED);
        for s in std::mem::take(&mut self.data) {
            tokio::spawn(read_pages(s, tx.clone(), pages, heard.clone()));
        }
        let tally = Arc::new(StorageTally::default());
        let urgent_reads = Arc::new(Mutex::new(Vec::new()));
        let read_buffers = Arc::new(ReadBuffers::default());
        let (refs, disk_sizes) = match &storage {
            Some(st) => {
                let (req_tx, req_rx) = std::sync::mpsc::channel::<RefRequest>();
                let readers = Arc::new(StorageReaders {
                    storage: st.clone(),
                    requests: Mutex::new(req_rx),
                    urgent: urgent_reads.clone(),
                    results: stored_tx,
                    tally: tally.clone(),
                    heard: heard.clone(),
                    breaker: Mutex::new(rebuild::StorageBreaker::default()),
                    buffers: read_buffers.clone(),
                    pace: crate::limiter::Pacer::new(self.storage_rate),
                });
                for _ in 0..READERS {
                    let r = readers.clone();
                    std::thread::spawn(move || storage_worker(r));
                }
                (Some(req_tx), st.disk_sizes().to_vec())
            }
            None => {
                drop(stored_tx); // no storage results will come
                (None, Vec::new())
            }
        };
        drop(tx);
        let faults = faults.map(Arc::new);
        let stop_faults = Arc::new(AtomicBool::new(false));
        let (end_tx, end_rx) = oneshot::channel();
        let stop = SessionStop {
            faults: stop_faults.clone(),
            _applier: end_tx,
        };
        if let Some(f) = &faults {
            let (f, t, stop) = (f.clone(), urgent_tx.clone(), stop_faults.clone());
            std::thread::Builder::new()
                .name("dbmigrate-faults".into())
                .spawn(move || fault_reader(f, t, stop))
                .map_err(|e| DestError::Worker(format!("starting the fault reader: {e}")))?;
        }
        let (out_tx, mut out_rx) = mpsc::unbounded_channel();
        let upages = usize::try_from(pages).expect("RAM pages fit in memory");
        let applier = Applier {
            ram,
            conns,
            version: vec![0; upages],
            dctx: zstd::bulk::Decompressor::new()
                .map_err(|e| DestError::Worker(format!("zstd: {e}")))?,
            disk_sizes,
            refs,
            urgent_reads,
            ref_of: HashMap::new(),
            outstanding: 0,
            inflight: PageBitmap::new(pages),
            need: PageQueue::new(pages),
            placed: vec![verify::zero_page_hash(); upages],
            faults: faults.clone(),
            marks: 0,
            switch: None,
            holes: None,
            post: None,
            out: out_tx,
            storage: tally.clone(),
            read_buffers,
            stats: DestStats::default(),
        };
        // The RAM has one owner thread: ordering per page is the arrival order
        // on its connection, and pages never cross connections.
        let rt = tokio::runtime::Handle::current();
        let mut applier = tokio::task::spawn_blocking(move || {
            let mut a = applier;
            // The VM has not run here: every page must read as zero until
            // written, which lets the source skip zero pages and the digests
            // start known. (Post-copy punches what it still waits for at
            // the switch, so allocated RAM serves it too.)
            if a.ram.prepared() == Prepared::No {
                a.ram.zero_all()?;
            }
            a.run(rx, stored_rx, urgent_rx, rt, end_rx)
        });
        // Besides forwarding drain answers, the control connection carries
        // only an abort (or EOF from a dead source), the switch to
        // post-copy, and the digests, which may come before the last pages
        // have been applied.
        let mut early_request = None;
        let applied = loop {
            tokio::select! {
                biased;
                Some(m) = out_rx.recv() => {
                    self.ctrl_tx.send(&m, "answering the source").await?;
                }
                r = &mut applier => break writer_outcome(r)?,
                () = tokio::time::sleep(Duration::from_secs(1)) => {
                    // A cut link shows as silence, not as an error. Once the
                    // digests came, the source waits for this side's answer.
                    if early_request.is_none() && heard.silence() > self.peer_timeout {
                        return Err(DestError::Timeout {
                            secs: self.peer_timeout.as_secs(),
                            doing: "receiving pages",
                        });
                    }
                }
                m = self.ctrl_in.recv(), if early_request.is_none() => {
                    heard.touch();
                    match m.ok_or(ProtocolError::Closed { doing: "watching the control connection" })? {
                        Ok(req @ Message::VerifyRequest { .. }) => early_request = Some(req),
                        Ok(Message::PrepareSwitch { stale }) => {
                            let stale = bitmap_from_bytes(&stale, pages)?;
                            if urgent_tx.send(ApplyInput::PrepareSwitch(stale)).await.is_err() {
                                return Err(stopped_writer(&mut applier).await);
                            }
                        }
                        Ok(Message::Switch { pending }) => {
                            let bits = bitmap_from_bytes(&pending, pages)?;
                            if urgent_tx.send(ApplyInput::Switch(bits)).await.is_err() {
                                return Err(stopped_writer(&mut applier).await);
                            }
                            return Ok(Received::Postcopy(PostcopyRun {
                                applier,
                                urgent: urgent_tx,
                                out: out_rx,
                                stop,
                                pages,
                            }));
                        }
                        Ok(Message::Heartbeat) => {}
                        Ok(Message::Abort { reason }) => return Err(DestError::SourceAborted { reason }),
                        Ok(other) => return Err(DestError::Unexpected { got: other.name(), expected: "pages" }),
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        };
        drop(stop);
        while let Ok(m) = out_rx.try_recv() {
            self.ctrl_tx.send(&m, "answering the source").await?;
        }
        let Applied {
            ram,
            digests: ours,
            final_hash,
            stats,
        } = applied;
        self.stats = stats;

        let msg = match early_request {
            Some(m) => m,
            None => {
                self.read_ctrl("waiting for the source's RAM digests")
                    .await?
            }
        };
        self.stats.verify_ms = u64::try_from(final_hash.as_millis()).unwrap_or(u64::MAX);
        let total = self.compare(msg, &ours, pages).await?;
        Ok(Received::Complete {
            ram,
            matched: total == 0,
        })
    }

    /// Answers a VerifyRequest with the chunks that differ from `ours`.
    async fn compare(&mut self, msg: Message, ours: &[u128], pages: u64) -> Result<u32, DestError> {
        let Message::VerifyRequest {
            chunk_pages,
            digests,
        } = msg
        else {
            return Err(DestError::Unexpected {
                got: msg.name(),
                expected: "VerifyRequest",
            });
        };
        let expected_chunks = pages.div_ceil(u64::from(chunk_pages));
        if digests.len() as u64 != expected_chunks {
            return Err(DestError::BadPage(format!(
                "{} digests for {expected_chunks} chunks",
                digests.len()
            )));
        }
        if chunk_pages != verify::CHUNK_PAGES {
            return Err(DestError::BadPage(format!(
                "digests over chunks of {chunk_pages} pages; this agent compares chunks of {}",
                verify::CHUNK_PAGES
            )));
        }
        let bad = verify::mismatched_chunks(ours, &digests);
        let total = u32::try_from(bad.len()).unwrap_or(u32::MAX);
        let listed = bad
            .into_iter()
            .take(protocol::MAX_REPORTED_MISMATCHES)
            .collect();
        self.ctrl_tx
            .send(
                &Message::VerifyResult {
                    mismatched: listed,
                    mismatched_total: total,
                },
                "sending the RAM comparison",
            )
            .await?;
        Ok(total)
    }

    /// Finishes a post-copy: serves the VM's faults and places the pages
    /// still to come while the source hands the VM over. On Commit it runs
    /// `resume` (which must resume the VM here) and confirms; the pages then
    /// keep arriving until none is missing (then `placed` runs, at once:
    /// the VM no longer depends on this session), and the placed pages are
    /// compared with the source's frozen RAM.
    pub async fn postcopy<F, P>(
        &mut self,
        mut run: PostcopyRun,
        resume: F,
        placed: P,
    ) -> Result<PostcopyOutcome, DestError>
    where
        F: std::future::Future<Output = Result<(), String>>,
        P: FnOnce(),
    {
        let mut placed = Some(placed);
        let mut resume = std::pin::pin!(resume);
        let (mut committed, mut resumed) = (false, false);
        let mut request: Option<Message> = None;
        let mut applied: Option<Applied> = None;
        let mut last_word = Instant::now();
        loop {
            // The comparison waits for the resume: answering it ends the session.
            if let (Some(a), Some(req), true) = (&applied, &request, resumed) {
                let (req, pages) = (req.clone(), run.pages);
                let digests = a.digests.clone();
                self.stats = a.stats.clone();
                let total = match self.compare(req, &digests, pages).await {
                    Ok(t) => t,
                    Err(e) => return Ok(self.unverified(a, &e)),
                };
                self.drain_until_closed().await;
                return Ok(PostcopyOutcome {
                    matched: total == 0,
                    compared: true,
                    mismatched_chunks: total,
                });
            }
            tokio::select! {
                biased;
                Some(m) = run.out.recv() => {
                    self.ctrl_tx.send(&m, "asking for pages").await?;
                }
                r = &mut run.applier, if applied.is_none() => {
                    applied = Some(writer_outcome(r)?);
                    run.stop.faults_done();
                    if let Some(f) = placed.take() {
                        f();
                    }
                }
                r = &mut resume, if committed && !resumed => {
                    resumed = true;
                    if let Err(reason) = r {
                        self.abort(&reason).await;
                        return Err(DestError::Resume(reason));
                    }
                    self.ctrl_tx.send(&Message::Activated, "sending Activated").await?;
                }
                m = self.ctrl_in.recv() => {
                    last_word = Instant::now();
                    let m = match m.ok_or(ProtocolError::Closed { doing: "post-copy" }).and_then(|r| r) {
                        Ok(m) => m,
                        Err(e) => match (&applied, resumed) {
                            // The VM runs here with every page: losing the
                            // source now costs only the comparison.
                            (Some(a), true) => return Ok(self.unverified(a, &e)),
                            _ => return Err(e.into()),
                        },
                    };
                    match m {
                        Message::Commit => committed = true,
                        Message::PageBatch { pages, .. } => {
                            if let Some(bad) = pages.iter().find(|e| e.page >= run.pages) {
                                return Err(DestError::BadPage(format!(
                                    "page {} is beyond the {} pages of RAM", bad.page, run.pages
                                )));
                            }
                            // Every page is placed already: this is the answer to a
                            // request that storage or the background push beat.
                            if applied.is_some() {
                                continue;
                            }
                            if run.urgent.send(ApplyInput::Batch(pages)).await.is_err() {
                                // The writer may have placed the last page
                                // since the select above looked at it: then
                                // this batch is one more late answer.
                                applied = Some(writer_outcome((&mut run.applier).await)?);
                                run.stop.faults_done();
                                if let Some(f) = placed.take() {
                                    f();
                                }
                            }
                        }
                        m @ Message::VerifyRequest { .. } => request = Some(m),
                        Message::Heartbeat => {}
                        Message::Abort { reason } => return Err(DestError::SourceAborted { reason }),
                        other => return Err(DestError::Unexpected { got: other.name(), expected: "post-copy pages" }),
                    }
                }
                () = tokio::time::sleep(Duration::from_secs(1)) => {
                    if last_word.elapsed() > self.peer_timeout {
                        if let (Some(a), true) = (&applied, resumed) {
                            let silent = format!("no word for {} s", self.peer_timeout.as_secs());
                            return Ok(self.unverified(a, &silent));
                        }
                        return Err(DestError::Timeout {
                            secs: self.peer_timeout.as_secs(),
                            doing: if applied.is_none() { "post-copy (pages still missing)" } else { "post-copy (waiting for Commit)" },
                        });
                    }
                }
            }
        }
    }

    /// Every page is placed and the VM runs here, but the source can no
    /// longer compare them: stopping the VM now would lose it (the source
    /// cannot take it back), so it keeps running, unverified.
    fn unverified(&mut self, a: &Applied, why: &dyn std::fmt::Display) -> PostcopyOutcome {
        tracing::error!(%why, "post-copy: every page is placed and the VM runs here, but the source is gone before the comparison");
        self.stats = DestStats {
            postcopy_unverified: true,
            ..a.stats.clone()
        };
        PostcopyOutcome {
            matched: false,
            compared: false,
            mismatched_chunks: 0,
        }
    }

    /// Reads (and drops) what the source still sends until it closes the
    /// control connection, for at most [`LINGER`]: late answers to page
    /// requests may be on their way, and closing with them unread would
    /// reset the connection under the source before it reads the result.
    async fn drain_until_closed(&mut self) {
        let deadline = tokio::time::Instant::now() + LINGER;
        while let Ok(Some(Ok(_))) = tokio::time::timeout_at(deadline, self.ctrl_in.recv()).await {}
    }

    /// Waits for the source to hand over the VM. Ok(()) means: resume it now.
    pub async fn wait_commit(&mut self) -> Result<(), DestError> {
        match self.read_ctrl("waiting for Commit").await? {
            Message::Commit => Ok(()),
            other => Err(DestError::Unexpected {
                got: other.name(),
                expected: "Commit",
            }),
        }
    }

    /// Tells the source the VM runs here now.
    pub async fn activated(&mut self) -> Result<(), DestError> {
        self.ctrl_tx
            .send(&Message::Activated, "sending Activated")
            .await?;
        Ok(())
    }

    /// Tells the source why the destination gives up (best effort).
    pub async fn abort(&mut self, reason: &str) {
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.ctrl_tx.send(
                &Message::Abort {
                    reason: reason.to_string(),
                },
                "sending Abort",
            ),
        )
        .await;
    }

    async fn read_ctrl(&mut self, doing: &'static str) -> Result<Message, DestError> {
        // The timeout runs from the last message: heartbeats show the
        // source alive while it waits for QEMU or hashes its RAM.
        let msg = loop {
            let msg = within(self.peer_timeout, doing, self.ctrl_in.recv())
                .await?
                .ok_or(ProtocolError::Closed { doing })??;
            if msg != Message::Heartbeat {
                break msg;
            }
        };
        if let Message::Abort { reason } = msg {
            return Err(DestError::SourceAborted { reason });
        }
        Ok(msg)
    }
}

/// Writes one page; returns the hash of what the page now holds.
fn apply(
    ram: &mut DestRam,
    e: &PageEntry,
    dctx: &mut zstd::bulk::Decompressor<'_>,
) -> Result<u64, DestError> {
    let bad = |err: crate::ram::RamError| DestError::BadPage(err.to_string());
    match e.encoding {
        PageEncoding::Raw => {
            ram.write_pages(e.page, &e.data).map_err(bad)?;
            Ok(verify::page_hash(&e.data))
        }
        // A hole reads as zero and costs no memory.
        PageEncoding::Zero => {
            ram.zero_pages(e.page, 1).map_err(bad)?;
            Ok(verify::zero_page_hash())
        }
        PageEncoding::Reference => Err(DestError::BadPage(format!(
            "page {}: a reference cannot be applied directly",
            e.page
        ))),
        PageEncoding::Zstd => {
            let mut page = [0u8; PAGE_SIZE];
            let n = dctx
                .decompress_to_buffer(&e.data, &mut page[..])
                .map_err(|err| DestError::BadPage(format!("page {}: zstd: {err}", e.page)))?;
            if n != PAGE_SIZE {
                return Err(DestError::BadPage(format!(
                    "page {}: decompressed to {n} bytes, not {PAGE_SIZE}",
                    e.page
                )));
            }
            ram.write_pages(e.page, &page).map_err(bad)?;
            Ok(verify::page_hash(&page))
        }
    }
}

/// The switch bitmap, checked against the RAM's size.
fn bitmap_from_bytes(bytes: &[u8], pages: u64) -> Result<PageBitmap, DestError> {
    if bytes.len() as u64 != pages.div_ceil(8) {
        return Err(DestError::BadPage(format!(
            "switch bitmap of {} bytes for {pages} pages",
            bytes.len()
        )));
    }
    let mut bits = PageBitmap::new(pages);
    for (i, &b) in bytes.iter().enumerate() {
        for bit in 0..8u64 {
            if b & (1 << bit) != 0 {
                let p = i as u64 * 8 + bit;
                if p >= pages {
                    return Err(DestError::BadPage(format!(
                        "switch bitmap marks page {p}, beyond the {pages} pages of RAM"
                    )));
                }
                bits.set(p);
            }
        }
    }
    Ok(bits)
}

async fn read_control(mut rx: ConnReader, tx: mpsc::Sender<Result<Message, ProtocolError>>) {
    loop {
        let m = protocol::read_message(&mut rx, "reading the control connection")
            .await
            .map(|(m, _)| m);
        let failed = m.is_err();
        if tx.send(m).await.is_err() || failed {
            return;
        }
    }
}

async fn read_pages(s: Conn, tx: mpsc::Sender<ApplyInput>, pages: u64, heard: Arc<Heard>) {
    let last = match read_stream(s, &tx, pages, |_| heard.touch()).await {
        Ok(bytes) => ApplyInput::End { bytes },
        Err(e) => ApplyInput::Failed(e),
    };
    let _ = tx.send(last).await;
}

async fn read_stream(
    mut s: Conn,
    tx: &mpsc::Sender<ApplyInput>,
    pages: u64,
    mut heard: impl FnMut(u64),
) -> Result<u64, DestError> {
    let mut bytes = 0;
    let mut payload = Vec::new();
    loop {
        let (msg, n) = protocol::read_message_with(&mut s, "receiving pages", &mut payload).await?;
        heard(n);
        bytes += n;
        let input = match msg {
            Message::PageBatch { pages: entries, .. } => {
                if let Some(bad) = entries.iter().find(|e| e.page >= pages) {
                    return Err(DestError::BadPage(format!(
                        "page {} is beyond the {pages} pages of RAM",
                        bad.page
                    )));
                }
                ApplyInput::Batch(entries)
            }
            Message::Drain { round } => ApplyInput::Drain { round },
            Message::SwitchMark => ApplyInput::SwitchMark,
            Message::PrepareMark => ApplyInput::PrepareMark,
            Message::EndOfStream => return Ok(bytes),
            other => {
                return Err(DestError::Unexpected {
                    got: other.name(),
                    expected: "PageBatch, Drain, SwitchMark, PrepareSwitch or EndOfStream",
                })
            }
        };
        if tx.send(input).await.is_err() {
            return Err(DestError::Worker("RAM writer stopped".into()));
        }
    }
}

/// Why the RAM owner stopped taking inputs: its own error, not the closed channel.
async fn stopped_writer(
    applier: &mut tokio::task::JoinHandle<Result<Applied, DestError>>,
) -> DestError {
    match writer_outcome(applier.await) {
        Err(e) => e,
        Ok(_) => DestError::Worker("the RAM writer ended while pages were still coming".into()),
    }
}

/// What the RAM writer's task ended with.
fn writer_outcome(
    r: Result<Result<Applied, DestError>, tokio::task::JoinError>,
) -> Result<Applied, DestError> {
    r.map_err(|e| DestError::Worker(format!("the RAM writer failed: {e}")))?
}

async fn within<T>(
    limit: Duration,
    doing: &'static str,
    f: impl std::future::Future<Output = T>,
) -> Result<T, DestError> {
    tokio::time::timeout(limit, f)
        .await
        .map_err(|_| DestError::Timeout {
            secs: limit.as_secs(),
            doing,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(disk: u16, pages: usize) -> rebuild::Run {
        rebuild::Run {
            disk,
            offset: 0,
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
