//! `dbmigrate migrate`: the source host's side.
//!
//! Owns the promise that until the destination commits, the source VM stays
//! authoritative: every failure path before [`SourceSession::commit`] resumes
//! the source (if we paused it), cancels QEMU's device-state migration and
//! restores the migration capability we changed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use dbmigrate_core::dirty;
use dbmigrate_core::precopy::{Decision, SourceConfig, SourceSession};
use dbmigrate_core::ram::SourceRam;
use dbmigrate_core::stats::RoundStats;
use serde_json::json;

use crate::progress::Progress;
use crate::qemu;
use crate::qmp::Qmp;
use crate::report::{MigrationReport, PageCounts};

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

/// Where the migration stands, for the cleanup path.
#[derive(Default)]
struct Undo {
    paused_by_us: bool,
    device_migration_started: bool,
    ignore_shared_was: Option<bool>,
}

/// Runs the migration; always returns a report, with `error` set on failure.
pub async fn migrate(args: MigrateArgs) -> MigrationReport {
    let mut report = MigrationReport {
        method: "dbmigrate-precopy".into(),
        vm_runs_on: "source".into(),
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
            report.vm_runs_on = "destination".into();
        }
        Err(e) => {
            let committed = report.vm_runs_on != "source";
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
                    report.vm_runs_on = "unknown".into();
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
    let backend = qemu::ram_backend(qmp).await?;
    let layout = qemu::gpa_layout(qmp, &backend.id).await?;
    tracing::info!(path = %backend.mem_path.display(), size = backend.size, ranges = layout.len(), "source RAM backend");
    report.gpa_layout = layout;
    let pid = qmp
        .pid()
        .context("could not learn QEMU's pid from its QMP socket (SO_PEERCRED)")?;
    let range = dirty::find_mapping(pid, &backend.mem_path).with_context(|| {
        format!(
            "finding {} in QEMU's address space",
            backend.mem_path.display()
        )
    })?;
    let tracker = dirty::open_tracker(range).context("starting dirty-page tracking")?;
    report.tracker = format!("{:?}", tracker.kind());
    tracing::info!(tracker = ?tracker.kind(), pid, "dirty tracking ready");
    let ram =
        SourceRam::open(&backend.mem_path, backend.size).context("mapping the source RAM file")?;

    let mut config = args.config.clone();
    let mut live_hints = None;
    if let Some(path) = &args.guest_hints {
        let disks = qemu::disk_sizes(qmp).await?;
        if disks.is_empty() {
            bail!("--guest-hints needs the VM's disks, but QEMU reports no disk with a medium");
        }
        let (path, layout, every, n) = (
            path.clone(),
            report.gpa_layout.clone(),
            args.hints_refresh,
            disks.len(),
        );
        let finder = if args.hint_scan == HintScan::Host {
            let ram = SourceRam::open(&backend.mem_path, backend.size)
                .context("mapping the source RAM file for the buffer-pool scan")?;
            crate::hints::Finder::Host(ram)
        } else {
            crate::hints::Finder::Guest
        };
        let live = tokio::task::spawn_blocking(move || {
            crate::hints::LiveHints::start(&path, layout, n, every, finder)
        })
        .await
        .context("starting the hint channel")?
        .context("getting the first hints from the guest agent")?;
        tracing::info!(
            hints = live.counters.last_count.load(std::sync::atomic::Ordering::Relaxed),
            fetch_ms = live.counters.last_fetch_ms.load(std::sync::atomic::Ordering::Relaxed),
            disks = ?disks,
            "guest hints ready"
        );
        config.hints = Some(live.clone());
        config.disk_sizes = disks;
        live_hints = Some(live);
    }

    undo.ignore_shared_was = Some(qemu::set_capability(qmp, "x-ignore-shared", true).await?);

    let session = SourceSession::connect(args.to, ram, tracker, config)
        .await
        .context("reserving the destination");
    let mut session = match session {
        Ok(s) => s,
        Err(e) => {
            if let Some(l) = &live_hints {
                l.stop();
            }
            return Err(e);
        }
    };

    let result = drive(args, qmp, undo, report, start, backend.size, &mut session).await;
    if let Some(l) = &live_hints {
        l.stop();
        report.hints = Some(crate::report::HintReport::from(l.as_ref()));
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
    report.ram_verified = session.stats.ram_verified;
    report.link_bytes = session.stats.bytes_sent + session.stats.bytes_received;
    if let Err(e) = result {
        if report.vm_runs_on == "source" {
            session.abort(&format!("{e:#}")).await;
        }
        return Err(e);
    }
    Ok(())
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
        progress.round(r, d);
        tracing::info!(round = r.round, pages = r.pages, raw = r.raw_pages, zero = r.zero_pages,
            bytes = r.bytes, ms = r.elapsed_ms, mbit = r.rate_mbit, dirty_after = r.dirty_after, decision = ?d, "pre-copy round");
    };
    let decision = session
        .run_live(&mut on_round)
        .await
        .context("live pre-copy")?;
    if let Decision::Stop {
        reason,
        expected_downtime,
    } = decision
    {
        progress.note(&format!(
            "stop-and-copy ({reason}), expected downtime {} ms",
            expected_downtime.as_millis()
        ));
        tracing::info!(%reason, expected_downtime_ms = ms(expected_downtime), "stopping the VM");
    }

    let paused_at = Instant::now();
    qmp.execute("stop", None)
        .await
        .context("pausing the source VM")?;
    undo.paused_by_us = true;
    let last = session.final_round().await.context("stop-and-copy")?;
    tracing::info!(
        pages = last.pages,
        bytes = last.bytes,
        ms = last.elapsed_ms,
        "final round sent"
    );
    let outcome = session
        .verify()
        .await
        .context("comparing RAM at switchover")?;
    if !outcome.matched() {
        bail!(
            "RAM differs at switchover in {} chunk(s) of {} pages (first: {:?}): the destination is discarded and the source resumes",
            outcome.mismatched_total,
            outcome.chunk_pages,
            &outcome.mismatched[..outcome.mismatched.len().min(8)]
        );
    }
    tracing::info!(verify_ms = session.stats.verify_ms, "RAM digests match");

    undo.device_migration_started = true;
    qmp.execute("migrate", Some(json!({"uri": session.incoming_uri()})))
        .await
        .context("starting QEMU's device-state migration")?;
    let info = qemu::wait_migration(qmp, Duration::from_secs(60))
        .await
        .context("moving device state")?;
    report.device_state_bytes = info["ram"]["transferred"].as_u64().unwrap_or(0);

    // Point of no return: after Commit the destination may run the VM, so a
    // failure from here on must not resume the source blindly.
    report.vm_runs_on = "unknown".into();
    match session.commit().await {
        Ok(()) => {}
        Err(dbmigrate_core::precopy::PrecopyError::Refused { reason }) => {
            // The destination said explicitly that it did not resume the VM.
            report.vm_runs_on = "source".into();
            bail!("destination did not resume the VM: {reason}");
        }
        Err(e) => {
            return Err(anyhow!(e).context(
                "no confirmation from the destination after Commit: the source VM stays paused; check the destination and resume the source (QMP `cont`) only if the destination VM is not running",
            ))
        }
    }
    report.vm_runs_on = "destination".into();
    report.downtime_ms = ms(paused_at.elapsed());
    progress.finish(&format!(
        "migrated in {} ms, downtime {} ms",
        ms(start.elapsed()),
        report.downtime_ms
    ));
    if args.quit_source {
        // The source QEMU is in `postmigrate`; its RAM is no longer the VM's.
        let _ = qmp.execute("quit", None).await;
    }
    Ok(())
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
