//! The contract between a virtio device and its transport.

use std::sync::Arc;

use virtio_queue::Queue;
use vm_core::GuestRam;

/// The driver speaks virtio 1.x (the only mode vmapple offers, §6.5).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// How a device tells the driver something happened. The transport decides
/// what that means on the wire (INTx and the ISR register on vmapple today,
/// MSI-X vectors later).
pub trait VirtioInterrupt: Send + Sync {
    /// Used buffers were added to queue `queue`.
    fn notify_queue(&self, queue: u16);
    /// The device-specific config space changed.
    fn notify_config(&self);
}

/// The PCI identity a transport presents. The virtio spec's defaults (vendor
/// 0x1AF4, device 0x1040 + type, revision 1) come from [`PciIdentity::standard`];
/// Apple's block variant overrides them (vmapple-machine.md §11.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciIdentity {
    pub vendor: u16,
    pub device: u16,
    pub subsystem_vendor: u16,
    pub subsystem_device: u16,
    /// base class << 16 | sub-class << 8 | prog-if
    pub class_code: u32,
    pub revision: u8,
}

impl PciIdentity {
    /// The modern virtio-pci identity of a device of type `device_type`
    /// with class code `class_code`.
    pub fn standard(device_type: u32, class_code: u32) -> Self {
        Self {
            vendor: 0x1af4,
            device: 0x1040 + device_type as u16,
            subsystem_vendor: 0x1af4,
            subsystem_device: 0x1100,
            class_code,
            revision: 1,
        }
    }
}

/// Everything a device gets when the driver sets DRIVER_OK.
pub struct ActivateContext {
    pub memory: GuestRam,
    /// The queues the driver enabled, in index order (disabled ones are
    /// passed too, with `ready() == false`).
    pub queues: Vec<Queue>,
    pub acked_features: u64,
    pub interrupt: Arc<dyn VirtioInterrupt>,
}

/// Why a device refused to start; the transport sets DEVICE_NEEDS_RESET.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver did not enable required queue {0}")]
    MissingQueue(u16),
    #[error("{0}")]
    Other(String),
}

/// A virtio device, independent of its transport.
///
/// All inputs (config offsets, queue contents, kicks) come from the guest;
/// no method may panic on them.
pub trait VirtioDevice: Send {
    /// Device type (1 net, 2 block, ...).
    fn device_type(&self) -> u32;

    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;

    /// Feature bits offered, including [`VIRTIO_F_VERSION_1`].
    fn features(&self) -> u64;

    /// Fills `data` from device-specific config space at `offset`; bytes
    /// past the end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// A driver store into device-specific config space.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let _ = (offset, data);
    }

    /// The driver set DRIVER_OK: the device takes its queues and starts.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;

    /// The driver notified queue `queue` (called on the vCPU thread that
    /// wrote the notification register).
    fn queue_notify(&mut self, queue: u16);

    /// The driver reset the device (status 0): stop, drop the queues and
    /// return to the state before activation.
    fn reset(&mut self);

    /// The PCI identity for a PCI transport.
    fn pci_identity(&self) -> PciIdentity;

    /// Snapshots: whether everything the device holds beyond its
    /// transport's configuration is in [`VirtioDevice::queue_positions`]
    /// once it is quiesced with the vCPUs parked (no request in flight, no
    /// state of its own). A device that cannot say so is refused at save.
    fn saves_state(&self) -> bool {
        false
    }

    /// Where each queue the device took at activation stands, in index
    /// order; empty while it is not active. Valid with the vCPUs parked
    /// and the device quiesced ([`VirtioDevice::quiesce`]). A restore
    /// builds the queues with these positions and activates the device
    /// with them.
    fn queue_positions(&self) -> Vec<QueuePosition> {
        Vec::new()
    }

    /// Snapshots, with the vCPUs parked: finish every request in flight
    /// and stop the device's own threads, taking their queues back, so
    /// nothing touches guest memory or the queues until
    /// [`VirtioDevice::resume`]. A device that works only on the vCPU
    /// thread has nothing to do.
    fn quiesce(&mut self) {}

    /// Starts again what [`VirtioDevice::quiesce`] stopped, from where the
    /// queues stand.
    fn resume(&mut self) {}

    /// Called once a restore has activated the device from its saved
    /// positions: a device whose host side was not saved (connections)
    /// tells the driver here.
    fn restored(&mut self) {}

    /// Snapshots: the device's own state beyond its queues, if it has one.
    fn save_device(&self) -> Option<SavedDevice> {
        None
    }

    /// Puts back what [`VirtioDevice::save_device`] returned, before the
    /// device is activated from its queues' positions; `memory` is the
    /// restored guest memory. Untrusted: refused whole, changing nothing,
    /// unless the device's commands could have built it.
    fn restore_device(&mut self, memory: &GuestRam, saved: &SavedDevice) -> Result<(), String> {
        let _ = (memory, saved);
        Err("this device has no state of its own to restore".into())
    }
}

/// A device's own state in a snapshot, by kind.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SavedDevice {
    Gpu(crate::gpu::SavedGpu),
    /// virtio-net: the MAC address its configuration showed, which the
    /// guest's driver read once and keeps using.
    Net {
        mac: [u8; 6],
    },
}

/// A queue's ring positions: the next available entry the device will
/// take and the next used entry it will write (virtio 1.2 §2.7).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueuePosition {
    pub next_avail: u16,
    pub next_used: u16,
}

impl QueuePosition {
    /// Where `queue` stands.
    pub fn of(queue: &Queue) -> Self {
        use virtio_queue::QueueT;
        Self {
            next_avail: queue.next_avail(),
            next_used: queue.next_used(),
        }
    }
}
