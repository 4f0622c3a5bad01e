//! A small NBD client (fixed newstyle handshake, `NBD_OPT_GO`, simple
//! replies, reads only): how the destination agent reads the VM's disks from
//! the same `qemu-nbd` server the QEMUs use. One connection per concurrent
//! reader, kept in a pool; every length from the server is bounded.

use crate::addr::DiskOffset;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::Duration;

use super::{Storage, StorageError};
use thiserror::Error;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const INFO_EXPORT: u16 = 0;
const CMD_READ: u16 = 0;
const CMD_DISC: u16 = 2;
/// Longest option reply we accept (info replies are a few bytes).
const MAX_OPT_REPLY: u32 = 64 * 1024;
/// Longest read we issue (servers may refuse more than 32 MiB).
const MAX_READ: usize = 8 << 20;

/// NBD failures.
#[derive(Debug, Error)]
pub enum NbdError {
    /// The address is not `nbd://host:port[/export]`.
    #[error("`{0}` is not an NBD address: use nbd://HOST:PORT or nbd://HOST:PORT/EXPORT")]
    Url(String),
    /// Connecting or talking failed.
    #[error("NBD server {addr}: {doing}")]
    Io {
        /// Server.
        addr: String,
        /// What was being done.
        doing: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The server said something we do not accept.
    #[error("NBD server {addr} {problem}")]
    Protocol {
        /// Server.
        addr: String,
        /// What.
        problem: String,
    },
}

/// Splits `nbd://host:port[/export]`.
pub fn parse_url(url: &str) -> Result<(String, String), NbdError> {
    let rest = url
        .strip_prefix("nbd://")
        .ok_or_else(|| NbdError::Url(url.into()))?;
    let (addr, export) = rest.split_once('/').unwrap_or((rest, ""));
    if addr.is_empty() || !addr.contains(':') {
        return Err(NbdError::Url(url.into()));
    }
    Ok((addr.to_string(), export.to_string()))
}

struct Conn {
    s: TcpStream,
    next_handle: u64,
}

/// One export of an NBD server.
pub struct NbdDisk {
    addr: String,
    export: String,
    size: u64,
    timeout: Duration,
    pool: Mutex<Vec<Conn>>,
}

impl NbdDisk {
    /// Connects once (to learn the size) and keeps the connection.
    /// `timeout` bounds connecting and every read: a cut storage link
    /// turns into an error after it, not into a hang.
    pub fn open(url: &str, timeout: Duration) -> Result<Self, NbdError> {
        let (addr, export) = parse_url(url)?;
        let (conn, size) = handshake(&addr, &export, timeout)?;
        Ok(Self {
            addr,
            export,
            size,
            timeout,
            pool: Mutex::new(vec![conn]),
        })
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&self, offset: DiskOffset, buf: &mut [u8]) -> Result<(), NbdError> {
        self.check_range(offset, buf.len(), usize::MAX)?;
        self.with_conn(|conn| {
            let mut done = 0;
            while done < buf.len() {
                let n = (buf.len() - done).min(MAX_READ);
                self.read_one(
                    conn,
                    DiskOffset(offset.0 + done as u64),
                    &mut buf[done..done + n],
                )?;
                done += n;
            }
            Ok(())
        })
    }

    /// Reads every `(offset, buffer)` with all requests in flight on one
    /// connection (the server may answer in any order; replies are matched
    /// by handle). Each read must fit one request ([`MAX_READ`]).
    pub fn read_many(&self, reads: &mut [(DiskOffset, &mut [u8])]) -> Result<(), NbdError> {
        for (offset, buf) in reads.iter() {
            self.check_range(*offset, buf.len(), MAX_READ)?;
        }
        self.with_conn(|conn| self.pipelined(conn, reads))
    }

    /// Refuses, before anything is sent, a read beyond the export or longer than `max`.
    fn check_range(&self, offset: DiskOffset, len: usize, max: usize) -> Result<(), NbdError> {
        let end = offset.0.checked_add(len as u64);
        if len > max || end.is_none_or(|e| e > self.size) {
            return Err(NbdError::Protocol {
                addr: self.addr.clone(),
                problem: format!(
                    "export is {} bytes; refusing a read of {len} at {offset}",
                    self.size
                ),
            });
        }
        Ok(())
    }

    /// Runs `f` on a pooled connection (a new one if none is free); a
    /// connection that failed is dropped, not returned to the pool.
    fn with_conn<T>(
        &self,
        f: impl FnOnce(&mut Conn) -> Result<T, NbdError>,
    ) -> Result<T, NbdError> {
        let taken = self.pool.lock().map(|mut p| p.pop()).unwrap_or(None);
        let mut conn = match taken {
            Some(c) => c,
            None => handshake(&self.addr, &self.export, self.timeout)?.0,
        };
        let r = f(&mut conn)?;
        if let Ok(mut p) = self.pool.lock() {
            p.push(conn);
        }
        Ok(r)
    }

    fn pipelined(
        &self,
        c: &mut Conn,
        reads: &mut [(DiskOffset, &mut [u8])],
    ) -> Result<(), NbdError> {
        let io = |doing| {
            let addr = self.addr.clone();
            move |source| NbdError::Io {
                addr,
                doing,
                source,
            }
        };
        let base = c.next_handle;
        c.next_handle += reads.len() as u64;
        let mut req = Vec::with_capacity(28 * reads.len());
        for (i, (offset, buf)) in reads.iter().enumerate() {
            req.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
            req.extend_from_slice(&0u16.to_be_bytes());
            req.extend_from_slice(&CMD_READ.to_be_bytes());
            req.extend_from_slice(&(base + i as u64).to_be_bytes());
            req.extend_from_slice(&offset.0.to_be_bytes());
            req.extend_from_slice(&u32::try_from(buf.len()).unwrap_or(u32::MAX).to_be_bytes());
        }
        c.s.write_all(&req).map_err(io("sending read requests"))?;
        let mut done = vec![false; reads.len()];
        for _ in 0..reads.len() {
            let mut rep = [0u8; 16];
            c.s.read_exact(&mut rep).map_err(io("reading a reply"))?;
            let magic = u32::from_be_bytes(rep[0..4].try_into().expect("4 bytes"));
            let error = u32::from_be_bytes(rep[4..8].try_into().expect("4 bytes"));
            let got = u64::from_be_bytes(rep[8..16].try_into().expect("8 bytes"));
            let idx = got
                .checked_sub(base)
                .and_then(|i| usize::try_from(i).ok())
                .filter(|&i| i < reads.len() && !done[i]);
            let Some(idx) = idx.filter(|_| magic == SIMPLE_REPLY_MAGIC) else {
                return Err(NbdError::Protocol {
                    addr: self.addr.clone(),
                    problem: format!(
                        "sent a reply with magic {magic:#x} for handle {got}, not one of the {} reads in flight",
                        reads.len()
                    ),
                });
            };
            done[idx] = true;
            if error != 0 {
                return Err(NbdError::Io {
                    addr: self.addr.clone(),
                    doing: "reading",
                    source: io::Error::from_raw_os_error(i32::try_from(error).unwrap_or(libc::EIO)),
                });
            }
            c.s.read_exact(reads[idx].1).map_err(io("reading data"))?;
        }
        Ok(())
    }

    /// One read: the pipelined path with a single request in flight.
    fn read_one(&self, c: &mut Conn, offset: DiskOffset, buf: &mut [u8]) -> Result<(), NbdError> {
        self.pipelined(c, &mut [(offset, buf)])
    }
}

impl Drop for NbdDisk {
    fn drop(&mut self) {
        if let Ok(mut p) = self.pool.lock() {
            for mut c in p.drain(..) {
                let mut req = Vec::with_capacity(28);
                req.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
                req.extend_from_slice(&0u16.to_be_bytes());
                req.extend_from_slice(&CMD_DISC.to_be_bytes());
                req.extend_from_slice(&[0u8; 20]);
                let _ = c.s.write_all(&req);
            }
        }
    }
}

fn handshake(addr: &str, export: &str, timeout: Duration) -> Result<(Conn, u64), NbdError> {
    let io = |doing| {
        let addr = addr.to_string();
        move |source| NbdError::Io {
            addr,
            doing,
            source,
        }
    };
    let proto = |problem: String| NbdError::Protocol {
        addr: addr.to_string(),
        problem,
    };
    let sa = addr
        .to_socket_addrs()
        .map_err(io("resolving"))?
        .next()
        .ok_or_else(|| proto("has no address".into()))?;
    let mut s = TcpStream::connect_timeout(&sa, timeout).map_err(io("connecting"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(io("setting a timeout"))?;
    s.set_write_timeout(Some(timeout))
        .map_err(io("setting a timeout"))?;
    let _ = s.set_nodelay(true);
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello)
        .map_err(io("reading the greeting"))?;
    let magic = u64::from_be_bytes(hello[0..8].try_into().expect("8 bytes"));
    let opt = u64::from_be_bytes(hello[8..16].try_into().expect("8 bytes"));
    let flags = u16::from_be_bytes([hello[16], hello[17]]);
    if magic != NBDMAGIC || opt != IHAVEOPT {
        return Err(proto(
            "is not a newstyle NBD server (old qemu-nbd? start it without --oldstyle)".into(),
        ));
    }
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(proto("does not offer fixed newstyle negotiation".into()));
    }
    let client_flags = u32::from(flags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
    let name = export.as_bytes();
    let mut o = Vec::new();
    o.extend_from_slice(&client_flags.to_be_bytes());
    o.extend_from_slice(&IHAVEOPT.to_be_bytes());
    o.extend_from_slice(&OPT_GO.to_be_bytes());
    o.extend_from_slice(
        &u32::try_from(4 + name.len() + 2)
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    o.extend_from_slice(&u32::try_from(name.len()).unwrap_or(u32::MAX).to_be_bytes());
    o.extend_from_slice(name);
    o.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&o).map_err(io("sending NBD_OPT_GO"))?;
    let mut size = None;
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h)
            .map_err(io("reading an option reply"))?;
        let magic = u64::from_be_bytes(h[0..8].try_into().expect("8 bytes"));
        let rtype = u32::from_be_bytes(h[12..16].try_into().expect("4 bytes"));
        let len = u32::from_be_bytes(h[16..20].try_into().expect("4 bytes"));
        if magic != OPT_REPLY_MAGIC || len > MAX_OPT_REPLY {
            return Err(proto(format!(
                "sent a bad option reply (magic {magic:#x}, {len} bytes)"
            )));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)
            .map_err(io("reading an option reply"))?;
        match rtype {
            REP_ACK => break,
            REP_INFO
                if data.len() >= 12 && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT =>
            {
                size = Some(u64::from_be_bytes(data[2..10].try_into().expect("8 bytes")));
            }
            t if t & 0x8000_0000 != 0 => {
                let msg = String::from_utf8_lossy(&data);
                return Err(proto(format!(
                    "refused export `{export}` (error {:#x}{}{msg}): check the export name",
                    t,
                    if msg.is_empty() { "" } else { ": " }
                )));
            }
            _ => {}
        }
    }
    let size = size.ok_or_else(|| proto("did not say the export size".into()))?;
    Ok((Conn { s, next_handle: 1 }, size))
}

/// The VM's disks, read over NBD, as the engine's storage.
pub struct NbdStorage {
    disks: Vec<NbdDisk>,
    sizes: Vec<u64>,
}

impl NbdStorage {
    /// Opens each `nbd://` address (disk index = position).
    pub fn open(urls: &[String], timeout: Duration) -> Result<Self, NbdError> {
        let disks = urls
            .iter()
            .map(|u| NbdDisk::open(u, timeout))
            .collect::<Result<Vec<_>, _>>()?;
        let sizes = disks.iter().map(NbdDisk::size).collect();
        Ok(Self { disks, sizes })
    }
}

impl Storage for NbdStorage {
    fn disk_sizes(&self) -> &[u64] {
        &self.sizes
    }

    fn read_at(&self, disk: u16, offset: DiskOffset, buf: &mut [u8]) -> Result<(), StorageError> {
        let len = buf.len();
        let d = self
            .disks
            .get(usize::from(disk))
            .ok_or_else(|| StorageError::no_such_disk(disk, offset, len))?;
        d.read_at(offset, buf).map_err(|e| StorageError::Read {
            disk,
            offset,
            len,
            source: io::Error::other(e.to_string()),
        })
    }

    fn read_many(
        &self,
        disk: u16,
        reads: &mut [(DiskOffset, &mut [u8])],
    ) -> Result<(), StorageError> {
        let (offset, len) = reads
            .first()
            .map_or((DiskOffset(0), 0), |(o, b)| (*o, b.len()));
        let err = |source| StorageError::Read {
            disk,
            offset,
            len,
            source,
        };
        let d = self
            .disks
            .get(usize::from(disk))
            .ok_or_else(|| StorageError::no_such_disk(disk, offset, len))?;
        d.read_many(reads)
            .map_err(|e| err(io::Error::other(e.to_string())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("nbd://10.0.0.1:10809").unwrap(),
            ("10.0.0.1:10809".into(), String::new())
        );
        assert_eq!(
            parse_url("nbd://h:1/disk0").unwrap(),
            ("h:1".into(), "disk0".into())
        );
        assert!(parse_url("10.0.0.1:10809").is_err());
        assert!(parse_url("nbd://nohost").is_err());
        assert!(parse_url("nbd:///x").is_err());
    }

    /// Against a real qemu-nbd (installed by scripts/setup.sh with qemu-utils).
    #[test]
    fn reads_from_a_real_qemu_nbd() {
        use std::os::unix::fs::FileExt;
        let dir = std::env::temp_dir().join(format!("dbm-nbd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("disk.img");
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(64 << 20).unwrap();
        let pattern: Vec<u8> = (0..(1u32 << 20))
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13).to_le_bytes()[0])
            .collect();
        f.write_all_at(&pattern, 5 << 20).unwrap();
        drop(f);
        let port = 20_000 + (std::process::id() % 20_000) as u16;
        let (mut child, disk) = serve_read_only(&img, port);
        let url = format!("nbd://127.0.0.1:{port}");
        assert_eq!(disk.size(), 64 << 20);
        let mut buf = vec![0u8; 1 << 20];
        disk.read_at(DiskOffset(5 << 20), &mut buf).unwrap();
        assert!(buf == pattern);
        // Concurrent readers get their own connections.
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let disk = &disk;
                let pattern = &pattern;
                s.spawn(move || {
                    let mut b = vec![0u8; 4096];
                    for i in 0..50u64 {
                        let off = ((t * 50 + i) * 4096) % (1 << 20);
                        disk.read_at(DiskOffset((5 << 20) + off), &mut b).unwrap();
                        assert!(b[..] == pattern[off as usize..off as usize + 4096]);
                    }
                });
            }
        });
        // Many scattered reads in flight on one connection, answered in any
        // order, each land in their own buffer.
        let offs: Vec<u64> = (0..40u64).map(|i| (i * 7919 * 4096) % (1 << 20)).collect();
        let mut bufs: Vec<Vec<u8>> = offs.iter().map(|_| vec![0u8; 16384]).collect();
        let mut reads: Vec<(DiskOffset, &mut [u8])> = offs
            .iter()
            .zip(bufs.iter_mut())
            .map(|(&o, b)| (DiskOffset((5 << 20) + o), b.as_mut_slice()))
            .collect();
        disk.read_many(&mut reads).unwrap();
        for (&o, b) in offs.iter().zip(&bufs) {
            let o = usize::try_from(o).unwrap();
            let want: Vec<u8> = (o..o + 16384).map(|i| pattern[i % (1 << 20)]).collect();
            if o + 16384 <= 1 << 20 {
                assert!(b[..] == want[..], "read at {o:#x}");
            }
        }
        // Out of range reads are refused before anything is sent.
        assert!(disk
            .read_at(DiskOffset((64 << 20) - 100), &mut buf)
            .is_err());
        let mut far = [0u8; 4096];
        assert!(disk
            .read_many(&mut [(DiskOffset((64 << 20) - 100), &mut far[..])])
            .is_err());
        // A wrong export name is a clear error.
        let e = NbdDisk::open(&format!("{url}/nope"), Duration::from_secs(10))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("export"), "{e}");
        drop(disk);
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// qemu-nbd serving `img` read-only on 127.0.0.1:`port`, and a client
    /// connected to it once it listens.
    fn serve_read_only(img: &std::path::Path, port: u16) -> (std::process::Child, NbdDisk) {
        let mut child = std::process::Command::new("qemu-nbd")
            .args([
                "--read-only",
                "--persistent",
                "--shared=8",
                "-f",
                "raw",
                "-b",
                "127.0.0.1",
                "-p",
            ])
            .arg(port.to_string())
            .arg(img)
            .spawn()
            .expect("qemu-nbd (install qemu-utils)");
        let url = format!("nbd://127.0.0.1:{port}");
        for _ in 0..100 {
            if let Ok(d) = NbdDisk::open(&url, Duration::from_secs(10)) {
                return (child, d);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("qemu-nbd did not listen on {url}");
    }

    /// Manual: NBD read throughput from a real qemu-nbd over loopback
    /// (`DBM_NBD_IMAGE=<file> cargo test --release -p host-agent nbd_throughput -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn nbd_throughput() {
        let img = std::env::var("DBM_NBD_IMAGE").expect("DBM_NBD_IMAGE");
        let (mut child, d) = serve_read_only(std::path::Path::new(&img), 10899);
        for (size, threads) in [(16384usize, 4u64), (1 << 20, 1), (1 << 20, 4)] {
            let t = std::time::Instant::now();
            let total: u64 = 1 << 30;
            std::thread::scope(|s| {
                for k in 0..threads {
                    let d = &d;
                    s.spawn(move || {
                        let mut buf = vec![0u8; size];
                        let mut off = k * size as u64;
                        while off < total {
                            d.read_at(DiskOffset(off), &mut buf).unwrap();
                            off += threads * size as u64;
                        }
                    });
                }
            });
            let secs = t.elapsed().as_secs_f64();
            eprintln!(
                "{size} B x {threads} threads: {:.0} MB/s",
                total as f64 / secs / 1e6
            );
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}
