//! QEMU's own migration, as the comparisons drive it over QMP.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::{json, Value};

use crate::{Faults, Run};

/// QEMU's own migration TLS (`tls-creds-x509`), with the test bed's
/// certificates: the source's client set, the destination's server set
/// (it checks the source's certificate), and the name the destination's
/// certificate must carry.
pub(crate) struct QemuTls {
    /// The source host's TLS directory.
    pub src_dir: PathBuf,
    /// The destination host's TLS directory.
    pub dst_dir: PathBuf,
    /// The destination's name in its certificate.
    pub hostname: String,
}

impl QemuTls {
    /// The test bed's certificates.
    pub(crate) fn of(tb: &dbmigrate_testbed::Testbed) -> Self {
        Self {
            src_dir: tb.tls_dir("src"),
            dst_dir: tb.tls_dir("dst"),
            hostname: "destination.test".into(),
        }
    }

    fn apply(
        &self,
        sq: &mut dbmigrate_testbed::SyncQmp,
        dq: &mut dbmigrate_testbed::SyncQmp,
    ) -> Result<()> {
        let creds = |dir: &Path, endpoint: &str| {
            json!({"qom-type": "tls-creds-x509", "id": "bench-tls", "dir": dir,
                   "endpoint": endpoint, "verify-peer": true})
        };
        sq.cmd("object-add", creds(&self.src_dir, "client"))?;
        dq.cmd("object-add", creds(&self.dst_dir, "server"))?;
        sq.cmd(
            "migrate-set-parameters",
            json!({"tls-creds": "bench-tls", "tls-hostname": self.hostname}),
        )?;
        dq.cmd("migrate-set-parameters", json!({"tls-creds": "bench-tls"}))?;
        Ok(())
    }
}

/// QEMU's multifd: RAM on several connections, each compressing its pages.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Multifd {
    pub channels: u32,
    /// `none`, `zlib` or `zstd` (QEMU 7.2's `MultiFDCompression`; zstd
    /// when QEMU was built with it, as Debian's is).
    pub compression: &'static str,
}

/// How QEMU migrates: the method's settings beyond the link and downtime.
#[derive(Default)]
pub(crate) struct QemuWay {
    /// Post-copy, switched on after the first full pass.
    pub postcopy: bool,
    /// QEMU's own migration TLS.
    pub tls: Option<QemuTls>,
    pub multifd: Option<Multifd>,
}

impl QemuWay {
    /// The settings of QEMU method `method` (`tb` gives TLS its certificates).
    pub(crate) fn of(method: &str, tb: &dbmigrate_testbed::Testbed) -> Self {
        Self {
            postcopy: method == "qemu-postcopy",
            tls: (method == "qemu-precopy-tls").then(|| QemuTls::of(tb)),
            multifd: multifd_of(method),
        }
    }
}

/// QEMU's best pre-copy as 7.2 offers it: multifd, 2 channels, zstd (pure).
pub(crate) fn multifd_of(method: &str) -> Option<Multifd> {
    (method == "qemu-precopy-multifd").then_some(Multifd {
        channels: 2,
        compression: "zstd",
    })
}

/// QEMU's own migration from `sq` to `dq` (waiting with `-incoming defer`):
/// pre-copy, or post-copy switched on after the first full pass, as it is
/// normally used. QEMU 7.2 limits itself to 32 MiB/s by default: the limit is
/// lifted so that only the shaped link limits it, like dbmigrate. Multifd's
/// capability and parameters are set on both sides before the destination
/// listens (a `tcp:` URI: the channels are further connections to it).
/// Gives up (cancels) after `timeout` unless post-copy has started.
/// Returns the last `query-migrate` answer, with the destination resumed
/// if it completed.
pub(crate) fn qemu_migrate(
    sq: &mut dbmigrate_testbed::SyncQmp,
    dq: &mut dbmigrate_testbed::SyncQmp,
    uri: &str,
    way: &QemuWay,
    link_mbit: u32,
    downtime_ms: u64,
    timeout: Duration,
) -> Result<Value> {
    let postcopy = way.postcopy;
    if let Some(t) = &way.tls {
        t.apply(sq, dq)?;
    }
    if postcopy {
        let caps = json!([{"capability": "postcopy-ram", "state": true}]);
        sq.cmd("migrate-set-capabilities", json!({"capabilities": caps}))?;
        dq.cmd("migrate-set-capabilities", json!({"capabilities": caps}))?;
    }
    if let Some(m) = &way.multifd {
        let caps = json!([{"capability": "multifd", "state": true}]);
        let params = json!({"multifd-channels": m.channels, "multifd-compression": m.compression});
        for q in [&mut *sq, &mut *dq] {
            q.cmd("migrate-set-capabilities", json!({"capabilities": caps}))?;
            q.cmd("migrate-set-parameters", params.clone())?;
        }
    }
    // What each side will use, as QEMU says (a multifd run's report shows it).
    let applied = |q: &mut dbmigrate_testbed::SyncQmp| -> Result<Value> {
        let p = q.cmd("query-migrate-parameters", json!({}))?;
        Ok(json!({"channels": p["multifd-channels"], "compression": p["multifd-compression"]}))
    };
    let multifd_applied = match way.multifd {
        Some(_) => json!({"source": applied(sq)?, "destination": applied(dq)?}),
        None => Value::Null,
    };
    sq.cmd(
        "migrate-set-parameters",
        json!({"max-bandwidth": u64::from(link_mbit) * 1_000_000 / 8 * 4, "downtime-limit": downtime_ms}),
    )?;
    dq.cmd("migrate-incoming", json!({"uri": uri}))?;
    let t = Instant::now();
    sq.cmd("migrate", json!({"uri": uri}))?;
    let mut switched = false;
    // When QEMU left its live phase (stop-and-copy or post-copy), as seen by polling.
    let mut switch_ms = None;
    loop {
        let mut v = sq.cmd("query-migrate", json!({}))?;
        let st = v["status"].as_str().unwrap_or("");
        if switch_ms.is_none() && !matches!(st, "setup" | "active") {
            switch_ms = Some(dbmigrate_core::stats::millis(t.elapsed()));
        }
        v["bench_switch_ms"] = json!(switch_ms);
        v["bench_multifd"] = multifd_applied.clone();
        let st = v["status"].as_str().unwrap_or("").to_string();
        let st = st.as_str();
        if st == "completed" {
            // QEMU 7.2 has answered a completed migration with a total
            // time of 0: the bench's own clock (20 ms polls) stands in then.
            v["bench_total_ms"] = json!(dbmigrate_core::stats::millis(t.elapsed()));
            // The destination waits paused (-S) after pre-copy; post-copy
            // already runs it.
            if dq.status()? != "running" {
                dq.cmd("cont", json!({}))?;
            }
            return Ok(v);
        }
        if st == "failed" {
            return Ok(v);
        }
        if postcopy && !switched && v["ram"]["dirty-sync-count"].as_u64().unwrap_or(0) >= 2 {
            sq.cmd("migrate-start-postcopy", json!({}))?;
            switched = true;
        }
        if t.elapsed() > timeout && !(postcopy && switched) {
            let _ = sq.cmd("migrate_cancel", json!({}));
            return Ok(v);
        }
        // After the switch QEMU cannot cancel; a post-copy that does not
        // finish in another `timeout` is reported as not completed.
        if postcopy && switched && t.elapsed() > timeout * 2 {
            let status = format!("stuck in {st} after {} s", t.elapsed().as_secs());
            let mut v = v;
            v["status"] = json!(status);
            return Ok(v);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Replaces a completed run's downtime, as its method reported it, by the
/// one measured the same way for every method (source `STOP` to
/// destination `RESUME`, [`dbmigrate_testbed::downtime_ms`]); the
/// method's own figure stays in `detail.reported_downtime_ms`. QEMU's own
/// figure ends when the source has sent the last byte, before the
/// destination has loaded it; dbmigrate's when the destination said the
/// VM runs.
pub(crate) fn measured_downtime(
    run: &mut Run,
    src: &dbmigrate_testbed::EventWatch,
    dst: &dbmigrate_testbed::EventWatch,
) {
    if !run.completed {
        return;
    }
    let reported = run.downtime_ms;
    let measured = dbmigrate_testbed::downtime_ms(src, dst);
    if let Some(d) = run.detail.as_object_mut() {
        d.insert("reported_downtime_ms".into(), json!(reported));
        d.insert(
            "downtime_from".into(),
            json!(if measured.is_some() {
                "qmp-events"
            } else {
                "reported (no STOP/RESUME pair seen)"
            }),
        );
    }
    run.downtime_ms = measured.or(reported);
}

/// Fills `run` from QEMU's last `query-migrate` answer.
pub(crate) fn record_qemu_result(run: &mut Run, info: &Value) {
    run.completed = info["status"] == json!("completed");
    if run.completed {
        run.total_ms = info["total-time"]
            .as_u64()
            .filter(|&t| t > 0)
            .or_else(|| info["bench_total_ms"].as_u64());
        run.downtime_ms = info["downtime"].as_u64();
    }
    run.pages.raw = info["ram"]["normal"].as_u64().unwrap_or(0);
    run.pages.zero = info["ram"]["duplicate"].as_u64().unwrap_or(0);
    if run.method == "qemu-postcopy" {
        // QEMU counts the destination's page requests; it does not say how
        // long a vCPU waited for one.
        run.postcopy = Some(Faults {
            network_faults: info["ram"]["postcopy-requests"].as_u64(),
            ..Faults::default()
        });
    }
}
