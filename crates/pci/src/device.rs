//! What a PCI function offers the host bridge.

use std::sync::Arc;

use vm_core::{AccessWidth, IrqLine};

/// The kind of a memory BAR. vmapple has no I/O-port window (§2), so I/O
/// BARs do not exist here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    Memory32,
    Memory64,
}

/// One BAR a function wants: its size (a power of two, at least 4 KiB so
/// that each BAR owns whole pages) and kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarRegion {
    pub index: u8,
    pub size: u64,
    pub kind: BarKind,
    pub prefetchable: bool,
}

/// A PCI function behind the host bridge.
///
/// The host bridge keeps the standard type-0 header (command, status, BARs,
/// interrupt line/pin) and the capability list the function describes; the
/// function answers only what is its own. Every method may be called with
/// any guest-chosen offset or width and must not panic.
pub trait PciDevice: Send + Sync {
    /// A short name for logs ("virtio-blk", "xhci").
    fn name(&self) -> &str;

    /// Vendor, device, subsystem vendor, subsystem device IDs.
    fn ids(&self) -> (u16, u16, u16, u16);

    /// Class code (base class << 16 | sub-class << 8 | prog-if) and revision.
    fn class_and_revision(&self) -> (u32, u8);

    /// The BARs this function needs.
    fn bars(&self) -> Vec<BarRegion>;

    /// Bytes of device-specific config space starting at 0x40 (capabilities
    /// and anything else after the standard header), up to 0x1000. The host
    /// links the list through the header's capabilities pointer.
    fn read_config(&self, offset: u16, width: AccessWidth) -> u32 {
        let _ = (offset, width);
        0
    }

    /// A store to device-specific config space (offset >= 0x40).
    fn write_config(&self, offset: u16, width: AccessWidth, value: u32) {
        let _ = (offset, width, value);
    }

    /// Size of the function's configuration space: 0x100 for a
    /// conventional PCI function, 0x1000 for one with a PCI Express
    /// capability. Beyond it, loads read all-ones and stores vanish. QEMU
    /// makes every virtio-pci function on vmapple's root bus conventional
    /// (it drops the Express capability of devices not behind a port).
    fn config_size(&self) -> u16 {
        0x100
    }

    /// Offset of the first capability in config space (0 when none).
    fn capabilities_pointer(&self) -> u8 {
        0
    }

    /// The guest stored to the command register, which now holds
    /// `command`. The host already applies memory-space enable and
    /// interrupt disable; this lets a function that does DMA notice bus
    /// mastering being switched off.
    fn command_written(&self, command: u16) {
        let _ = command;
    }

    /// A load from BAR `bar` at `offset` into it.
    fn read_bar(&self, bar: u8, offset: u64, width: AccessWidth) -> u64;

    /// A store to BAR `bar` at `offset` into it.
    fn write_bar(&self, bar: u8, offset: u64, width: AccessWidth, value: u64);

    /// The interrupt pin the function uses: 0 for none, 1..=4 for
    /// INTA..INTD. Read once, when the function is plugged in.
    fn interrupt_pin(&self) -> u8 {
        1
    }

    /// Hands the function the INTx line of its [`interrupt_pin`] once it is
    /// placed in a slot. The host gates it with the command register's
    /// interrupt-disable bit and shares the wire with other functions, so
    /// the function just drives its own level.
    ///
    /// [`interrupt_pin`]: PciDevice::interrupt_pin
    fn set_intx(&self, line: Arc<dyn IrqLine>);

    /// System reset: back to power-on state.
    fn reset(&self) {}
}
