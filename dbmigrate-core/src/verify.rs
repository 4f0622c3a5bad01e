//! Whole-RAM digests compared at switchover.
//!
//! A chunk's digest folds the hashes of its pages ([`page_hash`]). The
//! source hashes its RAM page by page while the VM is paused (pages written
//! since the last refresh only); the destination records the hash of every
//! page as it writes it, so it never reads its RAM back and a round costs a
//! hash per page written, not per 2 MiB chunk touched. Any differing chunk
//! aborts the migration before the destination runs. Holes (never-touched
//! RAM) hash as zeros without being read, so that hashing does not allocate
//! tmpfs pages.

use std::sync::OnceLock;

use xxhash_rust::xxh3::{xxh3_128, Xxh3};

use crate::bitmap::PageBitmap;
use crate::PAGE_SIZE;

/// Pages per digest chunk (2 MiB).
pub const CHUNK_PAGES: u32 = 512;

/// Digests of all chunks of `ram`, computed on `threads` threads.
///
/// `data` marks the pages that may hold non-zero bytes (from `SEEK_DATA`);
/// a page outside it must read as zeros.
pub fn ram_digests(ram: &[u8], data: &PageBitmap, chunk_pages: u32, threads: usize) -> Vec<u128> {
    let mut d = SourceDigests::new((ram.len() / PAGE_SIZE) as u64, chunk_pages);
    d.refresh(ram, data, threads);
    if d.is_current() {
        d.digests
    } else {
        Vec::new() // a hashing thread died: no digest then matches
    }
}

/// The hash of every page of a RAM, kept so that pages nobody wrote cost
/// no memory: an entry holds the page's [`page_hash`] XOR the zero page's,
/// so a hole's entry is 0, in memory allocated zeroed, which the kernel
/// backs only where it is written. A sparse 1 TiB RAM's hashes cost what
/// its data pages do, not 8 bytes for each of its 2^28 pages; and folding
/// skips the blocks of pages that never held anything but zero pages.
pub struct PageHashes {
    entries: Vec<u64>,
    /// Blocks of [`BLOCK_PAGES`] pages in which an entry was ever set to
    /// something but a zero page's hash.
    written: PageBitmap,
}

/// Pages per block of [`PageHashes::written`].
const BLOCK_PAGES: u64 = CHUNK_PAGES as u64;

impl PageHashes {
    /// Every page a zero page.
    pub fn zeros(pages: u64) -> Self {
        Self {
            entries: vec![0; usize::try_from(pages).expect("page count fits")],
            written: PageBitmap::new(pages.div_ceil(BLOCK_PAGES)),
        }
    }

    /// Pages.
    pub fn len(&self) -> u64 {
        self.entries.len() as u64
    }

    /// True for no pages.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The hash of `page`, if inside.
    pub fn get(&self, page: u64) -> Option<u64> {
        let i = usize::try_from(page).ok()?;
        self.entries.get(i).map(|e| e ^ zero_page_hash())
    }

    /// Sets the hash of `page`; false if it is beyond the RAM.
    pub fn set(&mut self, page: u64, hash: u64) -> bool {
        let Some(e) = usize::try_from(page)
            .ok()
            .and_then(|i| self.entries.get_mut(i))
        else {
            return false;
        };
        *e = hash ^ zero_page_hash();
        if *e != 0 {
            self.written.set(page / BLOCK_PAGES);
        }
        true
    }

    /// Chunk digests: the destination's from the hash of every page as it
    /// wrote it (after a switch to post-copy its RAM no longer equals the
    /// source's, so it compares what was *placed* in either mode), the
    /// source's from its RAM.
    pub fn fold(&self, chunk_pages: u32) -> Vec<u128> {
        let cp = u64::from(chunk_pages.max(1));
        (0..self.len().div_ceil(cp))
            .map(|c| self.fold_one(c, cp))
            .collect()
    }

    fn fold_one(&self, chunk: u64, chunk_pages: u64) -> u128 {
        let first = chunk * chunk_pages;
        let last = (first + chunk_pages).min(self.len());
        let blocks = first / BLOCK_PAGES..last.div_ceil(BLOCK_PAGES);
        let range = usize::try_from(first).expect("page index fits")
            ..usize::try_from(last).expect("page index fits");
        if blocks.clone().all(|b| !self.written.get(b)) {
            return zero_chunk_digest(range.len());
        }
        fold_chunk(&self.entries[range])
    }
}

/// The digest of a chunk of `pages` zero pages (cached for whole chunks).
fn zero_chunk_digest(pages: usize) -> u128 {
    static WHOLE: OnceLock<u128> = OnceLock::new();
    if pages == CHUNK_PAGES as usize {
        return *WHOLE.get_or_init(|| fold_chunk(&[0; CHUNK_PAGES as usize]));
    }
    fold_chunk(&vec![0; pages])
}

/// Pages a refresh lists and hashes at a time (8 MiB of page numbers).
const REFRESH_BATCH: usize = 1 << 20;

/// The source's digests, kept current while the VM runs: a page is hashed
/// again only after dirty tracking reported a write to it, so at the
/// switchover only what the last round touched is hashed, not all of RAM.
///
/// Correct as long as [`SourceDigests::mark`] gets every page reported by
/// each collect and no refresh runs concurrently with a collect: a write
/// before a page's hash is in the hash, a write after it is in a later
/// collect and marks the page again.
pub struct SourceDigests {
    chunk_pages: u64,
    hashes: PageHashes,
    digests: Vec<u128>,
    /// Pages to hash again.
    stale: PageBitmap,
}

impl SourceDigests {
    /// Digests of `pages` pages, all still to be hashed.
    pub fn new(pages: u64, chunk_pages: u32) -> Self {
        let cp = u64::from(chunk_pages.max(1));
        let chunks = pages.div_ceil(cp);
        let mut stale = PageBitmap::new(pages);
        stale.set_range(0, pages);
        Self {
            chunk_pages: cp,
            hashes: PageHashes::zeros(pages),
            digests: vec![0; usize::try_from(chunks).expect("chunk count fits")],
            stale,
        }
    }

    /// Marks every page in `written` for hashing.
    pub fn mark(&mut self, written: &PageBitmap) {
        for p in written.iter() {
            self.stale.set(p);
        }
    }

    /// Takes `hashes` (page, [`page_hash`] of its content when read) as the
    /// pages' current hashes: whoever read the pages hashed them, and a
    /// write after that read is in a later collect, which marks the page
    /// again.
    pub fn record(&mut self, hashes: &[(u64, u64)]) {
        let mut chunks = Vec::new();
        for &(p, h) in hashes {
            if !self.hashes.set(p, h) {
                continue;
            }
            self.stale.unset(p);
            chunks.push(p / self.chunk_pages);
        }
        chunks.sort_unstable();
        chunks.dedup();
        for c in chunks {
            self.fold(c);
        }
    }

    /// Hashes the marked pages of `ram` (`data`: pages that are not holes)
    /// on `threads` threads and folds the chunks they are in; returns how
    /// many pages were hashed (holes included). A hole needs no reading (its hash is the
    /// zero page's, and its entry is written only if it held another), and
    /// the marked pages are listed a batch at a time, so a sparse RAM of
    /// any size costs memory for its data only.
    pub fn refresh(&mut self, ram: &[u8], data: &PageBitmap, threads: usize) -> usize {
        let marked = std::mem::replace(&mut self.stale, PageBitmap::new(self.hashes.len()));
        let mut rest = marked.iter();
        let mut hashed = 0;
        loop {
            let mut todo = Vec::new();
            let mut chunks: Vec<u64> = Vec::new();
            for p in rest.by_ref() {
                let c = p / self.chunk_pages;
                if chunks.last() != Some(&c) {
                    chunks.push(c);
                }
                if data.get(p) {
                    todo.push(p);
                    if todo.len() == REFRESH_BATCH {
                        break;
                    }
                } else {
                    if self.hashes.get(p) != Some(zero_page_hash()) {
                        self.hashes.set(p, zero_page_hash());
                    }
                    hashed += 1;
                }
            }
            let full = todo.len() == REFRESH_BATCH;
            if !todo.is_empty() {
                let Some(h) = hash_pages(ram, data, &todo, threads) else {
                    // A hashing thread died: this batch and the rest stay
                    // marked; the holes already set are folded in.
                    for p in todo.into_iter().chain(rest) {
                        self.stale.set(p);
                    }
                    for c in chunks {
                        self.fold(c);
                    }
                    return hashed;
                };
                for (&p, h) in todo.iter().zip(h) {
                    self.hashes.set(p, h);
                }
                hashed += todo.len();
            }
            // A chunk that goes on in the next batch is folded again there.
            for c in chunks {
                self.fold(c);
            }
            if !full {
                return hashed;
            }
        }
    }

    fn fold(&mut self, chunk: u64) {
        if let Some(d) = usize::try_from(chunk)
            .ok()
            .and_then(|i| self.digests.get_mut(i))
        {
            *d = self.hashes.fold_one(chunk, self.chunk_pages);
        }
    }

    /// True when every page's hash is current.
    pub fn is_current(&self) -> bool {
        self.stale.is_clear()
    }

    /// The digests (current only if [`SourceDigests::is_current`]).
    pub fn digests(&self) -> &[u128] {
        &self.digests
    }
}

/// Hash of one page: the low half of the 128-bit hash a reference carries,
/// so that a storage page whose reference matched is known without
/// hashing it again.
pub fn page_hash(page: &[u8]) -> u64 {
    low_half(xxh3_128(page))
}

/// The [`page_hash`] of a page whose xxh3-128 is `h`.
#[allow(clippy::cast_possible_truncation)] // the low half is what is wanted
pub fn low_half(h: u128) -> u64 {
    h as u64
}

/// [`page_hash`] of a zero page (a hole).
pub fn zero_page_hash() -> u64 {
    static ZERO_HASH: OnceLock<u64> = OnceLock::new();
    *ZERO_HASH.get_or_init(|| page_hash(&[0; PAGE_SIZE]))
}

/// [`page_hash`] of page `p` of `ram`, or of zeros if `data` calls it a hole.
fn hash_at(ram: &[u8], data: &PageBitmap, p: u64) -> u64 {
    if !data.get(p) {
        return zero_page_hash();
    }
    let s = usize::try_from(p).expect("page index fits") * PAGE_SIZE;
    page_hash(&ram[s..s + PAGE_SIZE])
}

/// Digest of one chunk from its pages' [`PageHashes`] entries (each the
/// page's hash XOR the zero page's).
fn fold_chunk(entries: &[u64]) -> u128 {
    let zero = zero_page_hash();
    let mut h = Xxh3::new();
    for e in entries {
        h.update(&(e ^ zero).to_le_bytes());
    }
    h.digest128()
}

/// [`hash_at`] of each of `pages`, in their order, split over `threads`
/// threads; None if a hashing thread died.
fn hash_pages(ram: &[u8], data: &PageBitmap, pages: &[u64], threads: usize) -> Option<Vec<u64>> {
    let per = pages.len().div_ceil(threads.clamp(1, 16)).max(1);
    let mut out = vec![0; pages.len()];
    let finished = std::thread::scope(|s| {
        let workers: Vec<_> = pages
            .chunks(per)
            .zip(out.chunks_mut(per))
            .map(|(part, slot)| {
                s.spawn(move || {
                    for (h, &p) in slot.iter_mut().zip(part) {
                        *h = hash_at(ram, data, p);
                    }
                })
            })
            .collect();
        // Join every worker (a scope panics over a panicked worker left unjoined).
        let joined: Vec<bool> = workers.into_iter().map(|w| w.join().is_ok()).collect();
        joined.into_iter().all(|ok| ok)
    });
    finished.then_some(out)
}

/// Indexes of chunks whose digests differ (a length difference counts every extra chunk).
pub fn mismatched_chunks(ours: &[u128], theirs: &[u128]) -> Vec<u32> {
    let n = ours.len().max(theirs.len());
    (0..n)
        .filter(|&i| ours.get(i) != theirs.get(i))
        .map(|i| u32::try_from(i).unwrap_or(u32::MAX))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placed_page_hashes_fold_like_the_source_ram() {
        let pages = 1100u64;
        let mut ram = vec![0u8; usize::try_from(pages).unwrap() * PAGE_SIZE];
        ram[3 * PAGE_SIZE] = 7;
        let mut data = PageBitmap::new(pages);
        data.set(3);
        data.set(9); // a data page holding zeros hashes like a hole
        let source = ram_digests(&ram, &data, CHUNK_PAGES, 3);
        let mut placed = PageHashes::zeros(pages);
        assert!(placed.set(3, page_hash(&ram[3 * PAGE_SIZE..4 * PAGE_SIZE])));
        assert_eq!(placed.fold(CHUNK_PAGES), source);
        assert!(placed.set(1000, page_hash(&[1u8; PAGE_SIZE])));
        assert_eq!(
            mismatched_chunks(&placed.fold(CHUNK_PAGES), &source),
            vec![1]
        );
        assert!(!placed.set(pages, 0), "beyond the RAM");
        assert_eq!(placed.get(2), Some(zero_page_hash()));
        assert_eq!(placed.get(pages), None);
    }

    #[test]
    fn folding_skips_blocks_of_zero_pages_and_agrees_with_a_full_fold() {
        let pages = 3000u64; // the last chunk is short
        let mut h = PageHashes::zeros(pages);
        h.set(700, page_hash(&[4u8; PAGE_SIZE]));
        h.set(1600, zero_page_hash()); // written, but a zero page
        h.set(2999, page_hash(&[5u8; PAGE_SIZE]));
        let full: Vec<u128> = h
            .entries
            .chunks(CHUNK_PAGES as usize)
            .map(fold_chunk)
            .collect();
        assert_eq!(h.fold(CHUNK_PAGES), full);
        assert_eq!(
            h.written.count(),
            2,
            "only blocks that held a non-zero hash"
        );
        // Another chunk size than the blocks' folds the same way.
        let full: Vec<u128> = h.entries.chunks(300).map(fold_chunk).collect();
        assert_eq!(h.fold(300), full);
        // A sparse 1 TiB RAM: folding reads only the written blocks.
        let mut big = PageHashes::zeros(1 << 28);
        big.set(5 << 20, 42);
        let d = big.fold(CHUNK_PAGES);
        assert_eq!(d.len(), 1 << 19);
        assert_eq!(d[0], zero_chunk_digest(CHUNK_PAGES as usize));
        assert_ne!(d[(5 << 20) / CHUNK_PAGES as usize], d[0]);
    }

    #[test]
    fn source_digests_follow_marked_writes() {
        let pages = 1300u64;
        let mut ram = vec![0u8; usize::try_from(pages).unwrap() * PAGE_SIZE];
        ram[7] = 1;
        let mut all = PageBitmap::new(pages);
        all.set_range(0, pages);
        let mut d = SourceDigests::new(pages, CHUNK_PAGES);
        assert!(!d.is_current());
        assert_eq!(d.refresh(&ram, &all, 2), 1300);
        assert!(d.is_current());
        assert_eq!(d.digests(), ram_digests(&ram, &all, CHUNK_PAGES, 1));
        // Writes reported by a collect are hashed again, only those pages.
        ram[1100 * PAGE_SIZE] = 5;
        ram[3 * PAGE_SIZE + 9] = 6;
        ram[511 * PAGE_SIZE + 1] = 8;
        let mut dirty = PageBitmap::new(pages);
        for p in [3, 511, 1100] {
            dirty.set(p);
        }
        d.mark(&dirty);
        assert!(!d.is_current());
        assert_eq!(d.refresh(&ram, &all, 2), 3);
        assert_eq!(d.digests(), ram_digests(&ram, &all, CHUNK_PAGES, 1));
        // A write nobody reported is not seen: what the tracker misses
        // shows up as a mismatch at the switchover, never silently.
        ram[700 * PAGE_SIZE] = 1;
        assert_eq!(d.refresh(&ram, &all, 1), 0);
        assert_eq!(
            mismatched_chunks(d.digests(), &ram_digests(&ram, &all, CHUNK_PAGES, 1)),
            vec![1]
        );
    }

    #[test]
    fn recorded_hashes_stand_for_a_refresh_of_those_pages() {
        let pages = 1200u64;
        let mut ram = vec![0u8; usize::try_from(pages).unwrap() * PAGE_SIZE];
        for p in [2usize, 600, 1199] {
            ram[p * PAGE_SIZE + 5] = 9;
        }
        let mut data = PageBitmap::new(pages);
        data.set_range(0, 1000);
        data.set(1199);
        let mut d = SourceDigests::new(pages, CHUNK_PAGES);
        // A sender read pages 0..700 and hashed them; the rest is refreshed.
        let read: Vec<(u64, u64)> = (0..700).map(|p| (p, hash_at(&ram, &data, p))).collect();
        d.record(&read);
        assert_eq!(d.refresh(&ram, &data, 2), 500);
        assert!(d.is_current());
        assert_eq!(d.digests(), ram_digests(&ram, &data, CHUNK_PAGES, 1));
        // A recorded hash is taken as is: one that does not match the page
        // (the page changed after it was read, and no collect reported it)
        // shows up at the switchover.
        d.record(&[(600, page_hash(&[3u8; PAGE_SIZE])), (pages + 5, 0)]);
        assert!(d.is_current());
        assert_eq!(
            mismatched_chunks(d.digests(), &ram_digests(&ram, &data, CHUNK_PAGES, 1)),
            vec![1]
        );
    }

    #[test]
    fn holes_hash_like_zero_pages_and_changes_are_found() {
        let pages = 2000u64;
        let mut ram = vec![0u8; usize::try_from(pages).unwrap() * PAGE_SIZE];
        ram[5 * PAGE_SIZE + 3] = 1;
        let mut all = PageBitmap::new(pages);
        all.set_range(0, pages);
        let mut sparse = PageBitmap::new(pages);
        sparse.set(5);
        let a = ram_digests(&ram, &all, CHUNK_PAGES, 2);
        let b = ram_digests(&ram, &sparse, CHUNK_PAGES, 3);
        assert_eq!(a.len(), 4);
        assert_eq!(a, b, "a hole must hash like a page of zeros");
        ram[1500 * PAGE_SIZE] = 9;
        let c = ram_digests(&ram, &all, CHUNK_PAGES, 1);
        assert_eq!(mismatched_chunks(&a, &c), vec![2]);
        assert_eq!(mismatched_chunks(&a, &c[..2]), vec![2, 3]);
    }
}
