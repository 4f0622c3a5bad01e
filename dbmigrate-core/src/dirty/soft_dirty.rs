//! Soft-dirty tracking: `/proc/PID/clear_refs` + pagemap bit 55.
//!
//! Reading the bits and clearing them are two separate calls, and no order
//! of the two is lossless while the process runs:
//! - read, then clear: a write between the two sets a bit that the clear
//!   erases unreported; if that page was clean at the read, its new content
//!   is never sent;
//! - clear, then read: the same for writes between the previous round's
//!   read and this clear.
//!
//! Reading again or carrying bits into the next round cannot bring back a
//! bit that `clear_refs` erased, and the final round running with the VM
//! paused only makes the *last* collect exact. So the process is frozen
//! (SIGSTOP, as CRIU does for its pre-dumps) for the read-and-clear, which
//! takes a few milliseconds; page contents are copied afterwards with the
//! process running again, which is safe because every write after the clear
//! sets the bit again. If the agent dies inside that window the process
//! stays stopped (`kill -CONT PID` resumes it).
//!
//! Known limit: a shmem page written and then reclaimed to swap loses its
//! soft-dirty bit with its page-table entry; the switchover digest check
//! catches the resulting difference.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;

use super::{DirtyError, DirtyTracker, TrackedRange, TrackerKind};
use crate::bitmap::PageBitmap;
use crate::sys;

const SOFT_DIRTY_BIT: u64 = 1 << 55;

/// Tracks a range of another process with soft-dirty bits.
pub struct SoftDirtyTracker {
    range: TrackedRange,
    pagemap: File,
    buf: Vec<u8>,
}

impl SoftDirtyTracker {
    /// Opens the tracker if this kernel has working soft-dirty bits.
    pub fn open(range: TrackedRange) -> Result<Self, DirtyError> {
        self_test()?;
        let pagemap = File::open(format!("/proc/{}/pagemap", range.pid)).map_err(|source| {
            DirtyError::Proc {
                pid: range.pid,
                doing: "open /proc/PID/pagemap",
                source,
            }
        })?;
        Ok(Self {
            range,
            pagemap,
            buf: Vec::new(),
        })
    }

    fn clear_refs(&self) -> Result<(), DirtyError> {
        clear_refs(self.range.pid)
    }

    fn frozen<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, DirtyError>,
    ) -> Result<T, DirtyError> {
        let pid = self.range.pid;
        sys::process::freeze(pid).map_err(|source| DirtyError::Proc {
            pid,
            doing: "stop the process for a soft-dirty scan",
            source,
        })?;
        let r = f(self);
        sys::process::thaw(pid).map_err(|source| DirtyError::Proc {
            pid,
            doing: "continue the process after a soft-dirty scan",
            source,
        })?;
        r
    }
}

fn clear_refs(pid: u32) -> Result<(), DirtyError> {
    OpenOptions::new()
        .write(true)
        .open(format!("/proc/{pid}/clear_refs"))
        .and_then(|mut f| f.write_all(b"4"))
        .map_err(|source| DirtyError::Proc {
            pid,
            doing: "write /proc/PID/clear_refs",
            source,
        })
}

/// Marks pages whose pagemap entry (8 bytes each, from `first_page`) has the soft-dirty bit.
fn mark_soft_dirty(entries: &[u8], dirty: &mut PageBitmap) -> u64 {
    let mut n = 0;
    for (i, e) in entries.chunks_exact(8).enumerate() {
        let v = u64::from_le_bytes(e.try_into().expect("8-byte chunk"));
        if v & SOFT_DIRTY_BIT != 0 {
            dirty.set(i as u64);
            n += 1;
        }
    }
    n
}

fn read_entries(
    pagemap: &File,
    pid: u32,
    start: u64,
    end: u64,
    buf: &mut Vec<u8>,
) -> Result<(), DirtyError> {
    let pages = usize::try_from((end - start) / 4096).expect("range fits in memory");
    buf.resize(pages * 8, 0);
    pagemap
        .read_exact_at(buf, start / 4096 * 8)
        .map_err(|source| DirtyError::Proc {
            pid,
            doing: "read /proc/PID/pagemap",
            source,
        })
}

impl DirtyTracker for SoftDirtyTracker {
    fn kind(&self) -> TrackerKind {
        TrackerKind::SoftDirty
    }

    fn reset(&mut self) -> Result<(), DirtyError> {
        self.clear_refs()
    }

    fn collect(&mut self, dirty: &mut PageBitmap) -> Result<u64, DirtyError> {
        self.frozen(|t| {
            let mut buf = std::mem::take(&mut t.buf);
            read_entries(
                &t.pagemap,
                t.range.pid,
                t.range.start,
                t.range.end,
                &mut buf,
            )?;
            t.clear_refs()?;
            let n = mark_soft_dirty(&buf, dirty);
            t.buf = buf;
            Ok(n)
        })
    }
}

/// Checks on our own memory that clear_refs clears and a write sets bit 55.
pub(super) fn self_test() -> Result<(), DirtyError> {
    let pid = std::process::id();
    let mem = sys::mmap::TestMapping::new(4).map_err(|source| DirtyError::Proc {
        pid,
        doing: "map test memory",
        source,
    })?;
    for p in 0..4 {
        mem.write_page(p);
    }
    clear_refs(pid)?;
    mem.write_page(1);
    let pagemap = File::open("/proc/self/pagemap").map_err(|source| DirtyError::Proc {
        pid,
        doing: "open /proc/self/pagemap",
        source,
    })?;
    let mut buf = Vec::new();
    read_entries(&pagemap, pid, mem.addr(), mem.addr() + mem.len(), &mut buf)?;
    let mut bm = PageBitmap::new(4);
    mark_soft_dirty(&buf, &mut bm);
    if bm.iter().collect::<Vec<_>>() == vec![1] {
        Ok(())
    } else {
        Err(DirtyError::SoftDirtyUnsupported)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_55_marks_pages() {
        let mut entries = vec![0u8; 8 * 4];
        entries[8..16].copy_from_slice(&(SOFT_DIRTY_BIT | 0x1234).to_le_bytes());
        entries[24..32].copy_from_slice(&SOFT_DIRTY_BIT.to_le_bytes());
        let mut bm = PageBitmap::new(4);
        assert_eq!(mark_soft_dirty(&entries, &mut bm), 2);
        assert_eq!(bm.iter().collect::<Vec<_>>(), vec![1, 3]);
    }

    #[test]
    fn support_detection_is_consistent() {
        // On a kernel with soft-dirty the self-test passes; without it, opening fails clearly.
        let supported = self_test().is_ok();
        let r = SoftDirtyTracker::open(TrackedRange {
            pid: std::process::id(),
            start: 0,
            end: 4096,
        });
        assert_eq!(r.is_ok(), supported);
        if let Err(e) = r {
            assert!(e.to_string().contains("soft-dirty"), "{e}");
        }
    }
}
