//! Guest physical memory as devices see it.
//!
//! RAM, the firmware region and the cfg region are host mappings owned by a
//! `vm-memory` [`GuestMemoryMmap`]. Devices do DMA only through it, so every
//! guest-supplied address and length is checked against the mapped regions:
//! an access that is not wholly inside RAM fails instead of touching host
//! memory. DMA aimed at MMIO space fails too (QEMU would forward it to the
//! device there; no vmapple device depends on that, and refusing it keeps a
//! device from re-entering another device's lock).

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// The guest's RAM-backed physical memory. Named so it does not shadow
/// `vm-memory`'s `GuestMemory` trait, which the same modules use.
pub type GuestRam = GuestMemoryMmap<()>;

/// Errors of guest-memory helpers.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest range {addr:#x}+{len:#x} is not wholly inside guest RAM")]
    OutOfRange { addr: u64, len: u64 },
    #[error("could not map guest memory: {0}")]
    Map(String),
}

/// Creates guest memory from `(base, size)` pairs, each backed by anonymous
/// host memory.
pub fn create_guest_memory(regions: &[(u64, usize)]) -> Result<GuestRam, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> = regions
        .iter()
        .map(|&(base, size)| (GuestAddress(base), size))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| MemoryError::Map(e.to_string()))
}

/// Reads exactly `buf.len()` bytes at `addr`, failing unless the whole range
/// is guest RAM.
pub fn read_exact(mem: &GuestRam, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
    mem.read_slice(buf, GuestAddress(addr))
        .map_err(|_| MemoryError::OutOfRange {
            addr,
            len: buf.len() as u64,
        })
}

/// Writes all of `buf` at `addr`, failing (and writing nothing) unless the
/// whole range is guest RAM.
pub fn write_all(mem: &GuestRam, addr: u64, buf: &[u8]) -> Result<(), MemoryError> {
    let len = buf.len() as u64;
    if !range_is_ram(mem, addr, len) {
        return Err(MemoryError::OutOfRange { addr, len });
    }
    mem.write_slice(buf, GuestAddress(addr))
        .map_err(|_| MemoryError::OutOfRange { addr, len })
}

/// True when `[addr, addr + len)` lies wholly inside guest RAM (possibly
/// across adjacent regions). A zero-length range is RAM if `addr` is.
pub fn range_is_ram(mem: &GuestRam, addr: u64, len: u64) -> bool {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    let mut cursor = addr;
    loop {
        let Some(region) = mem.find_region(GuestAddress(cursor)) else {
            return false;
        };
        let region_end = region.start_addr().0 + region.len();
        if end <= region_end {
            return true;
        }
        cursor = region_end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_inside_and_across_regions() {
        let mem =
            create_guest_memory(&[(0x1000, 0x1000), (0x2000, 0x1000), (0x8000, 0x1000)]).unwrap();
        assert!(range_is_ram(&mem, 0x1000, 0x1000));
        assert!(range_is_ram(&mem, 0x1800, 0x1000), "adjacent regions join");
        assert!(!range_is_ram(&mem, 0x2800, 0x1000), "runs into the hole");
        assert!(!range_is_ram(&mem, 0x0, 1));
        assert!(!range_is_ram(&mem, u64::MAX - 1, 4), "wrap-around");
    }

    #[test]
    fn failed_write_leaves_memory_alone() {
        let mem = create_guest_memory(&[(0x1000, 0x1000)]).unwrap();
        assert!(write_all(&mem, 0x1ff0, &[0xaa; 0x20]).is_err());
        let mut back = [0u8; 0x10];
        read_exact(&mem, 0x1ff0, &mut back).unwrap();
        assert_eq!(back, [0; 0x10]);
    }
}
