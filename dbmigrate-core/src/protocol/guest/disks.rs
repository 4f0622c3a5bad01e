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
/// either end, cut to [`MAX_ID_LEN`] bytes (a guest that sees 20 bytes of
/// a longer serial still matches); anything not printable is dropped
/// (empty). Pure.
pub fn clean_id(s: &str) -> String {
    let t = s.trim_matches(|c: char| c.is_whitespace() || c == '\0');
    if !t.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return String::new();
    }
    t[..t.len().min(MAX_ID_LEN)].trim_end().to_string()
}

/// A WWN as the number QEMU's `wwn` property holds: `0x5000c500a1b2c3d4`,
/// `naa.5000c500a1b2c3d4` or bare hex, at most 16 digits. None for any
/// other designator (a 128-bit NAA, `t10.`, `eui.` of another length).
/// Pure.
pub fn wwn_value(s: &str) -> Option<u64> {
    let s = s.trim();
    let hex = s
        .strip_prefix("naa.")
        .or_else(|| s.strip_prefix("0x"))
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    if hex.is_empty() || hex.len() > 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(hex, 16).ok().filter(|&w| w != 0)
}

impl DiskId {
    /// Whether `self` and `other` carry the same serial (or one is the
    /// 20-byte start of the other: what a virtio-blk guest sees of a longer
    /// serial) or the same WWN. Pure.
    pub fn same_name(&self, other: &DiskId) -> bool {
        let (a, b) = (&self.serial, &other.serial);
        let prefix = |short: &str, long: &str| {
            short.len() == VIRTIO_SERIAL_LEN && long.len() > short.len() && long.starts_with(short)
        };
        let serial = !a.is_empty() && !b.is_empty() && (a == b || prefix(a, b) || prefix(b, a));
        let wwn = wwn_value(&self.wwn).is_some_and(|w| Some(w) == wwn_value(&other.wwn));
        serial || wwn
    }

    /// Whether the sizes do not say these are two disks (0: not known).
    fn size_agrees(&self, other: &DiskId) -> bool {
        self.bytes == 0 || other.bytes == 0 || self.bytes == other.bytes
    }
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
/// same name ([`DiskId::same_name`]) and not two different sizes. Pure.
pub fn same_disk(g: &DiskId, v: &DiskId) -> bool {
    g.same_name(v) && g.size_agrees(v)
}

/// For each of the guest's disk indexes, the VMM's index of the same disk
/// (None: no disk of the VMM is that one, or another guest disk took it).
/// Disks are matched by name first (two disks of the VMM with one name
/// match neither); a guest disk left over takes the VMM's disk at its own
/// position if that one has no name, is not taken and its size agrees
/// (an unnamed disk beside named ones; a serial only the guest knows,
/// such as the one Linux makes up for an IDE disk). When no disk on one
/// side has a name (an older guest agent, disks without serials), indexes
/// are positions, as far as the VMM has disks. Pure.
pub fn match_disks(guest: &[DiskId], vmm: &[DiskId]) -> Vec<Option<u16>> {
    let index = |k: usize| u16::try_from(k).ok();
    if !guest.iter().any(DiskId::named) || !vmm.iter().any(DiskId::named) {
        return (0..guest.len())
            .map(|i| index(i).filter(|_| i < vmm.len()))
            .collect();
    }
    let mut taken = vec![false; vmm.len()];
    let mut out: Vec<Option<u16>> = guest
        .iter()
        .map(|g| {
            let hits: Vec<usize> = (0..vmm.len()).filter(|&k| same_disk(g, &vmm[k])).collect();
            let [k] = hits[..] else { return None };
            (!std::mem::replace(&mut taken[k], true))
                .then(|| index(k))
                .flatten()
        })
        .collect();
    for (i, g) in guest.iter().enumerate() {
        let free = vmm
            .get(i)
            .is_some_and(|v| !taken[i] && !v.named() && g.size_agrees(v));
        if out[i].is_none() && free {
            taken[i] = true;
            out[i] = index(i);
        }
    }
    out
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
        assert_eq!(clean_id(&"x".repeat(65)), "x".repeat(64));
        let w = Some(0x5000_c500_a1b2_c3d4);
        assert_eq!(wwn_value("naa.5000C500A1B2C3D4"), w);
        assert_eq!(wwn_value("0x5000c500a1b2c3d4"), w);
        assert_eq!(wwn_value("5000c500a1b2c3d4"), w);
        assert_eq!(wwn_value("0x1234"), Some(0x1234));
        assert_eq!(wwn_value("naa.6001405abcdef0123456789abcdef012"), None);
        assert_eq!(wwn_value("t10.ATA     QEMU HARDDISK"), None);
        assert_eq!(wwn_value("0x0"), None);
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
        // WWNs compare as numbers.
        assert_eq!(
            match_disks(&[d(0, "", "naa.1234")], &[d(0, "", "0x0000000000001234")]),
            [Some(0)]
        );
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
        // Serials only the guest knows (Linux's for an IDE disk QEMU gave
        // none): QEMU names no disk, positions stand.
        let vmm = [d(1, "", ""), d(2, "", "")];
        assert_eq!(
            match_disks(&[d(1, "QM00001", ""), d(2, "QM00002", "")], &vmm),
            [Some(0), Some(1)]
        );
        // An unnamed disk beside a named one keeps its position, if that
        // disk of the VMM has no name and its size agrees.
        let vmm = [d(1, "", ""), d(2, "data", "")];
        assert_eq!(
            match_disks(&[d(1, "", ""), d(2, "data", "")], &vmm),
            [Some(0), Some(1)]
        );
        assert_eq!(
            match_disks(&[d(5, "", ""), d(2, "data", "")], &vmm),
            [None, Some(1)]
        );
        assert_eq!(
            match_disks(
                &[d(2, "", ""), d(0, "y", "")],
                &[d(2, "x", ""), d(1, "", "")]
            ),
            [None, Some(1)]
        );
    }
}
