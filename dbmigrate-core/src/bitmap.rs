//! A fixed-size bitmap of guest pages, one bit per 4 KiB page.

/// One bit per page of a RAM region; set bits are pages to (re)send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageBitmap {
    words: Vec<u64>,
    pages: u64,
}

impl PageBitmap {
    /// An empty bitmap covering `pages` pages.
    pub fn new(pages: u64) -> Self {
        let words = usize::try_from(pages.div_ceil(64)).expect("page count fits in memory");
        Self {
            words: vec![0; words],
            pages,
        }
    }

    /// Number of pages covered (set or not).
    pub fn len(&self) -> u64 {
        self.pages
    }

    /// True if the bitmap covers no pages.
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// Marks `page`; true if it was not marked before. Out-of-range pages
    /// are ignored and reported as `false`.
    pub fn set(&mut self, page: u64) -> bool {
        if page >= self.pages {
            return false;
        }
        let (w, b) = Self::split(page);
        let was = self.words[w] & (1 << b) != 0;
        self.words[w] |= 1 << b;
        !was
    }

    /// Unmarks `page` (out-of-range pages are ignored).
    pub fn unset(&mut self, page: u64) {
        if page < self.pages {
            let (w, b) = Self::split(page);
            self.words[w] &= !(1 << b);
        }
    }

    /// Marks pages `start..end` (clamped to the bitmap).
    pub fn set_range(&mut self, start: u64, end: u64) {
        let end = end.min(self.pages);
        let mut page = start;
        while page < end {
            let (w, b) = Self::split(page);
            if b == 0 && end - page >= 64 {
                self.words[w] = u64::MAX;
                page += 64;
            } else {
                self.words[w] |= 1 << b;
                page += 1;
            }
        }
    }

    /// Whether any page of `start..end` (clamped to the bitmap) is marked.
    pub fn any_in(&self, start: u64, end: u64) -> bool {
        self.iter_range(start, end).next().is_some()
    }

    /// The marked pages of `start..end` (clamped to the bitmap), ascending.
    pub fn iter_range(&self, start: u64, end: u64) -> impl Iterator<Item = u64> + '_ {
        let end = end.min(self.pages);
        let first = usize::try_from(start / 64).unwrap_or(usize::MAX);
        let last = usize::try_from(end.div_ceil(64)).unwrap_or(usize::MAX);
        self.words
            .get(first.min(self.words.len())..last.min(self.words.len()))
            .unwrap_or(&[])
            .iter()
            .enumerate()
            .flat_map(move |(i, &word)| {
                let base = (first + i) as u64 * 64;
                BitIter(word).map(move |b| base + u64::from(b))
            })
            .filter(move |&p| p >= start && p < end)
    }

    /// Whether `page` is marked.
    pub fn get(&self, page: u64) -> bool {
        if page >= self.pages {
            return false;
        }
        let (w, b) = Self::split(page);
        self.words[w] & (1 << b) != 0
    }

    /// Clears every bit.
    pub fn clear(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
    }

    /// True when no page is marked.
    pub fn is_clear(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// Number of marked pages.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Adds every page marked in `other` (same size) to `self`.
    pub fn union_with(&mut self, other: &PageBitmap) {
        debug_assert_eq!(self.pages, other.pages);
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
    }

    /// Iterates the marked pages in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &word)| {
            let base = (i as u64) * 64;
            BitIter(word).map(move |b| base + u64::from(b))
        })
    }

    fn split(page: u64) -> (usize, u32) {
        let w = usize::try_from(page / 64).expect("page index checked against length");
        #[allow(clippy::cast_possible_truncation)] // modulo 64 always fits
        let b = (page % 64) as u32;
        (w, b)
    }
}

/// Pages in the order they were first added, each at most once until it
/// is taken out: however often a peer names a page, the queue holds no
/// more entries than the RAM has pages.
#[derive(Clone, Debug)]
pub struct PageQueue {
    queued: PageBitmap,
    order: std::collections::VecDeque<u64>,
}

impl PageQueue {
    /// An empty queue for a RAM of `pages` pages.
    pub fn new(pages: u64) -> Self {
        Self {
            queued: PageBitmap::new(pages),
            order: std::collections::VecDeque::new(),
        }
    }

    /// Adds `page` unless it is queued already (or beyond the RAM).
    pub fn push(&mut self, page: u64) {
        if self.queued.set(page) {
            self.order.push_back(page);
        }
    }

    /// Pages queued.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// True if nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Takes out the first `n` pages (fewer if fewer are queued).
    pub fn take(&mut self, n: usize) -> Vec<u64> {
        let n = n.min(self.order.len());
        let out: Vec<u64> = self.order.drain(..n).collect();
        for &p in &out {
            self.queued.unset(p);
        }
        out
    }
}

struct BitIter(u64);

impl Iterator for BitIter {
    type Item = u32;
    fn next(&mut self) -> Option<u32> {
        if self.0 == 0 {
            return None;
        }
        let b = self.0.trailing_zeros();
        self.0 &= self.0 - 1;
        Some(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_see_only_their_own_pages() {
        let mut bm = PageBitmap::new(1100);
        for p in [3, 511, 512, 600, 1023, 1099] {
            bm.set(p);
        }
        assert_eq!(bm.iter_range(0, 512).collect::<Vec<_>>(), [3, 511]);
        assert_eq!(
            bm.iter_range(512, 1024).collect::<Vec<_>>(),
            [512, 600, 1023]
        );
        assert_eq!(bm.iter_range(1024, 4096).collect::<Vec<_>>(), [1099]);
        assert!(bm.any_in(4, 512) && !bm.any_in(4, 511) && !bm.any_in(601, 1023));
        assert!(!bm.any_in(600, 600) && !bm.any_in(700, 10) && !bm.any_in(5000, 6000));
    }

    #[test]
    fn set_get_count_iter() {
        let mut bm = PageBitmap::new(130);
        assert!(bm.set(0));
        assert!(bm.set(64));
        assert!(bm.set(129));
        assert!(!bm.set(130), "out of range is refused");
        assert!(!bm.set(64), "a page marked before is not newly marked");
        assert!(bm.get(64));
        assert_eq!(bm.count(), 3);
        assert_eq!(bm.iter().collect::<Vec<_>>(), vec![0, 64, 129]);
        assert!(bm.get(64) && !bm.get(65) && !bm.get(1000));
    }

    #[test]
    fn a_queue_holds_each_page_once_until_taken() {
        let mut q = PageQueue::new(100);
        for _ in 0..1000 {
            q.push(7);
        }
        q.push(3);
        q.push(500); // beyond the RAM
        assert_eq!(q.len(), 2);
        assert_eq!(q.take(1), vec![7]);
        q.push(7); // may be needed again once taken
        assert_eq!(q.take(10), vec![3, 7]);
        assert!(q.is_empty());
    }

    #[test]
    fn ranges_and_union() {
        let mut a = PageBitmap::new(300);
        a.set_range(10, 200);
        assert_eq!(a.count(), 190);
        a.set_range(250, 10_000);
        assert_eq!(a.count(), 240);
        let mut b = PageBitmap::new(300);
        b.set(5);
        b.union_with(&a);
        assert_eq!(b.count(), 241);
        b.clear();
        assert_eq!(b.count(), 0);
    }
}
