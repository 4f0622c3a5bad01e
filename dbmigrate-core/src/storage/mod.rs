//! Shared storage as the destination reads it: the [`Storage`] interface
//! and its backends, one module each (a new backend goes beside them):
//! [`file`] (disks as files or block devices of this host) and [`nbd`]
//! (an NBD server, as `qemu-nbd` serves the VM's disks to the QEMUs).

pub mod file;
pub mod nbd;

use crate::addr::DiskOffset;
use crate::protocol::guest::DiskId;
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

/// Why `--storage` addresses named by serial or WWN could not be placed
/// at the VM's disks.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PlaceError {
    /// Some addresses are named and some are not.
    #[error("give every --storage address a name (serial:ID=ADDRESS, wwn:ID=ADDRESS) or none: named and positional addresses do not mix")]
    Mixed,
    /// `serial:`/`wwn:` without `=ADDRESS`, or an empty name.
    #[error("--storage `{0}`: a named address is serial:ID=ADDRESS or wwn:ID=ADDRESS")]
    Syntax(String),
    /// No disk of the VM has the name.
    #[error("--storage names {key}, but no disk of the destination QEMU has it (its disks: {disks}); give the disk that name (`-device virtio-blk-pci,...,serial=ID`, `<serial>` in libvirt's `<disk>`) or name it as the QEMU does")]
    NotFound {
        /// The name given.
        key: String,
        /// The VM's disks as QEMU names them.
        disks: String,
    },
    /// Two addresses for one disk, or one name for two disks.
    #[error("--storage names {0} twice, or two disks of the VM carry it")]
    Ambiguous(String),
}

/// A `--storage` address and the disk it is for: `serial:ID=ADDRESS`,
/// `wwn:ID=ADDRESS` or a bare ADDRESS (by position). Pure.
fn named(spec: &str) -> Result<Option<(DiskId, &str)>, PlaceError> {
    let (key, rest) = match spec.split_once(':') {
        Some((k @ ("serial" | "wwn"), rest)) => (k, rest),
        _ => return Ok(None),
    };
    let (id, addr) = rest
        .split_once('=')
        .filter(|(id, addr)| !id.is_empty() && !addr.is_empty())
        .ok_or_else(|| PlaceError::Syntax(spec.to_string()))?;
    let mut d = DiskId::default();
    if key == "serial" {
        d.serial = id.to_string();
    } else {
        d.wwn = id.to_string();
    }
    Ok(Some((d, addr)))
}

/// Whether any `--storage` address is named by serial or WWN (the
/// destination QEMU's disks are then needed to place it). Pure.
pub fn has_named(specs: &[String]) -> bool {
    specs
        .iter()
        .any(|s| matches!(named(s), Ok(Some(_)) | Err(_)))
}

/// Places the operator's `--storage` addresses at the VM's disks as its
/// VMM lists them (`vmm`, the index hints use): bare addresses by
/// position, named ones (`serial:ID=`, `wwn:ID=`) at the disk of that
/// serial or WWN. A disk with no address gets None (its references are
/// refused and the pages asked of the source). Pure.
pub fn place(specs: &[String], vmm: &[DiskId]) -> Result<Vec<Option<String>>, PlaceError> {
    let parsed = specs
        .iter()
        .map(|s| named(s))
        .collect::<Result<Vec<_>, _>>()?;
    if parsed.iter().all(Option::is_none) {
        return Ok(specs.iter().cloned().map(Some).collect());
    }
    if parsed.iter().any(Option::is_none) {
        return Err(PlaceError::Mixed);
    }
    let mut out = vec![None; vmm.len()];
    for (want, addr) in parsed.into_iter().flatten() {
        let key = if want.serial.is_empty() {
            format!("wwn {}", want.wwn)
        } else {
            format!("serial {}", want.serial)
        };
        let hits: Vec<usize> = (0..vmm.len())
            .filter(|&k| want.same_name(&vmm[k]))
            .collect();
        match hits[..] {
            [] => {
                let disks = vmm
                    .iter()
                    .enumerate()
                    .map(|(i, d)| {
                        let or_none = |s: &str| {
                            if s.is_empty() {
                                "none".to_string()
                            } else {
                                format!("`{s}`")
                            }
                        };
                        format!("#{i} serial {} wwn {}", or_none(&d.serial), or_none(&d.wwn))
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(PlaceError::NotFound { key, disks });
            }
            [k] if out[k].is_none() => out[k] = Some(addr.to_string()),
            _ => return Err(PlaceError::Ambiguous(key)),
        }
    }
    Ok(out)
}

/// Opens the disks [`place`] placed: those with an address through
/// [`open`], the others as disks of size 0 (every reference to them is
/// refused). None when no disk has an address.
pub fn open_placed(
    placed: &[Option<String>],
    timeout: Duration,
) -> Result<Option<std::sync::Arc<dyn Storage>>, OpenError> {
    let specs: Vec<String> = placed.iter().flatten().cloned().collect();
    let Some(inner) = open(&specs, timeout)? else {
        return Ok(None);
    };
    if placed.iter().all(Option::is_some) {
        return Ok(Some(inner));
    }
    let mut index = Vec::with_capacity(placed.len());
    let mut next = 0u16;
    for p in placed {
        index.push(p.as_ref().map(|_| {
            next += 1;
            next - 1
        }));
    }
    Ok(Some(reindex(inner, index)))
}

/// `inner` with its disks at other indexes: disk `i` of the result is
/// `inner`'s disk `index[i]`, or none (size 0, every read refused).
pub fn reindex(
    inner: std::sync::Arc<dyn Storage>,
    index: Vec<Option<u16>>,
) -> std::sync::Arc<dyn Storage> {
    let sizes = index
        .iter()
        .map(|i| {
            i.and_then(|i| inner.disk_sizes().get(usize::from(i)).copied())
                .unwrap_or(0)
        })
        .collect();
    std::sync::Arc::new(Gapped {
        inner,
        index,
        sizes,
    })
}

/// Disks of which only some have storage: the VM's disk index to the
/// index of its storage.
struct Gapped {
    inner: std::sync::Arc<dyn Storage>,
    index: Vec<Option<u16>>,
    sizes: Vec<u64>,
}

impl Gapped {
    fn inner_disk(&self, disk: u16, offset: DiskOffset, len: usize) -> Result<u16, StorageError> {
        self.index
            .get(usize::from(disk))
            .copied()
            .flatten()
            .ok_or_else(|| StorageError::no_such_disk(disk, offset, len))
    }
}

impl Storage for Gapped {
    fn disk_sizes(&self) -> &[u64] {
        &self.sizes
    }
    fn read_at(&self, disk: u16, offset: DiskOffset, buf: &mut [u8]) -> Result<(), StorageError> {
        let d = self.inner_disk(disk, offset, buf.len())?;
        self.inner.read_at(d, offset, buf)
    }
    fn read_many(
        &self,
        disk: u16,
        reads: &mut [(DiskOffset, &mut [u8])],
    ) -> Result<(), StorageError> {
        let (offset, len) = reads
            .first()
            .map_or((DiskOffset(0), 0), |r| (r.0, r.1.len()));
        let d = self.inner_disk(disk, offset, len)?;
        self.inner.read_many(d, reads)
    }
}

#[cfg(test)]
mod place_tests {
    use super::*;

    fn d(serial: &str, wwn: &str) -> DiskId {
        DiskId {
            bytes: 0,
            serial: serial.into(),
            wwn: wwn.into(),
        }
    }
    fn specs(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn named_addresses_go_to_the_disk_of_that_name() {
        let vmm = [
            d("scratch", ""),
            d("dbm-data", ""),
            d("", "0x5000c500a1b2c3d4"),
        ];
        let got = place(
            &specs(&[
                "wwn:naa.5000C500A1B2C3D4=/dev/sdb",
                "serial:dbm-data=nbd://s:1",
            ]),
            &vmm,
        )
        .unwrap();
        assert_eq!(
            got,
            [None, Some("nbd://s:1".into()), Some("/dev/sdb".into())]
        );
        // Positional addresses stay as they are.
        assert_eq!(
            place(&specs(&["/a", "/b"]), &vmm).unwrap(),
            [Some("/a".into()), Some("/b".into())]
        );
    }

    #[test]
    fn names_that_fit_no_disk_or_two_are_refused() {
        let vmm = [d("a", ""), d("b", "")];
        assert!(matches!(
            place(&specs(&["serial:c=/x"]), &vmm),
            Err(PlaceError::NotFound { .. })
        ));
        assert_eq!(
            place(&specs(&["serial:a=/x", "serial:a=/y"]), &vmm),
            Err(PlaceError::Ambiguous("serial a".into()))
        );
        assert_eq!(
            place(&specs(&["serial:a=/x", "/y"]), &vmm),
            Err(PlaceError::Mixed)
        );
        assert!(matches!(
            place(&specs(&["serial:=/x"]), &vmm),
            Err(PlaceError::Syntax(_))
        ));
        assert!(matches!(
            place(&specs(&["wwn:abc"]), &vmm),
            Err(PlaceError::Syntax(_))
        ));
    }

    #[test]
    fn a_disk_without_storage_refuses_its_references() {
        let dir = std::env::temp_dir().join(format!("dbm-gapped-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("disk");
        std::fs::write(&f, vec![7u8; 8192]).unwrap();
        let placed = [None, Some(f.display().to_string())];
        let s = open_placed(&placed, Duration::from_secs(5))
            .unwrap()
            .unwrap();
        assert_eq!(s.disk_sizes(), [0, 8192]);
        let mut buf = vec![0u8; 4096];
        s.read_at(1, DiskOffset(4096), &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 7));
        assert!(s.read_at(0, DiskOffset(0), &mut buf).is_err());
        // Swapped: the file is disk 0 now, disk 1 has no storage.
        let s = reindex(s, vec![Some(1), None, Some(9)]);
        assert_eq!(s.disk_sizes(), [8192, 0, 0]);
        s.read_at(0, DiskOffset(0), &mut buf).unwrap();
        assert!(s.read_at(1, DiskOffset(0), &mut buf).is_err());
        assert!(s.read_at(2, DiskOffset(0), &mut buf).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
