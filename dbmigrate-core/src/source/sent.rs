//! What the destination holds of each page as the source last sent it, for
//! RAM whose writes are tracked a huge page at a time (hugetlbfs: one
//! write marks all 512 pages of its 2 MiB written): a later round hashes
//! such a page and sends it only if its bytes differ from what went.

use crate::bitmap::PageBitmap;
use crate::verify::PageHashes;

/// The hash of each page as sent (or, sent as a reference, as it is to
/// be rebuilt), for the pages whose copy at the destination is known.
pub(super) struct SentPages {
    hashes: PageHashes,
    known: PageBitmap,
}

impl SentPages {
    /// Nothing known for any of `pages` pages.
    pub(super) fn new(pages: u64) -> Self {
        Self {
            hashes: PageHashes::zeros(pages),
            known: PageBitmap::new(pages),
        }
    }

    /// The destination holds `page` with bytes of `hash` once the round
    /// that sent it is applied (a reference whose rebuild fails is
    /// [`SentPages::forget`]-ed when the destination says so).
    pub(super) fn record(&mut self, page: u64, hash: u64) {
        if self.hashes.set(page, hash) {
            self.known.set(page);
        }
    }

    /// The destination does not hold `page` as sent (it could not
    /// rebuild it from storage).
    pub(super) fn forget(&mut self, page: u64) {
        self.known.unset(page);
    }

    /// True if the destination holds `page` with bytes of `hash` already.
    pub(super) fn holds(&self, page: u64, hash: u64) -> bool {
        self.known.get(page) && self.hashes.get(page) == Some(hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::zero_page_hash;

    #[test]
    fn only_a_page_sent_with_the_same_bytes_is_held() {
        let mut s = SentPages::new(1024);
        assert!(!s.holds(3, 7), "nothing sent yet");
        assert!(!s.holds(3, zero_page_hash()), "not even a zero page");
        s.record(3, 7);
        s.record(4, zero_page_hash());
        assert!(s.holds(3, 7) && !s.holds(3, 8));
        assert!(s.holds(4, zero_page_hash()));
        s.forget(3);
        assert!(!s.holds(3, 7), "the destination asked for it again");
        s.record(3, 9);
        assert!(s.holds(3, 9));
        s.record(5000, 1);
        assert!(!s.holds(5000, 1), "beyond the RAM");
    }
}
