//! Which processes map a file: the destination refuses a RAM file that a
//! process other than its QEMU maps (a same-host migration whose two QEMUs
//! share one mem-path would overwrite the running source's RAM).

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// A file's identity as `/proc/PID/maps` shows it: device (major, minor) and inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileId {
    major: u64,
    minor: u64,
    inode: u64,
}

impl FileId {
    /// The identity of the file at `path`.
    pub fn of(path: &Path) -> io::Result<Self> {
        let m = std::fs::metadata(path)?;
        let dev = m.dev();
        // The kernel's encoding of dev_t (glibc's gnu_dev_major/minor).
        Ok(Self {
            major: ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff),
            minor: (dev & 0xff) | ((dev >> 12) & !0xff),
            inode: m.ino(),
        })
    }

    /// Whether a `/proc/PID/maps` text maps this file (pure).
    pub fn mapped_in(&self, maps: &str) -> bool {
        maps.lines().any(|line| {
            // start-end perms offset dev inode path
            let mut f = line.split_ascii_whitespace().skip(3);
            let (Some(dev), Some(inode)) = (f.next(), f.next()) else {
                return false;
            };
            let Some((maj, min)) = dev.split_once(':') else {
                return false;
            };
            u64::from_str_radix(maj, 16) == Ok(self.major)
                && u64::from_str_radix(min, 16) == Ok(self.minor)
                && inode.parse::<u64>() == Ok(self.inode)
        })
    }
}

/// The processes that map `path` now (those whose maps can be read).
pub fn processes_mapping(path: &Path) -> io::Result<Vec<u32>> {
    let id = FileId::of(path)?;
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let Some(pid) = entry?
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // A process that exits meanwhile, or one we may not read, is skipped.
        if let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) {
            if id.mapped_in(&maps) {
                pids.push(pid);
            }
        }
    }
    Ok(pids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_device_and_inode_not_the_name() {
        let id = FileId {
            major: 0,
            minor: 0x1a,
            inode: 4242,
        };
        let maps = "7f00-7f10 rw-s 00000000 00:1a 4242    /dev/shm/other-name (deleted)\n";
        assert!(id.mapped_in(maps));
        let elsewhere = "7f00-7f10 rw-s 00000000 fd:01 4242 /dev/shm/vm\n";
        assert!(!id.mapped_in(elsewhere));
        assert!(!id.mapped_in("7f00-7f10 r--p 00000000 00:00 0\ngarbage\n"));
    }

    #[test]
    fn this_process_is_seen_mapping_a_file() {
        let p = std::env::temp_dir().join(format!("dbmigrate-mappers-{}", std::process::id()));
        std::fs::write(&p, [1u8; 4096]).unwrap();
        let f = std::fs::File::open(&p).unwrap();
        // SAFETY: a private read-only mapping of a file this test owns.
        let m = unsafe { memmap2::Mmap::map(&f) }.unwrap();
        assert!(processes_mapping(&p).unwrap().contains(&std::process::id()));
        drop(m);
        assert!(!processes_mapping(&p).unwrap().contains(&std::process::id()));
        std::fs::remove_file(p).unwrap();
    }
}
