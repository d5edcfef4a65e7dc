//! The modern virtio-over-PCI transport (virtio 1.2 §4.1), as vmapple's
//! virtio devices present it (vmapple-machine.md §7.3, §11.1).
//!
//! # Model
//!
//! * **Identity** comes from [`VirtioDevice::pci_identity`]. Modern only:
//!   there is no legacy I/O BAR, and the driver must accept
//!   `VIRTIO_F_VERSION_1` or `FEATURES_OK` does not stick (§4.1.2.1,
//!   §2.2.1).
//! * **BAR 4** (QEMU's `modern_mem_bar_idx`; BARs 0–3 stay unused as
//!   under QEMU, where the legacy I/O BAR is off and the MSI-X BAR fails
//!   without MSI support; with MSI-X, BAR 1 holds its table) is a 16 KiB 64-bit prefetchable memory BAR
//!   holding four 4 KiB structures, each described by a vendor-specific
//!   capability (§4.1.4) whose length is the whole 4 KiB, as in QEMU:
//!   common config at 0x0000, ISR at 0x1000, device config at 0x2000,
//!   notifications at 0x3000 with `notify_off_multiplier` 4 and
//!   `queue_notify_off` = queue index. A fifth capability is the PCI
//!   configuration access window (§4.1.4.9). The capabilities sit at
//!   0x40, 0x50, 0x60, 0x70 and 0x84, the offsets QEMU's allocator gives
//!   them. The function is conventional PCI (256-byte config space), as
//!   QEMU makes virtio functions on a root bus.
//! * **Interrupts without MSI-X** (the board as QEMU has it, §7.5):
//!   `config_msix_vector` and `queue_msix_vector` always read `NO_VECTOR`
//!   (0xFFFF), which §4.1.4.3 and §4.1.5.1.2 let a driver read as "mapping
//!   refused". A used-buffer notification sets ISR bit 0, a configuration
//!   change sets ISR bit 1 (and bumps `config_generation`); either raises
//!   the INTx line. Reading the ISR (at any offset of its 4 KiB, as QEMU
//!   decodes it) returns and clears it and lowers the line (§4.1.4.5).
//! * **MSI-X** (a function built with [`VirtioPciDevice::with_msix`], for
//!   a board with an MSI controller): one vector for configuration changes
//!   plus one per queue, the table at 0 and the PBA at 0x800 of BAR 1 (a
//!   4 KiB 32-bit memory BAR, QEMU's place for it). The vector fields take
//!   a vector number below the table size or `NO_VECTOR`; anything else
//!   reads back `NO_VECTOR` (refused, as QEMU does). While MSI-X is
//!   enabled a notification sends its vector, if it has one, and nothing
//!   else (no ISR bit, no INTx); while it is disabled the INTx rules above
//!   apply. The vector fields return to `NO_VECTOR` on device reset.
//! * **Feature negotiation.** `VIRTIO_F_VERSION_1` is always offered (the
//!   transport is modern-only). Feature bits the transport cannot honour
//!   (packed rings, notification data, ring reset, SR-IOV, config-data
//!   notifications) are withdrawn from the device's offer. Setting
//!   `FEATURES_OK` succeeds only if the driver's bits are a subset of the
//!   offer and include `VIRTIO_F_VERSION_1`; otherwise the bit reads back
//!   clear (§3.1.1). Feature writes after `FEATURES_OK` are ignored.
//! * **Device status.** Writing 0 resets the device (§4.1.4.3.1): the
//!   device's own reset, then queues, features, selectors and ISR return
//!   to their defaults. A write that would clear a bit other than by
//!   writing 0 is ignored. `DEVICE_NEEDS_RESET` is the device's bit: the
//!   driver cannot set or clear it. Setting `DRIVER_OK` (after
//!   `FEATURES_OK`) activates the device with an [`ActivateContext`]; if
//!   activation fails the transport sets `DEVICE_NEEDS_RESET` and signals
//!   a configuration change (§2.1.2).
//! * **Queues.** The transport keeps each queue's configuration itself and
//!   builds `virtio_queue::Queue`s only on activation, with the event-index
//!   feature as negotiated. Queue fields change only while the queue is
//!   disabled and the device not live. A size must be a power of two no
//!   larger than the maximum (§2.7.10.1); `queue_enable = 1` is refused
//!   (reads back 0) unless the descriptor table, driver and device areas
//!   are aligned (16/2/4) and lie wholly in guest RAM. An out-of-range
//!   `queue_select` reads `queue_size` 0, so the driver sees no queue there
//!   (§4.1.4.3.2), and writes to it are dropped.
//! * **Bus mastering.** As under QEMU, a device may do DMA only while the
//!   command register's bus-master bit is set: a `DRIVER_OK` written
//!   before it is recorded but the device starts only once bus mastering
//!   is on, and clearing the bit stops a running device (its reset) and
//!   clears `DRIVER_OK` (QEMU's `virtio_write_config`). Setting
//!   `DRIVER_OK` again starts it afresh from the queues' current
//!   configuration, with ring indices at 0 (QEMU would resume where it
//!   stopped; only a driver that ignores the reset protocol can tell).
//! * **Notifications.** A store anywhere in queue *n*'s 4-byte notify slot
//!   calls [`VirtioDevice::queue_notify`] for *n*, only while the device
//!   is live and *n* is enabled.
//! * **Access widths.** Loads of the common config may be of any width and
//!   offset (they have no side effects). Stores must use a field's own
//!   width; the 64-bit address fields also take two 32-bit halves or one
//!   64-bit store (§4.1.3.1). Other stores are ignored and logged.
//!   Device config loads and stores of any width go to the device.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use vm_core::sync::lock;

use ::pci::capability::{CapabilityList, CAP_ID_VENDOR};
use ::pci::msix::{Msix, MsixLayout};
use ::pci::{BarKind, BarRegion, MsiSink, PciDevice};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_NOTIFICATION_DATA, VIRTIO_F_NOTIF_CONFIG_DATA, VIRTIO_F_RING_PACKED,
    VIRTIO_F_RING_RESET, VIRTIO_F_SR_IOV,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_core::{AccessWidth, GuestRam, IrqLine, NoIrq};
use vm_memory::GuestAddress;

use crate::device::{
    ActivateContext, QueuePosition, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
};

/// The BAR that holds the virtio structures.
pub const MODERN_BAR: u8 = 4;
/// Size of that BAR.
pub const BAR_SIZE: u64 = 0x4000;
/// Offsets of the structures in the BAR.
pub const COMMON_CFG_OFFSET: u64 = 0x0000;
pub const ISR_OFFSET: u64 = 0x1000;
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// Size of each structure's slot in the BAR, and its capability length.
pub const REGION_SIZE: u64 = 0x1000;
/// Bytes between two queues' notify addresses.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// Queues that fit in the notify region.
pub const MAX_QUEUES: usize = (REGION_SIZE / NOTIFY_OFF_MULTIPLIER as u64) as usize;
/// Largest split-queue size (§2.7).
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// "No MSI-X vector".
pub const NO_VECTOR: u16 = 0xffff;
/// The BAR that holds the MSI-X table and PBA, when there is one.
pub const MSIX_BAR: u8 = 1;
pub const MSIX_BAR_SIZE: u64 = 0x1000;
pub const MSIX_TABLE_OFFSET: u64 = 0;
pub const MSIX_PBA_OFFSET: u64 = 0x800;

/// `cfg_type` values of the virtio PCI capabilities (§4.1.4).
pub const CAP_COMMON_CFG: u8 = 1;
pub const CAP_NOTIFY_CFG: u8 = 2;
pub const CAP_ISR_CFG: u8 = 3;
pub const CAP_DEVICE_CFG: u8 = 4;
pub const CAP_PCI_CFG: u8 = 5;

/// `struct virtio_pci_common_cfg` (§4.1.4.3).
pub mod common {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
    /// Only meaningful with `VIRTIO_F_NOTIF_CONFIG_DATA` (never offered).
    pub const QUEUE_NOTIF_CONFIG_DATA: u64 = 0x38;
    /// Only meaningful with `VIRTIO_F_RING_RESET` (never offered).
    pub const QUEUE_RESET: u64 = 0x3a;
    pub const SIZE: u64 = 0x3c;
}

/// ISR bits (§4.1.4.5).
pub const ISR_QUEUE: u8 = 1 << 0;
pub const ISR_CONFIG: u8 = 1 << 1;

/// Feature bits this transport cannot provide.
const TRANSPORT_UNSUPPORTED: u64 = 1 << VIRTIO_F_RING_PACKED
    | 1 << VIRTIO_F_NOTIFICATION_DATA
    | 1 << VIRTIO_F_NOTIF_CONFIG_DATA
    | 1 << VIRTIO_F_RING_RESET
    | 1 << VIRTIO_F_SR_IOV;

const STATUS_FEATURES_OK: u8 = VIRTIO_CONFIG_S_FEATURES_OK as u8;
const STATUS_DRIVER_OK: u8 = VIRTIO_CONFIG_S_DRIVER_OK as u8;
const STATUS_NEEDS_RESET: u8 = VIRTIO_CONFIG_S_NEEDS_RESET as u8;

/// Layout of `struct virtio_pci_cap` after the ID and next bytes.
const CAP_LEN: u8 = 16;
const NOTIFY_CAP_LEN: u8 = 20;
const PCI_CFG_CAP_LEN: u8 = 20;
/// Offsets inside `struct virtio_pci_cfg_cap`.
const PCI_CFG_BAR: u16 = 4;
const PCI_CFG_OFFSET: u16 = 8;
const PCI_CFG_LENGTH: u16 = 12;
const PCI_CFG_DATA: u16 = 16;

/// The interrupt side, shared with the device after activation.
struct IrqState {
    isr: u8,
    line: Arc<dyn IrqLine>,
}

struct Shared {
    irq: Mutex<IrqState>,
    config_generation: AtomicU8,
    /// MSI-X, when the function was built with it.
    msix: Option<Msix>,
    config_vector: AtomicU16,
    queue_vectors: Vec<AtomicU16>,
    /// The command register lets the function write memory (an MSI-X
    /// message is such a write).
    bus_master: AtomicBool,
}

impl Shared {
    fn raise(&self, bits: u8) {
        let mut irq = lock(&self.irq);
        irq.isr |= bits;
        irq.line.set_level(true);
    }

    fn take_isr(&self) -> u8 {
        let mut irq = lock(&self.irq);
        let isr = std::mem::take(&mut irq.isr);
        irq.line.set_level(false);
        isr
    }

    fn clear(&self) {
        let mut irq = lock(&self.irq);
        irq.isr = 0;
        irq.line.set_level(false);
        self.config_vector.store(NO_VECTOR, Ordering::SeqCst);
        for v in &self.queue_vectors {
            v.store(NO_VECTOR, Ordering::SeqCst);
        }
    }

    /// Signals through MSI-X if it is enabled (`true`, even when the
    /// source has no vector); `false` means the INTx rules apply.
    fn send_msix(&self, vector: u16) -> bool {
        let Some(msix) = &self.msix else {
            return false;
        };
        if !msix.enabled() {
            return false;
        }
        if vector != NO_VECTOR && self.bus_master.load(Ordering::SeqCst) {
            msix.notify(vector);
        }
        true
    }

    /// A vector number the driver wrote, as the field keeps it.
    fn accept_vector(&self, vector: u16) -> u16 {
        let vectors = self.msix.as_ref().map_or(0, |m| m.layout().vectors);
        if vector < vectors {
            vector
        } else {
            if vector != NO_VECTOR {
                vm_core::guest_error!(
                    "virtio-pci: MSI-X vector {vector} refused ({vectors} in the table)"
                );
            }
            NO_VECTOR
        }
    }
}

/// [`VirtioInterrupt`] over MSI-X or else the ISR register and the INTx
/// line.
struct TransportInterrupt(Arc<Shared>);

impl VirtioInterrupt for TransportInterrupt {
    fn notify_queue(&self, queue: u16) {
        let vector = self
            .0
            .queue_vectors
            .get(usize::from(queue))
            .map_or(NO_VECTOR, |v| v.load(Ordering::SeqCst));
        if !self.0.send_msix(vector) {
            self.0.raise(ISR_QUEUE);
        }
    }

    fn notify_config(&self) {
        self.0.config_generation.fetch_add(1, Ordering::SeqCst);
        if !self
            .0
            .send_msix(self.0.config_vector.load(Ordering::SeqCst))
        {
            self.0.raise(ISR_CONFIG);
        }
    }
}

/// One queue's configuration as the driver wrote it.
#[derive(Clone, Copy, Debug)]
struct QueueConfig {
    max_size: u16,
    size: u16,
    enabled: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueConfig {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            enabled: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }

    /// Why the queue cannot be enabled, if it cannot.
    fn check(&self, memory: &GuestRam) -> Result<(), String> {
        let n = u64::from(self.size);
        if self.size == 0 || !self.size.is_power_of_two() || self.size > self.max_size {
            return Err(format!("size {}", self.size));
        }
        for (what, addr, align, len) in [
            ("descriptor table", self.desc, 16, 16 * n),
            ("driver area", self.driver, 2, 6 + 2 * n),
            ("device area", self.device, 4, 6 + 8 * n),
        ] {
            if addr % align != 0 {
                return Err(format!("{what} at {addr:#x} is not {align}-byte aligned"));
            }
            if !vm_core::memory::range_is_ram(memory, addr, len) {
                return Err(format!("{what} at {addr:#x}+{len:#x} is not in RAM"));
            }
        }
        Ok(())
    }

    /// Why a queue read from a snapshot is not one a driver could have
    /// programmed, if it is not.
    fn check_saved(&self, memory: &GuestRam) -> Result<(), String> {
        if self.enabled {
            return self.check(memory);
        }
        let size_ok = if self.max_size == 0 {
            self.size == 0
        } else {
            self.size.is_power_of_two() && self.size <= self.max_size
        };
        if !size_ok {
            return Err(format!("size {}", self.size));
        }
        Ok(())
    }

    fn build(&self, event_idx: bool) -> Queue {
        let built = Queue::new(self.max_size.max(1)).and_then(|mut q| {
            q.try_set_size(self.size)?;
            q.try_set_desc_table_address(GuestAddress(self.desc))?;
            q.try_set_avail_ring_address(GuestAddress(self.driver))?;
            q.try_set_used_ring_address(GuestAddress(self.device))?;
            q.set_event_idx(event_idx);
            q.set_ready(self.enabled);
            Ok(q)
        });
        // `check` vetted every field of an enabled queue, so only a queue
        // the driver never enabled can fail here; it goes out not ready.
        built.unwrap_or_else(|_| {
            let mut q = Queue::new(1).expect("1 is a valid queue size");
            q.set_ready(false);
            q
        })
    }
}

/// Everything behind the transport's lock.
struct Inner {
    device: Box<dyn VirtioDevice>,
    memory: GuestRam,
    offered: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    queue_select: u16,
    queues: Vec<QueueConfig>,
    live: bool,
    bus_master: bool,
    caps: CapabilityList,
    pci_cfg_cap: u16,
}

impl Inner {
    fn reset(&mut self, shared: &Shared) {
        self.device.reset();
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.queue_select = 0;
        for q in &mut self.queues {
            *q = QueueConfig::new(q.max_size);
        }
        self.live = false;
        shared.clear();
    }

    fn selected(&self) -> Option<&QueueConfig> {
        self.queues.get(usize::from(self.queue_select))
    }

    /// The common config structure as the driver would read it now.
    fn common_image(&self, shared: &Shared) -> [u8; common::SIZE as usize] {
        let mut b = [0u8; common::SIZE as usize];
        let mut put = |offset: u64, bytes: &[u8]| {
            let at = offset as usize;
            b[at..at + bytes.len()].copy_from_slice(bytes);
        };
        put(
            common::DEVICE_FEATURE_SELECT,
            &self.device_feature_select.to_le_bytes(),
        );
        let device_feature = match self.device_feature_select {
            0 => self.offered as u32,
            1 => (self.offered >> 32) as u32,
            _ => 0,
        };
        put(common::DEVICE_FEATURE, &device_feature.to_le_bytes());
        put(
            common::DRIVER_FEATURE_SELECT,
            &self.driver_feature_select.to_le_bytes(),
        );
        let driver_feature = match self.driver_feature_select {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        };
        put(common::DRIVER_FEATURE, &driver_feature.to_le_bytes());
        put(
            common::CONFIG_MSIX_VECTOR,
            &shared.config_vector.load(Ordering::SeqCst).to_le_bytes(),
        );
        put(
            common::NUM_QUEUES,
            &(self.queues.len() as u16).to_le_bytes(),
        );
        put(common::DEVICE_STATUS, &[self.status]);
        put(
            common::CONFIG_GENERATION,
            &[shared.config_generation.load(Ordering::SeqCst)],
        );
        put(common::QUEUE_SELECT, &self.queue_select.to_le_bytes());
        if let Some(q) = self.selected() {
            let vector = shared
                .queue_vectors
                .get(usize::from(self.queue_select))
                .map_or(NO_VECTOR, |v| v.load(Ordering::SeqCst));
            put(common::QUEUE_MSIX_VECTOR, &vector.to_le_bytes());
            put(common::QUEUE_SIZE, &q.size.to_le_bytes());
            put(common::QUEUE_ENABLE, &u16::from(q.enabled).to_le_bytes());
            put(common::QUEUE_NOTIFY_OFF, &self.queue_select.to_le_bytes());
            put(common::QUEUE_DESC, &q.desc.to_le_bytes());
            put(common::QUEUE_DRIVER, &q.driver.to_le_bytes());
            put(common::QUEUE_DEVICE, &q.device.to_le_bytes());
        }
        b
    }

    fn read_common(&self, shared: &Shared, offset: u64, width: AccessWidth) -> u64 {
        let image = self.common_image(shared);
        let mut bytes = [0u8; 8];
        for (i, byte) in bytes.iter_mut().take(width.bytes() as usize).enumerate() {
            *byte = offset
                .checked_add(i as u64)
                .and_then(|o| image.get(o as usize))
                .copied()
                .unwrap_or(0);
        }
        u64::from_le_bytes(bytes)
    }

    fn write_common(&mut self, shared: &Arc<Shared>, offset: u64, width: AccessWidth, value: u64) {
        use common::*;
        use AccessWidth::*;
        match (offset, width) {
            (DEVICE_FEATURE_SELECT, Word) => self.device_feature_select = value as u32,
            (DRIVER_FEATURE_SELECT, Word) => self.driver_feature_select = value as u32,
            (DRIVER_FEATURE, Word) => self.write_driver_feature(value as u32),
            // Without MSI-X every vector is refused: the field stays
            // NO_VECTOR, which tells the driver so.
            (CONFIG_MSIX_VECTOR, Half) => shared
                .config_vector
                .store(shared.accept_vector(value as u16), Ordering::SeqCst),
            (QUEUE_MSIX_VECTOR, Half) => {
                let vector = shared.accept_vector(value as u16);
                match shared.queue_vectors.get(usize::from(self.queue_select)) {
                    Some(v) => v.store(vector, Ordering::SeqCst),
                    None => vm_core::guest_error!(
                        "virtio-pci: vector for queue {}, which does not exist",
                        self.queue_select
                    ),
                }
            }
            (DEVICE_STATUS, Byte) => self.write_status(shared, value as u8),
            (QUEUE_SELECT, Half) => self.queue_select = value as u16,
            (QUEUE_SIZE, Half) => self.write_queue_size(value as u16),
            (QUEUE_ENABLE, Half) => self.write_queue_enable(value as u16),
            (QUEUE_DESC | QUEUE_DRIVER | QUEUE_DEVICE, Double) => {
                self.write_queue_address(offset, !0, value)
            }
            (QUEUE_DESC | QUEUE_DRIVER | QUEUE_DEVICE, Word) => {
                self.write_queue_address(offset, 0xffff_ffff, value)
            }
            (o, Word)
                if matches!(
                    o.checked_sub(4),
                    Some(QUEUE_DESC | QUEUE_DRIVER | QUEUE_DEVICE)
                ) =>
            {
                self.write_queue_address(o - 4, 0xffff_ffff << 32, value << 32)
            }
            _ => vm_core::guest_error!(
                "virtio-pci: {width} store of {value:#x} to common config {offset:#x} ignored"
            ),
        }
    }

    fn write_driver_feature(&mut self, value: u32) {
        if self.status & STATUS_FEATURES_OK != 0 {
            vm_core::guest_error!("virtio-pci: driver features written after FEATURES_OK");
            return;
        }
        let value = u64::from(value);
        match self.driver_feature_select {
            0 => self.driver_features = self.driver_features & !0xffff_ffff | value,
            1 => self.driver_features = self.driver_features & 0xffff_ffff | value << 32,
            sel => {
                if value != 0 {
                    vm_core::guest_error!(
                        "virtio-pci: driver features {value:#x} in unknown word {sel}"
                    );
                }
            }
        }
    }

    fn write_status(&mut self, shared: &Arc<Shared>, value: u8) {
        if value == 0 {
            self.reset(shared);
            return;
        }
        let old = self.status;
        let driver_bits = old & !STATUS_NEEDS_RESET;
        if driver_bits & !value != 0 {
            vm_core::guest_error!(
                "virtio-pci: status {value:#x} would clear bits of {old:#x}; ignored"
            );
            return;
        }
        let mut new = (value & !STATUS_NEEDS_RESET) | (old & STATUS_NEEDS_RESET);
        if new & STATUS_FEATURES_OK != 0 && old & STATUS_FEATURES_OK == 0 {
            let unoffered = self.driver_features & !self.offered;
            if unoffered != 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                vm_core::guest_error!(
                    "virtio-pci: FEATURES_OK refused for features {:#x} (offered {:#x})",
                    self.driver_features,
                    self.offered
                );
                new &= !STATUS_FEATURES_OK;
            }
        }
        let activate = new & STATUS_DRIVER_OK != 0 && old & STATUS_DRIVER_OK == 0;
        if activate && new & STATUS_FEATURES_OK == 0 {
            vm_core::guest_error!("virtio-pci: DRIVER_OK without FEATURES_OK ignored");
            new &= !STATUS_DRIVER_OK;
            self.status = new;
            return;
        }
        self.status = new;
        if activate && self.bus_master {
            self.activate(shared);
        }
    }

    fn command_written(&mut self, shared: &Arc<Shared>, command: u16) {
        let master = command & ::pci::config::reg::COMMAND_MASTER != 0;
        shared.bus_master.store(master, Ordering::SeqCst);
        if let Some(msix) = &shared.msix {
            msix.set_bus_master(master);
        }
        let was = std::mem::replace(&mut self.bus_master, master);
        let driver_ok = self.status & STATUS_DRIVER_OK != 0;
        if master && !was && driver_ok && !self.live && self.status & STATUS_NEEDS_RESET == 0 {
            self.activate(shared);
        } else if !master && driver_ok {
            if self.live {
                self.device.reset();
                self.live = false;
            }
            self.status &= !STATUS_DRIVER_OK;
        }
    }

    /// The device's start: the queues as configured, with the ring
    /// positions of `positions` (a restore) or at 0.
    fn activation(&self, shared: &Arc<Shared>, positions: &[QueuePosition]) -> ActivateContext {
        let event_idx = self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let mut queue = q.build(event_idx);
                if let Some(p) = positions.get(i) {
                    queue.set_next_avail(p.next_avail);
                    queue.set_next_used(p.next_used);
                }
                queue
            })
            .collect();
        ActivateContext {
            memory: self.memory.clone(),
            queues,
            acked_features: self.driver_features,
            interrupt: Arc::new(TransportInterrupt(shared.clone())),
        }
    }

    fn activate(&mut self, shared: &Arc<Shared>) {
        let ctx = self.activation(shared, &[]);
        match self.device.activate(ctx) {
            Ok(()) => self.live = true,
            Err(e) => {
                vm_core::guest_error!("virtio-pci: device refused to start: {e}");
                self.status |= STATUS_NEEDS_RESET;
                shared.config_generation.fetch_add(1, Ordering::SeqCst);
                shared.raise(ISR_CONFIG);
            }
        }
    }

    /// The selected queue, if the driver may change it now.
    fn configurable_queue(&mut self) -> Option<&mut QueueConfig> {
        let live = self.live || self.status & STATUS_DRIVER_OK != 0;
        let select = self.queue_select;
        let Some(q) = self.queues.get_mut(usize::from(select)) else {
            vm_core::guest_error!("virtio-pci: store to queue {select}, which does not exist");
            return None;
        };
        if live || q.enabled {
            vm_core::guest_error!("virtio-pci: queue {select} changed while in use; ignored");
            return None;
        }
        Some(q)
    }

    fn write_queue_size(&mut self, size: u16) {
        let Some(q) = self.configurable_queue() else {
            return;
        };
        if size == 0 || !size.is_power_of_two() || size > q.max_size {
            vm_core::guest_error!(
                "virtio-pci: queue size {size} refused (power of two up to {})",
                q.max_size
            );
            return;
        }
        q.size = size;
    }

    fn write_queue_enable(&mut self, value: u16) {
        if value != 1 {
            vm_core::guest_error!("virtio-pci: queue_enable {value} ignored (only 1 is valid)");
            return;
        }
        let memory = self.memory.clone();
        let select = self.queue_select;
        let Some(q) = self.configurable_queue() else {
            return;
        };
        if let Some(moved) = crate::quirks::relocated_used_ring(q.driver, q.device, q.size) {
            tracing::warn!(
                "virtio-pci: queue {select}'s used ring at {:#x} overlaps its available ring; \
                 using {moved:#x} (a macOS driver bug, docs/macos.md)",
                q.device
            );
            q.device = moved;
        }
        match q.check(&memory) {
            Ok(()) => q.enabled = true,
            Err(why) => vm_core::guest_error!("virtio-pci: queue {select} not enabled: {why}"),
        }
    }

    fn write_queue_address(&mut self, field: u64, mask: u64, value: u64) {
        let Some(q) = self.configurable_queue() else {
            return;
        };
        let slot = match field {
            common::QUEUE_DESC => &mut q.desc,
            common::QUEUE_DRIVER => &mut q.driver,
            _ => &mut q.device,
        };
        *slot = *slot & !mask | value & mask;
    }

    fn notify(&mut self, offset: u64) {
        let queue = offset / u64::from(NOTIFY_OFF_MULTIPLIER);
        let enabled = self.queues.get(queue as usize).is_some_and(|q| q.enabled);
        if !self.live || self.status & STATUS_NEEDS_RESET != 0 || !enabled {
            vm_core::guest_error!("virtio-pci: notify of queue {queue} while it cannot run");
            return;
        }
        self.device.queue_notify(queue as u16);
    }

    fn read_bar0(&self, shared: &Shared, offset: u64, width: AccessWidth) -> u64 {
        match offset / REGION_SIZE {
            0 => self.read_common(shared, offset, width),
            1 => u64::from(shared.take_isr()),
            2 => {
                let mut bytes = [0u8; 8];
                let len = width.bytes() as usize;
                self.device
                    .read_config(offset - DEVICE_CFG_OFFSET, &mut bytes[..len]);
                u64::from_le_bytes(bytes)
            }
            _ => 0,
        }
    }

    fn write_bar0(&mut self, shared: &Arc<Shared>, offset: u64, width: AccessWidth, value: u64) {
        match offset / REGION_SIZE {
            0 => self.write_common(shared, offset, width, value),
            2 => {
                let bytes = value.to_le_bytes();
                let len = width.bytes() as usize;
                self.device
                    .write_config(offset - DEVICE_CFG_OFFSET, &bytes[..len]);
            }
            3 => self.notify(offset - NOTIFY_OFFSET),
            _ => vm_core::guest_error!(
                "virtio-pci: {width} store to read-only BAR offset {offset:#x}"
            ),
        }
    }

    /// The BAR access the PCI configuration access capability describes:
    /// `(offset, width)` when it is one the device honours (§4.1.4.9.1).
    fn pci_cfg_window(&self) -> Option<(u64, AccessWidth)> {
        let cap = self
            .caps
            .bytes(self.pci_cfg_cap, usize::from(PCI_CFG_CAP_LEN))?;
        let bar = cap[usize::from(PCI_CFG_BAR)];
        let word = |at: u16| {
            let at = usize::from(at);
            u32::from_le_bytes([cap[at], cap[at + 1], cap[at + 2], cap[at + 3]])
        };
        let offset = u64::from(word(PCI_CFG_OFFSET));
        let width = AccessWidth::from_bytes(u64::from(word(PCI_CFG_LENGTH)))?;
        let aligned = offset % width.bytes() == 0;
        let inside = offset + width.bytes() <= BAR_SIZE;
        (bar == MODERN_BAR && width != AccessWidth::Double && aligned && inside)
            .then_some((offset, width))
    }

    fn pci_cfg_data_range(&self) -> std::ops::Range<u16> {
        self.pci_cfg_cap + PCI_CFG_DATA..self.pci_cfg_cap + PCI_CFG_CAP_LEN as u16
    }

    fn read_config(&mut self, shared: &Shared, offset: u16, width: AccessWidth) -> u32 {
        let data = self.pci_cfg_data_range();
        let end = offset.saturating_add(width.bytes() as u16);
        if offset < data.end && end > data.start {
            let value = match self.pci_cfg_window() {
                Some((off, w)) => self.read_bar0(shared, off, w) as u32,
                None => 0,
            };
            if let Some(bytes) = self.caps.bytes_mut(data.start, 4) {
                bytes.copy_from_slice(&value.to_le_bytes());
            }
        }
        self.caps.read(offset, width)
    }

    fn write_config(&mut self, shared: &Arc<Shared>, offset: u16, width: AccessWidth, value: u32) {
        let cap = self.pci_cfg_cap;
        let writable = |o: u16| {
            o == cap + PCI_CFG_BAR
                || (cap + PCI_CFG_OFFSET..cap + PCI_CFG_CAP_LEN as u16).contains(&o)
        };
        if let Some(msix) = &shared.msix {
            msix.write_config(&mut self.caps, offset, width, value);
        }
        let data = self.pci_cfg_data_range();
        let mut touches_data = false;
        for i in 0..width.bytes().min(4) as u16 {
            let Some(o) = offset.checked_add(i) else {
                break;
            };
            if !writable(o) {
                continue;
            }
            if let Some(byte) = self.caps.bytes_mut(o, 1) {
                byte[0] = (value >> (8 * i)) as u8;
            }
            touches_data |= data.contains(&o);
        }
        if touches_data {
            let Some((off, w)) = self.pci_cfg_window() else {
                vm_core::guest_error!("virtio-pci: PCI config access window is not valid");
                return;
            };
            let value = self
                .caps
                .bytes(data.start, 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .unwrap_or(0);
            self.write_bar0(shared, off, w, u64::from(value));
        }
    }
}

/// A virtio device behind the modern virtio-pci transport.
pub struct VirtioPciDevice {
    name: String,
    identity: crate::PciIdentity,
    inner: Mutex<Inner>,
    shared: Arc<Shared>,
}

impl VirtioPciDevice {
    /// Wraps `device`; its queues will live in `memory`. Interrupts go
    /// through INTx only.
    pub fn new(device: Box<dyn VirtioDevice>, memory: GuestRam) -> Self {
        Self::build(device, memory, None)
    }

    /// Like [`VirtioPciDevice::new`], with an MSI-X capability whose
    /// messages go to `sink`: one vector for configuration changes and one
    /// per queue.
    pub fn with_msix(
        device: Box<dyn VirtioDevice>,
        memory: GuestRam,
        sink: Arc<dyn MsiSink>,
    ) -> Self {
        Self::build(device, memory, Some(sink))
    }

    fn build(
        device: Box<dyn VirtioDevice>,
        memory: GuestRam,
        sink: Option<Arc<dyn MsiSink>>,
    ) -> Self {
        let identity = device.pci_identity();
        let name = match device.device_type() {
            1 => "virtio-net".to_string(),
            2 => "virtio-blk".to_string(),
            t => format!("virtio-{t}"),
        };
        let mut max_sizes = device.queue_max_sizes();
        if max_sizes.len() > MAX_QUEUES {
            tracing::error!(
                "{name}: {} queues requested, only {MAX_QUEUES} fit the notify region",
                max_sizes.len()
            );
            max_sizes.truncate(MAX_QUEUES);
        }
        let queues = max_sizes
            .into_iter()
            .map(|max| {
                // The driver must be able to pick a power of two up to the
                // maximum, so an odd maximum from a device rounds down.
                let max = max.min(MAX_QUEUE_SIZE);
                let max = if max == 0 { 0 } else { 1 << max.ilog2() };
                QueueConfig::new(max)
            })
            .collect::<Vec<_>>();
        let offered = (device.features() | VIRTIO_F_VERSION_1) & !TRANSPORT_UNSUPPORTED;

        let mut caps = CapabilityList::new();
        let region = |cfg_type: u8, offset: u64, length: u64| {
            let mut body = vec![CAP_LEN, cfg_type, MODERN_BAR, 0, 0, 0];
            body.extend_from_slice(&(offset as u32).to_le_bytes());
            body.extend_from_slice(&(length as u32).to_le_bytes());
            body
        };
        let mut notify = region(CAP_NOTIFY_CFG, NOTIFY_OFFSET, REGION_SIZE);
        notify[0] = NOTIFY_CAP_LEN;
        notify.extend_from_slice(&NOTIFY_OFF_MULTIPLIER.to_le_bytes());
        let mut pci_cfg = region(CAP_PCI_CFG, 0, 0);
        pci_cfg[0] = PCI_CFG_CAP_LEN;
        // The driver picks the BAR of each access itself.
        pci_cfg[2] = 0;
        pci_cfg.extend_from_slice(&[0; 4]);
        for body in [
            region(CAP_COMMON_CFG, COMMON_CFG_OFFSET, REGION_SIZE),
            region(CAP_ISR_CFG, ISR_OFFSET, REGION_SIZE),
            region(CAP_DEVICE_CFG, DEVICE_CFG_OFFSET, REGION_SIZE),
            notify,
        ] {
            caps.add(CAP_ID_VENDOR, &body)
                .expect("the virtio capabilities fit in 192 bytes");
        }
        let pci_cfg_cap = caps
            .add(CAP_ID_VENDOR, &pci_cfg)
            .expect("the virtio capabilities fit in 192 bytes");
        let num_queues = queues.len();
        let msix = sink.map(|sink| {
            let layout = MsixLayout {
                vectors: num_queues as u16 + 1,
                table_bar: MSIX_BAR,
                table_offset: MSIX_TABLE_OFFSET as u32,
                pba_bar: MSIX_BAR,
                pba_offset: MSIX_PBA_OFFSET as u32,
            };
            Msix::add(&mut caps, layout, sink).expect("the MSI-X capability fits after virtio's")
        });

        Self {
            name,
            identity,
            inner: Mutex::new(Inner {
                device,
                memory,
                offered,
                device_feature_select: 0,
                driver_feature_select: 0,
                driver_features: 0,
                status: 0,
                queue_select: 0,
                queues,
                live: false,
                bus_master: false,
                caps,
                pci_cfg_cap,
            }),
            shared: Arc::new(Shared {
                irq: Mutex::new(IrqState {
                    isr: 0,
                    line: Arc::new(NoIrq),
                }),
                config_generation: AtomicU8::new(0),
                msix,
                config_vector: AtomicU16::new(NO_VECTOR),
                queue_vectors: (0..num_queues).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
                bus_master: AtomicBool::new(false),
            }),
        }
    }

    /// The device status byte, for logs and tests.
    pub fn status(&self) -> u8 {
        lock(&self.inner).status
    }

    /// Whether [`VirtioPciDevice::save_state`] can capture the function
    /// whole (its device says so).
    pub fn saves_state(&self) -> bool {
        lock(&self.inner).device.saves_state()
    }

    /// Before a save, with the vCPUs parked: a running device finishes
    /// what it has in flight and stops its threads
    /// ([`VirtioDevice::quiesce`]).
    pub fn quiesce(&self) {
        let mut inner = lock(&self.inner);
        if inner.live {
            inner.device.quiesce();
        }
    }

    /// After a save the VM goes on from: the device's threads start again.
    pub fn resume(&self) {
        let mut inner = lock(&self.inner);
        if inner.live {
            inner.device.resume();
        }
    }

    /// The transport's state and its device's queue positions, for a
    /// snapshot; taken with the vCPUs parked, when no notify runs.
    pub fn save_state(&self) -> Result<SavedVirtioPci, String> {
        let inner = lock(&self.inner);
        if !inner.device.saves_state() {
            return Err(format!("{} cannot save its state", self.name));
        }
        let positions = if inner.live {
            inner.device.queue_positions()
        } else {
            Vec::new()
        };
        if inner.live && positions.len() != inner.queues.len() {
            return Err(format!(
                "{}: the device reports {} queues of {}",
                self.name,
                positions.len(),
                inner.queues.len()
            ));
        }
        let cap = inner.pci_cfg_cap;
        let pci_cfg_window = inner
            .caps
            .bytes(cap + PCI_CFG_BAR, usize::from(PCI_CFG_CAP_LEN) - 4)
            .map(<[u8]>::to_vec)
            .unwrap_or_default();
        Ok(SavedVirtioPci {
            device_feature_select: inner.device_feature_select,
            driver_feature_select: inner.driver_feature_select,
            driver_features: inner.driver_features,
            status: inner.status,
            queue_select: inner.queue_select,
            queues: inner
                .queues
                .iter()
                .map(|q| SavedQueue {
                    size: q.size,
                    enabled: q.enabled,
                    desc: q.desc,
                    driver: q.driver,
                    device: q.device,
                })
                .collect(),
            positions: positions
                .iter()
                .map(|p| (p.next_avail, p.next_used))
                .collect(),
            live: inner.live,
            bus_master: inner.bus_master,
            isr: lock(&self.shared.irq).isr,
            config_generation: self.shared.config_generation.load(Ordering::SeqCst),
            pci_cfg_window,
            config_vector: self.shared.config_vector.load(Ordering::SeqCst),
            queue_vectors: self
                .shared
                .queue_vectors
                .iter()
                .map(|v| v.load(Ordering::SeqCst))
                .collect(),
            msix: self.shared.msix.as_ref().map(Msix::save_state),
            device: inner.device.save_device(),
        })
    }

    /// Puts back what [`VirtioPciDevice::save_state`] returned, on a
    /// function built like the saved one. The input is untrusted: it is
    /// checked as the driver's register writes are (queues aligned and in
    /// RAM, sizes, features within the offer, a consistent status) and
    /// refused whole, changing nothing, if it is not a state the driver
    /// could have reached. A live device is started again from its
    /// queues' saved positions.
    pub fn restore_state(&self, saved: &SavedVirtioPci) -> Result<(), String> {
        let mut inner = lock(&self.inner);
        let name = &self.name;
        if !inner.device.saves_state() {
            return Err(format!("{name} cannot restore a state"));
        }
        if saved.queues.len() != inner.queues.len() {
            return Err(format!(
                "{name}: the snapshot has {} queues, this device {}",
                saved.queues.len(),
                inner.queues.len()
            ));
        }
        let queues: Vec<QueueConfig> = inner
            .queues
            .iter()
            .zip(&saved.queues)
            .map(|(q, s)| QueueConfig {
                max_size: q.max_size,
                size: s.size,
                enabled: s.enabled,
                desc: s.desc,
                driver: s.driver,
                device: s.device,
            })
            .collect();
        for (i, q) in queues.iter().enumerate() {
            q.check_saved(&inner.memory)
                .map_err(|why| format!("{name}: queue {i}: {why}"))?;
        }
        let status = saved.status;
        if status & STATUS_FEATURES_OK != 0 {
            let unoffered = saved.driver_features & !inner.offered;
            if unoffered != 0 || saved.driver_features & VIRTIO_F_VERSION_1 == 0 {
                return Err(format!(
                    "{name}: features {:#x} were not offered (offered {:#x})",
                    saved.driver_features, inner.offered
                ));
            }
        }
        if status & STATUS_DRIVER_OK != 0 && status & STATUS_FEATURES_OK == 0 {
            return Err(format!(
                "{name}: status {status:#x}: DRIVER_OK without FEATURES_OK"
            ));
        }
        let runnable =
            status & STATUS_DRIVER_OK != 0 && status & STATUS_NEEDS_RESET == 0 && saved.bus_master;
        if saved.live != runnable {
            return Err(format!(
                "{name}: running {} with status {status:#x}, bus mastering {}",
                saved.live, saved.bus_master
            ));
        }
        if saved.live && !queues.first().is_some_and(|q| q.enabled) {
            return Err(format!("{name}: running without queue 0"));
        }
        let positions: Vec<QueuePosition> = saved
            .positions
            .iter()
            .map(|&(next_avail, next_used)| QueuePosition {
                next_avail,
                next_used,
            })
            .collect();
        let want = if saved.live { queues.len() } else { 0 };
        if positions.len() != want {
            return Err(format!(
                "{name}: {} queue positions for {want} running queues",
                positions.len()
            ));
        }
        if saved.isr & !(ISR_QUEUE | ISR_CONFIG) != 0 {
            return Err(format!("{name}: ISR {:#x}", saved.isr));
        }
        let window_len = usize::from(PCI_CFG_CAP_LEN) - 4;
        if saved.pci_cfg_window.len() != window_len {
            return Err(format!(
                "{name}: PCI config window of {} bytes",
                saved.pci_cfg_window.len()
            ));
        }
        // Vector numbers as the driver's stores would leave them: below
        // the table size, or none.
        let table = self.shared.msix.as_ref().map_or(0, |m| m.layout().vectors);
        if saved.queue_vectors.len() != inner.queues.len() {
            return Err(format!(
                "{name}: {} queue vectors for {} queues",
                saved.queue_vectors.len(),
                inner.queues.len()
            ));
        }
        if let Some(v) = std::iter::once(&saved.config_vector)
            .chain(&saved.queue_vectors)
            .find(|&&v| v != NO_VECTOR && v >= table)
        {
            return Err(format!("{name}: MSI-X vector {v} ({table} in the table)"));
        }
        match (&self.shared.msix, &saved.msix) {
            (None, None) => {}
            (Some(msix), Some(s)) => msix
                .check_state(s)
                .map_err(|why| format!("{name}: {why}"))?,
            (ours, _) => {
                return Err(format!(
                    "{name}: MSI-X {} in the snapshot, {} here",
                    if saved.msix.is_some() { "on" } else { "off" },
                    if ours.is_some() { "on" } else { "off" },
                ))
            }
        }
        let keeps_state = inner.device.save_device().is_some();
        if keeps_state != saved.device.is_some() {
            return Err(format!(
                "{name}: device state {} in the snapshot, {} here",
                if saved.device.is_some() {
                    "present"
                } else {
                    "absent"
                },
                if keeps_state { "kept" } else { "none" },
            ));
        }

        // Checked: from here the state is the driver's as saved.
        if inner.live {
            inner.device.reset();
            inner.live = false;
        }
        if let Some(s) = &saved.device {
            // The device checks its own state as it takes it.
            let memory = inner.memory.clone();
            if let Err(why) = inner.device.restore_device(&memory, s) {
                // Leave the function as a reset would, not half restored.
                inner.reset(&self.shared);
                return Err(format!("{name}: {why}"));
            }
        }
        if let (Some(msix), Some(s)) = (&self.shared.msix, &saved.msix) {
            // Checked above.
            let _ = msix.restore_state(&mut inner.caps, s);
        }
        if let Some(msix) = &self.shared.msix {
            // The command register comes back with the PCI host's state,
            // which does not replay it as a write.
            msix.set_bus_master(saved.bus_master);
        }
        inner.device_feature_select = saved.device_feature_select;
        inner.driver_feature_select = saved.driver_feature_select;
        inner.driver_features = saved.driver_features;
        inner.status = status;
        inner.queue_select = saved.queue_select;
        inner.queues = queues;
        inner.bus_master = saved.bus_master;
        let cap = inner.pci_cfg_cap;
        // The capability's writable fields: BAR, padding, offset, length,
        // data; the fixed header bytes before them stay as built.
        if let Some(bytes) = inner.caps.bytes_mut(cap + PCI_CFG_BAR, window_len) {
            bytes.copy_from_slice(&saved.pci_cfg_window);
        }
        self.shared
            .config_generation
            .store(saved.config_generation, Ordering::SeqCst);
        self.shared
            .config_vector
            .store(saved.config_vector, Ordering::SeqCst);
        for (v, &saved) in self.shared.queue_vectors.iter().zip(&saved.queue_vectors) {
            v.store(saved, Ordering::SeqCst);
        }
        self.shared
            .bus_master
            .store(saved.bus_master, Ordering::SeqCst);
        if saved.live {
            let ctx = inner.activation(&self.shared, &positions);
            if let Err(e) = inner.device.activate(ctx) {
                // Leave the function as a reset would, not half restored.
                inner.reset(&self.shared);
                return Err(format!("{name}: the device does not start: {e}"));
            }
            inner.live = true;
        }
        {
            let mut irq = lock(&self.shared.irq);
            irq.isr = saved.isr;
            irq.line.set_level(saved.isr != 0);
        }
        if saved.live {
            inner.device.restored();
        }
        Ok(())
    }
}

/// A queue's configuration in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedQueue {
    pub size: u16,
    pub enabled: bool,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
}

/// A virtio-pci function's state in a snapshot: the common config as the
/// driver programmed it, the ISR, and where each running queue stands.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedVirtioPci {
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub driver_features: u64,
    pub status: u8,
    pub queue_select: u16,
    pub queues: Vec<SavedQueue>,
    /// `(next_avail, next_used)` of each queue while the device runs.
    pub positions: Vec<(u16, u16)>,
    pub live: bool,
    pub bus_master: bool,
    pub isr: u8,
    pub config_generation: u8,
    /// The PCI configuration access capability's fields after its header
    /// (BAR, offset, length, data).
    pub pci_cfg_window: Vec<u8>,
    /// The MSI-X vector of configuration changes and of each queue
    /// (`NO_VECTOR` for none).
    pub config_vector: u16,
    pub queue_vectors: Vec<u16>,
    /// The MSI-X capability, table and PBA, on a function that has them.
    pub msix: Option<::pci::msix::SavedMsix>,
    /// The device's own state beyond its queues, if it keeps one.
    pub device: Option<crate::device::SavedDevice>,
}

impl PciDevice for VirtioPciDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn ids(&self) -> (u16, u16, u16, u16) {
        let id = &self.identity;
        (
            id.vendor,
            id.device,
            id.subsystem_vendor,
            id.subsystem_device,
        )
    }

    fn class_and_revision(&self) -> (u32, u8) {
        (self.identity.class_code, self.identity.revision)
    }

    fn bars(&self) -> Vec<BarRegion> {
        let mut bars = vec![BarRegion {
            index: MODERN_BAR,
            size: BAR_SIZE,
            kind: BarKind::Memory64,
            prefetchable: true,
        }];
        if self.shared.msix.is_some() {
            bars.insert(
                0,
                BarRegion {
                    index: MSIX_BAR,
                    size: MSIX_BAR_SIZE,
                    kind: BarKind::Memory32,
                    prefetchable: false,
                },
            );
        }
        bars
    }

    fn read_config(&self, offset: u16, width: AccessWidth) -> u32 {
        lock(&self.inner).read_config(&self.shared, offset, width)
    }

    fn write_config(&self, offset: u16, width: AccessWidth, value: u32) {
        lock(&self.inner).write_config(&self.shared, offset, width, value)
    }

    fn capabilities_pointer(&self) -> u8 {
        lock(&self.inner).caps.pointer()
    }

    fn read_bar(&self, bar: u8, offset: u64, width: AccessWidth) -> u64 {
        if bar == MSIX_BAR {
            return match &self.shared.msix {
                Some(m) if offset < MSIX_PBA_OFFSET => m.read_table(offset, width),
                Some(m) => m.read_pba(offset.saturating_sub(MSIX_PBA_OFFSET), width),
                None => 0,
            };
        }
        if bar != MODERN_BAR || offset >= BAR_SIZE {
            return 0;
        }
        lock(&self.inner).read_bar0(&self.shared, offset, width)
    }

    fn write_bar(&self, bar: u8, offset: u64, width: AccessWidth, value: u64) {
        if bar == MSIX_BAR {
            match &self.shared.msix {
                Some(m) if offset < MSIX_PBA_OFFSET => m.write_table(offset, width, value),
                _ => vm_core::guest_error!(
                    "virtio-pci: {width} store to MSI-X BAR offset {offset:#x} ignored"
                ),
            }
            return;
        }
        if bar != MODERN_BAR || offset >= BAR_SIZE {
            return;
        }
        lock(&self.inner).write_bar0(&self.shared, offset, width, value)
    }

    fn command_written(&self, command: u16) {
        lock(&self.inner).command_written(&self.shared, command)
    }

    fn set_intx(&self, line: Arc<dyn IrqLine>) {
        let mut irq = lock(&self.shared.irq);
        line.set_level(irq.isr != 0);
        irq.line = line;
    }

    fn reset(&self) {
        let mut inner = lock(&self.inner);
        inner.reset(&self.shared);
        inner.bus_master = false;
        self.shared.bus_master.store(false, Ordering::SeqCst);
        if let Some(msix) = &self.shared.msix {
            msix.reset(&mut inner.caps);
        }
        let cap = inner.pci_cfg_cap;
        if let Some(fields) = inner.caps.bytes_mut(cap + PCI_CFG_BAR, 1) {
            fields[0] = 0;
        }
        if let Some(fields) = inner.caps.bytes_mut(cap + PCI_CFG_OFFSET, 12) {
            fields.fill(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{ActivateError, PciIdentity};
    use ::pci::{PciHost, NUM_INTX_LINES};
    use vm_core::TestIrq;
    use AccessWidth::*;

    const RAM: u64 = 0x7000_0000;
    const RAM_SIZE: usize = 0x10_0000;
    const F_EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;
    const F_DEV_BIT0: u64 = 1 << 0;

    /// A queue as the device received it on activation.
    #[derive(Debug, PartialEq)]
    struct SeenQueue {
        ready: bool,
        size: u16,
        desc: u64,
        avail: u64,
        used: u64,
        event_idx: bool,
    }

    #[derive(Default)]
    struct Log {
        activations: Vec<(u64, Vec<SeenQueue>)>,
        notifies: Vec<u16>,
        resets: u32,
        config_writes: Vec<(u64, Vec<u8>)>,
        interrupt: Option<Arc<dyn VirtioInterrupt>>,
        /// Where the running device's queues stand: each notify takes and
        /// returns one buffer of its queue.
        positions: Vec<QueuePosition>,
        /// The positions each activation started from.
        started_at: Vec<Vec<QueuePosition>>,
    }

    struct FakeDevice {
        log: Arc<Mutex<Log>>,
        refuse: bool,
    }

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            2
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![256, 100]
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | F_DEV_BIT0 | F_EVENT_IDX | 1 << VIRTIO_F_RING_PACKED
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                let at = offset + i as u64;
                *b = if at < 16 { 0xa0 + at as u8 } else { 0 };
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            lock(&self.log).config_writes.push((offset, data.to_vec()));
        }
        fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
            if self.refuse {
                return Err(ActivateError::MissingQueue(1));
            }
            let queues = ctx
                .queues
                .iter()
                .map(|q| SeenQueue {
                    ready: q.ready(),
                    size: q.size(),
                    desc: q.desc_table(),
                    avail: q.avail_ring(),
                    used: q.used_ring(),
                    event_idx: q.event_idx_enabled(),
                })
                .collect();
            let mut log = lock(&self.log);
            log.activations.push((ctx.acked_features, queues));
            log.interrupt = Some(ctx.interrupt);
            log.positions = ctx.queues.iter().map(QueuePosition::of).collect();
            let started = log.positions.clone();
            log.started_at.push(started);
            Ok(())
        }
        fn queue_notify(&mut self, queue: u16) {
            let mut log = lock(&self.log);
            log.notifies.push(queue);
            if let Some(p) = log.positions.get_mut(usize::from(queue)) {
                p.next_avail = p.next_avail.wrapping_add(1);
                p.next_used = p.next_used.wrapping_add(1);
            }
        }
        fn saves_state(&self) -> bool {
            true
        }
        fn queue_positions(&self) -> Vec<QueuePosition> {
            lock(&self.log).positions.clone()
        }
        fn reset(&mut self) {
            let mut log = lock(&self.log);
            log.resets += 1;
            log.interrupt = None;
            log.positions.clear();
        }
        fn pci_identity(&self) -> PciIdentity {
            PciIdentity {
                vendor: 0x106b,
                device: 0x1a00,
                subsystem_vendor: 0x1af4,
                subsystem_device: 0x1100,
                class_code: 0x01_00_00,
                revision: 1,
            }
        }
    }

    fn memory() -> GuestRam {
        vm_core::memory::create_guest_memory(&[(RAM, RAM_SIZE)]).unwrap()
    }

    struct Direct {
        dev: VirtioPciDevice,
        log: Arc<Mutex<Log>>,
        irq: Arc<TestIrq>,
    }

    impl Direct {
        fn new(refuse: bool) -> Self {
            let log = Arc::new(Mutex::new(Log::default()));
            let dev = VirtioPciDevice::new(
                Box::new(FakeDevice {
                    log: log.clone(),
                    refuse,
                }),
                memory(),
            );
            let irq = Arc::new(TestIrq::new());
            dev.set_intx(irq.clone());
            dev.command_written(MASTER | MEMORY);
            Self { dev, log, irq }
        }
        fn r(&self, offset: u64, width: AccessWidth) -> u64 {
            self.dev.read_bar(MODERN_BAR, offset, width)
        }
        fn w(&self, offset: u64, width: AccessWidth, value: u64) {
            self.dev.write_bar(MODERN_BAR, offset, width, value)
        }
        fn status(&self, value: u8) {
            self.w(common::DEVICE_STATUS, Byte, u64::from(value));
        }
        fn features(&self, value: u64) {
            self.w(common::DRIVER_FEATURE_SELECT, Word, 0);
            self.w(common::DRIVER_FEATURE, Word, value & 0xffff_ffff);
            self.w(common::DRIVER_FEATURE_SELECT, Word, 1);
            self.w(common::DRIVER_FEATURE, Word, value >> 32);
        }
        /// Sets queue 0 up at valid addresses and enables it.
        fn queue0(&self) {
            self.w(common::QUEUE_SELECT, Half, 0);
            self.w(common::QUEUE_SIZE, Half, 16);
            self.w(common::QUEUE_DESC, Double, RAM + 0x1000);
            self.w(common::QUEUE_DRIVER, Double, RAM + 0x2000);
            self.w(common::QUEUE_DEVICE, Double, RAM + 0x3000);
            self.w(common::QUEUE_ENABLE, Half, 1);
        }
        fn live(&self) {
            self.status(0);
            self.status(1);
            self.status(3);
            self.features(VIRTIO_F_VERSION_1);
            self.status(0xb);
            self.queue0();
            self.status(0xf);
            assert_eq!(self.dev.status(), 0xf);
        }
    }

    const MEMORY: u16 = 1 << 1;
    const MASTER: u16 = 1 << 2;
    const ACK: u8 = 1;
    const DRIVER: u8 = 2;
    const DRIVER_OK: u8 = 4;
    const FEATURES_OK: u8 = 8;

    /// A host with the device in slot 1, BAR 4 at 0x5000_0000, memory on.
    fn plugged() -> (Arc<Mutex<Log>>, Vec<Arc<TestIrq>>, PciHost) {
        let irqs: Vec<Arc<TestIrq>> = (0..NUM_INTX_LINES)
            .map(|_| Arc::new(TestIrq::new()))
            .collect();
        let lines: Vec<Arc<dyn IrqLine>> =
            irqs.iter().map(|i| i.clone() as Arc<dyn IrqLine>).collect();
        let host = PciHost::new(lines.try_into().ok().unwrap());
        let log = Arc::new(Mutex::new(Log::default()));
        let dev = VirtioPciDevice::new(
            Box::new(FakeDevice {
                log: log.clone(),
                refuse: false,
            }),
            memory(),
        );
        assert_eq!(host.add_device(Arc::new(dev)).unwrap(), 1);
        let ecam = host.ecam();
        ecam.write(1 << 15 | 0x20, Word, 0x5000_0000);
        ecam.write(1 << 15 | 0x24, Word, 0);
        ecam.write(1 << 15 | 0x04, Half, u64::from(MEMORY | MASTER));
        (log, irqs, host)
    }

    #[test]
    fn header_shows_identity_caps_and_a_64_bit_bar() {
        let (_, _, host) = plugged();
        let ecam = host.ecam();
        let cfg = |reg: u64, w| ecam.read(1 << 15 | reg, w);
        assert_eq!(cfg(0, Word), 0x1a00_106b);
        assert_eq!(cfg(0x08, Word), 0x0100_0001);
        assert_eq!(cfg(0x2c, Word), 0x1100_1af4);
        assert_eq!(cfg(0x06, Half) & 0x10, 0x10);
        assert_eq!(cfg(0x3d, Byte), 1);
        for unused in [0x10, 0x14, 0x18, 0x1c] {
            assert_eq!(cfg(unused, Word), 0, "BAR at {unused:#x}");
        }
        assert_eq!(cfg(0x20, Word), 0x5000_000c);
        ecam.write(1 << 15 | 0x20, Word, 0xffff_ffff);
        assert_eq!(cfg(0x20, Word), 0xffff_c00c, "16 KiB");
        assert_eq!(cfg(0x100, Word), 0xffff_ffff, "conventional PCI");
        // Walk the capability list the way a driver does.
        let mut found = Vec::new();
        let mut at = cfg(0x34, Byte);
        while at != 0 {
            assert_eq!(cfg(at, Byte), 0x09, "vendor-specific");
            let cfg_type = cfg(at + 3, Byte);
            let bar = cfg(at + 4, Byte);
            let offset = cfg(at + 8, Word);
            let length = cfg(at + 12, Word);
            let extra = if cfg_type == 2 { cfg(at + 16, Word) } else { 0 };
            found.push((cfg_type, bar, offset, length, extra));
            at = cfg(at + 1, Byte);
        }
        assert_eq!(
            found,
            vec![
                (1, 4, 0x0000, 0x1000, 0),
                (3, 4, 0x1000, 0x1000, 0),
                (4, 4, 0x2000, 0x1000, 0),
                (2, 4, 0x3000, 0x1000, 4),
                (5, 0, 0, 0, 0),
            ]
        );
        assert!(
            found.iter().all(|c| c.0 != 0x11),
            "no MSI-X capability (§20.1 item 10)"
        );
    }

    #[test]
    fn driver_initialisation_through_the_host() {
        let (log, irqs, host) = plugged();
        let bar = host.mmio_window();
        let w = |off: u64, width, v| bar.write(off, width, v);
        let r = |off: u64, width| bar.read(off, width);

        w(common::DEVICE_STATUS, Byte, 0);
        assert_eq!(r(common::DEVICE_STATUS, Byte), 0);
        w(common::DEVICE_STATUS, Byte, u64::from(ACK));
        w(common::DEVICE_STATUS, Byte, u64::from(ACK | DRIVER));
        assert_eq!(r(common::NUM_QUEUES, Half), 2);

        w(common::DEVICE_FEATURE_SELECT, Word, 0);
        let lo = r(common::DEVICE_FEATURE, Word);
        w(common::DEVICE_FEATURE_SELECT, Word, 1);
        let hi = r(common::DEVICE_FEATURE, Word);
        let offered = hi << 32 | lo;
        assert_eq!(
            offered,
            VIRTIO_F_VERSION_1 | F_DEV_BIT0 | F_EVENT_IDX,
            "packed withdrawn"
        );
        w(common::DEVICE_FEATURE_SELECT, Word, 2);
        assert_eq!(r(common::DEVICE_FEATURE, Word), 0);

        let wanted = VIRTIO_F_VERSION_1 | F_EVENT_IDX;
        w(common::DRIVER_FEATURE_SELECT, Word, 0);
        w(common::DRIVER_FEATURE, Word, wanted & 0xffff_ffff);
        w(common::DRIVER_FEATURE_SELECT, Word, 1);
        w(common::DRIVER_FEATURE, Word, wanted >> 32);
        w(
            common::DEVICE_STATUS,
            Byte,
            u64::from(ACK | DRIVER | FEATURES_OK),
        );
        assert_eq!(
            r(common::DEVICE_STATUS, Byte),
            u64::from(ACK | DRIVER | FEATURES_OK)
        );

        w(common::QUEUE_SELECT, Half, 0);
        assert_eq!(r(common::QUEUE_SIZE, Half), 256);
        assert_eq!(r(common::QUEUE_NOTIFY_OFF, Half), 0);
        assert_eq!(r(common::QUEUE_MSIX_VECTOR, Half), 0xffff);
        w(common::QUEUE_MSIX_VECTOR, Half, 0);
        assert_eq!(
            r(common::QUEUE_MSIX_VECTOR, Half),
            0xffff,
            "NO_VECTOR stays"
        );
        w(common::QUEUE_SIZE, Half, 128);
        w(common::QUEUE_DESC, Word, RAM + 0x1000);
        w(common::QUEUE_DESC + 4, Word, 0);
        w(common::QUEUE_DRIVER, Word, RAM + 0x2000);
        w(common::QUEUE_DRIVER + 4, Word, 0);
        w(common::QUEUE_DEVICE, Word, RAM + 0x3000);
        w(common::QUEUE_DEVICE + 4, Word, 0);
        w(common::QUEUE_ENABLE, Half, 1);
        assert_eq!(r(common::QUEUE_ENABLE, Half), 1);
        assert_eq!(r(common::QUEUE_DESC, Double), RAM + 0x1000);
        w(common::QUEUE_SELECT, Half, 1);
        assert_eq!(r(common::QUEUE_SIZE, Half), 64, "100 rounds down");
        assert_eq!(r(common::QUEUE_NOTIFY_OFF, Half), 1);
        assert!(lock(&log).activations.is_empty());

        w(common::DEVICE_STATUS, Byte, 0xf);
        assert_eq!(r(common::DEVICE_STATUS, Byte), 0xf);
        {
            let log = lock(&log);
            assert_eq!(log.activations.len(), 1);
            let (acked, queues) = &log.activations[0];
            assert_eq!(*acked, wanted);
            assert_eq!(
                queues[0],
                SeenQueue {
                    ready: true,
                    size: 128,
                    desc: RAM + 0x1000,
                    avail: RAM + 0x2000,
                    used: RAM + 0x3000,
                    event_idx: true,
                }
            );
            assert!(!queues[1].ready);
        }

        // Notify queue 0 at notify base + 0 * 4, queue 1 is not enabled.
        w(NOTIFY_OFFSET, Half, 0);
        w(NOTIFY_OFFSET + 4, Half, 1);
        assert_eq!(lock(&log).notifies, vec![0]);

        // The device signals; INTA of slot 1 is line 1.
        let interrupt = lock(&log).interrupt.clone().unwrap();
        interrupt.notify_queue(0);
        assert!(irqs[1].is_asserted());
        assert_eq!(r(ISR_OFFSET, Byte), 1);
        assert!(!irqs[1].is_asserted());
        assert_eq!(r(ISR_OFFSET, Byte), 0, "reading cleared it");
        let generation = r(common::CONFIG_GENERATION, Byte);
        interrupt.notify_config();
        assert_eq!(r(common::CONFIG_GENERATION, Byte), generation + 1);
        assert_eq!(r(ISR_OFFSET, Word), 2);

        // Device config goes through to the device.
        assert_eq!(r(DEVICE_CFG_OFFSET + 4, Word), 0xa7a6_a5a4);
        w(DEVICE_CFG_OFFSET + 2, Half, 0xbeef);
        assert_eq!(lock(&log).config_writes, vec![(2, vec![0xef, 0xbe])]);

        // Reset.
        let resets = lock(&log).resets;
        w(common::DEVICE_STATUS, Byte, 0);
        assert_eq!(r(common::DEVICE_STATUS, Byte), 0);
        assert_eq!(lock(&log).resets, resets + 1);
        w(common::QUEUE_SELECT, Half, 0);
        assert_eq!(r(common::QUEUE_ENABLE, Half), 0);
        assert_eq!(r(common::QUEUE_SIZE, Half), 256);
        assert_eq!(r(common::QUEUE_DESC, Double), 0);
        w(NOTIFY_OFFSET, Half, 0);
        assert_eq!(lock(&log).notifies, vec![0], "no kicks after reset");
    }

    #[test]
    fn features_ok_needs_version_1_and_offered_bits_only() {
        let d = Direct::new(false);
        d.status(ACK | DRIVER);
        d.features(F_DEV_BIT0);
        d.status(ACK | DRIVER | FEATURES_OK);
        assert_eq!(d.dev.status(), ACK | DRIVER, "refused without VERSION_1");
        d.features(VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_RING_PACKED);
        d.status(ACK | DRIVER | FEATURES_OK);
        assert_eq!(
            d.dev.status(),
            ACK | DRIVER,
            "refused with an unoffered bit"
        );
        d.features(VIRTIO_F_VERSION_1 | F_DEV_BIT0);
        d.status(ACK | DRIVER | FEATURES_OK);
        assert_eq!(d.dev.status(), ACK | DRIVER | FEATURES_OK);
        // Features are frozen from here on.
        d.features(VIRTIO_F_VERSION_1);
        d.w(common::DRIVER_FEATURE_SELECT, Word, 0);
        assert_eq!(d.r(common::DRIVER_FEATURE, Word), F_DEV_BIT0);
    }

    #[test]
    fn driver_ok_without_features_ok_does_not_start_the_device() {
        let d = Direct::new(false);
        d.status(ACK | DRIVER);
        d.queue0();
        d.status(ACK | DRIVER | DRIVER_OK);
        assert_eq!(d.dev.status(), ACK | DRIVER);
        assert!(lock(&d.log).activations.is_empty());
        d.w(NOTIFY_OFFSET, Half, 0);
        assert!(lock(&d.log).notifies.is_empty());
    }

    #[test]
    fn status_bits_cannot_be_cleared_except_by_reset() {
        let d = Direct::new(false);
        d.live();
        d.status(ACK);
        assert_eq!(d.dev.status(), 0xf);
        d.status(0x8f);
        assert_eq!(d.dev.status(), 0x8f, "FAILED may be added");
        d.status(0xff);
        assert_eq!(
            d.dev.status() & STATUS_NEEDS_RESET,
            0,
            "NEEDS_RESET is the device's"
        );
        assert_eq!(lock(&d.log).activations.len(), 1, "activated once");
    }

    #[test]
    fn the_device_runs_only_while_bus_mastering_is_on() {
        let d = Direct::new(false);
        d.dev.command_written(MEMORY);
        d.status(ACK | DRIVER);
        d.features(VIRTIO_F_VERSION_1);
        d.status(0xb);
        d.queue0();
        d.status(0xf);
        assert_eq!(d.dev.status(), 0xf);
        assert!(
            lock(&d.log).activations.is_empty(),
            "no DMA before bus master"
        );
        d.w(NOTIFY_OFFSET, Half, 0);
        assert!(lock(&d.log).notifies.is_empty());
        d.dev.command_written(MEMORY | MASTER);
        assert_eq!(lock(&d.log).activations.len(), 1);
        d.w(NOTIFY_OFFSET, Half, 0);
        assert_eq!(lock(&d.log).notifies, vec![0]);
        // Clearing bus master stops the device and drops DRIVER_OK.
        let resets = lock(&d.log).resets;
        d.dev.command_written(MEMORY);
        assert_eq!(lock(&d.log).resets, resets + 1);
        assert_eq!(d.dev.status(), 0xb);
        d.dev.command_written(MEMORY | MASTER);
        assert_eq!(lock(&d.log).activations.len(), 1, "stays stopped");
        d.w(NOTIFY_OFFSET, Half, 0);
        assert_eq!(lock(&d.log).notifies, vec![0]);
    }

    #[test]
    fn refused_activation_sets_needs_reset_and_signals() {
        let d = Direct::new(true);
        d.live_refused();
        assert_eq!(d.dev.status(), 0xf | STATUS_NEEDS_RESET);
        assert!(d.irq.is_asserted());
        assert_eq!(d.r(ISR_OFFSET, Byte), u64::from(ISR_CONFIG));
        d.w(NOTIFY_OFFSET, Half, 0);
        assert!(lock(&d.log).notifies.is_empty());
        d.status(0);
        assert_eq!(d.dev.status(), 0);
    }

    impl Direct {
        fn live_refused(&self) {
            self.status(ACK | DRIVER);
            self.features(VIRTIO_F_VERSION_1);
            self.status(0xb);
            self.queue0();
            self.status(0xf);
        }
    }

    #[test]
    fn hostile_queue_programming_is_refused() {
        let d = Direct::new(false);
        d.status(ACK | DRIVER);
        // Out-of-range queue: reads as absent, writes vanish.
        d.w(common::QUEUE_SELECT, Half, 7);
        assert_eq!(d.r(common::QUEUE_SIZE, Half), 0);
        d.w(common::QUEUE_SIZE, Half, 16);
        d.w(common::QUEUE_ENABLE, Half, 1);
        d.w(common::QUEUE_DESC, Double, RAM);
        assert_eq!(d.r(common::QUEUE_SIZE, Half), 0);
        assert_eq!(d.r(common::QUEUE_ENABLE, Half), 0);
        assert_eq!(d.r(common::QUEUE_DESC, Double), 0);
        d.w(common::QUEUE_SELECT, Half, 0xffff);
        assert_eq!(d.r(common::QUEUE_SIZE, Half), 0);

        d.w(common::QUEUE_SELECT, Half, 0);
        for bad in [0, 100, 512, 0xffff] {
            d.w(common::QUEUE_SIZE, Half, bad);
            assert_eq!(d.r(common::QUEUE_SIZE, Half), 256, "size {bad}");
        }
        d.w(common::QUEUE_SIZE, Half, 64);
        // Outside RAM, straddling its end, wrapping, misaligned.
        for (desc, driver, device) in [
            (0x1000, RAM + 0x2000, RAM + 0x3000),
            (RAM + RAM_SIZE as u64 - 0x200, RAM + 0x2000, RAM + 0x3000),
            (RAM + 0x1000, RAM + 0x2000, u64::MAX - 8),
            (RAM + 0x1008, RAM + 0x2000, RAM + 0x3000),
            (RAM + 0x1000, RAM + 0x2001, RAM + 0x3000),
            (RAM + 0x1000, RAM + 0x2000, RAM + 0x3002),
        ] {
            d.w(common::QUEUE_DESC, Double, desc);
            d.w(common::QUEUE_DRIVER, Double, driver);
            d.w(common::QUEUE_DEVICE, Double, device);
            d.w(common::QUEUE_ENABLE, Half, 1);
            assert_eq!(
                d.r(common::QUEUE_ENABLE, Half),
                0,
                "{desc:#x} {driver:#x} {device:#x}"
            );
        }
        d.queue0();
        assert_eq!(d.r(common::QUEUE_ENABLE, Half), 1);
        // An enabled queue is frozen.
        d.w(common::QUEUE_SIZE, Half, 32);
        d.w(common::QUEUE_DESC, Word, RAM + 0x8000);
        d.w(common::QUEUE_ENABLE, Half, 0);
        assert_eq!(d.r(common::QUEUE_SIZE, Half), 16);
        assert_eq!(d.r(common::QUEUE_DESC, Double), RAM + 0x1000);
        assert_eq!(d.r(common::QUEUE_ENABLE, Half), 1);
    }

    /// macOS 26's AppleVirtIO quirk (crate::quirks): the device uses, and
    /// reports back, a used ring past the available ring it overlapped.
    #[test]
    fn a_used_ring_overlapping_the_available_ring_is_moved_past_it() {
        let d = Direct::new(false);
        d.status(ACK | DRIVER);
        d.w(common::QUEUE_SELECT, Half, 0);
        d.w(common::QUEUE_SIZE, Half, 64);
        d.w(common::QUEUE_DESC, Double, RAM + 0x1000);
        // The available ring takes 6 + 2 * 64 bytes from RAM + 0x2000.
        d.w(common::QUEUE_DRIVER, Double, RAM + 0x2000);
        d.w(common::QUEUE_DEVICE, Double, RAM + 0x2040);
        d.w(common::QUEUE_ENABLE, Half, 1);
        assert_eq!(d.r(common::QUEUE_ENABLE, Half), 1);
        assert_eq!(d.r(common::QUEUE_DEVICE, Double), RAM + 0x3000);
    }

    #[test]
    fn notifications_reach_only_enabled_queues_of_a_live_device() {
        let d = Direct::new(false);
        d.live();
        for offset in [NOTIFY_OFFSET, NOTIFY_OFFSET + 2] {
            d.w(offset, Half, 0);
        }
        d.w(NOTIFY_OFFSET, Word, 0);
        d.w(NOTIFY_OFFSET + 4, Half, 1);
        d.w(NOTIFY_OFFSET + 0xffc, Half, 0x3ff);
        assert_eq!(lock(&d.log).notifies, vec![0, 0, 0]);
    }

    #[test]
    fn isr_read_clears_and_lowers_the_line() {
        let d = Direct::new(false);
        d.live();
        let interrupt = lock(&d.log).interrupt.clone().unwrap();
        assert!(!d.irq.is_asserted());
        interrupt.notify_queue(1);
        interrupt.notify_config();
        assert!(d.irq.is_asserted());
        assert_eq!(
            d.r(ISR_OFFSET + 0x10, Byte),
            3,
            "the whole 4 KiB is the ISR"
        );
        assert!(!d.irq.is_asserted());
        assert_eq!(d.r(ISR_OFFSET, Byte), 0);
        d.w(ISR_OFFSET, Byte, 0xff);
        assert_eq!(d.r(ISR_OFFSET, Byte), 0, "ISR is read-only");
        // Pending ISR survives a new line assignment, and reset clears it.
        interrupt.notify_queue(0);
        let fresh = Arc::new(TestIrq::new());
        d.dev.set_intx(fresh.clone());
        assert!(fresh.is_asserted());
        d.status(0);
        assert!(!fresh.is_asserted());
        assert_eq!(d.r(ISR_OFFSET, Byte), 0);
    }

    #[test]
    fn msix_vectors_read_no_vector() {
        let d = Direct::new(false);
        d.w(common::CONFIG_MSIX_VECTOR, Half, 0);
        d.w(common::QUEUE_MSIX_VECTOR, Half, 1);
        assert_eq!(d.r(common::CONFIG_MSIX_VECTOR, Half), 0xffff);
        assert_eq!(d.r(common::QUEUE_MSIX_VECTOR, Half), 0xffff);
    }

    #[derive(Default)]
    struct Messages(Mutex<Vec<(u64, u32)>>);

    impl MsiSink for Messages {
        fn send(&self, address: u64, data: u32) {
            lock(&self.0).push((address, data));
        }
    }

    #[test]
    fn with_msix_each_queue_and_config_signal_their_own_vector() {
        let log = Arc::new(Mutex::new(Log::default()));
        let messages = Arc::new(Messages::default());
        let dev = VirtioPciDevice::with_msix(
            Box::new(FakeDevice {
                log: log.clone(),
                refuse: false,
            }),
            memory(),
            messages.clone(),
        );
        let irq = Arc::new(TestIrq::new());
        dev.set_intx(irq.clone());
        dev.command_written(MASTER | MEMORY);
        let d = Direct { dev, log, irq };
        assert!(d.dev.bars().iter().any(|b| b.index == MSIX_BAR));
        // The capability follows virtio's: 3 vectors (config + 2 queues).
        let cap = 0x98;
        assert_eq!(d.dev.read_config(cap, Word), 0x0002_0011);
        d.live();
        // Vectors: config 0, queue 0 -> 1, queue 1 -> 2; past the table
        // is refused.
        d.w(common::CONFIG_MSIX_VECTOR, Half, 0);
        d.w(common::QUEUE_MSIX_VECTOR, Half, 1);
        assert_eq!(d.r(common::QUEUE_MSIX_VECTOR, Half), 1);
        d.w(common::QUEUE_SELECT, Half, 1);
        d.w(common::QUEUE_MSIX_VECTOR, Half, 3);
        assert_eq!(d.r(common::QUEUE_MSIX_VECTOR, Half), u64::from(NO_VECTOR));
        d.w(common::QUEUE_MSIX_VECTOR, Half, 2);
        d.w(common::QUEUE_SELECT, Half, 0);
        for v in 0..3u64 {
            d.dev.write_bar(MSIX_BAR, 16 * v, Double, 0x1000_0040);
            d.dev.write_bar(MSIX_BAR, 16 * v + 8, Word, 0xa0 + v);
            d.dev.write_bar(MSIX_BAR, 16 * v + 12, Word, 0);
        }
        let interrupt = lock(&d.log).interrupt.clone().unwrap();
        // MSI-X still disabled: INTx.
        interrupt.notify_queue(1);
        assert!(d.irq.is_asserted());
        assert_eq!(d.r(ISR_OFFSET, Byte), 1);
        d.dev.write_config(cap + 2, Half, 0x8000);
        interrupt.notify_queue(1);
        interrupt.notify_queue(0);
        interrupt.notify_config();
        assert!(!d.irq.is_asserted(), "no INTx with MSI-X");
        assert_eq!(
            *lock(&messages.0),
            vec![
                (0x1000_0040, 0xa2),
                (0x1000_0040, 0xa1),
                (0x1000_0040, 0xa0)
            ]
        );
        // A masked vector pends in the PBA and goes out when unmasked.
        d.dev.write_bar(MSIX_BAR, 16 + 12, Word, 1);
        interrupt.notify_queue(0);
        assert_eq!(d.dev.read_bar(MSIX_BAR, MSIX_PBA_OFFSET, Word), 0b10);
        d.dev.write_bar(MSIX_BAR, 16 + 12, Word, 0);
        assert_eq!(lock(&messages.0).len(), 4);
        // A device reset forgets the vectors; a function reset MSI-X.
        d.status(0);
        assert_eq!(d.r(common::CONFIG_MSIX_VECTOR, Half), u64::from(NO_VECTOR));
        d.dev.reset();
        assert_eq!(d.dev.read_config(cap, Word), 0x0002_0011, "MSI-X off");
    }

    /// A function with MSI-X whose messages go to `messages`, bus
    /// mastering on.
    fn with_msix(messages: Arc<Messages>) -> Direct {
        let log = Arc::new(Mutex::new(Log::default()));
        let dev = VirtioPciDevice::with_msix(
            Box::new(FakeDevice {
                log: log.clone(),
                refuse: false,
            }),
            memory(),
            messages,
        );
        let irq = Arc::new(TestIrq::new());
        dev.set_intx(irq.clone());
        dev.command_written(MASTER | MEMORY);
        Direct { dev, log, irq }
    }

    #[test]
    fn with_msix_a_restored_function_signals_the_vectors_it_had() {
        let a = with_msix(Arc::new(Messages::default()));
        let cap = 0x98;
        a.live();
        a.w(common::CONFIG_MSIX_VECTOR, Half, 2);
        a.w(common::QUEUE_MSIX_VECTOR, Half, 1);
        for v in 0..3u64 {
            a.dev.write_bar(MSIX_BAR, 16 * v, Double, 0x1000_0040);
            a.dev.write_bar(MSIX_BAR, 16 * v + 8, Word, 0xa0 + v);
        }
        // Vector 1 unmasked, vector 2 masked with a config change pending.
        a.dev.write_bar(MSIX_BAR, 16 + 12, Word, 0);
        a.dev.write_config(cap + 2, Half, 0x8000);
        lock(&a.log).interrupt.clone().unwrap().notify_config();
        let saved = a.dev.save_state().unwrap();

        let messages = Arc::new(Messages::default());
        let b = with_msix(messages.clone());
        // As at a restore: the host puts the header back, not the command.
        b.dev.command_written(0);
        b.dev.restore_state(&saved).unwrap();
        assert_eq!(b.dev.save_state().unwrap(), saved);
        assert_eq!(b.r(common::QUEUE_MSIX_VECTOR, Half), 1);
        assert_eq!(b.r(common::CONFIG_MSIX_VECTOR, Half), 2);
        assert_eq!(b.dev.read_config(cap, Word) >> 16, 0x8002);
        assert_eq!(b.dev.read_bar(MSIX_BAR, MSIX_PBA_OFFSET, Word), 0b100);
        // The restored device's completion on queue 0 goes out as vector
        // 1's message, not as INTx.
        lock(&b.log).interrupt.clone().unwrap().notify_queue(0);
        assert_eq!(*lock(&messages.0), vec![(0x1000_0040, 0xa1)]);
        assert!(!b.irq.is_asserted());
        // Unmasking vector 2 delivers the change pending at the save.
        b.dev.write_bar(MSIX_BAR, 32 + 12, Word, 0);
        assert_eq!(lock(&messages.0)[1], (0x1000_0040, 0xa2));
    }

    #[test]
    fn with_msix_a_hostile_state_is_refused_and_changes_nothing() {
        let a = with_msix(Arc::new(Messages::default()));
        a.live();
        let good = a.dev.save_state().unwrap();
        let damaged: Vec<(&str, Damage)> = vec![
            ("vector past the table", Box::new(|s| s.config_vector = 3)),
            (
                "queue vector past the table",
                Box::new(|s| s.queue_vectors[0] = 7),
            ),
            ("no MSI-X state", Box::new(|s| s.msix = None)),
            (
                "a table too long",
                Box::new(|s| {
                    if let Some(m) = &mut s.msix {
                        m.table.push([0; 4]);
                    }
                }),
            ),
            (
                "pending past the last vector",
                Box::new(|s| {
                    if let Some(m) = &mut s.msix {
                        m.pba[0] = 1 << 3;
                    }
                }),
            ),
        ];
        for (what, damage) in damaged {
            let mut bad = good.clone();
            damage(&mut bad);
            let d = with_msix(Arc::new(Messages::default()));
            let before = d.dev.save_state().unwrap();
            assert!(d.dev.restore_state(&bad).is_err(), "{what}: accepted");
            assert_eq!(d.dev.save_state().unwrap(), before, "{what}");
            assert!(lock(&d.log).activations.is_empty(), "{what}");
        }
    }

    #[test]
    fn pci_cfg_capability_reaches_bar_0() {
        let d = Direct::new(false);
        let cap = u16::from(d.dev.capabilities_pointer()) + 0x44;
        assert_eq!(d.dev.read_config(cap, Byte), 0x09);
        assert_eq!(d.dev.read_config(cap + 3, Byte), u32::from(CAP_PCI_CFG));
        // Read num_queues (2 bytes at 0x12).
        d.dev
            .write_config(cap + PCI_CFG_BAR, Byte, u32::from(MODERN_BAR));
        d.dev.write_config(cap + PCI_CFG_OFFSET, Word, 0x12);
        d.dev.write_config(cap + PCI_CFG_LENGTH, Word, 2);
        assert_eq!(d.dev.read_config(cap + PCI_CFG_DATA, Half), 2);
        // Write device_feature_select = 1 through the window.
        d.dev.write_config(cap + PCI_CFG_OFFSET, Word, 0);
        d.dev.write_config(cap + PCI_CFG_LENGTH, Word, 4);
        d.dev.write_config(cap + PCI_CFG_DATA, Word, 1);
        assert_eq!(d.r(common::DEVICE_FEATURE_SELECT, Word), 1);
        // Bad windows do nothing.
        for (bar, offset, length) in [(0, 0, 4), (4, 2, 4), (4, 0, 3), (4, 0, 8), (4, 0x4000, 1)] {
            d.dev.write_config(cap + PCI_CFG_BAR, Byte, bar);
            d.dev.write_config(cap + PCI_CFG_OFFSET, Word, offset);
            d.dev.write_config(cap + PCI_CFG_LENGTH, Word, length);
            d.dev.write_config(cap + PCI_CFG_DATA, Word, 7);
            assert_eq!(d.dev.read_config(cap + PCI_CFG_DATA, Word), 0);
        }
        assert_eq!(d.r(common::DEVICE_FEATURE_SELECT, Word), 1);
        // The rest of the capability is read-only.
        d.dev.write_config(cap + 3, Byte, 1);
        assert_eq!(d.dev.read_config(cap + 3, Byte), u32::from(CAP_PCI_CFG));
        d.dev.reset();
        assert_eq!(d.dev.read_config(cap + PCI_CFG_LENGTH, Word), 0);
    }

    #[test]
    fn every_offset_and_width_is_harmless() {
        let d = Direct::new(false);
        d.live();
        for width in [Byte, Half, Word, Double] {
            let mut offset = 0;
            while offset < BAR_SIZE + 0x100 {
                let _ = d.r(offset, width);
                d.w(offset, width, u64::MAX);
                let _ = d.dev.read_bar(3, offset, width);
                d.dev.write_bar(3, offset, width, u64::MAX);
                offset += width.bytes();
            }
            let mut offset = 0x40u16;
            while offset < 0x1000 {
                let _ = d.dev.read_config(offset, width);
                d.dev.write_config(offset, width, u32::MAX);
                offset += width.bytes() as u16;
            }
        }
        let _ = d.r(u64::MAX, Double);
        let _ = d.dev.read_config(u16::MAX, Double);
        d.dev.write_config(u16::MAX, Double, u32::MAX);
        // Everything written all-ones: still a sane device afterwards.
        d.status(0);
        d.live();
    }

    /// The common config as the driver reads it, byte by byte.
    fn common_bytes(d: &Direct) -> Vec<u64> {
        (0..common::SIZE).map(|o| d.r(o, Byte)).collect()
    }

    /// A live device that has taken three buffers of queue 0 and
    /// signalled them, its queue 1 configured but not enabled.
    fn busy() -> Direct {
        let d = Direct::new(false);
        d.live();
        d.w(common::QUEUE_SELECT, Half, 1);
        for _ in 0..3 {
            d.w(NOTIFY_OFFSET, Word, 0);
        }
        lock(&d.log).interrupt.clone().unwrap().notify_queue(0);
        d.w(common::DEVICE_FEATURE_SELECT, Word, 1);
        d
    }

    #[test]
    fn a_saved_function_continues_where_it_stood() {
        let a = busy();
        let saved = a.dev.save_state().unwrap();
        assert_eq!(saved.positions, [(3, 3), (0, 0)]);

        let b = Direct::new(false);
        b.dev.command_written(0);
        b.dev.restore_state(&saved).unwrap();
        assert_eq!(b.dev.status(), 0xf);
        assert_eq!(common_bytes(&b), common_bytes(&a));
        // Started once, from the saved positions, on the same queues.
        let log = lock(&b.log);
        assert_eq!(
            log.started_at,
            [vec![
                QueuePosition {
                    next_avail: 3,
                    next_used: 3
                },
                QueuePosition::default()
            ]]
        );
        assert_eq!(log.activations[0].1, lock(&a.log).activations[0].1);
        drop(log);
        assert_eq!(b.dev.save_state().unwrap(), saved);
        // The pending interrupt is still pending, and reading clears it.
        assert!(b.irq.is_asserted());
        assert_eq!(b.r(ISR_OFFSET, Byte), u64::from(ISR_QUEUE));
        assert!(!b.irq.is_asserted());
        // It runs on: a notify reaches the restored device.
        b.w(NOTIFY_OFFSET, Word, 0);
        assert_eq!(lock(&b.log).notifies, [0]);
    }

    #[test]
    fn a_function_saved_before_the_driver_came_restores_idle() {
        let a = Direct::new(false);
        let saved = a.dev.save_state().unwrap();
        assert!(saved.positions.is_empty());
        let b = Direct::new(false);
        b.dev.restore_state(&saved).unwrap();
        assert_eq!(b.dev.status(), 0);
        assert!(lock(&b.log).activations.is_empty());
        assert_eq!(common_bytes(&b), common_bytes(&a));
    }

    /// One way of spoiling a saved state.
    type Damage = Box<dyn Fn(&mut SavedVirtioPci)>;

    #[test]
    fn a_damaged_state_is_refused_and_changes_nothing() {
        let good = busy().dev.save_state().unwrap();
        let damaged: Vec<(&str, Damage)> = vec![
            (
                "ring outside RAM",
                Box::new(|s| s.queues[0].desc = RAM - 0x1000),
            ),
            (
                "ring past the end of RAM",
                Box::new(|s| s.queues[0].device = RAM + RAM_SIZE as u64 - 8),
            ),
            (
                "ring address wraps",
                Box::new(|s| s.queues[0].driver = u64::MAX - 1),
            ),
            ("misaligned ring", Box::new(|s| s.queues[0].desc += 8)),
            (
                "size not a power of two",
                Box::new(|s| s.queues[0].size = 12),
            ),
            (
                "size over the maximum",
                Box::new(|s| s.queues[1].size = 128),
            ),
            ("size 0", Box::new(|s| s.queues[1].size = 0)),
            (
                "a queue missing",
                Box::new(|s| {
                    s.queues.pop();
                }),
            ),
            (
                "a queue too many",
                Box::new(|s| s.queues.push(s.queues[1].clone())),
            ),
            (
                "unoffered features",
                Box::new(|s| s.driver_features |= 1 << 40),
            ),
            (
                "no VERSION_1",
                Box::new(|s| s.driver_features &= !VIRTIO_F_VERSION_1),
            ),
            (
                "DRIVER_OK without FEATURES_OK",
                Box::new(|s| s.status &= !FEATURES_OK),
            ),
            (
                "running without bus mastering",
                Box::new(|s| s.bus_master = false),
            ),
            (
                "running while it needs a reset",
                Box::new(|s| s.status |= STATUS_NEEDS_RESET),
            ),
            (
                "stopped with DRIVER_OK",
                Box::new(|s| {
                    s.live = false;
                    s.positions.clear();
                }),
            ),
            (
                "running without queue 0",
                Box::new(|s| s.queues[0].enabled = false),
            ),
            (
                "positions missing",
                Box::new(|s| {
                    s.positions.pop();
                }),
            ),
            (
                "positions while stopped",
                Box::new(|s| {
                    s.live = false;
                    s.status = ACK | DRIVER;
                }),
            ),
            ("unknown ISR bits", Box::new(|s| s.isr = 0x84)),
            (
                "a config vector without MSI-X",
                Box::new(|s| s.config_vector = 0),
            ),
            (
                "a queue vector without MSI-X",
                Box::new(|s| s.queue_vectors[1] = 0),
            ),
            (
                "queue vectors missing",
                Box::new(|s| {
                    s.queue_vectors.pop();
                }),
            ),
            (
                "an MSI-X table on a function without one",
                Box::new(|s| {
                    s.msix = Some(::pci::msix::SavedMsix {
                        control: 0,
                        table: vec![[0; 4]; 3],
                        pba: vec![0],
                    })
                }),
            ),
            (
                "short PCI config window",
                Box::new(|s| {
                    s.pci_cfg_window.pop();
                }),
            ),
        ];
        for (what, damage) in damaged {
            let mut bad = good.clone();
            damage(&mut bad);
            let d = Direct::new(false);
            let before = common_bytes(&d);
            let err = d.dev.restore_state(&bad);
            assert!(err.is_err(), "{what}: accepted");
            assert_eq!(d.dev.status(), 0, "{what}");
            assert!(lock(&d.log).activations.is_empty(), "{what}");
            assert_eq!(common_bytes(&d), before, "{what}");
            assert!(!d.irq.is_asserted(), "{what}");
        }
    }

    #[test]
    fn a_device_that_cannot_save_is_refused() {
        struct Silent(FakeDevice);
        impl VirtioDevice for Silent {
            fn device_type(&self) -> u32 {
                self.0.device_type()
            }
            fn queue_max_sizes(&self) -> Vec<u16> {
                self.0.queue_max_sizes()
            }
            fn features(&self) -> u64 {
                self.0.features()
            }
            fn read_config(&self, offset: u64, data: &mut [u8]) {
                self.0.read_config(offset, data)
            }
            fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
                self.0.activate(ctx)
            }
            fn queue_notify(&mut self, queue: u16) {
                self.0.queue_notify(queue)
            }
            fn reset(&mut self) {
                self.0.reset()
            }
            fn pci_identity(&self) -> PciIdentity {
                self.0.pci_identity()
            }
        }
        let good = Direct::new(false).dev.save_state().unwrap();
        let dev = VirtioPciDevice::new(
            Box::new(Silent(FakeDevice {
                log: Arc::default(),
                refuse: false,
            })),
            memory(),
        );
        assert!(!dev.saves_state());
        assert!(dev.save_state().is_err());
        assert!(dev.restore_state(&good).is_err());
    }
}
