//! QEMU's device state travels inside the agents' secured connection: each
//! QEMU migrates to or from a unix socket in its agent's private directory,
//! and the agents relay the stream. No QEMU listens on the network, and the
//! URI QEMU is given is built here from the agent's own directory; nothing
//! the peer sends becomes a QMP argument.

use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use dbmigrate_core::transport::Conn;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

/// How long QEMU may take to connect to the source relay after `migrate`.
const VMM_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of the device-state relay.
#[derive(Debug, Error)]
pub enum RelayError {
    /// The private directory could not be made.
    #[error(
        "cannot create the private directory {path} (set --run-dir to a directory this agent owns)"
    )]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The directory exists but others may enter it.
    #[error("{path} is not a directory private to this agent (mode {mode:o}, owner {uid}); remove it or choose another --run-dir")]
    NotPrivate {
        /// The directory.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
        /// Its owner.
        uid: u32,
    },
    /// The unix socket could not be bound or connected.
    #[error("device-state socket {path}")]
    Socket {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// QEMU never connected.
    #[error("QEMU did not connect to {path} within {} s after `migrate`", VMM_CONNECT_TIMEOUT.as_secs())]
    VmmSilent {
        /// The socket.
        path: PathBuf,
    },
    /// The relay broke.
    #[error("relaying device state failed")]
    Relay(#[source] io::Error),
}

/// A directory only this agent may enter (mode 0700), for its sockets;
/// removed when dropped.
pub struct PrivateDir {
    path: PathBuf,
}

impl PrivateDir {
    /// Creates `base/<role>-<pid>` (and `base`, mode 0755, if missing).
    pub fn create(base: &Path, role: &str) -> Result<Self, RelayError> {
        let dir_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| RelayError::Dir { path, source }
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(base)
            .map_err(dir_err(base))?;
        let path = base.join(format!("{role}-{}", std::process::id()));
        // A leftover of an earlier agent with the same pid: it held only sockets.
        if path.exists() {
            std::fs::remove_dir_all(&path).map_err(dir_err(&path))?;
        }
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(dir_err(&path))?;
        let meta = std::fs::symlink_metadata(&path).map_err(dir_err(&path))?;
        let mode = meta.permissions().mode() & 0o7777;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        if !meta.is_dir() || mode & 0o077 != 0 || std::os::unix::fs::MetadataExt::uid(&meta) != me {
            return Err(RelayError::NotPrivate {
                path,
                mode,
                uid: std::os::unix::fs::MetadataExt::uid(&meta),
            });
        }
        Ok(Self { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The QEMU URI of a unix socket.
pub fn unix_uri(path: &Path) -> String {
    format!("unix:{}", path.display())
}

/// The source's end: a socket the source QEMU migrates to.
pub struct SourceRelay {
    listener: UnixListener,
    path: PathBuf,
}

impl SourceRelay {
    /// Listens on `dir/device-state.sock`.
    pub fn bind(dir: &PrivateDir) -> Result<Self, RelayError> {
        let path = dir.path().join("device-state.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).map_err(|source| RelayError::Socket {
            path: path.clone(),
            source,
        })?;
        Ok(Self { listener, path })
    }

    /// What to give QEMU's `migrate`.
    pub fn uri(&self) -> String {
        unix_uri(&self.path)
    }

    /// Takes QEMU's connection, then relays it over `peer` until QEMU
    /// closes its end. Returns the bytes QEMU sent.
    pub async fn run(self, peer: Conn) -> Result<u64, RelayError> {
        let (vmm, _) = tokio::time::timeout(VMM_CONNECT_TIMEOUT, self.listener.accept())
            .await
            .map_err(|_| RelayError::VmmSilent {
                path: self.path.clone(),
            })?
            .map_err(|source| RelayError::Socket {
                path: self.path.clone(),
                source,
            })?;
        relay(vmm, peer).await.map_err(RelayError::Relay)
    }
}

/// The destination's end: relays `peer` into the QEMU listening on `socket`
/// (its `migrate-incoming`) until QEMU closes its end.
pub async fn into_vmm(peer: Conn, socket: &Path) -> Result<u64, RelayError> {
    let vmm = UnixStream::connect(socket)
        .await
        .map_err(|source| RelayError::Socket {
            path: socket.to_path_buf(),
            source,
        })?;
    relay(vmm, peer).await.map_err(RelayError::Relay)
}

/// Copies both ways until the VMM's side of the stream ends: QEMU closes
/// its channel when it has sent (source) or loaded (destination) the
/// device state. Returns the bytes the VMM sent.
async fn relay(vmm: UnixStream, peer: Conn) -> io::Result<u64> {
    let (mut vr, mut vw) = vmm.into_split();
    let (mut pr, mut pw) = peer.split();
    let from_vmm = copy_then_close(&mut vr, &mut pw);
    let to_vmm = copy_then_close(&mut pr, &mut vw);
    tokio::pin!(from_vmm, to_vmm);
    tokio::select! {
        r = &mut from_vmm => r,
        // The peer closed first: the VMM's side still decides.
        _ = &mut to_vmm => from_vmm.await,
    }
}

async fn copy_then_close<R, W>(r: &mut R, w: &mut W) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let n = tokio::io::copy(r, w).await?;
    w.shutdown().await?;
    Ok(n)
}
