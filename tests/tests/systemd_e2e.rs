//! End-to-end: the guest agent as an operator's VM runs it. The guest boots
//! systemd and udev with MariaDB as Debian's service
//! (guest/build-systemd-guest.sh); this build's Debian package is installed
//! with dpkg on the running system, udev starts the package's unit on the
//! virtio-serial port, systemd restarts the agent after it is killed, and
//! the agent so started serves a migration that rebuilds pages from shared
//! storage. Needs root.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use dbmigrate_core::protocol::guest::{
    decode_disks, disks_header, encode_disks_request, DiskId, HINTS_HEADER_LEN,
};
use dbmigrate_testbed::{spawn_logged, systemd_guest, DbBed, Vm};
use serde_json::Value;

/// Asks the guest agent behind QEMU's end of the hint port for the disks.
fn ask_disks(hints: &Path, tag: u32) -> Vec<DiskId> {
    let mut s = UnixStream::connect(hints).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(180))).unwrap();
    s.write_all(&encode_disks_request(tag)).unwrap();
    let mut answer = vec![0u8; HINTS_HEADER_LEN];
    s.read_exact(&mut answer)
        .unwrap_or_else(|e| panic!("the guest agent did not answer: {e}"));
    let (len, got) = disks_header(&answer).unwrap();
    assert_eq!(got, tag, "an answer to another request");
    answer.resize(HINTS_HEADER_LEN + len, 0);
    s.read_exact(&mut answer[HINTS_HEADER_LEN..]).unwrap();
    decode_disks(&answer).unwrap()
}

/// The console line starting with `prefix`.
fn console_line(vm: &Vm, prefix: &str) -> String {
    let console = vm.console();
    console
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix} line on the console:\n{console}"))
        .to_string()
}

/// The value of `key=VALUE` in a console line ("" when absent).
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .unwrap_or("")
}

#[test]
fn the_packaged_agent_runs_under_systemd_restarts_and_serves_a_migration() {
    let guest = systemd_guest().unwrap();
    let bed = DbBed::new(&guest, 1000, 1000).unwrap();
    let src = bed.start_vm(&guest, true, false, 1024, "128M").unwrap();
    src.wait_console("DBM-UNIT active", Duration::from_secs(400))
        .unwrap_or_else(|e| panic!("{e}:\n{}", src.console()));
    let installed = console_line(&src, "DBM-PACKAGE");
    assert!(
        installed.contains(env!("CARGO_PKG_VERSION")),
        "not this build's package: {installed}"
    );
    // Started by the port's device unit (the package's udev rule), not by
    // a test script: the unit has no [Install] section.
    let unit = console_line(&src, "DBM-UNIT");
    assert!(
        unit.contains("wanted-by=") && unit.contains("virtio") && unit.ends_with(".device"),
        "the agent's unit was not started by the port: {unit}"
    );

    // The agent answers; the test unit then kills it once.
    let hints = bed.hints_socket("db-src");
    let disks = ask_disks(&hints, 1);
    let size = std::fs::metadata(&bed.disk).unwrap().len();
    assert!(
        disks.first().is_some_and(|d| d.bytes == size),
        "disk 0 of {size} bytes expected: {disks:?}"
    );
    src.wait_console("DBM-RESTARTED", Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("{e}:\n{}", src.console()));
    let killed = console_line(&src, "DBM-KILLED");
    let restarted = console_line(&src, "DBM-RESTARTED");
    assert!(
        field(&restarted, "restarts") == "1" && field(&restarted, "pid") != field(&killed, "pid"),
        "{killed} / {restarted}"
    );
    assert_eq!(ask_disks(&hints, 2), disks, "the restarted agent");

    // The restarted agent serves a migration that rebuilds from storage.
    let dst = bed.start_vm(&guest, false, true, 1024, "128M").unwrap();
    let dir = bed.tb.dir.clone();
    let mut recv = bed.tb.receive_cmd(&dst).unwrap();
    recv.args(["--storage", &bed.nbd_from_dst]);
    let recv = spawn_logged(recv, &dir.join("receive.log")).unwrap();
    let report_path = dir.join("report.json");
    let mut mig = bed.tb.migrate_cmd(&src, &report_path).unwrap();
    mig.arg("--guest-hints")
        .arg(&hints)
        .args(["--progress", "never"]);
    let out = mig.output().unwrap();
    let recv_ok = recv.wait_with_output().unwrap().status.success();
    let recv_log = std::fs::read_to_string(dir.join("receive.log")).unwrap_or_default();
    assert!(
        out.status.success() && recv_ok,
        "migrate: {}\nreceive: {recv_log}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&std::fs::read(&report_path).unwrap()).unwrap();
    assert_eq!(report["ram_verified"], Value::Bool(true), "{report:#}");
    let rebuilt = report["pages"]["rebuilt"].as_u64().unwrap_or(0);
    assert!(rebuilt > 100, "too few pages rebuilt: {report:#}");
    eprintln!("pages {}, hints {}", report["pages"], report["hints"]);
    // The guest goes on on the destination, its agent with it.
    assert_eq!(ask_disks(&bed.hints_socket("db-dst"), 3), disks);
}
