//! Hints from the guest agent, over the virtio-serial port QEMU exposes as a
//! unix socket (`-chardev socket,path=...,server=on,wait=off -device
//! virtserialport,chardev=...,name=org.dbmigrate.hints`). Everything the
//! guest sends is untrusted: sizes are bounded before anything is read, and
//! each hint is checked again by the engine before it is followed.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use dbmigrate_core::protocol::guest::{
    decode_census, encode_census_request, CensusRun, CENSUS_RUN_LEN,
};
use dbmigrate_core::protocol::guest::{decode_disks, encode_disks_request, match_disks, DiskId};
use dbmigrate_core::protocol::guest::{
    decode_hints, encode_hint_request, encode_page_cache_request, parse_answer_header, GuestHint,
    HintAnswer, HINTS_HEADER_LEN, HINT_RECORD_LEN,
};
use dbmigrate_core::protocol::guest::{
    decode_layout, encode_layout_request, max_layout_bytes, LayoutSet,
};
use dbmigrate_core::ram::SourceRam;
use dbmigrate_core::rebuild::{Hint, HintSource, PageMap};
use thiserror::Error;

use dbmigrate_core::addr::{ram_offset, GpaRange, PageIndex};
use dbmigrate_innodb::scan::ScanStats;

/// Failures of the hint channel.
#[derive(Debug, Error)]
pub enum HintChannelError {
    /// The socket could not be used.
    #[error("guest hint channel {path}: {doing}")]
    Io {
        /// Socket.
        path: PathBuf,
        /// What was being done.
        doing: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The guest answered with garbage.
    #[error("guest hint channel {path}: malformed answer: {problem}")]
    Malformed {
        /// Socket.
        path: PathBuf,
        /// What.
        problem: String,
    },
    /// The guest agent reported an error.
    #[error("guest agent could not collect hints: {0}")]
    Guest(String),
}

/// A connection to the guest agent.
/// A whole answer, header included.
enum Answer {
    Hints(Vec<u8>),
    Layout(Vec<u8>),
    Census(Vec<u8>),
    Disks(Vec<u8>),
}

pub struct HintChannel {
    path: PathBuf,
    stream: UnixStream,
    tag: u32,
    /// Most hints an answer may hold: one per page of the guest's RAM.
    max_hints: usize,
}

/// Bytes an answer's body is read in at a time: memory follows the bytes
/// that arrive, never the length the guest announces.
const READ_CHUNK: usize = 1 << 20;

impl HintChannel {
    /// Connects to QEMU's end of the port, for a guest of `ram_pages` pages.
    pub fn connect(path: &Path, ram_pages: u64) -> Result<Self, HintChannelError> {
        let stream = UnixStream::connect(path).map_err(|source| HintChannelError::Io {
            path: path.into(),
            doing: "connecting (is QEMU started with a virtserialport named org.dbmigrate.hints on this chardev socket?)",
            source,
        })?;
        Ok(Self {
            path: path.into(),
            stream,
            tag: 0,
            max_hints: usize::try_from(ram_pages).unwrap_or(usize::MAX),
        })
    }

    /// Asks for a fresh hint set and waits up to `timeout` for it. Answers to
    /// earlier requests that arrive late are skipped.
    /// Asks for a hint set (the guest finds the pages).
    pub fn fetch(&mut self, timeout: Duration) -> Result<Vec<GuestHint>, HintChannelError> {
        self.tag = self.tag.wrapping_add(1);
        let req = encode_hint_request(self.tag);
        match self.ask(&req, timeout)? {
            Answer::Hints(set) => decode_hints(&set).map_err(|e| self.malformed(e.to_string())),
            _ => Err(self.malformed("another answer where hints were asked for".into())),
        }
    }

    /// Asks for hints for the guest's clean page cache.
    pub fn fetch_page_cache(
        &mut self,
        timeout: Duration,
    ) -> Result<Vec<GuestHint>, HintChannelError> {
        self.tag = self.tag.wrapping_add(1);
        let req = encode_page_cache_request(self.tag);
        match self.ask(&req, timeout)? {
            Answer::Hints(set) => decode_hints(&set).map_err(|e| self.malformed(e.to_string())),
            _ => Err(self.malformed("another answer where page-cache hints were asked for".into())),
        }
    }

    /// A new connection to the same port: after a failed request, the old
    /// one may hold half an answer.
    /// The tags go on from where they were: a late answer to a request of
    /// the old connection is still told apart.
    fn reconnect(&mut self) -> Result<(), HintChannelError> {
        let tag = self.tag;
        *self = Self::connect(&self.path, self.max_hints as u64)?;
        self.tag = tag;
        Ok(())
    }

    /// Asks for a census of the guest's memory.
    pub fn fetch_census(&mut self, timeout: Duration) -> Result<Vec<CensusRun>, HintChannelError> {
        self.tag = self.tag.wrapping_add(1);
        let req = encode_census_request(self.tag);
        match self.ask(&req, timeout)? {
            Answer::Census(b) => decode_census(&b).map_err(|e| self.malformed(e.to_string())),
            _ => Err(self.malformed(
                "another answer where a census was asked for (is the guest agent older than the host agent?)"
                    .into(),
            )),
        }
    }

    /// Asks for the file layout (the host finds the pages).
    pub fn fetch_layout(&mut self, timeout: Duration) -> Result<LayoutSet, HintChannelError> {
        self.tag = self.tag.wrapping_add(1);
        let req = encode_layout_request(self.tag);
        match self.ask(&req, timeout)? {
            Answer::Layout(b) => decode_layout(&b).map_err(|e| self.malformed(e.to_string())),
            _ => Err(self.malformed(
                "another answer where the layout was asked for (is the guest agent older than the host agent?)"
                    .into(),
            )),
        }
    }

    /// Asks for the serial and WWN of each disk the guest's indexes name
    /// (an older guest agent answers with an error).
    pub fn fetch_disks(&mut self, timeout: Duration) -> Result<Vec<DiskId>, HintChannelError> {
        self.tag = self.tag.wrapping_add(1);
        let req = encode_disks_request(self.tag);
        match self.ask(&req, timeout)? {
            Answer::Disks(b) => decode_disks(&b).map_err(|e| self.malformed(e.to_string())),
            _ => Err(self.malformed("another answer where the disks were asked for".into())),
        }
    }

    fn malformed(&self, problem: String) -> HintChannelError {
        HintChannelError::Malformed {
            path: self.path.clone(),
            problem,
        }
    }

    /// Sends `req` and returns the answer carrying the current tag (answers to
    /// earlier requests that arrive late are skipped), header included.
    fn ask(&mut self, req: &[u8; 8], timeout: Duration) -> Result<Answer, HintChannelError> {
        let path = self.path.clone();
        self.stream
            .write_all(req)
            .map_err(|source| HintChannelError::Io {
                path,
                doing: "sending a request",
                source,
            })?;
        let deadline = Instant::now() + timeout;
        loop {
            let mut head = [0u8; HINTS_HEADER_LEN];
            self.read_until(&mut head, deadline)?;
            let answer = parse_answer_header(&head).map_err(|e| self.malformed(e.to_string()))?;
            let (body, tag) = match answer {
                HintAnswer::Error { len, tag } => {
                    let mut msg = vec![0u8; len];
                    self.read_until(&mut msg, deadline)?;
                    if tag == self.tag {
                        return Err(HintChannelError::Guest(
                            String::from_utf8_lossy(&msg).into_owned(),
                        ));
                    }
                    continue;
                }
                HintAnswer::Hints { body, tag } => {
                    (self.per_page(body, HINT_RECORD_LEN, "hints")?, tag)
                }
                HintAnswer::Layout { body, tag } => (self.layout_bytes(body)?, tag),
                // Each run holds at least one page of the guest.
                HintAnswer::Census { body, tag } => {
                    (self.per_page(body, CENSUS_RUN_LEN, "census runs")?, tag)
                }
                // Bounded by the header's check (MAX_DISKS_BODY).
                HintAnswer::Disks { body, tag } => (body, tag),
            };
            let mut set = head.to_vec();
            while set.len() < HINTS_HEADER_LEN + body {
                let start = set.len();
                let n = (HINTS_HEADER_LEN + body - start).min(READ_CHUNK);
                set.resize(start + n, 0);
                self.read_until(&mut set[start..], deadline)?;
            }
            if tag == self.tag {
                return Ok(match answer {
                    HintAnswer::Layout { .. } => Answer::Layout(set),
                    HintAnswer::Census { .. } => Answer::Census(set),
                    HintAnswer::Disks { .. } => Answer::Disks(set),
                    _ => Answer::Hints(set),
                });
            }
        }
    }

    /// `body` bytes of layout, at most what a guest of this size needs
    /// ([`max_layout_bytes`]); else the answer is malformed.
    fn layout_bytes(&self, body: usize) -> Result<usize, HintChannelError> {
        let max = max_layout_bytes(self.max_hints as u64);
        if body > max {
            return Err(self.malformed(format!(
                "a layout of {body} bytes announced for a guest of {} pages (at most {max})",
                self.max_hints
            )));
        }
        Ok(body)
    }

    /// `body` bytes of `record`-byte records, at most one per page of the
    /// guest's RAM; else the answer is malformed.
    fn per_page(&self, body: usize, record: usize, what: &str) -> Result<usize, HintChannelError> {
        let n = body / record;
        if n > self.max_hints {
            return Err(self.malformed(format!(
                "{n} {what} announced for a guest of {} pages",
                self.max_hints
            )));
        }
        Ok(body)
    }

    fn read_until(&mut self, buf: &mut [u8], deadline: Instant) -> Result<(), HintChannelError> {
        let mut done = 0;
        while done < buf.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(HintChannelError::Io {
                    path: self.path.clone(),
                    doing: "waiting for the guest agent's answer (is dbmigrate-guest-agent serve running in the guest?)",
                    source: io::ErrorKind::TimedOut.into(),
                });
            }
            self.stream
                .set_read_timeout(Some(left))
                .map_err(|source| HintChannelError::Io {
                    path: self.path.clone(),
                    doing: "setting a timeout",
                    source,
                })?;
            match self.stream.read(&mut buf[done..]) {
                Ok(0) => {
                    return Err(HintChannelError::Io {
                        path: self.path.clone(),
                        doing: "reading (QEMU closed the channel)",
                        source: io::ErrorKind::UnexpectedEof.into(),
                    })
                }
                Ok(n) => done += n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(source) => {
                    return Err(HintChannelError::Io {
                        path: self.path.clone(),
                        doing: "reading",
                        source,
                    })
                }
            }
        }
        Ok(())
    }
}

/// Turns guest hints into a page → hint table of the RAM file (pure): guest
/// addresses go through the GPA layout QEMU reported, the guest's disk
/// indexes through `disks` (guest index → QEMU's, [`DiskMap`]); hints
/// outside the layout, not page aligned, or on a disk QEMU lacks are
/// dropped and counted.
pub fn to_table(hints: &[GuestHint], layout: &[GpaRange], disks: &DiskMap) -> (PageMap<Hint>, u64) {
    let mut table = PageMap::with_capacity_and_hasher(hints.len(), Default::default());
    let mut dropped = 0;
    for h in hints {
        match (ram_offset(layout, h.gpa), disks.vmm_index(h.disk)) {
            (Some(off), Some(disk)) if off.0 % 4096 == 0 && h.clean => {
                table.insert(
                    off.page(),
                    Hint {
                        disk,
                        offset: h.disk_offset,
                    },
                );
            }
            _ => dropped += 1,
        }
    }
    (table, dropped)
}

/// A census as the guest sent it and how long it took (ms), or why there
/// is none.
pub type CensusTaken = Result<(Vec<CensusRun>, u64), String>;

/// The guest's disk indexes as QEMU's: the guest names each disk it
/// indexes by serial or WWN, matched against QEMU's disks
/// ([`match_disks`]); an older guest agent, or disks without names, keep
/// their positions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiskMap {
    /// QEMU's index of each guest disk index (None: no disk of QEMU).
    pub map: Vec<Option<u16>>,
    /// How many disks QEMU has.
    pub vmm_count: usize,
}

impl DiskMap {
    /// Every guest index as QEMU's, as far as QEMU has disks.
    pub fn positional(vmm_count: usize) -> Self {
        Self {
            map: (0..vmm_count).map(|i| u16::try_from(i).ok()).collect(),
            vmm_count,
        }
    }

    /// Asks the guest for its disks and matches them with `vmm`'s.
    fn ask(ch: &mut HintChannel, vmm: &[DiskId]) -> Result<Self, HintChannelError> {
        match ch.fetch_disks(Duration::from_secs(30)) {
            Ok(guest) => {
                let map = match_disks(&guest, vmm);
                tracing::info!(?guest, ?vmm, ?map, "the guest's disks matched to QEMU's");
                for (i, g) in guest.iter().enumerate() {
                    if map[i].is_none() {
                        tracing::warn!(
                            disk = i,
                            serial = %g.serial,
                            wwn = %g.wwn,
                            "no disk of QEMU has this guest disk's serial or WWN (and size): its pages go raw"
                        );
                    }
                }
                Ok(Self {
                    map,
                    vmm_count: vmm.len(),
                })
            }
            // An older guest agent answers the unknown request at once.
            Err(HintChannelError::Guest(e)) => {
                tracing::warn!("the guest agent names no disks ({e}): its disk indexes are taken as QEMU's order");
                Ok(Self::positional(vmm.len()))
            }
            Err(e) => Err(e),
        }
    }

    /// QEMU's index of guest disk `guest`.
    pub fn vmm_index(&self, guest: u16) -> Option<u16> {
        self.map.get(usize::from(guest)).copied().flatten()
    }

    /// `set` with QEMU's disk indexes; files on no disk of QEMU left out.
    pub fn on_layout(&self, mut set: LayoutSet) -> LayoutSet {
        set.files.retain_mut(|f| match self.vmm_index(f.disk) {
            Some(d) => {
                f.disk = d;
                true
            }
            None => false,
        });
        set
    }
}

/// Counters of the refresher, for the report.
#[derive(Debug, Default)]
pub struct HintCounters {
    /// Hint sets received.
    pub refreshes: AtomicU64,
    /// Hints in the newest set.
    pub last_count: AtomicU64,
    /// Hints dropped on arrival (outside RAM, foreign disk, not clean).
    pub dropped: AtomicU64,
    /// Failed requests.
    pub failures: AtomicU64,
    /// Milliseconds the newest set took to arrive.
    pub last_fetch_ms: AtomicU64,
}

/// The newest hint table, refreshed in the background while pre-copy runs.
#[derive(Debug, Default)]
pub struct LiveHints {
    table: RwLock<PageMap<Hint>>,
    /// Counters.
    pub counters: HintCounters,
    /// What the newest host-side scan found (host mode only).
    pub last_scan: std::sync::Mutex<Option<ScanStats>>,
    /// The guest's file layout and when it came (host mode only).
    layout: std::sync::Mutex<Option<(Instant, Arc<LayoutSet>)>>,
    /// The census taken before the first hints, if one was asked for: its
    /// runs and how long the guest took (ms), or why there is none.
    census: std::sync::Mutex<Option<CensusTaken>>,
    /// Whether to add the guest's page-cache hints to the table.
    page_cache: AtomicBool,
    /// The newest page-cache hints and when they came.
    page_cache_table: std::sync::Mutex<Option<(Instant, Arc<PageMap<Hint>>)>>,
    /// For each of the guest's disk indexes, QEMU's (for the report).
    pub disk_map: Vec<Option<u16>>,
    stop: AtomicBool,
}

/// What the hint channel asks the guest for beside the hints.
#[derive(Clone, Copy, Debug, Default)]
pub struct Asks {
    /// A census of the guest's memory, once before the first hints.
    pub census: bool,
    /// Hints for the guest's clean page cache, with every refresh of the
    /// layout's age ([`LAYOUT_MAX_AGE`]).
    pub page_cache: bool,
}

/// How long a host-mode refresh re-scans guest RAM with the file layout it
/// already has instead of asking the guest again. The layout (where files
/// and buffer-pool frames lie) changes far more slowly than which frames are
/// clean, and every answer costs the guest's vCPU a second under load. A
/// stale layout costs hints, never bytes: each frame found carries its own
/// space and page number, and the destination checks every page's hash.
const LAYOUT_MAX_AGE: Duration = Duration::from_secs(30);

/// Who finds the buffer-pool pages.
pub enum Finder {
    /// The guest agent scans the server's memory and sends hints.
    Guest,
    /// The guest agent sends the file layout; this host scans guest RAM
    /// (`ram`, the RAM file mapped read-only) at native speed.
    Host(SourceRam),
}

impl HintSource for LiveHints {
    fn hint(&self, page: PageIndex) -> Option<Hint> {
        self.table.read().ok()?.get(&page).copied()
    }

    /// The refreshes stop: every later one would cost the guest and this
    /// host for hints no round asks.
    fn no_longer_needed(&self) {
        self.stop();
    }
}

impl LiveHints {
    /// Fetches one set now (so the first round already has hints), then keeps
    /// refreshing every `every` on a thread until [`LiveHints::stop`]. With
    /// `asks.census`, asks the guest for a census of its memory first (a
    /// failed census is logged and kept for the report, and the hints go on).
    pub fn start(
        path: &Path,
        layout: Vec<GpaRange>,
        vmm_disks: &[DiskId],
        every: Duration,
        finder: Finder,
        asks: Asks,
    ) -> Result<Arc<Self>, HintChannelError> {
        let ram_pages = layout.iter().map(|r| r.len / 4096).sum();
        let mut ch = HintChannel::connect(path, ram_pages)?;
        let disks = DiskMap::ask(&mut ch, vmm_disks)?;
        let live = Arc::new(Self {
            disk_map: disks.map.clone(),
            ..Self::default()
        });
        live.page_cache.store(asks.page_cache, Ordering::Relaxed);
        if asks.census {
            let t = Instant::now();
            let got = ch
                .fetch_census(Duration::from_secs(30))
                .map(|runs| (runs, dbmigrate_core::stats::millis(t.elapsed())))
                .map_err(|e| e.to_string());
            if let Err(e) = &got {
                tracing::warn!("the guest's memory census failed (the report has none): {e}");
                ch.reconnect()?;
            }
            if let Ok(mut c) = live.census.lock() {
                *c = Some(got);
            }
        }
        live.refresh(&mut ch, &layout, &disks, &finder, Duration::from_secs(30))?;
        let bg = live.clone();
        std::thread::Builder::new()
            .name("hint-refresh".into())
            .spawn(move || {
                while !bg.stop.load(Ordering::Relaxed) {
                    std::thread::sleep(every);
                    if bg.stop.load(Ordering::Relaxed) {
                        break;
                    }
                    if let Err(e) =
                        bg.refresh(&mut ch, &layout, &disks, &finder, Duration::from_secs(30))
                    {
                        bg.counters.failures.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            "hint refresh failed (pages go raw until the next one): {e}"
                        );
                        if ch.reconnect().is_err() {
                            break;
                        }
                    }
                }
            })
            .map_err(|source| HintChannelError::Io {
                path: path.into(),
                doing: "starting the refresh thread",
                source,
            })?;
        Ok(live)
    }

    fn refresh(
        &self,
        ch: &mut HintChannel,
        layout: &[GpaRange],
        disks: &DiskMap,
        finder: &Finder,
        timeout: Duration,
    ) -> Result<(), HintChannelError> {
        let t = Instant::now();
        let (table, dropped) = match finder {
            Finder::Guest => to_table(&ch.fetch(timeout)?, layout, disks),
            Finder::Host(ram) => {
                let cached = self.layout.lock().ok().and_then(|l| {
                    l.as_ref()
                        .filter(|(at, _)| at.elapsed() < LAYOUT_MAX_AGE)
                        .map(|(_, f)| f.clone())
                });
                let reused = cached.is_some();
                let files = match cached {
                    Some(f) => f,
                    None => {
                        let f = Arc::new(disks.on_layout(ch.fetch_layout(timeout)?));
                        if let Ok(mut l) = self.layout.lock() {
                            *l = Some((Instant::now(), f.clone()));
                        }
                        f
                    }
                };
                let asked = t.elapsed();
                let data = ram.data_pages().map_err(|e| HintChannelError::Io {
                    path: ch.path.clone(),
                    doing: "finding the RAM file's holes before scanning it",
                    source: io::Error::other(e.to_string()),
                })?;
                let (table, stats) = dbmigrate_innodb::scan::scan_frames(
                    ram.bytes(),
                    &data,
                    layout,
                    &files,
                    disks.vmm_count,
                );
                tracing::info!(
                    layout_reused = reused,
                    layout_ms = dbmigrate_core::stats::millis(asked),
                    scan_ms = dbmigrate_core::stats::millis(t.elapsed() - asked),
                    files = files.files.len(),
                    ?stats,
                    "guest RAM scanned for buffer-pool pages"
                );
                if let Ok(mut s) = self.last_scan.lock() {
                    *s = Some(stats);
                }
                (table, 0)
            }
        };
        let table = self.with_page_cache(ch, layout, disks, table, timeout);
        let c = &self.counters;
        c.last_fetch_ms.store(
            dbmigrate_core::stats::millis(t.elapsed()),
            Ordering::Relaxed,
        );
        c.refreshes.fetch_add(1, Ordering::Relaxed);
        c.last_count.store(table.len() as u64, Ordering::Relaxed);
        c.dropped.fetch_add(dropped, Ordering::Relaxed);
        tracing::debug!(
            hints = table.len(),
            dropped,
            ms = dbmigrate_core::stats::millis(t.elapsed()),
            "hints refreshed"
        );
        if let Ok(mut t) = self.table.write() {
            *t = table;
        }
        Ok(())
    }

    /// `table` with the guest's page-cache hints under it (a buffer-pool
    /// hint wins over a page-cache hint for the same page), if they were
    /// asked for: those of the last [`LAYOUT_MAX_AGE`], or fetched now. A
    /// failed fetch is counted and logged; the table goes on without them.
    fn with_page_cache(
        &self,
        ch: &mut HintChannel,
        layout: &[GpaRange],
        disks: &DiskMap,
        table: PageMap<Hint>,
        timeout: Duration,
    ) -> PageMap<Hint> {
        if !self.page_cache.load(Ordering::Relaxed) {
            return table;
        }
        let cached = self.page_cache_table.lock().ok().and_then(|l| {
            l.as_ref()
                .filter(|(at, _)| at.elapsed() < LAYOUT_MAX_AGE)
                .map(|(_, t)| t.clone())
        });
        let pc = match cached {
            Some(t) => t,
            None => match ch.fetch_page_cache(timeout) {
                Ok(h) => {
                    let t = Arc::new(to_table(&h, layout, disks).0);
                    tracing::info!(hints = t.len(), "page-cache hints received");
                    if let Ok(mut l) = self.page_cache_table.lock() {
                        *l = Some((Instant::now(), t.clone()));
                    }
                    t
                }
                Err(e) => {
                    self.counters.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("page-cache hints failed (those pages go raw; asked again in {LAYOUT_MAX_AGE:?}): {e}");
                    // Not asked again before the layout's age: a guest agent
                    // that cannot answer would otherwise hold every refresh.
                    if let Ok(mut l) = self.page_cache_table.lock() {
                        *l = Some((Instant::now(), Arc::default()));
                    }
                    if let Err(e) = ch.reconnect() {
                        tracing::warn!("reconnecting the hint channel failed: {e}");
                    }
                    return table;
                }
            },
        };
        let mut merged = (*pc).clone();
        merged.extend(table);
        merged
    }

    /// The census taken at the start, if one was asked for (once).
    pub fn take_census(&self) -> Option<CensusTaken> {
        self.census.lock().ok()?.take()
    }

    /// Stops refreshing (the table stays as it is).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dbmigrate_core::addr::{DiskOffset, GuestAddr, PageIndex, RamOffset};

    fn gh(gpa: u64, disk: u16, clean: bool) -> GuestHint {
        GuestHint {
            gpa: GuestAddr(gpa),
            disk,
            clean,
            disk_offset: DiskOffset(0x10000),
            space: 1,
            page_no: 2,
            lsn: 3,
        }
    }

    #[test]
    fn layout_maps_and_drops() {
        let layout = [
            GpaRange {
                gpa: GuestAddr(0),
                len: 0xa0000,
                offset: RamOffset(0),
            },
            GpaRange {
                gpa: GuestAddr(0x1_0000_0000),
                len: 0x4000_0000,
                offset: RamOffset(0xc000_0000),
            },
        ];
        let hints = [
            gh(0x1000, 0, true),
            gh(0x1_0000_2000, 0, true),
            gh(0xb0000, 0, true), // a hole in the layout
            gh(0x3000, 1, true),  // foreign disk
            gh(0x4000, 0, false), // dirty
            gh(0x5001, 0, true),  // misaligned
        ];
        let (t, dropped) = to_table(&hints, &layout, &DiskMap::positional(1));
        assert_eq!(dropped, 4);
        assert_eq!(
            t.get(&PageIndex(1)).map(|h| h.offset),
            Some(DiskOffset(0x10000))
        );
        assert!(t.contains_key(&RamOffset(0xc000_0000 + 0x2000).page()));
        // The guest's disk 1 is QEMU's disk 0; its disk 0 is no disk of QEMU.
        let swapped = DiskMap {
            map: vec![None, Some(0)],
            vmm_count: 1,
        };
        let (t, dropped) = to_table(&hints, &layout, &swapped);
        assert_eq!(dropped, 5);
        assert_eq!(t.get(&PageIndex(3)).map(|h| h.disk), Some(0));
    }

    #[test]
    fn layouts_take_qemus_disk_indexes() {
        use dbmigrate_core::protocol::guest::FileLayout;
        let f = |id, disk| FileLayout {
            id,
            disk,
            extents: Vec::new(),
        };
        let set = LayoutSet {
            page_size: 16384,
            files: vec![f(1, 0), f(2, 1), f(3, 2)],
            frames: Vec::new(),
        };
        let m = DiskMap {
            map: vec![Some(1), None, Some(0)],
            vmm_count: 2,
        };
        let out = m.on_layout(set);
        let got: Vec<_> = out.files.iter().map(|f| (f.id, f.disk)).collect();
        assert_eq!(got, [(1, 1), (3, 0)]);
    }
}
