//! End-to-end with real libvirtd: each test host runs its own libvirtd
//! (Debian's libvirt 9.0, in the host's network namespace and a mount
//! namespace of its own), the MariaDB VM is a persistent libvirt domain
//! (TCG, RAM in a shared file under libvirt's `memory_backing_dir`), and
//! `dbmigrate migrate --libvirt ... --domain` / `receive --libvirt ...
//! --domain-xml` move it. Checked: a failed attempt leaves it running on
//! the source and nothing on the destination; the move under sysbench
//! rebuilds pages from shared storage, is byte-exact, keeps every row,
//! and leaves the domain running and persistent on the destination only.
//! Needs root.

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use dbmigrate_testbed::libvirt::{domain_vm, qemu_log, DomainFiles, DomainMemory, LibvirtHost};
use dbmigrate_testbed::{mariadb_guest, sh, sysbench_result, DbBed, MariadbGuest, Vm};
use serde_json::Value;

const NAME: &str = "db";

fn spawn_logged(c: std::process::Command, log: &Path) -> Child {
    dbmigrate_testbed::spawn_logged(c, log).unwrap()
}

/// Waits until `host` shows the domain in `want` (None: unknown to it).
fn wait_state(host: &LibvirtHost, want: Option<&str>, limit: Duration) -> Option<String> {
    let t = Instant::now();
    loop {
        let s = host.state(NAME).unwrap();
        if s.as_deref() == want || t.elapsed() > limit {
            return s;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A libvirtd per host, the destination's domain XML, and the domain
/// running on the source with its pool warm.
struct Domains {
    src_lv: LibvirtHost,
    dst_lv: LibvirtHost,
    dst_files: DomainFiles,
    src: Vm,
}

fn boot_domain(bed: &DbBed, guest: &MariadbGuest, mem: DomainMemory<'_>) -> Domains {
    let src_lv = LibvirtHost::start(&bed.tb, &bed.tb.src_ns, "src").unwrap();
    let dst_lv = LibvirtHost::start(&bed.tb, &bed.tb.dst_ns, "dst").unwrap();
    let src_files = bed.domain_xml(NAME, &src_lv, guest, true, mem).unwrap();
    let dst_files = bed.domain_xml(NAME, &dst_lv, guest, false, mem).unwrap();
    let src = bed.start_domain(&src_lv, NAME, &src_files).unwrap();
    src.wait_console("DBM-READY pool", Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("{e}\n{}", qemu_log(&src_lv, NAME)));
    Domains {
        src_lv,
        dst_lv,
        dst_files,
        src,
    }
}

/// After a move: the source QEMU is gone, libvirt knows the domain on the
/// destination only, running and persistent.
fn moved_for_libvirt(src: &mut Vm, src_lv: &LibvirtHost, dst_lv: &LibvirtHost) {
    assert!(
        src.wait_exit(Duration::from_secs(20)),
        "source QEMU still running"
    );
    assert_eq!(src_lv.state(NAME).unwrap(), None);
    assert_eq!(dst_lv.state(NAME).unwrap().as_deref(), Some("running"));
    assert!(dst_lv.persistent(NAME).unwrap());
}

#[test]
fn a_libvirt_domain_moves_with_rebuild_and_libvirt_follows_a_rollback_and_a_success() {
    let guest = mariadb_guest(4, 10_000).unwrap();
    let mut bed = DbBed::new(&guest, 1000, 1000).unwrap();
    // The first attempt is made to fail at a chosen point.
    bed.tb.use_failpoint_agents().unwrap();
    let Domains {
        src_lv,
        dst_lv,
        dst_files,
        mut src,
    } = boot_domain(&bed, &guest, DomainMemory::new(1024, "256M"));
    assert!(
        src.console().contains("DBM-READY agent"),
        "{}",
        src.console()
    );
    let dir = bed.tb.dir.clone();
    let nbd = bed.nbd_from_dst.clone();
    let receive = |log: &str| {
        let mut c = bed.tb.receive_cmd_libvirt(&dst_lv.uri, &dst_files.xml);
        c.args(["--storage", &nbd, "--timeout", "5"]);
        spawn_logged(c, &dir.join(log))
    };

    // 1. The migration link goes down while the source is paused for the
    //    hand-over: the source takes the VM back, the destination drops
    //    the domain it started.
    let marker = dir.join("paused");
    let recv = receive("receive-1.log");
    assert_eq!(
        wait_state(&dst_lv, Some("paused"), Duration::from_secs(60)).as_deref(),
        Some("paused"),
        "destination domain not started paused: {}",
        read(&dir.join("receive-1.log"))
    );
    let mut mig = bed
        .tb
        .migrate_cmd_libvirt(&src_lv.uri, NAME, &dir.join("report-1.json"));
    mig.args(["--timeout", "5", "--progress", "never"]).env(
        "DBMIGRATE_FAILPOINT",
        format!("src-stop-and-copy:pause:{}", marker.display()),
    );
    let mig = spawn_logged(mig, &dir.join("migrate-1.log"));
    let t = Instant::now();
    while !marker.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(180),
            "failpoint never reached: {}",
            read(&dir.join("migrate-1.log"))
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // libvirt saw the source pause (QEMU's STOP event on its monitor).
    assert_eq!(
        wait_state(&src_lv, Some("paused"), Duration::from_secs(10)).as_deref(),
        Some("paused")
    );
    let link = [&bed.tb.dst_ns, &bed.tb.dst_if];
    sh(&["ip", "-n", link[0], "link", "set", link[1], "down"]).unwrap();
    std::fs::remove_file(&marker).unwrap();
    let out = mig.wait_with_output().unwrap();
    let r = recv.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        read(&dir.join("migrate-1.log"))
    );
    assert!(!r.status.success(), "{}", read(&dir.join("receive-1.log")));
    assert_eq!(
        wait_state(&src_lv, Some("running"), Duration::from_secs(10)).as_deref(),
        Some("running"),
        "source domain not running again"
    );
    assert!(src_lv.persistent(NAME).unwrap());
    assert_eq!(
        wait_state(&dst_lv, None, Duration::from_secs(30)),
        None,
        "the failed attempt left a domain on the destination: {}",
        read(&dir.join("receive-1.log"))
    );
    sh(&["ip", "-n", link[0], "link", "set", link[1], "up"]).unwrap();

    // 2. The move under sysbench, rebuilding from shared storage with the
    //    hints of the domain's own channel.
    let recv = receive("receive-2.log");
    let sb_log = dir.join("sysbench.log");
    let mut sysbench = spawn_logged(bed.sysbench(&guest, 2, 45), &sb_log);
    std::thread::sleep(Duration::from_secs(10));
    let report_path = dir.join("report-2.json");
    let mut mig = bed.tb.migrate_cmd_libvirt(&src_lv.uri, NAME, &report_path);
    mig.args(["--progress", "never"]);
    let out = mig.output().unwrap();
    let r = recv.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "migrate failed: {}\nreceive: {}\nqemu src: {}\nqemu dst: {}",
        String::from_utf8_lossy(&out.stderr),
        read(&dir.join("receive-2.log")),
        qemu_log(&src_lv, NAME),
        qemu_log(&dst_lv, NAME)
    );
    assert!(
        r.status.success(),
        "receive failed: {}",
        read(&dir.join("receive-2.log"))
    );
    let report: Value = serde_json::from_slice(&std::fs::read(&report_path).unwrap()).unwrap();
    assert_eq!(report["ram_verified"], Value::Bool(true), "{report:#}");
    assert!(
        report["pages"]["rebuilt"].as_u64().unwrap_or(0) > 1000,
        "too few pages rebuilt: {report:#}"
    );
    assert_eq!(
        report["libvirt"]["undefined"],
        Value::Bool(true),
        "{report:#}"
    );
    assert_eq!(report["libvirt"]["source_state"], "gone", "{report:#}");
    eprintln!(
        "migrated: total {} ms, downtime {} ms, link {} bytes, pages {}",
        report["total_ms"], report["downtime_ms"], report["link_bytes"], report["pages"]
    );

    // libvirt's view: only the destination has the domain, running and
    // persistent with the operator's XML (no -incoming in it).
    moved_for_libvirt(&mut src, &src_lv, &dst_lv);
    let inactive = dst_lv.virsh_ok(&["dumpxml", "--inactive", NAME]).unwrap();
    assert!(!inactive.contains("-incoming"), "{inactive}");
    let dst = domain_vm(&dst_lv, NAME, &dst_files).unwrap();
    assert_eq!(dst.qmp().unwrap().status().unwrap(), "running");

    // The load went on and no row was lost.
    let status = sysbench.wait().unwrap();
    let log = read(&sb_log);
    let (deadlocks, finished) = sysbench_result(&log);
    assert!(
        status.success() && finished && deadlocks.is_some(),
        "sysbench failed:\n{log}"
    );
    bed.check_sbtest(&guest).unwrap();
    drop(dst);
}

/// A domain with two NUMA cells: libvirt gives each cell a memory backend
/// and a file of its own under `memory_backing_dir`; the domain moves by
/// pre-copy with the rebuild, byte-exact, every table intact, and
/// libvirt's view follows.
#[test]
fn a_libvirt_domain_with_two_numa_cells_moves_byte_exact() {
    let guest = mariadb_guest(4, 10_000).unwrap();
    let bed = DbBed::new(&guest, 1000, 1000).unwrap();
    let mem = DomainMemory {
        numa_cells: 2,
        ..DomainMemory::new(1024, "256M")
    };
    let Domains {
        src_lv,
        dst_lv,
        dst_files,
        mut src,
    } = boot_domain(&bed, &guest, mem);
    let ram_files: Vec<String> = std::fs::read_dir(src_lv.ram_dir.join("libvirt/qemu"))
        .unwrap()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
        .map(|f| f.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        ram_files.contains(&"ram-node0".to_string())
            && ram_files.contains(&"ram-node1".to_string()),
        "libvirt's RAM files: {ram_files:?}"
    );

    let dir = bed.tb.dir.clone();
    let mut recv = bed.tb.receive_cmd_libvirt(&dst_lv.uri, &dst_files.xml);
    recv.args(["--storage", &bed.nbd_from_dst]);
    let recv = spawn_logged(recv, &dir.join("receive.log"));
    let report_path = dir.join("report.json");
    let mut mig = bed.tb.migrate_cmd_libvirt(&src_lv.uri, NAME, &report_path);
    mig.args(["--progress", "never"]);
    let out = mig.output().unwrap();
    let r = recv.wait_with_output().unwrap();
    assert!(
        out.status.success() && r.status.success(),
        "migrate: {}\nreceive: {}\nqemu src: {}\nqemu dst: {}",
        String::from_utf8_lossy(&out.stderr),
        read(&dir.join("receive.log")),
        qemu_log(&src_lv, NAME),
        qemu_log(&dst_lv, NAME)
    );
    let report: Value = serde_json::from_slice(&std::fs::read(&report_path).unwrap()).unwrap();
    assert_eq!(report["ram_verified"], Value::Bool(true), "{report:#}");
    assert!(
        report["pages"]["rebuilt"].as_u64().unwrap_or(0) > 1000,
        "too few pages rebuilt: {report:#}"
    );
    // The second cell's memory is mapped at its place in the run, after
    // the first cell's 512 MiB file.
    let second = report["gpa_layout"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["offset"].as_u64().unwrap_or(0) >= 512 << 20);
    assert!(second, "no range of the second cell: {report:#}");
    moved_for_libvirt(&mut src, &src_lv, &dst_lv);
    bed.check_sbtest(&guest).unwrap();
}
