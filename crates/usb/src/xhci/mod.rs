//! Emulated XHCI host controller presenting QEMU's `qemu-xhci` identity
//! (vmapple-machine.md §7.3): PCI vendor `0x1B36`, device `0x000D`,
//! revision 1, class `0x0C0330`, one 64-bit memory BAR 0 of 16 KiB, 64
//! device slots, 16 interrupters, four USB 3 ports (1–4) then four USB 2
//! ports (5–8). It follows the eXtensible Host Controller Interface 1.2
//! specification; register layout in [`regs`].
//!
//! # Model
//!
//! * Commands and transfers run synchronously on the doorbell write (or,
//!   for interrupt IN endpoints, when host input arrives through an
//!   [`InputSink`]). A TD the device cannot answer yet (NAK) stays on its
//!   ring and is retried on the next doorbell or input.
//! * Every ring walk is bounded ([`COMMAND_BUDGET`], [`TRANSFER_BUDGET`]
//!   TRBs per doorbell, [`trb::MAX_CONSECUTIVE_LINKS`] links in a row) and
//!   every TRB, context and buffer access goes through the guest-memory
//!   helpers. A DMA access outside guest RAM is a Host System Error
//!   (USBSTS.HSE): the controller halts, as the USBSTS.HSE definition
//!   (XHCI 1.2 §5.4.2) describes for errors in host system accesses. Malformed
//!   commands and TRBs get their completion codes.
//! * Interrupts: pin (INTx) only, because vmapple offers no MSI/MSI-X
//!   (§7.5). The line follows interrupter 0: IMAN.IP and IMAN.IE and
//!   USBCMD.INTE. With
//!   [`XhciConfig::conditional_intr_mapping`] (vmapple's default, §6.5 and
//!   §7.6) every event goes to interrupter 0 while neither MSI nor MSI-X is
//!   enabled, which today is always.
//! * Moderation: IMAN.IP is set only while ERDP.EHB is clear, and not
//!   sooner than IMOD.IMODI × 250 ns after the previous interrupt; a
//!   deferred interrupt fires from a short-lived timer thread.
//! * No DMA while the PCI command register's Bus Master Enable is clear
//!   (the host bridge reports it through `PciDevice::command_written`):
//!   doorbells are ignored and events dropped.
//! * MFINDEX counts 125 µs microframes of host time while running; no
//!   MFINDEX wrap events.
//! * Isochronous endpoints and streams are not supported (TRB Error).

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use vm_core::sync::lock;

use pci::{BarKind, BarRegion, CapabilityList, MsiSink, Msix, MsixLayout, PciDevice};
use vm_core::regs::{Narrow, RegisterFile, Wide};
use vm_core::{AccessWidth, GuestRam, IrqLine};

use crate::hid::{InputEvent, UsbDevice, UsbKeyboard, UsbTablet};

mod command;
pub mod context;
pub mod intr;
pub mod regs;
mod state;
mod transfer;
pub mod trb;

#[cfg(test)]
mod tests;

pub use state::SavedXhci;

use context::Slot;
use intr::{Interrupter, PostError};
use regs::*;
use trb::{RingCursor, Trb, CC_COMMAND_RING_STOPPED, CC_SUCCESS};

/// PCI identity of QEMU's `qemu-xhci`.
pub const PCI_VENDOR_ID: u16 = 0x1b36;
pub const PCI_DEVICE_ID: u16 = 0x000d;
/// Subsystem IDs QEMU gives every device it does not set them for.
pub const PCI_SUBSYSTEM_VENDOR_ID: u16 = 0x1af4;
pub const PCI_SUBSYSTEM_ID: u16 = 0x1100;
pub const PCI_CLASS: u32 = 0x0c_03_30;
pub const PCI_REVISION: u8 = 1;
/// Config space: Serial Bus Release Number (USB 3.0) and Frame Length
/// Adjustment (XHCI 1.2 §5.2.3, §5.2.4).
pub const CFG_SBRN: u16 = 0x60;
pub const CFG_FLADJ: u16 = 0x61;
const SBRN_USB30: u8 = 0x30;
const PCI_COMMAND_BUS_MASTER: u16 = 1 << 2;
const FLADJ_RESET: u8 = 0x20;

/// Where the machine attaches the HID devices (the first two USB 2 ports,
/// where QEMU puts its first two full-speed devices).
pub const KEYBOARD_PORT: usize = FIRST_USB2_PORT;
pub const TABLET_PORT: usize = FIRST_USB2_PORT + 1;

/// Command TRBs executed per doorbell.
pub const COMMAND_BUDGET: u32 = 256;
/// Transfer TRBs (including Link TRBs) walked per doorbell.
pub const TRANSFER_BUDGET: u32 = 4096;

/// Construction options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XhciConfig {
    /// QEMU's `conditional-intr-mapping`: route every event to interrupter
    /// 0 unless MSI or MSI-X is enabled (vmapple-machine.md §7.6). On by
    /// default, as vmapple sets it.
    pub conditional_intr_mapping: bool,
}

impl Default for XhciConfig {
    fn default() -> Self {
        Self {
            conditional_intr_mapping: true,
        }
    }
}

/// Why a device could not be attached.
#[derive(Debug, PartialEq, Eq)]
pub enum AttachError {
    NoSuchPort(usize),
    PortInUse(usize),
    /// A SuperSpeed device needs a USB 3 port and the others a USB 2 port.
    WrongPortType(usize),
}

/// A DMA access outside guest RAM: the caller raises USBSTS.HSE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hse;

pub(crate) struct Port {
    pub portsc: u32,
    pub pmsc: u32,
    pub hlpmc: u32,
    pub usb3: bool,
    pub device: Option<Box<dyn UsbDevice>>,
}

impl Port {
    fn pls(&self) -> u32 {
        (self.portsc & PORTSC_PLS_MASK) >> PORTSC_PLS_SHIFT
    }

    fn set_pls(&mut self, pls: u32) {
        self.portsc =
            (self.portsc & !PORTSC_PLS_MASK) | ((pls << PORTSC_PLS_SHIFT) & PORTSC_PLS_MASK);
    }

    /// PORTSC after a controller reset or an attach: powered, connected
    /// devices announced by CSC.
    fn power_on_state(&mut self) {
        self.portsc = PORTSC_PP;
        match &self.device {
            Some(dev) => {
                let speed = dev.speed();
                self.portsc |=
                    PORTSC_CCS | PORTSC_CSC | (speed.xhci_speed_id() << PORTSC_SPEED_SHIFT);
                if self.usb3 {
                    // SuperSpeed link training ends enabled in U0.
                    self.portsc |= PORTSC_PED;
                    self.set_pls(PLS_U0);
                } else {
                    self.set_pls(PLS_POLLING);
                }
            }
            None => self.set_pls(PLS_RXDETECT),
        }
    }
}

pub(crate) struct XhciState {
    pub mem: GuestRam,
    config: XhciConfig,
    irq: Option<Arc<dyn IrqLine>>,
    irq_level: bool,
    usbcmd: u32,
    usbsts: u32,
    dnctrl: u32,
    pub cmd_ring: RingCursor,
    crr: bool,
    pub dcbaap: u64,
    config_reg: u32,
    pub ports: Vec<Port>,
    pub intrs: Vec<Interrupter>,
    pub slots: Vec<Slot>,
    run_start: Option<Instant>,
    fladj: u8,
    /// PCI command register Bus Master Enable: without it no DMA happens.
    bus_master: bool,
    /// MSI-X, when the controller was built with it, and the capability
    /// list that holds it.
    msix: Option<Msix>,
    caps: CapabilityList,
    weak_self: Weak<Mutex<XhciState>>,
    /// Stopped for a snapshot's save: host input waits in the devices and
    /// moderation timers hold their interrupts.
    quiesced: bool,
}

/// The XHCI controller: a [`PciDevice`] with its root hub.
pub struct Xhci {
    state: Arc<Mutex<XhciState>>,
}

/// A handle that injects host input into the controller's HID devices.
/// Cheap to clone and usable from any thread; it does not keep the
/// controller alive.
#[derive(Clone)]
pub struct InputSink {
    state: Weak<Mutex<XhciState>>,
}

impl InputSink {
    /// Hands `event` to the first attached device that takes it (keys to the
    /// keyboard, pointer events to the tablet), then completes any pending
    /// interrupt IN transfer of that device. Returns false when no device
    /// took it or the controller is gone.
    pub fn send(&self, event: InputEvent) -> bool {
        match self.state.upgrade() {
            Some(state) => lock(&state).input(event),
            None => false,
        }
    }
}

impl Xhci {
    /// A controller with no devices attached.
    pub fn new(mem: GuestRam, config: XhciConfig) -> Self {
        let state = Arc::new_cyclic(|weak| {
            let ports = (0..NUM_PORTS)
                .map(|i| Port {
                    portsc: 0,
                    pmsc: 0,
                    hlpmc: 0,
                    usb3: i < NUM_PORTS_USB3,
                    device: None,
                })
                .collect();
            let mut st = XhciState {
                mem,
                config,
                irq: None,
                irq_level: false,
                usbcmd: 0,
                usbsts: USBSTS_HCH,
                dnctrl: 0,
                cmd_ring: RingCursor::default(),
                crr: false,
                dcbaap: 0,
                config_reg: 0,
                ports,
                intrs: (0..NUM_INTRS).map(|_| Interrupter::new()).collect(),
                slots: vec![Slot::default(); NUM_SLOTS],
                run_start: None,
                fladj: FLADJ_RESET,
                bus_master: false,
                msix: None,
                caps: CapabilityList::new(),
                weak_self: weak.clone(),
                quiesced: false,
            };
            st.reset_controller();
            Mutex::new(st)
        });
        Self { state }
    }

    /// The vmapple default: a USB keyboard on [`KEYBOARD_PORT`] and a USB
    /// tablet on [`TABLET_PORT`] (vmapple-machine.md §7.3).
    pub fn with_hid_devices(mem: GuestRam, config: XhciConfig) -> Self {
        let x = Self::new(mem, config);
        let kbd = x.attach(KEYBOARD_PORT, Box::new(UsbKeyboard::new()));
        let tab = x.attach(TABLET_PORT, Box::new(UsbTablet::new()));
        debug_assert!(kbd.is_ok() && tab.is_ok());
        x
    }

    /// Gives the controller an MSI-X capability whose messages go to
    /// `sink`: one vector per interrupter, the table at
    /// [`MSIX_TABLE_OFFSET`] and the PBA at [`MSIX_PBA_OFFSET`] of BAR 0,
    /// where QEMU's `qemu-xhci` has them. Interrupter *n* signals vector
    /// *n*, and with MSI-X enabled events reach the interrupter they aim
    /// at (the conditional mapping of §7.6). Called before the controller
    /// is plugged.
    pub fn with_msix(self, sink: Arc<dyn MsiSink>) -> Self {
        {
            let mut st = lock(&self.state);
            let layout = MsixLayout {
                vectors: NUM_INTRS as u16,
                table_bar: 0,
                table_offset: MSIX_TABLE_OFFSET as u32,
                pba_bar: 0,
                pba_offset: MSIX_PBA_OFFSET as u32,
            };
            let msix = Msix::add(&mut st.caps, layout, sink)
                .expect("an empty capability list has room for MSI-X");
            st.msix = Some(msix);
        }
        self
    }

    /// Connects `device` to root-hub `port` (1-based).
    pub fn attach(&self, port: usize, device: Box<dyn UsbDevice>) -> Result<(), AttachError> {
        let mut st = lock(&self.state);
        let idx = port.checked_sub(1).filter(|&i| i < NUM_PORTS);
        let Some(idx) = idx else {
            return Err(AttachError::NoSuchPort(port));
        };
        let p = &mut st.ports[idx];
        if p.device.is_some() {
            return Err(AttachError::PortInUse(port));
        }
        if p.usb3 != (device.speed() == crate::hid::UsbSpeed::Super) {
            return Err(AttachError::WrongPortType(port));
        }
        p.device = Some(device);
        p.power_on_state();
        st.port_notify(idx, 0);
        Ok(())
    }

    /// A handle for injecting input events.
    pub fn input_sink(&self) -> InputSink {
        InputSink {
            state: Arc::downgrade(&self.state),
        }
    }

    /// MMIO load from BAR 0. Registers have no read side effects, so any
    /// width and alignment is served from the dwords it covers.
    pub fn mmio_read(&self, offset: u64, width: AccessWidth) -> u64 {
        let st = lock(&self.state);
        if let (Some(msix), MSIX_TABLE_OFFSET..) = (&st.msix, offset) {
            return if offset < MSIX_PBA_OFFSET {
                msix.read_table(offset - MSIX_TABLE_OFFSET, width)
            } else {
                msix.read_pba(offset - MSIX_PBA_OFFSET, width)
            };
        }
        BAR0.read(offset, width, |o| st.read_dword(o))
    }

    /// MMIO store to BAR 0. Registers take 32-bit stores and 64-bit stores
    /// (low dword first); narrower or misaligned stores are ignored.
    pub fn mmio_write(&self, offset: u64, width: AccessWidth, value: u64) {
        let mut st = lock(&self.state);
        if let (Some(msix), MSIX_TABLE_OFFSET..) = (&st.msix, offset) {
            if offset < MSIX_PBA_OFFSET {
                msix.write_table(offset - MSIX_TABLE_OFFSET, width, value);
            } else {
                vm_core::guest_error!("xhci: store to the MSI-X PBA at {offset:#x}");
            }
            return;
        }
        BAR0.write(offset, width, value, |o, v| st.write_dword(o, v));
        st.update_irq();
    }
}

/// BAR 0's 32-bit registers.
const BAR0: RegisterFile = RegisterFile {
    name: "xhci",
    size: BAR_SIZE,
    narrow: Narrow::Lanes,
    wide: Wide::Split,
};

impl PciDevice for Xhci {
    fn name(&self) -> &str {
        "qemu-xhci"
    }

    fn ids(&self) -> (u16, u16, u16, u16) {
        (
            PCI_VENDOR_ID,
            PCI_DEVICE_ID,
            PCI_SUBSYSTEM_VENDOR_ID,
            PCI_SUBSYSTEM_ID,
        )
    }

    fn class_and_revision(&self) -> (u32, u8) {
        (PCI_CLASS, PCI_REVISION)
    }

    fn bars(&self) -> Vec<BarRegion> {
        vec![BarRegion {
            index: 0,
            size: BAR_SIZE,
            kind: BarKind::Memory64,
            prefetchable: false,
        }]
    }

    fn read_config(&self, offset: u16, width: AccessWidth) -> u32 {
        let st = lock(&self.state);
        if st.msix.is_some() && offset < CFG_SBRN {
            return st.caps.read(offset, width);
        }
        let mut v = 0u32;
        for i in 0..width.bytes().min(4) as u16 {
            let byte = match offset.wrapping_add(i) {
                CFG_SBRN => SBRN_USB30,
                CFG_FLADJ => st.fladj,
                _ => 0,
            };
            v |= u32::from(byte) << (8 * i);
        }
        v
    }

    fn write_config(&self, offset: u16, width: AccessWidth, value: u32) {
        let mut st = lock(&self.state);
        let st = &mut *st;
        if let Some(msix) = &st.msix {
            msix.write_config(&mut st.caps, offset, width, value);
            // Turning MSI-X on or off moves the interrupt between the
            // INTx line and messages.
            st.update_irq();
        }
        for i in 0..width.bytes().min(4) as u16 {
            if offset.wrapping_add(i) == CFG_FLADJ {
                st.fladj = ((value >> (8 * i)) as u8) & 0x3f;
            }
        }
    }

    fn read_bar(&self, bar: u8, offset: u64, width: AccessWidth) -> u64 {
        if bar != 0 {
            return 0;
        }
        self.mmio_read(offset, width)
    }

    fn write_bar(&self, bar: u8, offset: u64, width: AccessWidth, value: u64) {
        if bar == 0 {
            self.mmio_write(offset, width, value);
        }
    }

    fn capabilities_pointer(&self) -> u8 {
        lock(&self.state).caps.pointer()
    }

    fn set_intx(&self, line: Arc<dyn IrqLine>) {
        let mut st = lock(&self.state);
        line.set_level(st.irq_level);
        st.irq = Some(line);
    }

    fn command_written(&self, command: u16) {
        let mut st = lock(&self.state);
        st.bus_master = command & PCI_COMMAND_BUS_MASTER != 0;
        if let Some(msix) = &st.msix {
            msix.set_bus_master(st.bus_master);
        }
    }

    fn reset(&self) {
        let mut st = lock(&self.state);
        st.fladj = FLADJ_RESET;
        st.bus_master = false;
        let st = &mut *st;
        if let Some(msix) = &st.msix {
            msix.reset(&mut st.caps);
        }
        st.reset_controller();
    }
}

impl XhciState {
    fn running(&self) -> bool {
        self.usbcmd & USBCMD_RS != 0 && self.usbsts & USBSTS_HCH == 0
    }

    /// HCRST (and power-on): registers to their defaults, slots disabled,
    /// devices reset and re-announced.
    fn reset_controller(&mut self) {
        self.usbcmd = 0;
        self.usbsts = USBSTS_HCH;
        self.dnctrl = 0;
        self.cmd_ring = RingCursor::default();
        self.crr = false;
        self.dcbaap = 0;
        self.config_reg = 0;
        self.run_start = None;
        for s in &mut self.slots {
            *s = Slot::default();
        }
        for i in &mut self.intrs {
            *i = Interrupter::new();
        }
        for p in &mut self.ports {
            if let Some(d) = p.device.as_mut() {
                d.reset();
            }
            p.pmsc = 0;
            p.hlpmc = 0;
            p.power_on_state();
        }
        self.update_irq();
    }

    fn mfindex(&self) -> u32 {
        match self.run_start {
            Some(t) => ((t.elapsed().as_nanos() / 125_000) as u32) & 0x3fff,
            None => 0,
        }
    }

    fn read_dword(&self, off: u64) -> u32 {
        match off {
            0..=0x3f => match off {
                CAP_LENGTH_VERSION => (HCI_VERSION << 16) | CAP_LENGTH,
                CAP_HCSPARAMS1 => HCSPARAMS1,
                CAP_HCSPARAMS2 => HCSPARAMS2,
                CAP_HCSPARAMS3 => 0,
                CAP_HCCPARAMS1 => HCCPARAMS1,
                CAP_DBOFF => DOORBELL_BASE as u32,
                CAP_RTSOFF => RUNTIME_BASE as u32,
                CAP_HCCPARAMS2 => 0,
                o => supported_protocol_dword(o),
            },
            0x40..=0xfff => self.read_op(off - OP_BASE),
            0x1000..=0x1fff => self.read_runtime(off - RUNTIME_BASE),
            // Doorbells read as 0.
            _ => 0,
        }
    }

    fn read_op(&self, rel: u64) -> u32 {
        if rel >= OP_PORT_BASE {
            let idx = ((rel - OP_PORT_BASE) / PORT_STRIDE) as usize;
            let Some(p) = self.ports.get(idx) else {
                return 0;
            };
            return match rel % PORT_STRIDE {
                PORT_SC => p.portsc,
                PORT_PMSC => p.pmsc,
                PORT_HLPMC => p.hlpmc,
                _ => 0,
            };
        }
        match rel {
            OP_USBCMD => self.usbcmd,
            OP_USBSTS => self.usbsts,
            OP_PAGESIZE => PAGESIZE,
            OP_DNCTRL => self.dnctrl,
            // The ring pointer reads as 0 (XHCI 1.2 §5.4.5); only CRR shows.
            OP_CRCR_LO => u32::from(self.crr) * CRCR_CRR as u32,
            OP_DCBAAP_LO => self.dcbaap as u32,
            OP_DCBAAP_HI => (self.dcbaap >> 32) as u32,
            OP_CONFIG => self.config_reg,
            _ => 0,
        }
    }

    fn read_runtime(&self, rel: u64) -> u32 {
        if rel < RT_IR_BASE {
            return if rel == RT_MFINDEX { self.mfindex() } else { 0 };
        }
        let idx = ((rel - RT_IR_BASE) / IR_STRIDE) as usize;
        let Some(it) = self.intrs.get(idx) else {
            return 0;
        };
        match (rel - RT_IR_BASE) % IR_STRIDE {
            IR_IMAN => it.iman,
            IR_IMOD => it.imod,
            IR_ERSTSZ => it.erstsz,
            IR_ERSTBA_LO => it.erstba as u32,
            IR_ERSTBA_HI => (it.erstba >> 32) as u32,
            IR_ERDP_LO => it.erdp as u32,
            IR_ERDP_HI => (it.erdp >> 32) as u32,
            _ => 0,
        }
    }

    fn write_dword(&mut self, off: u64, val: u32) {
        match off {
            0..=0x3f => vm_core::guest_error!("xhci: write to capability register {off:#x}"),
            0x40..=0xfff => self.write_op(off - OP_BASE, val),
            0x1000..=0x1fff => self.write_runtime(off - RUNTIME_BASE, val),
            _ => {
                let idx = (off - DOORBELL_BASE) / 4;
                if idx <= NUM_SLOTS as u64 {
                    self.doorbell(idx as u8, val);
                } else {
                    vm_core::guest_error!("xhci: write to doorbell {idx}");
                }
            }
        }
    }

    fn write_op(&mut self, rel: u64, val: u32) {
        if rel >= OP_PORT_BASE {
            let idx = ((rel - OP_PORT_BASE) / PORT_STRIDE) as usize;
            if idx >= NUM_PORTS {
                vm_core::guest_error!("xhci: write to missing port register {rel:#x}");
                return;
            }
            match rel % PORT_STRIDE {
                PORT_SC => self.write_portsc(idx, val),
                PORT_PMSC => self.ports[idx].pmsc = val,
                PORT_HLPMC => self.ports[idx].hlpmc = val,
                _ => {}
            }
            return;
        }
        match rel {
            OP_USBCMD => self.write_usbcmd(val),
            OP_USBSTS => self.usbsts &= !(val & USBSTS_RW1C),
            OP_DNCTRL => self.dnctrl = val & 0xffff,
            OP_CRCR_LO => self.write_crcr(u64::from(val), false),
            OP_CRCR_HI => self.write_crcr(u64::from(val), true),
            OP_DCBAAP_LO => {
                self.dcbaap = (self.dcbaap & !0xffff_ffff) | (u64::from(val) & DCBAAP_PTR_MASK);
            }
            OP_DCBAAP_HI => self.dcbaap = (self.dcbaap & 0xffff_ffff) | (u64::from(val) << 32),
            OP_CONFIG => self.config_reg = val & CONFIG_MAX_SLOTS_EN,
            _ => vm_core::guest_error!("xhci: write to read-only operational register {rel:#x}"),
        }
    }

    fn write_usbcmd(&mut self, val: u32) {
        if val & USBCMD_HCRST != 0 {
            self.reset_controller();
            return;
        }
        let was = self.usbcmd & USBCMD_RS != 0;
        self.usbcmd = val & USBCMD_STORED;
        let now = val & USBCMD_RS != 0;
        if now && !was {
            self.usbsts &= !USBSTS_HCH;
            self.run_start = Some(Instant::now());
        } else if !now && was {
            self.usbsts |= USBSTS_HCH;
            self.crr = false;
            self.run_start = None;
        }
    }

    fn write_crcr(&mut self, val: u64, high: bool) {
        if self.crr {
            // While the ring runs only Command Stop / Abort count. Commands
            // complete synchronously, so the ring is idle and stops at once.
            if !high && val & (CRCR_CS | CRCR_CA) != 0 {
                self.crr = false;
                let ev = Trb {
                    parameter: self.cmd_ring.dequeue,
                    status: u32::from(CC_COMMAND_RING_STOPPED) << 24,
                    control: trb::TRB_COMMAND_COMPLETION << 10,
                };
                if self.post_event(0, ev).is_err() {
                    self.host_system_error();
                }
            }
            return;
        }
        let d = self.cmd_ring.dequeue;
        if high {
            self.cmd_ring = RingCursor::new((val << 32) | (d & 0xffff_ffff), self.cmd_ring.cycle);
        } else {
            self.cmd_ring = RingCursor::new(
                (d & !0xffff_ffff) | (val & CRCR_PTR_MASK & 0xffff_ffff),
                val & CRCR_RCS != 0,
            );
        }
    }

    fn write_runtime(&mut self, rel: u64, val: u32) {
        if rel < RT_IR_BASE {
            vm_core::guest_error!("xhci: write to MFINDEX");
            return;
        }
        let idx = ((rel - RT_IR_BASE) / IR_STRIDE) as usize;
        if idx >= NUM_INTRS {
            vm_core::guest_error!("xhci: write to missing interrupter {idx}");
            return;
        }
        let v = u64::from(val);
        let it = &mut self.intrs[idx];
        match (rel - RT_IR_BASE) % IR_STRIDE {
            IR_IMAN => {
                if val & IMAN_IP != 0 {
                    it.iman &= !IMAN_IP;
                }
                it.iman = (it.iman & !IMAN_IE) | (val & IMAN_IE);
            }
            IR_IMOD => it.imod = val,
            IR_ERSTSZ => it.erstsz = val & 0xffff,
            IR_ERSTBA_LO => it.set_erstba((it.erstba & !0xffff_ffff) | v),
            IR_ERSTBA_HI => it.set_erstba((it.erstba & 0xffff_ffff) | (v << 32)),
            IR_ERDP_LO => {
                let ehb = if v & ERDP_EHB != 0 {
                    0
                } else {
                    it.erdp & ERDP_EHB
                };
                it.erdp = (it.erdp & !0xffff_ffff) | (v & 0xffff_fff7) | ehb;
                self.erdp_written(idx);
            }
            IR_ERDP_HI => {
                it.erdp = (it.erdp & 0xffff_ffff) | (v << 32);
                self.erdp_written(idx);
            }
            _ => {}
        }
    }

    /// The guest consumed events: announce events that arrived while the
    /// handler was busy.
    fn erdp_written(&mut self, idx: usize) {
        let it = &mut self.intrs[idx];
        it.undelivered = it.has_unconsumed_events();
        self.try_signal(idx);
    }

    fn doorbell(&mut self, idx: u8, val: u32) {
        if !self.running() {
            vm_core::guest_error!("xhci: doorbell {idx} rung while halted");
            return;
        }
        if !self.bus_master {
            vm_core::guest_error!("xhci: doorbell {idx} rung with bus mastering off");
            return;
        }
        if idx == 0 {
            if val & 0xff != 0 {
                vm_core::guest_error!("xhci: command doorbell with target {}", val & 0xff);
                return;
            }
            self.crr = true;
            self.process_commands();
            return;
        }
        let target = (val & 0xff) as u8;
        if target == 0 || target > 31 {
            vm_core::guest_error!("xhci: doorbell {idx} with target {target}");
            return;
        }
        if self.process_endpoint(idx, target).is_err() {
            self.host_system_error();
        }
    }

    /// USBSTS.HSE: the controller stops.
    pub(crate) fn host_system_error(&mut self) {
        vm_core::guest_error!("xhci: DMA outside guest RAM, host system error");
        self.usbsts |= USBSTS_HSE | USBSTS_HCH;
        self.usbcmd &= !USBCMD_RS;
        self.crr = false;
        self.run_start = None;
        self.update_irq();
    }

    fn msi_enabled(&self) -> bool {
        self.msix.as_ref().is_some_and(Msix::enabled)
    }

    /// The interrupter an event aimed at `target` lands on (§7.6 rule 1).
    fn route(&self, target: usize) -> usize {
        let mapping_supported = !self.config.conditional_intr_mapping || self.msi_enabled();
        if NUM_INTRS == 1 || !mapping_supported {
            return 0;
        }
        if target >= NUM_INTRS {
            vm_core::guest_error!("xhci: event for missing interrupter {target}");
            return 0;
        }
        target
    }

    /// Posts `event` on the ring of interrupter `target` (after routing).
    pub(crate) fn post_event(&mut self, target: usize, event: Trb) -> Result<(), Hse> {
        let v = self.route(target);
        if !self.bus_master {
            vm_core::guest_error!("xhci: event dropped, bus mastering off");
            return Ok(());
        }
        match self.intrs[v].post(&self.mem, event) {
            Ok(()) => {}
            Err(PostError::NoRing) => {
                vm_core::guest_error!("xhci: interrupter {v} has no usable event ring");
                return Ok(());
            }
            Err(PostError::Full) => {
                vm_core::guest_error!("xhci: event ring {v} full, event lost");
            }
            Err(PostError::Dma) => return Err(Hse),
        }
        self.intrs[v].undelivered = true;
        self.try_signal(v);
        Ok(())
    }

    /// Sets IMAN.IP for undelivered events unless the handler is busy or
    /// moderation holds the interrupt back.
    fn try_signal(&mut self, v: usize) {
        let it = &mut self.intrs[v];
        if !it.undelivered || it.erdp & ERDP_EHB != 0 {
            return;
        }
        let interval = Duration::from_nanos(250 * u64::from(it.imod & 0xffff));
        if let Some(last) = it.last_irq {
            let since = last.elapsed();
            if since < interval {
                self.arm_moderation_timer(v, interval - since);
                return;
            }
        }
        it.iman |= IMAN_IP;
        it.erdp |= ERDP_EHB;
        it.undelivered = false;
        it.last_irq = Some(Instant::now());
        self.usbsts |= USBSTS_EINT;
        self.update_irq();
    }

    fn arm_moderation_timer(&mut self, v: usize, delay: Duration) {
        if self.intrs[v].timer_armed {
            return;
        }
        self.intrs[v].timer_armed = true;
        let weak = self.weak_self.clone();
        let spawned = std::thread::Builder::new()
            .name("xhci-imod".into())
            .spawn(move || {
                std::thread::sleep(delay);
                if let Some(state) = weak.upgrade() {
                    let mut st = lock(&state);
                    st.intrs[v].timer_armed = false;
                    st.intrs[v].last_irq = None;
                    // Quiesced, the resume signals it.
                    if !st.quiesced {
                        st.try_signal(v);
                    }
                }
            });
        if spawned.is_err() {
            // Without a timer, deliver now rather than never.
            self.intrs[v].timer_armed = false;
            self.intrs[v].last_irq = None;
            self.try_signal(v);
        }
    }

    /// Drives INTx from interrupter 0 (pin mode, §7.6), or with MSI-X
    /// sends each interrupter's message whose IP, IE and USBCMD.INTE are
    /// set, clearing its IP as the message completes (XHCI 1.2 §5.5.2.1).
    pub(crate) fn update_irq(&mut self) {
        if let Some(msix) = self.msix.as_ref().filter(|m| m.enabled()) {
            // The pin is not used while MSI-X is on.
            if self.irq_level {
                self.irq_level = false;
                if let Some(irq) = &self.irq {
                    irq.set_level(false);
                }
            }
            if self.usbcmd & USBCMD_INTE == 0 || !self.bus_master {
                return;
            }
            for (v, it) in self.intrs.iter_mut().enumerate() {
                if it.iman & IMAN_IP != 0 && it.iman & IMAN_IE != 0 {
                    it.iman &= !IMAN_IP;
                    msix.notify(v as u16);
                }
            }
            return;
        }
        let i0 = &self.intrs[0];
        // USBSTS.HSE with USBCMD.HSEE asks for out-of-band signalling
        // (SERR#), which is not an INTx source.
        let level = !self.msi_enabled()
            && i0.iman & IMAN_IP != 0
            && i0.iman & IMAN_IE != 0
            && self.usbcmd & USBCMD_INTE != 0;
        if level != self.irq_level {
            self.irq_level = level;
            if let Some(irq) = &self.irq {
                irq.set_level(level);
            }
        }
    }

    /// Sets `change` bits of port `idx` and, while running, posts a Port
    /// Status Change event.
    fn port_notify(&mut self, idx: usize, change: u32) {
        self.ports[idx].portsc |= change;
        if self.ports[idx].portsc & PORTSC_CHANGE == 0 {
            return;
        }
        self.usbsts |= USBSTS_PCD;
        if !self.running() {
            return;
        }
        let ev = Trb {
            parameter: ((idx as u64) + 1) << 24,
            status: u32::from(CC_SUCCESS) << 24,
            control: trb::TRB_PORT_STATUS_CHANGE << 10,
        };
        if self.post_event(0, ev).is_err() {
            self.host_system_error();
        }
    }

    fn write_portsc(&mut self, idx: usize, val: u32) {
        let p = &mut self.ports[idx];
        let mut sc = p.portsc & !(val & PORTSC_CHANGE);
        if val & PORTSC_PED != 0 {
            // Software disables the port; it does not set PEC.
            sc &= !PORTSC_PED;
        }
        sc = (sc & !(PORTSC_WAKE | PORTSC_PIC_MASK)) | (val & (PORTSC_WAKE | PORTSC_PIC_MASK));
        p.portsc = sc;
        let connected = sc & PORTSC_CCS != 0;
        let mut change = 0;
        if val & PORTSC_LWS != 0 && connected && sc & PORTSC_PED != 0 {
            let new = (val & PORTSC_PLS_MASK) >> PORTSC_PLS_SHIFT;
            let old = p.pls();
            match new {
                PLS_U0 if old != PLS_U0 => {
                    p.set_pls(PLS_U0);
                    change |= PORTSC_PLC;
                }
                PLS_U3 if old <= 2 => p.set_pls(PLS_U3),
                PLS_RESUME if old == PLS_U3 => p.set_pls(PLS_RESUME),
                PLS_U0 | PLS_U3 | PLS_RESUME => {}
                _ => vm_core::guest_error!("xhci: port {} link state {new} refused", idx + 1),
            }
        }
        let warm = p.usb3 && val & PORTSC_WPR != 0;
        if (val & PORTSC_PR != 0 || warm) && connected {
            if let Some(d) = p.device.as_mut() {
                d.reset();
            }
            p.portsc |= PORTSC_PED;
            p.set_pls(PLS_U0);
            change |= PORTSC_PRC | if warm { PORTSC_WRC } else { 0 };
        }
        if change != 0 {
            self.port_notify(idx, change);
        }
    }

    /// After a quiesce or a restore: signals events no interrupt announced
    /// yet and hands the devices' waiting input to their endpoints.
    fn catch_up(&mut self) {
        for v in 0..self.intrs.len() {
            self.try_signal(v);
        }
        self.update_irq();
        for idx in 0..NUM_PORTS {
            if self.ports[idx].device.is_some() {
                self.device_has_data(idx);
            }
        }
    }

    /// Offers host input to the attached devices.
    fn input(&mut self, event: InputEvent) -> bool {
        for idx in 0..NUM_PORTS {
            let took = match self.ports[idx].device.as_mut() {
                Some(d) => d.handle_input(&event),
                None => false,
            };
            if took {
                self.device_has_data(idx);
                return true;
            }
        }
        false
    }

    /// The device on port `idx` has new IN data: wake a suspended link if
    /// allowed and run its IN endpoints.
    fn device_has_data(&mut self, idx: usize) {
        if !self.running() || !self.bus_master || self.quiesced {
            return;
        }
        let p = &mut self.ports[idx];
        let wake = p.device.as_ref().is_some_and(|d| d.remote_wakeup_enabled());
        if p.pls() == PLS_U3 && wake {
            p.set_pls(PLS_RESUME);
            self.port_notify(idx, PORTSC_PLC);
        }
        let port_id = (idx + 1) as u8;
        for slot in 0..NUM_SLOTS {
            let s = &self.slots[slot];
            if !s.enabled || s.port != port_id {
                continue;
            }
            for dci in 2..=context::NUM_DCI as u8 {
                let Some(ep) = self.slots[slot].endpoint(dci) else {
                    continue;
                };
                let is_in = matches!(
                    ep.ep_type,
                    context::EP_TYPE_INT_IN | context::EP_TYPE_BULK_IN
                );
                if ep.state == context::EP_RUNNING
                    && is_in
                    && self.process_endpoint((slot + 1) as u8, dci).is_err()
                {
                    self.host_system_error();
                    return;
                }
            }
        }
    }
}
