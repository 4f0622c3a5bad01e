//! What the engine-level tests share: a scripted source's side of the
//! protocol, the destination's acceptance, the pages they move.
#![allow(dead_code)] // each test file uses its own share of these

use std::time::Duration;

use dbmigrate_core::bitmap::PageBitmap;
use dbmigrate_core::dest;
use dbmigrate_core::gate::Gate;
use dbmigrate_core::protocol::{self, Hello, Message};
use dbmigrate_core::transport::Acceptor;
use tokio::net::{TcpListener, TcpStream};

pub const PAGES: u64 = 2048; // 8 MiB

/// A shared mapping of the RAM file at `path`, standing in for QEMU's (the
/// descriptor is closed, the mapping stays); it lives as long as the test
/// holds it, and only the kernel and the "vCPU" threads touch it.
pub fn stand_in_qemu_map(path: &std::path::Path) -> std::sync::Arc<memmap2::MmapMut> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    // SAFETY: a shared mapping of the test's own RAM file; nothing truncates
    // the file while the test runs.
    std::sync::Arc::new(unsafe { memmap2::MmapMut::map_mut(&file) }.unwrap())
}

pub fn page_bytes(seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..4096)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s.to_le_bytes()[0]
        })
        .collect()
}

/// A scripted source's switch to post-copy with `pending` (wire bitmap)
/// and its Commit, checking the destination's answers.
pub async fn switch_and_commit(ctrl: &mut TcpStream, pending: Vec<u8>) {
    protocol::write_message(ctrl, &Message::Switch { pending }, "t")
        .await
        .unwrap();
    let m = next_ctrl(ctrl).await;
    assert!(matches!(m, Message::Switched), "got {}", m.name());
    protocol::write_message(ctrl, &Message::Commit, "t")
        .await
        .unwrap();
    let m = next_ctrl(ctrl).await;
    assert!(matches!(m, Message::Activated), "got {}", m.name());
}

/// Sends the digests of the `frozen` source RAM's `data_pages` and checks
/// that the destination found every placed page equal.
pub async fn verify_against_frozen(ctrl: &mut TcpStream, frozen: &[u8], data_pages: &PageBitmap) {
    let digests = dbmigrate_core::verify::ram_digests(
        frozen,
        data_pages,
        dbmigrate_core::verify::CHUNK_PAGES,
        1,
    );
    protocol::write_message(
        ctrl,
        &Message::VerifyRequest {
            chunk_pages: dbmigrate_core::verify::CHUNK_PAGES,
            digests,
        },
        "t",
    )
    .await
    .unwrap();
    let m = next_ctrl(ctrl).await;
    assert!(
        matches!(
            &m,
            Message::VerifyResult {
                mismatched_total: 0,
                ..
            }
        ),
        "got {}",
        m.name()
    );
}

/// The next message on a control connection that is not a heartbeat.
pub async fn next_ctrl(s: &mut TcpStream) -> Message {
    loop {
        let (m, _) = protocol::read_message(s, "t").await.unwrap();
        if m != Message::Heartbeat {
            return m;
        }
    }
}

/// A scripted source's start: Hello on a control connection, the
/// destination's Welcome, and one data connection announced with its Hello.
pub async fn scripted_source(
    addr: std::net::SocketAddr,
    session: u64,
) -> (TcpStream, protocol::Welcome, TcpStream) {
    let hello = |conn_index| {
        Message::Hello(Hello {
            version: protocol::PROTOCOL_VERSION,
            session,
            ram_bytes: PAGES * 4096,
            page_size: 4096,
            data_connections: 1,
            conn_index,
            disks: Vec::new(),
            ram_files: vec![PAGES * 4096],
        })
    };
    let mut ctrl = TcpStream::connect(addr).await.unwrap();
    protocol::write_message(&mut ctrl, &hello(0), "t")
        .await
        .unwrap();
    let welcome = match protocol::read_message(&mut ctrl, "t").await.unwrap().0 {
        Message::Welcome(w) => w,
        other => panic!("expected Welcome, got {}", other.name()),
    };
    let mut data = TcpStream::connect(addr).await.unwrap();
    protocol::write_message(&mut data, &hello(1), "t")
        .await
        .unwrap();
    (ctrl, welcome, data)
}

/// The destination side of a session: accepts one source on `listener`
/// for a RAM of [`PAGES`] pages.
pub async fn accept_source(
    listener: TcpListener,
    postcopy: bool,
    timeout: Duration,
) -> dest::DestSession {
    dest::accept(
        &mut plain_gate(listener),
        &[PAGES * 4096],
        postcopy,
        timeout,
    )
    .await
    .unwrap()
}

/// A gate on `listener` for plain TCP.
pub fn plain_gate(listener: TcpListener) -> Gate {
    Gate::open(listener, Acceptor::InsecurePlaintext)
}
