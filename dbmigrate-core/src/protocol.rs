//! Wire protocol between the source and destination agents.
//!
//! Every frame is a fixed 16-byte little-endian header followed by a payload:
//!
//! ```text
//! 0      4      6      8                16
//! +------+------+------+----------------+-----------------+
//! |magic | kind |flags | payload length | payload ...     |
//! +------+------+------+----------------+-----------------+
//! ```
//!
//! Session (one control connection, N data connections):
//!
//! ```text
//! source                                   destination
//!   | Hello{version, ram, conn 0}  ------------> |  control
//!   | <--------------------------- Welcome{post-copy} |  (RAM reserved, QEMU waiting)
//!   | Hello{conn 1..N} ------------------------> |  data
//!   | PageBatch{round, pages} ... (data conns) -> |  applied in arrival order;
//!   |                                             |  references read from storage
//!   | Drain{round} (each data conn) -----------> |
//!   | <----------------- Drained{round, need} (control): pages whose reference
//!   |                    did not match storage; they go raw in the next round
//!   |            ... rounds until the stop decision; VM paused;
//!   |            final round and Drain until nothing is needed ...
//!   | EndOfStream (each data conn) ------------> |
//!   | VerifyRequest{chunk digests} ------------> |  control
//!   | <--------------------- VerifyResult{bad chunks}
//!   | Hello{conn DEVICE_STATE_CONN} -----------> |  QEMU's device state
//!   |            (x-ignore-shared), relayed between each agent's
//!   |            private unix socket and its QEMU: no QEMU listens
//!   |            on the network and no peer chooses a QEMU URI
//!   | Commit ----------------------------------> |  point of no return
//!   | <-------------------------- Activated{resume time}
//! ```
//!
//! Once the session is set up both sides send a [`Message::Heartbeat`] on
//! the control connection every [`HEARTBEAT_INTERVAL`], whatever else they
//! do, so that silence means a dead peer or a cut link, never a busy one.
//!
//! A page is always sent on the same data connection (see
//! [`connection_for_page`]), so per-page ordering follows TCP ordering and the
//! last message about a page decides its content. Every length, count and
//! string from the peer is bounded before it is used.

use std::io;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::rebuild::Hint;
use crate::PAGE_SIZE;

/// First four bytes of every frame: "DMG1" little-endian.
pub const MAGIC: u32 = u32::from_le_bytes(*b"DMG1");
/// Protocol version carried in [`Hello`] and [`Welcome`].
pub const PROTOCOL_VERSION: u32 = 7;
/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 16;
/// Largest payload a peer may announce; larger frames are refused unread.
pub const MAX_PAYLOAD: u64 = 8 << 20;
/// Largest string (reasons, URIs) a peer may send.
pub const MAX_STRING: usize = 4096;
/// How often each side sends a [`Message::Heartbeat`] on the control connection.
pub const HEARTBEAT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// [`Hello::conn_index`] of the connection that carries QEMU's device state.
pub const DEVICE_STATE_CONN: u16 = u16::MAX;
/// Most pages one [`Message::PageBatch`] may hold: a frame of zero or
/// reference entries decodes to a few hundred KiB at most, whatever the
/// peer packs into [`MAX_PAYLOAD`].
pub const MAX_BATCH_PAGES: usize = 8192;
/// Pages per chunk that stay on one data connection.
pub const PAGES_PER_STRIPE: u64 = 64;

/// Errors of framing and decoding.
#[derive(Debug, Error)]
pub enum ProtocolError {
    /// The transport failed.
    #[error("connection failed while {doing}")]
    Io {
        /// What was being done.
        doing: &'static str,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// The peer closed the connection.
    #[error("peer closed the connection while {doing}")]
    Closed {
        /// What was being done.
        doing: &'static str,
    },
    /// The header does not start with [`MAGIC`]: not a dbmigrate peer, or a corrupted stream.
    #[error("bad frame magic {found:#010x}: the peer is not a dbmigrate agent or the stream is corrupted")]
    BadMagic {
        /// What was read instead.
        found: u32,
    },
    /// Unknown message kind.
    #[error("unknown message kind {kind}")]
    UnknownKind {
        /// The kind number.
        kind: u16,
    },
    /// Payload longer than [`MAX_PAYLOAD`].
    #[error("frame announces {len} payload bytes, more than the limit of {MAX_PAYLOAD}")]
    TooLong {
        /// Announced length.
        len: u64,
    },
    /// The payload does not match its message layout.
    #[error("malformed {kind} message: {problem}")]
    Malformed {
        /// Message name.
        kind: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// The peer speaks another protocol version.
    #[error("peer speaks protocol version {peer}, this agent speaks {PROTOCOL_VERSION}: install the same dbmigrate version on both hosts")]
    Version {
        /// The peer's version.
        peer: u32,
    },
}

/// How a page travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum PageEncoding {
    /// 4096 bytes as they are.
    Raw = 0,
    /// All zero; no bytes follow.
    Zero = 1,
    /// zstd frame that decompresses to exactly 4096 bytes.
    Zstd = 2,
    /// A reference to shared storage: see [`encode_reference`].
    Reference = 3,
}

/// Bytes of a [`PageEncoding::Reference`] entry: disk u16, offset u64, xxh3-128 u128.
pub const REFERENCE_LEN: usize = 26;

/// Encodes a reference entry's data.
pub fn encode_reference(hint: Hint, hash: u128) -> [u8; REFERENCE_LEN] {
    let mut b = [0u8; REFERENCE_LEN];
    b[0..2].copy_from_slice(&hint.disk.to_le_bytes());
    b[2..10].copy_from_slice(&hint.offset.to_le_bytes());
    b[10..26].copy_from_slice(&hash.to_le_bytes());
    b
}

/// Decodes a reference entry's data (length checked by the frame decoder).
pub fn decode_reference(data: &[u8]) -> Option<(Hint, u128)> {
    let b: &[u8; REFERENCE_LEN] = data.try_into().ok()?;
    let disk = u16::from_le_bytes([b[0], b[1]]);
    let offset = u64::from_le_bytes(b[2..10].try_into().ok()?);
    let hash = u128::from_le_bytes(b[10..26].try_into().ok()?);
    Some((Hint { disk, offset }, hash))
}

impl PageEncoding {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Raw),
            1 => Some(Self::Zero),
            2 => Some(Self::Zstd),
            3 => Some(Self::Reference),
            _ => None,
        }
    }
}

/// First message on every connection, source to destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`] of the sender.
    pub version: u32,
    /// Random id tying data connections to their control connection.
    pub session: u64,
    /// Size of the RAM file being migrated.
    pub ram_bytes: u64,
    /// Page size (4096).
    pub page_size: u32,
    /// Number of data connections that will follow.
    pub data_connections: u16,
    /// 0 for the control connection, 1..=N for data connections,
    /// [`DEVICE_STATE_CONN`] for the device-state relay.
    pub conn_index: u16,
}

/// Destination's answer to the control [`Hello`]: ready to receive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Welcome {
    /// [`PROTOCOL_VERSION`] of the destination.
    pub version: u32,
    /// The destination can serve the VM's page faults (post-copy).
    pub postcopy: bool,
}

/// One page inside a [`Message::PageBatch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageEntry {
    /// Page index in the RAM file.
    pub page: u64,
    /// How `data` is encoded.
    pub encoding: PageEncoding,
    /// Encoded bytes (empty for zero pages).
    pub data: Vec<u8>,
}

/// All messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`Welcome`].
    Welcome(Welcome),
    /// Destination refuses the session.
    Refuse {
        /// Why, for the operator.
        reason: String,
    },
    /// Pages of one pre-copy round.
    PageBatch {
        /// Round number, 0 = first full pass.
        round: u32,
        /// The pages.
        pages: Vec<PageEntry>,
    },
    /// No more pages follow on this data connection.
    EndOfStream,
    /// Source's digests of RAM taken with the VM paused.
    VerifyRequest {
        /// Pages per digest chunk.
        chunk_pages: u32,
        /// One 128-bit digest per chunk.
        digests: Vec<u128>,
    },
    /// Destination's comparison.
    VerifyResult {
        /// Indexes of chunks that differ (at most [`MAX_REPORTED_MISMATCHES`]).
        mismatched: Vec<u32>,
        /// Total number of differing chunks.
        mismatched_total: u32,
    },
    /// End of a round on a data connection: the destination answers with
    /// [`Message::Drained`] once every connection's marker arrived and every
    /// reference of the round is resolved.
    Drain {
        /// The round.
        round: u32,
    },
    /// Destination has applied the round; `need` are pages whose reference
    /// did not match storage and must be sent as they are.
    Drained {
        /// The round.
        round: u32,
        /// Pages to send raw (at most [`MAX_NEED`]; the rest follow in the next answer).
        need: Vec<u64>,
    },
    /// Source hands the VM over: the destination may resume it.
    Commit,
    /// Destination resumed the VM.
    Activated,
    /// Either side gives up; the source VM stays authoritative.
    Abort {
        /// Why, for the operator.
        reason: String,
    },
    /// Control connection, VM still running on the source: a switch to
    /// post-copy follows. `stale` is a bitmap (as in [`Message::Switch`]) of
    /// pages already known to be pending: their copies at the destination
    /// are stale. Once [`Message::PrepareMark`] came on every data
    /// connection too (the round's pages are in, the connections empty),
    /// the destination punches out those pages and the ones still waiting
    /// for storage, outside the pause, and answers.
    PrepareSwitch {
        /// The bitmap, exactly ceil(pages / 8) bytes.
        stale: Vec<u8>,
    },
    /// Data connection: everything before the switch's preparation was sent.
    PrepareMark,
    /// Destination: the data connections are empty and the pages waiting
    /// for storage are holes; the switch may come.
    SwitchPrepared,
    /// Control connection, VM paused: switch to post-copy. `pending` is a
    /// bitmap (bit i of byte i/8 = page i) of pages whose content the
    /// destination does not have yet; every other page it holds (or will
    /// rebuild from a reference already sent) is final, holes being zero.
    Switch {
        /// The bitmap, exactly ceil(pages / 8) bytes.
        pending: Vec<u8>,
    },
    /// Data connection: everything before this marker was sent before the switch.
    SwitchMark,
    /// Destination: ready to serve faults; device state may come.
    Switched,
    /// Destination, after the switch: the VM waits for these pages.
    PageRequest {
        /// Pages (at most [`MAX_NEED`]).
        pages: Vec<u64>,
    },
    /// Control connection, either side: still alive (carries nothing).
    Heartbeat,
}

/// Most pages asked for in one [`Message::Drained`].
pub const MAX_NEED: usize = 1 << 18;

/// Most mismatching chunks listed in a [`Message::VerifyResult`].
pub const MAX_REPORTED_MISMATCHES: usize = 1024;

const K_HELLO: u16 = 1;
const K_WELCOME: u16 = 2;
const K_REFUSE: u16 = 3;
const K_PAGE_BATCH: u16 = 4;
const K_END: u16 = 5;
const K_VERIFY_REQ: u16 = 6;
const K_VERIFY_RES: u16 = 7;
const K_COMMIT: u16 = 8;
const K_ACTIVATED: u16 = 9;
const K_ABORT: u16 = 10;
const K_DRAIN: u16 = 11;
const K_DRAINED: u16 = 12;
const K_SWITCH: u16 = 13;
const K_SWITCH_MARK: u16 = 14;
const K_SWITCHED: u16 = 15;
const K_PAGE_REQUEST: u16 = 16;
const K_HEARTBEAT: u16 = 17;
const K_PREPARE_SWITCH: u16 = 18;
const K_SWITCH_PREPARED: u16 = 19;
const K_PREPARE_MARK: u16 = 20;

/// Data connection (1-based) that carries `page` when `conns` data connections exist.
pub fn connection_for_page(page: u64, conns: u16) -> u16 {
    let conns = u64::from(conns.max(1));
    let idx = (page / PAGES_PER_STRIPE) % conns;
    u16::try_from(idx).expect("index below a u16 count") + 1
}

impl Message {
    /// Message name for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::Welcome(_) => "Welcome",
            Message::Refuse { .. } => "Refuse",
            Message::PageBatch { .. } => "PageBatch",
            Message::EndOfStream => "EndOfStream",
            Message::VerifyRequest { .. } => "VerifyRequest",
            Message::VerifyResult { .. } => "VerifyResult",
            Message::Commit => "Commit",
            Message::Activated => "Activated",
            Message::Abort { .. } => "Abort",
            Message::Drain { .. } => "Drain",
            Message::Drained { .. } => "Drained",
            Message::PrepareSwitch { .. } => "PrepareSwitch",
            Message::PrepareMark => "PrepareMark",
            Message::SwitchPrepared => "SwitchPrepared",
            Message::Switch { .. } => "Switch",
            Message::SwitchMark => "SwitchMark",
            Message::Switched => "Switched",
            Message::PageRequest { .. } => "PageRequest",
            Message::Heartbeat => "Heartbeat",
        }
    }

    fn kind(&self) -> u16 {
        match self {
            Message::Hello(_) => K_HELLO,
            Message::Welcome(_) => K_WELCOME,
            Message::Refuse { .. } => K_REFUSE,
            Message::PageBatch { .. } => K_PAGE_BATCH,
            Message::EndOfStream => K_END,
            Message::VerifyRequest { .. } => K_VERIFY_REQ,
            Message::VerifyResult { .. } => K_VERIFY_RES,
            Message::Commit => K_COMMIT,
            Message::Activated => K_ACTIVATED,
            Message::Abort { .. } => K_ABORT,
            Message::Drain { .. } => K_DRAIN,
            Message::Drained { .. } => K_DRAINED,
            Message::PrepareSwitch { .. } => K_PREPARE_SWITCH,
            Message::PrepareMark => K_PREPARE_MARK,
            Message::SwitchPrepared => K_SWITCH_PREPARED,
            Message::Switch { .. } => K_SWITCH,
            Message::SwitchMark => K_SWITCH_MARK,
            Message::Switched => K_SWITCHED,
            Message::PageRequest { .. } => K_PAGE_REQUEST,
            Message::Heartbeat => K_HEARTBEAT,
        }
    }

    /// Serialises header and payload into one buffer.
    pub fn encode(&self) -> Vec<u8> {
        let mut p = Vec::new();
        match self {
            Message::Hello(h) => {
                p.extend_from_slice(&h.version.to_le_bytes());
                p.extend_from_slice(&h.session.to_le_bytes());
                p.extend_from_slice(&h.ram_bytes.to_le_bytes());
                p.extend_from_slice(&h.page_size.to_le_bytes());
                p.extend_from_slice(&h.data_connections.to_le_bytes());
                p.extend_from_slice(&h.conn_index.to_le_bytes());
            }
            Message::Welcome(w) => {
                p.extend_from_slice(&w.version.to_le_bytes());
                p.push(u8::from(w.postcopy));
            }
            Message::Refuse { reason } | Message::Abort { reason } => put_str(&mut p, reason),
            Message::PageBatch { round, pages } => {
                let mut b = BatchBuilder::new(*round);
                for e in pages {
                    b.push(e.page, e.encoding, &e.data);
                }
                return b.finish();
            }
            Message::EndOfStream
            | Message::Commit
            | Message::Activated
            | Message::SwitchMark
            | Message::Switched
            | Message::PrepareMark
            | Message::SwitchPrepared
            | Message::Heartbeat => {}
            Message::Switch { pending: bits } | Message::PrepareSwitch { stale: bits } => {
                put_len(&mut p, bits.len());
                p.extend_from_slice(bits);
            }
            Message::PageRequest { pages } => {
                put_len(&mut p, pages.len());
                for n in pages {
                    p.extend_from_slice(&n.to_le_bytes());
                }
            }
            Message::Drain { round } => p.extend_from_slice(&round.to_le_bytes()),
            Message::Drained { round, need } => {
                p.extend_from_slice(&round.to_le_bytes());
                put_len(&mut p, need.len());
                for n in need {
                    p.extend_from_slice(&n.to_le_bytes());
                }
            }
            Message::VerifyRequest {
                chunk_pages,
                digests,
            } => {
                p.extend_from_slice(&chunk_pages.to_le_bytes());
                put_len(&mut p, digests.len());
                for d in digests {
                    p.extend_from_slice(&d.to_le_bytes());
                }
            }
            Message::VerifyResult {
                mismatched,
                mismatched_total,
            } => {
                p.extend_from_slice(&mismatched_total.to_le_bytes());
                put_len(&mut p, mismatched.len());
                for m in mismatched {
                    p.extend_from_slice(&m.to_le_bytes());
                }
            }
        }
        frame(self.kind(), p)
    }

    /// Parses a payload of `kind`.
    pub fn decode(kind: u16, payload: &[u8]) -> Result<Message, ProtocolError> {
        let mut r = Reader {
            buf: payload,
            kind: kind_name(kind)?,
        };
        let msg = match kind {
            K_HELLO => {
                let h = Hello {
                    version: r.u32()?,
                    session: r.u64()?,
                    ram_bytes: r.u64()?,
                    page_size: r.u32()?,
                    data_connections: r.u16()?,
                    conn_index: r.u16()?,
                };
                if h.version != PROTOCOL_VERSION {
                    return Err(ProtocolError::Version { peer: h.version });
                }
                Message::Hello(h)
            }
            K_WELCOME => {
                let version = r.u32()?;
                if version != PROTOCOL_VERSION {
                    return Err(ProtocolError::Version { peer: version });
                }
                let postcopy = match r.u8()? {
                    0 => false,
                    1 => true,
                    b => return Err(r.bad(format!("post-copy flag {b}"))),
                };
                Message::Welcome(Welcome { version, postcopy })
            }
            K_REFUSE => Message::Refuse {
                reason: r.string()?,
            },
            K_ABORT => Message::Abort {
                reason: r.string()?,
            },
            K_PAGE_BATCH => {
                let round = r.u32()?;
                let count = r.u32()? as usize;
                if count > MAX_BATCH_PAGES {
                    return Err(r.bad(format!(
                        "{count} pages in one batch, limit {MAX_BATCH_PAGES}"
                    )));
                }
                // Each entry takes at least 13 bytes: bound the count before allocating.
                if count > r.buf.len() / 13 {
                    return Err(r.bad(format!("{count} pages announced in {} bytes", r.buf.len())));
                }
                let mut pages = Vec::with_capacity(count);
                for _ in 0..count {
                    let page = r.u64()?;
                    let enc = r.u8()?;
                    let encoding = PageEncoding::from_u8(enc)
                        .ok_or_else(|| r.bad(format!("unknown page encoding {enc}")))?;
                    let len = r.u32()? as usize;
                    let ok = match encoding {
                        PageEncoding::Raw => len == PAGE_SIZE,
                        PageEncoding::Zero => len == 0,
                        PageEncoding::Zstd => len > 0 && len <= PAGE_SIZE,
                        PageEncoding::Reference => len == REFERENCE_LEN,
                    };
                    if !ok {
                        return Err(r.bad(format!(
                            "page {page}: {len} bytes is not valid for {encoding:?}"
                        )));
                    }
                    pages.push(PageEntry {
                        page,
                        encoding,
                        data: r.bytes(len)?.to_vec(),
                    });
                }
                Message::PageBatch { round, pages }
            }
            K_END => Message::EndOfStream,
            K_DRAIN => Message::Drain { round: r.u32()? },
            K_DRAINED => {
                let round = r.u32()?;
                let n = r.len(8)?;
                if n > MAX_NEED {
                    return Err(r.bad(format!("{n} pages asked for, limit {MAX_NEED}")));
                }
                let mut need = Vec::with_capacity(n);
                for _ in 0..n {
                    need.push(r.u64()?);
                }
                Message::Drained { round, need }
            }
            K_COMMIT => Message::Commit,
            K_ACTIVATED => Message::Activated,
            K_SWITCH_MARK => Message::SwitchMark,
            K_SWITCHED => Message::Switched,
            K_PREPARE_MARK => Message::PrepareMark,
            K_PREPARE_SWITCH => {
                let n = r.len(1)?;
                Message::PrepareSwitch {
                    stale: r.bytes(n)?.to_vec(),
                }
            }
            K_SWITCH_PREPARED => Message::SwitchPrepared,
            K_HEARTBEAT => Message::Heartbeat,
            K_SWITCH => {
                let n = r.len(1)?;
                Message::Switch {
                    pending: r.bytes(n)?.to_vec(),
                }
            }
            K_PAGE_REQUEST => {
                let n = r.len(8)?;
                if n > MAX_NEED {
                    return Err(r.bad(format!("{n} pages asked for, limit {MAX_NEED}")));
                }
                let mut pages = Vec::with_capacity(n);
                for _ in 0..n {
                    pages.push(r.u64()?);
                }
                Message::PageRequest { pages }
            }
            K_VERIFY_REQ => {
                let chunk_pages = r.u32()?;
                if chunk_pages == 0 {
                    return Err(r.bad("chunk of 0 pages".into()));
                }
                let n = r.len(16)?;
                let mut digests = Vec::with_capacity(n);
                for _ in 0..n {
                    digests.push(r.u128()?);
                }
                Message::VerifyRequest {
                    chunk_pages,
                    digests,
                }
            }
            K_VERIFY_RES => {
                let mismatched_total = r.u32()?;
                let n = r.len(4)?;
                if n > MAX_REPORTED_MISMATCHES {
                    return Err(r.bad(format!(
                        "{n} mismatches listed, limit {MAX_REPORTED_MISMATCHES}"
                    )));
                }
                let mut mismatched = Vec::with_capacity(n);
                for _ in 0..n {
                    mismatched.push(r.u32()?);
                }
                Message::VerifyResult {
                    mismatched,
                    mismatched_total,
                }
            }
            _ => return Err(ProtocolError::UnknownKind { kind }),
        };
        if !r.buf.is_empty() {
            return Err(r.bad(format!("{} trailing bytes", r.buf.len())));
        }
        Ok(msg)
    }
}

/// Builds a [`Message::PageBatch`] frame directly, without intermediate copies.
pub struct BatchBuilder {
    buf: Vec<u8>,
    count: u32,
}

impl BatchBuilder {
    /// Starts a batch for `round`.
    pub fn new(round: u32) -> Self {
        let mut buf = Vec::with_capacity(HEADER_LEN + 8 + 64 * (PAGE_SIZE + 13));
        buf.resize(HEADER_LEN, 0);
        buf.extend_from_slice(&round.to_le_bytes());
        buf.extend_from_slice(&0u32.to_le_bytes());
        Self { buf, count: 0 }
    }

    /// Appends a page.
    pub fn push(&mut self, page: u64, encoding: PageEncoding, data: &[u8]) {
        self.buf.extend_from_slice(&page.to_le_bytes());
        self.buf.push(encoding as u8);
        let len = u32::try_from(data.len()).expect("page data is at most a page");
        self.buf.extend_from_slice(&len.to_le_bytes());
        self.buf.extend_from_slice(data);
        self.count += 1;
    }

    /// Pages in the batch so far.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Encoded size so far, header included.
    pub fn encoded_len(&self) -> usize {
        self.buf.len()
    }

    /// Whether the batch should go now: it reached `bytes`, or holds
    /// [`MAX_BATCH_PAGES`] pages (the most a peer accepts).
    pub fn is_full(&self, bytes: usize) -> bool {
        self.buf.len() >= bytes || self.count as usize >= MAX_BATCH_PAGES
    }

    /// Finishes the frame.
    pub fn finish(mut self) -> Vec<u8> {
        let payload_len = (self.buf.len() - HEADER_LEN) as u64;
        write_header(&mut self.buf[..HEADER_LEN], K_PAGE_BATCH, payload_len);
        self.buf[HEADER_LEN + 4..HEADER_LEN + 8].copy_from_slice(&self.count.to_le_bytes());
        self.buf
    }
}

fn kind_name(kind: u16) -> Result<&'static str, ProtocolError> {
    Ok(match kind {
        K_HELLO => "Hello",
        K_WELCOME => "Welcome",
        K_REFUSE => "Refuse",
        K_PAGE_BATCH => "PageBatch",
        K_END => "EndOfStream",
        K_VERIFY_REQ => "VerifyRequest",
        K_VERIFY_RES => "VerifyResult",
        K_COMMIT => "Commit",
        K_ACTIVATED => "Activated",
        K_ABORT => "Abort",
        K_DRAIN => "Drain",
        K_DRAINED => "Drained",
        K_SWITCH => "Switch",
        K_SWITCH_MARK => "SwitchMark",
        K_SWITCHED => "Switched",
        K_PAGE_REQUEST => "PageRequest",
        K_HEARTBEAT => "Heartbeat",
        K_PREPARE_SWITCH => "PrepareSwitch",
        K_SWITCH_PREPARED => "SwitchPrepared",
        K_PREPARE_MARK => "PrepareMark",
        _ => return Err(ProtocolError::UnknownKind { kind }),
    })
}

fn write_header(h: &mut [u8], kind: u16, len: u64) {
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..6].copy_from_slice(&kind.to_le_bytes());
    h[6..8].copy_from_slice(&0u16.to_le_bytes());
    h[8..16].copy_from_slice(&len.to_le_bytes());
}

fn frame(kind: u16, payload: Vec<u8>) -> Vec<u8> {
    let mut out = vec![0; HEADER_LEN];
    write_header(&mut out, kind, payload.len() as u64);
    out.extend_from_slice(&payload);
    out
}

fn put_len(p: &mut Vec<u8>, n: usize) {
    p.extend_from_slice(
        &u32::try_from(n)
            .expect("message lists are small")
            .to_le_bytes(),
    );
}

fn put_str(p: &mut Vec<u8>, s: &str) {
    // Strings are operator-facing text: cut rather than fail on an over-long one.
    let mut end = s.len().min(MAX_STRING);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    put_len(p, end);
    p.extend_from_slice(&s.as_bytes()[..end]);
}

struct Reader<'a> {
    buf: &'a [u8],
    kind: &'static str,
}

impl<'a> Reader<'a> {
    fn bad(&self, problem: String) -> ProtocolError {
        ProtocolError::Malformed {
            kind: self.kind,
            problem,
        }
    }
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.buf.len() < n {
            return Err(self.bad(format!("needs {n} more bytes, {} left", self.buf.len())));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        Ok(self
            .bytes(N)?
            .try_into()
            .expect("length checked by bytes()"))
    }
    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.arr::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, ProtocolError> {
        Ok(u16::from_le_bytes(self.arr()?))
    }
    fn u32(&mut self) -> Result<u32, ProtocolError> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64, ProtocolError> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    fn u128(&mut self) -> Result<u128, ProtocolError> {
        Ok(u128::from_le_bytes(self.arr()?))
    }
    /// A u32 element count, checked against the bytes left for elements of `elem` bytes.
    fn len(&mut self, elem: usize) -> Result<usize, ProtocolError> {
        let n = self.u32()? as usize;
        if n > self.buf.len() / elem {
            return Err(self.bad(format!(
                "{n} elements announced, {} bytes left",
                self.buf.len()
            )));
        }
        Ok(n)
    }
    fn string(&mut self) -> Result<String, ProtocolError> {
        let n = self.u32()? as usize;
        if n > MAX_STRING {
            return Err(self.bad(format!("string of {n} bytes, limit {MAX_STRING}")));
        }
        let b = self.bytes(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.bad("string is not UTF-8".into()))
    }
}

/// Reads one frame and decodes it. Returns the message and its size on the wire.
pub async fn read_message<R: AsyncRead + Unpin>(
    r: &mut R,
    doing: &'static str,
) -> Result<(Message, u64), ProtocolError> {
    read_message_with(r, doing, &mut Vec::new()).await
}

/// [`read_message`] into a payload buffer the caller keeps between frames:
/// a fresh buffer per page batch costs the kernel a page fault and a
/// zeroed page per 4 KiB before the bytes arrive.
pub async fn read_message_with<R: AsyncRead + Unpin>(
    r: &mut R,
    doing: &'static str,
    payload: &mut Vec<u8>,
) -> Result<(Message, u64), ProtocolError> {
    let mut h = [0u8; HEADER_LEN];
    r.read_exact(&mut h).await.map_err(|e| io_error(e, doing))?;
    let (kind, len) = parse_header(&h)?;
    payload.resize(usize::try_from(len).expect("bounded by MAX_PAYLOAD"), 0);
    r.read_exact(payload)
        .await
        .map_err(|e| io_error(e, doing))?;
    let msg = Message::decode(kind, payload)?;
    Ok((msg, HEADER_LEN as u64 + len))
}

/// Largest [`Hello`] payload (it is 28 bytes).
const MAX_HELLO: u64 = 64;

/// Reads the first frame of a connection, which must be a [`Hello`]: any
/// other kind, or a longer payload, is refused before the payload is read,
/// so a stranger cannot make the listener allocate or wait for more.
pub async fn read_hello<R: AsyncRead + Unpin>(r: &mut R) -> Result<Hello, ProtocolError> {
    let doing = "waiting for Hello";
    let mut h = [0u8; HEADER_LEN];
    r.read_exact(&mut h).await.map_err(|e| io_error(e, doing))?;
    let (kind, len) = parse_header(&h)?;
    if kind != K_HELLO {
        return Err(ProtocolError::Malformed {
            kind: kind_name(kind)?,
            problem: "the first message of a connection must be Hello".into(),
        });
    }
    if len > MAX_HELLO {
        return Err(ProtocolError::TooLong { len });
    }
    let mut payload = vec![0u8; usize::try_from(len).expect("at most MAX_HELLO")];
    r.read_exact(&mut payload)
        .await
        .map_err(|e| io_error(e, doing))?;
    match Message::decode(kind, &payload)? {
        Message::Hello(hello) => Ok(hello),
        other => Err(ProtocolError::Malformed {
            kind: "Hello",
            problem: format!("decoded as {}", other.name()),
        }),
    }
}

fn io_error(e: io::Error, doing: &'static str) -> ProtocolError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        ProtocolError::Closed { doing }
    } else {
        ProtocolError::Io { doing, source: e }
    }
}

/// Checks a header and returns (kind, payload length).
pub fn parse_header(h: &[u8; HEADER_LEN]) -> Result<(u16, u64), ProtocolError> {
    let magic = u32::from_le_bytes(h[0..4].try_into().expect("4 bytes"));
    if magic != MAGIC {
        return Err(ProtocolError::BadMagic { found: magic });
    }
    let kind = u16::from_le_bytes(h[4..6].try_into().expect("2 bytes"));
    let len = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
    if len > MAX_PAYLOAD {
        return Err(ProtocolError::TooLong { len });
    }
    kind_name(kind)?;
    Ok((kind, len))
}

/// Writes an already encoded frame, and flushes it: over TLS the end of a
/// frame may otherwise wait in the session's buffer for a next write that
/// never comes (a round's last frame, a Drain: both sides would then wait
/// for each other while their heartbeats keep the session alive).
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    frame: &[u8],
    doing: &'static str,
) -> Result<(), ProtocolError> {
    w.write_all(frame)
        .await
        .map_err(|e| ProtocolError::Io { doing, source: e })?;
    w.flush()
        .await
        .map_err(|e| ProtocolError::Io { doing, source: e })
}

/// Encodes and writes a message.
pub async fn write_message<W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &Message,
    doing: &'static str,
) -> Result<u64, ProtocolError> {
    let f = msg.encode();
    write_frame(w, &f, doing).await?;
    Ok(f.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Message> {
        vec![
            Message::Hello(Hello {
                version: PROTOCOL_VERSION,
                session: 0xdead_beef,
                ram_bytes: 1 << 30,
                page_size: 4096,
                data_connections: 2,
                conn_index: 1,
            }),
            Message::Welcome(Welcome {
                version: PROTOCOL_VERSION,
                postcopy: true,
            }),
            Message::Refuse {
                reason: "RAM size differs".into(),
            },
            Message::PageBatch {
                round: 3,
                pages: vec![
                    PageEntry {
                        page: 7,
                        encoding: PageEncoding::Raw,
                        data: vec![0xab; PAGE_SIZE],
                    },
                    PageEntry {
                        page: 9,
                        encoding: PageEncoding::Zero,
                        data: vec![],
                    },
                    PageEntry {
                        page: 11,
                        encoding: PageEncoding::Zstd,
                        data: vec![1, 2, 3],
                    },
                    PageEntry {
                        page: 12,
                        encoding: PageEncoding::Reference,
                        data: encode_reference(
                            Hint {
                                disk: 1,
                                offset: 8192,
                            },
                            0xfeed,
                        )
                        .to_vec(),
                    },
                ],
            },
            Message::Drain { round: 4 },
            Message::Drained {
                round: 4,
                need: vec![1, 99],
            },
            Message::EndOfStream,
            Message::VerifyRequest {
                chunk_pages: 512,
                digests: vec![1, u128::MAX, 42],
            },
            Message::VerifyResult {
                mismatched: vec![4, 5],
                mismatched_total: 2,
            },
            Message::Commit,
            Message::Activated,
            Message::Abort {
                reason: "operator pressed Ctrl-C".into(),
            },
            Message::Switch {
                pending: vec![0b1010_0001, 0, 0xff],
            },
            Message::SwitchMark,
            Message::Switched,
            Message::PrepareSwitch {
                stale: vec![0, 0b0100_0000],
            },
            Message::PrepareMark,
            Message::SwitchPrepared,
            Message::PageRequest {
                pages: vec![3, 1 << 40],
            },
            Message::Heartbeat,
        ]
    }

    fn split(frame: &[u8]) -> (u16, &[u8]) {
        let h: [u8; HEADER_LEN] = frame[..HEADER_LEN].try_into().unwrap();
        let (kind, len) = parse_header(&h).unwrap();
        assert_eq!(len, (frame.len() - HEADER_LEN) as u64);
        (kind, &frame[HEADER_LEN..])
    }

    #[test]
    fn every_message_round_trips() {
        for m in samples() {
            let f = m.encode();
            let (kind, payload) = split(&f);
            assert_eq!(Message::decode(kind, payload).unwrap(), m, "{}", m.name());
        }
    }

    #[test]
    fn every_message_rejects_truncation_and_trailing_garbage() {
        for m in samples() {
            let f = m.encode();
            let (kind, payload) = split(&f);
            if !payload.is_empty() {
                assert!(
                    Message::decode(kind, &payload[..payload.len() - 1]).is_err(),
                    "{} accepted a truncated payload",
                    m.name()
                );
            }
            let mut longer = payload.to_vec();
            longer.push(0);
            assert!(
                Message::decode(kind, &longer).is_err(),
                "{} accepted trailing bytes",
                m.name()
            );
        }
    }

    #[test]
    fn header_checks() {
        let mut h = [0u8; HEADER_LEN];
        assert!(matches!(
            parse_header(&h),
            Err(ProtocolError::BadMagic { .. })
        ));
        write_header(&mut h, K_COMMIT, MAX_PAYLOAD + 1);
        assert!(matches!(
            parse_header(&h),
            Err(ProtocolError::TooLong { .. })
        ));
        write_header(&mut h, 999, 0);
        assert!(matches!(
            parse_header(&h),
            Err(ProtocolError::UnknownKind { kind: 999 })
        ));
    }

    #[test]
    fn a_batch_holds_at_most_max_batch_pages() {
        let mut b = BatchBuilder::new(0);
        for p in 0..MAX_BATCH_PAGES as u64 {
            assert!(!b.is_full(usize::MAX), "full before the cap");
            b.push(p, PageEncoding::Zero, &[]);
        }
        assert!(b.is_full(usize::MAX));
        let f = b.finish();
        let (k, p) = split(&f);
        assert!(Message::decode(k, p).is_ok());
        // One zero page more than the cap: ~13 bytes, refused unread.
        let mut b = BatchBuilder::new(0);
        for p in 0..=MAX_BATCH_PAGES as u64 {
            b.push(p, PageEncoding::Zero, &[]);
        }
        let f = b.finish();
        let (k, p) = split(&f);
        let e = Message::decode(k, p).unwrap_err().to_string();
        assert!(e.contains("limit"), "{e}");
    }

    #[test]
    fn a_welcome_carries_no_uri_for_the_source_to_use() {
        // Protocol 6's Welcome carried the destination's QEMU URI; a peer
        // that still sends one (or anything more) is refused.
        let w = Message::Welcome(Welcome {
            version: PROTOCOL_VERSION,
            postcopy: false,
        })
        .encode();
        let (k, p) = split(&w);
        let mut with_uri = p[..4].to_vec();
        with_uri.extend_from_slice(&(13u32).to_le_bytes());
        with_uri.extend_from_slice(b"exec:rm -rf /");
        with_uri.push(0);
        assert!(Message::decode(k, &with_uri).is_err());
        assert!(Message::decode(k, p).is_ok());
    }

    #[tokio::test]
    async fn a_written_frame_leaves_the_writer_s_buffer() {
        // A buffering writer (as a TLS session is) must not keep a frame's tail.
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let mut w = tokio::io::BufWriter::new(a);
        let frame = Message::Commit.encode();
        write_frame(&mut w, &frame, "t").await.unwrap();
        let got =
            tokio::time::timeout(std::time::Duration::from_secs(2), read_message(&mut b, "t"))
                .await
                .expect("the frame stayed in the writer's buffer")
                .unwrap();
        assert_eq!(got.0, Message::Commit);
    }

    #[tokio::test]
    async fn a_first_frame_must_be_a_short_hello() {
        let hello = Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            session: 1,
            ram_bytes: 1 << 20,
            page_size: 4096,
            data_connections: 1,
            conn_index: 0,
        });
        let f = hello.encode();
        assert_eq!(read_hello(&mut &f[..]).await.unwrap().session, 1);
        let commit = Message::Commit.encode();
        assert!(read_hello(&mut &commit[..]).await.is_err());
        // A Hello header announcing a long payload is refused before it is read.
        let mut h = [0u8; HEADER_LEN];
        write_header(&mut h, K_HELLO, MAX_PAYLOAD);
        let e = read_hello(&mut &h[..]).await.unwrap_err();
        assert!(matches!(e, ProtocolError::TooLong { .. }), "{e}");
    }

    #[test]
    fn rejects_bad_page_entries() {
        // A raw page that is not 4096 bytes long.
        let mut b = BatchBuilder::new(0);
        b.push(1, PageEncoding::Raw, &[0u8; 100]);
        let f = b.finish();
        let (k, p) = split(&f);
        assert!(Message::decode(k, p).is_err());
        // An absurd page count must be refused before allocating.
        let mut p = Vec::new();
        p.extend_from_slice(&0u32.to_le_bytes());
        p.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(Message::decode(K_PAGE_BATCH, &p).is_err());
        // Unknown encoding.
        let mut p = Vec::new();
        p.extend_from_slice(&0u32.to_le_bytes());
        p.extend_from_slice(&1u32.to_le_bytes());
        p.extend_from_slice(&5u64.to_le_bytes());
        p.push(9);
        p.extend_from_slice(&0u32.to_le_bytes());
        assert!(Message::decode(K_PAGE_BATCH, &p).is_err());
    }

    #[test]
    fn rejects_wrong_version() {
        let mut h = Message::Hello(Hello {
            version: 99,
            session: 1,
            ram_bytes: 1,
            page_size: 4096,
            data_connections: 1,
            conn_index: 0,
        })
        .encode();
        let (k, _) = split(&h);
        let payload = h.split_off(HEADER_LEN);
        assert!(matches!(
            Message::decode(k, &payload),
            Err(ProtocolError::Version { peer: 99 })
        ));
    }

    #[test]
    fn pages_stick_to_one_connection() {
        assert_eq!(connection_for_page(0, 2), 1);
        assert_eq!(connection_for_page(63, 2), 1);
        assert_eq!(connection_for_page(64, 2), 2);
        assert_eq!(connection_for_page(128, 2), 1);
        assert_eq!(connection_for_page(12345, 1), 1);
        assert_eq!(connection_for_page(12345, 0), 1);
    }

    #[tokio::test]
    async fn reads_what_it_writes_over_a_stream() {
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        for m in samples() {
            write_message(&mut a, &m, "test").await.unwrap();
        }
        drop(a);
        for m in samples() {
            let (got, _) = read_message(&mut b, "test").await.unwrap();
            assert_eq!(got, m);
        }
        assert!(matches!(
            read_message(&mut b, "test").await,
            Err(ProtocolError::Closed { .. })
        ));
    }
}
