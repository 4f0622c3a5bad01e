//! One round: the pages it reads, hashes and encodes, references to
//! shared storage mixed in step with the raw pages, and the batches it
//! hands to the data connections' writers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::mpsc;
use xxhash_rust::xxh3::xxh3_128;

use super::sent::SentPages;
use super::session::WriterCmd;
use crate::addr::PageIndex;
use crate::bitmap::PageBitmap;
use crate::census::{Census, LabelTally, Sent};
use crate::protocol::{
    self, connection_for_page, BatchBuilder, DataFrame, PageEncoder, PageEncoding,
};
use crate::ram::{is_zero, SourceRam};
use crate::rebuild::{check_hint, Hint, HintSource};
use crate::stats::RoundStats;
use crate::verify;
use crate::PAGE_SIZE;

/// While the VM runs, a round collects the pages written every
/// [`COLLECT_EVERY`]: a page written before the round's raw pass reaches
/// it goes out with that write, and the next round (or post-copy's push)
/// need not send it again. On the sysbench VM the raw pass takes seconds,
/// and about a third of the pages written meanwhile lie ahead of it.
pub(super) const COLLECT_EVERY: Duration = Duration::from_millis(200);

/// `raw_at` before the raw pass starts.
pub(super) const RAW_PASS_NOT_STARTED: u64 = u64::MAX;

/// How far a round's producer has read, for the collects made meanwhile.
pub(super) struct RoundProgress {
    /// Pages the reference pass read (set before the raw pass starts).
    pub(super) referenced: OnceLock<PageBitmap>,
    /// The page the raw pass reads now: the pages above it are not read
    /// yet ([`RAW_PASS_NOT_STARTED`] before the pass).
    pub(super) raw_at: AtomicU64,
}

/// Whether `page`, reported by a collect that returned before `raw_at`
/// was read, is still to be read by the round's raw pass, so that the round
/// sends it with every write the collect reported (pure).
pub(super) fn read_after_collect(
    page: u64,
    round_pages: &PageBitmap,
    referenced: Option<&PageBitmap>,
    raw_at: u64,
) -> bool {
    raw_at != RAW_PASS_NOT_STARTED
        && page > raw_at
        && round_pages.get(page)
        && referenced.is_some_and(|r| !r.get(page))
}

/// What one round sends and how.
pub(super) struct RoundJob {
    pub(super) pages: PageBitmap,
    pub(super) progress: Arc<RoundProgress>,
    pub(super) round: u32,
    /// Return the [`verify::page_hash`] of every page read, for the
    /// switchover digests (a reference's hash is already at hand).
    pub(super) hash_pages: bool,
    /// Round 0 skips zero pages: the destination RAM starts as holes.
    pub(super) skip_zero: bool,
    pub(super) compress: bool,
    pub(super) hints: Option<Arc<dyn HintSource>>,
    pub(super) disk_sizes: Vec<u64>,
    pub(super) no_ref: PageBitmap,
    /// Where to count what the round sends of each page label.
    pub(super) census: Option<Arc<Census>>,
    /// What the destination holds already (RAM on huge pages): a page
    /// whose bytes hash the same is not sent. Lent to the round's thread
    /// and handed back with its result.
    pub(super) sent: Option<SentPages>,
}

impl RoundJob {
    /// Whether the round returns the hash of every page it read: for the
    /// switchover digests, or to tell the next round what went.
    fn keeps_hashes(&self) -> bool {
        self.hash_pages || self.sent.is_some()
    }
}

/// Batch size of a round's frames.
const ROUND_BATCH_BYTES: usize = 256 << 10;

/// A round's references, in disk order, handed to the connections in step
/// with its raw pass (see [`refs_due`]).
struct RefFeed {
    refs: Vec<(Hint, u64, u128)>,
    sent: usize,
    builder: BatchBuilder,
    /// Whole batches of consecutive references take turns on the
    /// connections: split page by page, each connection would carry every
    /// other stretch of the same disk area, and the destination would read
    /// each area in pieces, twice. (Each page is sent once per round, so
    /// any connection may carry it.)
    conn: usize,
}

impl RefFeed {
    fn new(refs: Vec<(Hint, u64, u128)>, round: u32) -> Self {
        Self {
            refs,
            sent: 0,
            builder: BatchBuilder::new(round),
            conn: 0,
        }
    }

    /// Batches the references up to `upto`, sending each batch once full.
    fn release(
        &mut self,
        upto: usize,
        round: u32,
        txs: &[mpsc::Sender<WriterCmd>],
        bytes: &mut u64,
    ) -> Option<()> {
        while self.sent < upto.min(self.refs.len()) {
            let (hint, page, hash) = self.refs[self.sent];
            self.sent += 1;
            self.builder.push(
                page,
                PageEncoding::Reference,
                &protocol::encode_reference(hint, hash),
            );
            if self.builder.is_full(ROUND_BATCH_BYTES) {
                send_batch(&mut self.builder, round, &txs[self.conn], bytes)?;
                self.conn = (self.conn + 1) % txs.len();
            }
        }
        Some(())
    }
}

/// How many of a round's `refs` references should be on their way once
/// `raw_done` of its `raw_total` other pages are: the storage reads then
/// spread over the round as the raw pages do, instead of running at full
/// speed at its start, where the destination's rebuild (reads, hashing,
/// copies, and the storage server serving them) took the CPU and memory
/// bandwidth the guest needs. An eighth go at once, so that the rebuild
/// keeps ahead and is done when the raw pages are (pure).
fn refs_due(refs: usize, raw_done: u64, raw_total: u64) -> usize {
    if raw_total == 0 || raw_done >= raw_total {
        return refs;
    }
    let head = refs / 8;
    let rest = (refs - head) as u128 * u128::from(raw_done) / u128::from(raw_total);
    head + usize::try_from(rest).unwrap_or(refs)
}

/// The round's pages that go as references, read and hashed (marked in
/// `done`, their hashes added to `hashes` when the job keeps them), in
/// disk order. Zero pages and rejected hints are left to the raw pass.
fn reference_pass(
    ram: &SourceRam,
    job: &RoundJob,
    hints: &dyn HintSource,
    done: &mut PageBitmap,
    hashes: &mut Vec<(u64, u64)>,
) -> Vec<(Hint, u64, u128)> {
    let mut refs: Vec<(Hint, u64, u128)> = Vec::new();
    for page in job.pages.iter() {
        if job.no_ref.get(page) {
            continue;
        }
        let Some(hint) = hints.hint(PageIndex(page)) else {
            continue;
        };
        if check_hint(hint, &job.disk_sizes).is_err() {
            continue;
        }
        let Ok(data) = ram.page(page) else { continue };
        if is_zero(data) {
            continue;
        }
        let hash = xxh3_128(data);
        if job.hash_pages {
            hashes.push((page, verify::low_half(hash)));
        }
        refs.push((hint, page, hash));
        done.set(page);
    }
    refs.sort_unstable_by_key(|r| (r.0.disk, r.0.offset));
    if tracing::enabled!(tracing::Level::DEBUG) {
        log_reference_gaps(job.round, &refs);
    }
    refs
}

/// How far apart the referenced blocks lie on disk: the storage reads can
/// be no longer than these runs.
fn log_reference_gaps(round: u32, refs: &[(Hint, u64, u128)]) {
    let mut gaps = [0u64; 6];
    for w in refs.windows(2) {
        let (a, b) = (w[0].0, w[1].0);
        let gap = if a.disk != b.disk {
            u64::MAX
        } else {
            b.offset.0.saturating_sub(a.offset.0 + PAGE_SIZE as u64) / PAGE_SIZE as u64
        };
        let i = match gap {
            0 => 0,
            1..=3 => 1,
            4..=15 => 2,
            16..=63 => 3,
            64..=255 => 4,
            _ => 5,
        };
        gaps[i] += 1;
    }
    tracing::debug!(
        round,
        refs = refs.len(),
        ?gaps,
        "reference gaps on disk in pages: 0, 1-3, 4-15, 16-63, 64-255, more"
    );
}

/// Reads, classifies and batches the pages of one round; returns None if a
/// connection went away.
pub(super) fn produce_round(
    ram: &SourceRam,
    job: &RoundJob,
    txs: &[mpsc::Sender<WriterCmd>],
) -> Option<(RoundStats, Vec<(u64, u64)>)> {
    let round = job.round;
    let conns = u16::try_from(txs.len()).expect("at most 16 connections");
    let mut builders: Vec<BatchBuilder> =
        (0..txs.len()).map(|_| BatchBuilder::new(round)).collect();
    let mut rs = RoundStats {
        round,
        ..RoundStats::default()
    };
    let mut encoder = PageEncoder::new(job.compress);
    let mut hashes: Vec<(u64, u64)> = Vec::new();
    let mut tally = job.census.as_ref().map(|c| Tally {
        census: c,
        counts: LabelTally::new(c.labels().names().len()),
    });
    let mut note = |page: u64, sent: Sent| {
        if let Some(t) = tally.as_mut() {
            t.counts.add(t.census.labels().label(page), sent);
        }
    };
    // References are read and hashed first, and go in disk order, mixed
    // into the raw pages (see [`refs_due`]): the destination finds long
    // runs of consecutive blocks to read at once. (Within a round each page
    // is sent once, so the order between pages is free.)
    let mut done = PageBitmap::new(job.pages.len());
    let mut feed = RefFeed::new(Vec::new(), round);
    if let Some(hints) = job.hints.as_ref() {
        let refs = reference_pass(ram, job, hints.as_ref(), &mut done, &mut hashes);
        for r in &refs {
            note(r.1, Sent::Reference);
        }
        rs.pages += refs.len() as u64;
        rs.ref_pages += refs.len() as u64;
        feed = RefFeed::new(refs, round);
    }
    // Set once per round, here: the collects meanwhile read it from now on.
    let referenced = job.progress.referenced.get_or_init(|| done);
    let raw_total = job.pages.count() - referenced.count();
    let mut raw_done = 0;
    let mut copy = [0u8; PAGE_SIZE];
    for page in job.pages.iter() {
        if referenced.get(page) {
            continue;
        }
        feed.release(
            refs_due(feed.refs.len(), raw_done, raw_total),
            round,
            txs,
            &mut rs.bytes,
        )?;
        raw_done += 1;
        // Before the read: a collect that sees `page` here or below keeps
        // the pages it reports at or below it pending.
        job.progress.raw_at.store(page, Ordering::SeqCst);
        let Ok(live) = ram.page(page) else { continue };
        rs.pages += 1;
        let c = usize::from(connection_for_page(page, conns) - 1);
        // Where a hash decides whether a page goes (`sent`), it must be of
        // the very bytes that go: one copy, read once, while the guest may
        // write the page meanwhile.
        let data: &[u8] = if job.sent.is_some() {
            copy.copy_from_slice(live);
            &copy
        } else {
            live
        };
        let known = held(job, page, data);
        if let Some((h, true)) = known {
            hashes.push((page, h));
            rs.unchanged_pages += 1;
            continue;
        }
        if is_zero(data) {
            if job.keeps_hashes() {
                hashes.push((page, verify::zero_page_hash()));
            }
            rs.zero_pages += 1;
            note(page, Sent::Zero);
            if job.skip_zero {
                continue;
            }
            builders[c].push(page, PageEncoding::Zero, &[]);
        } else if let Some(hint) = job
            .hints
            .as_ref()
            .filter(|_| !job.no_ref.get(page))
            .and_then(|h| h.hint(PageIndex(page)))
            .filter(|&h| match check_hint(h, &job.disk_sizes) {
                Ok(()) => true,
                Err(_) => {
                    rs.rejected_hints += 1;
                    false
                }
            })
        {
            // The hash is of the RAM content now: if the guest changes the page
            // later, dirty tracking sends it again; if storage differs, the
            // destination asks for the page.
            rs.ref_pages += 1;
            note(page, Sent::Reference);
            let hash = xxh3_128(data);
            if job.keeps_hashes() {
                hashes.push((page, verify::low_half(hash)));
            }
            builders[c].push(
                page,
                PageEncoding::Reference,
                &protocol::encode_reference(hint, hash),
            );
        } else {
            if job.keeps_hashes() {
                let h = known.map_or_else(|| verify::page_hash(data), |k| k.0);
                hashes.push((page, h));
            }
            match encoder.push_data(&mut builders[c], page, data) {
                PageEncoding::Zstd => {
                    rs.compressed_pages += 1;
                    note(page, Sent::Compressed);
                }
                _ => {
                    rs.raw_pages += 1;
                    note(page, Sent::Raw);
                }
            }
        }
        if builders[c].is_full(ROUND_BATCH_BYTES) {
            send_batch(&mut builders[c], round, &txs[c], &mut rs.bytes)?;
        }
    }
    feed.release(feed.refs.len(), round, txs, &mut rs.bytes)?;
    if feed.builder.count() > 0 {
        send_batch(&mut feed.builder, round, &txs[feed.conn], &mut rs.bytes)?;
    }
    for (b, tx) in builders.iter_mut().zip(txs) {
        if b.count() > 0 {
            send_batch(b, round, tx, &mut rs.bytes)?;
        }
    }
    if let Some(t) = tally {
        t.census.record(&t.counts);
    }
    Some((rs, hashes))
}

/// Where the round knows what the destination holds (see
/// [`RoundJob::sent`]): the hash of `page`'s bytes `data`, and whether the
/// destination holds them already.
fn held(job: &RoundJob, page: u64, data: &[u8]) -> Option<(u64, bool)> {
    let sent = job.sent.as_ref()?;
    let h = if is_zero(data) {
        verify::zero_page_hash()
    } else {
        verify::page_hash(data)
    };
    Some((h, sent.holds(page, h)))
}

/// What a round has sent of each page label so far.
struct Tally<'a> {
    census: &'a Census,
    counts: LabelTally,
}

/// Sends what `b` holds as one frame and starts a new batch; None if the
/// connection went away.
pub(super) fn send_batch(
    b: &mut BatchBuilder,
    round: u32,
    tx: &mpsc::Sender<WriterCmd>,
    bytes: &mut u64,
) -> Option<()> {
    let frame = DataFrame::batch(std::mem::replace(b, BatchBuilder::new(round)));
    *bytes += frame.bytes().len() as u64;
    tx.blocking_send(WriterCmd::Frame(frame)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_go_in_step_with_the_raw_pages_after_a_head_start() {
        assert_eq!(refs_due(800, 0, 1000), 100);
        assert_eq!(refs_due(800, 500, 1000), 450);
        assert_eq!(refs_due(800, 999, 1000), 799);
        assert_eq!(refs_due(800, 1000, 1000), 800);
        // No raw pages (every page rebuildable): all at once.
        assert_eq!(refs_due(800, 0, 0), 800);
        assert_eq!(refs_due(0, 10, 1000), 0);
    }

    #[test]
    fn a_page_written_before_the_raw_pass_reads_it_is_not_sent_again() {
        let mut round = PageBitmap::new(100);
        round.set_range(0, 80);
        let mut referenced = PageBitmap::new(100);
        referenced.set_range(10, 20);
        let r = Some(&referenced);
        // The raw pass reads page 40 now: 41 and up come after the collect.
        assert!(read_after_collect(41, &round, r, 40));
        assert!(read_after_collect(79, &round, r, 40));
        // 40 may be mid-read, below it read already.
        assert!(!read_after_collect(40, &round, r, 40));
        assert!(!read_after_collect(3, &round, r, 40));
        // Not in this round: nothing will send it.
        assert!(!read_after_collect(85, &round, r, 40));
        // Read (and hashed) by the reference pass, which is over.
        assert!(!read_after_collect(15, &round, r, 5));
        // Before the raw pass starts, nothing is known to come after.
        assert!(!read_after_collect(50, &round, r, RAW_PASS_NOT_STARTED));
        assert!(!read_after_collect(50, &round, None, 40));
    }
}
