//! `bench transport`: what one agent connection carries per second over
//! loopback, plain TCP against mutual TLS 1.3 (the agents' transport, with
//! certificates made by `scripts/make-pki.sh`): page batches of the size
//! the source sends, written with the protocol's own frame writer and read
//! with its reader. Loopback has no link limit, so this is the ceiling of
//! one connection on this machine's CPU, to set beside a 1 Gbit/s link.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use dbmigrate_core::protocol::{self, BatchBuilder, PageEncoding};
use dbmigrate_core::transport::{Acceptor, AllowList, Connector};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};

/// Pages per batch: 64 raw pages, the source's 256 KiB batches.
const BATCH_PAGES: u64 = 64;

/// Runs `repeats` rounds of plain and TLS, `mib` MiB each, alternating.
pub fn run(mib: u64, repeats: u32, out: &Path) -> Result<()> {
    let pki = std::env::temp_dir().join(format!("dbmigrate-bench-pki-{}", std::process::id()));
    dbmigrate_testbed::make_pki(&pki)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = rt.block_on(measure(&pki, mib, repeats));
    let _ = std::fs::remove_dir_all(&pki);
    let runs = result?;
    let report = json!({
        "scenario": "transport-tls",
        "link_mbit": null,
        "storage_mbit": null,
        "what": format!("one agent connection over loopback: {mib} MiB of 256 KiB page batches, written with protocol::write_frame and read with protocol::read_message_with; plain TCP and mutual TLS 1.3 (rustls, aws-lc-rs) alternating"),
        "runs": runs,
    });
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(out, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", out.display()))?;
    for r in report["runs"].as_array().into_iter().flatten() {
        println!(
            "{:<10} repeat {}  {:>8.0} Mbit/s",
            r["method"].as_str().unwrap_or("?"),
            r["repeat"],
            r["rate_mbit"].as_f64().unwrap_or(0.0)
        );
    }
    eprintln!("report: {}", out.display());
    Ok(())
}

async fn measure(pki: &Path, mib: u64, repeats: u32) -> Result<Vec<Value>> {
    let tls = (
        Connector::tls(&pki.join("src"), "destination.test", AllowList::default())?,
        Acceptor::tls(
            &pki.join("dst"),
            AllowList::parse(&["source.test".to_string()])?,
        )?,
    );
    let plain = (Connector::InsecurePlaintext, Acceptor::InsecurePlaintext);
    let mut runs = Vec::new();
    for repeat in 0..repeats {
        for (method, (c, a)) in [("plain-tcp", &plain), ("tls", &tls)] {
            let (bytes, ms) = one(c, a, mib).await?;
            let rate = bytes as f64 * 8.0 / 1e6 / (ms / 1000.0);
            runs.push(json!({
                "method": method,
                "repeat": repeat,
                "completed": true,
                "total_ms": ms.round(),
                "link_bytes": bytes,
                "rate_mbit": rate.round(),
            }));
        }
    }
    Ok(runs)
}

/// One connection: `mib` MiB of raw-page batches; returns (bytes, ms).
async fn one(c: &Connector, a: &Acceptor, mib: u64) -> Result<(u64, f64)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let acceptor = a.clone();
    let reader = tokio::spawn(async move {
        let (tcp, peer) = listener.accept().await?;
        let mut conn = acceptor.secure(tcp, peer).await?;
        let mut buf = Vec::new();
        let mut got = 0u64;
        while let Ok((msg, n)) = protocol::read_message_with(&mut conn, "bench", &mut buf).await {
            got += n;
            if matches!(msg, protocol::Message::EndOfStream) {
                break;
            }
        }
        anyhow::Ok(got)
    });
    let tcp = TcpStream::connect(addr).await?;
    let mut conn = c.secure(tcp, addr).await?;
    let mut b = BatchBuilder::new(0);
    let page: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3).to_le_bytes()[0]).collect();
    for p in 0..BATCH_PAGES {
        b.push(p, PageEncoding::Raw, &page);
    }
    let frame = b.finish();
    let batches = (mib << 20) / (BATCH_PAGES * 4096);
    let t = Instant::now();
    for _ in 0..batches {
        protocol::write_frame(&mut conn, &frame, "bench").await?;
    }
    protocol::write_message(&mut conn, &protocol::Message::EndOfStream, "bench").await?;
    let got = reader.await??;
    Ok((got, t.elapsed().as_secs_f64() * 1000.0))
}

/// Default report path.
pub fn default_out() -> PathBuf {
    dbmigrate_testbed::repo_root().join("bench/results/micro/transport-tls.json")
}
