//! End-to-end post-copy and hybrid migration of the dirtier guest with real
//! QEMU, real userfaultfd and a 1 Gbit/s shaped link between network
//! namespaces. Needs root; run one at a time (`--test-threads=1`).

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use dbmigrate_testbed::{start_dirtier_pair, start_dirtier_pair_as, Testbed, Vm, VmOptions};
use serde_json::{json, Value};

const LINK_MBIT: u32 = 1000;

struct Pair {
    src: Vm,
    dst: Vm,
    sock: PathBuf,
}

fn start_pair(tb: &Testbed, ws_mib: u64) -> Result<Pair> {
    let sock = tb.dir.join("dst.uffd");
    let (src, dst) = start_dirtier_pair(tb, ws_mib, Some(sock.clone()))?;
    Ok(Pair { src, dst, sock })
}

fn receive(tb: &Testbed, p: &Pair) -> Result<Child> {
    let log = std::fs::File::create(tb.dir.join("receive.log"))?;
    tb.receive_cmd(&p.dst)?
        .arg("--postcopy-socket")
        .arg(&p.sock)
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .context("starting dbmigrate receive")
}

fn receive_log(tb: &Testbed) -> String {
    std::fs::read_to_string(tb.dir.join("receive.log")).unwrap_or_default()
}

/// Runs a migration to the end; returns the source report and the destination's stats.
fn migrate(tb: &Testbed, p: &Pair, extra: &[&str]) -> Result<(Value, Value)> {
    let recv = receive(tb, p)?;
    let report = tb.dir.join("report.json");
    let out = tb
        .migrate_cmd(&p.src, &report)?
        .args(extra)
        .output()
        .context("running dbmigrate migrate")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("--- dbmigrate migrate stderr ---\n{stderr}");
    let recv_out = recv.wait_with_output()?;
    eprintln!("--- dbmigrate receive stderr ---\n{}", receive_log(tb));
    assert!(!stderr.contains("panicked") && !receive_log(tb).contains("panicked"));
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&report)?)?;
    ensure!(out.status.success(), "migrate failed: {r}");
    ensure!(recv_out.status.success(), "receive failed");
    let dst_stats: Value =
        serde_json::from_slice(&recv_out.stdout).context("reading the destination's statistics")?;
    Ok((r, dst_stats))
}

/// The guest re-verifies all of its memory on the destination.
fn guest_intact_after(p: &Pair) -> Result<()> {
    let last = p
        .src
        .heartbeats()
        .last()
        .cloned()
        .context("no source heartbeat")?;
    let after = p.dst.wait_heartbeat(Duration::from_secs(180), |h| {
        h.seq > last.seq && h.passes >= last.passes + 2
    })?;
    assert_eq!(
        after.errors,
        0,
        "guest found corrupted memory after post-copy: {after:?}\n{}",
        p.dst.console()
    );
    assert!(!p.dst.console().contains("DIRTIER ERROR"));
    Ok(())
}

#[test]
fn postcopy_runs_the_guest_on_the_destination_and_places_every_page_exactly() -> Result<()> {
    let tb = Testbed::new(LINK_MBIT)?;
    let mut p = start_pair(&tb, 64)?;
    // Another user cannot take the guest's memory from the preload library,
    // and trying does not stop QEMU.
    let stranger = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
        ])
        .arg("import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])")
        .arg(&p.sock)
        .output()?;
    assert!(
        !stranger.status.success(),
        "uid 65534 reached the post-copy socket"
    );
    assert!(
        String::from_utf8_lossy(&stranger.stderr).contains("PermissionError"),
        "{}",
        String::from_utf8_lossy(&stranger.stderr)
    );
    assert_eq!(p.dst.qmp()?.status()?, "inmigrate", "QEMU keeps waiting");
    // Uncompressed, so that the link bytes can be checked page for page below.
    let (r, d) = migrate(
        &tb,
        &p,
        &[
            "--mode",
            "postcopy",
            "--allow-postcopy",
            "--compress",
            "off",
        ],
    )?;
    assert_eq!(r["method"], json!("dbmigrate-postcopy"));
    assert_eq!(r["completed"], json!(true));
    assert_eq!(r["vm_runs_on"], json!("destination"));
    assert_eq!(
        r["stats"]["rounds"].as_array().map_or(0, Vec::len),
        1,
        "post-copy hands over after one round"
    );
    let pc = &r["postcopy"];
    assert!(
        pc["pending_pages"].as_u64().unwrap_or(0) > 1000,
        "the 64 MiB working set was dirty at the switch: {pc}"
    );
    assert_eq!(
        pc["ram_verified"],
        json!(true),
        "every placed page matches the frozen source RAM"
    );
    assert_eq!(r["ram_verified"], json!(true));
    assert!(
        d["faults"].as_u64().unwrap_or(0) > 0,
        "the running guest faulted on missing pages: {d}"
    );
    assert!(d["postcopy_pages"].as_u64().unwrap_or(0) >= pc["pending_pages"].as_u64().unwrap_or(0));
    // The report's link bytes cover the round before the switch and the
    // post-copy push: about a page for every page sent raw (compression
    // is off; a few pushed pages may be zero markers).
    let raw = r["pages"]["raw"].as_u64().unwrap_or(0);
    let link = r["link_bytes"].as_u64().unwrap_or(0);
    assert!(raw > 10_000, "{r}");
    assert!(
        link >= raw * 4096 / 10 * 9,
        "link_bytes {link} for {raw} raw pages"
    );
    assert!(
        p.src.wait_exit(Duration::from_secs(20)),
        "source QEMU still running"
    );
    assert_eq!(p.dst.qmp()?.status()?, "running");
    guest_intact_after(&p)
}

/// A guest whose RAM is in two memory backends (two NUMA nodes, a file
/// each): the destination QEMU's preload library registers both mappings
/// with one descriptor, the agent serves faults on either, and the guest
/// re-verifies all of its memory on the destination.
#[test]
fn postcopy_serves_faults_on_every_numa_node() -> Result<()> {
    let tb = Testbed::new(LINK_MBIT)?;
    let numa = VmOptions {
        ws_mib: 64,
        numa_nodes: 2,
        ..VmOptions::default()
    };
    let sock = tb.dir.join("dst.uffd");
    let dst = VmOptions {
        postcopy_socket: Some(sock.clone()),
        ..numa.clone()
    };
    let (src, dst) = start_dirtier_pair_as(&tb, numa, dst)?;
    let mut p = Pair { src, dst, sock };
    let (r, d) = migrate(&tb, &p, &["--mode", "postcopy", "--allow-postcopy"])?;
    assert_eq!(r["vm_runs_on"], json!("destination"));
    assert_eq!(r["postcopy"]["ram_verified"], json!(true), "{r}");
    assert!(
        d["faults"].as_u64().unwrap_or(0) > 0,
        "the running guest faulted on missing pages: {d}"
    );
    let log = receive_log(&tb);
    assert!(log.contains("mappings=2"), "{log}");
    assert!(
        p.src.wait_exit(Duration::from_secs(20)),
        "source QEMU still running"
    );
    guest_intact_after(&p)
}

#[test]
fn hybrid_switches_to_postcopy_when_precopy_would_not_converge() -> Result<()> {
    let tb = Testbed::new(LINK_MBIT)?;
    let mut p = start_pair(&tb, 64)?;
    // A 64 MiB working set cannot be sent in 1 ms: pre-copy would not converge.
    let (r, d) = migrate(
        &tb,
        &p,
        &[
            "--mode",
            "hybrid",
            "--allow-postcopy",
            "--downtime-ms",
            "1",
            "--max-rounds",
            "3",
        ],
    )?;
    assert_eq!(r["method"], json!("dbmigrate-hybrid"));
    assert_eq!(r["stats"]["stop_reason"], json!("round limit reached"));
    assert_eq!(r["stats"]["rounds"].as_array().map_or(0, Vec::len), 3);
    assert_eq!(r["postcopy"]["ram_verified"], json!(true), "{r}");
    assert!(d["postcopy_pages"].as_u64().unwrap_or(0) > 0);
    assert!(
        p.src.wait_exit(Duration::from_secs(20)),
        "source QEMU still running"
    );
    guest_intact_after(&p)
}

#[test]
fn postcopy_is_refused_without_the_explicit_flag_and_the_source_keeps_running() -> Result<()> {
    let tb = Testbed::new(LINK_MBIT)?;
    let p = start_pair(&tb, 16)?;
    let report = tb.dir.join("report.json");
    let out = tb
        .migrate_cmd(&p.src, &report)?
        .args(["--mode", "postcopy"])
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--allow-postcopy"), "{err}");
    assert_eq!(p.src.qmp()?.status()?, "running");
    Ok(())
}

#[test]
fn a_source_lost_during_postcopy_stops_the_destination_cleanly() -> Result<()> {
    // A slower link keeps pages missing for a few seconds after the switch.
    let tb = Testbed::new(200)?;
    let p = start_pair(&tb, 64)?;
    let recv = receive(&tb, &p)?;
    let report = tb.dir.join("report.json");
    let mut mig = tb
        .migrate_cmd(&p.src, &report)?
        .args(["--mode", "postcopy", "--allow-postcopy"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    // Kill the source agent as soon as the VM runs on the destination,
    // while pages are still missing there.
    let t = Instant::now();
    while !receive_log(&tb).contains("VM resumed on the destination") {
        ensure!(
            t.elapsed() < Duration::from_secs(120),
            "destination never ran: {}",
            receive_log(&tb)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    mig.kill()?;
    let _ = mig.wait();
    let out = recv.wait_with_output()?;
    let log = receive_log(&tb);
    eprintln!("--- dbmigrate receive stderr ---\n{log}");
    assert!(
        !out.status.success(),
        "the destination cannot complete without the source"
    );
    assert!(
        log.contains("post-copy failed"),
        "clear error expected: {log}"
    );
    assert!(!log.contains("panicked"));
    // The incomplete destination VM is gone rather than hanging on a fault.
    let mut dst = p.dst;
    assert!(
        dst.wait_exit(Duration::from_secs(20)),
        "destination QEMU still there"
    );
    Ok(())
}
