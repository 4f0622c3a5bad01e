//! End-to-end: a real MariaDB VM under a real sysbench load migrates with
//! dbmigrate while its clean buffer-pool pages are rebuilt on the
//! destination from shared storage (qemu-nbd in a storage namespace), and the
//! guest agent's hints arrive over a virtio-serial port. Needs root; the
//! guest image is built by guest/build-mariadb-guest.sh (cached).

use std::path::Path;
use std::process::Child;
use std::time::Duration;

use dbmigrate_testbed::{
    dest_stats, mariadb_guest, sysbench_result, DbBed, MariadbGuest, Scratch, Vm,
};
use serde_json::Value;

const TABLES: u32 = 4;
const ROWS: u32 = 10_000;

fn spawn_logged(c: std::process::Command, log: &Path) -> Child {
    dbmigrate_testbed::spawn_logged(c, log).unwrap()
}

fn boot(bed: &DbBed, guest: &MariadbGuest) -> (Vm, Vm) {
    let src = bed.start_vm(guest, true, false, 1024, "256M").unwrap();
    src.wait_console("DBM-READY pool", Duration::from_secs(300))
        .unwrap();
    assert!(
        src.console().contains("DBM-READY agent"),
        "guest agent did not start:\n{}",
        src.console()
    );
    let dst = bed.start_vm(guest, false, true, 1024, "256M").unwrap();
    (src, dst)
}

/// Starts the destination agent (reading storage over NBD) and `secs` of
/// sysbench, waits `warmup` seconds, migrates with the hints behind
/// `hints`, and checks both agents succeeded and RAM was verified. Returns
/// the source's report, the destination agent's output, and sysbench with
/// its log.
#[allow(clippy::too_many_arguments)]
fn migrate_under_load(
    bed: &DbBed,
    guest: &MariadbGuest,
    src: &Vm,
    dst: &Vm,
    hints: &Path,
    scan: &str,
    load: (u32, u64),
    postcopy: Option<(&Path, &[&str])>,
) -> (Value, String, (Child, std::path::PathBuf)) {
    let nbd = bed.nbd_from_dst.clone();
    migrate_under_load_from(&nbd, bed, guest, (src, dst), hints, scan, load, postcopy)
}

/// [`migrate_under_load`] with the destination reading the disk at `storage`.
#[allow(clippy::too_many_arguments)]
fn migrate_under_load_from(
    storage: &str,
    bed: &DbBed,
    guest: &MariadbGuest,
    (src, dst): (&Vm, &Vm),
    hints: &Path,
    scan: &str,
    (secs, warmup): (u32, u64),
    postcopy: Option<(&Path, &[&str])>,
) -> (Value, String, (Child, std::path::PathBuf)) {
    let dir = bed.tb.dir.clone();
    let mut recv = bed.tb.receive_cmd(dst).unwrap();
    recv.args(["--storage", storage]);
    if let Some((sock, _)) = postcopy {
        recv.arg("--postcopy-socket").arg(sock);
    }
    let recv = spawn_logged(recv, &dir.join("receive.log"));
    let sb_log = dir.join("sysbench.log");
    let sysbench = spawn_logged(bed.sysbench(guest, 2, secs), &sb_log);
    std::thread::sleep(Duration::from_secs(warmup));
    let report_path = dir.join("report.json");
    let mut mig = bed.tb.migrate_cmd(src, &report_path).unwrap();
    mig.arg("--guest-hints").arg(hints).args([
        "--hint-scan",
        scan,
        "--progress",
        "never",
        "--page-census",
        "--hint-page-cache",
    ]);
    if let Some((_, args)) = postcopy {
        mig.args(args);
    }
    let out = mig.output().unwrap();
    let recv_out = recv.wait_with_output().unwrap();
    let recv_log = std::fs::read_to_string(dir.join("receive.log")).unwrap_or_default();
    assert!(
        out.status.success(),
        "migrate failed: {}\nreceive: {recv_log}\nqemu src: {}\nqemu dst: {}",
        String::from_utf8_lossy(&out.stderr),
        src.qemu_log(&bed.tb),
        dst.qemu_log(&bed.tb)
    );
    assert!(recv_out.status.success(), "receive failed: {recv_log}");
    let report: Value = serde_json::from_slice(&std::fs::read(&report_path).unwrap()).unwrap();
    eprintln!("pages {}, hints {}", report["pages"], report["hints"]);
    // Byte-exact whatever the hints: full-RAM digests matched at switchover.
    assert_eq!(report["ram_verified"], Value::Bool(true), "{report:#}");
    (report, recv_log, (sysbench, sb_log))
}

/// After the move: the source QEMU is gone, sysbench finished its run with
/// no error but retried deadlocks, and every table is consistent with no
/// row lost.
fn load_survived(
    bed: &DbBed,
    guest: &MariadbGuest,
    src: &mut Vm,
    (mut sysbench, sb_log): (Child, std::path::PathBuf),
) {
    assert!(
        src.wait_exit(Duration::from_secs(20)),
        "source QEMU still running"
    );
    let status = sysbench.wait().unwrap();
    let log = std::fs::read_to_string(&sb_log).unwrap();
    // Only deadlocks are retried (see `DbBed::sysbench`): any other error
    // stopped sysbench before its summary.
    let (deadlocks, finished) = sysbench_result(&log);
    assert!(
        status.success() && finished && deadlocks.is_some(),
        "sysbench failed:\n{log}"
    );
    eprintln!(
        "sysbench: {}",
        log.lines()
            .filter(|l| l.contains("transactions:") || l.contains("ignored errors"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    bed.check_sbtest(guest).unwrap();
}

#[test]
fn mariadb_under_sysbench_migrates_with_rebuild_from_shared_storage() {
    let guest = mariadb_guest(TABLES, ROWS).unwrap();
    let bed = DbBed::new(&guest, 1000, 1000).unwrap();
    let (mut src, dst) = boot(&bed, &guest);
    let (report, recv_log, sysbench) = migrate_under_load(
        &bed,
        &guest,
        &src,
        &dst,
        &bed.hints_socket("db-src"),
        "host",
        (45, 10),
        None,
    );
    assert_eq!(report["vm_runs_on"], "destination");
    // The host found the frames in guest RAM with the guest's file layout.
    assert_eq!(report["hints"]["finder"], "host", "{report:#}");
    assert!(
        report["hints"]["last_scan"]["pages"].as_u64().unwrap_or(0) > 100,
        "{report:#}"
    );
    let rebuilt = report["pages"]["rebuilt"].as_u64().unwrap();
    assert!(
        rebuilt > 1000,
        "too few pages rebuilt from storage: {report:#}"
    );
    assert!(
        report["hints"]["last_count"].as_u64().unwrap() > 0,
        "{report:#}"
    );
    // The destination's own statistics: it read storage and rebuilt pages.
    let dest = dest_stats(&recv_log);
    eprintln!(
        "migrated: total {} ms, downtime {} ms, link {} bytes, pages {}, hints {}; destination {dest}",
        report["total_ms"], report["downtime_ms"], report["link_bytes"], report["pages"], report["hints"]
    );
    assert!(
        dest["rebuilt_pages"].as_u64().unwrap_or(0) > 1000,
        "destination stats: {dest:#}"
    );
    assert!(
        dest["storage_bytes"].as_u64().unwrap_or(0) > 4096 * 1000,
        "destination stats: {dest:#}"
    );

    census_explains_the_pages(&report);

    load_survived(&bed, &guest, &mut src, sysbench);
    drop(dst);
}

/// Storage as a SAN gives it: the destination reads the VM's disk as a
/// block device (a read-only loop device over the image the storage host
/// exports) instead of from the storage server.
#[test]
fn mariadb_migrates_rebuilding_from_a_block_device() {
    let guest = mariadb_guest(TABLES, ROWS).unwrap();
    let bed = DbBed::new(&guest, 1000, 1000).unwrap();
    let (mut src, dst) = boot(&bed, &guest);
    let dev = bed.disk_as_block_device(0).unwrap();
    let (report, recv_log, sysbench) = migrate_under_load_from(
        &dev.to_string_lossy(),
        &bed,
        &guest,
        (&src, &dst),
        &bed.hints_socket("db-src"),
        "host",
        (40, 10),
        None,
    );
    let rebuilt = report["pages"]["rebuilt"].as_u64().unwrap();
    assert!(
        rebuilt > 1000,
        "too few pages rebuilt from the block device: {report:#}"
    );
    let dest = dest_stats(&recv_log);
    assert!(
        dest["storage_bytes"].as_u64().unwrap_or(0) > 4096 * 1000,
        "destination stats: {dest:#}"
    );
    load_survived(&bed, &guest, &mut src, sysbench);
    drop(dst);
}

/// Disks matched by serial, not by position: the source QEMU lists an
/// empty scratch disk first while the guest sees the database's disk first
/// (vda), and the destination QEMU lists the scratch disk last. The guest
/// agent names its disks, the source maps the guest's indexes to its
/// QEMU's and names its disks in the Hello, and the destination places
/// `--storage serial:dbm-data=...` at that disk of its QEMU and follows
/// the source's order. A serial no disk has is refused at start, naming
/// the VM's disks.
#[test]
fn disks_are_matched_by_serial_not_by_position() {
    let guest = mariadb_guest(TABLES, ROWS).unwrap();
    let mut bed = DbBed::new(&guest, 1000, 1000).unwrap();
    bed.scratch_disk = Some((Scratch::First, Scratch::Last));
    let (mut src, dst) = boot(&bed, &guest);
    let mut wrong = bed.tb.receive_cmd(&dst).unwrap();
    wrong.args(["--storage", &format!("serial:nope={}", bed.nbd_from_dst)]);
    let out = wrong.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("serial nope")
            && err.contains("dbm-scratch")
            && err.contains("dbm-data"),
        "a serial no disk has: {err}"
    );
    let storage = format!("serial:dbm-data={}", bed.nbd_from_dst);
    let (report, recv_log, sysbench) = migrate_under_load_from(
        &storage,
        &bed,
        &guest,
        (&src, &dst),
        &bed.hints_socket("db-src"),
        "host",
        (40, 10),
        None,
    );
    // The guest's disk 0 (vda) is the source QEMU's disk 1, the
    // destination QEMU's disk 0.
    assert!(recv_log.contains("another order"), "{recv_log}");
    assert_eq!(
        report["hints"]["disks"],
        serde_json::json!([1]),
        "{report:#}"
    );
    let rebuilt = report["pages"]["rebuilt"].as_u64().unwrap();
    assert!(rebuilt > 1000, "too few pages rebuilt: {report:#}");
    load_survived(&bed, &guest, &mut src, sysbench);
    drop(dst);
}

/// Any InnoDB server: the host's scan takes the file layout from the
/// server's open files and data directory, identified by their own first
/// pages, so the rebuild works with no SQL access at all. The guest agent
/// logs in as a user the server does not know (the guest checks that the
/// login is refused).
#[test]
fn the_rebuild_needs_no_sql_access_in_the_guest() {
    let guest = mariadb_guest(TABLES, ROWS).unwrap();
    let mut bed = DbBed::new(&guest, 1000, 1000).unwrap();
    bed.kernel_extra = " dbm.agent_user=dbm_denied".into();
    let (mut src, dst) = boot(&bed, &guest);
    assert!(
        src.console().contains("DBM-SQL dbm_denied denied"),
        "the guest agent's SQL login was not refused:\n{}",
        src.console()
    );
    let (report, _recv_log, sysbench) = migrate_under_load(
        &bed,
        &guest,
        &src,
        &dst,
        &bed.hints_socket("db-src"),
        "host",
        (40, 10),
        None,
    );
    assert_eq!(report["hints"]["finder"], "host", "{report:#}");
    let rebuilt = report["pages"]["rebuilt"].as_u64().unwrap();
    assert!(
        rebuilt > 1000,
        "too few pages rebuilt without SQL: {report:#}"
    );
    load_survived(&bed, &guest, &mut src, sysbench);
    drop(dst);
}

/// `field` summed over the report's rounds.
fn in_rounds(report: &Value, field: &str) -> u64 {
    report["stats"]["rounds"]
        .as_array()
        .expect("the report's rounds")
        .iter()
        .map(|r| r[field].as_u64().unwrap_or(0))
        .sum()
}

/// The guest's memory census came, covers the guest's RAM, agrees with
/// the rounds' counts, and puts the rebuilt pages in the buffer pool and
/// the clean page cache.
fn census_explains_the_pages(report: &Value) {
    let census = &report["census"];
    assert!(census["error"].is_null(), "census failed: {census:#}");
    let rows = census["rows"].as_array().expect("census rows");
    let row = |label: &str| rows.iter().find(|r| r["label"] == label);
    let col = |r: &Value, c: &str| r[c].as_u64().unwrap_or(0);
    let sum = |c: &str| rows.iter().map(|r| col(r, c)).sum::<u64>();
    let rounds = |c: &str| in_rounds(report, c);
    assert_eq!(sum("raw_pages"), rounds("raw_pages"), "{census:#}");
    assert_eq!(sum("ref_pages"), rounds("ref_pages"), "{census:#}");
    assert_eq!(sum("zero_pages"), rounds("zero_pages"), "{census:#}");
    let ram_pages = sum("pages");
    let unlabelled = row("unlabelled").map_or(0, |r| col(r, "pages"));
    assert!(
        unlabelled * 20 < ram_pages,
        "the census leaves over 5 % of RAM unlabelled: {census:#}"
    );
    let pool = row("database server: buffer pool").expect("a buffer-pool row");
    assert!(col(pool, "pages") > 16_384, "a pool of 256 MiB: {census:#}");
    // The server's binary and libraries are mapped and resident: their
    // clean page cache goes as references too.
    let files = row("file cache, clean").expect("a clean file-cache row");
    assert!(
        col(files, "ref_pages") > 100,
        "page-cache hints: {census:#}"
    );
    assert!(
        (col(pool, "ref_pages") + col(files, "ref_pages")) * 10 >= sum("ref_pages") * 9,
        "the references should be buffer-pool and file-cache pages: {census:#}"
    );
    eprintln!("census: {}", serde_json::to_string(rows).unwrap());
}

/// Post-copy (or hybrid) of the MariaDB VM under sysbench: the VM runs on
/// the destination while its clean buffer-pool pages are still being
/// rebuilt there from storage; every placed page must match the source's
/// frozen RAM, sysbench must see no error and the tables must be intact.
fn postcopy_under_load(args: &[&str]) -> (Value, Value) {
    let guest = mariadb_guest(TABLES, ROWS).unwrap();
    let bed = DbBed::new(&guest, 1000, 1000).unwrap();
    postcopy_on(&bed, &guest, 1024, args)
}

/// [`postcopy_under_load`] on `bed`, with guests of `ram_mib`.
fn postcopy_on(bed: &DbBed, guest: &MariadbGuest, ram_mib: u64, args: &[&str]) -> (Value, Value) {
    let mut src = bed.start_vm(guest, true, false, ram_mib, "256M").unwrap();
    src.wait_console("DBM-READY pool", Duration::from_secs(300))
        .unwrap();
    let (dst, sock) = bed
        .start_postcopy_destination(guest, ram_mib, "256M")
        .unwrap();
    let (report, recv_log, sysbench) = migrate_under_load(
        bed,
        guest,
        &src,
        &dst,
        &bed.hints_socket("db-src"),
        "host",
        (45, 10),
        Some((&sock, args)),
    );
    if bed.tb.ram_dir != Path::new("/dev/shm") {
        assert!(
            recv_log.contains("unit=2097152"),
            "the destination did not serve 2 MiB minor faults: {recv_log}"
        );
    }
    let dest = dest_stats(&recv_log);
    eprintln!(
        "migrated: total {} ms, downtime {} ms, link {} bytes, pages {}, post-copy {}; destination {dest}",
        report["total_ms"], report["downtime_ms"], report["link_bytes"], report["pages"], report["postcopy"]
    );
    assert_eq!(report["vm_runs_on"], "destination");
    assert_eq!(
        report["postcopy"]["ram_verified"],
        Value::Bool(true),
        "{report:#}"
    );
    load_survived(bed, guest, &mut src, sysbench);
    drop(dst);
    (report, dest)
}

/// A 1 ms downtime target cannot be met under sysbench: after two rounds
/// the hybrid hands over by post-copy.
const HYBRID_AFTER_TWO_ROUNDS: &[&str] = &[
    "--mode",
    "hybrid",
    "--allow-postcopy",
    "--downtime-ms",
    "1",
    "--max-rounds",
    "2",
];

/// RAM of the hugepage-backed guests.
const HUGE_RAM_MIB: u64 = 4096;

/// A bed whose guests' RAM files are on hugetlbfs (2 MiB pages), with
/// pages reserved for a source and a destination guest of [`HUGE_RAM_MIB`].
fn hugepage_bed(guest: &MariadbGuest) -> DbBed {
    let mut bed = DbBed::new(guest, 1000, 1000).unwrap();
    bed.tb.use_hugepages(2 * (HUGE_RAM_MIB / 2) + 8).unwrap();
    bed
}

#[test]
fn a_hugepage_backed_mariadb_vm_migrates_byte_exact_by_precopy() {
    let guest = mariadb_guest(TABLES, ROWS).unwrap();
    let bed = hugepage_bed(&guest);
    let mut src = bed
        .start_vm(&guest, true, false, HUGE_RAM_MIB, "256M")
        .unwrap();
    src.wait_console("DBM-READY pool", Duration::from_secs(300))
        .unwrap();
    assert!(
        src.ram.starts_with(&bed.tb.ram_dir),
        "{}",
        src.ram.display()
    );
    let dst = bed
        .start_vm(&guest, false, true, HUGE_RAM_MIB, "256M")
        .unwrap();
    let (report, recv_log, sysbench) = migrate_under_load(
        &bed,
        &guest,
        &src,
        &dst,
        &bed.hints_socket("db-src"),
        "host",
        (45, 10),
        None,
    );
    let dest = dest_stats(&recv_log);
    eprintln!(
        "hugepages, pre-copy: total {} ms, downtime {} ms, link {} bytes, pages {}; destination {dest}",
        report["total_ms"], report["downtime_ms"], report["link_bytes"], report["pages"]
    );
    assert_eq!(report["vm_runs_on"], "destination");
    assert!(
        dest["rebuilt_pages"].as_u64().unwrap_or(0) > 1000,
        "{dest:#}"
    );
    // Writes are seen 2 MiB at a time: the later rounds found pages of
    // written huge pages unchanged and did not send them.
    let unchanged: u64 = in_rounds(&report, "unchanged_pages");
    assert!(unchanged > 0, "{:#}", report["stats"]["rounds"]);
    load_survived(&bed, &guest, &mut src, sysbench);
    drop(dst);
}

#[test]
fn a_hugepage_backed_mariadb_vm_migrates_byte_exact_by_postcopy() {
    let guest = mariadb_guest(TABLES, ROWS).unwrap();
    let bed = hugepage_bed(&guest);
    let (report, dest) = postcopy_on(
        &bed,
        &guest,
        HUGE_RAM_MIB,
        &["--mode", "postcopy", "--allow-postcopy"],
    );
    assert_eq!(report["method"], "dbmigrate-postcopy");
    assert!(dest["postcopy_pages"].as_u64().unwrap_or(0) > 0, "{dest:#}");
}

#[test]
fn a_hugepage_backed_mariadb_vm_migrates_byte_exact_by_hybrid() {
    let guest = mariadb_guest(TABLES, ROWS).unwrap();
    let bed = hugepage_bed(&guest);
    let (report, _) = postcopy_on(&bed, &guest, HUGE_RAM_MIB, HYBRID_AFTER_TWO_ROUNDS);
    assert_eq!(report["method"], "dbmigrate-hybrid");
    assert_eq!(report["stats"]["stop_reason"], "round limit reached");
}

#[test]
fn mariadb_under_sysbench_migrates_by_postcopy_rebuilding_while_it_runs() {
    let (report, dest) = postcopy_under_load(&["--mode", "postcopy", "--allow-postcopy"]);
    assert_eq!(report["method"], "dbmigrate-postcopy");
    // One round, then the hand-over: pages were rebuilt from storage, and
    // pages dirtied during the round were placed after the switch. (Whether
    // the guest faults on one depends on timing: the push starts before the
    // device state moves; the dirtier test asserts faults.)
    assert_eq!(report["stats"]["rounds"].as_array().map_or(0, Vec::len), 1);
    assert!(
        dest["rebuilt_pages"].as_u64().unwrap_or(0) > 1000,
        "{dest:#}"
    );
    assert!(
        report["postcopy"]["pending_pages"].as_u64().unwrap_or(0) > 0,
        "{report:#}"
    );
    assert!(
        dest["postcopy_pages"].as_u64().unwrap_or(0)
            >= report["postcopy"]["pending_pages"].as_u64().unwrap_or(0),
        "{dest:#}"
    );
}

#[test]
fn mariadb_under_sysbench_migrates_by_hybrid_when_precopy_cannot_converge() {
    let (report, dest) = postcopy_under_load(HYBRID_AFTER_TWO_ROUNDS);
    assert_eq!(report["method"], "dbmigrate-hybrid");
    assert_eq!(report["stats"]["stop_reason"], "round limit reached");
    assert!(
        dest["rebuilt_pages"].as_u64().unwrap_or(0) > 1000,
        "{dest:#}"
    );
}

/// Stands between QEMU's hint socket and the host agent like a broken or
/// hostile guest agent: shifts a third of the offsets, adds hints for pages
/// that hold something else, and adds hints no host may follow.
fn corrupting_relay(qemu_socket: &Path, listen: &Path) -> std::thread::JoinHandle<()> {
    use dbmigrate_core::protocol::guest::{
        decode_hints, encode_hints, parse_answer_header, HintAnswer, HINTS_HEADER_LEN,
    };
    use std::io::{Read, Write};
    let _ = std::fs::remove_file(listen);
    let listener = std::os::unix::net::UnixListener::bind(listen).unwrap();
    let qemu_socket = qemu_socket.to_path_buf();
    std::thread::spawn(move || {
        let Ok((mut host, _)) = listener.accept() else {
            return;
        };
        let mut guest = std::os::unix::net::UnixStream::connect(&qemu_socket).unwrap();
        loop {
            let mut req = [0u8; 8];
            if host.read_exact(&mut req).is_err() || guest.write_all(&req).is_err() {
                return;
            }
            let mut head = [0u8; HINTS_HEADER_LEN];
            if guest.read_exact(&mut head).is_err() {
                return;
            }
            let answer = parse_answer_header(&head).unwrap();
            let (body, tag) = match answer {
                HintAnswer::Hints { body, tag }
                | HintAnswer::Layout { body, tag }
                | HintAnswer::Census { body, tag }
                | HintAnswer::Disks { body, tag } => (body, tag),
                HintAnswer::Error { len, .. } => (len, u32::MAX),
            };
            let mut rest = vec![0u8; body];
            guest.read_exact(&mut rest).unwrap();
            if tag == u32::MAX {
                let _ = host.write_all(&head).and_then(|_| host.write_all(&rest));
                continue;
            }
            let mut set = head.to_vec();
            set.extend_from_slice(&rest);
            if let HintAnswer::Layout { .. } = answer {
                if host.write_all(&corrupt_layout(&set, tag)).is_err() {
                    return;
                }
                continue;
            }
            if let HintAnswer::Census { .. } | HintAnswer::Disks { .. } = answer {
                if host.write_all(&set).is_err() {
                    return;
                }
                continue;
            }
            let mut hints = decode_hints(&set).unwrap();
            let real = hints.clone();
            for (i, h) in hints.iter_mut().enumerate() {
                if i % 3 == 0 {
                    h.disk_offset.0 += 16384;
                }
            }
            // Valid-looking hints for pages that are not those blocks.
            for (i, h) in real.iter().enumerate().take(2000) {
                let mut w = *h;
                w.gpa.0 = (4096 * 977 * (i as u64 + 1)) % (1 << 30);
                hints.push(w);
            }
            // Hints no host may follow: off the disk, misaligned, foreign disk.
            // (Spread over many pages: a 4 KiB piece of a buffer-pool page
            // can be all zeros, and zero pages never need a hint.)
            for (i, h) in real.iter().enumerate().skip(1).step_by(7).take(90) {
                let mut w = *h;
                match i % 3 {
                    0 => w.disk_offset.0 = 1 << 50,
                    1 => w.disk_offset.0 += 100,
                    _ => w.disk = 7,
                }
                hints.push(w);
            }
            if host.write_all(&encode_hints(&hints, tag)).is_err() {
                return;
            }
        }
    })
}

/// A layout as a broken or hostile guest agent might send it: a third of
/// the tablespaces shifted by one page on disk (every page of theirs
/// mismatches), one placed beyond any disk, one on a disk the VM lacks.
fn corrupt_layout(set: &[u8], tag: u32) -> Vec<u8> {
    use dbmigrate_core::protocol::guest::{decode_layout, encode_layout};
    let mut l = decode_layout(set).unwrap();
    let n = l.files.len();
    for (i, f) in l.files.iter_mut().enumerate() {
        for e in &mut f.extents {
            if i % 3 == 0 {
                e.disk_offset.0 += 16384;
            }
            if i == n - 1 {
                e.disk_offset.0 += 1 << 50;
            }
        }
        if i == n - 2 {
            f.disk = 7;
        }
    }
    encode_layout(&l, tag)
}

#[test]
fn wrong_and_hostile_hints_cost_resends_never_correctness() {
    let guest = mariadb_guest(TABLES, ROWS).unwrap();
    let bed = DbBed::new(&guest, 1000, 1000).unwrap();
    let (mut src, dst) = boot(&bed, &guest);
    let dir = bed.tb.dir.clone();
    let relay_path = dir.join("relay.hints");
    let _relay = corrupting_relay(&bed.hints_socket("db-src"), &relay_path);

    let (report, _, sysbench) = migrate_under_load(
        &bed,
        &guest,
        &src,
        &dst,
        &relay_path,
        "guest",
        (40, 8),
        None,
    );
    // Byte-exact anyway: full-RAM digests matched at switchover.
    assert_eq!(report["ram_verified"], Value::Bool(true), "{report:#}");
    let mismatches = report["pages"]["rebuild_mismatch"].as_u64().unwrap();
    assert!(
        mismatches >= 500,
        "wrong hints were not caught as mismatches: {report:#}"
    );
    let rejected: u64 = in_rounds(&report, "rejected_hints");
    // Off-disk and misaligned hints are rejected when their page is sent,
    // foreign-disk ones as soon as they arrive.
    let dropped = report["hints"]["dropped"].as_u64().unwrap();
    assert!(
        rejected >= 10,
        "off-disk or misaligned hints were followed: {report:#}"
    );
    assert!(
        dropped >= 20,
        "foreign-disk hints were not dropped: {report:#}"
    );
    // The right ones still rebuilt pages.
    assert!(
        report["pages"]["rebuilt"].as_u64().unwrap() > 100,
        "{report:#}"
    );
    load_survived(&bed, &guest, &mut src, sysbench);
    drop(dst);
}

#[test]
fn a_wrong_file_layout_costs_resends_never_correctness() {
    let guest = mariadb_guest(TABLES, ROWS).unwrap();
    let bed = DbBed::new(&guest, 1000, 1000).unwrap();
    let (mut src, dst) = boot(&bed, &guest);
    let relay_path = bed.tb.dir.join("relay.hints");
    let _relay = corrupting_relay(&bed.hints_socket("db-src"), &relay_path);

    let (report, _, sysbench) =
        migrate_under_load(&bed, &guest, &src, &dst, &relay_path, "host", (40, 8), None);
    assert_eq!(report["ram_verified"], Value::Bool(true), "{report:#}");
    assert_eq!(report["hints"]["finder"], "host", "{report:#}");
    let mismatches = report["pages"]["rebuild_mismatch"].as_u64().unwrap();
    assert!(
        mismatches >= 100,
        "shifted extents were not caught as mismatches: {report:#}"
    );
    let rejected: u64 = in_rounds(&report, "rejected_hints");
    assert!(
        rejected > 0,
        "pages placed beyond the disk were followed: {report:#}"
    );
    assert!(
        report["pages"]["rebuilt"].as_u64().unwrap() > 100,
        "{report:#}"
    );
    load_survived(&bed, &guest, &mut src, sysbench);
    drop(dst);
}
