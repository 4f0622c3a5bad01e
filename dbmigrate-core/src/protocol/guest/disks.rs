//! Which disks the guest's disk indexes name: each disk's serial and WWN
//! as the guest reads them, so that the host can match the guest's
//! indexes to the disks its VMM lists (QEMU's `query-block` order) instead
//! of trusting both to list them in the same order.
//!
//! Wire format (little-endian), answering a request {"DBMI", tag}: a
//! 16-byte header {"DBMD", version, reserved, body length, tag}, then the
//! body {disk count u16, reserved u16, disks...}, each disk {size in bytes
//! u64, serial length u8, serial, WWN length u8, WWN}. Identities are
//! printable ASCII of at most [`MAX_ID_LEN`] bytes. Everything comes from
//! the guest and is bounded before use; a guest that lies about its disks
//! only loses its own rebuild (every rebuilt page is checked by hash).

use thiserror::Error;

use super::{HintFormatError, HINTS_HEADER_LEN};

/// Why a disks answer was refused.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum DisksError {
    /// The header is wrong.
    #[error(transparent)]
    Header(#[from] HintFormatError),
    /// The body is inconsistent.
    #[error("malformed disk identities from the guest: {0}")]
    Body(&'static str),
}

/// Magic of a disk identity answer: "DBMD".
pub const DISKS_MAGIC: u32 = u32::from_le_bytes(*b"DBMD");
/// Magic of a request for the disks' identities: "DBMI".
pub const DISKS_REQUEST_MAGIC: u32 = u32::from_le_bytes(*b"DBMI");
/// Most disks one answer describes (a guest's disk index is a `u16`, but
/// no VMM gives a VM more than a few hundred).
pub const MAX_DISKS: usize = 256;
/// Longest serial or WWN, bytes.
pub const MAX_ID_LEN: usize = 64;
/// Largest body: every disk with both identities at their longest.
pub const MAX_DISKS_BODY: usize = 4 + MAX_DISKS * (8 + 2 + 2 * MAX_ID_LEN);
/// Bytes of a virtio-blk serial the guest sees (QEMU cuts longer ones).
const VIRTIO_SERIAL_LEN: usize = 20;

/// One disk as a side sees it. Empty strings: not known.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiskId {
    /// Size in bytes (0: not known).
    pub bytes: u64,
    /// Serial number (virtio-blk `serial=`, SCSI/NVMe serial).
    pub serial: String,
    /// World wide name, as text (`naa.5000c500a1b2c3d4`, `0x5000…`).
    pub wwn: String,
}

impl DiskId {
    /// Whether the disk carries a serial or a WWN.
    pub fn named(&self) -> bool {
        !self.serial.is_empty() || !self.wwn.is_empty()
    }
}

/// An identity cleaned for the wire: printable ASCII without spaces at
/// either end, at most [`MAX_ID_LEN`] bytes; anything else is dropped
/// (empty). Pure.
pub fn clean_id(s: &str) -> String {
    let t = s.trim_matches(|c: char| c.is_whitespace() || c == '\0');
    if t.len() > MAX_ID_LEN || !t.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return String::new();
    }
    t.to_string()
}

/// A WWN reduced to its hex digits, lower case, without the `naa.`, `eui.`
/// or `0x` prefix, so that QEMU's number and the guest's text compare.
/// Pure.
pub fn wwn_digits(s: &str) -> String {
    let s = s.trim().to_ascii_lowercase();
    let s = s
        .strip_prefix("naa.")
        .or_else(|| s.strip_prefix("eui."))
        .or_else(|| s.strip_prefix("0x"))
        .unwrap_or(&s);
    s.chars().filter(char::is_ascii_hexdigit).collect()
}

/// A request for the disks' identities.
pub fn encode_disks_request(tag: u32) -> [u8; 8] {
    super::request(DISKS_REQUEST_MAGIC, tag)
}

/// Encodes the answer to the request tagged `tag` (at most [`MAX_DISKS`]
/// disks; identities cleaned with [`clean_id`]).
pub fn encode_disks(disks: &[DiskId], tag: u32) -> Vec<u8> {
    let disks = &disks[..disks.len().min(MAX_DISKS)];
    let mut body = Vec::new();
    let count = u16::try_from(disks.len()).unwrap_or(u16::MAX);
    body.extend_from_slice(&count.to_le_bytes());
    body.extend_from_slice(&0u16.to_le_bytes());
    for d in disks {
        body.extend_from_slice(&d.bytes.to_le_bytes());
        for s in [clean_id(&d.serial), clean_id(&d.wwn)] {
            // clean_id keeps at most MAX_ID_LEN (64) bytes.
            body.push(u8::try_from(s.len()).unwrap_or(0));
            body.extend_from_slice(s.as_bytes());
        }
    }
    let mut out = super::answer_header(DISKS_MAGIC, body.len(), tag, body.len());
    out.extend_from_slice(&body);
    out
}

/// Checks a disks answer's 16-byte header; returns (body bytes, tag).
pub fn disks_header(b: &[u8]) -> Result<(usize, u32), HintFormatError> {
    super::checked_header(b, DISKS_MAGIC, MAX_DISKS_BODY)
}

/// Decodes a disks answer (header and body) from an untrusted guest.
pub fn decode_disks(b: &[u8]) -> Result<Vec<DiskId>, DisksError> {
    let (len, _) = disks_header(b)?;
    let body = &b[HINTS_HEADER_LEN..];
    if body.len() != len {
        return Err(DisksError::Body("body length differs from the header's"));
    }
    let count = u16::from_le_bytes(take::<2>(body, 0)?) as usize;
    if count > MAX_DISKS {
        return Err(DisksError::Body("more disks than an answer may name (256)"));
    }
    let mut at = 4;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let bytes = u64::from_le_bytes(take::<8>(body, at)?);
        at += 8;
        let mut ids = [String::new(), String::new()];
        for id in &mut ids {
            let n = take::<1>(body, at)?[0] as usize;
            let s = body
                .get(at + 1..at + 1 + n)
                .ok_or(DisksError::Body("a disk identity runs past the answer"))?;
            let s = std::str::from_utf8(s)
                .map_err(|_| DisksError::Body("a disk identity is not text"))?;
            if n > MAX_ID_LEN || clean_id(s) != s {
                return Err(DisksError::Body(
                    "a disk identity is too long or not printable ASCII",
                ));
            }
            *id = s.to_string();
            at += 1 + n;
        }
        let [serial, wwn] = ids;
        out.push(DiskId { bytes, serial, wwn });
    }
    if at != body.len() {
        return Err(DisksError::Body("bytes follow the last disk"));
    }
    Ok(out)
}

fn take<const N: usize>(b: &[u8], at: usize) -> Result<[u8; N], DisksError> {
    b.get(at..at + N)
        .and_then(|s| s.try_into().ok())
        .ok_or(DisksError::Body("cut short"))
}

/// Whether the guest's view `g` and the VMM's `v` are the same disk: the
/// same serial (a virtio-blk guest sees the first 20 bytes of a longer
/// one) or the same WWN, and not two different sizes. Pure.
pub fn same_disk(g: &DiskId, v: &DiskId) -> bool {
    let serial = !g.serial.is_empty()
        && (g.serial == v.serial
            || (g.serial.len() == VIRTIO_SERIAL_LEN && v.serial.starts_with(&g.serial)));
    let wwn = !g.wwn.is_empty()
        && !wwn_digits(&g.wwn).is_empty()
        && wwn_digits(&g.wwn) == wwn_digits(&v.wwn);
    let sizes_agree = g.bytes == 0 || v.bytes == 0 || g.bytes == v.bytes;
    (serial || wwn) && sizes_agree
}

/// For each of the guest's disk indexes, the VMM's index of the same disk
/// (None: no disk of the VMM is that one, or another guest disk took it).
/// When no guest disk carries a serial or WWN (an older guest agent, disks
/// without serials), indexes are taken as they are, as far as the VMM has
/// disks. Pure.
pub fn match_disks(guest: &[DiskId], vmm: &[DiskId]) -> Vec<Option<u16>> {
    if !guest.iter().any(DiskId::named) {
        return (0..guest.len())
            .map(|i| u16::try_from(i).ok().filter(|_| i < vmm.len()))
            .collect();
    }
    let mut taken = vec![false; vmm.len()];
    guest
        .iter()
        .map(|g| {
            let hits: Vec<usize> = (0..vmm.len()).filter(|&k| same_disk(g, &vmm[k])).collect();
            // Two disks of the VMM with the same name are no match at all.
            let [k] = hits[..] else { return None };
            let index = u16::try_from(k).ok()?;
            (!std::mem::replace(&mut taken[k], true)).then_some(index)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(bytes: u64, serial: &str, wwn: &str) -> DiskId {
        DiskId {
            bytes,
            serial: serial.into(),
            wwn: wwn.into(),
        }
    }

    #[test]
    fn answers_round_trip_and_garbage_is_refused() {
        let disks = vec![d(1 << 30, "dbm-data", ""), d(0, "", "naa.5000c500a1b2c3d4")];
        let b = encode_disks(&disks, 7);
        assert_eq!(disks_header(&b).unwrap().1, 7);
        assert_eq!(decode_disks(&b).unwrap(), disks);
        // Cut short, a byte too many, a length past the end.
        assert!(decode_disks(&b[..b.len() - 1]).is_err());
        let mut long = b.clone();
        long.push(0);
        assert!(decode_disks(&long).is_err());
        let mut bad = b.clone();
        bad[HINTS_HEADER_LEN + 12] = 200;
        assert!(decode_disks(&bad).is_err());
        // Not printable.
        let mut ctl = b.clone();
        ctl[HINTS_HEADER_LEN + 13] = 7;
        assert!(decode_disks(&ctl).is_err());
        assert!(decode_disks(b"DBMD").is_err());
    }

    #[test]
    fn identities_are_cleaned_for_the_wire() {
        assert_eq!(clean_id("  ABC123 \n"), "ABC123");
        assert_eq!(clean_id("a\u{1}b"), "");
        assert_eq!(clean_id(&"x".repeat(65)), "");
        assert_eq!(wwn_digits("naa.5000C500A1B2C3D4"), "5000c500a1b2c3d4");
        assert_eq!(wwn_digits("0x5000c500a1b2c3d4"), "5000c500a1b2c3d4");
    }

    #[test]
    fn guest_disks_are_matched_by_serial_or_wwn_not_by_position() {
        let vmm = [
            d(64 << 20, "scratch", ""),
            d(8 << 30, "dbm-data", ""),
            d(1 << 30, "", "0x5000c500a1b2c3d4"),
        ];
        let guest = [
            d(8 << 30, "dbm-data", ""),
            d(1 << 30, "", "naa.5000c500a1b2c3d4"),
            d(0, "unknown", ""),
        ];
        assert_eq!(match_disks(&guest, &vmm), vec![Some(1), Some(2), None]);
        // A virtio-blk guest sees 20 bytes of a longer serial.
        let vmm = [d(0, "0123456789abcdefghij-long", "")];
        assert_eq!(
            match_disks(&[d(0, "0123456789abcdefghij", "")], &vmm),
            [Some(0)]
        );
        // Sizes that differ are two disks.
        assert_eq!(match_disks(&[d(1, "s", "")], &[d(2, "s", "")]), [None]);
        // A disk of the VMM is taken once; two with one name match none.
        assert_eq!(
            match_disks(&[d(0, "s", ""), d(0, "s", "")], &[d(0, "s", "")]),
            [Some(0), None]
        );
        assert_eq!(
            match_disks(&[d(0, "s", "")], &[d(0, "s", ""), d(0, "s", "")]),
            [None]
        );
    }

    #[test]
    fn without_names_the_positions_stand() {
        let vmm = [d(1, "a", ""), d(2, "b", "")];
        assert_eq!(
            match_disks(&[d(1, "", ""), d(2, "", ""), d(3, "", "")], &vmm),
            [Some(0), Some(1), None]
        );
    }
}
