//! The RAM owner's side of the VM's page faults in post-copy: which fault
//! waits for what, and the huge pages QEMU touched before the switch.

use std::time::Instant;

use super::Applier;
use crate::bitmap::PageBitmap;
use crate::dest::faults::serve_present;
use crate::dest::DestError;
use crate::protocol::{self, ToSource};

impl Applier {
    /// A huge page QEMU touched before the switch is mapped there: one
    /// whose pages the switch makes missing must fault once more.
    pub(super) fn unmap_touched_early(
        &mut self,
        missing: &PageBitmap,
        n: u64,
    ) -> Result<(), DestError> {
        let mut early = std::mem::take(&mut self.mapped_early);
        early.sort_unstable();
        early.dedup();
        for first in early {
            if missing.any_in(first, first + n) {
                self.ram.unmap_elsewhere(first)?;
            }
        }
        Ok(())
    }

    /// Serves page faults: a fault unit none of whose pages is missing is
    /// let go at once (a zero page on tmpfs, where it is a hole or was
    /// placed since the fault was reported; mapped as the file holds it on
    /// hugetlbfs); one with missing pages waits for their storage reads or
    /// asks the source for them ahead of the background push.
    pub(super) fn on_faults(&mut self, addrs: Vec<u64>) -> Result<(), DestError> {
        let Some(post) = self.phase.post_mut() else {
            // Before the switch the VM does not run; QEMU itself touched a
            // page: on tmpfs one that holds no data yet, which reads as
            // zero, as it would without post-copy, and a later write through
            // the file replaces it; on hugetlbfs any page, mapped as it is
            // (and unmapped again at the switch if it is missing then).
            if let Some(f) = &self.faults {
                for a in addrs {
                    let at = f.unit_start(a);
                    let page = f.page_at(at, self.ram.pages());
                    if let Some(page) = page.filter(|_| f.minor()) {
                        self.ram.hold_huge_page(page)?;
                        self.mapped_early.push(page);
                    }
                    serve_present(f, at)?;
                    let Some(page) = page else {
                        continue;
                    };
                    // The zero page fills the hole.
                    if let Some(h) = self.phase.holes_mut() {
                        h.unset(page);
                    }
                }
            }
            return Ok(());
        };
        let f = post.faults.clone();
        let n = f.unit_pages();
        let mut due_pages = Vec::new();
        for a in addrs {
            let at = f.unit_start(a);
            let Some(first) = f.page_at(at, post.missing.len()) else {
                continue; // not in RAM: cannot be ours
            };
            self.stats.faults += 1;
            if f.minor() {
                // A missing-page fault: the file lacks the huge page.
                self.ram.hold_huge_page(first)?;
            }
            let due: Vec<u64> = post.missing.iter_range(first, first + n).collect();
            if due.is_empty() {
                self.stats.zero_faults += 1;
                serve_present(&f, at)?;
                continue;
            }
            post.waiting.entry(first).or_insert_with(Instant::now);
            due_pages.extend(due);
        }
        let mut ask = Vec::new();
        for page in due_pages {
            self.fault_on_missing(page, &mut ask);
        }
        for chunk in ask.chunks(protocol::MAX_NEED) {
            let _ = self.out.send(ToSource::PageRequest {
                pages: chunk.to_vec(),
            });
        }
        Ok(())
    }

    /// A vCPU waits for `page`: its storage read goes ahead of the queue,
    /// or, the first time, it joins `ask` for the source.
    fn fault_on_missing(&mut self, page: u64, ask: &mut Vec<u64>) {
        let Some(post) = self.phase.post_mut() else {
            return;
        };
        if self.inflight.get(page) {
            self.stats.storage_faults += 1;
            // Its read may be queued behind thousands of background
            // reads: read it again at once (the first to land is placed).
            // Its twin on the ordinary queue wakes an idle reader.
            if let (Some(req), Some(tx)) = (self.ref_of.remove(&page), &self.refs) {
                if let Ok(mut u) = self.urgent_reads.lock() {
                    u.push(req);
                    self.outstanding += 1;
                }
                if tx.send(req).is_ok() {
                    self.outstanding += 1;
                }
            }
        } else {
            self.stats.network_faults += 1;
            let first_ask = post.requested.set(page);
            tracing::debug!(
                page,
                ms_since_switch = post.since.elapsed().as_millis(),
                already_asked = !first_ask,
                "network-bound fault"
            );
            if first_ask {
                ask.push(page);
            }
        }
    }
}
