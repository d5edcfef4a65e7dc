//! The command ring (XHCI 1.2 §4.6): slot and endpoint commands, executed
//! in order when the host rings doorbell 0, each answered by a Command
//! Completion Event on interrupter 0.

use vm_core::memory::{read_exact, write_all};

use super::context::*;
use super::regs::{CONFIG_MAX_SLOTS_EN, NUM_PORTS, NUM_SLOTS, PORTSC_CCS, PORTSC_PED};
use super::trb::*;
use super::{Hse, XhciState, COMMAND_BUDGET};

/// A command's outcome: completion code and the slot ID to report.
type Completion = (u8, u8);

impl XhciState {
    pub(crate) fn read_guest(&self, addr: u64, buf: &mut [u8]) -> Result<(), Hse> {
        if buf.is_empty() {
            return Ok(());
        }
        read_exact(&self.mem, addr, buf).map_err(|_| Hse)
    }

    pub(crate) fn write_guest(&self, addr: u64, buf: &[u8]) -> Result<(), Hse> {
        if buf.is_empty() {
            return Ok(());
        }
        write_all(&self.mem, addr, buf).map_err(|_| Hse)
    }

    fn output_addr(&self, slot_id: u8, offset: u64) -> Result<u64, Hse> {
        self.slots[usize::from(slot_id) - 1]
            .output_ctx
            .checked_add(offset)
            .ok_or(Hse)
    }

    /// Writes the slot state and address into the output slot context.
    pub(crate) fn write_slot_state(&self, slot_id: u8) -> Result<(), Hse> {
        let s = &self.slots[usize::from(slot_id) - 1];
        let addr = self.output_addr(slot_id, 12)?;
        let mut d = [0u8; 4];
        self.read_guest(addr, &mut d)?;
        let v = (u32::from_le_bytes(d) & 0x07ff_ff00)
            | (u32::from(s.state) << 27)
            | u32::from(s.address);
        self.write_guest(addr, &v.to_le_bytes())
    }

    /// Writes an endpoint's state and TR dequeue pointer into its output
    /// endpoint context.
    pub(crate) fn write_ep_state(&self, slot_id: u8, dci: u8) -> Result<(), Hse> {
        let s = &self.slots[usize::from(slot_id) - 1];
        let Some(ep) = s.endpoint(dci) else {
            return Ok(());
        };
        let base = self.output_addr(slot_id, CTX_SIZE * u64::from(dci))?;
        let mut d = [0u8; 4];
        self.read_guest(base, &mut d)?;
        let v = (u32::from_le_bytes(d) & !7) | u32::from(ep.state);
        self.write_guest(base, &v.to_le_bytes())?;
        let deq = ep.ring.dequeue | u64::from(ep.ring.cycle);
        self.write_guest(base.checked_add(8).ok_or(Hse)?, &deq.to_le_bytes())
    }

    /// Runs commands until the ring is empty or the budget is spent.
    pub(crate) fn process_commands(&mut self) {
        let mut budget = COMMAND_BUDGET;
        while self.running() && self.crr {
            let mut cursor = self.cmd_ring;
            let trb = match cursor.peek(&self.mem, &mut budget) {
                Ok(Some(t)) => t,
                Ok(None) | Err(RingError::Budget) => {
                    self.cmd_ring = cursor;
                    return;
                }
                Err(RingError::LinkLoop(a)) => {
                    vm_core::guest_error!("xhci: command ring Link TRB loop at {a:#x}");
                    self.cmd_ring = cursor;
                    return;
                }
                Err(RingError::Dma(a)) => {
                    vm_core::guest_error!("xhci: command ring at {a:#x} is not RAM");
                    self.host_system_error();
                    return;
                }
            };
            let addr = cursor.dequeue;
            let Ok((code, slot_id)) = self.execute_command(&trb) else {
                self.host_system_error();
                return;
            };
            cursor.advance(&mut budget);
            self.cmd_ring = cursor;
            let ev = Trb {
                parameter: addr,
                status: u32::from(code) << 24,
                control: (u32::from(slot_id) << 24) | (TRB_COMMAND_COMPLETION << 10),
            };
            if self.post_event(0, ev).is_err() {
                self.host_system_error();
                return;
            }
        }
    }

    /// The index of an enabled slot, or the completion code that refuses
    /// the command.
    fn enabled_slot(&self, slot_id: u8) -> Result<usize, u8> {
        if slot_id == 0 || usize::from(slot_id) > NUM_SLOTS {
            vm_core::guest_error!("xhci: command for slot {slot_id}");
            return Err(CC_TRB_ERROR);
        }
        let idx = usize::from(slot_id) - 1;
        if !self.slots[idx].enabled {
            return Err(CC_SLOT_NOT_ENABLED);
        }
        Ok(idx)
    }

    fn execute_command(&mut self, trb: &Trb) -> Result<Completion, Hse> {
        let slot_id = trb.slot_id();
        let ty = trb.trb_type();
        if ty == TRB_ENABLE_SLOT {
            return Ok(self.enable_slot());
        }
        if ty == TRB_NOOP_COMMAND {
            return Ok((CC_SUCCESS, 0));
        }
        let slot_cmd = matches!(
            ty,
            TRB_DISABLE_SLOT
                | TRB_ADDRESS_DEVICE
                | TRB_CONFIGURE_ENDPOINT
                | TRB_EVALUATE_CONTEXT
                | TRB_RESET_ENDPOINT
                | TRB_STOP_ENDPOINT
                | TRB_SET_TR_DEQUEUE
                | TRB_RESET_DEVICE
        );
        if !slot_cmd {
            vm_core::guest_error!("xhci: unsupported command TRB type {ty}");
            return Ok((CC_TRB_ERROR, 0));
        }
        let idx = match self.enabled_slot(slot_id) {
            Ok(i) => i,
            Err(code) => return Ok((code, slot_id)),
        };
        let code = match ty {
            TRB_DISABLE_SLOT => {
                self.slots[idx] = Slot::default();
                CC_SUCCESS
            }
            TRB_ADDRESS_DEVICE => self.address_device(slot_id, trb)?,
            TRB_CONFIGURE_ENDPOINT => self.configure_endpoint(slot_id, trb)?,
            TRB_EVALUATE_CONTEXT => self.evaluate_context(slot_id, trb)?,
            TRB_RESET_ENDPOINT | TRB_STOP_ENDPOINT | TRB_SET_TR_DEQUEUE => {
                self.endpoint_command(slot_id, trb)?
            }
            _ => self.reset_device(slot_id)?,
        };
        Ok((code, slot_id))
    }

    fn enable_slot(&mut self) -> Completion {
        let max = (self.config_reg & CONFIG_MAX_SLOTS_EN) as usize;
        let max = max.min(NUM_SLOTS);
        match self.slots[..max].iter().position(|s| !s.enabled) {
            Some(i) => {
                self.slots[i] = Slot {
                    enabled: true,
                    state: SLOT_ENABLED,
                    ..Slot::default()
                };
                (CC_SUCCESS, (i + 1) as u8)
            }
            None => (CC_NO_SLOTS_AVAILABLE, 0),
        }
    }

    fn address_device(&mut self, slot_id: u8, trb: &Trb) -> Result<u8, Hse> {
        let idx = usize::from(slot_id) - 1;
        let bsr = trb.flag(TRB_BSR);
        match self.slots[idx].state {
            SLOT_ENABLED => {}
            SLOT_DEFAULT if !bsr => {}
            _ => return Ok(CC_CONTEXT_STATE_ERROR),
        }
        let mut ictx = [0u8; 96];
        self.read_guest(trb.parameter & !0xf, &mut ictx)?;
        let (ctrl, rest) = ictx.split_at(32);
        let (slot_in, ep0_in) = rest.split_at(32);
        if dword(ctrl, 0) != 0 || dword(ctrl, 1) & 3 != 3 {
            vm_core::guest_error!("xhci: Address Device input flags wrong");
            return Ok(CC_PARAMETER_ERROR);
        }
        let port = ((dword(slot_in, 1) >> 16) & 0xff) as usize;
        if port == 0 || port > NUM_PORTS {
            vm_core::guest_error!("xhci: Address Device for port {port}");
            return Ok(CC_PARAMETER_ERROR);
        }
        let p = &self.ports[port - 1];
        if p.device.is_none() || p.portsc & PORTSC_CCS == 0 || p.portsc & PORTSC_PED == 0 {
            return Ok(CC_USB_TRANSACTION_ERROR);
        }
        if ep_ctx_type(ep0_in) != EP_TYPE_CONTROL {
            return Ok(CC_PARAMETER_ERROR);
        }
        let ring = ep_ctx_ring(ep0_in);
        let entry = self.dcbaap.checked_add(8 * u64::from(slot_id)).ok_or(Hse)?;
        let mut out = [0u8; 8];
        self.read_guest(entry, &mut out)?;
        let output_ctx = u64::from_le_bytes(out) & !0x3f;

        let (state, address) = if bsr {
            (SLOT_DEFAULT, 0)
        } else {
            // The controller's SET_ADDRESS: the device takes the slot ID.
            (SLOT_ADDRESSED, slot_id)
        };
        let mut slot_out = [0u8; 32];
        slot_out.copy_from_slice(slot_in);
        let d3 =
            (dword(&slot_out, 3) & 0x07ff_ff00) | (u32::from(state) << 27) | u32::from(address);
        set_dword(&mut slot_out, 3, d3);
        let mut ep0_out = [0u8; 32];
        ep0_out.copy_from_slice(ep0_in);
        set_dword(
            &mut ep0_out,
            0,
            (dword(ep0_in, 0) & !7) | u32::from(EP_RUNNING),
        );
        self.write_guest(output_ctx, &slot_out)?;
        self.write_guest(output_ctx.checked_add(CTX_SIZE).ok_or(Hse)?, &ep0_out)?;

        let s = &mut self.slots[idx];
        s.state = state;
        s.address = address;
        s.port = port as u8;
        s.output_ctx = output_ctx;
        s.eps = Default::default();
        s.eps[0] = Endpoint {
            state: EP_RUNNING,
            ep_type: EP_TYPE_CONTROL,
            ring,
        };
        Ok(CC_SUCCESS)
    }

    fn disable_endpoints_from_2(&mut self, slot_id: u8) -> Result<(), Hse> {
        let idx = usize::from(slot_id) - 1;
        for dci in 2..=NUM_DCI as u8 {
            let was = self.slots[idx].endpoint(dci).map(|e| e.state);
            if was.is_some_and(|s| s != EP_DISABLED) {
                if let Some(ep) = self.slots[idx].endpoint_mut(dci) {
                    *ep = Endpoint::default();
                }
                self.write_ep_state(slot_id, dci)?;
            }
        }
        Ok(())
    }

    fn configure_endpoint(&mut self, slot_id: u8, trb: &Trb) -> Result<u8, Hse> {
        let idx = usize::from(slot_id) - 1;
        if !matches!(self.slots[idx].state, SLOT_ADDRESSED | SLOT_CONFIGURED) {
            return Ok(CC_CONTEXT_STATE_ERROR);
        }
        if trb.flag(TRB_DC) {
            self.disable_endpoints_from_2(slot_id)?;
            self.slots[idx].state = SLOT_ADDRESSED;
            self.write_slot_state(slot_id)?;
            return Ok(CC_SUCCESS);
        }
        let mut ictx = vec![0u8; INPUT_CTX_SIZE];
        self.read_guest(trb.parameter & !0xf, &mut ictx)?;
        let drop = dword(&ictx, 0) & !3;
        let add = dword(&ictx, 1);
        let ep_in = |dci: u8| {
            let o = 32 * (usize::from(dci) + 1);
            &ictx[o..o + 32]
        };
        // Validate everything before changing anything.
        for dci in 2..=NUM_DCI as u8 {
            if add & (1 << dci) == 0 {
                continue;
            }
            let ctx = ep_in(dci);
            let ty = ep_ctx_type(ctx);
            if ty == 0 || ep_ctx_ring(ctx).dequeue == 0 {
                vm_core::guest_error!("xhci: Configure Endpoint: bad context for DCI {dci}");
                return Ok(CC_PARAMETER_ERROR);
            }
        }
        for dci in 2..=NUM_DCI as u8 {
            if drop & (1 << dci) != 0 {
                if let Some(ep) = self.slots[idx].endpoint_mut(dci) {
                    *ep = Endpoint::default();
                }
                self.write_ep_state(slot_id, dci)?;
            }
        }
        for dci in 2..=NUM_DCI as u8 {
            if add & (1 << dci) == 0 {
                continue;
            }
            let mut out = [0u8; 32];
            out.copy_from_slice(ep_in(dci));
            let d0 = (dword(&out, 0) & !7) | u32::from(EP_RUNNING);
            set_dword(&mut out, 0, d0);
            let addr = self.output_addr(slot_id, CTX_SIZE * u64::from(dci))?;
            self.write_guest(addr, &out)?;
            if let Some(ep) = self.slots[idx].endpoint_mut(dci) {
                *ep = Endpoint {
                    state: EP_RUNNING,
                    ep_type: ep_ctx_type(&out),
                    ring: ep_ctx_ring(&out),
                };
            }
        }
        if add & 1 != 0 {
            // Route string, speed, hub and Context Entries come from the
            // input slot context.
            let addr = self.output_addr(slot_id, 0)?;
            self.write_guest(addr, &dword(&ictx, 8).to_le_bytes())?;
        }
        let any = self.slots[idx].eps[1..]
            .iter()
            .any(|e| e.state != EP_DISABLED);
        self.slots[idx].state = if any { SLOT_CONFIGURED } else { SLOT_ADDRESSED };
        self.write_slot_state(slot_id)?;
        Ok(CC_SUCCESS)
    }

    fn evaluate_context(&mut self, slot_id: u8, trb: &Trb) -> Result<u8, Hse> {
        let idx = usize::from(slot_id) - 1;
        if self.slots[idx].state == SLOT_ENABLED {
            return Ok(CC_CONTEXT_STATE_ERROR);
        }
        let mut ictx = [0u8; 96];
        self.read_guest(trb.parameter & !0xf, &mut ictx)?;
        let add = dword(&ictx, 1);
        if add & 1 != 0 {
            // Max Exit Latency and Interrupter Target.
            let mut out = [0u8; 12];
            let base = self.output_addr(slot_id, 0)?;
            self.read_guest(base, &mut out)?;
            let d1 = (dword(&out, 1) & !0xffff) | (dword(&ictx, 9) & 0xffff);
            let d2 = (dword(&out, 2) & 0x003f_ffff) | (dword(&ictx, 10) & !0x003f_ffff);
            set_dword(&mut out, 1, d1);
            set_dword(&mut out, 2, d2);
            self.write_guest(base, &out)?;
        }
        if add & 2 != 0 {
            // EP0 Max Packet Size.
            let base = self.output_addr(slot_id, CTX_SIZE + 4)?;
            let mut d = [0u8; 4];
            self.read_guest(base, &mut d)?;
            let v = (u32::from_le_bytes(d) & 0xffff) | (dword(&ictx, 17) & 0xffff_0000);
            self.write_guest(base, &v.to_le_bytes())?;
        }
        Ok(CC_SUCCESS)
    }

    fn endpoint_command(&mut self, slot_id: u8, trb: &Trb) -> Result<u8, Hse> {
        let idx = usize::from(slot_id) - 1;
        let dci = trb.endpoint_id();
        if dci == 0 {
            vm_core::guest_error!("xhci: endpoint command for DCI 0");
            return Ok(CC_TRB_ERROR);
        }
        let Some(ep) = self.slots[idx].endpoint_mut(dci) else {
            return Ok(CC_TRB_ERROR);
        };
        if ep.state == EP_DISABLED {
            return Ok(CC_EP_NOT_ENABLED);
        }
        match trb.trb_type() {
            TRB_RESET_ENDPOINT => {
                if ep.state != EP_HALTED {
                    return Ok(CC_CONTEXT_STATE_ERROR);
                }
                ep.state = EP_STOPPED;
            }
            TRB_STOP_ENDPOINT => {
                if ep.state != EP_RUNNING {
                    return Ok(CC_CONTEXT_STATE_ERROR);
                }
                ep.state = EP_STOPPED;
            }
            _ => {
                if !matches!(ep.state, EP_STOPPED | EP_ERROR) {
                    return Ok(CC_CONTEXT_STATE_ERROR);
                }
                let ptr = trb.parameter & !0xf;
                if ptr == 0 {
                    return Ok(CC_PARAMETER_ERROR);
                }
                ep.ring = RingCursor::new(ptr, trb.parameter & 1 != 0);
                ep.state = EP_STOPPED;
            }
        }
        self.write_ep_state(slot_id, dci)?;
        Ok(CC_SUCCESS)
    }

    fn reset_device(&mut self, slot_id: u8) -> Result<u8, Hse> {
        let idx = usize::from(slot_id) - 1;
        if !matches!(
            self.slots[idx].state,
            SLOT_DEFAULT | SLOT_ADDRESSED | SLOT_CONFIGURED
        ) {
            return Ok(CC_CONTEXT_STATE_ERROR);
        }
        self.disable_endpoints_from_2(slot_id)?;
        let s = &mut self.slots[idx];
        s.state = SLOT_DEFAULT;
        s.address = 0;
        self.write_slot_state(slot_id)?;
        Ok(CC_SUCCESS)
    }
}
