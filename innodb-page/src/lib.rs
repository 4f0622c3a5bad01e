//! InnoDB page headers (FIL header and trailer), parsed from raw frames.
//! Used inside the guest (the agent reads the server's buffer pool) and on
//! the source host (the agent finds frames in guest RAM itself).
//!
//! Offsets (storage/innobase/include/fil0fil.h): page number at 4..8, LSN at
//! 16..24, page type at 24..26, space id at 34..38, all big-endian. The low
//! 32 bits of the LSN are repeated at the end of the page, in the last 4
//! bytes (classic format) or in the 4 bytes before the CRC-32C (MariaDB's
//! `full_crc32` format), which lets a frame that merely looks like a page
//! header be told from a real page.
//!
//! [`scan`] finds such pages in a copy of guest RAM (the source host's view)
//! and turns them into hints through the guest's file layout.

pub mod scan;
pub mod space;

/// What a frame's header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FilHeader {
    /// Tablespace id.
    pub space: u32,
    /// Page number in the tablespace.
    pub page: u32,
    /// LSN of the newest change written into the page.
    pub lsn: u64,
    /// FIL_PAGE_TYPE.
    pub page_type: u16,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The temporary tablespace: never on disk in the form it has in memory.
pub const TEMP_SPACE: u32 = 0xFFFF_FFFE;

/// Bytes of a frame's start that [`parse_parts`] needs (the FIL header).
pub const HEAD_LEN: usize = 38;
/// Bytes of a frame's end that [`parse_parts`] needs.
pub const TAIL_LEN: usize = 8;

/// Parses a frame from its first [`HEAD_LEN`] and last [`TAIL_LEN`] bytes:
/// the header must name a real space with a non-zero LSN, and the trailer
/// must repeat the LSN's low half (classic format: last 4 bytes; MariaDB's
/// `full_crc32`: the 4 before the checksum). Cheap enough for a whole buffer
/// pool; the host's hash check catches what it lets through.
pub fn parse_parts(head: &[u8], tail: &[u8]) -> Option<FilHeader> {
    if head.len() < HEAD_LEN || tail.len() < TAIL_LEN {
        return None;
    }
    let page = be32(head, 4);
    let lsn = u64::from(be32(head, 16)) << 32 | u64::from(be32(head, 20));
    let page_type = u16::from_be_bytes([head[24], head[25]]);
    let space = be32(head, 34);
    let low = be32(head, 20);
    // A zero low half matches any zeroed trailer: too weak to count. Memory
    // filled with one byte (poisoned or freed, seen as 0xcc and 0xff frames
    // in a guest) repeats its "LSN" in its "trailer" too. Space 0xffffffff
    // is InnoDB's undefined id.
    let uniform = head[4..HEAD_LEN].iter().all(|&b| b == head[4]);
    if lsn == 0 || low == 0 || space == TEMP_SPACE || space == u32::MAX || uniform {
        return None;
    }
    let t = tail.len() - TAIL_LEN;
    if be32(tail, t + 4) != low && be32(tail, t) != low {
        return None;
    }
    Some(FilHeader {
        space,
        page,
        lsn,
        page_type,
    })
}

/// Parses a whole frame: [`parse_parts`], and for the `full_crc32` layout
/// also the CRC-32C of the page.
pub fn parse(frame: &[u8]) -> Option<FilHeader> {
    let n = frame.len();
    if n < 1024 || !n.is_power_of_two() {
        return None;
    }
    let h = parse_parts(&frame[..HEAD_LEN], &frame[n - TAIL_LEN..])?;
    let classic = be32(frame, n - 4) == (h.lsn & 0xffff_ffff) as u32;
    if !classic && crc32c::crc32c(&frame[..n - 4]) != be32(frame, n - 4) {
        return None;
    }
    Some(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(space: u32, no: u32, lsn: u64, full_crc32: bool) -> Vec<u8> {
        let mut p = vec![0x11u8; 16384];
        p[4..8].copy_from_slice(&no.to_be_bytes());
        p[16..24].copy_from_slice(&lsn.to_be_bytes());
        p[24..26].copy_from_slice(&17855u16.to_be_bytes()); // FIL_PAGE_INDEX
        p[34..38].copy_from_slice(&space.to_be_bytes());
        let n = p.len();
        #[allow(clippy::cast_possible_truncation)] // the trailer keeps the low 32 bits
        let low = (lsn as u32).to_be_bytes();
        if full_crc32 {
            p[n - 8..n - 4].copy_from_slice(&low);
            let c = crc32c::crc32c(&p[..n - 4]);
            p[n - 4..].copy_from_slice(&c.to_be_bytes());
        } else {
            p[n - 4..].copy_from_slice(&low);
        }
        p
    }

    #[test]
    fn parses_both_trailer_formats() {
        for fc in [false, true] {
            let h = parse(&page(5, 42, 0x1_0000_2345, fc)).unwrap();
            assert_eq!(
                (h.space, h.page, h.lsn, h.page_type),
                (5, 42, 0x1_0000_2345, 17855)
            );
        }
    }

    #[test]
    fn rejects_look_alikes() {
        // Torn or foreign frame: trailer does not repeat the LSN.
        let mut p = page(5, 42, 99, false);
        let n = p.len();
        p[n - 1] ^= 1;
        assert_eq!(parse(&p), None);
        // full_crc32 with a wrong checksum.
        let mut p = page(5, 42, 99, true);
        p[100] ^= 1;
        assert_eq!(parse(&p), None);
        // All zero (a chunk descriptor area would read as space 0, page 0).
        assert_eq!(parse(&[0u8; 16384]), None);
        // Memory filled with one byte.
        assert_eq!(parse(&[0xccu8; 16384]), None);
        let mut p = vec![0x01u8; 16384];
        p[..4].copy_from_slice(&[9, 9, 9, 9]);
        assert_eq!(parse(&p), None);
        // The temporary tablespace.
        assert_eq!(parse(&page(TEMP_SPACE, 1, 7, false)), None);
        // Odd sizes.
        assert_eq!(parse(&[1u8; 100]), None);
    }
}
