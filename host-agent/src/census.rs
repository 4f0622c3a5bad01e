//! The guest's memory census joined with what the migration sent: the
//! guest's runs of guest-physical pages become labelled pages of the RAM
//! file (through QEMU's layout), and the engine counts per label the pages
//! it sent raw, as zero, or as references.

use dbmigrate_core::addr::{GpaRange, PageIndex};
use dbmigrate_core::census::{LabelError, LabelRow, PageLabels};
use dbmigrate_core::protocol::guest::{CensusRun, PageKind};
use serde::Serialize;

/// The census part of a migration report.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CensusReport {
    /// How long the guest agent took to answer, ms.
    pub taken_ms: u64,
    /// Runs of pages the guest sent.
    pub runs: usize,
    /// Guest pages that lie outside the RAM file QEMU reported, or alias
    /// pages already counted (dropped).
    pub outside_ram_pages: u64,
    /// One row per kind of page: pages of RAM, and how the pre-copy rounds
    /// sent them (a page sent in several rounds counts each time).
    pub rows: Vec<LabelRow>,
    /// Why there is no census, if there is none (the migration went on).
    pub error: Option<String>,
}

/// RAM-file pages labelled with the kind the guest gave them (pure):
/// each run is cut along QEMU's guest-physical layout; what lies outside
/// it, or maps onto a page already labelled (an alias), is dropped and
/// counted. Labels are [`PageKind`] values, named by [`PageKind::name`].
pub fn labels(runs: &[CensusRun], layout: &[GpaRange]) -> Result<(PageLabels, u64), LabelError> {
    let mut pieces: Vec<(PageIndex, u64, u8)> = Vec::new();
    let mut mapped = 0u64;
    let mut total = 0u64;
    for run in runs {
        let (start, end) = (run.start.0, run.start.0 + u64::from(run.pages) * 4096);
        total += u64::from(run.pages);
        for r in layout {
            let (lo, hi) = (start.max(r.gpa.0), end.min(r.gpa.0.saturating_add(r.len)));
            if lo >= hi {
                continue;
            }
            let first = (r.offset.0 + (lo - r.gpa.0)) / 4096;
            let pages = (hi - lo) / 4096;
            pieces.push((PageIndex(first), pages, run.kind as u8));
        }
    }
    // Aliases (two guest ranges onto one RAM page): sorted by RAM page,
    // the piece that starts lower keeps the page (of equal starts, the
    // earlier run).
    pieces.sort_by_key(|p| p.0 .0);
    let mut next = 0u64;
    let mut kept = Vec::with_capacity(pieces.len());
    for (first, pages, label) in pieces {
        let from = first.0.max(next);
        let end = first.0 + pages;
        if from < end {
            kept.push((PageIndex(from), end - from, label));
            mapped += end - from;
            next = end;
        }
    }
    let names = PageKind::ALL.iter().map(|k| k.name().to_string()).collect();
    Ok((PageLabels::new(names, kept)?, total.saturating_sub(mapped)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use dbmigrate_core::addr::{GuestAddr, RamOffset};

    #[test]
    fn runs_follow_the_layout_and_what_lies_outside_is_counted() {
        // RAM below 640 KiB at offset 0, and from 1 MiB at offset 0x100000.
        let layout = [
            GpaRange {
                gpa: GuestAddr(0),
                len: 0xa0000,
                offset: RamOffset(0),
            },
            GpaRange {
                gpa: GuestAddr(0x10_0000),
                len: 0x10_0000,
                offset: RamOffset(0x10_0000),
            },
        ];
        let runs = [
            // Straddles the hole at 640 KiB - 1 MiB: 2 pages below, 96 in
            // the hole, 2 above.
            CensusRun {
                start: GuestAddr(0x9e000),
                pages: 100,
                kind: PageKind::Free,
            },
            CensusRun {
                start: GuestAddr(0x10_2000),
                pages: 1,
                kind: PageKind::BufferPool,
            },
        ];
        let (l, outside) = labels(&runs, &layout).unwrap();
        assert_eq!(outside, 96);
        assert_eq!(l.label(0x9e), Some(PageKind::Free as u8));
        assert_eq!(l.label(0x9f), Some(PageKind::Free as u8));
        assert_eq!(l.label(0xa0), None);
        assert_eq!(l.label(0x100), Some(PageKind::Free as u8));
        assert_eq!(l.label(0x101), Some(PageKind::Free as u8));
        assert_eq!(l.label(0x102), Some(PageKind::BufferPool as u8));
        assert_eq!(l.label(0x103), None);
        assert_eq!(
            l.names()[PageKind::BufferPool as usize],
            PageKind::BufferPool.name()
        );
    }

    #[test]
    fn an_aliased_page_keeps_its_first_label() {
        // Two guest ranges onto the same RAM pages.
        let layout = [
            GpaRange {
                gpa: GuestAddr(0),
                len: 0x2000,
                offset: RamOffset(0),
            },
            GpaRange {
                gpa: GuestAddr(0x10000),
                len: 0x2000,
                offset: RamOffset(0),
            },
        ];
        let runs = [
            CensusRun {
                start: GuestAddr(0),
                pages: 2,
                kind: PageKind::Kernel,
            },
            CensusRun {
                start: GuestAddr(0x10000),
                pages: 2,
                kind: PageKind::Anon,
            },
        ];
        let (l, outside) = labels(&runs, &layout).unwrap();
        assert_eq!(outside, 2);
        assert_eq!(l.label(0), Some(PageKind::Kernel as u8));
        assert_eq!(l.label(1), Some(PageKind::Kernel as u8));
    }
}
