//! The destination end of a migration: receives pages into the RAM file,
//! compares digests at switchover and resumes the VM only on [`Message::Commit`].
//!
//! Every page index, length and count from the source is checked: a page
//! beyond the RAM aborts the session with a reason sent back to the source.
//!
//! Where each part lives:
//!
//! | module | owns |
//! |---|---|
//! | `accept` | the handshake: the source's Hello checked, its data connections gathered |
//! | `session` | [`DestSession`]: the control connection, the RAM owner started, the digest comparison, Commit |
//! | `postcopy` | the session after a switch to post-copy, until every page is placed and compared |
//! | `phase` | where the migration stands ([`phase::Phase`]) and the pure step that moves it on |
//! | `applier` | the RAM owner thread: pages applied in arrival order, storage results, the switch, faults |
//! | `storage` | the storage reader threads that rebuild referenced pages |
//! | `faults` | the VM's page faults: the userfaultfd, zero pages, the fault reader thread |
//! | `streams` | the tasks that read the control and data connections |

mod accept;
mod applier;
mod faults;
mod phase;
mod postcopy;
mod session;
mod storage;
mod streams;

use thiserror::Error;

use crate::protocol::ProtocolError;
use crate::ram::RamError;

pub use accept::{accept, SessionPeer};
pub use faults::{FaultRange, FaultSource};
pub use phase::PhaseError;
pub use postcopy::PostcopyOutcome;
pub use session::{DestSession, PostcopyRun, Received};
pub use storage::{DEFAULT_READ_GAP, MAX_READ_GAP};

/// Errors of the destination side.
#[derive(Debug, Error)]
pub enum DestError {
    /// Transport or protocol failure.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The source's announcement does not fit this VM.
    #[error("refused the source: {reason}")]
    Refused {
        /// Why.
        reason: String,
    },
    /// The source gave up.
    #[error("source aborted the migration: {reason}")]
    SourceAborted {
        /// Its reason.
        reason: String,
    },
    /// A message out of place in the destination's phase.
    #[error(transparent)]
    Phase(#[from] PhaseError),
    /// The source sent something out of place.
    #[error("source sent {got} while the destination expected {expected}")]
    Unexpected {
        /// What came.
        got: &'static str,
        /// What was expected.
        expected: &'static str,
    },
    /// A page message was invalid.
    #[error("bad page from the source: {0}")]
    BadPage(String),
    /// RAM access failed.
    #[error(transparent)]
    Ram(#[from] RamError),
    /// The listener stopped accepting connections.
    #[error("the listener stopped accepting connections")]
    ListenerGone,
    /// A peer stayed silent too long.
    #[error("no word from the source agent for {secs} s while {doing}")]
    Timeout {
        /// Seconds waited.
        secs: u64,
        /// What was awaited.
        doing: &'static str,
    },
    /// A worker died.
    #[error("internal worker failed: {0}")]
    Worker(String),
    /// Serving the VM's page faults failed.
    #[error("serving page faults failed while {doing}")]
    Faults {
        /// What was being done.
        doing: &'static str,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The fault descriptor's unit does not fit the RAM file.
    #[error("QEMU's RAM mapping at {base:#x} serves faults in units of {unit} bytes, but the RAM file's pages are {file_page} bytes (or the mapping does not start on one): is the preload library the same dbmigrate version?")]
    FaultUnit {
        /// Where the mapping starts.
        base: u64,
        /// The unit the fault descriptor was registered for.
        unit: u64,
        /// The RAM file's page size.
        file_page: u64,
    },
    /// The VM could not be resumed here after the switch to post-copy.
    #[error("the destination VM could not be resumed: {0}")]
    Resume(String),
}

/// Counters of what arrived.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct DestStats {
    /// Raw pages applied.
    pub raw_pages: u64,
    /// Zero pages applied.
    pub zero_pages: u64,
    /// Compressed pages applied.
    pub compressed_pages: u64,
    /// Bytes received on data connections.
    pub bytes_received: u64,
    /// Pages rebuilt from shared storage (reference matched).
    pub rebuilt_pages: u64,
    /// References whose storage content did not match (page asked for).
    pub rebuild_mismatch: u64,
    /// References refused as invalid (unknown disk, misaligned, out of range, no storage).
    pub rejected_refs: u64,
    /// Bytes read from shared storage.
    pub storage_bytes: u64,
    /// Reads made of shared storage (each a run of consecutive pages):
    /// `storage_bytes / storage_reads` is the mean read.
    pub storage_reads: u64,
    /// References not read because shared storage was failing (page asked for).
    pub storage_unread: u64,
    /// Time spent hashing at switchover.
    pub verify_ms: u64,
    /// Post-copy: page faults the VM took (one per 4 KiB page on tmpfs,
    /// per huge page on hugetlbfs).
    pub faults: u64,
    /// Post-copy: pages faults had to wait for from the source (network round trip).
    pub network_faults: u64,
    /// Post-copy: pages faults had to wait for from shared storage.
    pub storage_faults: u64,
    /// Post-copy: faults that waited for no page (a zero page on tmpfs, a
    /// huge page complete already on hugetlbfs), served at once.
    pub zero_faults: u64,
    /// Post-copy: longest time a fault waited for its page.
    pub longest_stall_us: u64,
    /// Post-copy: pages placed after the switch.
    pub postcopy_pages: u64,
    /// Post-copy: switch to last page placed.
    pub postcopy_ms: u64,
    /// Post-copy: every page was placed but the source went silent before
    /// the placed pages could be compared with its frozen RAM.
    pub postcopy_unverified: bool,
}

impl From<crate::control::Silent> for DestError {
    fn from(s: crate::control::Silent) -> Self {
        DestError::Timeout {
            secs: s.secs,
            doing: s.doing,
        }
    }
}
