//! The address spaces where the guest, its RAM file and its disks meet,
//! each a type of its own (as rust-vmm's `GuestAddress`), so that a
//! guest-physical address cannot be passed where a RAM-file offset or a
//! disk offset is meant:
//!
//! | type | what it counts |
//! |---|---|
//! | [`GuestAddr`] | a guest-physical address, as the guest sees its memory |
//! | [`RamOffset`] | a byte offset in the RAM file (the memory backend) |
//! | [`PageIndex`] | a 4 KiB page of the RAM file |
//! | [`DiskOffset`] | a byte offset on one of the VM's disks |
//!
//! A guest-physical address becomes a RAM-file offset only through the
//! VMM's map ([`GpaRange`]).

use serde::Serialize;

use crate::PAGE_SIZE_U64;

/// A guest-physical address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct GuestAddr(pub u64);

/// A byte offset in the RAM file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct RamOffset(pub u64);

/// A 4 KiB page of the RAM file (its offset divided by [`crate::PAGE_SIZE`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct PageIndex(pub u64);

/// A byte offset on a VM disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct DiskOffset(pub u64);

impl RamOffset {
    /// The page this offset falls in.
    pub fn page(self) -> PageIndex {
        PageIndex(self.0 / PAGE_SIZE_U64)
    }
}

impl PageIndex {
    /// The page's first byte in the RAM file (None past 2^64).
    pub fn offset(self) -> Option<RamOffset> {
        self.0.checked_mul(PAGE_SIZE_U64).map(RamOffset)
    }
}

impl DiskOffset {
    /// `self + n` bytes (None past 2^64).
    pub fn checked_add(self, n: u64) -> Option<DiskOffset> {
        self.0.checked_add(n).map(DiskOffset)
    }
}

macro_rules! display_hex {
    ($($t:ty),*) => {$(
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    )*};
}
display_hex!(GuestAddr, RamOffset, DiskOffset);

impl std::fmt::Display for PageIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// One guest-physical range backed by the RAM file, as the VMM maps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct GpaRange {
    /// First guest-physical address.
    pub gpa: GuestAddr,
    /// Length in bytes.
    pub len: u64,
    /// Offset of `gpa` in the RAM file.
    pub offset: RamOffset,
}

impl GpaRange {
    /// Whether `gpa` and its RAM-file offset are equally aligned to
    /// `align` (a power of two), so that an aligned piece of the guest's
    /// memory is an aligned piece of the file.
    pub fn keeps_alignment(&self, align: u64) -> bool {
        self.gpa.0.wrapping_sub(self.offset.0) % align == 0
    }
}

/// RAM-file offset of guest-physical address `gpa`, if RAM is there. Pure.
pub fn ram_offset(map: &[GpaRange], gpa: GuestAddr) -> Option<RamOffset> {
    map.iter()
        .find(|r| gpa.0 >= r.gpa.0 && gpa.0 - r.gpa.0 < r.len)
        .map(|r| RamOffset(r.offset.0 + (gpa.0 - r.gpa.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_address_reaches_the_file_only_through_the_map() {
        // The PC's layout: low RAM at 0, the rest above 4 GiB.
        let map = [
            GpaRange {
                gpa: GuestAddr(0),
                len: 0x8000_0000,
                offset: RamOffset(0),
            },
            GpaRange {
                gpa: GuestAddr(1 << 32),
                len: 0x8000_0000,
                offset: RamOffset(0x8000_0000),
            },
        ];
        assert_eq!(ram_offset(&map, GuestAddr(0x1000)), Some(RamOffset(0x1000)));
        assert_eq!(
            ram_offset(&map, GuestAddr((1 << 32) + 0x2000)),
            Some(RamOffset(0x8000_2000))
        );
        assert_eq!(
            ram_offset(&map, GuestAddr(0x9000_0000)),
            None,
            "the PCI hole"
        );
        assert_eq!(RamOffset(0x8000_2fff).page(), PageIndex(0x80002));
        assert_eq!(PageIndex(3).offset(), Some(RamOffset(3 * 4096)));
        assert_eq!(PageIndex(u64::MAX).offset(), None);
        assert!(map[1].keeps_alignment(1 << 21));
        let odd = GpaRange {
            gpa: GuestAddr(0x1000),
            len: 4096,
            offset: RamOffset(0),
        };
        assert!(!odd.keeps_alignment(16384));
        assert_eq!(DiskOffset(u64::MAX).checked_add(1), None);
    }
}
