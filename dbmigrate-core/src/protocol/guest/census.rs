//! The guest's census of its memory: what each guest-physical page held at
//! one moment (free, file cache, anonymous memory of the database server or
//! of other processes, kernel), as the guest agent reads it from
//! `/proc/kpageflags` and the server's pagemap. It explains a migration's
//! raw pages in the report; nothing else follows from it, so a guest that
//! lies about it misleads only its own report.
//!
//! Wire format (little-endian), answering a request {"DBMK", tag}: a 16-byte
//! header {"DBMC", version, reserved, run count, tag}, then runs of 16 bytes
//! {guest-physical address u64, pages u32, kind u8, 3 reserved}, in address
//! order and not overlapping. Everything comes from the guest and is
//! bounded before use.

use thiserror::Error;

use crate::addr::GuestAddr;

use super::{HintFormatError, HINTS_HEADER_LEN};

/// Magic of a census answer: "DBMC".
pub const CENSUS_MAGIC: u32 = u32::from_le_bytes(*b"DBMC");
/// Magic of a request for a census (host to guest, 8 bytes: magic, tag): "DBMK".
pub const CENSUS_REQUEST_MAGIC: u32 = u32::from_le_bytes(*b"DBMK");
/// Bytes per encoded [`CensusRun`].
pub const CENSUS_RUN_LEN: usize = 16;
/// Most runs one census may carry: the format's own limit (a `u32`
/// count). The host bounds a census by the guest's RAM (a run holds one
/// page at least), so the limit grows with the VM.
pub const MAX_CENSUS_RUNS: usize = u32::MAX as usize;

/// What a guest page was used for when the census was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum PageKind {
    /// Free in the kernel's buddy allocator.
    Free = 0,
    /// Page cache of a file, clean (the same bytes are on disk).
    FileClean = 1,
    /// Page cache of a file, dirty or under writeback.
    FileDirty = 2,
    /// Shared memory and tmpfs (swap-backed, not anonymous).
    Shmem = 3,
    /// The database server's large anonymous mappings: its buffer pool.
    BufferPool = 4,
    /// The database server's other anonymous memory.
    ServerAnon = 5,
    /// Anonymous memory of every other process.
    Anon = 6,
    /// Kernel slab caches.
    Slab = 7,
    /// Page tables.
    PageTable = 8,
    /// Reserved by firmware or the kernel image.
    Reserved = 9,
    /// Any other kernel allocation (no flag says more).
    Kernel = 10,
}

impl PageKind {
    /// Every kind, in wire order.
    pub const ALL: [PageKind; 11] = [
        PageKind::Free,
        PageKind::FileClean,
        PageKind::FileDirty,
        PageKind::Shmem,
        PageKind::BufferPool,
        PageKind::ServerAnon,
        PageKind::Anon,
        PageKind::Slab,
        PageKind::PageTable,
        PageKind::Reserved,
        PageKind::Kernel,
    ];

    /// The kind's name in reports.
    pub fn name(self) -> &'static str {
        match self {
            PageKind::Free => "free",
            PageKind::FileClean => "file cache, clean",
            PageKind::FileDirty => "file cache, dirty",
            PageKind::Shmem => "shared memory, tmpfs",
            PageKind::BufferPool => "database server: buffer pool",
            PageKind::ServerAnon => "database server: other anonymous",
            PageKind::Anon => "other processes: anonymous",
            PageKind::Slab => "kernel: slab",
            PageKind::PageTable => "kernel: page tables",
            PageKind::Reserved => "kernel: reserved",
            PageKind::Kernel => "kernel: other",
        }
    }

    /// The kind of a wire byte; None if unknown.
    pub fn from_u8(b: u8) -> Option<Self> {
        Self::ALL.get(usize::from(b)).copied()
    }
}

/// Consecutive guest pages of one kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CensusRun {
    /// Guest-physical address of the first page (4 KiB aligned).
    pub start: GuestAddr,
    /// Pages in the run (at least one).
    pub pages: u32,
    /// What they hold.
    pub kind: PageKind,
}

/// Why a census was refused.
#[derive(Debug, Error)]
pub enum CensusError {
    /// The header is wrong.
    #[error(transparent)]
    Header(#[from] HintFormatError),
    /// The body is inconsistent.
    #[error("malformed memory census from the guest: {0}")]
    Body(&'static str),
}

/// A request for a census.
pub fn encode_census_request(tag: u32) -> [u8; 8] {
    super::request(CENSUS_REQUEST_MAGIC, tag)
}

/// Encodes a census answer to the request tagged `tag`.
pub fn encode_census(runs: &[CensusRun], tag: u32) -> Vec<u8> {
    if let Some(refusal) = super::too_large(runs.len(), tag) {
        return refusal;
    }
    let mut out = super::answer_header(CENSUS_MAGIC, runs.len(), tag, runs.len() * CENSUS_RUN_LEN);
    for r in runs {
        out.extend_from_slice(&r.start.0.to_le_bytes());
        out.extend_from_slice(&r.pages.to_le_bytes());
        out.extend_from_slice(&[r.kind as u8, 0, 0, 0]);
    }
    out
}

/// Checks a census answer's 16-byte header; returns (body bytes that
/// follow, tag).
pub fn census_header(b: &[u8]) -> Result<(usize, u32), HintFormatError> {
    super::records_header(b, CENSUS_MAGIC, MAX_CENSUS_RUNS, CENSUS_RUN_LEN)
}

/// Decodes a census (header and body) from an untrusted guest: every run
/// page-aligned, non-empty, of a known kind, in address order and not
/// overlapping the one before.
pub fn decode_census(b: &[u8]) -> Result<Vec<CensusRun>, CensusError> {
    let (body, _tag) = census_header(b)?;
    if b.len() - HINTS_HEADER_LEN != body {
        return Err(CensusError::Body("body length differs from the header's"));
    }
    let mut runs = Vec::with_capacity(body / CENSUS_RUN_LEN);
    let mut next = 0u64;
    for r in b[HINTS_HEADER_LEN..].chunks_exact(CENSUS_RUN_LEN) {
        let start = u64::from_le_bytes(r[0..8].try_into().expect("8 bytes"));
        let pages = u32::from_le_bytes(r[8..12].try_into().expect("4 bytes"));
        let kind = PageKind::from_u8(r[12]).ok_or(CensusError::Body("unknown page kind"))?;
        if start % 4096 != 0 {
            return Err(CensusError::Body("a run does not start on a page"));
        }
        if pages == 0 {
            return Err(CensusError::Body("an empty run"));
        }
        if start < next {
            return Err(CensusError::Body("runs out of order or overlapping"));
        }
        next = u64::from(pages)
            .checked_mul(4096)
            .and_then(|len| start.checked_add(len))
            .ok_or(CensusError::Body("a run ends beyond the address space"))?;
        runs.push(CensusRun {
            start: GuestAddr(start),
            pages,
            kind,
        });
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::guest::{
        parse_answer_header, parse_guest_request, GuestRequest, HintAnswer,
    };

    fn sample() -> Vec<CensusRun> {
        vec![
            CensusRun {
                start: GuestAddr(0),
                pages: 16,
                kind: PageKind::Reserved,
            },
            CensusRun {
                start: GuestAddr(0x10000),
                pages: 3,
                kind: PageKind::BufferPool,
            },
            CensusRun {
                start: GuestAddr(0x7fff_f000),
                pages: 1,
                kind: PageKind::Kernel,
            },
        ]
    }

    #[test]
    fn a_census_round_trips_and_its_request_and_header_are_known() {
        let b = encode_census(&sample(), 4);
        assert_eq!(decode_census(&b).unwrap(), sample());
        assert_eq!(
            parse_answer_header(&b).unwrap(),
            HintAnswer::Census { body: 48, tag: 4 }
        );
        assert_eq!(
            parse_guest_request(&encode_census_request(9)),
            Some(GuestRequest::Census(9))
        );
        for k in PageKind::ALL {
            assert_eq!(PageKind::from_u8(k as u8), Some(k));
        }
        assert_eq!(PageKind::from_u8(11), None);
    }

    #[test]
    fn a_bad_census_is_refused_with_its_reason() {
        let body_err = |runs: &[CensusRun], patch: &dyn Fn(&mut Vec<u8>)| {
            let mut b = encode_census(runs, 1);
            patch(&mut b);
            match decode_census(&b) {
                Err(CensusError::Body(why)) => why,
                other => panic!("expected a body error, got {other:?}"),
            }
        };
        let s = sample();
        assert_eq!(body_err(&s, &|b| b[16 + 12] = 200), "unknown page kind");
        assert_eq!(
            body_err(&s, &|b| b[16] = 1),
            "a run does not start on a page"
        );
        assert_eq!(
            body_err(&s, &|b| b[16 + 8..16 + 12]
                .copy_from_slice(&0u32.to_le_bytes())),
            "an empty run"
        );
        assert_eq!(
            body_err(&s, &|b| b[16 + 8..16 + 12]
                .copy_from_slice(&17u32.to_le_bytes())),
            "runs out of order or overlapping"
        );
        let far = [CensusRun {
            start: GuestAddr(u64::MAX - 4095),
            pages: 2,
            kind: PageKind::Free,
        }];
        assert_eq!(
            body_err(&far, &|_| ()),
            "a run ends beyond the address space"
        );
        assert_eq!(
            body_err(&s, &|b| {
                b.pop();
            }),
            "body length differs from the header's"
        );
        let mut b = encode_census(&s, 1);
        // A count past what follows: refused before anything is allocated
        // (the host bounds the count itself by the guest's pages first).
        b[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_census(&b),
            Err(CensusError::Body("body length differs from the header's"))
        ));
        b[0] ^= 1;
        assert!(matches!(
            decode_census(&b),
            Err(CensusError::Header(HintFormatError::Magic(_)))
        ));
    }
}
