//! `dbmigrate migrate`: the source host's side.
//!
//! Owns the promise that until the destination commits, the source VM stays
//! authoritative: every failure path before [`SourceSession::commit`] resumes
//! the source (if we paused it), cancels QEMU's device-state migration and
//! restores the migration capability we changed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use dbmigrate_core::dirty;
use dbmigrate_core::protocol::guest::DiskId;
use dbmigrate_core::ram::SourceRam;
use dbmigrate_core::source::{
    switch_to_postcopy, Decision, GuestSignal, Mode, PostcopyError, SourceConfig, SourceError,
    SourceSession, StopReason,
};
use dbmigrate_core::stats::RoundStats;
use serde_json::json;

use dbmigrate_core::stats::millis as ms;

use crate::devstate::{PrivateDir, RelayError, SourceRelay};
use crate::progress::Progress;
use crate::qemu;
use crate::qmp::Qmp;
use crate::report::{MigrationReport, PageCounts, VmLocation};

/// Settings of one outgoing migration.
pub struct MigrateArgs {
    /// Source QEMU's QMP socket.
    pub qmp: PathBuf,
    /// Destination agent.
    pub to: SocketAddr,
    /// Engine settings.
    pub config: SourceConfig,
    /// Show a progress bar.
    pub progress: bool,
    /// Quit the source QEMU once the destination runs.
    pub quit_source: bool,
    /// Socket of the guest agent's virtio-serial port, to rebuild pages from shared storage.
    pub guest_hints: Option<PathBuf>,
    /// How often hints are refreshed.
    pub hints_refresh: Duration,
    /// Who finds the buffer-pool pages.
    pub hint_scan: HintScan,
    /// Back to full priority when the VM pauses.
    pub priority: crate::priority::Priority,
    /// Where this agent makes its private directory (QEMU's device-state socket).
    pub run_dir: PathBuf,
    /// Pace the pages so that the guest's vCPUs wait at most this share
    /// (0..1) of their runnable time more than before (None: unpaced).
    pub guest_impact_budget: Option<f64>,
    /// Ask the guest agent for a census of the guest's memory before the
    /// first round, and report what was sent of each kind of page.
    pub page_census: bool,
    /// Add hints for the guest's clean page cache (files its processes
    /// have open or mapped on the VM's disks) to the buffer pool's.
    pub hint_page_cache: bool,
}

/// How long the adaptive pace watches the guest's vCPUs for their
/// baseline before the migration starts.
const BASELINE_LOOK: Duration = Duration::from_millis(500);

/// QEMU's device-state migration under way through this agent's relay.
struct DeviceRelay {
    _dir: PrivateDir,
    task: tokio::task::JoinHandle<Result<u64, RelayError>>,
}

/// How long the relay may take to pass on QEMU's last bytes once QEMU
/// reports its migration complete.
const RELAY_DRAIN: Duration = Duration::from_secs(10);

/// Opens the session's device-state connection, has QEMU migrate to a
/// socket in this agent's private directory and relays it there. The URI
/// is built here; nothing from the destination goes into it.
async fn start_device_state(
    args: &MigrateArgs,
    qmp: &mut Qmp,
    session: &SourceSession,
) -> Result<DeviceRelay> {
    let dir = PrivateDir::create(
        &args.run_dir,
        "migrate",
        crate::devstate::process_uid(qmp.pid()),
    )?;
    let relay = SourceRelay::bind(&dir)?;
    let uri = relay.uri();
    let peer = session
        .open_device_state()
        .await
        .context("opening the device-state connection to the destination agent")?;
    let task = tokio::spawn(relay.run(peer));
    if let Err(e) = qmp.execute("migrate", Some(json!({ "uri": uri }))).await {
        task.abort();
        return Err(anyhow!(e).context("starting QEMU's device-state migration"));
    }
    Ok(DeviceRelay { _dir: dir, task })
}

/// Waits for QEMU's device-state migration to complete and for the relay
/// to have passed its every byte on. Returns QEMU's count of bytes sent.
async fn finish_device_state(qmp: &mut Qmp, relay: DeviceRelay) -> Result<u64> {
    let info = match qemu::wait_migration(qmp, Duration::from_secs(60)).await {
        Ok(info) => info,
        Err(e) => {
            // QEMU sees only a broken socket; the relay knows why.
            let why = match tokio::time::timeout(Duration::from_secs(1), relay.task).await {
                Ok(Ok(Err(r))) => format!(" (the relay to the destination agent: {r})"),
                _ => String::new(),
            };
            return Err(anyhow!(e).context(format!("moving device state{why}")));
        }
    };
    let relayed = tokio::time::timeout(RELAY_DRAIN, relay.task)
        .await
        .map_err(|_| anyhow!("QEMU sent its device state but the relay to the destination agent did not finish within {} s", RELAY_DRAIN.as_secs()))?
        .map_err(|e| anyhow!("the device-state relay failed: {e}"))??;
    tracing::info!(
        bytes = relayed,
        "device state relayed to the destination agent"
    );
    Ok(info["ram"]["transferred"].as_u64().unwrap_or(0))
}

/// Who finds the buffer-pool pages in guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum HintScan {
    /// The guest agent sends only where each tablespace lies on the disks;
    /// this host finds the frames in guest RAM (native speed, almost no guest CPU).
    Host,
    /// The guest agent finds the frames and checks them against the server's
    /// list of clean pages (costs guest CPU and an INFORMATION_SCHEMA query).
    Guest,
}

/// `--mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeArg {
    /// Stop-and-copy once the rounds converge.
    Precopy,
    /// One round, then the VM runs on the destination.
    Postcopy,
    /// Pre-copy that switches to post-copy when it would not converge.
    Hybrid,
}

impl ModeArg {
    /// The name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            ModeArg::Precopy => "precopy",
            ModeArg::Postcopy => "postcopy",
            ModeArg::Hybrid => "hybrid",
        }
    }
}

impl From<ModeArg> for Mode {
    fn from(m: ModeArg) -> Self {
        match m {
            ModeArg::Precopy => Mode::Precopy,
            ModeArg::Postcopy => Mode::Postcopy,
            ModeArg::Hybrid => Mode::Hybrid,
        }
    }
}

/// Where the migration stands, for the cleanup path.
#[derive(Default)]
struct Undo {
    paused_by_us: bool,
    device_migration_started: bool,
    ignore_shared_was: Option<bool>,
}

/// Runs the migration; always returns a report, with `error` set on failure.
pub async fn migrate(args: MigrateArgs) -> MigrationReport {
    let mode = mode_name(args.config.mode);
    let mut report = MigrationReport {
        method: format!("dbmigrate-{mode}"),
        vm_runs_on: VmLocation::Source,
        ..MigrationReport::default()
    };
    let mut qmp = match Qmp::connect(&args.qmp).await {
        Ok(q) => q,
        Err(e) => {
            report.error = Some(format!(
                "{:#}",
                anyhow!(e).context("connecting to the source QEMU")
            ));
            return report;
        }
    };
    let mut undo = Undo::default();
    let start = Instant::now();
    let outcome = tokio::select! {
        r = run(&args, &mut qmp, &mut undo, &mut report, start) => r,
        s = crate::interrupted() => Err(anyhow!("interrupted by {s}")),
    };
    match outcome {
        Ok(()) => {
            report.completed = true;
            report.vm_runs_on = VmLocation::Destination;
        }
        Err(e) => {
            let committed = report.vm_runs_on != VmLocation::Source;
            report.error = Some(format!("{e:#}"));
            if !committed {
                // The failed step may have left a QMP command half-answered
                // (Ctrl-C in the middle of one): roll back on a fresh connection.
                drop(qmp);
                let fresh = Qmp::connect(&args.qmp).await;
                let undone = match fresh {
                    Ok(mut q) => roll_back(&mut q, &undo).await,
                    Err(e) => Err(anyhow!(e).context("reconnecting to the source QEMU")),
                };
                if let Err(undo_err) = undone {
                    report.error = Some(format!(
                        "{e:#}; ALSO FAILED TO RESUME THE SOURCE: {undo_err:#}"
                    ));
                    report.vm_runs_on = VmLocation::Unknown;
                }
            }
        }
    }
    report.total_ms = ms(start.elapsed());
    report
}

async fn roll_back(qmp: &mut Qmp, undo: &Undo) -> Result<()> {
    if undo.device_migration_started {
        // Ignore failure: the migration may already have ended.
        let _ = qmp.execute("migrate_cancel", None).await;
        for _ in 0..200 {
            let v = qmp.execute("query-migrate", None).await?;
            if !matches!(
                v["status"].as_str(),
                Some("active" | "cancelling" | "device" | "setup")
            ) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    if undo.paused_by_us {
        qmp.execute("cont", None)
            .await
            .context("resuming the source VM")?;
        tracing::warn!("source VM resumed: it stays authoritative");
    }
    if let Some(prev) = undo.ignore_shared_was {
        qemu::set_capability(qmp, "x-ignore-shared", prev)
            .await
            .context("restoring the x-ignore-shared capability")?;
    }
    Ok(())
}

/// The mode as `--mode` names it.
fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Precopy => "precopy",
        Mode::Postcopy => "postcopy",
        Mode::Hybrid => "hybrid",
    }
}

async fn run(
    args: &MigrateArgs,
    qmp: &mut Qmp,
    undo: &mut Undo,
    report: &mut MigrationReport,
    start: Instant,
) -> Result<()> {
    let status = qmp.status().await?;
    if status != "running" {
        bail!("the source VM is `{status}`; dbmigrate migrates a running VM (resume it with QMP `cont` first)");
    }
    let backends = qemu::ram_backends(qmp).await?;
    let layout = qemu::gpa_layout(qmp, &backends).await?;
    for b in &backends {
        tracing::info!(id = %b.id, path = %b.mem_path.display(), size = b.size, "source RAM backend");
    }
    tracing::info!(ranges = layout.len(), "guest-physical layout");
    report.gpa_layout = layout;
    let pid = qmp
        .pid()
        .context("could not learn QEMU's pid from its QMP socket (SO_PEERCRED)")?;
    let mut ranges = Vec::with_capacity(backends.len());
    for b in &backends {
        let range = dirty::find_mapping(pid, &b.mem_path)
            .with_context(|| format!("finding {} in QEMU's address space", b.mem_path.display()))?;
        if range.end - range.start != b.size {
            bail!(
                "QEMU maps {} bytes of {} but its backend {} has {} bytes: is that file another VM's too? Give each VM's memory backends files of their own",
                range.end - range.start,
                b.mem_path.display(),
                b.id,
                b.size
            );
        }
        ranges.push(range);
    }
    let tracker = dirty::open_run_tracker(&ranges).context("starting dirty-page tracking")?;
    let ram_files = qemu::ram_files(&backends);
    let ram_bytes: u64 = backends.iter().map(|b| b.size).sum();
    // The guest's wait share over a short look before this agent does
    // anything heavy is its baseline.
    let vcpus = match args.guest_impact_budget {
        Some(_) => {
            let mut v = crate::vcpus::VcpuThreads::of(qmp, pid).await?;
            let first = v.sample();
            tokio::time::sleep(BASELINE_LOOK).await;
            let baseline = first
                .zip(v.sample())
                .map_or(0.0, |(a, b)| b.wait_share_since(a));
            Some((v, baseline))
        }
        None => None,
    };
    report.tracker = format!("{:?}", tracker.kind());
    tracing::info!(tracker = ?tracker.kind(), pid, "dirty tracking ready");
    let ram = SourceRam::open_files(&ram_files).context("mapping the source RAM file")?;

    // The guest's hints (the layout from the guest agent, then a scan of
    // RAM: half a second) are fetched while the destination is reserved
    // and dirty tracking is armed.
    let mut hint_task = None;
    if let Some(path) = &args.guest_hints {
        let vmm_disks = qemu::disks(qmp).await?;
        if vmm_disks.is_empty() {
            bail!("--guest-hints needs the VM's disks, but QEMU reports no disk with a medium");
        }
        let disks = vmm_disks.clone();
        let (path, layout, every) = (path.clone(), report.gpa_layout.clone(), args.hints_refresh);
        let asks = crate::hints::Asks {
            census: args.page_census,
            page_cache: args.hint_page_cache,
        };
        let finder = if args.hint_scan == HintScan::Host {
            let ram = SourceRam::open_files(&ram_files)
                .context("mapping the source RAM file for the buffer-pool scan")?;
            crate::hints::Finder::Host(ram)
        } else {
            crate::hints::Finder::Guest
        };
        let task = tokio::task::spawn_blocking(move || {
            crate::hints::LiveHints::start(&path, layout, &vmm_disks, every, finder, asks)
        });
        hint_task = Some((task, disks));
    }
    let (mut session, live_hints) =
        prepare_session(args, qmp, undo, ram, tracker, hint_task).await?;
    let census = live_hints
        .as_ref()
        .and_then(|l| l.take_census())
        .and_then(|taken| start_census(taken, report, &mut session));
    if let (Some((v, baseline)), Some(budget)) = (vcpus, args.guest_impact_budget) {
        tracing::info!(
            budget_pct = budget * 100.0,
            baseline_wait_pct = baseline * 100.0,
            "adaptive pace on"
        );
        report.guest_impact = Some(crate::report::GuestImpact {
            budget_pct: budget * 100.0,
            baseline_wait_pct: baseline * 100.0,
        });
        session.pace_by_guest(Box::new(v), budget, baseline);
    }

    let result = drive(args, qmp, undo, report, start, ram_bytes, &mut session).await;
    session.stop_pacing();
    if let Some(l) = &live_hints {
        l.stop();
        report.hints = Some(crate::report::HintReport::from(l.as_ref()));
    }
    if let (Some(c), Some(r)) = (&census, report.census.as_mut()) {
        r.rows = c.table(ram_bytes / 4096);
    }
    report.stats = session.stats.clone();
    let (raw, zero, zstd) = session.stats.page_totals();
    let refs: u64 = session.stats.rounds.iter().map(|r| r.ref_pages).sum();
    let mismatch: u64 = session
        .stats
        .rounds
        .iter()
        .map(|r| r.rebuild_mismatch)
        .sum();
    report.pages = PageCounts {
        raw: raw + zstd,
        zero,
        rebuilt: refs.saturating_sub(mismatch),
        rebuild_mismatch: mismatch,
    };
    if let Some(pc) = &report.postcopy {
        // After the switch pages go raw (zero pages as markers); references
        // that storage could not match were asked for by the destination.
        report.pages.raw += pc.pushed_pages + pc.requested_pages;
        report.pages.rebuild_mismatch += pc.storage_mismatch;
        report.pages.rebuilt = report.pages.rebuilt.saturating_sub(pc.storage_mismatch);
    }
    report.ram_verified = session.stats.ram_verified;
    report.link_bytes = session.stats.bytes_sent + session.stats.bytes_received;
    if let Err(e) = result {
        if report.vm_runs_on == VmLocation::Source {
            session.abort(&format!("{e:#}")).await;
        }
        return Err(e);
    }
    Ok(())
}

/// Labels the session's pages with the guest's census, if it came and fits
/// the RAM layout; the report says what came of it.
fn start_census(
    taken: crate::hints::CensusTaken,
    report: &mut MigrationReport,
    session: &mut SourceSession,
) -> Option<Arc<dbmigrate_core::census::Census>> {
    let mut r = crate::census::CensusReport::default();
    let census = match taken {
        Ok((runs, ms)) => {
            r.taken_ms = ms;
            r.runs = runs.len();
            match crate::census::labels(&runs, &report.gpa_layout) {
                Ok((labels, outside)) => {
                    r.outside_ram_pages = outside;
                    let c = Arc::new(dbmigrate_core::census::Census::new(labels));
                    session.set_census(c.clone());
                    tracing::info!(runs = r.runs, ms, outside, "guest memory census taken");
                    Some(c)
                }
                Err(e) => {
                    r.error = Some(format!("the guest's census does not fit its RAM: {e}"));
                    None
                }
            }
        }
        Err(e) => {
            r.error = Some(e);
            None
        }
    };
    report.census = Some(r);
    census
}

/// The first fetch of the guest's hints, on a blocking thread.
type HintTask =
    tokio::task::JoinHandle<Result<Arc<crate::hints::LiveHints>, crate::hints::HintChannelError>>;

/// Reserves the destination and arms dirty tracking, then takes the
/// hints fetched meanwhile. On failure the hint thread is stopped, and a
/// destination already reserved is told why.
async fn prepare_session(
    args: &MigrateArgs,
    qmp: &mut Qmp,
    undo: &mut Undo,
    ram: SourceRam,
    tracker: Box<dyn dbmigrate_core::dirty::DirtyTracker>,
    hint_task: Option<(HintTask, Vec<DiskId>)>,
) -> Result<(SourceSession, Option<Arc<crate::hints::LiveHints>>)> {
    // The destination places its storage by the disks' names.
    let mut config = args.config.clone();
    if let Some((_, disks)) = &hint_task {
        config.disks = disks.clone();
    }
    let reserved = async {
        undo.ignore_shared_was = Some(qemu::set_capability(qmp, "x-ignore-shared", true).await?);
        SourceSession::connect(args.to, ram, tracker, config)
            .await
            .context("reserving the destination")
    }
    .await;
    let mut session = match reserved {
        Ok(s) => s,
        Err(e) => {
            if let Ok(Some(live)) = take_hints(hint_task).await {
                live.stop();
            }
            return Err(e);
        }
    };
    let armed = session.arm_tracking().context("arming dirty-page tracking");
    let ready = match (armed, take_hints(hint_task).await) {
        (Ok(()), hints) => hints,
        (Err(e), hints) => {
            if let Ok(Some(live)) = hints {
                live.stop();
            }
            Err(e)
        }
    };
    match ready {
        Ok(None) => Ok((session, None)),
        Ok(Some(live)) => {
            session.set_hints(live.clone());
            Ok((session, Some(live)))
        }
        Err(e) => {
            // The destination was reserved for nothing: tell it why.
            session.abort(&format!("{e:#}")).await;
            Err(e)
        }
    }
}

/// Waits for the first hints, if any were asked for.
async fn take_hints(
    hint_task: Option<(HintTask, Vec<DiskId>)>,
) -> Result<Option<Arc<crate::hints::LiveHints>>> {
    let Some((task, disks)) = hint_task else {
        return Ok(None);
    };
    let live = task
        .await
        .context("starting the hint channel")?
        .context("getting the first hints from the guest agent")?;
    tracing::info!(
        hints = live.counters.last_count.load(std::sync::atomic::Ordering::Relaxed),
        fetch_ms = live.counters.last_fetch_ms.load(std::sync::atomic::Ordering::Relaxed),
        disks = ?disks,
        "guest hints ready"
    );
    Ok(Some(live))
}

async fn drive(
    args: &MigrateArgs,
    qmp: &mut Qmp,
    undo: &mut Undo,
    report: &mut MigrationReport,
    start: Instant,
    ram_bytes: u64,
    session: &mut SourceSession,
) -> Result<()> {
    let progress = Progress::new(args.progress, ram_bytes);
    let mut on_round = |r: &RoundStats, d: &Decision| {
        crate::failpoint::hit("src-precopy-round");
        progress.round(r, d);
        tracing::info!(round = r.round, pages = r.pages, raw = r.raw_pages, zero = r.zero_pages,
            bytes = r.bytes, ms = r.elapsed_ms, mbit = r.rate_mbit, dirty_after = r.dirty_after, decision = ?d, "pre-copy round");
    };
    if args.config.mode != Mode::Precopy && !session.destination_postcopy() {
        bail!("--mode {} needs a destination that can serve post-copy faults: start the destination QEMU with DBMIGRATE_POSTCOPY_SOCKET (see `dbmigrate env --postcopy-socket`) and `dbmigrate receive --postcopy-socket` with the same path", mode_name(args.config.mode));
    }
    let decision = session
        .run_live(&mut on_round)
        .await
        .context("live pre-copy")?;
    if let Decision::Stop {
        reason,
        expected_downtime,
    } = decision
    {
        if switch_to_postcopy(args.config.mode, reason, session.destination_postcopy()) {
            return drive_postcopy(args, qmp, undo, report, start, &progress, session, reason)
                .await;
        }
        progress.note(&format!(
            "stop-and-copy ({reason}), expected downtime {} ms",
            expected_downtime.as_millis()
        ));
        tracing::info!(%reason, expected_downtime_ms = ms(expected_downtime), "stopping the VM");
    }

    args.priority
        .restore("stop-and-copy: the guest waits on the last round");
    let paused_at = Instant::now();
    report.paused_at_ms = Some(ms(paused_at.duration_since(start)));
    qmp.execute("stop", None)
        .await
        .context("pausing the source VM")?;
    undo.paused_by_us = true;
    crate::failpoint::hit("src-stop-and-copy");
    let mut parts = crate::report::DowntimeParts::default();
    let mut step = Instant::now();
    let mut lap = move || {
        let now = Instant::now();
        ms(now.duration_since(std::mem::replace(&mut step, now)))
    };
    let frozen = session.final_round().await.context("stop-and-copy")?;
    parts.final_round_ms = lap();
    let last = &frozen.last_round;
    tracing::info!(
        pages = last.pages,
        bytes = last.bytes,
        ms = last.elapsed_ms,
        "final round sent"
    );
    let verified = match session.verify(frozen).await {
        Ok(v) => v,
        Err(e @ SourceError::RamDiffers(_)) => {
            bail!("{e}: the destination is discarded and the source resumes")
        }
        Err(e) => return Err(anyhow!(e).context("comparing RAM at switchover")),
    };
    tracing::info!(verify_ms = session.stats.verify_ms, "RAM digests match");
    parts.verify_ms = lap();

    undo.device_migration_started = true;
    let relay = start_device_state(args, qmp, session).await?;
    report.device_state_bytes = finish_device_state(qmp, relay).await?;
    parts.device_state_ms = lap();

    crate::failpoint::hit("src-before-commit");
    // Point of no return: after Commit the destination may run the VM, so a
    // failure from here on must not resume the source blindly.
    report.vm_runs_on = VmLocation::Unknown;
    let committed = match session.send_commit(&verified).await {
        Ok(()) => {
            crate::failpoint::hit("src-after-commit");
            session.wait_activated().await
        }
        Err(e) => Err(e),
    };
    match committed {
        Ok(()) => {}
        Err(SourceError::PeerAbort { reason }) => {
            // The destination said explicitly that it did not resume the VM.
            report.vm_runs_on = VmLocation::Source;
            bail!("destination did not resume the VM: {reason}");
        }
        Err(e) => {
            return Err(anyhow!(e).context(
                "no confirmation from the destination after Commit: the source VM stays paused; check the destination and resume the source (QMP `cont`) only if the destination VM is not running",
            ))
        }
    }
    report.vm_runs_on = VmLocation::Destination;
    report.downtime_ms = ms(paused_at.elapsed());
    parts.commit_ms = lap();
    report.downtime_parts = Some(parts);
    finished(args, qmp, &progress, start, report, "").await;
    Ok(())
}

/// The VM runs on the destination with every page: says so and, if asked,
/// ends the source QEMU (in `postmigrate`; its RAM is no longer the VM's).
async fn finished(
    args: &MigrateArgs,
    qmp: &mut Qmp,
    progress: &Progress,
    start: Instant,
    report: &MigrationReport,
    how: &str,
) {
    progress.finish(&format!(
        "migrated in {} ms{how}, downtime {} ms",
        ms(start.elapsed()),
        report.downtime_ms
    ));
    if args.quit_source {
        let _ = qmp.execute("quit", None).await;
    }
}

/// The hand-over by post-copy: pause, switch, move device state while the
/// destination already serves faults, commit, and wait for every page.
#[allow(clippy::too_many_arguments)]
async fn drive_postcopy(
    args: &MigrateArgs,
    qmp: &mut Qmp,
    undo: &mut Undo,
    report: &mut MigrationReport,
    start: Instant,
    progress: &Progress,
    session: &mut SourceSession,
    reason: StopReason,
) -> Result<()> {
    progress.note(&format!(
        "switching to post-copy ({reason}): once the VM runs on the destination, the source can no longer take it back"
    ));
    tracing::warn!(%reason, "switching to post-copy: after the hand-over the source cannot resume the VM");
    // While the VM still runs here: the destination's part of the switch
    // that does not depend on the last dirty pages stays out of the pause.
    session
        .prepare_switch()
        .await
        .context("preparing the switch to post-copy (the VM still runs on the source)")?;
    args.priority
        .restore("post-copy: the guest waits on the switch and then on its faults");
    let paused_at = Instant::now();
    report.paused_at_ms = Some(ms(paused_at.duration_since(start)));
    qmp.execute("stop", None)
        .await
        .context("pausing the source VM")?;
    undo.paused_by_us = true;
    let sw = session
        .switch_to_postcopy()
        .await
        .context("switching to post-copy")?;
    undo.device_migration_started = true;
    // QMP `migrate` returns at once; the wait for it runs beside the
    // post-copy service (loading device state may fault on guest pages).
    let relay = start_device_state(args, qmp, session).await?;
    let mut device_bytes = 0;
    let handover = async {
        device_bytes = finish_device_state(qmp, relay)
            .await
            .map_err(|e| format!("{e:#}"))?;
        Ok(())
    };
    let mut activated_at = None;
    let mut on_activated = || {
        activated_at = Some(Instant::now());
        crate::failpoint::hit("src-postcopy");
    };
    let result = session.postcopy(sw, handover, &mut on_activated).await;
    report.device_state_bytes = device_bytes;
    if let Some(at) = activated_at {
        report.downtime_ms = ms(at.duration_since(paused_at));
    }
    match result {
        Ok(stats) => {
            report.vm_runs_on = VmLocation::Destination;
            if !stats.ram_verified {
                report.postcopy = Some(stats.clone());
                bail!(
                    "post-copy finished but {} chunk(s) of the placed pages differ from the source's frozen RAM: the destination VM's memory is suspect; the source QEMU is kept, paused, for inspection",
                    stats.mismatched_chunks
                );
            }
            report.postcopy = Some(stats);
        }
        Err(PostcopyError::BeforeCommit(e)) => {
            return Err(anyhow!(e).context("post-copy hand-over (the destination never ran the VM)"))
        }
        Err(e @ PostcopyError::AfterCommit(_)) => {
            report.vm_runs_on = if activated_at.is_some() {
                VmLocation::Destination
            } else {
                VmLocation::Unknown
            };
            return Err(anyhow!(e));
        }
    }
    finished(args, qmp, progress, start, report, " by post-copy").await;
    Ok(())
}
