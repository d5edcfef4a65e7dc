//! PCI Express for the vmapple machine (vmapple-machine.md §7).
//!
//! The host bridge is QEMU's GPEX as vmapple configures it: an ECAM window
//! of 256 buses at `0x4000_0000`, a 32-bit MMIO window at `0x5000_0000` that
//! ends at `0x6FFF_0000`, and 16 legacy INTx lines to SPIs `0x20..=0x2F`.
//! Devices plug in through [`PciDevice`]; the host owns their config-space
//! headers' routing and maps their BARs into the MMIO window when the guest
//! programs them.

pub mod device;

pub use device::{BarKind, BarRegion, PciDevice};
