//! A VM's RAM as one or more files, one per memory backend (a guest with
//! NUMA nodes has one per node), seen as one run of pages: the pages of
//! file `i` follow those of file `i - 1`. Offsets here are in that run;
//! each operation on a byte range is split at the files' boundaries.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use super::RamError;
use crate::sys;
use crate::PAGE_SIZE_U64;

/// One RAM file as the VMM describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamFile {
    /// The file (a memory backend's `mem-path`).
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
}

/// One open RAM file and where its bytes sit in the run.
pub(crate) struct Segment {
    pub(crate) path: PathBuf,
    pub(crate) file: File,
    /// First byte in the run.
    start: u64,
    len: u64,
}

/// The open RAM files, in the run's order.
pub(crate) struct RamFiles {
    segs: Vec<Segment>,
}

impl RamFiles {
    /// Opens each file (read-write when `write`); each must be exactly the
    /// size the VMM says, a non-zero multiple of the page size.
    pub(crate) fn open(files: &[RamFile], write: bool) -> Result<Self, RamError> {
        let mut segs = Vec::with_capacity(files.len());
        let mut start = 0u64;
        for f in files {
            let file = OpenOptions::new()
                .read(true)
                .write(write)
                .open(&f.path)
                .map_err(|source| RamError::Open {
                    path: f.path.clone(),
                    source,
                })?;
            check_size(&f.path, &file, f.size)?;
            segs.push(Segment {
                path: f.path.clone(),
                file,
                start,
                len: f.size,
            });
            start = start.checked_add(f.size).ok_or(RamError::Size {
                path: f.path.clone(),
                actual: f.size,
                expected: u64::MAX - start,
            })?;
        }
        if segs.is_empty() {
            return Err(RamError::NoFiles);
        }
        Ok(Self { segs })
    }

    /// How many files.
    pub(crate) fn count(&self) -> usize {
        self.segs.len()
    }

    /// Each file's size, in the run's order.
    pub(crate) fn sizes(&self) -> Vec<u64> {
        self.segs.iter().map(|s| s.len).collect()
    }

    /// Each file with its length, for mapping them back to back.
    pub(crate) fn for_mapping(&self) -> Vec<(&File, usize)> {
        self.segs
            .iter()
            .map(|s| (&s.file, usize::try_from(s.len).unwrap_or(usize::MAX)))
            .collect()
    }

    /// The files' page size: 4 KiB on tmpfs, a huge page's on hugetlbfs.
    /// Files of different page sizes are refused: a page would not mean
    /// one thing across the run.
    pub(crate) fn page_bytes(&self) -> Result<u64, RamError> {
        let mut found: Option<(u64, &Path)> = None;
        for s in &self.segs {
            let p = dbmigrate_uffd::hugetlbfs_page_size(&s.file)
                .map_err(io_error(&s.path, "fstatfs"))?
                .unwrap_or(PAGE_SIZE_U64);
            match found {
                None => found = Some((p, &s.path)),
                Some((q, first)) if q != p => {
                    return Err(RamError::MixedPageSizes {
                        first: first.into(),
                        other: s.path.clone(),
                    })
                }
                Some(_) => {}
            }
        }
        Ok(found.map_or(PAGE_SIZE_U64, |(p, _)| p))
    }

    /// Calls `f(segment, offset in its file, length, offset in the run)`
    /// for each piece of `offset..offset + len`, in order; the first error
    /// is returned as `doing` on that file.
    pub(crate) fn each(
        &self,
        offset: u64,
        len: u64,
        doing: &'static str,
        mut f: impl FnMut(&Segment, u64, u64, u64) -> io::Result<()>,
    ) -> Result<(), RamError> {
        let end = offset.saturating_add(len);
        for s in &self.segs {
            let (a, b) = (offset.max(s.start), end.min(s.start + s.len));
            if a < b {
                f(s, a - s.start, b - a, a).map_err(io_error(&s.path, doing))?;
            }
        }
        Ok(())
    }

    /// Allocates every hole of `offset..offset + len` (mode 0 `fallocate`).
    pub(crate) fn allocate(
        &self,
        offset: u64,
        len: u64,
        doing: &'static str,
    ) -> Result<(), RamError> {
        self.each(offset, len, doing, |s, at, n, _| {
            sys::file::allocate_range(&s.file, at, n)
        })
    }

    /// Punches `offset..offset + len` out (it reads as zeros).
    pub(crate) fn punch(&self, offset: u64, len: u64, doing: &'static str) -> Result<(), RamError> {
        self.each(offset, len, doing, |s, at, n, _| {
            sys::file::punch_hole(&s.file, at, n)
        })
    }

    /// The file that holds byte `offset` of the run (the last one past the end).
    pub(crate) fn path_at(&self, offset: u64) -> &Path {
        self.segs
            .iter()
            .find(|s| offset < s.start + s.len)
            .unwrap_or(&self.segs[self.segs.len() - 1])
            .path
            .as_path()
    }

    /// The `i`th file (the last one past the end); file 0 names the RAM
    /// as a whole in errors.
    pub(crate) fn path(&self, i: usize) -> &Path {
        &self.segs[i.min(self.segs.len() - 1)].path
    }

    /// Byte ranges of the run that hold data (holes read as zeros).
    pub(crate) fn data_extents(&self) -> Result<Vec<(u64, u64)>, RamError> {
        let mut out = Vec::new();
        for s in &self.segs {
            let ext =
                sys::file::data_extents(&s.file, s.len).map_err(io_error(&s.path, "SEEK_DATA"))?;
            out.extend(ext.into_iter().map(|(a, b)| (s.start + a, s.start + b)));
        }
        Ok(out)
    }

    /// Descriptors of their own for the same files.
    pub(crate) fn try_clone(&self) -> Result<Self, RamError> {
        let segs = self
            .segs
            .iter()
            .map(|s| {
                Ok(Segment {
                    path: s.path.clone(),
                    file: s
                        .file
                        .try_clone()
                        .map_err(io_error(&s.path, "duplicating the descriptor"))?,
                    start: s.start,
                    len: s.len,
                })
            })
            .collect::<Result<_, RamError>>()?;
        Ok(Self { segs })
    }
}

fn check_size(path: &Path, file: &File, expected: u64) -> Result<(), RamError> {
    let actual = file.metadata().map_err(io_error(path, "stat"))?.len();
    if actual != expected
        || expected % PAGE_SIZE_U64 != 0
        || expected == 0
        || usize::try_from(expected).is_err()
    {
        return Err(RamError::Size {
            path: path.into(),
            actual,
            expected,
        });
    }
    Ok(())
}

/// Maps an I/O error met `doing` something on the RAM file at `path`.
pub(crate) fn io_error<'a>(
    path: &'a Path,
    doing: &'static str,
) -> impl FnOnce(io::Error) -> RamError + 'a {
    move |source| RamError::Io {
        path: path.into(),
        doing,
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, pages: u64) -> RamFile {
        let path = std::env::temp_dir().join(format!(
            "dbmigrate-files-test-{}-{name}",
            std::process::id()
        ));
        let f = File::create(&path).unwrap();
        f.set_len(pages * PAGE_SIZE_U64).unwrap();
        RamFile {
            size: pages * PAGE_SIZE_U64,
            path,
        }
    }

    #[test]
    fn a_range_is_split_at_the_files_boundaries() {
        let specs = [file("a", 3), file("b", 5)];
        let files = RamFiles::open(&specs, false).unwrap();
        assert_eq!(files.count(), 2);
        let mut pieces = Vec::new();
        files
            .each(
                2 * PAGE_SIZE_U64,
                3 * PAGE_SIZE_U64,
                "test",
                |s, fo, l, ro| {
                    pieces.push((s.path.clone(), fo, l, ro));
                    Ok(())
                },
            )
            .unwrap();
        let p = PAGE_SIZE_U64;
        assert_eq!(
            pieces,
            vec![
                (specs[0].path.clone(), 2 * p, p, 2 * p),
                (specs[1].path.clone(), 0, 2 * p, 3 * p),
            ]
        );
        // An error names the file it came from.
        let err = files
            .each(0, 8 * p, "testing", |s, _, _, _| {
                if s.path == specs[1].path {
                    Err(io::Error::other("no"))
                } else {
                    Ok(())
                }
            })
            .unwrap_err();
        assert!(err.to_string().contains("-b"), "{err}");
        for s in specs {
            std::fs::remove_file(s.path).unwrap();
        }
    }

    #[test]
    fn a_file_of_another_size_or_none_at_all_is_refused() {
        let a = file("c", 2);
        let wrong = RamFile {
            size: 3 * PAGE_SIZE_U64,
            ..a.clone()
        };
        assert!(matches!(
            RamFiles::open(&[wrong], false),
            Err(RamError::Size { .. })
        ));
        assert!(matches!(RamFiles::open(&[], false), Err(RamError::NoFiles)));
        std::fs::remove_file(a.path).unwrap();
    }
}
