//! The destination after a switch to post-copy: faults served and pages
//! placed by the RAM owner while the source hands the VM over; Commit
//! resumes the VM here; the placed pages are compared with the source's
//! frozen RAM once none is missing.

use std::time::{Duration, Instant};

use super::applier::{Applied, ApplyInput};
use super::session::{writer_outcome, DestSession, PostcopyRun};
use super::{DestError, DestStats};
use crate::protocol::{self, Control, ProtocolError, ToDestination, ToSource};

/// How long a finished post-copy waits for the source to close the control
/// connection (see [`DestSession::drain_until_closed`]).
const LINGER: Duration = Duration::from_secs(3);

/// Result of a finished post-copy.
#[derive(Clone, Debug)]
pub struct PostcopyOutcome {
    /// Every placed page matched the source's frozen RAM.
    pub matched: bool,
    /// The comparison took place (false: every page was placed and the VM
    /// runs, but the source went silent before sending its digests).
    pub compared: bool,
    /// Chunks that differed.
    pub mismatched_chunks: u32,
}

impl DestSession {
    /// Finishes a post-copy: serves the VM's faults and places the pages
    /// still to come while the source hands the VM over. On Commit it runs
    /// `resume` (which must resume the VM here) and confirms; the pages then
    /// keep arriving until none is missing (then `placed` runs, at once:
    /// the VM no longer depends on this session), and the placed pages are
    /// compared with the source's frozen RAM.
    pub async fn postcopy<F, P>(
        &mut self,
        mut run: PostcopyRun,
        resume: F,
        placed: P,
    ) -> Result<PostcopyOutcome, DestError>
    where
        F: std::future::Future<Output = Result<(), String>>,
        P: FnOnce(),
    {
        let mut placed = Some(placed);
        let mut resume = std::pin::pin!(resume);
        let (mut committed, mut resumed) = (false, false);
        let mut request: Option<ToDestination> = None;
        let mut applied: Option<Applied> = None;
        let mut last_word = Instant::now();
        loop {
            // The comparison waits for the resume: answering it ends the session.
            if let (Some(a), Some(req), true) = (&applied, &request, resumed) {
                let (req, pages) = (req.clone(), run.pages);
                let digests = a.digests.clone();
                self.stats = a.stats.clone();
                let total = match self.compare(req, &digests, pages).await {
                    Ok(t) => t,
                    Err(e) => return Ok(self.unverified(a, &e)),
                };
                self.drain_until_closed().await;
                return Ok(PostcopyOutcome {
                    matched: total == 0,
                    compared: true,
                    mismatched_chunks: total,
                });
            }
            tokio::select! {
                biased;
                Some(m) = run.out.recv() => {
                    self.ctrl_tx.send(m, "asking for pages").await?;
                }
                r = &mut run.applier, if applied.is_none() => {
                    applied = Some(writer_outcome(r)?);
                    run.stop.faults_done();
                    if let Some(f) = placed.take() {
                        f();
                    }
                }
                r = &mut resume, if committed && !resumed => {
                    resumed = true;
                    if let Err(reason) = r {
                        self.abort(&reason).await;
                        return Err(DestError::Resume(reason));
                    }
                    self.ctrl_tx.send(ToSource::Activated, "sending Activated").await?;
                }
                m = self.ctrl_in.recv() => {
                    last_word = Instant::now();
                    let m = match m.ok_or(ProtocolError::Closed { doing: "post-copy" }).and_then(|r| r) {
                        Ok((m, _)) => m,
                        Err(e) => match (&applied, resumed) {
                            // The VM runs here with every page: losing the
                            // source now costs only the comparison.
                            (Some(a), true) => return Ok(self.unverified(a, &e)),
                            _ => return Err(e.into()),
                        },
                    };
                    match m {
                        ToDestination::Commit => committed = true,
                        ToDestination::PageBatch { pages, .. } => {
                            protocol::check_pages("PageBatch", pages.iter().map(|e| e.page), run.pages)?;
                            // Every page is placed already: this is the answer to a
                            // request that storage or the background push beat.
                            if applied.is_some() {
                                continue;
                            }
                            if run.urgent.send(ApplyInput::Batch(pages)).await.is_err() {
                                // The writer may have placed the last page
                                // since the select above looked at it: then
                                // this batch is one more late answer.
                                applied = Some(writer_outcome((&mut run.applier).await)?);
                                run.stop.faults_done();
                                if let Some(f) = placed.take() {
                                    f();
                                }
                            }
                        }
                        m @ ToDestination::VerifyRequest { .. } => request = Some(m),
                        ToDestination::Heartbeat => {}
                        ToDestination::Abort { reason } => return Err(DestError::SourceAborted { reason }),
                        other @ (ToDestination::PrepareSwitch { .. } | ToDestination::Switch { .. }) => {
                            return Err(DestError::Unexpected { got: other.name(), expected: "post-copy pages" })
                        }
                    }
                }
                () = tokio::time::sleep(Duration::from_secs(1)) => {
                    if last_word.elapsed() > self.peer_timeout {
                        if let (Some(a), true) = (&applied, resumed) {
                            let silent = format!("no word for {} s", self.peer_timeout.as_secs());
                            return Ok(self.unverified(a, &silent));
                        }
                        return Err(DestError::Timeout {
                            secs: self.peer_timeout.as_secs(),
                            doing: if applied.is_none() { "post-copy (pages still missing)" } else { "post-copy (waiting for Commit)" },
                        });
                    }
                }
            }
        }
    }

    /// Every page is placed and the VM runs here, but the source can no
    /// longer compare them: stopping the VM now would lose it (the source
    /// cannot take it back), so it keeps running, unverified.
    fn unverified(&mut self, a: &Applied, why: &dyn std::fmt::Display) -> PostcopyOutcome {
        tracing::error!(%why, "post-copy: every page is placed and the VM runs here, but the source is gone before the comparison");
        self.stats = DestStats {
            postcopy_unverified: true,
            ..a.stats.clone()
        };
        PostcopyOutcome {
            matched: false,
            compared: false,
            mismatched_chunks: 0,
        }
    }

    /// Reads (and drops) what the source still sends until it closes the
    /// control connection, for at most [`LINGER`]: late answers to page
    /// requests may be on their way, and closing with them unread would
    /// reset the connection under the source before it reads the result.
    async fn drain_until_closed(&mut self) {
        let deadline = tokio::time::Instant::now() + LINGER;
        while let Ok(Some(Ok(_))) = tokio::time::timeout_at(deadline, self.ctrl_in.recv()).await {}
    }
}
