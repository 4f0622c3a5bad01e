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

/// Anonymous read-write mappings of at least `min_len` bytes (buffer pool candidates), from `/proc/PID/maps` text.
pub fn anon_rw_mappings(maps: &str, min_len: u64) -> Vec<(u64, u64)> {
    maps.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let range = f.next()?;
            let perms = f.next()?;
            let path = f.nth(3);
            if !perms.starts_with("rw") || path.is_some() {
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

impl ProcMem {
    /// Opens the pagemap (needs root for the frame numbers).
    pub fn open(pid: u32) -> io::Result<Self> {
        Ok(Self {
            pagemap: File::open(format!("/proc/{pid}/pagemap"))?,
        })
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
    fn picks_large_anonymous_rw_mappings() {
        let maps = "\
55d0-55e0 r-xp 00000000 08:01 123 /usr/sbin/mariadbd
7f0000000000-7f0006000000 rw-p 00000000 00:00 0 
7f1000000000-7f1000001000 rw-p 00000000 00:00 0 
7f2000000000-7f2008000000 rw-s 00000000 00:05 9 /dev/shm/x
7f3000000000-7f3008000000 ---p 00000000 00:00 0 
";
        assert_eq!(
            anon_rw_mappings(maps, 1 << 20),
            vec![(0x7f00_0000_0000, 0x7f00_0600_0000)]
        );
    }
}
