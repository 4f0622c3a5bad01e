//! A read-only loop device over a VM's disk image: the disk as a host sees
//! a SAN LUN, a block device read directly instead of through a storage
//! server (`dbmigrate receive --storage /dev/loopN`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// A loop device, detached when dropped.
#[derive(Debug)]
pub struct LoopDevice {
    path: PathBuf,
}

impl LoopDevice {
    /// Attaches `image` read-only, with direct I/O to the image (no second
    /// copy of its blocks in the host's page cache).
    pub fn attach(image: &Path) -> Result<Self> {
        let out = Command::new("losetup")
            .args(["--find", "--show", "--read-only", "--direct-io=on"])
            .arg(image)
            .output()
            .context("running losetup (install util-linux / mount)")?;
        if !out.status.success() {
            bail!(
                "losetup could not attach {}: {}",
                image.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        // A string test: `Path::starts_with` compares whole components.
        if !path.to_string_lossy().starts_with("/dev/loop") {
            bail!("losetup answered `{}`, not a loop device", path.display());
        }
        Ok(Self { path })
    }

    /// The device, e.g. `/dev/loop3`.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}

/// A loop device over a VM's disk image seen through a FUSE file system
/// (bindfs, read-only) whose daemon the test can stop: while it is stopped
/// every read of the device blocks in the kernel, as on a hung SAN path or
/// a hard NFS mount.
pub struct StallableDisk {
    daemon: std::process::Child,
    mount: PathBuf,
    dev: Option<LoopDevice>,
}

impl StallableDisk {
    /// Mounts `image`'s directory at `mount` through bindfs and attaches
    /// the image's view there.
    pub fn attach(image: &Path, mount: &Path) -> Result<Self> {
        let dir = image.parent().context("the image has no directory")?;
        let name = image.file_name().context("the image has no name")?;
        std::fs::create_dir_all(mount)?;
        let daemon = Command::new("bindfs")
            .args(["-f", "-r"])
            .arg(dir)
            .arg(mount)
            .stdin(std::process::Stdio::null())
            .spawn()
            .context("starting bindfs (scripts/setup.sh installs it)")?;
        let mut disk = Self {
            daemon,
            mount: mount.to_path_buf(),
            dev: None,
        };
        let seen = mount.join(name);
        let t = std::time::Instant::now();
        while !seen.exists() {
            if t.elapsed() > std::time::Duration::from_secs(20) {
                bail!(
                    "bindfs did not show {} at {}",
                    image.display(),
                    mount.display()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        disk.dev = Some(LoopDevice::attach(&seen)?);
        Ok(disk)
    }

    /// The device, e.g. `/dev/loop3`.
    pub fn path(&self) -> &Path {
        self.dev
            .as_ref()
            .map(LoopDevice::path)
            .unwrap_or(Path::new(""))
    }

    fn signal(&self, sig: &str) -> Result<()> {
        let ok = Command::new("kill")
            .args([sig, &self.daemon.id().to_string()])
            .status()?
            .success();
        if !ok {
            bail!("kill {sig} of bindfs failed");
        }
        Ok(())
    }

    /// From now on reads block until [`StallableDisk::resume`].
    pub fn stall(&self) -> Result<()> {
        self.signal("-STOP")
    }

    /// Blocked reads complete, new ones are answered.
    pub fn resume(&self) -> Result<()> {
        self.signal("-CONT")
    }
}

impl Drop for StallableDisk {
    fn drop(&mut self) {
        let _ = self.resume();
        self.dev = None;
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn a_read_only_loop_device_reads_the_image_and_is_detached_when_dropped() {
        let dir = std::env::temp_dir().join(format!("dbm-loop-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("disk.img");
        let mut data = vec![0u8; 1 << 20];
        data[4096..4100].copy_from_slice(b"dbm!");
        std::fs::write(&img, &data).unwrap();
        let dev = LoopDevice::attach(&img).unwrap();
        let mut b = [0u8; 4];
        std::fs::File::open(dev.path())
            .unwrap()
            .read_exact_at(&mut b, 4096)
            .unwrap();
        assert_eq!(&b, b"dbm!");
        drop(dev);
        let listed = Command::new("losetup").arg("-l").output().unwrap();
        let listed = String::from_utf8_lossy(&listed.stdout);
        assert!(!listed.contains(&*img.to_string_lossy()), "{listed}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
