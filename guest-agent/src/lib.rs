//! dbmigrate guest agent: inside the VM, finds the buffer-pool frames of a
//! running MariaDB/MySQL server that are byte-identical to pages on the VM's
//! disk, and exports hints (guest-physical page -> disk offset) for the
//! host agents, which rebuild those pages from shared storage instead of
//! sending them. Hints are cross-checked here (FIL header and trailer, the
//! server's own list of clean pages) but the host verifies every page by
//! hash anyway: a wrong hint costs a resend, never correctness.

#![deny(missing_docs)]

pub mod census;
pub mod discover;
pub mod disk;
pub mod login;
pub mod pagecache;
pub mod procmem;
pub mod sys;

use std::collections::HashMap;
use std::path::PathBuf;

use dbmigrate_core::addr::{DiskOffset, GuestAddr};
use dbmigrate_core::protocol::guest::GuestHint;
use dbmigrate_innodb as innodb;
use mysql_async::prelude::Queryable;
use serde::Serialize;
use thiserror::Error;

/// Agent failures, each saying what to check.
#[derive(Debug, Error)]
pub enum AgentError {
    /// The SQL side failed.
    #[error("query to the database server failed ({what}): check the socket, user and that the server runs InnoDB")]
    Sql {
        /// Which query.
        what: &'static str,
        /// Why.
        #[source]
        source: mysql_async::Error,
    },
    /// No server process was found.
    #[error("no mariadbd or mysqld process found: is the server running in this VM?")]
    NoServer,
    /// The server reported a page size InnoDB does not have.
    #[error("the database server reports innodb_page_size {0}: InnoDB pages are a power of two from 4 KiB to 64 KiB; is this an InnoDB server?")]
    PageSize(u64),
    /// /proc access failed.
    #[error("cannot {doing} of process {pid}: the agent must run as root")]
    Proc {
        /// Process.
        pid: u32,
        /// What.
        doing: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The page flags could not be read.
    #[error("cannot read /proc/kpageflags for the memory census: the agent must run as root, on a kernel with CONFIG_PROC_PAGE_MONITOR")]
    PageFlags(#[source] std::io::Error),
    /// The page cache could not be looked at.
    #[error("cannot look at the page cache (/proc/kpageflags, /proc/self/pagemap): the agent must run as root")]
    PageCache(#[source] std::io::Error),
    /// A disk device could not be opened.
    #[error("cannot stat disk device {path}: name the VM's disks with --disk (e.g. /dev/vda)")]
    Disk {
        /// Device.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Counters of one collection, for logs and tests.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CollectStats {
    /// Frames examined (present in memory).
    pub frames: u64,
    /// Frames whose header and trailer read as an InnoDB page.
    pub valid_headers: u64,
    /// Valid-looking frames the server does not list as a buffered page.
    pub not_listed: u64,
    /// Pages the server reports dirty.
    pub dirty: u64,
    /// Pages whose file is unknown or on no VM disk.
    pub no_disk: u64,
    /// 4 KiB pieces that do not sit in one plain extent.
    pub unmapped: u64,
    /// Frames dropped because another frame claimed the same page.
    pub ambiguous: u64,
    /// Hints exported.
    pub hints: u64,
    /// Time spent in SQL, ms.
    pub sql_ms: u64,
    /// Time spent scanning the buffer pool and mapping files, ms.
    pub scan_ms: u64,
}

/// Hints plus, for checking, where each hinted 4 KiB is in the server's memory.
pub struct Collected {
    /// The hints.
    pub hints: Vec<GuestHint>,
    /// Virtual address in the server of each hint's 4 KiB (same order).
    pub vaddrs: Vec<u64>,
    /// Counters.
    pub stats: CollectStats,
}

/// Where to look.
#[derive(Clone, Debug)]
pub struct Config {
    /// The VM's disks as block devices, by hint disk index.
    pub disks: Vec<PathBuf>,
    /// The server's pid (found by name if None).
    pub pid: Option<u32>,
}

const BUFFER_PAGES_SQL: &str = include_str!("../../sql/buffer_pages.sql");
const SERVER_SQL: &str = include_str!("../../sql/server.sql");

/// What the server says about its buffer pool and files: the SQL half of a
/// collection. It may be older than the scan that uses it: a page loaded
/// since is just not hinted, and a page modified since fails the header
/// check or, at worst, the host's hash check.
#[derive(Clone, Debug, Default)]
pub struct ServerSnapshot {
    /// `innodb_page_size`.
    pub page_size: u64,
    /// `innodb_buffer_pool_size`.
    pub pool: u64,
    /// Buffered pages and whether each is dirty.
    pub listed: HashMap<(u32, u32), bool>,
    /// File of each tablespace.
    pub files: HashMap<u32, PathBuf>,
    /// Time the queries took, ms.
    pub sql_ms: u64,
}

/// The server's page size and buffer pool size (the same variables in
/// MariaDB, MySQL and Percona).
async fn server_settings(conn: &mut mysql_async::Conn) -> Result<(u64, u64), AgentError> {
    let (page_size, pool): (u64, u64) = conn
        .query_first(SERVER_SQL)
        .await
        .map_err(|source| AgentError::Sql {
            what: "server settings",
            source,
        })?
        .ok_or_else(|| AgentError::Sql {
            what: "server settings",
            source: mysql_async::Error::Other("no row".into()),
        })?;
    if !(page_size.is_power_of_two() && (4096..=65536).contains(&page_size)) {
        return Err(AgentError::PageSize(page_size));
    }
    Ok((page_size, pool))
}

/// Runs the queries in `sql/` (the files of the tablespaces come from
/// [`discover`], which needs no dictionary table).
pub async fn query_server(
    conn: &mut mysql_async::Conn,
    cfg: &Config,
) -> Result<ServerSnapshot, AgentError> {
    let sql_started = std::time::Instant::now();
    let (page_size, pool) = server_settings(conn).await?;
    let files = discover::tablespaces(server_pid(cfg)?).files;
    let pages: Vec<(u32, u32, u64, u64)> =
        conn.query(BUFFER_PAGES_SQL)
            .await
            .map_err(|source| AgentError::Sql {
                what: "buffer pool pages",
                source,
            })?;
    let listed: HashMap<(u32, u32), bool> = pages
        .into_iter()
        .map(|(space, page, oldest, _newest)| ((space, page), oldest != 0))
        .collect();
    Ok(ServerSnapshot {
        page_size,
        pool,
        listed,
        files,
        sql_ms: dbmigrate_core::stats::millis(sql_started.elapsed()),
    })
}

/// Where every tablespace file lies on the VM's disks: the cheap answer, for
/// a host that finds the frames in guest RAM itself. No SQL: the files and
/// the page size come from the server's open files and data directory
/// ([`discover`]), so any InnoDB server works and no login is needed.
/// Files on no VM disk, the temporary tablespaces and tablespaces whose
/// pages on disk never equal their frames (compressed, encrypted) are left
/// out; only plain extents are listed (unwritten or encoded ones do not
/// hold the page's bytes).
pub fn layout(cfg: &Config) -> Result<dbmigrate_core::protocol::guest::LayoutSet, AgentError> {
    use dbmigrate_core::protocol::guest::{FileLayout, LayoutSet};
    let pid = server_pid(cfg)?;
    let found = discover::tablespaces(pid);
    for (file, why) in found.left_out.iter().filter(|(_, w)| discover::notable(w)) {
        tracing::info!(file = %file.display(), why, "tablespace left out of the hints");
    }
    let page_size = found.page_size;
    // The host tells a clean frame by its header and trailer LSNs, which
    // only MariaDB's InnoDB keeps apart: elsewhere no frame is offered
    // (its pages go raw; `--hint-scan guest` asks the server instead).
    let frames = match discover::flavor(pid) {
        discover::Flavor::MariaDb => {
            // The pool's size is not known without SQL: every large
            // anonymous mapping is a candidate (the host checks each
            // frame it finds).
            pool_frames(cfg, u64::MAX, page_size)?
        }
        discover::Flavor::MySql => {
            tracing::warn!("the server is not MariaDB: its modified frames cannot be told from clean ones in memory, so the host-side scan gets no frames (use --hint-scan guest on the host, which asks the server for its clean pages)");
            Vec::new()
        }
    };
    let disks = open_disks(cfg)?;
    let mut out = LayoutSet {
        page_size: u32::try_from(page_size).unwrap_or(0),
        files: Vec::new(),
        frames: dbmigrate_core::protocol::guest::frame_entries(&frames),
    };
    for (space, file) in found.files {
        // A file that vanished or sits on no VM disk is just not described.
        let Ok(Some(place)) = disks.place(&file) else {
            continue;
        };
        out.files.push(FileLayout {
            id: space,
            disk: place.disk,
            extents: disk::plain_extents(&place),
        });
    }
    out.files.sort_by_key(|f| f.id);
    Ok(out)
}

/// Resident 4 KiB pages of the server (`/proc/PID/statm`): a cheap sign
/// that the buffer pool's resident frames changed (it grows while the pool
/// warms up), read every second by the layout keeper.
pub fn server_resident_pages(cfg: &Config) -> Result<u64, AgentError> {
    let pid = server_pid(cfg)?;
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).map_err(|source| {
        AgentError::Proc {
            pid,
            doing: "read statm",
            source,
        }
    })?;
    statm
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| AgentError::Proc {
            pid,
            doing: "parse statm",
            source: std::io::Error::from(std::io::ErrorKind::InvalidData),
        })
}

/// Whether the kept layout should be made again: none yet, it is
/// `max_age` old, or the server's resident size moved by more than 1 %
/// since (frames the layout lacks, or lists that are gone), but not more
/// often than every `min_interval` (pure).
pub fn layout_is_stale(
    kept: Option<(std::time::Duration, u64)>,
    resident_now: u64,
    max_age: std::time::Duration,
    min_interval: std::time::Duration,
) -> bool {
    let Some((age, resident_then)) = kept else {
        return true;
    };
    age >= max_age
        || (age >= min_interval && resident_now.abs_diff(resident_then) > resident_then / 100)
}

/// The server's pid: configured, or found by name.
fn server_pid(cfg: &Config) -> Result<u32, AgentError> {
    match cfg.pid {
        Some(p) => Ok(p),
        None => procmem::find_server()
            .map_err(|source| AgentError::Proc {
                pid: 0,
                doing: "list processes",
                source,
            })?
            .ok_or(AgentError::NoServer),
    }
}

/// The census of this VM's memory ([`census`]), the database server's
/// frames labelled if a server runs.
pub fn take_census(
    cfg: &Config,
) -> Result<Vec<dbmigrate_core::protocol::guest::CensusRun>, AgentError> {
    let server = match server_pid(cfg) {
        Ok(pid) => census::ServerFrames::read(pid).map_err(|source| AgentError::Proc {
            pid,
            doing: "read the anonymous mappings and pagemap",
            source,
        })?,
        Err(AgentError::NoServer) => census::ServerFrames::default(),
        Err(e) => return Err(e),
    };
    census::take(&server).map_err(AgentError::PageFlags)
}

/// The VM's disks of `cfg`, each examined.
fn open_disks(cfg: &Config) -> Result<disk::Disks, AgentError> {
    disk::Disks::new(&cfg.disks).map_err(|(path, source)| AgentError::Disk { path, source })
}

/// Hints for the clean page cache of the files the guest's processes have
/// open or mapped on the VM's disks ([`pagecache`]), at most `max_hints`.
pub fn page_cache_hints(
    cfg: &Config,
    max_hints: usize,
) -> Result<(Vec<GuestHint>, pagecache::PageCacheStats), AgentError> {
    let disks = open_disks(cfg)?;
    let files = pagecache::open_and_mapped_files();
    pagecache::collect(&disks, &files, max_hints).map_err(AgentError::PageCache)
}

/// Guest-physical address of each 4 KiB page of every frame-aligned,
/// fully resident frame in the server's large anonymous mappings (the
/// buffer pool among them): the pagemap only, no frame is read.
pub fn pool_frames(cfg: &Config, pool: u64, page_size: u64) -> Result<Vec<Vec<u64>>, AgentError> {
    let pid = server_pid(cfg)?;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(|source| {
        AgentError::Proc {
            pid,
            doing: "read the maps",
            source,
        }
    })?;
    let mem = procmem::ProcMem::open(pid).map_err(|source| AgentError::Proc {
        pid,
        doing: "open the pagemap",
        source,
    })?;
    let page_size = page_size.clamp(4096, 65536);
    let sub = usize::try_from(page_size / 4096).expect("at most 16");
    let mut out = Vec::new();
    for (start, end) in procmem::anon_rw_mappings(&maps, pool.min(16 << 20)) {
        for (_, pfns) in mem.windows(start, end, page_size) {
            for f in pfns.chunks_exact(sub) {
                if let Some(pages) = f.iter().map(|p| p.map(|pfn| pfn * 4096)).collect() {
                    out.push(pages);
                }
            }
        }
    }
    Ok(out)
}

/// Collects hints for every clean buffer-pool frame of the server.
pub async fn collect(conn: &mut mysql_async::Conn, cfg: &Config) -> Result<Collected, AgentError> {
    let snap = query_server(conn, cfg).await?;
    scan(&snap, cfg, true)
}

/// The memory half of a collection: frames of the server's buffer pool
/// checked against `snap`, mapped to disk and guest-physical pages. Pages
/// `snap` calls dirty are never exported; with `only_listed` (a snapshot
/// taken just now), neither are frames it does not list (stale copies).
pub fn scan(
    snap: &ServerSnapshot,
    cfg: &Config,
    only_listed: bool,
) -> Result<Collected, AgentError> {
    let (page_size, pool, listed, files, sql_ms) = (
        snap.page_size,
        snap.pool,
        &snap.listed,
        &snap.files,
        snap.sql_ms,
    );
    let pid = server_pid(cfg)?;
    let disks = open_disks(cfg)?;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(|source| {
        AgentError::Proc {
            pid,
            doing: "read the maps",
            source,
        }
    })?;
    let mem = procmem::ProcMem::open(pid).map_err(|source| AgentError::Proc {
        pid,
        doing: "open the pagemap",
        source,
    })?;
    let candidates = procmem::anon_rw_mappings(&maps, pool.min(16 << 20));

    let mut out = Collected {
        hints: Vec::new(),
        vaddrs: Vec::new(),
        stats: CollectStats::default(),
    };
    let mut placed: HashMap<u32, Option<disk::Placed>> = HashMap::new();
    // Frames that claim each page, and which page each hint came from: a page
    // claimed by two frames (one of them stale or not a page at all) is not hinted.
    let mut claims: HashMap<(u32, u32), u32> = HashMap::new();
    let mut owner: Vec<(u32, u32)> = Vec::new();
    let frame_len = usize::try_from(page_size).unwrap_or(16384).max(4096);
    let sub_pages = frame_len / 4096;
    // Pagemap first: only frames resident in full are read, and of those
    // only the header and trailer, in batches (a whole 1 GiB pool is a few
    // MB of reads instead of 1 GiB).
    let piece = innodb::HEAD_LEN + innodb::TAIL_LEN;
    let scan_started = std::time::Instant::now();
    for (start, end) in candidates {
        for (at, pfns) in mem.windows(start, end, page_size) {
            let n = pfns.len() * 4096;
            let mut idx = Vec::new();
            let mut pieces = Vec::new();
            for f in 0..n / frame_len {
                if pfns[f * sub_pages..(f + 1) * sub_pages]
                    .iter()
                    .all(Option::is_some)
                {
                    let base = at + (f * frame_len) as u64;
                    idx.push(f);
                    pieces.push((base, innodb::HEAD_LEN));
                    pieces.push((
                        base + (frame_len - innodb::TAIL_LEN) as u64,
                        innodb::TAIL_LEN,
                    ));
                }
            }
            out.stats.frames += idx.len() as u64;
            let mut buf = vec![0u8; idx.len() * piece];
            let ok =
                sys::read_pieces(pid, &pieces, &mut buf).map_err(|source| AgentError::Proc {
                    pid,
                    doing: "read the buffer pool",
                    source,
                })?;
            for (k, &f) in idx.iter().enumerate() {
                if !(ok[2 * k] && ok[2 * k + 1]) {
                    continue;
                }
                let o = k * piece;
                let Some(h) = innodb::parse_parts(
                    &buf[o..o + innodb::HEAD_LEN],
                    &buf[o + innodb::HEAD_LEN..o + piece],
                ) else {
                    continue;
                };
                out.stats.valid_headers += 1;
                match listed.get(&(h.space, h.page)) {
                    None if only_listed => {
                        out.stats.not_listed += 1;
                        continue;
                    }
                    None => out.stats.not_listed += 1,
                    Some(true) => {
                        out.stats.dirty += 1;
                        continue;
                    }
                    Some(false) => {}
                }
                let place = placed.entry(h.space).or_insert_with(|| {
                    files
                        .get(&h.space)
                        .and_then(|f| disks.place(f).ok().flatten())
                });
                let Some(place) = place else {
                    out.stats.no_disk += 1;
                    continue;
                };
                *claims.entry((h.space, h.page)).or_default() += 1;
                let vaddr = at + (f * frame_len) as u64;
                let fp = &pfns[f * sub_pages..(f + 1) * sub_pages];
                for (i, pfn) in fp.iter().enumerate() {
                    let file_off = u64::from(h.page) * page_size + (i * 4096) as u64;
                    let Some(dev_off) = disk::map_range(&place.extents, file_off, 4096) else {
                        out.stats.unmapped += 1;
                        continue;
                    };
                    let Some(pfn) = pfn else { continue };
                    out.hints.push(GuestHint {
                        gpa: GuestAddr(pfn * 4096),
                        disk: place.disk,
                        clean: true,
                        disk_offset: DiskOffset(place.base + dev_off),
                        space: h.space,
                        page_no: h.page,
                        lsn: h.lsn,
                    });
                    out.vaddrs.push(vaddr + (i * 4096) as u64);
                    owner.push((h.space, h.page));
                }
            }
        }
    }
    out.stats.scan_ms = dbmigrate_core::stats::millis(scan_started.elapsed());
    out.stats.sql_ms = sql_ms;
    out.stats.ambiguous = claims
        .values()
        .filter(|&&n| n > 1)
        .map(|&n| u64::from(n))
        .sum();
    if out.stats.ambiguous > 0 {
        let keep: Vec<bool> = owner.iter().map(|k| claims.get(k) == Some(&1)).collect();
        let mut it = keep.iter();
        out.hints.retain(|_| *it.next().unwrap_or(&false));
        let mut it = keep.iter();
        out.vaddrs.retain(|_| *it.next().unwrap_or(&false));
    }
    out.stats.hints = out.hints.len() as u64;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::layout_is_stale;
    use std::time::Duration;

    #[test]
    fn a_layout_is_made_again_when_old_or_when_the_server_grew() {
        let s = Duration::from_secs;
        let (max, min) = (s(60), s(2));
        assert!(layout_is_stale(None, 1000, max, min), "none yet");
        // (age, resident then, resident now, stale?, why)
        let cases = [
            (10, 1000, 1005, false, "steady"),
            (10, 1000, 1011, true, "grew 1.1 %"),
            (10, 1000, 980, true, "shrank 2 %"),
            (1, 1000, 2000, false, "just made"),
            (60, 1000, 1000, true, "too old"),
        ];
        for (age, then, now, stale, why) in cases {
            assert_eq!(
                layout_is_stale(Some((s(age), then)), now, max, min),
                stale,
                "{why}"
            );
        }
    }
}
