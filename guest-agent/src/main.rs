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
    /// Answer hint requests of the host agent on a virtio-serial port, until killed.
    Serve {
        /// The virtio-serial port (e.g. /dev/vport1p1, named org.dbmigrate.hints).
        #[arg(long)]
        port: PathBuf,
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
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let (socket, user, disks, pid, out, json) = match cli.command {
        Command::Export {
            socket,
            user,
            disks,
            pid,
            out,
            json,
        } => (socket, user, disks, pid, out, json),
        Command::Serve {
            port,
            socket,
            user,
            disks,
            pid,
        } => {
            return rt.block_on(serve(
                port,
                socket,
                user,
                guest_agent::Config { disks, pid },
            ))
        }
    };
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
        dbmigrate_core::rebuild::encode_hints(&collected.hints, 0)
    };
    match out {
        Some(p) => std::fs::write(&p, bytes).with_context(|| format!("writing {}", p.display()))?,
        None => std::io::stdout()
            .write_all(&bytes)
            .context("writing hints")?,
    }
    Ok(())
}

async fn connect(socket: &std::path::Path, user: &str) -> Result<mysql_async::Conn> {
    let opts = mysql_async::OptsBuilder::default()
        .socket(Some(socket.to_string_lossy().into_owned()))
        .user(Some(user.to_string()));
    mysql_async::Conn::new(opts)
        .await
        .with_context(|| format!("connecting to the server at {}", socket.display()))
}

/// Serves hint requests: each 8-byte request (magic, tag) gets one answer, a
/// hint set or an error, tagged alike. The port reads as end-of-file while no
/// host agent is connected, so reads are retried after a pause.
async fn serve(
    port: PathBuf,
    socket: PathBuf,
    user: String,
    cfg: guest_agent::Config,
) -> Result<()> {
    use dbmigrate_core::rebuild::{encode_hint_error, encode_hints, parse_hint_request};
    use std::io::Read;
    let mut dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&port)
        .with_context(|| format!("opening the virtio-serial port {}", port.display()))?;
    tracing::info!(port = %port.display(), "serving hint requests");
    let mut conn: Option<mysql_async::Conn> = None;
    let mut req = [0u8; 8];
    let mut have = 0;
    loop {
        let n = dev
            .read(&mut req[have..])
            .context("reading the virtio-serial port")?;
        if n == 0 {
            have = 0;
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            continue;
        }
        have += n;
        if have < req.len() {
            continue;
        }
        have = 0;
        let Some(tag) = parse_hint_request(&req) else {
            tracing::warn!("ignoring a malformed request");
            continue;
        };
        let started = std::time::Instant::now();
        if conn.is_none() {
            conn = connect(&socket, &user)
                .await
                .map_err(|e| tracing::warn!("{e:#}"))
                .ok();
        }
        let answer = match conn.as_mut() {
            None => encode_hint_error(
                tag,
                &format!(
                    "cannot connect to the database server at {}",
                    socket.display()
                ),
            ),
            Some(c) => match guest_agent::collect(c, &cfg).await {
                Ok(col) => {
                    tracing::info!(tag, ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX), stats = ?col.stats, "hints collected");
                    encode_hints(&col.hints, tag)
                }
                Err(e) => {
                    conn = None;
                    encode_hint_error(tag, &format!("{e:#}"))
                }
            },
        };
        dev.write_all(&answer)
            .context("writing to the virtio-serial port")?;
    }
}
