//! `dbmigrate`: live-migrates a running QEMU VM's RAM between hosts, with
//! QEMU moving only device state (`x-ignore-shared`).

mod census;
mod devstate;
mod failpoint;
mod hints;
mod libvirt;
mod priority;
mod progress;
mod qemu;
mod qmp;
mod receive;
mod report;
mod security;
mod source;
mod vcpus;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use dbmigrate_core::source::{SourceConfig, StopPolicy};

/// `--version`: the release and the wire protocol it speaks (both agents
/// of a migration must speak the same).
fn version_text() -> &'static str {
    static TEXT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TEXT.get_or_init(|| {
        format!(
            "{} (protocol {})",
            env!("CARGO_PKG_VERSION"),
            dbmigrate_core::protocol::PROTOCOL_VERSION
        )
    })
}

/// Database-aware live migration for QEMU VMs.
#[derive(Parser)]
#[command(name = "dbmigrate", version = version_text(), about)]
struct Cli {
    /// Log filter (e.g. `info`, `dbmigrate_core=debug`); also RUST_LOG.
    #[arg(long, global = true, default_value = "info")]
    log: String,
    /// Nice value of the agent while the guest runs beside the migration
    /// (pre-copy rounds): the migration takes the CPU the vCPUs leave
    /// instead of sharing it with them. The source returns to the nice
    /// value it was started with for the pause and post-copy, the
    /// destination when post-copy starts (the guest then waits on it).
    /// 0 keeps the agent at its starting priority throughout.
    #[arg(long, global = true, default_value_t = 10, value_parser = clap::value_parser!(i32).range(0..=19))]
    nice: i32,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Migrate the VM behind a QMP socket to a destination agent (run on the source host).
    Migrate {
        /// QMP socket of the running source QEMU (or --libvirt and --domain).
        #[arg(long, required_unless_present = "domain")]
        qmp: Option<PathBuf>,
        #[command(flatten)]
        libvirt: libvirt::SourceArgs,
        /// Address of `dbmigrate receive` on the destination host.
        #[arg(long)]
        to: SocketAddr,
        /// Name the destination's certificate must be valid for (as QEMU's
        /// `tls-hostname`); default: the address of --to.
        #[arg(long)]
        tls_hostname: Option<String>,
        #[command(flatten)]
        security: security::SecurityArgs,
        /// Parallel data connections.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=i64::from(dbmigrate_core::protocol::MAX_DATA_CONNECTIONS)))]
        connections: u16,
        /// Bandwidth limit over all connections, e.g. `1gbit`, `500mbit`, `100MB` (per second).
        #[arg(long, value_parser = parse_rate)]
        bandwidth: Option<u64>,
        /// Downtime target in milliseconds.
        #[arg(long, default_value_t = 300)]
        downtime_ms: u64,
        /// Stop iterating after this many rounds anyway.
        #[arg(long, default_value_t = 30)]
        max_rounds: u32,
        /// Stop iterating once this multiple of RAM has been sent.
        #[arg(long, default_value_t = 3.0)]
        max_bytes_factor: f64,
        /// zstd (level 1) for the raw pages it shrinks by an eighth or more:
        /// `on` (the default; `--compress` alone says the same) or `off`.
        /// On the sysbench VM it took the link bytes from 437 to 147 MB and
        /// the migration from 4.40 to 3.83 s for about 0.8 s of the source's
        /// CPU (`mariadb-sysbench-compress`); `off` where the source host's
        /// CPU is scarcer than its link.
        #[arg(long, value_enum, default_value = "on", num_args = 0..=1, default_missing_value = "on")]
        compress: OnOff,
        /// Write the JSON report here.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Keep the source QEMU (in `postmigrate`) after success instead of quitting it.
        #[arg(long)]
        keep_source: bool,
        /// Progress display: auto (when stderr is a terminal), always, never.
        #[arg(long, default_value = "auto", value_parser = ["auto", "always", "never"])]
        progress: String,
        /// Unix socket of the VM's virtio-serial port `org.dbmigrate.hints`
        /// (QEMU `-chardev socket,path=...`): rebuild clean InnoDB buffer-pool
        /// pages from shared storage using the guest agent's hints.
        #[arg(long)]
        guest_hints: Option<PathBuf>,
        /// How often to refresh the hints during pre-copy, in milliseconds.
        #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(50..=600_000))]
        hints_refresh_ms: u64,
        /// Who finds the buffer-pool pages: `host` scans guest RAM here with
        /// the file layout from the guest agent; `guest` has the guest agent
        /// scan and check against the server's list of clean pages.
        #[arg(long, value_enum, default_value = "host")]
        hint_scan: source::HintScan,
        /// Adaptive pace: the share of their runnable time (percent) the
        /// guest's vCPU threads may wait for a CPU beyond what they waited
        /// before the migration; the pages each round moves (raw on the
        /// link, references read from shared storage) are paced to keep
        /// it. `off` (the default until the benchmarks pick one) moves them
        /// as fast as the link and storage go.
        #[arg(long, default_value = "off", value_parser = parse_budget)]
        guest_impact_budget: Budget,
        /// Ask the guest agent for a census of the guest's memory (free,
        /// file cache, buffer pool, other processes, kernel: from the
        /// guest's /proc/kpageflags) before the first round, and report how
        /// each kind of page was sent (`census` in the report). Needs
        /// --guest-hints; costs the guest a pass over its page flags.
        #[arg(long)]
        page_census: bool,
        /// Rebuild the guest's clean page cache from shared storage too:
        /// the guest agent hints the resident, unmodified pages of the
        /// files its processes have open or mapped on the VM's disks
        /// (binaries, libraries, logs), checked like every hint. Needs
        /// --guest-hints.
        #[arg(long)]
        hint_page_cache: bool,
        /// How the VM is handed over: `precopy` (stop-and-copy once the
        /// rounds converge), `postcopy` (after one round the VM runs on the
        /// destination, which fetches the rest), `hybrid` (pre-copy that
        /// switches to post-copy when it would not converge).
        #[arg(long, value_enum, default_value = "precopy")]
        mode: source::ModeArg,
        /// Required with `--mode postcopy` or `hybrid`: once the VM runs on the
        /// destination the source can no longer take it back, so a failure of
        /// the migration link or of either host during post-copy loses the VM.
        #[arg(long)]
        allow_postcopy: bool,
        /// Seconds of silence from the destination agent before giving up
        /// (before the hand-over the source VM then keeps running). Both
        /// agents send a heartbeat every second, so silence means a dead
        /// peer or a cut link, not a busy one.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(3..=3600))]
        timeout: u64,
    },
    /// Receive a VM into a QEMU started with `-incoming defer` (run on the
    /// destination host). QEMU is kept paused until the source commits and
    /// takes device state from this agent only, over a private unix socket.
    Receive {
        /// QMP socket of the waiting destination QEMU (or --libvirt and
        /// --domain-xml, which start it).
        #[arg(long, required_unless_present = "domain_xml")]
        qmp: Option<PathBuf>,
        #[command(flatten)]
        libvirt: libvirt::DestArgs,
        /// Address the source agent connects to.
        #[arg(long)]
        listen: SocketAddr,
        #[command(flatten)]
        security: security::SecurityArgs,
        /// Seconds of silence from the source agent before giving up (it
        /// sends a heartbeat every second).
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(3..=3600))]
        timeout: u64,
        /// Keep the destination QEMU after a failed attempt.
        #[arg(long)]
        keep_qemu: bool,
        /// The VM's disks on shared storage, for rebuilding pages:
        /// `nbd://HOST:PORT[/EXPORT]`, or a raw file or block device path (a
        /// qcow2, LUKS, VMDK or VHDX image is refused: export it raw).
        /// Repeat for several disks: in QEMU's order (`query-block`), or
        /// each named by the disk's serial or WWN, `serial:ID=ADDRESS`,
        /// `wwn:ID=ADDRESS` (matched with the destination QEMU's disks).
        #[arg(long = "storage")]
        storage: Vec<String>,
        /// Seconds an NBD connect or read, or a read of a local disk, may
        /// take before it counts as failed; the pages are then asked of the
        /// source instead (a local read that hangs in the kernel, on a hard
        /// NFS mount or a device with no path, is abandoned).
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
        storage_timeout: u64,
        /// Pace of the rebuild's reads from shared storage, e.g. `1200mbit`,
        /// `150MB` (per second); default: as fast as storage answers. The
        /// reads cost a guest whose host shares cores or storage with them;
        /// a pace spares it and lengthens the migration (the first round
        /// lasts at least the buffer pool's size over the pace). Reads a
        /// vCPU waits for in post-copy are not paced: they go to the next
        /// reader that comes free.
        #[arg(long, value_parser = parse_rate)]
        storage_bandwidth: Option<u64>,
        /// Longest stretch of the disk, KiB (a multiple of 4, at most
        /// 1024), that one storage read goes through although no page in it
        /// is wanted, rather than splitting in two: larger where a request
        /// costs more than its bytes, 0 where bytes cost more than requests
        /// (a slow storage link). Default: the engine's, 64.
        #[arg(long, value_parser = parse_gap_kib)]
        storage_read_gap: Option<u32>,
        /// Unix socket where the destination QEMU's preload library offers
        /// its RAM's userfaultfd (`DBMIGRATE_POSTCOPY_SOCKET`, see `dbmigrate
        /// env --postcopy-socket`): lets the source hand over by post-copy.
        #[arg(long)]
        postcopy_socket: Option<PathBuf>,
        /// When to allocate the guest's RAM. `background` (the default):
        /// threads allocate and touch it 2 MiB at a time while the first
        /// round arrives, so the agent listens at once and pages land in
        /// memory that is already there once reached. `upfront`: all of it
        /// before listening (0.5-2.7 CPU s per GiB on the project's test
        /// host), so that a host short of memory fails before the
        /// migration starts. `off`: pages are allocated as they arrive.
        #[arg(long, value_enum, default_value_t = receive::Prealloc::Background)]
        prealloc: receive::Prealloc,
    },
    /// Report which dirty-tracking mechanisms this host supports.
    Check,
    /// Print the environment to start a source QEMU with, so dbmigrate can track its RAM.
    Env {
        /// The RAM backend file QEMU will use (`mem-path=`).
        #[arg(long)]
        ram_path: PathBuf,
        /// For a destination QEMU that may receive by post-copy: the socket
        /// `dbmigrate receive --postcopy-socket` will take the fault descriptor from.
        #[arg(long)]
        postcopy_socket: Option<PathBuf>,
    },
}

/// Resolves when the operator interrupts (Ctrl-C) or terminates the agent, so
/// that the failure path can put the VM back before exiting.
pub async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    // A handler that cannot be installed must never look like a signal.
    let int = async {
        match signal(SignalKind::interrupt()) {
            Ok(mut s) => s.recv().await,
            Err(_) => std::future::pending().await,
        }
    };
    let term = async {
        match signal(SignalKind::terminate()) {
            Ok(mut s) => s.recv().await,
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = int => "Ctrl-C (SIGINT)",
        _ = term => "SIGTERM",
    }
}

/// `--guest-impact-budget`: a share 0..1, or None for off.
#[derive(Clone, Copy, Debug)]
struct Budget(Option<f64>);

/// `off`, or a percentage above 0 and at most 100 (pure).
fn parse_budget(s: &str) -> Result<Budget, String> {
    let t = s.trim().trim_end_matches('%');
    if t.eq_ignore_ascii_case("off") {
        return Ok(Budget(None));
    }
    match t.parse::<f64>() {
        Ok(p) if p > 0.0 && p <= 100.0 => Ok(Budget(Some(p / 100.0))),
        _ => Err(format!(
            "`{s}` is not a budget: give a percentage above 0 and at most 100 (e.g. 10), or `off`"
        )),
    }
}

/// Parses `1gbit`, `800mbit`, `100MB`, `12345` (bytes/s).
fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a rate: use e.g. 1gbit, 500mbit, 100MB"))?;
    let bytes_per_unit = match unit {
        "" | "b" => 1.0,
        "kbit" => 1e3 / 8.0,
        "mbit" => 1e6 / 8.0,
        "gbit" => 1e9 / 8.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(format!("unknown rate unit `{unit}` in `{s}`: use kbit, mbit, gbit, KB, MB, GB, KiB, MiB or GiB")),
    };
    let v = n * bytes_per_unit;
    if !(v.is_finite() && v >= 1.0) {
        return Err(format!("rate `{s}` is too small"));
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // checked finite and >= 1
    Ok(v as u64)
}

/// A setting that is on or off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum OnOff {
    On,
    Off,
}

/// `--storage-read-gap`: KiB, whole 4 KiB blocks, at most the longest read.
fn parse_gap_kib(s: &str) -> Result<u32, String> {
    let kib: u32 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number of KiB: use e.g. 0, 16 or 64"))?;
    let max = dbmigrate_core::dest::MAX_READ_GAP * 4;
    if kib % 4 != 0 || kib as usize > max {
        return Err(format!(
            "`{s}` KiB: the gap is whole 4 KiB blocks, 0 to {max} KiB"
        ));
    }
    Ok(kib)
}

/// The VM's disks as storage, if any were given.
type OpenedStorage = Option<std::sync::Arc<dyn dbmigrate_core::storage::Storage>>;

/// The VM's disks on shared storage (`--storage`), with the fault suite's
/// storage failpoint around them in a test build, indexed as the
/// destination QEMU (`qmp`) lists its disks, and that list with the disks'
/// names (the source's order is matched with it once the source says it).
/// Addresses named by serial or WWN (`serial:ID=ADDRESS`) are placed at
/// the disk of that name.
fn open_storage(
    specs: &[String],
    timeout: Duration,
    rt: &tokio::runtime::Runtime,
    qmp: &std::path::Path,
) -> Result<(OpenedStorage, Vec<dbmigrate_core::protocol::guest::DiskId>)> {
    use dbmigrate_core::storage;
    if specs.is_empty() {
        return Ok((None, Vec::new()));
    }
    let asked = rt
        .block_on(async {
            let mut q = qmp::Qmp::connect(qmp).await?;
            qemu::disks(&mut q).await
        })
        .context("asking the destination QEMU for its disks' serials and WWNs");
    let vmm = match asked {
        Ok(v) => v,
        Err(e) if !storage::has_named(specs) => {
            tracing::warn!("{e:#}: --storage is taken in the source's disk order");
            Vec::new()
        }
        Err(e) => return Err(e),
    };
    let placed = storage::place(specs, &vmm)?;
    let storage = storage::open_placed(&placed, timeout).context("opening shared storage")?;
    Ok((storage.map(failpoint::around_storage), vmm))
}

fn preload_path() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [
        dir.join("libdbmigrate_preload.so"),
        dir.join("../lib/dbmigrate/libdbmigrate_preload.so"),
    ]
    .into_iter()
    .find(|p| p.exists())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal: a log file or a pipe gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // Only the receive: it frees what it decodes on the RAM writer's thread,
    // which glibc would otherwise hand back and fault in again. The source
    // keeps the allocator's defaults, so a guest's hint sets are returned.
    if matches!(cli.command, Command::Receive { .. })
        && !dbmigrate_core::allocator::keep_freed_memory()
    {
        tracing::warn!(
            "the allocator refused to keep freed memory; receiving will cost more page faults"
        );
    }
    if matches!(
        cli.command,
        Command::Migrate { .. } | Command::Receive { .. }
    ) {
        report::sample_own_memory();
    }
    // Before the runtime starts its threads, which inherit the value.
    let priority = priority::Priority::yield_to_guest(match cli.command {
        Command::Migrate { .. } | Command::Receive { .. } => cli.nice,
        _ => 0,
    });
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dbmigrate: error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match run(cli, &rt, priority) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("dbmigrate: error: {e:#}");
            ExitCode::FAILURE
        }
    };
    // The outcome is decided and reported: a worker thread still blocked on
    // a dead peer or a storage read must not keep the process alive.
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    code
}

fn run(cli: Cli, rt: &tokio::runtime::Runtime, priority: priority::Priority) -> Result<ExitCode> {
    match cli.command {
        Command::Migrate {
            qmp,
            libvirt,
            to,
            connections,
            bandwidth,
            downtime_ms,
            max_rounds,
            max_bytes_factor,
            compress,
            report,
            keep_source,
            progress,
            guest_hints,
            hints_refresh_ms,
            hint_scan,
            guest_impact_budget,
            page_census,
            hint_page_cache,
            mode,
            allow_postcopy,
            timeout,
            tls_hostname,
            security,
        } => {
            let (qmp, guest_hints, domain) = libvirt::source_vm(qmp, &libvirt, guest_hints)?;
            if page_census && guest_hints.is_none() {
                bail!("--page-census asks the guest agent for the census over the hint channel: give --guest-hints too");
            }
            if hint_page_cache && guest_hints.is_none() {
                bail!("--hint-page-cache asks the guest agent for hints over the hint channel: give --guest-hints too");
            }
            if max_bytes_factor.is_nan() || max_bytes_factor <= 0.0 {
                bail!("--max-bytes-factor must be positive");
            }
            if mode != source::ModeArg::Precopy && !allow_postcopy {
                bail!(
                    "--mode {} can switch to post-copy, after which the source can no longer take the VM back: a failure of the migration link or of either host then loses the VM. Add --allow-postcopy to accept that, or use --mode precopy",
                    mode.name()
                );
            }
            let progress = match progress.as_str() {
                "always" => true,
                "never" => false,
                _ => std::io::stderr().is_terminal(),
            };
            let config = SourceConfig {
                mode: mode.into(),
                peer_timeout: Duration::from_secs(timeout),
                connections,
                bandwidth,
                compress: compress == OnOff::On,
                policy: StopPolicy {
                    downtime_target: Duration::from_millis(downtime_ms),
                    max_rounds: max_rounds.max(1),
                    max_bytes_factor,
                    ..StopPolicy::default()
                },
                connector: security.connector(to, tls_hostname.as_deref())?,
                ..SourceConfig::default()
            };
            let mut r = rt.block_on(source::migrate(source::MigrateArgs {
                qmp,
                to,
                config,
                progress,
                quit_source: !keep_source,
                guest_hints,
                hints_refresh: Duration::from_millis(hints_refresh_ms),
                hint_scan,
                priority,
                run_dir: security.run_dir,
                guest_impact_budget: guest_impact_budget.0,
                page_census,
                hint_page_cache,
            }));
            if let Some(d) = &domain {
                if r.error.is_none() && !keep_source {
                    r.libvirt = Some(d.finish());
                }
            }
            r.agent_peak_rss_bytes = report::peak_rss_bytes();
            r.agent_peak_own_bytes = report::peak_own_memory_bytes();
            r.agent_cpu_ms = report::cpu_ms();
            let json = serde_json::to_string_pretty(&r).context("encoding the report")?;
            if let Some(path) = report {
                std::fs::write(&path, &json)
                    .with_context(|| format!("writing the report to {}", path.display()))?;
            }
            println!("{json}");
            match (&r.error, r.vm_runs_on) {
                (None, _) => eprintln!(
                    "dbmigrate: VM runs on the destination: total {} ms, downtime {} ms, {} MiB sent, RAM verified",
                    r.total_ms,
                    r.downtime_ms,
                    r.link_bytes >> 20
                ),
                (Some(e), report::VmLocation::Source) => eprintln!(
                    "dbmigrate: migration failed, the VM keeps running on the source: {e}"
                ),
                (Some(e), _) => {
                    eprintln!("dbmigrate: migration outcome UNKNOWN, source paused: {e}")
                }
            }
            if let Some(e) = r.libvirt.as_ref().and_then(|l| l.error.as_ref()) {
                eprintln!("dbmigrate: libvirt's view is not right: {e}");
                return Ok(ExitCode::from(4));
            }
            Ok(ExitCode::from(r.vm_runs_on.exit_code(r.error.is_some())))
        }
        Command::Receive {
            qmp,
            libvirt,
            listen,
            security,
            timeout,
            keep_qemu,
            storage,
            storage_timeout,
            storage_bandwidth,
            storage_read_gap,
            postcopy_socket,
            prealloc,
        } => {
            if storage_bandwidth.is_some() && storage.is_empty() {
                bail!("--storage-bandwidth paces reads from shared storage: give the VM's disks with --storage too");
            }
            let domain = libvirt::dest_vm(&libvirt, &security.run_dir, postcopy_socket.as_deref())?;
            let qmp = match (&domain, qmp) {
                (Some(d), _) => d.dom.qmp.clone(),
                (None, Some(q)) => q,
                (None, None) => bail!("give --qmp, or --libvirt and --domain-xml"),
            };
            // Storage is opened once the destination QEMU runs (names are
            // placed at its disks); a failure there is a failed receive.
            let stats = (|| {
                let (storage, storage_disks) =
                    open_storage(&storage, Duration::from_secs(storage_timeout), rt, &qmp)?;
                rt.block_on(receive::receive(receive::ReceiveArgs {
                    qmp,
                    listen,
                    acceptor: security.acceptor()?,
                    run_dir: security.run_dir.clone(),
                    peer_timeout: Duration::from_secs(timeout),
                    keep_qemu,
                    storage,
                    storage_disks,
                    storage_bandwidth,
                    storage_read_gap_blocks: storage_read_gap.map(|kib| kib as usize / 4),
                    postcopy_socket,
                    prealloc,
                    priority,
                }))
            })();
            let stats = match (stats, &domain) {
                (Ok(s), Some(d)) => {
                    d.commit()?;
                    s
                }
                (Ok(s), None) => s,
                (Err(e), Some(d)) => {
                    if !keep_qemu {
                        d.after_failure();
                    }
                    return Err(e);
                }
                (Err(e), None) => return Err(e),
            };
            tracing::info!(
                peak_rss_mib = report::peak_rss_bytes().unwrap_or(0) >> 20,
                "receive done"
            );
            let mut out = serde_json::to_value(&stats)?;
            if let Some(o) = out.as_object_mut() {
                o.insert("agent_cpu_ms".into(), report::cpu_ms().into());
                o.insert(
                    "agent_cpu_ms_before_listen".into(),
                    report::cpu_at_listen_ms().into(),
                );
                o.insert(
                    "agent_peak_rss_bytes".into(),
                    report::peak_rss_bytes().into(),
                );
                o.insert(
                    "agent_peak_own_bytes".into(),
                    report::peak_own_memory_bytes().into(),
                );
            }
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Check => {
            let s = dbmigrate_core::dirty::host_support();
            println!("{s}");
            match preload_path() {
                Some(p) => println!("preload library: {}", p.display()),
                None => println!("preload library: not found next to this binary (build it with `cargo build -p dbmigrate-preload`)"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Env {
            ram_path,
            postcopy_socket,
        } => {
            let lib = preload_path().context(
                "libdbmigrate_preload.so is not next to the dbmigrate binary: build it with `cargo build --release -p dbmigrate-preload`",
            )?;
            print!(
                "LD_PRELOAD={} DBMIGRATE_TRACK_PATH={}",
                lib.display(),
                ram_path.display()
            );
            match postcopy_socket {
                Some(sock) => println!(" DBMIGRATE_POSTCOPY_SOCKET={}", sock.display()),
                None => println!(),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_gap_kib, parse_rate, Cli, Command, OnOff};
    use clap::Parser;

    /// `--compress` of a `migrate` command line ending in `extra`.
    fn compress(extra: &[&str]) -> Result<OnOff, clap::Error> {
        let base = [
            "dbmigrate",
            "migrate",
            "--qmp",
            "/q",
            "--to",
            "10.0.0.2:7000",
        ];
        let cli = Cli::try_parse_from(base.iter().chain(extra))?;
        match cli.command {
            Command::Migrate { compress, .. } => Ok(compress),
            _ => unreachable!("a migrate command line"),
        }
    }

    #[test]
    fn compression_is_on_unless_turned_off() {
        assert_eq!(compress(&[]).unwrap(), OnOff::On);
        assert_eq!(compress(&["--compress"]).unwrap(), OnOff::On);
        assert_eq!(compress(&["--compress", "off"]).unwrap(), OnOff::Off);
        assert_eq!(compress(&["--compress=on"]).unwrap(), OnOff::On);
        // What follows a bare --compress is another option, not its value.
        assert_eq!(
            compress(&["--compress", "--keep-source"]).unwrap(),
            OnOff::On
        );
        assert!(compress(&["--compress", "maybe"]).is_err());
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("1gbit"), Ok(125_000_000));
        assert_eq!(parse_rate("800Mbit"), Ok(100_000_000));
        assert_eq!(parse_rate("100MB"), Ok(100_000_000));
        assert_eq!(parse_rate("1MiB"), Ok(1 << 20));
        assert_eq!(parse_rate("4096"), Ok(4096));
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("10 parsecs").is_err());
        assert!(parse_rate("0").is_err());
    }

    #[test]
    fn read_gaps_are_whole_blocks_up_to_the_longest_read() {
        assert_eq!(parse_gap_kib("0"), Ok(0));
        assert_eq!(parse_gap_kib("64"), Ok(64));
        assert_eq!(parse_gap_kib("1024"), Ok(1024));
        assert!(parse_gap_kib("6").is_err());
        assert!(parse_gap_kib("1028").is_err());
        assert!(parse_gap_kib("-4").is_err());
        assert!(parse_gap_kib("lots").is_err());
    }
}
