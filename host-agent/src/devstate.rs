//! QEMU's device state travels inside the agents' secured connection: each
//! QEMU migrates to or from a unix socket in its agent's private directory,
//! and the agents relay the stream. No QEMU listens on the network, and the
//! URI QEMU is given is built here from the agent's own directory; nothing
//! the peer sends becomes a QMP argument.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
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
    #[error("device-state socket {path}: {error}")]
    Socket {
        /// The socket.
        path: PathBuf,
        /// Why.
        error: io::Error,
    },
    /// QEMU never connected.
    #[error("QEMU did not connect to {path} within {} s after `migrate`", VMM_CONNECT_TIMEOUT.as_secs())]
    VmmSilent {
        /// The socket.
        path: PathBuf,
    },
    /// The relay broke.
    #[error("relaying device state failed: {0}")]
    Relay(io::Error),
}

/// A directory only this agent may enter (mode 0700), for its sockets;
/// removed when dropped.
pub struct PrivateDir {
    path: PathBuf,
}

impl PrivateDir {
    /// Creates `base/<role>-<pid>` (and `base`, mode 0755, if missing),
    /// owned by `owner` (QEMU's user, so that it can reach its socket; this
    /// agent's by default). `base` must not let others replace what is in it.
    pub fn create(base: &Path, role: &str, owner: Option<u32>) -> Result<Self, RelayError> {
        let dir_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| RelayError::Dir { path, source }
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(base)
            .map_err(dir_err(base))?;
        let meta = std::fs::metadata(base).map_err(dir_err(base))?;
        let mode = meta.permissions().mode();
        // Writable by others without the sticky bit: another user could
        // swap our directory for theirs after the checks below.
        if mode & 0o022 != 0 && mode & 0o1000 == 0 {
            return Err(RelayError::NotPrivate {
                path: base.to_path_buf(),
                mode: mode & 0o7777,
                uid: meta.uid(),
            });
        }
        let path = base.join(format!("{role}-{}", std::process::id()));
        // A leftover of an earlier agent with the same pid: it held only sockets.
        if path.exists() {
            std::fs::remove_dir_all(&path).map_err(dir_err(&path))?;
        }
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(dir_err(&path))?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        let owner = owner.unwrap_or(me);
        if owner != me {
            std::os::unix::fs::chown(&path, Some(owner), None).map_err(dir_err(&path))?;
        }
        let meta = std::fs::symlink_metadata(&path).map_err(dir_err(&path))?;
        let mode = meta.permissions().mode() & 0o7777;
        if !meta.is_dir() || mode & 0o077 != 0 || meta.uid() != owner {
            return Err(RelayError::NotPrivate {
                path,
                mode,
                uid: meta.uid(),
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

/// The user a process runs as (the owner of its `/proc` entry).
pub fn process_uid(pid: Option<u32>) -> Option<u32> {
    std::fs::metadata(format!("/proc/{}", pid?))
        .ok()
        .map(|m| m.uid())
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
        let listener = UnixListener::bind(&path).map_err(|error| RelayError::Socket {
            path: path.clone(),
            error,
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
            .map_err(|error| RelayError::Socket {
                path: self.path.clone(),
                error,
            })?;
        // One way: nothing from the destination reaches the source QEMU.
        let (mut from_vmm, _) = vmm.into_split();
        let (_, mut to_peer) = peer.split();
        copy_then_close(&mut from_vmm, &mut to_peer)
            .await
            .map_err(RelayError::Relay)
    }
}

/// The destination's end: relays `peer` into the QEMU listening on `socket`
/// (its `migrate-incoming`), one way, and waits until QEMU has closed its
/// end (it has loaded the device state). A relay that breaks drops QEMU's
/// socket, so that QEMU's load fails rather than waits.
pub async fn into_vmm(peer: Conn, socket: &Path) -> Result<u64, RelayError> {
    let vmm = UnixStream::connect(socket)
        .await
        .map_err(|error| RelayError::Socket {
            path: socket.to_path_buf(),
            error,
        })?;
    let (mut from_vmm, mut to_vmm) = vmm.into_split();
    let (mut from_peer, _) = peer.split();
    let forward = copy_then_close(&mut from_peer, &mut to_vmm);
    // QEMU sends nothing back; its end closing is the news.
    let closed = async {
        let _ = tokio::io::copy(&mut from_vmm, &mut tokio::io::sink()).await;
    };
    tokio::pin!(forward, closed);
    let bytes = tokio::select! {
        r = &mut forward => r.map_err(RelayError::Relay)?,
        () = &mut closed => {
            // QEMU may close as soon as it read its end-of-stream mark,
            // before the peer's close arrives here.
            match tokio::time::timeout(VMM_CLOSE_GRACE, &mut forward).await {
                Ok(r) => return r.map_err(RelayError::Relay),
                Err(_) => return Err(RelayError::Relay(io::Error::other(
                    "QEMU closed its device-state socket before the stream ended: it refused the device state (see its log)",
                ))),
            }
        }
    };
    closed.await;
    Ok(bytes)
}

/// How long the stream may go on after the destination QEMU closed its end.
const VMM_CLOSE_GRACE: Duration = Duration::from_secs(5);

async fn copy_then_close<R, W>(r: &mut R, w: &mut W) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let n = tokio::io::copy(r, w).await?;
    w.shutdown().await?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn qemu_is_given_only_a_socket_in_the_agent_s_own_directory() {
        let base = std::env::temp_dir().join(format!("dbmigrate-devstate-{}", std::process::id()));
        let dir = PrivateDir::create(&base, "migrate", None).unwrap();
        let relay = SourceRelay::bind(&dir).unwrap();
        let uri = relay.uri();
        assert_eq!(
            uri,
            format!("unix:{}/device-state.sock", dir.path().display())
        );
        assert!(dir.path().starts_with(&base));
        let mode = std::fs::metadata(dir.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        drop(relay);
        let path = dir.path().to_path_buf();
        drop(dir);
        assert!(!path.exists(), "the private directory is removed");
        std::fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn a_base_directory_others_may_write_is_refused() {
        let base =
            std::env::temp_dir().join(format!("dbmigrate-devstate-open-{}", std::process::id()));
        std::fs::create_dir_all(&base).unwrap();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = PrivateDir::create(&base, "receive", None)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("not a directory private"), "{err}");
        // The sticky bit (as /tmp has) keeps others from replacing our entries.
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(PrivateDir::create(&base, "receive", None).is_ok());
        std::fs::remove_dir_all(base).unwrap();
    }
}
