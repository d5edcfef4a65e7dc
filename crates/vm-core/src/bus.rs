//! The MMIO bus: guest physical address ranges dispatched to devices.
//!
//! Accelerators hand every guest access that misses RAM to the machine,
//! which looks it up here. The bus is built once when the machine is
//! assembled and never changes afterwards, so lookups need no lock; devices
//! whose own windows move (PCI BARs) do that inside their region.
//!
//! Accesses are whole: an 8-byte load reaches a device as one 64-bit read,
//! never as two halves (the software CPU is patched to keep it so).

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Size of one guest access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AccessWidth {
    Byte,
    Half,
    Word,
    Double,
}

impl AccessWidth {
    /// The width of an access of `bytes` bytes, if it is 1, 2, 4 or 8.
    pub fn from_bytes(bytes: u64) -> Option<Self> {
        match bytes {
            1 => Some(Self::Byte),
            2 => Some(Self::Half),
            4 => Some(Self::Word),
            8 => Some(Self::Double),
            _ => None,
        }
    }

    pub fn bytes(self) -> u64 {
        match self {
            Self::Byte => 1,
            Self::Half => 2,
            Self::Word => 4,
            Self::Double => 8,
        }
    }

    /// All-ones in the low `bytes()` bytes.
    pub fn mask(self) -> u64 {
        match self {
            Self::Double => u64::MAX,
            w => (1u64 << (8 * w.bytes())) - 1,
        }
    }
}

impl fmt::Display for AccessWidth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-bit", self.bytes() * 8)
    }
}

/// A device (or a window of one) that answers guest loads and stores.
///
/// Devices keep their state behind their own lock so that an access from a
/// vCPU and one from an I/O thread can meet safely. A device must accept any
/// offset inside its region and any width: the guest chooses both. What a
/// register does with a width it does not support is the device's decision
/// (usually: ignore and log a guest error).
pub trait MmioDevice: Send + Sync {
    /// A load of `width` at `offset` from the start of the region. Bits above
    /// the width are ignored by the bus.
    fn read(&self, offset: u64, width: AccessWidth) -> u64;
    /// A store of the low `width` bits of `value` at `offset`.
    fn write(&self, offset: u64, width: AccessWidth, value: u64);
}

/// Why the bus did not deliver an access.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    #[error("no device at {0:#x}")]
    Unmapped(u64),
    #[error("access at {addr:#x} ({width}) is not naturally aligned")]
    Unaligned { addr: u64, width: AccessWidth },
    #[error("access at {addr:#x} ({width}) runs past the end of {device}")]
    Straddles {
        addr: u64,
        width: AccessWidth,
        device: String,
    },
    #[error("region {new} at {base:#x}+{size:#x} overlaps {existing}")]
    Overlap {
        new: String,
        existing: String,
        base: u64,
        size: u64,
    },
    #[error("region {name} at {base:#x} has an invalid size {size:#x}")]
    BadRegion { name: String, base: u64, size: u64 },
}

struct Region {
    base: u64,
    /// Last address inside the region (inclusive), so a region may end at
    /// the top of the address space.
    last: u64,
    name: String,
    device: Arc<dyn MmioDevice>,
}

/// Address-range dispatch to [`MmioDevice`]s.
#[derive(Default)]
pub struct MmioBus {
    /// Sorted by base, never overlapping.
    regions: Vec<Region>,
    /// Index of the region the last access found. Guests mostly hit one
    /// device many times in a row (a driver polling a status register), so
    /// trying it first skips the search. Only a hint, checked before use:
    /// any value, stale or shared between vCPUs, gives the right region.
    last_hit: AtomicUsize,
}

impl fmt::Debug for MmioBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_list();
        for r in &self.regions {
            list.entry(&format_args!("{:#x}..={:#x} {}", r.base, r.last, r.name));
        }
        list.finish()
    }
}

impl MmioBus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base + size)`.
    pub fn insert(
        &mut self,
        base: u64,
        size: u64,
        name: impl Into<String>,
        device: Arc<dyn MmioDevice>,
    ) -> Result<(), BusError> {
        let name = name.into();
        let last = size
            .checked_sub(1)
            .and_then(|s| base.checked_add(s))
            .ok_or(BusError::BadRegion {
                name: name.clone(),
                base,
                size,
            })?;
        let index = self.regions.partition_point(|r| r.base < base);
        let clash = [index.checked_sub(1), Some(index)]
            .into_iter()
            .flatten()
            .filter_map(|i| self.regions.get(i))
            .find(|r| r.base <= last && base <= r.last);
        if let Some(existing) = clash {
            return Err(BusError::Overlap {
                new: name,
                existing: existing.name.clone(),
                base,
                size,
            });
        }
        self.regions.insert(
            index,
            Region {
                base,
                last,
                name,
                device,
            },
        );
        Ok(())
    }

    /// The region holding `addr`, if any.
    fn find(&self, addr: u64) -> Option<&Region> {
        let hint = self.last_hit.load(Ordering::Relaxed);
        if let Some(region) = self.regions.get(hint) {
            if region.base <= addr && addr <= region.last {
                return Some(region);
            }
        }
        let index = self
            .regions
            .partition_point(|r| r.base <= addr)
            .checked_sub(1)?;
        let region = self.regions.get(index).filter(|r| addr <= r.last)?;
        self.last_hit.store(index, Ordering::Relaxed);
        Some(region)
    }

    /// The region holding `addr`, with the offset of `addr` in it.
    fn lookup(&self, addr: u64, width: AccessWidth) -> Result<(&Region, u64), BusError> {
        let region = self.find(addr).ok_or(BusError::Unmapped(addr))?;
        if addr % width.bytes() != 0 {
            return Err(BusError::Unaligned { addr, width });
        }
        let offset = addr - region.base;
        if region.last - addr < width.bytes() - 1 {
            return Err(BusError::Straddles {
                addr,
                width,
                device: region.name.clone(),
            });
        }
        Ok((region, offset))
    }

    /// Delivers a load. The value is masked to `width`.
    pub fn read(&self, addr: u64, width: AccessWidth) -> Result<u64, BusError> {
        let (region, offset) = self.lookup(addr, width)?;
        Ok(region.device.read(offset, width) & width.mask())
    }

    /// Delivers a store of the low `width` bits of `value`.
    pub fn write(&self, addr: u64, width: AccessWidth, value: u64) -> Result<(), BusError> {
        let (region, offset) = self.lookup(addr, width)?;
        region.device.write(offset, width, value & width.mask());
        Ok(())
    }

    /// The name of the device at `addr`, for logs.
    pub fn device_name(&self, addr: u64) -> Option<&str> {
        self.find(addr).map(|r| r.name.as_str())
    }

    /// `(base, size, name)` of every region, in address order.
    pub fn regions(&self) -> impl Iterator<Item = (u64, u64, &str)> {
        self.regions
            .iter()
            .map(|r| (r.base, r.last - r.base + 1, r.name.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder {
        log: Mutex<Vec<(char, u64, AccessWidth, u64)>>,
    }

    impl MmioDevice for Recorder {
        fn read(&self, offset: u64, width: AccessWidth) -> u64 {
            self.log.lock().unwrap().push(('r', offset, width, 0));
            0xdead_beef_cafe_f00d
        }
        fn write(&self, offset: u64, width: AccessWidth, value: u64) {
            self.log.lock().unwrap().push(('w', offset, width, value));
        }
    }

    #[test]
    fn dispatches_by_range_with_offsets_and_masks() {
        let a = Arc::new(Recorder::default());
        let b = Arc::new(Recorder::default());
        let mut bus = MmioBus::new();
        bus.insert(0x1000, 0x100, "a", a.clone()).unwrap();
        bus.insert(0x2000, 0x1000, "b", b.clone()).unwrap();

        assert_eq!(bus.read(0x1008, AccessWidth::Word).unwrap(), 0xcafe_f00d);
        assert_eq!(
            bus.read(0x2ff8, AccessWidth::Double).unwrap(),
            0xdead_beef_cafe_f00d
        );
        bus.write(0x1010, AccessWidth::Half, 0x1234_5678).unwrap();
        assert_eq!(
            a.log.lock().unwrap()[1],
            ('w', 0x10, AccessWidth::Half, 0x5678)
        );
        assert_eq!(b.log.lock().unwrap()[0].1, 0xff8);
    }

    #[test]
    fn rejects_holes_misalignment_and_straddling() {
        let mut bus = MmioBus::new();
        bus.insert(0x1000, 0x6, "small", Arc::new(Recorder::default()))
            .unwrap();
        assert_eq!(
            bus.read(0xfff, AccessWidth::Byte),
            Err(BusError::Unmapped(0xfff))
        );
        assert_eq!(
            bus.read(0x1006, AccessWidth::Byte),
            Err(BusError::Unmapped(0x1006))
        );
        assert!(matches!(
            bus.read(0x1002, AccessWidth::Word),
            Err(BusError::Unaligned { .. })
        ));
        assert!(matches!(
            bus.write(0x1004, AccessWidth::Word, 0),
            Err(BusError::Straddles { .. })
        ));
        assert!(bus.read(0x1004, AccessWidth::Half).is_ok());
    }

    /// A device that answers every read with its own tag.
    struct Tagged(u64);

    impl MmioDevice for Tagged {
        fn read(&self, _offset: u64, _width: AccessWidth) -> u64 {
            self.0
        }
        fn write(&self, _offset: u64, _width: AccessWidth, _value: u64) {}
    }

    #[test]
    fn repeated_and_alternating_accesses_reach_the_right_device() {
        let mut bus = MmioBus::new();
        // Adjacent regions, a hole, and one at the top of the space.
        bus.insert(0x1000, 0x1000, "a", Arc::new(Tagged(1)))
            .unwrap();
        bus.insert(0x2000, 0x1000, "b", Arc::new(Tagged(2)))
            .unwrap();
        bus.insert(0x4000, 0x10, "c", Arc::new(Tagged(3))).unwrap();
        bus.insert(u64::MAX - 0xfff, 0x1000, "top", Arc::new(Tagged(4)))
            .unwrap();
        let expected = [
            (0x1000, Some(1)),
            (0x1ffc, Some(1)),
            (0x2000, Some(2)),
            (0x1ffc, Some(1)),
            (0x2ffc, Some(2)),
            (0x3000, None),
            (0x2ffc, Some(2)),
            (0x4000, Some(3)),
            (0x400c, Some(3)),
            (0x4010, None),
            (0xffc, None),
            (u64::MAX - 0xfff, Some(4)),
            (u64::MAX - 3, Some(4)),
            (0x1000, Some(1)),
        ];
        // Twice over, so each address is met both after a hit on another
        // region and after a hit on its own.
        for (addr, tag) in expected.iter().chain(expected.iter()) {
            for _ in 0..2 {
                let got = bus.read(*addr, AccessWidth::Word).ok();
                assert_eq!(got, *tag, "read at {addr:#x}");
            }
        }
        assert_eq!(bus.device_name(0x2000), Some("b"));
        assert_eq!(bus.device_name(0x1fff), Some("a"));
        assert_eq!(bus.device_name(0x3fff), None);
    }

    #[test]
    fn a_region_inserted_after_accesses_is_found_and_shifts_no_others() {
        let mut bus = MmioBus::new();
        bus.insert(0x3000, 0x1000, "c", Arc::new(Tagged(3)))
            .unwrap();
        assert_eq!(bus.read(0x3000, AccessWidth::Byte), Ok(3));
        // Goes in front of the region last hit, moving it in the list.
        bus.insert(0x1000, 0x1000, "a", Arc::new(Tagged(1)))
            .unwrap();
        assert_eq!(bus.read(0x1000, AccessWidth::Byte), Ok(1));
        assert_eq!(bus.read(0x3000, AccessWidth::Byte), Ok(3));
        bus.insert(0x2000, 0x1000, "b", Arc::new(Tagged(2)))
            .unwrap();
        assert_eq!(bus.read(0x3fff, AccessWidth::Byte), Ok(3));
        assert_eq!(bus.read(0x2fff, AccessWidth::Byte), Ok(2));
        assert_eq!(
            bus.read(0xfff, AccessWidth::Byte),
            Err(BusError::Unmapped(0xfff))
        );
    }

    #[test]
    fn refuses_overlaps_and_empty_regions() {
        let mut bus = MmioBus::new();
        let dev = Arc::new(Recorder::default());
        bus.insert(0x1000, 0x1000, "a", dev.clone()).unwrap();
        assert!(bus.insert(0x1fff, 1, "b", dev.clone()).is_err());
        assert!(bus.insert(0x800, 0x801, "c", dev.clone()).is_err());
        assert!(bus.insert(0x800, 0, "d", dev.clone()).is_err());
        bus.insert(0x800, 0x800, "e", dev.clone()).unwrap();
        bus.insert(u64::MAX - 0xfff, 0x1000, "top", dev).unwrap();
        let names: Vec<_> = bus.regions().map(|r| r.2).collect();
        assert_eq!(names, ["e", "a", "top"]);
        assert!(bus.read(u64::MAX - 7, AccessWidth::Double).is_ok());
    }
}
