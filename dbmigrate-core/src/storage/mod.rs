//! Shared storage as the destination reads it: the [`Storage`] interface
//! and its backends, one module each (a new backend goes beside them):
//! [`file`] (disks as files or block devices of this host) and [`nbd`]
//! (an NBD server, as `qemu-nbd` serves the VM's disks to the QEMUs).

pub mod file;
pub mod nbd;

use crate::addr::DiskOffset;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

pub use file::FileStorage;
pub use nbd::{NbdError, NbdStorage};

/// Storage errors.
#[derive(Debug, Error)]
pub enum StorageError {
    /// A disk could not be opened.
    #[error("cannot open shared disk {path}")]
    Open {
        /// The disk.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The disk is an image whose bytes are not the guest's at their offsets.
    #[error("shared disk {path} is a {format} image: dbmigrate reads the guest's disk bytes at their offsets, which it does not hold. Give a raw view of it: a block device or raw file, or an NBD export (`qemu-nbd --read-only --persistent --shared=0 --format=qcow2 PATH`, then --storage nbd://HOST:PORT); a LUKS volume opened with cryptsetup")]
    Format {
        /// The disk.
        path: PathBuf,
        /// Its format.
        format: &'static str,
    },
    /// A read failed.
    #[error("reading {len} bytes at {offset} of disk {disk} failed")]
    Read {
        /// Disk index.
        disk: u16,
        /// Offset.
        offset: DiskOffset,
        /// Length.
        len: usize,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl StorageError {
    /// A read of `len` bytes at `offset` of a disk the VM does not have.
    pub(crate) fn no_such_disk(disk: u16, offset: DiskOffset, len: usize) -> Self {
        StorageError::Read {
            disk,
            offset,
            len,
            source: io::Error::new(io::ErrorKind::NotFound, "no such disk"),
        }
    }
}

/// Read access to the VM's disks on shared storage (destination side).
pub trait Storage: Send + Sync {
    /// Sizes of the disks, by index.
    fn disk_sizes(&self) -> &[u64];
    /// Fills `buf` from `offset` of `disk`.
    fn read_at(&self, disk: u16, offset: DiskOffset, buf: &mut [u8]) -> Result<(), StorageError>;
    /// Fills each buffer from its offset of `disk`. The default reads them
    /// one after the other; a networked store keeps them all in flight, so
    /// that short scattered reads are not paid one round trip each.
    fn read_many(
        &self,
        disk: u16,
        reads: &mut [(DiskOffset, &mut [u8])],
    ) -> Result<(), StorageError> {
        for (offset, buf) in reads.iter_mut() {
            self.read_at(disk, *offset, buf)?;
        }
        Ok(())
    }
}

/// Why shared storage could not be opened from the operator's addresses.
#[derive(Debug, Error)]
pub enum OpenError {
    /// More disks than a reference can name.
    #[error("too many shared disks ({0}): at most 65,536")]
    TooMany(usize),
    /// NBD addresses and paths mixed, or another scheme.
    #[error("shared storage takes nbd://HOST:PORT[/EXPORT] addresses or local paths, not a mix of both or another scheme")]
    Mixed,
    /// The NBD server could not be used.
    #[error(transparent)]
    Nbd(#[from] NbdError),
    /// A file could not be opened.
    #[error(transparent)]
    File(#[from] StorageError),
}

/// The VM's disks, in order, from `specs`: all `nbd://` addresses (read
/// over NBD) or all local paths, `timeout` for each reply or read. None
/// for none.
pub fn open(
    specs: &[String],
    timeout: Duration,
) -> Result<Option<std::sync::Arc<dyn Storage>>, OpenError> {
    if specs.is_empty() {
        return Ok(None);
    }
    if u16::try_from(specs.len()).is_err() {
        return Err(OpenError::TooMany(specs.len()));
    }
    if specs.iter().all(|s| s.starts_with("nbd://")) {
        return Ok(Some(std::sync::Arc::new(NbdStorage::open(specs, timeout)?)));
    }
    if specs.iter().any(|s| s.contains("://")) {
        return Err(OpenError::Mixed);
    }
    let paths: Vec<&std::path::Path> = specs.iter().map(std::path::Path::new).collect();
    Ok(Some(std::sync::Arc::new(FileStorage::open(
        &paths, timeout,
    )?)))
}
