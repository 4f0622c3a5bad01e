//! Post-copy into a RAM file on hugetlbfs (2 MiB pages), with a real
//! userfaultfd in minor-fault mode over a mapping that stands in for
//! QEMU's: a huge page reaches the "guest" only once every 4 KiB page of
//! it is placed, and the RAM ends byte-exact. Needs root (it mounts a
//! hugetlbfs of its own and reserves 2 MiB pages for the test's length).

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use dbmigrate_core::bitmap::PageBitmap;
use dbmigrate_core::dest;
use dbmigrate_core::protocol::{self, BatchBuilder, Message, PageEncoding};
use dbmigrate_core::ram::DestRam;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

mod common;
use common::*;

const HUGE: u64 = 2 << 20;
const KNOB: &str = "/proc/sys/vm/nr_hugepages";

/// A hugetlbfs mounted for this test with `pages` 2 MiB pages reserved
/// on top of the host's; both undone when dropped.
struct HugeTlbfs {
    dir: PathBuf,
    pages: u64,
}

impl HugeTlbfs {
    fn mount(pages: u64) -> Self {
        let now: u64 = std::fs::read_to_string(KNOB)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        std::fs::write(KNOB, (now + pages).to_string()).expect("reserving 2 MiB pages (root?)");
        let dir = std::env::temp_dir().join(format!("dbmigrate-hugetlb-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "hugetlbfs", "-o", "pagesize=2M", "none"])
            .arg(&dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mounting a hugetlbfs on {}", dir.display());
        Self { dir, pages }
    }

    fn file(&self, name: &str, len: u64) -> PathBuf {
        let p = self.dir.join(name);
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        f.set_len(len).unwrap();
        p
    }
}

impl Drop for HugeTlbfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        let _ = std::fs::remove_dir(&self.dir);
        if let Some(now) = std::fs::read_to_string(KNOB)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
        {
            let _ = std::fs::write(KNOB, now.saturating_sub(self.pages).to_string());
        }
    }
}

/// Reads page `page` of `map` on another thread, as a vCPU would.
fn touch(map: &Arc<memmap2::MmapMut>, page: u64) -> tokio::task::JoinHandle<Vec<u8>> {
    let map = map.clone();
    let at = usize::try_from(page * 4096).unwrap();
    tokio::task::spawn_blocking(move || map[at..at + 4096].to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_page_reaches_the_guest_only_once_every_page_of_it_is_placed() {
    let len = PAGES * 4096;
    let fs = HugeTlbfs::mount(len / HUGE + 1);
    let path = fs.file("ram", len);
    let map = stand_in_qemu_map(&path);
    let base = map.as_ptr() as u64;
    assert_eq!(base % HUGE, 0, "a hugetlbfs mapping starts on a huge page");
    let uffd = dbmigrate_uffd::register_minor(base, len).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let p2 = path.clone();
    let receiver = tokio::spawn(async move {
        let mut ram = DestRam::open(&p2, len).unwrap();
        assert!(ram.huge_pages() && ram.file_page_bytes() == HUGE);
        // As `receive` has it by default: the file holds no page yet, and
        // a thread allocates them while pages arrive.
        ram.zero_and_allocate_in_background(1).unwrap();
        let mut s = accept_source(listener, true, Duration::from_secs(10)).await;
        let faults = dest::FaultSource::single(uffd, base, len, HUGE);
        let run = match s.receive(ram, None, Some(faults)).await.unwrap() {
            dest::Received::Postcopy(run) => run,
            dest::Received::Complete { .. } => panic!("no switch to post-copy"),
        };
        s.postcopy(run, async { Ok(()) }, || {}).await
    });
    let (mut ctrl, welcome, mut data) = scripted_source(addr, 21).await;
    assert!(welcome.postcopy);

    // Before the switch "QEMU" reads page 1100 (huge page 2), maybe before
    // the file holds its huge page: it is mapped there as it is (zeros).
    let early_read = tokio::time::timeout(Duration::from_secs(10), touch(&map, 1100))
        .await
        .expect("QEMU's own touch before the switch was not served")
        .unwrap();
    assert!(early_read.iter().all(|&b| b == 0));

    // Before the switch: pages 600 and 1700 arrive (huge pages 1 and 3).
    // At the switch pages 5, 700 and 1200 are pending (huge pages 0, 1
    // and 2, the one QEMU mapped before).
    let (early, pending) = ([600u64, 1700], [5u64, 700, 1200]);
    let mut frozen = vec![0u8; usize::try_from(len).unwrap()];
    let mut pending_bits = vec![0u8; usize::try_from(PAGES / 8).unwrap()];
    let mut data_pages = PageBitmap::new(PAGES);
    for p in early.iter().chain(&pending) {
        let i = usize::try_from(*p).unwrap();
        frozen[i * 4096..(i + 1) * 4096].copy_from_slice(&page_bytes(*p));
        data_pages.set(*p);
    }
    for p in pending {
        let i = usize::try_from(p).unwrap();
        pending_bits[i / 8] |= 1 << (i % 8);
    }
    let mut b = BatchBuilder::new(0);
    for p in early {
        b.push(p, PageEncoding::Raw, &page_bytes(p));
    }
    data.write_all(&b.finish()).await.unwrap();
    protocol::write_message(&mut data, &Message::SwitchMark, "t")
        .await
        .unwrap();
    switch_and_commit(&mut ctrl, pending_bits).await;

    // Huge page 3 owes nothing: the guest reads it at once. Huge page 1
    // still owes page 700: the guest reading page 600 of it waits; so does
    // one reading page 1100 of huge page 2, unmapped again at the switch.
    let free = tokio::time::timeout(Duration::from_secs(10), touch(&map, 1700))
        .await
        .expect("a huge page that owes nothing was not mapped")
        .unwrap();
    assert!(free == page_bytes(1700));
    let waiting = [touch(&map, 600), touch(&map, 1100)];
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting[0].is_finished(),
        "the guest saw a huge page whose page 700 had not arrived"
    );
    assert!(
        !waiting[1].is_finished(),
        "the guest saw a huge page, mapped before the switch, whose page 1200 had not arrived"
    );
    // The faults asked the source for what their huge pages owe, only that.
    let mut asked = Vec::new();
    while asked.len() < 2 {
        match next_ctrl(&mut ctrl).await {
            Message::PageRequest { pages } => asked.extend(pages),
            other => panic!(
                "expected requests for pages 700 and 1200, got {}",
                other.name()
            ),
        }
    }
    asked.sort_unstable();
    assert_eq!(asked, [700, 1200]);

    // The push brings both pending pages: the waiting read goes on.
    let mut b = BatchBuilder::new(0);
    for p in pending {
        b.push(p, PageEncoding::Raw, &page_bytes(p));
    }
    data.write_all(&b.finish()).await.unwrap();
    let [w600, w1100] = waiting;
    for (w, page, want) in [(w600, 600, page_bytes(600)), (w1100, 1100, vec![0u8; 4096])] {
        let seen = tokio::time::timeout(Duration::from_secs(10), w)
            .await
            .unwrap_or_else(|_| panic!("the faulting read of page {page} was never served"))
            .unwrap();
        assert!(seen == want, "page {page} read wrong bytes");
    }
    protocol::write_message(&mut data, &Message::EndOfStream, "t")
        .await
        .unwrap();
    verify_against_frozen(&mut ctrl, &frozen, &data_pages).await;
    let outcome = tokio::time::timeout(Duration::from_secs(30), receiver)
        .await
        .expect("the destination waited forever")
        .unwrap()
        .expect("post-copy must end cleanly");
    assert!(outcome.matched && outcome.compared);
    // Every huge page reads through the "guest's" mapping now, faults
    // unregistered: the whole RAM equals the frozen source.
    assert!(
        map[..] == frozen[..],
        "destination RAM differs from the frozen source"
    );
    drop((map, ctrl, data));
    let _ = std::fs::remove_file(&path);
    drop(fs);
}
