//! Mutual TLS between the agents, with real certificates made by
//! `scripts/make-pki.sh` (openssl): strangers are refused while the
//! destination keeps waiting, and the real source then migrates byte-exact.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use dbmigrate_core::bitmap::PageBitmap;
use dbmigrate_core::dest::{self, Received};
use dbmigrate_core::dirty::{DirtyError, DirtyTracker, TrackerKind};
use dbmigrate_core::gate::Gate;
use dbmigrate_core::protocol::{self, Hello, Message};
use dbmigrate_core::ram::{DestRam, SourceRam};
use dbmigrate_core::source::{SourceConfig, SourceSession};
use dbmigrate_core::transport::{Acceptor, AllowList, Connector};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

const PAGES: u64 = 1024; // 4 MiB

/// A guest that writes nothing while it migrates.
struct Idle;

impl DirtyTracker for Idle {
    fn kind(&self) -> TrackerKind {
        TrackerKind::UffdWp
    }
    fn reset(&mut self) -> Result<(), DirtyError> {
        Ok(())
    }
    fn collect(&mut self, _dirty: &mut PageBitmap) -> Result<u64, DirtyError> {
        Ok(0)
    }
}

/// Certificates for one test: a CA with a destination, a source and a
/// rogue host, and a second CA with a host that claims the source's name.
struct Pki {
    root: PathBuf,
}

impl Pki {
    fn make(tag: &str) -> Self {
        let root = std::env::temp_dir().join(format!("dbmigrate-tls-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/make-pki.sh");
        let issue = |ca: &str, host: &str, names: &[&str]| {
            let st = Command::new("bash")
                .arg(&script)
                .arg(root.join(ca))
                .arg(root.join(host))
                .args(names)
                .status()
                .expect("running make-pki.sh");
            assert!(st.success(), "make-pki.sh failed for {host}");
        };
        issue("ca", "dst", &["destination.test", "127.0.0.1"]);
        issue("ca", "src", &["source.test"]);
        issue("ca", "rogue", &["rogue.test"]);
        issue("other-ca", "impostor", &["source.test"]);
        // The impostor trusts the real CA: only its own certificate is foreign.
        std::fs::copy(
            root.join("ca/ca-cert.pem"),
            root.join("impostor/ca-cert.pem"),
        )
        .unwrap();
        Self { root }
    }

    fn dir(&self, host: &str) -> PathBuf {
        self.root.join(host)
    }

    fn connector(&self, host: &str, server_name: &str) -> Connector {
        Connector::tls(&self.dir(host), server_name, AllowList::default()).unwrap()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn ram_file(tag: &str, fill: impl Fn(u64) -> u8) -> PathBuf {
    let p = PathBuf::from(format!(
        "/dev/shm/dbmigrate-tls-{}-{tag}",
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
    for page in 0..PAGES {
        f.write_all_at(&[fill(page); 4096], page * 4096).unwrap();
    }
    p
}

fn hello(conn_index: u16) -> Message {
    Message::Hello(Hello {
        version: protocol::PROTOCOL_VERSION,
        session: 99,
        ram_bytes: PAGES * 4096,
        page_size: 4096,
        data_connections: 1,
        conn_index,
        disks: Vec::new(),
        ram_files: vec![PAGES * 4096],
    })
}

/// A source that is not the real one tries to start a session; it must fail.
async fn rogue_session(addr: std::net::SocketAddr, connector: Connector, what: &str) -> String {
    let path = ram_file(&format!("rogue-{}", what.replace(' ', "-")), |_| 0xee);
    let cfg = SourceConfig {
        connections: 1,
        connector,
        ..SourceConfig::default()
    };
    let ram = SourceRam::open(&path, PAGES * 4096).unwrap();
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        SourceSession::connect(addr, ram, Box::new(Idle), cfg),
    )
    .await
    .unwrap_or_else(|_| panic!("{what}: the destination neither refused nor answered"));
    std::fs::remove_file(path).unwrap();
    match r {
        Ok(_) => panic!("{what}: the destination accepted a session"),
        Err(e) => {
            let mut chain = e.to_string();
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                chain = format!("{chain}: {c}");
                cause = c.source();
            }
            eprintln!("{what}: refused: {chain}");
            chain
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_are_refused_and_the_real_source_then_migrates_byte_exact() {
    let pki = Pki::make("strangers");
    let src_path = ram_file("src", |p| (p % 251) as u8 + 1);
    let dst_path = ram_file("dst", |_| 0x5a);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let allow = AllowList::parse(&["source.test".to_string()]).unwrap();
    let acceptor = Acceptor::tls(&pki.dir("dst"), allow).unwrap();
    let dst2 = dst_path.clone();
    let receiver = tokio::spawn(async move {
        let mut gate = Gate::open(listener, acceptor);
        let mut s = dest::accept(&mut gate, &[PAGES * 4096], false, Duration::from_secs(10))
            .await
            .unwrap();
        let ram = DestRam::open(&dst2, PAGES * 4096).unwrap();
        let matched = match s.receive(ram, None, None).await.unwrap() {
            Received::Complete { matched, .. } => matched,
            Received::Postcopy(_) => panic!("no post-copy was asked for"),
        };
        s.wait_commit().await.unwrap();
        s.activated().await.unwrap();
        matched
    });

    // Silent strangers hold more connections open than the listener sets
    // up at once, throughout: the oldest give way to newer ones.
    let mut silent = Vec::new();
    for _ in 0..(dbmigrate_core::gate::MAX_PENDING + 40) {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    // Garbage, and a plain-TCP dbmigrate Hello.
    let mut garbage = TcpStream::connect(addr).await.unwrap();
    garbage.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut plain = TcpStream::connect(addr).await.unwrap();
    plain.write_all(&hello(0).encode()).await.unwrap();
    // Sources with a certificate of another CA, or of this CA for a name
    // that is not allowed, or speaking plain TCP.
    let impostor = rogue_session(addr, pki.connector("impostor", "127.0.0.1"), "other CA").await;
    assert!(impostor.contains("UnknownCA"), "{impostor}");
    let rogue = rogue_session(addr, pki.connector("rogue", "127.0.0.1"), "not allowed").await;
    assert!(rogue.contains("closed"), "{rogue}");
    let plaintext = rogue_session(addr, Connector::InsecurePlaintext, "plain TCP").await;
    assert!(plaintext.contains("closed"), "{plaintext}");
    // Not one byte of the destination's RAM was touched by them.
    assert!(std::fs::read(&dst_path).unwrap().iter().all(|&b| b == 0x5a));

    let cfg = SourceConfig {
        connections: 2,
        connector: pki.connector("src", "127.0.0.1"),
        ..SourceConfig::default()
    };
    let ram = SourceRam::open(&src_path, PAGES * 4096).unwrap();
    let mut s = SourceSession::connect(addr, ram, Box::new(Idle), cfg)
        .await
        .unwrap();
    s.run_live(&mut |_, _| {}).await.unwrap();
    let frozen = s.final_round().await.unwrap();
    let v = s.verify(frozen).await.unwrap();
    s.send_commit(&v).await.unwrap();
    s.wait_activated().await.unwrap();
    assert!(receiver.await.unwrap(), "digests differ");
    assert!(
        std::fs::read(&src_path).unwrap() == std::fs::read(&dst_path).unwrap(),
        "destination RAM differs from the source"
    );
    std::fs::remove_file(src_path).unwrap();
    std::fs::remove_file(dst_path).unwrap();
}

#[tokio::test]
async fn the_source_refuses_a_destination_certificate_for_another_name() {
    let pki = Pki::make("name");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = Acceptor::tls(&pki.dir("dst"), AllowList::default()).unwrap();
    let _gate = Gate::open(listener, acceptor);
    let connector = pki.connector("src", "elsewhere.test");
    let err = rogue_session(addr, connector, "wrong name").await;
    assert!(err.contains("TLS handshake"), "{err}");
    // The allow-list on the source's side too: the destination's
    // certificate is valid for 127.0.0.1, but not for this name.
    let allow = AllowList::parse(&["backup.test".to_string()]).unwrap();
    let connector = Connector::tls(&pki.dir("src"), "127.0.0.1", allow).unwrap();
    let err = rogue_session(addr, connector, "not allowed destination").await;
    assert!(err.contains("none of the allowed names"), "{err}");
}

#[test]
fn missing_or_mismatched_files_name_the_file_and_the_fix() {
    let pki = Pki::make("files");
    let empty = pki.root.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let err = Acceptor::tls(&empty, AllowList::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("ca-cert.pem") && err.contains("--tls-dir"),
        "{err}"
    );
    let err = AllowList::parse(&["not a name!".to_string()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a DNS name"), "{err}");
    // A key that is not the certificate's.
    let mixed = pki.root.join("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    for f in ["ca-cert.pem", "server-cert.pem"] {
        std::fs::copy(pki.dir("dst").join(f), mixed.join(f)).unwrap();
    }
    std::fs::copy(
        pki.dir("rogue").join("server-key.pem"),
        mixed.join("server-key.pem"),
    )
    .unwrap();
    let err = Acceptor::tls(&mixed, AllowList::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("do not fit together"), "{err}");
}
