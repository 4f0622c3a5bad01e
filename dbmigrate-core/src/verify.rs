//! Whole-RAM digests compared at switchover.
//!
//! Both sides hash their RAM in chunks with xxh3-128 while the VM is paused;
//! any differing chunk aborts the migration before the destination runs.
//! Holes (never-touched RAM) hash as zeros without being read, so that
//! hashing does not allocate tmpfs pages.

use xxhash_rust::xxh3::Xxh3;

use crate::bitmap::PageBitmap;
use crate::{PAGE_SIZE, PAGE_SIZE_U64};

/// Pages per digest chunk (2 MiB).
pub const CHUNK_PAGES: u32 = 512;

static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// Digest of one chunk: pages in `data` are read from `ram`, the others hash as zero pages.
fn chunk_digest(ram: &[u8], data: &PageBitmap, first: u64, last: u64) -> u128 {
    let mut h = Xxh3::new();
    for p in first..last {
        if data.get(p) {
            let s = usize::try_from(p * PAGE_SIZE_U64).expect("inside the mapping");
            h.update(&ram[s..s + PAGE_SIZE]);
        } else {
            h.update(&ZERO_PAGE);
        }
    }
    h.digest128()
}

/// Digests of all chunks of `ram`, computed on `threads` threads.
///
/// `data` marks the pages that may hold non-zero bytes (from `SEEK_DATA`);
/// a page outside it must read as zeros.
pub fn ram_digests(ram: &[u8], data: &PageBitmap, chunk_pages: u32, threads: usize) -> Vec<u128> {
    let pages = ram.len() as u64 / PAGE_SIZE_U64;
    let cp = u64::from(chunk_pages.max(1));
    let chunks = usize::try_from(pages.div_ceil(cp)).expect("chunk count fits");
    let mut out = vec![0u128; chunks];
    let threads = threads.clamp(1, 16);
    let per = chunks.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for (t, slot) in out.chunks_mut(per).enumerate() {
            s.spawn(move || {
                for (i, d) in slot.iter_mut().enumerate() {
                    let c = (t * per + i) as u64;
                    *d = chunk_digest(ram, data, c * cp, ((c + 1) * cp).min(pages));
                }
            });
        }
    });
    out
}

/// Digests of a RAM that starts all zero and is written only through this
/// tracker's owner (the destination's single RAM writer): chunks are
/// re-hashed only after a page in them was written, so the hashing can run
/// in the idle time between arriving pages and the switchover only has to
/// hash what the last round touched.
pub struct IncrementalDigests {
    chunk_pages: u64,
    pages: u64,
    digests: Vec<u128>,
    stale: PageBitmap,
    written: PageBitmap,
    next_stale: u64,
}

impl IncrementalDigests {
    /// Digests of `pages` zero pages in chunks of `chunk_pages`.
    pub fn new(pages: u64, chunk_pages: u32) -> Self {
        let cp = u64::from(chunk_pages.max(1));
        let chunks = pages.div_ceil(cp);
        let nothing = PageBitmap::new(pages);
        let zero_ram: &[u8] = &[];
        let digests = (0..chunks)
            .map(|c| chunk_digest(zero_ram, &nothing, c * cp, ((c + 1) * cp).min(pages)))
            .collect();
        Self {
            chunk_pages: cp,
            pages,
            digests,
            stale: PageBitmap::new(chunks),
            written: PageBitmap::new(pages),
            next_stale: 0,
        }
    }

    /// Records that `page` was written (its chunk must be hashed again).
    pub fn written(&mut self, page: u64) {
        if self.written.set(page) {
            self.stale.set(page / self.chunk_pages);
        }
    }

    /// Hashes one stale chunk of `ram`; false when none is stale.
    pub fn hash_one(&mut self, ram: &[u8]) -> bool {
        let chunks = self.stale.len();
        for _ in 0..2 {
            if let Some(c) = (self.next_stale..chunks).find(|&c| self.stale.get(c)) {
                self.rehash(ram, c);
                self.next_stale = c + 1;
                return true;
            }
            self.next_stale = 0;
        }
        false
    }

    fn rehash(&mut self, ram: &[u8], c: u64) {
        let first = c * self.chunk_pages;
        let last = (first + self.chunk_pages).min(self.pages);
        self.digests[usize::try_from(c).expect("chunk index fits")] =
            chunk_digest(ram, &self.written, first, last);
        self.stale.unset(c);
    }

    /// Hashes what is still stale and returns all digests.
    pub fn finish(mut self, ram: &[u8]) -> Vec<u128> {
        let stale: Vec<u64> = self.stale.iter().collect();
        for c in stale {
            self.rehash(ram, c);
        }
        self.digests
    }
}

/// The source's digests, kept current while the VM runs: a chunk is hashed
/// again only after dirty tracking reported a write in it, so at the
/// switchover only what the last round touched is hashed, not all of RAM.
///
/// Correct as long as [`SourceDigests::mark`] gets every page reported by
/// each collect and no refresh runs concurrently with a collect: a write
/// before a chunk's hash is in the hash, a write after it is in a later
/// collect and marks the chunk again.
pub struct SourceDigests {
    chunk_pages: u64,
    pages: u64,
    digests: Vec<u128>,
    stale: PageBitmap,
}

impl SourceDigests {
    /// Digests of `pages` pages, all still to be hashed.
    pub fn new(pages: u64, chunk_pages: u32) -> Self {
        let cp = u64::from(chunk_pages.max(1));
        let chunks = pages.div_ceil(cp);
        let mut stale = PageBitmap::new(chunks);
        stale.set_range(0, chunks);
        Self {
            chunk_pages: cp,
            pages,
            digests: vec![0; usize::try_from(chunks).expect("chunk count fits")],
            stale,
        }
    }

    /// Marks the chunks of every page in `written` for hashing.
    pub fn mark(&mut self, written: &PageBitmap) {
        for p in written.iter() {
            self.stale.set(p / self.chunk_pages);
        }
    }

    /// Hashes the marked chunks of `ram` (`data`: pages that are not holes)
    /// on `threads` threads; returns how many.
    pub fn refresh(&mut self, ram: &[u8], data: &PageBitmap, threads: usize) -> usize {
        let todo: Vec<u64> = self.stale.iter().collect();
        for &c in &todo {
            self.stale.unset(c);
        }
        let threads = threads.clamp(1, 16);
        let per = todo.len().div_ceil(threads).max(1);
        let (cp, pages) = (self.chunk_pages, self.pages);
        let results: Vec<Vec<(u64, u128)>> = std::thread::scope(|s| {
            let handles: Vec<_> = todo
                .chunks(per)
                .map(|part| {
                    s.spawn(move || {
                        part.iter()
                            .map(|&c| {
                                (
                                    c,
                                    chunk_digest(ram, data, c * cp, ((c + 1) * cp).min(pages)),
                                )
                            })
                            .collect()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_default())
                .collect()
        });
        let mut done = 0;
        for (c, d) in results.into_iter().flatten() {
            self.digests[usize::try_from(c).expect("chunk index fits")] = d;
            done += 1;
        }
        // A hashing thread that died leaves its chunks unhashed: mark them again.
        if done < todo.len() {
            for &c in &todo {
                self.stale.set(c);
            }
        }
        done
    }

    /// True when every chunk's digest is current.
    pub fn is_current(&self) -> bool {
        self.stale.is_clear()
    }

    /// The digests (current only if [`SourceDigests::is_current`]).
    pub fn digests(&self) -> &[u128] {
        &self.digests
    }
}

/// Hash of one page for post-copy verification.
pub fn page_hash(page: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(page)
}

/// [`page_hash`] of a zero page (a hole).
pub fn zero_page_hash() -> u64 {
    page_hash(&ZERO_PAGE)
}

/// Post-copy digests: once the destination runs the VM, its RAM no longer
/// equals the source's, so both sides compare what was *placed*: the
/// destination records the hash of every page as it writes it, the source
/// hashes its frozen RAM, and each chunk's digest folds its pages' hashes.
pub fn fold_page_hashes(hashes: &[u64], chunk_pages: u32) -> Vec<u128> {
    hashes
        .chunks(chunk_pages.max(1) as usize)
        .map(|c| {
            let mut h = Xxh3::new();
            for p in c {
                h.update(&p.to_le_bytes());
            }
            h.digest128()
        })
        .collect()
}

/// Page hashes of `ram` (`data`: pages that are not holes) on `threads` threads.
pub fn page_hashes(ram: &[u8], data: &PageBitmap, threads: usize) -> Vec<u64> {
    let pages = ram.len() / PAGE_SIZE;
    let zero = zero_page_hash();
    let mut out = vec![zero; pages];
    let per = pages.div_ceil(threads.clamp(1, 16)).max(1);
    std::thread::scope(|s| {
        for (t, slot) in out.chunks_mut(per).enumerate() {
            s.spawn(move || {
                for (i, h) in slot.iter_mut().enumerate() {
                    let p = t * per + i;
                    if data.get(p as u64) {
                        *h = page_hash(&ram[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]);
                    }
                }
            });
        }
    });
    out
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
    fn incremental_digests_equal_a_full_hash() {
        let pages = 1300u64;
        let mut ram = vec![0u8; usize::try_from(pages).unwrap() * PAGE_SIZE];
        let mut inc = IncrementalDigests::new(pages, CHUNK_PAGES);
        let mut all = PageBitmap::new(pages);
        all.set_range(0, pages);
        assert_eq!(inc.digests, ram_digests(&ram, &all, CHUNK_PAGES, 1));
        for (i, p) in [3u64, 600, 1299, 600].into_iter().enumerate() {
            ram[usize::try_from(p).unwrap() * PAGE_SIZE + i] = 0x77;
            inc.written(p);
            // Hash in between, as the destination does when idle; a later
            // write to the same chunk must make it stale again.
            inc.hash_one(&ram);
        }
        inc.written(pages + 5); // out of range: ignored
        assert_eq!(inc.finish(&ram), ram_digests(&ram, &all, CHUNK_PAGES, 2));
    }

    #[test]
    fn placed_page_hashes_fold_like_the_source_ram() {
        let pages = 1100u64;
        let mut ram = vec![0u8; usize::try_from(pages).unwrap() * PAGE_SIZE];
        ram[3 * PAGE_SIZE] = 7;
        let mut data = PageBitmap::new(pages);
        data.set(3);
        data.set(9); // a data page holding zeros hashes like a hole
        let source = fold_page_hashes(&page_hashes(&ram, &data, 3), CHUNK_PAGES);
        let mut placed = vec![zero_page_hash(); usize::try_from(pages).unwrap()];
        placed[3] = page_hash(&ram[3 * PAGE_SIZE..4 * PAGE_SIZE]);
        assert_eq!(fold_page_hashes(&placed, CHUNK_PAGES), source);
        placed[1000] = page_hash(&[1u8; PAGE_SIZE]);
        assert_eq!(
            mismatched_chunks(&fold_page_hashes(&placed, CHUNK_PAGES), &source),
            vec![1]
        );
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
        assert_eq!(d.refresh(&ram, &all, 2), 3);
        assert!(d.is_current());
        assert_eq!(d.digests(), ram_digests(&ram, &all, CHUNK_PAGES, 1));
        // A write reported by a collect is hashed again, only its chunk.
        ram[1100 * PAGE_SIZE] = 5;
        let mut dirty = PageBitmap::new(pages);
        dirty.set(1100);
        d.mark(&dirty);
        assert_eq!(d.refresh(&ram, &all, 2), 1);
        assert_eq!(d.digests(), ram_digests(&ram, &all, CHUNK_PAGES, 1));
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
