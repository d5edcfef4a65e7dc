//! PCI identity of `apple-gfx-pci` (apple-gfx.md §2.2 `PGDeviceSpec.h`
//! constants, §8.1), as data for the PCI model.
//!
//! Revision, subsystem IDs, interrupt pin and the MSI capability offset are
//! QEMU's defaults for a device that sets none (the spec marks them
//! derived). Note that realize must fail on a machine without MSI support,
//! which includes vmapple: there the MMIO variant is used.

/// `PG_PCI_VENDOR_ID` (Apple).
pub const VENDOR_ID: u16 = 0x106b;
/// `PG_PCI_DEVICE_ID`.
pub const DEVICE_ID: u16 = 0xeeee;
pub const REVISION: u8 = 0;
pub const SUBSYSTEM_VENDOR_ID: u16 = 0x1af4;
pub const SUBSYSTEM_ID: u16 = 0x1100;
/// Display controller, "other" (base class 0x03, subclass 0x80, prog-if 0).
pub const CLASS_CODE: u16 = 0x0380;
pub const PROG_IF: u8 = 0;
/// `PG_PCI_BAR_MMIO`: the register window, 32-bit non-prefetchable memory.
pub const BAR_MMIO: u8 = 0;
/// `PG_PCI_MAX_MSI_VECTORS`.
pub const MSI_VECTORS: u8 = 1;
/// The MSI capability is the only one, so it sits right after the header.
pub const MSI_CAP_OFFSET: u8 = 0x40;
/// No INTx.
pub const INTERRUPT_PIN: u8 = 0;
/// First register of the window per `PGDeviceSpec.h`; the MSI area is
/// below it. Every offset is still forwarded unchanged.
pub const REGISTERS_OFFSET: u64 = 0x1000;

/// Size of BAR0 for a register window of `mmio_length` bytes: the next
/// power of two (BARs must be), at least 4 KiB.
pub fn bar0_size(mmio_length: u64) -> Option<u64> {
    mmio_length.max(0x1000).checked_next_power_of_two()
}

/// Size of the expansion-ROM BAR for an option ROM of `len` bytes, which
/// is zero-padded to a power of two; `None` for an empty or absurd ROM.
pub fn rom_bar_size(len: u64) -> Option<u64> {
    if len == 0 {
        return None;
    }
    len.max(0x800).checked_next_power_of_two()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_sizes_are_powers_of_two() {
        assert_eq!(bar0_size(0x4000), Some(0x4000));
        assert_eq!(bar0_size(0x4001), Some(0x8000));
        assert_eq!(bar0_size(0), Some(0x1000));
        assert_eq!(bar0_size(u64::MAX), None);
        assert_eq!(rom_bar_size(0x1_2345), Some(0x2_0000));
        assert_eq!(rom_bar_size(0), None);
        assert_eq!(rom_bar_size(1), Some(0x800));
    }
}
