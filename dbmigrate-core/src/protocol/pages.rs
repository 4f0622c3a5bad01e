//! Pages on the wire: how one travels ([`PageEncoding`], chosen by
//! [`PageEncoder`]), batches of them ([`BatchBuilder`]), references to
//! shared storage, page bitmaps, and the check that a message names only
//! pages of the RAM.

use super::frame::write_header;
use super::{Kind, PageEntry, ProtocolError, HEADER_LEN, MAX_BATCH_PAGES, PAGES_PER_STRIPE};
use crate::addr::DiskOffset;
use crate::bitmap::PageBitmap;
use crate::rebuild::Hint;
use crate::PAGE_SIZE;

/// How a page travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum PageEncoding {
    /// 4096 bytes as they are.
    Raw = 0,
    /// All zero; no bytes follow.
    Zero = 1,
    /// zstd frame that decompresses to exactly 4096 bytes.
    Zstd = 2,
    /// A reference to shared storage: see [`encode_reference`].
    Reference = 3,
}

/// Bytes of a [`PageEncoding::Reference`] entry: disk u16, offset u64, xxh3-128 u128.
pub const REFERENCE_LEN: usize = 26;

/// Checks that every page a `kind` message names is one of the RAM's `pages`.
pub fn check_pages(
    kind: &'static str,
    named: impl IntoIterator<Item = u64>,
    pages: u64,
) -> Result<(), ProtocolError> {
    match named.into_iter().find(|&p| p >= pages) {
        Some(page) => Err(ProtocolError::PageBeyondRam { kind, page, pages }),
        None => Ok(()),
    }
}

/// Pages as a wire bitmap (the switch's stale and pending pages): bit i
/// of byte i/8 is page i.
pub fn encode_page_bitmap(b: &PageBitmap) -> Vec<u8> {
    let mut out = vec![0u8; usize::try_from(b.len().div_ceil(8)).expect("bitmap fits")];
    for p in b.iter() {
        out[usize::try_from(p / 8).expect("inside")] |= 1 << (p % 8);
    }
    out
}

/// The wire bitmap of a `kind` message, checked against a RAM of `pages`.
pub fn decode_page_bitmap(
    bytes: &[u8],
    pages: u64,
    kind: &'static str,
) -> Result<PageBitmap, ProtocolError> {
    let malformed = |problem: String| ProtocolError::Malformed { kind, problem };
    if bytes.len() as u64 != pages.div_ceil(8) {
        return Err(malformed(format!(
            "page bitmap of {} bytes for {pages} pages",
            bytes.len()
        )));
    }
    let mut bits = PageBitmap::new(pages);
    for (i, &b) in bytes.iter().enumerate() {
        for bit in 0..8u64 {
            if b & (1 << bit) != 0 {
                let p = i as u64 * 8 + bit;
                check_pages(kind, [p], pages)?;
                bits.set(p);
            }
        }
    }
    Ok(bits)
}

/// Encodes a reference entry's data.
pub fn encode_reference(hint: Hint, hash: u128) -> [u8; REFERENCE_LEN] {
    let mut b = [0u8; REFERENCE_LEN];
    b[0..2].copy_from_slice(&hint.disk.to_le_bytes());
    b[2..10].copy_from_slice(&hint.offset.0.to_le_bytes());
    b[10..26].copy_from_slice(&hash.to_le_bytes());
    b
}

/// Decodes a reference entry's data (length checked by the frame decoder).
pub fn decode_reference(data: &[u8]) -> Option<(Hint, u128)> {
    let b: &[u8; REFERENCE_LEN] = data.try_into().ok()?;
    let disk = u16::from_le_bytes([b[0], b[1]]);
    let offset = u64::from_le_bytes(b[2..10].try_into().ok()?);
    let hash = u128::from_le_bytes(b[10..26].try_into().ok()?);
    Some((
        Hint {
            disk,
            offset: DiskOffset(offset),
        },
        hash,
    ))
}

impl PageEncoding {
    pub(super) fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Raw),
            1 => Some(Self::Zero),
            2 => Some(Self::Zstd),
            3 => Some(Self::Reference),
            _ => None,
        }
    }
}

/// Data connection (1-based) that carries `page` when `conns` data connections exist.
pub fn connection_for_page(page: u64, conns: u16) -> u16 {
    let conns = u64::from(conns.max(1));
    let idx = (page / PAGES_PER_STRIPE) % conns;
    u16::try_from(idx).expect("index below a u16 count") + 1
}

/// Chooses how a page travels: zero pages as [`PageEncoding::Zero`], pages
/// that zstd shrinks by an eighth or more compressed (when compression is
/// on), the rest raw; and adds it to a batch.
pub struct PageEncoder {
    zstd: Option<zstd::bulk::Compressor<'static>>,
    buf: Vec<u8>,
    backoff: Backoff,
}

/// When to leave compression alone for a while: after [`Backoff::MISSES`]
/// pages in a row that zstd did not shrink (an incompressible guest, e.g.
/// encrypted or random data), the next [`Backoff::SKIP`] pages go raw
/// untried, then zstd is tried again. Pure.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
struct Backoff {
    misses: u32,
    skip: u32,
}

impl Backoff {
    const MISSES: u32 = 32;
    const SKIP: u32 = 1024;

    /// Whether to try compressing the next page.
    fn try_next(&mut self) -> bool {
        if self.skip > 0 {
            self.skip -= 1;
            return false;
        }
        true
    }

    /// What trying gave.
    fn tried(&mut self, shrank: bool) {
        if shrank {
            self.misses = 0;
            return;
        }
        self.misses += 1;
        if self.misses >= Self::MISSES {
            self.misses = 0;
            self.skip = Self::SKIP;
        }
    }
}

impl PageEncoder {
    /// An encoder that compresses if `compress` (and zstd starts).
    pub fn new(compress: bool) -> Self {
        Self {
            zstd: compress
                .then(|| zstd::bulk::Compressor::new(1).ok())
                .flatten(),
            buf: vec![0u8; PAGE_SIZE],
            backoff: Backoff::default(),
        }
    }

    /// Adds `page` holding `data` to `batch`; returns how it went.
    pub fn push(&mut self, batch: &mut BatchBuilder, page: u64, data: &[u8]) -> PageEncoding {
        if crate::ram::is_zero(data) {
            batch.push(page, PageEncoding::Zero, &[]);
            return PageEncoding::Zero;
        }
        self.push_data(batch, page, data)
    }

    /// [`PageEncoder::push`] for a page known not to be zero.
    pub fn push_data(&mut self, batch: &mut BatchBuilder, page: u64, data: &[u8]) -> PageEncoding {
        let buf = &mut self.buf;
        let backoff = &mut self.backoff;
        let packed = self
            .zstd
            .as_mut()
            .filter(|_| backoff.try_next())
            .and_then(|z| {
                let n = z
                    .compress_to_buffer(data, &mut buf[..])
                    .ok()
                    .filter(|&n| n <= PAGE_SIZE * 7 / 8);
                backoff.tried(n.is_some());
                n
            });
        match packed {
            Some(n) => {
                batch.push(page, PageEncoding::Zstd, &buf[..n]);
                PageEncoding::Zstd
            }
            None => {
                batch.push(page, PageEncoding::Raw, data);
                PageEncoding::Raw
            }
        }
    }
}

/// Builds a [`Message::PageBatch`] frame directly, without intermediate copies.
pub struct BatchBuilder {
    buf: Vec<u8>,
    count: u32,
    /// Pages that are not zero pages.
    costly: u32,
}

impl BatchBuilder {
    /// Starts a batch for `round`.
    pub fn new(round: u32) -> Self {
        let mut buf = Vec::with_capacity(HEADER_LEN + 8 + 64 * (PAGE_SIZE + 13));
        buf.resize(HEADER_LEN, 0);
        buf.extend_from_slice(&round.to_le_bytes());
        buf.extend_from_slice(&0u32.to_le_bytes());
        Self {
            buf,
            count: 0,
            costly: 0,
        }
    }

    /// The whole frame of a batch of already decoded `pages`.
    pub fn encode(round: u32, pages: &[PageEntry]) -> Vec<u8> {
        Self::of(round, pages).finish()
    }

    /// A batch of already decoded `pages`.
    pub fn of(round: u32, pages: &[PageEntry]) -> Self {
        let mut b = Self::new(round);
        for e in pages {
            b.push(e.page, e.encoding, &e.data);
        }
        b
    }

    /// Appends a page.
    pub fn push(&mut self, page: u64, encoding: PageEncoding, data: &[u8]) {
        self.buf.extend_from_slice(&page.to_le_bytes());
        self.buf.push(encoding as u8);
        let len = u32::try_from(data.len()).expect("page data is at most a page");
        self.buf.extend_from_slice(&len.to_le_bytes());
        self.buf.extend_from_slice(data);
        self.count += 1;
        self.costly += u32::from(encoding != PageEncoding::Zero);
    }

    /// Pages in the batch that cost a transfer or a storage read: raw,
    /// compressed or references (a zero page costs neither).
    pub fn costly(&self) -> u32 {
        self.costly
    }

    /// Pages in the batch so far.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Encoded size so far, header included.
    pub fn encoded_len(&self) -> usize {
        self.buf.len()
    }

    /// Whether the batch should go now: it reached `bytes`, or holds
    /// [`MAX_BATCH_PAGES`] pages (the most a peer accepts).
    pub fn is_full(&self, bytes: usize) -> bool {
        self.buf.len() >= bytes || self.count as usize >= MAX_BATCH_PAGES
    }

    /// Finishes the frame.
    pub fn finish(mut self) -> Vec<u8> {
        let payload_len = (self.buf.len() - HEADER_LEN) as u64;
        write_header(&mut self.buf[..HEADER_LEN], Kind::PageBatch, payload_len);
        self.buf[HEADER_LEN + 4..HEADER_LEN + 8].copy_from_slice(&self.count.to_le_bytes());
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compression_rests_after_a_run_of_misses_and_tries_again() {
        let mut b = Backoff::default();
        for _ in 0..Backoff::MISSES - 1 {
            assert!(b.try_next());
            b.tried(false);
        }
        // A page that shrank starts the count again.
        assert!(b.try_next());
        b.tried(true);
        for _ in 0..Backoff::MISSES {
            assert!(b.try_next());
            b.tried(false);
        }
        let skipped = (0..Backoff::SKIP).filter(|_| !b.try_next()).count();
        assert_eq!(skipped, Backoff::SKIP as usize);
        assert!(b.try_next());
    }

    #[test]
    fn an_encoder_compresses_what_shrinks_and_sends_the_rest_raw() {
        let mut e = PageEncoder::new(true);
        let mut batch = BatchBuilder::new(0);
        let text = [b'a'; PAGE_SIZE];
        assert_eq!(e.push(&mut batch, 1, &text), PageEncoding::Zstd);
        assert_eq!(e.push(&mut batch, 2, &[0u8; PAGE_SIZE]), PageEncoding::Zero);
        // Incompressible pages: raw, and after a run of them raw untried.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut noise = [0u8; PAGE_SIZE];
        for _ in 0..Backoff::MISSES + 5 {
            for c in noise.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                c.copy_from_slice(&x.to_le_bytes());
            }
            assert_eq!(e.push(&mut batch, 3, &noise), PageEncoding::Raw);
        }
        assert!(e.backoff.skip > 0);
        assert_eq!(
            PageEncoder::new(false).push(&mut batch, 4, &text),
            PageEncoding::Raw
        );
    }
}
