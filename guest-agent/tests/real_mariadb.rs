//! The guest agent against a real MariaDB on this host: the data directory
//! sits on an ext4 image attached to a loop device (the "VM disk"), and every
//! clean frame the agent exports must be byte-identical to the image at the
//! exported offset. Needs root and `mariadbd` (scripts/setup.sh installs it).

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use dbmigrate_testbed::HostMariadb;
use mysql_async::prelude::Queryable;

struct Server {
    dir: PathBuf,
    image: PathBuf,
    mnt: PathBuf,
    loopdev: String,
    db: Option<HostMariadb>,
    socket: PathBuf,
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl Server {
    fn start(name: &str) -> Server {
        let dir = std::env::temp_dir().join(format!("dbm-ga-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let image = dir.join("disk.img");
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        let f = std::fs::File::create(&image).unwrap();
        f.set_len(512 << 20).unwrap();
        drop(f);
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image));
        let loopdev = run(Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&image));
        let mut s = Server {
            dir: dir.clone(),
            image,
            mnt: mnt.clone(),
            loopdev,
            db: None,
            socket: dir.join("mysqld.sock"),
        };
        run(Command::new("mount").arg(&s.loopdev).arg(&mnt));
        s.db = Some(
            HostMariadb::start(&mnt.join("data"), &dir, "64M").expect("starting the test server"),
        );
        s.socket = s.db.as_ref().unwrap().socket.clone();
        s
    }

    fn pid(&self) -> u32 {
        self.db.as_ref().unwrap().pid()
    }

    async fn conn(&self) -> mysql_async::Conn {
        let opts = mysql_async::OptsBuilder::default()
            .socket(Some(self.socket.to_string_lossy().into_owned()))
            .user(Some("root"));
        mysql_async::Conn::new(opts)
            .await
            .expect("connect to the test server")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // The server stops before its disk is unmounted.
        drop(self.db.take());
        let _ = Command::new("umount").arg(&self.mnt).status();
        let _ = Command::new("losetup").args(["-d", &self.loopdev]).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn fill(conn: &mut mysql_async::Conn, rows: u32) {
    conn.query_drop("CREATE DATABASE IF NOT EXISTS t")
        .await
        .unwrap();
    // The sequence engine's seq_1_to_N tables live in the current database.
    conn.query_drop("USE t").await.unwrap();
    conn.query_drop(
        "CREATE TABLE IF NOT EXISTS t.a (id INT PRIMARY KEY, k INT, c CHAR(120), KEY(k)) ENGINE=InnoDB",
    )
    .await
    .unwrap();
    conn.query_drop(format!(
        "INSERT INTO t.a SELECT seq, seq * 7 % 1000, MD5(seq) FROM seq_1_to_{rows}"
    ))
    .await
    .unwrap();
}

async fn wait_clean(conn: &mut mysql_async::Conn) {
    conn.query_drop("SET GLOBAL innodb_max_dirty_pages_pct = 0")
        .await
        .unwrap();
    let t = Instant::now();
    loop {
        let dirty: Option<u64> = conn
            .query_first("SELECT VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS WHERE VARIABLE_NAME = 'INNODB_BUFFER_POOL_PAGES_DIRTY'")
            .await
            .unwrap();
        if dirty == Some(0) || t.elapsed() > Duration::from_secs(60) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every exported hint: the frame's 4 KiB equals the image at the disk offset.
fn check_against_image(s: &Server, c: &guest_agent::Collected) -> usize {
    // Drop the loop device's view of the file system to the image file.
    run(&mut Command::new("sync"));
    let image = std::fs::File::open(&s.image).unwrap();
    let mem = std::fs::File::open(format!("/proc/{}/mem", s.pid())).unwrap();
    let mut bad = 0;
    let (mut a, mut b) = (vec![0u8; 4096], vec![0u8; 4096]);
    for (h, &vaddr) in c.hints.iter().zip(&c.vaddrs) {
        assert_eq!(h.disk, 0);
        assert!(h.clean);
        assert_eq!(h.disk_offset.0 % 4096, 0, "hint not block-aligned: {h:?}");
        mem.read_exact_at(&mut a, vaddr).unwrap();
        image.read_exact_at(&mut b, h.disk_offset.0).unwrap();
        if a != b {
            eprintln!("differs from the disk: {h:?}");
            bad += 1;
        }
    }
    bad
}

#[tokio::test(flavor = "current_thread")]
async fn clean_frames_match_the_disk_at_their_exported_offsets() {
    let s = Server::start("clean");
    let mut conn = s.conn().await;
    fill(&mut conn, 60_000).await;
    wait_clean(&mut conn).await;
    // Read everything back so the pool holds the whole table.
    let _: Option<u64> = conn
        .query_first("SELECT SUM(LENGTH(c)) FROM t.a")
        .await
        .unwrap();
    let cfg = guest_agent::Config {
        disks: vec![PathBuf::from(&s.loopdev)],
        pid: Some(s.pid()),
    };
    let c = guest_agent::collect(&mut conn, &cfg)
        .await
        .expect("collect");
    eprintln!("stats: {:?}", c.stats);
    // 60k rows of ~140 bytes: well over 500 16 KiB pages, 4 hints each.
    assert!(c.hints.len() >= 2000, "too few hints: {:?}", c.stats);
    assert_eq!(c.hints.len(), c.vaddrs.len());
    let bad = check_against_image(&s, &c);
    assert_eq!(
        bad,
        0,
        "{bad} of {} exported pages differ from the disk",
        c.hints.len()
    );
    // Hints are unique per physical page.
    let mut gpas: Vec<u64> = c.hints.iter().map(|h| h.gpa.0).collect();
    gpas.sort_unstable();
    gpas.dedup();
    assert_eq!(gpas.len(), c.hints.len());
    // The format round-trips.
    let enc = dbmigrate_core::protocol::guest::encode_hints(&c.hints, 0);
    assert_eq!(
        dbmigrate_core::protocol::guest::decode_hints(&enc).unwrap(),
        c.hints
    );
    conn.disconnect().await.unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn modified_pages_are_not_exported() {
    let s = Server::start("dirty");
    let mut conn = s.conn().await;
    fill(&mut conn, 30_000).await;
    wait_clean(&mut conn).await;
    let cfg = guest_agent::Config {
        disks: vec![PathBuf::from(&s.loopdev)],
        pid: Some(s.pid()),
    };
    let _: Option<u64> = conn
        .query_first("SELECT SUM(LENGTH(c)) FROM t.a")
        .await
        .unwrap();
    let before = guest_agent::collect(&mut conn, &cfg)
        .await
        .expect("collect");
    // Keep the page cleaner away, then modify every leaf page of the table.
    conn.query_drop("SET GLOBAL innodb_max_dirty_pages_pct = 99")
        .await
        .unwrap();
    conn.query_drop("SET GLOBAL innodb_max_dirty_pages_pct_lwm = 0")
        .await
        .unwrap();
    conn.query_drop("SET GLOBAL innodb_adaptive_flushing = OFF")
        .await
        .unwrap();
    conn.query_drop("UPDATE t.a SET c = MD5(c)").await.unwrap();
    let c = guest_agent::collect(&mut conn, &cfg)
        .await
        .expect("collect");
    eprintln!("before: {:?}\nafter: {:?}", before.stats, c.stats);
    // 30k rows of ~140 bytes fill some 250 leaf pages (1,000 hints).
    assert!(
        c.stats.hints + 800 <= before.stats.hints,
        "modified pages are still exported: {} hints before the update, {} after",
        before.stats.hints,
        c.stats.hints
    );
    // Whatever is exported still matches the disk: dirty frames are not hinted.
    let bad = check_against_image(&s, &c);
    assert_eq!(
        bad,
        0,
        "{bad} of {} exported pages differ from the disk",
        c.hints.len()
    );
    conn.disconnect().await.unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn no_server_and_bad_disk_are_clear_errors() {
    let s = Server::start("errors");
    let mut conn = s.conn().await;
    let cfg = guest_agent::Config {
        disks: vec![Path::new("/nonexistent/vdz").to_path_buf()],
        pid: Some(s.pid()),
    };
    let e = guest_agent::collect(&mut conn, &cfg)
        .await
        .err()
        .expect("a missing disk must fail");
    assert!(e.to_string().contains("/nonexistent/vdz"), "{e}");
    let cfg = guest_agent::Config {
        disks: vec![PathBuf::from(&s.loopdev)],
        pid: Some(u32::MAX - 1),
    };
    let e = guest_agent::collect(&mut conn, &cfg)
        .await
        .err()
        .expect("a dead pid must fail");
    assert!(
        e.to_string().contains("must run as root") || e.to_string().contains("process"),
        "{e}"
    );
    conn.disconnect().await.unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn file_layout_places_every_page_where_the_disk_holds_it() {
    let s = Server::start("layout");
    let mut conn = s.conn().await;
    fill(&mut conn, 20_000).await;
    wait_clean(&mut conn).await;
    let cfg = guest_agent::Config {
        disks: vec![PathBuf::from(&s.loopdev)],
        pid: Some(s.pid()),
    };
    // No SQL: the files from the server's open files and data directory.
    let layout = guest_agent::layout(&cfg).expect("layout");
    assert_eq!(layout.page_size, 16384);
    // The buffer pool's frames, as guest-physical pages (here: host-physical).
    let frames = dbmigrate_core::protocol::guest::frame_pages(&layout.frames, 4).unwrap();
    assert!(frames.len() > 500, "{} frames listed", frames.len());
    let spaces: Vec<(u32, String)> = conn
        .query("SELECT SPACE, FILENAME FROM information_schema.INNODB_SYS_TABLESPACES")
        .await
        .unwrap();
    // Every tablespace on the disk is described, the temporary one is not.
    for (space, name) in &spaces {
        let described = layout.files.iter().any(|f| f.id == *space);
        assert_eq!(
            described,
            !name.ends_with("ibtmp1"),
            "space {space} ({name}) in the layout: {described}"
        );
    }
    run(&mut Command::new("sync"));
    let image = std::fs::File::open(&s.image).unwrap();
    let datadir = s.mnt.join("data");
    let (mut a, mut b) = (vec![0u8; 4096], vec![0u8; 4096]);
    let mut checked = 0;
    for f in &layout.files {
        let name = &spaces.iter().find(|(id, _)| *id == f.id).unwrap().1;
        let path = datadir.join(name.trim_start_matches("./"));
        let file = std::fs::File::open(&path).unwrap();
        let len = file.metadata().unwrap().len();
        for off in (0..len).step_by(4096) {
            let Some(disk_off) = f.locate(off, 4096) else {
                continue;
            };
            file.read_exact_at(&mut a, off).unwrap();
            image.read_exact_at(&mut b, disk_off.0).unwrap();
            assert!(
                a == b,
                "{} at {off}: disk offset {disk_off} differs",
                path.display()
            );
            checked += 1;
        }
    }
    assert!(checked > 1000, "only {checked} blocks were placed");
    let enc = dbmigrate_core::protocol::guest::encode_layout(&layout, 1);
    assert_eq!(
        dbmigrate_core::protocol::guest::decode_layout(&enc).unwrap(),
        layout
    );
    conn.disconnect().await.unwrap();
}
