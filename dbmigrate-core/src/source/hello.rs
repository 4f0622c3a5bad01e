//! How a source session opens its connections: the destination agent may
//! not listen yet, and every connection starts with the session's Hello.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use super::SourceError;
use crate::protocol::guest::DiskId;
use crate::protocol::{self, Hello, Message};
use crate::PAGE_SIZE;

/// Connects, retrying while the destination agent is not listening yet
/// (both agents are often started at the same moment).
pub(super) async fn connect_retrying(
    addr: SocketAddr,
    patience: Duration,
) -> Result<TcpStream, SourceError> {
    let t = Instant::now();
    loop {
        match TcpStream::connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused && t.elapsed() < patience =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(source) => return Err(SourceError::Connect { addr, source }),
        }
    }
}

/// The Hello that opens each of a session's connections.
pub(super) fn session_hello(
    session: u64,
    ram_files: &[u64],
    conns: u16,
    conn_index: u16,
    disks: &[DiskId],
) -> Message {
    Message::Hello(Hello {
        disks: disks.to_vec(),
        ram_files: ram_files.to_vec(),
        version: protocol::PROTOCOL_VERSION,
        session,
        ram_bytes: ram_files.iter().sum(),
        page_size: u32::try_from(PAGE_SIZE).expect("4096"),
        data_connections: conns,
        conn_index,
    })
}

pub(super) fn session_id() -> u64 {
    crate::transport::random_id()
}
