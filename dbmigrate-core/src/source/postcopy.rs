//! The source's side of post-copy: with the VM paused, the destination is
//! told which pages it does not have yet; once the VM runs there, pages
//! follow in the background, except that a page the VM waits for jumps the
//! queue (sent at once on the control connection, its nearest pending
//! neighbours right behind it, more of them at the front of the push, and
//! the push's sweep goes on from there), since a fault is usually followed
//! by faults next to it.
//!
//! ```text
//! source                                     destination
//!   | PrepareMark (each data conn), then        |  once all came (the
//!   |   PrepareSwitch{stale} (control;          |  connections are empty):
//!   |   VM still running) --------------------> |  punches stale pages and
//!   | <---------------------- SwitchPrepared     |  pages waiting for storage
//!   |  (VM paused)                               |
//!   | SwitchMark (each data conn) ------------> |
//!   | Switch{pending bitmap} (control) -------> |  punches stale pages,
//!   | <---------------------------- Switched     |  serves faults from here on
//!   | last-written pages (control) -----------> |  between page requests
//!   | pages (data conns, paced) --------------> |  (at most half the link)
//!   | <-------------------- PageRequest{pages}   |  a vCPU waits
//!   | PageBatch (control, at once) + neighbours>|
//!   |        ... QEMU moves device state ...     |
//!   | Commit ---------------------------------> |  resumes the VM
//!   | pages (data conns, full speed) ---------> |
//!   | <----------------------------- Activated   |
//!   | EndOfStream (each data conn) -----------> |
//!   | VerifyRequest{placed-page digests} -----> |
//!   | <---------------------------- VerifyResult |  once every page is placed
//! ```
//!
//! After Commit the source can no longer take the VM back; it keeps its
//! (frozen) RAM until the destination has confirmed every page.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::push::{push, PushOrder, PushQueue, FREE, PACED, STOPPED};
use super::session::WriterCmd;
use super::{link_rate, SourceError, SourceSession};
use crate::bitmap::PageBitmap;
use crate::protocol::{
    self, BatchBuilder, DataMessage, PageEncoder, ProtocolError, ToDestination, ToSource,
};
use crate::verify;

/// Pages around a faulting page pushed next (the sysbench VM's faults
/// come in runs going up and down from the first one).
const NEIGHBOURS_BELOW: u64 = 64;
const NEIGHBOURS_ABOVE: u64 = 64;

/// Of those, how many go with the requested page on the control
/// connection (the nearest, 256 KiB: 2 ms of a 1 Gbit/s link); the rest go
/// to the front of the background push, which may be queued behind
/// megabytes already on their way.
const PREFETCH: usize = 64;

/// Most pages written since the last collect sent on the control
/// connection at the switch (2 MiB: 16 ms of a 1 Gbit/s link).
const HOTTEST_ON_CONTROL: usize = 512;

/// Last-written pages sent at a time between other work of the post-copy
/// loop (256 KiB, 2 ms at 1 Gbit/s: the longest a page request waits behind them).
const HOTTEST_PER_TURN: usize = 64;

/// What a finished post-copy did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PostcopyStats {
    /// Pages the destination did not have at the switch.
    pub pending_pages: u64,
    /// Pages pushed in the background, and the last-written pages sent on
    /// the control connection at the switch.
    pub pushed_pages: u64,
    /// Pages sent because the VM waited for them.
    pub requested_pages: u64,
    /// Pending neighbours sent right behind them (on the control connection).
    pub prefetched_pages: u64,
    /// Requested pages that were not pending: their reference did not match storage.
    pub storage_mismatch: u64,
    /// Bytes sent after the switch (both kinds).
    pub bytes: u64,
    /// Switch to the last page of the background push handed to the connections.
    pub push_ms: u64,
    /// Every placed page matched the frozen RAM.
    pub ram_verified: bool,
    /// Chunks that differed.
    pub mismatched_chunks: u32,
}

/// A switch to post-copy in progress.
pub struct Switched {
    pending: PageBitmap,
    /// Pages to send on the control connection at the switch (the last
    /// written), in the gaps of the hand-over's other traffic.
    hottest: Vec<u64>,
    queue: Arc<Mutex<PushQueue>>,
    pusher: tokio::task::JoinHandle<Option<(u64, u64)>>,
    digests: tokio::task::JoinHandle<Vec<u128>>,
    /// PACED until Commit (the device state moves meanwhile), then FREE;
    /// STOPPED if the hand-over ends without a Commit.
    pace: Arc<AtomicU8>,
    /// Starts hashing the frozen RAM: sent once the destination runs the
    /// VM (or the push is done), so that two hashing threads do not slow
    /// the destination's loading of device state inside the pause.
    start_digests: Option<std::sync::mpsc::Sender<()>>,
    started: Instant,
}

impl Switched {
    fn free_push(&self) {
        self.pace.store(FREE, Ordering::Release);
    }

    fn start_digests(&mut self) {
        if let Some(go) = self.start_digests.take() {
            let _ = go.send(());
        }
    }
}

impl SourceSession {
    /// Call with the VM still running, right before pausing it for
    /// [`SourceSession::switch_to_postcopy`]: the destination punches the
    /// pages still waiting for storage out of its RAM now (after a first
    /// round, most of the buffer pool), which would otherwise be done
    /// inside the pause.
    pub async fn prepare_switch(&mut self) -> Result<(), SourceError> {
        if !self.destination_postcopy() {
            return Err(no_postcopy_destination());
        }
        // Behind the last round's pages: the answer comes once they are in.
        // The pause then starts with empty connections, and the switch's
        // markers do not wait inside it for megabytes still in the sockets
        // and the link's queue (35-40 ms at 1 Gbit/s, measured).
        self.mark_data_connections(DataMessage::PrepareMark).await?;
        // Pages written since the round's collect will be pending too; with
        // the others they are stale at the destination, which punches them
        // out now rather than inside the pause (11-13 ms for 64 MiB).
        self.tracker.collect(&mut self.pending)?;
        self.mark_written();
        let stale = protocol::encode_page_bitmap(&self.pending);
        self.stats.bytes_sent += self
            .ctrl_tx
            .send(
                ToDestination::PrepareSwitch { stale },
                "preparing the switch to post-copy",
            )
            .await?;
        match self
            .read_ctrl("waiting for the destination to prepare the switch")
            .await?
        {
            ToSource::SwitchPrepared => Ok(()),
            other => Err(self.unexpected(other, "SwitchPrepared")),
        }
    }

    /// Sends `mark` on every data connection, behind what each already carries.
    async fn mark_data_connections(&mut self, mark: DataMessage) -> Result<(), SourceError> {
        let frame = mark.frame();
        for c in &self.data {
            if c.tx.send(WriterCmd::Frame(frame.clone())).await.is_err() {
                return Err(self.writer_error().await);
            }
        }
        Ok(())
    }

    /// Call with the VM paused, after [`SourceSession::run_live`]: tells the
    /// destination which pages it still lacks and starts pushing them. The
    /// source stays authoritative until [`SourceSession::postcopy`] commits.
    pub async fn switch_to_postcopy(&mut self) -> Result<Switched, SourceError> {
        if !self.destination_postcopy() {
            return Err(no_postcopy_destination());
        }
        self.stop_pacing();
        // With the VM paused nothing is written after this collect. What it
        // reports was written since the last collect, the moments before the
        // pause: the pages the guest is likeliest to touch first, sent first.
        let mut last_written = PageBitmap::new(self.ram.pages());
        self.tracker.collect(&mut last_written)?;
        self.pending.union_with(&last_written);
        self.mark_written();
        let pending = std::mem::replace(&mut self.pending, PageBitmap::new(self.ram.pages()));
        tracing::debug!(
            pending = pending.count(),
            written_since_last_collect = last_written.count(),
            "switching to post-copy"
        );
        let started = Instant::now();
        self.mark_data_connections(DataMessage::SwitchMark).await?;
        let bytes = protocol::encode_page_bitmap(&pending);
        self.stats.bytes_sent += self
            .ctrl_tx
            .send(
                ToDestination::Switch { pending: bytes },
                "switching to post-copy",
            )
            .await?;
        match self
            .read_ctrl("waiting for the destination to take over faults")
            .await?
        {
            ToSource::Switched => {}
            other => return Err(self.unexpected(other, "Switched")),
        }
        // The pages written since the last collect, the ones the guest is
        // likeliest to touch first (and QEMU's device state, as it loads),
        // go on the control connection: the data connections may still
        // carry the end of the first round. They go while the device state
        // moves, a few at a time between page requests (see
        // [`SourceSession::postcopy`]): sent before the hand-over starts,
        // 2 MiB of them added 16 ms to the pause at 1 Gbit/s.
        // At most HOTTEST_ON_CONTROL of them: a guest that rewrites tens of
        // megabytes a second would otherwise queue its faults' pages (and
        // the device state, on the same link) behind them; the rest go to
        // the front of the push.
        let written: Vec<u64> = last_written.iter().collect();
        let (hottest, rest_of_hottest) = written.split_at(written.len().min(HOTTEST_ON_CONTROL));
        let mut on_control = PageBitmap::new(self.ram.pages());
        for &p in hottest {
            on_control.set(p);
        }
        // The RAM is frozen now: its digests can be taken while pages move.
        // The rounds kept them current but for the pages written since the
        // last refresh (marked above); only those are hashed again.
        let ram = self.ram.clone();
        let threads = self.cfg.verify_threads;
        let kept = self.source_digests.take();
        let (start_digests, go) = std::sync::mpsc::channel::<()>();
        let digests = tokio::task::spawn_blocking(move || {
            if go.recv().is_err() {
                // The post-copy ended before the VM ran on the destination.
                return Vec::new();
            }
            let data = ram.data_pages().unwrap_or_else(|_| {
                let mut all = PageBitmap::new(ram.pages());
                all.set_range(0, ram.pages());
                all
            });
            if let Some(mut d) = kept {
                d.refresh(ram.bytes(), &data, threads);
                if d.is_current() {
                    return d.digests().to_vec();
                }
            }
            verify::ram_digests(ram.bytes(), &data, verify::CHUNK_PAGES, threads)
        });
        let queue = Arc::new(Mutex::new(PushQueue {
            hot: rest_of_hottest.iter().copied().collect(),
            sent: on_control.clone(),
            on_control,
            jump_to: None,
        }));
        let (ram, txs, q, todo) = (
            self.ram.clone(),
            self.data.iter().map(|c| c.tx.clone()).collect::<Vec<_>>(),
            queue.clone(),
            PushOrder {
                pending: pending.iter().collect(),
            },
        );
        let compress = self.cfg.compress;
        let link = link_rate(&self.history, self.cfg.bandwidth);
        let pace = Arc::new(AtomicU8::new(PACED));
        let pace_for_push = pace.clone();
        let pusher = tokio::task::spawn_blocking(move || {
            push(&ram, &todo, &q, &txs, compress, &pace_for_push, link)
        });
        Ok(Switched {
            pending,
            hottest: hottest.to_vec(),
            queue,
            pusher,
            digests,
            pace,
            start_digests: Some(start_digests),
            started,
        })
    }

    /// Serves the destination's page requests while `handover` moves the
    /// device state, then commits (from here on the VM runs on the
    /// destination), and waits until every page is placed and compared.
    /// `on_activated` is called when the destination runs the VM.
    ///
    /// An error before Commit leaves the source authoritative (resume it);
    /// after Commit the VM cannot come back, see [`PostcopyError`].
    pub async fn postcopy<F>(
        &mut self,
        mut sw: Switched,
        handover: F,
        on_activated: &mut (dyn FnMut() + Send),
    ) -> Result<PostcopyStats, PostcopyError>
    where
        F: std::future::Future<Output = Result<(), String>>,
    {
        let mut stats = PostcopyStats {
            pending_pages: sw.pending.count(),
            pushed_pages: sw.hottest.len() as u64,
            ..PostcopyStats::default()
        };
        let before = |e: SourceError| PostcopyError::BeforeCommit(e);
        // Reads are done by their own task: a frame is never cut in half by
        // another branch of the loop below.
        let rx = self.ctrl_rx.take().ok_or_else(|| {
            before(SourceError::Worker(
                "control connection already taken".into(),
            ))
        })?;
        let (mut ctrl_in, reader) = crate::control::spawn_reader(rx, "post-copy", self.ram.len());
        let mut result = self
            .postcopy_loop(&mut sw, handover, on_activated, &mut ctrl_in, &mut stats)
            .await;
        match &mut result {
            Err(e) => explain_transport_failure(e, &mut ctrl_in).await,
            // The destination lingers until this side closes: the session is over.
            Ok(()) => self.ctrl_tx.shutdown().await,
        }
        reader.abort();
        result.map(|()| stats)
    }

    async fn postcopy_loop<F>(
        &mut self,
        sw: &mut Switched,
        handover: F,
        on_activated: &mut (dyn FnMut() + Send),
        ctrl_in: &mut crate::control::Incoming<ToSource>,
        stats: &mut PostcopyStats,
    ) -> Result<(), PostcopyError>
    where
        F: std::future::Future<Output = Result<(), String>>,
    {
        let mut handover = std::pin::pin!(handover);
        let (mut committed, mut activated, mut pushed, mut verify_sent) =
            (false, false, false, false);
        let pages = self.ram.pages();
        let timeout = self.cfg.peer_timeout;
        let mut last_word = Instant::now();
        // An answer to a page request that could not be written: the
        // destination may have finished (every page placed, compared) and
        // closed while the answer was on its way, its Activated and
        // VerifyResult already read. Those decide; this error stands only
        // if the connection ends without them.
        let mut unanswered: Option<PostcopyError> = None;
        let mut hot_next = 0;
        loop {
            let was_committed = committed;
            let fail = move |e: SourceError| {
                if was_committed {
                    PostcopyError::AfterCommit(e)
                } else {
                    PostcopyError::BeforeCommit(e)
                }
            };
            tokio::select! {
                biased;
                m = ctrl_in.recv() => {
                    last_word = Instant::now();
                    let (m, n) = match m
                        .ok_or(protocol::ProtocolError::Closed { doing: "post-copy" })
                        .and_then(|r| r)
                    {
                        Ok(m) => m,
                        Err(e) => return Err(unanswered.take().unwrap_or_else(|| fail(e.into()))),
                    };
                    self.stats.bytes_received += n;
                    match m {
                        ToSource::PageRequest { pages: asked } => {
                            if let Err(e) = protocol::check_pages("PageRequest", asked.iter().copied(), pages) {
                                return Err(fail(e.into()));
                            }
                            stats.requested_pages += asked.len() as u64;
                            stats.storage_mismatch +=
                                asked.iter().filter(|&&p| !sw.pending.get(p)).count() as u64;
                            if unanswered.is_none() {
                                if let Err(e) = self.send_urgent(&asked, sw, stats).await {
                                    tracing::debug!(error = %e, "a page request's answer could not be sent; reading what the destination said before it closed");
                                    unanswered = Some(fail(e));
                                }
                            }
                        }
                        ToSource::Activated if committed => {
                            activated = true;
                            sw.start_digests();
                            on_activated();
                        }
                        ToSource::VerifyResult { mismatched_total, .. } if activated && verify_sent => {
                            stats.ram_verified = mismatched_total == 0;
                            stats.mismatched_chunks = mismatched_total;
                            self.stats.ram_verified = Some(mismatched_total == 0);
                            self.stats.mismatched_chunks = mismatched_total;
                            return Ok(());
                        }
                        ToSource::Heartbeat => {}
                        ToSource::Abort { reason } => return Err(fail(SourceError::PeerAbort { reason })),
                        other => return Err(fail(self.unexpected(other, "PageRequest, Activated or VerifyResult"))),
                    }
                }
                r = &mut handover, if !committed => {
                    if let Err(reason) = r {
                        return Err(PostcopyError::BeforeCommit(SourceError::Worker(reason)));
                    }
                    // Point of no return: the destination resumes the VM on Commit.
                    committed = true;
                    self.stats.bytes_sent += self.ctrl_tx.send(ToDestination::Commit, "sending Commit")
                        .await
                        .map_err(|e| PostcopyError::AfterCommit(e.into()))?;
                    sw.free_push();
                }
                r = &mut sw.pusher, if !pushed => {
                    pushed = true;
                    stats.push_ms = crate::stats::millis(sw.started.elapsed());
                    sw.start_digests();
                    self.end_push(r, stats).await.map_err(fail)?;
                }
                // Ready at once: taken when none of the branches above is
                // (the digests below come only after the push, long after).
                () = std::future::ready(()), if hot_next < sw.hottest.len() => {
                    let end = (hot_next + HOTTEST_PER_TURN).min(sw.hottest.len());
                    let chunk = sw.hottest[hot_next..end].to_vec();
                    hot_next = end;
                    stats.bytes += self.send_on_control(&chunk).await.map_err(fail)?;
                }
                d = &mut sw.digests, if pushed && !verify_sent => {
                    let digests = d.map_err(|e| fail(SourceError::Worker(e.to_string())))?;
                    verify_sent = true;
                    self.stats.bytes_sent += self.ctrl_tx.send(ToDestination::VerifyRequest { chunk_pages: verify::CHUNK_PAGES, digests },
                        "sending the digests of the frozen RAM",
                    )
                    .await
                    .map_err(|e| fail(e.into()))?;
                }
                () = tokio::time::sleep(Duration::from_secs(1)) => {
                    if last_word.elapsed() > timeout && (committed || pushed) {
                        return Err(fail(SourceError::Timeout { secs: timeout.as_secs(), doing: "post-copy" }));
                    }
                }
            }
        }
    }

    /// Sends the pages a vCPU waits for on the control connection, then a
    /// few of their pending neighbours right behind them; the other
    /// neighbours move to the front of the background push.
    async fn send_urgent(
        &mut self,
        asked: &[u64],
        sw: &Switched,
        stats: &mut PostcopyStats,
    ) -> Result<(), SourceError> {
        let pages = self.ram.pages();
        let prefetch = {
            let mut q = sw
                .queue
                .lock()
                .map_err(|_| SourceError::Worker("push queue poisoned".into()))?;
            // A page the push already handed to a connection is on its way
            // but queued behind other pages: a sign of a deep pipeline.
            let already_pushed = asked.iter().filter(|&&p| !q.sent.set(p)).count();
            for &p in asked {
                q.on_control.set(p);
            }
            q.jump_to = asked.last().copied();
            let q = &mut *q;
            let prefetch = pick_neighbours(asked, pages, &sw.pending, q);
            tracing::debug!(
                asked = asked.len(),
                already_pushed,
                prefetched = prefetch.len(),
                first = asked.first().copied().unwrap_or_default(),
                ms_since_switch = crate::stats::millis(sw.started.elapsed()),
                "page request"
            );
            prefetch
        };
        stats.prefetched_pages += prefetch.len() as u64;
        // The asked pages in frames of their own: the vCPU waits for these.
        stats.bytes += self.send_on_control(asked).await?;
        stats.bytes += self.send_on_control(&prefetch).await?;
        Ok(())
    }

    /// The push handed its last page to the data connections (`pushed`):
    /// each connection ends its stream.
    async fn end_push(
        &mut self,
        pushed: Result<Option<(u64, u64)>, tokio::task::JoinError>,
        stats: &mut PostcopyStats,
    ) -> Result<(), SourceError> {
        let stopped = || SourceError::Worker("a data connection stopped during post-copy".into());
        let (n, bytes) = pushed
            .map_err(|e| SourceError::Worker(e.to_string()))?
            .ok_or_else(stopped)?;
        stats.pushed_pages += n;
        stats.bytes += bytes;
        let end = DataMessage::EndOfStream.frame();
        for c in std::mem::take(&mut self.data) {
            if c.tx.send(WriterCmd::Frame(end.clone())).await.is_err() {
                return Err(stopped());
            }
            drop(c.tx);
            let sent = c
                .task
                .await
                .map_err(|e| SourceError::Worker(e.to_string()))?;
            // A data connection's count covers its whole life: the rounds
            // before the switch and the push after it.
            self.stats.bytes_sent += sent?;
        }
        Ok(())
    }

    /// Sends `pages` of the frozen RAM on the control connection, 256 to a
    /// frame; returns the bytes sent.
    async fn send_on_control(&mut self, pages: &[u64]) -> Result<u64, SourceError> {
        let mut bytes = 0;
        // Uncompressed: a vCPU waits for these.
        let mut encoder = PageEncoder::new(false);
        for chunk in pages.chunks(256) {
            let mut b = BatchBuilder::new(u32::MAX);
            for &p in chunk {
                encoder.push(&mut b, p, self.ram.page(p)?);
            }
            let n = self
                .ctrl_tx
                .send_batch(b, "sending pages on the control connection")
                .await?;
            bytes += n;
            self.stats.bytes_sent += n;
        }
        Ok(bytes)
    }
}

/// The pending neighbours of `asked` to send on the control connection
/// (up to [`PREFETCH`], nearest first, marked sent there); farther ones
/// not sent yet go to the front of the push (pure but for `q`).
fn pick_neighbours(asked: &[u64], pages: u64, pending: &PageBitmap, q: &mut PushQueue) -> Vec<u64> {
    let mut prefetch = Vec::new();
    for &p in asked {
        for n in neighbours(p, pages) {
            if !pending.get(n) || q.on_control.get(n) {
                continue;
            }
            if prefetch.len() < PREFETCH {
                q.on_control.set(n);
                q.sent.set(n);
                prefetch.push(n);
            } else if !q.sent.get(n) {
                q.hot.push_back(n);
            }
        }
    }
    prefetch
}

/// The pages around `page` that a vCPU is likely to touch next, nearest
/// first, above before below at equal distance (pure).
fn neighbours(page: u64, pages: u64) -> impl Iterator<Item = u64> {
    (1..=NEIGHBOURS_ABOVE).flat_map(move |d| {
        let above = page.checked_add(d).filter(|&n| n < pages);
        let below = (d <= NEIGHBOURS_BELOW)
            .then(|| page.checked_sub(d))
            .flatten();
        above.into_iter().chain(below)
    })
}

/// Failure of a post-copy, by whether the VM can still come back to the source.
#[derive(Debug, thiserror::Error)]
pub enum PostcopyError {
    /// Before Commit: the destination never ran the VM; resume the source.
    #[error("post-copy failed before the hand-over (the source VM is still authoritative)")]
    BeforeCommit(#[source] SourceError),
    /// After Commit: the destination may run the VM; it must not be resumed here.
    #[error("post-copy failed after the hand-over: the VM runs (or ran) on the destination and cannot be resumed on the source; its RAM stays frozen here")]
    AfterCommit(#[source] SourceError),
}

/// A write that failed because the destination closed the connection hides
/// why it did: the destination says so in an Abort just before closing.
/// Looks briefly for that Abort among the messages already read, and puts
/// its reason in place of the transport error.
async fn explain_transport_failure(
    e: &mut PostcopyError,
    ctrl_in: &mut crate::control::Incoming<ToSource>,
) {
    let inner = match e {
        PostcopyError::BeforeCommit(i) | PostcopyError::AfterCommit(i) => i,
    };
    // Only a failed read or write: a malformed message is this side's finding.
    if !matches!(
        inner,
        SourceError::Protocol(ProtocolError::Io { .. } | ProtocolError::Closed { .. })
    ) {
        return;
    }
    let deadline = tokio::time::Instant::now() + ABORT_GRACE;
    while let Ok(Some(m)) = tokio::time::timeout_at(deadline, ctrl_in.recv()).await {
        match m {
            Ok((ToSource::Abort { reason }, _)) => {
                *inner = SourceError::PeerAbort { reason };
                return;
            }
            Ok(_) => continue,
            Err(_) => return,
        }
    }
}

/// How long a failed post-copy waits for the destination's reason.
const ABORT_GRACE: Duration = Duration::from_millis(500);

fn no_postcopy_destination() -> SourceError {
    SourceError::Worker(
        "the destination agent cannot serve post-copy (start `dbmigrate receive` with --postcopy-socket)".into(),
    )
}

impl Drop for Switched {
    fn drop(&mut self) {
        // A hand-over that failed before Commit: the VM resumes on the
        // source, whose RAM the pusher must stop reading.
        let _ = self
            .pace
            .compare_exchange(PACED, STOPPED, Ordering::AcqRel, Ordering::Acquire);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::collections::VecDeque;

    #[test]
    fn a_faults_neighbours_go_on_the_control_connection_even_if_pushed_already() {
        let pages = 1000;
        let mut pending = PageBitmap::new(pages);
        pending.set_range(400, 600);
        let mut q = PushQueue {
            hot: VecDeque::new(),
            sent: PageBitmap::new(pages),
            on_control: PageBitmap::new(pages),
            jump_to: None,
        };
        // 501 was handed to a data connection (maybe still queued there),
        // 499 already went on the control connection.
        q.sent.set(501);
        q.sent.set(499);
        q.on_control.set(499);
        q.sent.set(500);
        q.on_control.set(500);
        let picked = pick_neighbours(&[500], pages, &pending, &mut q);
        assert_eq!(picked.len(), PREFETCH);
        assert_eq!(&picked[..3], &[501, 502, 498]);
        assert!(!picked.contains(&499));
        assert!(picked.iter().all(|&p| q.on_control.get(p) && q.sent.get(p)));
        // The rest of the neighbourhood, farther out, goes to the push.
        assert_eq!(
            q.hot.len() as u64,
            NEIGHBOURS_ABOVE + NEIGHBOURS_BELOW - 1 - PREFETCH as u64
        );
        assert!(q
            .hot
            .iter()
            .all(|&p| !picked.contains(&p) && pending.get(p)));
        // A second fault there sends the next nearest, nothing twice.
        let again = pick_neighbours(&[500], pages, &pending, &mut q);
        assert_eq!(
            again.len() as u64,
            NEIGHBOURS_ABOVE + NEIGHBOURS_BELOW - 1 - PREFETCH as u64
        );
        assert!(again.iter().all(|p| !picked.contains(p)));
        assert!(pick_neighbours(&[500], pages, &pending, &mut q).is_empty());
    }

    #[test]
    fn neighbours_come_nearest_first_and_stay_inside_ram() {
        let n: Vec<u64> = neighbours(100, 1000).take(5).collect();
        assert_eq!(n, vec![101, 99, 102, 98, 103]);
        let all: Vec<u64> = neighbours(100, 1000).collect();
        assert_eq!(all.len() as u64, NEIGHBOURS_ABOVE + NEIGHBOURS_BELOW);
        assert!(neighbours(0, 1).next().is_none());
        let edge: Vec<u64> = neighbours(1, 3).collect();
        assert_eq!(edge, vec![2, 0]);
    }
}
