//! The message kinds on the wire: one table of numbers and names.

use super::ProtocolError;

/// A message's kind, as its frame header carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// [`super::Message::Hello`].
    Hello = 1,
    /// [`super::Message::Welcome`].
    Welcome = 2,
    /// [`super::Message::Refuse`].
    Refuse = 3,
    /// [`super::Message::PageBatch`].
    PageBatch = 4,
    /// [`super::Message::EndOfStream`].
    EndOfStream = 5,
    /// [`super::Message::VerifyRequest`].
    VerifyRequest = 6,
    /// [`super::Message::VerifyResult`].
    VerifyResult = 7,
    /// [`super::Message::Commit`].
    Commit = 8,
    /// [`super::Message::Activated`].
    Activated = 9,
    /// [`super::Message::Abort`].
    Abort = 10,
    /// [`super::Message::Drain`].
    Drain = 11,
    /// [`super::Message::Drained`].
    Drained = 12,
    /// [`super::Message::Switch`].
    Switch = 13,
    /// [`super::Message::SwitchMark`].
    SwitchMark = 14,
    /// [`super::Message::Switched`].
    Switched = 15,
    /// [`super::Message::PageRequest`].
    PageRequest = 16,
    /// [`super::Message::Heartbeat`].
    Heartbeat = 17,
    /// [`super::Message::PrepareSwitch`].
    PrepareSwitch = 18,
    /// [`super::Message::SwitchPrepared`].
    SwitchPrepared = 19,
    /// [`super::Message::PrepareMark`].
    PrepareMark = 20,
}

impl Kind {
    /// Every kind, in wire order.
    pub const ALL: [Kind; 20] = [
        Kind::Hello,
        Kind::Welcome,
        Kind::Refuse,
        Kind::PageBatch,
        Kind::EndOfStream,
        Kind::VerifyRequest,
        Kind::VerifyResult,
        Kind::Commit,
        Kind::Activated,
        Kind::Abort,
        Kind::Drain,
        Kind::Drained,
        Kind::Switch,
        Kind::SwitchMark,
        Kind::Switched,
        Kind::PageRequest,
        Kind::Heartbeat,
        Kind::PrepareSwitch,
        Kind::SwitchPrepared,
        Kind::PrepareMark,
    ];

    /// The kind numbered `n` on the wire.
    pub fn from_wire(n: u16) -> Result<Kind, ProtocolError> {
        Self::ALL
            .iter()
            .copied()
            .find(|k| *k as u16 == n)
            .ok_or(ProtocolError::UnknownKind { kind: n })
    }

    /// The message's name, for errors and logs.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Hello => "Hello",
            Kind::Welcome => "Welcome",
            Kind::Refuse => "Refuse",
            Kind::PageBatch => "PageBatch",
            Kind::EndOfStream => "EndOfStream",
            Kind::VerifyRequest => "VerifyRequest",
            Kind::VerifyResult => "VerifyResult",
            Kind::Commit => "Commit",
            Kind::Activated => "Activated",
            Kind::Abort => "Abort",
            Kind::Drain => "Drain",
            Kind::Drained => "Drained",
            Kind::Switch => "Switch",
            Kind::SwitchMark => "SwitchMark",
            Kind::Switched => "Switched",
            Kind::PageRequest => "PageRequest",
            Kind::Heartbeat => "Heartbeat",
            Kind::PrepareSwitch => "PrepareSwitch",
            Kind::SwitchPrepared => "SwitchPrepared",
            Kind::PrepareMark => "PrepareMark",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_numbered_once_and_read_back() {
        for (i, k) in Kind::ALL.iter().enumerate() {
            assert_eq!(*k as u16, u16::try_from(i + 1).unwrap());
            assert_eq!(Kind::from_wire(*k as u16).unwrap(), *k);
        }
        assert!(Kind::from_wire(0).is_err());
        assert!(Kind::from_wire(21).is_err());
    }
}
