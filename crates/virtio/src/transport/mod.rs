//! Transports: how a [`VirtioDevice`](crate::VirtioDevice) reaches the
//! guest. vmapple only has the modern PCI one.

pub mod pci;

pub use self::pci::VirtioPciDevice;
