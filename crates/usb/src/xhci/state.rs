//! The controller's state in a snapshot: operational and runtime
//! registers, the command ring, every interrupter's event ring producer,
//! the device slots with their endpoints' rings, the root hub's ports with
//! the devices' own state, and MSI-X.
//!
//! Saved with the vCPUs parked and the controller quiesced
//! ([`Xhci::quiesce`]): commands and transfers run within doorbell writes,
//! so none is half done; input arriving from the host meanwhile waits in
//! the HID devices' report queues and is delivered at
//! [`Xhci::resume`]. Restoring checks every value as register writes and
//! the controller's own work would have left it, and refuses the state
//! whole, changing nothing, otherwise. MFINDEX continues from its saved
//! value; interrupt moderation starts afresh.

use std::time::{Duration, Instant};

use vm_core::sync::lock;

use super::context::{Endpoint, Slot, EP_ERROR, NUM_DCI, SLOT_CONFIGURED};
use super::intr::{Interrupter, SavedInterrupter};
use super::regs::*;
use super::trb::RingCursor;
use super::Xhci;
use crate::hid::SavedDevice;

/// A ring's dequeue pointer and consumer cycle state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedRing {
    pub dequeue: u64,
    pub cycle: bool,
}

impl SavedRing {
    fn of(ring: &RingCursor) -> Self {
        Self {
            dequeue: ring.dequeue,
            cycle: ring.cycle,
        }
    }

    fn cursor(&self) -> RingCursor {
        RingCursor::new(self.dequeue, self.cycle)
    }
}

/// A root hub port and the device on it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedPort {
    pub portsc: u32,
    pub pmsc: u32,
    pub hlpmc: u32,
    pub device: Option<SavedDevice>,
}

/// One endpoint of a slot: its state, type and transfer ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedEndpoint {
    pub state: u8,
    pub ep_type: u8,
    pub ring: SavedRing,
}

/// A device slot as the controller keeps it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedSlot {
    pub enabled: bool,
    pub state: u8,
    pub port: u8,
    pub address: u8,
    pub output_ctx: u64,
    /// Indexed by DCI - 1.
    pub endpoints: Vec<SavedEndpoint>,
}

/// The controller in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedXhci {
    pub usbcmd: u32,
    pub usbsts: u32,
    pub dnctrl: u32,
    pub command_ring: SavedRing,
    /// Command Ring Running.
    pub crr: bool,
    pub dcbaap: u64,
    pub config: u32,
    /// MFINDEX at the save (125 µs microframes, 14 bits).
    pub mfindex: u32,
    pub fladj: u8,
    pub bus_master: bool,
    pub ports: Vec<SavedPort>,
    pub interrupters: Vec<SavedInterrupter>,
    pub slots: Vec<SavedSlot>,
    pub msix: Option<pci::msix::SavedMsix>,
}

impl Xhci {
    /// Before a save: host input stops reaching guest memory (it waits
    /// in the devices' report queues) and moderation timers hold their
    /// interrupts, until [`Xhci::resume`].
    pub fn quiesce(&self) {
        lock(&self.state).quiesced = true;
    }

    /// After a save the VM goes on from: input waiting in the devices is
    /// delivered and held interrupts signalled.
    pub fn resume(&self) {
        let mut st = lock(&self.state);
        st.quiesced = false;
        st.catch_up();
    }

    /// Whether every attached device can give its state.
    pub fn saves_state(&self) -> bool {
        lock(&self.state)
            .ports
            .iter()
            .filter_map(|p| p.device.as_ref())
            .all(|d| d.save_state().is_some())
    }

    /// The controller's state, for a snapshot.
    pub fn save_state(&self) -> Result<SavedXhci, String> {
        let st = lock(&self.state);
        let mut ports = Vec::with_capacity(st.ports.len());
        for (i, p) in st.ports.iter().enumerate() {
            let device = match &p.device {
                Some(d) => Some(
                    d.save_state()
                        .ok_or_else(|| format!("the device on port {} cannot save", i + 1))?,
                ),
                None => None,
            };
            ports.push(SavedPort {
                portsc: p.portsc,
                pmsc: p.pmsc,
                hlpmc: p.hlpmc,
                device,
            });
        }
        Ok(SavedXhci {
            usbcmd: st.usbcmd,
            usbsts: st.usbsts,
            dnctrl: st.dnctrl,
            command_ring: SavedRing::of(&st.cmd_ring),
            crr: st.crr,
            dcbaap: st.dcbaap,
            config: st.config_reg,
            mfindex: st.mfindex(),
            fladj: st.fladj,
            bus_master: st.bus_master,
            ports,
            interrupters: st.intrs.iter().map(Interrupter::save).collect(),
            slots: st
                .slots
                .iter()
                .map(|s| SavedSlot {
                    enabled: s.enabled,
                    state: s.state,
                    port: s.port,
                    address: s.address,
                    output_ctx: s.output_ctx,
                    endpoints: s
                        .eps
                        .iter()
                        .map(|e| SavedEndpoint {
                            state: e.state,
                            ep_type: e.ep_type,
                            ring: SavedRing::of(&e.ring),
                        })
                        .collect(),
                })
                .collect(),
            msix: st.msix.as_ref().map(pci::Msix::save_state),
        })
    }

    /// Puts back what [`Xhci::save_state`] returned, on a controller built
    /// like the saved one (the same devices on the same ports, MSI-X or
    /// not). Untrusted input: refused whole, changing nothing, unless
    /// register writes and the controller's work could have left it.
    pub fn restore_state(&self, saved: &SavedXhci) -> Result<(), String> {
        let mut st = lock(&self.state);
        let st = &mut *st;
        if saved.ports.len() != st.ports.len()
            || saved.interrupters.len() != st.intrs.len()
            || saved.slots.len() != st.slots.len()
        {
            return Err(format!(
                "{} ports, {} interrupters, {} slots; this controller has {}, {}, {}",
                saved.ports.len(),
                saved.interrupters.len(),
                saved.slots.len(),
                st.ports.len(),
                st.intrs.len(),
                st.slots.len()
            ));
        }
        let stored = USBCMD_STORED;
        if saved.usbcmd & !stored != 0 || saved.dnctrl & !0xffff != 0 {
            return Err(format!(
                "USBCMD {:#x}, DNCTRL {:#x}",
                saved.usbcmd, saved.dnctrl
            ));
        }
        let running = saved.usbcmd & USBCMD_RS != 0;
        if running == (saved.usbsts & USBSTS_HCH != 0) && saved.usbsts & USBSTS_HSE == 0 {
            return Err(format!(
                "USBCMD {:#x} with USBSTS {:#x}",
                saved.usbcmd, saved.usbsts
            ));
        }
        if saved.config & !CONFIG_MAX_SLOTS_EN != 0
            || saved.dcbaap & !DCBAAP_PTR_MASK & 0xffff_ffff != 0
            || saved.fladj & !0x3f != 0
        {
            return Err(format!(
                "CONFIG {:#x}, DCBAAP {:#x}, FLADJ {:#x}",
                saved.config, saved.dcbaap, saved.fladj
            ));
        }
        for (i, (p, s)) in st.ports.iter().zip(&saved.ports).enumerate() {
            let connected = s.portsc & PORTSC_CCS != 0;
            if p.device.is_some() != s.device.is_some() || connected != p.device.is_some() {
                return Err(format!(
                    "port {}: a device in the snapshot and here differ",
                    i + 1
                ));
            }
        }
        let intrs = saved
            .interrupters
            .iter()
            .enumerate()
            .map(|(i, s)| Interrupter::restored(s).map_err(|e| format!("interrupter {i}: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let mut slots = Vec::with_capacity(saved.slots.len());
        for (i, s) in saved.slots.iter().enumerate() {
            if s.state > SLOT_CONFIGURED
                || usize::from(s.port) > NUM_PORTS
                || s.endpoints.len() != NUM_DCI
                || s.endpoints
                    .iter()
                    .any(|e| e.state > EP_ERROR || e.ep_type > 7)
            {
                return Err(format!("slot {}: {s:?}", i + 1));
            }
            let mut slot = Slot {
                enabled: s.enabled,
                state: s.state,
                port: s.port,
                address: s.address,
                output_ctx: s.output_ctx,
                ..Slot::default()
            };
            for (ep, e) in slot.eps.iter_mut().zip(&s.endpoints) {
                *ep = Endpoint {
                    state: e.state,
                    ep_type: e.ep_type,
                    ring: e.ring.cursor(),
                };
            }
            slots.push(slot);
        }
        // The devices check their own; a refusal after one was restored
        // would leave it changed, so all are checked on copies first.
        for (i, (p, s)) in st.ports.iter().zip(&saved.ports).enumerate() {
            if let (Some(d), Some(saved)) = (&p.device, &s.device) {
                let kind = d.save_state().ok_or("a device that cannot save")?;
                check_device(&kind, saved).map_err(|e| format!("port {}: {e}", i + 1))?;
            }
        }
        match (&st.msix, &saved.msix) {
            (None, None) => {}
            (Some(msix), Some(s)) => msix.restore_state(&mut st.caps, s)?,
            _ => return Err("MSI-X differs between the snapshot and this controller".into()),
        }

        // Checked: from here on nothing fails.
        for (p, s) in st.ports.iter_mut().zip(&saved.ports) {
            p.portsc = s.portsc;
            p.pmsc = s.pmsc;
            p.hlpmc = s.hlpmc;
            if let (Some(d), Some(saved)) = (p.device.as_mut(), &s.device) {
                let _ = d.restore_state(saved);
            }
        }
        st.usbcmd = saved.usbcmd;
        st.usbsts = saved.usbsts;
        st.dnctrl = saved.dnctrl;
        st.cmd_ring = saved.command_ring.cursor();
        st.crr = saved.crr && running;
        st.dcbaap = saved.dcbaap;
        st.config_reg = saved.config;
        st.fladj = saved.fladj;
        st.bus_master = saved.bus_master;
        if let Some(msix) = &st.msix {
            // The command register is restored with the PCI host's state,
            // not replayed as a write.
            msix.set_bus_master(saved.bus_master);
        }
        st.intrs = intrs;
        st.slots = slots;
        st.run_start = st.running().then(|| {
            let elapsed = Duration::from_nanos(125_000 * u64::from(saved.mfindex & 0x3fff));
            Instant::now()
                .checked_sub(elapsed)
                .unwrap_or_else(Instant::now)
        });
        // The line follows the restored registers; events left
        // unannounced at the save are announced now.
        st.irq_level = false;
        if let Some(irq) = &st.irq {
            irq.set_level(false);
        }
        st.catch_up();
        Ok(())
    }
}

/// Whether `saved` restores into a device of the kind `kind` is the
/// state of: restoring into a fresh device of that kind checks it without
/// touching the attached one.
fn check_device(kind: &SavedDevice, saved: &SavedDevice) -> Result<(), String> {
    use crate::hid::{UsbDevice, UsbKeyboard, UsbTablet};
    let mut copy: Box<dyn UsbDevice> = match kind {
        SavedDevice::Keyboard { .. } => Box::new(UsbKeyboard::new()),
        SavedDevice::Tablet { .. } => Box::new(UsbTablet::new()),
    };
    copy.restore_state(saved)
}
