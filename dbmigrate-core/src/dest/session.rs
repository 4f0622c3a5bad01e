//! A source that passed the handshake: the control connection, the RAM
//! owner and its helpers started for the rounds, the digest comparison at
//! switchover, and Commit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::accept::SessionPeer;
use super::applier::{Applied, Applier, ApplyInput, Inputs};
use super::faults::{fault_reader, FaultSource};
use super::phase::Event;
use super::storage::{StorageReaders, RESULTS_QUEUED};
use super::streams::{read_pages, Heard};
use super::{DestError, DestStats};
use crate::control::within;
use crate::control::ControlWriter;
use crate::protocol::{self, Control, Hello, ProtocolError, ToDestination, ToSource};
use crate::ram::DestRam;
use crate::storage::Storage;
use crate::transport::Conn;
use crate::verify;

/// A source that passed the handshake, with its data connections.
pub struct DestSession {
    /// Messages of the control connection, read by their own task (reads
    /// are never cancelled halfway through a frame).
    pub(super) ctrl_in: crate::control::Incoming<ToDestination>,
    pub(super) ctrl_tx: ControlWriter<ToSource>,
    pub(super) data: Vec<Conn>,
    pub(super) hello: Hello,
    /// What the session's other connections must carry (id, certificate).
    pub(super) peer: SessionPeer,
    pub(super) peer_timeout: Duration,
    /// Pace of the background storage reads, bytes/s (None: as fast as they go).
    pub(super) storage_rate: Option<u64>,
    /// Blocks a background storage read goes through unasked.
    pub(super) storage_read_gap: usize,
    /// What arrived.
    pub stats: DestStats,
}

/// Result of [`DestSession::receive`].
pub enum Received {
    /// Pre-copy ended: the RAM and whether it matched the source's at switchover.
    Complete {
        /// The RAM.
        ram: DestRam,
        /// Digests matched.
        matched: bool,
    },
    /// The source switched to post-copy: finish with [`DestSession::postcopy`].
    Postcopy(PostcopyRun),
}

/// A post-copy in progress (the RAM owner keeps running).
pub struct PostcopyRun {
    pub(super) applier: tokio::task::JoinHandle<Result<Applied, DestError>>,
    pub(super) urgent: mpsc::Sender<ApplyInput>,
    pub(super) out: mpsc::UnboundedReceiver<ToSource>,
    pub(super) stop: SessionStop,
    pub(super) pages: u64,
}

/// Ends the session's helpers when dropped: the fault reader stops and the
/// RAM owner stops waiting, so that an abandoned session never keeps the
/// agent from exiting.
pub(super) struct SessionStop {
    faults: Arc<AtomicBool>,
    _applier: oneshot::Sender<()>,
}

impl SessionStop {
    pub(super) fn faults_done(&self) {
        self.faults.store(true, Ordering::Relaxed);
    }
}

impl Drop for SessionStop {
    fn drop(&mut self) {
        self.faults_done();
    }
}

impl DestSession {
    /// What tells this session's later connections from others.
    pub fn peer(&self) -> SessionPeer {
        self.peer.clone()
    }

    /// The source's announcement.
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// Paces the rebuild's background storage reads to `bytes_per_sec`
    /// (None or 0: no pace): a guest whose host shares its cores or its
    /// storage with the rebuild loses less while the migration takes
    /// longer. Reads a vCPU waits for in post-copy are not paced: they go
    /// to the next reader that comes free.
    pub fn set_storage_rate(&mut self, bytes_per_sec: Option<u64>) {
        self.storage_rate = bytes_per_sec;
    }

    /// Lets one background storage read go through up to `blocks` 4 KiB
    /// blocks nobody asked for (at most [`super::storage::MAX_READ_GAP`])
    /// rather than splitting in two: fewer, longer reads where a request
    /// costs more than its bytes (NBD over a network), fewer bytes read
    /// where it does not. Default [`super::storage::DEFAULT_READ_GAP`].
    pub fn set_storage_read_gap(&mut self, blocks: usize) {
        self.storage_read_gap = blocks.min(super::storage::MAX_READ_GAP);
    }

    /// Receives pages until every data connection ended, rebuilding
    /// referenced pages from `storage`, then answers the source's digest
    /// comparison; or, if the source switches to post-copy (only offered
    /// when `faults` is given), returns as soon as the switch is done.
    pub async fn receive(
        &mut self,
        ram: DestRam,
        storage: Option<Arc<dyn Storage>>,
        faults: Option<FaultSource>,
    ) -> Result<Received, DestError> {
        let pages = ram.pages();
        let heard = Arc::new(Heard::new());
        let (tx, rx) = mpsc::channel::<ApplyInput>(64);
        let (urgent_tx, urgent_rx) = mpsc::channel::<ApplyInput>(64);
        let (stored_tx, stored_rx) = mpsc::channel::<ApplyInput>(RESULTS_QUEUED);
        let conns = self.data.len();
        for s in std::mem::take(&mut self.data) {
            tokio::spawn(read_pages(s, tx.clone(), pages, heard.clone()));
        }
        drop(tx);
        let readers = storage.map(|st| {
            StorageReaders::start(
                st,
                stored_tx,
                heard.clone(),
                self.storage_rate,
                self.storage_read_gap,
            )
        });
        let faults = faults.map(Arc::new);
        let stop_faults = Arc::new(AtomicBool::new(false));
        let (end_tx, end_rx) = oneshot::channel();
        let stop = SessionStop {
            faults: stop_faults.clone(),
            _applier: end_tx,
        };
        if let Some(f) = &faults {
            let (f, t, stop) = (f.clone(), urgent_tx.clone(), stop_faults.clone());
            std::thread::Builder::new()
                .name("dbmigrate-faults".into())
                .spawn(move || fault_reader(f, t, stop))
                .map_err(|e| DestError::Worker(format!("starting the fault reader: {e}")))?;
        }
        let (out_tx, mut out_rx) = mpsc::unbounded_channel();
        let applier = Applier::new(ram, conns, readers, faults, out_tx)?;
        let inputs = Inputs::new(rx, stored_rx, urgent_rx, end_rx);
        // The RAM has one owner thread: ordering per page is the arrival order
        // on its connection, and pages never cross connections.
        let mut applier = tokio::task::spawn_blocking(move || applier.start(inputs));
        // Besides forwarding drain answers, the control connection carries
        // only an abort (or EOF from a dead source), the switch to
        // post-copy, and the digests, which may come before the last pages
        // have been applied.
        let mut early_request = None;
        let applied = loop {
            tokio::select! {
                biased;
                Some(m) = out_rx.recv() => {
                    self.ctrl_tx.send(m, "answering the source").await?;
                }
                r = &mut applier => break writer_outcome(r)?,
                () = tokio::time::sleep(Duration::from_secs(1)) => {
                    // A cut link shows as silence, not as an error. Once the
                    // digests came, the source waits for this side's answer.
                    if early_request.is_none() && heard.silence() > self.peer_timeout {
                        return Err(DestError::Timeout {
                            secs: self.peer_timeout.as_secs(),
                            doing: "receiving pages",
                        });
                    }
                }
                m = self.ctrl_in.recv(), if early_request.is_none() => {
                    heard.touch();
                    match m.ok_or(ProtocolError::Closed { doing: "watching the control connection" })?.map(|(m, _)| m) {
                        Ok(req @ ToDestination::VerifyRequest { .. }) => early_request = Some(req),
                        Ok(ToDestination::PrepareSwitch { stale }) => {
                            let stale = protocol::decode_page_bitmap(&stale, pages, "PrepareSwitch")?;
                            if urgent_tx.send(ApplyInput::Phase(Event::PrepareSwitch(stale))).await.is_err() {
                                return Err(stopped_writer(&mut applier).await);
                            }
                        }
                        Ok(ToDestination::Switch { pending }) => {
                            let bits = protocol::decode_page_bitmap(&pending, pages, "Switch")?;
                            if urgent_tx.send(ApplyInput::Phase(Event::Switch(bits))).await.is_err() {
                                return Err(stopped_writer(&mut applier).await);
                            }
                            return Ok(Received::Postcopy(PostcopyRun {
                                applier,
                                urgent: urgent_tx,
                                out: out_rx,
                                stop,
                                pages,
                            }));
                        }
                        Ok(ToDestination::Heartbeat) => {}
                        Ok(ToDestination::Abort { reason }) => return Err(DestError::SourceAborted { reason }),
                        Ok(other @ (ToDestination::Commit | ToDestination::PageBatch { .. })) => {
                            return Err(DestError::Unexpected { got: other.name(), expected: "pages" })
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        };
        drop(stop);
        while let Ok(m) = out_rx.try_recv() {
            self.ctrl_tx.send(m, "answering the source").await?;
        }
        self.compare_rounds(applied, early_request, pages).await
    }

    /// Every stream ended: the RAM received is compared with the source's
    /// digests (`early`: they came before the last pages were applied).
    async fn compare_rounds(
        &mut self,
        applied: Applied,
        early: Option<ToDestination>,
        pages: u64,
    ) -> Result<Received, DestError> {
        let Applied {
            ram,
            digests: ours,
            final_hash,
            stats,
        } = applied;
        self.stats = stats;

        let msg = match early {
            Some(m) => m,
            None => {
                self.read_ctrl("waiting for the source's RAM digests")
                    .await?
            }
        };
        self.stats.verify_ms = crate::stats::millis(final_hash);
        let total = self.compare(msg, &ours, pages).await?;
        Ok(Received::Complete {
            ram,
            matched: total == 0,
        })
    }

    /// Answers a VerifyRequest with the chunks that differ from `ours`.
    pub(super) async fn compare(
        &mut self,
        msg: ToDestination,
        ours: &[u128],
        pages: u64,
    ) -> Result<u32, DestError> {
        let ToDestination::VerifyRequest {
            chunk_pages,
            digests,
        } = msg
        else {
            return Err(DestError::Unexpected {
                got: msg.name(),
                expected: "VerifyRequest",
            });
        };
        let expected_chunks = pages.div_ceil(u64::from(chunk_pages));
        if digests.len() as u64 != expected_chunks {
            return Err(DestError::BadPage(format!(
                "{} digests for {expected_chunks} chunks",
                digests.len()
            )));
        }
        if chunk_pages != verify::CHUNK_PAGES {
            return Err(DestError::BadPage(format!(
                "digests over chunks of {chunk_pages} pages; this agent compares chunks of {}",
                verify::CHUNK_PAGES
            )));
        }
        let bad = verify::mismatched_chunks(ours, &digests);
        let total = u32::try_from(bad.len()).unwrap_or(u32::MAX);
        let listed = bad
            .into_iter()
            .take(protocol::MAX_REPORTED_MISMATCHES)
            .collect();
        self.ctrl_tx
            .send(
                ToSource::VerifyResult {
                    mismatched: listed,
                    mismatched_total: total,
                },
                "sending the RAM comparison",
            )
            .await?;
        Ok(total)
    }

    /// Waits for the source to hand over the VM. Ok(()) means: resume it now.
    pub async fn wait_commit(&mut self) -> Result<(), DestError> {
        match self.read_ctrl("waiting for Commit").await? {
            ToDestination::Commit => Ok(()),
            other => Err(DestError::Unexpected {
                got: other.name(),
                expected: "Commit",
            }),
        }
    }

    /// Tells the source the VM runs here now.
    pub async fn activated(&mut self) -> Result<(), DestError> {
        self.ctrl_tx
            .send(ToSource::Activated, "sending Activated")
            .await?;
        Ok(())
    }

    /// Tells the source why the destination gives up (best effort).
    pub async fn abort(&mut self, reason: &str) {
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.ctrl_tx.send(
                ToSource::Abort {
                    reason: reason.to_string(),
                },
                "sending Abort",
            ),
        )
        .await;
    }

    pub(super) async fn read_ctrl(
        &mut self,
        doing: &'static str,
    ) -> Result<ToDestination, DestError> {
        // The timeout runs from the last message: heartbeats show the
        // source alive while it waits for QEMU or hashes its RAM.
        let msg = loop {
            let (msg, _) = within(self.peer_timeout, doing, self.ctrl_in.recv())
                .await?
                .ok_or(ProtocolError::Closed { doing })??;
            if msg != ToDestination::Heartbeat {
                break msg;
            }
        };
        if let ToDestination::Abort { reason } = msg {
            return Err(DestError::SourceAborted { reason });
        }
        Ok(msg)
    }
}

/// Why the RAM owner stopped taking inputs: its own error, not the closed channel.
pub(super) async fn stopped_writer(
    applier: &mut tokio::task::JoinHandle<Result<Applied, DestError>>,
) -> DestError {
    match writer_outcome(applier.await) {
        Err(e) => e,
        Ok(_) => DestError::Worker("the RAM writer ended while pages were still coming".into()),
    }
}

/// What the RAM writer's task ended with.
pub(super) fn writer_outcome(
    r: Result<Result<Applied, DestError>, tokio::task::JoinError>,
) -> Result<Applied, DestError> {
    r.map_err(|e| DestError::Worker(format!("the RAM writer failed: {e}")))?
}
