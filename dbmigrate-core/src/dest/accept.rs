//! The handshake: the first control connection through the gate is the
//! source; its Hello is checked against this VM, the Welcome says whether
//! this side serves post-copy, and the data connections that carry the
//! session's id and certificate are gathered.

use std::time::Duration;

use super::session::DestSession;
use super::{DestError, DestStats};
use crate::control::within;
use crate::control::ControlWriter;
use crate::gate::Gate;
use crate::protocol::{self, Hello, Message, Welcome};
use crate::transport::Conn;
use crate::PAGE_SIZE;

/// A session's id and its source's certificate: a later connection belongs
/// to the session only if it carries both.
#[derive(Clone, Debug)]
pub struct SessionPeer {
    session: u64,
    cert: Option<Vec<u8>>,
}

impl SessionPeer {
    /// Whether `a` belongs to the session.
    pub fn owns(&self, a: &crate::gate::Admitted) -> bool {
        a.hello.session == self.session && a.conn.peer_certificate() == self.cert.as_deref()
    }
}

/// Takes the first connection through `gate` that introduces itself as a
/// control connection as the source (the gate already dropped strangers),
/// checks its Hello against this VM's RAM files (`ram_files`, their
/// sizes in the order their pages follow each other), answers whether this side can
/// serve post-copy faults, then waits for its data connections. Other
/// connections meanwhile are dropped with a warning.
pub async fn accept(
    gate: &mut Gate,
    ram_files: &[u64],
    postcopy: bool,
    peer_timeout: Duration,
) -> Result<DestSession, DestError> {
    let (ctrl, hello) = loop {
        let a = gate.next().await.ok_or(DestError::ListenerGone)?;
        if a.hello.conn_index == 0 {
            tracing::info!(peer = %a.peer, "source agent connected");
            break (a.conn, a.hello);
        }
        tracing::warn!(peer = %a.peer, conn = a.hello.conn_index, "ignored a connection before any control connection");
    };
    // Every later connection of the session must come from the same peer.
    let peer = SessionPeer {
        session: hello.session,
        cert: ctrl.peer_certificate().map(<[u8]>::to_vec),
    };
    let (ctrl_rx, mut ctrl_tx) = ctrl.split();
    let ram_bytes = ram_files.iter().sum();
    if let Some(reason) = hello_problem(&hello, ram_files) {
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
            postcopy,
        }),
        "sending Welcome",
    )
    .await?;
    let mut slots: Vec<Option<Conn>> = (0..hello.data_connections).map(|_| None).collect();
    while slots.iter().any(Option::is_none) {
        let a = within(peer_timeout, "waiting for data connections", gate.next())
            .await?
            .ok_or(DestError::ListenerGone)?;
        match a.hello.conn_index.checked_sub(1).map(usize::from) {
            Some(i) if i < slots.len() && slots[i].is_none() && peer.owns(&a) => {
                slots[i] = Some(a.conn);
            }
            // Another session or peer, a duplicate: drop it, keep waiting.
            _ => {
                tracing::warn!(peer = %a.peer, conn = a.hello.conn_index, "ignored a stray connection")
            }
        }
    }
    let (ctrl_in, _reader) =
        crate::control::spawn_reader(ctrl_rx, "reading the control connection", ram_bytes);
    Ok(DestSession {
        ctrl_in,
        ctrl_tx: ControlWriter::new(ctrl_tx, peer_timeout),
        data: slots.into_iter().flatten().collect(),
        hello,
        peer,
        peer_timeout,
        storage_rate: None,
        storage_read_gap: super::storage::DEFAULT_READ_GAP,
        stats: DestStats::default(),
    })
}

/// Why a source's Hello does not fit this VM, if it does not.
fn hello_problem(hello: &Hello, ram_files: &[u64]) -> Option<String> {
    let ram_bytes: u64 = ram_files.iter().sum();
    if hello.ram_bytes != ram_bytes {
        Some(format!(
            "source RAM is {} bytes but the destination VM has {} bytes: start the destination QEMU with the same -m and memory backend size",
            hello.ram_bytes, ram_bytes
        ))
    } else if hello.ram_files != ram_files {
        Some(format!(
            "source RAM is in memory backends of {:?} bytes but the destination VM's are {:?} bytes: start the destination QEMU with the same memory backends (NUMA nodes) in the same order",
            hello.ram_files, ram_files
        ))
    } else if hello.page_size as usize != PAGE_SIZE {
        Some(format!(
            "page size {} is not supported (only {PAGE_SIZE})",
            hello.page_size
        ))
    } else if !(1..=protocol::MAX_DATA_CONNECTIONS).contains(&hello.data_connections) {
        Some(format!(
            "{} data connections requested, 1 to {} allowed",
            hello.data_connections,
            protocol::MAX_DATA_CONNECTIONS
        ))
    } else {
        None
    }
}
