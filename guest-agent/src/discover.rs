//! The server's tablespace files, found without SQL: the files it has open
//! (`/proc/PID/fd`) and those in its data directory (its working
//! directory, `/proc/PID/cwd`, and one level of database directories),
//! each identified by its own first pages ([`dbmigrate_innodb::space`]).
//! Works the same for MariaDB, MySQL 5.7/8.x and Percona: no query, no
//! login, no dictionary table whose name differs between them.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use dbmigrate_innodb::space::{self, SpaceFile, Unusable};

/// Most files examined (a data directory with more tables than this gets
/// hints for the first ones found).
pub const MAX_FILES: usize = 200_000;

/// What was found.
#[derive(Clone, Debug, Default)]
pub struct Tablespaces {
    /// The server's page size (the system tablespace's, or failing that
    /// the most common).
    pub page_size: u64,
    /// File of each usable tablespace.
    pub files: HashMap<u32, PathBuf>,
    /// Files left out, with why.
    pub left_out: Vec<(PathBuf, String)>,
}

/// Whether `name` may be an InnoDB tablespace file: `*.ibd` (file-per-table,
/// general tablespaces, MySQL 8's `mysql.ibd`), `ibdata*` (system),
/// `undo*` or `*.ibu` (undo). Not the temporary tablespaces (`ibtmp*`,
/// `*.ibt`), whose pages never reach the disk as they are in memory (pure).
pub fn is_tablespace_name(name: &str) -> bool {
    name.ends_with(".ibd")
        || name.ends_with(".ibu")
        || (name.starts_with("ibdata") && !name.contains('.'))
        || (name.starts_with("undo") && !name.contains('.'))
}

/// Candidate paths: the server's open files first, then its data directory.
fn candidates(pid: u32) -> Vec<(PathBuf, bool)> {
    let mut out = Vec::new();
    if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in fds.flatten() {
            if let Ok(p) = std::fs::read_link(e.path()) {
                if p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(is_tablespace_name)
                {
                    out.push((p, true));
                }
            }
        }
    }
    if let Ok(datadir) = std::fs::read_link(format!("/proc/{pid}/cwd")) {
        walk(&datadir, 1, &mut out);
    }
    out.truncate(MAX_FILES);
    out
}

/// Tablespace files in `dir` and, `depth` levels down, its subdirectories.
fn walk(dir: &Path, depth: u32, out: &mut Vec<(PathBuf, bool)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if out.len() >= MAX_FILES {
            return;
        }
        let Ok(t) = e.file_type() else { continue };
        let name = e.file_name();
        let name = name.to_string_lossy();
        if t.is_file() && is_tablespace_name(&name) {
            out.push((e.path(), false));
        } else if t.is_dir() && depth > 0 && !name.starts_with('#') {
            // `#innodb_temp`, `#innodb_redo`: never tablespaces to hint.
            walk(&e.path(), depth - 1, out);
        }
    }
}

/// What each file (device, inode) said, so that a layout made every few
/// seconds reads each tablespace's first pages once, not each time (a
/// tablespace's id and flags never change; a new file is a new inode).
static KNOWN: std::sync::Mutex<Option<HashMap<(u64, u64), SpaceFile>>> =
    std::sync::Mutex::new(None);

/// The identity of the tablespace file at `path`, from its first pages.
fn identify(path: &Path) -> std::io::Result<Result<SpaceFile, space::NotASpace>> {
    use std::os::unix::fs::MetadataExt;
    let f = std::fs::File::open(path)?;
    let meta = f.metadata()?;
    let key = (meta.dev(), meta.ino());
    if let Some(s) = KNOWN
        .lock()
        .ok()
        .and_then(|k| k.as_ref()?.get(&key).copied())
    {
        return Ok(Ok(s));
    }
    let mut buf = Vec::with_capacity(space::PROBE_LEN);
    f.take(space::PROBE_LEN as u64).read_to_end(&mut buf)?;
    let found = space::space_file(&buf);
    if let (Ok(s), Ok(mut known)) = (found, KNOWN.lock()) {
        let map = known.get_or_insert_with(HashMap::new);
        if map.len() >= MAX_FILES {
            map.clear();
        }
        map.insert(key, s);
    }
    Ok(found)
}

/// The server `pid`'s tablespaces.
pub fn tablespaces(pid: u32) -> Tablespaces {
    let mut seen: std::collections::HashSet<PathBuf> = std::collections::HashSet::new();
    let mut found: Vec<(PathBuf, bool, SpaceFile)> = Vec::new();
    let mut out = Tablespaces::default();
    for (path, open) in candidates(pid) {
        let real = std::fs::canonicalize(&path).unwrap_or(path);
        if !seen.insert(real.clone()) {
            continue;
        }
        match identify(&real) {
            Ok(Ok(s)) => found.push((real, open, s)),
            Ok(Err(why)) => out
                .left_out
                .push((real, format!("not a tablespace: {why:?}"))),
            Err(e) => out.left_out.push((real, format!("unreadable: {e}"))),
        }
    }
    let (page_size, files, left_out) = choose(found);
    out.page_size = page_size;
    out.files = files;
    out.left_out.extend(left_out);
    out
}

/// From the files found: the server's page size, the file of each usable
/// tablespace, and what is left out. A space id claimed by two files is
/// given the one the server has open, or none when that does not decide
/// (a copy left in the data directory must not be taken for the real
/// file). Pure.
pub fn choose(
    found: Vec<(PathBuf, bool, SpaceFile)>,
) -> (u64, HashMap<u32, PathBuf>, Vec<(PathBuf, String)>) {
    let page_size = found
        .iter()
        .find(|(_, _, s)| s.space == 0)
        .map(|(_, _, s)| s.page_size)
        .or_else(|| {
            let mut counts: HashMap<usize, usize> = HashMap::new();
            for (_, _, s) in &found {
                *counts.entry(s.page_size).or_default() += 1;
            }
            counts
                .into_iter()
                .max_by_key(|&(ps, n)| (n, ps))
                .map(|(ps, _)| ps)
        })
        .unwrap_or(16384);
    let mut left_out = Vec::new();
    let mut by_space: HashMap<u32, Vec<(PathBuf, bool)>> = HashMap::new();
    for (path, open, s) in found {
        let why = match s.unusable {
            Some(u) => Some(u.to_string()),
            None if s.page_size != page_size => Some(format!(
                "{} pages, the server's are {page_size}",
                s.page_size
            )),
            None if s.space == dbmigrate_innodb::TEMP_SPACE => Some("temporary".into()),
            None => None,
        };
        match why {
            Some(w) => left_out.push((path, w)),
            None => by_space.entry(s.space).or_default().push((path, open)),
        }
    }
    let mut files = HashMap::new();
    for (space, mut paths) in by_space {
        if paths.len() > 1 {
            let open: Vec<_> = paths.iter().filter(|(_, o)| *o).cloned().collect();
            if open.len() == 1 {
                paths = open;
            } else {
                for (p, _) in paths {
                    left_out.push((p, format!("space {space} is claimed by more than one file")));
                }
                continue;
            }
        }
        if let Some((p, _)) = paths.pop() {
            files.insert(space, p);
        }
    }
    (page_size as u64, files, left_out)
}

/// Which InnoDB the server runs: its frames' header and trailer LSNs say
/// whether a page was modified since its flush only in MariaDB's (which
/// writes the header's at each change and the trailer's at flush; MySQL
/// and Percona write both at flush).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// MariaDB.
    MariaDb,
    /// MySQL or Percona Server (or a server that does not say).
    MySql,
}

/// The flavor of the server `pid`, from its executable's name: MariaDB
/// 10.5 and later run `mariadbd` (Debian's `mysqld` is a link to it, and
/// the kernel names the file). Nothing is run: any user may name a process
/// `mysqld`, and the agent is root. An older MariaDB counts as MySQL,
/// which costs hints, never bytes.
pub fn flavor(pid: u32) -> Flavor {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .and_then(|exe| exe.file_name().and_then(|n| n.to_str()).map(flavor_of))
        .unwrap_or(Flavor::MySql)
}

/// [`flavor`] of an executable's file name (pure).
pub fn flavor_of(exe_name: &str) -> Flavor {
    if exe_name == "mariadbd" || exe_name.starts_with("mariadbd ") {
        Flavor::MariaDb
    } else {
        Flavor::MySql
    }
}

/// Whether the reason a file was left out is one the operator may want to
/// know about (compression, encryption) rather than noise.
pub fn notable(why: &str) -> bool {
    [
        Unusable::RowCompressed,
        Unusable::PageCompressed,
        Unusable::Encrypted,
    ]
    .iter()
    .any(|u| why == u.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sf(space: u32, page_size: usize, unusable: Option<Unusable>) -> SpaceFile {
        SpaceFile {
            space,
            page_size,
            flags: 0,
            unusable,
        }
    }

    #[test]
    fn tablespace_names() {
        for yes in [
            "ibdata1",
            "ibdata2",
            "sbtest1.ibd",
            "mysql.ibd",
            "undo001",
            "undo_002",
            "u1.ibu",
        ] {
            assert!(is_tablespace_name(yes), "{yes}");
        }
        for no in [
            "ibtmp1",
            "temp_1.ibt",
            "ib_logfile0",
            "aria_log.00000001",
            "sbtest1.frm",
            "undo001.bak",
            "ibdata1.old",
        ] {
            assert!(!is_tablespace_name(no), "{no}");
        }
    }

    #[test]
    fn the_system_tablespace_sets_the_page_size_and_odd_files_are_left_out() {
        let p = |s: &str| PathBuf::from(s);
        let found = vec![
            (p("/d/ibdata1"), true, sf(0, 16384, None)),
            (p("/d/a/t1.ibd"), true, sf(5, 16384, None)),
            (
                p("/d/a/z.ibd"),
                true,
                sf(6, 8192, Some(Unusable::RowCompressed)),
            ),
            (
                p("/d/a/e.ibd"),
                false,
                sf(7, 16384, Some(Unusable::Encrypted)),
            ),
            (p("/d/a/odd.ibd"), false, sf(8, 4096, None)),
            // A copy of t9 in the data directory beside the open one.
            (p("/d/a/t9.ibd"), true, sf(9, 16384, None)),
            (p("/d/b/t9.ibd"), false, sf(9, 16384, None)),
            // Two closed files claim space 10: neither is taken.
            (p("/d/a/t10.ibd"), false, sf(10, 16384, None)),
            (p("/d/c/t10.ibd"), false, sf(10, 16384, None)),
        ];
        let (ps, files, left) = choose(found);
        assert_eq!(ps, 16384);
        let mut got: Vec<_> = files.iter().map(|(k, v)| (*k, v.clone())).collect();
        got.sort();
        assert_eq!(
            got,
            vec![
                (0, p("/d/ibdata1")),
                (5, p("/d/a/t1.ibd")),
                (9, p("/d/a/t9.ibd"))
            ]
        );
        let why = |f: &str| {
            left.iter()
                .find(|(p, _)| p == Path::new(f))
                .map(|(_, w)| w.clone())
        };
        assert_eq!(why("/d/a/z.ibd").as_deref(), Some("ROW_FORMAT=COMPRESSED"));
        assert_eq!(why("/d/a/e.ibd").as_deref(), Some("encrypted"));
        assert!(why("/d/a/odd.ibd").unwrap().contains("4096 pages"));
        assert!(why("/d/a/t10.ibd").unwrap().contains("more than one"));
        assert!(notable("encrypted") && !notable("unreadable: x"));
    }

    #[test]
    fn mariadb_is_told_by_its_executable() {
        assert_eq!(flavor_of("mariadbd"), Flavor::MariaDb);
        assert_eq!(flavor_of("mariadbd (deleted)"), Flavor::MariaDb);
        assert_eq!(flavor_of("mysqld"), Flavor::MySql);
        assert_eq!(flavor_of("mariadbd-evil"), Flavor::MySql);
        assert_eq!(flavor_of(""), Flavor::MySql);
    }

    #[test]
    fn without_a_system_tablespace_the_most_common_page_size_wins() {
        let found = vec![
            (PathBuf::from("/a"), true, sf(3, 65536, None)),
            (PathBuf::from("/b"), true, sf(4, 65536, None)),
            (PathBuf::from("/c"), true, sf(5, 16384, None)),
        ];
        let (ps, files, _) = choose(found);
        assert_eq!((ps, files.len()), (65536, 2));
    }
}
