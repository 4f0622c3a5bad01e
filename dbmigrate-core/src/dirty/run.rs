//! Dirty tracking of RAM made of several files (one per memory backend),
//! each mapped on its own in the VMM: one tracker per mapping, reported as
//! one run of pages in which file `i`'s pages follow file `i - 1`'s (the
//! order of [`crate::ram::RamFile`]s).

use super::{DirtyError, DirtyTracker, TrackerKind};
use crate::bitmap::PageBitmap;

/// One file's tracker and where its pages start in the run.
struct Part {
    tracker: Box<dyn DirtyTracker>,
    first: u64,
    scratch: PageBitmap,
}

/// Trackers of several mappings, reporting as one run of pages.
pub struct RunTracker {
    parts: Vec<Part>,
}

impl RunTracker {
    /// Joins `parts` (each tracker with its mapping's page count) in the
    /// run's order.
    pub fn new(parts: Vec<(Box<dyn DirtyTracker>, u64)>) -> Self {
        let mut first = 0;
        let parts = parts
            .into_iter()
            .map(|(tracker, pages)| {
                let p = Part {
                    tracker,
                    first,
                    scratch: PageBitmap::new(pages),
                };
                first += pages;
                p
            })
            .collect();
        Self { parts }
    }
}

impl DirtyTracker for RunTracker {
    fn kind(&self) -> TrackerKind {
        self.parts
            .first()
            .map_or(TrackerKind::UffdWp, |p| p.tracker.kind())
    }

    fn reset(&mut self) -> Result<(), DirtyError> {
        self.parts.iter_mut().try_for_each(|p| p.tracker.reset())
    }

    fn collect(&mut self, dirty: &mut PageBitmap) -> Result<u64, DirtyError> {
        let mut total = 0;
        for p in &mut self.parts {
            p.scratch.clear();
            total += p.tracker.collect(&mut p.scratch)?;
            for page in p.scratch.iter() {
                dirty.set(p.first + page);
            }
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reports a fixed set of pages once.
    struct Fixed(Vec<u64>);

    impl DirtyTracker for Fixed {
        fn kind(&self) -> TrackerKind {
            TrackerKind::UffdWp
        }
        fn reset(&mut self) -> Result<(), DirtyError> {
            self.0.clear();
            Ok(())
        }
        fn collect(&mut self, dirty: &mut PageBitmap) -> Result<u64, DirtyError> {
            for &p in &self.0 {
                dirty.set(p);
            }
            let n = self.0.len() as u64;
            self.0.clear();
            Ok(n)
        }
    }

    #[test]
    fn each_file_s_pages_follow_the_last() {
        let mut t = RunTracker::new(vec![
            (Box::new(Fixed(vec![0, 2])), 3),
            (Box::new(Fixed(vec![0, 4])), 5),
        ]);
        let mut bm = PageBitmap::new(8);
        assert_eq!(t.collect(&mut bm).unwrap(), 4);
        assert_eq!(bm.iter().collect::<Vec<_>>(), vec![0, 2, 3, 7]);
        bm.clear();
        assert_eq!(t.collect(&mut bm).unwrap(), 0, "reported once");
        assert!(bm.is_clear());
    }
}
