//! virtio 1.2 devices of the vmapple machine and their PCI transport.
//!
//! Devices implement [`VirtioDevice`]: feature bits, config space, queue
//! sizes, and what to do when the driver kicks a queue. A transport (the
//! modern virtio-pci one for vmapple) owns the queues' configuration, feature
//! negotiation and device status, and hands the device its queues when the
//! driver sets DRIVER_OK.

pub mod block;
pub mod device;
pub mod fs;
pub mod gpu;
pub mod net;
pub mod quirks;
pub mod transport;
pub mod vsock;

#[cfg(test)]
mod log_capture;

pub use device::{
    ActivateContext, ActivateError, PciIdentity, QueuePosition, VirtioDevice, VirtioInterrupt,
};
