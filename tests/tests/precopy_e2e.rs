//! End-to-end pre-copy with real QEMU guests in two network namespaces joined
//! by a 1 Gbit/s shaped veth link. Needs root; builds the guest image if it
//! is not cached. Run one at a time (`--test-threads=1`): the machine has two cores.

use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use dbmigrate_testbed::{
    bin_dir, dirtier_guest, start_dirtier_pair, start_dirtier_pair_as, Testbed, Vm, VmOptions,
};
use serde_json::{json, Value};

const LINK_MBIT: u32 = 1000;

fn receive(tb: &Testbed, dst: &Vm) -> Result<Child> {
    let log = std::fs::File::create(tb.dir.join("receive.log"))?;
    tb.receive_cmd(dst)?
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting dbmigrate receive")
}

fn migrate(tb: &Testbed, src: &Vm, extra: &[&str]) -> Result<(Output, Value)> {
    let report = tb.dir.join("report.json");
    let out = tb
        .migrate_cmd(src, &report)?
        .args(extra)
        .output()
        .context("running dbmigrate migrate")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("--- dbmigrate migrate stderr ---\n{stderr}");
    assert!(!stderr.contains("panicked"), "the agent panicked");
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(&report).context("reading the report")?)?;
    Ok((out, v))
}

/// The guest carries on at `dst` and completes two more full verification
/// passes of its memory than it had on `src`, finding nothing wrong.
fn reverified_on(dst: &Vm, src: &Vm) -> Result<()> {
    let last_src = src
        .heartbeats()
        .last()
        .cloned()
        .context("no source heartbeat")?;
    let after = dst.wait_heartbeat(Duration::from_secs(180), |h| {
        h.seq > last_src.seq && h.passes >= last_src.passes + 2
    })?;
    assert_eq!(
        after.errors,
        0,
        "guest found corrupted memory after migration: {after:?}\n{}",
        dst.console()
    );
    assert!(
        !dst.console().contains("DIRTIER ERROR"),
        "{}",
        dst.console()
    );
    Ok(())
}

fn start_pair(tb: &Testbed, ws_mib: u64) -> Result<(Vm, Vm)> {
    start_dirtier_pair(tb, ws_mib, None)
}

#[test]
fn precopy_moves_a_running_guest_byte_exact() -> Result<()> {
    let tb = Testbed::new(LINK_MBIT)?;
    let (mut src, dst) = start_pair(&tb, 16)?;
    let mut recv = receive(&tb, &dst)?;
    // With the adaptive pace on, reading QEMU's real vCPU threads.
    let (out, report) = migrate(&tb, &src, &["--guest-impact-budget", "50"])?;
    let recv_status = recv.wait()?;
    let recv_log = std::fs::read_to_string(tb.dir.join("receive.log")).unwrap_or_default();
    eprintln!("--- dbmigrate receive stderr ---\n{recv_log}");
    ensure!(out.status.success(), "migrate failed: {report}");
    ensure!(recv_status.success(), "receive failed");
    assert_eq!(report["completed"], json!(true));
    assert_eq!(
        report["ram_verified"],
        json!(true),
        "RAM digests must match at switchover"
    );
    assert_eq!(report["vm_runs_on"], json!("destination"));
    assert!(
        report["pages"]["raw"].as_u64().unwrap_or(0) > 10_000,
        "most of RAM went as raw pages"
    );
    assert!(
        report["stats"]["rounds"].as_array().map_or(0, Vec::len) >= 2,
        "live rounds plus stop-and-copy"
    );
    assert_eq!(report["guest_impact"]["budget_pct"], json!(50.0));
    let baseline = report["guest_impact"]["baseline_wait_pct"].as_f64();
    ensure!(
        baseline.is_some_and(|b| (0.0..=100.0).contains(&b)),
        "the vCPUs' baseline wait share: {report}"
    );
    // A step every half second while the VM ran here (seconds: RAM over
    // the link), each a share of time.
    let steps = report["stats"]["pacing"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    ensure!(!steps.is_empty(), "no adaptive pace step: {report}");
    for step in &steps {
        let wait = step["wait_pct"].as_f64().unwrap_or(-1.0);
        ensure!((0.0..=100.0).contains(&wait), "pace step {step}");
    }

    // The source QEMU is gone once the destination runs.
    assert!(
        src.wait_exit(Duration::from_secs(20)),
        "source QEMU still running"
    );
    let mut q = dst.qmp()?;
    assert_eq!(q.status()?, "running");

    // The guest carries on at the destination and re-verifies all its memory there.
    reverified_on(&dst, &src)
}

/// A guest whose RAM is in two memory backends (two NUMA nodes, a file
/// each, as libvirt gives a domain with NUMA cells) moves byte-exact by
/// pre-copy (post-copy: `postcopy_e2e.rs`).
#[test]
fn a_guest_with_two_numa_nodes_moves_byte_exact() -> Result<()> {
    let tb = Testbed::new(LINK_MBIT)?;
    let numa = VmOptions {
        ws_mib: 16,
        numa_nodes: 2,
        ..VmOptions::default()
    };
    let (mut src, dst) = start_dirtier_pair_as(&tb, numa.clone(), numa)?;
    let mut recv = receive(&tb, &dst)?;
    let (out, report) = migrate(&tb, &src, &[])?;
    let recv_ok = recv.wait()?.success();
    let recv_log = std::fs::read_to_string(tb.dir.join("receive.log")).unwrap_or_default();
    ensure!(
        out.status.success() && recv_ok,
        "migrate: {report}\nreceive: {recv_log}"
    );
    assert_eq!(report["ram_verified"], json!(true), "{report}");
    // Both nodes' memory is in the guest-physical layout, the second
    // node's at its place in the run (after the first file's 256 MiB).
    let offsets: Vec<u64> = report["gpa_layout"]
        .as_array()
        .context("gpa_layout")?
        .iter()
        .filter_map(|r| r["offset"].as_u64())
        .collect();
    ensure!(
        offsets.iter().any(|&o| o >= 256 << 20),
        "no range of the second node: {report}"
    );
    assert!(
        src.wait_exit(Duration::from_secs(20)),
        "source QEMU still running"
    );
    reverified_on(&dst, &src)
}

/// Knocks on the destination agent's port for `secs` seconds as strangers
/// would: connect and close, garbage, a plain-TCP dbmigrate frame, TLS with
/// a certificate of another CA and with one for a name not allowed, and
/// connections that stay silent.
const SCANNER: &str = r#"
import socket, ssl, sys, time
host, port, pki, secs = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
silent, end, n = [], time.time() + secs, 0
def tls(who):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(f"{pki}/{who}/client-cert.pem", f"{pki}/{who}/client-key.pem")
    s = ctx.wrap_socket(socket.create_connection((host, port), timeout=5))
    s.sendall(b"DMG1" + bytes(12))
    try: s.recv(16)
    except Exception: pass
    s.close()
while time.time() < end:
    for knock in range(6):
        try:
            if knock == 0: socket.create_connection((host, port), timeout=5).close()
            elif knock == 1: socket.create_connection((host, port), timeout=5).sendall(b"GET / HTTP/1.0\r\n\r\n" * 50)
            elif knock == 2: socket.create_connection((host, port), timeout=5).sendall(b"DMG1\x01\x00\x00\x00" + (1 << 22).to_bytes(8, "little"))
            elif knock == 3: tls("impostor")
            elif knock == 4: tls("rogue")
            elif len(silent) < 20: silent.append(socket.create_connection((host, port), timeout=5))
            n += 1
        except Exception:
            pass
    time.sleep(0.2)
print(n)
"#;

#[test]
fn strangers_neither_reach_qemu_nor_end_the_migration() -> Result<()> {
    let tb = Testbed::new(LINK_MBIT)?;
    let (src, dst) = start_pair(&tb, 16)?;
    // Another process maps the destination's RAM file: refused, by pid.
    let ram = format!("/dev/shm/{}-dst", tb.tag);
    let mut mapper = Command::new("python3")
        .args(["-c", "import mmap, sys, time; f = open(sys.argv[1], 'r+b'); m = mmap.mmap(f.fileno(), 4096); print(flush=True); time.sleep(300)"])
        .arg(&ram)
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(mapper.stdout.take().context("mapper stdout")?),
        &mut line,
    )?;
    let refused = tb.receive_cmd(&dst)?.arg("--keep-qemu").output()?;
    let _ = mapper.kill();
    let _ = mapper.wait();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success(),
        "receive took a RAM file another process maps"
    );
    assert!(err.contains(&format!("pid {}", mapper.id())), "{err}");
    assert_eq!(
        dst.qmp()?.status()?,
        "inmigrate",
        "the destination QEMU is kept"
    );

    // Strangers knock on the agent's port throughout the migration.
    let mut recv = receive(&tb, &dst)?;
    let scanner = tb
        .in_ns(&tb.src_ns, std::path::Path::new("python3"))
        .args(["-c", SCANNER, &tb.dst_ip, "7000"])
        .arg(tb.dir.join("pki"))
        .arg("12")
        .stdout(Stdio::piped())
        .spawn()?;
    std::thread::sleep(Duration::from_secs(2));
    let (out, report) = migrate(&tb, &src, &["--bandwidth", "400mbit"])?;
    let knocks = String::from_utf8_lossy(&scanner.wait_with_output()?.stdout)
        .trim()
        .to_string();
    let recv_status = recv.wait()?;
    let recv_log = std::fs::read_to_string(tb.dir.join("receive.log")).unwrap_or_default();
    eprintln!("--- dbmigrate receive stderr ---\n{recv_log}\n--- knocks: {knocks}");
    ensure!(out.status.success(), "migrate failed: {report}");
    ensure!(recv_status.success(), "receive failed");
    assert_eq!(report["ram_verified"], json!(true));
    assert!(
        knocks.parse::<u32>().unwrap_or(0) > 10,
        "the scanner knocked {knocks} times"
    );
    assert!(
        recv_log.contains("refused a connection"),
        "the strangers were seen"
    );
    // No QEMU listened on the network: device state came through the agents.
    let sockets = Command::new("ip")
        .args(["netns", "exec", &tb.dst_ns, "ss", "-Hltnp"])
        .output()?;
    let sockets = String::from_utf8_lossy(&sockets.stdout);
    assert!(!sockets.contains("qemu"), "QEMU listens on TCP: {sockets}");
    reverified_on(&dst, &src)
}

/// A destination agent that a source may meet: TLS with the certificate in
/// directory argv[3] (client certificates of the CA required), one
/// connection, the first frame read, then a Welcome of the current version
/// that also carries a QEMU URI (argv[4]) as protocol 6's did, and every
/// byte after it counted. Prints one JSON line of what it saw.
const FAKE_DESTINATION: &str = r#"
import json, socket, ssl, struct, sys
host, port, tls, uri, version = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
ctx.load_cert_chain(f"{tls}/server-cert.pem", f"{tls}/server-key.pem")
ctx.load_verify_locations(f"{tls}/ca-cert.pem")
ctx.verify_mode = ssl.CERT_REQUIRED
srv = socket.create_server((host, port))
print("listening", flush=True)
raw, _ = srv.accept()
raw.settimeout(20)
seen = {}
def exact(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c: raise EOFError("closed")
        b += c
    return b
try:
    s = ctx.wrap_socket(raw, server_side=True)
    head = exact(s, 16)
    seen["kind"] = struct.unpack_from("<H", head, 4)[0]
    exact(s, struct.unpack_from("<Q", head, 8)[0])
    p = struct.pack("<II", version, len(uri)) + uri.encode() + b"\0"
    s.sendall(b"DMG1" + struct.pack("<HHQ", 2, 0, len(p)) + p)
    seen["after_welcome"] = 0
    while True:
        b = s.recv(65536)
        if not b: break
        seen["after_welcome"] += len(b)
except Exception as e:
    seen["error"] = str(e)
print(json.dumps(seen), flush=True)
"#;

/// Runs [`FAKE_DESTINATION`] with the certificate of test host `cert` in
/// the destination's namespace on `port`, migrates `src` to it, and
/// returns the agent's output, its report and what the fake saw.
fn migrate_to_fake(
    tb: &Testbed,
    src: &Vm,
    cert: &str,
    uri: &str,
    port: u16,
) -> Result<(Output, Value, Value)> {
    let mut fake = tb
        .in_ns(&tb.dst_ns, std::path::Path::new("python3"))
        .args(["-c", FAKE_DESTINATION, &tb.dst_ip, &port.to_string()])
        .arg(tb.tls_dir(cert))
        .arg(uri)
        .arg(dbmigrate_core::protocol::PROTOCOL_VERSION.to_string())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut out = std::io::BufReader::new(fake.stdout.take().context("fake stdout")?);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line)?;
    ensure!(line.trim() == "listening", "fake destination: {line}");
    let report = tb.dir.join("report.json");
    let _ = std::fs::remove_file(&report);
    let agent = tb.migrate_cmd_to(src, &report, port)?.output()?;
    let stderr = String::from_utf8_lossy(&agent.stderr);
    eprintln!("--- dbmigrate migrate stderr ---\n{stderr}");
    assert!(!stderr.contains("panicked"), "the agent panicked");
    line.clear();
    std::io::BufRead::read_line(&mut out, &mut line)?;
    let _ = fake.kill();
    let _ = fake.wait();
    let report = serde_json::from_str(&std::fs::read_to_string(&report)?)?;
    Ok((
        agent,
        report,
        serde_json::from_str(&line).context("fake's summary")?,
    ))
}

#[test]
fn a_hostile_destination_reaches_neither_qemu_nor_the_source_host() -> Result<()> {
    let tb = Testbed::new(LINK_MBIT)?;
    let (src, dst) = start_pair(&tb, 16)?;
    let pwned = tb.dir.join("pwned");
    let uri = format!("exec:touch {}", pwned.display());
    let untouched = |report: &Value| -> Result<()> {
        assert_eq!(report["vm_runs_on"], "source");
        let mut q = src.qmp()?;
        assert_eq!(q.status()?, "running", "the source VM must run");
        // QEMU was never asked to migrate anywhere.
        let migration = q.cmd("query-migrate", json!({}))?;
        assert!(migration.get("status").is_none(), "{migration}");
        assert!(!pwned.exists(), "the peer's command ran");
        Ok(())
    };
    // A host of the same CA whose certificate is not for destination.test:
    // refused in the handshake, before the source says anything.
    let (out, report, seen) = migrate_to_fake(&tb, &src, "rogue", &uri, 7001)?;
    assert_eq!(out.status.code(), Some(1));
    let err = report["error"].as_str().unwrap_or_default();
    assert!(err.contains("TLS handshake"), "{err}");
    assert!(seen.get("kind").is_none(), "the source spoke: {seen}");
    untouched(&report)?;
    // The destination's own certificate, and a Welcome that carries a
    // QEMU URI: refused, nothing of it reaches QMP, and nothing is sent.
    let (out, report, seen) = migrate_to_fake(&tb, &src, "dst", &uri, 7002)?;
    assert_eq!(out.status.code(), Some(1));
    let err = report["error"].as_str().unwrap_or_default();
    assert!(err.contains("Welcome"), "{err}");
    assert_eq!(seen["kind"], json!(1), "the source's Hello: {seen}");
    assert_eq!(seen["after_welcome"], json!(0), "{seen}");
    untouched(&report)?;
    // The source is as it was: the real destination then gets it byte-exact.
    let mut recv = receive(&tb, &dst)?;
    let (out, report) = migrate(&tb, &src, &[])?;
    ensure!(recv.wait()?.success(), "receive failed");
    ensure!(out.status.success(), "migrate failed: {report}");
    assert_eq!(report["ram_verified"], json!(true));
    reverified_on(&dst, &src)
}

#[test]
fn killed_destination_agent_leaves_the_source_running_intact() -> Result<()> {
    let tb = Testbed::new(LINK_MBIT)?;
    let (src, _dst) = start_pair(&tb, 16)?;
    let mut recv = receive(&tb, &_dst)?;
    // Slow the first pass down so the kill lands in the middle of it.
    let killer = {
        let pid = recv.id();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(4));
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        })
    };
    let (out, report) = migrate(&tb, &src, &["--bandwidth", "200mbit"])?;
    killer.join().expect("killer thread");
    let _ = recv.wait();
    assert_eq!(
        out.status.code(),
        Some(1),
        "migrate must fail with the VM on the source: {report}"
    );
    assert_eq!(report["vm_runs_on"], json!("source"));
    assert_eq!(report["completed"], json!(false));
    let err = report["error"].as_str().unwrap_or_default();
    assert!(!err.is_empty(), "the report says why");

    let mut q = src.qmp()?;
    assert_eq!(q.status()?, "running", "source VM must keep running");
    let caps = q.cmd("query-migrate-capabilities", json!({}))?;
    let ignore_shared = caps
        .as_array()
        .and_then(|a| a.iter().find(|c| c["capability"] == "x-ignore-shared"))
        .map(|c| c["state"].clone());
    assert_eq!(
        ignore_shared,
        Some(json!(false)),
        "x-ignore-shared restored"
    );

    // The guest keeps running on the source and its memory verifies clean.
    let at_kill = src.heartbeats().last().cloned().context("no heartbeat")?;
    let later = src.wait_heartbeat(Duration::from_secs(120), |h| h.passes >= at_kill.passes + 2)?;
    assert_eq!(later.errors, 0, "{}", src.console());
    Ok(())
}

#[test]
fn interrupted_migration_resumes_the_source() -> Result<()> {
    let tb = Testbed::new(LINK_MBIT)?;
    let (src, dst) = start_pair(&tb, 16)?;
    let mut recv = receive(&tb, &dst)?;
    let report = tb.dir.join("report.json");
    let migrate = tb
        .migrate_cmd(&src, &report)?
        .args(["--bandwidth", "200mbit"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    std::thread::sleep(Duration::from_secs(3));
    // What an operator's Ctrl-C sends.
    Command::new("kill")
        .args(["-INT", &migrate.id().to_string()])
        .status()?;
    let out = migrate.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"));
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&report)?)?;
    assert_eq!(r["vm_runs_on"], json!("source"));
    assert!(
        r["error"]
            .as_str()
            .unwrap_or_default()
            .contains("interrupted"),
        "{r}"
    );
    // The destination agent learns of the abort and gives up too.
    let recv_status = recv.wait()?;
    assert!(!recv_status.success());
    assert_eq!(src.qmp()?.status()?, "running");
    let at = src.heartbeats().last().cloned().context("no heartbeat")?;
    let later = src.wait_heartbeat(Duration::from_secs(120), |h| h.passes >= at.passes + 2)?;
    assert_eq!(later.errors, 0);
    Ok(())
}

#[test]
fn clear_errors_for_bad_input() -> Result<()> {
    let bin = bin_dir()?.join("dbmigrate");
    // No certificates: TLS is the default, and the error names the file and the ways out.
    let out = Command::new(&bin)
        .args([
            "migrate",
            "--qmp",
            "/nonexistent/qmp.sock",
            "--to",
            "127.0.0.1:9",
        ])
        .args(["--tls-dir", "/nonexistent/pki"])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("/nonexistent/pki/ca-cert.pem") && err.contains("--insecure-plaintext"),
        "{err}"
    );
    // Missing QMP socket.
    let out = Command::new(&bin)
        .args([
            "migrate",
            "--qmp",
            "/nonexistent/qmp.sock",
            "--to",
            "127.0.0.1:9",
            "--insecure-plaintext",
        ])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("cannot connect to the QMP socket"), "{err}");
    assert!(!err.contains("panicked"));
    // Bad flag values are refused by the parser with the reason.
    let out = Command::new(&bin)
        .args([
            "migrate",
            "--qmp",
            "x",
            "--to",
            "127.0.0.1:9",
            "--bandwidth",
            "fast",
        ])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("not a rate"), "{err}");
    let out = Command::new(&bin)
        .args(["migrate", "--qmp", "x", "--to", "nowhere"])
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid"));
    Ok(())
}

/// A source VM alone (no guest readiness needed: the agent refuses it first).
fn lone_source(tb: &Testbed, opts: VmOptions) -> Result<Vm> {
    Vm::start(tb, &tb.src_ns, "src", &dirtier_guest()?, &opts)
}

#[test]
fn qemu_without_preload_is_refused_and_keeps_running() -> Result<()> {
    let tb = Testbed::new(LINK_MBIT)?;
    let src = lone_source(
        &tb,
        VmOptions {
            preload: false,
            ..VmOptions::default()
        },
    )?;
    // QEMU serves one QMP client at a time: while we hold the socket the
    // agent must say so instead of hanging.
    let mut held = src.qmp()?;
    assert_eq!(held.status()?, "running");
    let (out, report) = migrate(&tb, &src, &[])?;
    assert_eq!(out.status.code(), Some(1));
    let err = report["error"].as_str().unwrap_or_default();
    assert!(err.contains("another client"), "{err}");
    drop(held);
    let (out, report) = migrate(&tb, &src, &[])?;
    assert_eq!(out.status.code(), Some(1));
    let err = report["error"].as_str().unwrap_or_default();
    assert!(err.contains("LD_PRELOAD"), "error must name the fix: {err}");
    assert_eq!(src.qmp()?.status()?, "running");
    Ok(())
}

#[test]
fn ram_backend_that_is_not_shared_is_refused() -> Result<()> {
    let tb = Testbed::new(LINK_MBIT)?;
    let src = lone_source(
        &tb,
        VmOptions {
            share: false,
            ..VmOptions::default()
        },
    )?;
    let (out, report) = migrate(&tb, &src, &[])?;
    assert_eq!(out.status.code(), Some(1));
    let err = report["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("share=off") && err.contains("share=on"),
        "error must name the fix: {err}"
    );
    assert_eq!(src.qmp()?.status()?, "running");
    Ok(())
}
