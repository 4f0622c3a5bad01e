//! Iterative pre-copy (Clark et al., NSDI'05) driven from the source host.
//!
//! The VMM integration drives the stages; this module moves pages and decides:
//!
//! 1. [`SourceSession::connect`]: reservation (the destination checks RAM size and is ready);
//! 2. [`SourceSession::run_live`]: rounds of dirty pages while the VM runs, until [`decide`] says stop;
//! 3. the caller pauses the VM, then [`SourceSession::final_round`]: stop-and-copy;
//! 4. [`SourceSession::verify`]: both sides hash RAM, any difference aborts;
//! 5. the caller moves device state, then [`SourceSession::commit`]: the point of no return.
//!
//! Before `commit` every failure leaves the source VM authoritative.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use xxhash_rust::xxh3::xxh3_128;

use crate::bitmap::PageBitmap;
use crate::control::ControlWriter;
use crate::dirty::{DirtyError, DirtyTracker, TrackerKind};
use crate::limiter::RateLimiter;
use crate::protocol::{
    self, connection_for_page, BatchBuilder, Hello, Message, PageEncoder, PageEncoding,
    ProtocolError, Welcome,
};
use crate::ram::{is_zero, RamError, SourceRam};
use crate::rebuild::{check_hint, Hint, HintSource};
use crate::stats::{mbit_per_s, MigrationStats, RoundStats};
use crate::transport::{Conn, ConnReader, ConnWriter, Connector, TransportError};
use crate::verify;
use crate::{PAGE_SIZE, PAGE_SIZE_U64};

/// Errors of the source side.
#[derive(Debug, Error)]
pub enum PrecopyError {
    /// Could not reach the destination agent.
    #[error("cannot connect to the destination agent at {addr}: is `dbmigrate receive` running there and reachable?")]
    Connect {
        /// Address tried.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Protocol or transport failure.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The connection could not be secured (TLS handshake, certificate, name).
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The destination said it gives up (Refuse or Abort): the only
    /// variant that carries the peer's own word, never a local check.
    #[error("destination agent refused: {reason}")]
    PeerAbort {
        /// Its reason.
        reason: String,
    },
    /// The destination closed the secured connection without a word.
    #[error("the destination agent closed the connection before answering: if its log shows a refused connection, check that its --tls-allow admits this host's certificate name and that both hosts trust the same CA")]
    Unwelcome,
    /// The peer sent a message that does not belong here.
    #[error("destination agent sent {got} while the source expected {expected}")]
    Unexpected {
        /// What came.
        got: &'static str,
        /// What was expected.
        expected: &'static str,
    },
    /// Dirty tracking failed.
    #[error("dirty-page tracking failed")]
    Dirty(#[from] DirtyError),
    /// RAM access failed.
    #[error(transparent)]
    Ram(#[from] RamError),
    /// A worker task died.
    #[error("internal worker failed: {0}")]
    Worker(String),
    /// The peer stayed silent too long.
    #[error("destination agent did not answer within {secs} s while {doing}")]
    Timeout {
        /// Seconds waited.
        secs: u64,
        /// What was awaited.
        doing: &'static str,
    },
}

/// When to stop iterating.
#[derive(Clone, Debug)]
pub struct StopPolicy {
    /// Largest acceptable pause.
    pub downtime_target: Duration,
    /// Fixed part of the pause besides the last pages: device state, verification.
    pub switchover_overhead: Duration,
    /// Give up iterating after this many rounds.
    pub max_rounds: u32,
    /// Give up iterating once this many times the RAM size has been sent.
    pub max_bytes_factor: f64,
    /// Give up after this many consecutive rounds in which the dirty set did not shrink.
    pub stall_rounds: u32,
}

impl Default for StopPolicy {
    fn default() -> Self {
        Self {
            downtime_target: Duration::from_millis(300),
            switchover_overhead: Duration::ZERO,
            max_rounds: 30,
            max_bytes_factor: 3.0,
            // Two rounds in which the dirty set did not shrink: the writable
            // working set is reached, and more rounds only resend it.
            stall_rounds: 2,
        }
    }
}

/// What one round showed, as input to [`decide`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RoundObservation {
    /// Bytes sent in the round.
    pub bytes: u64,
    /// Pages sent in the round.
    pub pages: u64,
    /// Wall time of the round.
    pub elapsed: Duration,
    /// Pages dirtied meanwhile (the next round's work).
    pub dirty_after: u64,
}

/// Why pre-copy stops iterating.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The remaining pages fit in the downtime target.
    Converged,
    /// The round limit was reached.
    MaxRounds,
    /// The byte limit was reached.
    MaxBytes,
    /// The writable working set stopped shrinking.
    NotShrinking,
    /// Post-copy mode: the first round is sent, the rest follows the VM.
    FirstRound,
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StopReason::Converged => "converged",
            StopReason::MaxRounds => "round limit reached",
            StopReason::MaxBytes => "byte limit reached",
            StopReason::NotShrinking => "dirty set stopped shrinking",
            StopReason::FirstRound => "post-copy after the first round",
        })
    }
}

/// Outcome of [`decide`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Decision {
    /// Run another live round.
    Continue {
        /// Pause expected if we stopped now.
        expected_downtime: Duration,
    },
    /// Pause the VM and copy the rest.
    Stop {
        /// Why.
        reason: StopReason,
        /// Pause expected.
        expected_downtime: Duration,
    },
}

/// Link rate in bytes/s judged from the rounds: the best rate of any round that
/// moved enough data to measure, else the configured limit, else the last round.
pub fn link_rate(history: &[RoundObservation], limit: Option<u64>) -> f64 {
    const MEASURABLE: u64 = 4 << 20;
    #[allow(clippy::cast_precision_loss)]
    let rate = |o: &RoundObservation| o.bytes as f64 / o.elapsed.as_secs_f64().max(1e-6);
    let best = history
        .iter()
        .filter(|o| o.bytes >= MEASURABLE)
        .map(rate)
        .fold(0.0, f64::max);
    if best > 0.0 {
        return best;
    }
    #[allow(clippy::cast_precision_loss)]
    if let Some(l) = limit {
        return l as f64;
    }
    history.last().map(rate).filter(|r| *r > 0.0).unwrap_or(1e9)
}

/// Bytes a page of the final round costs on the wire: mostly raw pages,
/// a full page plus its entry header.
const FINAL_PAGE_BYTES: u64 = PAGE_SIZE_U64 + 13;

/// The pause expected after one more round, which takes `round` to send
/// what `last` left dirty at `rate` bytes/s while the guest dirties pages
/// at the rate it did during `last`.
fn next_pause(last: &RoundObservation, round: Duration, rate: f64, overhead: Duration) -> Duration {
    #[allow(clippy::cast_precision_loss)]
    let dirty_per_s = last.dirty_after as f64 / last.elapsed.as_secs_f64().max(1e-3);
    #[allow(clippy::cast_precision_loss)]
    let next_bytes = dirty_per_s * round.as_secs_f64() * FINAL_PAGE_BYTES as f64;
    Duration::from_secs_f64(next_bytes / rate) + overhead
}

/// The stop decision after a round (pure).
pub fn decide(
    policy: &StopPolicy,
    history: &[RoundObservation],
    ram_bytes: u64,
    limit: Option<u64>,
) -> Decision {
    let Some(last) = history.last() else {
        return Decision::Continue {
            expected_downtime: Duration::MAX,
        };
    };
    let rate = link_rate(history, limit);
    #[allow(clippy::cast_precision_loss)]
    let bytes_left = (last.dirty_after * FINAL_PAGE_BYTES) as f64;
    let data_time = Duration::from_secs_f64(bytes_left / rate);
    let expected_downtime = data_time + policy.switchover_overhead;
    let stop = |reason| Decision::Stop {
        reason,
        expected_downtime,
    };
    let rounds = u32::try_from(history.len()).unwrap_or(u32::MAX);
    if last.dirty_after == 0 {
        return stop(StopReason::Converged);
    }
    if expected_downtime <= policy.downtime_target {
        // Within the target, one more short round is still worth it when
        // it should at least halve the pause (the first round is long, so
        // what it left dirty is mostly pages written once, not again in a
        // short round); a pause already below a quarter of the target is
        // left alone.
        let worth_it = expected_downtime > policy.downtime_target / 4
            && rounds < policy.max_rounds
            && next_pause(last, data_time, rate, policy.switchover_overhead) * 2
                < expected_downtime;
        return if worth_it {
            Decision::Continue { expected_downtime }
        } else {
            stop(StopReason::Converged)
        };
    }
    if rounds >= policy.max_rounds {
        return stop(StopReason::MaxRounds);
    }
    let sent: u64 = history.iter().map(|o| o.bytes).sum();
    #[allow(clippy::cast_precision_loss)]
    if sent as f64 >= policy.max_bytes_factor * ram_bytes as f64 {
        return stop(StopReason::MaxBytes);
    }
    // Latest consecutive rounds whose dirty set did not shrink by at least 5 %.
    let stalled = history
        .windows(2)
        .rev()
        .take_while(|w| w[1].dirty_after * 100 >= w[0].dirty_after * 95)
        .count();
    if policy.stall_rounds > 0 && stalled >= policy.stall_rounds as usize {
        return stop(StopReason::NotShrinking);
    }
    Decision::Continue { expected_downtime }
}

/// How the VM is handed over.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Rounds until the stop decision, then stop-and-copy: the source stays
    /// authoritative until the destination has every page.
    #[default]
    Precopy,
    /// One round, then the VM runs on the destination, which fetches what
    /// is still missing.
    Postcopy,
    /// Pre-copy that switches to post-copy when the stop decision says the
    /// rounds will not fit the downtime target.
    Hybrid,
}

/// After the stop decision: hand over by post-copy rather than stop-and-copy? (pure)
pub fn switch_to_postcopy(mode: Mode, reason: StopReason, destination_can: bool) -> bool {
    destination_can
        && match mode {
            Mode::Precopy => false,
            Mode::Postcopy => true,
            Mode::Hybrid => reason != StopReason::Converged,
        }
}

/// Source-side settings.
#[derive(Clone, Debug)]
pub struct SourceConfig {
    /// Pre-copy, post-copy or hybrid.
    pub mode: Mode,
    /// Data connections (1 to [`protocol::MAX_DATA_CONNECTIONS`]).
    pub connections: u16,
    /// Bandwidth limit over all connections, bytes/s.
    pub bandwidth: Option<u64>,
    /// Compress raw pages with zstd when that makes them smaller.
    pub compress: bool,
    /// When to stop iterating.
    pub policy: StopPolicy,
    /// Threads hashing RAM at switchover.
    pub verify_threads: usize,
    /// Longest silence of the destination (it sends a heartbeat every second).
    pub peer_timeout: Duration,
    /// Where pages may be rebuilt from shared storage (untrusted; each hint is checked).
    pub hints: Option<Arc<dyn HintSource>>,
    /// Sizes of the VM's disks, by the index hints use.
    pub disk_sizes: Vec<u64>,
    /// How connections to the destination are secured. The default is
    /// plain TCP, for tests on loopback; the `dbmigrate` command uses
    /// mutual TLS unless told otherwise by name.
    pub connector: Connector,
}

impl Default for SourceConfig {
    fn default() -> Self {
        Self {
            mode: Mode::Precopy,
            connections: 2,
            bandwidth: None,
            compress: false,
            policy: StopPolicy::default(),
            verify_threads: 2,
            peer_timeout: Duration::from_secs(30),
            hints: None,
            disk_sizes: Vec::new(),
            connector: Connector::InsecurePlaintext,
        }
    }
}

pub(crate) enum WriterCmd {
    Frame(Vec<u8>),
    Barrier(oneshot::Sender<()>),
}

pub(crate) struct DataConn {
    pub(crate) tx: mpsc::Sender<WriterCmd>,
    pub(crate) task: JoinHandle<Result<u64, ProtocolError>>,
}

/// Result of the switchover check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyOutcome {
    /// Chunks that differ (first ones).
    pub mismatched: Vec<u32>,
    /// How many differ in all.
    pub mismatched_total: u32,
    /// Pages per chunk.
    pub chunk_pages: u32,
}

impl VerifyOutcome {
    /// True when the destination holds the exact RAM.
    pub fn matched(&self) -> bool {
        self.mismatched_total == 0
    }
}

/// The source end of one migration.
pub struct SourceSession {
    pub(crate) ram: Arc<SourceRam>,
    pub(crate) tracker: Box<dyn DirtyTracker>,
    pub(crate) cfg: SourceConfig,
    /// None once post-copy hands it to its reader task.
    pub(crate) ctrl_rx: Option<ConnReader>,
    pub(crate) ctrl_tx: ControlWriter,
    pub(crate) data: Vec<DataConn>,
    welcome: Welcome,
    /// The destination agent.
    addr: SocketAddr,
    /// The id of this session, carried by every connection's Hello.
    session_id: u64,
    pub(crate) history: Vec<RoundObservation>,
    pub(crate) pending: PageBitmap,
    /// Pages the destination could not rebuild: always sent raw from now on.
    no_ref: PageBitmap,
    round: u32,
    /// Digests kept current while the VM runs (None while a refresh has them).
    pub(crate) source_digests: Option<verify::SourceDigests>,
    digests: Option<Vec<u128>>,
    /// Dirty tracking was armed and the first round's pages chosen.
    armed: bool,
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
    ) -> Result<Self, PrecopyError> {
        let conns = cfg.connections.clamp(1, protocol::MAX_DATA_CONNECTIONS);
        let session = session_id();
        let hello = |conn_index| session_hello(session, ram.len(), conns, conn_index);
        let tcp = connect_retrying(addr, cfg.peer_timeout.min(Duration::from_secs(10))).await?;
        let (mut ctrl_rx, mut ctrl_tx) = cfg.connector.secure(tcp, addr).await?.split();
        let mut stats = MigrationStats::default();
        stats.bytes_sent +=
            protocol::write_message(&mut ctrl_tx, &hello(0), "sending Hello").await?;
        let (msg, n) = match timeout(
            cfg.peer_timeout,
            "waiting for the destination to reserve RAM",
            protocol::read_message(&mut ctrl_rx, "waiting for Welcome"),
        )
        .await?
        {
            Ok(r) => r,
            Err(ProtocolError::Closed { .. }) if cfg.connector.is_tls() => {
                return Err(PrecopyError::Unwelcome)
            }
            Err(e) => return Err(e.into()),
        };
        stats.bytes_received += n;
        let welcome = match msg {
            Message::Welcome(w) => w,
            Message::Refuse { reason } | Message::Abort { reason } => {
                return Err(PrecopyError::PeerAbort { reason })
            }
            other => {
                return Err(PrecopyError::Unexpected {
                    got: other.name(),
                    expected: "Welcome",
                })
            }
        };
        let limiter = Arc::new(RateLimiter::new(cfg.bandwidth));
        let mut data = Vec::new();
        for i in 1..=conns {
            let (_r, mut w) = cfg.connector.connect(addr).await?.split();
            stats.bytes_sent += protocol::write_message(&mut w, &hello(i), "sending Hello").await?;
            let (tx, rx) = mpsc::channel(8);
            let task = tokio::spawn(data_writer(w, rx, limiter.clone(), cfg.peer_timeout));
            data.push(DataConn { tx, task });
        }
        let pages = ram.pages();
        let ctrl_tx = ControlWriter::new(ctrl_tx, cfg.peer_timeout);
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
            round: 0,
            source_digests: Some(verify::SourceDigests::new(pages, verify::CHUNK_PAGES)),
            digests: None,
            armed: false,
            stats,
        })
    }

    /// Arms dirty tracking and takes every page with data for the first
    /// round. [`SourceSession::run_live`] does it if not done before; done
    /// early, it overlaps other preparation (the guest's hints): a write
    /// after this point shows up in the next collect, so no write can fall
    /// between rounds, whenever the first round starts.
    pub fn arm_tracking(&mut self) -> Result<(), PrecopyError> {
        self.tracker.reset()?;
        self.pending = self.ram.data_pages()?;
        self.armed = true;
        Ok(())
    }

    /// Hints for the rounds to come, with the sizes of the disks they name.
    pub fn set_hints(&mut self, hints: Arc<dyn HintSource>, disk_sizes: Vec<u64>) {
        self.cfg.hints = Some(hints);
        self.cfg.disk_sizes = disk_sizes;
    }

    /// Opens the connection that carries the VMM's device state to the
    /// destination agent, secured as the others and introduced as this
    /// session's [`protocol::DEVICE_STATE_CONN`]. The caller relays the
    /// VMM's stream over it; the destination agent relays it to its VMM.
    pub async fn open_device_state(&self) -> Result<Conn, PrecopyError> {
        let mut conn = self.cfg.connector.connect(self.addr).await?;
        let conns = u16::try_from(self.data.len()).expect("at most 16");
        let hello = session_hello(
            self.session_id,
            self.ram.len(),
            conns,
            protocol::DEVICE_STATE_CONN,
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
    ) -> Result<Decision, PrecopyError> {
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
    pub async fn final_round(&mut self) -> Result<RoundStats, PrecopyError> {
        // Writes between the last collect and the pause are caught here; with
        // the VM paused nothing can be written after this collect.
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
            return Err(PrecopyError::Worker(
                "the destination keeps asking for pages after they were sent raw".into(),
            ));
        }
        let data = std::mem::take(&mut self.data);
        for conn in data {
            conn.tx
                .send(WriterCmd::Frame(Message::EndOfStream.encode()))
                .await
                .map_err(|_| PrecopyError::Worker("data connection closed".into()))?;
            drop(conn.tx);
            let sent = conn
                .task
                .await
                .map_err(|e| PrecopyError::Worker(e.to_string()))??;
            self.stats.bytes_sent += sent;
        }
        self.stats.rounds.push(rs.clone());
        let d = Self::refreshed(hashing).await?;
        if !d.is_current() {
            return Err(PrecopyError::Worker("hashing the source RAM failed".into()));
        }
        tracing::debug!(
            hash_ms = crate::stats::millis(t.elapsed()),
            "source RAM hashed"
        );
        self.digests = Some(d.digests().to_vec());
        self.source_digests = Some(d);
        Ok(rs)
    }

    /// Has the destination compare its RAM with the digests taken in
    /// [`SourceSession::final_round`] (VM paused).
    pub async fn verify(&mut self) -> Result<VerifyOutcome, PrecopyError> {
        let t = Instant::now();
        let digests = self
            .digests
            .take()
            .ok_or_else(|| PrecopyError::Worker("verify called before final_round".into()))?;
        self.stats.bytes_sent += self
            .ctrl_tx
            .send(
                &Message::VerifyRequest {
                    chunk_pages: verify::CHUNK_PAGES,
                    digests,
                },
                "sending RAM digests",
            )
            .await?;
        let msg = self
            .read_ctrl("waiting for the destination's RAM comparison")
            .await?;
        self.stats.verify_ms = Some(crate::stats::millis(t.elapsed()));
        match msg {
            Message::VerifyResult {
                mismatched,
                mismatched_total,
            } => {
                self.stats.ram_verified = Some(mismatched_total == 0);
                self.stats.mismatched_chunks = mismatched_total;
                Ok(VerifyOutcome {
                    mismatched,
                    mismatched_total,
                    chunk_pages: verify::CHUNK_PAGES,
                })
            }
            other => Err(self.unexpected(other, "VerifyResult")),
        }
    }

    /// Hands the VM over, the point of no return: once Commit is sent the
    /// destination may run the VM, so if [`SourceSession::wait_activated`]
    /// then fails the outcome is unknown and the source must NOT be resumed
    /// blindly.
    pub async fn send_commit(&mut self) -> Result<(), PrecopyError> {
        self.stats.bytes_sent += self
            .ctrl_tx
            .send(&Message::Commit, "sending Commit")
            .await?;
        Ok(())
    }

    /// After [`SourceSession::send_commit`]: Ok once the destination runs the VM.
    pub async fn wait_activated(&mut self) -> Result<(), PrecopyError> {
        match self
            .read_ctrl("waiting for the destination to resume the VM")
            .await?
        {
            Message::Activated => Ok(()),
            other => Err(self.unexpected(other, "Activated")),
        }
    }

    /// Tells the destination to give up (best effort) and closes the session.
    pub async fn abort(self, reason: &str) {
        let msg = Message::Abort {
            reason: reason.to_string(),
        };
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.ctrl_tx.send(&msg, "sending Abort"),
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
        let rx = self.ctrl_rx.as_mut()?;
        let reason = async {
            loop {
                match protocol::read_message(rx, "reading the destination's reason").await {
                    Ok((Message::Abort { reason } | Message::Refuse { reason }, _)) => {
                        return Some(reason)
                    }
                    Ok((Message::Heartbeat, _)) => {}
                    _ => return None,
                }
            }
        };
        tokio::time::timeout(Duration::from_millis(500), reason)
            .await
            .ok()
            .flatten()
    }

    pub(crate) async fn read_ctrl(&mut self, doing: &'static str) -> Result<Message, PrecopyError> {
        let rx = self
            .ctrl_rx
            .as_mut()
            .ok_or(ProtocolError::Closed { doing })?;
        // The timeout runs from the last message: a heartbeat shows the
        // destination alive however long its work takes.
        let msg = loop {
            let (msg, n) = timeout(
                self.cfg.peer_timeout,
                doing,
                protocol::read_message(rx, doing),
            )
            .await??;
            self.stats.bytes_received += n;
            if msg != Message::Heartbeat {
                break msg;
            }
        };
        if let Message::Abort { reason } = msg {
            return Err(PrecopyError::PeerAbort { reason });
        }
        Ok(msg)
    }

    pub(crate) fn unexpected(&self, got: Message, expected: &'static str) -> PrecopyError {
        PrecopyError::Unexpected {
            got: got.name(),
            expected,
        }
    }

    /// Marks for hashing every pending page: all the last collect reported
    /// are among them (the others, pages the destination asked for, cost
    /// only a needless re-hash of the page).
    pub(crate) fn mark_written(&mut self) {
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
    ) -> Result<verify::SourceDigests, PrecopyError> {
        Ok(h.await.map_err(|e| PrecopyError::Worker(e.to_string()))??)
    }

    async fn send_round(
        &mut self,
        pages: &PageBitmap,
        round: u32,
        skip_zero: bool,
    ) -> Result<RoundStats, PrecopyError> {
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
    ) -> Result<RoundStats, PrecopyError> {
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
            hints: self.cfg.hints.clone(),
            disk_sizes: self.cfg.disk_sizes.clone(),
            no_ref: self.no_ref.clone(),
        };
        let mut producer = tokio::task::spawn_blocking(move || produce_round(&ram, &job, &txs));
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
        let produced = produced.map_err(|e| PrecopyError::Worker(e.to_string()))?;
        let Some((mut rs, hashes)) = produced else {
            return Err(self.writer_error().await);
        };
        rs.written_before_read = written_before_read;
        // Before the next collect: a write after a page was read is in it.
        if let Some(d) = self.source_digests.as_mut() {
            d.record(&hashes);
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
        let drain = Message::Drain { round }.encode();
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
            Message::Drained { round: r, need } if r == round => {
                rs.rebuild_mismatch = need.len() as u64;
                protocol::check_pages("Drained", need.iter().copied(), self.ram.pages())?;
                for p in need {
                    self.pending.set(p);
                    self.no_ref.set(p);
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
    pub(crate) async fn writer_error(&mut self) -> PrecopyError {
        let reason = self.peer_reason().await;
        for c in std::mem::take(&mut self.data) {
            drop(c.tx);
            if let Ok(Err(e)) = c.task.await {
                return match reason {
                    Some(reason) => PrecopyError::PeerAbort { reason },
                    None => PrecopyError::Protocol(e),
                };
            }
        }
        match reason {
            Some(reason) => PrecopyError::PeerAbort { reason },
            None => PrecopyError::Worker("a data connection stopped".into()),
        }
    }
}

/// While the VM runs, a round collects the pages written every
/// [`COLLECT_EVERY`]: a page written before the round's raw pass reaches
/// it goes out with that write, and the next round (or post-copy's push)
/// need not send it again. On the sysbench VM the raw pass takes seconds,
/// and about a third of the pages written meanwhile lie ahead of it.
const COLLECT_EVERY: Duration = Duration::from_millis(200);

/// `raw_at` before the raw pass starts.
const RAW_PASS_NOT_STARTED: u64 = u64::MAX;

/// How far a round's producer has read, for the collects made meanwhile.
struct RoundProgress {
    /// Pages the reference pass read (set before the raw pass starts).
    referenced: OnceLock<PageBitmap>,
    /// The page the raw pass reads now: the pages above it are not read
    /// yet ([`RAW_PASS_NOT_STARTED`] before the pass).
    raw_at: AtomicU64,
}

/// Whether `page`, reported by a collect that returned before `raw_at`
/// was read, is still to be read by the round's raw pass, so that the round
/// sends it with every write the collect reported (pure).
fn read_after_collect(
    page: u64,
    round_pages: &PageBitmap,
    referenced: Option<&PageBitmap>,
    raw_at: u64,
) -> bool {
    raw_at != RAW_PASS_NOT_STARTED
        && page > raw_at
        && round_pages.get(page)
        && referenced.is_some_and(|r| !r.get(page))
}

/// What one round sends and how.
struct RoundJob {
    pages: PageBitmap,
    progress: Arc<RoundProgress>,
    round: u32,
    /// Return the [`verify::page_hash`] of every page read, for the
    /// switchover digests (a reference's hash is already at hand).
    hash_pages: bool,
    /// Round 0 skips zero pages: the destination RAM starts as holes.
    skip_zero: bool,
    compress: bool,
    hints: Option<Arc<dyn HintSource>>,
    disk_sizes: Vec<u64>,
    no_ref: PageBitmap,
}

/// Batch size of a round's frames.
const ROUND_BATCH_BYTES: usize = 256 << 10;

/// A round's references, in disk order, handed to the connections in step
/// with its raw pass (see [`refs_due`]).
struct RefFeed {
    refs: Vec<(Hint, u64, u128)>,
    sent: usize,
    builder: BatchBuilder,
    /// Whole batches of consecutive references take turns on the
    /// connections: split page by page, each connection would carry every
    /// other stretch of the same disk area, and the destination would read
    /// each area in pieces, twice. (Each page is sent once per round, so
    /// any connection may carry it.)
    conn: usize,
}

impl RefFeed {
    fn new(refs: Vec<(Hint, u64, u128)>, round: u32) -> Self {
        Self {
            refs,
            sent: 0,
            builder: BatchBuilder::new(round),
            conn: 0,
        }
    }

    /// Batches the references up to `upto`, sending each batch once full.
    fn release(
        &mut self,
        upto: usize,
        round: u32,
        txs: &[mpsc::Sender<WriterCmd>],
        bytes: &mut u64,
    ) -> Option<()> {
        while self.sent < upto.min(self.refs.len()) {
            let (hint, page, hash) = self.refs[self.sent];
            self.sent += 1;
            self.builder.push(
                page,
                PageEncoding::Reference,
                &protocol::encode_reference(hint, hash),
            );
            if self.builder.is_full(ROUND_BATCH_BYTES) {
                send_batch(&mut self.builder, round, &txs[self.conn], bytes)?;
                self.conn = (self.conn + 1) % txs.len();
            }
        }
        Some(())
    }
}

/// How many of a round's `refs` references should be on their way once
/// `raw_done` of its `raw_total` other pages are: the storage reads then
/// spread over the round as the raw pages do, instead of running at full
/// speed at its start, where the destination's rebuild (reads, hashing,
/// copies, and the storage server serving them) took the CPU and memory
/// bandwidth the guest needs. An eighth go at once, so that the rebuild
/// keeps ahead and is done when the raw pages are (pure).
fn refs_due(refs: usize, raw_done: u64, raw_total: u64) -> usize {
    if raw_total == 0 || raw_done >= raw_total {
        return refs;
    }
    let head = refs / 8;
    let rest = (refs - head) as u128 * u128::from(raw_done) / u128::from(raw_total);
    head + usize::try_from(rest).unwrap_or(refs)
}

/// Reads, classifies and batches the pages of one round; returns None if a
/// connection went away.
fn produce_round(
    ram: &SourceRam,
    job: &RoundJob,
    txs: &[mpsc::Sender<WriterCmd>],
) -> Option<(RoundStats, Vec<(u64, u64)>)> {
    let round = job.round;
    let conns = u16::try_from(txs.len()).expect("at most 16 connections");
    let mut builders: Vec<BatchBuilder> =
        (0..txs.len()).map(|_| BatchBuilder::new(round)).collect();
    let mut rs = RoundStats {
        round,
        ..RoundStats::default()
    };
    let mut encoder = PageEncoder::new(job.compress);
    let mut hashes: Vec<(u64, u64)> = Vec::new();
    // References are read and hashed first, and go in disk order, mixed
    // into the raw pages (see [`refs_due`]): the destination finds long
    // runs of consecutive blocks to read at once. (Within a round each page
    // is sent once, so the order between pages is free.)
    let mut done = PageBitmap::new(job.pages.len());
    let mut feed = RefFeed::new(Vec::new(), round);
    if let Some(hints) = job.hints.as_ref() {
        let mut refs: Vec<(Hint, u64, u128)> = Vec::new();
        for page in job.pages.iter() {
            if job.no_ref.get(page) {
                continue;
            }
            let Some(hint) = hints.hint(page) else {
                continue;
            };
            // Zero pages and rejected hints are left to the main pass.
            if check_hint(hint, &job.disk_sizes).is_err() {
                continue;
            }
            let Ok(data) = ram.page(page) else { continue };
            if is_zero(data) {
                continue;
            }
            let hash = xxh3_128(data);
            if job.hash_pages {
                hashes.push((page, verify::low_half(hash)));
            }
            refs.push((hint, page, hash));
            done.set(page);
        }
        refs.sort_unstable_by_key(|r| (r.0.disk, r.0.offset));
        if tracing::enabled!(tracing::Level::DEBUG) {
            // How far apart the referenced blocks lie on disk: the storage
            // reads can be no longer than these runs.
            let mut gaps = [0u64; 6];
            for w in refs.windows(2) {
                let (a, b) = (w[0].0, w[1].0);
                let gap = if a.disk != b.disk {
                    u64::MAX
                } else {
                    b.offset.saturating_sub(a.offset + PAGE_SIZE as u64) / PAGE_SIZE as u64
                };
                let i = match gap {
                    0 => 0,
                    1..=3 => 1,
                    4..=15 => 2,
                    16..=63 => 3,
                    64..=255 => 4,
                    _ => 5,
                };
                gaps[i] += 1;
            }
            tracing::debug!(
                round,
                refs = refs.len(),
                ?gaps,
                "reference gaps on disk in pages: 0, 1-3, 4-15, 16-63, 64-255, more"
            );
        }
        rs.pages += refs.len() as u64;
        rs.ref_pages += refs.len() as u64;
        feed = RefFeed::new(refs, round);
    }
    // Set once per round, here: the collects meanwhile read it from now on.
    let referenced = job.progress.referenced.get_or_init(|| done);
    let raw_total = job.pages.count() - referenced.count();
    let mut raw_done = 0;
    for page in job.pages.iter() {
        if referenced.get(page) {
            continue;
        }
        feed.release(
            refs_due(feed.refs.len(), raw_done, raw_total),
            round,
            txs,
            &mut rs.bytes,
        )?;
        raw_done += 1;
        // Before the read: a collect that sees `page` here or below keeps
        // the pages it reports at or below it pending.
        job.progress.raw_at.store(page, Ordering::SeqCst);
        let Ok(data) = ram.page(page) else { continue };
        rs.pages += 1;
        let c = usize::from(connection_for_page(page, conns) - 1);
        if is_zero(data) {
            if job.hash_pages {
                hashes.push((page, verify::zero_page_hash()));
            }
            rs.zero_pages += 1;
            if job.skip_zero {
                continue;
            }
            builders[c].push(page, PageEncoding::Zero, &[]);
        } else if let Some(hint) = job
            .hints
            .as_ref()
            .filter(|_| !job.no_ref.get(page))
            .and_then(|h| h.hint(page))
            .filter(|&h| match check_hint(h, &job.disk_sizes) {
                Ok(()) => true,
                Err(_) => {
                    rs.rejected_hints += 1;
                    false
                }
            })
        {
            // The hash is of the RAM content now: if the guest changes the page
            // later, dirty tracking sends it again; if storage differs, the
            // destination asks for the page.
            rs.ref_pages += 1;
            let hash = xxh3_128(data);
            if job.hash_pages {
                hashes.push((page, verify::low_half(hash)));
            }
            builders[c].push(
                page,
                PageEncoding::Reference,
                &protocol::encode_reference(hint, hash),
            );
        } else {
            if job.hash_pages {
                hashes.push((page, verify::page_hash(data)));
            }
            match encoder.push_data(&mut builders[c], page, data) {
                PageEncoding::Zstd => rs.compressed_pages += 1,
                _ => rs.raw_pages += 1,
            }
        }
        if builders[c].is_full(ROUND_BATCH_BYTES) {
            send_batch(&mut builders[c], round, &txs[c], &mut rs.bytes)?;
        }
    }
    feed.release(feed.refs.len(), round, txs, &mut rs.bytes)?;
    if feed.builder.count() > 0 {
        send_batch(&mut feed.builder, round, &txs[feed.conn], &mut rs.bytes)?;
    }
    for (b, tx) in builders.iter_mut().zip(txs) {
        if b.count() > 0 {
            send_batch(b, round, tx, &mut rs.bytes)?;
        }
    }
    Some((rs, hashes))
}

/// Sends what `b` holds as one frame and starts a new batch; None if the
/// connection went away.
pub(crate) fn send_batch(
    b: &mut BatchBuilder,
    round: u32,
    tx: &mpsc::Sender<WriterCmd>,
    bytes: &mut u64,
) -> Option<()> {
    let frame = std::mem::replace(b, BatchBuilder::new(round)).finish();
    *bytes += frame.len() as u64;
    tx.blocking_send(WriterCmd::Frame(frame)).ok()
}

async fn data_writer(
    mut w: ConnWriter,
    mut rx: mpsc::Receiver<WriterCmd>,
    limiter: Arc<RateLimiter>,
    patience: Duration,
) -> Result<u64, ProtocolError> {
    let mut sent = 0;
    while let Some(cmd) = rx.recv().await {
        match cmd {
            WriterCmd::Frame(f) => {
                limiter.acquire(f.len()).await;
                // A peer (or link) that takes nothing for this long is gone:
                // without the limit a cut cable would block the round forever.
                tokio::time::timeout(patience, protocol::write_frame(&mut w, &f, "sending pages"))
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

/// Connects, retrying while the destination agent is not listening yet
/// (both agents are often started at the same moment).
async fn connect_retrying(addr: SocketAddr, patience: Duration) -> Result<TcpStream, PrecopyError> {
    let t = Instant::now();
    loop {
        match TcpStream::connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused && t.elapsed() < patience =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(source) => return Err(PrecopyError::Connect { addr, source }),
        }
    }
}

async fn timeout<T>(
    limit: Duration,
    doing: &'static str,
    f: impl std::future::Future<Output = T>,
) -> Result<T, PrecopyError> {
    tokio::time::timeout(limit, f)
        .await
        .map_err(|_| PrecopyError::Timeout {
            secs: limit.as_secs(),
            doing,
        })
}

/// The Hello that opens each of a session's connections.
fn session_hello(session: u64, ram_bytes: u64, conns: u16, conn_index: u16) -> Message {
    Message::Hello(Hello {
        version: protocol::PROTOCOL_VERSION,
        session,
        ram_bytes,
        page_size: u32::try_from(PAGE_SIZE).expect("4096"),
        data_connections: conns,
        conn_index,
    })
}

fn session_id() -> u64 {
    crate::transport::random_id()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    fn obs(bytes: u64, ms: u64, dirty: u64) -> RoundObservation {
        RoundObservation {
            bytes,
            pages: bytes / 4096,
            elapsed: Duration::from_millis(ms),
            dirty_after: dirty,
        }
    }

    #[test]
    fn converges_when_the_rest_fits_the_target() {
        let p = StopPolicy::default();
        // 800 MB at 100 MB/s, then 4096 dirty pages = 16.8 MB -> ~170 ms,
        // dirtied so fast (in 0.2 s) that another round would not shrink it.
        let h = [obs(800 * MB, 8000, 4096), obs(17 * MB, 200, 4096)];
        match decide(&p, &h, 1024 * MB, None) {
            Decision::Stop {
                reason: StopReason::Converged,
                expected_downtime,
            } => assert!(expected_downtime < Duration::from_millis(200)),
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn one_more_round_when_it_halves_the_pause() {
        let p = StopPolicy::default();
        // The same 170 ms left, but dirtied over 8 s: a 170 ms round leaves
        // about 87 pages, a pause of a few ms.
        let h = [obs(800 * MB, 8000, 4096)];
        assert!(matches!(
            decide(&p, &h, 1024 * MB, None),
            Decision::Continue { .. }
        ));
        let h = [obs(800 * MB, 8000, 4096), obs(17 * MB, 170, 87)];
        match decide(&p, &h, 1024 * MB, None) {
            Decision::Stop {
                reason: StopReason::Converged,
                expected_downtime,
            } => assert!(expected_downtime < Duration::from_millis(10)),
            d => panic!("{d:?}"),
        }
        // Already below a quarter of the target: stop.
        let h = [obs(800 * MB, 8000, 1500)];
        assert!(matches!(
            decide(&p, &h, 1024 * MB, None),
            Decision::Stop {
                reason: StopReason::Converged,
                ..
            }
        ));
        // No round left: stop.
        let p1 = StopPolicy {
            max_rounds: 1,
            ..StopPolicy::default()
        };
        assert!(matches!(
            decide(&p1, &[obs(800 * MB, 8000, 4096)], 1024 * MB, None),
            Decision::Stop {
                reason: StopReason::Converged,
                ..
            }
        ));
    }

    #[test]
    fn continues_while_shrinking_and_counts_overhead() {
        let mut p = StopPolicy::default();
        let h = [obs(800 * MB, 8000, 20_000)];
        assert!(matches!(
            decide(&p, &h, 1024 * MB, None),
            Decision::Continue { .. }
        ));
        // A large fixed overhead alone prevents convergence.
        p.switchover_overhead = Duration::from_millis(400);
        let h = [obs(800 * MB, 8000, 10)];
        assert!(matches!(
            decide(&p, &h, 1024 * MB, None),
            Decision::Continue { .. }
        ));
    }

    #[test]
    fn stops_when_the_working_set_stops_shrinking() {
        let p = StopPolicy::default();
        let mut h = vec![obs(800 * MB, 8000, 16_384)];
        for _ in 0..p.stall_rounds {
            assert!(matches!(
                decide(&p, &h, 1024 * MB, None),
                Decision::Continue { .. }
            ));
            h.push(obs(67 * MB, 670, 16_384));
        }
        match decide(&p, &h, 1024 * MB, None) {
            Decision::Stop {
                reason: StopReason::NotShrinking,
                expected_downtime,
            } => {
                // 64 MiB at ~100 MB/s.
                let ms = expected_downtime.as_millis();
                assert!((600..750).contains(&ms), "{ms}");
            }
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn round_and_byte_limits() {
        let p = StopPolicy {
            max_rounds: 2,
            stall_rounds: 0,
            ..StopPolicy::default()
        };
        let h = [obs(100 * MB, 1000, 100_000), obs(100 * MB, 1000, 50_000)];
        assert!(matches!(
            decide(&p, &h, 1024 * MB, None),
            Decision::Stop {
                reason: StopReason::MaxRounds,
                ..
            }
        ));
        let p = StopPolicy {
            max_bytes_factor: 0.05,
            stall_rounds: 0,
            ..StopPolicy::default()
        };
        assert!(matches!(
            decide(&p, &h[..1], 1024 * MB, None),
            Decision::Stop {
                reason: StopReason::MaxBytes,
                ..
            }
        ));
    }

    #[test]
    fn link_rate_prefers_measurable_rounds() {
        let h = [obs(100 * MB, 1000, 0), obs(MB / 2, 1, 0)];
        let r = link_rate(&h, Some(1));
        assert!((r - 100.0 * MB as f64).abs() < 1.0);
        assert_eq!(link_rate(&[obs(MB, 1000, 0)], Some(5000)), 5000.0);
        assert_eq!(link_rate(&[], None), 1e9);
    }

    #[test]
    fn references_go_in_step_with_the_raw_pages_after_a_head_start() {
        assert_eq!(refs_due(800, 0, 1000), 100);
        assert_eq!(refs_due(800, 500, 1000), 450);
        assert_eq!(refs_due(800, 999, 1000), 799);
        assert_eq!(refs_due(800, 1000, 1000), 800);
        // No raw pages (every page rebuildable): all at once.
        assert_eq!(refs_due(800, 0, 0), 800);
        assert_eq!(refs_due(0, 10, 1000), 0);
    }

    #[test]
    fn a_page_written_before_the_raw_pass_reads_it_is_not_sent_again() {
        let mut round = PageBitmap::new(100);
        round.set_range(0, 80);
        let mut referenced = PageBitmap::new(100);
        referenced.set_range(10, 20);
        let r = Some(&referenced);
        // The raw pass reads page 40 now: 41 and up come after the collect.
        assert!(read_after_collect(41, &round, r, 40));
        assert!(read_after_collect(79, &round, r, 40));
        // 40 may be mid-read, below it read already.
        assert!(!read_after_collect(40, &round, r, 40));
        assert!(!read_after_collect(3, &round, r, 40));
        // Not in this round: nothing will send it.
        assert!(!read_after_collect(85, &round, r, 40));
        // Read (and hashed) by the reference pass, which is over.
        assert!(!read_after_collect(15, &round, r, 5));
        // Before the raw pass starts, nothing is known to come after.
        assert!(!read_after_collect(50, &round, r, RAW_PASS_NOT_STARTED));
        assert!(!read_after_collect(50, &round, None, 40));
    }

    #[test]
    fn nothing_dirty_means_converged() {
        let p = StopPolicy::default();
        assert!(matches!(
            decide(&p, &[obs(MB, 10, 0)], MB, None),
            Decision::Stop {
                reason: StopReason::Converged,
                ..
            }
        ));
    }
}
