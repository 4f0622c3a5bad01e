//! Competing TCP traffic on the migration link (`compare-db --competing-streams`).

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use dbmigrate_testbed::DbBed;
use serde_json::{json, Value};

use crate::load::spawn_to;

/// Competing TCP traffic on the migration link: iperf3 streams from the
/// source host to the destination host.
pub(crate) struct Competing {
    server: Child,
    client: Child,
    out: std::path::PathBuf,
}

impl Competing {
    pub(crate) fn start(bed: &DbBed, streams: u32, secs: u64) -> Result<Self> {
        let tb = &bed.tb;
        let server = tb
            .in_ns(&tb.dst_ns, Path::new("iperf3"))
            .args(["-s", "-1", "-p", "5201"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting iperf3 (scripts/setup.sh installs it)")?;
        std::thread::sleep(Duration::from_millis(500));
        let out = tb.dir.join("iperf3.json");
        let mut c = tb.in_ns(&tb.src_ns, Path::new("iperf3"));
        c.args(["-c", &tb.dst_ip, "-p", "5201", "-J"])
            .arg(format!("--parallel={streams}"))
            .arg(format!("--time={secs}"));
        let client = spawn_to(c, &out).context("starting the iperf3 client")?;
        Ok(Self {
            server,
            client,
            out,
        })
    }

    /// Stops the flow (SIGINT: iperf3 still writes its summary); returns what it achieved.
    pub(crate) fn stop(mut self) -> Value {
        let _ = std::process::Command::new("kill")
            .args(["-INT", &self.client.id().to_string()])
            .status();
        let t = std::time::Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.client.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.client.kill();
        let _ = self.client.wait();
        let _ = self.server.kill();
        let _ = self.server.wait();
        let v: Value = std::fs::read_to_string(&self.out)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(Value::Null);
        let sent = &v["end"]["sum_sent"];
        json!({
            "tool": "iperf3",
            "streams": v["start"]["test_start"]["num_streams"],
            "seconds": sent["seconds"],
            "bytes": sent["bytes"],
            "mbit_per_s": sent["bits_per_second"].as_f64().map(|b| (b / 1e5).round() / 10.0),
        })
    }
}
