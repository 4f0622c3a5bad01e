//! From a tablespace file offset to a byte offset on one of the VM's disks.

use dbmigrate_core::addr::DiskOffset;
use dbmigrate_core::protocol::guest::{clean_id, DiskId};
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::sys::{self, Extent};

/// Extent flags whose bytes are not plainly where `physical` says:
/// unknown, delayed allocation, encoded, encrypted, not aligned, inline,
/// tail-packed, unwritten (preallocated, reads as zero).
const UNSAFE_FLAGS: u32 = 0x2 | 0x4 | 0x8 | 0x80 | 0x100 | 0x200 | 0x400 | 0x800;

/// Where `len` bytes at `file_offset` live on the device, if they lie inside
/// one plain extent (pure).
pub fn map_range(extents: &[Extent], file_offset: u64, len: u64) -> Option<u64> {
    let e = extents
        .iter()
        .find(|e| e.logical <= file_offset && file_offset < e.logical.saturating_add(e.length))?;
    if e.flags & UNSAFE_FLAGS != 0 || file_offset + len > e.logical + e.length {
        return None;
    }
    e.physical.checked_add(file_offset - e.logical)
}

/// The plain extents of a placed file as disk extents (partition start
/// added), in file order; what [`map_range`] would refuse is left out.
pub fn plain_extents(p: &Placed) -> Vec<dbmigrate_core::protocol::guest::Extent> {
    let mut v: Vec<_> = p
        .extents
        .iter()
        .filter(|e| e.flags & UNSAFE_FLAGS == 0 && e.length > 0)
        .filter(|e| (e.logical | e.physical | e.length) % 4096 == 0)
        .filter_map(|e| {
            Some(dbmigrate_core::protocol::guest::Extent {
                file_offset: e.logical,
                disk_offset: DiskOffset(p.base.checked_add(e.physical)?),
                len: e.length,
            })
        })
        .collect();
    v.sort_by_key(|e| e.file_offset);
    v
}

/// The VM's disks, by index, as block devices inside the guest.
pub struct Disks {
    devs: Vec<(PathBuf, u64)>,
}

/// A tablespace file placed on a disk.
pub struct Placed {
    /// Disk index.
    pub disk: u16,
    /// Offset of the file system on that disk (partition start).
    pub base: u64,
    /// The file's extents.
    pub extents: Vec<Extent>,
}

impl Disks {
    /// Stats each device path (e.g. `/dev/vda`).
    /// On failure, returns the device that could not be examined.
    pub fn new(paths: &[PathBuf]) -> Result<Self, (PathBuf, io::Error)> {
        let devs = paths
            .iter()
            .map(|p| match std::fs::metadata(p) {
                Ok(m) => Ok((p.clone(), m.rdev())),
                Err(e) => Err((p.clone(), e)),
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { devs })
    }

    /// Finds which disk holds `file` (directly or on a partition) and its extents.
    /// None when the file is on no disk of the VM (never hinted).
    pub fn place(&self, file: &Path) -> io::Result<Option<Placed>> {
        self.place_open(&File::open(file)?, true)
    }

    /// [`Disks::place`] for an open file; `sync` as in [`sys::extents`].
    pub fn place_open(&self, f: &File, sync: bool) -> io::Result<Option<Placed>> {
        let dev = f.metadata()?.dev();
        let Some((disk, base)) = self.locate(dev) else {
            return Ok(None);
        };
        Ok(Some(Placed {
            disk,
            base,
            extents: sys::extents(f, sync)?,
        }))
    }

    fn locate(&self, dev: u64) -> Option<(u16, u64)> {
        let (maj, min) = (libc::major(dev), libc::minor(dev));
        for (i, (_, rdev)) in self.devs.iter().enumerate() {
            let disk = u16::try_from(i).ok()?;
            if *rdev == dev {
                return Some((disk, 0));
            }
            // A partition: /sys/dev/block/M:m/start (sectors) under its parent disk.
            let sys = PathBuf::from(format!("/sys/dev/block/{maj}:{min}"));
            let parent = std::fs::read_to_string(sys.join("../dev")).ok()?;
            let (pmaj, pmin) = (libc::major(*rdev), libc::minor(*rdev));
            if parent.trim() == format!("{pmaj}:{pmin}") {
                let start: u64 = std::fs::read_to_string(sys.join("start"))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()?;
                return Some((disk, start * 512));
            }
        }
        None
    }
}

/// Each of the VM's disks (block device paths, by hint index) as the
/// guest knows it: its size and its serial and WWN from sysfs (virtio-blk
/// `serial`, SCSI VPD page 0x80 and `wwid`, NVMe `serial` and `wwid`). A
/// disk that cannot be read is named by nothing (the host then cannot
/// match it and its pages go raw).
pub fn identities(paths: &[PathBuf]) -> Vec<DiskId> {
    paths
        .iter()
        .map(|p| identity(p).unwrap_or_default())
        .collect()
}

fn identity(dev: &Path) -> Option<DiskId> {
    let dev = std::fs::canonicalize(dev).ok()?;
    let sys = Path::new("/sys/class/block").join(dev.file_name()?);
    let text = |rel: &str| std::fs::read_to_string(sys.join(rel)).ok();
    let sectors: u64 = text("size")?.trim().parse().ok()?;
    let serial = text("serial")
        .or_else(|| text("device/serial"))
        .or_else(|| {
            std::fs::read(sys.join("device/vpd_pg80"))
                .ok()
                .and_then(|b| vpd_serial(&b))
        })
        .unwrap_or_default();
    let wwn = text("wwid")
        .or_else(|| text("device/wwid"))
        .unwrap_or_default();
    Some(DiskId {
        bytes: sectors.saturating_mul(512),
        serial: clean_id(&serial),
        wwn: clean_id(&wwn),
    })
}

/// The serial in a SCSI VPD page 0x80 (unit serial number): 4 header
/// bytes, the page length at bytes 2-3 (big-endian), then the serial
/// (pure).
pub fn vpd_serial(page: &[u8]) -> Option<String> {
    let (head, rest) = page.split_first_chunk::<4>()?;
    if head[1] != 0x80 {
        return None;
    }
    let s = rest.get(..usize::from(u16::from_be_bytes([head[2], head[3]])))?;
    Some(String::from_utf8_lossy(s).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scsi_serials_come_from_vpd_page_0x80() {
        assert_eq!(
            vpd_serial(b"\x00\x80\x00\x08drive-01junk").as_deref(),
            Some("drive-01")
        );
        assert_eq!(vpd_serial(b"\x00\x83\x00\x02ab"), None);
        assert_eq!(vpd_serial(b"\x00\x80\x00\x09short"), None);
        assert_eq!(vpd_serial(b"\x00"), None);
        assert_eq!(vpd_serial(b"\x00\x80\x01\x00ab"), None);
    }

    #[test]
    fn ranges_map_inside_plain_extents_only() {
        let ex = [
            Extent {
                logical: 0,
                physical: 1 << 20,
                length: 16384,
                flags: 0,
            },
            Extent {
                logical: 16384,
                physical: 8 << 20,
                length: 32768,
                flags: 0,
            },
            Extent {
                logical: 49152,
                physical: 9 << 20,
                length: 16384,
                flags: 0x800,
            },
        ];
        assert_eq!(map_range(&ex, 4096, 4096), Some((1 << 20) + 4096));
        assert_eq!(map_range(&ex, 20480, 4096), Some((8 << 20) + 4096));
        // Straddles two extents.
        assert_eq!(map_range(&ex, 12288, 8192), None);
        // Unwritten extent.
        assert_eq!(map_range(&ex, 49152, 4096), None);
        // Beyond the file.
        assert_eq!(map_range(&ex, 1 << 30, 4096), None);
    }
}
