//! `bench`: migrates the same guests over the same shaped links with
//! QEMU's own pre-copy and post-copy and dbmigrate's methods, and writes
//! reports in the format of `shared/bench-report.md`: the dirtier guest
//! (`compare`, [`dirtier`]), the MariaDB VM (`compare-db`, [`db`]),
//! several VMs leaving a host (`compare-fleet`, [`fleet`]).

mod census_report;
mod competing;
mod cost_report;
mod db;
mod db_report;
mod demo;
mod dirtier;
mod fleet;
mod guest_cost;
mod hosts;
mod libvirt;
mod load;
mod methods;
mod qemu;
mod report;
mod scale_report;
mod steady;
mod storage_probe;
mod storage_read;
mod timeline;
mod tpcc;
mod transport;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use serde::Serialize;
use serde_json::Value;

pub(crate) use methods::{
    check_db_methods, check_methods, dbmigrate_mode, faults_cell, may_postcopy, plaintext_agents,
    postcopy_figures, storage_read_server,
};
pub(crate) use qemu::{measured_downtime, qemu_migrate, record_qemu_result};

#[derive(Parser)]
#[command(name = "bench", about = "dbmigrate benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The main demo: the MariaDB VM under sysbench migrated with dbmigrate,
    /// its clean buffer-pool pages rebuilt from shared storage (with
    /// --with-qemu, QEMU's own pre-copy of the same VM beside it).
    Demo {
        /// Also migrate the same VM with QEMU's own pre-copy, for comparison.
        #[arg(long)]
        with_qemu: bool,
        /// Guest RAM in MiB (the buffer pool takes 5/8 of it).
        #[arg(long, default_value_t = 2048)]
        ram_mib: u64,
    },
    /// Compare migration methods on the dirtier guest.
    Compare(dirtier::DirtierArgs),
    /// Compare migration methods on the MariaDB VM under sysbench oltp_read_write or TPC-C.
    CompareDb {
        #[command(flatten)]
        db: DbArgs,
        /// Guest RAM in MiB.
        #[arg(long, default_value_t = 2048)]
        ram_mib: u64,
        /// InnoDB buffer pool size (the data set should exceed it).
        #[arg(long, default_value = "1280M")]
        pool: String,
        /// The guests' RAM files on a hugetlbfs of 2 MiB pages (reserved
        /// for the run and given back), as large guests are run.
        #[arg(long)]
        hugepages: bool,
        /// Congestion: TCP streams (iperf3) competing on the migration link
        /// from 2 s before the migration until its end; 0 for none.
        #[arg(long, default_value_t = 0)]
        competing_streams: u32,
        /// Pace of the reads from shared storage, MB/s: the storage-read
        /// references' (qemu-img convert `-r`) and dbmigrate's rebuild
        /// (`receive --storage-bandwidth`); 0 reads as fast as it goes.
        #[arg(long, default_value_t = 0)]
        storage_read_mbyte_s: u32,
        #[command(flatten)]
        cost: GuestCostArgs,
    },
    /// Several MariaDB VMs leave one host: all at once (batch) or one after
    /// another (evict); reports the time until the last VM left.
    CompareFleet {
        #[command(flatten)]
        db: DbArgs,
        /// `batch` (all migrations at once) or `evict` (one after another).
        #[arg(long, default_value = "batch", value_parser = ["batch", "evict"])]
        policy: String,
        /// VMs on the host.
        #[arg(long, default_value_t = 2)]
        vms: u32,
        /// Guest RAM of each VM in MiB.
        #[arg(long, default_value_t = 1024)]
        ram_mib: u64,
        /// InnoDB buffer pool size of each VM.
        #[arg(long, default_value = "640M")]
        pool: String,
    },
    /// Plots (SVG) and a Markdown summary from benchmark reports.
    Report {
        /// Reports (JSON, shared/bench-report.md format); default: every bench/results/*.json.
        inputs: Vec<PathBuf>,
        /// Output directory.
        #[arg(long, default_value = "bench/results/plots")]
        out_dir: PathBuf,
    },
    /// One scenario at several guest sizes: each method's median time
    /// against guest RAM (SVG) and a fit of it against the bytes moved
    /// (Markdown), from one report per size.
    Scale {
        /// Reports of the same load at different RAM sizes (a method at a
        /// size a later report gives too is taken from the later one).
        inputs: Vec<PathBuf>,
        /// Only these methods, comma separated (default: all).
        #[arg(long, value_delimiter = ',')]
        methods: Vec<String>,
        /// Output path without extension (`.svg` and `.md` are written).
        #[arg(long, default_value = "bench/results/plots/mariadb-sysbench-scale")]
        out: PathBuf,
    },
    /// One agent connection over loopback, plain TCP against mutual TLS:
    /// what each carries per second on this machine's CPU.
    Transport {
        /// MiB sent per run.
        #[arg(long, default_value_t = 2048)]
        mib: u64,
        /// Runs of each, alternating.
        #[arg(long, default_value_t = 5)]
        repeats: u32,
        /// Report path (default bench/results/micro/transport-tls.json).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// TPC-C: load a database, run the driver, check consistency.
    #[command(subcommand)]
    Tpcc(TpccCmd),
    /// Read the start of a disk sequentially as the rebuild reads storage
    /// (1 MiB reads, 4 threads, 8 in flight each) and print the rate as
    /// JSON: the storage side of a run's physical bound.
    StorageProbe {
        /// `nbd://HOST:PORT[/EXPORT]`, or a file or block device path.
        #[arg(long)]
        storage: String,
        /// Bytes to read (at most the disk).
        #[arg(long, default_value_t = storage_probe::PROBE_BYTES)]
        bytes: u64,
    },
}

/// Settings shared by the database comparisons.
#[derive(clap::Args)]
struct DbArgs {
    /// Scenario name (report `scenario`, default file name).
    #[arg(long)]
    scenario: Option<String>,
    /// Client load: `sysbench` (oltp_read_write) or `tpcc`.
    #[arg(long, default_value = "sysbench", value_parser = ["sysbench", "tpcc"])]
    workload: String,
    /// TPC-C warehouses (about 100 MB each; with --workload tpcc).
    #[arg(long, default_value_t = 14)]
    warehouses: u32,
    /// sysbench tables.
    #[arg(long, default_value_t = 8)]
    tables: u32,
    /// Rows per table.
    #[arg(long, default_value_t = 800_000)]
    rows: u32,
    /// sysbench threads, or TPC-C terminals (per VM).
    #[arg(long, default_value_t = 2)]
    threads: u32,
    /// Migration link shaping, Mbit/s.
    #[arg(long, default_value_t = 1000)]
    link_mbit: u32,
    /// Shared-storage links shaping, Mbit/s.
    #[arg(long, default_value_t = 10_000)]
    storage_mbit: u32,
    /// Downtime target for every method, ms.
    #[arg(long, default_value_t = 300)]
    downtime_ms: u64,
    /// Seconds of load before the migration starts (`compare-db`: at least;
    /// the steady-state rule may take longer, see --steady-max-s).
    #[arg(long, default_value_t = 15)]
    warmup_s: u64,
    #[command(flatten)]
    run: RunArgs,
}

/// What every comparison takes: methods, time limit, report path.
#[derive(clap::Args)]
struct RunArgs {
    /// Give up on a method's migration after this many seconds (reported as not completed).
    #[arg(long, default_value_t = 60)]
    timeout_s: u64,
    /// Methods, comma separated (`compare-db` also takes the control `none`:
    /// the same load and timeline, no migration; `qemu-precopy-multifd`:
    /// QEMU's pre-copy on 2 multifd channels with zstd;
    /// `dbmigrate-precopy-adaptive`: dbmigrate's pre-copy with
    /// `--guest-impact-budget 10`; `dbmigrate-precopy-pace100` and
    /// `-pace200`: dbmigrate's pre-copy with the destination's storage
    /// reads at a fixed 100 or 200 MB/s; `dbmigrate-precopy-census`:
    /// dbmigrate's pre-copy with `--page-census`;
    /// `dbmigrate-precopy-blockdev`: the destination reads the disk as a
    /// block device (a loop device), not over NBD;
    /// `dbmigrate-precopy-uncompressed`: dbmigrate's pre-copy with
    /// `--compress off`; `dbmigrate-precopy-pagecache`:
    /// with `--hint-page-cache --page-census` (`-pagecache-nocensus`:
    /// without the census); `dbmigrate-precopy-gap0`,
    /// `-gap16` and `-gap64`: the destination's storage reads go through up
    /// to 0, 16 or 64 KiB nobody asked for (`receive --storage-read-gap`;
    /// default 64); `dbmigrate-precopy-upfront`: the destination allocates
    /// the guest's RAM before it listens (`receive --prealloc upfront`);
    /// the TLS methods
    /// `dbmigrate-precopy-plaintext`, `qemu-precopy-tls`; and the references
    /// `storage-read` and `storage-read-separate`: no migration, the
    /// destination host reads the VM's disk from shared storage).
    #[arg(
        long,
        default_value = "qemu-precopy,qemu-postcopy,dbmigrate-precopy,dbmigrate-postcopy,dbmigrate-hybrid",
        value_delimiter = ','
    )]
    methods: Vec<String>,
    /// Report path (default bench/results/<scenario>.json).
    #[arg(long)]
    out: Option<PathBuf>,
}

impl DbArgs {
    fn setup(&self, ram_mib: u64, pool: String, competing_streams: u32) -> db::DbSetup {
        db::DbSetup {
            load: if self.workload == "tpcc" {
                db::DbLoad::Tpcc {
                    warehouses: self.warehouses,
                }
            } else {
                db::DbLoad::Sysbench
            },
            ram_mib,
            pool,
            tables: self.tables,
            rows: self.rows,
            threads: self.threads,
            link_mbit: self.link_mbit,
            storage_mbit: self.storage_mbit,
            downtime_ms: self.downtime_ms,
            warmup_s: self.warmup_s,
            timeout: Duration::from_secs(self.run.timeout_s),
            after_s: 10,
            competing_streams,
            storage_read_mbyte_s: 0,
            // compare-fleet: a fixed warm-up of --warmup-s.
            steady: steady::Rule {
                min_s: self.warmup_s,
                max_s: 0,
                window_s: 20,
                block_s: 5,
                tolerance: 0.10,
            },
            hosts: hosts::Hosts::Shared,
            repeat: 1,
            hugepages: false,
        }
    }
}

/// `compare-db`'s warm-up, repetitions and host layout.
#[derive(clap::Args)]
struct GuestCostArgs {
    /// Longest warm-up, s: the migration starts when the load is steady
    /// (over the last --steady-window-s seconds, each --steady-block-s
    /// block's rate within --steady-tolerance-pct of their mean, after at
    /// least --warmup-s),
    /// or after this long anyway. At or below --warmup-s: a fixed warm-up.
    #[arg(long, default_value_t = 120)]
    steady_max_s: u64,
    /// Seconds the steady-state rule judges.
    #[arg(long, default_value_t = 20)]
    steady_window_s: u32,
    /// Seconds averaged into one block of the rule's window (1: every second is judged).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    steady_block_s: u32,
    /// Largest distance of one block's rate from the window's mean, percent.
    #[arg(long, default_value_t = 10.0)]
    steady_tolerance_pct: f64,
    /// Runs of every method; the methods take turns (a, b, c, a, b, c, ...).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    repeat: u32,
    /// `shared`: every process may run on every CPU; `isolated`: separate
    /// hosts emulated with CPU affinity (source host on CPU 0; destination,
    /// storage server and client on CPU 1).
    #[arg(long, value_enum, default_value_t = hosts::Hosts::Shared)]
    hosts: hosts::Hosts,
}

#[derive(Subcommand)]
enum TpccCmd {
    /// Create the schema and load the initial population.
    Load {
        #[command(flatten)]
        target: tpcc::Target,
        /// Warehouses (about 100 MB of InnoDB data each).
        #[arg(long, default_value_t = 1)]
        warehouses: u32,
        /// Connections loading in parallel.
        #[arg(long, default_value_t = 2)]
        jobs: u32,
        /// Random seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Run the five transactions in the standard mix; prints a JSON summary.
    Run {
        #[command(flatten)]
        target: tpcc::Target,
        /// Terminals (connections), each with a home warehouse.
        #[arg(long, default_value_t = 4)]
        terminals: u32,
        /// Seconds to run.
        #[arg(long, default_value_t = 60)]
        duration_s: u64,
        /// Keying and think times of the spec (off: every terminal runs flat out).
        #[arg(long)]
        think: bool,
        /// Directory for per-terminal latency logs (`<end µs> <latency µs> <kind>`).
        #[arg(long)]
        latency_dir: Option<PathBuf>,
        /// End before the duration once this file exists (each terminal
        /// finishes its transaction in flight).
        #[arg(long)]
        stop_file: Option<PathBuf>,
        /// Random seed.
        #[arg(long, default_value_t = 2)]
        seed: u64,
    },
    /// Check the consistency conditions of clause 3.3.2 (1-4; all 9 with --full).
    Check {
        #[command(flatten)]
        target: tpcc::Target,
        /// Also conditions 5-9 (scan every order and order line).
        #[arg(long)]
        full: bool,
    },
}

fn tpcc_cmd(cmd: TpccCmd) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        match cmd {
            TpccCmd::Load {
                target,
                warehouses,
                jobs,
                seed,
            } => tpcc::load::load(&target, warehouses, jobs, seed)
                .await
                .with_context(|| format!("loading TPC-C into {}", target.describe())),
            TpccCmd::Run {
                target,
                terminals,
                duration_s,
                think,
                latency_dir,
                stop_file,
                seed,
            } => {
                let cfg = tpcc::driver::RunConfig {
                    terminals,
                    duration: Duration::from_secs(duration_s),
                    think,
                    latency_dir,
                    stop_file,
                    seed,
                };
                let s = tpcc::driver::run(&target, &cfg)
                    .await
                    .with_context(|| format!("running TPC-C against {}", target.describe()))?;
                println!("{}", serde_json::to_string_pretty(&s)?);
                Ok(())
            }
            TpccCmd::Check { target, full } => {
                let v = tpcc::check::check(&target, full).await?;
                println!("{}", serde_json::to_string_pretty(&v)?);
                let broken: Vec<String> = v
                    .iter()
                    .filter(|c| c.violations > 0)
                    .map(|c| format!("{} ({}): {} violations", c.condition, c.name, c.violations))
                    .collect();
                if !broken.is_empty() {
                    bail!("TPC-C consistency conditions broken: {}", broken.join("; "));
                }
                Ok(())
            }
        }
    })
}

#[derive(Serialize, Default, Clone)]
struct Pages {
    raw: u64,
    zero: u64,
    rebuilt: u64,
    rebuild_mismatch: u64,
}

#[derive(Serialize, Default, Clone)]
struct Workload {
    errors: Option<u64>,
    tps_before: Option<f64>,
    tps_during: Option<f64>,
    /// Latency percentiles over every transaction that ended during the migration.
    #[serde(skip_serializing_if = "Option::is_none")]
    p90_ms_during: Option<f64>,
    p99_ms_during: Option<f64>,
    /// TPC-C: new-order transactions per minute in the 10 s before, and during.
    #[serde(skip_serializing_if = "Option::is_none")]
    tpmc_before: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tpmc_during: Option<f64>,
    /// Seconds of load before the migration started (the steady-state rule's warm-up).
    #[serde(skip_serializing_if = "Option::is_none")]
    warmup_s: Option<u64>,
    /// Whether the load was steady then (false: the warm-up's cap was reached).
    #[serde(skip_serializing_if = "Option::is_none")]
    warmup_steady: Option<bool>,
    /// The window from the migration's start, the same for every run of the
    /// scenario, and the guest's cost in it ([`guest_cost`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    window_s: Option<u64>,
    /// Transactions that ended in the window.
    #[serde(skip_serializing_if = "Option::is_none")]
    work_done: Option<u64>,
    /// The control runs' median work done minus this run's, and as percent of the control's.
    #[serde(skip_serializing_if = "Option::is_none")]
    work_lost: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    work_lost_pct: Option<f64>,
    /// Latency percentiles over every transaction in the window.
    #[serde(skip_serializing_if = "Option::is_none")]
    p90_ms_window: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    p99_ms_window: Option<f64>,
    /// Longest run of seconds in the window with no transaction.
    #[serde(skip_serializing_if = "Option::is_none")]
    longest_stall_s: Option<u64>,
}

/// The workload second by second, with the migration's events (seconds
/// since the load started).
#[derive(Serialize, Default, Clone)]
struct Timeline {
    migration_start_s: f64,
    /// The source VM paused (pre-copy's stop-and-copy, post-copy's switch).
    switchover_s: Option<f64>,
    /// The migration ended (destination running, or given up).
    end_s: f64,
    seconds: Vec<timeline::Second>,
}

#[derive(Serialize, Default, Clone)]
struct Run {
    method: String,
    /// Which repetition of its method this run is (0-based; `compare-db --repeat`).
    #[serde(skip_serializing_if = "Option::is_none")]
    repeat: Option<u32>,
    completed: bool,
    total_ms: Option<u64>,
    downtime_ms: Option<u64>,
    link_bytes: u64,
    storage_bytes: u64,
    pages: Pages,
    ram_verified: Option<bool>,
    workload: Workload,
    /// Guest's own verdict: full passes over its memory on the destination with no error.
    guest_verified_after: Option<bool>,
    /// Post-copy methods: faults on the destination.
    #[serde(skip_serializing_if = "Option::is_none")]
    postcopy: Option<Faults>,
    /// The workload through the migration (database scenarios).
    #[serde(skip_serializing_if = "Option::is_none")]
    timeline: Option<Timeline>,
    /// Method-specific details (rounds, stop reason, QEMU's counters).
    detail: Value,
    /// The run's transactions, until the guest's cost is worked out (not reported).
    #[serde(skip)]
    raw_load: Option<guest_cost::RawLoad>,
}

#[derive(Serialize, Default, Clone)]
struct Faults {
    /// Page faults on missing pages.
    faults: Option<u64>,
    /// Faults that waited for the source (QEMU: its page requests).
    network_faults: Option<u64>,
    /// Faults served from shared storage.
    storage_faults: Option<u64>,
    /// Longest a vCPU waited for a page (null where the method cannot tell).
    longest_stall_ms: Option<f64>,
}

#[derive(Serialize)]
struct Report {
    scenario: String,
    link_mbit: u32,
    storage_mbit: Option<u32>,
    vm: Value,
    /// How the emulated hosts share the machine's CPUs (`compare-db --hosts`:
    /// `shared` or `isolated`), and which CPUs each host had.
    #[serde(skip_serializing_if = "Option::is_none")]
    hosts: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    host_cpus: Option<Value>,
    runs: Vec<Run>,
}

fn main() -> Result<()> {
    run(Cli::parse())
}

/// Runs one bench command.
fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Cmd::Demo { with_qemu, ram_mib } => demo::run(with_qemu, ram_mib),
        Cmd::Tpcc(cmd) => tpcc_cmd(cmd),
        Cmd::StorageProbe { storage, bytes } => storage_probe::probe_here(&storage, bytes),
        Cmd::Transport { mib, repeats, out } => {
            transport::run(mib, repeats, &out.unwrap_or_else(transport::default_out))
        }
        Cmd::Scale {
            inputs,
            methods,
            out,
        } => {
            for p in scale_report::write(&inputs, &methods, &out)? {
                println!("wrote {}", p.display());
            }
            Ok(())
        }
        Cmd::Report { inputs, out_dir } => {
            let inputs = if inputs.is_empty() {
                let dir = dbmigrate_testbed::repo_root().join("bench/results");
                let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
                    .with_context(|| format!("listing {}", dir.display()))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "json"))
                    .collect();
                v.sort();
                v
            } else {
                inputs
            };
            for p in report::write(&inputs, &out_dir)? {
                eprintln!("wrote {}", p.display());
            }
            Ok(())
        }
        Cmd::CompareDb {
            db,
            ram_mib,
            pool,
            hugepages,
            competing_streams,
            storage_read_mbyte_s,
            cost,
        } => {
            let scenario = db.scenario.clone().unwrap_or_else(|| {
                let congestion = if competing_streams > 0 {
                    "-congestion"
                } else {
                    ""
                };
                format!("mariadb-{}{congestion}", db.workload)
            });
            check_db_methods(&db.run.methods)?;
            let setup = db::DbSetup {
                storage_read_mbyte_s,
                steady: steady::Rule {
                    min_s: db.warmup_s,
                    max_s: cost.steady_max_s,
                    window_s: cost.steady_window_s as usize,
                    block_s: cost.steady_block_s as usize,
                    tolerance: cost.steady_tolerance_pct / 100.0,
                },
                hosts: cost.hosts,
                repeat: cost.repeat,
                hugepages,
                ..db.setup(ram_mib, pool, competing_streams)
            };
            let (runs, guest) = db::compare(&setup, &db.run.methods)?;
            db_report::write_db_report(scenario, &setup, &guest, None, runs, db.run.out)
        }
        Cmd::CompareFleet {
            db,
            policy,
            vms,
            ram_mib,
            pool,
        } => {
            fleet::check_vms(vms)?;
            check_methods(&db.run.methods)?;
            let policy = if policy == "evict" {
                fleet::Policy::Evict
            } else {
                fleet::Policy::Batch
            };
            let scenario = db
                .scenario
                .clone()
                .unwrap_or_else(|| format!("mariadb-{}-{}-{vms}vms", db.workload, policy.name()));
            let setup = db.setup(ram_mib, pool, 0);
            let (runs, guest) = fleet::compare(&setup, vms, policy, &db.run.methods)?;
            db_report::write_db_report(
                scenario,
                &setup,
                &guest,
                Some((policy, vms)),
                runs,
                db.run.out,
            )
        }
        Cmd::Compare(args) => dirtier::compare(args),
    }
}

/// What each side said about a run that did not complete.
pub(crate) fn print_failures(r: &Report) {
    for run in r.runs.iter().filter(|run| !run.completed) {
        for (side, key) in [("source", "error"), ("destination", "destination_error")] {
            if let Some(e) = run.detail[key].as_str() {
                println!("\n{} failed; {side}: {e}", run.method);
            }
        }
    }
}
