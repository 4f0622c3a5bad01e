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

/// Where the database server and the VM's disks are.
#[derive(clap::Args)]
struct ServerArgs {
    /// Server socket (default: the option file's, else
    /// /run/mysqld/mysqld.sock). Only the guest-side scan (`--hint-scan
    /// guest` on the host) and `export` use SQL; the file layout needs none.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// SQL user (default: the option file's, else root, which Debian's
    /// MariaDB authenticates by the socket's peer).
    #[arg(long)]
    user: Option<String>,
    /// Option file with the login, as MySQL's clients read it: `user`,
    /// `password` and `socket` of its `[client]` and
    /// `[dbmigrate-guest-agent]` groups (keep it mode 0600).
    #[arg(long)]
    defaults_file: Option<PathBuf>,
    /// The VM's disks in hint order (first = disk 0).
    #[arg(long = "disk", default_value = "/dev/vda")]
    disks: Vec<PathBuf>,
    /// Server pid (default: the process named mariadbd or mysqld).
    #[arg(long)]
    pid: Option<u32>,
}

#[derive(Subcommand)]
enum Command {
    /// Take a census of this VM's memory and print the pages of each kind
    /// (free, file cache, the server's buffer pool, ...) as JSON.
    Census {
        /// Server pid (default: the process named mariadbd or mysqld; none
        /// found: its memory counts as any process's).
        #[arg(long)]
        pid: Option<u32>,
    },
    /// Collect hints once and write them (binary hint set, or JSON lines with --json).
    Export {
        #[command(flatten)]
        server: ServerArgs,
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
        #[command(flatten)]
        server: ServerArgs,
        /// Collect in the background every this many seconds and answer at
        /// once from the newest set; 0 collects when asked (no cost between
        /// migrations, but the host waits for the collection).
        #[arg(long, default_value_t = 0.0)]
        refresh_s: f64,
        /// Seconds between two readings of the server's buffer-pool list.
        #[arg(long, default_value_t = 60.0)]
        sql_refresh_s: f64,
        /// Keep the file layout made in the background, and answer a layout
        /// request with it at once: it is made again when the server's
        /// resident size moves by more than 1 % (the buffer pool warming
        /// up; checked every second, renewed at most every 2 s) and at
        /// least every this many seconds. 0 makes it when asked (no cost
        /// between migrations, but the host waits 0.4-0.7 s on a busy
        /// one-vCPU guest). A stale layout costs hints, never bytes: the
        /// host checks every frame it finds and the destination every page.
        #[arg(long, default_value_t = 60.0)]
        layout_refresh_s: f64,
        /// Nice value of the background threads (they yield to the database).
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(i32).range(0..=19))]
        nice: i32,
        /// Nice value while answering a request: a host agent waiting for
        /// the answer holds a migration up, so by default the answer goes
        /// ahead of the database's threads for the second it takes.
        #[arg(long, default_value_t = -5, value_parser = clap::value_parser!(i32).range(-20..=19))]
        answer_nice: i32,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colour only on a terminal: the journal or a pipe gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
    let (login, disks, pid, out, json) = match cli.command {
        Command::Census { pid } => return print_census(pid),
        Command::Export { server, out, json } => (
            guest_agent::login::Login::new(
                server.socket,
                server.user,
                server.defaults_file.as_deref(),
            )?,
            server.disks,
            server.pid,
            out,
            json,
        ),
        Command::Serve {
            port,
            server:
                ServerArgs {
                    socket,
                    user,
                    defaults_file,
                    disks,
                    pid,
                },
            refresh_s,
            sql_refresh_s,
            layout_refresh_s,
            nice,
            answer_nice,
        } => {
            let secs = |v: f64, flag: &str| {
                if v == 0.0 && flag != "--sql-refresh-s" {
                    Ok(std::time::Duration::ZERO)
                } else if v.is_finite() && (0.1..=86_400.0).contains(&v) {
                    Ok(std::time::Duration::from_secs_f64(v))
                } else {
                    Err(anyhow::anyhow!(
                        "{flag} must be between 0.1 and 86400 seconds"
                    ))
                }
            };
            return serve(
                port,
                guest_agent::login::Login::new(socket, user, defaults_file.as_deref())?,
                guest_agent::Config { disks, pid },
                secs(refresh_s, "--refresh-s")?,
                secs(sql_refresh_s, "--sql-refresh-s")?,
                secs(layout_refresh_s, "--layout-refresh-s")?,
                nice,
                answer_nice,
            );
        }
    };
    let collected = rt.block_on(async {
        let mut conn = connect(&login).await?;
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
        dbmigrate_core::protocol::guest::encode_hints(&collected.hints, 0)
    };
    match out {
        Some(p) => std::fs::write(&p, bytes).with_context(|| format!("writing {}", p.display()))?,
        None => std::io::stdout()
            .write_all(&bytes)
            .context("writing hints")?,
    }
    Ok(())
}

async fn connect(login: &guest_agent::login::Login) -> Result<mysql_async::Conn> {
    mysql_async::Conn::new(login.opts()).await.with_context(|| {
        format!(
            "connecting to the server at {} as {}",
            login.socket.display(),
            login.user
        )
    })
}

/// Scans with `snap` (its "listed" filter applies only if it was taken just
/// now) and reports the collection: a log record, and a `DBM-AGENT` line on
/// standard output for whoever watches the guest's console.
fn scan_reported(
    snap: &(std::time::Instant, guest_agent::ServerSnapshot),
    cfg: &guest_agent::Config,
    started: std::time::Instant,
) -> Result<guest_agent::Collected> {
    let (taken, s) = snap;
    let col = guest_agent::scan(s, cfg, taken.elapsed() < std::time::Duration::from_secs(1))?;
    let ms = dbmigrate_core::stats::millis(started.elapsed());
    tracing::info!(ms, stats = ?col.stats, "hints collected");
    println!(
        "DBM-AGENT collected ms={ms} {}",
        serde_json::to_string(&col.stats).unwrap_or_default()
    );
    Ok(col)
}

async fn take_snapshot(
    conn: &mut Option<mysql_async::Conn>,
    login: &guest_agent::login::Login,
    cfg: &guest_agent::Config,
) -> Result<(std::time::Instant, guest_agent::ServerSnapshot)> {
    if conn.is_none() {
        *conn = Some(connect(login).await?);
    }
    let c = conn.as_mut().expect("connected above");
    match guest_agent::query_server(c, cfg).await {
        Ok(s) => Ok((std::time::Instant::now(), s)),
        Err(e) => {
            *conn = None;
            Err(anyhow::Error::new(e))
        }
    }
}

/// Makes the file layout: the server's tablespace files from /proc (no
/// SQL), FIEMAP of each file and the pagemap of the server's buffer pool.
fn make_layout(cfg: &guest_agent::Config) -> Result<dbmigrate_core::protocol::guest::LayoutSet> {
    guest_agent::layout(cfg).map_err(anyhow::Error::new)
}

/// The file layout, encoded as the answer to request `tag` (or the reason
/// there is none): the kept one if there is one young enough, else one made
/// now.
fn answer_layout(kept: Option<&KeptLayout>, cfg: &guest_agent::Config, tag: u32) -> Vec<u8> {
    let started = std::time::Instant::now();
    let young = kept.and_then(|k| k.young());
    let (result, age_ms) = match young {
        Some((age, set)) => (Ok(set), Some(age.as_millis())),
        None => (make_layout(cfg), None),
    };
    match result {
        Ok(set) => {
            let extents: usize = set.files.iter().map(|f| f.extents.len()).sum();
            let ms = started.elapsed().as_millis();
            tracing::info!(
                files = set.files.len(),
                extents,
                ms,
                age_ms,
                "layout answered"
            );
            let kept = age_ms
                .map(|a| format!(" kept_age_ms={a}"))
                .unwrap_or_default();
            println!(
                "DBM-AGENT layout ms={ms} files={} extents={extents}{kept}",
                set.files.len()
            );
            dbmigrate_core::protocol::guest::encode_layout(&set, tag)
        }
        Err(e) => dbmigrate_core::protocol::guest::encode_hint_error(tag, &format!("{e:#}")),
    }
}

/// The layout a background thread keeps (when it was made, the server's
/// resident pages then), and at least how often it renews it.
struct KeptLayout {
    newest: std::sync::Mutex<
        Option<(
            std::time::Instant,
            dbmigrate_core::protocol::guest::LayoutSet,
            u64,
        )>,
    >,
    refresh: std::time::Duration,
}

impl KeptLayout {
    /// The kept layout and its age, unless it is older than two renewals
    /// (the keeper failed or starves: a layout made now is better).
    fn young(
        &self,
    ) -> Option<(
        std::time::Duration,
        dbmigrate_core::protocol::guest::LayoutSet,
    )> {
        let newest = self.newest.lock().ok()?;
        let (made, set, _) = newest.as_ref()?;
        let age = made.elapsed();
        (age <= self.refresh * 2).then(|| (age, set.clone()))
    }
}

/// Lowers this background thread's priority to `nice` (a warning if it
/// cannot) and gives it a runtime of its own.
fn background_runtime(what: &str, nice: i32) -> std::io::Result<tokio::runtime::Runtime> {
    if let Err(e) = dbmigrate_core::priority::set_this_thread_nice(nice) {
        tracing::warn!("cannot lower the {what}'s priority: {e}");
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// Keeps `kept` current (see `--layout-refresh-s`), at the background
/// priority.
fn layout_keeper(kept: std::sync::Arc<KeptLayout>, cfg: guest_agent::Config, nice: i32) {
    if let Err(e) = dbmigrate_core::priority::set_this_thread_nice(nice) {
        tracing::warn!("cannot lower the layout keeper's priority: {e}");
    }
    const CHECK: std::time::Duration = std::time::Duration::from_secs(1);
    const MIN_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);
    let mut last_try: Option<std::time::Instant> = None;
    loop {
        // No server (yet): nothing to keep; requests say why themselves.
        if let Ok(resident) = guest_agent::server_resident_pages(&cfg) {
            let then = kept
                .newest
                .lock()
                .ok()
                .and_then(|n| n.as_ref().map(|(made, _, r)| (made.elapsed(), *r)));
            // After a failure, wait as long as after a success.
            let retry_ok = last_try.is_none_or(|t| t.elapsed() >= MIN_INTERVAL);
            if retry_ok && guest_agent::layout_is_stale(then, resident, kept.refresh, MIN_INTERVAL)
            {
                let started = std::time::Instant::now();
                last_try = Some(started);
                match make_layout(&cfg) {
                    Ok(set) => {
                        tracing::info!(
                            ms = started.elapsed().as_millis(),
                            resident,
                            "kept layout renewed"
                        );
                        if let Ok(mut newest) = kept.newest.lock() {
                            *newest = Some((started, set, resident));
                        }
                    }
                    // Requests meanwhile make their own, and say why if they fail too.
                    Err(e) => tracing::warn!("renewing the kept layout failed: {e:#}"),
                }
            }
        }
        std::thread::sleep(CHECK);
    }
}

/// The newest hint set the collector made, or why it could not make one.
#[derive(Default)]
struct Latest {
    set: Option<std::sync::Arc<Vec<u8>>>,
    error: Option<String>,
}

/// Collects hints in the background, at low priority, every `refresh`; the
/// server's view (the SQL half) is renewed every `sql_refresh`. Runs on its
/// own thread so that answering the host never waits for a collection.
fn collector(
    shared: std::sync::Arc<(std::sync::Mutex<Latest>, std::sync::Condvar)>,
    login: guest_agent::login::Login,
    cfg: guest_agent::Config,
    refresh: std::time::Duration,
    sql_refresh: std::time::Duration,
    nice: i32,
) {
    use dbmigrate_core::protocol::guest::encode_hints;
    let rt = match background_runtime("collector", nice) {
        Ok(rt) => rt,
        Err(e) => {
            let (m, c) = &*shared;
            if let Ok(mut l) = m.lock() {
                l.error = Some(format!("cannot start the collector: {e}"));
            }
            c.notify_all();
            return;
        }
    };
    let mut conn: Option<mysql_async::Conn> = None;
    let mut snap: Option<(std::time::Instant, guest_agent::ServerSnapshot)> = None;
    loop {
        let started = std::time::Instant::now();
        let result = rt.block_on(async {
            if snap
                .as_ref()
                .is_none_or(|(t, _)| t.elapsed() >= sql_refresh)
            {
                snap = Some(take_snapshot(&mut conn, &login, &cfg).await?);
            }
            scan_reported(snap.as_ref().expect("taken above"), &cfg, started)
        });
        let (m, c) = &*shared;
        match result {
            Ok(col) => {
                let set = std::sync::Arc::new(encode_hints(&col.hints, 0));
                if let Ok(mut l) = m.lock() {
                    l.set = Some(set);
                    l.error = None;
                }
            }
            Err(e) => {
                tracing::warn!("collecting hints failed: {e:#}");
                if let Ok(mut l) = m.lock() {
                    l.error = Some(format!("{e:#}"));
                }
            }
        }
        c.notify_all();
        std::thread::sleep(refresh);
    }
}

/// `census`: pages of each kind, as one JSON object.
fn print_census(pid: Option<u32>) -> Result<()> {
    let cfg = guest_agent::Config {
        disks: Vec::new(),
        pid,
    };
    let runs = guest_agent::take_census(&cfg)?;
    let kinds: serde_json::Map<String, serde_json::Value> =
        guest_agent::census::pages_by_kind(&runs)
            .into_iter()
            .map(|(k, n)| (k.name().to_string(), n.into()))
            .collect();
    println!(
        "{}",
        serde_json::json!({ "runs": runs.len(), "pages": kinds })
    );
    Ok(())
}

/// The answer to a census request: the census, or why there is none.
fn answer_census(cfg: &guest_agent::Config, tag: u32) -> Vec<u8> {
    use dbmigrate_core::protocol::guest::{encode_census, encode_hint_error};
    let started = std::time::Instant::now();
    match guest_agent::take_census(cfg) {
        Ok(runs) => {
            tracing::info!(
                runs = runs.len(),
                ms = dbmigrate_core::stats::millis(started.elapsed()),
                "memory census taken"
            );
            encode_census(&runs, tag)
        }
        Err(e) => encode_hint_error(tag, &format!("{e:#}")),
    }
}

/// The answer to a page-cache request: hints for the clean page cache of
/// the guest's open and mapped files, or why there are none.
fn answer_page_cache(cfg: &guest_agent::Config, tag: u32) -> Vec<u8> {
    use dbmigrate_core::protocol::guest::{encode_hint_error, encode_hints, MAX_HINTS};
    let started = std::time::Instant::now();
    match guest_agent::page_cache_hints(cfg, MAX_HINTS) {
        Ok((hints, stats)) => {
            tracing::info!(
                ms = dbmigrate_core::stats::millis(started.elapsed()),
                ?stats,
                "page-cache hints collected"
            );
            encode_hints(&hints, tag)
        }
        Err(e) => encode_hint_error(tag, &format!("{e:#}")),
    }
}

/// Serves hint requests: each 8-byte request (magic, tag) is answered at
/// once with the newest hint set (or the reason there is none), tagged
/// alike. The port reads as end-of-file while no host agent is connected, so
/// reads are retried after a pause.
#[allow(clippy::too_many_arguments)]
fn serve(
    port: PathBuf,
    login: guest_agent::login::Login,
    cfg: guest_agent::Config,
    refresh: std::time::Duration,
    sql_refresh: std::time::Duration,
    layout_refresh: std::time::Duration,
    nice: i32,
    answer_nice: i32,
) -> Result<()> {
    use dbmigrate_core::protocol::guest::{encode_hint_error, parse_guest_request, GuestRequest};
    use std::io::Read;
    // This thread only waits for requests and answers them; the background
    // collector sets its own priority.
    if let Err(e) = dbmigrate_core::priority::set_this_thread_nice(answer_nice) {
        tracing::warn!("cannot set the answering thread's priority to {answer_nice}: {e}");
    }
    let mut dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&port)
        .with_context(|| format!("opening the virtio-serial port {}", port.display()))?;
    let shared = std::sync::Arc::new((
        std::sync::Mutex::new(Latest::default()),
        std::sync::Condvar::new(),
    ));
    let on_demand = refresh.is_zero();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let mut conn: Option<mysql_async::Conn> = None;
    let mut snap = None;
    if on_demand {
        // Ready before the first request, so that it waits only for a scan.
        match rt.block_on(take_snapshot(&mut conn, &login, &cfg)) {
            Ok(s) => snap = Some(s),
            Err(e) => {
                tracing::warn!("reading the server's view failed (retried on request): {e:#}")
            }
        }
    } else {
        let bg = shared.clone();
        let (login, cfg) = (login.clone(), cfg.clone());
        std::thread::Builder::new()
            .name("collector".into())
            .spawn(move || collector(bg, login, cfg, refresh, sql_refresh, nice))
            .context("starting the collector thread")?;
    }
    let kept = (!layout_refresh.is_zero()).then(|| {
        std::sync::Arc::new(KeptLayout {
            newest: std::sync::Mutex::new(None),
            refresh: layout_refresh,
        })
    });
    if let Some(k) = &kept {
        let k = k.clone();
        let cfg = cfg.clone();
        std::thread::Builder::new()
            .name("layout".into())
            .spawn(move || layout_keeper(k, cfg, nice))
            .context("starting the layout keeper thread")?;
    }
    tracing::info!(port = %port.display(), "serving hint requests");
    let mut req = [0u8; 8];
    let mut have = 0;
    loop {
        let n = dev
            .read(&mut req[have..])
            .context("reading the virtio-serial port")?;
        if n == 0 {
            have = 0;
            std::thread::sleep(std::time::Duration::from_millis(200));
            continue;
        }
        have += n;
        if have < req.len() {
            continue;
        }
        have = 0;
        let tag = match parse_guest_request(&req) {
            Some(GuestRequest::Hints(tag)) => tag,
            Some(GuestRequest::Census(tag)) => {
                let answer = answer_census(&cfg, tag);
                dev.write_all(&answer)
                    .context("writing to the virtio-serial port")?;
                continue;
            }
            Some(GuestRequest::PageCache(tag)) => {
                let answer = answer_page_cache(&cfg, tag);
                dev.write_all(&answer)
                    .context("writing to the virtio-serial port")?;
                continue;
            }
            Some(GuestRequest::Disks(tag)) => {
                let disks = guest_agent::disk::identities(&cfg.disks);
                tracing::info!(?disks, "disks named");
                let answer = dbmigrate_core::protocol::guest::encode_disks(&disks, tag);
                dev.write_all(&answer)
                    .context("writing to the virtio-serial port")?;
                continue;
            }
            Some(GuestRequest::Layout(tag)) => {
                let answer = answer_layout(kept.as_deref(), &cfg, tag);
                dev.write_all(&answer)
                    .context("writing to the virtio-serial port")?;
                continue;
            }
            None => {
                // Answered, so that a newer host agent asking for something
                // this agent lacks is told at once instead of waiting.
                tracing::warn!("answering an unknown request with an error");
                let tag = u32::from_le_bytes([req[4], req[5], req[6], req[7]]);
                let answer = encode_hint_error(
                    tag,
                    "unknown request: this guest agent is older than the host agent (update dbmigrate-guest-agent)",
                );
                dev.write_all(&answer)
                    .context("writing to the virtio-serial port")?;
                continue;
            }
        };
        if on_demand {
            // The scan answers now, with the server's view from after the
            // previous answer (or from startup); the view is renewed after
            // answering, so the SQL never delays an answer.
            let started = std::time::Instant::now();
            let answer = rt.block_on(async {
                if snap.is_none() {
                    snap = Some(take_snapshot(&mut conn, &login, &cfg).await?);
                }
                scan_reported(snap.as_ref().expect("taken above"), &cfg, started)
            });
            let answer = match answer {
                Ok(col) => dbmigrate_core::protocol::guest::encode_hints(&col.hints, tag),
                Err(e) => encode_hint_error(tag, &format!("{e:#}")),
            };
            dev.write_all(&answer)
                .context("writing to the virtio-serial port")?;
            match rt.block_on(take_snapshot(&mut conn, &login, &cfg)) {
                Ok(s) => snap = Some(s),
                Err(e) => tracing::warn!("renewing the server's view failed: {e:#}"),
            }
            continue;
        }
        // Before the first collection finishes, wait for it (bounded).
        let (m, c) = &*shared;
        let mut l = m
            .lock()
            .map_err(|_| anyhow::anyhow!("collector state poisoned"))?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while l.set.is_none() && l.error.is_none() && std::time::Instant::now() < deadline {
            l = c
                .wait_timeout(l, std::time::Duration::from_millis(500))
                .map_err(|_| anyhow::anyhow!("collector state poisoned"))?
                .0;
        }
        let answer = match (&l.set, &l.error) {
            (Some(set), _) => {
                let mut b = set.as_ref().clone();
                b[12..16].copy_from_slice(&tag.to_le_bytes());
                b
            }
            (None, Some(e)) => encode_hint_error(tag, e),
            (None, None) => encode_hint_error(tag, "the first collection is still running"),
        };
        drop(l);
        dev.write_all(&answer)
            .context("writing to the virtio-serial port")?;
    }
}

#[cfg(test)]
mod tests {
    use super::KeptLayout;
    use dbmigrate_core::protocol::guest::LayoutSet;
    use std::time::{Duration, Instant};

    #[test]
    fn a_kept_layout_answers_until_two_renewals_old() {
        let kept = KeptLayout {
            newest: std::sync::Mutex::new(None),
            refresh: Duration::from_secs(60),
        };
        assert!(kept.young().is_none(), "nothing kept yet");
        let set = LayoutSet {
            page_size: 16384,
            ..LayoutSet::default()
        };
        let made = |ago: u64| {
            Instant::now()
                .checked_sub(Duration::from_secs(ago))
                .unwrap()
        };
        *kept.newest.lock().unwrap() = Some((made(90), set.clone(), 1));
        let (age, got) = kept.young().expect("90 s old, renewed every 60 s");
        assert!(age >= Duration::from_secs(90));
        assert_eq!(got, set);
        *kept.newest.lock().unwrap() = Some((made(121), set, 1));
        assert!(kept.young().is_none(), "the keeper missed two renewals");
    }
}
