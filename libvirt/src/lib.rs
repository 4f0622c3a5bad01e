//! dbmigrate's side of libvirt.
//!
//! libvirt holds QEMU's own monitor and its migration flow cannot pass
//! `x-ignore-shared`, so dbmigrate moves a libvirt domain beside libvirt:
//! - [`domain`] reads what a domain's XML tells dbmigrate (the QMP socket
//!   the XML gives it, the guest agent's channel, whether RAM is a shared
//!   file) and writes the XML of the waiting domain on the destination;
//! - [`virsh`] runs the few libvirt operations around the move (start the
//!   destination paused, make it persistent after Commit, undefine the
//!   source), each with a deadline.
//!
//! Nothing here knows QEMU's migration or the engine; the agent joins them.

pub mod domain;
pub mod virsh;

pub use domain::{incoming_xml, Domain, DomainError, DomainName};
pub use virsh::{DomainState, Virsh, VirshError};
