//! Disks as files or block devices of this host.

use crate::addr::DiskOffset;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{Storage, StorageError};

/// Disks as files or block devices of this host (an NBD-attached device, an image on a shared mount).
pub struct FileStorage {
    files: Vec<File>,
    sizes: Vec<u64>,
}

impl FileStorage {
    /// Opens each path read-only.
    pub fn open(paths: &[&Path]) -> Result<Self, StorageError> {
        let mut files = Vec::new();
        let mut sizes = Vec::new();
        for p in paths {
            let f = File::open(p).map_err(|source| StorageError::Open {
                path: p.to_path_buf(),
                source,
            })?;
            // Block devices report size 0 in metadata; seeking to the end works for both.
            let size = {
                use std::io::Seek;
                let mut g = &f;
                g.seek(io::SeekFrom::End(0))
                    .map_err(|source| StorageError::Open {
                        path: p.to_path_buf(),
                        source,
                    })?
            };
            files.push(f);
            sizes.push(size);
        }
        Ok(Self { files, sizes })
    }
}

impl Storage for FileStorage {
    fn disk_sizes(&self) -> &[u64] {
        &self.sizes
    }

    fn read_at(&self, disk: u16, offset: DiskOffset, buf: &mut [u8]) -> Result<(), StorageError> {
        let f = self
            .files
            .get(usize::from(disk))
            .ok_or_else(|| StorageError::no_such_disk(disk, offset, buf.len()))?;
        f.read_exact_at(buf, offset.0)
            .map_err(|source| StorageError::Read {
                disk,
                offset,
                len: buf.len(),
                source,
            })
    }
}
