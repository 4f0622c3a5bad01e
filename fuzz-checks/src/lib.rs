//! The checks behind dbmigrate's fuzz targets: every parser of untrusted
//! input (the wire protocol from a peer agent, hints and file layouts from a
//! guest, InnoDB frames from guest memory) must return an error rather than
//! panic, and whatever it accepts must survive an encode/decode round trip
//! unchanged. `fuzz/` runs these under libFuzzer (`scripts/fuzz.sh`); the
//! tests below run them on mutations of valid inputs on every CI run.

#![deny(missing_docs)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use dbmigrate_core::protocol::guest::{decode_census, encode_census, CENSUS_RUN_LEN};
use dbmigrate_core::protocol::guest::{decode_disks, encode_disks, match_disks, MAX_DISKS};
use dbmigrate_core::protocol::guest::{
    decode_hints, encode_hints, parse_answer_header, parse_guest_request, HintAnswer,
};
use dbmigrate_core::protocol::guest::{decode_layout, encode_layout, frame_pages};
use dbmigrate_core::protocol::Hello;
use dbmigrate_core::protocol::{self, Message, HEADER_LEN, MAX_PAYLOAD};
use dbmigrate_core::transport::{Acceptor, AllowList};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

/// A frame from a peer: header, then payload decoded as the header says.
pub fn protocol_frame(data: &[u8]) {
    let Some(h) = data.get(..HEADER_LEN) else {
        return;
    };
    let h: [u8; HEADER_LEN] = h.try_into().expect("header length");
    let Ok((kind, len)) = protocol::parse_header(&h) else {
        return;
    };
    assert!(len <= MAX_PAYLOAD, "header accepted an oversized payload");
    let payload = &data[HEADER_LEN..];
    if let Ok(Message::PageBatch { pages, .. }) = Message::decode(kind, payload) {
        assert!(
            pages.len() <= protocol::MAX_BATCH_PAGES,
            "a batch past the cap decoded"
        );
    }
    if let Ok(m) = Message::decode(kind, payload) {
        let again = m.encode();
        let h2: [u8; HEADER_LEN] = again[..HEADER_LEN].try_into().expect("header length");
        let (k2, l2) = protocol::parse_header(&h2).expect("own header parses");
        assert_eq!(k2, kind);
        assert_eq!(l2, (again.len() - HEADER_LEN) as u64);
        let m2 = Message::decode(k2, &again[HEADER_LEN..]).expect("own encoding decodes");
        assert_eq!(m, m2, "round trip changed the message");
    }
    let _ = protocol::decode_reference(payload);
}

/// The destination's listener as a stranger meets it: a runtime, a
/// loopback listener and a TLS acceptor with certificates made by
/// `scripts/make-pki.sh`.
struct Listener {
    rt: tokio::runtime::Runtime,
    listener: TcpListener,
    addr: SocketAddr,
    tls: Acceptor,
    _pki: PkiDir,
}

struct PkiDir(PathBuf);

impl Drop for PkiDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Listener {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("dbmigrate-fuzz-pki-{}", std::process::id()));
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/make-pki.sh");
        let ok = std::process::Command::new("bash")
            .arg(script)
            .arg(dir.join("ca"))
            .arg(dir.join("dst"))
            .arg("127.0.0.1")
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "scripts/make-pki.sh failed (is openssl installed?)");
        let tls = Acceptor::tls(&dir.join("dst"), AllowList::default()).expect("test PKI loads");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let listener = rt
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("loopback listener");
        let addr = listener.local_addr().expect("bound");
        Self {
            rt,
            listener,
            addr,
            tls,
            _pki: PkiDir(dir),
        }
    }
}

thread_local! {
    static LISTENER: Listener = Listener::new();
}

/// What a stranger sends first on a connection to the destination's
/// listener, through plain TCP (the Hello reader) and through TLS (the
/// handshake, then the Hello reader): an error, never a panic, and no wait
/// once the stranger has stopped sending. Returns the Hello plain TCP
/// admitted, if the bytes began with one.
pub fn first_frame(data: &[u8]) -> Option<Hello> {
    LISTENER.with(|l| {
        l.rt.block_on(async {
            let mut admitted = None;
            for acceptor in [&Acceptor::InsecurePlaintext, &l.tls] {
                let mut client = TcpStream::connect(l.addr).await.expect("loopback connect");
                let (server, peer) = l.listener.accept().await.expect("loopback accept");
                let _ = client.write_all(data).await;
                let _ = client.shutdown().await;
                let met = async {
                    let mut conn = acceptor.secure(server, peer).await.ok()?;
                    protocol::read_hello(&mut conn).await.ok()
                };
                let hello = tokio::time::timeout(Duration::from_secs(10), met)
                    .await
                    .expect("the listener kept waiting on a stranger that had stopped sending");
                if acceptor.is_tls() {
                    assert!(hello.is_none(), "TLS admitted bytes that are no TLS client");
                } else {
                    admitted = hello;
                }
            }
            admitted
        })
    })
}

/// An answer from a guest agent on the hint port.
pub fn guest_answer(data: &[u8]) {
    if let Some(req) = data.get(..8) {
        let _ = parse_guest_request(req.try_into().expect("8 bytes"));
    }
    match parse_answer_header(data) {
        Ok(HintAnswer::Hints { body, tag }) => {
            if let Ok(h) = decode_hints(data) {
                assert_eq!(h.len() * 40, body);
                let again = encode_hints(&h, tag);
                assert_eq!(decode_hints(&again).expect("own encoding decodes"), h);
            }
        }
        Ok(HintAnswer::Layout { .. }) => {
            if let Ok(set) = decode_layout(data) {
                let again = encode_layout(&set, 7);
                assert_eq!(decode_layout(&again).expect("own encoding decodes"), set);
                let sub = (set.page_size / 4096) as usize;
                assert!(frame_pages(&set.frames, sub).is_some());
                for f in &set.files {
                    for e in &f.extents {
                        // Any lookup must stay inside an extent or say no.
                        for off in [e.file_offset, e.file_offset + e.len - 4096, u64::MAX - 4095] {
                            if let Some(d) = f.locate(off, 4096) {
                                assert!(d.checked_add(4096).is_some());
                            }
                        }
                    }
                }
            }
        }
        Ok(HintAnswer::Census { body, tag }) => {
            if let Ok(runs) = decode_census(data) {
                assert_eq!(runs.len() * CENSUS_RUN_LEN, body);
                let again = encode_census(&runs, tag);
                assert_eq!(decode_census(&again).expect("own encoding decodes"), runs);
            }
        }
        Ok(HintAnswer::Disks { tag, .. }) => {
            if let Ok(disks) = decode_disks(data) {
                assert!(disks.len() <= MAX_DISKS);
                let again = encode_disks(&disks, tag);
                assert_eq!(decode_disks(&again).expect("own encoding decodes"), disks);
                // Matching untrusted names against any list stays in bounds.
                let m = match_disks(&disks, &disks[..disks.len() / 2]);
                assert!(m
                    .iter()
                    .flatten()
                    .all(|&k| usize::from(k) < disks.len() / 2));
            }
        }
        Ok(HintAnswer::Error { .. }) | Err(_) => {}
    }
}

/// A frame of guest memory that may or may not be an InnoDB page.
pub fn innodb_frame(data: &[u8]) {
    if let Some(h) = dbmigrate_innodb::parse(data) {
        assert_ne!(h.lsn, 0);
        assert_ne!(h.space, dbmigrate_innodb::TEMP_SPACE);
    }
    let n = data.len();
    if n >= dbmigrate_innodb::HEAD_LEN + dbmigrate_innodb::TAIL_LEN {
        let _ = dbmigrate_innodb::parse_parts(
            &data[..dbmigrate_innodb::HEAD_LEN],
            &data[n - dbmigrate_innodb::TAIL_LEN..],
        );
    }
    let _ = dbmigrate_innodb::parse_parts(data, data);
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // random bytes: truncation intended
mod tests {
    use super::*;
    use dbmigrate_core::addr::{DiskOffset, GuestAddr};
    use dbmigrate_core::protocol::guest::GuestHint;
    use dbmigrate_core::protocol::guest::{Extent, FileLayout, LayoutSet};
    use dbmigrate_core::protocol::{Hello, PageEncoding, PageEntry, Welcome};

    /// xorshift64*: deterministic, so a failure reproduces.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    /// Byte flips, truncations, extensions and overwritten length fields.
    fn mutations(seed: &[u8], rng: &mut Rng, n: usize) -> Vec<Vec<u8>> {
        let mut out = vec![seed.to_vec()];
        for _ in 0..n {
            let mut m = seed.to_vec();
            match rng.below(5) {
                0 if !m.is_empty() => {
                    let i = rng.below(m.len());
                    m[i] ^= 1 << rng.below(8);
                }
                1 => m.truncate(rng.below(m.len() + 1)),
                2 => m.extend((0..rng.below(64)).map(|_| rng.next() as u8)),
                3 if m.len() >= 4 => {
                    let i = rng.below(m.len() - 3);
                    let v = [0u32, 1, u32::MAX, 0x8000_0000, 4096][rng.below(5)];
                    m[i..i + 4].copy_from_slice(&v.to_le_bytes());
                }
                _ => {
                    let i = rng.below(m.len() + 1);
                    m.splice(i..i, (0..8).map(|_| rng.next() as u8));
                }
            }
            out.push(m);
        }
        out
    }

    #[test]
    fn protocol_decoder_survives_mutated_frames() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let seeds = [
            Message::Hello(Hello {
                version: protocol::PROTOCOL_VERSION,
                session: 1,
                ram_bytes: 1 << 30,
                page_size: 4096,
                data_connections: 2,
                conn_index: 0,
                disks: Vec::new(),
                ram_files: vec![1 << 29, 1 << 29],
            }),
            Message::Welcome(Welcome {
                version: protocol::PROTOCOL_VERSION,
                postcopy: true,
            }),
            Message::PageBatch {
                round: 1,
                pages: vec![
                    PageEntry {
                        page: 3,
                        encoding: PageEncoding::Raw,
                        data: vec![7; 4096],
                    },
                    PageEntry {
                        page: 4,
                        encoding: PageEncoding::Zero,
                        data: vec![],
                    },
                ],
            },
            Message::Drained {
                round: 2,
                need: vec![1, 2, 3],
            },
            Message::Switch {
                pending: vec![0xff, 1],
            },
            Message::PageRequest { pages: vec![9] },
            Message::VerifyRequest {
                chunk_pages: 512,
                digests: vec![1, 2],
            },
        ];
        for m in &seeds {
            for data in mutations(&m.encode(), &mut rng, 3000) {
                protocol_frame(&data);
            }
        }
        for _ in 0..20_000 {
            let len = rng.below(80);
            let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            protocol_frame(&data);
        }
    }

    #[test]
    fn guest_answer_parsers_survive_mutated_answers() {
        let mut rng = Rng(0xD1B5_4A32_D192_ED03);
        let hints = encode_hints(
            &[GuestHint {
                gpa: GuestAddr(0x10_0000),
                disk: 0,
                clean: true,
                space: 5,
                disk_offset: DiskOffset(0x20_0000),
                page_no: 3,
                lsn: 99,
            }],
            4,
        );
        let layout = encode_layout(
            &LayoutSet {
                page_size: 16384,
                files: vec![FileLayout {
                    id: 5,
                    disk: 0,
                    extents: vec![Extent {
                        file_offset: 0,
                        disk_offset: DiskOffset(1 << 20),
                        len: 1 << 20,
                    }],
                }],
                frames: vec![0x10_0000, 0x20_0000 | 1, 0x30_0000, 0x40_0000, 0x50_0000],
            },
            9,
        );
        let disks = encode_disks(
            &[
                dbmigrate_core::protocol::guest::DiskId {
                    bytes: 1 << 30,
                    serial: "dbm-data".into(),
                    wwn: String::new(),
                },
                dbmigrate_core::protocol::guest::DiskId {
                    bytes: 0,
                    serial: String::new(),
                    wwn: "naa.5000c500a1b2c3d4".into(),
                },
            ],
            3,
        );
        for seed in [hints, layout, disks] {
            for data in mutations(&seed, &mut rng, 5000) {
                guest_answer(&data);
            }
        }
    }

    #[test]
    fn strangers_first_bytes_are_refused_by_the_listener() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let hello = Hello {
            version: protocol::PROTOCOL_VERSION,
            session: 3,
            ram_bytes: 1 << 30,
            page_size: 4096,
            data_connections: 2,
            conn_index: 0,
            disks: Vec::new(),
            ram_files: vec![1 << 29, 1 << 29],
        };
        let seed = Message::Hello(hello.clone()).encode();
        assert_eq!(
            first_frame(&seed),
            Some(hello),
            "a Hello over plain TCP is admitted"
        );
        // A TLS ClientHello's first bytes, and mutations of both.
        let tls_start = [
            0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
        ];
        for s in [&seed[..], &tls_start[..], &Message::Commit.encode()[..]] {
            for data in mutations(s, &mut rng, 150) {
                first_frame(&data);
            }
        }
    }

    #[test]
    fn innodb_parser_survives_mutated_frames() {
        let mut rng = Rng(0xA076_1D64_78BD_642F);
        let mut page = vec![0u8; 16384];
        page[4..8].copy_from_slice(&3u32.to_be_bytes());
        page[16..24].copy_from_slice(&0x1234_5678u64.to_be_bytes());
        page[34..38].copy_from_slice(&5u32.to_be_bytes());
        let n = page.len();
        page[n - 4..].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        assert!(dbmigrate_innodb::parse(&page).is_some(), "seed is a page");
        for data in mutations(&page, &mut rng, 2000) {
            innodb_frame(&data);
        }
    }
}
