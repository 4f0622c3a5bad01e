//! The writing half of a control connection, shared by its session and a
//! heartbeat task. Whole frames go out under one lock, so a heartbeat never
//! lands inside another message.

use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

use crate::protocol::{self, Message, ProtocolError, HEARTBEAT_INTERVAL};

/// A control connection's writer that sends a [`Message::Heartbeat`] every
/// [`HEARTBEAT_INTERVAL`] until dropped or shut down.
pub struct ControlWriter {
    inner: Arc<Mutex<OwnedWriteHalf>>,
    beat: JoinHandle<()>,
}

impl ControlWriter {
    /// Takes over `w` and starts the heartbeats (on the current tokio runtime).
    pub fn new(w: OwnedWriteHalf) -> Self {
        let inner = Arc::new(Mutex::new(w));
        let beat = tokio::spawn(heartbeats(inner.clone()));
        Self { inner, beat }
    }

    /// Writes one message; returns the bytes written.
    pub async fn send(&self, msg: &Message, doing: &'static str) -> Result<u64, ProtocolError> {
        let mut w = self.inner.lock().await;
        protocol::write_message(&mut *w, msg, doing).await
    }

    /// Writes one encoded frame.
    pub async fn send_frame(&self, frame: &[u8], doing: &'static str) -> Result<(), ProtocolError> {
        let mut w = self.inner.lock().await;
        protocol::write_frame(&mut *w, frame, doing).await
    }

    /// Stops the heartbeats and closes the writing side (the peer reads EOF).
    pub async fn shutdown(&self) {
        self.beat.abort();
        let mut w = self.inner.lock().await;
        let _ = w.shutdown().await;
    }
}

impl Drop for ControlWriter {
    fn drop(&mut self) {
        self.beat.abort();
    }
}

async fn heartbeats(w: Arc<Mutex<OwnedWriteHalf>>) {
    let frame = Message::Heartbeat.encode();
    let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut w = w.lock().await;
        // A failed write means the connection is gone: the session finds
        // out on its own next read or write.
        if protocol::write_frame(&mut *w, &frame, "sending a heartbeat")
            .await
            .is_err()
        {
            return;
        }
    }
}
