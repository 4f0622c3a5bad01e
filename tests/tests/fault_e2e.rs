//! The fault suite: real migrations of the dirtier guest (real QEMU, real
//! userfaultfd, a shaped veth link between network namespaces) with a fault
//! injected at a chosen stage. Agents are killed for real (`abort` at a
//! failpoint, as `kill -9` would), links are cut by taking an interface
//! down while an agent waits at a failpoint, and frames are corrupted by a
//! relay on the wire. Each case asserts the documented outcome (README,
//! "Faults and their outcomes"). Needs root; run with `--test-threads=1`.

use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use dbmigrate_testbed::{
    corrupting_relay, sh, start_dirtier_pair_with, wait_limit, Testbed, Vm, VmOptions,
};
use serde_json::Value;

const LINK_MBIT: u32 = 1000;

struct Case {
    tb: Testbed,
    src: Vm,
    dst: Vm,
    sock: PathBuf,
}

fn start(ws_mib: u64) -> Result<Case> {
    start_with(ws_mib, false)
}

/// [`start`], the destination QEMU without `-S` if `autostart`.
fn start_with(ws_mib: u64, autostart: bool) -> Result<Case> {
    let mut tb = Testbed::new(LINK_MBIT)?;
    tb.use_failpoint_agents()?;
    let sock = tb.dir.join("dst.uffd");
    let dst = VmOptions {
        postcopy_socket: Some(sock.clone()),
        autostart,
        ..VmOptions::default()
    };
    let (src, dst) = start_dirtier_pair_with(&tb, ws_mib, dst)?;
    Ok(Case { tb, src, dst, sock })
}

/// Starts `dbmigrate receive` (post-copy capable, 5 s patience) with an
/// optional failpoint.
fn receive(c: &Case, failpoint: Option<&str>) -> Result<Child> {
    let log = std::fs::File::create(c.tb.dir.join("receive.log"))?;
    let mut cmd = c.tb.receive_cmd(&c.dst)?;
    cmd.arg("--postcopy-socket")
        .arg(&c.sock)
        .args(["--timeout", "5"]);
    if let Some(f) = failpoint {
        cmd.env("DBMIGRATE_FAILPOINT", f);
    }
    cmd.stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting dbmigrate receive")
}

/// `dbmigrate migrate` with a failpoint, started in the background.
fn migrate(c: &Case, to: Option<&str>, failpoint: Option<&str>, extra: &[&str]) -> Result<Child> {
    let report = c.tb.dir.join("report.json");
    let mut cmd = c.tb.migrate_cmd(&c.src, &report)?;
    if let Some(to) = to {
        // Replace the destination address (a relay).
        let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into()).collect();
        let i = args.iter().position(|a| a == "--to").expect("--to") + 1;
        let mut fresh = c.tb.in_ns(&c.tb.src_ns, Path::new(&args[3]));
        for (k, a) in args.iter().enumerate().skip(4) {
            fresh.arg(if k == i { to } else { a.as_str() });
        }
        cmd = fresh;
    }
    cmd.args(["--timeout", "5", "--progress", "never"])
        .args(extra);
    if let Some(f) = failpoint {
        cmd.env("DBMIGRATE_FAILPOINT", f);
    }
    cmd.stdout(Stdio::null())
        .stderr(std::fs::File::create(c.tb.dir.join("migrate.log"))?)
        .spawn()
        .context("starting dbmigrate migrate")
}

fn log(c: &Case, name: &str) -> String {
    std::fs::read_to_string(c.tb.dir.join(name)).unwrap_or_default()
}

fn finish(c: &Case, child: Child, what: &str) -> Result<Output> {
    let out = wait_limit(child, Duration::from_secs(120))
        .with_context(|| format!("{what} did not exit"))?;
    let l = log(
        c,
        if what == "migrate" {
            "migrate.log"
        } else {
            "receive.log"
        },
    );
    eprintln!("--- {what} ---\n{l}");
    ensure!(!l.contains("panicked"), "{what} panicked");
    Ok(out)
}

/// Waits until an agent stopped at a `pause` failpoint.
fn wait_paused(marker: &Path) -> Result<()> {
    let t = Instant::now();
    while !marker.exists() {
        ensure!(
            t.elapsed() < Duration::from_secs(180),
            "failpoint never reached"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn report(c: &Case) -> Value {
    std::fs::read_to_string(c.tb.dir.join("report.json"))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(Value::Null)
}

/// The source VM runs and its guest completes a full verification pass of
/// all its memory after the fault, finding nothing wrong.
fn source_intact(c: &Case) -> Result<()> {
    let mut q = c.src.qmp()?;
    assert_eq!(q.status()?, "running", "the source VM must run");
    drop(q);
    let last = c.src.heartbeats().last().cloned().context("no heartbeat")?;
    let h = c
        .src
        .wait_heartbeat(Duration::from_secs(180), |h| h.passes > last.passes)?;
    assert_eq!(h.errors, 0, "guest memory corrupted on the source: {h:?}");
    Ok(())
}

/// The destination VM runs and its guest re-verifies all of its memory.
fn destination_intact(c: &Case) -> Result<()> {
    let last = c.src.heartbeats().last().cloned().context("no heartbeat")?;
    let h = c.dst.wait_heartbeat(Duration::from_secs(180), |h| {
        h.seq > last.seq && h.passes >= last.passes + 2
    })?;
    assert_eq!(
        h.errors, 0,
        "guest memory corrupted on the destination: {h:?}"
    );
    Ok(())
}

#[test]
fn source_agent_killed_during_precopy_leaves_the_source_running() -> Result<()> {
    let mut c = start(16)?;
    let recv = receive(&c, None)?;
    let mig = migrate(&c, None, Some("src-precopy-round:abort"), &[])?;
    let out = finish(&c, mig, "migrate")?;
    assert!(!out.status.success());
    let r = finish(&c, recv, "receive")?;
    assert!(!r.status.success(), "the destination cannot complete");
    assert!(
        log(&c, "receive.log").contains("source"),
        "the error names the source"
    );
    source_intact(&c)?;
    assert!(
        c.dst.wait_exit(Duration::from_secs(20)),
        "destination QEMU discarded"
    );
    Ok(())
}

#[test]
fn source_agent_killed_in_stop_and_copy_leaves_the_source_paused_and_resumable() -> Result<()> {
    let c = start(16)?;
    let recv = receive(&c, None)?;
    let mig = migrate(&c, None, Some("src-stop-and-copy:abort"), &[])?;
    assert!(!finish(&c, mig, "migrate")?.status.success());
    assert!(!finish(&c, recv, "receive")?.status.success());
    // A dead agent cannot resume the VM: it waits paused with its memory
    // intact, and the operator resumes it (README).
    let mut q = c.src.qmp()?;
    assert_eq!(q.status()?, "paused");
    q.cmd("cont", serde_json::json!({}))?;
    drop(q);
    source_intact(&c)
}

#[test]
fn destination_agent_killed_in_stop_and_copy_resumes_the_source() -> Result<()> {
    let c = start(16)?;
    let marker = c.tb.dir.join("paused");
    let recv = receive(&c, None)?;
    let spec = format!("src-stop-and-copy:pause:{}", marker.display());
    let mig = migrate(&c, None, Some(&spec), &[])?;
    wait_paused(&marker)?;
    // The VM is paused on the source; the destination agent dies now.
    let mut recv = recv;
    recv.kill()?;
    let _ = recv.wait();
    std::fs::remove_file(&marker)?;
    let out = finish(&c, mig, "migrate")?;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(report(&c)["vm_runs_on"], "source");
    source_intact(&c)
}

#[test]
fn destination_agent_killed_at_commit_leaves_the_source_paused_with_exit_3() -> Result<()> {
    let c = start(16)?;
    let recv = receive(&c, Some("dst-commit:abort"))?;
    let mig = migrate(&c, None, None, &[])?;
    let out = finish(&c, mig, "migrate")?;
    let _ = finish(&c, recv, "receive");
    // After Commit the source cannot know whether the destination runs the
    // VM: it must neither resume nor quit, and says what to check.
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(report(&c)["vm_runs_on"], "unknown");
    assert!(log(&c, "migrate.log").contains("resume the source"));
    let mut q = c.src.qmp()?;
    assert_eq!(q.status()?, "postmigrate");
    Ok(())
}

#[test]
fn destination_qemu_without_s_runs_only_after_commit() -> Result<()> {
    // QEMU without -S would run the guest as soon as its device state has
    // loaded; the receive keeps it stopped until the source commits.
    let c = start_with(16, true)?;
    let marker = c.tb.dir.join("paused");
    let recv = receive(&c, None)?;
    let spec = format!("src-before-commit:pause:{}", marker.display());
    let mig = migrate(&c, None, Some(&spec), &[])?;
    wait_paused(&marker)?;
    // The device state has moved (the source waited for QEMU to finish);
    // a guest that ran would print its heartbeat within a second. (The
    // agents hold both QMP sockets: the console tells.)
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !c.dst.console().contains("DIRTIER HB"),
        "the destination ran before Commit:\n{}",
        c.dst.console()
    );
    std::fs::remove_file(&marker)?;
    assert!(finish(&c, mig, "migrate")?.status.success());
    assert!(finish(&c, recv, "receive")?.status.success());
    assert_eq!(c.dst.qmp()?.status()?, "running");
    destination_intact(&c)
}

#[test]
fn a_destination_that_cannot_resume_is_killed_and_only_the_source_runs() -> Result<()> {
    // A destination QEMU without -S that hangs at Commit: its `cont` is
    // never answered, so the receive cannot know whether the VM runs. It
    // kills QEMU before it tells the source to take the VM back, and the
    // rollback leaves exactly one VM running, the source.
    let mut c = start_with(16, true)?;
    let marker = c.tb.dir.join("paused");
    let recv = receive(&c, Some(&format!("dst-commit:pause:{}", marker.display())))?;
    let mig = migrate(&c, None, None, &[])?;
    wait_paused(&marker)?;
    sh(&["kill", "-STOP", &c.dst.pid().to_string()])?;
    std::fs::remove_file(&marker)?;
    let r = finish(&c, recv, "receive")?;
    assert!(!r.status.success());
    let out = finish(&c, mig, "migrate")?;
    assert_eq!(out.status.code(), Some(1), "the source takes the VM back");
    assert_eq!(report(&c)["vm_runs_on"], "source");
    assert!(
        log(&c, "receive.log").contains("killed"),
        "the receive says it killed QEMU"
    );
    assert!(
        c.dst.wait_exit(Duration::from_secs(20)),
        "destination QEMU killed"
    );
    assert!(
        !c.dst.console().contains("DIRTIER HB"),
        "the destination ran:\n{}",
        c.dst.console()
    );
    source_intact(&c)
}

#[test]
fn source_agent_killed_after_commit_lets_the_destination_run_byte_exact() -> Result<()> {
    let c = start(16)?;
    let recv = receive(&c, None)?;
    let mig = migrate(&c, None, Some("src-after-commit:abort"), &[])?;
    assert!(!finish(&c, mig, "migrate")?.status.success());
    let r = finish(&c, recv, "receive")?;
    // The destination had every page, verified, and the Commit: it runs.
    assert!(r.status.success(), "receive failed");
    assert_eq!(c.dst.qmp()?.status()?, "running");
    destination_intact(&c)
}

/// Cuts the migration link (at the destination's end, as a pulled cable
/// Starts a migration (with `extra` flags) whose source agent stops at
/// `stage`, takes the migration link down at the destination's end (as a
/// pulled cable would), lets the agent go on, and returns the case with
/// both agents' results.
fn cut_link_while_paused_at(
    stage: &str,
    ws_mib: u64,
    extra: &[&str],
) -> Result<(Case, Output, Output)> {
    let c = start(ws_mib)?;
    let marker = c.tb.dir.join("paused");
    let spec = format!("{stage}:pause:{}", marker.display());
    // A `dst-` stage pauses the destination agent, any other the source.
    let at_dst = stage.starts_with("dst-");
    let recv = receive(&c, at_dst.then_some(spec.as_str()))?;
    let mig = migrate(&c, None, (!at_dst).then_some(spec.as_str()), extra)?;
    wait_paused(&marker)?;
    sh(&[
        "ip",
        "-n",
        &c.tb.dst_ns,
        "link",
        "set",
        &c.tb.dst_if,
        "down",
    ])?;
    std::fs::remove_file(&marker)?;
    let out = finish(&c, mig, "migrate")?;
    let r = finish(&c, recv, "receive")?;
    Ok((c, out, r))
}

/// A cut before the hand-over: the source must keep or resume the VM
/// after its timeout.
fn cut_link_at(stage: &str, ws_mib: u64) -> Result<Case> {
    let (c, out, r) = cut_link_while_paused_at(stage, ws_mib, &[])?;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(report(&c)["vm_runs_on"], "source");
    assert!(!r.status.success());
    source_intact(&c)?;
    Ok(c)
}

#[test]
fn migration_link_cut_during_precopy_leaves_the_source_running() -> Result<()> {
    // A 64 MiB working set does not converge after the first round: the cut
    // falls in the middle of the next pre-copy round.
    let mut c = cut_link_at("src-precopy-round", 64)?;
    assert!(
        c.dst.wait_exit(Duration::from_secs(20)),
        "destination QEMU discarded"
    );
    Ok(())
}

#[test]
fn migration_link_cut_at_stop_and_copy_resumes_the_source() -> Result<()> {
    cut_link_at("src-stop-and-copy", 16).map(drop)
}

fn flip_a_byte_deep_in(off: u64, b: &mut [u8]) {
    // 3 MB into a data connection: inside the pages of the first round.
    const AT: u64 = 3 << 20;
    if (off..off + b.len() as u64).contains(&AT) {
        let i = usize::try_from(AT - off).expect("inside the buffer");
        b[i] ^= 0x40;
    }
}

#[test]
fn a_frame_corrupted_in_flight_never_reaches_a_running_vm() -> Result<()> {
    let c = start(16)?;
    let relay: std::net::SocketAddr = format!("{}:7100", c.tb.dst_ip).parse()?;
    let target: std::net::SocketAddr = format!("{}:7000", c.tb.dst_ip).parse()?;
    // Connection 0 is control; 1 is the first data connection.
    corrupting_relay(&c.tb.dst_ns, relay, target, 1, flip_a_byte_deep_in)?;
    let recv = receive(&c, None)?;
    let mig = migrate(&c, Some(&relay.to_string()), None, &[])?;
    let out = finish(&c, mig, "migrate")?;
    let _ = finish(&c, recv, "receive");
    // Over TLS a flipped byte fails the record's authentication ("cannot
    // decrypt"); over plain TCP a flipped byte in a page is caught by the
    // switchover digests, one in a frame header by the decoder: either way
    // the source keeps the VM.
    assert_eq!(out.status.code(), Some(1), "{}", log(&c, "migrate.log"));
    assert_eq!(report(&c)["vm_runs_on"], "source");
    let l = log(&c, "migrate.log");
    assert!(
        l.contains("RAM differs")
            || l.contains("decrypt")
            || l.contains("malformed")
            || l.contains("magic")
            || l.contains("bad page"),
        "the error names the corruption: {l}"
    );
    source_intact(&c)
}

#[test]
fn destination_agent_killed_during_postcopy_stops_the_destination_vm() -> Result<()> {
    let mut c = start(64)?;
    let recv = receive(&c, Some("dst-postcopy:abort"))?;
    let mig = migrate(&c, None, None, &["--mode", "postcopy", "--allow-postcopy"])?;
    let out = finish(&c, mig, "migrate")?;
    let _ = finish(&c, recv, "receive");
    // The VM ran on the destination: the source cannot take it back. It
    // reports the failure and keeps the frozen RAM (paused, not quit).
    assert!(!out.status.success());
    assert_ne!(report(&c)["vm_runs_on"], "source");
    assert!(log(&c, "migrate.log").contains("after the hand-over"));
    assert!(!c.src.exited(), "the source QEMU keeps the frozen RAM");
    // The destination QEMU, whose faults depended on the dead agent, stops
    // instead of hanging on a page that will never come.
    assert!(
        c.dst.wait_exit(Duration::from_secs(20)),
        "destination QEMU still there"
    );
    assert!(c.dst.qemu_log(&c.tb).contains("went away"));
    Ok(())
}

/// A cut at a commitment stage: the source cannot tell whether Commit
/// arrived, so it neither resumes nor quits, exits 3 and says what to check.
fn cut_link_at_commitment(stage: &str) -> Result<(Case, Output)> {
    let (c, out, r) = cut_link_while_paused_at(stage, 16, &[])?;
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(report(&c)["vm_runs_on"], "unknown");
    assert!(log(&c, "migrate.log").contains("resume the source"));
    assert_eq!(c.src.qmp()?.status()?, "postmigrate");
    Ok((c, r))
}

#[test]
fn migration_link_cut_before_commit_leaves_both_paused_and_the_source_resumable() -> Result<()> {
    let (mut c, r) = cut_link_at_commitment("src-before-commit")?;
    // Commit never arrived: the destination gives up and discards its QEMU,
    assert!(!r.status.success());
    assert!(
        c.dst.wait_exit(Duration::from_secs(20)),
        "destination QEMU discarded"
    );
    // and the operator resumes the source, whose memory is intact.
    c.src.qmp()?.cmd("cont", serde_json::json!({}))?;
    source_intact(&c)
}

#[test]
fn migration_link_cut_after_commit_lets_the_destination_run_byte_exact() -> Result<()> {
    // The destination holds right after Commit arrived, so the cut
    // surely comes before its confirmation (a source paused after sending
    // Commit may already have the confirmation in its socket).
    let (c, r) = cut_link_at_commitment("dst-commit")?;
    // Commit arrived before the cut: the destination runs the VM (its
    // confirmation is lost with the link) and must not be left paused.
    assert!(r.status.success(), "receive failed");
    assert_eq!(c.dst.qmp()?.status()?, "running");
    destination_intact(&c)
}

#[test]
fn migration_link_cut_during_postcopy_stops_the_destination_and_keeps_the_frozen_source(
) -> Result<()> {
    // A slow push keeps pages missing on the destination when the link goes.
    let (mut c, out, r) = cut_link_while_paused_at(
        "src-postcopy",
        64,
        &[
            "--mode",
            "postcopy",
            "--allow-postcopy",
            "--bandwidth",
            "300mbit",
        ],
    )?;
    // Neither side waits forever: each gives up after its timeout. The
    // source keeps the frozen RAM (paused, exit 3: the VM ran elsewhere),
    // the destination stops its incomplete VM.
    assert_eq!(out.status.code(), Some(3));
    assert_ne!(report(&c)["vm_runs_on"], "source");
    assert!(!c.src.exited(), "the source QEMU keeps the frozen RAM");
    assert!(!r.status.success());
    assert!(
        log(&c, "receive.log").contains("no word from the source agent"),
        "the destination names the silent source"
    );
    assert!(
        c.dst.wait_exit(Duration::from_secs(20)),
        "destination QEMU still there"
    );
    Ok(())
}

#[test]
fn precopy_to_a_postcopy_ready_destination_leaves_no_fault_unserved() -> Result<()> {
    let c = start(16)?;
    let recv = receive(&c, None)?;
    let mig = migrate(&c, None, None, &[])?;
    assert!(finish(&c, mig, "migrate")?.status.success());
    assert!(finish(&c, recv, "receive")?.status.success());
    // Zero pages are holes in the RAM file: the guest must reach them
    // after the agent has gone.
    destination_intact(&c)
}
