//! [`SourceSession`]: the control and data connections to the destination
//! agent, the rounds, stop-and-copy, the switchover verification and Commit.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::adaptive::{GuestSignal, Pacing};
use super::hello::{connect_retrying, session_hello, session_id};
use super::policy::{decide, references_in_round, Decision, Mode, RoundObservation, StopReason};
use super::round::{
    produce_round, read_after_collect, RoundJob, RoundProgress, COLLECT_EVERY, RAW_PASS_NOT_STARTED,
};
use super::sent::SentPages;
use super::{Frozen, SourceConfig, SourceError, Verified, VerifyOutcome};
use crate::bitmap::PageBitmap;
use crate::control::{within, ControlWriter};
use crate::dirty::{DirtyTracker, TrackerKind};
use crate::limiter::RateLimiter;
use crate::protocol::{
    self, Control, DataFrame, DataMessage, Message, ProtocolError, ToDestination, ToSource, Welcome,
};
use crate::ram::{RamError, SourceRam};
use crate::rebuild::HintSource;
use crate::stats::{mbit_per_s, MigrationStats, RoundStats};
use crate::transport::{Conn, ConnReader, ConnWriter};
use crate::verify;
use crate::PAGE_SIZE;

/// What a data connection's writer task is asked to do.
pub(super) enum WriterCmd {
    /// Send a frame that belongs on a data connection.
    Frame(DataFrame),
    /// Answer once every frame before this one was written.
    Barrier(oneshot::Sender<()>),
}

pub(super) struct DataConn {
    pub(super) tx: mpsc::Sender<WriterCmd>,
    pub(super) task: JoinHandle<Result<u64, ProtocolError>>,
}

/// The source end of one migration.
pub struct SourceSession {
    pub(super) ram: Arc<SourceRam>,
    pub(super) tracker: Box<dyn DirtyTracker>,
    pub(super) cfg: SourceConfig,
    /// None once post-copy hands it to its reader task.
    pub(super) ctrl_rx: Option<ConnReader>,
    pub(super) ctrl_tx: ControlWriter<ToDestination>,
    pub(super) data: Vec<DataConn>,
    welcome: Welcome,
    /// The destination agent.
    addr: SocketAddr,
    /// The id of this session, carried by every connection's Hello.
    session_id: u64,
    pub(super) history: Vec<RoundObservation>,
    pub(super) pending: PageBitmap,
    /// Pages the destination could not rebuild: always sent raw from now on.
    no_ref: PageBitmap,
    /// What the destination holds of each page, where writes are tracked
    /// a huge page at a time (RAM on hugetlbfs); None elsewhere.
    sent: Option<SentPages>,
    round: u32,
    /// Digests kept current while the VM runs (None while a refresh has them).
    pub(super) source_digests: Option<verify::SourceDigests>,
    /// Dirty tracking was armed and the first round's pages chosen.
    armed: bool,
    /// The pace of the pages while the VM runs here (see [`Pacing`]).
    pacing: Pacing,
    /// Statistics so far.
    pub stats: MigrationStats,
}

/// How a round is sent.
#[derive(Clone, Copy, Debug)]
struct RoundOptions {
    /// Zero pages are not sent (the destination's RAM starts as holes).
    skip_zero: bool,
    /// Wait until the destination applied the round, storage reads included.
    drain: bool,
    /// The VM runs meanwhile: the pages it writes are collected as the
    /// round goes (see [`COLLECT_EVERY`]); those the round had read
    /// already are pending.
    live: bool,
}

impl SourceSession {
    /// Connects to the destination agent, announces the RAM and opens the data connections.
    pub async fn connect(
        addr: SocketAddr,
        ram: SourceRam,
        tracker: Box<dyn DirtyTracker>,
        cfg: SourceConfig,
    ) -> Result<Self, SourceError> {
        let conns = cfg.connections.clamp(1, protocol::MAX_DATA_CONNECTIONS);
        let session = session_id();
        let files = ram.file_sizes();
        let hello = |conn_index| session_hello(session, &files, conns, conn_index, &cfg.disks);
        let tcp = connect_retrying(addr, cfg.peer_timeout.min(Duration::from_secs(10))).await?;
        let (mut ctrl_rx, mut ctrl_tx) = cfg.connector.secure(tcp, addr).await?.split();
        let mut stats = MigrationStats::default();
        stats.bytes_sent +=
            protocol::write_message(&mut ctrl_tx, &hello(0), "sending Hello").await?;
        let (msg, n) = match within(
            cfg.peer_timeout,
            "waiting for the destination to reserve RAM",
            protocol::read_message(&mut ctrl_rx, "waiting for Welcome"),
        )
        .await?
        {
            Ok(r) => r,
            Err(ProtocolError::Closed { .. }) if cfg.connector.is_tls() => {
                return Err(SourceError::Unwelcome)
            }
            Err(e) => return Err(e.into()),
        };
        stats.bytes_received += n;
        let welcome = match msg {
            Message::Welcome(w) => w,
            Message::Refuse { reason } | Message::Abort { reason } => {
                return Err(SourceError::PeerAbort { reason })
            }
            other => {
                return Err(SourceError::Unexpected {
                    got: other.name(),
                    expected: "Welcome",
                })
            }
        };
        let limiter = Arc::new(RateLimiter::new(cfg.bandwidth));
        let pacing = Pacing::off();
        let mut data = Vec::new();
        for i in 1..=conns {
            let (_r, mut w) = cfg.connector.connect(addr).await?.split();
            stats.bytes_sent += protocol::write_message(&mut w, &hello(i), "sending Hello").await?;
            let (tx, rx) = mpsc::channel(8);
            let paces = Paces {
                link: limiter.clone(),
                pages: pacing.pace.clone(),
                moved: pacing.moved.clone(),
            };
            let task = tokio::spawn(data_writer(w, rx, paces, cfg.peer_timeout));
            data.push(DataConn { tx, task });
        }
        let pages = ram.pages();
        let ctrl_tx = ControlWriter::new(ctrl_tx, cfg.peer_timeout);
        let sent = ram.huge_pages().then(|| SentPages::new(pages));
        Ok(Self {
            ram: Arc::new(ram),
            tracker,
            cfg,
            ctrl_rx: Some(ctrl_rx),
            ctrl_tx,
            data,
            welcome,
            addr,
            session_id: session,
            history: Vec::new(),
            pending: PageBitmap::new(pages),
            no_ref: PageBitmap::new(pages),
            sent,
            round: 0,
            source_digests: Some(verify::SourceDigests::new(pages, verify::CHUNK_PAGES)),
            armed: false,
            pacing,
            stats,
        })
    }

    /// Paces the pages the rounds move so that the guest's vCPUs, read
    /// from `signal`, wait at most `budget` (0..1 of their runnable time)
    /// more than their `baseline` share before the migration (see
    /// [`Pacing`]). Until the VM pauses.
    pub fn pace_by_guest(&mut self, signal: Box<dyn GuestSignal>, budget: f64, baseline: f64) {
        self.pacing.start(signal, budget, baseline);
    }

    /// The VM no longer runs here: the pages go unpaced; the controller's
    /// decisions go into the statistics.
    pub fn stop_pacing(&mut self) {
        let steps = self.pacing.stop();
        if !steps.is_empty() {
            self.stats.pacing = steps;
        }
    }

    /// Arms dirty tracking and takes every page with data for the first
    /// round. [`SourceSession::run_live`] does it if not done before; done
    /// early, it overlaps other preparation (the guest's hints): a write
    /// after this point shows up in the next collect, so no write can fall
    /// between rounds, whenever the first round starts.
    pub fn arm_tracking(&mut self) -> Result<(), SourceError> {
        self.tracker.reset()?;
        self.pending = self.ram.data_pages()?;
        self.armed = true;
        Ok(())
    }

    /// Hints for the rounds to come, on the disks of
    /// [`SourceConfig::disks`](super::SourceConfig::disks).
    pub fn set_hints(&mut self, hints: Arc<dyn HintSource>) {
        self.cfg.hints = Some(hints);
    }

    /// Counts what the rounds from now on send of each page label in
    /// `census`.
    pub fn set_census(&mut self, census: Arc<crate::census::Census>) {
        self.cfg.census = Some(census);
    }

    /// Opens the connection that carries the VMM's device state to the
    /// destination agent, secured as the others and introduced as this
    /// session's [`protocol::DEVICE_STATE_CONN`]. The caller relays the
    /// VMM's stream over it; the destination agent relays it to its VMM.
    pub async fn open_device_state(&self) -> Result<Conn, SourceError> {
        let mut conn = self.cfg.connector.connect(self.addr).await?;
        let conns = u16::try_from(self.data.len()).expect("at most 16");
        let hello = session_hello(
            self.session_id,
            &self.ram.file_sizes(),
            conns,
            protocol::DEVICE_STATE_CONN,
            &self.cfg.disks,
        );
        protocol::write_message(&mut conn, &hello, "introducing the device-state connection")
            .await?;
        Ok(conn)
    }

    /// Whether the destination can serve post-copy faults.
    pub fn destination_postcopy(&self) -> bool {
        self.welcome.postcopy
    }

    /// Runs live rounds until the stop decision; `on_round` sees each round and the decision.
    pub async fn run_live(
        &mut self,
        on_round: &mut (dyn FnMut(&RoundStats, &Decision) + Send),
    ) -> Result<Decision, SourceError> {
        if !self.armed {
            self.arm_tracking()?;
        }
        loop {
            let to_send = std::mem::replace(&mut self.pending, PageBitmap::new(self.ram.pages()));
            let round = self.round;
            // Post-copy hands over right after the first round is on the
            // wire: the destination finishes its storage reads while the VM runs.
            let first_only = self.cfg.mode == Mode::Postcopy && self.welcome.postcopy;
            // Round 0 skips zero pages: the destination RAM starts as holes.
            let sent = self
                .send_round_with(
                    &to_send,
                    round,
                    RoundOptions {
                        skip_zero: round == 0,
                        drain: !first_only,
                        live: true,
                    },
                )
                .await;
            let mut rs = sent?;
            // The round hashed what it read; what it did not read (holes,
            // hash as zeros unread) is brought up to date here, never
            // during a collect. After the first round a round reads every
            // page it was given, and there is nothing left to refresh.
            if !self
                .source_digests
                .as_ref()
                .is_some_and(verify::SourceDigests::is_current)
            {
                let hashing = self.refresh_digests(1);
                self.source_digests = Some(Self::refreshed(hashing).await?);
            }
            let scan = Instant::now();
            let dirty = self.tracker.collect(&mut self.pending)?;
            self.mark_written();
            tracing::debug!(
                round,
                dirty,
                scan_us = u64::try_from(scan.elapsed().as_micros()).unwrap_or(u64::MAX),
                "collected dirty pages"
            );
            // Dirty pages plus pages the destination could not rebuild.
            let dirty = self.pending.count();
            rs.dirty_after = dirty;
            self.history.push(RoundObservation {
                bytes: rs.bytes,
                pages: rs.pages,
                elapsed: Duration::from_millis(rs.elapsed_ms),
                dirty_after: dirty,
                unchanged: rs.unchanged_pages,
            });
            let d = if first_only {
                Decision::Stop {
                    reason: StopReason::FirstRound,
                    expected_downtime: self.cfg.policy.switchover_overhead,
                }
            } else {
                decide(
                    &self.cfg.policy,
                    &self.history,
                    self.ram.len(),
                    self.cfg.bandwidth,
                )
            };
            on_round(&rs, &d);
            self.stats.rounds.push(rs);
            self.round += 1;
            if let Decision::Stop {
                reason,
                expected_downtime,
            } = d
            {
                self.stats.stop_reason = Some(reason.to_string());
                self.stats.expected_downtime_ms = Some(crate::stats::millis(expected_downtime));
                return Ok(d);
            }
        }
    }

    /// Stop-and-copy: call with the VM paused. Sends the last dirty pages and ends the streams.
    pub async fn final_round(&mut self) -> Result<Frozen, SourceError> {
        // Writes between the last collect and the pause are caught here; with
        // the VM paused nothing can be written after this collect.
        self.stop_pacing();
        self.tracker.collect(&mut self.pending)?;
        self.mark_written();
        let to_send = std::mem::replace(&mut self.pending, PageBitmap::new(self.ram.pages()));
        // RAM no longer changes: hash what changed since the last refresh
        // while the last pages are on the wire.
        let t = Instant::now();
        let hashing = self.refresh_digests(self.cfg.verify_threads);
        let mut rs = self.send_round(&to_send, self.round, false).await?;
        self.round += 1;
        // Pages whose reference did not match storage go raw until none is
        // left (the second pass has no references, so it ends there).
        for _ in 0..3 {
            if self.pending.is_clear() {
                break;
            }
            let need = std::mem::replace(&mut self.pending, PageBitmap::new(self.ram.pages()));
            let more = self.send_round(&need, self.round, false).await?;
            self.round += 1;
            rs.pages += more.pages;
            rs.raw_pages += more.raw_pages;
            rs.zero_pages += more.zero_pages;
            rs.compressed_pages += more.compressed_pages;
            rs.bytes += more.bytes;
            rs.elapsed_ms += more.elapsed_ms;
        }
        if !self.pending.is_clear() {
            return Err(SourceError::Worker(
                "the destination keeps asking for pages after they were sent raw".into(),
            ));
        }
        let data = std::mem::take(&mut self.data);
        for conn in data {
            conn.tx
                .send(WriterCmd::Frame(DataMessage::EndOfStream.frame()))
                .await
                .map_err(|_| SourceError::Worker("data connection closed".into()))?;
            drop(conn.tx);
            let sent = conn
                .task
                .await
                .map_err(|e| SourceError::Worker(e.to_string()))??;
            self.stats.bytes_sent += sent;
        }
        self.stats.rounds.push(rs.clone());
        let d = Self::refreshed(hashing).await?;
        if !d.is_current() {
            return Err(SourceError::Worker("hashing the source RAM failed".into()));
        }
        tracing::debug!(
            hash_ms = crate::stats::millis(t.elapsed()),
            "source RAM hashed"
        );
        let digests = d.digests().to_vec();
        self.source_digests = Some(d);
        Ok(Frozen {
            digests,
            last_round: rs,
        })
    }

    /// Has the destination compare its RAM with the digests taken in
    /// [`SourceSession::final_round`] (VM paused).
    pub async fn verify(&mut self, frozen: Frozen) -> Result<Verified, SourceError> {
        let t = Instant::now();
        self.stats.bytes_sent += self
            .ctrl_tx
            .send(
                ToDestination::VerifyRequest {
                    chunk_pages: verify::CHUNK_PAGES,
                    digests: frozen.digests,
                },
                "sending RAM digests",
            )
            .await?;
        let msg = self
            .read_ctrl("waiting for the destination's RAM comparison")
            .await?;
        self.stats.verify_ms = Some(crate::stats::millis(t.elapsed()));
        match msg {
            ToSource::VerifyResult {
                mismatched,
                mismatched_total,
            } => {
                self.stats.ram_verified = Some(mismatched_total == 0);
                self.stats.mismatched_chunks = mismatched_total;
                if mismatched_total == 0 {
                    Ok(Verified(()))
                } else {
                    Err(SourceError::RamDiffers(VerifyOutcome {
                        mismatched,
                        mismatched_total,
                        chunk_pages: verify::CHUNK_PAGES,
                    }))
                }
            }
            other => Err(self.unexpected(other, "VerifyResult")),
        }
    }

    /// Hands the VM over, the point of no return: once Commit is sent the
    /// destination may run the VM, so if [`SourceSession::wait_activated`]
    /// then fails the outcome is unknown and the source must NOT be resumed
    /// blindly.
    pub async fn send_commit(&mut self, _verified: &Verified) -> Result<(), SourceError> {
        self.stats.bytes_sent += self
            .ctrl_tx
            .send(ToDestination::Commit, "sending Commit")
            .await?;
        Ok(())
    }

    /// After [`SourceSession::send_commit`]: Ok once the destination runs the VM.
    pub async fn wait_activated(&mut self) -> Result<(), SourceError> {
        match self
            .read_ctrl("waiting for the destination to resume the VM")
            .await?
        {
            ToSource::Activated => Ok(()),
            other => Err(self.unexpected(other, "Activated")),
        }
    }

    /// Tells the destination to give up (best effort) and closes the session.
    pub async fn abort(self, reason: &str) {
        let msg = ToDestination::Abort {
            reason: reason.to_string(),
        };
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.ctrl_tx.send(msg, "sending Abort"),
        )
        .await;
        self.ctrl_tx.shutdown().await;
        for c in self.data {
            c.task.abort();
        }
    }

    /// If a data connection failed, the destination has usually said why on
    /// the control connection: prefer that reason.
    pub async fn peer_reason(&mut self) -> Option<String> {
        let max = protocol::control_payload_limit(self.ram.len());
        let rx = self.ctrl_rx.as_mut()?;
        let reason = async {
            loop {
                match protocol::read_control(rx, "reading the destination's reason", max).await {
                    Ok((ToSource::Abort { reason }, _)) => return Some(reason),
                    Ok((ToSource::Heartbeat, _)) => {}
                    _ => return None,
                }
            }
        };
        tokio::time::timeout(Duration::from_millis(500), reason)
            .await
            .ok()
            .flatten()
    }

    pub(super) async fn read_ctrl(&mut self, doing: &'static str) -> Result<ToSource, SourceError> {
        let max = protocol::control_payload_limit(self.ram.len());
        let rx = self
            .ctrl_rx
            .as_mut()
            .ok_or(ProtocolError::Closed { doing })?;
        // The timeout runs from the last message: a heartbeat shows the
        // destination alive however long its work takes.
        let msg = loop {
            let (msg, n) = within(
                self.cfg.peer_timeout,
                doing,
                protocol::read_control(rx, doing, max),
            )
            .await??;
            self.stats.bytes_received += n;
            if msg != ToSource::Heartbeat {
                break msg;
            }
        };
        if let ToSource::Abort { reason } = msg {
            return Err(SourceError::PeerAbort { reason });
        }
        Ok(msg)
    }

    pub(super) fn unexpected(&self, got: ToSource, expected: &'static str) -> SourceError {
        SourceError::Unexpected {
            got: got.name(),
            expected,
        }
    }

    /// Marks for hashing every pending page: all the last collect reported
    /// are among them (the others, pages the destination asked for, cost
    /// only a needless re-hash of the page).
    pub(super) fn mark_written(&mut self) {
        if let Some(d) = self.source_digests.as_mut() {
            d.mark(&self.pending);
        }
    }

    /// Starts hashing the marked chunks on a blocking thread; the digests
    /// come back through [`SourceSession::refreshed`].
    fn refresh_digests(
        &mut self,
        threads: usize,
    ) -> tokio::task::JoinHandle<Result<verify::SourceDigests, RamError>> {
        let ram = self.ram.clone();
        let mut d = self
            .source_digests
            .take()
            .unwrap_or_else(|| verify::SourceDigests::new(ram.pages(), verify::CHUNK_PAGES));
        tokio::task::spawn_blocking(move || {
            let data = ram.data_pages()?;
            d.refresh(ram.bytes(), &data, threads);
            Ok(d)
        })
    }

    async fn refreshed(
        h: tokio::task::JoinHandle<Result<verify::SourceDigests, RamError>>,
    ) -> Result<verify::SourceDigests, SourceError> {
        Ok(h.await.map_err(|e| SourceError::Worker(e.to_string()))??)
    }

    async fn send_round(
        &mut self,
        pages: &PageBitmap,
        round: u32,
        skip_zero: bool,
    ) -> Result<RoundStats, SourceError> {
        let opts = RoundOptions {
            skip_zero,
            drain: true,
            live: false,
        };
        self.send_round_with(pages, round, opts).await
    }

    /// Sends one round (see [`RoundOptions`]).
    async fn send_round_with(
        &mut self,
        pages: &PageBitmap,
        round: u32,
        RoundOptions {
            skip_zero,
            drain,
            live,
        }: RoundOptions,
    ) -> Result<RoundStats, SourceError> {
        let t = Instant::now();
        let ram = self.ram.clone();
        let txs: Vec<_> = self.data.iter().map(|c| c.tx.clone()).collect();
        let progress = Arc::new(RoundProgress {
            referenced: OnceLock::new(),
            raw_at: AtomicU64::new(RAW_PASS_NOT_STARTED),
        });
        let job = RoundJob {
            pages: pages.clone(),
            progress: progress.clone(),
            round,
            // While the digests are not out being refreshed (final round),
            // they take the hash of each page as it is read for sending.
            hash_pages: self.source_digests.is_some(),
            skip_zero,
            compress: self.cfg.compress,
            hints: self
                .cfg
                .hints
                .clone()
                .filter(|_| references_in_round(round)),
            disk_sizes: self.cfg.disks.iter().map(|d| d.bytes).collect(),
            no_ref: self.no_ref.clone(),
            census: self.cfg.census.clone(),
            // Round 0 sends every page: nothing is held yet.
            sent: if round > 0 { self.sent.take() } else { None },
        };
        let mut producer = tokio::task::spawn_blocking(move || {
            let produced = produce_round(&ram, &job, &txs);
            (produced, job.sent)
        });
        let mut written_before_read = 0;
        // Only where a collect is cheap: soft-dirty stops QEMU for each.
        let produced = if live && self.tracker.kind() == TrackerKind::UffdWp {
            let mut tick = tokio::time::interval_at(
                tokio::time::Instant::now() + COLLECT_EVERY,
                COLLECT_EVERY,
            );
            loop {
                tokio::select! {
                    p = &mut producer => break p,
                    _ = tick.tick() => {
                        let mut written = PageBitmap::new(self.ram.pages());
                        self.tracker.collect(&mut written)?;
                        // After the collect returned: pages above this are
                        // read after their writes were reported.
                        let raw_at = progress.raw_at.load(Ordering::SeqCst);
                        let referenced = progress.referenced.get();
                        for p in written.iter() {
                            if read_after_collect(p, pages, referenced, raw_at) {
                                written_before_read += 1;
                            } else {
                                self.pending.set(p);
                            }
                        }
                    }
                }
            }
        } else {
            producer.await
        };
        let (produced, sent) = produced.map_err(|e| SourceError::Worker(e.to_string()))?;
        if sent.is_some() {
            self.sent = sent;
        }
        let Some((mut rs, hashes)) = produced else {
            return Err(self.writer_error().await);
        };
        rs.written_before_read = written_before_read;
        if !references_in_round(round.saturating_add(1)) {
            if let Some(h) = &self.cfg.hints {
                h.no_longer_needed();
            }
        }
        // Before the next collect: a write after a page was read is in it.
        if let Some(d) = self.source_digests.as_mut() {
            d.record(&hashes);
        }
        if let Some(s) = self.sent.as_mut() {
            for &(p, h) in &hashes {
                s.record(p, h);
            }
        }
        let mut rs = Some(rs);
        if !drain {
            let mut rs = rs.take().expect("checked above");
            let elapsed = t.elapsed();
            rs.elapsed_ms = crate::stats::millis(elapsed);
            rs.rate_mbit = mbit_per_s(rs.bytes, elapsed.as_secs_f64() * 1000.0);
            return Ok(rs);
        }
        // End the round on every connection and wait for the destination to
        // have applied it, storage reads included.
        let drain = DataMessage::Drain { round }.frame();
        for c in &self.data {
            let (tx, rx) = oneshot::channel();
            if c.tx.send(WriterCmd::Frame(drain.clone())).await.is_err()
                || c.tx.send(WriterCmd::Barrier(tx)).await.is_err()
                || rx.await.is_err()
            {
                return Err(self.writer_error().await);
            }
        }
        let mut rs = rs.take().expect("checked above");
        match self
            .read_ctrl("waiting for the destination to apply the round")
            .await?
        {
            ToSource::Drained { round: r, need } if r == round => {
                rs.rebuild_mismatch = need.len() as u64;
                protocol::check_pages("Drained", need.iter().copied(), self.ram.pages())?;
                for p in need {
                    self.pending.set(p);
                    self.no_ref.set(p);
                    if let Some(s) = self.sent.as_mut() {
                        s.forget(p);
                    }
                }
            }
            other => return Err(self.unexpected(other, "Drained for this round")),
        }
        let elapsed = t.elapsed();
        rs.elapsed_ms = crate::stats::millis(elapsed);
        rs.rate_mbit = mbit_per_s(rs.bytes, elapsed.as_secs_f64() * 1000.0);
        Ok(rs)
    }

    /// The error of the first data connection that failed.
    pub(super) async fn writer_error(&mut self) -> SourceError {
        let reason = self.peer_reason().await;
        for c in std::mem::take(&mut self.data) {
            drop(c.tx);
            if let Ok(Err(e)) = c.task.await {
                return match reason {
                    Some(reason) => SourceError::PeerAbort { reason },
                    None => SourceError::Protocol(e),
                };
            }
        }
        match reason {
            Some(reason) => SourceError::PeerAbort { reason },
            None => SourceError::Worker("a data connection stopped".into()),
        }
    }
}

/// The most page bytes a data connection takes from the adaptive pace at once.
const PACE_SLICE: usize = 1 << 20;

/// The paces a data connection keeps to.
struct Paces {
    /// The operator's link bandwidth, in bytes on the wire.
    link: Arc<RateLimiter>,
    /// The adaptive pace, in bytes of the pages that cost a transfer or a
    /// storage read.
    pages: Arc<RateLimiter>,
    /// Those bytes sent so far, for the controller.
    moved: Arc<AtomicU64>,
}

async fn data_writer(
    mut w: ConnWriter,
    mut rx: mpsc::Receiver<WriterCmd>,
    paces: Paces,
    patience: Duration,
) -> Result<u64, ProtocolError> {
    let mut sent = 0;
    while let Some(cmd) = rx.recv().await {
        match cmd {
            WriterCmd::Frame(f) => {
                // A frame of references stands for tens of MiB of reads:
                // taken a slice at a time, a new pace applies at once.
                let mut content = f.costly_pages() as usize * PAGE_SIZE;
                while content > 0 {
                    let slice = content.min(PACE_SLICE);
                    paces.pages.acquire(slice).await;
                    paces.moved.fetch_add(slice as u64, Ordering::Relaxed);
                    content -= slice;
                }
                let f = f.bytes();
                paces.link.acquire(f.len()).await;
                // A peer (or link) that takes nothing for this long is gone:
                // without the limit a cut cable would block the round forever.
                tokio::time::timeout(patience, protocol::write_frame(&mut w, f, "sending pages"))
                    .await
                    .map_err(|_| ProtocolError::Io {
                        doing: "sending pages (the destination took nothing for the whole timeout)",
                        source: std::io::Error::from(std::io::ErrorKind::TimedOut),
                    })??;
                sent += f.len() as u64;
            }
            WriterCmd::Barrier(done) => {
                let _ = done.send(());
            }
        }
    }
    w.shutdown().await.map_err(|source| ProtocolError::Io {
        doing: "closing a data connection",
        source,
    })?;
    Ok(sent)
}
