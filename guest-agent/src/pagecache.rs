//! Hints for the guest's clean page cache: pages of files on the VM's
//! disks that the kernel holds unmodified, found without reading them.
//! They are hints like the buffer pool's (guest-physical page → disk
//! offset) under the same rules: the host checks each against its disks,
//! the destination each page's hash, and a wrong one costs a resend.
//!
//! The files are those the guest's processes have open or mapped (their
//! binaries, libraries, logs, data files): the kernel names no other
//! cached file. For each, `mincore` on a read-only mapping says which
//! pages are resident; reading one byte of each (with `process_vm_readv`
//! on this process, so that a file truncated meanwhile gives an error, not
//! SIGBUS) maps it here without a disk read; `/proc/self/pagemap` gives its
//! frame, `/proc/kpageflags` whether it is clean, FIEMAP (without a sync)
//! where it lies. A page evicted between `mincore` and that read is read
//! back from disk: one page, rarely.

use std::collections::{BTreeSet, HashSet};
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use dbmigrate_core::addr::{DiskOffset, GuestAddr};
use dbmigrate_core::protocol::guest::GuestHint;
use serde::Serialize;

use crate::census::{KPF_ANON, KPF_DIRTY, KPF_LRU, KPF_SWAPBACKED, KPF_WRITEBACK};
use crate::disk::{map_range, Disks, Placed};
use crate::{procmem, sys};

/// Most files one collection looks at.
pub const MAX_FILES: usize = 65_536;

/// What one collection found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PageCacheStats {
    /// Files looked at.
    pub files: u64,
    /// Of those, files on one of the VM's disks.
    pub on_disks: u64,
    /// Their pages in the page cache.
    pub resident: u64,
    /// Resident pages not clean file cache by their flags (dirty, under
    /// writeback, or off the page lists for the moment), not hinted.
    pub not_clean: u64,
    /// Resident pages whose place on disk is not plain (delayed
    /// allocation, inline, unwritten, ...), not hinted.
    pub unplaced: u64,
    /// Hints made.
    pub hints: u64,
}

/// Paths of files the processes in `/proc` have open or mapped, each once,
/// at most [`MAX_FILES`].
pub fn open_and_mapped_files() -> Vec<PathBuf> {
    let mut out = BTreeSet::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    for p in procs.flatten() {
        let is_pid = p
            .file_name()
            .to_str()
            .is_some_and(|s| s.bytes().all(|b| b.is_ascii_digit()));
        if !is_pid {
            continue;
        }
        if let Ok(maps) = std::fs::read_to_string(p.path().join("maps")) {
            out.extend(mapped_paths(&maps));
        }
        if let Ok(fds) = std::fs::read_dir(p.path().join("fd")) {
            for fd in fds.flatten() {
                if let Ok(t) = std::fs::read_link(fd.path()) {
                    if t.is_absolute() && !t.to_string_lossy().ends_with(" (deleted)") {
                        out.insert(t);
                    }
                }
            }
        }
        if out.len() >= MAX_FILES {
            break;
        }
    }
    out.into_iter().take(MAX_FILES).collect()
}

/// The files named in `/proc/PID/maps` text (pure): the path that ends a
/// line, unless the file was deleted.
pub fn mapped_paths(maps: &str) -> Vec<PathBuf> {
    maps.lines()
        .filter_map(|l| l.find('/').map(|i| &l[i..]))
        .filter(|p| !p.ends_with(" (deleted)"))
        .map(PathBuf::from)
        .collect()
}

/// Whether a page's `kpageflags` say clean page cache of a file (pure).
pub fn clean_file_page(flags: u64) -> bool {
    flags & KPF_LRU != 0 && flags & (KPF_ANON | KPF_SWAPBACKED | KPF_DIRTY | KPF_WRITEBACK) == 0
}

/// Hints for the clean resident pages of `files` that lie on `disks`, at
/// most `max_hints`. A file that vanished or cannot be mapped is skipped;
/// a file reached by two paths is looked at once.
pub fn collect(
    disks: &Disks,
    files: &[PathBuf],
    max_hints: usize,
) -> io::Result<(Vec<GuestHint>, PageCacheStats)> {
    let kpf = File::open("/proc/kpageflags")?;
    let me = procmem::ProcMem::open(std::process::id())?;
    let mut st = PageCacheStats::default();
    let mut hints = Vec::new();
    let mut seen = HashSet::new();
    for path in files {
        if hints.len() >= max_hints {
            break;
        }
        st.files += 1;
        let mut look = Look {
            disks,
            kpf: &kpf,
            me: &me,
            max_hints,
            hints: &mut hints,
            st: &mut st,
        };
        if let Err(e) = look.file(path, &mut seen) {
            tracing::debug!(path = %path.display(), "page cache of a file skipped: {e}");
        }
    }
    hints.truncate(max_hints);
    st.hints = hints.len() as u64;
    Ok((hints, st))
}

/// Pages of a file looked at together: a window of the mapping, so that
/// what a file costs the agent's memory does not grow with its size.
const WINDOW_PAGES: usize = 16_384;

/// One collection's state.
struct Look<'a> {
    disks: &'a Disks,
    kpf: &'a File,
    me: &'a procmem::ProcMem,
    max_hints: usize,
    hints: &'a mut Vec<GuestHint>,
    st: &'a mut PageCacheStats,
}

impl Look<'_> {
    /// Adds the hints of one file. Only a regular file is opened (a FIFO
    /// or a terminal could block or become the agent's), without following
    /// a link, without taking a controlling terminal or updating its
    /// access time.
    fn file(&mut self, path: &Path, seen: &mut HashSet<(u64, u64)>) -> io::Result<()> {
        if !std::fs::symlink_metadata(path)?.is_file() {
            return Ok(());
        }
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_NOFOLLOW | libc::O_NOATIME)
            .open(path)?;
        let meta = f.metadata()?;
        if !meta.is_file() || meta.len() == 0 || !seen.insert((meta.dev(), meta.ino())) {
            return Ok(());
        }
        let Some(placed) = self.disks.place_open(&f, false)? else {
            return Ok(());
        };
        self.st.on_disks += 1;
        let len =
            usize::try_from(meta.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
        let map = sys::FileMap::new(&f, len)?;
        let resident = map.resident()?;
        for (w, window) in resident.chunks(WINDOW_PAGES).enumerate() {
            if self.hints.len() >= self.max_hints {
                break;
            }
            let first = w * WINDOW_PAGES;
            let pages: Vec<usize> = window
                .iter()
                .enumerate()
                .filter_map(|(i, &r)| r.then_some(first + i))
                .collect();
            if !pages.is_empty() {
                self.window(&map, &placed, first, window.len(), &pages)?;
            }
        }
        Ok(())
    }

    /// Adds the hints of the resident `pages` of one window (`count` pages
    /// from page `first`) of a mapped file.
    fn window(
        &mut self,
        map: &sys::FileMap,
        placed: &Placed,
        first: usize,
        count: usize,
        pages: &[usize],
    ) -> io::Result<()> {
        self.st.resident += pages.len() as u64;
        // One byte of each resident page, read through this process's own
        // mapping: the page is then mapped here, and the pagemap shows its
        // frame.
        let pieces: Vec<(u64, usize)> = pages
            .iter()
            .map(|&i| (map.addr() + i as u64 * 4096, 1))
            .collect();
        let mut sink = vec![0u8; pieces.len()];
        let read = sys::read_pieces(std::process::id(), &pieces, &mut sink)?;
        let frames = self.me.frames(map.addr() + first as u64 * 4096, count)?;
        for (&i, ok) in pages.iter().zip(read) {
            let Some(pfn) = frames.get(i - first).copied().flatten().filter(|_| ok) else {
                continue;
            };
            let mut flags = [0u8; 8];
            self.kpf.read_exact_at(&mut flags, pfn * 8)?;
            if !clean_file_page(u64::from_le_bytes(flags)) {
                self.st.not_clean += 1;
                continue;
            }
            let at = i as u64 * 4096;
            let Some(disk_offset) = map_range(&placed.extents, at, 4096)
                .and_then(|phys| placed.base.checked_add(phys))
                .filter(|o| o % 4096 == 0)
            else {
                self.st.unplaced += 1;
                continue;
            };
            self.hints.push(GuestHint {
                gpa: GuestAddr(pfn * 4096),
                disk: placed.disk,
                clean: true,
                disk_offset: DiskOffset(disk_offset),
                space: 0,
                page_no: 0,
                lsn: 0,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_files_are_the_paths_that_end_the_lines() {
        let maps = "\
55d0-55e0 r-xp 00000000 08:01 123                        /usr/sbin/mariadbd
7f00-7f10 rw-p 00000000 00:00 0 
7f10-7f20 r--p 00000000 08:01 77                         /usr/lib/a file with spaces.so
7f20-7f30 rw-s 00000000 00:05 9                          /dev/shm/gone (deleted)
7ffc-7ffd rw-p 00000000 00:00 0                          [stack]
";
        assert_eq!(
            mapped_paths(maps),
            vec![
                PathBuf::from("/usr/sbin/mariadbd"),
                PathBuf::from("/usr/lib/a file with spaces.so")
            ]
        );
    }

    #[test]
    fn only_clean_file_pages_are_hinted() {
        assert!(clean_file_page(KPF_LRU));
        assert!(!clean_file_page(KPF_LRU | KPF_DIRTY));
        assert!(!clean_file_page(KPF_LRU | KPF_WRITEBACK));
        assert!(!clean_file_page(KPF_LRU | KPF_ANON));
        assert!(!clean_file_page(KPF_LRU | KPF_SWAPBACKED));
        assert!(!clean_file_page(0));
    }

    #[test]
    fn open_and_mapped_files_include_this_test_and_no_disk_means_no_hint() {
        // Runs as any user on any file system: the test binary is mapped
        // and resident; only its placement needs a disk list, so the
        // collection with no disks finds it on none.
        let files = open_and_mapped_files();
        let me = std::env::current_exe().unwrap();
        assert!(files.contains(&me), "{files:?}");
        let disks = Disks::new(&[]).unwrap();
        if let Ok((hints, st)) = collect(&disks, &[me], 1000) {
            assert!(hints.is_empty());
            assert_eq!(st.on_disks, 0);
            assert_eq!(st.files, 1);
        }
    }
}
