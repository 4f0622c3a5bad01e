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
//!
//! | module | owns |
//! |---|---|
//! | `kind` | the message kinds on the wire and their names |
//! | `codec` | each message's payload, encoded and decoded |
//! | `control` | what the control connection carries, one type per direction |
//! | `data` | what a data connection carries, as types of its own |
//! | `pages` | page batches, how a page travels, references, page bitmaps, the page-range check |
//! | `frame` | the frame header, reading and writing one frame |
//! | [`guest`] | the guest channel: hint sets, file layouts, requests and error answers |

mod codec;
mod control;
mod data;
mod frame;
pub mod guest;
mod kind;
mod pages;

use std::io;

use thiserror::Error;

pub use control::{
    read_control, Control, ToDestination, ToSource, TO_DESTINATION_KINDS, TO_SOURCE_KINDS,
};
pub use data::{read_data_message, DataFrame, DataMessage, DATA_KINDS};
pub use frame::{
    parse_header, read_hello, read_message, read_message_with, read_message_within, write_frame,
    write_message,
};
pub use kind::Kind;
pub use pages::{
    check_pages, connection_for_page, decode_page_bitmap, decode_reference, encode_page_bitmap,
    encode_reference, BatchBuilder, PageEncoder, PageEncoding, REFERENCE_LEN,
};

/// First four bytes of every frame: "DMG1" little-endian.
pub const MAGIC: u32 = u32::from_le_bytes(*b"DMG1");
/// Most disks a [`Hello`] names (a VM with more sends none, and its
/// storage is placed by position).
pub const MAX_HELLO_DISKS: usize = 16;
/// Most RAM files (memory backends) a [`Hello`] names: QEMU allows 128
/// NUMA nodes, libvirt's domains rarely have more than 8.
pub const MAX_HELLO_RAM_FILES: usize = 64;
/// Protocol version carried in [`Hello`] and [`Welcome`].
pub const PROTOCOL_VERSION: u32 = 9;
/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 16;
/// Largest payload a peer may announce; larger frames are refused unread.
/// A control connection allows more for a guest whose per-page bitmaps
/// or chunk digests need it ([`control_payload_limit`]).
pub const MAX_PAYLOAD: u64 = 8 << 20;

/// Largest control-connection payload for a guest of `ram_bytes`: the
/// messages that carry something per page or per 2 MiB chunk (a switch's
/// bitmap, one bit per page; the switchover digests, 16 bytes per chunk)
/// grow with the VM, past [`MAX_PAYLOAD`] beyond 256 GiB of RAM. Pure.
pub fn control_payload_limit(ram_bytes: u64) -> u64 {
    let pages = ram_bytes / crate::PAGE_SIZE_U64;
    let bitmap = pages.div_ceil(8);
    let digests = pages.div_ceil(u64::from(crate::verify::CHUNK_PAGES)) * 16;
    MAX_PAYLOAD.max(bitmap.max(digests).saturating_add(64 << 10))
}
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
    /// Payload longer than the connection allows.
    #[error("frame announces {len} payload bytes, more than the limit of {max}")]
    TooLong {
        /// Announced length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The payload does not match its message layout.
    #[error("malformed {kind} message: {problem}")]
    Malformed {
        /// Message name.
        kind: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// A message that does not belong on this connection.
    #[error("{kind} is not a message of this connection (it carries {expected})")]
    WrongConnection {
        /// Message name.
        kind: &'static str,
        /// What the connection carries.
        expected: &'static str,
    },
    /// A message names a page the RAM does not have.
    #[error("{kind} names page {page}, beyond the {pages} pages of RAM")]
    PageBeyondRam {
        /// Message name.
        kind: &'static str,
        /// The page.
        page: u64,
        /// Pages of the RAM.
        pages: u64,
    },
    /// The peer speaks another protocol version.
    #[error("peer speaks protocol version {peer}, this agent speaks {PROTOCOL_VERSION}: install the same dbmigrate version on both hosts")]
    Version {
        /// The peer's version.
        peer: u32,
    },
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
    /// The VM's disks in the order references index them (the source
    /// VMM's), each with its size, serial and WWN, so that the destination
    /// places its storage by name; empty when not known. At most
    /// [`MAX_HELLO_DISKS`], names as [`guest::clean_id`] leaves them.
    pub disks: Vec<guest::DiskId>,
    /// The sizes of the files the RAM is made of (one per memory backend,
    /// e.g. per NUMA node), in the order their pages follow each other:
    /// the destination maps its own the same way. At least one and at
    /// most [`MAX_HELLO_RAM_FILES`]; each a non-zero multiple of the page
    /// size, summing to `ram_bytes`.
    pub ram_files: Vec<u64>,
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

/// Most data connections a session may have (at least one).
pub const MAX_DATA_CONNECTIONS: u16 = 16;

/// Most pages asked for in one [`Message::Drained`].
pub const MAX_NEED: usize = 1 << 18;

/// Most mismatching chunks listed in a [`Message::VerifyResult`].
pub const MAX_REPORTED_MISMATCHES: usize = 1024;

#[cfg(test)]
mod tests {
    use super::frame::write_header;
    use super::*;
    use crate::addr::DiskOffset;
    use crate::bitmap::PageBitmap;
    use crate::rebuild::Hint;
    use crate::PAGE_SIZE;

    fn samples() -> Vec<Message> {
        vec![
            Message::Hello(Hello {
                version: PROTOCOL_VERSION,
                session: 0xdead_beef,
                ram_bytes: 1 << 30,
                page_size: 4096,
                data_connections: 2,
                conn_index: 1,
                ram_files: vec![1 << 29, 1 << 29],
                disks: vec![
                    guest::DiskId {
                        bytes: 8 << 30,
                        serial: "db-data".into(),
                        wwn: String::new(),
                    },
                    guest::DiskId::default(),
                ],
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
                                offset: DiskOffset(8192),
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
    fn the_control_limit_grows_with_the_guest() {
        assert_eq!(control_payload_limit(2 << 30), MAX_PAYLOAD);
        // 1 TiB: a switch's bitmap is 32 MiB, the digests 8 MiB.
        assert_eq!(control_payload_limit(1 << 40), (32 << 20) + (64 << 10));
        assert_eq!(
            control_payload_limit(u64::MAX),
            u64::MAX / 4096 / 8 + 1 + (64 << 10)
        );
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
        write_header(&mut h, Kind::Commit, MAX_PAYLOAD + 1);
        assert!(matches!(
            parse_header(&h),
            Err(ProtocolError::TooLong { .. })
        ));
        h[4..6].copy_from_slice(&999u16.to_le_bytes());
        h[8..16].copy_from_slice(&0u64.to_le_bytes());
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
    fn page_bitmaps_set_bit_i_of_byte_i_over_8_and_stay_inside_ram() {
        let mut b = PageBitmap::new(20);
        b.set(0);
        b.set(9);
        b.set(19);
        let wire = encode_page_bitmap(&b);
        assert_eq!(wire, vec![0b1, 0b10, 0b1000]);
        let back = decode_page_bitmap(&wire, 20, "Switch").unwrap();
        assert_eq!(back.iter().collect::<Vec<_>>(), vec![0, 9, 19]);
        // A bit past the RAM's last page, a length for another RAM.
        let e = decode_page_bitmap(&[0, 0, 0b1_0000], 20, "Switch").unwrap_err();
        assert!(e.to_string().contains("page 20"), "{e}");
        assert!(decode_page_bitmap(&wire, 64, "Switch").is_err());
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
            disks: Vec::new(),
            ram_files: vec![1 << 20],
        });
        let f = hello.encode();
        assert_eq!(read_hello(&mut &f[..]).await.unwrap().session, 1);
        // The most disks a Hello names, with the longest names, still fit.
        let Message::Hello(mut h) = hello else {
            unreachable!()
        };
        h.disks = vec![
            guest::DiskId {
                bytes: u64::MAX,
                serial: "s".repeat(guest::MAX_ID_LEN),
                wwn: "w".repeat(guest::MAX_ID_LEN),
            };
            MAX_HELLO_DISKS
        ];
        // And the most RAM files.
        h.ram_files = vec![1 << 14; MAX_HELLO_RAM_FILES];
        h.ram_bytes = (1 << 14) * MAX_HELLO_RAM_FILES as u64;
        let f = Message::Hello(h.clone()).encode();
        assert_eq!(read_hello(&mut &f[..]).await.unwrap(), h);
        // More disks than that are sent as none.
        h.disks.push(guest::DiskId::default());
        let f = Message::Hello(h).encode();
        assert!(read_hello(&mut &f[..]).await.unwrap().disks.is_empty());
        let commit = Message::Commit.encode();
        assert!(read_hello(&mut &commit[..]).await.is_err());
        // A Hello header announcing a long payload is refused before it is read.
        let mut h = [0u8; HEADER_LEN];
        write_header(&mut h, Kind::Hello, MAX_PAYLOAD);
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
        assert!(Message::decode(Kind::PageBatch as u16, &p).is_err());
        // Unknown encoding.
        let mut p = Vec::new();
        p.extend_from_slice(&0u32.to_le_bytes());
        p.extend_from_slice(&1u32.to_le_bytes());
        p.extend_from_slice(&5u64.to_le_bytes());
        p.push(9);
        p.extend_from_slice(&0u32.to_le_bytes());
        assert!(Message::decode(Kind::PageBatch as u16, &p).is_err());
    }

    #[test]
    fn a_hello_s_ram_files_must_add_up_to_whole_pages() {
        let hello = |ram_bytes, ram_files: Vec<u64>| {
            let mut f = Message::Hello(Hello {
                version: PROTOCOL_VERSION,
                session: 1,
                ram_bytes,
                page_size: 4096,
                data_connections: 1,
                conn_index: 0,
                disks: Vec::new(),
                ram_files,
            })
            .encode();
            let (k, _) = split(&f);
            let payload = f.split_off(HEADER_LEN);
            Message::decode(k, &payload)
        };
        assert!(hello(3 << 12, vec![1 << 12, 2 << 12]).is_ok());
        for (bytes, files) in [
            (3 << 12, vec![1 << 12, 1 << 12]),
            (3 << 12, vec![]),
            (3 << 12, vec![3 << 12, 0]),
            (3 << 12, vec![100, (3 << 12) - 100]),
            (u64::MAX, vec![u64::MAX - 4095, 8192]),
        ] {
            let e = hello(bytes, files.clone()).unwrap_err();
            assert!(e.to_string().contains("RAM file"), "{files:?}: {e}");
        }
        // Of more files than a Hello may name only the first are sent, and
        // the Hello is refused: they do not add up to the RAM.
        let many = vec![1 << 12; MAX_HELLO_RAM_FILES + 1];
        assert!(hello((1 << 12) * many.len() as u64, many).is_err());
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
            disks: Vec::new(),
            ram_files: vec![1],
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
