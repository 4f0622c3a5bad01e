//! The only place with `unsafe`: thin wrappers over syscalls and mappings.
//! Each block carries a `// SAFETY:` comment.

pub(crate) mod file;
pub(crate) mod malloc;
pub(crate) mod mmap;
pub(crate) mod process;
