//! Labels the caller puts on RAM pages and what the pre-copy rounds sent of
//! each label: the report's answer to "what are the raw pages?". (The host
//! agent labels pages with what the guest used them for, from the guest's
//! census; the engine does not know what a label means.)

use std::sync::Mutex;

use serde::Serialize;
use thiserror::Error;

use crate::addr::PageIndex;

/// Most labels one set may name.
pub const MAX_LABELS: usize = 64;

/// Why a set of labelled pages was refused.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum LabelError {
    /// More names than [`MAX_LABELS`].
    #[error("{0} page labels given, at most {MAX_LABELS} are allowed")]
    TooMany(usize),
    /// A run names a label that has no name.
    #[error("a run of pages has label {label}, but only {names} labels are named")]
    Unknown {
        /// The label.
        label: u8,
        /// Labels named.
        names: usize,
    },
    /// Two runs cover the same page.
    #[error("two runs of labelled pages overlap at page {0}")]
    Overlap(u64),
}

/// Pages with a label each, held as sorted runs.
#[derive(Clone, Debug)]
pub struct PageLabels {
    names: Vec<String>,
    /// (first page, end page exclusive, label): sorted, not overlapping.
    runs: Vec<(u64, u64, u8)>,
}

impl PageLabels {
    /// Labels from `runs` of (first page, pages, label), label `i` being
    /// `names[i]`. Adjacent runs of one label are joined; empty runs are
    /// dropped.
    pub fn new(
        names: Vec<String>,
        mut runs: Vec<(PageIndex, u64, u8)>,
    ) -> Result<Self, LabelError> {
        if names.len() > MAX_LABELS {
            return Err(LabelError::TooMany(names.len()));
        }
        runs.sort_unstable_by_key(|r| r.0 .0);
        let mut out: Vec<(u64, u64, u8)> = Vec::with_capacity(runs.len());
        let mut next = 0;
        for (first, pages, label) in runs {
            if usize::from(label) >= names.len() {
                return Err(LabelError::Unknown {
                    label,
                    names: names.len(),
                });
            }
            if pages == 0 {
                continue;
            }
            if first.0 < next {
                return Err(LabelError::Overlap(first.0));
            }
            let end = first.0.saturating_add(pages);
            next = end;
            match out.last_mut() {
                Some(last) if last.1 == first.0 && last.2 == label => last.1 = end,
                _ => out.push((first.0, end, label)),
            }
        }
        Ok(Self { names, runs: out })
    }

    /// The label of `page`, if it has one (pure).
    pub fn label(&self, page: u64) -> Option<u8> {
        let i = self.runs.partition_point(|r| r.0 <= page);
        let r = self.runs.get(i.checked_sub(1)?)?;
        (page < r.1).then_some(r.2)
    }

    /// The labels' names.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Pages carrying each label, below `ram_pages`.
    fn pages_by_label(&self, ram_pages: u64) -> Vec<u64> {
        let mut n = vec![0; self.names.len()];
        for &(first, end, label) in &self.runs {
            n[usize::from(label)] += end.min(ram_pages).saturating_sub(first);
        }
        n
    }
}

/// How a round sent a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sent {
    /// The page's bytes.
    Raw = 0,
    /// The page's bytes, zstd-compressed.
    Compressed = 1,
    /// A zero marker (or nothing, in round 0).
    Zero = 2,
    /// A reference to shared storage.
    Reference = 3,
}

/// Pages sent by label and by how: row `i` is label `i`, the last row the
/// pages without a label.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct LabelTally {
    counts: Vec<[u64; 4]>,
}

impl LabelTally {
    pub(crate) fn new(labels: usize) -> Self {
        Self {
            counts: vec![[0; 4]; labels + 1],
        }
    }

    pub(crate) fn add(&mut self, label: Option<u8>, sent: Sent) {
        let unlabelled = self.counts.len() - 1;
        let row = label.map_or(unlabelled, |l| usize::from(l).min(unlabelled));
        self.counts[row][sent as usize] += 1;
    }

    fn merge(&mut self, other: &LabelTally) {
        if self.counts.len() < other.counts.len() {
            self.counts.resize(other.counts.len(), [0; 4]);
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            for (x, y) in a.iter_mut().zip(b) {
                *x += y;
            }
        }
    }
}

/// One label's line in a report: how many pages of RAM carry it and how
/// the rounds sent them (a page sent in several rounds counts each time).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LabelRow {
    /// The label's name ("unlabelled" for pages without one).
    pub label: String,
    /// Pages of RAM with this label.
    pub pages: u64,
    /// Sent as their bytes.
    pub raw_pages: u64,
    /// Sent zstd-compressed.
    pub compressed_pages: u64,
    /// Sent as zero markers (or skipped as zero in round 0).
    pub zero_pages: u64,
    /// Sent as references to shared storage.
    pub ref_pages: u64,
}

/// Labelled pages and what the rounds sent of each label, shared by the
/// rounds of one migration.
#[derive(Debug)]
pub struct Census {
    labels: PageLabels,
    tally: Mutex<LabelTally>,
}

/// A row's name for pages without a label.
pub const UNLABELLED: &str = "unlabelled";

impl Census {
    /// A census over `labels`, nothing sent yet.
    pub fn new(labels: PageLabels) -> Self {
        let tally = Mutex::new(LabelTally::new(labels.names.len()));
        Self { labels, tally }
    }

    pub(crate) fn labels(&self) -> &PageLabels {
        &self.labels
    }

    /// Adds what one round sent.
    pub(crate) fn record(&self, t: &LabelTally) {
        if let Ok(mut mine) = self.tally.lock() {
            mine.merge(t);
        }
    }

    /// One row per label, then the unlabelled pages, for a RAM of
    /// `ram_pages` pages; labels with neither pages nor sends are left out.
    pub fn table(&self, ram_pages: u64) -> Vec<LabelRow> {
        let tally = self.tally.lock().map(|t| t.clone()).unwrap_or_default();
        let mut pages = self.labels.pages_by_label(ram_pages);
        let labelled: u64 = pages.iter().sum();
        pages.push(ram_pages.saturating_sub(labelled));
        let names = self
            .labels
            .names
            .iter()
            .map(String::as_str)
            .chain([UNLABELLED]);
        names
            .zip(pages)
            .enumerate()
            .map(|(i, (name, pages))| {
                let c = tally.counts.get(i).copied().unwrap_or_default();
                LabelRow {
                    label: name.to_string(),
                    pages,
                    raw_pages: c[Sent::Raw as usize],
                    compressed_pages: c[Sent::Compressed as usize],
                    zero_pages: c[Sent::Zero as usize],
                    ref_pages: c[Sent::Reference as usize],
                }
            })
            .filter(|r| r.pages + r.raw_pages + r.compressed_pages + r.zero_pages + r.ref_pages > 0)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("k{i}")).collect()
    }

    #[test]
    fn labels_are_found_by_page_and_adjacent_runs_join() {
        let l = PageLabels::new(
            names(3),
            vec![
                (PageIndex(10), 5, 1),
                (PageIndex(0), 4, 0),
                (PageIndex(15), 5, 1),
                (PageIndex(30), 0, 2),
                (PageIndex(40), 2, 2),
            ],
        )
        .unwrap();
        assert_eq!(l.runs, vec![(0, 4, 0), (10, 20, 1), (40, 42, 2)]);
        let got: Vec<_> = [0, 3, 4, 9, 10, 19, 20, 39, 41, 42, u64::MAX]
            .iter()
            .map(|&p| l.label(p))
            .collect();
        assert_eq!(
            got,
            [
                Some(0),
                Some(0),
                None,
                None,
                Some(1),
                Some(1),
                None,
                None,
                Some(2),
                None,
                None
            ]
        );
    }

    #[test]
    fn bad_label_sets_are_refused() {
        assert_eq!(
            PageLabels::new(names(2), vec![(PageIndex(0), 1, 2)]).unwrap_err(),
            LabelError::Unknown { label: 2, names: 2 }
        );
        assert_eq!(
            PageLabels::new(names(1), vec![(PageIndex(0), 4, 0), (PageIndex(3), 1, 0)])
                .unwrap_err(),
            LabelError::Overlap(3)
        );
        assert_eq!(
            PageLabels::new(names(MAX_LABELS + 1), vec![]).unwrap_err(),
            LabelError::TooMany(MAX_LABELS + 1)
        );
    }

    #[test]
    fn the_table_counts_pages_and_sends_per_label() {
        let l =
            PageLabels::new(names(3), vec![(PageIndex(0), 4, 0), (PageIndex(8), 4, 1)]).unwrap();
        let c = Census::new(l);
        let mut t = LabelTally::new(3);
        t.add(Some(0), Sent::Raw);
        t.add(Some(0), Sent::Raw);
        t.add(Some(1), Sent::Reference);
        t.add(None, Sent::Zero);
        c.record(&t);
        t = LabelTally::new(3);
        t.add(Some(1), Sent::Compressed);
        c.record(&t);
        let rows = c.table(16);
        assert_eq!(
            rows,
            vec![
                LabelRow {
                    label: "k0".into(),
                    pages: 4,
                    raw_pages: 2,
                    ..LabelRow::default()
                },
                LabelRow {
                    label: "k1".into(),
                    pages: 4,
                    compressed_pages: 1,
                    ref_pages: 1,
                    ..LabelRow::default()
                },
                LabelRow {
                    label: UNLABELLED.into(),
                    pages: 8,
                    zero_pages: 1,
                    ..LabelRow::default()
                },
            ]
        );
    }
}
