//! Disks as files or block devices of this host (a SAN LUN, an image on a
//! shared file system), each read with a deadline.
//!
//! A read goes to a small pool of reader threads and the caller waits at
//! most the deadline for it: a hard NFS mount or a multipath device that
//! queues I/O while it has no path blocks a read in the kernel, where no
//! timeout reaches it; the caller then gets an error at once (the page is
//! asked of the source) and the stuck thread is left to finish whenever
//! the device answers again. A disk whose bytes are not the guest's at
//! their offsets (a qcow2 or LUKS image) is refused when opened.

use crate::addr::DiskOffset;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Storage, StorageError};

/// Reader threads shared by every disk of one storage.
const READERS: usize = 8;

/// The format of an image whose first bytes are `first`, when it is one
/// whose bytes are not the guest's disk at the same offsets (pure).
pub fn image_format(first: &[u8]) -> Option<&'static str> {
    const MAGICS: [(&[u8], &str); 5] = [
        (b"QFI\xfb", "qcow2"),
        (b"LUKS\xba\xbe", "LUKS-encrypted"),
        (b"KDMV", "VMDK"),
        (b"vhdxfile", "VHDX"),
        (b"<<< ", "VDI"),
    ];
    MAGICS
        .iter()
        .find(|(magic, _)| first.starts_with(magic))
        .map(|&(_, name)| name)
}

/// Alignment of `O_DIRECT` buffers, offsets and lengths (every logical
/// block size up to 4 KiB divides it).
const DIRECT_ALIGN: usize = 4096;

/// The bytes of a batch: `buf[start..]`, so that they can start on an
/// `O_DIRECT` boundary inside an ordinary allocation.
struct Block {
    buf: Vec<u8>,
    start: usize,
}

impl Block {
    fn bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

type Work = Box<dyn FnOnce() -> io::Result<Block> + Send>;

/// One batch of reads for a reader thread, and where its bytes go.
struct Job {
    work: Work,
    reply: mpsc::SyncSender<io::Result<Block>>,
    /// Set when its caller stopped waiting: a job still queued behind
    /// stuck readers is then dropped instead of read for nobody.
    abandoned: Arc<std::sync::atomic::AtomicBool>,
}

/// Reads `reads` (offset, length) of `file` into one buffer, in order,
/// starting on a [`DIRECT_ALIGN`] boundary.
fn read_batch(file: &File, reads: &[(u64, usize)]) -> io::Result<Block> {
    let total: usize = reads.iter().map(|&(_, len)| len).sum();
    let mut buf = vec![0u8; total + DIRECT_ALIGN];
    let start = buf.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
    let mut at = start;
    for &(offset, len) in reads {
        file.read_exact_at(&mut buf[at..at + len], offset)?;
        at += len;
    }
    buf.truncate(at);
    Ok(Block { buf, start })
}

/// Whether every read of a batch may go through `O_DIRECT` (pure).
fn aligned(reads: &[(u64, usize)]) -> bool {
    reads
        .iter()
        .all(|&(o, len)| o % DIRECT_ALIGN as u64 == 0 && len % DIRECT_ALIGN == 0)
}

/// Reader threads fed from one queue.
struct Readers {
    queue: Mutex<mpsc::Sender<Job>>,
}

impl Readers {
    fn start() -> io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..READERS {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("disk-read-{i}"))
                .spawn(move || loop {
                    let job = match rx.lock() {
                        Ok(q) => q.recv(),
                        Err(_) => return,
                    };
                    let Ok(job) = job else { return };
                    if job.abandoned.load(std::sync::atomic::Ordering::Relaxed) {
                        continue;
                    }
                    let result = (job.work)();
                    // The caller may have given up waiting: nobody to tell.
                    let _ = job.reply.send(result);
                })?;
        }
        Ok(Self {
            queue: Mutex::new(tx),
        })
    }

    /// Reads `reads` of `file`, waiting at most `deadline`.
    fn read(
        &self,
        file: &Arc<File>,
        reads: Vec<(u64, usize)>,
        deadline: Duration,
    ) -> io::Result<Block> {
        let file = file.clone();
        self.run(Box::new(move || read_batch(&file, &reads)), deadline)
    }

    /// Runs `work` on a reader thread, waiting at most `deadline` for it.
    fn run(&self, work: Work, deadline: Duration) -> io::Result<Block> {
        let (reply, answer) = mpsc::sync_channel(1);
        let abandoned = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let job = Job {
            work,
            reply,
            abandoned: abandoned.clone(),
        };
        self.queue
            .lock()
            .map_err(|_| io::Error::other("disk readers gone"))?
            .send(job)
            .map_err(|_| io::Error::other("disk readers gone"))?;
        match answer.recv_timeout(deadline) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                abandoned.store(true, std::sync::atomic::Ordering::Relaxed);
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                    "no answer within {} s (the read is abandoned; is the device or mount hung?)",
                    deadline.as_secs_f64()
                ),
                ))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(io::Error::other("disk reader thread ended"))
            }
        }
    }
}

/// One disk: opened through the page cache, and with `O_DIRECT` where the
/// device or file system allows it (a read that bypasses the host's page
/// cache neither fills it with the guest's disk nor is answered from a
/// copy cached before the device stopped answering).
struct Disk {
    buffered: Arc<File>,
    direct: Option<Arc<File>>,
}

impl Disk {
    /// The handle for `reads`: `O_DIRECT` when it is open and they are aligned.
    fn for_reads(&self, reads: &[(u64, usize)]) -> &Arc<File> {
        match &self.direct {
            Some(d) if aligned(reads) => d,
            _ => &self.buffered,
        }
    }
}

/// Opens `p` with `O_DIRECT`, None where that is refused.
fn open_direct(p: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(p)
        .ok()
}

/// Disks as files or block devices of this host.
pub struct FileStorage {
    files: Vec<Disk>,
    sizes: Vec<u64>,
    readers: Readers,
    deadline: Duration,
}

impl FileStorage {
    /// Opens each path read-only, checks that it holds raw guest bytes,
    /// and reads with `deadline` per batch.
    pub fn open(paths: &[&Path], deadline: Duration) -> Result<Self, StorageError> {
        let readers = Readers::start().map_err(|source| StorageError::Open {
            path: paths.first().map(|p| p.to_path_buf()).unwrap_or_default(),
            source,
        })?;
        let mut files = Vec::new();
        let mut sizes = Vec::new();
        for p in paths {
            let open_err = |source| StorageError::Open {
                path: p.to_path_buf(),
                source,
            };
            let f = Arc::new(File::open(p).map_err(open_err)?);
            // Block devices report size 0 in metadata; seeking to the end works for both.
            let size = {
                use std::io::Seek;
                let mut g = &*f;
                g.seek(io::SeekFrom::End(0)).map_err(open_err)?
            };
            let head = readers
                .read(
                    &f,
                    vec![(0, 16.min(usize::try_from(size).unwrap_or(16)))],
                    deadline,
                )
                .map_err(open_err)?;
            if let Some(format) = image_format(head.bytes()) {
                return Err(StorageError::Format {
                    path: p.to_path_buf(),
                    format,
                });
            }
            let direct = open_direct(p).map(Arc::new);
            tracing::info!(disk = %p.display(), direct = direct.is_some(), "shared disk opened");
            files.push(Disk {
                buffered: f,
                direct,
            });
            sizes.push(size);
        }
        Ok(Self {
            files,
            sizes,
            readers,
            deadline,
        })
    }
}

impl Storage for FileStorage {
    fn disk_sizes(&self) -> &[u64] {
        &self.sizes
    }

    fn read_at(&self, disk: u16, offset: DiskOffset, buf: &mut [u8]) -> Result<(), StorageError> {
        self.read_many(disk, &mut [(offset, buf)])
    }

    fn read_many(
        &self,
        disk: u16,
        reads: &mut [(DiskOffset, &mut [u8])],
    ) -> Result<(), StorageError> {
        let Some((first, _)) = reads.first() else {
            return Ok(());
        };
        let first = *first;
        let total: usize = reads.iter().map(|(_, b)| b.len()).sum();
        let f = self
            .files
            .get(usize::from(disk))
            .ok_or_else(|| StorageError::no_such_disk(disk, first, total))?;
        let want: Vec<(u64, usize)> = reads.iter().map(|(o, b)| (o.0, b.len())).collect();
        let data = self
            .readers
            .read(f.for_reads(&want), want, self.deadline)
            .map_err(|source| StorageError::Read {
                disk,
                offset: first,
                len: total,
                source,
            })?;
        let data = data.bytes();
        let mut at = 0;
        for (_, buf) in reads.iter_mut() {
            buf.copy_from_slice(&data[at..at + buf.len()]);
            at += buf.len();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_aligned_blocks_go_through_o_direct() {
        assert!(aligned(&[(0, 4096), (8192, 65536)]));
        assert!(!aligned(&[(0, 4096), (8193, 4096)]));
        assert!(!aligned(&[(4096, 16)]));
        assert!(aligned(&[]));
    }

    #[test]
    fn images_that_are_not_raw_disks_are_named() {
        assert_eq!(image_format(b"QFI\xfb\0\0\0\x03"), Some("qcow2"));
        assert_eq!(image_format(b"LUKS\xba\xbe\0\x02"), Some("LUKS-encrypted"));
        assert_eq!(image_format(b"KDMV\x01\0\0\0"), Some("VMDK"));
        assert_eq!(image_format(b"vhdxfile\0\0"), Some("VHDX"));
        // A raw disk: an MBR's boot code, an ext4 file system, zeros.
        assert_eq!(image_format(b"\xeb\x63\x90\x10\x8e\xd0\xbc\0"), None);
        assert_eq!(image_format(&[0u8; 16]), None);
        assert_eq!(image_format(b""), None);
    }

    fn disk(name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("dbm-file-{}-{name}", std::process::id()));
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn reads_land_in_their_buffers_and_images_are_refused() {
        let bytes: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let p = disk("raw", &bytes);
        let s = FileStorage::open(&[&p], Duration::from_secs(5)).unwrap();
        assert_eq!(s.disk_sizes(), &[65536]);
        let (mut a, mut b) = (vec![0u8; 4096], vec![0u8; 8192]);
        s.read_many(
            0,
            &mut [
                (DiskOffset(4096), &mut a[..]),
                (DiskOffset(40960), &mut b[..]),
            ],
        )
        .unwrap();
        assert_eq!(a, bytes[4096..8192]);
        assert_eq!(b, bytes[40960..49152]);
        assert!(
            s.read_at(0, DiskOffset(65536), &mut a).is_err(),
            "past the end"
        );
        assert!(s.read_at(1, DiskOffset(0), &mut a).is_err(), "no such disk");
        let q = disk("qcow2", b"QFI\xfb\0\0\0\x03rest of the header");
        let e = FileStorage::open(&[&q], Duration::from_secs(5))
            .err()
            .unwrap();
        assert!(e.to_string().contains("qcow2"), "{e}");
        std::fs::remove_file(p).unwrap();
        std::fs::remove_file(q).unwrap();
    }

    #[test]
    fn a_read_that_does_not_return_is_abandoned_at_its_deadline() {
        let readers = Readers::start().unwrap();
        let (release, hung) = mpsc::channel::<()>();
        let t = std::time::Instant::now();
        // As a read blocked in the kernel on a hung device.
        let block = |b: u8| Block {
            buf: vec![b],
            start: 0,
        };
        let stuck: Work = Box::new(move || {
            let _ = hung.recv();
            Ok(block(1))
        });
        let e = readers
            .run(stuck, Duration::from_millis(200))
            .err()
            .unwrap();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(t.elapsed() < Duration::from_secs(2));
        // The other readers still answer meanwhile.
        let ok = readers.run(Box::new(move || Ok(block(7))), Duration::from_secs(5));
        assert_eq!(ok.unwrap().bytes(), [7]);
        release.send(()).unwrap();
    }
}
