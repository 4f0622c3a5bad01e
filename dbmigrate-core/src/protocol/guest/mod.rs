//! The guest channel: what the host agent and the guest agent say over
//! the VM's virtio-serial port. The host asks (8 bytes: magic, tag); the
//! guest answers with a 16-byte header {magic, version, reserved, body
//! length or count, tag} and a body: a hint set (below), a file layout
//! ([`layout`]), a memory census ([`census`]) or an error message.
//! Everything from the guest is bounded before use.

mod census;
mod disks;
mod layout;

use thiserror::Error;

use crate::addr::{DiskOffset, GuestAddr};

pub use census::*;
pub use disks::*;
pub use layout::*;

/// One hint as the guest agent exports it: a guest-physical page that should
/// equal 4 KiB of a VM disk, with the InnoDB identity of the page it came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestHint {
    /// Guest-physical address of the 4 KiB page.
    pub gpa: GuestAddr,
    /// Disk index (0 = the guest's first virtio disk).
    pub disk: u16,
    /// True if the server reported the page clean (flushed).
    pub clean: bool,
    /// Byte offset on the disk.
    pub disk_offset: DiskOffset,
    /// InnoDB space id.
    pub space: u32,
    /// InnoDB page number.
    pub page_no: u32,
    /// LSN in the page header.
    pub lsn: u64,
}

/// Magic of a hint set: "DBMH".
pub const HINTS_MAGIC: u32 = u32::from_le_bytes(*b"DBMH");
/// Version of the hint set format.
pub const HINTS_VERSION: u16 = 1;
/// Bytes per encoded [`GuestHint`].
pub const HINT_RECORD_LEN: usize = 40;
/// Most hints one set may carry: the format's own limit (a `u32` count).
/// The host bounds a set by the guest's RAM (one hint per page), so the
/// limit grows with the VM.
pub const MAX_HINTS: usize = u32::MAX as usize;

/// Why a hint set was refused.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum HintFormatError {
    /// Too short for its header.
    #[error("hint set of {0} bytes is shorter than its 16-byte header")]
    Short(usize),
    /// Wrong magic.
    #[error("not a dbmigrate hint set (magic {0:#010x})")]
    Magic(u32),
    /// Unknown version.
    #[error("hint set version {0} is not supported (this agent reads version {HINTS_VERSION}): update the guest agent")]
    Version(u16),
    /// Count and length disagree or exceed the limit.
    #[error("the guest's answer announces {count} records (or bytes) in {bytes} bytes: more than it holds or than the format allows")]
    Count {
        /// Announced count.
        count: u64,
        /// Bytes present.
        bytes: usize,
    },
}

/// Encodes hints: 16-byte header {magic, version, reserved, count, tag} then
/// 40-byte records, little-endian. The tag echoes the request the set answers.
pub fn encode_hints(hints: &[GuestHint], tag: u32) -> Vec<u8> {
    if let Some(refusal) = too_large(hints.len(), tag) {
        return refusal;
    }
    let mut out = answer_header(HINTS_MAGIC, hints.len(), tag, hints.len() * HINT_RECORD_LEN);
    for h in hints {
        out.extend_from_slice(&h.gpa.0.to_le_bytes());
        out.extend_from_slice(&h.disk.to_le_bytes());
        out.extend_from_slice(&u16::from(h.clean).to_le_bytes());
        out.extend_from_slice(&h.space.to_le_bytes());
        out.extend_from_slice(&h.disk_offset.0.to_le_bytes());
        out.extend_from_slice(&h.page_no.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&h.lsn.to_le_bytes());
    }
    out
}

/// Magic of a request for hints (host to guest, 8 bytes: magic, tag): "DBMQ".
pub const HINT_REQUEST_MAGIC: u32 = u32::from_le_bytes(*b"DBMQ");
/// Magic of an error answer (guest to host): "DBME", same 16-byte header
/// layout as a hint set, with the message length where the count is.
pub const HINT_ERROR_MAGIC: u32 = u32::from_le_bytes(*b"DBME");
/// Longest error message a guest may send.
pub const MAX_HINT_ERROR_LEN: usize = 4096;

/// An 8-byte request {`magic`, `tag`} (every request's format).
pub(crate) fn request(magic: u32, tag: u32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&magic.to_le_bytes());
    b[4..].copy_from_slice(&tag.to_le_bytes());
    b
}

/// A request for a fresh hint set, tagged so that a late answer to an
/// earlier request can be told apart.
pub fn encode_hint_request(tag: u32) -> [u8; 8] {
    request(HINT_REQUEST_MAGIC, tag)
}

/// Magic of a request for page-cache hints (host to guest, 8 bytes: magic,
/// tag): "DBMP". The answer is a hint set of the clean page cache of the
/// guest's open and mapped files.
pub const PAGE_CACHE_REQUEST_MAGIC: u32 = u32::from_le_bytes(*b"DBMP");

/// A request for page-cache hints.
pub fn encode_page_cache_request(tag: u32) -> [u8; 8] {
    request(PAGE_CACHE_REQUEST_MAGIC, tag)
}

/// What the host asks the guest agent for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestRequest {
    /// A hint set (the guest finds the pages).
    Hints(u32),
    /// The file layout (the host finds the pages).
    Layout(u32),
    /// A census of the guest's memory (for the report).
    Census(u32),
    /// Hints for the guest's clean page cache.
    PageCache(u32),
    /// The serial and WWN of each disk the guest's indexes name.
    Disks(u32),
}

/// Parses an 8-byte request {magic, tag}; None if the magic is unknown.
pub fn parse_guest_request(b: &[u8; 8]) -> Option<GuestRequest> {
    let tag = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    match u32::from_le_bytes([b[0], b[1], b[2], b[3]]) {
        HINT_REQUEST_MAGIC => Some(GuestRequest::Hints(tag)),
        layout::LAYOUT_REQUEST_MAGIC => Some(GuestRequest::Layout(tag)),
        census::CENSUS_REQUEST_MAGIC => Some(GuestRequest::Census(tag)),
        PAGE_CACHE_REQUEST_MAGIC => Some(GuestRequest::PageCache(tag)),
        disks::DISKS_REQUEST_MAGIC => Some(GuestRequest::Disks(tag)),
        _ => None,
    }
}

/// An error answer: the guest could not collect hints.
pub fn encode_hint_error(tag: u32, msg: &str) -> Vec<u8> {
    let mut end = msg.len().min(MAX_HINT_ERROR_LEN);
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    let m = &msg.as_bytes()[..end];
    let mut out = answer_header(HINT_ERROR_MAGIC, m.len(), tag, m.len());
    out.extend_from_slice(m);
    out
}

/// What a 16-byte answer header announces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HintAnswer {
    /// A hint set with this many record bytes following.
    Hints {
        /// Bytes of records that follow.
        body: usize,
        /// Request tag.
        tag: u32,
    },
    /// A file layout with this many body bytes following.
    Layout {
        /// Bytes of body that follow.
        body: usize,
        /// Request tag.
        tag: u32,
    },
    /// A memory census with this many body bytes following.
    Census {
        /// Bytes of body that follow.
        body: usize,
        /// Request tag.
        tag: u32,
    },
    /// The disks' identities, this many body bytes following.
    Disks {
        /// Bytes of body that follow.
        body: usize,
        /// Request tag.
        tag: u32,
    },
    /// An error message of this many bytes follows.
    Error {
        /// Bytes of message that follow.
        len: usize,
        /// Request tag.
        tag: u32,
    },
}

/// An error answer in place of one whose `count` a header cannot carry
/// (a `u32`), so that the header never announces less than follows.
pub(crate) fn too_large(count: usize, tag: u32) -> Option<Vec<u8>> {
    (u32::try_from(count).is_err()).then(|| {
        encode_hint_error(
            tag,
            &format!(
                "the answer would hold {count} records or bytes, more than one answer carries ({})",
                u32::MAX
            ),
        )
    })
}

/// Parses the header of a guest's answer, bounding what follows.
pub fn parse_answer_header(b: &[u8]) -> Result<HintAnswer, HintFormatError> {
    if b.len() >= HINTS_HEADER_LEN && b[..4] == HINT_ERROR_MAGIC.to_le_bytes() {
        let len = u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize;
        if len > MAX_HINT_ERROR_LEN {
            return Err(HintFormatError::Count {
                count: len as u64,
                bytes: b.len(),
            });
        }
        return Ok(HintAnswer::Error {
            len,
            tag: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
        });
    }
    if b.len() >= HINTS_HEADER_LEN && b[..4] == layout::LAYOUT_MAGIC.to_le_bytes() {
        let (body, tag) = layout::layout_header(b)?;
        return Ok(HintAnswer::Layout { body, tag });
    }
    if b.len() >= HINTS_HEADER_LEN && b[..4] == census::CENSUS_MAGIC.to_le_bytes() {
        let (body, tag) = census::census_header(b)?;
        return Ok(HintAnswer::Census { body, tag });
    }
    if b.len() >= HINTS_HEADER_LEN && b[..4] == disks::DISKS_MAGIC.to_le_bytes() {
        let (body, tag) = disks::disks_header(b)?;
        return Ok(HintAnswer::Disks { body, tag });
    }
    let (body, tag) = hint_set_header(b)?;
    Ok(HintAnswer::Hints { body, tag })
}

/// Bytes of a hint set's header.
pub const HINTS_HEADER_LEN: usize = 16;

/// The 16-byte header of a guest answer {`magic`, version, reserved,
/// `count`, `tag`}, in a buffer with room for `body` more bytes. Every
/// answer format's header is written here.
pub(crate) fn answer_header(magic: u32, count: usize, tag: u32, body: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(HINTS_HEADER_LEN + body);
    out.extend_from_slice(&magic.to_le_bytes());
    out.extend_from_slice(&HINTS_VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&u32::try_from(count).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(&tag.to_le_bytes());
    out
}

/// Checks a guest answer's 16-byte header {`magic`, version, reserved,
/// count, tag}: the count at most `limit`. Returns (count, tag). Every
/// answer format's header goes through here.
pub(crate) fn checked_header(
    b: &[u8],
    magic: u32,
    limit: usize,
) -> Result<(usize, u32), HintFormatError> {
    if b.len() < HINTS_HEADER_LEN {
        return Err(HintFormatError::Short(b.len()));
    }
    let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    if u32_at(0) != magic {
        return Err(HintFormatError::Magic(u32_at(0)));
    }
    let version = u16::from_le_bytes([b[4], b[5]]);
    if version != HINTS_VERSION {
        return Err(HintFormatError::Version(version));
    }
    let count = u32_at(8) as usize;
    if count > limit {
        return Err(HintFormatError::Count {
            count: count as u64,
            bytes: b.len(),
        });
    }
    Ok((count, u32_at(12)))
}

/// [`checked_header`] of an answer of `record`-byte records: returns
/// (record bytes that follow, tag).
pub(crate) fn records_header(
    b: &[u8],
    magic: u32,
    limit: usize,
    record: usize,
) -> Result<(usize, u32), HintFormatError> {
    let (count, tag) = checked_header(b, magic, limit)?;
    let body = count.checked_mul(record).ok_or(HintFormatError::Count {
        count: count as u64,
        bytes: b.len(),
    })?;
    Ok((body, tag))
}

/// Checks a hint set's 16-byte header and returns (record bytes that follow, tag).
pub fn hint_set_header(b: &[u8]) -> Result<(usize, u32), HintFormatError> {
    records_header(b, HINTS_MAGIC, MAX_HINTS, HINT_RECORD_LEN)
}

/// Decodes a hint set from an untrusted guest, checking every length first.
pub fn decode_hints(b: &[u8]) -> Result<Vec<GuestHint>, HintFormatError> {
    let (body, _tag) = hint_set_header(b)?;
    if body != b.len() - HINTS_HEADER_LEN {
        return Err(HintFormatError::Count {
            count: (body / HINT_RECORD_LEN) as u64,
            bytes: b.len(),
        });
    }
    Ok(b[16..]
        .chunks_exact(HINT_RECORD_LEN)
        .map(|r| GuestHint {
            gpa: GuestAddr(u64::from_le_bytes(r[0..8].try_into().expect("8 bytes"))),
            disk: u16::from_le_bytes([r[8], r[9]]),
            clean: u16::from_le_bytes([r[10], r[11]]) & 1 == 1,
            space: u32::from_le_bytes(r[12..16].try_into().expect("4 bytes")),
            disk_offset: DiskOffset(u64::from_le_bytes(r[16..24].try_into().expect("8 bytes"))),
            page_no: u32::from_le_bytes(r[24..28].try_into().expect("4 bytes")),
            lsn: u64::from_le_bytes(r[32..40].try_into().expect("8 bytes")),
        })
        .collect())
}

#[cfg(test)]
mod format_tests {
    use super::*;

    #[test]
    fn hint_sets_round_trip_and_reject_garbage() {
        let h = vec![
            GuestHint {
                gpa: GuestAddr(0x1000),
                disk: 0,
                clean: true,
                disk_offset: DiskOffset(0x20000),
                space: 5,
                page_no: 8,
                lsn: 77,
            },
            GuestHint {
                gpa: GuestAddr(0x7fff_f000),
                disk: 1,
                clean: false,
                disk_offset: DiskOffset(0),
                space: 0,
                page_no: 0,
                lsn: u64::MAX,
            },
        ];
        let b = encode_hints(&h, 7);
        assert_eq!(decode_hints(&b).unwrap(), h);
        assert_eq!(hint_set_header(&b).unwrap(), (80, 7));
        assert_eq!(
            parse_answer_header(&b).unwrap(),
            HintAnswer::Hints { body: 80, tag: 7 }
        );
        let e = encode_hint_error(9, "no server");
        assert_eq!(
            parse_answer_header(&e).unwrap(),
            HintAnswer::Error { len: 9, tag: 9 }
        );
        assert_eq!(
            parse_guest_request(&encode_hint_request(5)),
            Some(GuestRequest::Hints(5))
        );
        assert_eq!(
            parse_guest_request(&encode_page_cache_request(6)),
            Some(GuestRequest::PageCache(6))
        );
        assert_eq!(parse_guest_request(b"DBMX\0\0\0\0"), None);
        assert!(matches!(
            decode_hints(&b[..b.len() - 1]),
            Err(HintFormatError::Count { .. })
        ));
        assert!(matches!(
            decode_hints(&b[..10]),
            Err(HintFormatError::Short(10))
        ));
        let mut bad = b.clone();
        bad[0] ^= 1;
        assert!(matches!(decode_hints(&bad), Err(HintFormatError::Magic(_))));
        let mut bad = b.clone();
        bad[4] = 9;
        assert!(matches!(
            decode_hints(&bad),
            Err(HintFormatError::Version(9))
        ));
        let mut bad = b;
        bad[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_hints(&bad),
            Err(HintFormatError::Count { .. })
        ));
    }
}
