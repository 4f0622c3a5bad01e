//! The destination end of a migration: receives pages into the RAM file,
//! compares digests at switchover and resumes the VM only on [`Message::Commit`].
//!
//! Every page index, length and count from the source is checked: a page
//! beyond the RAM aborts the session with a reason sent back to the source.

use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::protocol::{self, Hello, Message, PageEncoding, PageEntry, ProtocolError, Welcome};
use crate::ram::{DestRam, RamError};
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
    counts: [u64; 3],
    digests: Vec<u128>,
    final_hash: Duration,
}

/// Pages decoded by a connection reader, applied in order by the RAM owner.
struct ApplyBatch {
    pages: Vec<PageEntry>,
}

impl DestSession {
    /// The source's announcement.
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// Receives pages until every data connection ended, then answers the
    /// source's digest comparison. Returns the RAM and whether it matched.
    pub async fn receive(&mut self, ram: DestRam) -> Result<(DestRam, bool), DestError> {
        let pages = ram.pages();
        let (tx, mut rx) = mpsc::channel::<ApplyBatch>(16);
        let readers: Vec<JoinHandle<Result<u64, DestError>>> = std::mem::take(&mut self.data)
            .into_iter()
            .map(|s| tokio::spawn(read_pages(s, tx.clone(), pages)))
            .collect();
        drop(tx);
        // The RAM has one owner thread: ordering per page is the arrival order
        // on its connection, and pages never cross connections. Being the only
        // writer, it also keeps the switchover digests up to date, hashing
        // chunks whenever no page is waiting.
        let applier = tokio::task::spawn_blocking(move || -> Result<Applied, DestError> {
            let mut ram = ram;
            // The VM has not run here: every page reads as zero until written,
            // which lets the source skip zero pages and the digests start known.
            ram.zero_all()?;
            let mut digests = verify::IncrementalDigests::new(pages, verify::CHUNK_PAGES);
            let mut counts = [0u64; 3];
            let mut dctx = zstd::bulk::Decompressor::new()
                .map_err(|e| DestError::Worker(format!("zstd: {e}")))?;
            loop {
                let batch = match rx.try_recv() {
                    Ok(b) => b,
                    Err(mpsc::error::TryRecvError::Empty) => {
                        if digests.hash_one(ram.bytes()) {
                            continue;
                        }
                        match rx.blocking_recv() {
                            Some(b) => b,
                            None => break,
                        }
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                };
                for e in batch.pages {
                    apply(&mut ram, &e, &mut dctx)?;
                    digests.written(e.page);
                    counts[e.encoding as usize] += 1;
                }
            }
            let t = Instant::now();
            let digests = digests.finish(ram.bytes());
            Ok(Applied {
                ram,
                counts,
                digests,
                final_hash: t.elapsed(),
            })
        });
        let wait_data = async {
            let mut bytes = 0;
            for r in readers {
                bytes += r.await.map_err(|e| DestError::Worker(e.to_string()))??;
            }
            Ok::<u64, DestError>(bytes)
        };
        // The control connection stays quiet during pre-copy except for an
        // abort (or a dead source) and the digests, which the source may send
        // before the last pages have arrived on the data connections.
        tokio::pin!(wait_data);
        let mut early_request = None;
        let bytes = tokio::select! {
            r = &mut wait_data => r?,
            m = protocol::read_message(&mut self.ctrl_rx, "watching the control connection") => {
                match m {
                    Ok((req @ Message::VerifyRequest { .. }, _)) => {
                        early_request = Some(req);
                        wait_data.await?
                    }
                    Ok((Message::Abort { reason }, _)) => return Err(DestError::SourceAborted { reason }),
                    Ok((other, _)) => return Err(DestError::Unexpected { got: other.name(), expected: "pages" }),
                    Err(e) => return Err(e.into()),
                }
            }
        };
        let Applied {
            ram,
            counts,
            digests: ours,
            final_hash,
        } = applier
            .await
            .map_err(|e| DestError::Worker(e.to_string()))??;
        self.stats.bytes_received = bytes;
        self.stats.raw_pages = counts[PageEncoding::Raw as usize];
        self.stats.zero_pages = counts[PageEncoding::Zero as usize];
        self.stats.compressed_pages = counts[PageEncoding::Zstd as usize];

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
    let dst = ram
        .page_mut(e.page)
        .map_err(|err| DestError::BadPage(err.to_string()))?;
    match e.encoding {
        PageEncoding::Raw => dst.copy_from_slice(&e.data),
        PageEncoding::Zero => dst.fill(0),
        PageEncoding::Zstd => {
            let n = dctx
                .decompress_to_buffer(&e.data, dst)
                .map_err(|err| DestError::BadPage(format!("page {}: zstd: {err}", e.page)))?;
            if n != PAGE_SIZE {
                return Err(DestError::BadPage(format!(
                    "page {}: decompressed to {n} bytes, not {PAGE_SIZE}",
                    e.page
                )));
            }
        }
    }
    Ok(())
}

async fn read_pages(
    mut s: TcpStream,
    tx: mpsc::Sender<ApplyBatch>,
    pages: u64,
) -> Result<u64, DestError> {
    let mut bytes = 0;
    loop {
        let (msg, n) = protocol::read_message(&mut s, "receiving pages").await?;
        bytes += n;
        match msg {
            Message::PageBatch { pages: entries, .. } => {
                if let Some(bad) = entries.iter().find(|e| e.page >= pages) {
                    return Err(DestError::BadPage(format!(
                        "page {} is beyond the {pages} pages of RAM",
                        bad.page
                    )));
                }
                if tx.send(ApplyBatch { pages: entries }).await.is_err() {
                    return Err(DestError::Worker("RAM writer stopped".into()));
                }
            }
            Message::EndOfStream => return Ok(bytes),
            other => {
                return Err(DestError::Unexpected {
                    got: other.name(),
                    expected: "PageBatch or EndOfStream",
                })
            }
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
