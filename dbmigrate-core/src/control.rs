//! A control connection's two halves. The reading half is a task of its
//! own ([`spawn_reader`]): a read is never cancelled halfway through a
//! frame by another branch of a session's loop. The writing half is shared
//! by its session and a heartbeat task. Whole frames go out under one
//! lock, so a heartbeat never lands inside another message. Every write is bounded by the session's
//! peer timeout: on a cut link the kernel keeps a TCP send buffer full for
//! many minutes, and a writer blocked there (holding the lock) would keep
//! the session from ever reaching its own timeout.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, Mutex};
use tokio::task::JoinHandle;

use crate::protocol::{self, Control, Message, ProtocolError, HEARTBEAT_INTERVAL};
use crate::transport::{ConnReader, ConnWriter};

/// A peer said nothing for `secs` seconds while this side was `doing`
/// something (each side's error type has a variant for it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Silent {
    /// Seconds waited.
    pub secs: u64,
    /// What was awaited.
    pub doing: &'static str,
}

/// `f`, unless it takes longer than `limit`.
pub async fn within<T>(
    limit: Duration,
    doing: &'static str,
    f: impl std::future::Future<Output = T>,
) -> Result<T, Silent> {
    tokio::time::timeout(limit, f).await.map_err(|_| Silent {
        secs: limit.as_secs(),
        doing,
    })
}

/// Messages of a control connection (`T`: the direction this side reads)
/// as its reader task hands them over, each with its size on the wire; an
/// error ends them.
pub type Incoming<T> = mpsc::Receiver<Result<(T, u64), ProtocolError>>;

/// Reads the control connection `rx` of a guest of `ram_bytes` in a task
/// of its own until a read fails (that error is the last item) or the
/// receiver is dropped.
pub fn spawn_reader<T: Control>(
    mut rx: ConnReader,
    doing: &'static str,
    ram_bytes: u64,
) -> (Incoming<T>, JoinHandle<()>) {
    let (tx, incoming) = mpsc::channel(16);
    let max = protocol::control_payload_limit(ram_bytes);
    let task = tokio::spawn(async move {
        loop {
            let m = protocol::read_control(&mut rx, doing, max).await;
            let failed = m.is_err();
            if tx.send(m).await.is_err() || failed {
                return;
            }
        }
    });
    (incoming, task)
}

/// A control connection's writer (`T`: the direction this side sends)
/// that sends a [`Message::Heartbeat`] every [`HEARTBEAT_INTERVAL`] until
/// dropped or shut down.
pub struct ControlWriter<T> {
    inner: Arc<Mutex<Conn>>,
    beat: JoinHandle<()>,
    sends: std::marker::PhantomData<fn(T)>,
}

struct Conn {
    w: ConnWriter,
    patience: Duration,
    /// A write gave up part-way: the stream may hold half a frame, so
    /// nothing more may follow it.
    broken: bool,
}

impl Conn {
    async fn write(&mut self, frame: &[u8], doing: &'static str) -> Result<(), ProtocolError> {
        if self.broken {
            return Err(ProtocolError::Io {
                doing,
                source: std::io::Error::new(
                    std::io::ErrorKind::BrokenPipe,
                    "an earlier write on this control connection timed out",
                ),
            });
        }
        match tokio::time::timeout(
            self.patience,
            protocol::write_frame(&mut self.w, frame, doing),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => {
                self.broken = true;
                Err(ProtocolError::Io {
                    doing,
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!(
                            "the peer took nothing for {} s (link cut or peer stuck)",
                            self.patience.as_secs()
                        ),
                    ),
                })
            }
        }
    }
}

impl<T: Control> ControlWriter<T> {
    /// Takes over `w` and starts the heartbeats (on the current tokio
    /// runtime). A write that cannot finish within `patience` fails.
    pub fn new(w: ConnWriter, patience: Duration) -> Self {
        let inner = Arc::new(Mutex::new(Conn {
            w,
            patience,
            broken: false,
        }));
        let beat = tokio::spawn(heartbeats(inner.clone()));
        Self {
            inner,
            beat,
            sends: std::marker::PhantomData,
        }
    }

    /// Writes one message; returns the bytes written.
    pub async fn send(&self, msg: T, doing: &'static str) -> Result<u64, ProtocolError> {
        let f = msg.encode();
        self.send_frame(&f, doing).await?;
        Ok(f.len() as u64)
    }

    async fn send_frame(&self, frame: &[u8], doing: &'static str) -> Result<(), ProtocolError> {
        self.inner.lock().await.write(frame, doing).await
    }

    /// Stops the heartbeats and closes the writing side (the peer reads EOF).
    pub async fn shutdown(&self) {
        self.beat.abort();
        let mut c = self.inner.lock().await;
        let patience = c.patience;
        let _ = tokio::time::timeout(patience, c.w.shutdown()).await;
    }
}

impl ControlWriter<protocol::ToDestination> {
    /// Writes a batch of pages built in place (post-copy's answers, a
    /// [`protocol::ToDestination::PageBatch`]); returns the bytes written.
    pub async fn send_batch(
        &self,
        batch: protocol::BatchBuilder,
        doing: &'static str,
    ) -> Result<u64, ProtocolError> {
        let f = batch.finish();
        self.send_frame(&f, doing).await?;
        Ok(f.len() as u64)
    }
}

impl<T> Drop for ControlWriter<T> {
    fn drop(&mut self) {
        self.beat.abort();
    }
}

async fn heartbeats(c: Arc<Mutex<Conn>>) {
    let frame = Message::Heartbeat.encode();
    let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // A failed write means the connection is gone: the session finds
        // out on its own next read or write.
        if c.lock()
            .await
            .write(&frame, "sending a heartbeat")
            .await
            .is_err()
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_peer_that_reads_nothing_fails_the_write_and_every_later_one() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        // The peer keeps its socket open and never reads, as a cut link would.
        let (_peer, _) = accepted.unwrap();
        let (_r, w) = crate::transport::Conn::Plain(client.unwrap()).split();
        let ctrl = ControlWriter::<protocol::ToDestination>::new(w, Duration::from_millis(300));
        let frame = vec![0u8; 1 << 20];
        let started = std::time::Instant::now();
        let err = loop {
            // The kernel buffers take some megabytes before a write blocks.
            if let Err(e) = ctrl.send_frame(&frame, "filling the link").await {
                break e;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "no write ever blocked"
            );
        };
        assert!(err.to_string().contains("filling the link"), "{err}");
        let later = ctrl
            .send(protocol::ToDestination::Commit, "sending Commit")
            .await
            .unwrap_err();
        assert!(format!("{later:?}").contains("timed out"), "{later:?}");
    }
}
