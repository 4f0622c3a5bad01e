//! The tasks that read the source's connections: the control connection
//! into a channel, each data connection into the RAM owner's inputs, every
//! page index checked against the RAM first.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::applier::ApplyInput;
use super::phase::Event;
use super::DestError;
use crate::protocol::{self, DataMessage};
use crate::transport::Conn;

/// When the session last made progress: a message from the source on any
/// connection, or a storage read done (the source waits for those).
pub(super) struct Heard {
    t0: Instant,
    last_ms: AtomicU64,
}

impl Heard {
    pub(super) fn new() -> Self {
        Self {
            t0: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    pub(super) fn touch(&self) {
        let now = crate::stats::millis(self.t0.elapsed());
        self.last_ms.fetch_max(now, Ordering::Relaxed);
    }

    pub(super) fn silence(&self) -> Duration {
        self.t0
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }
}

pub(super) async fn read_pages(
    s: Conn,
    tx: mpsc::Sender<ApplyInput>,
    pages: u64,
    heard: Arc<Heard>,
) {
    let last = match read_stream(s, &tx, pages, |_| heard.touch()).await {
        Ok(bytes) => ApplyInput::End { bytes },
        Err(e) => ApplyInput::Failed(e),
    };
    let _ = tx.send(last).await;
}

async fn read_stream(
    mut s: Conn,
    tx: &mpsc::Sender<ApplyInput>,
    pages: u64,
    mut heard: impl FnMut(u64),
) -> Result<u64, DestError> {
    let mut bytes = 0;
    let mut payload = Vec::new();
    loop {
        let (msg, n) = protocol::read_data_message(&mut s, "receiving pages", &mut payload).await?;
        heard(n);
        bytes += n;
        let input = match msg {
            DataMessage::PageBatch { pages: entries, .. } => {
                protocol::check_pages("PageBatch", entries.iter().map(|e| e.page), pages)?;
                ApplyInput::Batch(entries)
            }
            DataMessage::Drain { round } => ApplyInput::Phase(Event::Drain { round }),
            DataMessage::SwitchMark => ApplyInput::Phase(Event::SwitchMark),
            DataMessage::PrepareMark => ApplyInput::Phase(Event::PrepareMark),
            DataMessage::EndOfStream => return Ok(bytes),
        };
        if tx.send(input).await.is_err() {
            return Err(DestError::Worker("RAM writer stopped".into()));
        }
    }
}
