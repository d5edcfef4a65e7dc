//! PCI Express for the vmapple machine (vmapple-machine.md §7).
//!
//! The host bridge is QEMU's GPEX as vmapple configures it: an ECAM window
//! of 256 buses at `0x4000_0000`, a 32-bit MMIO window at `0x5000_0000` that
//! ends at `0x6FFF_0000`, and 16 legacy INTx lines to SPIs `0x20..=0x2F`.
//! Devices plug in through [`PciDevice`]; the host owns their config-space
//! headers ([`config`]), routes their interrupts and maps their BARs into
//! the MMIO window when the guest programs them ([`host`]). A function's
//! capabilities are built with [`capability::CapabilityList`]; [`msi`]
//! and [`msix`] hold MSI and MSI-X capability models. vmapple offers
//! neither (§7.5): [`PciHost::msi_sink`] says so, and a function that needs
//! MSI (`apple-gfx-pci`) can be modelled and tested but not attached.

pub mod capability;
pub mod config;
pub mod device;
pub mod host;
pub mod msi;
pub mod msix;

pub use capability::CapabilityList;
pub use config::{ConfigSpace, HeaderIdentity};
pub use device::{BarKind, BarRegion, PciDevice};
pub use host::{
    intx_line, intx_spi, IntxRoute, PciError, PciHost, ECAM_BASE, ECAM_SIZE, FDT_BUS_RANGE,
    FDT_RANGES, FDT_REG, INTERRUPT_MAP_MASK, INTX_SPI_BASE, MMIO_BASE, MMIO_SIZE, NUM_INTX_LINES,
};
pub use msi::{Msi, MsiConfig, MsiMessage, MsiSink};
pub use msix::{Msix, MsixLayout};
