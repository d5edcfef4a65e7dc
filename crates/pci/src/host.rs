//! The vmapple PCI Express host bridge: QEMU's generic host ("GPEX") with
//! sixteen INTx lines (vmapple-machine.md §7.1–§7.4, §20.1 items 7–9).
//!
//! # Model
//!
//! * **One root bus, no bridges.** Bus 0 holds the root complex at 00:00.0
//!   (vendor `0x1B36`, device `0x0008`, class `0x060000`, revision 0) and
//!   the functions plugged in with [`PciHost::add_device`], which take
//!   slots 1, 2, 3 … in plug order (§7.4). Each is function 0 of its slot
//!   and single-function.
//! * **ECAM** ([`PciHost::ecam`], 256 MiB at `0x4000_0000`): offset
//!   `bus << 20 | device << 15 | function << 12 | register`. Loads from a
//!   function that does not exist (another bus, an empty slot, functions
//!   1–7) return all-ones and stores vanish, as on a real bus where the
//!   configuration request ends in "unsupported request". Accesses of 1, 2
//!   and 4 bytes act on the bytes they cover; an 8-byte access (the bus
//!   delivers it whole, naturally aligned) acts as two dword accesses, low
//!   dword first.
//! * **Header vs. function.** The host keeps each function's type-0 header
//!   ([`ConfigSpace`]); bytes from 0x40 up to the function's
//!   [`PciDevice::config_size`] go to the function through
//!   [`PciDevice::read_config`]/[`PciDevice::write_config`]. Past that size
//!   (0x100 for the conventional functions vmapple has, the root complex
//!   included) loads read all-ones and stores vanish, as in QEMU.
//! * **MMIO window** ([`PciHost::mmio_window`], `0x5000_0000` up to
//!   `0x6FFF_0000` exclusive, identity-mapped to PCI memory space): an
//!   access goes to the BAR that covers it, provided the owning function
//!   has memory space enabled. Where nothing is mapped, loads return
//!   all-ones and stores are dropped (QEMU's `allow-unmapped-accesses`).
//!   BARs are re-resolved after every header store. If guest-assigned BARs
//!   overlap, the lower slot wins, then the lower BAR index, so the outcome
//!   never depends on the order of the stores.
//! * **INTx.** A function in slot *s* using pin *p* (INTA = 0) drives line
//!   `(s + p) mod 16`, wired to SPI `0x20 + line` by the machine (§7.2;
//!   QEMU's `gpex_swizzle_map_irq_fn` with `num-irqs = 16`). A line is the
//!   OR of every function on it, so one function lowering its output
//!   does not hide another's. The command register's interrupt-disable
//!   bit gates a function's contribution; status bit 3 shows the function's
//!   own level regardless.
//! * **MSI.** As QEMU has the board (§7.5) there is no ITS or GICv2m
//!   frame an MSI write could reach, so [`PciHost::msi_sink`] is `None`
//!   and functions that need MSI refuse to be built from it. A machine
//!   with an MSI controller hands its sink to [`PciHost::with_msi`]; the
//!   functions built from it then offer MSI or MSI-X.
//! * **Reset** ([`PciHost::reset`]): every header returns to power-on
//!   state (decoding off, BARs 0) and every function is reset.

use std::sync::{Arc, Mutex, RwLock};
use vm_core::sync::{lock, read_lock, write_lock};

use vm_core::{AccessWidth, IrqLine, MmioDevice, NoIrq};

use crate::config::{reg, ConfigSpace, HeaderIdentity, MappedBar};
use crate::device::{BarRegion, PciDevice};

/// Guest-physical base of the ECAM window.
pub const ECAM_BASE: u64 = 0x4000_0000;
/// 256 buses × 32 devices × 8 functions × 4 KiB.
pub const ECAM_SIZE: u64 = 0x1000_0000;
/// Guest-physical (and PCI bus) base of the 32-bit MMIO window.
pub const MMIO_BASE: u64 = 0x5000_0000;
/// The window ends at `0x6FFF_0000`, exclusive (§2: QEMU's comment saying
/// `0x7FFF_0000` is wrong).
pub const MMIO_SIZE: u64 = 0x1fff_0000;
/// INTx lines of the vmapple GPEX (`num-irqs = 16`).
pub const NUM_INTX_LINES: usize = 16;
/// SPI number of INTx line 0 (INTID 64).
pub const INTX_SPI_BASE: u32 = 0x20;
/// Device numbers on a PCI bus.
pub const NUM_SLOTS: u8 = 32;

/// Identity of the root complex at 00:00.0.
pub const HOST_BRIDGE_VENDOR_ID: u16 = 0x1b36;
pub const HOST_BRIDGE_DEVICE_ID: u16 = 0x0008;
pub const HOST_BRIDGE_CLASS: u32 = 0x06_00_00;
/// QEMU's default subsystem IDs, given to every function that does not set
/// its own (derived from QEMU's `pci_default_sub_vendor_id`).
pub const DEFAULT_SUBSYSTEM_VENDOR_ID: u16 = 0x1af4;
pub const DEFAULT_SUBSYSTEM_ID: u16 = 0x1100;

/// The INTx line of a function in `slot` using `pin` (0 = INTA … 3 = INTD)
/// on the root bus.
pub fn intx_line(slot: u8, pin: u8) -> usize {
    (usize::from(slot) + usize::from(pin)) % NUM_INTX_LINES
}

/// The GIC SPI number of INTx `line`.
pub fn intx_spi(line: usize) -> u32 {
    INTX_SPI_BASE + (line % NUM_INTX_LINES) as u32
}

/// Why a function could not be plugged in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PciError {
    #[error("no free slot on the root bus for {0}")]
    NoFreeSlot(String),
    #[error("{name}: {source}")]
    Bar {
        name: String,
        source: crate::config::BarError,
    },
    #[error("{name}: interrupt pin {pin} is not 0..=4")]
    InterruptPin { name: String, pin: u8 },
    #[error("{0}")]
    Snapshot(String),
}

/// One INTx wire shared by several functions: high while any input is.
struct SharedLine {
    output: Arc<dyn IrqLine>,
    /// One bit per (slot, pin) input: `slot * 4 + pin`.
    inputs: Mutex<u128>,
}

impl SharedLine {
    fn set_input(&self, input: u32, asserted: bool) {
        let mut inputs = lock(&self.inputs);
        let bit = 1u128 << (input % 128);
        if asserted {
            *inputs |= bit;
        } else {
            *inputs &= !bit;
        }
        // Under the lock, so two inputs changing at once cannot leave the
        // output at a stale level.
        self.output.set_level(*inputs != 0);
    }
}

#[derive(Default)]
struct IntxState {
    level: bool,
    disabled: bool,
}

/// The INTx output of one function, as the function sees it.
struct FunctionIntx {
    line: Arc<SharedLine>,
    input: u32,
    state: Mutex<IntxState>,
}

impl FunctionIntx {
    fn update(&self, state: &IntxState) {
        self.line
            .set_input(self.input, state.level && !state.disabled);
    }

    fn set_disabled(&self, disabled: bool) {
        let mut state = lock(&self.state);
        if state.disabled != disabled {
            state.disabled = disabled;
            self.update(&state);
        }
    }

    fn level(&self) -> bool {
        lock(&self.state).level
    }
}

impl IrqLine for FunctionIntx {
    fn set_level(&self, asserted: bool) {
        let mut state = lock(&self.state);
        state.level = asserted;
        self.update(&state);
    }
}

/// The root complex at 00:00.0: a header and nothing else.
struct HostBridge;

impl PciDevice for HostBridge {
    fn name(&self) -> &str {
        "gpex-root"
    }
    fn ids(&self) -> (u16, u16, u16, u16) {
        (
            HOST_BRIDGE_VENDOR_ID,
            HOST_BRIDGE_DEVICE_ID,
            DEFAULT_SUBSYSTEM_VENDOR_ID,
            DEFAULT_SUBSYSTEM_ID,
        )
    }
    fn class_and_revision(&self) -> (u32, u8) {
        (HOST_BRIDGE_CLASS, 0)
    }
    fn bars(&self) -> Vec<BarRegion> {
        Vec::new()
    }
    fn interrupt_pin(&self) -> u8 {
        0
    }
    fn read_bar(&self, _bar: u8, _offset: u64, _width: AccessWidth) -> u64 {
        0
    }
    fn write_bar(&self, _bar: u8, _offset: u64, _width: AccessWidth, _value: u64) {}
    fn set_intx(&self, _line: Arc<dyn IrqLine>) {}
}

struct Function {
    slot: u8,
    config_size: u16,
    device: Arc<dyn PciDevice>,
    config: Mutex<ConfigSpace>,
    intx: Option<Arc<FunctionIntx>>,
}

/// A BAR the MMIO window decodes.
#[derive(Clone)]
struct Mapping {
    bar: MappedBar,
    device: Arc<dyn PciDevice>,
}

struct HostInner {
    /// Indexed by slot; slot 0 is the root complex.
    functions: RwLock<Vec<Arc<Function>>>,
    /// In winner order: slot, then BAR index.
    mappings: RwLock<Vec<Mapping>>,
    lines: Vec<Arc<SharedLine>>,
}

impl HostInner {
    fn function(&self, slot: u8) -> Option<Arc<Function>> {
        read_lock(&self.functions).get(usize::from(slot)).cloned()
    }

    /// Recomputes what the MMIO window decodes from every header.
    fn remap(&self) {
        // Held across the scan so that two concurrent remaps cannot store
        // an older picture over a newer one.
        let mut mappings = write_lock(&self.mappings);
        let functions = read_lock(&self.functions).clone();
        mappings.clear();
        for f in functions {
            for bar in lock(&f.config).mapped_bars() {
                mappings.push(Mapping {
                    bar,
                    device: f.device.clone(),
                });
            }
        }
    }

    /// The function at `ecam_offset` and the register inside it.
    fn decode(&self, ecam_offset: u64) -> Option<(Arc<Function>, u16)> {
        let bus = (ecam_offset >> 20) & 0xff;
        let device = ((ecam_offset >> 15) & 0x1f) as u8;
        let function = (ecam_offset >> 12) & 0x7;
        let register = (ecam_offset & 0xfff) as u16;
        if bus != 0 || function != 0 {
            return None;
        }
        Some((self.function(device)?, register))
    }

    fn config_read_dword_or_less(f: &Function, register: u16, width: AccessWidth) -> u64 {
        if register >= f.config_size {
            return width.mask();
        }
        if register < reg::HEADER_END {
            let mut config = lock(&f.config);
            config.set_interrupt_status(f.intx.as_ref().is_some_and(|i| i.level()));
            config.read(register, width)
        } else {
            u64::from(f.device.read_config(register, width)) & width.mask()
        }
    }

    fn config_write_dword_or_less(
        &self,
        f: &Function,
        register: u16,
        width: AccessWidth,
        value: u64,
    ) {
        if register >= f.config_size {
            return;
        }
        if register < reg::HEADER_END {
            let (intx_disabled, command) = {
                let mut config = lock(&f.config);
                config.write(register, width, value);
                (config.intx_disabled(), config.command())
            };
            if let Some(intx) = &f.intx {
                intx.set_disabled(intx_disabled);
            }
            self.remap();
            let end = register + width.bytes() as u16;
            if register < reg::COMMAND + 2 && end > reg::COMMAND {
                f.device.command_written(command);
            }
        } else {
            f.device
                .write_config(register, width, (value & width.mask()) as u32);
        }
    }

    fn config_read(&self, offset: u64, width: AccessWidth) -> u64 {
        let Some((f, register)) = self.decode(offset) else {
            return width.mask();
        };
        if register % width.bytes() as u16 != 0 {
            vm_core::guest_error!("pci: unaligned {width} config load at {offset:#x}");
            return width.mask();
        }
        if width == AccessWidth::Double {
            let lo = Self::config_read_dword_or_less(&f, register, AccessWidth::Word);
            let hi = Self::config_read_dword_or_less(&f, register + 4, AccessWidth::Word);
            hi << 32 | lo
        } else {
            Self::config_read_dword_or_less(&f, register, width)
        }
    }

    fn config_write(&self, offset: u64, width: AccessWidth, value: u64) {
        let Some((f, register)) = self.decode(offset) else {
            return;
        };
        if register % width.bytes() as u16 != 0 {
            vm_core::guest_error!("pci: unaligned {width} config store at {offset:#x}");
            return;
        }
        if width == AccessWidth::Double {
            self.config_write_dword_or_less(&f, register, AccessWidth::Word, value & 0xffff_ffff);
            self.config_write_dword_or_less(&f, register + 4, AccessWidth::Word, value >> 32);
        } else {
            self.config_write_dword_or_less(&f, register, width, value);
        }
    }

    /// The BAR covering `[addr, addr + len)` on the bus, if any.
    fn lookup(&self, addr: u64, len: u64) -> Option<(Arc<dyn PciDevice>, u8, u64)> {
        let mappings = read_lock(&self.mappings);
        let m = mappings
            .iter()
            .find(|m| addr >= m.bar.base && addr - m.bar.base < m.bar.size)?;
        let offset = addr - m.bar.base;
        if m.bar.size - offset < len {
            return None;
        }
        Some((m.device.clone(), m.bar.index, offset))
    }
}

/// The ECAM window as an MMIO region.
struct Ecam(Arc<HostInner>);

impl MmioDevice for Ecam {
    fn read(&self, offset: u64, width: AccessWidth) -> u64 {
        self.0.config_read(offset, width)
    }
    fn write(&self, offset: u64, width: AccessWidth, value: u64) {
        self.0.config_write(offset, width, value)
    }
}

/// The 32-bit MMIO window as an MMIO region.
struct MmioWindow(Arc<HostInner>);

impl MmioDevice for MmioWindow {
    fn read(&self, offset: u64, width: AccessWidth) -> u64 {
        let Some(addr) = MMIO_BASE.checked_add(offset) else {
            return width.mask();
        };
        match self.0.lookup(addr, width.bytes()) {
            Some((device, bar, off)) => device.read_bar(bar, off, width) & width.mask(),
            None => width.mask(),
        }
    }
    fn write(&self, offset: u64, width: AccessWidth, value: u64) {
        let Some(addr) = MMIO_BASE.checked_add(offset) else {
            return;
        };
        if let Some((device, bar, off)) = self.0.lookup(addr, width.bytes()) {
            device.write_bar(bar, off, width, value & width.mask());
        }
    }
}

/// One `interrupt-map` entry for a device-tree `pci-host-ecam-generic`
/// node: child unit address (only the high cell matters), child pin and
/// the parent SPI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IntxRoute {
    /// `phys.hi` of the child address: device number << 11.
    pub child_hi: u32,
    /// 1..=4 (INTA..INTD), as the `#interrupt-cells = 1` specifier.
    pub pin: u32,
    /// GIC SPI number (not INTID), level-high.
    pub spi: u32,
}

/// The `interrupt-map-mask` for [`PciHost::interrupt_map`]: the low four
/// bits of the device number (the swizzle repeats every 16 slots) and the
/// pin.
pub const INTERRUPT_MAP_MASK: [u32; 4] = [0x7800, 0, 0, 7];

/// The `ranges` property of the node, for a parent with
/// `#address-cells = <2>` and `#size-cells = <2>`: one 32-bit
/// non-prefetchable memory window, identity-mapped (PCI address = CPU
/// address). There is no I/O window and no 64-bit window (§2).
pub const FDT_RANGES: [u32; 7] = [
    0x0200_0000,
    0,
    MMIO_BASE as u32,
    0,
    MMIO_BASE as u32,
    0,
    MMIO_SIZE as u32,
];

/// The `reg` property of the node (two address and two size cells): the
/// ECAM window.
pub const FDT_REG: [u64; 2] = [ECAM_BASE, ECAM_SIZE];

/// The `bus-range` property.
pub const FDT_BUS_RANGE: [u32; 2] = [0, 255];

/// GIC interrupt specifier constants (Linux `arm,gic-v3` binding).
const GIC_SPI: u32 = 0;
const IRQ_TYPE_LEVEL_HIGH: u32 = 4;

/// The PCI host in a snapshot.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SavedHost {
    pub functions: Vec<SavedFunction>,
}

/// One function's header and INTx `(level, disabled)` in a snapshot.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SavedFunction {
    pub slot: u8,
    pub header: crate::config::SavedHeader,
    pub intx: Option<(bool, bool)>,
}

/// The vmapple PCIe host bridge.
pub struct PciHost {
    inner: Arc<HostInner>,
    /// The machine's MSI controller, if it has one.
    msi: Option<Arc<dyn crate::msi::MsiSink>>,
}

impl PciHost {
    /// A host whose INTx line *i* drives `intx[i]` (the machine wires it to
    /// SPI `0x20 + i`). The root complex sits at 00:00.0.
    pub fn new(intx: [Arc<dyn IrqLine>; NUM_INTX_LINES]) -> Self {
        let lines = intx
            .into_iter()
            .map(|output| {
                Arc::new(SharedLine {
                    output,
                    inputs: Mutex::new(0),
                })
            })
            .collect();
        let host = Self {
            inner: Arc::new(HostInner {
                functions: RwLock::new(Vec::new()),
                mappings: RwLock::new(Vec::new()),
                lines,
            }),
            msi: None,
        };
        let bridge = host.plug(0, Arc::new(HostBridge));
        write_lock(&host.inner.functions)
            .push(bridge.expect("the root complex's header is well-formed"));
        host
    }

    fn plug(&self, slot: u8, device: Arc<dyn PciDevice>) -> Result<Arc<Function>, PciError> {
        let name = device.name().to_string();
        let (vendor_id, device_id, subsystem_vendor_id, subsystem_id) = device.ids();
        let (class_code, revision) = device.class_and_revision();
        let pin = device.interrupt_pin();
        if pin > 4 {
            return Err(PciError::InterruptPin { name, pin });
        }
        let identity = HeaderIdentity {
            vendor_id,
            device_id,
            subsystem_vendor_id,
            subsystem_id,
            class_code,
            revision,
            interrupt_pin: pin,
            capabilities_pointer: device.capabilities_pointer(),
        };
        let config = ConfigSpace::new(identity, &device.bars())
            .map_err(|source| PciError::Bar { name, source })?;
        let intx = (pin != 0).then(|| {
            let line = intx_line(slot, pin - 1);
            Arc::new(FunctionIntx {
                line: self.inner.lines[line].clone(),
                input: u32::from(slot) * 4 + u32::from(pin - 1),
                state: Mutex::new(IntxState::default()),
            })
        });
        match &intx {
            Some(i) => device.set_intx(i.clone()),
            None => device.set_intx(Arc::new(NoIrq)),
        }
        Ok(Arc::new(Function {
            slot,
            config_size: device
                .config_size()
                .clamp(reg::HEADER_END, reg::CONFIG_SIZE),
            device,
            config: Mutex::new(config),
            intx,
        }))
    }

    /// Plugs `device` into the next free slot (1, 2, …) and returns the
    /// slot. Its INTx line is handed over through [`PciDevice::set_intx`].
    pub fn add_device(&self, device: Arc<dyn PciDevice>) -> Result<u8, PciError> {
        let slot = read_lock(&self.inner.functions).len();
        if slot >= usize::from(NUM_SLOTS) {
            return Err(PciError::NoFreeSlot(device.name().to_string()));
        }
        let slot = slot as u8;
        let function = self.plug(slot, device)?;
        let mut functions = write_lock(&self.inner.functions);
        if functions.len() != usize::from(slot) {
            // Another add raced us for the slot; plugging is a build-time
            // step, so refusing is enough.
            return Err(PciError::NoFreeSlot(function.device.name().to_string()));
        }
        functions.push(function);
        Ok(slot)
    }

    /// A host whose functions' MSI writes go to `sink` (the board's MSI
    /// controller, when the machine is built with MSI on).
    pub fn with_msi(mut self, sink: Arc<dyn crate::msi::MsiSink>) -> Self {
        self.msi = Some(sink);
        self
    }

    /// Where functions on this bus send MSIs: `None` on the vmapple board
    /// as QEMU has it (no ITS and no GICv2m frame, §7.5), where functions
    /// that can fall back to INTx do and one that cannot (`apple-gfx-pci`)
    /// refuses to be built; the sink given to [`PciHost::with_msi`]
    /// otherwise.
    pub fn msi_sink(&self) -> Option<Arc<dyn crate::msi::MsiSink>> {
        self.msi.clone()
    }

    /// `(slot, name)` of every function, the root complex included.
    pub fn devices(&self) -> Vec<(u8, String)> {
        read_lock(&self.inner.functions)
            .iter()
            .map(|f| (f.slot, f.device.name().to_string()))
            .collect()
    }

    /// The ECAM region, to be placed at [`ECAM_BASE`] for [`ECAM_SIZE`].
    pub fn ecam(&self) -> Arc<dyn MmioDevice> {
        Arc::new(Ecam(self.inner.clone()))
    }

    /// The 32-bit MMIO window, to be placed at [`MMIO_BASE`] for
    /// [`MMIO_SIZE`]. Offsets are relative to [`MMIO_BASE`].
    pub fn mmio_window(&self) -> Arc<dyn MmioDevice> {
        Arc::new(MmioWindow(self.inner.clone()))
    }

    /// System reset: every header to power-on state, every function reset.
    pub fn reset(&self) {
        let functions = read_lock(&self.inner.functions).clone();
        for f in functions {
            lock(&f.config).reset();
            if let Some(intx) = &f.intx {
                intx.set_disabled(false);
            }
            f.device.reset();
        }
        self.inner.remap();
    }

    /// Every function's header as the guest programmed it and its INTx
    /// state, by slot, for a snapshot. The functions' own state is theirs
    /// to save.
    pub fn save_state(&self) -> SavedHost {
        let functions = read_lock(&self.inner.functions).clone();
        SavedHost {
            functions: functions
                .iter()
                .map(|f| SavedFunction {
                    slot: f.slot,
                    header: lock(&f.config).save_state(),
                    intx: f.intx.as_ref().map(|i| {
                        let s = lock(&i.state);
                        (s.level, s.disabled)
                    }),
                })
                .collect(),
        }
    }

    /// Puts back what [`PciHost::save_state`] returned and maps the BARs
    /// it places. The functions must be the same, slot for slot.
    pub fn restore_state(&self, saved: &SavedHost) -> Result<(), PciError> {
        let functions = read_lock(&self.inner.functions).clone();
        let same = functions.len() == saved.functions.len()
            && functions
                .iter()
                .zip(&saved.functions)
                .all(|(f, s)| f.slot == s.slot && f.intx.is_some() == s.intx.is_some());
        if !same {
            return Err(PciError::Snapshot(format!(
                "the snapshot has {} PCI functions, this machine {}",
                saved.functions.len(),
                functions.len()
            )));
        }
        for (f, s) in functions.iter().zip(&saved.functions) {
            lock(&f.config).restore_state(&s.header);
            if let (Some(intx), Some((level, disabled))) = (&f.intx, s.intx) {
                let mut state = lock(&intx.state);
                state.level = level;
                state.disabled = disabled;
                intx.update(&state);
            }
        }
        self.inner.remap();
        Ok(())
    }

    /// The whole `interrupt-map` property as cells, for a GICv3 parent with
    /// phandle `gic_phandle` and `#address-cells = gic_address_cells`
    /// (each entry: child `phys.hi 0 0 pin`, then the phandle, that many
    /// zero parent-address cells, then `GIC_SPI spi IRQ_TYPE_LEVEL_HIGH`).
    pub fn interrupt_map_cells(&self, gic_phandle: u32, gic_address_cells: u32) -> Vec<u32> {
        let mut cells = Vec::new();
        for route in self.interrupt_map() {
            cells.extend_from_slice(&[route.child_hi, 0, 0, route.pin, gic_phandle]);
            cells.extend(std::iter::repeat_n(0, gic_address_cells as usize));
            cells.extend_from_slice(&[GIC_SPI, route.spi, IRQ_TYPE_LEVEL_HIGH]);
        }
        cells
    }

    /// The `interrupt-map` of a device-tree node for this host: one entry
    /// per device number 0..16 and pin INTA..INTD; with
    /// [`INTERRUPT_MAP_MASK`] it covers all 32 slots.
    pub fn interrupt_map(&self) -> Vec<IntxRoute> {
        (0..NUM_INTX_LINES as u8)
            .flat_map(|slot| {
                (0..4u8).map(move |pin| IntxRoute {
                    child_hi: u32::from(slot) << 11,
                    pin: u32::from(pin) + 1,
                    spi: intx_spi(intx_line(slot, pin)),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_core::TestIrq;
    use AccessWidth::*;

    /// A function with one 32-bit BAR of 4 KiB and one 64-bit BAR of
    /// 16 KiB, whose BAR registers answer with (bar << 24 | offset).
    struct Fake {
        name: &'static str,
        pin: u8,
        intx: Mutex<Option<Arc<dyn IrqLine>>>,
        writes: Mutex<Vec<(u8, u64, u64)>>,
        resets: Mutex<u32>,
        commands: Mutex<Vec<u16>>,
    }

    impl Fake {
        fn new(name: &'static str) -> Arc<Self> {
            Self::with_pin(name, 1)
        }
        fn with_pin(name: &'static str, pin: u8) -> Arc<Self> {
            Arc::new(Self {
                name,
                pin,
                intx: Mutex::new(None),
                writes: Mutex::new(Vec::new()),
                resets: Mutex::new(0),
                commands: Mutex::new(Vec::new()),
            })
        }
        fn irq(&self, level: bool) {
            lock(&self.intx).as_ref().unwrap().set_level(level);
        }
    }

    impl PciDevice for Fake {
        fn name(&self) -> &str {
            self.name
        }
        fn ids(&self) -> (u16, u16, u16, u16) {
            (0x1af4, 0x1042, 0x1af4, 0x1100)
        }
        fn class_and_revision(&self) -> (u32, u8) {
            (0x01_00_00, 1)
        }
        fn bars(&self) -> Vec<BarRegion> {
            vec![
                BarRegion {
                    index: 0,
                    size: 0x1000,
                    kind: crate::BarKind::Memory32,
                    prefetchable: false,
                },
                BarRegion {
                    index: 2,
                    size: 0x4000,
                    kind: crate::BarKind::Memory64,
                    prefetchable: true,
                },
            ]
        }
        fn read_config(&self, offset: u16, _width: AccessWidth) -> u32 {
            0xc0de_0000 | u32::from(offset)
        }
        fn write_config(&self, offset: u16, _width: AccessWidth, value: u32) {
            lock(&self.writes).push((0xff, u64::from(offset), u64::from(value)));
        }
        fn config_size(&self) -> u16 {
            if self.name == "conventional" {
                0x100
            } else {
                0x1000
            }
        }
        fn capabilities_pointer(&self) -> u8 {
            0x40
        }
        fn interrupt_pin(&self) -> u8 {
            self.pin
        }
        fn read_bar(&self, bar: u8, offset: u64, _width: AccessWidth) -> u64 {
            u64::from(bar) << 24 | offset
        }
        fn write_bar(&self, bar: u8, offset: u64, _width: AccessWidth, value: u64) {
            lock(&self.writes).push((bar, offset, value));
        }
        fn set_intx(&self, line: Arc<dyn IrqLine>) {
            *lock(&self.intx) = Some(line);
        }
        fn reset(&self) {
            *lock(&self.resets) += 1;
        }
        fn command_written(&self, command: u16) {
            lock(&self.commands).push(command);
        }
    }

    fn lines() -> (Vec<Arc<TestIrq>>, [Arc<dyn IrqLine>; NUM_INTX_LINES]) {
        let tests: Vec<Arc<TestIrq>> = (0..NUM_INTX_LINES)
            .map(|_| Arc::new(TestIrq::new()))
            .collect();
        let dyns: Vec<Arc<dyn IrqLine>> = tests
            .iter()
            .map(|t| t.clone() as Arc<dyn IrqLine>)
            .collect();
        (tests, dyns.try_into().ok().unwrap())
    }

    fn host() -> (PciHost, Vec<Arc<TestIrq>>) {
        let (tests, dyns) = lines();
        (PciHost::new(dyns), tests)
    }

    fn cfg(slot: u64, reg: u64) -> u64 {
        slot << 15 | reg
    }

    #[test]
    fn the_host_offers_no_msi() {
        let (host, _) = host();
        assert!(host.msi_sink().is_none());
    }

    #[test]
    fn root_complex_answers_at_ecam_offset_zero() {
        let (host, _) = host();
        let ecam = host.ecam();
        assert_eq!(ecam.read(0, Word), 0x0008_1b36);
        assert_eq!(
            ecam.read(0x08, Word),
            0x0600_0000,
            "class 060000, revision 0"
        );
        assert_eq!(ecam.read(0x0e, Byte), 0, "type-0 header, single function");
        assert_eq!(ecam.read(0x3d, Byte), 0, "no interrupt pin");
        assert_eq!(ecam.read(0x06, Half), 0, "no capabilities");
        assert_eq!(ecam.read(0x10, Word), 0, "no BARs");
        assert_eq!(ecam.read(0x2c, Word), 0x1100_1af4);
        assert_eq!(ecam.read(0, Double), 0x0000_0000_0008_1b36);
    }

    #[test]
    fn absent_functions_read_all_ones_and_ignore_writes() {
        let (host, _) = host();
        host.add_device(Fake::new("a")).unwrap();
        let ecam = host.ecam();
        let absent = [
            cfg(2, 0),             // empty slot
            cfg(31, 0),            // last slot
            cfg(1, 0) | 1 << 12,   // function 1 of a present device
            1 << 20,               // bus 1
            255 << 20 | cfg(1, 0), // last bus
        ];
        for offset in absent {
            assert_eq!(ecam.read(offset, Half), 0xffff, "{offset:#x}");
            assert_eq!(ecam.read(offset, Word), 0xffff_ffff);
            assert_eq!(ecam.read(offset + 4, Byte), 0xff);
            assert_eq!(ecam.read(offset, Double), u64::MAX);
            ecam.write(offset + 4, Half, 0xffff);
        }
        assert_eq!(ecam.read(cfg(1, 0), Word), 0x1042_1af4);
        assert_eq!(ecam.read(cfg(1, 4), Half), 0, "absent writes reach nobody");
    }

    #[test]
    fn ecam_decodes_device_and_register_and_forwards_the_tail() {
        let (host, _) = host();
        assert_eq!(host.add_device(Fake::new("a")).unwrap(), 1);
        assert_eq!(host.add_device(Fake::new("b")).unwrap(), 2);
        let ecam = host.ecam();
        assert_eq!(ecam.read(cfg(2, 0x02), Half), 0x1042);
        assert_eq!(ecam.read(cfg(2, 0x0b), Byte), 0x01, "base class");
        assert_eq!(ecam.read(cfg(2, 0x06), Half), 0x10, "capability list");
        assert_eq!(ecam.read(cfg(2, 0x34), Byte), 0x40);
        assert_eq!(ecam.read(cfg(2, 0x3d), Byte), 1, "INTA");
        assert_eq!(ecam.read(cfg(2, 0x44), Word), 0xc0de_0044);
        assert_eq!(ecam.read(cfg(2, 0xffc), Word), 0xc0de_0ffc);
        assert_eq!(
            ecam.read(cfg(2, 0x40), Double),
            0xc0de_0044_c0de_0040,
            "8-byte loads are two dwords, low first"
        );
        assert_eq!(
            host.devices(),
            vec![(0, "gpex-root".into()), (1, "a".into()), (2, "b".into())]
        );
    }

    #[test]
    fn config_space_ends_at_the_function_size() {
        let (host, _) = host();
        let conv = Fake::new("conventional");
        host.add_device(conv.clone()).unwrap();
        let ecam = host.ecam();
        assert_eq!(ecam.read(cfg(1, 0xfc), Word), 0xc0de_00fc);
        assert_eq!(ecam.read(cfg(1, 0x100), Word), 0xffff_ffff);
        assert_eq!(ecam.read(cfg(1, 0xffe), Half), 0xffff);
        assert_eq!(ecam.read(cfg(0, 0x100), Word), 0xffff_ffff, "root complex");
        ecam.write(cfg(1, 0x100), Word, 1);
        ecam.write(cfg(1, 0x80), Word, 2);
        assert_eq!(*lock(&conv.writes), vec![(0xff, 0x80, 2)]);
    }

    #[test]
    fn slots_run_out_after_31_devices() {
        let (host, _) = host();
        for expected in 1..32 {
            assert_eq!(host.add_device(Fake::new("x")).unwrap(), expected);
        }
        assert!(matches!(
            host.add_device(Fake::new("y")),
            Err(PciError::NoFreeSlot(_))
        ));
        assert!(matches!(
            host.add_device(Fake::with_pin("z", 5)),
            Err(PciError::NoFreeSlot(_))
        ));
    }

    #[test]
    fn refuses_an_invalid_interrupt_pin() {
        let (host, _) = host();
        assert!(matches!(
            host.add_device(Fake::with_pin("z", 5)),
            Err(PciError::InterruptPin { pin: 5, .. })
        ));
        assert_eq!(host.add_device(Fake::with_pin("none", 0)).unwrap(), 1);
        assert_eq!(host.ecam().read(cfg(1, 0x3d), Byte), 0);
    }

    #[test]
    fn misaligned_config_accesses_read_all_ones_and_do_nothing() {
        let (host, _) = host();
        host.add_device(Fake::new("a")).unwrap();
        let ecam = host.ecam();
        assert_eq!(ecam.read(cfg(1, 1), Half), 0xffff);
        assert_eq!(ecam.read(cfg(1, 2), Word), 0xffff_ffff);
        ecam.write(cfg(1, 3), Half, 0xffff);
        ecam.write(cfg(1, 4 + 2), Word, 0xffff_ffff);
        assert_eq!(ecam.read(cfg(1, 4), Half), 0);
    }

    #[test]
    fn intx_swizzle_matches_the_gpex_formula() {
        assert_eq!(intx_line(1, 0), 1);
        assert_eq!(intx_line(4, 0), 4);
        assert_eq!(intx_line(1, 1), 2);
        assert_eq!(intx_line(15, 1), 0);
        assert_eq!(intx_line(31, 3), 2);
        assert_eq!(intx_spi(intx_line(1, 0)), 0x21);
        for slot in 0..32u8 {
            assert_eq!(
                intx_spi(intx_line(slot, 1)) + 32,
                64 + (u32::from(slot) + 1) % 16
            );
        }

        // Pins INTA..INTD on slots 1..=3 reach the expected lines.
        let (host, irqs) = host();
        let fakes: Vec<_> = [(1, "a"), (2, "b"), (3, "c"), (4, "d")]
            .iter()
            .map(|&(pin, name)| Fake::with_pin(name, pin))
            .collect();
        for f in &fakes {
            host.add_device(f.clone()).unwrap();
        }
        // slot 1 INTA → 1, slot 2 INTB → 3, slot 3 INTC → 5, slot 4 INTD → 7
        for (f, line) in fakes.iter().zip([1, 3, 5, 7]) {
            f.irq(true);
            assert!(irqs[line].is_asserted(), "{} on line {line}", f.name);
            let high: Vec<usize> = (0..16).filter(|&i| irqs[i].is_asserted()).collect();
            assert_eq!(high, vec![line]);
            f.irq(false);
            assert!(!irqs[line].is_asserted());
        }
        assert_eq!(host.ecam().read(cfg(3, 0x3d), Byte), 3);
    }

    #[test]
    fn a_shared_line_is_the_or_of_its_functions() {
        let (host, irqs) = host();
        let a = Fake::new("a");
        host.add_device(a.clone()).unwrap();
        for _ in 2..17 {
            host.add_device(Fake::new("filler")).unwrap();
        }
        let b = Fake::new("b");
        assert_eq!(
            host.add_device(b.clone()).unwrap(),
            17,
            "17 mod 16 = line 1"
        );
        a.irq(true);
        b.irq(true);
        a.irq(false);
        assert!(irqs[1].is_asserted(), "b still holds the line");
        b.irq(false);
        assert!(!irqs[1].is_asserted());
        b.irq(true);
        b.irq(true);
        assert_eq!(irqs[1].rising_edges(), 2);
    }

    #[test]
    fn command_stores_are_reported_to_the_function() {
        let (host, _) = host();
        let a = Fake::new("a");
        host.add_device(a.clone()).unwrap();
        let ecam = host.ecam();
        ecam.write(cfg(1, 0x04), Half, 0x0006);
        ecam.write(cfg(1, 0x05), Byte, 0x04);
        ecam.write(cfg(1, 0x06), Half, 0xffff);
        ecam.write(cfg(1, 0x00), Double, 0xffff_ffff_0000_0000);
        assert_eq!(
            *lock(&a.commands),
            vec![0x0006, 0x0406, reg::COMMAND_WRITABLE]
        );
    }

    #[test]
    fn interrupt_disable_gates_the_line_but_not_the_status_bit() {
        let (host, irqs) = host();
        let a = Fake::new("a");
        host.add_device(a.clone()).unwrap();
        let ecam = host.ecam();
        a.irq(true);
        assert_eq!(ecam.read(cfg(1, 6), Byte), 0x18);
        ecam.write(cfg(1, 4), Half, u64::from(reg::COMMAND_INTX_DISABLE));
        assert!(!irqs[1].is_asserted());
        assert_eq!(ecam.read(cfg(1, 6), Byte), 0x18, "status still shows INTx");
        ecam.write(cfg(1, 4), Half, 0);
        assert!(irqs[1].is_asserted());
        a.irq(false);
        assert_eq!(ecam.read(cfg(1, 6), Byte), 0x10);
    }

    fn place(host: &PciHost, slot: u64, bar0: u64, bar2: u64, command: u64) {
        let ecam = host.ecam();
        ecam.write(cfg(slot, 0x10), Word, bar0);
        ecam.write(cfg(slot, 0x18), Word, bar2 & 0xffff_ffff);
        ecam.write(cfg(slot, 0x1c), Word, bar2 >> 32);
        ecam.write(cfg(slot, 0x04), Half, command);
    }

    #[test]
    fn bars_appear_in_the_window_only_with_memory_space_enabled() {
        let (host, _) = host();
        let a = Fake::new("a");
        host.add_device(a.clone()).unwrap();
        let window = host.mmio_window();
        place(&host, 1, 0x5000_0000, 0x5001_0000, 0);
        assert_eq!(window.read(0x0, Word), 0xffff_ffff);
        host.ecam()
            .write(cfg(1, 4), Half, u64::from(reg::COMMAND_MEMORY));
        assert_eq!(window.read(0x10, Word), 0x10);
        assert_eq!(window.read(0x1_3ffc, Word), 0x0200_3ffc);
        assert_eq!(window.read(0x1_4000, Word), 0xffff_ffff, "just past BAR 2");
        window.write(0x1_0008, Double, 0x1234);
        assert_eq!(*lock(&a.writes), vec![(2, 8, 0x1234)]);

        // Moving a BAR moves its decode; the old place goes dark.
        host.ecam().write(cfg(1, 0x10), Word, 0x6000_0000);
        assert_eq!(window.read(0x0, Word), 0xffff_ffff);
        assert_eq!(window.read(0x1000_0004, Half), 0x4);

        // Clearing memory enable unmaps everything.
        host.ecam().write(cfg(1, 4), Half, 0);
        assert_eq!(window.read(0x1000_0004, Word), 0xffff_ffff);
        window.write(0x1_0000, Word, 1);
        assert_eq!(lock(&a.writes).len(), 1);
    }

    #[test]
    fn unmapped_window_reads_all_ones_at_every_width() {
        let (host, _) = host();
        let window = host.mmio_window();
        for (offset, width, value) in [
            (0, Byte, 0xff),
            (0x100, Half, 0xffff),
            (0x1000, Word, 0xffff_ffff),
            (MMIO_SIZE - 8, Double, u64::MAX),
            (u64::MAX - 7, Double, u64::MAX),
        ] {
            assert_eq!(window.read(offset, width), value);
            window.write(offset, width, 0);
        }
        assert_eq!(MMIO_BASE + MMIO_SIZE, 0x6fff_0000);
    }

    #[test]
    fn overlapping_bars_resolve_to_the_lower_slot() {
        let (host, _) = host();
        let a = Fake::new("a");
        let b = Fake::new("b");
        host.add_device(a.clone()).unwrap();
        host.add_device(b.clone()).unwrap();
        let mem = u64::from(reg::COMMAND_MEMORY);
        // b first, then a, both claiming 0x5000_0000.
        place(&host, 2, 0x5000_0000, 0x5001_0000, mem);
        place(&host, 1, 0x5000_0000, 0x5000_0000, mem);
        let window = host.mmio_window();
        window.write(0x0, Word, 7);
        assert_eq!(*lock(&a.writes), vec![(0, 0, 7)], "slot 1 BAR 0 wins");
        assert!(lock(&b.writes).is_empty());
        // Past a's 4 KiB BAR 0, a's 16 KiB BAR 2 still covers it.
        assert_eq!(window.read(0x2000, Word), 0x0200_2000);
        // b's BAR 2 is not overlapped.
        assert_eq!(window.read(0x1_0000, Word), 0x0200_0000);
        window.write(0x1_0000, Word, 9);
        assert_eq!(*lock(&b.writes), vec![(2, 0, 9)]);
    }

    #[test]
    fn reset_unmaps_bars_and_resets_functions() {
        let (host, irqs) = host();
        let a = Fake::new("a");
        host.add_device(a.clone()).unwrap();
        place(
            &host,
            1,
            0x5000_0000,
            0x5001_0000,
            u64::from(reg::COMMAND_MEMORY | reg::COMMAND_INTX_DISABLE),
        );
        host.reset();
        assert_eq!(*lock(&a.resets), 1);
        assert_eq!(host.ecam().read(cfg(1, 4), Half), 0);
        assert_eq!(host.ecam().read(cfg(1, 0x10), Word), 0);
        assert_eq!(host.mmio_window().read(0, Word), 0xffff_ffff);
        a.irq(true);
        assert!(irqs[1].is_asserted(), "interrupt disable cleared by reset");
    }

    #[test]
    fn interrupt_map_covers_sixteen_slots_and_four_pins() {
        let (host, _) = host();
        let map = host.interrupt_map();
        assert_eq!(map.len(), 64);
        assert_eq!(
            map[4],
            IntxRoute {
                child_hi: 1 << 11,
                pin: 1,
                spi: 0x21
            }
        );
        assert!(map.contains(&IntxRoute {
            child_hi: 15 << 11,
            pin: 2,
            spi: 0x20
        }));
        // What Linux does with the mask: slot 17 INTB → like slot 1 INTB.
        let hi = (17u32 << 11) & INTERRUPT_MAP_MASK[0];
        let hit = map.iter().find(|r| r.child_hi == hi && r.pin == 2).unwrap();
        assert_eq!(hit.spi, intx_spi(intx_line(17, 1)));
    }

    #[test]
    fn interrupt_map_cells_follow_the_gic_binding() {
        let (host, _) = host();
        let cells = host.interrupt_map_cells(0x8001, 2);
        assert_eq!(cells.len(), 64 * 10);
        // slot 1, INTB → line 2 → SPI 0x22
        assert_eq!(
            &cells[50..60],
            &[1 << 11, 0, 0, 2, 0x8001, 0, 0, 0, 0x22, 4]
        );
        assert_eq!(host.interrupt_map_cells(1, 0).len(), 64 * 8);
        assert_eq!(FDT_RANGES[2] as u64 + FDT_RANGES[6] as u64, 0x6fff_0000);
    }

    #[test]
    fn every_ecam_offset_and_width_is_harmless() {
        let (host, _) = host();
        host.add_device(Fake::new("a")).unwrap();
        let ecam = host.ecam();
        for slot in 0..3 {
            for width in [Byte, Half, Word, Double] {
                let mut reg = 0;
                while reg < 0x1000 {
                    let _ = ecam.read(cfg(slot, reg), width);
                    ecam.write(cfg(slot, reg), width, u64::MAX);
                    reg += width.bytes() * 7;
                }
            }
        }
        assert_eq!(ecam.read(0, Word), 0x0008_1b36);
        let _ = ecam.read(ECAM_SIZE - 1, Byte);
        let _ = ecam.read(u64::MAX, Byte);
    }
}
