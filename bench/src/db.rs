//! `bench compare-db`: the MariaDB VM under sysbench `oltp_read_write`,
//! migrated by QEMU's pre-copy, QEMU's post-copy and dbmigrate with rebuild
//! from shared storage. Every method gets a fresh copy of the disk, freshly
//! booted VMs, the same links and the same load; sysbench's per-second
//! throughput and p99 latency give the workload figures.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use dbmigrate_testbed::{mariadb_guest, tpcc_guest, DbBed, MariadbGuest, Vm};
use serde_json::{json, Value};

use crate::timeline;
use crate::{Pages, Run, Timeline, Workload};

/// The client load on the database.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum DbLoad {
    /// sysbench `oltp_read_write` (threads from [`DbSetup::threads`]).
    Sysbench,
    /// The TPC-C driver with this many warehouses (terminals from [`DbSetup::threads`]).
    Tpcc { warehouses: u32 },
}

/// Settings of a database comparison.
pub struct DbSetup {
    pub ram_mib: u64,
    pub pool: String,
    pub tables: u32,
    pub rows: u32,
    pub threads: u32,
    pub load: DbLoad,
    pub link_mbit: u32,
    pub storage_mbit: u32,
    pub downtime_ms: u64,
    pub warmup_s: u64,
    pub timeout: Duration,
    pub after_s: u64,
    /// Competing TCP streams (iperf3) on the migration link during the migration; 0 for none.
    pub competing_streams: u32,
    /// Pace of the reads from shared storage, MB/s (the references'
    /// `qemu-img convert -r`, dbmigrate's `receive --storage-bandwidth`);
    /// 0 for none.
    pub storage_read_mbyte_s: u32,
}

/// sysbench's closing count of ignored errors (pure).
pub fn parse_errors(log: &str) -> Option<u64> {
    log.lines()
        .find(|l| l.trim_start().starts_with("ignored errors:"))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|n| n.parse().ok())
}

fn spawn_to(mut c: std::process::Command, log: &Path) -> Result<Child> {
    let f = std::fs::File::create(log)?;
    c.stdout(f.try_clone()?).stderr(f).stdin(Stdio::null());
    Ok(c.spawn()?)
}

/// The guest image with the data set of `s`'s load.
pub(crate) fn guest_for(s: &DbSetup) -> Result<MariadbGuest> {
    match s.load {
        DbLoad::Sysbench => mariadb_guest(s.tables, s.rows),
        DbLoad::Tpcc { warehouses } => tpcc_guest(warehouses),
    }
}

/// Runs every method; returns the runs.
pub fn compare(s: &DbSetup, methods: &[String]) -> Result<(Vec<Run>, MariadbGuest)> {
    let guest = guest_for(s)?;
    let mut runs = Vec::new();
    for m in methods {
        eprintln!("== mariadb: {m}");
        let mut bed = DbBed::new(&guest, s.link_mbit, s.storage_mbit)?;
        bed.tb.plaintext_agents = crate::plaintext_agents(m);
        let run = run_one(s, &guest, &bed, m).with_context(|| format!("method {m}"))?;
        eprintln!(
            "   completed={} total_ms={:?} downtime_ms={:?} link_MB={} storage_MB={} tps before/during={:?}/{:?} errors={:?}",
            run.completed,
            run.total_ms,
            run.downtime_ms,
            run.link_bytes / 1_000_000,
            run.storage_bytes / 1_000_000,
            run.workload.tps_before,
            run.workload.tps_during,
            run.workload.errors
        );
        runs.push(run);
    }
    Ok((runs, guest))
}

/// Boots VM `slot`'s source and its waiting destination (ready for
/// post-copy when `postcopy`; the socket is returned).
pub(crate) fn boot(
    s: &DbSetup,
    guest: &MariadbGuest,
    bed: &DbBed,
    slot: usize,
    preload: bool,
    postcopy: bool,
) -> Result<(Vm, Vm, Option<PathBuf>)> {
    let src = bed.start_slot_vm(
        slot, guest, true, false, s.ram_mib, &s.pool, preload, None, false,
    )?;
    src.wait_console("DBM-READY pool", Duration::from_secs(900))?;
    let (dst, sock) = start_destination(s, guest, bed, slot, postcopy, !preload)?;
    Ok((src, dst, sock))
}

/// Starts VM `slot`'s destination QEMU, waiting for the migration (its
/// userfaultfd offered on the returned socket when `postcopy`). When QEMU
/// moves the RAM itself (`qemu_moves_ram`), QEMU allocates the
/// destination's RAM at start, as dbmigrate's receive does for its own.
pub(crate) fn start_destination(
    s: &DbSetup,
    guest: &MariadbGuest,
    bed: &DbBed,
    slot: usize,
    postcopy: bool,
    qemu_moves_ram: bool,
) -> Result<(Vm, Option<PathBuf>)> {
    let sock = postcopy.then(|| {
        bed.tb
            .dir
            .join(format!("{}.uffd", bed.slots[slot].dst_name))
    });
    let dst = bed.start_slot_vm(
        slot,
        guest,
        false,
        true,
        s.ram_mib,
        &s.pool,
        false,
        sock.clone(),
        qemu_moves_ram,
    )?;
    Ok((dst, sock))
}

/// The client load while it runs.
pub(crate) struct RunningLoad {
    child: Child,
    /// Its stdout and stderr.
    log: PathBuf,
    /// Per-connection latency logs.
    latency_dir: PathBuf,
    start_us: u64,
    secs: u64,
}

/// Starts the client load on the VM at `vm_ip` for `secs` seconds in the
/// client namespace; `tag` names its files.
pub(crate) fn start_load(
    s: &DbSetup,
    guest: &MariadbGuest,
    bed: &DbBed,
    vm_ip: &str,
    tag: &str,
    secs: u64,
) -> Result<RunningLoad> {
    let dir = &bed.tb.dir;
    let latency_dir = dir.join(format!("latency-{tag}"));
    let _ = std::fs::remove_dir_all(&latency_dir);
    std::fs::create_dir_all(&latency_dir)?;
    let secs32 = u32::try_from(secs).unwrap_or(3600);
    let mut cmd = match s.load {
        DbLoad::Sysbench => {
            let script = dir.join("oltp_read_write_timed.lua");
            std::fs::write(&script, SYSBENCH_TIMED)?;
            bed.sysbench_on(vm_ip, guest, &script.to_string_lossy(), s.threads, secs32)
        }
        DbLoad::Tpcc { .. } => {
            let mut c = tpcc_client(bed, "run", vm_ip)?;
            c.arg(format!("--terminals={}", s.threads))
                .arg(format!("--duration-s={secs}"))
                .arg("--latency-dir")
                .arg(&latency_dir);
            c
        }
    };
    cmd.env("DBM_LATENCY_DIR", &latency_dir);
    let log = dir.join(format!("load-{tag}.log"));
    let start_us = timeline::now_us();
    let child = spawn_to(cmd, &log)?;
    Ok(RunningLoad {
        child,
        log,
        latency_dir,
        start_us,
        secs,
    })
}

/// Competing TCP traffic on the migration link: iperf3 streams from the
/// source host to the destination host.
struct Competing {
    server: Child,
    client: Child,
    out: std::path::PathBuf,
}

impl Competing {
    fn start(bed: &DbBed, streams: u32, secs: u64) -> Result<Self> {
        let tb = &bed.tb;
        let server = tb
            .in_ns(&tb.dst_ns, Path::new("iperf3"))
            .args(["-s", "-1", "-p", "5201"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting iperf3 (scripts/setup.sh installs it)")?;
        std::thread::sleep(Duration::from_millis(500));
        let out = tb.dir.join("iperf3.json");
        let mut c = tb.in_ns(&tb.src_ns, Path::new("iperf3"));
        c.args(["-c", &tb.dst_ip, "-p", "5201", "-J"])
            .arg(format!("--parallel={streams}"))
            .arg(format!("--time={secs}"));
        let client = spawn_to(c, &out).context("starting the iperf3 client")?;
        Ok(Self {
            server,
            client,
            out,
        })
    }

    /// Stops the flow (SIGINT: iperf3 still writes its summary); returns what it achieved.
    fn stop(mut self) -> Value {
        let _ = std::process::Command::new("kill")
            .args(["-INT", &self.client.id().to_string()])
            .status();
        let t = std::time::Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.client.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.client.kill();
        let _ = self.client.wait();
        let _ = self.server.kill();
        let _ = self.server.wait();
        let v: Value = std::fs::read_to_string(&self.out)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(Value::Null);
        let sent = &v["end"]["sum_sent"];
        json!({
            "tool": "iperf3",
            "streams": v["start"]["test_start"]["num_streams"],
            "seconds": sent["seconds"],
            "bytes": sent["bytes"],
            "mbit_per_s": sent["bits_per_second"].as_f64().map(|b| (b / 1e5).round() / 10.0),
        })
    }
}

/// `bench tpcc <sub>` (this binary) in the client namespace against the
/// TPC-C database of the VM at `vm_ip`, as the guest image's client user.
fn tpcc_client(bed: &DbBed, sub: &str, vm_ip: &str) -> Result<std::process::Command> {
    let bench = std::env::current_exe().context("finding the bench binary")?;
    let mut c = bed.client(&bench.to_string_lossy());
    tpcc_args(&mut c, sub, vm_ip);
    Ok(c)
}

/// The TPC-C consistency check, given at most `limit_s` seconds: a guest
/// whose kernel died with the database's I/O in flight never answers.
fn tpcc_check(bed: &DbBed, vm_ip: &str, limit_s: u64) -> Result<std::process::Command> {
    let bench = std::env::current_exe().context("finding the bench binary")?;
    let mut c = bed.client_within(&bench.to_string_lossy(), limit_s);
    tpcc_args(&mut c, "check", vm_ip);
    Ok(c)
}

fn tpcc_args(c: &mut std::process::Command, sub: &str, vm_ip: &str) {
    c.args(["tpcc", sub, "--host", vm_ip]).args([
        "--user",
        "sbtest",
        "--password",
        "sbtest",
        "--db",
        "tpcc",
    ]);
}

/// The sysbench script that logs every transaction (bench/lua/).
const SYSBENCH_TIMED: &str = include_str!("../lua/oltp_read_write_timed.lua");

/// What a finished load did.
pub(crate) struct LoadResult {
    txns: Vec<timeline::Txn>,
    errors: u64,
    ok: bool,
    start_us: u64,
    secs: u64,
}

/// Waits for the load to end (stopping it 30 s after its end: against a
/// guest that crashed or hangs its queries never return).
pub(crate) fn wait_load(mut load: RunningLoad) -> Result<LoadResult> {
    let deadline = Duration::from_micros(load.start_us) + Duration::from_secs(load.secs + 30);
    let status = loop {
        if let Some(st) = load.child.try_wait()? {
            break st;
        }
        if Duration::from_micros(timeline::now_us()) > deadline {
            eprintln!("   the load still runs 30 s after its end: the guest is not answering; stopping it");
            let _ = load.child.kill();
            break load.child.wait()?;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = std::fs::read_to_string(&load.log).unwrap_or_default();
    let txns = timeline::read_dir(&load.latency_dir)?;
    // sysbench counts the errors it ignored and retried; the TPC-C driver
    // logs each failed transaction.
    let errors = match parse_errors(&out) {
        Some(n) if !txns.iter().any(|t| t.kind == timeline::NEW_ORDER) => n,
        _ => timeline::window(&txns, load.start_us, u64::MAX).errors,
    };
    if !status.success() {
        eprintln!(
            "   the load failed: {}",
            out.lines().rev().take(5).collect::<Vec<_>>().join(" | ")
        );
    }
    Ok(LoadResult {
        txns,
        errors,
        ok: status.success(),
        start_us: load.start_us,
        secs: load.secs,
    })
}

/// Fills the run's workload figures and timeline from the loads on every
/// VM of the run (their transactions together).
pub(crate) fn fill_workload(
    run: &mut Run,
    loads: Vec<LoadResult>,
    mig_from: u64,
    mig_to: u64,
    switch_ms: Option<u64>,
) {
    let start_us = loads.iter().map(|l| l.start_us).min().unwrap_or(mig_from);
    let secs = loads.iter().map(|l| l.secs).max().unwrap_or(0);
    let errors: u64 = loads.iter().map(|l| l.errors + u64::from(!l.ok)).sum();
    let mut txns: Vec<timeline::Txn> = loads.into_iter().flat_map(|l| l.txns).collect();
    txns.sort_by_key(|t| t.end_us);
    let tpcc = txns.iter().any(|t| t.kind == timeline::NEW_ORDER);
    let before = timeline::window(&txns, mig_from.saturating_sub(10_000_000), mig_from);
    let during = timeline::window(&txns, mig_from, mig_to.max(mig_from + 1_000_000));
    run.workload = Workload {
        errors: Some(errors),
        tps_before: before.tps,
        tps_during: during.tps,
        p90_ms_during: during.p90_ms,
        p99_ms_during: during.p99_ms,
        tpmc_before: before.tpmc,
        tpmc_during: during.tpmc,
    };
    let rel = |us: u64| (us.saturating_sub(start_us) as f64 / 1e4).round() / 100.0;
    let mig_start_s = rel(mig_from);
    run.timeline = Some(Timeline {
        migration_start_s: mig_start_s,
        switchover_s: switch_ms.map(|ms| mig_start_s + ms as f64 / 1000.0),
        end_s: rel(mig_to),
        seconds: timeline::seconds(
            &txns,
            start_us,
            u32::try_from(secs).unwrap_or(u32::MAX),
            tpcc,
        ),
    });
}

/// Longest a consistency check may take (CHECK TABLE of one table, or
/// the TPC-C check) before the database counts as not answering.
const CHECK_LIMIT_S: u64 = 300;

/// The database's own consistency check on the destination VM at
/// `vm_ip`: CHECK TABLE of every sysbench table, or TPC-C's consistency
/// conditions 1-4.
pub(crate) fn consistent(s: &DbSetup, bed: &DbBed, vm_ip: &str) -> bool {
    match s.load {
        DbLoad::Sysbench => {
            for t in 1..=s.tables {
                let query = format!("CHECK TABLE sbtest{t}");
                match bed.sql_on_within(vm_ip, &query, CHECK_LIMIT_S) {
                    Ok(out) if out.trim_end().ends_with("OK") => {}
                    other => {
                        // One failed table fails the check; a guest that
                        // stopped answering would only stall the others.
                        eprintln!("   CHECK TABLE sbtest{t} on {vm_ip}: {other:?}");
                        return false;
                    }
                }
            }
            true
        }
        DbLoad::Tpcc { .. } => {
            let out = tpcc_check(bed, vm_ip, CHECK_LIMIT_S).and_then(|mut c| Ok(c.output()?));
            match out {
                Ok(o) if o.status.success() => true,
                Ok(o) if DbBed::timed_out(o.status) => {
                    eprintln!("   tpcc check on {vm_ip}: no answer within {CHECK_LIMIT_S} s: the database is stuck (see the guest's serial log)");
                    false
                }
                Ok(o) => {
                    eprintln!(
                        "   tpcc check on {vm_ip}: {}",
                        String::from_utf8_lossy(&o.stderr).trim()
                    );
                    false
                }
                Err(e) => {
                    eprintln!("   tpcc check on {vm_ip}: {e:#}");
                    false
                }
            }
        }
    }
}

/// The destination agent's log for the VM `dst_name` in `dir`.
fn receive_log(dir: &Path, dst_name: &str) -> PathBuf {
    dir.join(format!("receive-{dst_name}.log"))
}

/// Starts the destination agent of VM `slot` for a dbmigrate `method`
/// and waits until it listens (None for QEMU's methods). As an operator
/// would, the source starts only then: the clock leaves out the
/// destination's set-up (allocating the guest's RAM), as it leaves out
/// QEMU's own for its `-incoming` (`prealloc=on`).
pub(crate) fn start_receiver(
    s: &DbSetup,
    bed: &DbBed,
    slot: usize,
    dst: &Vm,
    uffd_sock: Option<&Path>,
    method: &str,
) -> Result<Option<Child>> {
    if crate::dbmigrate_mode(method).is_none() {
        return Ok(None);
    }
    let sl = &bed.slots[slot];
    let recv_log = receive_log(&bed.tb.dir, &sl.dst_name);
    let mut recv = bed.tb.receive_cmd_on(dst, sl.port)?;
    recv.args(["--storage", &sl.nbd_from_dst]);
    if s.storage_read_mbyte_s > 0 {
        recv.args([
            "--storage-bandwidth",
            &format!("{}MB", s.storage_read_mbyte_s),
        ]);
    }
    if let Some(sock) = uffd_sock {
        recv.arg("--postcopy-socket").arg(sock);
    }
    Ok(Some(dbmigrate_testbed::spawn_listening(
        &mut recv, &recv_log,
    )?))
}

/// Migrates VM `slot` from `src` to `dst` by `method` (a dbmigrate method
/// takes the destination agent `recv` from [`start_receiver`]). Fills
/// everything but the workload; `link_bytes` is the method's own count
/// (agents' counter plus device state; QEMU's RAM transferred), which the
/// caller may replace by the link's.
pub(crate) fn migrate_slot(
    s: &DbSetup,
    bed: &DbBed,
    slot: usize,
    src: &Vm,
    dst: &Vm,
    recv: Option<Child>,
    method: &str,
) -> Result<Run> {
    let mut run = Run {
        method: method.into(),
        ..Run::default()
    };
    let sl = &bed.slots[slot];
    let dir = &bed.tb.dir;
    let (se, de) = (src.watch_events()?, dst.watch_events()?);
    if let Some(mode) = crate::dbmigrate_mode(method) {
        let recv = recv.context("a dbmigrate method needs its destination agent")?;
        let report_path = dir.join(format!("dbmigrate-report-{}.json", sl.src_name));
        let out = bed
            .tb
            .migrate_cmd_to(src, &report_path, sl.port)?
            .args([
                "--downtime-ms",
                &s.downtime_ms.to_string(),
                "--progress",
                "never",
                "--guest-hints",
            ])
            .arg(bed.hints_socket(&sl.src_name))
            .args(mode)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(
                dir.join(format!("migrate-{}.log", sl.src_name)),
            )?)
            .output()?;
        let recv_out = recv.wait_with_output()?;
        let dest: Value = serde_json::from_slice(&recv_out.stdout).unwrap_or(Value::Null);
        let r: Value = serde_json::from_str(
            &std::fs::read_to_string(&report_path)
                .with_context(|| format!("reading {}", report_path.display()))?,
        )?;
        run.completed = out.status.success() && r["completed"] == json!(true);
        run.total_ms = r["total_ms"].as_u64();
        run.downtime_ms = r["downtime_ms"].as_u64().filter(|_| run.completed);
        run.ram_verified = r["ram_verified"].as_bool();
        run.link_bytes =
            r["link_bytes"].as_u64().unwrap_or(0) + r["device_state_bytes"].as_u64().unwrap_or(0);
        run.storage_bytes = dest["storage_bytes"].as_u64().unwrap_or(0);
        run.pages = Pages {
            raw: r["pages"]["raw"].as_u64().unwrap_or(0),
            zero: r["pages"]["zero"].as_u64().unwrap_or(0),
            rebuilt: dest["rebuilt_pages"].as_u64().unwrap_or(0),
            rebuild_mismatch: dest["rebuild_mismatch"].as_u64().unwrap_or(0),
        };
        run.postcopy = crate::postcopy_figures(&dest, &r);
        // The physical bound of design §6: what cannot be rebuilt over the
        // link, what can from storage, whichever takes longer.
        let first = &r["stats"]["rounds"][0];
        let nonrebuildable = first["raw_pages"].as_u64().unwrap_or(0) * 4096;
        let rebuildable = first["ref_pages"].as_u64().unwrap_or(0) * 4096;
        let link_bps = f64::from(s.link_mbit) * 1e6 / 8.0;
        let stor_bps = f64::from(s.storage_mbit) * 1e6 / 8.0;
        let bound_ms =
            (nonrebuildable as f64 / link_bps).max(rebuildable as f64 / stor_bps) * 1000.0;
        run.detail = json!({
            "physical_bound_ms": bound_ms.round(),
            "nonrebuildable_first_pass_bytes": nonrebuildable,
            "rebuildable_first_pass_bytes": rebuildable,
            "stop_reason": r["stats"]["stop_reason"],
            "expected_downtime_ms": r["stats"]["expected_downtime_ms"],
            "hints": r["hints"],
            "rounds": r["stats"]["rounds"],
            "postcopy": r["postcopy"],
            "destination": dest,
            "device_state_bytes": r["device_state_bytes"],
            "error": r["error"],
            "destination_error": dbmigrate_testbed::agent_error(&receive_log(dir, &sl.dst_name)),
            "paused_at_ms": r["paused_at_ms"],
            "downtime_parts": r["downtime_parts"],
            "agent_link_bytes": r["link_bytes"],
        });
    } else {
        let mut dq = dst.qmp()?;
        let info = crate::qemu_migrate(
            &mut src.qmp()?,
            &mut dq,
            &format!("tcp:{}:{}", bed.tb.dst_ip, sl.port + 1),
            method == "qemu-postcopy",
            (method == "qemu-precopy-tls")
                .then(|| crate::QemuTls::of(&bed.tb))
                .as_ref(),
            s.link_mbit,
            s.downtime_ms,
            s.timeout,
        )?;
        crate::record_qemu_result(&mut run, &info);
        run.link_bytes = info["ram"]["transferred"].as_u64().unwrap_or(0);
        run.detail = json!({
            "status": info["status"],
            "dirty_sync_count": info["ram"]["dirty-sync-count"],
            "ram_transferred": info["ram"]["transferred"],
            "paused_at_ms": info["bench_switch_ms"],
        });
    }
    let agent: Vec<String> = src
        .console()
        .lines()
        .filter(|l| l.contains("DBM-AGENT") || l.contains("DBM-READY pool"))
        .map(str::to_string)
        .collect();
    if let Some(d) = run.detail.as_object_mut() {
        d.insert("guest_console".into(), json!(agent));
    }
    crate::measured_downtime(&mut run, &se, &de);
    Ok(run)
}

/// When the source paused, ms after the migration started.
pub(crate) fn switch_ms(run: &Run) -> Option<u64> {
    run.detail["paused_at_ms"].as_u64().or_else(|| {
        run.total_ms
            .zip(run.downtime_ms)
            .map(|(t, d)| t.saturating_sub(d))
    })
}

/// After a completed migration: the database on `dst` (at `vm_ip`) must
/// pass its consistency check; a crashed destination kernel is reported.
pub(crate) fn check_after(s: &DbSetup, bed: &DbBed, vm_ip: &str, dst: &Vm, run: &mut Run) {
    if !run.completed {
        return;
    }
    let ok = consistent(s, bed, vm_ip);
    run.guest_verified_after = Some(ok);
    if !ok {
        // Reported, not hidden: QEMU 7.2's own migration under TCG has been
        // seen to crash the destination guest (design §3).
        let console = dst.console();
        let crashed = ["BUG:", "Kernel panic", "soft lockup", "general protection"]
            .iter()
            .any(|m| console.contains(m));
        eprintln!(
            "   {}: the database on the destination failed its consistency check{}",
            run.method,
            if crashed {
                " (the destination guest kernel crashed)"
            } else {
                ""
            }
        );
        if let Some(d) = run.detail.as_object_mut() {
            d.insert("destination_guest_crashed".into(), json!(crashed));
        }
    }
}

fn run_one(s: &DbSetup, guest: &MariadbGuest, bed: &DbBed, method: &str) -> Result<Run> {
    if let Some(separate) = crate::storage_read_server(method) {
        return storage_read(s, guest, bed, method, separate);
    }
    let dbm = crate::dbmigrate_mode(method).is_some();
    let (src, dst, uffd_sock) = boot(s, guest, bed, 0, dbm, crate::may_postcopy(method))?;
    // The destination agent sets up before the load starts, as QEMU's
    // destination does at boot.
    let recv = start_receiver(s, bed, 0, &dst, uffd_sock.as_deref(), method)?;
    let load_secs = s.warmup_s + s.timeout.as_secs() + s.after_s;
    let load = start_load(s, guest, bed, &bed.vm_ip, "db", load_secs)?;
    // Competing traffic fills the link from 2 s before the migration starts.
    std::thread::sleep(Duration::from_secs(s.warmup_s.saturating_sub(2)));
    let competing = if s.competing_streams > 0 {
        Some(Competing::start(
            bed,
            s.competing_streams,
            s.timeout.as_secs() * 3 + 60,
        )?)
    } else {
        None
    };
    std::thread::sleep(Duration::from_secs(s.warmup_s.min(2)));
    let mig_from = timeline::now_us();
    let before = bed.tb.link_bytes()?;
    let mut run = migrate_slot(s, bed, 0, &src, &dst, recv, method)?;
    let link_total = bed.tb.link_bytes()? - before;
    let mig_to = timeline::now_us();
    match competing {
        // The link also carried the competing flow: the migration's own
        // bytes are what the method counted.
        Some(c) => {
            let figures = c.stop();
            if let Some(d) = run.detail.as_object_mut() {
                d.insert("competing".into(), figures);
                d.insert("link_bytes_interface_total".into(), json!(link_total));
                d.insert(
                    "link_bytes_source".into(),
                    json!("the method's own count: the link also carried the competing flow"),
                );
            }
        }
        None => run.link_bytes = link_total,
    }
    let sw = switch_ms(&run);
    fill_workload(&mut run, vec![wait_load(load)?], mig_from, mig_to, sw);
    check_after(s, bed, &bed.vm_ip, &dst, &mut run);
    drop((src, dst));
    Ok(run)
}

/// A reference run, not a migration: while the load runs, the
/// destination host reads the VM's whole disk from shared storage
/// (`qemu-img convert` over NBD into a scratch file it then deletes), the
/// kind of read a rebuild makes of the buffer pool, with no migration, no
/// hashing and no dbmigrate process. Through the VM's own storage server,
/// or (`separate`) a second read-only one on the same file. The "during"
/// window is the read; `storage_bytes` what the destination's storage
/// link received meanwhile.
fn storage_read(
    s: &DbSetup,
    guest: &MariadbGuest,
    bed: &DbBed,
    method: &str,
    separate: bool,
) -> Result<Run> {
    let src = bed.start_slot_vm(
        0, guest, true, false, s.ram_mib, &s.pool, false, None, false,
    )?;
    src.wait_console("DBM-READY pool", Duration::from_secs(900))?;
    let second = if separate {
        Some(bed.second_storage_server(0, 10_900)?)
    } else {
        None
    };
    let url = second
        .as_ref()
        .map_or_else(|| bed.nbd_from_dst.clone(), |(_, url)| url.clone());
    let load_secs = s.warmup_s + s.timeout.as_secs() + s.after_s;
    let load = start_load(s, guest, bed, &bed.vm_ip, "db", load_secs)?;
    std::thread::sleep(Duration::from_secs(s.warmup_s));
    let scratch = PathBuf::from(format!("/dev/shm/{}-storage-read.img", bed.tb.tag));
    let rx_before = bed.dst_storage_rx_bytes()?;
    let from = timeline::now_us();
    let mut convert = bed.tb.in_ns(&bed.tb.dst_ns, Path::new("qemu-img"));
    convert.args(["convert", "-f", "raw", "-O", "raw", "-m", "4", "-W"]);
    if s.storage_read_mbyte_s > 0 {
        convert.args([
            "-r",
            &format!("{}", u64::from(s.storage_read_mbyte_s) * 1_000_000),
        ]);
    }
    let out = convert
        .arg(&url)
        .arg(&scratch)
        .stdin(Stdio::null())
        .output()
        .context("running qemu-img convert (install qemu-utils)")?;
    let to = timeline::now_us();
    let _ = std::fs::remove_file(&scratch);
    let storage_bytes = bed.dst_storage_rx_bytes()?.saturating_sub(rx_before);
    if !out.status.success() {
        eprintln!(
            "   the storage read failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let read_ms = (to - from) / 1000;
    let mut run = Run {
        method: method.into(),
        completed: out.status.success(),
        storage_bytes,
        detail: json!({
            "reference": "no migration: the destination host read the VM's whole disk over NBD (qemu-img convert) while the load ran; the during window is the read",
            "storage_server": if separate { "a second, read-only qemu-nbd on the same file" } else { "the VM's own qemu-nbd" },
            "read_ms": read_ms,
            "read_rate_limit_mbyte_per_s": (s.storage_read_mbyte_s > 0).then_some(s.storage_read_mbyte_s),
            "read_mbyte_per_s": storage_bytes as f64 / 1e3 / read_ms.max(1) as f64,
        }),
        ..Run::default()
    };
    fill_workload(&mut run, vec![wait_load(load)?], from, to, None);
    // The VM never moved: its database is checked where it runs.
    run.guest_verified_after = run.completed.then(|| consistent(s, bed, &bed.vm_ip));
    if let Some((mut server, _)) = second {
        let _ = server.kill();
        let _ = server.wait();
    }
    drop(src);
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysbench_error_count() {
        let log = "\
[ 1s ] thds: 2 tps: 27.96 qps: 577.12 (r/w/o: 404.18/115.83/57.11) lat (ms,99%): 110.66 err/s: 0.00 reconn/s: 0.00
    ignored errors:                      3      (0.00 per sec.)
";
        assert_eq!(parse_errors(log), Some(3));
        assert_eq!(parse_errors("no summary"), None);
    }

    #[test]
    fn storage_reads_are_known_only_to_compare_db() {
        assert_eq!(crate::storage_read_server("storage-read"), Some(false));
        assert_eq!(
            crate::storage_read_server("storage-read-separate"),
            Some(true)
        );
        assert_eq!(crate::storage_read_server("dbmigrate-precopy"), None);
        let m = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(crate::check_db_methods(&m(&["qemu-precopy", "storage-read"])).is_ok());
        assert!(crate::check_db_methods(&m(&["storage-reads"])).is_err());
        assert!(crate::check_methods(&m(&["storage-read"])).is_err());
    }

    #[test]
    fn tls_methods_are_known_where_they_run() {
        let m = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let tls = m(&["dbmigrate-precopy-plaintext", "qemu-precopy-tls"]);
        assert!(crate::check_db_methods(&tls).is_ok());
        assert!(crate::check_methods(&m(&["dbmigrate-precopy-plaintext"])).is_err());
        assert!(crate::check_methods(&m(&["qemu-precopy-tls"])).is_ok());
        assert!(crate::plaintext_agents("dbmigrate-precopy-plaintext"));
        assert!(!crate::plaintext_agents("dbmigrate-precopy"));
        assert!(!crate::may_postcopy("dbmigrate-precopy-plaintext"));
        assert!(crate::may_postcopy("dbmigrate-hybrid"));
        assert!(!crate::may_postcopy("qemu-precopy-tls"));
    }
}
