//! Each message's payload, encoded and decoded in one place; every length
//! and count from the peer is bounded before it is used.

use super::frame::frame;
use super::guest;
use super::{
    BatchBuilder, Hello, Kind, Message, PageEncoding, PageEntry, ProtocolError, Welcome,
    MAX_BATCH_PAGES, MAX_HELLO_DISKS, MAX_HELLO_RAM_FILES, MAX_NEED, MAX_REPORTED_MISMATCHES,
    MAX_STRING, PROTOCOL_VERSION, REFERENCE_LEN,
};
use crate::PAGE_SIZE;

impl Message {
    /// Message name for errors and logs.
    pub fn name(&self) -> &'static str {
        self.kind().name()
    }

    /// The message's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello(_) => Kind::Hello,
            Message::Welcome(_) => Kind::Welcome,
            Message::Refuse { .. } => Kind::Refuse,
            Message::PageBatch { .. } => Kind::PageBatch,
            Message::EndOfStream => Kind::EndOfStream,
            Message::VerifyRequest { .. } => Kind::VerifyRequest,
            Message::VerifyResult { .. } => Kind::VerifyResult,
            Message::Commit => Kind::Commit,
            Message::Activated => Kind::Activated,
            Message::Abort { .. } => Kind::Abort,
            Message::Drain { .. } => Kind::Drain,
            Message::Drained { .. } => Kind::Drained,
            Message::PrepareSwitch { .. } => Kind::PrepareSwitch,
            Message::PrepareMark => Kind::PrepareMark,
            Message::SwitchPrepared => Kind::SwitchPrepared,
            Message::Switch { .. } => Kind::Switch,
            Message::SwitchMark => Kind::SwitchMark,
            Message::Switched => Kind::Switched,
            Message::PageRequest { .. } => Kind::PageRequest,
            Message::Heartbeat => Kind::Heartbeat,
        }
    }

    /// Serialises header and payload into one buffer.
    pub fn encode(&self) -> Vec<u8> {
        let mut p = Vec::new();
        match self {
            Message::Hello(h) => {
                p.extend_from_slice(&h.version.to_le_bytes());
                p.extend_from_slice(&h.session.to_le_bytes());
                p.extend_from_slice(&h.ram_bytes.to_le_bytes());
                p.extend_from_slice(&h.page_size.to_le_bytes());
                p.extend_from_slice(&h.data_connections.to_le_bytes());
                p.extend_from_slice(&h.conn_index.to_le_bytes());
                let disks = if h.disks.len() <= MAX_HELLO_DISKS {
                    &h.disks[..]
                } else {
                    &h.disks[..0]
                };
                put_len(&mut p, disks.len());
                for d in disks {
                    p.extend_from_slice(&d.bytes.to_le_bytes());
                    put_str(&mut p, &guest::clean_id(&d.serial));
                    put_str(&mut p, &guest::clean_id(&d.wwn));
                }
                let files = &h.ram_files[..h.ram_files.len().min(MAX_HELLO_RAM_FILES)];
                put_len(&mut p, files.len());
                for f in files {
                    p.extend_from_slice(&f.to_le_bytes());
                }
            }
            Message::Welcome(w) => {
                p.extend_from_slice(&w.version.to_le_bytes());
                p.push(u8::from(w.postcopy));
            }
            Message::Refuse { reason } | Message::Abort { reason } => put_str(&mut p, reason),
            Message::PageBatch { round, pages } => return BatchBuilder::encode(*round, pages),
            Message::EndOfStream
            | Message::Commit
            | Message::Activated
            | Message::SwitchMark
            | Message::Switched
            | Message::PrepareMark
            | Message::SwitchPrepared
            | Message::Heartbeat => {}
            Message::Switch { pending: bits } | Message::PrepareSwitch { stale: bits } => {
                put_len(&mut p, bits.len());
                p.extend_from_slice(bits);
            }
            Message::PageRequest { pages } => {
                put_len(&mut p, pages.len());
                for n in pages {
                    p.extend_from_slice(&n.to_le_bytes());
                }
            }
            Message::Drain { round } => p.extend_from_slice(&round.to_le_bytes()),
            Message::Drained { round, need } => {
                p.extend_from_slice(&round.to_le_bytes());
                put_len(&mut p, need.len());
                for n in need {
                    p.extend_from_slice(&n.to_le_bytes());
                }
            }
            Message::VerifyRequest {
                chunk_pages,
                digests,
            } => {
                p.extend_from_slice(&chunk_pages.to_le_bytes());
                put_len(&mut p, digests.len());
                for d in digests {
                    p.extend_from_slice(&d.to_le_bytes());
                }
            }
            Message::VerifyResult {
                mismatched,
                mismatched_total,
            } => {
                p.extend_from_slice(&mismatched_total.to_le_bytes());
                put_len(&mut p, mismatched.len());
                for m in mismatched {
                    p.extend_from_slice(&m.to_le_bytes());
                }
            }
        }
        frame(self.kind(), p)
    }

    /// Parses a payload of `kind`.
    pub fn decode(kind: u16, payload: &[u8]) -> Result<Message, ProtocolError> {
        let kind = Kind::from_wire(kind)?;
        let mut r = Reader {
            buf: payload,
            kind: kind.name(),
        };
        let msg = match kind {
            Kind::Hello => Message::Hello(r.hello()?),
            Kind::Welcome => Message::Welcome(r.welcome()?),
            Kind::Refuse => Message::Refuse {
                reason: r.string()?,
            },
            Kind::Abort => Message::Abort {
                reason: r.string()?,
            },
            Kind::PageBatch => {
                let round = r.u32()?;
                Message::PageBatch {
                    round,
                    pages: r.page_entries()?,
                }
            }
            Kind::EndOfStream => Message::EndOfStream,
            Kind::Drain => Message::Drain { round: r.u32()? },
            Kind::Drained => {
                let round = r.u32()?;
                Message::Drained {
                    round,
                    need: r.page_list()?,
                }
            }
            Kind::Commit => Message::Commit,
            Kind::Activated => Message::Activated,
            Kind::SwitchMark => Message::SwitchMark,
            Kind::Switched => Message::Switched,
            Kind::PrepareMark => Message::PrepareMark,
            Kind::PrepareSwitch => {
                let n = r.len(1)?;
                Message::PrepareSwitch {
                    stale: r.bytes(n)?.to_vec(),
                }
            }
            Kind::SwitchPrepared => Message::SwitchPrepared,
            Kind::Heartbeat => Message::Heartbeat,
            Kind::Switch => {
                let n = r.len(1)?;
                Message::Switch {
                    pending: r.bytes(n)?.to_vec(),
                }
            }
            Kind::PageRequest => Message::PageRequest {
                pages: r.page_list()?,
            },
            Kind::VerifyRequest => {
                let chunk_pages = r.u32()?;
                if chunk_pages == 0 {
                    return Err(r.bad("chunk of 0 pages".into()));
                }
                let n = r.len(16)?;
                let mut digests = Vec::with_capacity(n);
                for _ in 0..n {
                    digests.push(r.u128()?);
                }
                Message::VerifyRequest {
                    chunk_pages,
                    digests,
                }
            }
            Kind::VerifyResult => {
                let mismatched_total = r.u32()?;
                let n = r.len(4)?;
                if n > MAX_REPORTED_MISMATCHES {
                    return Err(r.bad(format!(
                        "{n} mismatches listed, limit {MAX_REPORTED_MISMATCHES}"
                    )));
                }
                let mut mismatched = Vec::with_capacity(n);
                for _ in 0..n {
                    mismatched.push(r.u32()?);
                }
                Message::VerifyResult {
                    mismatched,
                    mismatched_total,
                }
            }
        };
        if !r.buf.is_empty() {
            return Err(r.bad(format!("{} trailing bytes", r.buf.len())));
        }
        Ok(msg)
    }
}

fn put_len(p: &mut Vec<u8>, n: usize) {
    p.extend_from_slice(
        &u32::try_from(n)
            .expect("message lists are small")
            .to_le_bytes(),
    );
}

fn put_str(p: &mut Vec<u8>, s: &str) {
    // Strings are operator-facing text: cut rather than fail on an over-long one.
    let mut end = s.len().min(MAX_STRING);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    put_len(p, end);
    p.extend_from_slice(&s.as_bytes()[..end]);
}

struct Reader<'a> {
    buf: &'a [u8],
    kind: &'static str,
}

impl<'a> Reader<'a> {
    fn bad(&self, problem: String) -> ProtocolError {
        ProtocolError::Malformed {
            kind: self.kind,
            problem,
        }
    }
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.buf.len() < n {
            return Err(self.bad(format!("needs {n} more bytes, {} left", self.buf.len())));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        Ok(self
            .bytes(N)?
            .try_into()
            .expect("length checked by bytes()"))
    }
    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.arr::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, ProtocolError> {
        Ok(u16::from_le_bytes(self.arr()?))
    }
    fn u32(&mut self) -> Result<u32, ProtocolError> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64, ProtocolError> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    fn u128(&mut self) -> Result<u128, ProtocolError> {
        Ok(u128::from_le_bytes(self.arr()?))
    }
    /// A u32 element count, checked against the bytes left for elements of `elem` bytes.
    fn len(&mut self, elem: usize) -> Result<usize, ProtocolError> {
        let n = self.u32()? as usize;
        if n > self.buf.len() / elem {
            return Err(self.bad(format!(
                "{n} elements announced, {} bytes left",
                self.buf.len()
            )));
        }
        Ok(n)
    }
    fn string(&mut self) -> Result<String, ProtocolError> {
        let n = self.u32()? as usize;
        if n > MAX_STRING {
            return Err(self.bad(format!("string of {n} bytes, limit {MAX_STRING}")));
        }
        let b = self.bytes(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.bad("string is not UTF-8".into()))
    }

    fn hello(&mut self) -> Result<Hello, ProtocolError> {
        let h = Hello {
            version: self.u32()?,
            session: self.u64()?,
            ram_bytes: self.u64()?,
            page_size: self.u32()?,
            data_connections: self.u16()?,
            conn_index: self.u16()?,
            disks: Vec::new(),
            ram_files: Vec::new(),
        };
        if h.version != PROTOCOL_VERSION {
            return Err(ProtocolError::Version { peer: h.version });
        }
        // Each disk takes 16 bytes at least (a size and two lengths).
        let n = self.len(16)?;
        if n > MAX_HELLO_DISKS {
            return Err(self.bad(format!("{n} disks, limit {MAX_HELLO_DISKS}")));
        }
        let mut disks = Vec::with_capacity(n);
        for _ in 0..n {
            let bytes = self.u64()?;
            let (serial, wwn) = (self.string()?, self.string()?);
            for s in [&serial, &wwn] {
                if guest::clean_id(s) != *s {
                    return Err(
                        self.bad("a disk's serial or WWN is not a short printable name".into())
                    );
                }
            }
            disks.push(guest::DiskId { bytes, serial, wwn });
        }
        let ram_files = self.ram_files(&h)?;
        Ok(Hello {
            disks,
            ram_files,
            ..h
        })
    }

    /// The Hello's RAM file sizes: at least one, each a non-zero multiple
    /// of its page size, summing to its RAM size.
    fn ram_files(&mut self, h: &Hello) -> Result<Vec<u64>, ProtocolError> {
        let n = self.len(8)?;
        if n == 0 || n > MAX_HELLO_RAM_FILES {
            return Err(self.bad(format!("{n} RAM files, 1 to {MAX_HELLO_RAM_FILES} allowed")));
        }
        let mut files = Vec::with_capacity(n);
        let mut sum = 0u64;
        for _ in 0..n {
            let size = self.u64()?;
            if size == 0 || h.page_size == 0 || size % u64::from(h.page_size) != 0 {
                return Err(self.bad(format!(
                    "a RAM file of {size} bytes is not a whole number of pages"
                )));
            }
            sum = sum
                .checked_add(size)
                .ok_or_else(|| self.bad("the RAM files' sizes overflow".into()))?;
            files.push(size);
        }
        if sum != h.ram_bytes {
            return Err(self.bad(format!(
                "the RAM files hold {sum} bytes, the Hello says {}",
                h.ram_bytes
            )));
        }
        Ok(files)
    }

    fn welcome(&mut self) -> Result<Welcome, ProtocolError> {
        let version = self.u32()?;
        if version != PROTOCOL_VERSION {
            return Err(ProtocolError::Version { peer: version });
        }
        let postcopy = match self.u8()? {
            0 => false,
            1 => true,
            b => return Err(self.bad(format!("post-copy flag {b}"))),
        };
        Ok(Welcome { version, postcopy })
    }

    /// A page batch's entries, count and lengths bounded before allocating.
    fn page_entries(&mut self) -> Result<Vec<PageEntry>, ProtocolError> {
        let count = self.u32()? as usize;
        if count > MAX_BATCH_PAGES {
            return Err(self.bad(format!(
                "{count} pages in one batch, limit {MAX_BATCH_PAGES}"
            )));
        }
        // Each entry takes at least 13 bytes: bound the count before allocating.
        if count > self.buf.len() / 13 {
            return Err(self.bad(format!(
                "{count} pages announced in {} bytes",
                self.buf.len()
            )));
        }
        let mut pages = Vec::with_capacity(count);
        for _ in 0..count {
            let page = self.u64()?;
            let enc = self.u8()?;
            let encoding = PageEncoding::from_u8(enc)
                .ok_or_else(|| self.bad(format!("unknown page encoding {enc}")))?;
            let len = self.u32()? as usize;
            let ok = match encoding {
                PageEncoding::Raw => len == PAGE_SIZE,
                PageEncoding::Zero => len == 0,
                PageEncoding::Zstd => len > 0 && len <= PAGE_SIZE,
                PageEncoding::Reference => len == REFERENCE_LEN,
            };
            if !ok {
                return Err(self.bad(format!(
                    "page {page}: {len} bytes is not valid for {encoding:?}"
                )));
            }
            pages.push(PageEntry {
                page,
                encoding,
                data: self.bytes(len)?.to_vec(),
            });
        }
        Ok(pages)
    }

    /// A list of page numbers (pages asked for), at most [`MAX_NEED`].
    fn page_list(&mut self) -> Result<Vec<u64>, ProtocolError> {
        let n = self.len(8)?;
        if n > MAX_NEED {
            return Err(self.bad(format!("{n} pages asked for, limit {MAX_NEED}")));
        }
        let mut pages = Vec::with_capacity(n);
        for _ in 0..n {
            pages.push(self.u64()?);
        }
        Ok(pages)
    }
}
