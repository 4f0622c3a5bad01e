//! `dbmigrate-guest-agent`: exports buffer-pool hints of the database server in this VM.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

/// dbmigrate guest agent.
#[derive(Parser)]
#[command(name = "dbmigrate-guest-agent", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Collect hints once and write them (binary hint set, or JSON lines with --json).
    Export {
        /// Server socket.
        #[arg(long, default_value = "/run/mysqld/mysqld.sock")]
        socket: PathBuf,
        /// SQL user (root authenticates by socket on Debian).
        #[arg(long, default_value = "root")]
        user: String,
        /// The VM's disks in hint order (first = disk 0).
        #[arg(long = "disk", default_value = "/dev/vda")]
        disks: Vec<PathBuf>,
        /// Server pid (default: the process named mariadbd or mysqld).
        #[arg(long)]
        pid: Option<u32>,
        /// Output file (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Human-readable JSON lines instead of the binary hint set.
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("dbmigrate-guest-agent: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let Command::Export {
        socket,
        user,
        disks,
        pid,
        out,
        json,
    } = cli.command;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let collected = rt.block_on(async {
        let opts = mysql_async::OptsBuilder::default()
            .socket(Some(socket.to_string_lossy().into_owned()))
            .user(Some(user));
        let mut conn = mysql_async::Conn::new(opts)
            .await
            .with_context(|| format!("connecting to the server at {}", socket.display()))?;
        let c = guest_agent::collect(&mut conn, &guest_agent::Config { disks, pid }).await?;
        let _ = conn.disconnect().await;
        anyhow::Ok(c)
    })?;
    eprintln!("{}", serde_json::to_string(&collected.stats)?);
    let bytes = if json {
        let mut s = String::new();
        for h in &collected.hints {
            s.push_str(&format!(
                "{{\"gpa\":{},\"disk\":{},\"disk_offset\":{},\"space\":{},\"page\":{},\"lsn\":{},\"clean\":{}}}\n",
                h.gpa, h.disk, h.disk_offset, h.space, h.page_no, h.lsn, h.clean
            ));
        }
        s.into_bytes()
    } else {
        dbmigrate_core::rebuild::encode_hints(&collected.hints)
    };
    match out {
        Some(p) => std::fs::write(&p, bytes).with_context(|| format!("writing {}", p.display()))?,
        None => std::io::stdout()
            .write_all(&bytes)
            .context("writing hints")?,
    }
    Ok(())
}
