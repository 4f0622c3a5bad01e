//! The destination end of a migration: receives pages into the RAM file,
//! compares digests at switchover and resumes the VM only on [`Message::Commit`].
//!
//! Every page index, length and count from the source is checked: a page
//! beyond the RAM aborts the session with a reason sent back to the source.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use xxhash_rust::xxh3::xxh3_128;

use crate::protocol::{self, Hello, Message, PageEncoding, PageEntry, ProtocolError, Welcome};
use crate::ram::{DestRam, RamError};
use crate::rebuild::{self, RefRequest, Storage};
use crate::verify;
use crate::PAGE_SIZE;

/// Errors of the destination side.
#[derive(Debug, Error)]
pub enum DestError {
    /// Transport or protocol failure.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The source's announcement does not fit this VM.
    #[error("refused the source: {reason}")]
    Refused {
        /// Why.
        reason: String,
    },
    /// The source gave up.
    #[error("source aborted the migration: {reason}")]
    SourceAborted {
        /// Its reason.
        reason: String,
    },
    /// The source sent something out of place.
    #[error("source sent {got} while the destination expected {expected}")]
    Unexpected {
        /// What came.
        got: &'static str,
        /// What was expected.
        expected: &'static str,
    },
    /// A page message was invalid.
    #[error("bad page from the source: {0}")]
    BadPage(String),
    /// RAM access failed.
    #[error(transparent)]
    Ram(#[from] RamError),
    /// Accepting connections failed.
    #[error("accepting a connection failed")]
    Accept(#[source] std::io::Error),
    /// A peer stayed silent too long.
    #[error("no word from the source agent for {secs} s while {doing}")]
    Timeout {
        /// Seconds waited.
        secs: u64,
        /// What was awaited.
        doing: &'static str,
    },
    /// A worker died.
    #[error("internal worker failed: {0}")]
    Worker(String),
}

/// Counters of what arrived.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct DestStats {
    /// Raw pages applied.
    pub raw_pages: u64,
    /// Zero pages applied.
    pub zero_pages: u64,
    /// Compressed pages applied.
    pub compressed_pages: u64,
    /// Bytes received on data connections.
    pub bytes_received: u64,
    /// Pages rebuilt from shared storage (reference matched).
    pub rebuilt_pages: u64,
    /// References whose storage content did not match (page asked for).
    pub rebuild_mismatch: u64,
    /// References refused as invalid (unknown disk, misaligned, out of range, no storage).
    pub rejected_refs: u64,
    /// Bytes read from shared storage.
    pub storage_bytes: u64,
    /// Time spent hashing at switchover.
    pub verify_ms: u64,
}

/// A source that passed the handshake, with its data connections.
pub struct DestSession {
    ctrl_rx: OwnedReadHalf,
    ctrl_tx: OwnedWriteHalf,
    data: Vec<TcpStream>,
    hello: Hello,
    peer_timeout: Duration,
    /// What arrived.
    pub stats: DestStats,
}

/// Accepts one source: checks its Hello against `ram_bytes`, answers with
/// `incoming_uri`, then accepts its data connections.
pub async fn accept(
    listener: &TcpListener,
    ram_bytes: u64,
    incoming_uri: &str,
    peer_timeout: Duration,
) -> Result<DestSession, DestError> {
    let (ctrl, peer) = listener.accept().await.map_err(DestError::Accept)?;
    ctrl.set_nodelay(true).ok();
    tracing::info!(%peer, "source agent connected");
    let (mut ctrl_rx, mut ctrl_tx) = ctrl.into_split();
    let (msg, _) = within(
        peer_timeout,
        "waiting for Hello",
        protocol::read_message(&mut ctrl_rx, "waiting for Hello"),
    )
    .await??;
    let hello = match msg {
        Message::Hello(h) if h.conn_index == 0 => h,
        other => {
            return Err(DestError::Unexpected {
                got: other.name(),
                expected: "Hello on the control connection",
            })
        }
    };
    let problem = if hello.ram_bytes != ram_bytes {
        Some(format!(
            "source RAM is {} bytes but the destination VM has {} bytes: start the destination QEMU with the same -m and memory backend size",
            hello.ram_bytes, ram_bytes
        ))
    } else if hello.page_size as usize != PAGE_SIZE {
        Some(format!(
            "page size {} is not supported (only {PAGE_SIZE})",
            hello.page_size
        ))
    } else if !(1..=16).contains(&hello.data_connections) {
        Some(format!(
            "{} data connections requested, 1 to 16 allowed",
            hello.data_connections
        ))
    } else {
        None
    };
    if let Some(reason) = problem {
        let _ = protocol::write_message(
            &mut ctrl_tx,
            &Message::Refuse {
                reason: reason.clone(),
            },
            "refusing",
        )
        .await;
        return Err(DestError::Refused { reason });
    }
    protocol::write_message(
        &mut ctrl_tx,
        &Message::Welcome(Welcome {
            version: protocol::PROTOCOL_VERSION,
            incoming_uri: incoming_uri.to_string(),
        }),
        "sending Welcome",
    )
    .await?;
    let mut slots: Vec<Option<TcpStream>> = (0..hello.data_connections).map(|_| None).collect();
    while slots.iter().any(Option::is_none) {
        let (mut s, _) = within(
            peer_timeout,
            "waiting for data connections",
            listener.accept(),
        )
        .await?
        .map_err(DestError::Accept)?;
        let (msg, _) = within(
            peer_timeout,
            "waiting for a data Hello",
            protocol::read_message(&mut s, "waiting for a data Hello"),
        )
        .await??;
        match msg {
            Message::Hello(h)
                if h.session == hello.session
                    && h.conn_index >= 1
                    && h.conn_index <= hello.data_connections
                    && slots[usize::from(h.conn_index - 1)].is_none() =>
            {
                slots[usize::from(h.conn_index - 1)] = Some(s);
            }
            // A stray connection (another session, a scanner): drop it, keep waiting.
            other => tracing::warn!(msg = other.name(), "ignored a stray connection"),
        }
    }
    Ok(DestSession {
        ctrl_rx,
        ctrl_tx,
        data: slots.into_iter().flatten().collect(),
        hello,
        peer_timeout,
        stats: DestStats::default(),
    })
}

/// What the RAM owner thread hands back once every stream ended.
struct Applied {
    ram: DestRam,
    digests: Vec<u128>,
    final_hash: Duration,
    stats: DestStats,
}

/// Inputs of the RAM owner thread.
enum ApplyInput {
    /// Pages from a data connection, in arrival order.
    Batch(Vec<PageEntry>),
    /// A data connection finished a round.
    Drain { round: u32 },
    /// A data connection ended after this many bytes.
    End { bytes: u64 },
    /// A data connection failed.
    Failed(DestError),
    /// A storage read of a run of references finished: per page (page,
    /// version, whether it matched), and the pages read, in the same order.
    Resolved {
        pages: Vec<(u64, u32, bool)>,
        data: Vec<u8>,
    },
}

/// Reads references from shared storage, several pages per read where the
/// disk offsets are consecutive, and hands the verified pages back.
fn storage_worker(
    storage: Arc<dyn Storage>,
    requests: Arc<Mutex<std::sync::mpsc::Receiver<RefRequest>>>,
    results: mpsc::Sender<ApplyInput>,
    bytes: Arc<AtomicU64>,
) {
    // Large gathers let sorting find long runs: a warm buffer pool holds
    // most pages of a table, which sit next to each other on disk.
    const GATHER: usize = 2048;
    const MAX_RUN: usize = 256;
    loop {
        let batch = {
            let Ok(rx) = requests.lock() else { return };
            let Ok(first) = rx.recv() else { return };
            let mut v = vec![first];
            while v.len() < GATHER {
                match rx.try_recv() {
                    Ok(r) => v.push(r),
                    Err(_) => break,
                }
            }
            v
        };
        for run in rebuild::coalesce(batch, MAX_RUN) {
            let mut buf = vec![0u8; run.len() * PAGE_SIZE];
            let read = storage.read_at(run[0].hint.disk, run[0].hint.offset, &mut buf);
            if let Err(e) = &read {
                tracing::warn!(error = %e, "shared storage read failed; asking the source for the pages");
            }
            bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
            // One message per run, not per page: the applier is woken once.
            let pages = run
                .iter()
                .zip(buf.chunks_exact(PAGE_SIZE))
                .map(|(r, page)| (r.page, r.version, read.is_ok() && xxh3_128(page) == r.hash))
                .collect();
            if results
                .blocking_send(ApplyInput::Resolved { pages, data: buf })
                .is_err()
            {
                return;
            }
        }
    }
}

/// The RAM owner: applies pages in arrival order, sends references to the
/// storage readers, answers drains, and keeps the switchover digests.
struct Applier {
    ram: DestRam,
    conns: usize,
    version: Vec<u32>,
    digests: verify::IncrementalDigests,
    dctx: zstd::bulk::Decompressor<'static>,
    disk_sizes: Vec<u64>,
    refs: Option<std::sync::mpsc::Sender<RefRequest>>,
    outstanding: u64,
    need: Vec<u64>,
    stats: DestStats,
}

impl Applier {
    fn entry(&mut self, e: PageEntry) -> Result<(), DestError> {
        let idx = usize::try_from(e.page).expect("page checked against RAM size by the reader");
        // Every message about a page supersedes the earlier ones, including a
        // storage read still in flight: it will find the version moved on.
        self.version[idx] = self.version[idx].wrapping_add(1);
        match e.encoding {
            PageEncoding::Reference => {
                let (hint, hash) = protocol::decode_reference(&e.data)
                    .ok_or_else(|| DestError::BadPage(format!("page {}: bad reference", e.page)))?;
                let valid = rebuild::check_hint(hint, &self.disk_sizes);
                match (&self.refs, valid) {
                    (Some(tx), Ok(())) => {
                        let req = RefRequest {
                            page: e.page,
                            version: self.version[idx],
                            hint,
                            hash,
                        };
                        tx.send(req)
                            .map_err(|_| DestError::Worker("storage readers stopped".into()))?;
                        self.outstanding += 1;
                    }
                    _ => {
                        self.stats.rejected_refs += 1;
                        self.need.push(e.page);
                    }
                }
            }
            enc => {
                apply(&mut self.ram, &e, &mut self.dctx)?;
                self.digests.written(e.page);
                match enc {
                    PageEncoding::Raw => self.stats.raw_pages += 1,
                    PageEncoding::Zero => self.stats.zero_pages += 1,
                    _ => self.stats.compressed_pages += 1,
                }
            }
        }
        Ok(())
    }

    /// Applies one storage read: pages whose hash matched and whose version
    /// is still current are written, consecutive RAM pages in one write
    /// (buffer-pool frames are 4 consecutive pages); a mismatch goes on the
    /// list of pages to ask the source for.
    fn resolved_run(&mut self, pages: &[(u64, u32, bool)], data: &[u8]) -> Result<(), DestError> {
        self.outstanding -= pages.len() as u64;
        // (first RAM page, first index in `pages`, count) of the pending write.
        let mut group: Option<(u64, usize, usize)> = None;
        for (i, &(page, version, ok)) in pages.iter().enumerate() {
            let idx = usize::try_from(page).expect("page checked when the reference arrived");
            if self.version[idx] != version {
                continue; // a newer message about this page already decided it
            }
            if !ok {
                self.stats.rebuild_mismatch += 1;
                self.need.push(page);
                continue;
            }
            self.digests.written(page);
            self.stats.rebuilt_pages += 1;
            match &mut group {
                Some((first, at, n)) if *first + *n as u64 == page && *at + *n == i => *n += 1,
                _ => {
                    if let Some(g) = group.replace((page, i, 1)) {
                        self.write_group(g, data)?;
                    }
                }
            }
        }
        if let Some(g) = group {
            self.write_group(g, data)?;
        }
        Ok(())
    }

    fn write_group(
        &mut self,
        (page, at, n): (u64, usize, usize),
        data: &[u8],
    ) -> Result<(), DestError> {
        Ok(self
            .ram
            .write_pages(page, &data[at * PAGE_SIZE..(at + n) * PAGE_SIZE])?)
    }

    fn run(
        mut self,
        mut rx: mpsc::Receiver<ApplyInput>,
        drained: mpsc::UnboundedSender<Message>,
    ) -> Result<Applied, DestError> {
        let (mut ended, mut drains, mut bytes) = (0usize, 0usize, 0u64);
        let mut drain_round = 0;
        while ended < self.conns || self.outstanding > 0 {
            let input = match rx.try_recv() {
                Ok(i) => i,
                Err(mpsc::error::TryRecvError::Empty) => {
                    // Idle: bring the switchover digests up to date. Not while
                    // storage reads are pending: their pages land all over RAM
                    // and would make the same chunks be hashed again and again.
                    if self.outstanding == 0 && self.digests.hash_one(self.ram.bytes()) {
                        continue;
                    }
                    rx.blocking_recv()
                        .ok_or_else(|| DestError::Worker("page inputs closed early".into()))?
                }
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    return Err(DestError::Worker("page inputs closed early".into()))
                }
            };
            match input {
                ApplyInput::Batch(pages) => {
                    for e in pages {
                        self.entry(e)?;
                    }
                }
                ApplyInput::Drain { round } => {
                    drains += 1;
                    drain_round = round;
                }
                ApplyInput::End { bytes: b } => {
                    ended += 1;
                    bytes += b;
                }
                ApplyInput::Failed(e) => return Err(e),
                ApplyInput::Resolved { pages, data } => self.resolved_run(&pages, &data)?,
            }
            if drains == self.conns && self.outstanding == 0 {
                drains = 0;
                // Catch the switchover digests up before answering: the
                // source may stop the VM next, and hashing now keeps a big
                // round's pages out of the downtime (the source sends nothing
                // until this answer, so no page waits for it).
                while self.digests.hash_one(self.ram.bytes()) {}
                let n = self.need.len().min(protocol::MAX_NEED);
                let need: Vec<u64> = self.need.drain(..n).collect();
                let _ = drained.send(Message::Drained {
                    round: drain_round,
                    need,
                });
            }
        }
        self.refs = None; // lets the storage readers finish
        self.stats.bytes_received = bytes;
        let t = Instant::now();
        let digests = self.digests.finish(self.ram.bytes());
        Ok(Applied {
            ram: self.ram,
            digests,
            final_hash: t.elapsed(),
            stats: self.stats,
        })
    }
}

impl DestSession {
    /// The source's announcement.
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// Receives pages until every data connection ended, rebuilding
    /// referenced pages from `storage`, then answers the source's digest
    /// comparison. Returns the RAM and whether it matched.
    pub async fn receive(
        &mut self,
        ram: DestRam,
        storage: Option<Arc<dyn Storage>>,
    ) -> Result<(DestRam, bool), DestError> {
        let pages = ram.pages();
        let conns = self.data.len();
        let (tx, rx) = mpsc::channel::<ApplyInput>(64);
        for s in std::mem::take(&mut self.data) {
            tokio::spawn(read_pages(s, tx.clone(), pages));
        }
        let storage_bytes = Arc::new(AtomicU64::new(0));
        let (refs, disk_sizes) = match &storage {
            Some(st) => {
                let (req_tx, req_rx) = std::sync::mpsc::channel::<RefRequest>();
                let req_rx = Arc::new(Mutex::new(req_rx));
                for _ in 0..4 {
                    let (st, req_rx, tx, b) = (
                        st.clone(),
                        req_rx.clone(),
                        tx.clone(),
                        storage_bytes.clone(),
                    );
                    std::thread::spawn(move || storage_worker(st, req_rx, tx, b));
                }
                (Some(req_tx), st.disk_sizes().to_vec())
            }
            None => (None, Vec::new()),
        };
        drop(tx);
        let (drained_tx, mut drained_rx) = mpsc::unbounded_channel();
        let applier = Applier {
            ram,
            conns,
            version: vec![0; usize::try_from(pages).expect("RAM pages fit in memory")],
            digests: verify::IncrementalDigests::new(pages, verify::CHUNK_PAGES),
            dctx: zstd::bulk::Decompressor::new()
                .map_err(|e| DestError::Worker(format!("zstd: {e}")))?,
            disk_sizes,
            refs,
            outstanding: 0,
            need: Vec::new(),
            stats: DestStats::default(),
        };
        // The RAM has one owner thread: ordering per page is the arrival order
        // on its connection, and pages never cross connections.
        let mut applier = tokio::task::spawn_blocking(move || {
            let mut a = applier;
            // The VM has not run here: every page reads as zero until written,
            // which lets the source skip zero pages and the digests start known.
            a.ram.zero_all()?;
            a.run(rx, drained_tx)
        });
        // Besides forwarding drain answers, the control connection carries
        // only an abort (or EOF from a dead source) and the digests, which may
        // come before the last pages have been applied.
        let mut early_request = None;
        let applied = loop {
            tokio::select! {
                biased;
                Some(m) = drained_rx.recv() => {
                    protocol::write_message(&mut self.ctrl_tx, &m, "answering a drain").await?;
                }
                r = &mut applier => break r.map_err(|e| DestError::Worker(e.to_string()))??,
                m = protocol::read_message(&mut self.ctrl_rx, "watching the control connection"), if early_request.is_none() => {
                    match m {
                        Ok((req @ Message::VerifyRequest { .. }, _)) => early_request = Some(req),
                        Ok((Message::Abort { reason }, _)) => return Err(DestError::SourceAborted { reason }),
                        Ok((other, _)) => return Err(DestError::Unexpected { got: other.name(), expected: "pages" }),
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        };
        while let Ok(m) = drained_rx.try_recv() {
            protocol::write_message(&mut self.ctrl_tx, &m, "answering a drain").await?;
        }
        let Applied {
            ram,
            digests: ours,
            final_hash,
            stats,
        } = applied;
        self.stats = DestStats {
            storage_bytes: storage_bytes.load(Ordering::Relaxed),
            ..stats
        };

        let msg = match early_request {
            Some(m) => m,
            None => {
                self.read_ctrl("waiting for the source's RAM digests")
                    .await?
            }
        };
        let Message::VerifyRequest {
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
        self.stats.verify_ms = u64::try_from(final_hash.as_millis()).unwrap_or(u64::MAX);
        let bad = verify::mismatched_chunks(&ours, &digests);
        let total = u32::try_from(bad.len()).unwrap_or(u32::MAX);
        let listed = bad
            .into_iter()
            .take(protocol::MAX_REPORTED_MISMATCHES)
            .collect();
        protocol::write_message(
            &mut self.ctrl_tx,
            &Message::VerifyResult {
                mismatched: listed,
                mismatched_total: total,
            },
            "sending the RAM comparison",
        )
        .await?;
        Ok((ram, total == 0))
    }

    /// Waits for the source to hand over the VM. Ok(()) means: resume it now.
    pub async fn wait_commit(&mut self) -> Result<(), DestError> {
        match self.read_ctrl("waiting for Commit").await? {
            Message::Commit => Ok(()),
            other => Err(DestError::Unexpected {
                got: other.name(),
                expected: "Commit",
            }),
        }
    }

    /// Tells the source the VM runs here now.
    pub async fn activated(&mut self) -> Result<(), DestError> {
        protocol::write_message(&mut self.ctrl_tx, &Message::Activated, "sending Activated")
            .await?;
        Ok(())
    }

    /// Tells the source why the destination gives up (best effort).
    pub async fn abort(&mut self, reason: &str) {
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            protocol::write_message(
                &mut self.ctrl_tx,
                &Message::Abort {
                    reason: reason.to_string(),
                },
                "sending Abort",
            ),
        )
        .await;
    }

    async fn read_ctrl(&mut self, doing: &'static str) -> Result<Message, DestError> {
        let (msg, _) = within(
            self.peer_timeout,
            doing,
            protocol::read_message(&mut self.ctrl_rx, doing),
        )
        .await??;
        if let Message::Abort { reason } = msg {
            return Err(DestError::SourceAborted { reason });
        }
        Ok(msg)
    }
}

fn apply(
    ram: &mut DestRam,
    e: &PageEntry,
    dctx: &mut zstd::bulk::Decompressor<'_>,
) -> Result<(), DestError> {
    let bad = |err: crate::ram::RamError| DestError::BadPage(err.to_string());
    match e.encoding {
        PageEncoding::Raw => ram.write_pages(e.page, &e.data).map_err(bad),
        // A hole reads as zero and costs no memory.
        PageEncoding::Zero => ram.zero_pages(e.page, 1).map_err(bad),
        PageEncoding::Reference => Err(DestError::BadPage(format!(
            "page {}: a reference cannot be applied directly",
            e.page
        ))),
        PageEncoding::Zstd => {
            let mut page = [0u8; PAGE_SIZE];
            let n = dctx
                .decompress_to_buffer(&e.data, &mut page[..])
                .map_err(|err| DestError::BadPage(format!("page {}: zstd: {err}", e.page)))?;
            if n != PAGE_SIZE {
                return Err(DestError::BadPage(format!(
                    "page {}: decompressed to {n} bytes, not {PAGE_SIZE}",
                    e.page
                )));
            }
            ram.write_pages(e.page, &page).map_err(bad)
        }
    }
}

async fn read_pages(s: TcpStream, tx: mpsc::Sender<ApplyInput>, pages: u64) {
    let last = match read_stream(s, &tx, pages).await {
        Ok(bytes) => ApplyInput::End { bytes },
        Err(e) => ApplyInput::Failed(e),
    };
    let _ = tx.send(last).await;
}

async fn read_stream(
    mut s: TcpStream,
    tx: &mpsc::Sender<ApplyInput>,
    pages: u64,
) -> Result<u64, DestError> {
    let mut bytes = 0;
    loop {
        let (msg, n) = protocol::read_message(&mut s, "receiving pages").await?;
        bytes += n;
        let input = match msg {
            Message::PageBatch { pages: entries, .. } => {
                if let Some(bad) = entries.iter().find(|e| e.page >= pages) {
                    return Err(DestError::BadPage(format!(
                        "page {} is beyond the {pages} pages of RAM",
                        bad.page
                    )));
                }
                ApplyInput::Batch(entries)
            }
            Message::Drain { round } => ApplyInput::Drain { round },
            Message::EndOfStream => return Ok(bytes),
            other => {
                return Err(DestError::Unexpected {
                    got: other.name(),
                    expected: "PageBatch, Drain or EndOfStream",
                })
            }
        };
        if tx.send(input).await.is_err() {
            return Err(DestError::Worker("RAM writer stopped".into()));
        }
    }
}

async fn within<T>(
    limit: Duration,
    doing: &'static str,
    f: impl std::future::Future<Output = T>,
) -> Result<T, DestError> {
    tokio::time::timeout(limit, f)
        .await
        .map_err(|_| DestError::Timeout {
            secs: limit.as_secs(),
            doing,
        })
}
