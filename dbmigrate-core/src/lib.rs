//! dbmigrate engine: copies the RAM of a running VM from a source host to a
//! destination host with iterative pre-copy, tracking dirty pages from outside
//! the VMM. It knows nothing of QEMU or databases: a VMM is a process that
//! maps a RAM file, a [`dirty::DirtyTracker`] says which pages it wrote, and
//! the caller pauses and resumes it between the stages of a
//! [`source::SourceSession`] (source side) or a [`dest::DestSession`]
//! (destination side).

#![deny(missing_docs)]

pub mod addr;
pub mod allocator;
pub mod bitmap;
pub mod census;
pub mod control;
pub mod dest;
pub mod dirty;
pub mod gate;
pub mod limiter;
pub mod mappers;
pub mod priority;
pub mod protocol;
pub mod ram;
pub mod rebuild;
pub mod source;
pub mod stats;
pub mod storage;
mod sys;
pub mod transport;
pub mod verify;

/// Size of a guest page as dbmigrate moves it.
pub const PAGE_SIZE: usize = 4096;
/// [`PAGE_SIZE`] as u64, for offset arithmetic.
pub const PAGE_SIZE_U64: u64 = 4096;
