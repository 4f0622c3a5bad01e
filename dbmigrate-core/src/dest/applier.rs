//! The RAM owner: one thread applies pages in arrival order, sends
//! references to the storage readers, answers drains, keeps the
//! switchover digests and, after a switch to post-copy, places each
//! missing page once and serves faults. Its phase is [`Phase`], moved on
//! only by [`phase::step`].

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::faults::{release, FaultSource, Post};
use super::phase::{self, Event, Phase, Transition};
use super::storage::{ReadBuffers, ReaderLink, StorageTally};
use super::{DestError, DestStats};
use crate::bitmap::{PageBitmap, PageQueue};
use crate::protocol::{self, PageEncoding, PageEntry, ToSource};
use crate::ram::{DestRam, Prepared};
use crate::rebuild::{self, RefRequest};
use crate::verify;
use crate::PAGE_SIZE;

mod faulting;

/// What the RAM owner thread hands back once every stream ended.
pub(super) struct Applied {
    pub(super) ram: DestRam,
    pub(super) digests: Vec<u128>,
    pub(super) final_hash: Duration,
    pub(super) stats: DestStats,
}

/// Inputs of the RAM owner thread.
pub(super) enum ApplyInput {
    /// Pages from a data connection, in arrival order (or, after the
    /// switch, pages the VM waits for, from the control connection).
    Batch(Vec<PageEntry>),
    /// A message that moves the phase on (see [`phase::step`]).
    Phase(Event),
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
pub(super) struct Resolved {
    pub(super) page: u64,
    /// The page's version when the reference arrived.
    pub(super) version: u32,
    /// The block read matched the reference's hash.
    pub(super) ok: bool,
    /// The block of the read that holds it.
    pub(super) slot: usize,
    /// Its [`verify::page_hash`] when `ok` (the low half of the reference's).
    pub(super) hash: u64,
}

/// The RAM owner: applies pages in arrival order, sends references to the
/// storage readers, answers drains, keeps the switchover digests and, after
/// a switch to post-copy, places each missing page once and serves faults.
pub(super) struct Applier {
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
    placed: verify::PageHashes,
    /// This side serves post-copy faults.
    faults: Option<Arc<FaultSource>>,
    /// Huge pages (their first page) mapped into QEMU before the switch,
    /// when QEMU itself touched them (hugetlbfs: minor faults).
    mapped_early: Vec<u64>,
    /// Where the migration stands.
    phase: Phase,
    out: mpsc::UnboundedSender<ToSource>,
    /// What the storage readers read (final once no read is outstanding).
    storage: Arc<StorageTally>,
    read_buffers: Arc<ReadBuffers>,
    stats: DestStats,
}

impl Applier {
    /// The RAM owner of `ram` for `conns` data connections, rebuilding
    /// through `readers` if there is storage, serving faults if `faults`,
    /// its answers to the source on `out`.
    pub(super) fn new(
        ram: DestRam,
        conns: usize,
        readers: Option<ReaderLink>,
        faults: Option<Arc<FaultSource>>,
        out: mpsc::UnboundedSender<ToSource>,
    ) -> Result<Self, DestError> {
        let pages = ram.pages();
        let upages = usize::try_from(pages).expect("RAM pages fit in memory");
        if let Some(f) = faults.as_ref() {
            let misaligned = f.misaligned();
            if f.unit != ram.file_page_bytes() || misaligned.is_some() {
                return Err(DestError::FaultUnit {
                    base: misaligned.unwrap_or(f.ranges.first().map_or(0, |r| r.base)),
                    unit: f.unit,
                    file_page: ram.file_page_bytes(),
                });
            }
        }
        let (refs, urgent_reads, storage, read_buffers, disk_sizes) = match readers {
            Some(r) => (Some(r.requests), r.urgent, r.tally, r.buffers, r.disk_sizes),
            None => Default::default(),
        };
        Ok(Self {
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
            placed: verify::PageHashes::zeros(pages),
            faults,
            mapped_early: Vec::new(),
            phase: Phase::default(),
            out,
            storage,
            read_buffers,
            stats: DestStats::default(),
        })
    }

    /// Runs the RAM owner on this thread (see [`Applier::run`]) once the
    /// RAM reads as zero.
    pub(super) fn start(mut self, inputs: Inputs) -> Result<Applied, DestError> {
        // The VM has not run here: every page must read as zero until
        // written, which lets the source skip zero pages and the digests
        // start known. (Post-copy punches what it still waits for at
        // the switch, so allocated RAM serves it too.)
        if self.ram.prepared() == Prepared::No {
            self.ram.zero_all()?;
        }
        self.run(inputs)
    }

    fn entry(&mut self, e: PageEntry) -> Result<(), DestError> {
        let idx = usize::try_from(e.page).expect("page checked against RAM size by the reader");
        if let Some(post) = self.phase.post() {
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
                if let Some(h) = self.phase.holes_mut() {
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
        match self.phase.post_mut() {
            Some(post) => {
                if post.requested.set(page) {
                    let _ = self.out.send(ToSource::PageRequest { pages: vec![page] });
                }
            }
            None => self.need.push(page),
        }
    }

    /// Records the hash of what `page` now holds and, after the switch,
    /// that it is placed: the waiters on its fault unit go on once
    /// nothing in the unit is missing (a 4 KiB page on tmpfs, its huge
    /// page on hugetlbfs).
    fn record_placed(&mut self, page: u64, hash: u64) -> Result<(), DestError> {
        self.placed.set(page, hash);
        let Some(post) = self.phase.post_mut() else {
            return Ok(());
        };
        post.missing.unset(page);
        self.stats.postcopy_pages += 1;
        let n = post.faults.unit_pages();
        let first = page - page % n;
        if n > 1 && post.missing.any_in(first, first + n) {
            return Ok(()); // its huge page still waits for others
        }
        if let Some(since) = post.waiting.remove(&first) {
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
            let at = f.addr_of(first).ok_or_else(|| DestError::Faults {
                doing: "finding a waiting page in QEMU's RAM mappings",
                source: std::io::Error::other(format!("page {first} is in none of them")),
            })?;
            release(f, at)?;
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
            if self.phase.post().is_some_and(|p| !p.missing.get(page)) {
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
        if let Some(h) = self.phase.holes_mut() {
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
    /// the holes. The switch punches only what changed since. Returns the
    /// holes (none where this side cannot serve post-copy).
    fn prepare_switch(&mut self, stale: PageBitmap) -> Result<Option<PageBitmap>, DestError> {
        let mut holes = None;
        if self.faults.is_some() {
            let t = Instant::now();
            let mut punched = stale;
            if self.ram.prepared() == Prepared::ZeroedAllocated {
                self.ram.write_through_file()?;
                punched.union_with(&self.inflight);
            }
            // Minor faults (hugetlbfs) need no holes: a page the guest may
            // not see yet is one the fault server has not mapped.
            let huge = self.ram.huge_pages();
            if !huge {
                punch(&mut self.ram, punched.iter())?;
            }
            tracing::info!(
                punched = if huge { 0 } else { punched.count() },
                punch_ms = t.elapsed().as_millis(),
                "prepared the switch to post-copy"
            );
            holes = Some(punched);
        }
        let _ = self.out.send(ToSource::SwitchPrepared);
        Ok(holes)
    }

    /// The switch to post-copy, once every data connection passed its
    /// marker: pages the source will still send are made missing (their
    /// stale copies punched out, so that touching them faults; on
    /// hugetlbfs their huge pages are simply not mapped into QEMU until
    /// complete, see [`Applier::unmap_touched_early`]), pages with a
    /// storage read in flight stay missing until it lands, and pages that
    /// storage could not give are asked for at once. `holes`: what the
    /// preparation punched (see [`Applier::prepare_switch`]).
    fn switch_to_postcopy(
        &mut self,
        pending: PageBitmap,
        holes: Option<PageBitmap>,
    ) -> Result<Post, DestError> {
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
            self.ram.write_through_file()?;
        }
        let stale = pending_only.as_ref().unwrap_or(&missing);
        let punch_started = Instant::now();
        if self.ram.huge_pages() {
            self.unmap_touched_early(&missing, faults.unit_pages())?;
        } else {
            punch(
                &mut self.ram,
                stale
                    .iter()
                    .filter(|&p| holes.as_ref().is_none_or(|h| !h.get(p))),
            )?;
        }
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
        let _ = self.out.send(ToSource::Switched);
        for chunk in need.chunks(protocol::MAX_NEED) {
            let _ = self.out.send(ToSource::PageRequest {
                pages: chunk.to_vec(),
            });
        }
        Ok(Post {
            missing,
            requested,
            waiting: HashMap::new(),
            faults,
            since: Instant::now(),
        })
    }

    fn done(&self, ended: usize) -> bool {
        ended == self.conns
            && self.outstanding == 0
            && self.phase.post().is_none_or(|p| p.missing.is_clear())
    }

    /// Moves the phase on by `event` and carries out the transition.
    fn advance(&mut self, event: Event, ended: usize) -> Result<(), DestError> {
        let phase = std::mem::take(&mut self.phase);
        self.phase = match phase::step(phase, event, self.conns, ended)? {
            Transition::Stay(p) => p,
            Transition::Prepare { stale } => Phase::Prepared {
                holes: self.prepare_switch(stale)?,
            },
            Transition::Switch { pending, holes } => {
                Phase::PostCopy(self.switch_to_postcopy(pending, holes)?)
            }
        };
        Ok(())
    }

    /// Handles one input; `ended` and `bytes` count the streams that ended.
    fn handle(
        &mut self,
        input: ApplyInput,
        ended: &mut usize,
        bytes: &mut u64,
    ) -> Result<(), DestError> {
        match input {
            ApplyInput::Batch(pages) => {
                for e in pages {
                    self.entry(e)?;
                }
            }
            ApplyInput::Phase(event) => {
                // Its name only: a bitmap's Debug would print every word.
                tracing::debug!(
                    event = event.name(),
                    phase = self.phase.name(),
                    outstanding = self.outstanding,
                    "phase event"
                );
                self.advance(event, *ended)?;
            }
            ApplyInput::Faults(addrs) => self.on_faults(addrs)?,
            ApplyInput::End { bytes: b } => {
                *ended += 1;
                *bytes += b;
                self.advance(Event::End, *ended)?;
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
        if let Some(round) = self.phase.round_drained(self.conns, self.outstanding) {
            let need = self.need.take(protocol::MAX_NEED);
            let _ = self.out.send(ToSource::Drained { round, need });
        }
        Ok(())
    }

    /// Runs until every stream ended and every page is placed.
    fn run(mut self, mut inputs: Inputs) -> Result<Applied, DestError> {
        let (mut ended, mut bytes) = (0usize, 0u64);
        while !self.done(ended) {
            let input = inputs.next(self.phase.post().is_some())?;
            self.handle(input, &mut ended, &mut bytes)?;
        }
        self.finish(bytes)
    }

    /// Ends fault handling and folds the switchover digests.
    fn finish(mut self, bytes: u64) -> Result<Applied, DestError> {
        // Lets the storage readers finish.
        self.refs = None;
        // Every page is in: what a background allocation did not reach is
        // allocated when the guest first writes it; its failure fails the
        // migration while the source still holds the VM.
        self.ram.stop_allocating()?;
        self.stats.bytes_received = bytes;
        self.stats.storage_bytes = self.storage.bytes.load(Ordering::Relaxed);
        self.stats.storage_reads = self.storage.reads.load(Ordering::Relaxed);
        if let Phase::PostCopy(post) = &self.phase {
            self.stats.postcopy_ms = crate::stats::millis(post.since.elapsed());
        }
        // Every page is placed: zero pages need no more serving. (A
        // destination ready for post-copy that received by pre-copy: its
        // holes are zero pages, and nobody will serve their faults once
        // this agent is gone.)
        if let Some(f) = &self.faults {
            for r in &f.ranges {
                dbmigrate_uffd::unregister(&f.uffd, r.base, r.len).map_err(|source| {
                    DestError::Faults {
                        doing: "ending fault handling",
                        source,
                    }
                })?;
            }
        }
        let t = Instant::now();
        let digests = self.placed.fold(verify::CHUNK_PAGES);
        Ok(Applied {
            ram: self.ram,
            digests,
            final_hash: t.elapsed(),
            stats: self.stats,
        })
    }
}

/// Where the RAM owner's inputs come from: the data connections, the
/// storage readers, and what cannot wait (the control connection's
/// switch, faults, pages a vCPU waits for).
pub(super) struct Inputs {
    data: mpsc::Receiver<ApplyInput>,
    stored: mpsc::Receiver<ApplyInput>,
    urgent: mpsc::Receiver<ApplyInput>,
    rt: tokio::runtime::Handle,
    /// Fires when the session gave up (timeout, abort).
    ended_session: oneshot::Receiver<()>,
    /// Which of data and storage goes first next (they alternate before the switch).
    turn: bool,
}

impl Inputs {
    /// The RAM owner's inputs, read on the runtime of the calling task.
    pub(super) fn new(
        data: mpsc::Receiver<ApplyInput>,
        stored: mpsc::Receiver<ApplyInput>,
        urgent: mpsc::Receiver<ApplyInput>,
        ended_session: oneshot::Receiver<()>,
    ) -> Self {
        Self {
            data,
            stored,
            urgent,
            rt: tokio::runtime::Handle::current(),
            ended_session,
            turn: false,
        }
    }

    /// The next input. After the switch (`post`), pages from the source
    /// come before storage results: a page missing from the network costs
    /// the VM a round trip, one from storage is read again at once when it
    /// faults. Before, the two alternate so that neither stalls the round.
    fn next(&mut self, post: bool) -> Result<ApplyInput, DestError> {
        self.turn = !self.turn;
        let data_first = post || self.turn;
        let ready = self.urgent.try_recv().or_else(|_| {
            if data_first {
                self.data.try_recv().or_else(|_| self.stored.try_recv())
            } else {
                self.stored.try_recv().or_else(|_| self.data.try_recv())
            }
        });
        if let Ok(i) = ready {
            return Ok(i);
        }
        let Self {
            data,
            stored,
            urgent,
            rt,
            ended_session,
            ..
        } = self;
        rt.block_on(async {
            tokio::select! {
                biased;
                // The session gave up: stop waiting for inputs that will never come.
                _ = ended_session => None,
                Some(i) = urgent.recv() => Some(i),
                Some(i) = data.recv() => Some(i),
                Some(i) = stored.recv() => Some(i),
                else => None,
            }
        })
        .ok_or_else(|| DestError::Worker("the session ended before every page arrived".into()))
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
        // A hole reads as zero and costs no memory (on hugetlbfs the page
        // is cleared in place, see `DestRam::zero_pages`).
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
