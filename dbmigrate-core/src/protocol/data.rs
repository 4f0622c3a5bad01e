//! What a data connection carries, source to destination, as types of its
//! own: the destination's data readers decode only [`DataMessage`] (a
//! message that belongs on the control connection is refused by the
//! decoder, and their `match` has no catch-all), and the source's data
//! writers send only [`DataFrame`]s.

use tokio::io::AsyncRead;

use super::{read_message_with, BatchBuilder, Message, PageEntry, ProtocolError};

/// A data connection's message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataMessage {
    /// Pages of a round (see [`Message::PageBatch`]).
    PageBatch {
        /// Round number.
        round: u32,
        /// The pages.
        pages: Vec<PageEntry>,
    },
    /// This connection's part of round `round` was sent.
    Drain {
        /// The round.
        round: u32,
    },
    /// Everything before the switch's preparation was sent.
    PrepareMark,
    /// Everything before the switch to post-copy was sent.
    SwitchMark,
    /// The connection's last message.
    EndOfStream,
}

/// The kinds a data connection carries, for errors.
pub const DATA_KINDS: &str = "PageBatch, Drain, PrepareMark, SwitchMark or EndOfStream";

impl TryFrom<Message> for DataMessage {
    type Error = ProtocolError;

    fn try_from(m: Message) -> Result<Self, ProtocolError> {
        Ok(match m {
            Message::PageBatch { round, pages } => DataMessage::PageBatch { round, pages },
            Message::Drain { round } => DataMessage::Drain { round },
            Message::PrepareMark => DataMessage::PrepareMark,
            Message::SwitchMark => DataMessage::SwitchMark,
            Message::EndOfStream => DataMessage::EndOfStream,
            other => {
                return Err(ProtocolError::WrongConnection {
                    kind: other.name(),
                    expected: DATA_KINDS,
                })
            }
        })
    }
}

impl DataMessage {
    /// The frame that carries it.
    pub fn frame(&self) -> DataFrame {
        let bytes = match self {
            DataMessage::PageBatch { round, pages } => {
                return DataFrame::batch(BatchBuilder::of(*round, pages))
            }
            DataMessage::Drain { round } => Message::Drain { round: *round }.encode(),
            DataMessage::PrepareMark => Message::PrepareMark.encode(),
            DataMessage::SwitchMark => Message::SwitchMark.encode(),
            DataMessage::EndOfStream => Message::EndOfStream.encode(),
        };
        DataFrame { bytes, costly: 0 }
    }
}

/// An encoded frame that may go on a data connection: made only from a
/// [`DataMessage`] or a page batch.
#[derive(Clone, Debug)]
pub struct DataFrame {
    bytes: Vec<u8>,
    costly: u32,
}

impl DataFrame {
    /// A finished page batch.
    pub fn batch(b: BatchBuilder) -> Self {
        let costly = b.costly();
        DataFrame {
            bytes: b.finish(),
            costly,
        }
    }

    /// The bytes to write.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The pages it carries that cost a transfer or a storage read (see
    /// [`BatchBuilder::costly`]).
    pub fn costly_pages(&self) -> u32 {
        self.costly
    }
}

/// Reads one frame of a data connection (see [`read_message_with`]).
pub async fn read_data_message<R: AsyncRead + Unpin>(
    r: &mut R,
    doing: &'static str,
    payload: &mut Vec<u8>,
) -> Result<(DataMessage, u64), ProtocolError> {
    let (m, n) = read_message_with(r, doing, payload).await?;
    Ok((DataMessage::try_from(m)?, n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{PageEncoding, Welcome, PROTOCOL_VERSION};

    #[test]
    fn a_data_connection_takes_its_five_kinds_and_refuses_the_others() {
        let batch = DataMessage::PageBatch {
            round: 2,
            pages: vec![PageEntry {
                page: 7,
                encoding: PageEncoding::Zero,
                data: Vec::new(),
            }],
        };
        for m in [
            batch,
            DataMessage::Drain { round: 3 },
            DataMessage::PrepareMark,
            DataMessage::SwitchMark,
            DataMessage::EndOfStream,
        ] {
            let f = m.frame();
            let h: [u8; super::super::HEADER_LEN] = f.bytes()[..16].try_into().unwrap();
            let (kind, _) = super::super::parse_header(&h).unwrap();
            let back = Message::decode(kind, &f.bytes()[16..]).unwrap();
            assert_eq!(DataMessage::try_from(back).unwrap(), m);
        }
        for m in [
            Message::Commit,
            Message::Welcome(Welcome {
                version: PROTOCOL_VERSION,
                postcopy: false,
            }),
            Message::Switch { pending: vec![0] },
        ] {
            let e = DataMessage::try_from(m).unwrap_err();
            assert!(e.to_string().contains(DATA_KINDS), "{e}");
        }
    }
}
