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
