//! Engine-level tests over loopback TCP with RAM files in /dev/shm: a fast
//! complement to the QEMU end-to-end tests in `tests/`. The "VM" here is a
//! thread writing into the source RAM file; a scripted tracker reports the
//! pages it wrote (the real trackers are tested against QEMU).

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dbmigrate_core::addr::{DiskOffset, PageIndex};
use dbmigrate_core::bitmap::PageBitmap;
use dbmigrate_core::dest;
use dbmigrate_core::dirty::{DirtyError, DirtyTracker, TrackerKind};
use dbmigrate_core::protocol::{self, BatchBuilder, Message, PageEncoding};
use dbmigrate_core::ram::{DestRam, SourceRam};
use dbmigrate_core::source::{Decision, SourceConfig, SourceError, SourceSession};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

mod common;
use common::*;

/// Reports the pages the writer thread recorded since the last call.
struct Scripted(Arc<Mutex<Vec<u64>>>);

impl DirtyTracker for Scripted {
    fn kind(&self) -> TrackerKind {
        TrackerKind::UffdWp
    }
    fn reset(&mut self) -> Result<(), DirtyError> {
        self.0.lock().unwrap().clear();
        Ok(())
    }
    fn collect(&mut self, dirty: &mut PageBitmap) -> Result<u64, DirtyError> {
        let pages: Vec<u64> = std::mem::take(&mut *self.0.lock().unwrap());
        for &p in &pages {
            dirty.set(p);
        }
        Ok(pages.len() as u64)
    }
}

fn ram_file(tag: &str) -> PathBuf {
    let p = PathBuf::from(format!(
        "/dev/shm/dbmigrate-loopback-{}-{tag}",
        std::process::id()
    ));
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&p)
        .unwrap();
    f.set_len(PAGES * 4096).unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_and_destination_agree_byte_for_byte_under_writes() {
    // The "guest" keeps rewriting a working set of 64 pages until paused.
    let cfg = SourceConfig {
        connections: 3,
        compress: true,
        ..SourceConfig::default()
    };
    migrate_under_writes("ws", cfg, (100..164).collect(), None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_written_ahead_of_the_round_go_once_and_the_copy_stays_exact() {
    // A slow first round (8 MiB at 4 MB/s; the round reads at most the
    // 2 MiB its one connection queues ahead of the wire) while every 16th
    // page is written once, from the top of RAM down, 8 ms apart: the
    // collects during the round find pages the round has not read yet
    // (sent with their writes, not again), and pages it read already,
    // which must go again: each is written once, so no later collect
    // would report it.
    let cfg = SourceConfig {
        connections: 1,
        bandwidth: Some(4_000_000),
        ..SourceConfig::default()
    };
    let pages = (0..PAGES / 16).rev().map(|i| i * 16).collect();
    let stats = migrate_under_writes("ahead", cfg, pages, Some(Duration::from_millis(8))).await;
    let first = &stats.rounds[0];
    assert!(
        first.written_before_read > 0,
        "no page was found written ahead of the first round: {first:?}"
    );
}

/// Migrates a RAM file while a thread rewrites `working_set` until the
/// VM is "paused" (or, with `once_every`, writes each of its pages once,
/// that long apart); asserts byte-exact RAM and returns the source's stats.
async fn migrate_under_writes(
    tag: &str,
    cfg: SourceConfig,
    working_set: Vec<u64>,
    once_every: Option<Duration>,
) -> dbmigrate_core::stats::MigrationStats {
    let src_path = ram_file(&format!("{tag}-src"));
    let dst_path = ram_file(&format!("{tag}-dst"));
    let src_file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&src_path)
        .unwrap();
    // Most pages hold data, every 7th stays a hole (zero), page 5 is data that is all zero.
    for p in 0..PAGES {
        if p % 7 != 0 {
            src_file.write_all_at(&page_bytes(p), p * 4096).unwrap();
        }
    }
    src_file.write_all_at(&[0u8; 4096], 5 * 4096).unwrap();
    // Stale content at the destination must not survive.
    let dst_file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&dst_path)
        .unwrap();
    dst_file.write_all_at(&[0xee; 4096], 7 * 4096).unwrap();

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let dst_path2 = dst_path.clone();
    let receiver = tokio::spawn(async move {
        // receive() itself zeroes the RAM: the stale page must not survive.
        let ram = DestRam::open(&dst_path2, PAGES * 4096).unwrap();
        let mut s = dest::accept(
            &mut plain_gate(listener),
            &[PAGES * 4096],
            false,
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        let (_ram, matched) = complete(s.receive(ram, None, None).await.unwrap());
        assert!(matched);
        s.wait_commit().await.unwrap();
        s.activated().await.unwrap();
        s.stats.clone()
    });

    let written = Arc::new(Mutex::new(Vec::new()));
    let paused = Arc::new(AtomicBool::new(false));
    let writer = {
        let written = written.clone();
        let paused = paused.clone();
        let f = src_file.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut gen = 1000u64;
            while !paused.load(Ordering::SeqCst) {
                for &p in &working_set {
                    gen += 1;
                    f.write_all_at(&page_bytes(gen), p * 4096).unwrap();
                    written.lock().unwrap().push(p);
                    if let Some(d) = once_every {
                        std::thread::sleep(d);
                    }
                }
                if once_every.is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };

    let ram = SourceRam::open(&src_path, PAGES * 4096).unwrap();
    let mut s = SourceSession::connect(addr, ram, Box::new(Scripted(written.clone())), cfg)
        .await
        .unwrap();
    let d = s.run_live(&mut |_, _| {}).await.unwrap();
    assert!(matches!(d, Decision::Stop { .. }));
    paused.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    let frozen = s.final_round().await.unwrap();
    let v = s.verify(frozen).await.unwrap();
    s.send_commit(&v).await.unwrap();
    s.wait_activated().await.unwrap();
    let stats = receiver.await.unwrap();
    assert!(stats.raw_pages + stats.compressed_pages > 0);
    let source_stats = s.stats.clone();

    let a = std::fs::read(&src_path).unwrap();
    let b = std::fs::read(&dst_path).unwrap();
    assert!(a == b, "destination RAM differs from the source");
    std::fs::remove_file(src_path).unwrap();
    std::fs::remove_file(dst_path).unwrap();
    source_stats
}

#[tokio::test]
async fn destination_refuses_a_page_beyond_ram_and_says_why() {
    let dst_path = ram_file("oob");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let p2 = dst_path.clone();
    let receiver = tokio::spawn(async move {
        let ram = DestRam::open(&p2, PAGES * 4096).unwrap();
        let mut s = accept_source(listener, false, Duration::from_secs(10)).await;
        let err = s.receive(ram, None, None).await.err().expect("must refuse");
        s.abort(&err.to_string()).await;
        err.to_string()
    });
    let (mut ctrl, _welcome, mut data) = scripted_source(addr, 7).await;
    let mut b = BatchBuilder::new(0);
    b.push(PAGES + 10, PageEncoding::Zero, &[]);
    data.write_all(&b.finish()).await.unwrap();
    let err = receiver.await.unwrap();
    assert!(err.contains("beyond"), "{err}");
    let m = next_ctrl(&mut ctrl).await;
    assert!(matches!(m, Message::Abort { reason } if reason.contains("beyond")));
    std::fs::remove_file(dst_path).unwrap();
}

#[tokio::test]
async fn source_fails_cleanly_on_garbage_from_the_destination() {
    let src_path = ram_file("garbage");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut ctrl, _) = listener.accept().await.unwrap();
        let _ = protocol::read_message(&mut ctrl, "t").await.unwrap();
        // Not a dbmigrate frame at all.
        ctrl.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            .await
            .unwrap();
    });
    let ram = SourceRam::open(&src_path, PAGES * 4096).unwrap();
    let r = SourceSession::connect(
        addr,
        ram,
        Box::new(Scripted(Arc::default())),
        SourceConfig::default(),
    )
    .await;
    match r {
        Err(SourceError::Protocol(e)) => assert!(e.to_string().contains("magic"), "{e}"),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("garbage accepted"),
    }
    std::fs::remove_file(src_path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_from_storage_is_byte_exact_whatever_the_hints_say() {
    rebuild_case("rb", None).await;
}

/// The same with the storage reads paced (`receive --storage-bandwidth`):
/// still byte-exact, and the reads keep to the pace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paced_rebuild_is_byte_exact_and_keeps_to_its_pace() {
    let rate = 8_000_000;
    let (d, took) = rebuild_case("rbp", Some(rate)).await;
    let least = Duration::from_secs_f64(d.storage_bytes as f64 / rate as f64 * 0.9);
    assert!(
        took >= least,
        "{} storage bytes at {rate} B/s took {took:?}",
        d.storage_bytes
    );
}

/// One rebuild over loopback with right, wrong and refused hints and a
/// guest rewriting hinted pages; checks the copy and the counts and
/// returns the destination's figures and how long the migration took.
async fn rebuild_case(tag: &str, pace: Option<u64>) -> (dest::DestStats, Duration) {
    use dbmigrate_core::rebuild::{Hint, HintTable};
    use dbmigrate_core::storage::{FileStorage, Storage};

    let src_path = ram_file(&format!("{tag}-src"));
    let dst_path = ram_file(&format!("{tag}-dst"));
    let disk_path = PathBuf::from(format!(
        "/dev/shm/dbmigrate-loopback-{}-{tag}-disk",
        std::process::id()
    ));
    let src_file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&src_path)
        .unwrap();
    let disk = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&disk_path)
        .unwrap();
    let disk_base = 1 << 20;
    disk.set_len(disk_base + PAGES * 4096).unwrap();
    let mut hints = HintTable::new();
    for p in 0..PAGES {
        src_file.write_all_at(&page_bytes(p), p * 4096).unwrap();
        // The disk holds a copy of every page at disk_base + p * 4096.
        disk.write_all_at(&page_bytes(p), disk_base + p * 4096)
            .unwrap();
        let hint = match p {
            // Correct hints (including the working set, whose pages then change).
            0..=1199 => Hint {
                disk: 0,
                offset: DiskOffset(disk_base + p * 4096),
            },
            // Wrong offsets: storage holds another page there.
            1200..=1299 => Hint {
                disk: 0,
                offset: DiskOffset(disk_base + (p + 1) * 4096),
            },
            // Misaligned, foreign disk, beyond the end: refused at the source.
            1300..=1309 => Hint {
                disk: 0,
                offset: DiskOffset(disk_base + p * 4096 + 512),
            },
            1310..=1319 => Hint {
                disk: 3,
                offset: DiskOffset(0),
            },
            1320..=1329 => Hint {
                disk: 0,
                offset: DiskOffset(disk_base + PAGES * 4096),
            },
            _ => continue,
        };
        hints.insert(PageIndex(p), hint);
    }
    let storage: Arc<dyn Storage> = Arc::new(
        FileStorage::open(&[disk_path.as_path()], std::time::Duration::from_secs(10)).unwrap(),
    );
    let disk_sizes = storage.disk_sizes().to_vec();

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let dst2 = dst_path.clone();
    let receiver = tokio::spawn(async move {
        let ram = DestRam::open(&dst2, PAGES * 4096).unwrap();
        let mut s = accept_source(listener, false, Duration::from_secs(10)).await;
        s.set_storage_rate(pace);
        let (_ram, matched) = complete(s.receive(ram, Some(storage), None).await.unwrap());
        assert!(matched);
        s.wait_commit().await.unwrap();
        s.activated().await.unwrap();
        s.stats.clone()
    });

    // The guest rewrites hinted pages 100..164: the disk copy is stale for them.
    let written = Arc::new(Mutex::new(Vec::new()));
    let paused = Arc::new(AtomicBool::new(false));
    let writer = {
        let (written, paused) = (written.clone(), paused.clone());
        let f = src_file.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut gen = 50_000u64;
            while !paused.load(Ordering::SeqCst) {
                for p in 100..164u64 {
                    gen += 1;
                    f.write_all_at(&page_bytes(gen), p * 4096).unwrap();
                    written.lock().unwrap().push(p);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let cfg = SourceConfig {
        connections: 2,
        hints: Some(Arc::new(hints)),
        disks: disks_of(&disk_sizes),
        ..SourceConfig::default()
    };
    let ram = SourceRam::open(&src_path, PAGES * 4096).unwrap();
    let started = std::time::Instant::now();
    let mut s = SourceSession::connect(addr, ram, Box::new(Scripted(written.clone())), cfg)
        .await
        .unwrap();
    s.run_live(&mut |_, _| {}).await.unwrap();
    paused.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    let frozen = s.final_round().await.unwrap();
    let v = s.verify(frozen).await.unwrap();
    s.send_commit(&v).await.unwrap();
    s.wait_activated().await.unwrap();
    let d = receiver.await.unwrap();
    let took = started.elapsed();

    let refs: u64 = s.stats.rounds.iter().map(|r| r.ref_pages).sum();
    let rejected: u64 = s.stats.rounds.iter().map(|r| r.rejected_hints).sum();
    let mismatched: u64 = s.stats.rounds.iter().map(|r| r.rebuild_mismatch).sum();
    assert!(refs >= 1300, "references sent: {refs}");
    assert!(rejected >= 30, "hints refused at the source: {rejected}");
    assert!(d.rebuilt_pages >= 1100, "rebuilt: {d:?}");
    assert!(
        d.rebuild_mismatch >= 100 && mismatched >= 100,
        "wrong offsets must be caught: {d:?}"
    );
    assert!(d.storage_bytes >= 1300 * 4096);
    let a = std::fs::read(&src_path).unwrap();
    let b = std::fs::read(&dst_path).unwrap();
    assert!(a == b, "destination RAM differs from the source");
    for p in [src_path, dst_path, disk_path] {
        std::fs::remove_file(p).unwrap();
    }
    (d, took)
}

/// Manual: rebuild throughput of the engine alone, 1 GiB of RAM, 3/4 of it
/// hinted in shuffled disk order, storage a file in /dev/shm
/// (`cargo test --release -p dbmigrate-core --test loopback rebuild_throughput -- --ignored --nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn rebuild_throughput() {
    use dbmigrate_core::rebuild::{Hint, HintTable};
    use dbmigrate_core::storage::{FileStorage, Storage};
    const N: u64 = 262_144;
    let path = |t: &str| PathBuf::from(format!("/dev/shm/dbm-tp-{}-{t}", std::process::id()));
    let (src_path, dst_path, disk_path) = (path("src"), path("dst"), path("disk"));
    for p in [&src_path, &dst_path, &disk_path] {
        let f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(p)
            .unwrap();
        f.set_len(N * 4096).unwrap();
    }
    let src = OpenOptions::new().write(true).open(&src_path).unwrap();
    let disk = OpenOptions::new().write(true).open(&disk_path).unwrap();
    let mut hints = HintTable::new();
    for p in 0..N {
        let data = page_bytes(p);
        src.write_all_at(&data, p * 4096).unwrap();
        if p % 4 != 0 {
            // A fixed shuffle of 16 KiB groups, like buffer-pool frames.
            let group = (p / 4).wrapping_mul(2_654_435_761) % (N / 4);
            let off = group * 16384 + (p % 4) * 4096;
            disk.write_all_at(&data, off).unwrap();
            hints.insert(
                PageIndex(p),
                Hint {
                    disk: 0,
                    offset: DiskOffset(off),
                },
            );
        }
    }
    let storage: Arc<dyn Storage> = Arc::new(
        FileStorage::open(&[disk_path.as_path()], std::time::Duration::from_secs(10)).unwrap(),
    );
    let disk_sizes = storage.disk_sizes().to_vec();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let dst2 = dst_path.clone();
    let receiver = tokio::spawn(async move {
        let ram = DestRam::open(&dst2, N * 4096).unwrap();
        let mut s = dest::accept(
            &mut plain_gate(listener),
            &[N * 4096],
            false,
            Duration::from_secs(30),
        )
        .await
        .unwrap();
        let (_ram, matched) = complete(s.receive(ram, Some(storage), None).await.unwrap());
        assert!(matched);
        s.wait_commit().await.unwrap();
        s.activated().await.unwrap();
        s.stats.clone()
    });
    let cfg = SourceConfig {
        connections: 2,
        hints: Some(Arc::new(hints)),
        disks: disks_of(&disk_sizes),
        ..SourceConfig::default()
    };
    let t = std::time::Instant::now();
    let ram = SourceRam::open(&src_path, N * 4096).unwrap();
    let mut s = SourceSession::connect(
        addr,
        ram,
        Box::new(Scripted(Arc::new(Mutex::new(Vec::new())))),
        cfg,
    )
    .await
    .unwrap();
    s.run_live(&mut |_, _| {}).await.unwrap();
    let frozen = s.final_round().await.unwrap();
    let v = s.verify(frozen).await.unwrap();
    s.send_commit(&v).await.unwrap();
    s.wait_activated().await.unwrap();
    let d = receiver.await.unwrap();
    eprintln!(
        "1 GiB, 3/4 rebuilt: {:?}; rounds: {:?}; dest {d:?}",
        t.elapsed(),
        s.stats
            .rounds
            .iter()
            .map(|r| r.elapsed_ms)
            .collect::<Vec<_>>()
    );
    for p in [src_path, dst_path, disk_path] {
        std::fs::remove_file(p).unwrap();
    }
}

fn complete(r: dest::Received) -> (dbmigrate_core::ram::DestRam, bool) {
    match r {
        dest::Received::Complete { ram, matched } => (ram, matched),
        dest::Received::Postcopy(_) => panic!("pre-copy switched to post-copy"),
    }
}

/// How the scripted source of [`postcopy_to_a_real_userfaultfd`] ends.
#[derive(Clone, Copy, PartialEq)]
enum PostcopyEnding {
    /// An answer to a page request comes after every page was placed,
    /// then the digests.
    LateAnswer,
    /// The source goes silent once every page was pushed (its link cut).
    SilentSource,
    /// After the comparison's result, answers to earlier page requests
    /// (more than the socket buffers hold) are still on their way.
    AnswersAfterResult,
}

/// A post-copy into a real userfaultfd-registered mapping of the
/// destination RAM file, from a scripted source: switch with two pages
/// pending, Commit, the push of both pages, then `ending`. Returns the
/// destination's outcome, and whether its RAM equals the frozen source's.
async fn postcopy_to_a_real_userfaultfd(
    ending: PostcopyEnding,
) -> (Result<dest::PostcopyOutcome, dest::DestError>, bool) {
    let dst_path = ram_file(match ending {
        PostcopyEnding::LateAnswer => "late",
        PostcopyEnding::SilentSource => "silent-post",
        PostcopyEnding::AnswersAfterResult => "after-result",
    });
    let map = stand_in_qemu_map(&dst_path);
    let base = map.as_ptr() as u64;
    let uffd = dbmigrate_uffd::register_missing(base, PAGES * 4096).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let p2 = dst_path.clone();
    let receiver = tokio::spawn(async move {
        let ram = DestRam::open(&p2, PAGES * 4096).unwrap();
        let mut s = accept_source(listener, true, Duration::from_secs(3)).await;
        let faults = dest::FaultSource::single(uffd, base, PAGES * 4096, 4096);
        let run = match s.receive(ram, None, Some(faults)).await.unwrap() {
            dest::Received::Postcopy(run) => run,
            dest::Received::Complete { .. } => panic!("no switch to post-copy"),
        };
        s.postcopy(run, async { Ok(()) }, || {}).await
    });
    let (mut ctrl, welcome, mut data) = scripted_source(addr, 9).await;
    assert!(welcome.postcopy);

    // The frozen source RAM: two pages with data, the rest zero.
    let (p1, p2) = (5u64, 700u64);
    let ram_len = usize::try_from(PAGES * 4096).unwrap();
    let mut frozen = vec![0u8; ram_len];
    let mut pending = vec![0u8; ram_len / 4096 / 8];
    for p in [p1, p2] {
        let i = usize::try_from(p).unwrap();
        frozen[i * 4096..(i + 1) * 4096].copy_from_slice(&page_bytes(p));
        pending[i / 8] |= 1 << (i % 8);
    }
    protocol::write_message(&mut data, &Message::SwitchMark, "t")
        .await
        .unwrap();
    switch_and_commit(&mut ctrl, pending).await;
    // The background push places both pages and ends its stream...
    let mut b = BatchBuilder::new(0);
    for p in [p1, p2] {
        b.push(p, PageEncoding::Raw, &page_bytes(p));
    }
    data.write_all(&b.finish()).await.unwrap();
    protocol::write_message(&mut data, &Message::EndOfStream, "t")
        .await
        .unwrap();
    let mut data_pages = PageBitmap::new(PAGES);
    data_pages.set(p1);
    data_pages.set(p2);
    match ending {
        PostcopyEnding::LateAnswer => {
            // ...and only then the answer to an earlier request comes on the
            // control connection, once the RAM owner had time to finish.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut b = BatchBuilder::new(0);
            b.push(p1, PageEncoding::Raw, &page_bytes(p1));
            ctrl.write_all(&b.finish()).await.unwrap();
            verify_against_frozen(&mut ctrl, &frozen, &data_pages).await;
        }
        PostcopyEnding::AnswersAfterResult => {
            verify_against_frozen(&mut ctrl, &frozen, &data_pages).await;
            // The real source may be writing these when the result comes;
            // it reads the result after them. A destination that closed on
            // sending the result would reset the connection under them.
            tokio::time::sleep(Duration::from_millis(100)).await;
            for _ in 0..16 {
                let mut b = BatchBuilder::new(0);
                for p in 0..256usize {
                    b.push(p as u64, PageEncoding::Raw, &frozen[p * 4096..][..4096]);
                }
                ctrl.write_all(&b.finish())
                    .await
                    .expect("the destination closed before the source was done writing");
            }
            ctrl.shutdown().await.unwrap();
        }
        // Connections stay open, nothing more is sent.
        PostcopyEnding::SilentSource => {}
    }
    let outcome = tokio::time::timeout(Duration::from_secs(30), receiver)
        .await
        .expect("the destination waited forever")
        .unwrap();
    let same = map[..] == frozen[..];
    drop((map, ctrl, data));
    std::fs::remove_file(dst_path).unwrap();
    (outcome, same)
}

/// The race the QEMU test hit: the source answers a page request after
/// storage or the background push already placed every page, so the RAM
/// owner has finished. The late answer (the frozen RAM's same bytes) must be
/// ignored, not end a post-copy whose VM already runs here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_answer_after_every_page_is_placed_ends_postcopy_cleanly() {
    let (outcome, same) = postcopy_to_a_real_userfaultfd(PostcopyEnding::LateAnswer).await;
    let outcome = outcome.expect("post-copy must end cleanly");
    assert!(outcome.matched && outcome.compared);
    assert!(same, "destination RAM differs from the frozen source");
}

/// The source is still writing answers to page requests when the result
/// of the comparison comes (the dirtier guest's post-copy hit it: the source
/// got Broken pipe after the destination had finished): the destination
/// reads them until the source closes, so the source never sees a reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_still_coming_after_the_result_are_read_until_the_source_closes() {
    let (outcome, same) = postcopy_to_a_real_userfaultfd(PostcopyEnding::AnswersAfterResult).await;
    let outcome = outcome.expect("post-copy must end cleanly");
    assert!(outcome.matched && outcome.compared);
    assert!(same, "destination RAM differs from the frozen source");
}

/// The source goes silent after every page was placed and the VM resumed:
/// the destination does not wait forever, and it keeps the VM (whose
/// memory is complete) while saying that nothing was compared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_silent_after_every_page_is_placed_leaves_the_vm_running_unverified() {
    let (outcome, same) = postcopy_to_a_real_userfaultfd(PostcopyEnding::SilentSource).await;
    let outcome = outcome.expect("a complete VM must not be stopped");
    assert!(!outcome.compared && !outcome.matched);
    assert!(same, "destination RAM differs from the frozen source");
}

/// Heartbeats: a source and a destination that each sit idle for longer
/// than the other's timeout (the source before its first round and before
/// Commit, the destination before Activated, as when QEMU moves device
/// state) still finish, because silence is measured between messages and
/// each side sends a heartbeat every second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_but_alive_peers_are_waited_for_past_their_timeouts() {
    let src_path = ram_file("idle-src");
    let dst_path = ram_file("idle-dst");
    let src_file = OpenOptions::new().write(true).open(&src_path).unwrap();
    for p in (0..PAGES).step_by(3) {
        src_file.write_all_at(&page_bytes(p), p * 4096).unwrap();
    }
    let timeout = Duration::from_secs(3);
    let idle = Duration::from_secs(7);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let p2 = dst_path.clone();
    let receiver = tokio::spawn(async move {
        let ram = DestRam::open(&p2, PAGES * 4096).unwrap();
        let mut s = accept_source(listener, false, timeout).await;
        let (_ram, matched) = complete(s.receive(ram, None, None).await.unwrap());
        assert!(matched);
        s.wait_commit().await.unwrap();
        tokio::time::sleep(idle).await;
        s.activated().await.unwrap();
    });
    let ram = SourceRam::open(&src_path, PAGES * 4096).unwrap();
    let cfg = SourceConfig {
        peer_timeout: timeout,
        ..SourceConfig::default()
    };
    let mut s = SourceSession::connect(addr, ram, Box::new(Scripted(Arc::default())), cfg)
        .await
        .unwrap();
    tokio::time::sleep(idle).await;
    s.run_live(&mut |_, _| {}).await.unwrap();
    let frozen = s.final_round().await.unwrap();
    let v = s.verify(frozen).await.unwrap();
    tokio::time::sleep(idle).await;
    s.send_commit(&v).await.unwrap();
    s.wait_activated().await.unwrap();
    receiver.await.unwrap();
    assert_eq!(
        std::fs::read(&src_path).unwrap(),
        std::fs::read(&dst_path).unwrap()
    );
    std::fs::remove_file(src_path).unwrap();
    std::fs::remove_file(dst_path).unwrap();
}

/// A source that set up its session and then went silent (its host froze,
/// its link was cut): the destination gives up after its timeout, saying so.
#[tokio::test]
async fn a_silent_source_is_given_up_on_with_a_clear_error() {
    let dst_path = ram_file("silent");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let p2 = dst_path.clone();
    let receiver = tokio::spawn(async move {
        let ram = DestRam::open(&p2, PAGES * 4096).unwrap();
        let mut s = accept_source(listener, false, Duration::from_secs(2)).await;
        s.receive(ram, None, None)
            .await
            .err()
            .expect("must give up")
    });
    let (ctrl, _welcome, data) = scripted_source(addr, 11).await;
    // Connections open, nothing more sent: no pages, no heartbeats.
    let err = tokio::time::timeout(Duration::from_secs(30), receiver)
        .await
        .expect("the destination waited forever")
        .unwrap();
    assert!(
        err.to_string()
            .contains("no word from the source agent for 2 s"),
        "{err}"
    );
    drop((ctrl, data));
    std::fs::remove_file(dst_path).unwrap();
}

/// Shared storage that takes `delay` per batch of reads and logs the
/// offsets it read, in order.
struct SlowStorage {
    disk: Vec<u8>,
    sizes: Vec<u64>,
    delay: Duration,
    log: Mutex<Vec<u64>>,
}

impl dbmigrate_core::storage::Storage for SlowStorage {
    fn disk_sizes(&self) -> &[u64] {
        &self.sizes
    }
    fn read_at(
        &self,
        _disk: u16,
        offset: DiskOffset,
        buf: &mut [u8],
    ) -> Result<(), dbmigrate_core::storage::StorageError> {
        let at = usize::try_from(offset.0).unwrap();
        buf.copy_from_slice(&self.disk[at..at + buf.len()]);
        self.log.lock().unwrap().push(offset.0);
        Ok(())
    }
    fn read_many(
        &self,
        disk: u16,
        reads: &mut [(DiskOffset, &mut [u8])],
    ) -> Result<(), dbmigrate_core::storage::StorageError> {
        std::thread::sleep(self.delay);
        for (offset, buf) in reads.iter_mut() {
            self.read_at(disk, *offset, buf)?;
        }
        Ok(())
    }
}

/// Post-copy with thousands of storage reads queued: the VM touches the
/// page whose read is last in the queue. Its read must jump the queue
/// (the vCPU waits for it), and the RAM must still end byte-exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_on_a_page_whose_storage_read_is_queued_is_read_ahead_of_the_queue() {
    use dbmigrate_core::rebuild::Hint;
    use dbmigrate_core::storage::Storage;

    const REFS: u64 = 2000;
    let target = REFS - 1;
    // RAM page p is on disk at 18p pages: the gaps are wider than a
    // background read goes through, so no two reads coalesce, and the
    // target's offset sorts last.
    let disk_offset = |p: u64| 18 * p * 4096;
    let mut disk = vec![0u8; usize::try_from(disk_offset(REFS)).unwrap()];
    let mut frozen = vec![0u8; usize::try_from(PAGES * 4096).unwrap()];
    for p in 0..REFS {
        let d = usize::try_from(disk_offset(p)).unwrap();
        disk[d..d + 4096].copy_from_slice(&page_bytes(p));
        let i = usize::try_from(p * 4096).unwrap();
        frozen[i..i + 4096].copy_from_slice(&page_bytes(p));
    }
    let storage = Arc::new(SlowStorage {
        sizes: vec![disk.len() as u64],
        disk,
        delay: Duration::from_millis(20),
        log: Mutex::new(Vec::new()),
    });

    let dst_path = ram_file("urgent-read");
    let map = stand_in_qemu_map(&dst_path);
    let base = map.as_ptr() as u64;
    let uffd = dbmigrate_uffd::register_missing(base, PAGES * 4096).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (p2, st) = (dst_path.clone(), storage.clone() as Arc<dyn Storage>);
    let receiver = tokio::spawn(async move {
        let mut ram = DestRam::open(&p2, PAGES * 4096).unwrap();
        // Allocated as receive() has it: the switch must punch the pages it
        // still waits for, or the touch below would read zeros, not fault.
        ram.zero_and_allocate().unwrap();
        let mut s = accept_source(listener, true, Duration::from_secs(10)).await;
        let faults = dest::FaultSource::single(uffd, base, PAGES * 4096, 4096);
        let run = match s.receive(ram, Some(st), Some(faults)).await.unwrap() {
            dest::Received::Postcopy(run) => run,
            dest::Received::Complete { .. } => panic!("no switch to post-copy"),
        };
        let placed = AtomicBool::new(false);
        let outcome = s
            .postcopy(run, async { Ok(()) }, || {
                placed.store(true, Ordering::SeqCst)
            })
            .await;
        // Every page is in place when post-copy ends well: the hook ran.
        assert!(outcome.is_err() || placed.load(Ordering::SeqCst));
        (outcome, s.stats.clone())
    });
    let (mut ctrl, _, mut data) = scripted_source(addr, 11).await;

    // Every page is a reference; nothing is pending at the switch: the
    // destination holds them all as storage reads in flight.
    let mut b = BatchBuilder::new(0);
    for p in 0..REFS {
        let hint = Hint {
            disk: 0,
            offset: DiskOffset(disk_offset(p)),
        };
        let hash = xxhash_rust::xxh3::xxh3_128(&page_bytes(p));
        b.push(
            p,
            PageEncoding::Reference,
            &protocol::encode_reference(hint, hash),
        );
    }
    data.write_all(&b.finish()).await.unwrap();
    protocol::write_message(&mut data, &Message::SwitchMark, "t")
        .await
        .unwrap();
    switch_and_commit(&mut ctrl, vec![0u8; usize::try_from(PAGES / 8).unwrap()]).await;

    // The "vCPU" touches the target page and waits for it.
    let at = usize::try_from(target * 4096).unwrap();
    let touched = {
        let map = map.clone();
        tokio::task::spawn_blocking(move || map[at..at + 4096].to_vec())
    };
    let touched = tokio::time::timeout(Duration::from_secs(20), touched)
        .await
        .expect("the faulting vCPU was never served")
        .unwrap();
    assert!(
        touched == page_bytes(target),
        "the faulted page holds wrong bytes"
    );

    protocol::write_message(&mut data, &Message::EndOfStream, "t")
        .await
        .unwrap();
    let mut data_pages = PageBitmap::new(PAGES);
    data_pages.set_range(0, REFS);
    verify_against_frozen(&mut ctrl, &frozen, &data_pages).await;
    let (outcome, stats) = tokio::time::timeout(Duration::from_secs(30), receiver)
        .await
        .expect("the destination waited forever")
        .unwrap();
    let outcome = outcome.expect("post-copy must end cleanly");
    assert!(outcome.matched && outcome.compared);
    assert!(
        map[..] == frozen[..],
        "destination RAM differs from the frozen source"
    );
    assert_eq!(stats.storage_faults, 1, "{stats:?}");

    // The target's offset sorts last: read in queue order it would be the
    // last of 2000 reads. It was read while most of the queue still waited.
    let log = storage.log.lock().unwrap().clone();
    let first = log
        .iter()
        .position(|&o| o == disk_offset(target))
        .expect("the target was never read");
    assert!(
        first < log.len() / 2,
        "the faulting page was read {first}th of {} reads: not ahead of the queue",
        log.len()
    );
    drop((map, ctrl, data));
    std::fs::remove_file(dst_path).unwrap();
}

/// The destination's digests come from the pages it wrote: a page that
/// arrived with other bytes than the source's RAM holds (a broken or lying
/// source) is found at the switchover, in its chunk only, and the
/// destination never reports the RAM as matching.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_placed_with_other_bytes_than_the_source_holds_fails_verification() {
    use dbmigrate_core::protocol::PageEntry;
    use dbmigrate_core::verify;

    let dst_path = ram_file("lie-dst");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let dst_path2 = dst_path.clone();
    let receiver = tokio::spawn(async move {
        let ram = DestRam::open(&dst_path2, PAGES * 4096).unwrap();
        let mut s = accept_source(listener, false, Duration::from_secs(10)).await;
        s.receive(ram, None, None).await
    });
    let (mut ctrl, _welcome, mut data) = scripted_source(addr, 77).await;
    // The source's RAM: pages 3 and 1500 hold data, the rest is zero.
    let mut frozen = vec![0u8; usize::try_from(PAGES).unwrap() * 4096];
    frozen[3 * 4096..4 * 4096].copy_from_slice(&page_bytes(3));
    frozen[1500 * 4096..1501 * 4096].copy_from_slice(&page_bytes(1500));
    let raw = |page: u64, data: Vec<u8>| PageEntry {
        page,
        encoding: PageEncoding::Raw,
        data,
    };
    // Page 1500 goes over with other bytes than the RAM holds.
    let batch = Message::PageBatch {
        round: 0,
        pages: vec![raw(3, page_bytes(3)), raw(1500, page_bytes(9))],
    };
    protocol::write_message(&mut data, &batch, "t")
        .await
        .unwrap();
    protocol::write_message(&mut data, &Message::EndOfStream, "t")
        .await
        .unwrap();
    let mut all = PageBitmap::new(PAGES);
    all.set_range(0, PAGES);
    let digests = verify::ram_digests(&frozen, &all, verify::CHUNK_PAGES, 1);
    protocol::write_message(
        &mut ctrl,
        &Message::VerifyRequest {
            chunk_pages: verify::CHUNK_PAGES,
            digests,
        },
        "t",
    )
    .await
    .unwrap();
    match next_ctrl(&mut ctrl).await {
        Message::VerifyResult {
            mismatched_total,
            mismatched,
            ..
        } => {
            assert_eq!(mismatched_total, 1);
            assert_eq!(mismatched, vec![1500 / verify::CHUNK_PAGES]);
        }
        other => panic!("expected VerifyResult, got {}", other.name()),
    }
    let outcome = receiver.await.unwrap();
    assert!(
        !matches!(outcome, Ok(dest::Received::Complete { matched: true, .. })),
        "the destination took a RAM with a wrong page for a match"
    );
    drop((ctrl, data));
    std::fs::remove_file(dst_path).unwrap();
}

/// The disks of `sizes`, unnamed, as the source's configuration takes them.
fn disks_of(sizes: &[u64]) -> Vec<dbmigrate_core::protocol::guest::DiskId> {
    sizes
        .iter()
        .map(|&bytes| dbmigrate_core::protocol::guest::DiskId {
            bytes,
            ..Default::default()
        })
        .collect()
}
