//! `libdbmigrate_preload.so`: loaded into QEMU with `LD_PRELOAD`, it watches
//! QEMU's `mmap` calls and, when QEMU maps the RAM file named by
//! `DBMIGRATE_TRACK_PATH` (a path, or a shell pattern such as libvirt's
//! `/dev/shm/libvirt/qemu/*-vm1/pc.ram` for a file whose directory changes
//! at every start), registers that mapping with userfaultfd
//! asynchronous write-protect. The dbmigrate agent then reads and re-arms the
//! written-page bits from outside with `PAGEMAP_SCAN` on `/proc/PID/pagemap`.
//!
//! With `DBMIGRATE_POSTCOPY_SOCKET` set (a post-copy destination), it
//! registers the mapping for missing-page faults instead (every matching
//! mapping, one per memory backend, with one userfaultfd) and offers the
//! userfaultfd on that unix socket (`SCM_RIGHTS`, with each mapping's
//! address and length and the fault unit) to the destination agent, which
//! fills pages as they arrive. On hugetlbfs it registers for minor faults instead: the
//! agent fills the file through its own mapping and maps each 2 MiB page
//! into QEMU once all of it is in.
//!
//! Userfaultfd registration must happen inside the process that owns the
//! mapping, which is why this library exists. It never allocates and never
//! panics on QEMU's `mmap` path; a failed registration is reported on
//! stderr and leaves the mapping untouched (the agent then refuses to start).

use std::io::Write;
use std::os::fd::{AsRawFd, IntoRawFd};

type Off = libc::off_t;

/// The real mmap, through the raw syscall: resolving the next `mmap` symbol
/// with dlsym could itself call mmap (via malloc) and recurse into us.
fn real_mmap(
    addr: *mut libc::c_void,
    len: usize,
    prot: i32,
    flags: i32,
    fd: i32,
    off: Off,
) -> *mut libc::c_void {
    // SAFETY: the arguments are passed through unchanged from the caller of
    // mmap, who is responsible for them exactly as with libc's mmap.
    let r = unsafe { libc::syscall(libc::SYS_mmap, addr, len, prot, flags, fd, off) };
    r as *mut libc::c_void
}

/// Interposes `mmap`.
///
/// # Safety
/// Same contract as `mmap(2)`.
#[no_mangle]
pub unsafe extern "C" fn mmap(
    addr: *mut libc::c_void,
    len: usize,
    prot: i32,
    flags: i32,
    fd: i32,
    off: Off,
) -> *mut libc::c_void {
    // On failure the syscall wrapper has set errno and returned -1, which is
    // MAP_FAILED: the caller sees exactly what libc's mmap would report.
    let p = real_mmap(addr, len, prot, flags, fd, off);
    // Any shared file mapping may be QEMU's RAM (QEMU 7.2 maps the backend
    // file from offset 0, usually MAP_FIXED over an anonymous PROT_NONE
    // reservation, so the size and address tell nothing; the path does).
    if p != libc::MAP_FAILED
        && fd >= 0
        && flags & libc::MAP_SHARED != 0
        && flags & libc::MAP_ANONYMOUS == 0
    {
        // Keep errno as mmap left it for the caller.
        // SAFETY: __errno_location returns the calling thread's errno slot.
        let saved = unsafe { *libc::__errno_location() };
        maybe_track(p as u64, len as u64, fd);
        // SAFETY: as above.
        unsafe { *libc::__errno_location() = saved };
    }
    p
}

/// Interposes `mmap64` (the same call on 64-bit Linux).
///
/// # Safety
/// Same contract as `mmap(2)`.
#[no_mangle]
pub unsafe extern "C" fn mmap64(
    addr: *mut libc::c_void,
    len: usize,
    prot: i32,
    flags: i32,
    fd: i32,
    off: Off,
) -> *mut libc::c_void {
    // SAFETY: forwarded with the caller's own contract.
    unsafe { mmap(addr, len, prot, flags, fd, off) }
}

/// A path read into a fixed buffer (no allocation on the mmap path).
struct PathBuf {
    buf: [u8; 4096],
    len: usize,
}

impl PathBuf {
    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

fn fd_path(fd: i32) -> Option<PathBuf> {
    let mut link = [0u8; 64];
    let mut c = std::io::Cursor::new(&mut link[..]);
    write!(c, "/proc/self/fd/{fd}\0").ok()?;
    let mut out = PathBuf {
        buf: [0; 4096],
        len: 0,
    };
    // SAFETY: `link` is NUL-terminated; readlink writes at most the buffer
    // length into `out.buf`, which we own.
    let n = unsafe {
        libc::readlink(
            link.as_ptr().cast(),
            out.buf.as_mut_ptr().cast(),
            out.buf.len(),
        )
    };
    out.len = usize::try_from(n).ok().filter(|&n| n < out.buf.len())?;
    Some(out)
}

/// Whether `want` (from `DBMIGRATE_TRACK_PATH`) has pattern characters.
fn is_pattern(want: &[u8]) -> bool {
    want.iter().any(|b| matches!(b, b'*' | b'?'))
}

/// Whether the mapped file `got` is the one `want` names: the same path, or
/// a path the pattern matches, component by component (`*` any run of
/// characters and `?` any one, never a `/`, as `fnmatch` with
/// `FNM_PATHNAME`). No allocation: it runs on QEMU's `mmap` path. Pure.
fn path_matches(want: &PathBuf, got: &PathBuf) -> bool {
    if !is_pattern(want.bytes()) {
        return got.bytes() == want.bytes();
    }
    let mut w = want.bytes().split(|&b| b == b'/');
    let mut g = got.bytes().split(|&b| b == b'/');
    loop {
        match (w.next(), g.next()) {
            (None, None) => return true,
            (Some(p), Some(c)) if component_matches(p, c) => {}
            _ => return false,
        }
    }
}

/// One path component against a pattern of `*` and `?` (the classic
/// matcher: back to the last `*` on a mismatch, no allocation). Pure.
fn component_matches(pat: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pat.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pat[p..].iter().all(|&c| c == b'*')
}

fn wanted_path() -> Option<PathBuf> {
    // SAFETY: getenv with a NUL-terminated name; the result is read-only and
    // stays valid as long as nobody calls setenv (QEMU does not for this name).
    let v = unsafe { libc::getenv(c"DBMIGRATE_TRACK_PATH".as_ptr()) };
    if v.is_null() {
        return None;
    }
    let mut out = PathBuf {
        buf: [0; 4096],
        len: 0,
    };
    // SAFETY: `v` is a NUL-terminated string from the environment.
    let given = unsafe { std::ffi::CStr::from_ptr(v) }.to_bytes();
    // A pattern is matched as given; a path is resolved as the kernel
    // reports the mapped file.
    let r = if is_pattern(given) {
        std::ptr::null_mut()
    } else {
        // SAFETY: realpath writes at most PATH_MAX (4096) bytes into our buffer.
        unsafe { libc::realpath(v, out.buf.as_mut_ptr().cast()) }
    };
    if r.is_null() {
        // The file may not exist yet (QEMU creates it), or it is a
        // pattern: use the name as given, keeping the terminating NUL.
        let s = given;
        let n = s.len().min(out.buf.len() - 1);
        out.buf[..n].copy_from_slice(&s[..n]);
        out.len = n;
    } else {
        out.len = out.buf.iter().position(|&b| b == 0).unwrap_or(0);
    }
    Some(out)
}

fn say(args: std::fmt::Arguments<'_>) {
    // Room for a PATH_MAX path plus the message; longer output is cut short.
    let mut buf = [0u8; 4096 + 256];
    let mut c = std::io::Cursor::new(&mut buf[..]);
    let _ = c.write_fmt(args);
    let n = usize::try_from(c.position()).unwrap_or(0);
    // SAFETY: writes `n` initialised bytes of our buffer to stderr.
    let _ = unsafe { libc::write(2, buf.as_ptr().cast(), n) };
}

fn maybe_track(addr: u64, len: u64, fd: i32) {
    let Some(want) = wanted_path() else { return };
    let Some(got) = fd_path(fd) else { return };
    if !path_matches(&want, &got) {
        return;
    }
    let path = std::str::from_utf8(got.bytes()).unwrap_or("?");
    // mmap accepts any length and maps whole pages; userfaultfd wants them whole.
    // SAFETY: sysconf only reads a system constant.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let len = len.div_ceil(page.max(1)).saturating_mul(page.max(1));
    if let Some(sock) = postcopy_socket() {
        let huge = dbmigrate_uffd::hugetlbfs_page_size(&Fd(fd)).ok().flatten();
        // One descriptor per socket: a further mapping that matches (a
        // guest with several memory backends, e.g. NUMA nodes) is
        // registered with the first one's descriptor.
        let first = POSTCOPY_UFFD.load(Ordering::SeqCst);
        if first == POSTCOPY_OVER {
            say(format_args!(
                "dbmigrate-preload: {path} matches DBMIGRATE_TRACK_PATH after post-copy ended; it is left untouched\n"
            ));
            return;
        }
        if first >= 0 {
            postcopy_also(path, first, addr, len, huge);
            return;
        }
        serve_postcopy(path, addr, len, huge, sock);
        return;
    }
    match dbmigrate_uffd::register_wp_async(addr, len) {
        Ok(uffd) => {
            // Kept open for the life of the process: closing it would end tracking.
            let raw = uffd.into_raw_fd();
            say(format_args!(
                "dbmigrate-preload: tracking {path} at {addr:#x}-{:#x} (uffd fd {raw})\n",
                addr.wrapping_add(len)
            ));
        }
        Err(e) => say(format_args!(
            "dbmigrate-preload: cannot write-protect {path}: {e}\n"
        )),
    }
}

use std::sync::atomic::{AtomicI32, AtomicU64, AtomicUsize, Ordering};

/// The post-copy descriptor once made (its number; -1 before), for the RAM
/// files that QEMU maps after the first.
static POSTCOPY_UFFD: AtomicI32 = AtomicI32::new(-1);
/// [`POSTCOPY_UFFD`] once the agent said every page is in place and the
/// descriptor is closed: later mappings are left alone.
const POSTCOPY_OVER: i32 = -2;
/// Most RAM mappings one post-copy descriptor serves.
const MAX_POSTCOPY_MAPPINGS: usize = 64;
/// The mappings registered with the post-copy descriptor, in the order
/// QEMU mapped them: address and length each (no allocation on QEMU's
/// mmap path).
static POSTCOPY_MAPS: [(AtomicU64, AtomicU64); MAX_POSTCOPY_MAPPINGS] =
    [const { (AtomicU64::new(0), AtomicU64::new(0)) }; MAX_POSTCOPY_MAPPINGS];
static POSTCOPY_COUNT: AtomicUsize = AtomicUsize::new(0);

/// Notes a mapping registered with the post-copy descriptor; false if
/// there is no room for it. Called from QEMU's thread that maps its RAM
/// only; the count is raised after the entry is written, so that the
/// thread that makes the offer never reads an entry half written.
fn note_postcopy_map(addr: u64, len: u64) -> bool {
    let i = POSTCOPY_COUNT.load(Ordering::SeqCst);
    let Some((a, l)) = POSTCOPY_MAPS.get(i) else {
        return false;
    };
    a.store(addr, Ordering::SeqCst);
    l.store(len, Ordering::SeqCst);
    POSTCOPY_COUNT.store(i + 1, Ordering::SeqCst);
    true
}

/// Registers a further RAM mapping with the post-copy descriptor `uffd`.
fn postcopy_also(path: &str, uffd: i32, addr: u64, len: u64, huge: Option<u64>) {
    if POSTCOPY_COUNT.load(Ordering::SeqCst) >= MAX_POSTCOPY_MAPPINGS {
        say(format_args!(
            "dbmigrate-preload: {path} is left out of post-copy: one descriptor serves at most {MAX_POSTCOPY_MAPPINGS} RAM files\n"
        ));
        return;
    }
    match dbmigrate_uffd::register_more(&Fd(uffd), huge.is_some(), addr, len) {
        Ok(()) => {
            note_postcopy_map(addr, len);
            say(format_args!(
                "dbmigrate-preload: post-copy also for {path} at {addr:#x}-{:#x}\n",
                addr.wrapping_add(len)
            ));
        }
        // The agent finds the file missing from the offer and refuses.
        Err(e) => say(format_args!(
            "dbmigrate-preload: cannot register {path} for post-copy: {e}\n"
        )),
    }
}

/// The offer sent with the descriptor: the first mapping's address and
/// length, the fault unit, then each further mapping's address and length
/// (little-endian u64s).
fn postcopy_offer(unit: u64) -> Vec<u8> {
    let n = POSTCOPY_COUNT.load(Ordering::SeqCst);
    let mut out = Vec::with_capacity(8 + 16 * n);
    for (i, (a, l)) in POSTCOPY_MAPS.iter().take(n).enumerate() {
        out.extend_from_slice(&a.load(Ordering::SeqCst).to_le_bytes());
        out.extend_from_slice(&l.load(Ordering::SeqCst).to_le_bytes());
        if i == 0 {
            out.extend_from_slice(&unit.to_le_bytes());
        }
    }
    out
}

/// QEMU's descriptor, borrowed for a call (never closed here).
struct Fd(i32);

impl std::os::fd::AsRawFd for Fd {
    fn as_raw_fd(&self) -> i32 {
        self.0
    }
}

/// Waits for the agent that took the descriptor to say it is done ("D":
/// every page is in place). If it goes away without a word it may have
/// died while this QEMU's page faults depended on it: a vCPU would wait
/// forever for a page, so QEMU stops instead (before the hand-over it never
/// ran the VM anyway).
fn watch_agent(mut conn: std::os::unix::net::UnixStream) {
    use std::io::Read;
    let mut b = [0u8; 1];
    match conn.read(&mut b) {
        Ok(1) if b[0] == b'D' => {}
        _ => {
            say(format_args!(
                "dbmigrate-preload: the destination agent went away while this QEMU's page faults depended on it; stopping QEMU\n"
            ));
            // SAFETY: _exit ends the process at once; no Rust state outlives it.
            unsafe { libc::_exit(1) };
        }
    }
}

fn postcopy_socket() -> Option<std::path::PathBuf> {
    std::env::var_os("DBMIGRATE_POSTCOPY_SOCKET").map(std::path::PathBuf::from)
}

/// Makes sure `dir` is a directory only this process's user may enter
/// (mode 0700, owned by it), creating it if missing; Err says why not.
fn private_dir(dir: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("cannot create {}: {e}", dir.display())),
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if !meta.is_dir() || meta.mode() & 0o077 != 0 || meta.uid() != me {
        return Err(format!(
            "{} must be a directory of uid {me} with mode 0700 (it is mode {:o}, uid {}): the post-copy socket hands out the guest's memory",
            dir.display(),
            meta.mode() & 0o7777,
            meta.uid()
        ));
    }
    Ok(())
}

/// Whether a process of `uid` may take the descriptor: root (the agent) or
/// this QEMU's own user.
fn trusted_uid(uid: u32) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    uid == 0 || uid == unsafe { libc::geteuid() }
}

/// Post-copy destination: registers the RAM mapping for missing-page faults
/// (minor faults on hugetlbfs, whose pages of `huge` bytes can only be
/// placed whole) and hands the descriptor, with the mapping's address,
/// length and the size of the unit a fault is served in, to the
/// first process of a trusted user (`SO_PEERCRED`: root or QEMU's own user)
/// that connects to `sock` (the destination agent), once: the socket, in a
/// directory of mode 0700, is then removed. QEMU keeps its own copy open,
/// so an agent that dies leaves faults blocked, never filled with zeros
/// behind the guest's back, and this library then stops QEMU.
fn serve_postcopy(path: &str, addr: u64, len: u64, huge: Option<u64>, sock: std::path::PathBuf) {
    // Not on an allocation path: the RAM file is mapped once, at startup.
    let registered = match huge {
        Some(_) => dbmigrate_uffd::register_minor(addr, len),
        None => dbmigrate_uffd::register_missing(addr, len),
    };
    let uffd = match registered {
        Ok(u) => u,
        Err(e) => {
            say(format_args!(
                "dbmigrate-preload: cannot register {path} for post-copy: {e}\n"
            ));
            return;
        }
    };
    let dir = sock.parent().unwrap_or(std::path::Path::new("/"));
    if let Err(why) = private_dir(dir) {
        say(format_args!(
            "dbmigrate-preload: no post-copy socket: {why}\n"
        ));
        return;
    }
    let _ = std::fs::remove_file(&sock);
    let listener = match std::os::unix::net::UnixListener::bind(&sock) {
        Ok(l) => l,
        Err(e) => {
            say(format_args!(
                "dbmigrate-preload: cannot listen on {}: {e}\n",
                sock.display()
            ));
            return;
        }
    };
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600));
    }
    say(format_args!(
        "dbmigrate-preload: post-copy for {path} at {addr:#x}-{:#x}, descriptor offered once on {}\n",
        addr.wrapping_add(len),
        sock.display()
    ));
    // Further RAM files are registered with the same descriptor as QEMU
    // maps them (before the agent connects: QEMU maps its memory
    // backends at startup), and the offer is made when the agent comes.
    POSTCOPY_UFFD.store(uffd.as_raw_fd(), Ordering::SeqCst);
    note_postcopy_map(addr, len);
    let unit = huge.unwrap_or(4096);
    let spawned = std::thread::Builder::new()
        .name("dbmigrate-uffd".into())
        .spawn(move || {
            let conn = loop {
                let Ok((conn, _)) = listener.accept() else {
                    // Out of descriptors or the like: do not spin.
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    continue;
                };
                match dbmigrate_uffd::peer_cred(&conn) {
                    Ok(c) if trusted_uid(c.uid) => {}
                    Ok(c) => {
                        say(format_args!(
                            "dbmigrate-preload: refused the post-copy descriptor to pid {} (uid {})\n",
                            c.pid, c.uid
                        ));
                        continue;
                    }
                    Err(_) => continue,
                }
                if let Err(e) = dbmigrate_uffd::send_fd(&conn, &uffd, &postcopy_offer(unit)) {
                    say(format_args!(
                        "dbmigrate-preload: handing over the post-copy descriptor failed: {e}\n"
                    ));
                    continue;
                }
                break conn;
            };
            // Served once: nobody else gets the guest's memory.
            drop(listener);
            let _ = std::fs::remove_file(&sock);
            watch_agent(conn);
            // Every page is in place; the descriptor closes with this
            // thread, and a later mapping must not be registered with it.
            POSTCOPY_UFFD.store(POSTCOPY_OVER, Ordering::SeqCst);
        });
    if let Err(e) = spawned {
        // The descriptor is closed with the closure that failed to start:
        // neither it nor the mapping registered with it may be offered.
        POSTCOPY_UFFD.store(-1, Ordering::SeqCst);
        POSTCOPY_COUNT.store(0, Ordering::SeqCst);
        say(format_args!(
            "dbmigrate-preload: cannot start the post-copy descriptor thread: {e}\n"
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buf(s: &str) -> PathBuf {
        let mut out = PathBuf {
            buf: [0; 4096],
            len: s.len(),
        };
        out.buf[..s.len()].copy_from_slice(s.as_bytes());
        out
    }

    #[test]
    fn a_path_matches_itself_only() {
        let want = buf("/dev/shm/vm1");
        assert!(path_matches(&want, &buf("/dev/shm/vm1")));
        assert!(!path_matches(&want, &buf("/dev/shm/vm10")));
        assert!(!path_matches(&want, &buf("/dev/shm/vm")));
    }

    #[test]
    fn a_pattern_matches_libvirts_names_within_one_directory_level() {
        let want = buf("/dev/shm/libvirt/qemu/*-vm1/pc.ram");
        assert!(path_matches(
            &want,
            &buf("/dev/shm/libvirt/qemu/1-vm1/pc.ram")
        ));
        assert!(path_matches(
            &want,
            &buf("/dev/shm/libvirt/qemu/37-vm1/pc.ram")
        ));
        assert!(!path_matches(
            &want,
            &buf("/dev/shm/libvirt/qemu/3-vm2/pc.ram")
        ));
        // `*` does not cross a `/`.
        assert!(!path_matches(
            &want,
            &buf("/dev/shm/libvirt/qemu/x/1-vm1/pc.ram")
        ));
        assert!(!path_matches(
            &want,
            &buf("/dev/shm/libvirt/qemu/1-vm1/pc.ram.old")
        ));
        assert!(!path_matches(&want, &buf("/dev/shm/libvirt/qemu/1-vm1")));
    }

    #[test]
    fn components_match_stars_and_question_marks() {
        for (p, t, m) in [
            ("*", "", true),
            ("*", "abc", true),
            ("a*c", "abbbc", true),
            ("a*c", "abbb", false),
            ("*-vm1", "12-vm1", true),
            ("*-vm1", "12-vm10", false),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("*a*b", "xaxxb", true),
            ("pc.ram", "pc.ram", true),
        ] {
            assert_eq!(component_matches(p.as_bytes(), t.as_bytes()), m, "{p} {t}");
        }
    }
}
