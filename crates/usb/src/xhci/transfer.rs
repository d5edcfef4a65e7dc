//! Transfer rings (XHCI 1.2 §4.11, §6.4.1): control transfers on the
//! default endpoint (Setup, Data and Status stages) and interrupt/bulk
//! transfers (Normal TRBs), with Event Data, chaining, IOC and ISP.
//!
//! A TD is gathered whole before it runs; one that is not fully handed to
//! the controller yet (a TRB still owned by the producer) waits. Transfers
//! are capped at [`MAX_TRANSFER`] bytes and TDs at [`MAX_TD_TRBS`] TRBs.
//! After a short packet, the TRB where it happened reports Short Packet if
//! it has ISP or IOC, and the last TRB of the TD reports too if it has IOC.

use crate::hid::{ControlResult, SetupPacket, TransferResult, UsbDevice};

use super::context::*;
use super::trb::*;
use super::{Hse, XhciState, TRANSFER_BUDGET};

/// Largest transfer one TD moves (wLength is 16 bits; HID reports are
/// tiny).
pub const MAX_TRANSFER: usize = 64 * 1024;
/// TRBs one TD may span.
pub const MAX_TD_TRBS: usize = 256;

type TdTrb = (u64, Trb);

struct Td {
    trbs: Vec<TdTrb>,
    complete: bool,
}

fn is_data_trb(t: &Trb) -> bool {
    matches!(t.trb_type(), TRB_NORMAL | TRB_DATA_STAGE)
}

impl XhciState {
    /// Runs the ring of endpoint `dci` of `slot_id` (1..=NUM_SLOTS).
    pub(crate) fn process_endpoint(&mut self, slot_id: u8, dci: u8) -> Result<(), Hse> {
        let si = usize::from(slot_id) - 1;
        if !self.slots[si].enabled {
            vm_core::guest_error!("xhci: doorbell for disabled slot {slot_id}");
            return Ok(());
        }
        let Some(ep) = self.slots[si].endpoint(dci).copied() else {
            return Ok(());
        };
        match ep.state {
            EP_RUNNING => {}
            EP_STOPPED => {
                if let Some(e) = self.slots[si].endpoint_mut(dci) {
                    e.state = EP_RUNNING;
                }
                self.write_ep_state(slot_id, dci)?;
            }
            EP_DISABLED => {
                vm_core::guest_error!("xhci: doorbell for disabled endpoint {slot_id}/{dci}");
                return Ok(());
            }
            // Halted or Error: the doorbell waits for a Reset Endpoint.
            _ => return Ok(()),
        }
        let port = usize::from(self.slots[si].port);
        let Some(mut dev) = port
            .checked_sub(1)
            .and_then(|p| self.ports.get_mut(p))
            .and_then(|p| p.device.take())
        else {
            vm_core::guest_error!("xhci: slot {slot_id} has no device");
            return Ok(());
        };
        let r = self.run_ring(slot_id, dci, dev.as_mut());
        self.ports[port - 1].device = Some(dev);
        r
    }

    fn run_ring(&mut self, slot_id: u8, dci: u8, dev: &mut dyn UsbDevice) -> Result<(), Hse> {
        let si = usize::from(slot_id) - 1;
        let mut budget = TRANSFER_BUDGET;
        loop {
            let Some(ep) = self.slots[si].endpoint(dci).copied() else {
                return Ok(());
            };
            if ep.state != EP_RUNNING {
                return Ok(());
            }
            let mut cursor = ep.ring;
            let td = match self.gather_td(&mut cursor, &mut budget, dci == 1) {
                Ok(Some(td)) => td,
                Ok(None) | Err(RingError::Budget) => return Ok(()),
                Err(RingError::LinkLoop(a)) => {
                    vm_core::guest_error!("xhci: transfer ring Link TRB loop at {a:#x}");
                    return Ok(());
                }
                Err(RingError::Dma(a)) => {
                    vm_core::guest_error!("xhci: transfer ring at {a:#x} is not RAM");
                    return Err(Hse);
                }
            };
            if !self.execute_td(slot_id, dci, ep.ep_type, dev, &td)? {
                return Ok(());
            }
            if let Some(e) = self.slots[si].endpoint_mut(dci) {
                e.ring = cursor;
            }
        }
    }

    fn gather_td(
        &self,
        cursor: &mut RingCursor,
        budget: &mut u32,
        control: bool,
    ) -> Result<Option<Td>, RingError> {
        let mut trbs = Vec::new();
        let mut seen_status = false;
        loop {
            let Some(trb) = cursor.peek(&self.mem, budget)? else {
                return Ok(None);
            };
            let addr = cursor.dequeue;
            cursor.advance(budget);
            trbs.push((addr, trb));
            let ty = trb.trb_type();
            let end = if control {
                seen_status |= ty == TRB_STATUS_STAGE;
                (trbs.len() == 1 && ty != TRB_SETUP_STAGE) || (seen_status && !trb.flag(TRB_CH))
            } else {
                !trb.flag(TRB_CH)
            };
            if end {
                return Ok(Some(Td {
                    trbs,
                    complete: true,
                }));
            }
            if trbs.len() >= MAX_TD_TRBS {
                return Ok(Some(Td {
                    trbs,
                    complete: false,
                }));
            }
        }
    }

    fn transfer_event(
        &mut self,
        slot_id: u8,
        dci: u8,
        (addr, trb): TdTrb,
        code: u8,
        length: u32,
    ) -> Result<(), Hse> {
        let ed = trb.trb_type() == TRB_EVENT_DATA;
        let ev = Trb {
            parameter: if ed { trb.parameter } else { addr },
            status: (u32::from(code) << 24) | (length & 0xff_ffff),
            control: (u32::from(slot_id) << 24)
                | (u32::from(dci) << 16)
                | (TRB_TRANSFER_EVENT << 10)
                | if ed { TRB_ED } else { 0 },
        };
        self.post_event(trb.interrupter_target(), ev)
    }

    fn halt(&mut self, slot_id: u8, dci: u8) -> Result<(), Hse> {
        if let Some(e) = self.slots[usize::from(slot_id) - 1].endpoint_mut(dci) {
            e.state = EP_HALTED;
        }
        self.write_ep_state(slot_id, dci)
    }

    /// Runs one TD; false when the device NAKed and the TD must wait.
    fn execute_td(
        &mut self,
        slot_id: u8,
        dci: u8,
        ep_type: u8,
        dev: &mut dyn UsbDevice,
        td: &Td,
    ) -> Result<bool, Hse> {
        let last = td.trbs[td.trbs.len() - 1];
        if !td.complete {
            vm_core::guest_error!("xhci: TD longer than {MAX_TD_TRBS} TRBs");
            self.transfer_event(slot_id, dci, last, CC_TRB_ERROR, 0)?;
            return Ok(true);
        }
        if dci == 1 {
            return self.control_transfer(slot_id, dev, td);
        }
        // A lone No Op TRB completes at once.
        if td.trbs.len() == 1 && td.trbs[0].1.trb_type() == TRB_NOOP {
            return self.report_td(slot_id, dci, &td.trbs, 0).map(|_| true);
        }
        if let Some(bad) = td
            .trbs
            .iter()
            .find(|(_, t)| !matches!(t.trb_type(), TRB_NORMAL | TRB_EVENT_DATA))
        {
            vm_core::guest_error!("xhci: TRB type {} on a normal ring", bad.1.trb_type());
            self.transfer_event(slot_id, dci, *bad, CC_TRB_ERROR, 0)?;
            return Ok(true);
        }
        let endpoint = dci / 2;
        match ep_type {
            EP_TYPE_INT_IN | EP_TYPE_BULK_IN => {
                if let Some(bad) = td.trbs.iter().find(|(_, t)| t.flag(TRB_IDT)) {
                    self.transfer_event(slot_id, dci, *bad, CC_TRB_ERROR, 0)?;
                    return Ok(true);
                }
                let cap = td
                    .trbs
                    .iter()
                    .filter(|(_, t)| is_data_trb(t))
                    .map(|(_, t)| t.transfer_length() as usize)
                    .sum::<usize>()
                    .min(MAX_TRANSFER);
                let mut buf = vec![0u8; cap];
                match dev.interrupt_in(endpoint, &mut buf) {
                    TransferResult::Nak => Ok(false),
                    TransferResult::Stall => {
                        self.halt(slot_id, dci)?;
                        self.transfer_event(slot_id, dci, td.trbs[0], CC_STALL_ERROR, 0)?;
                        Ok(true)
                    }
                    TransferResult::Data(n) => {
                        let n = n.min(cap);
                        self.scatter(&td.trbs, &buf[..n])?;
                        self.report_td(slot_id, dci, &td.trbs, n)?;
                        Ok(true)
                    }
                }
            }
            EP_TYPE_INT_OUT | EP_TYPE_BULK_OUT => {
                let data = self.gather(&td.trbs, MAX_TRANSFER)?;
                match dev.data_out(endpoint, &data) {
                    TransferResult::Nak => Ok(false),
                    TransferResult::Stall => {
                        self.halt(slot_id, dci)?;
                        self.transfer_event(slot_id, dci, td.trbs[0], CC_STALL_ERROR, 0)?;
                        Ok(true)
                    }
                    TransferResult::Data(_) => {
                        self.report_td(slot_id, dci, &td.trbs, data.len())?;
                        Ok(true)
                    }
                }
            }
            _ => {
                vm_core::guest_error!("xhci: transfers on endpoint type {ep_type} unsupported");
                self.transfer_event(slot_id, dci, td.trbs[0], CC_TRB_ERROR, 0)?;
                Ok(true)
            }
        }
    }

    fn control_transfer(
        &mut self,
        slot_id: u8,
        dev: &mut dyn UsbDevice,
        td: &Td,
    ) -> Result<bool, Hse> {
        let setup_trb = td.trbs[0];
        let t = setup_trb.1;
        if t.trb_type() != TRB_SETUP_STAGE || !t.flag(TRB_IDT) || t.transfer_length() != 8 {
            vm_core::guest_error!("xhci: control TD does not start with a valid Setup TRB");
            self.transfer_event(slot_id, 1, setup_trb, CC_TRB_ERROR, 0)?;
            return Ok(true);
        }
        let setup = SetupPacket::from_bytes(t.parameter.to_le_bytes());
        let rest = &td.trbs[1..];
        let status_at = rest
            .iter()
            .position(|(_, t)| t.trb_type() == TRB_STATUS_STAGE)
            .unwrap_or(rest.len());
        let (data, status) = rest.split_at(status_at);
        let data_ok = data.iter().enumerate().all(|(i, (_, t))| {
            let ty = t.trb_type();
            (i == 0 && ty == TRB_DATA_STAGE) || (i > 0 && matches!(ty, TRB_NORMAL | TRB_EVENT_DATA))
        });
        let status_ok = status
            .iter()
            .skip(1)
            .all(|(_, t)| t.trb_type() == TRB_EVENT_DATA);
        if !data_ok || !status_ok || status.is_empty() {
            vm_core::guest_error!("xhci: malformed control TD");
            self.transfer_event(slot_id, 1, setup_trb, CC_TRB_ERROR, 0)?;
            return Ok(true);
        }
        let capacity = data
            .iter()
            .filter(|(_, t)| is_data_trb(t))
            .map(|(_, t)| t.transfer_length() as usize)
            .sum::<usize>();
        let wanted = capacity.min(usize::from(setup.length));
        let (result, moved) = if setup.is_in() {
            match dev.control(&setup, &[]) {
                ControlResult::Ok(mut v) => {
                    v.truncate(wanted);
                    self.scatter(data, &v)?;
                    (true, v.len())
                }
                ControlResult::Stall => (false, 0),
            }
        } else {
            let out = self.gather(data, wanted)?;
            let n = out.len();
            (dev.control(&setup, &out) != ControlResult::Stall, n)
        };
        if !result {
            self.halt(slot_id, 1)?;
            self.transfer_event(slot_id, 1, setup_trb, CC_STALL_ERROR, 0)?;
            return Ok(true);
        }
        self.report_td(slot_id, 1, &td.trbs[..1], 0)?;
        if !data.is_empty() {
            self.report_td(slot_id, 1, data, moved)?;
        }
        self.report_td(slot_id, 1, status, 0)?;
        Ok(true)
    }

    /// Copies IN data into the buffers of the data TRBs in order.
    fn scatter(&self, trbs: &[TdTrb], data: &[u8]) -> Result<(), Hse> {
        let mut off = 0usize;
        for (_, t) in trbs.iter().filter(|(_, t)| is_data_trb(t)) {
            if off >= data.len() {
                break;
            }
            let n = (t.transfer_length() as usize).min(data.len() - off);
            self.write_guest(t.parameter, &data[off..off + n])?;
            off += n;
        }
        Ok(())
    }

    /// Collects OUT data from the data TRBs, at most `max` bytes.
    fn gather(&self, trbs: &[TdTrb], max: usize) -> Result<Vec<u8>, Hse> {
        let mut out = Vec::new();
        for (_, t) in trbs.iter().filter(|(_, t)| is_data_trb(t)) {
            let room = max - out.len();
            if room == 0 {
                break;
            }
            let n = (t.transfer_length() as usize).min(room);
            if t.flag(TRB_IDT) {
                let imm = t.parameter.to_le_bytes();
                out.extend_from_slice(&imm[..n.min(8)]);
            } else {
                let start = out.len();
                out.resize(start + n, 0);
                self.read_guest(t.parameter, &mut out[start..])?;
            }
        }
        Ok(out)
    }

    /// Posts the Transfer Events of one TD that moved `moved` bytes.
    fn report_td(&mut self, slot_id: u8, dci: u8, trbs: &[TdTrb], moved: usize) -> Result<(), Hse> {
        let mut left = moved;
        let mut edtla: u32 = 0;
        let mut short = false;
        let last = trbs.len().saturating_sub(1);
        for (i, &(addr, t)) in trbs.iter().enumerate() {
            if t.trb_type() == TRB_EVENT_DATA {
                if t.flag(TRB_IOC) {
                    let code = if short { CC_SHORT_PACKET } else { CC_SUCCESS };
                    self.transfer_event(slot_id, dci, (addr, t), code, edtla)?;
                }
                edtla = 0;
                continue;
            }
            let len = if is_data_trb(&t) {
                t.transfer_length() as usize
            } else {
                0
            };
            let chunk = len.min(left);
            left -= chunk;
            edtla = edtla.wrapping_add(chunk as u32);
            let residual = (len - chunk) as u32;
            let first_short = residual > 0 && !short;
            short |= residual > 0;
            let report = t.flag(TRB_IOC)
                || (first_short && t.flag(TRB_ISP))
                || (short && i == last && t.flag(TRB_IOC));
            if report {
                let code = if short { CC_SHORT_PACKET } else { CC_SUCCESS };
                self.transfer_event(slot_id, dci, (addr, t), code, residual)?;
            }
        }
        Ok(())
    }
}
