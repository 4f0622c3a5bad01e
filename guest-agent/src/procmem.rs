//! Reading another process's memory and its physical page numbers.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Finds the database server: the first process named `mariadbd` or `mysqld`.
pub fn find_server() -> io::Result<Option<u32>> {
    for e in std::fs::read_dir("/proc")? {
        let e = e?;
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if matches!(comm.trim(), "mariadbd" | "mysqld") {
            return Ok(Some(pid));
        }
    }
    Ok(None)
}

/// Anonymous read-write mappings of at least `min_len` bytes (buffer pool
/// candidates), from `/proc/PID/maps` text: plain anonymous memory, and a
/// buffer pool in large pages (`--large-pages`: MariaDB's `MAP_HUGETLB`
/// mapping, `/anon_hugepage`, or MySQL's `SHM_HUGETLB` segment, `/SYSV...`).
pub fn anon_rw_mappings(maps: &str, min_len: u64) -> Vec<(u64, u64)> {
    maps.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let range = f.next()?;
            let perms = f.next()?;
            let path = f.nth(3);
            let anon = match path {
                None => true,
                Some(p) => p.starts_with("/anon_hugepage") || p.starts_with("/SYSV"),
            };
            if !perms.starts_with("rw") || !anon {
                return None;
            }
            let (a, b) = range.split_once('-')?;
            let (a, b) = (
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
            );
            (b > a && b - a >= min_len).then_some((a, b))
        })
        .collect()
}

/// `/proc/PID/pagemap` of one process (its memory is read with
/// `process_vm_readv`, see `sys::read_pieces`).
pub struct ProcMem {
    pagemap: File,
}

/// Most memory one pagemap read covers (64 MiB: 128 KiB of entries).
pub const WINDOW: u64 = 64 << 20;

/// The frames of a range of memory, a window at a time (see [`ProcMem::windows`]).
pub struct Windows<'a> {
    mem: &'a ProcMem,
    at: u64,
    end: u64,
    align: u64,
}

impl Iterator for Windows<'_> {
    /// A window's address and the frame of each of its 4 KiB pages.
    type Item = (u64, Vec<Option<u64>>);

    fn next(&mut self) -> Option<Self::Item> {
        let len = window_len(self.at, self.end, self.align);
        if len == 0 {
            return None;
        }
        let at = self.at;
        let pages = usize::try_from(len / 4096).expect("at most a window");
        // A window the pagemap cannot give (the mapping went away) ends the walk.
        self.at = self.end;
        let frames = self.mem.frames(at, pages).ok()?;
        self.at = at + len;
        Some((at, frames))
    }
}

/// Bytes of the next window from `at` (a multiple of `align`): whole
/// `align` units up to `end`, at most [`WINDOW`]; 0 when none fits (pure).
fn window_len(at: u64, end: u64, align: u64) -> u64 {
    end.saturating_sub(at).min(WINDOW) / align * align
}

impl ProcMem {
    /// Opens the pagemap (needs root for the frame numbers).
    pub fn open(pid: u32) -> io::Result<Self> {
        Ok(Self {
            pagemap: File::open(format!("/proc/{pid}/pagemap"))?,
        })
    }

    /// The frames of `[start, end)`, in windows of at most [`WINDOW`]
    /// bytes that start at multiples of `align` (a power of two from 4096
    /// to [`WINDOW`]) and hold whole units of it. The walk ends early at a
    /// window the pagemap cannot give.
    pub fn windows(&self, start: u64, end: u64, align: u64) -> Windows<'_> {
        let align = align.clamp(4096, WINDOW).next_power_of_two();
        Windows {
            mem: self,
            at: start.next_multiple_of(align),
            end,
            align,
        }
    }

    /// Physical page number of each 4 KiB page from `addr`; None where not present.
    pub fn frames(&self, addr: u64, pages: usize) -> io::Result<Vec<Option<u64>>> {
        let mut raw = vec![0u8; pages * 8];
        self.pagemap.read_exact_at(&mut raw, addr / 4096 * 8)?;
        Ok(raw
            .chunks_exact(8)
            .map(|e| {
                let v = u64::from_le_bytes(e.try_into().expect("8 bytes"));
                // Bit 63: present; bits 0-54: page frame number (0 without CAP_SYS_ADMIN).
                let pfn = v & ((1 << 55) - 1);
                (v >> 63 == 1 && pfn != 0).then_some(pfn)
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_hold_whole_aligned_units_up_to_the_end() {
        assert_eq!(window_len(0, 3 * WINDOW, 4096), WINDOW);
        assert_eq!(window_len(0, 20_000, 4096), 16_384);
        assert_eq!(window_len(0, 20_000, 16_384), 16_384);
        assert_eq!(window_len(16_384, 20_000, 16_384), 0);
        assert_eq!(window_len(30_000, 20_000, 4096), 0);
    }

    #[test]
    fn walks_this_process_memory_in_windows() {
        let mem = ProcMem::open(std::process::id()).unwrap();
        let buf = vec![1u8; 3 * 4096 + 100];
        let start = buf.as_ptr() as u64;
        let end = start + buf.len() as u64;
        let walked: Vec<_> = mem.windows(start, end, 4096).collect();
        assert_eq!(walked.len(), 1);
        let (at, frames) = &walked[0];
        assert_eq!(*at, start.next_multiple_of(4096));
        assert_eq!(frames.len() as u64, window_len(*at, end, 4096) / 4096);
        assert_eq!(mem.windows(end, end, 4096).count(), 0);
    }

    #[test]
    fn picks_large_anonymous_rw_mappings() {
        let maps = "\
55d0-55e0 r-xp 00000000 08:01 123 /usr/sbin/mariadbd
7f0000000000-7f0006000000 rw-p 00000000 00:00 0 
7f1000000000-7f1000001000 rw-p 00000000 00:00 0 
7f2000000000-7f2008000000 rw-s 00000000 00:05 9 /dev/shm/x
7f3000000000-7f3008000000 ---p 00000000 00:00 0 
7f4000000000-7f4008000000 rw-p 00000000 00:0f 5 /anon_hugepage (deleted)
7f5000000000-7f5008000000 rw-s 00000000 00:01 7 /SYSV00000000 (deleted)
";
        assert_eq!(
            anon_rw_mappings(maps, 1 << 20),
            vec![
                (0x7f00_0000_0000, 0x7f00_0600_0000),
                (0x7f40_0000_0000, 0x7f40_0800_0000),
                (0x7f50_0000_0000, 0x7f50_0800_0000)
            ]
        );
    }
}
