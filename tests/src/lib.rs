//! Test bed shared by the integration tests and the benchmarks: two hosts as
//! network namespaces joined by a `tc`-shaped veth pair, the dirtier guest,
//! QEMU processes inside the namespaces, and a small synchronous QMP client.
//!
//! Everything is created by the test itself and removed on drop.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

pub mod libvirt;
mod loopdev;
pub use loopdev::{LoopDevice, StallableDisk};

/// Repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the repository")
        .to_path_buf()
}

/// Makes the test hosts' certificates under `dir` with the project's
/// `scripts/make-pki.sh` (openssl): see [`Testbed::tls_dir`].
pub fn make_pki(dir: &Path) -> Result<()> {
    let script = repo_root().join("scripts/make-pki.sh");
    let issue = |ca: &str, host: &str, name: &str| -> Result<()> {
        let out = Command::new("bash")
            .arg(&script)
            .arg(dir.join(ca))
            .arg(dir.join(host))
            .arg(name)
            .output()
            .context("running scripts/make-pki.sh")?;
        if !out.status.success() {
            bail!(
                "make-pki.sh failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    };
    issue("ca", "src", "source.test")?;
    issue("ca", "dst", "destination.test")?;
    issue("ca", "rogue", "rogue.test")?;
    issue("other-ca", "impostor", "source.test")?;
    std::fs::copy(dir.join("ca/ca-cert.pem"), dir.join("impostor/ca-cert.pem"))?;
    Ok(())
}

/// Directory with the `dbmigrate` built with the `failpoints` feature, for
/// the fault tests: `target/failpoints/release` (scripts/test.sh builds
/// it), or `DBMIGRATE_FAILPOINT_BIN_DIR`. Release builds have no failpoints.
pub fn failpoint_bin_dir() -> Result<PathBuf> {
    let dir = match std::env::var("DBMIGRATE_FAILPOINT_BIN_DIR") {
        Ok(d) => PathBuf::from(d),
        Err(_) => repo_root().join("target/failpoints/release"),
    };
    if !dir.join("dbmigrate").exists() {
        bail!(
            "{} has no dbmigrate built with failpoints: run `CARGO_PROFILE_RELEASE_DEBUG_ASSERTIONS=true cargo build --release -p host-agent --features failpoints --target-dir target/failpoints` (the README's test command does)",
            dir.display()
        );
    }
    Ok(dir)
}

/// Directory with the built `dbmigrate` binary and preload library: the
/// profile directory of the running test or bench executable, or
/// `DBMIGRATE_BIN_DIR`.
pub fn bin_dir() -> Result<PathBuf> {
    if let Ok(d) = std::env::var("DBMIGRATE_BIN_DIR") {
        return Ok(PathBuf::from(d));
    }
    let exe = std::env::current_exe()?;
    let find = || {
        exe.ancestors()
            .skip(1)
            .find(|dir| {
                dir.join("dbmigrate").exists() && dir.join("libdbmigrate_preload.so").exists()
            })
            .map(Path::to_path_buf)
    };
    if let Some(dir) = find() {
        return Ok(dir);
    }
    // A fresh clone that built only the bench: build the agents it drives.
    eprintln!("building the agents (cargo build --release -p host-agent -p guest-agent -p dbmigrate-preload)");
    let built = Command::new("cargo")
        .args([
            "build",
            "--release",
            "-p",
            "host-agent",
            "-p",
            "guest-agent",
            "-p",
            "dbmigrate-preload",
        ])
        .current_dir(repo_root())
        .status()
        .context("running cargo")?;
    match find() {
        Some(dir) if built.success() => Ok(dir),
        _ => bail!(
            "dbmigrate and libdbmigrate_preload.so not found above {}: run `cargo build --release --workspace` first (the README's test command does)",
            exe.display()
        ),
    }
}

/// Fails unless running as root (namespaces, tc and QEMU's RAM tracking need it).
pub fn require_root() -> Result<()> {
    // SAFETY-free: geteuid via libc is safe to call but libc marks it unsafe.
    if std::fs::read_to_string("/proc/self/status")?
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        != Some("0")
    {
        bail!("this test needs root (network namespaces, tc, /proc/PID/pagemap of QEMU): run it as root");
    }
    Ok(())
}

/// Runs a command, failing with its stderr.
pub fn sh(cmd: &[&str]) -> Result<Output> {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .with_context(|| format!("running {cmd:?} (is it installed?)"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Guest kernel and initramfs of the dirtier guest.
#[derive(Clone, Debug)]
pub struct GuestImage {
    /// Kernel.
    pub kernel: PathBuf,
    /// Initramfs with busybox and the dirtier.
    pub initrd: PathBuf,
}

/// Starts `c` with its stdout and stderr in the file `log` and no stdin.
pub fn spawn_logged(mut c: Command, log: &Path) -> Result<Child> {
    let f = std::fs::File::create(log)?;
    c.stdout(f.try_clone()?).stderr(f).stdin(Stdio::null());
    c.spawn()
        .with_context(|| format!("starting {:?}", c.get_program()))
}

/// The guest agent's Debian package of this build
/// (`dbmigrate-guest-agent_*.deb` beside the binaries, which
/// `scripts/package.sh target/release` makes); the MariaDB guest installs
/// it with dpkg at boot.
pub fn guest_agent_package() -> Result<PathBuf> {
    let dir = bin_dir()?;
    let find = || -> Result<Option<PathBuf>> {
        Ok(std::fs::read_dir(&dir)?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("dbmigrate-guest-agent_") && n.ends_with(".deb"))
            })
            .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok()))
    };
    let mut found = find()?;
    if found.is_none() && std::env::var_os("DBMIGRATE_BIN_DIR").is_none() {
        // The repository's own build: make the package from it.
        let script = repo_root().join("scripts/package.sh");
        let made = Command::new("bash")
            .arg(&script)
            .arg(&dir)
            .stdout(Stdio::null())
            .status()?;
        if made.success() {
            found = find()?;
        }
    }
    found.with_context(|| {
        format!(
            "no dbmigrate-guest-agent_*.deb in {}: run scripts/package.sh {}",
            dir.display(),
            dir.display()
        )
    })
}

/// Runs a guest build script of the repository; the last line of its
/// output is where the artifacts are.
fn guest_script(script: &str, args: &[&str]) -> Result<PathBuf> {
    let script = repo_root().join(script);
    let out = Command::new("bash")
        .arg(&script)
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!("{} failed", script.display());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(PathBuf::from(text.lines().last().unwrap_or("").trim()))
}

/// Builds (or finds in the cache) the dirtier guest.
pub fn dirtier_guest() -> Result<GuestImage> {
    let dir = guest_script("guest/build-dirtier-guest.sh", &[])?;
    let img = GuestImage {
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initramfs.cpio.gz"),
    };
    if !img.kernel.exists() || !img.initrd.exists() {
        bail!(
            "guest build did not produce {} and {}",
            img.kernel.display(),
            img.initrd.display()
        );
    }
    Ok(img)
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Two hosts (`src`, `dst`) as network namespaces with a shaped veth link.
pub struct Testbed {
    /// Short unique tag.
    pub tag: String,
    /// Source namespace.
    pub src_ns: String,
    /// Destination namespace.
    pub dst_ns: String,
    /// Source address on the migration link.
    pub src_ip: String,
    /// Destination address on the migration link.
    pub dst_ip: String,
    /// Source veth interface name.
    pub src_if: String,
    /// Destination veth interface name.
    pub dst_if: String,
    /// Scratch directory for sockets, logs and reports.
    pub dir: PathBuf,
    /// Where the `dbmigrate` the agents run comes from: [`bin_dir`], or
    /// [`failpoint_bin_dir`] after [`Testbed::use_failpoint_agents`].
    pub agent_dir: PathBuf,
    /// The agents talk plain TCP (`--insecure-plaintext`) instead of mutual
    /// TLS: for measuring what TLS costs.
    pub plaintext_agents: bool,
    /// Where the VMs' RAM files go: `/dev/shm`, or a hugetlbfs of this
    /// bed's own after [`Testbed::use_hugepages`].
    pub ram_dir: PathBuf,
    /// The 2 MiB pages this bed reserved (given back when it is dropped).
    hugepages: u64,
}

impl Testbed {
    /// Creates the namespaces and the link, shaped to `link_mbit` with tbf.
    pub fn new(link_mbit: u32) -> Result<Self> {
        require_root()?;
        let n = (std::process::id() % 200) + NEXT.fetch_add(1, Ordering::SeqCst) * 7 % 50;
        let n = n % 250;
        let tag = format!("dbm{n}");
        let tb = Self {
            src_ns: format!("{tag}s"),
            dst_ns: format!("{tag}d"),
            src_ip: format!("10.77.{n}.1"),
            dst_ip: format!("10.77.{n}.2"),
            src_if: format!("{tag}a"),
            dst_if: format!("{tag}b"),
            dir: std::env::temp_dir().join(format!("dbmigrate-{tag}-{}", std::process::id())),
            agent_dir: bin_dir()?,
            plaintext_agents: false,
            ram_dir: PathBuf::from("/dev/shm"),
            hugepages: 0,
            tag,
        };
        tb.teardown_quiet();
        std::fs::create_dir_all(&tb.dir)?;
        // Private: it holds QMP and post-copy sockets (the preload library
        // offers the guest's memory only from a directory of mode 0700).
        std::fs::set_permissions(
            &tb.dir,
            <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o700),
        )?;
        make_pki(&tb.dir.join("pki"))?;
        sh(&["ip", "netns", "add", &tb.src_ns])?;
        sh(&["ip", "netns", "add", &tb.dst_ns])?;
        sh(&[
            "ip", "link", "add", &tb.src_if, "type", "veth", "peer", "name", &tb.dst_if,
        ])?;
        sh(&["ip", "link", "set", &tb.src_if, "netns", &tb.src_ns])?;
        sh(&["ip", "link", "set", &tb.dst_if, "netns", &tb.dst_ns])?;
        for (ns, dev, ip) in [
            (&tb.src_ns, &tb.src_if, &tb.src_ip),
            (&tb.dst_ns, &tb.dst_if, &tb.dst_ip),
        ] {
            let cidr = format!("{ip}/24");
            sh(&["ip", "-n", ns, "addr", "add", &cidr, "dev", dev])?;
            sh(&["ip", "-n", ns, "link", "set", dev, "up"])?;
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
            let rate = format!("{link_mbit}mbit");
            sh(&[
                "ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate",
                &rate, "burst", "256kb", "latency", "50ms",
            ])?;
        }
        Ok(tb)
    }

    /// Bytes sent plus received on the source end of the link.
    pub fn link_bytes(&self) -> Result<u64> {
        Ok(net_counter(&self.src_ns, &self.src_if, "tx_bytes")?
            + net_counter(&self.src_ns, &self.src_if, "rx_bytes")?)
    }

    /// A command that runs inside namespace `ns`.
    pub fn in_ns(&self, ns: &str, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(program);
        c
    }

    /// Reserves `pages` more 2 MiB pages on this host and puts the VMs'
    /// RAM files on a hugetlbfs mounted for this bed, as an operator
    /// backs large guests; both are undone when the bed is dropped.
    pub fn use_hugepages(&mut self, pages: u64) -> Result<()> {
        let knob = "/proc/sys/vm/nr_hugepages";
        let now: u64 = std::fs::read_to_string(knob)?.trim().parse()?;
        std::fs::write(knob, (now + pages).to_string())?;
        self.hugepages = pages;
        let got: u64 = std::fs::read_to_string(knob)?.trim().parse()?;
        if got < now + pages {
            bail!(
                "reserved only {} of {pages} 2 MiB pages (host memory too fragmented or short)",
                got.saturating_sub(now)
            );
        }
        let dir = self.dir.join("hugepages");
        std::fs::create_dir_all(&dir)?;
        sh(&[
            "mount",
            "-t",
            "hugetlbfs",
            "-o",
            "pagesize=2M,mode=0700",
            "none",
            &dir.to_string_lossy(),
        ])?;
        self.ram_dir = dir;
        Ok(())
    }

    /// Runs the agents built with fault injection (`DBMIGRATE_FAILPOINT`).
    pub fn use_failpoint_agents(&mut self) -> Result<()> {
        self.agent_dir = failpoint_bin_dir()?;
        Ok(())
    }

    /// The TLS directory of a test host: `src`, `dst` (signed by the test
    /// CA, for `source.test` and `destination.test`), `rogue` (the same CA,
    /// `rogue.test`) or `impostor` (another CA, `source.test`).
    pub fn tls_dir(&self, host: &str) -> PathBuf {
        self.dir.join("pki").join(host)
    }

    /// `dbmigrate receive` for `dst`, in the destination namespace, on port
    /// 7000, over mutual TLS, admitting only `source.test`.
    pub fn receive_cmd(&self, dst: &Vm) -> Result<Command> {
        self.receive_cmd_on(dst, 7000)
    }

    /// [`Testbed::receive_cmd`] on port `port`, so that several
    /// migrations can run side by side.
    pub fn receive_cmd_on(&self, dst: &Vm, port: u16) -> Result<Command> {
        let mut c = self.receive_base(port);
        c.arg("--qmp").arg(&dst.qmp);
        Ok(c)
    }

    /// `dbmigrate receive` of the libvirt domain in `xml` on the
    /// destination's libvirtd at `uri`, which the agent starts.
    pub fn receive_cmd_libvirt(&self, uri: &str, xml: &Path) -> Command {
        let mut c = self.receive_base(7000);
        c.args(["--libvirt", uri]).arg("--domain-xml").arg(xml);
        c
    }

    fn receive_base(&self, port: u16) -> Command {
        let mut c = self.in_ns(&self.dst_ns, &self.agent_dir.join("dbmigrate"));
        c.arg("receive")
            .args(["--listen", &format!("{}:{port}", self.dst_ip)])
            .arg("--run-dir")
            .arg(self.dir.join(format!("run-dst-{port}")));
        if self.plaintext_agents {
            c.arg("--insecure-plaintext");
        } else {
            c.arg("--tls-dir")
                .arg(self.tls_dir("dst"))
                .args(["--tls-allow", "source.test"]);
        }
        c
    }

    /// `dbmigrate migrate` of `src` to the destination agent, writing its report to `report`.
    pub fn migrate_cmd(&self, src: &Vm, report: &Path) -> Result<Command> {
        self.migrate_cmd_to(src, report, 7000)
    }

    /// [`Testbed::migrate_cmd`] to the destination agent on `port`.
    pub fn migrate_cmd_to(&self, src: &Vm, report: &Path, port: u16) -> Result<Command> {
        let mut c = self.migrate_base(report, port);
        c.arg("--qmp").arg(&src.qmp);
        Ok(c)
    }

    /// `dbmigrate migrate` of libvirt domain `name` on the source's
    /// libvirtd at `uri`.
    pub fn migrate_cmd_libvirt(&self, uri: &str, name: &str, report: &Path) -> Command {
        let mut c = self.migrate_base(report, 7000);
        c.args(["--libvirt", uri, "--domain", name]);
        c
    }

    fn migrate_base(&self, report: &Path, port: u16) -> Command {
        let mut c = self.in_ns(&self.src_ns, &self.agent_dir.join("dbmigrate"));
        c.arg("migrate")
            .args(["--to", &format!("{}:{port}", self.dst_ip)])
            .arg("--report")
            .arg(report)
            .arg("--run-dir")
            .arg(self.dir.join(format!("run-src-{port}")));
        if self.plaintext_agents {
            c.arg("--insecure-plaintext");
        } else {
            c.arg("--tls-dir")
                .arg(self.tls_dir("src"))
                .args(["--tls-hostname", "destination.test"]);
        }
        c
    }

    fn teardown_quiet(&self) {
        let extra = [format!("{}t", self.tag), format!("{}c", self.tag)];
        for ns in [&self.src_ns, &self.dst_ns, &extra[0], &extra[1]] {
            // Processes left in the namespace would keep it alive.
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        self.teardown_quiet();
        if self.hugepages > 0 {
            // The namespaces' QEMUs are gone: their huge pages are free.
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.join("hugepages"))
                .status();
            let knob = "/proc/sys/vm/nr_hugepages";
            if let Some(now) = std::fs::read_to_string(knob)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
            {
                let _ = std::fs::write(knob, now.saturating_sub(self.hugepages).to_string());
            }
        }
        // Logs of a failed or profiled run: DBMIGRATE_KEEP_DIR=1 keeps them.
        if std::env::var_os("DBMIGRATE_KEEP_DIR").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The `-cpu` of a guest of `ram_mib`: TCG's default 40 physical
/// address bits reach 1 TiB, which RAM near 1 TiB passes once the PCI
/// holes are placed; such a guest gets 42. Pure.
pub fn cpu_model(ram_mib: u64) -> &'static str {
    if ram_mib > 512 << 10 {
        "max,phys-bits=42"
    } else {
        "max"
    }
}

/// Options of a dirtier VM.
#[derive(Clone, Debug)]
pub struct VmOptions {
    /// RAM size in MiB.
    pub ram_mib: u64,
    /// Working set the guest keeps rewriting, MiB.
    pub ws_mib: u64,
    /// Percent of free RAM the guest fills.
    pub fill_pct: u64,
    /// Load the dbmigrate preload library (needed on a dbmigrate source).
    pub preload: bool,
    /// Start as a migration target (`-S -incoming defer`).
    pub incoming: bool,
    /// RAM backend mapped shared (dbmigrate needs it; false to test the refusal).
    pub share: bool,
    /// Extra QEMU arguments.
    pub extra: Vec<String>,
    /// Kernel command line instead of the dirtier's.
    pub append: Option<String>,
    /// The guest kernel uses only this much of its RAM (`mem=`): the
    /// rest of the RAM file stays a hole, a large guest that costs this
    /// host only what it touches.
    pub mem_limit_mib: Option<u64>,
    /// Virtual CPUs.
    pub smp: u32,
    /// Post-copy destination: the preload library offers the RAM's
    /// userfaultfd on this socket (implies the library).
    pub postcopy_socket: Option<PathBuf>,
    /// A destination that QEMU's own migration fills, set up as an operator
    /// would for it: QEMU allocates and touches all of the RAM at start
    /// (`prealloc=on`) so that incoming pages land in memory that is
    /// already there (dbmigrate's receive does the same), and the VM runs
    /// as soon as QEMU has loaded it (no `-S`; dbmigrate's receive resumes
    /// the VM itself).
    pub qemu_fills: bool,
    /// An incoming VM started without `-S`, as an operator might: QEMU
    /// would run the guest as soon as device state has loaded.
    pub autostart: bool,
    /// NUMA nodes: more than one gives each node a memory backend of its
    /// own (`ram-node<i>`, file `<ram>-node<i>`, an equal share of the RAM)
    /// and no machine `memory-backend`, as libvirt does for a domain with
    /// NUMA cells.
    pub numa_nodes: u32,
}

impl Default for VmOptions {
    fn default() -> Self {
        Self {
            ram_mib: 512,
            ws_mib: 16,
            fill_pct: 80,
            preload: true,
            incoming: false,
            share: true,
            extra: Vec::new(),
            append: None,
            mem_limit_mib: None,
            smp: 1,
            postcopy_socket: None,
            qemu_fills: false,
            autostart: false,
            numa_nodes: 1,
        }
    }
}

/// A QEMU process inside a namespace.
pub struct Vm {
    /// Name used for files.
    pub name: String,
    /// QMP socket.
    pub qmp: PathBuf,
    /// A second QMP socket, for watching events ([`Vm::watch_events`]).
    pub events: PathBuf,
    /// Serial console log.
    pub serial: PathBuf,
    /// RAM backend file (the first node's with [`VmOptions::numa_nodes`]).
    pub ram: PathBuf,
    /// Every RAM backend file, removed on drop.
    ram_files: Vec<PathBuf>,
    process: VmProcess,
}

/// Who started a VM's QEMU.
enum VmProcess {
    /// The test, as its child.
    Child(Child),
    /// A libvirtd (its process id).
    Libvirt(u32),
}

/// A VM's QMP events with QEMU's own timestamps (seconds since the epoch),
/// collected by a thread from the VM's second QMP socket until QEMU exits.
pub struct EventWatch {
    events: std::sync::Arc<std::sync::Mutex<Vec<(String, f64)>>>,
}

impl EventWatch {
    /// When the first event named `name` came.
    pub fn first(&self, name: &str) -> Option<f64> {
        let ev = self.events.lock().ok()?;
        ev.iter().find(|(n, _)| n == name).map(|(_, t)| *t)
    }

    /// When the last event named `name` at or before `t` came.
    pub fn last_before(&self, name: &str, t: f64) -> Option<f64> {
        let ev = self.events.lock().ok()?;
        ev.iter()
            .rev()
            .find(|(n, at)| n == name && *at <= t)
            .map(|(_, at)| *at)
    }
}

/// The guest's pause as the two QEMUs saw it: from the source's last `STOP`
/// to the destination's first `RESUME` (both QEMUs stamp events with the
/// same host clock). The same measure for every method, whoever resumes.
pub fn downtime_ms(src: &EventWatch, dst: &EventWatch) -> Option<u64> {
    let resumed = dst.first("RESUME")?;
    let stopped = src.last_before("STOP", resumed)?;
    let ms = ((resumed - stopped) * 1000.0).round();
    // Whole milliseconds of a pause between two timestamps of one clock.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    (ms >= 0.0).then_some(ms as u64)
}

impl Vm {
    /// Starts collecting this VM's QMP events (see [`EventWatch`]).
    pub fn watch_events(&self) -> Result<EventWatch> {
        let s = UnixStream::connect(&self.events)
            .with_context(|| format!("connecting to {}", self.events.display()))?;
        let mut rx = BufReader::new(s.try_clone()?);
        let mut tx = s;
        let mut greeting = String::new();
        rx.read_line(&mut greeting)?;
        writeln!(tx, "{}", json!({"execute": "qmp_capabilities"}))?;
        let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = events.clone();
        std::thread::spawn(move || {
            let _keep = tx;
            let mut line = String::new();
            while rx.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if let Some(name) = v["event"].as_str() {
                        let ts = &v["timestamp"];
                        #[allow(clippy::cast_precision_loss)]
                        let t = ts["seconds"].as_u64().unwrap_or(0) as f64
                            + ts["microseconds"].as_u64().unwrap_or(0) as f64 / 1e6;
                        if let Ok(mut e) = sink.lock() {
                            e.push((name.to_string(), t));
                        }
                    }
                }
                line.clear();
            }
        });
        Ok(EventWatch { events })
    }

    /// Starts the dirtier guest (or an incoming shell for it) in `ns`.
    pub fn start(
        tb: &Testbed,
        ns: &str,
        name: &str,
        img: &GuestImage,
        o: &VmOptions,
    ) -> Result<Self> {
        let qmp = tb.dir.join(format!("{name}.qmp"));
        let events = tb.dir.join(format!("{name}.events.qmp"));
        let serial = tb.dir.join(format!("{name}.serial"));
        let base = tb.ram_dir.join(format!("{}-{name}", tb.tag));
        let nodes = o.numa_nodes.max(1);
        let ram_files: Vec<PathBuf> = if nodes == 1 {
            vec![base.clone()]
        } else {
            (0..nodes)
                .map(|i| PathBuf::from(format!("{}-node{i}", base.display())))
                .collect()
        };
        let ram = ram_files[0].clone();
        // A previous VM of the same name may have left these behind.
        for stale in ram_files.iter().chain([&qmp, &events, &serial]) {
            let _ = std::fs::remove_file(stale);
        }
        let mut c = tb.in_ns(ns, Path::new("qemu-system-x86_64"));
        c.args(["-name", name, "-accel", "tcg,thread=single"])
            .args(["-cpu", cpu_model(o.ram_mib)])
            .args(["-smp", &o.smp.to_string()])
            .args(["-m", &format!("{}M", o.ram_mib)]);
        let backend = |id: &str, mib: u64, path: &Path| {
            format!(
                "memory-backend-file,id={id},size={mib}M,mem-path={},share={}{}",
                path.display(),
                if o.share { "on" } else { "off" },
                if o.qemu_fills { ",prealloc=on" } else { "" }
            )
        };
        if nodes == 1 {
            c.args(["-object", &backend("ram0", o.ram_mib, &ram)])
                .args(["-machine", "pc,memory-backend=ram0"]);
        } else {
            for (i, f) in ram_files.iter().enumerate() {
                c.args([
                    "-object",
                    &backend(&format!("ram-node{i}"), o.ram_mib / u64::from(nodes), f),
                ])
                .args(["-numa", &format!("node,nodeid={i},memdev=ram-node{i}")]);
            }
            c.args(["-machine", "pc"]);
        }
        c.args(["-nodefaults", "-display", "none"])
            .args(["-serial", &format!("file:{}", serial.display())])
            .args([
                "-qmp",
                &format!("unix:{},server=on,wait=off", qmp.display()),
            ])
            .args([
                "-qmp",
                &format!("unix:{},server=on,wait=off", events.display()),
            ])
            .arg("-kernel")
            .arg(&img.kernel)
            .arg("-initrd")
            .arg(&img.initrd)
            .args([
                "-append",
                &(o.append.clone().unwrap_or_else(|| {
                    format!(
                        "console=ttyS0 quiet dirtier.ws_mib={} dirtier.fill_pct={}",
                        o.ws_mib, o.fill_pct
                    )
                }) + &o
                    .mem_limit_mib
                    .map(|m| format!(" mem={m}M"))
                    .unwrap_or_default()),
            ])
            .args(&o.extra);
        if o.incoming {
            if !o.qemu_fills && !o.autostart {
                c.arg("-S");
            }
            c.args(["-incoming", "defer"]);
        }
        if o.preload || o.postcopy_socket.is_some() {
            let dir = bin_dir()?;
            // One pattern for every node's file.
            let track = if nodes == 1 {
                ram.clone()
            } else {
                PathBuf::from(format!("{}-node*", base.display()))
            };
            c.env("LD_PRELOAD", dir.join("libdbmigrate_preload.so"))
                .env("DBMIGRATE_TRACK_PATH", track);
        }
        if let Some(sock) = &o.postcopy_socket {
            c.env("DBMIGRATE_POSTCOPY_SOCKET", sock);
        }
        let log = std::fs::File::create(tb.dir.join(format!("{name}.qemu.log")))?;
        c.stdout(Stdio::null()).stderr(log.try_clone()?);
        let child = c
            .spawn()
            .context("starting qemu-system-x86_64 (is qemu-system-x86 installed?)")?;
        let vm = Self {
            name: name.into(),
            qmp,
            events,
            serial,
            ram,
            ram_files,
            process: VmProcess::Child(child),
        };
        let t = Instant::now();
        while !vm.qmp.exists() {
            if t.elapsed() > Duration::from_secs(20) {
                bail!(
                    "QEMU {name} did not open its QMP socket: {}",
                    vm.qemu_log(tb)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(vm)
    }

    /// QEMU's own stderr.
    pub fn qemu_log(&self, tb: &Testbed) -> String {
        std::fs::read_to_string(tb.dir.join(format!("{}.qemu.log", self.name))).unwrap_or_default()
    }

    /// QEMU's process id (`ip netns exec` runs QEMU in its own process).
    pub fn pid(&self) -> u32 {
        match &self.process {
            VmProcess::Child(c) => c.id(),
            VmProcess::Libvirt(pid) => *pid,
        }
    }

    /// Serial console text so far.
    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// Waits until the console has a line containing `needle`.
    pub fn wait_console(&self, needle: &str, limit: Duration) -> Result<()> {
        let t = Instant::now();
        while t.elapsed() < limit {
            if self.console().contains(needle) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!(
            "{}: no `{needle}` on the console after {:?}; console tail:\n{}",
            self.name,
            limit,
            tail(&self.console(), 15)
        )
    }

    /// Heartbeats printed so far.
    pub fn heartbeats(&self) -> Vec<Heartbeat> {
        self.console()
            .lines()
            .filter_map(Heartbeat::parse)
            .collect()
    }

    /// Waits for a heartbeat matching `pred`.
    pub fn wait_heartbeat(
        &self,
        limit: Duration,
        pred: impl Fn(&Heartbeat) -> bool,
    ) -> Result<Heartbeat> {
        let t = Instant::now();
        while t.elapsed() < limit {
            if let Some(h) = self.heartbeats().into_iter().rev().find(|h| pred(h)) {
                return Ok(h);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!(
            "{}: no matching heartbeat after {:?}; console tail:\n{}",
            self.name,
            limit,
            tail(&self.console(), 15)
        )
    }

    /// Whether the QEMU process has exited.
    pub fn exited(&mut self) -> bool {
        match &mut self.process {
            VmProcess::Child(c) => matches!(c.try_wait(), Ok(Some(_))),
            // libvirtd reaps its QEMU; a zombie counts as gone.
            VmProcess::Libvirt(pid) => std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| {
                    s.rsplit(')')
                        .next()
                        .unwrap_or("")
                        .trim_start()
                        .starts_with('Z')
                })
                .unwrap_or(true),
        }
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> bool {
        let t = Instant::now();
        while t.elapsed() < limit {
            if self.exited() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// A QMP connection.
    pub fn qmp(&self) -> Result<SyncQmp> {
        SyncQmp::connect(&self.qmp)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        match &mut self.process {
            VmProcess::Child(c) => {
                let _ = c.kill();
                let _ = c.wait();
            }
            // Its libvirtd stops it (see `libvirt::LibvirtHost`'s drop).
            VmProcess::Libvirt(_) => {}
        }
        for f in &self.ram_files {
            let _ = std::fs::remove_file(f);
        }
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<_> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// One `DIRTIER HB` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    /// Sequence number.
    pub seq: u64,
    /// Guest uptime.
    pub uptime_ms: u64,
    /// Completed verification passes over all memory.
    pub passes: u64,
    /// Pages that failed verification so far.
    pub errors: u64,
    /// Page rewrites so far.
    pub rewrites: u64,
}

impl Heartbeat {
    /// Parses `DIRTIER HB seq=1 uptime_ms=2 passes=3 errors=0 rewrites=5`.
    pub fn parse(line: &str) -> Option<Self> {
        let rest = line.trim().strip_prefix("DIRTIER HB ")?;
        let kv: HashMap<&str, u64> = rest
            .split_whitespace()
            .filter_map(|w| w.split_once('='))
            .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
            .collect();
        Some(Self {
            seq: *kv.get("seq")?,
            uptime_ms: *kv.get("uptime_ms")?,
            passes: *kv.get("passes")?,
            errors: *kv.get("errors")?,
            rewrites: *kv.get("rewrites")?,
        })
    }
}

/// Minimal blocking QMP client for tests and benchmarks.
pub struct SyncQmp {
    rx: BufReader<UnixStream>,
    tx: UnixStream,
}

impl SyncQmp {
    /// Connects and negotiates capabilities.
    pub fn connect(path: &Path) -> Result<Self> {
        let s = UnixStream::connect(path)
            .with_context(|| format!("connecting to {}", path.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut q = Self {
            rx: BufReader::new(s.try_clone()?),
            tx: s,
        };
        q.read()?;
        q.cmd("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read(&mut self) -> Result<Value> {
        loop {
            let mut line = String::new();
            if self.rx.read_line(&mut line)? == 0 {
                bail!("QMP closed");
            }
            let v: Value = serde_json::from_str(&line)?;
            if v.get("event").is_none() {
                return Ok(v);
            }
        }
    }

    /// Runs a command; error if QEMU returns one.
    pub fn cmd(&mut self, execute: &str, arguments: Value) -> Result<Value> {
        writeln!(
            self.tx,
            "{}",
            json!({"execute": execute, "arguments": arguments})
        )?;
        let v = self.read()?;
        if let Some(e) = v.get("error") {
            return Err(anyhow!("QMP {execute}: {e}"));
        }
        Ok(v["return"].clone())
    }

    /// `query-status` status string.
    pub fn status(&mut self) -> Result<String> {
        Ok(self.cmd("query-status", json!({}))?["status"]
            .as_str()
            .unwrap_or("?")
            .to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_near_1_tib_gets_more_physical_address_bits() {
        assert_eq!(cpu_model(2048), "max");
        assert_eq!(cpu_model(512 << 10), "max");
        assert_eq!(cpu_model(1 << 20), "max,phys-bits=42");
    }

    #[test]
    fn heartbeat_lines() {
        let h = Heartbeat::parse("DIRTIER HB seq=12 uptime_ms=3400 passes=2 errors=0 rewrites=99")
            .unwrap();
        assert_eq!(h.seq, 12);
        assert_eq!(h.passes, 2);
        assert!(Heartbeat::parse("DIRTIER READY pages=3").is_none());
        assert!(Heartbeat::parse("DIRTIER HB seq=x").is_none());
    }
}

/// The MariaDB guest: kernel, base initramfs, and the disk image with the data set.
#[derive(Clone, Debug)]
pub struct MariadbGuest {
    /// Kernel.
    pub kernel: PathBuf,
    /// Initramfs (without the guest agent).
    pub initrd: PathBuf,
    /// Prepared disk image (copied per run; never used directly).
    pub image: PathBuf,
    /// sysbench tables.
    pub tables: u32,
    /// Rows per table.
    pub rows: u32,
    /// TPC-C warehouses, when the image holds a TPC-C database (`tpcc`)
    /// instead of the sysbench tables.
    pub tpcc_warehouses: Option<u32>,
}

/// Builds (or finds in the cache) the MariaDB guest with a sysbench data set.
pub fn mariadb_guest(tables: u32, rows: u32) -> Result<MariadbGuest> {
    mariadb_guest_warmed(tables, rows, "1G")
}

/// Like [`mariadb_guest`], with the buffer-pool dump the guest loads at
/// startup taken from a native server whose pool is `pool`: what fills a
/// guest pool of that size.
pub fn mariadb_guest_warmed(tables: u32, rows: u32, pool: &str) -> Result<MariadbGuest> {
    let (tables_s, rows_s) = (tables.to_string(), rows.to_string());
    let image = guest_script(
        "guest/prepare-mariadb-data.sh",
        &["--tables", &tables_s, "--rows", &rows_s, "--pool", pool],
    )?;
    MariadbGuest::with_data(image, tables, rows, None)
}

impl MariadbGuest {
    /// The guest whose prepared disk is `image` (kernel and initramfs sit beside it).
    fn with_data(
        image: PathBuf,
        tables: u32,
        rows: u32,
        tpcc_warehouses: Option<u32>,
    ) -> Result<Self> {
        let dir = image
            .parent()
            .context("image path has a directory")?
            .to_path_buf();
        Ok(Self {
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initramfs.cpio.gz"),
            image,
            tables,
            rows,
            tpcc_warehouses,
        })
    }
}

/// Builds (or finds in the cache) the systemd guest
/// (`guest/build-systemd-guest.sh`): MariaDB as Debian's service under
/// systemd and udev, no tables of its own; its test-only units install the
/// guest agent's package at boot and kill the agent once.
pub fn systemd_guest() -> Result<MariadbGuest> {
    let dir = guest_script("guest/build-systemd-guest.sh", &[])?;
    MariadbGuest::with_data(dir.join("rootfs.img"), 0, 0, None)
}

/// Builds (or finds in the cache) the MariaDB guest with a TPC-C database
/// of `warehouses` warehouses, loaded by this build's `bench tpcc load`.
pub fn tpcc_guest(warehouses: u32) -> Result<MariadbGuest> {
    let loader = bin_dir()?.join("bench");
    if !loader.exists() {
        bail!(
            "{} not found: run `cargo build --release --workspace` first",
            loader.display()
        );
    }
    let image = guest_script(
        "guest/prepare-mariadb-data.sh",
        &[
            "--tpcc",
            &warehouses.to_string(),
            "--loader",
            &loader.to_string_lossy(),
        ],
    )?;
    MariadbGuest::with_data(image, 0, 0, Some(warehouses))
}

/// glibc settings for the storage server (README, "Deploying"): keep freed
/// read buffers instead of returning them to the kernel after each request.
pub const QEMU_NBD_MALLOC: &str =
    "glibc.malloc.mmap_threshold=4194304:glibc.malloc.trim_threshold=1073741824";

/// The database test bed: the two hosts of a [`Testbed`], plus a storage host
/// (`stor`, serving the VM disk with qemu-nbd over its own shaped links to
/// both hosts) and a client host (`cli`) bridged to a tap device on each
/// host, so that client connections follow the VM.
pub struct DbBed {
    /// Source and destination.
    pub tb: Testbed,
    /// Storage namespace.
    pub stor_ns: String,
    /// Client namespace.
    pub cli_ns: String,
    /// NBD address of the disk as the source host reaches it.
    pub nbd_from_src: String,
    /// NBD address of the disk as the destination host reaches it.
    pub nbd_from_dst: String,
    /// The VM's address on the client bridge.
    pub vm_ip: String,
    /// This run's copy of the disk image.
    pub disk: PathBuf,
    /// Initramfs with this build's guest agent appended.
    pub initrd: PathBuf,
    /// More kernel command line for the guests (e.g. `dbm.agent_user=x`).
    pub kernel_extra: String,
    /// Give the VMs a second, empty disk that the guest sees second
    /// (vdb), and serials (`dbm-data`, `dbm-scratch`); where QEMU lists it
    /// (`query-block`) on the source and on the destination.
    pub scratch_disk: Option<(Scratch, Scratch)>,
    /// Every VM's place on the bed (the fields above are VM 0's).
    pub slots: Vec<DbSlot>,
    nbd: Vec<Child>,
    /// Each VM's disk as a block device, once asked for.
    loops: std::sync::Mutex<HashMap<usize, LoopDevice>>,
}

/// Where QEMU lists a test VM's scratch disk ([`DbBed::scratch_disk`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scratch {
    /// Before the VM's own disk.
    First,
    /// After it.
    Last,
}

/// One VM's place on a [`DbBed`]: its disk, the disk's NBD export, its tap
/// device on each host and its address on the client bridge.
#[derive(Clone, Debug)]
pub struct DbSlot {
    /// VM name on the source host (`db-src`, `db1-src`, ...).
    pub src_name: String,
    /// VM name on the destination host.
    pub dst_name: String,
    /// Tap device on each host.
    pub tap: String,
    /// MAC address (the same on both hosts: the VM keeps it).
    pub mac: String,
    /// NBD address of the disk as the source host reaches it.
    pub nbd_from_src: String,
    /// NBD address of the disk as the destination host reaches it.
    pub nbd_from_dst: String,
    /// The VM's address on the client bridge.
    pub vm_ip: String,
    /// This VM's copy of the disk image.
    pub disk: PathBuf,
    /// Ports of this VM's migration: agent `port`, QEMU `port + 1`.
    pub port: u16,
}

impl DbBed {
    /// Makes the hosts, links (migration `link_mbit`, storage `storage_mbit`),
    /// bridges, and serves a fresh copy of `guest`'s disk.
    pub fn new(guest: &MariadbGuest, link_mbit: u32, storage_mbit: u32) -> Result<Self> {
        Self::with_vms(guest, link_mbit, storage_mbit, 1)
    }

    /// [`DbBed::new`] with places for `vms` VMs of `guest` (each with its
    /// own disk copy, NBD export, tap devices and client address), sharing
    /// the hosts and links.
    pub fn with_vms(
        guest: &MariadbGuest,
        link_mbit: u32,
        storage_mbit: u32,
        vms: u32,
    ) -> Result<Self> {
        if !(1..=8).contains(&vms) {
            bail!("a database bed holds 1 to 8 VMs, not {vms}");
        }
        let tb = Testbed::new(link_mbit)?;
        let tag = tb.tag.clone();
        let n: u32 = tag.trim_start_matches("dbm").parse().unwrap_or(0);
        let stor_ns = format!("{tag}t");
        let cli_ns = format!("{tag}c");
        sh(&["ip", "netns", "add", &stor_ns])?;
        sh(&["ip", "netns", "add", &cli_ns])?;
        sh(&["ip", "-n", &stor_ns, "link", "set", "lo", "up"])?;
        sh(&["ip", "-n", &cli_ns, "link", "set", "lo", "up"])?;
        // Storage links: src <-> stor (10.80.n.0/24), dst <-> stor (10.81.n.0/24).
        for (host, net, a, b) in [
            (&tb.src_ns, 80, format!("{tag}sa"), format!("{tag}sb")),
            (&tb.dst_ns, 81, format!("{tag}da"), format!("{tag}db")),
        ] {
            sh(&["ip", "link", "add", &a, "type", "veth", "peer", "name", &b])?;
            sh(&["ip", "link", "set", &a, "netns", host])?;
            sh(&["ip", "link", "set", &b, "netns", &stor_ns])?;
            for (ns, dev, ip) in [
                (host, &a, format!("10.{net}.{n}.1/24")),
                (&stor_ns, &b, format!("10.{net}.{n}.2/24")),
            ] {
                sh(&["ip", "-n", ns, "addr", "add", &ip, "dev", dev])?;
                sh(&["ip", "-n", ns, "link", "set", dev, "up"])?;
                let rate = format!("{storage_mbit}mbit");
                // tbf needs a burst of about 10 ms of traffic to reach fast rates.
                let burst = format!("{}b", (u64::from(storage_mbit) * 1_250).max(262_144));
                sh(&[
                    "ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                    "rate", &rate, "burst", &burst, "latency", "50ms",
                ])?;
            }
        }
        // Client bridge: cli has br0 (10.78.n.100); each host has br0 joining
        // a tap for its QEMU and a veth to the client's bridge.
        sh(&["ip", "-n", &cli_ns, "link", "add", "br0", "type", "bridge"])?;
        sh(&[
            "ip",
            "-n",
            &cli_ns,
            "addr",
            "add",
            &format!("10.78.{n}.100/24"),
            "dev",
            "br0",
        ])?;
        sh(&["ip", "-n", &cli_ns, "link", "set", "br0", "up"])?;
        for (host, a, b) in [
            (&tb.src_ns, format!("{tag}ca"), format!("{tag}cb")),
            (&tb.dst_ns, format!("{tag}ea"), format!("{tag}eb")),
        ] {
            sh(&["ip", "link", "add", &a, "type", "veth", "peer", "name", &b])?;
            sh(&["ip", "link", "set", &a, "netns", host])?;
            sh(&["ip", "link", "set", &b, "netns", &cli_ns])?;
            sh(&[
                "ip", "-n", &cli_ns, "link", "set", &b, "master", "br0", "up",
            ])?;
            sh(&["ip", "-n", host, "link", "add", "br0", "type", "bridge"])?;
            for i in 0..vms {
                let tap = format!("tap{i}");
                sh(&[
                    "ip", "-n", host, "tuntap", "add", "dev", &tap, "mode", "tap",
                ])?;
                sh(&["ip", "-n", host, "link", "set", &tap, "master", "br0", "up"])?;
            }
            sh(&["ip", "-n", host, "link", "set", &a, "master", "br0", "up"])?;
            sh(&["ip", "-n", host, "link", "set", "br0", "up"])?;
        }
        // This run's disks and initramfs (the base one plus this build's agent).
        let mut slots = Vec::new();
        for i in 0..vms {
            let disk = if i == 0 {
                tb.dir.join("disk.img")
            } else {
                tb.dir.join(format!("disk{i}.img"))
            };
            sh(&[
                "cp",
                "--sparse=always",
                &guest.image.to_string_lossy(),
                &disk.to_string_lossy(),
            ])?;
            let port = 10809 + i;
            let prefix = if i == 0 {
                "db".to_string()
            } else {
                format!("db{i}")
            };
            slots.push(DbSlot {
                src_name: format!("{prefix}-src"),
                dst_name: format!("{prefix}-dst"),
                tap: format!("tap{i}"),
                mac: format!("52:54:00:db:00:{:02x}", 0x10 + i),
                nbd_from_src: format!("nbd://10.80.{n}.2:{port}"),
                nbd_from_dst: format!("nbd://10.81.{n}.2:{port}"),
                vm_ip: format!("10.78.{n}.{}", 10 + i),
                disk,
                port: u16::try_from(7000 + 2 * i).unwrap_or(7000),
            });
        }
        let initrd = tb.dir.join("initramfs.img");
        let agent_dir = tb.dir.join("agent-cpio");
        std::fs::create_dir_all(&agent_dir)?;
        std::fs::copy(
            guest_agent_package()?,
            agent_dir.join("dbmigrate-guest-agent.deb"),
        )
        .context("copying the guest agent's package")?;
        let cpio = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "cd {} && echo dbmigrate-guest-agent.deb | cpio -o -H newc --quiet | gzip -1 > ../agent.cpio.gz && cat {} ../agent.cpio.gz > {}",
                agent_dir.display(),
                guest.initrd.display(),
                initrd.display()
            ))
            .status()?;
        if !cpio.success() {
            bail!("building the initramfs with the guest agent failed (is cpio installed?)");
        }
        let mut nbd = Vec::new();
        for (i, slot) in slots.iter().enumerate() {
            let log = std::fs::File::create(tb.dir.join(format!("qemu-nbd{i}.log")))?;
            let port = slot.nbd_from_src.rsplit(':').next().unwrap_or("10809");
            nbd.push(
                tb.in_ns(&stor_ns, Path::new("qemu-nbd"))
                    // qemu-nbd allocates a buffer per read request, and with
                    // glibc's defaults the freed megabyte goes back to the
                    // kernel: every request then pays a page fault and a
                    // zeroed page per 4 KiB (a third of qemu-nbd's CPU in a
                    // rebuild, perf). Keeping freed memory makes it reuse them.
                    .env("GLIBC_TUNABLES", QEMU_NBD_MALLOC)
                    .args([
                        "--persistent",
                        "--shared=32",
                        "-f",
                        "raw",
                        "-b",
                        "0.0.0.0",
                        "-p",
                        port,
                    ])
                    .arg(&slot.disk)
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
                    .context("starting qemu-nbd (install qemu-utils)")?,
            );
        }
        let first = slots[0].clone();
        let bed = Self {
            nbd_from_src: first.nbd_from_src,
            nbd_from_dst: first.nbd_from_dst,
            vm_ip: first.vm_ip,
            stor_ns,
            cli_ns,
            disk: first.disk,
            initrd,
            kernel_extra: String::new(),
            scratch_disk: None,
            slots,
            nbd,
            loops: Default::default(),
            tb,
        };
        for i in 0..vms {
            let t = Instant::now();
            loop {
                let probe = sh(&[
                    "ip",
                    "netns",
                    "exec",
                    &bed.tb.src_ns,
                    "bash",
                    "-c",
                    &format!("exec 3<>/dev/tcp/10.80.{n}.2/{}", 10809 + i),
                ]);
                if probe.is_ok() {
                    break;
                }
                if t.elapsed() > Duration::from_secs(10) {
                    bail!(
                        "qemu-nbd did not start: {}",
                        std::fs::read_to_string(bed.tb.dir.join(format!("qemu-nbd{i}.log")))
                            .unwrap_or_default()
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(bed)
    }

    /// Starts the MariaDB VM on the source (or, with `incoming`, the waiting
    /// destination QEMU) with `ram_mib` of RAM and a `pool` buffer pool.
    pub fn start_vm(
        &self,
        guest: &MariadbGuest,
        on_src: bool,
        incoming: bool,
        ram_mib: u64,
        pool: &str,
    ) -> Result<Vm> {
        self.start_vm_with(guest, on_src, incoming, ram_mib, pool, on_src)
    }

    /// [`DbBed::start_vm`], choosing whether QEMU loads the preload library
    /// (QEMU's own migration does not need it).
    pub fn start_vm_with(
        &self,
        guest: &MariadbGuest,
        on_src: bool,
        incoming: bool,
        ram_mib: u64,
        pool: &str,
        preload: bool,
    ) -> Result<Vm> {
        self.start_slot_vm(
            0, guest, on_src, incoming, ram_mib, pool, preload, None, false,
        )
    }

    /// The waiting destination QEMU of a post-copy: its preload library
    /// offers the RAM's userfaultfd on the returned socket.
    pub fn start_postcopy_destination(
        &self,
        guest: &MariadbGuest,
        ram_mib: u64,
        pool: &str,
    ) -> Result<(Vm, PathBuf)> {
        let sock = self.tb.dir.join("db-dst.uffd");
        let vm = self.start_slot_vm(
            0,
            guest,
            false,
            true,
            ram_mib,
            pool,
            false,
            Some(sock.clone()),
            false,
        )?;
        Ok((vm, sock))
    }

    /// Starts VM `slot` of the bed (see [`DbBed::start_vm_with`]); a
    /// post-copy destination gets `postcopy_socket`, a destination that
    /// QEMU itself fills (`qemu_moves_ram`) gets [`VmOptions::qemu_fills`].
    #[allow(clippy::too_many_arguments)]
    pub fn start_slot_vm(
        &self,
        slot: usize,
        guest: &MariadbGuest,
        on_src: bool,
        incoming: bool,
        ram_mib: u64,
        pool: &str,
        preload: bool,
        postcopy_socket: Option<PathBuf>,
        qemu_moves_ram: bool,
    ) -> Result<Vm> {
        let sl = self
            .slots
            .get(slot)
            .with_context(|| format!("the bed has no VM slot {slot}"))?;
        let (ns, name, nbd) = if on_src {
            (&self.tb.src_ns, &sl.src_name, &sl.nbd_from_src)
        } else {
            (&self.tb.dst_ns, &sl.dst_name, &sl.nbd_from_dst)
        };
        let hints = self.hints_socket(name);
        let _ = std::fs::remove_file(&hints);
        let mut extra = self.disk_args(name, nbd, on_src)?;
        extra.extend(
            [
                "-netdev",
                &format!("tap,id=n0,ifname={},script=no,downscript=no", sl.tap),
                "-device",
                &format!("virtio-net-pci,netdev=n0,mac={}", sl.mac),
                "-device",
                "virtio-serial-pci",
                "-chardev",
                &format!("socket,id=h0,path={},server=on,wait=off", hints.display()),
                "-device",
                "virtserialport,chardev=h0,name=org.dbmigrate.hints",
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        let img = GuestImage {
            kernel: guest.kernel.clone(),
            initrd: self.initrd.clone(),
        };
        let o = VmOptions {
            ram_mib,
            preload,
            incoming,
            extra,
            append: Some(format!(
                "console=ttyS0 quiet dbm.ip={}/24 dbm.pool={pool}{}",
                sl.vm_ip, self.kernel_extra
            )),
            smp: 1,
            postcopy_socket,
            qemu_fills: qemu_moves_ram,
            ..VmOptions::default()
        };
        Vm::start(&self.tb, ns, name, &img, &o)
    }

    /// QEMU's disk arguments for VM `name` whose disk is at `nbd`: the one
    /// disk, or with [`DbBed::scratch_disk`] an empty scratch disk on a
    /// later PCI slot (the guest sees it second, as vdb) that QEMU creates
    /// (and `query-block` lists) first or last.
    fn disk_args(&self, name: &str, nbd: &str, on_src: bool) -> Result<Vec<String>> {
        let Some((src_at, dst_at)) = self.scratch_disk else {
            return Ok(vec![
                "-drive".into(),
                format!("file={nbd},format=raw,if=virtio,cache=none"),
            ]);
        };
        let scratch = self.tb.dir.join(format!("{name}-scratch.img"));
        std::fs::File::create(&scratch)?.set_len(64 << 20)?;
        let mut drives = vec![
            "-drive".to_string(),
            format!("if=none,id=scratch,file={},format=raw", scratch.display()),
            "-drive".into(),
            format!("if=none,id=data,file={nbd},format=raw,cache=none"),
        ];
        if (if on_src { src_at } else { dst_at }) == Scratch::Last {
            drives.swap(1, 3);
        }
        Ok([
            drives,
            vec![
                "-device".into(),
                "virtio-blk-pci,drive=data,serial=dbm-data,addr=0x10".into(),
                "-device".into(),
                "virtio-blk-pci,drive=scratch,serial=dbm-scratch,addr=0x11".into(),
            ],
        ]
        .concat())
    }

    /// VM `slot`'s disk as a fresh read-only loop device (the one of an
    /// earlier call is detached: a new device starts with an empty block
    /// cache, as a host that has not read the LUN before).
    pub fn disk_as_block_device(&self, slot: usize) -> Result<PathBuf> {
        let disk = &self.slots.get(slot).context("no such VM slot")?.disk;
        let mut loops = self
            .loops
            .lock()
            .map_err(|_| anyhow!("loop devices poisoned"))?;
        loops.remove(&slot);
        let dev = LoopDevice::attach(disk)?;
        let path = dev.path().to_path_buf();
        loops.insert(slot, dev);
        Ok(path)
    }

    /// VM `slot`'s disk as a loop device behind a FUSE view the test can
    /// stall ([`StallableDisk`]).
    pub fn disk_behind_fuse(&self, slot: usize) -> Result<StallableDisk> {
        let disk = &self.slots.get(slot).context("no such VM slot")?.disk;
        StallableDisk::attach(disk, &self.tb.dir.join(format!("fuse-{slot}")))
    }

    /// CPU time the storage server of VM `slot` (its qemu-nbd) has used so
    /// far, ms.
    pub fn storage_server_cpu_ms(&self, slot: usize) -> Option<u64> {
        let pid = self.nbd.get(slot)?.id();
        dbmigrate_core::stats::process_cpu_ms(Some(pid))
    }

    /// The unix socket of a VM's hint port.
    pub fn hints_socket(&self, vm_name: &str) -> PathBuf {
        self.tb.dir.join(format!("{vm_name}.hints"))
    }

    /// A command run in the client namespace.
    pub fn client(&self, program: &str) -> Command {
        self.tb.in_ns(&self.cli_ns, Path::new(program))
    }

    /// [`DbBed::client`] stopped by timeout(1) after `limit_s` seconds
    /// (killed 5 s later if it ignores the stop); arguments after this go to
    /// `program`.
    pub fn client_within(&self, program: &str, limit_s: u64) -> Command {
        let mut c = self.client("timeout");
        c.args(["--kill-after=5", &limit_s.to_string(), program]);
        c
    }

    /// Whether a command made by [`DbBed::client_within`] ran out of time:
    /// timeout(1) exits 124 when it stopped the program, 137 when it had to
    /// kill it.
    pub fn timed_out(status: std::process::ExitStatus) -> bool {
        matches!(status.code(), Some(124 | 137))
    }

    /// sysbench `oltp_read_write` against the VM for `secs` seconds.
    ///
    /// sysbench retries only deadlocks (1213): InnoDB picks a victim when
    /// the two threads' row locks cross, with or without a migration. Any
    /// other error (a lock wait timeout from a stalled guest, a lost
    /// connection) stops sysbench, so a test's "sysbench finished" check
    /// sees it.
    pub fn sysbench(&self, guest: &MariadbGuest, threads: u32, secs: u32) -> Command {
        let mut c = self.sysbench_script(guest, "oltp_read_write", threads, secs);
        c.arg("--mysql-ignore-errors=1213");
        c
    }

    /// sysbench running `script` (a bundled test name or a Lua file) against the VM.
    pub fn sysbench_script(
        &self,
        guest: &MariadbGuest,
        script: &str,
        threads: u32,
        secs: u32,
    ) -> Command {
        self.sysbench_on(&self.vm_ip, guest, script, threads, secs)
    }

    /// [`DbBed::sysbench_script`] against the VM at `vm_ip`.
    pub fn sysbench_on(
        &self,
        vm_ip: &str,
        guest: &MariadbGuest,
        script: &str,
        threads: u32,
        secs: u32,
    ) -> Command {
        let mut c = self.client("sysbench");
        c.args([script, "--db-driver=mysql"])
            .arg(format!("--mysql-host={vm_ip}"))
            .args([
                "--mysql-user=sbtest",
                "--mysql-password=sbtest",
                "--mysql-db=sbtest",
            ])
            .arg(format!("--tables={}", guest.tables))
            .arg(format!("--table-size={}", guest.rows))
            .arg(format!("--threads={threads}"))
            .arg(format!("--time={secs}"))
            .args(["--report-interval=1", "--percentile=99", "run"]);
        c
    }

    /// Runs SQL in the VM from the client host (as the sysbench user).
    pub fn sql(&self, query: &str) -> Result<String> {
        self.sql_on(&self.vm_ip, query)
    }

    /// [`DbBed::sql`] in the VM at `vm_ip`.
    pub fn sql_on(&self, vm_ip: &str, query: &str) -> Result<String> {
        self.sql_run(vm_ip, query, None)
    }

    /// [`DbBed::sql_on`] given at most `limit_s` seconds: the connect
    /// timeout does not cover a query on a guest whose kernel died with
    /// the database's I/O in flight, which never answers.
    pub fn sql_on_within(&self, vm_ip: &str, query: &str, limit_s: u64) -> Result<String> {
        self.sql_run(vm_ip, query, Some(limit_s))
    }

    fn sql_run(&self, vm_ip: &str, query: &str, limit_s: Option<u64>) -> Result<String> {
        let mut c = match limit_s {
            Some(l) => self.client_within("mariadb", l),
            None => self.client("mariadb"),
        };
        let out = c
            .args([
                "-N",
                "-B",
                // A crashed guest must give an error, not a hang.
                "--connect-timeout=10",
                "-h",
                vm_ip,
                "-u",
                "sbtest",
                "-psbtest",
                "sbtest",
                "-e",
                query,
            ])
            .output()
            .context("running the mariadb client (install mariadb-client)")?;
        if let Some(l) = limit_s {
            if Self::timed_out(out.status) {
                bail!("SQL `{query}` got no answer within {l} s: the database on {vm_ip} is stuck (see the guest's serial log)");
            }
        }
        if !out.status.success() {
            bail!(
                "SQL `{query}` failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Every sysbench table of `guest` passes CHECK TABLE and holds all its rows.
    pub fn check_sbtest(&self, guest: &MariadbGuest) -> Result<()> {
        for t in 1..=guest.tables {
            let out = self.sql(&format!("CHECK TABLE sbtest{t}"))?;
            if !out.trim_end().ends_with("OK") {
                bail!("CHECK TABLE sbtest{t}: {out}");
            }
            let n: u64 = self
                .sql(&format!("SELECT COUNT(*) FROM sbtest{t}"))?
                .trim()
                .parse()
                .context("row count")?;
            if n != u64::from(guest.rows) {
                bail!("sbtest{t} holds {n} rows, not {}", guest.rows);
            }
        }
        Ok(())
    }

    /// Bytes the destination host has received on its storage link.
    pub fn dst_storage_rx_bytes(&self) -> Result<u64> {
        net_counter(&self.tb.dst_ns, &self.dst_storage_if(), "rx_bytes")
    }

    /// The destination host's end of its storage link.
    fn dst_storage_if(&self) -> String {
        format!("{}da", self.tb.tag)
    }

    /// A second, read-only NBD server of VM `slot`'s disk in the storage
    /// namespace, on `port` of the destination host's storage link: the
    /// same file (so the same page cache), its own process. Image locking
    /// is off, since the VM's own server holds the file's write lock.
    pub fn second_storage_server(&self, slot: usize, port: u16) -> Result<(Child, String)> {
        let sl = self
            .slots
            .get(slot)
            .with_context(|| format!("the bed has no VM slot {slot}"))?;
        let host = sl
            .nbd_from_dst
            .trim_start_matches("nbd://")
            .rsplit_once(':')
            .map(|(h, _)| h.to_string())
            .context("the destination's NBD address has no port")?;
        let log = std::fs::File::create(self.tb.dir.join(format!("qemu-nbd-second{slot}.log")))?;
        let child = self
            .tb
            .in_ns(&self.stor_ns, Path::new("qemu-nbd"))
            .env("GLIBC_TUNABLES", QEMU_NBD_MALLOC)
            .args(["--persistent", "--shared=8", "-r", "-b", &host, "-p"])
            .arg(port.to_string())
            .arg("--image-opts")
            .arg(format!(
                "driver=raw,file.driver=file,file.filename={},file.locking=off",
                sl.disk.display()
            ))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting a second qemu-nbd (install qemu-utils)")?;
        Ok((child, format!("nbd://{host}:{port}")))
    }

    /// Takes the storage link of the destination host down (as a pulled
    /// cable would) or brings it back up.
    pub fn set_dst_storage_link(&self, up: bool) -> Result<()> {
        let dev = self.dst_storage_if();
        let state = if up { "up" } else { "down" };
        sh(&["ip", "-n", &self.tb.dst_ns, "link", "set", &dev, state]).map(drop)
    }
}

/// A counter of network device `dev` in namespace `ns`
/// (`/sys/class/net/DEV/statistics/FIELD`).
fn net_counter(ns: &str, dev: &str, field: &str) -> Result<u64> {
    let p = format!("/sys/class/net/{dev}/statistics/{field}");
    let out = sh(&["ip", "netns", "exec", ns, "cat", &p])?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

/// Waits for `child` to exit and collects its output; kills it and fails
/// after `limit` (an agent that never exits is a failure of its own).
pub fn wait_limit(mut child: Child, limit: Duration) -> Result<Output> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if child.try_wait()?.is_some() {
            return Ok(child.wait_with_output()?);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    bail!("still running after {limit:?}")
}

/// sysbench's count of ignored (retried) errors, and whether it printed its
/// summary (finished its run).
pub fn sysbench_result(log: &str) -> (Option<u64>, bool) {
    let errors = log
        .lines()
        .find(|l| l.trim_start().starts_with("ignored errors:"))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|n| n.parse().ok());
    (errors, log.contains("transactions:"))
}

/// The destination agent's statistics: the JSON object it prints on
/// success, found amid its log (Null if absent).
pub fn dest_stats(receive_log: &str) -> Value {
    let json = receive_log
        .find("{\n")
        .map(|i| &receive_log[i..])
        .unwrap_or("{}");
    let end = json.rfind('}').map(|i| i + 1).unwrap_or(json.len());
    serde_json::from_str(&json[..end]).unwrap_or(Value::Null)
}

impl Drop for DbBed {
    fn drop(&mut self) {
        for n in &mut self.nbd {
            let _ = n.kill();
            let _ = n.wait();
        }
    }
}

/// A TCP relay inside network namespace `ns`: accepts on `listen` and
/// forwards each connection to `target`, passing the bytes of the
/// `conn`-th connection's client-to-server direction (0-based, in accept
/// order) through `corrupt(offset, bytes)` first. Stands in for a faulty
/// network element between two agents.
pub fn corrupting_relay(
    ns: &str,
    listen: std::net::SocketAddr,
    target: std::net::SocketAddr,
    conn: usize,
    corrupt: fn(u64, &mut [u8]),
) -> Result<()> {
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    let nsfile = std::fs::File::open(format!("/var/run/netns/{ns}"))
        .with_context(|| format!("opening network namespace {ns}"))?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // SAFETY: setns with a namespace descriptor changes only this
        // thread's network namespace (and that of threads it starts).
        let r = unsafe { libc::setns(nsfile.as_raw_fd(), libc::CLONE_NEWNET) };
        if r != 0 {
            let _ = ready_tx.send(Err(std::io::Error::last_os_error().to_string()));
            return;
        }
        let l = match std::net::TcpListener::bind(listen) {
            Ok(l) => l,
            Err(e) => {
                let _ = ready_tx.send(Err(e.to_string()));
                return;
            }
        };
        let _ = ready_tx.send(Ok(()));
        for (i, c) in l.incoming().enumerate() {
            let Ok(client) = c else { continue };
            // The agent behind may not listen yet (the source retries a
            // refused connection, but through a relay it sees a reset).
            let t = Instant::now();
            let server = loop {
                match std::net::TcpStream::connect(target) {
                    Ok(s) => break Some(s),
                    Err(_) if t.elapsed() < Duration::from_secs(20) => {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(_) => break None,
                }
            };
            let Some(server) = server else { continue };
            let (mut c_rd, mut s_wr) = (
                client.try_clone().expect("clone"),
                server.try_clone().expect("clone"),
            );
            let (mut s_rd, mut c_wr) = (server, client);
            let touch = i == conn;
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                let mut off = 0u64;
                while let Ok(n) = c_rd.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if touch {
                        corrupt(off, &mut buf[..n]);
                    }
                    off += n as u64;
                    if s_wr.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = s_wr.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut s_rd, &mut c_wr);
                let _ = c_wr.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    ready_rx
        .recv()
        .context("relay thread died")?
        .map_err(|e| anyhow::anyhow!("starting the relay in {ns}: {e}"))
}

/// Starts the destination agent `recv` (a [`Testbed::receive_cmd`]) with
/// its log in `log` and its report on a pipe, and waits until it listens
/// for the source (it allocates the guest's RAM first), as an operator
/// would before starting the source.
pub fn spawn_listening(recv: &mut Command, log: &Path) -> Result<Child> {
    let mut child = recv
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log)?)
        .spawn()?;
    if let Err(e) = wait_listening(log) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    Ok(child)
}

/// The error an agent printed before exiting (its last `dbmigrate: error:`
/// line in `log`), if any: what a failed run's table shows from the other side.
pub fn agent_error(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines()
        .rev()
        .find_map(|l| l.strip_prefix("dbmigrate: error: "))
        .map(str::to_string)
}

fn wait_listening(log: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains("waiting for the source agent") {
            return Ok(());
        }
        if text.contains("ERROR") || Instant::now() > deadline {
            bail!(
                "the destination agent did not start listening; see {}",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The dirtier guest running on `tb`'s source (memory filled, one clean
/// verification pass done) and a destination QEMU waiting for it; with
/// `postcopy_socket` the destination is ready for post-copy.
pub fn start_dirtier_pair(
    tb: &Testbed,
    ws_mib: u64,
    postcopy_socket: Option<PathBuf>,
) -> Result<(Vm, Vm)> {
    let dst = VmOptions {
        postcopy_socket,
        ..VmOptions::default()
    };
    start_dirtier_pair_with(tb, ws_mib, dst)
}

/// [`start_dirtier_pair`] with the destination's options (made incoming,
/// without the preload library unless it has a post-copy socket).
pub fn start_dirtier_pair_with(tb: &Testbed, ws_mib: u64, dst: VmOptions) -> Result<(Vm, Vm)> {
    let src = VmOptions {
        ws_mib,
        ..VmOptions::default()
    };
    start_dirtier_pair_as(tb, src, dst)
}

/// The dirtier guest started with `src`'s options on the source, running
/// and through one verification pass, and a destination for it with
/// `dst`'s (made incoming, with the source's working set, without the
/// preload library unless it has a post-copy socket).
pub fn start_dirtier_pair_as(tb: &Testbed, src: VmOptions, dst: VmOptions) -> Result<(Vm, Vm)> {
    let img = dirtier_guest()?;
    let ws_mib = src.ws_mib;
    let src = Vm::start(tb, &tb.src_ns, "src", &img, &src)?;
    src.wait_console("DIRTIER READY", Duration::from_secs(240))?;
    src.wait_heartbeat(Duration::from_secs(120), |h| h.passes >= 1 && h.errors == 0)?;
    let dst = Vm::start(
        tb,
        &tb.dst_ns,
        "dst",
        &img,
        &VmOptions {
            ws_mib,
            incoming: true,
            preload: false,
            ..dst
        },
    )?;
    Ok((src, dst))
}

/// A MariaDB server on this host (not in a VM), for tests of the pieces that
/// talk to a real server: a fresh data directory, a unix socket, no TCP.
/// Stopped (SIGTERM, then SIGKILL after 30 s) on drop.
pub struct HostMariadb {
    child: Child,
    /// The server's unix socket.
    pub socket: PathBuf,
}

impl HostMariadb {
    /// Initializes `datadir` and starts `mariadbd` on it with a `pool`
    /// buffer pool; logs and the socket go to `run_dir`.
    pub fn start(datadir: &Path, run_dir: &Path, pool: &str) -> Result<Self> {
        std::fs::create_dir_all(run_dir)?;
        let install = Command::new("mariadb-install-db")
            .arg("--user=root")
            .arg(format!("--datadir={}", datadir.display()))
            .arg("--auth-root-authentication-method=socket")
            .arg("--skip-test-db")
            .output()
            .context(
                "running mariadb-install-db (run scripts/setup.sh to install mariadb-server)",
            )?;
        if !install.status.success() {
            bail!(
                "mariadb-install-db failed: {}",
                String::from_utf8_lossy(&install.stderr)
            );
        }
        let socket = run_dir.join("mysqld.sock");
        let log_path = run_dir.join("mariadbd.log");
        let child = Command::new("mariadbd")
            .arg("--no-defaults")
            .arg("--user=root")
            .arg(format!("--datadir={}", datadir.display()))
            .arg(format!("--socket={}", socket.display()))
            .arg(format!(
                "--pid-file={}",
                run_dir.join("mariadbd.pid").display()
            ))
            .arg("--skip-networking")
            .arg(format!("--innodb-buffer-pool-size={pool}"))
            .arg("--innodb-log-file-size=32M")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path)?)
            .spawn()
            .context("starting mariadbd (run scripts/setup.sh to install mariadb-server)")?;
        let server = Self { child, socket };
        let t = Instant::now();
        while !server.socket.exists() {
            if t.elapsed() > Duration::from_secs(60) {
                bail!(
                    "mariadbd did not start: {}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(server)
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for HostMariadb {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
