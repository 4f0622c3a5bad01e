//! Test helper for `tests/dirty_tracking.rs`: stands in for QEMU.
//!
//! `mmap_writer PATH PAGES` maps `PATH` (grown to `PAGES` pages if shorter)
//! shared and read-write through libc's `mmap`, so that an `LD_PRELOAD`ed
//! `libdbmigrate_preload.so` sees the call exactly as it sees QEMU's. It then
//! prints `ready ADDR LEN` (hex address, decimal length) and obeys one
//! command per line on stdin, answering each with one line on stdout:
//!
//! - `w PAGE` writes one byte into page `PAGE` → `ok`
//! - `ws FIRST END STEP` writes pages `FIRST, FIRST+STEP, ... < END` → `ok N`
//! - `q` → `bye`, then exits.
//!
//! Anything else, or a page outside the mapping, is answered with `err ...`.

use std::fs::OpenOptions;
use std::io::{BufRead, Write};
use std::os::fd::AsRawFd;

const PAGE: usize = 4096;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(path), Some(pages)) = (
        args.get(1),
        args.get(2).and_then(|p| p.parse::<usize>().ok()),
    ) else {
        eprintln!("usage: mmap_writer PATH PAGES");
        std::process::exit(2);
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .expect("open the RAM file");
    let len = pages * PAGE;
    if file.metadata().expect("stat the RAM file").len() < len as u64 {
        file.set_len(len as u64).expect("grow the RAM file");
    }
    // SAFETY: a fresh shared mapping of a file we opened, at an address of the
    // kernel's choice; nothing else in this process refers to it, and the file
    // is never truncated while mapped.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        eprintln!("mmap: {}", std::io::Error::last_os_error());
        std::process::exit(1);
    }
    let base = ptr.cast::<u8>();
    let mut counter = 0u8;
    let mut write_page = |page: usize| -> bool {
        if page >= pages {
            return false;
        }
        counter = counter.wrapping_add(1);
        // SAFETY: `page < pages`, so the byte lies inside our live mapping.
        unsafe { std::ptr::write_volatile(base.add(page * PAGE), counter) };
        true
    };

    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let _ = writeln!(out, "ready {:#x} {len}", ptr as usize);
    let _ = out.flush();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| words.get(i).and_then(|w| w.parse::<usize>().ok());
        let reply = match words.first().copied() {
            Some("w") => match num(1) {
                Some(p) if write_page(p) => "ok".to_string(),
                _ => format!("err bad page in {line:?}"),
            },
            Some("ws") => match (num(1), num(2), num(3)) {
                (Some(first), Some(end), Some(step)) if step > 0 && end <= pages => {
                    let mut n = 0;
                    for p in (first..end).step_by(step) {
                        write_page(p);
                        n += 1;
                    }
                    format!("ok {n}")
                }
                _ => format!("err bad range in {line:?}"),
            },
            Some("q") => {
                let _ = writeln!(out, "bye");
                let _ = out.flush();
                return;
            }
            _ => format!("err unknown command {line:?}"),
        };
        let _ = writeln!(out, "{reply}");
        let _ = out.flush();
    }
}
