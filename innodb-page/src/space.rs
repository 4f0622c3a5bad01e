//! A tablespace file's identity from its first pages, without asking the
//! server: the space id, the physical page size, and whether its pages on
//! disk can match the frames in the buffer pool at all.
//!
//! Layout (MySQL 5.7/8.x, Percona and MariaDB alike): page 0 of every
//! tablespace file is its FSP header page: FIL header (page number 0 at
//! 4..8, space id at 34..38), then the FSP header at 38 (space id again at
//! 38..42, `FSP_SPACE_FLAGS` at 54..58). Page 1 starts one physical page
//! later with page number 1 and the same space id, which gives the page
//! size whatever the flags' format.
//!
//! Left out, because a frame in memory never equals the page on disk:
//! - `ROW_FORMAT=COMPRESSED` (flags bits 1..4, `ZIP_SSIZE`, in the classic
//!   format; the physical page is smaller than the server's);
//! - MariaDB page compression (flags bit 16; in MariaDB's `full_crc32`
//!   format, marked by bit 4, the algorithm in bits 5..7);
//! - MySQL's and Percona's tablespace encryption (flags bit 13) and
//!   MariaDB's (crypt data on page 0: the magic `s\x0e\x0cREt` and a scheme
//!   other than 0).

/// Page sizes InnoDB can have, smallest first.
pub const PAGE_SIZES: [usize; 5] = [4096, 8192, 16384, 32768, 65536];
/// Bytes to read from a file's start to tell its page size: page 0 and
/// page 1's FIL header at the largest page size.
pub const PROBE_LEN: usize = 65536 + 38;

const FSP_SPACE_FLAGS: usize = 54;
const CRYPT_MAGIC: [u8; 6] = [b's', 0x0e, 0x0c, b'R', b'E', b't'];

/// What a tablespace file's first pages say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpaceFile {
    /// Tablespace id.
    pub space: u32,
    /// Physical page size (the server's page size, or the compressed size).
    pub page_size: usize,
    /// `FSP_SPACE_FLAGS`.
    pub flags: u32,
    /// Why its pages on disk cannot match its frames, if so.
    pub unusable: Option<Unusable>,
}

/// Why a tablespace's pages are left out of the hints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unusable {
    /// `ROW_FORMAT=COMPRESSED`.
    RowCompressed,
    /// MariaDB page compression.
    PageCompressed,
    /// Encrypted on disk.
    Encrypted,
}

impl std::fmt::Display for Unusable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::RowCompressed => "ROW_FORMAT=COMPRESSED",
            Self::PageCompressed => "page-compressed",
            Self::Encrypted => "encrypted",
        })
    }
}

/// Why the first pages are not a tablespace's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotASpace {
    /// Fewer bytes than two pages of the smallest size.
    TooShort,
    /// Page 0 does not say page 0 with one space id twice.
    NotHeaderPage,
    /// No page size makes page 1 follow page 0.
    NoPageSize,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Reads a tablespace file's identity from its first bytes (up to
/// [`PROBE_LEN`]; fewer for a small file). Pure.
pub fn space_file(first: &[u8]) -> Result<SpaceFile, NotASpace> {
    if first.len() < PAGE_SIZES[0] + 38 {
        return Err(NotASpace::TooShort);
    }
    let space = be32(first, 34);
    if be32(first, 4) != 0 || be32(first, 38) != space || space == u32::MAX {
        return Err(NotASpace::NotHeaderPage);
    }
    // Largest first: a smaller candidate lands inside page 0, whose bytes
    // could look like page 1's header by chance; a larger wrong one lands
    // on page 2 or later, whose number is not 1.
    let page_size = PAGE_SIZES
        .iter()
        .rev()
        .copied()
        .find(|&ps| {
            first.len() >= ps + 38 && be32(first, ps + 4) == 1 && be32(first, ps + 34) == space
        })
        .ok_or(NotASpace::NoPageSize)?;
    let flags = be32(first, FSP_SPACE_FLAGS);
    let page0 = &first[..page_size.min(first.len())];
    Ok(SpaceFile {
        space,
        page_size,
        flags,
        unusable: unusable(flags, page0),
    })
}

/// Why a tablespace with these flags and page 0 cannot match its frames (pure).
fn unusable(flags: u32, page0: &[u8]) -> Option<Unusable> {
    let full_crc32 = flags & (1 << 4) != 0;
    if full_crc32 {
        if (flags >> 5) & 7 != 0 {
            return Some(Unusable::PageCompressed);
        }
    } else {
        if (flags >> 1) & 0xf != 0 {
            return Some(Unusable::RowCompressed);
        }
        if flags & (1 << 16) != 0 {
            return Some(Unusable::PageCompressed);
        }
        if flags & (1 << 13) != 0 {
            return Some(Unusable::Encrypted);
        }
    }
    let crypt = page0
        .windows(CRYPT_MAGIC.len() + 1)
        .find(|w| w[..CRYPT_MAGIC.len()] == CRYPT_MAGIC);
    match crypt {
        Some(w) if w[CRYPT_MAGIC.len()] != 0 => Some(Unusable::Encrypted),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first two pages of a tablespace file (and a bit more).
    fn file(space: u32, page_size: usize, flags: u32) -> Vec<u8> {
        let mut f = vec![0u8; PROBE_LEN.max(2 * page_size)];
        f[34..38].copy_from_slice(&space.to_be_bytes());
        f[38..42].copy_from_slice(&space.to_be_bytes());
        f[54..58].copy_from_slice(&flags.to_be_bytes());
        f[page_size + 4..page_size + 8].copy_from_slice(&1u32.to_be_bytes());
        f[page_size + 34..page_size + 38].copy_from_slice(&space.to_be_bytes());
        f
    }

    #[test]
    fn space_id_and_page_size_from_the_first_pages() {
        for ps in PAGE_SIZES {
            let s = space_file(&file(7, ps, 0x21)).unwrap();
            assert_eq!((s.space, s.page_size, s.unusable), (7, ps, None), "{ps}");
        }
        // The system tablespace is space 0.
        assert_eq!(space_file(&file(0, 16384, 0)).unwrap().space, 0);
        // MariaDB's full_crc32 flags (marker bit 4, page size 16 KiB = 5).
        let s = space_file(&file(9, 16384, 0x15)).unwrap();
        assert_eq!(s.unusable, None);
    }

    #[test]
    fn what_never_matches_its_frames_is_named() {
        // KEY_BLOCK_SIZE=8 on a 16 KiB server: ZIP_SSIZE 4, 8 KiB pages.
        let s = space_file(&file(5, 8192, 0x29 | 4 << 1)).unwrap();
        assert_eq!(
            (s.page_size, s.unusable),
            (8192, Some(Unusable::RowCompressed))
        );
        assert_eq!(
            space_file(&file(5, 16384, 1 << 16)).unwrap().unusable,
            Some(Unusable::PageCompressed)
        );
        assert_eq!(
            space_file(&file(5, 16384, 0x15 | 2 << 5)).unwrap().unusable,
            Some(Unusable::PageCompressed)
        );
        assert_eq!(
            space_file(&file(5, 16384, 1 << 13)).unwrap().unusable,
            Some(Unusable::Encrypted)
        );
        // MariaDB's crypt data on page 0: scheme 1 is encrypted, 0 is not.
        let mut f = file(5, 16384, 0x15);
        f[10390..10396].copy_from_slice(&CRYPT_MAGIC);
        f[10396] = 1;
        assert_eq!(space_file(&f).unwrap().unusable, Some(Unusable::Encrypted));
        f[10396] = 0;
        assert_eq!(space_file(&f).unwrap().unusable, None);
    }

    #[test]
    fn other_files_are_refused() {
        assert_eq!(space_file(&[0u8; 100]), Err(NotASpace::TooShort));
        let mut f = file(7, 16384, 0);
        f[4..8].copy_from_slice(&3u32.to_be_bytes());
        assert_eq!(space_file(&f), Err(NotASpace::NotHeaderPage));
        let mut f = file(7, 16384, 0);
        f[38..42].copy_from_slice(&8u32.to_be_bytes());
        assert_eq!(space_file(&f), Err(NotASpace::NotHeaderPage));
        let mut f = file(7, 16384, 0);
        f[16384 + 4..16384 + 8].copy_from_slice(&2u32.to_be_bytes());
        assert_eq!(space_file(&f), Err(NotASpace::NoPageSize));
        // Page 0's bytes 4 KiB in that happen to read as page 1's header
        // do not make a 16 KiB tablespace a 4 KiB one.
        let mut f = file(7, 16384, 0);
        f[4096 + 4..4096 + 8].copy_from_slice(&1u32.to_be_bytes());
        f[4096 + 34..4096 + 38].copy_from_slice(&7u32.to_be_bytes());
        assert_eq!(space_file(&f).unwrap().page_size, 16384);
        // A file of zeros: space 0 everywhere, but page 1 does not say 1.
        assert_eq!(
            space_file(&vec![0u8; PROBE_LEN]),
            Err(NotASpace::NoPageSize)
        );
    }
}
