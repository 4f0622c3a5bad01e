//! `dbmigrate receive`: the destination host's side.
//!
//! The destination QEMU waits with `-S -incoming defer`; this agent fills its
//! RAM file, checks it against the source's digests, lets QEMU load device
//! state, and resumes the VM only when the source commits.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use dbmigrate_core::dest::{self, DestSession, FaultRange, FaultSource, Received, SessionPeer};
use dbmigrate_core::gate::Gate;
use dbmigrate_core::protocol::DEVICE_STATE_CONN;
use dbmigrate_core::ram::{DestRam, RamFile};
use dbmigrate_core::transport::Acceptor;
use serde_json::json;
use tokio::net::TcpListener;

use crate::devstate::{self, PrivateDir};
use crate::qemu;
use crate::qmp::Qmp;
use dbmigrate_core::protocol::guest::{match_disks, DiskId};

/// Settings of one incoming migration.
pub struct ReceiveArgs {
    /// Destination QEMU's QMP socket.
    pub qmp: PathBuf,
    /// Where the source agent connects.
    pub listen: SocketAddr,
    /// How connections are secured.
    pub acceptor: Acceptor,
    /// Where this agent makes its private directory (QEMU's device-state socket).
    pub run_dir: PathBuf,
    /// Longest silence of the source tolerated.
    pub peer_timeout: Duration,
    /// Keep the destination QEMU after a failed attempt (default: quit it).
    pub keep_qemu: bool,
    /// The VM's disks, for rebuilding pages from references, indexed as
    /// the destination QEMU lists them.
    pub storage: Option<std::sync::Arc<dyn dbmigrate_core::storage::Storage>>,
    /// The destination QEMU's disks with their names (empty: not asked),
    /// matched with the source's when it names its disks.
    pub storage_disks: Vec<DiskId>,
    /// Pace of the rebuild's background storage reads, bytes/s.
    pub storage_bandwidth: Option<u64>,
    /// Blocks one storage read goes through unasked (None: the engine's default).
    pub storage_read_gap_blocks: Option<usize>,
    /// Where QEMU's preload library offers the RAM's userfaultfd (post-copy).
    pub postcopy_socket: Option<PathBuf>,
    /// When the RAM is allocated.
    pub prealloc: Prealloc,
    /// Back to full priority when post-copy starts.
    pub priority: crate::priority::Priority,
}

/// When the destination allocates the guest's RAM (`receive --prealloc`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Prealloc {
    /// While the first round arrives, on a few threads.
    Background,
    /// All of it before listening.
    Upfront,
    /// As pages arrive.
    Off,
}

/// Threads that allocate the RAM in the background: half the host's
/// cores, one at least and four at most (the first round needs the rest).
fn prealloc_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    (cores / 2).clamp(1, 4)
}

/// Receives one VM. Ok when it runs here.
pub async fn receive(args: ReceiveArgs) -> Result<dest::DestStats> {
    let mut qmp = Qmp::connect(&args.qmp)
        .await
        .context("connecting to the destination QEMU")?;
    let status = qmp.status().await?;
    if status != "inmigrate" {
        bail!("the destination QEMU is `{status}`, not waiting for a migration: start it with `-S -incoming defer` and the same machine options as the source");
    }
    // While `inmigrate`, `stop` clears QEMU's autostart: a QEMU started
    // without -S then also waits for this agent's `cont` after Commit
    // instead of running the guest as soon as device state has loaded.
    qmp.execute("stop", None)
        .await
        .context("keeping the destination QEMU paused until Commit")?;
    let backends = qemu::ram_backends(&mut qmp).await?;
    for b in &backends {
        refuse_shared_ram(&b.mem_path, qmp.pid())?;
    }
    let ram_files = qemu::ram_files(&backends);
    let ram_bytes: u64 = backends.iter().map(|b| b.size).sum();
    qemu::set_capability(&mut qmp, "x-ignore-shared", true).await?;
    let dir = PrivateDir::create(&args.run_dir, "receive", devstate::process_uid(qmp.pid()))?;
    let incoming = dir.path().join("incoming.sock");
    let uri = devstate::unix_uri(&incoming);
    qmp.execute("migrate-incoming", Some(json!({"uri": uri})))
        .await
        .context("making the destination QEMU listen for device state")?;
    let mut ram = DestRam::open_files(&ram_files).context("mapping the destination RAM file")?;
    match args.prealloc {
        Prealloc::Upfront => {
            let t = Instant::now();
            ram.zero_and_allocate().context(
                "allocating the guest's RAM before the migration (`--prealloc background` or `off` skips this)",
            )?;
            tracing::info!(
                ms = dbmigrate_core::stats::millis(t.elapsed()),
                bytes = ram_bytes,
                "guest RAM allocated"
            );
        }
        Prealloc::Background => {
            let threads = prealloc_threads();
            ram.zero_and_allocate_in_background(threads)
                .context("starting the allocation of the guest's RAM")?;
            tracing::info!(
                threads,
                bytes = ram_bytes,
                page_bytes = ram.file_page_bytes(),
                "allocating the guest's RAM in the background"
            );
        }
        Prealloc::Off => {}
    }
    let (faults, lease) = match &args.postcopy_socket {
        Some(path) => {
            let (f, lease) = fault_source(path, &ram_files, ram.file_page_bytes(), qmp.pid())?;
            (Some(f), Some(lease))
        }
        None => (None, None),
    };
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {} (is another agent using it?)", args.listen))?;
    let gate = Gate::open(listener, args.acceptor.clone());
    crate::report::note_cpu_at_listen();
    tracing::info!(listen = %args.listen, tls = args.acceptor.is_tls(), %uri, ram = %ram_files[0].path.display(), files = ram_files.len(), size = ram_bytes, "waiting for the source agent");

    let result = tokio::select! {
        r = session(&args, &mut qmp, gate, ram, (faults, lease), &incoming) => r,
        s = crate::interrupted() => Err(anyhow!("interrupted by {s} before the VM was resumed here")),
    };
    if let Err(e) = &result {
        if !args.keep_qemu && !matches!(qmp.status().await.as_deref(), Ok("running")) {
            // This QEMU never ran the guest; a new attempt needs a fresh one.
            let _ = qmp.execute("quit", None).await;
            tracing::warn!("destination QEMU discarded: {e:#}");
        }
    }
    result
}

/// The connection to the preload library inside the destination QEMU. While
/// it is open without a word, QEMU's page faults may depend on this agent:
/// if the agent dies or drops it (an attempt that failed, an interruption
/// with pages missing), the library stops QEMU rather than leave a vCPU
/// blocked on a page nobody will bring. [`FaultLease::done`] says every
/// page is in place.
struct FaultLease(std::os::unix::net::UnixStream);

impl FaultLease {
    /// Every page is in place: QEMU no longer depends on this agent.
    fn done(self) {
        use std::io::Write;
        if let Err(e) = (&self.0).write_all(b"D") {
            tracing::warn!(error = %e, "could not tell the destination QEMU that every page is in place");
        }
        tracing::info!("every page in place: the destination QEMU no longer depends on this agent");
    }
}

/// Takes the RAM's userfaultfd from the destination QEMU's preload library;
/// the process at the other end must be `qemu_pid`, its fault unit the RAM
/// files' page size (`file_page`), and every RAM file (`files`, in the
/// run's order) registered with it.
fn fault_source(
    path: &std::path::Path,
    files: &[RamFile],
    file_page: u64,
    qemu_pid: Option<u32>,
) -> Result<(FaultSource, FaultLease)> {
    let sock = std::os::unix::net::UnixStream::connect(path).with_context(|| {
        format!(
            "connecting to {} for the destination QEMU's fault descriptor: start QEMU with LD_PRELOAD and DBMIGRATE_POSTCOPY_SOCKET={} (see `dbmigrate env --postcopy-socket`)",
            path.display(),
            path.display()
        )
    })?;
    let peer = dbmigrate_uffd::peer_cred(&sock)
        .with_context(|| format!("reading who listens on {}", path.display()))?;
    let qemu_pid = qemu_pid
        .context("could not learn the destination QEMU's pid from its QMP socket (SO_PEERCRED)")?;
    if peer.pid != qemu_pid {
        bail!("{} is served by pid {}, not by the destination QEMU (pid {qemu_pid}): refusing its descriptor; check DBMIGRATE_POSTCOPY_SOCKET", path.display(), peer.pid);
    }
    sock.set_read_timeout(Some(Duration::from_secs(5)))
        .context("setting a timeout on the fault-descriptor socket")?;
    let (uffd, payload) = dbmigrate_uffd::recv_fd(&sock)
        .with_context(|| format!("receiving the fault descriptor from {}", path.display()))?;
    let (maps, unit) = registered(&payload)
        .with_context(|| format!("the fault descriptor from {}", path.display()))?;
    // One file: the mapping the library registered first. Several: each
    // file's mapping as QEMU's address space shows it.
    let files: Vec<(u64, u64)> = match files {
        [one] => vec![(maps[0].0, one.size)],
        _ => files
            .iter()
            .map(|f| {
                let r =
                    dbmigrate_core::dirty::find_mapping(qemu_pid, &f.path).with_context(|| {
                        format!(
                            "finding {} in the destination QEMU's address space",
                            f.path.display()
                        )
                    })?;
                Ok((r.start, f.size))
            })
            .collect::<Result<_>>()?,
    };
    let ranges = fault_ranges(&maps, unit, &files, file_page)
        .with_context(|| format!("the fault descriptor from {}", path.display()))?;
    tracing::info!(
        base = format_args!("{:#x}", ranges[0].base),
        mappings = ranges.len(),
        unit,
        "post-copy fault descriptor received"
    );
    Ok((FaultSource { uffd, ranges, unit }, FaultLease(sock)))
}

/// The mappings a fault descriptor came with (`payload`: the first
/// mapping's address and length and the fault unit, little-endian u64s,
/// then the address and length of each further mapping registered with it;
/// a library of before hugetlbfs support sends no unit: 4 KiB), and that
/// unit. Pure.
fn registered(payload: &[u8]) -> Result<(Vec<(u64, u64)>, u64)> {
    let field = |i: usize| {
        payload
            .get(i * 8..i * 8 + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    let (Some(base), Some(len)) = (field(0), field(1)) else {
        bail!("came without its mapping (got {} bytes): is the preload library the same dbmigrate version?", payload.len());
    };
    let unit = field(2).unwrap_or(4096);
    let mut maps = vec![(base, len)];
    let mut i = 3;
    while let (Some(b), Some(l)) = (field(i), field(i + 1)) {
        maps.push((b, l));
        i += 2;
    }
    Ok((maps, unit))
}

/// The fault ranges of the RAM files (`files`: each one's mapping address
/// in QEMU and size, in the run's order), each checked to be registered
/// with the descriptor (`maps`, in `unit`s) at that address and at least
/// that long, faults served in the RAM files' pages (`file_page`),
/// starting on one. Pure.
fn fault_ranges(
    maps: &[(u64, u64)],
    unit: u64,
    files: &[(u64, u64)],
    file_page: u64,
) -> Result<Vec<FaultRange>> {
    if unit != file_page {
        bail!("serves faults in units of {unit} bytes, but the RAM file's pages are {file_page} bytes: is the preload library the same dbmigrate version?");
    }
    if unit != 4096 && unit != 2 << 20 {
        bail!("serves faults in units of {unit} bytes: post-copy takes RAM on 4 KiB or 2 MiB pages (a guest on 1 GiB pages can use pre-copy)");
    }
    if maps.len() > files.len() {
        bail!("registers {} mappings with the descriptor but the VM's RAM is in {} file(s): DBMIGRATE_TRACK_PATH also matches a shared file that is not a memory backend of the VM's RAM; narrow it to their mem-paths", maps.len(), files.len());
    }
    let mut out = Vec::with_capacity(files.len());
    let mut start = 0;
    for &(base, size) in files {
        let Some(&(_, len)) = maps.iter().find(|m| m.0 == base) else {
            bail!("does not cover QEMU's RAM mapping at {base:#x} ({} of {} RAM files registered): DBMIGRATE_TRACK_PATH must match every memory backend's mem-path", maps.len(), files.len());
        };
        if len < size {
            bail!("registers {len} bytes for post-copy but the RAM backend has {size}: DBMIGRATE_TRACK_PATH must name the RAM backend's mem-path");
        }
        if base % unit != 0 {
            bail!("maps the RAM at {base:#x}, not on a {unit}-byte page");
        }
        out.push(FaultRange {
            base,
            len: size,
            start,
        });
        start += size;
    }
    Ok(out)
}

/// Waits for QEMU to have loaded device state, then resumes the VM.
async fn resume_vm(qmp: &mut Qmp) -> Result<(), String> {
    let mut status = String::new();
    // Polled tightly: this wait is part of the downtime.
    for _ in 0..5000 {
        status = qmp
            .status()
            .await
            .map_err(|e| format!("destination QEMU failed while loading device state: {e}"))?;
        if status != "inmigrate" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    match status.as_str() {
        "paused" | "prelaunch" => qmp
            .execute("cont", None)
            .await
            .map(|_| ())
            .map_err(|e| format!("destination QEMU refused to resume: {e}")),
        "running" => Ok(()),
        other => Err(format!(
            "destination QEMU is `{other}` after device state, cannot resume it"
        )),
    }
}

/// Whether the destination VM runs, as confirmed after a failed resume.
enum VmState {
    Running,
    Stopped,
    Unknown,
}

/// Makes sure the destination VM does not run, on a fresh QMP connection
/// (the old one may hold a late answer, and QEMU drops what it queued when
/// it closes): `stop` and check, or if QEMU does not answer, SIGKILL it and
/// wait for it to be gone.
async fn confirm_stopped(qmp: &mut Qmp) -> VmState {
    let pid = qmp.pid();
    let asked = async {
        qmp.reconnect().await?;
        if qmp.status().await? == "running" {
            return Ok::<_, crate::qmp::QmpError>(VmState::Running);
        }
        qmp.execute("stop", None).await?;
        Ok(if qmp.status().await? == "running" {
            VmState::Running
        } else {
            VmState::Stopped
        })
    };
    if let Ok(Ok(state)) = tokio::time::timeout(Duration::from_secs(20), asked).await {
        return state;
    }
    let Some(pid) = pid else {
        return VmState::Unknown;
    };
    sigkill(pid);
    for _ in 0..100 {
        if process_gone(pid) {
            tracing::error!(
                pid,
                "destination QEMU killed: it did not answer after a failed resume"
            );
            return VmState::Stopped;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    VmState::Unknown
}

/// Kills the destination QEMU at once (it may be stuck on a page or not answering).
fn sigkill(pid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status();
}

/// Whether `pid` has exited (gone, or a zombie its parent has not reaped).
fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state follows the command name's closing parenthesis.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
    }
}

/// Stops a destination VM whose memory can no longer be completed: QMP
/// `quit`, or SIGKILL if QEMU does not answer (a vCPU or the main loop may
/// be blocked on a page that will never come).
async fn stop_incomplete_vm(qmp: &mut Qmp) {
    let pid = qmp.pid();
    let quit = tokio::time::timeout(Duration::from_secs(3), qmp.execute("quit", None)).await;
    if !matches!(quit, Ok(Ok(_))) {
        if let Some(pid) = pid {
            sigkill(pid);
        }
    }
    tracing::error!("destination VM stopped: its memory could not be completed");
}

/// Refuses a RAM file that a process other than the destination QEMU (and
/// this agent) maps: its pages are about to be overwritten.
fn refuse_shared_ram(path: &std::path::Path, qemu_pid: Option<u32>) -> Result<()> {
    let me = std::process::id();
    let others: Vec<u32> = dbmigrate_core::mappers::processes_mapping(path)
        .with_context(|| format!("finding the processes that map {}", path.display()))?
        .into_iter()
        .filter(|&p| Some(p) != qemu_pid && p != me)
        .collect();
    if let Some(&pid) = others.first() {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        bail!(
            "the destination RAM file {} is also mapped by pid {pid} ({}){}: receiving would overwrite that process's memory (a source QEMU on this host with the same mem-path?); give the destination QEMU a RAM file of its own",
            path.display(),
            comm.trim(),
            if others.len() > 1 { format!(" and {} other process(es)", others.len() - 1) } else { String::new() }
        );
    }
    Ok(())
}

/// Serves the connections that arrive once the session is set up: the
/// session's device-state connection (its id, its source's certificate) is
/// relayed into QEMU, once; any other is dropped. Runs until aborted, and
/// the relay with it.
async fn serve_device_state(mut gate: Gate, peer: SessionPeer, incoming: PathBuf) {
    let mut relay = tokio::task::JoinSet::new();
    while let Some(a) = gate.next().await {
        if !peer.owns(&a) || a.hello.conn_index != DEVICE_STATE_CONN || !relay.is_empty() {
            tracing::warn!(peer = %a.peer, conn = a.hello.conn_index, "ignored a connection that is not this session's device state");
            continue;
        }
        let incoming = incoming.clone();
        relay.spawn(async move {
            match devstate::into_vmm(a.conn, &incoming).await {
                Ok(bytes) => tracing::info!(bytes, "device state relayed into QEMU"),
                Err(e) => tracing::error!(error = %format!("{e:#}"), "relaying device state into QEMU failed: QEMU's load fails with it"),
            }
        });
    }
}

/// An error with its causes, for the source to read in an Abort.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `storage` (indexed as this host's QEMU lists the disks, `here`) indexed
/// as the source's references are (`source`, the source QEMU's order),
/// matching the disks by name ([`match_disks`]); as it is when either side
/// did not name its disks or the orders agree.
fn in_source_order(
    storage: std::sync::Arc<dyn dbmigrate_core::storage::Storage>,
    source: &[DiskId],
    here: &[DiskId],
) -> std::sync::Arc<dyn dbmigrate_core::storage::Storage> {
    if source.is_empty() || here.is_empty() {
        return storage;
    }
    let index = match_disks(source, here);
    let same = index.len() == here.len()
        && index
            .iter()
            .enumerate()
            .all(|(i, k)| *k == u16::try_from(i).ok());
    if same {
        return storage;
    }
    tracing::info!(
        ?source,
        ?here,
        ?index,
        "the source lists the VM's disks in another order: storage follows its order"
    );
    dbmigrate_core::storage::reindex(storage, index)
}

async fn session(
    args: &ReceiveArgs,
    qmp: &mut Qmp,
    mut gate: Gate,
    ram: DestRam,
    (faults, mut lease): (Option<FaultSource>, Option<FaultLease>),
    incoming: &std::path::Path,
) -> Result<dest::DestStats> {
    let postcopy = faults.is_some();
    let ram_files = ram.file_sizes();
    let mut s: DestSession = dest::accept(&mut gate, &ram_files, postcopy, args.peer_timeout)
        .await
        .context("accepting the source agent")?;
    let _relay = AbortOnDrop(tokio::spawn(serve_device_state(
        gate,
        s.peer(),
        incoming.to_path_buf(),
    )));
    let storage = args
        .storage
        .clone()
        .map(|st| in_source_order(st, &s.hello().disks, &args.storage_disks));
    s.set_storage_rate(args.storage_bandwidth);
    if let Some(blocks) = args.storage_read_gap_blocks {
        s.set_storage_read_gap(blocks);
    }
    let t = Instant::now();
    let received = match s.receive(ram, storage, faults).await {
        Ok(r) => r,
        Err(e) => {
            s.abort(&chain(&e)).await;
            return Err(anyhow!(e).context("receiving guest RAM"));
        }
    };
    let (ram, matched) = match received {
        Received::Complete { ram, matched } => {
            // Every page arrived by pre-copy: no fault will wait on this agent.
            if let Some(l) = lease.take() {
                l.done();
            }
            (ram, matched)
        }
        Received::Postcopy(run) => {
            args.priority
                .restore("post-copy: the guest runs here and waits on its faults");
            let mut resumed = false;
            let resume = async {
                let r = resume_vm(qmp).await;
                resumed = r.is_ok();
                if resumed {
                    tracing::info!("VM resumed on the destination; post-copy continues");
                    crate::failpoint::hit("dst-postcopy");
                }
                r
            };
            let placed = || {
                if let Some(l) = lease.take() {
                    l.done();
                }
            };
            let outcome = s.postcopy(run, resume, placed).await;
            return match outcome {
                Ok(o) => {
                    tracing::info!(
                        ms = dbmigrate_core::stats::millis(t.elapsed()),
                        faults = s.stats.faults,
                        network_faults = s.stats.network_faults,
                        storage_faults = s.stats.storage_faults,
                        longest_stall_us = s.stats.longest_stall_us,
                        matched = o.matched,
                        "post-copy complete"
                    );
                    if !o.compared {
                        tracing::error!("post-copy: every page is placed and the VM runs here, but the source went silent before the comparison; the VM's memory is unverified (check the guest)");
                        return Ok(s.stats.clone());
                    }
                    if !o.matched {
                        bail!("post-copy placed pages that differ from the source's frozen RAM in {} chunk(s): the VM's memory is suspect", o.mismatched_chunks);
                    }
                    Ok(s.stats.clone())
                }
                Err(e) => {
                    if resumed {
                        // The source keeps the frozen RAM; tell it why first.
                        s.abort(&format!(
                            "post-copy failed after the VM was resumed on the destination: {e}"
                        ))
                        .await;
                        stop_incomplete_vm(qmp).await;
                        Err(anyhow!(e).context(
                            "post-copy failed after the VM was resumed here; the destination VM was stopped (its memory is incomplete) and the source holds the VM's frozen RAM",
                        ))
                    } else {
                        s.abort(&chain(&e)).await;
                        Err(anyhow!(e).context("post-copy failed before the VM was resumed here; the source keeps the VM"))
                    }
                }
            };
        }
    };
    tracing::info!(
        ms = dbmigrate_core::stats::millis(t.elapsed()),
        raw = s.stats.raw_pages,
        zero = s.stats.zero_pages,
        verify_ms = s.stats.verify_ms,
        matched,
        "RAM received"
    );
    if !matched {
        bail!("RAM differs from the source at switchover; the source keeps the VM");
    }
    s.wait_commit()
        .await
        .context("waiting for the source to commit")?;
    crate::failpoint::hit("dst-commit");
    // QEMU has loaded device state by now (the source waited for its
    // migration to complete before committing); confirm before resuming.
    if let Err(reason) = resume_vm(qmp).await {
        // An Abort makes the source resume its VM: only once this one is
        // known not to run (a `cont` that timed out may still take effect).
        match confirm_stopped(qmp).await {
            VmState::Running => {
                tracing::warn!(%reason, "the resume reported a failure, but the VM runs here");
            }
            VmState::Stopped => {
                s.abort(&reason).await;
                bail!(reason);
            }
            VmState::Unknown => bail!(
                "{reason}; whether the destination VM runs is unknown, so the source was not told to take the VM back: check the destination QEMU, then resume the source (QMP `cont`) only if it does not run"
            ),
        }
    }
    // The VM runs here now, whether or not the source hears it.
    if let Err(e) = s.activated().await {
        tracing::warn!(error = %e, "VM resumed, but the source did not get the confirmation");
    }
    tracing::info!("VM resumed on the destination");
    // Only now: unmapping a RAM whose every page is mapped here takes a
    // while, and before the resume it was part of the downtime.
    let _ = tokio::task::spawn_blocking(move || drop(ram)).await;
    Ok(s.stats.clone())
}

#[cfg(test)]
mod tests {
    use super::{fault_ranges, registered, FaultRange};
    use anyhow::Result;

    fn payload(fields: &[u64]) -> Vec<u8> {
        fields.iter().flat_map(|f| f.to_le_bytes()).collect()
    }

    /// The one file's check, as for a RAM of one file of `ram` bytes.
    fn fault_mapping(payload: &[u8], ram: u64, page: u64) -> Result<(u64, u64, u64)> {
        let (maps, unit) = registered(payload)?;
        let r = fault_ranges(&maps, unit, &[(maps[0].0, ram)], page)?;
        Ok((r[0].base, maps[0].1, unit))
    }

    #[test]
    fn every_ram_file_must_be_registered() {
        let p = 4096;
        let (maps, unit) =
            registered(&payload(&[0x9000_0000, 3 * p, p, 0x1000_0000, 5 * p])).unwrap();
        assert_eq!(maps, vec![(0x9000_0000, 3 * p), (0x1000_0000, 5 * p)]);
        let files = [(0x9000_0000, 3 * p), (0x1000_0000, 5 * p)];
        assert_eq!(
            fault_ranges(&maps, unit, &files, p).unwrap(),
            vec![
                FaultRange {
                    base: 0x9000_0000,
                    len: 3 * p,
                    start: 0
                },
                FaultRange {
                    base: 0x1000_0000,
                    len: 5 * p,
                    start: 3 * p
                }
            ]
        );
        // A second file the library did not register (an older library,
        // or a pattern that matches one file only).
        let e = fault_ranges(&maps[..1], unit, &files, p).unwrap_err();
        assert!(e.to_string().contains("1 of 2 RAM files"), "{e}");
        // A registered mapping that is no RAM file (the pattern matches
        // another shared file) would leave its faults unserved.
        let e = fault_ranges(&maps, unit, &files[..1], p).unwrap_err();
        assert!(e.to_string().contains("narrow it"), "{e}");
    }

    #[test]
    fn a_fault_descriptor_must_fit_the_ram_file() {
        let huge = 2 << 20;
        // Today's library: address, length, unit.
        let ok = fault_mapping(&payload(&[4 * huge, 8 * huge, huge]), 8 * huge, huge);
        assert_eq!(ok.unwrap(), (4 * huge, 8 * huge, huge));
        // A library of before hugetlbfs support: 4 KiB.
        let old = fault_mapping(&payload(&[4096, 1 << 20]), 1 << 20, 4096);
        assert_eq!(old.unwrap(), (4096, 1 << 20, 4096));
        let err = |p: &[u64], ram: u64, page: u64| {
            fault_mapping(&payload(p), ram, page)
                .unwrap_err()
                .to_string()
        };
        assert!(err(&[0], 4096, 4096).contains("without its mapping"));
        assert!(err(&[0, 4096], 8192, 4096).contains("RAM backend has 8192"));
        // A 4 KiB registration over a hugetlbfs file, and the reverse.
        assert!(err(&[0, huge, 4096], huge, huge).contains("units of 4096"));
        assert!(err(&[0, huge, huge], huge, 4096).contains("units of 2097152"));
        assert!(err(&[0, 1 << 30, 1 << 30], 1 << 30, 1 << 30).contains("1 GiB"));
        assert!(err(&[4096, 2 * huge, huge], 2 * huge, huge).contains("not on a"));
    }
}
