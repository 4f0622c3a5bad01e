//! Finds InnoDB buffer-pool frames in guest RAM on the source host.
//!
//! The guest agent sends only where each tablespace lies on the VM's disks
//! (cheap inside the guest); this module reads guest RAM natively, finds
//! frames whose header, trailer and checksum make a complete, flushed page
//! (a page changed in memory since its last write fails the trailer or
//! checksum), and turns each into hints through the layout. Hints stay
//! untrusted: the engine checks bounds and the destination checks every hash.

use std::collections::HashMap;

use dbmigrate_core::addr::{ram_offset, GpaRange, PageIndex, RamOffset};
use dbmigrate_core::bitmap::PageBitmap;
use dbmigrate_core::protocol::guest::{frame_pages, FileLayout, LayoutSet};
use dbmigrate_core::rebuild::{Hint, PageMap};
use dbmigrate_core::{PAGE_SIZE, PAGE_SIZE_U64};
use serde::Serialize;

/// What one scan found.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct ScanStats {
    /// Frame-sized, frame-aligned pieces of RAM examined (all 4 KiB present).
    pub frames: u64,
    /// Pieces that read as a complete InnoDB page.
    pub pages: u64,
    /// Pages of a tablespace the layout does not describe.
    pub no_file: u64,
    /// The spaces most of those pages claim, with counts (at most 5).
    pub no_file_spaces: Vec<(u32, u64)>,
    /// 4 KiB pieces that do not sit in one plain extent.
    pub unmapped: u64,
    /// Frames dropped because another frame holds a newer version of the page.
    pub older_copies: u64,
    /// Hints made (4 KiB each).
    pub hints: u64,
}

/// The RAM-file byte ranges to scan: each guest-physical range's part of the
/// file, once even where QEMU maps the same RAM at several addresses (the
/// PC's low-memory aliases), and only ranges where frame alignment in the
/// file is frame alignment in guest-physical space. Pure.
fn ram_spans(gpa_layout: &[GpaRange], ps: u64) -> Vec<(u64, u64)> {
    let mut spans: Vec<(u64, u64)> = gpa_layout
        .iter()
        .filter(|r| r.keeps_alignment(ps))
        .filter_map(|r| Some((r.offset.0, r.offset.0.checked_add(r.len)?)))
        .collect();
    spans.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(spans.len());
    for (a, b) in spans {
        match merged.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    merged
}

/// Finds flushed InnoDB pages in `ram` (the RAM file's bytes; `data` marks
/// pages that are not holes, so that reading never allocates) and returns
/// hints per RAM-file page. The frames examined are those the guest listed
/// in `layout.frames` (wherever their 4 KiB pages are), or, if it listed
/// none, every frame-aligned, physically contiguous piece of RAM. Pure.
pub fn scan_frames(
    ram: &[u8],
    data: &PageBitmap,
    gpa_layout: &[GpaRange],
    layout: &LayoutSet,
    disks: usize,
) -> (PageMap<Hint>, ScanStats) {
    let mut stats = ScanStats::default();
    let ps = u64::from(layout.page_size);
    if !ps.is_power_of_two() || !(PAGE_SIZE_U64..=65536).contains(&ps) {
        return (PageMap::default(), stats);
    }
    let sub = ps / PAGE_SIZE_U64;
    let sub_n = usize::try_from(sub).expect("at most 16");
    // Each candidate frame as the RAM-file page of each of its 4 KiB pages.
    let candidates: Vec<Vec<PageIndex>> = if layout.frames.is_empty() {
        ram_spans(gpa_layout, ps)
            .into_iter()
            .flat_map(|(start, end)| {
                let first = start.next_multiple_of(ps);
                let count = end.saturating_sub(first) / ps;
                (0..count).map(move |i| {
                    let p0 = (first + i * ps) / PAGE_SIZE_U64;
                    (p0..p0 + sub).map(PageIndex).collect()
                })
            })
            .collect()
    } else {
        frame_pages(&layout.frames, sub_n)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|f| {
                f.iter()
                    .map(|&gpa| ram_offset(gpa_layout, gpa).map(RamOffset::page))
                    .collect::<Option<Vec<PageIndex>>>()
            })
            .collect()
    };
    let files: HashMap<u32, &FileLayout> = layout
        .files
        .iter()
        .filter(|f| usize::from(f.disk) < disks)
        .map(|f| (f.id, f))
        .collect();
    let ram_pages = ram.len() as u64 / PAGE_SIZE_U64;
    // (space, page) -> newest LSN among the frames that hold it. Copies of
    // the newest version (the guest's page cache holds some, byte-identical)
    // are all hinted; older copies (free frames, stale reads) are not: the
    // disk holds the newest flushed version.
    let mut newest: HashMap<(u32, u32), u64> = HashMap::new();
    let mut found: Vec<(usize, crate::FilHeader)> = Vec::new();
    let page_bytes = |p: PageIndex| {
        let s = usize::try_from(p.0 * PAGE_SIZE_U64).expect("inside the mapping");
        &ram[s..s + PAGE_SIZE]
    };
    for (i, f) in candidates.iter().enumerate() {
        if f.iter().any(|&p| p.0 >= ram_pages || !data.get(p.0)) {
            continue;
        }
        stats.frames += 1;
        // Header and trailer only, as the guest agent reads them: checking
        // the whole frame's CRC-32C here cost more than the rest of the
        // scan, and buys nothing the destination's hash check does not give
        // (a frame changed but not yet stamped with its new LSN is in the
        // dirty set anyway, and is resent).
        let (first, last) = (page_bytes(f[0]), page_bytes(f[sub_n - 1]));
        let Some(h) = crate::parse_parts(
            &first[..crate::HEAD_LEN],
            &last[PAGE_SIZE - crate::TAIL_LEN..],
        ) else {
            continue;
        };
        stats.pages += 1;
        let n = newest.entry((h.space, h.page)).or_insert(h.lsn);
        *n = (*n).max(h.lsn);
        found.push((i, h));
    }
    let mut unknown: HashMap<u32, u64> = HashMap::new();
    let mut table = PageMap::with_capacity_and_hasher(found.len() * sub_n, Default::default());
    for (i, h) in found {
        if newest.get(&(h.space, h.page)) != Some(&h.lsn) {
            stats.older_copies += 1;
            continue;
        }
        let Some(f) = files.get(&h.space) else {
            stats.no_file += 1;
            *unknown.entry(h.space).or_default() += 1;
            continue;
        };
        for (k, &ram_page) in candidates[i].iter().enumerate() {
            let file_off = u64::from(h.page) * ps + k as u64 * PAGE_SIZE_U64;
            match f.locate(file_off, PAGE_SIZE_U64) {
                Some(disk_off) => {
                    table.insert(
                        ram_page,
                        Hint {
                            disk: f.disk,
                            offset: disk_off,
                        },
                    );
                }
                None => stats.unmapped += 1,
            }
        }
    }
    stats.hints = table.len() as u64;
    let mut unknown: Vec<(u32, u64)> = unknown.into_iter().collect();
    unknown.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    unknown.truncate(5);
    stats.no_file_spaces = unknown;
    (table, stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dbmigrate_core::addr::{DiskOffset, GuestAddr};
    use dbmigrate_core::protocol::guest::Extent;

    /// A flushed 16 KiB page in MariaDB's full_crc32 layout.
    fn page(space: u32, no: u32, lsn: u64) -> Vec<u8> {
        let mut p = vec![0x5au8; 16384];
        p[4..8].copy_from_slice(&no.to_be_bytes());
        p[16..24].copy_from_slice(&lsn.to_be_bytes());
        p[24..26].copy_from_slice(&17855u16.to_be_bytes());
        p[34..38].copy_from_slice(&space.to_be_bytes());
        let n = p.len();
        p[n - 8..n - 4].copy_from_slice(&lsn.to_be_bytes()[4..]);
        let c = crc32c::crc32c(&p[..n - 4]);
        p[n - 4..].copy_from_slice(&c.to_be_bytes());
        p
    }

    #[test]
    fn finds_flushed_frames_and_maps_them_through_the_layout() {
        let mut ram = vec![0u8; 64 * 4096];
        let put = |ram: &mut Vec<u8>, at: usize, p: &[u8]| ram[at..at + p.len()].copy_from_slice(p);
        put(&mut ram, 0, &page(5, 0, 100)); // pages 0..4
        put(&mut ram, 16384, &page(5, 3, 101)); // pages 4..8

        // Changed since flushed: the header carries the newer LSN, the
        // trailer still the flushed one.
        let mut modified = page(5, 1, 102);
        modified[16..24].copy_from_slice(&110u64.to_be_bytes());
        put(&mut ram, 32768, &modified);
        put(&mut ram, 49152, &page(9, 0, 103)); // space without a file
        put(&mut ram, 65536, &page(6, 0, 104)); // two copies of space 6 page 0
        put(&mut ram, 81920, &page(6, 0, 104));
        put(&mut ram, 98304, &page(6, 0, 90)); // an older copy of it
        put(&mut ram, 114688 + 4096, &page(5, 2, 105)); // not frame-aligned: skipped
        put(&mut ram, 131072, &page(5, 7, 106)); // beyond the file's extents
        put(&mut ram, 147456, &page(5, 4, 107)); // one page missing (a hole)
        let mut data = PageBitmap::new(64);
        for p in 0..64 {
            if p != 37 {
                data.set(p);
            }
        }
        let layout = LayoutSet {
            page_size: 16384,
            files: vec![
                FileLayout {
                    id: 5,
                    disk: 0,
                    extents: vec![Extent {
                        file_offset: 0,
                        disk_offset: DiskOffset(1 << 20),
                        len: 5 * 16384,
                    }],
                },
                FileLayout {
                    id: 6,
                    disk: 0,
                    extents: vec![Extent {
                        file_offset: 0,
                        disk_offset: DiskOffset(0),
                        len: 16384,
                    }],
                },
            ],
            frames: vec![],
        };
        let gpa = [GpaRange {
            gpa: GuestAddr(0),
            len: ram.len() as u64,
            offset: RamOffset(0),
        }];
        let (t, s) = scan_frames(&ram, &data, &gpa, &layout, 1);
        assert_eq!(t.len(), 16, "{s:?}");
        assert_eq!(t[&PageIndex(0)].offset.0, 1 << 20);
        assert_eq!(t[&PageIndex(3)].offset.0, (1 << 20) + 3 * 4096);
        assert_eq!(t[&PageIndex(4)].offset.0, (1 << 20) + 3 * 16384);
        assert_eq!(s.older_copies, 1);
        assert_eq!(t[&PageIndex(16)].offset.0, 0);
        assert_eq!(t[&PageIndex(23)].offset.0, 3 * 4096);
        assert!(
            !t.contains_key(&PageIndex(24)),
            "the older copy is not hinted"
        );
        assert_eq!(s.no_file, 1);
        assert_eq!(s.no_file_spaces, vec![(9, 1)]);
        assert_eq!(s.unmapped, 4);
        assert_eq!(s.frames, 15, "frame at pages 36..40 has a hole");
        // The same RAM under two guest-physical addresses is scanned once.
        let aliased = [
            gpa[0],
            GpaRange {
                gpa: GuestAddr(1 << 32),
                len: 65536,
                offset: RamOffset(0),
            },
        ];
        assert_eq!(
            scan_frames(&ram, &data, &aliased, &layout, 1),
            (t.clone(), s.clone())
        );
        // Frames the guest lists are read wherever their pages are: a page
        // scattered over RAM pages 60, 50, 51, 52 (hinted per RAM page), and
        // a frame outside RAM is skipped.
        let mut ram2 = vec![0u8; 64 * 4096];
        let p = page(5, 1, 200);
        for (k, at) in [60usize, 50, 51, 52].iter().enumerate() {
            ram2[at * 4096..(at + 1) * 4096].copy_from_slice(&p[k * 4096..(k + 1) * 4096]);
        }
        let mut listed = layout.clone();
        listed.frames = dbmigrate_core::protocol::guest::frame_entries(&[
            vec![60 * 4096, 50 * 4096, 51 * 4096, 52 * 4096],
            vec![
                1 << 40,
                (1 << 40) + 4096,
                (1 << 40) + 8192,
                (1 << 40) + 12288,
            ],
        ]);
        let (t2, s2) = scan_frames(&ram2, &data, &gpa, &listed, 1);
        assert_eq!(s2.frames, 1);
        assert_eq!(t2.len(), 4);
        assert_eq!(t2[&PageIndex(60)].offset.0, (1 << 20) + 16384);
        assert_eq!(t2[&PageIndex(52)].offset.0, (1 << 20) + 16384 + 3 * 4096);
        // A foreign disk index is never used.
        let (t, _) = scan_frames(&ram, &data, &gpa, &layout, 0);
        assert!(t.is_empty());
        // Garbage page size: nothing, no panic.
        let bad = LayoutSet {
            page_size: 3,
            files: vec![],
            frames: vec![],
        };
        assert!(scan_frames(&ram, &data, &gpa, &bad, 1).0.is_empty());
    }
}
