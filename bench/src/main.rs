//! `bench compare`: migrates the same guest over the same shaped link with
//! QEMU's own pre-copy, QEMU's own post-copy and dbmigrate, in one run, and
//! writes a report in the format of `shared/bench-report.md`.
//!
//! Every method gets a freshly booted guest that has filled its memory and
//! finished one verification pass; after each migration the guest must finish
//! another full verification pass on the destination, and the errors it
//! finds are reported (`workload.errors`).

mod db;
mod fleet;
mod report;
mod timeline;
mod tpcc;
mod transport;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use dbmigrate_testbed::{dirtier_guest, GuestImage, Testbed, Vm, VmOptions};
use serde::Serialize;
use serde_json::{json, Value};

#[derive(Parser)]
#[command(name = "bench", about = "dbmigrate benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Compare migration methods on the dirtier guest.
    Compare {
        /// Scenario name (report `scenario`, default file name).
        #[arg(long)]
        scenario: Option<String>,
        /// Guest RAM in MiB.
        #[arg(long, default_value_t = 1024)]
        ram_mib: u64,
        /// Working set the guest keeps rewriting, MiB.
        #[arg(long, default_value_t = 16)]
        ws_mib: u64,
        /// Percent of free guest RAM the guest fills.
        #[arg(long, default_value_t = 80)]
        fill_pct: u64,
        /// Migration link shaping, Mbit/s.
        #[arg(long, default_value_t = 1000)]
        link_mbit: u32,
        /// Downtime target for every method, ms.
        #[arg(long, default_value_t = 300)]
        downtime_ms: u64,
        #[command(flatten)]
        run: RunArgs,
    },
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
        /// Congestion: TCP streams (iperf3) competing on the migration link
        /// from 2 s before the migration until its end; 0 for none.
        #[arg(long, default_value_t = 0)]
        competing_streams: u32,
        /// Pace of the reads from shared storage, MB/s: the storage-read
        /// references' (qemu-img convert `-r`) and dbmigrate's rebuild
        /// (`receive --storage-bandwidth`); 0 reads as fast as it goes.
        #[arg(long, default_value_t = 0)]
        storage_read_mbyte_s: u32,
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
    /// Seconds of load before the migration starts.
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
    /// Methods, comma separated (`compare-db` also takes the references
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
        }
    }
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
                seed,
            } => {
                let cfg = tpcc::driver::RunConfig {
                    terminals,
                    duration: Duration::from_secs(duration_s),
                    think,
                    latency_dir,
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
    runs: Vec<Run>,
}

struct Setup<'a> {
    tb: &'a Testbed,
    img: &'a GuestImage,
    ram_mib: u64,
    ws_mib: u64,
    fill_pct: u64,
    link_mbit: u32,
    downtime_ms: u64,
    timeout: Duration,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Tpcc(cmd) => tpcc_cmd(cmd),
        Cmd::Transport { mib, repeats, out } => {
            transport::run(mib, repeats, &out.unwrap_or_else(transport::default_out))
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
            competing_streams,
            storage_read_mbyte_s,
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
                ..db.setup(ram_mib, pool, competing_streams)
            };
            let (runs, guest) = db::compare(&setup, &db.run.methods)?;
            write_db_report(scenario, &setup, &guest, None, runs, db.run.out)
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
            write_db_report(
                scenario,
                &setup,
                &guest,
                Some((policy, vms)),
                runs,
                db.run.out,
            )
        }
        Cmd::Compare {
            scenario,
            ram_mib,
            ws_mib,
            fill_pct,
            link_mbit,
            downtime_ms,
            run:
                RunArgs {
                    timeout_s,
                    methods,
                    out,
                },
        } => {
            let scenario = scenario.unwrap_or_else(|| format!("dirtier-ws{ws_mib}"));
            check_methods(&methods)?;
            let img = dirtier_guest()?;
            let tb = Testbed::new(link_mbit)?;
            let setup = Setup {
                tb: &tb,
                img: &img,
                ram_mib,
                ws_mib,
                fill_pct,
                link_mbit,
                downtime_ms,
                timeout: Duration::from_secs(timeout_s),
            };
            let mut runs = Vec::new();
            for m in &methods {
                eprintln!("== {scenario}: {m}");
                let run = run_method(&setup, m).with_context(|| format!("method {m}"))?;
                eprintln!(
                    "   completed={} total_ms={:?} downtime_ms={:?} link_MB={} guest_ok={:?}",
                    run.completed,
                    run.total_ms,
                    run.downtime_ms,
                    run.link_bytes / 1_000_000,
                    run.guest_verified_after
                );
                runs.push(run);
            }
            let report = Report {
                scenario: scenario.clone(),
                link_mbit,
                storage_mbit: None,
                vm: json!({"ram_mib": ram_mib, "vcpus": 1, "workload": format!("dirtier ws={ws_mib}MiB fill={fill_pct}%")}),
                runs,
            };
            let path = out.unwrap_or_else(|| {
                dbmigrate_testbed::repo_root().join(format!("bench/results/{scenario}.json"))
            });
            std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")
                .with_context(|| format!("writing {}", path.display()))?;
            print_table(&report);
            eprintln!("report: {}", path.display());
            Ok(())
        }
    }
}

/// Writes a database comparison's report and prints its table.
fn write_db_report(
    scenario: String,
    setup: &db::DbSetup,
    guest: &dbmigrate_testbed::MariadbGuest,
    fleet: Option<(fleet::Policy, u32)>,
    runs: Vec<Run>,
    out: Option<PathBuf>,
) -> Result<()> {
    let mut workload = match setup.load {
        db::DbLoad::Sysbench => format!(
            "MariaDB, buffer pool {}, sysbench oltp_read_write {} tables x {} rows, {} threads",
            setup.pool, guest.tables, guest.rows, setup.threads
        ),
        db::DbLoad::Tpcc { warehouses } => format!(
            "MariaDB, buffer pool {}, TPC-C {warehouses} warehouses, {} terminals, no think time",
            setup.pool, setup.threads
        ),
    };
    if setup.competing_streams > 0 {
        workload += &format!(
            "; congestion: {} competing TCP streams (iperf3) on the migration link",
            setup.competing_streams
        );
    }
    if setup.storage_read_mbyte_s > 0 {
        workload += &format!(
            "; reads from shared storage paced to {} MB/s",
            setup.storage_read_mbyte_s
        );
    }
    if let Some((policy, vms)) = fleet {
        workload = format!(
            "{vms} VMs leave the host ({}), each: {workload}",
            match policy {
                fleet::Policy::Batch => "batch: all at once",
                fleet::Policy::Evict => "evict: one after another",
            }
        );
    }
    let report = Report {
        scenario: scenario.clone(),
        link_mbit: setup.link_mbit,
        storage_mbit: Some(setup.storage_mbit),
        vm: json!({ "ram_mib": setup.ram_mib, "vcpus": 1, "workload": workload }),
        runs,
    };
    let path = out.unwrap_or_else(|| {
        dbmigrate_testbed::repo_root().join(format!("bench/results/{scenario}.json"))
    });
    std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    print_db_table(&report);
    eprintln!("report: {}", path.display());
    Ok(())
}

/// The methods `bench` can run.
const METHODS: [&str; 5] = [
    "qemu-precopy",
    "qemu-postcopy",
    "dbmigrate-precopy",
    "dbmigrate-postcopy",
    "dbmigrate-hybrid",
];

/// Methods only `compare-db` runs: what TLS costs each migration (the
/// `mariadb-sysbench-tls` scenario): dbmigrate's pre-copy with its agents
/// on plain TCP (`--insecure-plaintext`; every other dbmigrate method runs
/// over mutual TLS), and QEMU's pre-copy with its own `tls-creds-x509`
/// (the same certificates).
const TLS_METHODS: [&str; 2] = ["dbmigrate-precopy-plaintext", "qemu-precopy-tls"];

/// `dbmigrate migrate` arguments of a dbmigrate method, or None for QEMU's.
fn dbmigrate_mode(method: &str) -> Option<&'static [&'static str]> {
    match method {
        "dbmigrate-precopy" | "dbmigrate-precopy-plaintext" => Some(&["--mode", "precopy"]),
        "dbmigrate-postcopy" => Some(&["--mode", "postcopy", "--allow-postcopy"]),
        "dbmigrate-hybrid" => Some(&["--mode", "hybrid", "--allow-postcopy"]),
        _ => None,
    }
}

/// Whether a dbmigrate method may hand over by post-copy (its destination
/// QEMU then needs the post-copy socket).
fn may_postcopy(method: &str) -> bool {
    dbmigrate_mode(method).is_some_and(|m| m.contains(&"--allow-postcopy"))
}

/// Whether a method's agents talk plain TCP instead of mutual TLS.
fn plaintext_agents(method: &str) -> bool {
    method == "dbmigrate-precopy-plaintext"
}

/// Post-copy figures of a run: faults the destination took, those that
/// needed the network, and the longest a vCPU waited for a page.
fn postcopy_figures(dest: &Value, report: &Value) -> Option<Faults> {
    report["postcopy"].is_object().then(|| Faults {
        faults: dest["faults"].as_u64(),
        network_faults: dest["network_faults"].as_u64(),
        storage_faults: dest["storage_faults"].as_u64(),
        longest_stall_ms: dest["longest_stall_us"]
            .as_u64()
            .map(|us| us as f64 / 1000.0),
    })
}

/// "network faults / longest stall" cell of a table.
fn faults_cell(run: &Run) -> String {
    match &run.postcopy {
        None => "-".into(),
        Some(f) => format!(
            "{} / {}",
            f.network_faults.map_or("?".into(), |n| n.to_string()),
            f.longest_stall_ms
                .map_or("?".into(), |ms| format!("{ms:.0} ms"))
        ),
    }
}

fn check_methods(methods: &[String]) -> Result<()> {
    for m in methods {
        if !METHODS.contains(&m.as_str()) && m != "qemu-precopy-tls" {
            bail!("unknown method `{m}`: use {}", METHODS.join(", "));
        }
    }
    Ok(())
}

/// Reference runs of `compare-db` that migrate nothing: the destination
/// host only reads the VM's disk from shared storage while the load runs,
/// each with whether it reads through a second storage server.
const STORAGE_READS: [(&str, bool); 2] = [("storage-read", false), ("storage-read-separate", true)];

/// Whether `method` is a storage-read reference, and if so whether it
/// reads through a second storage server (pure).
fn storage_read_server(method: &str) -> Option<bool> {
    STORAGE_READS
        .iter()
        .find(|(name, _)| *name == method)
        .map(|&(_, separate)| separate)
}

/// [`check_methods`] for `compare-db`, which also takes the storage-read references.
fn check_db_methods(methods: &[String]) -> Result<()> {
    for m in methods {
        if !METHODS.contains(&m.as_str())
            && !TLS_METHODS.contains(&m.as_str())
            && storage_read_server(m).is_none()
        {
            let refs: Vec<&str> = STORAGE_READS.iter().map(|(name, _)| *name).collect();
            bail!(
                "unknown method `{m}`: use {}, {}, or the references {}",
                METHODS.join(", "),
                TLS_METHODS.join(", "),
                refs.join(", ")
            );
        }
    }
    Ok(())
}

fn print_db_table(r: &Report) {
    println!(
        "\n{} — {} MiB guest, {} Mbit/s migration link, {:?} Mbit/s storage links\n",
        r.scenario, r.vm["ram_mib"], r.link_mbit, r.storage_mbit
    );
    let tpcc = r.runs.iter().any(|x| x.workload.tpmc_during.is_some());
    let rate = if tpcc { "tpmC" } else { "tps" };
    println!("| method | completed | total (ms) | downtime (ms) | link MB | storage MB | rebuilt pages | mismatches | network faults / longest stall | {rate} before | {rate} during | p90 / p99 during (ms) | client errors | database after |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    for run in &r.runs {
        let w = &run.workload;
        let (before, during) = if tpcc {
            (w.tpmc_before, w.tpmc_during)
        } else {
            (w.tps_before, w.tps_during)
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} | {} | {} |",
            run.method,
            run.completed,
            opt(run.total_ms),
            opt(run.downtime_ms),
            run.link_bytes / 1_000_000,
            run.storage_bytes / 1_000_000,
            run.pages.rebuilt,
            run.pages.rebuild_mismatch,
            faults_cell(run),
            f(before),
            f(during),
            f(w.p90_ms_during),
            f(w.p99_ms_during),
            opt(w.errors),
            run.guest_verified_after.map_or("n/a".into(), |b| if b {
                "OK".to_string()
            } else {
                "FAILED".to_string()
            })
        );
    }
    for run in &r.runs {
        if let Some(b) = run.detail["physical_bound_ms"].as_f64() {
            println!("\nphysical bound for {} (design §6): {b:.0} ms", run.method);
        }
    }
    print_failures(r);
}

/// What each side said about a run that did not complete.
fn print_failures(r: &Report) {
    for run in r.runs.iter().filter(|run| !run.completed) {
        for (side, key) in [("source", "error"), ("destination", "destination_error")] {
            if let Some(e) = run.detail[key].as_str() {
                println!("\n{} failed; {side}: {e}", run.method);
            }
        }
    }
}

fn print_table(r: &Report) {
    println!(
        "\n{} — {} MiB guest, {} Mbit/s link\n",
        r.scenario, r.vm["ram_mib"], r.link_mbit
    );
    println!("| method | completed | total (ms) | downtime (ms) | link MB | network faults / longest stall | RAM verified | guest check after |");
    println!("|---|---|---|---|---|---|---|---|");
    let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    for run in &r.runs {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            run.method,
            run.completed,
            opt(run.total_ms),
            opt(run.downtime_ms),
            run.link_bytes / 1_000_000,
            faults_cell(run),
            run.ram_verified.map_or("n/a".into(), |b| b.to_string()),
            run.guest_verified_after.map_or("n/a".into(), |b| if b {
                "clean".to_string()
            } else {
                "ERRORS".to_string()
            })
        );
    }
    print_failures(r);
}

fn start_vms(
    s: &Setup<'_>,
    preload: bool,
    dst_incoming_extra: &[&str],
    postcopy: bool,
) -> Result<(Vm, Vm)> {
    let src = Vm::start(
        s.tb,
        &s.tb.src_ns,
        "src",
        s.img,
        &VmOptions {
            ram_mib: s.ram_mib,
            ws_mib: s.ws_mib,
            fill_pct: s.fill_pct,
            preload,
            ..VmOptions::default()
        },
    )?;
    src.wait_console("DIRTIER READY", Duration::from_secs(300))?;
    src.wait_heartbeat(Duration::from_secs(300), |h| h.passes >= 1)?;
    let dst = Vm::start(
        s.tb,
        &s.tb.dst_ns,
        "dst",
        s.img,
        &VmOptions {
            ram_mib: s.ram_mib,
            ws_mib: s.ws_mib,
            fill_pct: s.fill_pct,
            preload: false,
            incoming: true,
            extra: dst_incoming_extra.iter().map(|s| s.to_string()).collect(),
            postcopy_socket: postcopy.then(|| s.tb.dir.join("dst.uffd")),
            qemu_fills: !preload,
            ..VmOptions::default()
        },
    )?;
    Ok((src, dst))
}

/// After a completed migration: the guest on `dst` must complete two more
/// full verification passes; returns whether it found no error.
fn guest_check(src: &Vm, dst: &Vm) -> Option<bool> {
    let last = src.heartbeats().last().cloned()?;
    let h = dst
        .wait_heartbeat(Duration::from_secs(240), |h| {
            h.seq > last.seq && h.passes >= last.passes + 2
        })
        .ok()?;
    Some(h.errors == 0 && !dst.console().contains("DIRTIER ERROR"))
}

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

/// QEMU's own migration from `sq` to `dq` (waiting with `-incoming defer`):
/// pre-copy, or post-copy switched on after the first full pass, as it is
/// normally used. QEMU 7.2 limits itself to 32 MiB/s by default: the limit is
/// lifted so that only the shaped link limits it, like dbmigrate. Gives up
/// (cancels) after `timeout` unless post-copy has started. Returns the last
/// `query-migrate` answer, with the destination resumed if it completed.
#[allow(clippy::too_many_arguments)]
fn qemu_migrate(
    sq: &mut dbmigrate_testbed::SyncQmp,
    dq: &mut dbmigrate_testbed::SyncQmp,
    uri: &str,
    postcopy: bool,
    tls: Option<&QemuTls>,
    link_mbit: u32,
    downtime_ms: u64,
    timeout: Duration,
) -> Result<Value> {
    if let Some(t) = tls {
        t.apply(sq, dq)?;
    }
    if postcopy {
        let caps = json!([{"capability": "postcopy-ram", "state": true}]);
        sq.cmd("migrate-set-capabilities", json!({"capabilities": caps}))?;
        dq.cmd("migrate-set-capabilities", json!({"capabilities": caps}))?;
    }
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
fn record_qemu_result(run: &mut Run, info: &Value) {
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

fn run_method(s: &Setup<'_>, method: &str) -> Result<Run> {
    let mut run = Run {
        method: method.into(),
        ..Run::default()
    };
    match method {
        m if dbmigrate_mode(m).is_some() => {
            let mode = dbmigrate_mode(m).expect("checked");
            let postcopy = may_postcopy(m);
            let (src, dst) = start_vms(s, true, &[], postcopy)?;
            let (se, de) = (src.watch_events()?, dst.watch_events()?);
            let before = s.tb.link_bytes()?;
            let mut recv = s.tb.receive_cmd(&dst)?;
            if postcopy {
                recv.arg("--postcopy-socket").arg(s.tb.dir.join("dst.uffd"));
            }
            // The source starts once the destination is set up, as an
            // operator would (QEMU's destination allocates at boot).
            // One log per method: a failed run's log must survive the next run.
            let recv_log = s.tb.dir.join(format!("receive-{method}.log"));
            let recv = dbmigrate_testbed::spawn_listening(&mut recv, &recv_log)?;
            let report_path = s.tb.dir.join("dbmigrate-report.json");
            let out =
                s.tb.migrate_cmd(&src, &report_path)?
                    .args([
                        "--downtime-ms",
                        &s.downtime_ms.to_string(),
                        "--progress",
                        "never",
                    ])
                    .args(mode)
                    .stdout(Stdio::null())
                    .stderr(Stdio::inherit())
                    .output()?;
            let recv_out = recv.wait_with_output()?;
            let dest: Value = serde_json::from_slice(&recv_out.stdout).unwrap_or(Value::Null);
            run.link_bytes = s.tb.link_bytes()? - before;
            let r: Value = serde_json::from_str(&std::fs::read_to_string(&report_path)?)?;
            run.completed = out.status.success() && r["completed"] == json!(true);
            run.total_ms = r["total_ms"].as_u64();
            run.downtime_ms = r["downtime_ms"].as_u64().filter(|_| run.completed);
            run.ram_verified = r["ram_verified"].as_bool();
            run.pages.raw = r["pages"]["raw"].as_u64().unwrap_or(0);
            run.pages.zero = r["pages"]["zero"].as_u64().unwrap_or(0);
            run.postcopy = postcopy_figures(&dest, &r);
            run.detail = json!({
                "stop_reason": r["stats"]["stop_reason"],
                "expected_downtime_ms": r["stats"]["expected_downtime_ms"],
                "verify_ms": r["stats"]["verify_ms"],
                "rounds": r["stats"]["rounds"],
                "postcopy": r["postcopy"],
                "destination": dest,
                "device_state_bytes": r["device_state_bytes"],
                "error": r["error"],
                "destination_error": dbmigrate_testbed::agent_error(&recv_log),
            });
            measured_downtime(&mut run, &se, &de);
            if run.completed {
                run.guest_verified_after = guest_check(&src, &dst);
                run.workload.errors = run.guest_verified_after.map(|ok| u64::from(!ok));
            }
        }
        "qemu-precopy" | "qemu-postcopy" | "qemu-precopy-tls" => {
            let (src, dst) = start_vms(s, false, &[], false)?;
            let (se, de) = (src.watch_events()?, dst.watch_events()?);
            let mut dq = dst.qmp()?;
            let before = s.tb.link_bytes()?;
            let t = Instant::now();
            let info = qemu_migrate(
                &mut src.qmp()?,
                &mut dq,
                &format!("tcp:{}:7001", s.tb.dst_ip),
                method == "qemu-postcopy",
                (method == "qemu-precopy-tls")
                    .then(|| QemuTls::of(s.tb))
                    .as_ref(),
                s.link_mbit,
                s.downtime_ms,
                s.timeout,
            )?;
            run.link_bytes = s.tb.link_bytes()? - before;
            record_qemu_result(&mut run, &info);
            if run.completed {
                run.guest_verified_after = guest_check(&src, &dst);
                run.workload.errors = run.guest_verified_after.map(|ok| u64::from(!ok));
            }
            run.detail = json!({
                "status": info["status"],
                "expected_downtime_ms": info["expected-downtime"],
                "dirty_sync_count": info["ram"]["dirty-sync-count"],
                "ram_transferred": info["ram"]["transferred"],
                "elapsed_ms_when_stopped": dbmigrate_core::stats::millis(t.elapsed()),
            });
            measured_downtime(&mut run, &se, &de);
        }
        other => bail!("unknown method {other}"),
    }
    Ok(run)
}
