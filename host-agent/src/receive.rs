//! `dbmigrate receive`: the destination host's side.
//!
//! The destination QEMU waits with `-S -incoming defer`; this agent fills its
//! RAM file, checks it against the source's digests, lets QEMU load device
//! state, and resumes the VM only when the source commits.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use dbmigrate_core::dest::{self, DestSession};
use dbmigrate_core::ram::DestRam;
use serde_json::json;
use tokio::net::TcpListener;

use crate::qemu;
use crate::qmp::Qmp;

/// Settings of one incoming migration.
pub struct ReceiveArgs {
    /// Destination QEMU's QMP socket.
    pub qmp: PathBuf,
    /// Where the source agent connects.
    pub listen: SocketAddr,
    /// Where QEMU listens for device state.
    pub incoming: SocketAddr,
    /// Longest silence of the source tolerated.
    pub peer_timeout: Duration,
    /// Keep the destination QEMU after a failed attempt (default: quit it).
    pub keep_qemu: bool,
    /// The VM's disks, for rebuilding pages from references.
    pub storage: Option<std::sync::Arc<dyn dbmigrate_core::rebuild::Storage>>,
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
    let backend = qemu::ram_backend(&mut qmp).await?;
    qemu::set_capability(&mut qmp, "x-ignore-shared", true).await?;
    let uri = format!("tcp:{}", args.incoming);
    qmp.execute("migrate-incoming", Some(json!({"uri": uri})))
        .await
        .context("making the destination QEMU listen for device state")?;
    let ram = DestRam::open(&backend.mem_path, backend.size)
        .context("mapping the destination RAM file")?;
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {} (is another agent using it?)", args.listen))?;
    tracing::info!(listen = %args.listen, %uri, ram = %backend.mem_path.display(), size = backend.size, "waiting for the source agent");

    let result = tokio::select! {
        r = session(&args, &mut qmp, &listener, ram, backend.size, &uri) => r,
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

async fn session(
    args: &ReceiveArgs,
    qmp: &mut Qmp,
    listener: &TcpListener,
    ram: DestRam,
    ram_bytes: u64,
    uri: &str,
) -> Result<dest::DestStats> {
    let mut s: DestSession = dest::accept(listener, ram_bytes, uri, args.peer_timeout)
        .await
        .context("accepting the source agent")?;
    let t = Instant::now();
    let (ram, matched) = match s.receive(ram, args.storage.clone()).await {
        Ok(r) => r,
        Err(e) => {
            s.abort(&e.to_string()).await;
            return Err(anyhow!(e).context("receiving guest RAM"));
        }
    };
    drop(ram);
    tracing::info!(
        ms = u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX),
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
    // QEMU has loaded device state by now (the source waited for its
    // migration to complete before committing); confirm before resuming.
    let mut status = String::new();
    // Polled tightly: this wait is part of the downtime.
    for _ in 0..5000 {
        status = match qmp.status().await {
            Ok(st) => st,
            Err(e) => {
                let reason = format!("destination QEMU failed while loading device state: {e}");
                s.abort(&reason).await;
                bail!(reason);
            }
        };
        if status != "inmigrate" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    match status.as_str() {
        "paused" | "prelaunch" => {
            if let Err(e) = qmp.execute("cont", None).await {
                let reason = format!("destination QEMU refused to resume: {e}");
                s.abort(&reason).await;
                bail!(reason);
            }
        }
        "running" => {}
        other => {
            let reason =
                format!("destination QEMU is `{other}` after device state, cannot resume it");
            s.abort(&reason).await;
            bail!(reason);
        }
    }
    s.activated()
        .await
        .context("confirming activation to the source")?;
    tracing::info!("VM resumed on the destination");
    Ok(s.stats.clone())
}
