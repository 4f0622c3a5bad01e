//! The fault suite on the database VM: a real MariaDB VM under a real
//! sysbench load migrates with dbmigrate (hints from guest RAM, rebuild
//! from shared storage over NBD in a storage namespace) while a fault hits
//! at a chosen stage. Each case asserts the documented outcome (README,
//! "Faults and their outcomes") on the database itself: sysbench ends its
//! run without an error and every table passes CHECK TABLE with no row lost,
//! on whichever host runs the VM afterwards. Needs root; run with
//! `--test-threads=1`.

use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use dbmigrate_testbed::{
    dest_stats, mariadb_guest, sysbench_result, wait_limit, DbBed, MariadbGuest, Vm,
};
use serde_json::Value;

const TABLES: u32 = 4;
const ROWS: u32 = 10_000;

struct DbCase {
    guest: MariadbGuest,
    bed: DbBed,
    src: Vm,
    dst: Vm,
    /// Where the destination QEMU offers its userfaultfd (post-copy cases).
    postcopy_socket: Option<PathBuf>,
    /// The destination's `--storage` (the storage server over NBD unless
    /// a case reads a block device).
    storage: String,
}

impl DbCase {
    /// The MariaDB VM booted on the source with its buffer pool warm, and a
    /// waiting destination QEMU (ready for post-copy with `postcopy`).
    fn start(postcopy: bool) -> Result<Self> {
        let guest = mariadb_guest(TABLES, ROWS)?;
        let mut bed = DbBed::new(&guest, 1000, 1000)?;
        bed.tb.use_failpoint_agents()?;
        let src = bed.start_vm(&guest, true, false, 1024, "256M")?;
        src.wait_console("DBM-READY pool", Duration::from_secs(300))?;
        let (dst, postcopy_socket) = if postcopy {
            let (dst, sock) = bed.start_postcopy_destination(&guest, 1024, "256M")?;
            (dst, Some(sock))
        } else {
            (bed.start_vm(&guest, false, true, 1024, "256M")?, None)
        };
        Ok(Self {
            storage: bed.nbd_from_dst.clone(),
            guest,
            bed,
            src,
            dst,
            postcopy_socket,
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.bed.tb.dir.join(name)
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap_or_default()
    }

    /// `dbmigrate receive` reading the VM's disk over NBD, with a failpoint.
    fn receive(&self, failpoint: Option<&str>, extra: &[&str]) -> Result<Child> {
        let mut cmd = self.bed.tb.receive_cmd(&self.dst)?;
        cmd.args(["--storage", &self.storage, "--timeout", "10"])
            .args(extra);
        if let Some(sock) = &self.postcopy_socket {
            cmd.arg("--postcopy-socket").arg(sock);
        }
        if let Some(f) = failpoint {
            cmd.env("DBMIGRATE_FAILPOINT", f);
        }
        cmd.stdout(std::fs::File::create(self.path("receive.out"))?)
            .stderr(std::fs::File::create(self.path("receive.log"))?)
            .stdin(Stdio::null())
            .spawn()
            .context("starting dbmigrate receive")
    }

    /// `dbmigrate migrate` with the guest's hints, with a failpoint (by
    /// post-copy when the destination is ready for it).
    fn migrate(&self, failpoint: Option<&str>) -> Result<Child> {
        let mut cmd = self
            .bed
            .tb
            .migrate_cmd(&self.src, &self.path("report.json"))?;
        cmd.arg("--guest-hints")
            .arg(self.bed.hints_socket("db-src"))
            .args(["--timeout", "10", "--progress", "never"]);
        if self.postcopy_socket.is_some() {
            cmd.args(["--mode", "postcopy", "--allow-postcopy"]);
        }
        if let Some(f) = failpoint {
            cmd.env("DBMIGRATE_FAILPOINT", f);
        }
        cmd.stdout(Stdio::null())
            .stderr(std::fs::File::create(self.path("migrate.log"))?)
            .stdin(Stdio::null())
            .spawn()
            .context("starting dbmigrate migrate")
    }

    /// 45 s of sysbench, started 10 s before the migration.
    fn sysbench(&self) -> Result<Child> {
        let mut cmd = self.bed.sysbench(&self.guest, 2, 45);
        let log = std::fs::File::create(self.path("sysbench.log"))?;
        let child = cmd
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .context("starting sysbench")?;
        std::thread::sleep(Duration::from_secs(10));
        Ok(child)
    }

    fn finish(&self, child: Child, what: &str) -> Result<Output> {
        let out = wait_limit(child, Duration::from_secs(180))
            .with_context(|| format!("{what} did not exit"))?;
        let l = self.log(&format!("{what}.log"));
        eprintln!("--- {what} ---\n{l}");
        ensure!(!l.contains("panicked"), "{what} panicked");
        Ok(out)
    }

    fn report(&self) -> Value {
        std::fs::read_to_string(self.path("report.json"))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(Value::Null)
    }

    /// sysbench ran to its end with no error but retried deadlocks (any
    /// other error stops it: see [`DbBed::sysbench`]), and every table is
    /// intact on the VM wherever it runs now.
    fn database_intact(&self, mut sysbench: Child) -> Result<()> {
        let status = sysbench.wait()?;
        let log = self.log("sysbench.log");
        let (deadlocks, finished) = sysbench_result(&log);
        ensure!(
            status.success() && finished && deadlocks.is_some(),
            "sysbench failed:\n{log}"
        );
        self.bed.check_sbtest(&self.guest)
    }
}

/// Waits until `f` holds (an agent reached a failpoint, a log line came).
fn wait_for(what: &str, limit: Duration, f: impl Fn() -> bool) -> Result<()> {
    let t = Instant::now();
    while !f() {
        ensure!(t.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn marker_spec(stage: &str, marker: &Path) -> String {
    format!("{stage}:pause:{}", marker.display())
}

/// Cuts the destination's storage link at its first storage read and
/// brings it back once the failure was noticed; the migration must end
/// byte-exact with the database intact. Returns the source's report and
/// the destination's statistics.
fn storage_link_cut_during_the_rebuild(postcopy: bool) -> Result<(Value, Value)> {
    let c = DbCase::start(postcopy)?;
    let marker = c.path("paused");
    // The destination's first storage read waits while the link is cut: it
    // and every read after it fail (3 s I/O limit) until the link is back.
    let recv = c.receive(
        Some(&marker_spec("dst-storage-read", &marker)),
        &["--storage-timeout", "3"],
    )?;
    let sysbench = c.sysbench()?;
    let mig = c.migrate(None)?;
    wait_for("first storage read", Duration::from_secs(120), || {
        marker.exists()
    })?;
    c.bed.set_dst_storage_link(false)?;
    std::fs::remove_file(&marker)?;
    wait_for("storage failure noticed", Duration::from_secs(60), || {
        c.log("receive.log").contains("shared storage read failed")
    })?;
    // The outage ends before the VM needs its disk on the destination.
    c.bed.set_dst_storage_link(true)?;
    let out = c.finish(mig, "migrate")?;
    let r = c.finish(recv, "receive")?;
    ensure!(out.status.success(), "migrate failed");
    ensure!(r.status.success(), "receive failed");
    let report = c.report();
    assert_eq!(report["vm_runs_on"], "destination");
    let dest = dest_stats(&std::fs::read_to_string(c.path("receive.out"))?);
    eprintln!("destination {dest}");
    assert!(
        dest["storage_unread"].as_u64().unwrap_or(0) > 0,
        "references were not handed back unread: {dest:#}"
    );
    c.database_intact(sysbench)?;
    Ok((report, dest))
}

#[test]
fn storage_link_cut_during_the_rebuild_costs_resends_never_correctness() -> Result<()> {
    let (report, _) = storage_link_cut_during_the_rebuild(false)?;
    // Byte-exact: the full-RAM digests matched at switchover.
    assert_eq!(report["ram_verified"], Value::Bool(true), "{report:#}");
    Ok(())
}

#[test]
fn storage_link_cut_during_a_postcopy_rebuild_asks_the_source_instead() -> Result<()> {
    let (report, _) = storage_link_cut_during_the_rebuild(true)?;
    assert_eq!(report["method"], "dbmigrate-postcopy");
    // Every page placed after the switch matched the frozen source RAM.
    assert_eq!(
        report["postcopy"]["ram_verified"],
        Value::Bool(true),
        "{report:#}"
    );
    Ok(())
}

/// The destination reads the VM's disk as a block device (a loop device
/// over the image, through a FUSE view), which stops answering for 20 s
/// from its first read: each read is abandoned at its 3 s deadline, the
/// pages are asked of the source, and the migration ends byte-exact with
/// the database intact; reads resume when the device answers again.
#[test]
fn a_block_device_that_stops_answering_for_20_s_costs_resends_never_correctness() -> Result<()> {
    let mut c = DbCase::start(false)?;
    let disk = c.bed.disk_behind_fuse(0)?;
    c.storage = disk.path().to_string_lossy().into_owned();
    let marker = c.path("paused");
    let recv = c.receive(
        Some(&marker_spec("dst-storage-read", &marker)),
        &["--storage-timeout", "3"],
    )?;
    let sysbench = c.sysbench()?;
    let mig = c.migrate(None)?;
    wait_for("first storage read", Duration::from_secs(120), || {
        marker.exists()
    })?;
    disk.stall()?;
    let stalled = Instant::now();
    std::fs::remove_file(&marker)?;
    wait_for("hung read abandoned", Duration::from_secs(60), || {
        c.log("receive.log").contains("no answer within 3 s")
    })?;
    while stalled.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(100));
    }
    disk.resume()?;
    let out = c.finish(mig, "migrate")?;
    let r = c.finish(recv, "receive")?;
    ensure!(out.status.success(), "migrate failed");
    ensure!(r.status.success(), "receive failed");
    let report = c.report();
    assert_eq!(report["vm_runs_on"], "destination");
    assert_eq!(report["ram_verified"], Value::Bool(true), "{report:#}");
    let dest = dest_stats(&std::fs::read_to_string(c.path("receive.out"))?);
    eprintln!("destination {dest}");
    assert!(
        dest["storage_unread"].as_u64().unwrap_or(0) > 0,
        "references were not handed back unread: {dest:#}"
    );
    c.database_intact(sysbench)
}

#[test]
fn destination_agent_killed_in_stop_and_copy_keeps_the_database_on_the_source() -> Result<()> {
    let c = DbCase::start(false)?;
    let marker = c.path("paused");
    let mut recv = c.receive(None, &[])?;
    let sysbench = c.sysbench()?;
    let mig = c.migrate(Some(&marker_spec("src-stop-and-copy", &marker)))?;
    wait_for("stop-and-copy", Duration::from_secs(120), || {
        marker.exists()
    })?;
    // The VM is paused on the source; the destination agent dies now.
    recv.kill()?;
    let _ = recv.wait();
    std::fs::remove_file(&marker)?;
    let out = c.finish(mig, "migrate")?;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(c.report()["vm_runs_on"], "source");
    assert_eq!(c.src.qmp()?.status()?, "running");
    c.database_intact(sysbench)
}

#[test]
fn source_agent_killed_after_commit_leaves_the_database_running_on_the_destination() -> Result<()> {
    let c = DbCase::start(false)?;
    let recv = c.receive(None, &[])?;
    let sysbench = c.sysbench()?;
    let mig = c.migrate(Some("src-after-commit:abort"))?;
    assert!(!c.finish(mig, "migrate")?.status.success());
    let r = c.finish(recv, "receive")?;
    // The destination had every page, verified, and the Commit: it runs
    // the VM; the source QEMU stays paused with the old copy.
    ensure!(r.status.success(), "receive failed");
    assert_eq!(c.dst.qmp()?.status()?, "running");
    assert_eq!(c.src.qmp()?.status()?, "postmigrate");
    c.database_intact(sysbench)
}
