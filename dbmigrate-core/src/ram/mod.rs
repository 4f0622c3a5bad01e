//! Views of a VM's RAM files: read-only on the source, writable on the destination.
//!
//! Guest RAM lives in shared files (tmpfs or hugetlbfs) that the VMM maps,
//! one per memory backend ([`files`]). Offsets here are offsets in the run
//! of those files mapped back to back; translating guest-physical
//! addresses is the VMM integration's job.

use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::bitmap::PageBitmap;
use crate::sys;

mod files;
mod hugetlb;
mod prealloc;
use crate::{PAGE_SIZE, PAGE_SIZE_U64};
pub use files::RamFile;
use files::{io_error, RamFiles};

/// Errors opening or using a RAM file.
#[derive(Debug, Error)]
pub enum RamError {
    /// The file could not be opened.
    #[error("cannot open RAM file {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The file size is not what the VMM says.
    #[error("RAM file {path} has {actual} bytes, expected {expected}: is this the memory backend of that VM?")]
    Size {
        /// The file.
        path: PathBuf,
        /// Size on disk.
        actual: u64,
        /// Size expected.
        expected: u64,
    },
    /// Mapping or extent lookup failed.
    #[error("{doing} on RAM file {path} failed")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was done.
        doing: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// No RAM file was named.
    #[error("no RAM file to open: the VMM names none (is its RAM a memory-backend-file?)")]
    NoFiles,
    /// The RAM files have different page sizes.
    #[error("RAM files {first} and {other} have different page sizes (one on hugetlbfs, one not?): give every memory backend of the VM the same kind of file")]
    MixedPageSizes {
        /// The first file.
        first: PathBuf,
        /// A file whose page size differs from the first's.
        other: PathBuf,
    },
    /// A page index beyond the RAM.
    #[error("page {page} is beyond the {pages} pages of RAM")]
    OutOfRange {
        /// The page.
        page: u64,
        /// RAM pages.
        pages: u64,
    },
}

/// The mapped RAM files; [`SourceRam`] maps them read-only, [`DestRam`]
/// read-write with what the destination did to them (`W`).
pub struct Ram<M, W = ()> {
    files: RamFiles,
    map: M,
    writer: W,
}

/// The destination's state of its RAM file.
pub struct DestWriter {
    prepared: Prepared,
    /// Writes go through the mapping (only while every page is allocated,
    /// or its chunk is once allocated in the background, and the guest
    /// cannot fault on one being written). Not read on hugetlbfs, which
    /// has no `write(2)`: there every write goes through the mapping.
    through_map: bool,
    /// The threads allocating the RAM while pages arrive: a page goes
    /// through the mapping only once they are done with it.
    background: Option<prealloc::Background>,
    /// The RAM file's page size: 4 KiB on tmpfs, 2 MiB (or 1 GiB) on
    /// hugetlbfs, which has no `write(2)`, punches holes only in whole
    /// pages and zeroes the rest of a partial punch.
    file_page: u64,
}

/// What the destination has done to its RAM file before pages arrive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prepared {
    /// Nothing: the file may hold anything.
    No,
    /// Every page reads as zero; pages are holes until written.
    Zeroed,
    /// Every page reads as zero and is allocated, or being allocated in
    /// the background ([`Ram::zero_and_allocate_in_background`]).
    ZeroedAllocated,
}

/// The source's read-only view of guest RAM.
pub type SourceRam = Ram<sys::mmap::ReadMap>;
/// The destination's writable view of guest RAM.
pub type DestRam = Ram<sys::mmap::SharedMap, DestWriter>;

impl<M: std::ops::Deref<Target = [u8]>, W> Ram<M, W> {
    /// Number of pages.
    pub fn pages(&self) -> u64 {
        self.map.len() as u64 / PAGE_SIZE_U64
    }

    /// Size in bytes.
    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }

    /// True for an empty RAM (never, once opened).
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The bytes of `page`.
    pub fn page(&self, page: u64) -> Result<&[u8], RamError> {
        let pages = self.pages();
        if page >= pages {
            return Err(RamError::OutOfRange { page, pages });
        }
        let start = usize::try_from(page).expect("below pages") * PAGE_SIZE;
        Ok(&self.map[start..start + PAGE_SIZE])
    }

    /// Pages that hold data; never-touched RAM is a hole and is skipped without reading it.
    pub fn data_pages(&self) -> Result<PageBitmap, RamError> {
        let mut bm = PageBitmap::new(self.pages());
        for (s, e) in self.files.data_extents()? {
            bm.set_range(s / PAGE_SIZE_U64, e.div_ceil(PAGE_SIZE_U64));
        }
        Ok(bm)
    }

    /// How many files the RAM is made of (one per memory backend).
    pub fn file_count(&self) -> usize {
        self.files.count()
    }

    /// Each file's size, in the order their pages follow each other.
    pub fn file_sizes(&self) -> Vec<u64> {
        self.files.sizes()
    }

    /// The whole mapping.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }
}

impl Ram<sys::mmap::ReadMap, ()> {
    /// Maps `path` read-only; it must be exactly `size` bytes.
    pub fn open(path: &Path, size: u64) -> Result<Self, RamError> {
        Self::open_files(&[RamFile {
            path: path.into(),
            size,
        }])
    }

    /// Maps `files` read-only, back to back; each must be exactly its size.
    pub fn open_files(files: &[RamFile]) -> Result<Self, RamError> {
        let files = RamFiles::open(files, false)?;
        let align = usize::try_from(files.page_bytes()?).unwrap_or(PAGE_SIZE);
        let map = sys::mmap::ReadMap::map(&files.for_mapping(), align)
            .map_err(|(i, e)| io_error(files.path(i), "mmap")(e))?;
        Ok(Self {
            files,
            map,
            writer: (),
        })
    }

    /// True if the RAM files are on hugetlbfs (their writes are tracked a
    /// huge page at a time); false if that cannot be told.
    pub fn huge_pages(&self) -> bool {
        self.files.page_bytes().is_ok_and(|p| p > PAGE_SIZE_U64)
    }
}

impl Ram<sys::mmap::SharedMap, DestWriter> {
    /// Maps `path` read-write; it must already be exactly `size` bytes (created by the VMM).
    pub fn open(path: &Path, size: u64) -> Result<Self, RamError> {
        Self::open_files(&[RamFile {
            path: path.into(),
            size,
        }])
    }

    /// Maps `files` read-write, back to back; each must already be exactly
    /// its size (created by the VMM).
    pub fn open_files(files: &[RamFile]) -> Result<Self, RamError> {
        let files = RamFiles::open(files, true)?;
        let file_page = files.page_bytes()?;
        let align = usize::try_from(file_page).unwrap_or(PAGE_SIZE);
        let map = sys::mmap::SharedMap::map(&files.for_mapping(), align)
            .map_err(|(i, e)| io_error(files.path(i), "mmap")(e))?;
        Ok(Self {
            files,
            map,
            writer: DestWriter {
                prepared: Prepared::No,
                through_map: false,
                background: None,
                file_page,
            },
        })
    }

    /// The RAM file's page size in bytes (4 KiB, or a huge page's on hugetlbfs).
    pub fn file_page_bytes(&self) -> u64 {
        self.writer.file_page
    }

    /// True if the RAM file's pages are larger than 4 KiB (hugetlbfs).
    pub fn huge_pages(&self) -> bool {
        self.writer.file_page > PAGE_SIZE_U64
    }

    /// Makes every page read as zero without truncating the file (the VMM has
    /// it mapped), so that zero pages never need to be sent.
    pub fn zero_all(&mut self) -> Result<(), RamError> {
        self.stop_allocating()?;
        self.files
            .punch(0, self.len(), "punching holes (fallocate)")?;
        self.writer.prepared = Prepared::Zeroed;
        self.writer.through_map = false;
        Ok(())
    }

    /// Like [`Self::zero_all`], then allocates and faults in every page,
    /// so that pages written during the migration overwrite memory that is
    /// already there, through the mapping. On this project's test host (a
    /// nested VM whose host lends memory page by page) the first touch of
    /// a page costs far more than the copy: the destination's rebuild
    /// spent a quarter of both cores clearing and filling fresh pages.
    /// Done before the source connects, it also makes a host short of
    /// memory fail before the migration starts, not halfway. On tmpfs
    /// post-copy punches the pages it still waits for at the switch
    /// ([`Self::zero_pages`]) and writes through the file from then on
    /// ([`Self::write_through_file`]); on hugetlbfs it punches nothing
    /// (the guest sees a huge page only when the fault server maps it).
    pub fn zero_and_allocate(&mut self) -> Result<(), RamError> {
        self.zero_all()?;
        self.allocate_all("allocating the guest's RAM (fallocate; is the RAM filesystem, e.g. /dev/shm, big enough for the guest?)")?;
        let len = self.map.len();
        self.map
            .populator()
            .populate_write(0, len)
            .map_err(io_error(
                self.files.path(0),
                "faulting in the guest's RAM (MADV_POPULATE_WRITE)",
            ))?;
        self.writer.prepared = Prepared::ZeroedAllocated;
        self.writer.through_map = true;
        Ok(())
    }

    /// Like [`Self::zero_and_allocate`], but only the zeroing is done
    /// before returning: `threads` threads allocate and touch the RAM 2 MiB
    /// at a time while pages arrive (see the `prealloc` module), so the
    /// destination need not wait for it. A page is written through the
    /// mapping once its chunk is done, through the file before.
    /// [`Self::stop_allocating`] ends it and says whether it failed.
    ///
    /// On hugetlbfs (no `write(2)`) every page goes through the mapping:
    /// one written before the threads reach it is allocated by that write,
    /// and the threads then find it there (allocating never clears a page
    /// the file holds).
    pub fn zero_and_allocate_in_background(&mut self, threads: usize) -> Result<(), RamError> {
        self.zero_all()?;
        let files = self.files.try_clone()?;
        let bg = prealloc::Background::start(files, self.map.populator(), self.map.len(), threads)
            .map_err(io_error(
                self.files.path(0),
                "starting the threads that allocate the guest's RAM",
            ))?;
        self.writer.background = Some(bg);
        self.writer.prepared = Prepared::ZeroedAllocated;
        self.writer.through_map = true;
        Ok(())
    }

    /// Stops a background allocation, if one runs, and waits for its
    /// threads (each finishes the 2 MiB in hand). The chunks it did not
    /// reach are allocated when first written. An error if it failed.
    pub fn stop_allocating(&mut self) -> Result<(), RamError> {
        let Some(bg) = self.writer.background.take() else {
            return Ok(());
        };
        bg.stop()
    }

    /// Post-copy's switch: from now on writes go through the file: a
    /// running guest may fault on a punched page, and a full-page write
    /// through the file shows it the page only once written, where a store
    /// through our mapping would first map a zeroed page. Stops a
    /// background allocation first: it would fill the holes about to be
    /// punched.
    ///
    /// On hugetlbfs (no `write(2)`) writes stay on the mapping: there a
    /// huge page becomes the guest's only when the fault server maps it
    /// whole (minor faults), and what a background allocation had not
    /// reached is allocated now, outside the guest's faults.
    pub fn write_through_file(&mut self) -> Result<(), RamError> {
        let unfinished = self.writer.background.is_some();
        self.stop_allocating()?;
        if self.huge_pages() && unfinished {
            self.allocate_all(
                "allocating the rest of the guest's RAM (fallocate; are enough huge pages reserved?)",
            )?;
        }
        self.writer.through_map = false;
        Ok(())
    }

    /// What was done to the file since it was opened.
    pub fn prepared(&self) -> Prepared {
        self.writer.prepared
    }

    /// Makes `count` pages from `page` read as zero by punching them out.
    /// On hugetlbfs they are cleared through the mapping instead: a huge
    /// page punched whole would be gone from the file, and a guest that
    /// touched it would get a fresh zero page without a fault, even where
    /// post-copy still owes it a page.
    pub fn zero_pages(&mut self, page: u64, count: u64) -> Result<(), RamError> {
        let pages = self.pages();
        if page.checked_add(count).is_none_or(|end| end > pages) {
            return Err(RamError::OutOfRange { page, pages });
        }
        if self.huge_pages() {
            let at = usize::try_from(page).expect("below pages") * PAGE_SIZE;
            let n = usize::try_from(count).expect("below pages") * PAGE_SIZE;
            self.ensure_allocated(at, n)?;
            self.map[at..at + n].fill(0);
            return Ok(());
        }
        self.files.punch(
            page * PAGE_SIZE_U64,
            count * PAGE_SIZE_U64,
            "punching a zero page (fallocate)",
        )
    }

    /// Writes whole pages starting at `page`. Into allocated RAM
    /// ([`Self::zero_and_allocate`], or a chunk that
    /// [`Self::zero_and_allocate_in_background`] has reached) through the
    /// mapping, a plain copy;
    /// otherwise through the file: a full-page write to a tmpfs hole
    /// allocates the page without zeroing it first, where a store through
    /// the mapping faults, zeroes the page and then copies. On hugetlbfs
    /// always through the mapping, the huge pages allocated first.
    pub fn write_pages(&mut self, page: u64, data: &[u8]) -> Result<(), RamError> {
        let pages = self.pages();
        let count = (data.len() / PAGE_SIZE) as u64;
        if data.len() % PAGE_SIZE != 0 || page.checked_add(count).is_none_or(|end| end > pages) {
            return Err(RamError::OutOfRange { page, pages });
        }
        let at = usize::try_from(page).expect("below pages") * PAGE_SIZE;
        if self.huge_pages() {
            self.ensure_allocated(at, data.len())?;
            self.map[at..at + data.len()].copy_from_slice(data);
            return Ok(());
        }
        if self.writer.through_map && self.allocated(at, data.len())? {
            self.map[at..at + data.len()].copy_from_slice(data);
            return Ok(());
        }
        use std::os::unix::fs::FileExt;
        let start = page * PAGE_SIZE_U64;
        self.files.each(
            start,
            data.len() as u64,
            "writing pages",
            |s, at, n, from| {
                let i = usize::try_from(from - start).expect("inside data");
                let n = usize::try_from(n).expect("inside data");
                s.file.write_all_at(&data[i..i + n], at)
            },
        )
    }
}

impl DestRam {
    /// Allocates every hole of every file (mode 0 `fallocate`).
    fn allocate_all(&self, doing: &'static str) -> Result<(), RamError> {
        self.files.allocate(0, self.len(), doing)
    }

    /// True if `offset..offset+len` is allocated: always, unless a
    /// background allocation has not reached it yet. Its failure is
    /// returned at once.
    fn allocated(&mut self, offset: usize, len: usize) -> Result<bool, RamError> {
        match &self.writer.background {
            None => Ok(true),
            Some(bg) if bg.failed() => self.stop_allocating().map(|()| false),
            Some(bg) => Ok(bg.covers(offset, len)),
        }
    }
}

/// True if every byte of `page` is zero.
pub fn is_zero(page: &[u8]) -> bool {
    // OR-folding fixed 64-byte blocks lets the compiler vectorise the inner
    // loop while still stopping at the first non-zero block.
    let blocks = page.chunks_exact(64);
    let tail = blocks.remainder();
    blocks
        .into_iter()
        .all(|b| b.iter().fold(0u8, |acc, &x| acc | x) == 0)
        && tail.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::{File, OpenOptions};
    use std::io::Write;

    fn temp_file(size: u64) -> (PathBuf, File) {
        temp_file_in(&std::env::temp_dir(), size)
    }

    fn temp_file_in(dir: &Path, size: u64) -> (PathBuf, File) {
        let path = dir.join(format!(
            "dbmigrate-ram-test-{}-{}",
            std::process::id(),
            size
        ));
        let f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        f.set_len(size).unwrap();
        (path, f)
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 4096]));
        let mut p = [0u8; 4096];
        p[4095] = 1;
        assert!(!is_zero(&p));
        p[4095] = 0;
        p[0] = 1;
        assert!(!is_zero(&p));
    }

    #[test]
    fn size_mismatch_is_a_clear_error() {
        let (path, _f) = temp_file(8192);
        let err = SourceRam::open(&path, 4096).err().unwrap();
        assert!(err.to_string().contains("8192"), "{err}");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn holes_are_skipped_and_writes_land() {
        let size = 64 * PAGE_SIZE_U64;
        let (path, mut f) = temp_file(size);
        use std::io::{Seek, SeekFrom};
        f.seek(SeekFrom::Start(10 * PAGE_SIZE_U64)).unwrap();
        f.write_all(&[7u8; PAGE_SIZE]).unwrap();
        f.sync_all().unwrap();
        let src = SourceRam::open(&path, size).unwrap();
        let data = src.data_pages().unwrap();
        assert!(data.get(10));
        assert_eq!(src.page(10).unwrap()[0], 7);
        assert!(src.page(64).is_err());

        let mut dst = DestRam::open(&path, size).unwrap();
        dst.write_pages(20, &[9u8; PAGE_SIZE]).unwrap();
        assert!(dst
            .write_pages(size / PAGE_SIZE_U64, &[0u8; PAGE_SIZE])
            .is_err());
        dst.zero_pages(20, 1).unwrap();
        assert!(is_zero(src.page(20).unwrap()));
        dst.write_pages(20, &[9u8; PAGE_SIZE]).unwrap();
        assert!(dst.write_pages(0, &[0u8; 100]).is_err());
        assert_eq!(src.page(20).unwrap()[0], 9, "shared mapping sees the write");
        dst.zero_all().unwrap();
        assert!(is_zero(src.page(10).unwrap()));
        assert_eq!(dst.len(), size);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn two_files_are_one_run_of_pages() {
        // A guest with two memory backends: 3 pages, then 5, on tmpfs.
        let dir = Path::new("/dev/shm");
        let (a, _fa) = temp_file_in(dir, 3 * PAGE_SIZE_U64);
        let (b, fb) = temp_file_in(dir, 5 * PAGE_SIZE_U64);
        let files = [
            RamFile {
                path: a.clone(),
                size: 3 * PAGE_SIZE_U64,
            },
            RamFile {
                path: b.clone(),
                size: 5 * PAGE_SIZE_U64,
            },
        ];
        let src = SourceRam::open_files(&files).unwrap();
        let mut dst = DestRam::open_files(&files).unwrap();
        assert_eq!((src.pages(), src.file_count()), (8, 2));
        // Pages 2 and 3 straddle the files: through the files, then
        // through the mapping once allocated.
        dst.write_pages(2, &[4u8; 2 * PAGE_SIZE]).unwrap();
        assert_eq!((src.page(2).unwrap()[0], src.page(3).unwrap()[9]), (4, 4));
        use std::os::unix::fs::FileExt;
        let mut back = [0u8; PAGE_SIZE];
        fb.read_exact_at(&mut back, 0).unwrap();
        assert!(
            back.iter().all(|&x| x == 4),
            "page 3 is the second file's page 0"
        );
        let data = src.data_pages().unwrap();
        assert_eq!(data.iter().collect::<Vec<_>>(), vec![2, 3]);
        dst.zero_pages(2, 2).unwrap();
        assert!(is_zero(src.page(3).unwrap()));
        dst.zero_and_allocate().unwrap();
        assert_eq!(dst.data_pages().unwrap().count(), 8);
        dst.write_pages(1, &[6u8; 4 * PAGE_SIZE]).unwrap();
        assert!((1..5).all(|p| src.page(p).unwrap().iter().all(|&x| x == 6)));
        assert!(is_zero(src.page(5).unwrap()) && is_zero(src.page(0).unwrap()));
        drop((src, dst));
        std::fs::remove_file(a).unwrap();
        std::fs::remove_file(b).unwrap();
    }

    #[test]
    fn zero_and_allocate_clears_old_data_and_leaves_no_hole() {
        // On tmpfs, as guest RAM is: there an allocated page is data to
        // SEEK_DATA (ext4 reports unwritten extents as holes).
        let size = 32 * PAGE_SIZE_U64;
        let (path, mut f) = temp_file_in(Path::new("/dev/shm"), size);
        use std::io::{Seek, SeekFrom};
        f.seek(SeekFrom::Start(3 * PAGE_SIZE_U64)).unwrap();
        f.write_all(&[5u8; PAGE_SIZE]).unwrap();
        f.sync_all().unwrap();
        let mut dst = DestRam::open(&path, size).unwrap();
        assert_eq!(dst.prepared(), Prepared::No);
        dst.zero_and_allocate().unwrap();
        assert_eq!(dst.prepared(), Prepared::ZeroedAllocated);
        assert!(dst.bytes().iter().all(|&b| b == 0), "old data must be gone");
        let data = dst.data_pages().unwrap();
        assert_eq!(data.count(), 32, "every page allocated");
        assert_eq!(dst.len(), size, "size kept");
        // Writes land, through the mapping, and read back through the file.
        dst.write_pages(7, &[8u8; 2 * PAGE_SIZE]).unwrap();
        let mut back = vec![0u8; 2 * PAGE_SIZE];
        use std::os::unix::fs::FileExt;
        f.read_exact_at(&mut back, 7 * PAGE_SIZE_U64).unwrap();
        assert!(back.iter().all(|&b| b == 8));
        // Post-copy's switch: punched pages are holes, and a write through
        // the file fills exactly the page written.
        dst.write_through_file().unwrap();
        dst.zero_pages(12, 4).unwrap();
        let data = dst.data_pages().unwrap();
        assert!(!data.get(12) && !data.get(15) && data.get(16));
        dst.write_pages(13, &[6u8; PAGE_SIZE]).unwrap();
        let data = dst.data_pages().unwrap();
        assert!(!data.get(12) && data.get(13) && !data.get(14));
        assert_eq!(dst.page(13).unwrap()[100], 6);
        dst.zero_all().unwrap();
        assert_eq!(dst.prepared(), Prepared::Zeroed);
        assert_eq!(dst.data_pages().unwrap().count(), 0, "holes again");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn background_allocation_keeps_every_write_and_fills_the_rest() {
        // 8 chunks on tmpfs; pages written while the threads run land
        // through whichever path their chunk allows, and none is lost.
        let size = 8 * prealloc::CHUNK_BYTES as u64;
        let (path, mut f) = temp_file_in(Path::new("/dev/shm"), size);
        use std::io::{Seek, SeekFrom};
        f.seek(SeekFrom::Start(9 * PAGE_SIZE_U64)).unwrap();
        f.write_all(&[5u8; PAGE_SIZE]).unwrap();
        let mut dst = DestRam::open(&path, size).unwrap();
        dst.zero_and_allocate_in_background(2).unwrap();
        assert_eq!(dst.prepared(), Prepared::ZeroedAllocated);
        let pages = size / PAGE_SIZE_U64;
        let written: Vec<u64> = (0..pages).step_by(97).collect();
        for &p in &written {
            dst.write_pages(p, &[(p % 251) as u8 + 1; PAGE_SIZE])
                .unwrap();
        }
        let t = std::time::Instant::now();
        while dst.data_pages().unwrap().count() < pages {
            assert!(t.elapsed().as_secs() < 30, "the allocation never finished");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        // Written again once every chunk is done: through the mapping.
        dst.write_pages(1, &[7u8; PAGE_SIZE]).unwrap();
        dst.stop_allocating().unwrap();
        for p in 0..pages {
            let want = match p {
                1 => 7,
                p if written.contains(&p) => (p % 251) as u8 + 1,
                _ => 0,
            };
            assert!(dst.page(p).unwrap().iter().all(|&b| b == want), "page {p}");
        }
        std::fs::remove_file(path).unwrap();
    }
}
