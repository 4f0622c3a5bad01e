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
        if !path.starts_with("/dev/loop") {
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
