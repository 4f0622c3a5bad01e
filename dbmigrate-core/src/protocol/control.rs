//! What the control connection carries once the session is set up, one type
//! per direction: the source reads only [`ToSource`], the destination only
//! [`ToDestination`] (a message of the other direction or of a data
//! connection is refused by the decoder as
//! [`ProtocolError::WrongConnection`]), and each side's control writer
//! takes only its own direction's type. The handshake before
//! ([`Message::Hello`], [`Message::Welcome`], [`Message::Refuse`]) is read
//! on its own.

use tokio::io::AsyncRead;

use super::{read_message_within, Kind, Message, PageEntry, ProtocolError};

/// A control message from the source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToDestination {
    /// See [`Message::VerifyRequest`].
    VerifyRequest {
        /// Pages per digest chunk.
        chunk_pages: u32,
        /// One 128-bit digest per chunk.
        digests: Vec<u128>,
    },
    /// See [`Message::PrepareSwitch`].
    PrepareSwitch {
        /// The bitmap of stale pages.
        stale: Vec<u8>,
    },
    /// See [`Message::Switch`].
    Switch {
        /// The bitmap of pending pages.
        pending: Vec<u8>,
    },
    /// Post-copy: pages the destination asked for, or the hottest ones.
    PageBatch {
        /// Round number.
        round: u32,
        /// The pages.
        pages: Vec<PageEntry>,
    },
    /// The source hands the VM over.
    Commit,
    /// The source gives up; its VM stays authoritative.
    Abort {
        /// Why, for the operator.
        reason: String,
    },
    /// Still alive.
    Heartbeat,
}

/// A control message from the destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToSource {
    /// See [`Message::Drained`].
    Drained {
        /// The round.
        round: u32,
        /// Pages to send raw.
        need: Vec<u64>,
    },
    /// See [`Message::SwitchPrepared`].
    SwitchPrepared,
    /// See [`Message::Switched`].
    Switched,
    /// See [`Message::PageRequest`].
    PageRequest {
        /// The pages.
        pages: Vec<u64>,
    },
    /// See [`Message::VerifyResult`].
    VerifyResult {
        /// Indexes of chunks that differ.
        mismatched: Vec<u32>,
        /// Total number of differing chunks.
        mismatched_total: u32,
    },
    /// The destination resumed the VM.
    Activated,
    /// The destination gives up.
    Abort {
        /// Why, for the operator.
        reason: String,
    },
    /// Still alive.
    Heartbeat,
}

/// The kinds the source's control connection carries, for errors.
pub const TO_DESTINATION_KINDS: &str =
    "VerifyRequest, PrepareSwitch, Switch, PageBatch, Commit, Abort or Heartbeat";
/// The kinds the destination's control connection carries, for errors.
pub const TO_SOURCE_KINDS: &str =
    "Drained, SwitchPrepared, Switched, PageRequest, VerifyResult, Activated, Abort or Heartbeat";

/// One direction of a control connection: what its writer sends and its
/// reader decodes.
pub trait Control: TryFrom<Message, Error = ProtocolError> + Send + 'static {
    /// The frame that carries it.
    fn encode(self) -> Vec<u8>;
    /// Its kind on the wire.
    fn kind(&self) -> Kind;
    /// Its name, for errors and logs.
    fn name(&self) -> &'static str {
        self.kind().name()
    }
}

impl TryFrom<Message> for ToDestination {
    type Error = ProtocolError;

    fn try_from(m: Message) -> Result<Self, ProtocolError> {
        Ok(match m {
            Message::VerifyRequest {
                chunk_pages,
                digests,
            } => ToDestination::VerifyRequest {
                chunk_pages,
                digests,
            },
            Message::PrepareSwitch { stale } => ToDestination::PrepareSwitch { stale },
            Message::Switch { pending } => ToDestination::Switch { pending },
            Message::PageBatch { round, pages } => ToDestination::PageBatch { round, pages },
            Message::Commit => ToDestination::Commit,
            Message::Abort { reason } => ToDestination::Abort { reason },
            Message::Heartbeat => ToDestination::Heartbeat,
            other => return Err(wrong(&other, TO_DESTINATION_KINDS)),
        })
    }
}

impl From<ToDestination> for Message {
    fn from(m: ToDestination) -> Self {
        match m {
            ToDestination::VerifyRequest {
                chunk_pages,
                digests,
            } => Message::VerifyRequest {
                chunk_pages,
                digests,
            },
            ToDestination::PrepareSwitch { stale } => Message::PrepareSwitch { stale },
            ToDestination::Switch { pending } => Message::Switch { pending },
            ToDestination::PageBatch { round, pages } => Message::PageBatch { round, pages },
            ToDestination::Commit => Message::Commit,
            ToDestination::Abort { reason } => Message::Abort { reason },
            ToDestination::Heartbeat => Message::Heartbeat,
        }
    }
}

impl Control for ToDestination {
    fn encode(self) -> Vec<u8> {
        Message::from(self).encode()
    }

    fn kind(&self) -> Kind {
        match self {
            ToDestination::VerifyRequest { .. } => Kind::VerifyRequest,
            ToDestination::PrepareSwitch { .. } => Kind::PrepareSwitch,
            ToDestination::Switch { .. } => Kind::Switch,
            ToDestination::PageBatch { .. } => Kind::PageBatch,
            ToDestination::Commit => Kind::Commit,
            ToDestination::Abort { .. } => Kind::Abort,
            ToDestination::Heartbeat => Kind::Heartbeat,
        }
    }
}

impl TryFrom<Message> for ToSource {
    type Error = ProtocolError;

    fn try_from(m: Message) -> Result<Self, ProtocolError> {
        Ok(match m {
            Message::Drained { round, need } => ToSource::Drained { round, need },
            Message::SwitchPrepared => ToSource::SwitchPrepared,
            Message::Switched => ToSource::Switched,
            Message::PageRequest { pages } => ToSource::PageRequest { pages },
            Message::VerifyResult {
                mismatched,
                mismatched_total,
            } => ToSource::VerifyResult {
                mismatched,
                mismatched_total,
            },
            Message::Activated => ToSource::Activated,
            Message::Abort { reason } => ToSource::Abort { reason },
            Message::Heartbeat => ToSource::Heartbeat,
            other => return Err(wrong(&other, TO_SOURCE_KINDS)),
        })
    }
}

impl From<ToSource> for Message {
    fn from(m: ToSource) -> Self {
        match m {
            ToSource::Drained { round, need } => Message::Drained { round, need },
            ToSource::SwitchPrepared => Message::SwitchPrepared,
            ToSource::Switched => Message::Switched,
            ToSource::PageRequest { pages } => Message::PageRequest { pages },
            ToSource::VerifyResult {
                mismatched,
                mismatched_total,
            } => Message::VerifyResult {
                mismatched,
                mismatched_total,
            },
            ToSource::Activated => Message::Activated,
            ToSource::Abort { reason } => Message::Abort { reason },
            ToSource::Heartbeat => Message::Heartbeat,
        }
    }
}

impl Control for ToSource {
    fn encode(self) -> Vec<u8> {
        Message::from(self).encode()
    }

    fn kind(&self) -> Kind {
        match self {
            ToSource::Drained { .. } => Kind::Drained,
            ToSource::SwitchPrepared => Kind::SwitchPrepared,
            ToSource::Switched => Kind::Switched,
            ToSource::PageRequest { .. } => Kind::PageRequest,
            ToSource::VerifyResult { .. } => Kind::VerifyResult,
            ToSource::Activated => Kind::Activated,
            ToSource::Abort { .. } => Kind::Abort,
            ToSource::Heartbeat => Kind::Heartbeat,
        }
    }
}

/// Reads one frame of a control connection in direction `T`, of at most
/// `max` payload bytes ([`super::control_payload_limit`] of the guest's
/// RAM; see [`read_message_within`]).
pub async fn read_control<T: Control, R: AsyncRead + Unpin>(
    r: &mut R,
    doing: &'static str,
    max: u64,
) -> Result<(T, u64), ProtocolError> {
    let (m, n) = read_message_within(r, doing, max).await?;
    Ok((T::try_from(m)?, n))
}

fn wrong(m: &Message, expected: &'static str) -> ProtocolError {
    ProtocolError::WrongConnection {
        kind: m.name(),
        expected,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{parse_header, DataMessage, HEADER_LEN};

    fn decode(frame: &[u8]) -> Message {
        let h: [u8; HEADER_LEN] = frame[..HEADER_LEN].try_into().unwrap();
        let (kind, _) = parse_header(&h).unwrap();
        Message::decode(kind, &frame[HEADER_LEN..]).unwrap()
    }

    fn to_destination() -> Vec<ToDestination> {
        vec![
            ToDestination::VerifyRequest {
                chunk_pages: 512,
                digests: vec![1, 2],
            },
            ToDestination::PrepareSwitch { stale: vec![1] },
            ToDestination::Switch { pending: vec![2] },
            ToDestination::PageBatch {
                round: u32::MAX,
                pages: Vec::new(),
            },
            ToDestination::Commit,
            ToDestination::Abort { reason: "x".into() },
            ToDestination::Heartbeat,
        ]
    }

    fn to_source() -> Vec<ToSource> {
        vec![
            ToSource::Drained {
                round: 1,
                need: vec![3],
            },
            ToSource::SwitchPrepared,
            ToSource::Switched,
            ToSource::PageRequest { pages: vec![4] },
            ToSource::VerifyResult {
                mismatched: vec![5],
                mismatched_total: 1,
            },
            ToSource::Activated,
            ToSource::Abort { reason: "y".into() },
            ToSource::Heartbeat,
        ]
    }

    #[test]
    fn each_direction_round_trips_its_own_kinds() {
        for m in to_destination() {
            let kind = m.kind();
            let back = decode(&m.clone().encode());
            assert_eq!(back.kind(), kind);
            assert_eq!(ToDestination::try_from(back).unwrap(), m);
        }
        for m in to_source() {
            let kind = m.kind();
            let back = decode(&m.clone().encode());
            assert_eq!(back.kind(), kind);
            assert_eq!(ToSource::try_from(back).unwrap(), m);
        }
    }

    #[test]
    fn a_message_of_the_other_direction_or_a_data_connection_is_refused() {
        for m in [
            Message::from(ToSource::Activated),
            Message::from(ToSource::PageRequest { pages: vec![1] }),
            Message::Drain { round: 1 },
            Message::EndOfStream,
        ] {
            let e = ToDestination::try_from(m).unwrap_err();
            assert!(e.to_string().contains(TO_DESTINATION_KINDS), "{e}");
        }
        for m in [
            Message::from(ToDestination::Commit),
            Message::from(ToDestination::Switch { pending: vec![] }),
            decode(DataMessage::SwitchMark.frame().bytes()),
        ] {
            let e = ToSource::try_from(m).unwrap_err();
            assert!(e.to_string().contains(TO_SOURCE_KINDS), "{e}");
        }
    }
}
