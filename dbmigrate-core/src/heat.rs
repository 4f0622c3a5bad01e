//! How often each page was seen written while the VM ran: post-copy pushes
//! the pages a guest writes over and over before the ones it wrote once.
//!
//! A database's writes are skewed (sysbench's default distribution sends
//! three quarters of its accesses to one percent of the rows; the buffer
//! pool's hot pages, the redo log buffer and the lock tables are rewritten
//! all the time), and a page rewritten in many of the collects is likelier
//! to be touched again in the first moments after the resume than one
//! written once, seconds ago. Each collect adds one to the count of every
//! page it reports; the collects are the rounds' own and, while a round
//! that may lead to post-copy runs, one every [`COLLECT_EVERY`].

use std::time::Duration;

use crate::bitmap::PageBitmap;

/// How often a round that may end in post-copy collects written pages to
/// count them (the first round lasts seconds; its end collect alone would
/// see every page written in it once).
pub const COLLECT_EVERY: Duration = Duration::from_millis(200);

/// Pages seen written in at least this many collects go first.
const HOT: u8 = 2;

/// Per-page count of the collects that saw it written (saturating).
#[derive(Clone, Debug)]
pub struct Heat {
    counts: Vec<u8>,
}

impl Heat {
    /// No page seen written yet, for a RAM of `pages` pages.
    pub fn new(pages: u64) -> Self {
        Self {
            counts: vec![0; usize::try_from(pages).expect("page count fits in memory")],
        }
    }

    /// Counts one collect that reported the pages of `written`.
    pub fn add(&mut self, written: &PageBitmap) {
        for p in written.iter() {
            if let Some(c) = usize::try_from(p).ok().and_then(|i| self.counts.get_mut(i)) {
                *c = c.saturating_add(1);
            }
        }
    }

    /// In how many collects `page` was seen written (0 beyond RAM).
    pub fn get(&self, page: u64) -> u8 {
        usize::try_from(page)
            .ok()
            .and_then(|i| self.counts.get(i))
            .copied()
            .unwrap_or(0)
    }

    /// The pages of `pending` seen written in at least two collects, most
    /// often first, ascending at equal counts (pure).
    pub fn hot_first(&self, pending: &PageBitmap) -> Vec<u64> {
        let mut hot: Vec<(u8, u64)> = pending
            .iter()
            .map(|p| (self.get(p), p))
            .filter(|&(c, _)| c >= HOT)
            .collect();
        hot.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        hot.into_iter().map(|(_, p)| p).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(pages: u64, set: &[u64]) -> PageBitmap {
        let mut b = PageBitmap::new(pages);
        for &p in set {
            b.set(p);
        }
        b
    }

    #[test]
    fn pages_written_most_often_come_first_and_once_written_ones_are_left_to_the_sweep() {
        let mut heat = Heat::new(16);
        heat.add(&bits(16, &[1, 5, 9, 12]));
        heat.add(&bits(16, &[5, 9, 12]));
        heat.add(&bits(16, &[9, 3]));
        heat.add(&bits(16, &[9, 12]));
        assert_eq!(heat.get(9), 4);
        assert_eq!(heat.get(12), 3);
        assert_eq!(heat.get(0), 0);
        assert_eq!(heat.get(99), 0);
        // 1 and 3 were written once; 14 was never seen written (pending
        // for another reason); 5 is hot but not pending.
        let pending = bits(16, &[1, 3, 9, 12, 14]);
        assert_eq!(heat.hot_first(&pending), vec![9, 12]);
        let pending = bits(16, &[1, 5, 9, 12]);
        assert_eq!(heat.hot_first(&pending), vec![9, 12, 5]);
    }

    #[test]
    fn counts_saturate_instead_of_wrapping() {
        let mut heat = Heat::new(4);
        let b = bits(4, &[2]);
        for _ in 0..300 {
            heat.add(&b);
        }
        assert_eq!(heat.get(2), u8::MAX);
    }
}
