//! The census of this VM's memory: what each guest-physical page holds at
//! one moment, from `/proc/kpageflags` (page frame number × 4096 is the
//! guest-physical address) and the database server's pagemap. Nothing is
//! read from the pages themselves.
//!
//! Two things the flags do not say, and how they are read here:
//! - A free block of the buddy allocator carries its flag on its first page
//!   only. The pages after it without any flag, up to the largest block that
//!   could start there (its alignment, at most 1024 pages), are counted as
//!   free too: an estimate, since a kernel allocation has no flag either.
//! - A compound page (a transparent huge page, a large slab) carries most
//!   flags on its head: its tail pages take the head's kind.

use std::fs::File;
use std::io::{self, Read};

use dbmigrate_core::addr::GuestAddr;
use dbmigrate_core::protocol::guest::{CensusRun, PageKind};

use crate::procmem;

pub(crate) const KPF_DIRTY: u64 = 1 << 4;
pub(crate) const KPF_LRU: u64 = 1 << 5;
const KPF_SLAB: u64 = 1 << 7;
pub(crate) const KPF_WRITEBACK: u64 = 1 << 8;
const KPF_BUDDY: u64 = 1 << 10;
const KPF_MMAP: u64 = 1 << 11;
pub(crate) const KPF_ANON: u64 = 1 << 12;
pub(crate) const KPF_SWAPBACKED: u64 = 1 << 14;
const KPF_COMPOUND_HEAD: u64 = 1 << 15;
const KPF_COMPOUND_TAIL: u64 = 1 << 16;
const KPF_NOPAGE: u64 = 1 << 20;
const KPF_PGTABLE: u64 = 1 << 26;
const KPF_RESERVED: u64 = 1 << 32;

/// Largest free block of the buddy allocator, in pages (order 10).
const MAX_BUDDY_PAGES: u64 = 1024;

/// Anonymous mappings of the server larger than this are its buffer pool
/// (glibc's malloc arenas are at most 64 MiB).
pub const POOL_MAPPING_MIN: u64 = 64 << 20;

/// Most page frames the server's frames are marked for: 1 TiB of guest
/// memory (two bitmaps of 32 MiB at most).
const MAX_PFNS: u64 = 1 << 28;

/// The database server's anonymous memory, by page frame number: one bit
/// per frame for the buffer pool, one for its other anonymous memory.
#[derive(Debug, Default)]
pub struct ServerFrames {
    pool: Vec<u64>,
    anon: Vec<u64>,
}

impl ServerFrames {
    /// Reads the server's anonymous mappings and their frames from its
    /// maps and pagemap.
    pub fn read(pid: u32) -> io::Result<Self> {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
        let mem = procmem::ProcMem::open(pid)?;
        let mut me = Self::default();
        for (start, end) in procmem::anon_rw_mappings(&maps, 4096) {
            let kind = if end - start > POOL_MAPPING_MIN {
                PageKind::BufferPool
            } else {
                PageKind::ServerAnon
            };
            for (_, pfns) in mem.windows(start, end, 4096) {
                for pfn in pfns.into_iter().flatten() {
                    me.mark(pfn, kind);
                }
            }
        }
        Ok(me)
    }

    /// Marks frame `pfn` as the server's memory of `kind` (frames beyond
    /// [`MAX_PFNS`] are left unmarked).
    fn mark(&mut self, pfn: u64, kind: PageKind) {
        if pfn >= MAX_PFNS {
            return;
        }
        let bits = if kind == PageKind::BufferPool {
            &mut self.pool
        } else {
            &mut self.anon
        };
        let word = usize::try_from(pfn / 64).expect("below MAX_PFNS");
        if bits.len() <= word {
            bits.resize(word + 1, 0);
        }
        bits[word] |= 1 << (pfn % 64);
    }

    /// The server's kind of frame `pfn`, if it is the server's.
    fn kind(&self, pfn: u64) -> Option<PageKind> {
        let has = |bits: &[u64]| {
            usize::try_from(pfn / 64)
                .ok()
                .and_then(|w| bits.get(w))
                .is_some_and(|b| b & (1 << (pfn % 64)) != 0)
        };
        if has(&self.pool) {
            Some(PageKind::BufferPool)
        } else if has(&self.anon) {
            Some(PageKind::ServerAnon)
        } else {
            None
        }
    }
}

/// The kind the flags of one page say (pure); None for no page at all (a
/// hole in the physical address space), `Kernel` where no flag says more.
pub fn kind_of(flags: u64) -> Option<PageKind> {
    let has = |bit: u64| flags & bit != 0;
    Some(if has(KPF_NOPAGE) {
        return None;
    } else if has(KPF_BUDDY) {
        PageKind::Free
    } else if has(KPF_SLAB) {
        PageKind::Slab
    } else if has(KPF_PGTABLE) {
        PageKind::PageTable
    } else if has(KPF_ANON) {
        PageKind::Anon
    } else if has(KPF_LRU) || has(KPF_MMAP) {
        if has(KPF_SWAPBACKED) {
            PageKind::Shmem
        } else if has(KPF_DIRTY) || has(KPF_WRITEBACK) {
            PageKind::FileDirty
        } else {
            PageKind::FileClean
        }
    } else if has(KPF_RESERVED) {
        PageKind::Reserved
    } else {
        PageKind::Kernel
    })
}

/// The census of pages `0..flags.len()` from their `kpageflags` (pure):
/// runs in address order, the server's frames labelled from `server`.
pub fn classify(flags: &[u64], server: &ServerFrames) -> Vec<CensusRun> {
    let mut c = Classifier::new(server);
    for &f in flags {
        c.push(f);
    }
    c.finish()
}

/// The census made page by page, in frame order (see the module's notes
/// on free blocks and compound pages).
pub struct Classifier<'a> {
    server: &'a ServerFrames,
    runs: Vec<CensusRun>,
    pfn: u64,
    head_kind: Option<PageKind>,
    free_until: u64,
}

impl<'a> Classifier<'a> {
    /// A census with no page yet.
    pub fn new(server: &'a ServerFrames) -> Self {
        Self {
            server,
            runs: Vec::new(),
            pfn: 0,
            head_kind: None,
            free_until: 0,
        }
    }

    /// Takes the flags of the next page frame.
    pub fn push(&mut self, f: u64) {
        let pfn = self.pfn;
        self.pfn += 1;
        let mut kind = kind_of(f);
        if f & KPF_COMPOUND_TAIL != 0 {
            kind = kind.filter(|&k| k != PageKind::Kernel).or(self.head_kind);
        } else if f == 0 && pfn < self.free_until {
            kind = Some(PageKind::Free);
        }
        if f & KPF_BUDDY != 0 {
            let align = 1u64 << pfn.trailing_zeros().min(MAX_BUDDY_PAGES.trailing_zeros());
            self.free_until = pfn + align;
        } else if f != 0 {
            self.free_until = 0;
        }
        if f & KPF_COMPOUND_HEAD != 0 {
            self.head_kind = kind;
        }
        if let Some(k) = self.server.kind(pfn) {
            kind = Some(k);
        }
        let Some(kind) = kind else { return };
        match self.runs.last_mut() {
            Some(r)
                if r.kind == kind
                    && r.pages < u32::MAX
                    && r.start.0 + u64::from(r.pages) * 4096 == pfn * 4096 =>
            {
                r.pages += 1
            }
            _ => self.runs.push(CensusRun {
                start: GuestAddr(pfn * 4096),
                pages: 1,
                kind,
            }),
        }
    }

    /// The runs so far.
    pub fn finish(self) -> Vec<CensusRun> {
        self.runs
    }
}

/// Page frames read from `/proc/kpageflags` at a time.
const FLAGS_CHUNK: usize = 65_536;

/// The census of the whole of `/proc/kpageflags`, read a chunk at a time.
pub fn take(server: &ServerFrames) -> io::Result<Vec<CensusRun>> {
    let mut f = File::open("/proc/kpageflags")?;
    let mut c = Classifier::new(server);
    let mut buf = vec![0u8; FLAGS_CHUNK * 8];
    loop {
        let mut got = 0;
        while got < buf.len() {
            match f.read(&mut buf[got..])? {
                0 => break,
                n => got += n,
            }
        }
        for e in buf[..got - got % 8].chunks_exact(8) {
            c.push(u64::from_le_bytes(e.try_into().expect("8 bytes")));
        }
        if got < buf.len() {
            return Ok(c.finish());
        }
    }
}

/// Pages of each kind in `runs`.
pub fn pages_by_kind(runs: &[CensusRun]) -> Vec<(PageKind, u64)> {
    PageKind::ALL
        .iter()
        .map(|&k| {
            let n = runs
                .iter()
                .filter(|r| r.kind == k)
                .map(|r| u64::from(r.pages))
                .sum();
            (k, n)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(runs: &[CensusRun]) -> Vec<(u64, u32, PageKind)> {
        runs.iter()
            .map(|r| (r.start.0 / 4096, r.pages, r.kind))
            .collect()
    }

    #[test]
    fn flags_name_the_kind() {
        assert_eq!(kind_of(KPF_NOPAGE), None);
        assert_eq!(kind_of(KPF_BUDDY), Some(PageKind::Free));
        assert_eq!(kind_of(KPF_SLAB | KPF_LRU), Some(PageKind::Slab));
        assert_eq!(kind_of(KPF_PGTABLE), Some(PageKind::PageTable));
        assert_eq!(
            kind_of(KPF_ANON | KPF_LRU | KPF_SWAPBACKED | KPF_MMAP),
            Some(PageKind::Anon)
        );
        assert_eq!(kind_of(KPF_LRU | KPF_SWAPBACKED), Some(PageKind::Shmem));
        assert_eq!(kind_of(KPF_LRU | KPF_DIRTY), Some(PageKind::FileDirty));
        assert_eq!(kind_of(KPF_LRU | KPF_WRITEBACK), Some(PageKind::FileDirty));
        assert_eq!(kind_of(KPF_LRU | KPF_MMAP), Some(PageKind::FileClean));
        assert_eq!(kind_of(KPF_RESERVED), Some(PageKind::Reserved));
        assert_eq!(kind_of(0), Some(PageKind::Kernel));
    }

    #[test]
    fn free_blocks_cover_their_flagless_pages_and_tails_take_their_head() {
        let mut flags = vec![0u64; 24];
        flags[0] = KPF_RESERVED;
        // A free block of 4 at page 4 (aligned on 4): pages 5-7 have no flag.
        flags[4] = KPF_BUDDY;
        // Page 8 has no flag and lies past any block starting at 4: kernel.
        // A free page at 9 (odd: a block of one), 10 without a flag: kernel.
        flags[9] = KPF_BUDDY;
        // A compound anonymous page 12-15 (a huge page's tails).
        flags[12] = KPF_ANON | KPF_COMPOUND_HEAD | KPF_LRU;
        for f in &mut flags[13..16] {
            *f = KPF_ANON | KPF_COMPOUND_TAIL;
        }
        // A large slab 16-17: its tail has only the tail flag.
        flags[16] = KPF_SLAB | KPF_COMPOUND_HEAD;
        flags[17] = KPF_COMPOUND_TAIL;
        flags[18] = KPF_NOPAGE;
        flags[19] = KPF_LRU;
        // The server's frames at 20-21.
        let mut server = ServerFrames::default();
        server.mark(20, PageKind::BufferPool);
        server.mark(21, PageKind::ServerAnon);
        flags[20] = KPF_ANON | KPF_LRU;
        flags[21] = KPF_ANON | KPF_LRU;
        assert_eq!(
            kinds(&classify(&flags, &server)),
            vec![
                (0, 1, PageKind::Reserved),
                (1, 3, PageKind::Kernel),
                (4, 4, PageKind::Free),
                (8, 1, PageKind::Kernel),
                (9, 1, PageKind::Free),
                (10, 2, PageKind::Kernel),
                (12, 4, PageKind::Anon),
                (16, 2, PageKind::Slab),
                (19, 1, PageKind::FileClean),
                (20, 1, PageKind::BufferPool),
                (21, 1, PageKind::ServerAnon),
                (22, 2, PageKind::Kernel),
            ]
        );
        let total: u64 = pages_by_kind(&classify(&flags, &server))
            .iter()
            .map(|(_, n)| n)
            .sum();
        assert_eq!(total, 23, "every page but the hole");
    }
}
