//! Where a guest's files lie on its disks: the guest agent's cheap answer.
//!
//! Instead of finding every buffered page itself (slow inside a guest under
//! emulation), the guest agent can send the layout of the files that hold
//! pages: per file an id, the disk, and the extents (file offset -> disk
//! offset). The source host then finds page frames in guest RAM itself and
//! turns (file id, page number) into a disk offset with [`FileLayout::locate`].
//! The engine does not know what a file id means; the host agent does.
//!
//! Wire format (little-endian), answering a request {"DBMR", tag}: a 16-byte
//! header {"DBML", version, reserved, body length, tag}, then the body
//! {page size u32, file count u32, files...}, each file {id u32, disk u16,
//! reserved u16, extent count u32, extents...}, each extent {file offset u64,
//! disk offset u64, length u64}. Everything comes from the guest and is
//! bounded before use.

use thiserror::Error;

use crate::addr::{DiskOffset, GuestAddr};

use super::{HintFormatError, HINTS_HEADER_LEN};

/// Magic of a layout answer: "DBML".
pub const LAYOUT_MAGIC: u32 = u32::from_le_bytes(*b"DBML");
/// Magic of a request for the layout (host to guest, 8 bytes: magic, tag): "DBMR".
pub const LAYOUT_REQUEST_MAGIC: u32 = u32::from_le_bytes(*b"DBMR");
/// Largest layout body the format carries (its length is a `u32`). The
/// host bounds a layout by the guest's RAM ([`max_layout_bytes`]).
pub const MAX_LAYOUT_BYTES: usize = u32::MAX as usize;
/// Bytes a layout may spend on its files and extents (about 700,000
/// extents), whatever the guest's size.
pub const LAYOUT_FILE_BYTES: usize = 16 << 20;
/// Most files one layout may describe.
pub const MAX_FILES: usize = 1 << 16;
const FILE_HEAD: usize = 12;
const EXTENT_LEN: usize = 24;

/// One contiguous piece of a file on a disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Byte offset in the file.
    pub file_offset: u64,
    /// Byte offset on the disk (partition start included).
    pub disk_offset: DiskOffset,
    /// Bytes.
    pub len: u64,
}

/// A file's place on one of the VM's disks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileLayout {
    /// The guest's id for the file (for InnoDB: the tablespace id).
    pub id: u32,
    /// Disk index, as in hints.
    pub disk: u16,
    /// Extents sorted by file offset, not overlapping.
    pub extents: Vec<Extent>,
}

/// The layout answer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LayoutSet {
    /// Size of one page of these files (a power of two, 4 KiB to 64 KiB).
    pub page_size: u32,
    /// The files.
    pub files: Vec<FileLayout>,
    /// Where the cache's page-sized frames sit in guest-physical memory, as
    /// [`frame_entries`] encodes them. Empty: the host scans all of RAM and
    /// finds only frames that are physically contiguous.
    pub frames: Vec<u64>,
}

/// Most layout bytes a guest of `ram_pages` 4 KiB pages may send: the
/// files and extents ([`LAYOUT_FILE_BYTES`]) and the frames, at most one
/// 8-byte entry per page of RAM ([`frame_entries`]: a contiguous frame's
/// first page, or each page of a scattered one). Grows with the VM, never
/// past the format's limit. Pure.
pub fn max_layout_bytes(ram_pages: u64) -> usize {
    let frames = usize::try_from(ram_pages)
        .unwrap_or(usize::MAX)
        .saturating_mul(8);
    LAYOUT_FILE_BYTES
        .saturating_add(frames)
        .min(MAX_LAYOUT_BYTES)
}
/// Low bit of a frame entry: the frame's 4 KiB pages are not contiguous and
/// the addresses of the others follow.
pub const SCATTERED: u64 = 1;

/// Encodes frames given as the guest-physical address of each of their 4 KiB
/// pages: one entry (the first address) for a physically contiguous frame,
/// or the first address with [`SCATTERED`] set followed by the other pages'
/// addresses. Pure.
pub fn frame_entries(frames: &[Vec<u64>]) -> Vec<u64> {
    let mut out = Vec::with_capacity(frames.len());
    for f in frames {
        let Some(&first) = f.first() else { continue };
        let contiguous = f
            .iter()
            .enumerate()
            .all(|(i, &a)| a == first + i as u64 * 4096);
        if contiguous {
            out.push(first);
        } else {
            out.push(first | SCATTERED);
            out.extend_from_slice(&f[1..]);
        }
    }
    out
}

/// Decodes [`frame_entries`] for frames of `sub` 4 KiB pages into the
/// address of each page, frame after frame; None if the list is malformed
/// (misaligned, cut short, or a frame running past 2^64).
pub fn frame_pages(entries: &[u64], sub: usize) -> Option<Vec<Vec<GuestAddr>>> {
    let mut out = Vec::new();
    walk_frames(entries, sub, |f| {
        out.push(f.iter().map(|&a| GuestAddr(a)).collect());
    })?;
    Some(out)
}

/// Checks [`frame_entries`] without building the page lists.
pub fn frames_valid(entries: &[u64], sub: usize) -> bool {
    walk_frames(entries, sub, |_| {}).is_some()
}

fn walk_frames(entries: &[u64], sub: usize, mut each: impl FnMut(&[u64])) -> Option<()> {
    if sub == 0 {
        return entries.is_empty().then_some(());
    }
    let mut f = Vec::with_capacity(sub);
    let mut i = 0;
    while i < entries.len() {
        let e = entries[i];
        f.clear();
        if e & SCATTERED == 0 {
            if e % 4096 != 0 {
                return None;
            }
            for k in 0..sub as u64 {
                f.push(e.checked_add(k * 4096)?);
            }
            i += 1;
        } else {
            let rest = entries.get(i + 1..i + sub)?;
            let first = e & !SCATTERED;
            if first % 4096 != 0 || rest.iter().any(|a| a % 4096 != 0) {
                return None;
            }
            f.push(first);
            f.extend_from_slice(rest);
            i += sub;
        }
        each(&f);
    }
    Some(())
}

/// Why a layout was refused.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum LayoutError {
    /// The header is wrong.
    #[error(transparent)]
    Header(#[from] HintFormatError),
    /// The body is inconsistent.
    #[error("malformed file layout from the guest: {0}")]
    Body(&'static str),
}

impl FileLayout {
    /// Disk offset of `len` bytes at `file_offset`, if they sit inside one
    /// extent. Pure.
    pub fn locate(&self, file_offset: u64, len: u64) -> Option<DiskOffset> {
        let i = self
            .extents
            .partition_point(|e| e.file_offset <= file_offset)
            .checked_sub(1)?;
        let e = &self.extents[i];
        let end = file_offset.checked_add(len)?;
        (end <= e.file_offset + e.len)
            .then(|| DiskOffset(e.disk_offset.0 + (file_offset - e.file_offset)))
    }
}

/// A request for the layout.
pub fn encode_layout_request(tag: u32) -> [u8; 8] {
    super::request(LAYOUT_REQUEST_MAGIC, tag)
}

/// Encodes a layout answer to the request tagged `tag`.
pub fn encode_layout(set: &LayoutSet, tag: u32) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&set.page_size.to_le_bytes());
    body.extend_from_slice(
        &u32::try_from(set.files.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    for f in &set.files {
        body.extend_from_slice(&f.id.to_le_bytes());
        body.extend_from_slice(&f.disk.to_le_bytes());
        body.extend_from_slice(&0u16.to_le_bytes());
        body.extend_from_slice(
            &u32::try_from(f.extents.len())
                .unwrap_or(u32::MAX)
                .to_le_bytes(),
        );
        for e in &f.extents {
            body.extend_from_slice(&e.file_offset.to_le_bytes());
            body.extend_from_slice(&e.disk_offset.0.to_le_bytes());
            body.extend_from_slice(&e.len.to_le_bytes());
        }
    }
    body.extend_from_slice(
        &u32::try_from(set.frames.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    for e in &set.frames {
        body.extend_from_slice(&e.to_le_bytes());
    }
    if let Some(refusal) = super::too_large(body.len(), tag) {
        return refusal;
    }
    let mut out = super::answer_header(LAYOUT_MAGIC, body.len(), tag, body.len());
    out.extend_from_slice(&body);
    out
}

/// Checks a layout answer's 16-byte header; returns (body bytes that follow, tag).
pub fn layout_header(b: &[u8]) -> Result<(usize, u32), HintFormatError> {
    super::checked_header(b, LAYOUT_MAGIC, MAX_LAYOUT_BYTES)
}

/// Decodes a layout answer (header and body) from an untrusted guest.
pub fn decode_layout(b: &[u8]) -> Result<LayoutSet, LayoutError> {
    let (body_len, _tag) = layout_header(b)?;
    let body = &b[HINTS_HEADER_LEN..];
    if body.len() != body_len {
        return Err(LayoutError::Body("body length differs from the header's"));
    }
    let mut r = Reader(body);
    let page_size = r.u32()?;
    if !page_size.is_power_of_two() || !(4096..=65536).contains(&page_size) {
        return Err(LayoutError::Body(
            "page size is not a power of two from 4 KiB to 64 KiB",
        ));
    }
    let nfiles = r.u32()? as usize;
    if nfiles > MAX_FILES || nfiles * FILE_HEAD > r.0.len() {
        return Err(LayoutError::Body("more files than the body can hold"));
    }
    let mut files = Vec::with_capacity(nfiles);
    for _ in 0..nfiles {
        let id = r.u32()?;
        let disk = r.u16()?;
        r.u16()?;
        let n = r.u32()? as usize;
        if n.checked_mul(EXTENT_LEN)
            .is_none_or(|need| need > r.0.len())
        {
            return Err(LayoutError::Body("more extents than the body can hold"));
        }
        let mut extents = Vec::with_capacity(n);
        for _ in 0..n {
            let e = Extent {
                file_offset: r.u64()?,
                disk_offset: DiskOffset(r.u64()?),
                len: r.u64()?,
            };
            let aligned = (e.file_offset | e.disk_offset.0 | e.len) % 4096 == 0;
            if !aligned || e.len == 0 {
                return Err(LayoutError::Body("an extent is empty or not 4 KiB aligned"));
            }
            if e.file_offset.checked_add(e.len).is_none()
                || e.disk_offset.checked_add(e.len).is_none()
            {
                return Err(LayoutError::Body("an extent ends beyond 2^64"));
            }
            extents.push(e);
        }
        extents.sort_unstable_by_key(|e| e.file_offset);
        if extents
            .windows(2)
            .any(|w| w[0].file_offset + w[0].len > w[1].file_offset)
        {
            return Err(LayoutError::Body("extents of one file overlap"));
        }
        files.push(FileLayout { id, disk, extents });
    }
    let nframes = r.u32()? as usize;
    if nframes.checked_mul(8) != Some(r.0.len()) {
        return Err(LayoutError::Body(
            "frame entries do not fill the rest of the body",
        ));
    }
    let mut frames = Vec::with_capacity(nframes);
    for _ in 0..nframes {
        frames.push(r.u64()?);
    }
    if !frames_valid(&frames, (page_size / 4096) as usize) {
        return Err(LayoutError::Body(
            "a frame entry is misaligned or cut short",
        ));
    }
    Ok(LayoutSet {
        page_size,
        files,
        frames,
    })
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], LayoutError> {
        let (head, rest) = self
            .0
            .split_first_chunk::<N>()
            .ok_or(LayoutError::Body("truncated"))?;
        self.0 = rest;
        Ok(*head)
    }
    fn u16(&mut self) -> Result<u16, LayoutError> {
        self.take().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Result<u32, LayoutError> {
        self.take().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Result<u64, LayoutError> {
        self.take().map(u64::from_le_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> LayoutSet {
        LayoutSet {
            page_size: 16384,
            files: vec![
                FileLayout {
                    id: 5,
                    disk: 0,
                    extents: vec![
                        Extent {
                            file_offset: 0,
                            disk_offset: DiskOffset(1 << 20),
                            len: 65536,
                        },
                        Extent {
                            file_offset: 65536,
                            disk_offset: DiskOffset(8 << 20),
                            len: 16384,
                        },
                    ],
                },
                FileLayout {
                    id: 0,
                    disk: 1,
                    extents: vec![],
                },
            ],
            frames: frame_entries(&[
                vec![0x10000, 0x11000, 0x12000, 0x13000],
                vec![0x40000, 0x9000, 0x41000, 0x42000],
            ]),
        }
    }

    #[test]
    fn round_trips_and_locates() {
        let s = sample();
        let b = encode_layout(&s, 3);
        assert_eq!(layout_header(&b).unwrap().1, 3);
        assert_eq!(decode_layout(&b).unwrap(), s);
        let f = &s.files[0];
        assert_eq!(f.locate(4096, 4096), Some(DiskOffset((1 << 20) + 4096)));
        assert_eq!(
            f.locate(65536 + 8192, 4096),
            Some(DiskOffset((8 << 20) + 8192))
        );
        assert_eq!(f.locate(61440, 8192), None, "straddles two extents");
        assert_eq!(f.locate(81920, 4096), None, "beyond the file");
        assert_eq!(f.locate(u64::MAX - 10, 4096), None);
        assert_eq!(s.files[1].locate(0, 4096), None);
    }

    #[test]
    fn frames_compress_when_contiguous() {
        let f = vec![
            vec![0x10000, 0x11000, 0x12000, 0x13000],
            vec![0x40000, 0x9000, 0x41000, 0x42000],
        ];
        let e = frame_entries(&f);
        assert_eq!(e.len(), 1 + 4);
        let addrs: Vec<Vec<GuestAddr>> = f
            .iter()
            .map(|p| p.iter().map(|&a| GuestAddr(a)).collect())
            .collect();
        assert_eq!(frame_pages(&e, 4).unwrap(), addrs);
        assert_eq!(frame_pages(&e[..3], 4), None, "cut short");
        assert_eq!(frame_pages(&[0x10001 & !1 | 0x800], 4), None, "misaligned");
        // A frame whose pages would run past 2^64 is refused, not wrapped.
        assert_eq!(frame_pages(&[!0xfff_u64], 4), None, "past 2^64");
        assert!(!frames_valid(&[!0xfff_u64], 4));
        assert!(frames_valid(&e, 4));
    }

    #[test]
    fn the_layout_bound_grows_with_the_guest() {
        // 2 GiB: the files' share and an entry per page.
        assert_eq!(max_layout_bytes(1 << 19), (16 << 20) + (4 << 20));
        // 1 TiB: far past the old fixed 16 MiB.
        assert_eq!(max_layout_bytes(1 << 28), (16 << 20) + (2 << 30));
        // 4 TiB: at the format's limit.
        assert_eq!(max_layout_bytes(1 << 30), MAX_LAYOUT_BYTES);
        assert_eq!(max_layout_bytes(u64::MAX), MAX_LAYOUT_BYTES);
    }

    #[test]
    fn refuses_hostile_layouts() {
        let b = encode_layout(&sample(), 1);
        for cut in [0, 10, 16, 20, b.len() - 1] {
            assert!(decode_layout(&b[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = b.clone();
        bad[16..20].copy_from_slice(&5000u32.to_le_bytes()); // page size
        assert!(decode_layout(&bad).is_err());
        let mut bad = b.clone();
        bad[20..24].copy_from_slice(&u32::MAX.to_le_bytes()); // file count
        assert!(decode_layout(&bad).is_err());
        let mut bad = b.clone();
        bad[32..36].copy_from_slice(&u32::MAX.to_le_bytes()); // extent count
        assert!(decode_layout(&bad).is_err());
        let mut bad = b.clone();
        bad[36..44].copy_from_slice(&100u64.to_le_bytes()); // misaligned offset
        assert!(decode_layout(&bad).is_err());
        let mut s = sample();
        s.files[0].extents[1].file_offset = 4096; // overlaps the first
        assert!(decode_layout(&encode_layout(&s, 1)).is_err());
        let mut s = sample();
        s.frames.pop(); // a scattered frame cut short
        assert!(decode_layout(&encode_layout(&s, 1)).is_err());
        let mut bad = b;
        bad[8..12].copy_from_slice(&u32::MAX.to_le_bytes()); // body length
        assert!(decode_layout(&bad).is_err());
        assert_eq!(
            crate::protocol::guest::parse_guest_request(&encode_layout_request(4)),
            Some(crate::protocol::guest::GuestRequest::Layout(4))
        );
    }
}
