//! The source end of a migration, driven from the source host: it moves
//! pages and decides; the VMM integration drives the stages.
//!
//! 1. [`SourceSession::connect`]: reservation (the destination checks RAM size and is ready);
//! 2. [`SourceSession::run_live`]: rounds of dirty pages while the VM runs, until [`decide`] says stop;
//! 3. the caller pauses the VM, then [`SourceSession::final_round`]: stop-and-copy
//!    (or [`SourceSession::prepare_switch`] and [`SourceSession::switch_to_postcopy`]);
//! 4. [`SourceSession::verify`]: both sides hash RAM, any difference aborts;
//! 5. the caller moves device state, then [`SourceSession::send_commit`]
//!    (the point of no return) and [`SourceSession::wait_activated`].
//!
//! Before Commit every failure leaves the source VM authoritative.
//!
//! | module | owns |
//! |---|---|
//! | `policy` | the pure decisions: when to stop the rounds (Clark et al., NSDI'05), whether to switch to post-copy |
//! | `session` | [`SourceSession`]: the connections, the rounds, stop-and-copy, verification, Commit |
//! | `round` | how one round reads, hashes and encodes its pages, references mixed in step with the raw pages |
//! | `sent` | what the destination holds of each page as last sent (RAM on huge pages: unchanged pages are not sent again) |
//! | `postcopy` | the switch to post-copy, page requests, the hand-over |
//! | `push` | post-copy's background push and its pace |
//! | `adaptive` | the adaptive pace: the guest's vCPU wait against a budget, while the VM runs here |

mod adaptive;
mod hello;
mod policy;
mod postcopy;
mod push;
mod round;
mod sent;
mod session;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use crate::dirty::DirtyError;
use crate::protocol::ProtocolError;
use crate::ram::RamError;
use crate::rebuild::HintSource;
use crate::stats::RoundStats;
use crate::transport::{Connector, TransportError};

pub use adaptive::{CpuTimes, GuestSignal, PaceController, PaceStep};
pub use policy::{
    decide, link_rate, references_in_round, switch_to_postcopy, Decision, Mode, RoundObservation,
    StopPolicy, StopReason,
};
pub use postcopy::{PostcopyError, PostcopyStats, Switched};
pub use session::SourceSession;

/// Errors of the source side.
#[derive(Debug, Error)]
pub enum SourceError {
    /// Could not reach the destination agent.
    #[error("cannot connect to the destination agent at {addr}: is `dbmigrate receive` running there and reachable?")]
    Connect {
        /// Address tried.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Protocol or transport failure.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The connection could not be secured (TLS handshake, certificate, name).
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The destination's RAM differs from the source's at switchover.
    #[error("RAM differs at switchover in {} chunk(s) of {} pages (first: {:?})", .0.mismatched_total, .0.chunk_pages, .0.first())]
    RamDiffers(VerifyOutcome),
    /// The destination said it gives up (Refuse or Abort): the only
    /// variant that carries the peer's own word, never a local check.
    #[error("destination agent refused: {reason}")]
    PeerAbort {
        /// Its reason.
        reason: String,
    },
    /// The destination closed the secured connection without a word.
    #[error("the destination agent closed the connection before answering: if its log shows a refused connection, check that its --tls-allow admits this host's certificate name and that both hosts trust the same CA")]
    Unwelcome,
    /// The peer sent a message that does not belong here.
    #[error("destination agent sent {got} while the source expected {expected}")]
    Unexpected {
        /// What came.
        got: &'static str,
        /// What was expected.
        expected: &'static str,
    },
    /// Dirty tracking failed.
    #[error("dirty-page tracking failed")]
    Dirty(#[from] DirtyError),
    /// RAM access failed.
    #[error(transparent)]
    Ram(#[from] RamError),
    /// A worker task died.
    #[error("internal worker failed: {0}")]
    Worker(String),
    /// The peer stayed silent too long.
    #[error("destination agent did not answer within {secs} s while {doing}")]
    Timeout {
        /// Seconds waited.
        secs: u64,
        /// What was awaited.
        doing: &'static str,
    },
}

impl From<crate::control::Silent> for SourceError {
    fn from(s: crate::control::Silent) -> Self {
        SourceError::Timeout {
            secs: s.secs,
            doing: s.doing,
        }
    }
}

/// Source-side settings.
#[derive(Clone, Debug)]
pub struct SourceConfig {
    /// Pre-copy, post-copy or hybrid.
    pub mode: Mode,
    /// Data connections (1 to [`protocol::MAX_DATA_CONNECTIONS`]).
    pub connections: u16,
    /// Bandwidth limit over all connections, bytes/s.
    pub bandwidth: Option<u64>,
    /// Compress raw pages with zstd when that makes them smaller.
    pub compress: bool,
    /// When to stop iterating.
    pub policy: StopPolicy,
    /// Threads hashing RAM at switchover.
    pub verify_threads: usize,
    /// Longest silence of the destination (it sends a heartbeat every second).
    pub peer_timeout: Duration,
    /// Where pages may be rebuilt from shared storage (untrusted; each hint is checked).
    pub hints: Option<Arc<dyn HintSource>>,
    /// The VM's disks, by the index hints use: their sizes bound every
    /// hint, and their names are told to the destination (which places
    /// its storage by them).
    pub disks: Vec<crate::protocol::guest::DiskId>,
    /// How connections to the destination are secured. The default is
    /// plain TCP, for tests on loopback; the `dbmigrate` command uses
    /// mutual TLS unless told otherwise by name.
    pub connector: Connector,
    /// Labelled pages: the pre-copy rounds count what they send of each
    /// label in it ([`crate::census::Census::table`]).
    pub census: Option<Arc<crate::census::Census>>,
}

impl Default for SourceConfig {
    fn default() -> Self {
        Self {
            mode: Mode::Precopy,
            connections: 2,
            bandwidth: None,
            compress: false,
            policy: StopPolicy::default(),
            verify_threads: 2,
            peer_timeout: Duration::from_secs(30),
            hints: None,
            disks: Vec::new(),
            connector: Connector::InsecurePlaintext,
            census: None,
        }
    }
}

/// The stage after [`SourceSession::final_round`]: the VM paused, its last
/// pages sent, its RAM hashed. Only this lets [`SourceSession::verify`]
/// run, so a comparison before the final round cannot be written.
#[must_use = "the comparison needs it"]
#[derive(Debug)]
pub struct Frozen {
    digests: Vec<u128>,
    /// What the final round sent.
    pub last_round: RoundStats,
}

/// Proof that the destination holds the exact RAM (from
/// [`SourceSession::verify`]): [`SourceSession::send_commit`] takes it.
#[must_use = "Commit needs it"]
#[derive(Debug)]
pub struct Verified(());

/// Result of the switchover check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyOutcome {
    /// Chunks that differ (first ones).
    pub mismatched: Vec<u32>,
    /// How many differ in all.
    pub mismatched_total: u32,
    /// Pages per chunk.
    pub chunk_pages: u32,
}

impl VerifyOutcome {
    /// The first few chunks that differ.
    pub fn first(&self) -> &[u32] {
        &self.mismatched[..self.mismatched.len().min(8)]
    }
}
