//! The vmapple memory and interrupt maps (vmapple-machine.md §2, §3).
//!
//! Apple's boot ROM knows these addresses by heart, so none of them may
//! move. Sizes are those of the regions the machine maps, which for some
//! devices are larger than the registers the device decodes.

/// Firmware (boot ROM image) region: guest-writable RAM, refilled from the
/// image on every reset.
pub const FIRMWARE_BASE: u64 = 0x0010_0000;
pub const FIRMWARE_SIZE: u64 = 0x0010_0000;

/// Configuration region read by the boot ROM (§8).
pub const CFG_BASE: u64 = 0x0040_0000;
pub const CFG_SIZE: u64 = 0x0001_0000;

pub const GICD_BASE: u64 = 0x1000_0000;
pub const GICD_SIZE: u64 = 0x0001_0000;
pub const GICR_BASE: u64 = 0x1001_0000;
pub const GICR_SIZE: u64 = 0x0040_0000;
/// The GICv2m MSI frame newer macOS guests look for (`--msi on` only;
/// QEMU's vmapple has none, §7.5).
pub const GIC_V2M_BASE: u64 = 0x1fff_0000;
pub const GIC_V2M_SIZE: u64 = gic::message::V2M_FRAME_SIZE;

pub const UART_BASE: u64 = 0x2001_0000;
/// The UART's slot in the map; the PL011 decodes the first 4 KiB.
pub const UART_SLOT: u64 = 0x0001_0000;
pub const RTC_BASE: u64 = 0x2005_0000;
pub const RTC_SIZE: u64 = 0x1000;
pub const GPIO_BASE: u64 = 0x2006_0000;
pub const GPIO_SIZE: u64 = 0x1000;
pub const PVPANIC_BASE: u64 = 0x2007_0000;
pub const PVPANIC_SIZE: u64 = 0x2;

pub const BDIF_BASE: u64 = 0x3000_0000;
pub const BDIF_SIZE: u64 = 0x0020_0000;
pub const GFX_BASE: u64 = 0x3020_0000;
pub const GFX_SLOT: u64 = 0x0001_0000;
pub const GFX_IOSFC_BASE: u64 = 0x3021_0000;
pub const GFX_IOSFC_SIZE: u64 = 0x0001_0000;
pub const AES1_BASE: u64 = 0x3022_0000;
pub const AES2_BASE: u64 = 0x3023_0000;
pub const AES_WINDOW_SIZE: u64 = 0x4000;
/// The `avp,rtc` clock (VirtualMac2,1 device tree; not in QEMU's map).
pub const AVP_RTC_BASE: u64 = 0x3024_0000;

// The PCIe host bridge's windows and INTx wiring are defined with the
// bridge (crate `pci`), which needs them for its device tree properties
// and BAR decoding; this map names them for the board.
/// ECAM window.
pub use pci::host::{ECAM_BASE as PCIE_ECAM_BASE, ECAM_SIZE as PCIE_ECAM_SIZE};
/// 32-bit PCI MMIO window; it ends at 0x6FFF_0000 (quirk Q9), not where
/// QEMU's comment says.
pub use pci::host::{MMIO_BASE as PCIE_MMIO_BASE, MMIO_SIZE as PCIE_MMIO_SIZE};

/// Start of RAM; its size is the user's `--memory`.
pub const RAM_BASE: u64 = 0x7000_0000;

/// Shared peripheral interrupts (GIC INTID = SPI + 32).
pub const SPI_UART: u32 = 1;
pub const SPI_RTC: u32 = 2;
pub const SPI_GPIO: u32 = 5;
pub const SPI_GFX_IOSFC: u32 = 0x10;
pub const SPI_GFX: u32 = 0x11;
pub const SPI_AES: u32 = 0x12;
pub const SPI_AVP_RTC: u32 = 0x13;
/// PCIe INTx line *i* is SPI `SPI_PCIE_INTX + i`, for i in 0..16.
pub use pci::host::INTX_SPI_BASE as SPI_PCIE_INTX;
pub const PCIE_INTX_LINES: u32 = pci::host::NUM_INTX_LINES as u32;
/// SPIs the GIC implements (INTIDs 32..288).
pub const GIC_SPIS: u32 = 256;
/// With `--msi on`, SPIs 0x80..0x100 (INTIDs 0xA0..0x120, the top half)
/// take message writes: the GICv2m frame's block.
pub const SPI_MSI_BASE: u32 = 0x80;
pub const MSI_SPIS: u32 = 128;

/// The EL1 virtual timer's PPI (INTID), the only timer wired.
pub const PPI_VTIMER: u32 = 27;
