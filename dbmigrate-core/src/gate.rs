//! The receiving agent's listener. Every connection is secured (the TLS
//! handshake, see [`crate::transport`]) and must introduce itself with a
//! [`Hello`] within [`HELLO_TIMEOUT`]; a connection that fails either is
//! dropped alone, with a warning naming the peer, and the listener keeps
//! listening. Handshakes run side by side, so a silent stranger does not
//! hold up the real source.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinHandle};

use crate::protocol::{self, Hello};
use crate::transport::{Acceptor, Conn};

/// How long an accepted peer may take to send its [`Hello`] after the handshake.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections being secured or introduced at once. A new one beyond
/// that drops the one waiting longest: a real peer's handshake takes
/// milliseconds, a stranger's silence the whole timeout, so strangers
/// cannot crowd out the real source.
pub const MAX_PENDING: usize = 64;

/// A connection that passed the handshake and introduced itself.
pub struct Admitted {
    /// The connection.
    pub conn: Conn,
    /// Who connected.
    pub peer: SocketAddr,
    /// Its introduction.
    pub hello: Hello,
}

/// Accepts connections until dropped; yields those that pass.
pub struct Gate {
    rx: mpsc::Receiver<Admitted>,
    task: JoinHandle<()>,
}

impl Gate {
    /// Starts accepting on `listener`.
    pub fn open(listener: TcpListener, acceptor: Acceptor) -> Self {
        let (tx, rx) = mpsc::channel(4);
        let task = tokio::spawn(accept_loop(listener, acceptor, tx));
        Self { rx, task }
    }

    /// The next admitted connection (None only if the listener failed for good).
    pub async fn next(&mut self) -> Option<Admitted> {
        self.rx.recv().await
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, acceptor: Acceptor, tx: mpsc::Sender<Admitted>) {
    let mut pending: VecDeque<Pending> = VecDeque::new();
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors or the like: wait and go on listening.
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Only connections still being set up: an admitted one waits for
        // its turn to be handed over and is never dropped.
        pending.retain(|p| !p.task.is_finished() && !p.admitted.load(Ordering::Relaxed));
        if pending.len() >= MAX_PENDING {
            if let Some(oldest) = pending.pop_front() {
                oldest.task.abort();
                tracing::warn!(peer = %oldest.peer, "dropped the connection waiting longest to set up: too many at once");
            }
        }
        let (acceptor, tx) = (acceptor.clone(), tx.clone());
        let admitted = Arc::new(AtomicBool::new(false));
        let flag = admitted.clone();
        let task = tokio::spawn(async move {
            match admit(&acceptor, tcp, peer).await {
                Ok(a) => {
                    flag.store(true, Ordering::Relaxed);
                    let _ = tx.send(a).await;
                }
                Err(reason) => tracing::warn!(%peer, %reason, "refused a connection"),
            }
        });
        pending.push_back(Pending {
            peer,
            task: task.abort_handle(),
            admitted,
        });
    }
}

/// A connection being set up.
struct Pending {
    peer: SocketAddr,
    task: AbortHandle,
    admitted: Arc<AtomicBool>,
}

async fn admit(
    acceptor: &Acceptor,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
) -> Result<Admitted, String> {
    let mut conn = acceptor
        .secure(tcp, peer)
        .await
        .map_err(|e| e.to_string())?;
    let hello = tokio::time::timeout(HELLO_TIMEOUT, protocol::read_hello(&mut conn))
        .await
        .map_err(|_| format!("no Hello within {} s", HELLO_TIMEOUT.as_secs()))?
        .map_err(|e| e.to_string())?;
    Ok(Admitted { conn, peer, hello })
}
