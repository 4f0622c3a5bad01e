//! One frame: the 16-byte header, read and written whole (and flushed).

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{Hello, Kind, Message, ProtocolError, HEADER_LEN, MAGIC, MAX_PAYLOAD};

pub(super) fn write_header(h: &mut [u8], kind: Kind, len: u64) {
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..6].copy_from_slice(&(kind as u16).to_le_bytes());
    h[6..8].copy_from_slice(&0u16.to_le_bytes());
    h[8..16].copy_from_slice(&len.to_le_bytes());
}

pub(super) fn frame(kind: Kind, payload: Vec<u8>) -> Vec<u8> {
    let mut out = vec![0; HEADER_LEN];
    write_header(&mut out, kind, payload.len() as u64);
    out.extend_from_slice(&payload);
    out
}

/// Reads one frame and decodes it. Returns the message and its size on the wire.
pub async fn read_message<R: AsyncRead + Unpin>(
    r: &mut R,
    doing: &'static str,
) -> Result<(Message, u64), ProtocolError> {
    read_message_with(r, doing, &mut Vec::new()).await
}

/// [`read_message`] with a payload limit of `max` instead of [`MAX_PAYLOAD`]
/// (a control connection: [`super::control_payload_limit`]).
pub async fn read_message_within<R: AsyncRead + Unpin>(
    r: &mut R,
    doing: &'static str,
    max: u64,
) -> Result<(Message, u64), ProtocolError> {
    read_frame(r, doing, &mut Vec::new(), max).await
}

/// [`read_message`] into a payload buffer the caller keeps between frames:
/// a fresh buffer per page batch costs the kernel a page fault and a
/// zeroed page per 4 KiB before the bytes arrive.
pub async fn read_message_with<R: AsyncRead + Unpin>(
    r: &mut R,
    doing: &'static str,
    payload: &mut Vec<u8>,
) -> Result<(Message, u64), ProtocolError> {
    read_frame(r, doing, payload, MAX_PAYLOAD).await
}

/// Reads one frame of at most `max` payload bytes into `payload` and
/// decodes it; the length is checked before anything is allocated.
async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    doing: &'static str,
    payload: &mut Vec<u8>,
    max: u64,
) -> Result<(Message, u64), ProtocolError> {
    let mut h = [0u8; HEADER_LEN];
    r.read_exact(&mut h).await.map_err(|e| io_error(e, doing))?;
    let (kind, len) = parse_header_within(&h, max)?;
    payload.resize(usize::try_from(len).expect("bounded by the limit"), 0);
    r.read_exact(payload)
        .await
        .map_err(|e| io_error(e, doing))?;
    let msg = Message::decode(kind, payload)?;
    Ok((msg, HEADER_LEN as u64 + len))
}

/// Largest [`Hello`] payload: 32 bytes and the disks' names, at most
/// [`super::MAX_HELLO_DISKS`] of 8 + 4 + 64 + 4 + 64 bytes.
const MAX_HELLO: u64 = 4096;

/// Reads the first frame of a connection, which must be a [`Hello`]: any
/// other kind, or a longer payload, is refused before the payload is read,
/// so a stranger cannot make the listener allocate or wait for more.
pub async fn read_hello<R: AsyncRead + Unpin>(r: &mut R) -> Result<Hello, ProtocolError> {
    let doing = "waiting for Hello";
    let mut h = [0u8; HEADER_LEN];
    r.read_exact(&mut h).await.map_err(|e| io_error(e, doing))?;
    let (kind, len) = parse_header(&h)?;
    if kind != Kind::Hello as u16 {
        return Err(ProtocolError::Malformed {
            kind: Kind::from_wire(kind)?.name(),
            problem: "the first message of a connection must be Hello".into(),
        });
    }
    if len > MAX_HELLO {
        return Err(ProtocolError::TooLong {
            len,
            max: MAX_HELLO,
        });
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

pub(crate) fn io_error(e: io::Error, doing: &'static str) -> ProtocolError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        ProtocolError::Closed { doing }
    } else {
        ProtocolError::Io { doing, source: e }
    }
}

/// Checks a header and returns (kind, payload length).
pub fn parse_header(h: &[u8; HEADER_LEN]) -> Result<(u16, u64), ProtocolError> {
    parse_header_within(h, MAX_PAYLOAD)
}

/// [`parse_header`] with a payload limit of `max`.
fn parse_header_within(h: &[u8; HEADER_LEN], max: u64) -> Result<(u16, u64), ProtocolError> {
    let magic = u32::from_le_bytes(h[0..4].try_into().expect("4 bytes"));
    if magic != MAGIC {
        return Err(ProtocolError::BadMagic { found: magic });
    }
    let kind = u16::from_le_bytes(h[4..6].try_into().expect("2 bytes"));
    let len = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
    if len > max {
        return Err(ProtocolError::TooLong { len, max });
    }
    Kind::from_wire(kind)?;
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
