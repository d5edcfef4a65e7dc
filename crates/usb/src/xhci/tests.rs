//! Driver-style tests: each test programs the controller through BAR 0 and
//! guest memory the way an XHCI driver does and checks what the guest
//! would see (registers, event rings, memory, the INTx line).

use std::sync::Arc;

use vm_core::memory::{create_guest_memory, read_exact, write_all};
use vm_core::{AccessWidth, GuestRam, TestIrq};

use super::context::*;
use super::regs::*;
use super::trb::*;
use super::*;
use crate::hid::InputEvent;

const RAM: u64 = 0x8000_0000;
const RAM_SIZE: usize = 0x10_0000;
/// Not RAM (where MMIO would live).
const MMIO: u64 = 0x1000_0000;

const DCBAA: u64 = RAM;
const CMD_RING: u64 = RAM + 0x1000;
const RING_TRBS: u64 = 64;
const ERST: u64 = RAM + 0x2000;
const EVENT_RING: u64 = RAM + 0x3000;
const INPUT_CTX: u64 = RAM + 0x8000;
const OUTPUT_CTX: u64 = RAM + 0x9000;
const XFER_RING: u64 = RAM + 0x1_0000;
const BUF: u64 = RAM + 0x4_0000;
const EV_INTRS: usize = 4;

fn trb(ty: u32, parameter: u64, status: u32, flags: u32) -> Trb {
    Trb {
        parameter,
        status,
        control: (ty << 10) | flags,
    }
}

struct Driver {
    x: Xhci,
    mem: GuestRam,
    irq: Arc<TestIrq>,
    cmd: (u64, bool),
    ev: [(u64, bool); EV_INTRS],
    ev_trbs: [u64; EV_INTRS],
    rings: std::collections::HashMap<(u8, u8), (u64, bool)>,
}

impl Driver {
    fn new(config: XhciConfig) -> Self {
        let mem = create_guest_memory(&[(RAM, RAM_SIZE)]).unwrap();
        let x = Xhci::with_hid_devices(mem.clone(), config);
        let irq = Arc::new(TestIrq::new());
        x.set_intx(irq.clone());
        // Memory space and bus master enable, as firmware sets them.
        x.command_written(0x0006);
        Self {
            x,
            mem,
            irq,
            cmd: (CMD_RING, true),
            ev: [(0, true); EV_INTRS],
            ev_trbs: [RING_TRBS; EV_INTRS],
            rings: Default::default(),
        }
    }

    fn r32(&self, off: u64) -> u32 {
        self.x.read_bar(0, off, AccessWidth::Word) as u32
    }

    fn w32(&self, off: u64, v: u32) {
        self.x.write_bar(0, off, AccessWidth::Word, u64::from(v));
    }

    fn w64(&self, off: u64, v: u64) {
        self.x.write_bar(0, off, AccessWidth::Double, v);
    }

    fn op(&self, reg: u64) -> u32 {
        self.r32(OP_BASE + reg)
    }

    fn set_op(&self, reg: u64, v: u32) {
        self.w32(OP_BASE + reg, v)
    }

    fn ir(i: usize, reg: u64) -> u64 {
        RUNTIME_BASE + RT_IR_BASE + IR_STRIDE * i as u64 + reg
    }

    fn portsc_off(port: usize) -> u64 {
        OP_BASE + OP_PORT_BASE + PORT_STRIDE * (port as u64 - 1)
    }

    fn put(&self, addr: u64, t: Trb) {
        write_all(&self.mem, addr, &t.to_bytes()).unwrap();
    }

    fn get(&self, addr: u64) -> Trb {
        let mut b = [0u8; 16];
        read_exact(&self.mem, addr, &mut b).unwrap();
        Trb::from_bytes(&b)
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        read_exact(&self.mem, addr, &mut v).unwrap();
        v
    }

    fn ev_ring(i: usize) -> u64 {
        EVENT_RING + 0x1000 * i as u64
    }

    /// Sets up interrupter `i` with a one-segment ring of `trbs` TRBs.
    fn setup_interrupter(&mut self, i: usize, trbs: u32) {
        let base = Self::ev_ring(i);
        let erst = ERST + 0x40 * i as u64;
        let mut e = [0u8; 16];
        e[0..8].copy_from_slice(&base.to_le_bytes());
        e[8..12].copy_from_slice(&trbs.to_le_bytes());
        write_all(&self.mem, erst, &e).unwrap();
        write_all(&self.mem, base, &vec![0u8; 16 * trbs as usize]).unwrap();
        self.w32(Self::ir(i, IR_ERSTSZ), 1);
        self.w64(Self::ir(i, IR_ERDP_LO), base);
        self.w64(Self::ir(i, IR_ERSTBA_LO), erst);
        self.w32(Self::ir(i, IR_IMOD), 0);
        self.w32(Self::ir(i, IR_IMAN), IMAN_IE);
        self.ev[i] = (base, true);
        self.ev_trbs[i] = u64::from(trbs);
    }

    /// Reset, program DCBAAP/CRCR/ERSTs, run.
    fn bring_up(&mut self) {
        self.set_op(OP_USBCMD, USBCMD_HCRST);
        assert_eq!(self.op(OP_USBSTS) & USBSTS_CNR, 0);
        assert_ne!(self.op(OP_USBSTS) & USBSTS_HCH, 0);
        self.set_op(OP_CONFIG, NUM_SLOTS as u32);
        write_all(&self.mem, DCBAA, &[0u8; 8 * 65]).unwrap();
        self.w64(OP_BASE + OP_DCBAAP_LO, DCBAA);
        write_all(&self.mem, CMD_RING, &[0u8; 16 * RING_TRBS as usize]).unwrap();
        self.put(
            CMD_RING + 16 * (RING_TRBS - 1),
            trb(TRB_LINK, CMD_RING, 0, TRB_TC),
        );
        self.w64(OP_BASE + OP_CRCR_LO, CMD_RING | CRCR_RCS);
        for i in 0..EV_INTRS {
            self.setup_interrupter(i, RING_TRBS as u32);
        }
        self.set_op(OP_USBCMD, USBCMD_RS | USBCMD_INTE);
        assert_eq!(self.op(OP_USBSTS) & USBSTS_HCH, 0);
    }

    /// Next event of interrupter `i`, consuming it (ERDP with EHB clear).
    fn pop_event(&mut self, i: usize) -> Option<Trb> {
        let (deq, cycle) = self.ev[i];
        let t = self.get(deq);
        if t.cycle() != cycle {
            return None;
        }
        let base = Self::ev_ring(i);
        let mut next = deq + 16;
        let mut c = cycle;
        if next == base + 16 * self.ev_trbs[i] {
            next = base;
            c = !c;
        }
        self.ev[i] = (next, c);
        self.w64(Self::ir(i, IR_ERDP_LO), next | ERDP_EHB);
        Some(t)
    }

    /// Acknowledges interrupter `i` (IMAN.IP is write-1-to-clear).
    fn ack(&self, i: usize) {
        self.w32(Self::ir(i, IR_IMAN), IMAN_IP | IMAN_IE);
    }

    fn push_cmd(&mut self, t: Trb) -> u64 {
        let (enq, cycle) = self.cmd;
        let mut t = t;
        t.control = (t.control & !TRB_CYCLE) | u32::from(cycle);
        self.put(enq, t);
        let mut next = enq + 16;
        if next == CMD_RING + 16 * (RING_TRBS - 1) {
            self.put(next, trb(TRB_LINK, CMD_RING, 0, TRB_TC | u32::from(cycle)));
            next = CMD_RING;
            self.cmd.1 = !cycle;
        }
        self.cmd.0 = next;
        enq
    }

    /// Runs one command; returns (completion code, slot ID).
    fn command(&mut self, t: Trb) -> (u8, u8) {
        let addr = self.push_cmd(t);
        self.w32(DOORBELL_BASE, 0);
        let ev = self.pop_event(0).expect("command completion event");
        assert_eq!(ev.trb_type(), TRB_COMMAND_COMPLETION);
        assert_eq!(ev.parameter, addr);
        ((ev.status >> 24) as u8, ev.slot_id())
    }

    fn reset_port(&mut self, port: usize) {
        let off = Self::portsc_off(port);
        self.w32(off, PORTSC_PP | PORTSC_PR);
        let sc = self.r32(off);
        assert_ne!(sc & PORTSC_PED, 0, "port {port} enabled after reset");
        assert_ne!(sc & PORTSC_PRC, 0);
        let ev = self.pop_event(0).expect("port status change event");
        assert_eq!(ev.trb_type(), TRB_PORT_STATUS_CHANGE);
        assert_eq!(ev.parameter >> 24, port as u64);
        self.w32(off, PORTSC_PP | PORTSC_CHANGE);
        assert_eq!(self.r32(off) & PORTSC_CHANGE, 0);
    }

    fn out_ctx(slot: u8) -> u64 {
        OUTPUT_CTX + 0x400 * u64::from(slot - 1)
    }

    fn ring_base(slot: u8, dci: u8) -> u64 {
        XFER_RING + 0x1000 * (u64::from(slot) * 4 + u64::from(dci.min(3)))
    }

    fn new_ring(&mut self, slot: u8, dci: u8) -> u64 {
        let base = Self::ring_base(slot, dci);
        write_all(&self.mem, base, &[0u8; 16 * RING_TRBS as usize]).unwrap();
        self.put(base + 16 * (RING_TRBS - 1), trb(TRB_LINK, base, 0, TRB_TC));
        self.rings.insert((slot, dci), (base, true));
        base
    }

    fn push_xfer(&mut self, slot: u8, dci: u8, t: Trb) -> u64 {
        let base = Self::ring_base(slot, dci);
        let (enq, cycle) = self.rings[&(slot, dci)];
        let mut t = t;
        t.control = (t.control & !TRB_CYCLE) | u32::from(cycle);
        self.put(enq, t);
        let mut next = (enq + 16, cycle);
        if next.0 == base + 16 * (RING_TRBS - 1) {
            self.put(next.0, trb(TRB_LINK, base, 0, TRB_TC | u32::from(cycle)));
            next = (base, !cycle);
        }
        self.rings.insert((slot, dci), next);
        enq
    }

    fn enable_slot(&mut self) -> u8 {
        let (code, slot) = self.command(trb(TRB_ENABLE_SLOT, 0, 0, 0));
        assert_eq!(code, CC_SUCCESS);
        assert_ne!(slot, 0);
        slot
    }

    fn address_device(&mut self, slot: u8, port: usize, bsr: bool) -> u8 {
        let ring = self.new_ring(slot, 1);
        let mut ictx = vec![0u8; INPUT_CTX_SIZE];
        set_dword(&mut ictx, 1, 0b11);
        set_dword(&mut ictx, 8, (1 << 27) | (1 << 20));
        set_dword(&mut ictx, 9, (port as u32) << 16);
        set_dword(
            &mut ictx,
            17,
            (3 << 1) | (u32::from(EP_TYPE_CONTROL) << 3) | (8 << 16),
        );
        set_dword(&mut ictx, 18, ring as u32 | 1);
        set_dword(&mut ictx, 19, (ring >> 32) as u32);
        set_dword(&mut ictx, 20, 8);
        write_all(&self.mem, INPUT_CTX, &ictx).unwrap();
        write_all(&self.mem, Self::out_ctx(slot), &[0u8; 0x400]).unwrap();
        write_all(
            &self.mem,
            DCBAA + 8 * u64::from(slot),
            &Self::out_ctx(slot).to_le_bytes(),
        )
        .unwrap();
        let flags = (u32::from(slot) << 24) | if bsr { TRB_BSR } else { 0 };
        self.command(trb(TRB_ADDRESS_DEVICE, INPUT_CTX, 0, flags)).0
    }

    fn slot_state(&self, slot: u8) -> u32 {
        dword(&self.read(Self::out_ctx(slot), 32), 3) >> 27
    }

    fn ep_state(&self, slot: u8, dci: u8) -> u32 {
        dword(&self.read(Self::out_ctx(slot) + 32 * u64::from(dci), 32), 0) & 7
    }

    /// A control transfer; returns the transfer events it produced and the
    /// IN data.
    fn control(
        &mut self,
        slot: u8,
        setup: [u8; 8],
        data_out: Option<&[u8]>,
    ) -> (Vec<Trb>, Vec<u8>) {
        let s = crate::hid::SetupPacket::from_bytes(setup);
        let len = u32::from(s.length);
        let trt = match (len, s.is_in()) {
            (0, _) => 0,
            (_, false) => 2,
            (_, true) => 3,
        };
        self.push_xfer(
            slot,
            1,
            trb(
                TRB_SETUP_STAGE,
                u64::from_le_bytes(setup),
                8,
                TRB_IDT | (trt << 16),
            ),
        );
        if len > 0 {
            if let Some(d) = data_out {
                write_all(&self.mem, BUF, d).unwrap();
            } else {
                write_all(&self.mem, BUF, &vec![0u8; len as usize]).unwrap();
            }
            let dir = if s.is_in() { TRB_DIR_IN | TRB_ISP } else { 0 };
            self.push_xfer(slot, 1, trb(TRB_DATA_STAGE, BUF, len, dir));
        }
        let status_dir = if len > 0 && s.is_in() { 0 } else { TRB_DIR_IN };
        self.push_xfer(slot, 1, trb(TRB_STATUS_STAGE, 0, 0, TRB_IOC | status_dir));
        self.w32(DOORBELL_BASE + 4 * u64::from(slot), 1);
        let mut events = Vec::new();
        while let Some(e) = self.pop_event(0) {
            events.push(e);
        }
        let data = if s.is_in() {
            self.read(BUF, len as usize)
        } else {
            Vec::new()
        };
        (events, data)
    }

    /// Configures EP 1 IN (DCI 3) as an interrupt endpoint.
    fn configure_interrupt_in(&mut self, slot: u8, mps: u32) {
        let ring = self.new_ring(slot, 3);
        let mut ictx = vec![0u8; INPUT_CTX_SIZE];
        set_dword(&mut ictx, 1, 1 | (1 << 3));
        set_dword(&mut ictx, 8, (3 << 27) | (1 << 20));
        let e = 8 * (3 + 1);
        set_dword(&mut ictx, e, 7 << 16);
        set_dword(
            &mut ictx,
            e + 1,
            (3 << 1) | (u32::from(EP_TYPE_INT_IN) << 3) | (mps << 16),
        );
        set_dword(&mut ictx, e + 2, ring as u32 | 1);
        set_dword(&mut ictx, e + 3, (ring >> 32) as u32);
        set_dword(&mut ictx, e + 4, mps | (mps << 16));
        write_all(&self.mem, INPUT_CTX, &ictx).unwrap();
        let (code, _) = self.command(trb(
            TRB_CONFIGURE_ENDPOINT,
            INPUT_CTX,
            0,
            u32::from(slot) << 24,
        ));
        assert_eq!(code, CC_SUCCESS);
        assert_eq!(self.slot_state(slot), u32::from(SLOT_CONFIGURED));
        assert_eq!(self.ep_state(slot, 3), u32::from(EP_RUNNING));
    }

    /// Port reset, Enable Slot, Address Device, SET_CONFIGURATION 1 and the
    /// interrupt endpoint: a ready HID device.
    fn ready_device(&mut self, port: usize, mps: u32) -> u8 {
        self.reset_port(port);
        let slot = self.enable_slot();
        assert_eq!(self.address_device(slot, port, false), CC_SUCCESS);
        let (ev, _) = self.control(slot, [0, 9, 1, 0, 0, 0, 0, 0], None);
        assert_eq!(ev.len(), 1);
        assert_eq!((ev[0].status >> 24) as u8, CC_SUCCESS);
        self.configure_interrupt_in(slot, mps);
        slot
    }
}

fn is_transfer_event(e: &Trb, slot: u8, dci: u8, code: u8) -> bool {
    e.trb_type() == TRB_TRANSFER_EVENT
        && e.slot_id() == slot
        && e.endpoint_id() == dci
        && (e.status >> 24) as u8 == code
}

#[test]
fn capability_registers_and_pci_identity_match_qemu_xhci() {
    let d = Driver::new(XhciConfig::default());
    assert_eq!(d.r32(0), 0x0100_0040);
    assert_eq!(d.x.read_bar(0, 0, AccessWidth::Byte), 0x40);
    assert_eq!(
        d.x.read_bar(0, 2, AccessWidth::Half),
        0x0100,
        "HCIVERSION alone"
    );
    assert_eq!(d.r32(CAP_HCSPARAMS1), 0x0800_1040);
    assert_eq!(d.r32(CAP_HCSPARAMS1) >> 8 & 0x7ff, 16, "16 interrupters");
    assert_eq!(d.r32(CAP_HCSPARAMS2), 0x0000_000f);
    assert_eq!(d.r32(CAP_HCSPARAMS3), 0);
    assert_eq!(d.r32(CAP_HCCPARAMS1), 0x0008_0001);
    assert_eq!(d.r32(CAP_DBOFF), 0x2000);
    assert_eq!(d.r32(CAP_RTSOFF), 0x1000);
    // Supported Protocol capabilities: USB 2 ports 5-8, USB 3 ports 1-4.
    assert_eq!(d.r32(0x20), 0x0200_0402);
    assert_eq!(d.r32(0x24), u32::from_le_bytes(*b"USB "));
    assert_eq!(d.r32(0x28), 0x0000_0405);
    assert_eq!(d.r32(0x30), 0x0300_0002);
    assert_eq!(d.r32(0x38), 0x0000_0401);
    assert_eq!(d.op(OP_PAGESIZE), 1);
    assert_eq!(d.x.ids(), (0x1b36, 0x000d, 0x1af4, 0x1100));
    assert_eq!(d.x.class_and_revision(), (0x0c0330, 1));
    let bars = d.x.bars();
    assert_eq!(bars.len(), 1);
    assert_eq!(
        (bars[0].index, bars[0].size, bars[0].kind),
        (0, 0x4000, BarKind::Memory64)
    );
    assert_eq!(d.x.read_config(0x60, AccessWidth::Half), 0x2030);
    assert_eq!(d.x.capabilities_pointer(), 0, "no MSI/MSI-X (§7.5)");
}

#[test]
fn ports_show_the_keyboard_and_tablet_at_high_speed() {
    let d = Driver::new(XhciConfig::default());
    for port in 1..=NUM_PORTS {
        let sc = d.r32(Driver::portsc_off(port));
        assert_ne!(sc & PORTSC_PP, 0);
        let connected = port == KEYBOARD_PORT || port == TABLET_PORT;
        assert_eq!(sc & PORTSC_CCS != 0, connected, "port {port}");
        if connected {
            assert_eq!(
                (sc & PORTSC_SPEED_MASK) >> PORTSC_SPEED_SHIFT,
                3,
                "high speed"
            );
            assert_ne!(sc & PORTSC_CSC, 0);
            assert_eq!(sc & PORTSC_PED, 0, "USB 2 ports wait for a reset");
        }
    }
    // A reset on an empty port does nothing.
    d.w32(Driver::portsc_off(1), PORTSC_PP | PORTSC_PR);
    assert_eq!(d.r32(Driver::portsc_off(1)) & (PORTSC_PED | PORTSC_PRC), 0);
}

#[test]
fn keyboard_bring_up_descriptor_and_key_press() {
    let mut d = Driver::new(XhciConfig::default());
    d.bring_up();
    assert!(d.irq.is_asserted() || d.pop_event(0).is_none());
    d.reset_port(KEYBOARD_PORT);
    let slot = d.enable_slot();
    assert_eq!(slot, 1);
    assert_eq!(d.address_device(slot, KEYBOARD_PORT, false), CC_SUCCESS);
    assert_eq!(d.slot_state(slot), u32::from(SLOT_ADDRESSED));
    assert_eq!(
        dword(&d.read(Driver::out_ctx(slot), 32), 3) & 0xff,
        u32::from(slot)
    );
    assert_eq!(d.ep_state(slot, 1), u32::from(EP_RUNNING));

    // GET_DESCRIPTOR(Device), 18 bytes.
    let (ev, data) = d.control(slot, [0x80, 6, 0, 1, 0, 0, 18, 0], None);
    assert_eq!(ev.len(), 1, "only the Status stage has IOC");
    assert!(is_transfer_event(&ev[0], slot, 1, CC_SUCCESS));
    assert_eq!(data[0..2], [18, 1]);
    assert_eq!(
        data[8..12],
        [0x27, 0x06, 0x01, 0x00],
        "vendor 0x0627, product 0x0001"
    );

    // The configuration descriptor is 34 bytes: a 255-byte request is short.
    let (ev, data) = d.control(slot, [0x80, 6, 0, 2, 0, 0, 255, 0], None);
    assert_eq!(ev.len(), 2);
    assert!(is_transfer_event(&ev[0], slot, 1, CC_SHORT_PACKET));
    assert_eq!(ev[0].status & 0xff_ffff, 255 - 34, "residual");
    assert!(is_transfer_event(&ev[1], slot, 1, CC_SUCCESS));
    assert_eq!(data[9 + 5..9 + 8], [3, 1, 1]);

    // SET_CONFIGURATION and the interrupt endpoint.
    let (ev, _) = d.control(slot, [0, 9, 1, 0, 0, 0, 0, 0], None);
    assert!(is_transfer_event(&ev[0], slot, 1, CC_SUCCESS));
    d.configure_interrupt_in(slot, 8);

    // Queue an 8-byte IN TD; nothing to report yet.
    write_all(&d.mem, BUF + 0x100, &[0xee; 8]).unwrap();
    let td = d.push_xfer(slot, 3, trb(TRB_NORMAL, BUF + 0x100, 8, TRB_IOC | TRB_ISP));
    d.w32(DOORBELL_BASE + 4 * u64::from(slot), 3);
    assert_eq!(d.pop_event(0), None);
    d.ack(0);
    assert!(!d.irq.is_asserted());

    // A key press from the host completes it.
    let sink = d.x.input_sink();
    assert!(sink.send(InputEvent::Key {
        usage: 0x04,
        pressed: true
    }));
    assert!(d.irq.is_asserted(), "INTx follows interrupter 0");
    assert_ne!(d.r32(Driver::ir(0, IR_IMAN)) & IMAN_IP, 0);
    assert_ne!(d.op(OP_USBSTS) & USBSTS_EINT, 0);
    assert_eq!(d.read(BUF + 0x100, 8), [0, 0, 0x04, 0, 0, 0, 0, 0]);
    let ev = d.pop_event(0).expect("transfer event");
    assert!(is_transfer_event(&ev, slot, 3, CC_SUCCESS));
    assert_eq!(ev.parameter, td);
    assert_eq!(ev.status & 0xff_ffff, 0);
    d.ack(0);
    assert!(!d.irq.is_asserted());

    // The release waits in the device until the guest queues the next TD.
    sink.send(InputEvent::Key {
        usage: 0x04,
        pressed: false,
    });
    assert_eq!(d.pop_event(0), None);
    d.push_xfer(slot, 3, trb(TRB_NORMAL, BUF + 0x100, 8, TRB_IOC | TRB_ISP));
    d.w32(DOORBELL_BASE + 4 * u64::from(slot), 3);
    assert_eq!(d.read(BUF + 0x100, 8), [0; 8]);
    assert!(is_transfer_event(
        &d.pop_event(0).unwrap(),
        slot,
        3,
        CC_SUCCESS
    ));
}

#[test]
fn tablet_reports_absolute_coordinates() {
    let mut d = Driver::new(XhciConfig::default());
    d.bring_up();
    let slot = d.ready_device(TABLET_PORT, 6);
    let (ev, rd) = d.control(slot, [0x81, 6, 0, 0x22, 0, 0, 74, 0], None);
    assert!(is_transfer_event(&ev[0], slot, 1, CC_SUCCESS));
    assert_eq!(rd, crate::hid::tablet::TABLET_REPORT_DESCRIPTOR.to_vec());

    d.push_xfer(slot, 3, trb(TRB_NORMAL, BUF + 0x200, 6, TRB_IOC | TRB_ISP));
    d.w32(DOORBELL_BASE + 4 * u64::from(slot), 3);
    let sink = d.x.input_sink();
    assert!(sink.send(InputEvent::PointerAbs { x: 16384, y: 32767 }));
    assert_eq!(d.read(BUF + 0x200, 6), [0, 0x00, 0x40, 0xff, 0x7f, 0]);
    let ev = d.pop_event(0).unwrap();
    assert!(is_transfer_event(&ev, slot, 3, CC_SUCCESS));

    // An 8-byte TD for a 6-byte report is a short packet.
    d.push_xfer(slot, 3, trb(TRB_NORMAL, BUF + 0x200, 8, TRB_IOC | TRB_ISP));
    d.w32(DOORBELL_BASE + 4 * u64::from(slot), 3);
    sink.send(InputEvent::Buttons(1));
    let ev = d.pop_event(0).unwrap();
    assert!(is_transfer_event(&ev, slot, 3, CC_SHORT_PACKET));
    assert_eq!(ev.status & 0xff_ffff, 2);
    assert_eq!(d.read(BUF + 0x200, 6), [1, 0x00, 0x40, 0xff, 0x7f, 0]);
}

fn interrupter_2_event(config: XhciConfig) -> (Driver, u8) {
    let mut d = Driver::new(config);
    d.bring_up();
    let slot = d.ready_device(KEYBOARD_PORT, 8);
    d.ack(0);
    assert!(!d.irq.is_asserted());
    // A TD whose completion targets interrupter 2, as macOS queues them.
    d.push_xfer(slot, 3, trb(TRB_NORMAL, BUF, 8 | (2 << 22), TRB_IOC));
    d.w32(DOORBELL_BASE + 4 * u64::from(slot), 3);
    d.x.input_sink().send(InputEvent::Key {
        usage: 0x05,
        pressed: true,
    });
    (d, slot)
}

#[test]
fn conditional_intr_mapping_on_routes_to_ring_0_and_asserts_intx() {
    let (mut d, slot) = interrupter_2_event(XhciConfig::default());
    assert!(d.irq.is_asserted());
    let ev = d.pop_event(0).expect("event on ring 0");
    assert!(is_transfer_event(&ev, slot, 3, CC_SUCCESS));
    assert_eq!(d.pop_event(2), None);
    assert_eq!(d.r32(Driver::ir(2, IR_IMAN)) & IMAN_IP, 0);
}

#[test]
fn conditional_intr_mapping_off_routes_to_ring_2_and_intx_stays_low() {
    let (mut d, slot) = interrupter_2_event(XhciConfig {
        conditional_intr_mapping: false,
    });
    assert!(!d.irq.is_asserted(), "only interrupter 0 drives the pin");
    assert_eq!(d.pop_event(0), None);
    assert_ne!(d.r32(Driver::ir(2, IR_IMAN)) & IMAN_IP, 0);
    let ev = d.pop_event(2).expect("event on ring 2");
    assert!(is_transfer_event(&ev, slot, 3, CC_SUCCESS));
}

#[derive(Default)]
struct Messages(std::sync::Mutex<Vec<(u64, u32)>>);

impl pci::MsiSink for Messages {
    fn send(&self, address: u64, data: u32) {
        self.0.lock().unwrap().push((address, data));
    }
}

#[test]
fn with_msix_enabled_events_reach_their_interrupter_and_its_vector() {
    let messages = Arc::new(Messages::default());
    let mut d = Driver::new(XhciConfig::default());
    d.x = Xhci::with_hid_devices(d.mem.clone(), XhciConfig::default()).with_msix(messages.clone());
    d.x.set_intx(d.irq.clone());
    d.x.command_written(0x0006);
    // The capability, then MSI-X on with every interrupter's vector
    // unmasked, vector n = (0x1fff_0040, 0xa0 + n).
    let cap = u16::from(d.x.capabilities_pointer());
    assert_eq!(
        d.x.read_config(cap, AccessWidth::Word) & 0xff,
        0x11,
        "MSI-X"
    );
    assert_eq!(
        d.x.read_config(cap + 2, AccessWidth::Half),
        15,
        "16 vectors"
    );
    for n in 0..NUM_INTRS as u64 {
        let entry = MSIX_TABLE_OFFSET + 16 * n;
        d.w64(entry, 0x1fff_0040);
        d.w32(entry + 8, 0xa0 + n as u32);
        d.w32(entry + 12, 0);
    }
    d.x.write_config(cap + 2, AccessWidth::Half, 0x8000);
    d.bring_up();
    let slot = d.ready_device(KEYBOARD_PORT, 8);
    d.ack(0);
    messages.0.lock().unwrap().clear();
    d.push_xfer(slot, 3, trb(TRB_NORMAL, BUF, 8 | (2 << 22), TRB_IOC));
    d.w32(DOORBELL_BASE + 4 * u64::from(slot), 3);
    d.x.input_sink().send(InputEvent::Key {
        usage: 0x05,
        pressed: true,
    });
    assert!(!d.irq.is_asserted(), "no INTx with MSI-X");
    assert_eq!(*messages.0.lock().unwrap(), vec![(0x1fff_0040, 0xa2)]);
    assert_eq!(
        d.r32(Driver::ir(2, IR_IMAN)) & IMAN_IP,
        0,
        "IP clears with the message"
    );
    assert_eq!(d.pop_event(0), None);
    let ev = d.pop_event(2).expect("event on ring 2");
    assert!(is_transfer_event(&ev, slot, 3, CC_SUCCESS));
    // MSI-X off again: the quirk routes to ring 0 and INTx is back.
    d.x.write_config(cap + 2, AccessWidth::Half, 0);
    d.push_xfer(slot, 3, trb(TRB_NORMAL, BUF, 8 | (2 << 22), TRB_IOC));
    d.w32(DOORBELL_BASE + 4 * u64::from(slot), 3);
    d.x.input_sink().send(InputEvent::Key {
        usage: 0x05,
        pressed: false,
    });
    assert!(d.irq.is_asserted());
    assert!(d.pop_event(0).is_some());
    assert_eq!(messages.0.lock().unwrap().len(), 1);
}

#[test]
fn stall_halts_ep0_until_reset_endpoint_and_set_tr_dequeue() {
    let mut d = Driver::new(XhciConfig::default());
    d.bring_up();
    let slot = d.ready_device(KEYBOARD_PORT, 8);
    let (ev, _) = d.control(slot, [0x80, 6, 0, 0x09, 0, 0, 8, 0], None);
    assert_eq!(ev.len(), 1);
    assert!(is_transfer_event(&ev[0], slot, 1, CC_STALL_ERROR));
    assert_eq!(d.ep_state(slot, 1), u32::from(EP_HALTED));
    // While halted the doorbell does nothing.
    let (ev, _) = d.control(slot, [0x80, 0, 0, 0, 0, 0, 2, 0], None);
    assert!(ev.is_empty());
    let stop = trb(TRB_STOP_ENDPOINT, 0, 0, (u32::from(slot) << 24) | (1 << 16));
    assert_eq!(d.command(stop).0, CC_CONTEXT_STATE_ERROR);
    let reset = trb(
        TRB_RESET_ENDPOINT,
        0,
        0,
        (u32::from(slot) << 24) | (1 << 16),
    );
    assert_eq!(d.command(reset), (CC_SUCCESS, slot));
    assert_eq!(d.ep_state(slot, 1), u32::from(EP_STOPPED));
    let ring = d.new_ring(slot, 1);
    let deq = trb(
        TRB_SET_TR_DEQUEUE,
        ring | 1,
        0,
        (u32::from(slot) << 24) | (1 << 16),
    );
    assert_eq!(d.command(deq), (CC_SUCCESS, slot));
    let (ev, data) = d.control(slot, [0x80, 0, 0, 0, 0, 0, 2, 0], None);
    assert!(is_transfer_event(&ev[0], slot, 1, CC_SUCCESS));
    assert_eq!(data, [0, 0]);
    assert_eq!(d.ep_state(slot, 1), u32::from(EP_RUNNING));
}

#[test]
fn slot_commands_check_slot_ids_and_states() {
    let mut d = Driver::new(XhciConfig::default());
    d.bring_up();
    for id in [0u8, 65, 200] {
        let t = trb(TRB_DISABLE_SLOT, 0, 0, u32::from(id) << 24);
        assert_eq!(d.command(t).0, CC_TRB_ERROR, "slot {id}");
    }
    let t = trb(TRB_DISABLE_SLOT, 0, 0, 5 << 24);
    assert_eq!(d.command(t), (CC_SLOT_NOT_ENABLED, 5));
    assert_eq!(
        d.address_device(3, KEYBOARD_PORT, false),
        CC_SLOT_NOT_ENABLED
    );
    let t = trb(TRB_CONFIGURE_ENDPOINT, INPUT_CTX, 0, 7 << 24);
    assert_eq!(d.command(t).0, CC_SLOT_NOT_ENABLED);

    let slot = d.enable_slot();
    // Configure before Address Device is a context state error.
    let t = trb(TRB_CONFIGURE_ENDPOINT, INPUT_CTX, 0, u32::from(slot) << 24);
    assert_eq!(d.command(t).0, CC_CONTEXT_STATE_ERROR);
    // The port is not enabled yet: the device does not answer.
    assert_eq!(
        d.address_device(slot, KEYBOARD_PORT, false),
        CC_USB_TRANSACTION_ERROR
    );
    // A port with nothing on it, or no port at all.
    assert_eq!(d.address_device(slot, 1, false), CC_USB_TRANSACTION_ERROR);
    assert_eq!(d.address_device(slot, 0, false), CC_PARAMETER_ERROR);
    assert_eq!(d.address_device(slot, 99, false), CC_PARAMETER_ERROR);
    d.reset_port(KEYBOARD_PORT);
    // BSR=1 leaves the slot Default; a second Address Device addresses it.
    assert_eq!(d.address_device(slot, KEYBOARD_PORT, true), CC_SUCCESS);
    assert_eq!(d.slot_state(slot), u32::from(SLOT_DEFAULT));
    assert_eq!(d.address_device(slot, KEYBOARD_PORT, false), CC_SUCCESS);
    assert_eq!(d.slot_state(slot), u32::from(SLOT_ADDRESSED));
    assert_eq!(
        d.address_device(slot, KEYBOARD_PORT, false),
        CC_CONTEXT_STATE_ERROR
    );
    // Evaluate Context and Reset Device work on an addressed slot.
    let mut ictx = vec![0u8; 96];
    set_dword(&mut ictx, 1, 0b10);
    set_dword(&mut ictx, 17, 64 << 16);
    write_all(&d.mem, INPUT_CTX, &ictx).unwrap();
    let t = trb(TRB_EVALUATE_CONTEXT, INPUT_CTX, 0, u32::from(slot) << 24);
    assert_eq!(d.command(t).0, CC_SUCCESS);
    assert_eq!(dword(&d.read(Driver::out_ctx(slot) + 32, 32), 1) >> 16, 64);
    let t = trb(TRB_RESET_DEVICE, 0, 0, u32::from(slot) << 24);
    assert_eq!(d.command(t).0, CC_SUCCESS);
    assert_eq!(d.slot_state(slot), u32::from(SLOT_DEFAULT));
    let t = trb(TRB_DISABLE_SLOT, 0, 0, u32::from(slot) << 24);
    assert_eq!(d.command(t).0, CC_SUCCESS);
    let t = trb(TRB_RESET_DEVICE, 0, 0, u32::from(slot) << 24);
    assert_eq!(d.command(t).0, CC_SLOT_NOT_ENABLED);
    // No Op and an unknown command type.
    assert_eq!(d.command(trb(TRB_NOOP_COMMAND, 0, 0, 0)), (CC_SUCCESS, 0));
    assert_eq!(d.command(trb(50, 0, 0, 0)).0, CC_TRB_ERROR);
}

#[test]
fn max_slots_enabled_bounds_enable_slot() {
    let mut d = Driver::new(XhciConfig::default());
    d.bring_up();
    d.set_op(OP_CONFIG, 2);
    assert_eq!(d.enable_slot(), 1);
    assert_eq!(d.enable_slot(), 2);
    assert_eq!(
        d.command(trb(TRB_ENABLE_SLOT, 0, 0, 0)),
        (CC_NO_SLOTS_AVAILABLE, 0)
    );
}

#[test]
fn command_ring_link_loop_is_stopped() {
    let mut d = Driver::new(XhciConfig::default());
    d.bring_up();
    // Two Link TRBs pointing at each other, both owned by the controller.
    d.put(CMD_RING, trb(TRB_LINK, CMD_RING + 16, 0, TRB_CYCLE));
    d.put(CMD_RING + 16, trb(TRB_LINK, CMD_RING, 0, TRB_CYCLE));
    d.w32(DOORBELL_BASE, 0);
    assert_eq!(d.pop_event(0), None);
    assert_eq!(
        d.op(OP_USBSTS) & (USBSTS_HSE | USBSTS_HCH),
        0,
        "still running"
    );
    // Same with toggling links: the cycle state flips forever.
    d.put(CMD_RING + 16, trb(TRB_LINK, CMD_RING, 0, TRB_TC));
    d.put(
        CMD_RING,
        trb(TRB_LINK, CMD_RING + 16, 0, TRB_TC | TRB_CYCLE),
    );
    d.w32(DOORBELL_BASE, 0);
    assert_eq!(d.pop_event(0), None);
}

#[test]
fn transfer_ring_link_loop_and_endless_noops_are_bounded() {
    let mut d = Driver::new(XhciConfig::default());
    d.bring_up();
    let slot = d.ready_device(KEYBOARD_PORT, 8);
    let base = Driver::ring_base(slot, 3);
    // Every TRB of the interrupt ring is a No Op owned by the controller,
    // and the Link at the end does not toggle: an endless ring.
    for i in 0..RING_TRBS - 1 {
        d.put(base + 16 * i, trb(TRB_NOOP, 0, 0, TRB_CYCLE));
    }
    d.put(
        base + 16 * (RING_TRBS - 1),
        trb(TRB_LINK, base, 0, TRB_CYCLE),
    );
    d.w32(DOORBELL_BASE + 4 * u64::from(slot), 3);
    assert_eq!(d.op(OP_USBSTS) & USBSTS_HSE, 0);
    // EP0 ring made of links only.
    let ep0 = Driver::ring_base(slot, 1);
    d.put(ep0, trb(TRB_LINK, ep0 + 16, 0, TRB_CYCLE));
    d.put(ep0 + 16, trb(TRB_LINK, ep0, 0, TRB_CYCLE));
    let stop = trb(TRB_STOP_ENDPOINT, 0, 0, (u32::from(slot) << 24) | (1 << 16));
    assert_eq!(d.command(stop).0, CC_SUCCESS);
    let deq = trb(
        TRB_SET_TR_DEQUEUE,
        ep0 | 1,
        0,
        (u32::from(slot) << 24) | (1 << 16),
    );
    assert_eq!(d.command(deq).0, CC_SUCCESS);
    d.w32(DOORBELL_BASE + 4 * u64::from(slot), 1);
    assert_eq!(d.op(OP_USBSTS) & USBSTS_HSE, 0);
}

#[test]
fn command_ring_outside_ram_is_a_host_system_error() {
    for ring in [MMIO, RAM + RAM_SIZE as u64, !0x3f] {
        let mut d = Driver::new(XhciConfig::default());
        d.bring_up();
        d.set_op(OP_USBCMD, 0);
        d.w64(OP_BASE + OP_CRCR_LO, ring | CRCR_RCS);
        d.set_op(OP_USBCMD, USBCMD_RS | USBCMD_INTE | USBCMD_HSEE);
        d.w32(DOORBELL_BASE, 0);
        let sts = d.op(OP_USBSTS);
        assert_ne!(sts & USBSTS_HSE, 0, "ring at {ring:#x}");
        assert_ne!(sts & USBSTS_HCH, 0, "controller halted");
        assert!(!d.irq.is_asserted(), "HSE is not an INTx source");
        assert_eq!(d.pop_event(0), None);
    }
}

#[test]
fn transfer_ring_outside_ram_is_a_host_system_error() {
    let mut d = Driver::new(XhciConfig::default());
    d.bring_up();
    let slot = d.ready_device(KEYBOARD_PORT, 8);
    let stop = trb(TRB_STOP_ENDPOINT, 0, 0, (u32::from(slot) << 24) | (3 << 16));
    assert_eq!(d.command(stop).0, CC_SUCCESS);
    let deq = trb(
        TRB_SET_TR_DEQUEUE,
        MMIO | 1,
        0,
        (u32::from(slot) << 24) | (3 << 16),
    );
    assert_eq!(d.command(deq).0, CC_SUCCESS);
    d.w32(DOORBELL_BASE + 4 * u64::from(slot), 3);
    assert_ne!(d.op(OP_USBSTS) & USBSTS_HSE, 0);
    // A data buffer outside RAM too (fresh controller).
    let mut d = Driver::new(XhciConfig::default());
    d.bring_up();
    let slot = d.ready_device(KEYBOARD_PORT, 8);
    d.push_xfer(slot, 3, trb(TRB_NORMAL, u64::MAX - 3, 8, TRB_IOC));
    d.w32(DOORBELL_BASE + 4 * u64::from(slot), 3);
    d.x.input_sink().send(InputEvent::Key {
        usage: 4,
        pressed: true,
    });
    assert_ne!(d.op(OP_USBSTS) & USBSTS_HSE, 0);
}

#[test]
fn context_pointers_outside_ram_are_host_system_errors() {
    // Input context outside RAM.
    let mut d = Driver::new(XhciConfig::default());
    d.bring_up();
    d.reset_port(KEYBOARD_PORT);
    let slot = d.enable_slot();
    d.push_cmd(trb(TRB_ADDRESS_DEVICE, MMIO, 0, u32::from(slot) << 24));
    d.w32(DOORBELL_BASE, 0);
    assert_ne!(d.op(OP_USBSTS) & USBSTS_HSE, 0);
    assert_eq!(d.pop_event(0), None);

    // Output context (from the DCBAA) outside RAM.
    let mut d = Driver::new(XhciConfig::default());
    d.bring_up();
    d.reset_port(KEYBOARD_PORT);
    let slot = d.enable_slot();
    d.address_device(slot, KEYBOARD_PORT, false);
    let mut d = Driver::new(XhciConfig::default());
    d.bring_up();
    d.reset_port(KEYBOARD_PORT);
    let slot = d.enable_slot();
    let mut ictx = vec![0u8; 96];
    set_dword(&mut ictx, 1, 0b11);
    set_dword(&mut ictx, 9, (KEYBOARD_PORT as u32) << 16);
    set_dword(&mut ictx, 17, u32::from(EP_TYPE_CONTROL) << 3);
    set_dword(&mut ictx, 18, XFER_RING as u32 | 1);
    write_all(&d.mem, INPUT_CTX, &ictx).unwrap();
    write_all(
        &d.mem,
        DCBAA + 8 * u64::from(slot),
        &(u64::MAX - 0x3f).to_le_bytes(),
    )
    .unwrap();
    d.push_cmd(trb(TRB_ADDRESS_DEVICE, INPUT_CTX, 0, u32::from(slot) << 24));
    d.w32(DOORBELL_BASE, 0);
    assert_ne!(d.op(OP_USBSTS) & USBSTS_HSE, 0);

    // DCBAAP itself outside RAM.
    let mut d = Driver::new(XhciConfig::default());
    d.bring_up();
    d.reset_port(KEYBOARD_PORT);
    let slot = d.enable_slot();
    write_all(&d.mem, INPUT_CTX, &ictx).unwrap();
    d.set_op(OP_USBCMD, 0);
    d.w64(OP_BASE + OP_DCBAAP_LO, DCBAAP_PTR_MASK);
    d.set_op(OP_USBCMD, USBCMD_RS | USBCMD_INTE);
    d.w32(DOORBELL_BASE, 0);
    d.push_cmd(trb(TRB_ADDRESS_DEVICE, INPUT_CTX, 0, u32::from(slot) << 24));
    d.w32(DOORBELL_BASE, 0);
    assert_ne!(d.op(OP_USBSTS) & USBSTS_HSE, 0);
}

#[test]
fn event_ring_size_zero_or_huge_takes_no_events() {
    for erstsz in [0u32, 0xffff, MAX_ERST_ENTRIES + 1] {
        let mut d = Driver::new(XhciConfig::default());
        d.bring_up();
        d.ack(0);
        d.w32(Driver::ir(0, IR_ERSTSZ), erstsz);
        d.push_cmd(trb(TRB_NOOP_COMMAND, 0, 0, 0));
        d.w32(DOORBELL_BASE, 0);
        assert_eq!(d.pop_event(0), None, "ERSTSZ {erstsz}");
        assert!(!d.irq.is_asserted());
        assert_eq!(d.op(OP_USBSTS) & USBSTS_HSE, 0);
    }
    // A segment of 0 or 0xffff TRBs likewise.
    for size in [0u32, 8, 0xffff] {
        let mut d = Driver::new(XhciConfig::default());
        d.bring_up();
        d.ack(0);
        write_all(&d.mem, ERST + 8, &size.to_le_bytes()).unwrap();
        d.w64(Driver::ir(0, IR_ERSTBA_LO), ERST);
        d.push_cmd(trb(TRB_NOOP_COMMAND, 0, 0, 0));
        d.w32(DOORBELL_BASE, 0);
        assert_eq!(d.pop_event(0), None, "segment of {size}");
        assert!(!d.irq.is_asserted());
    }
    // A segment table outside RAM is a host system error.
    let mut d = Driver::new(XhciConfig::default());
    d.bring_up();
    d.w64(Driver::ir(0, IR_ERSTBA_LO), MMIO);
    d.push_cmd(trb(TRB_NOOP_COMMAND, 0, 0, 0));
    d.w32(DOORBELL_BASE, 0);
    assert_ne!(d.op(OP_USBSTS) & USBSTS_HSE, 0);
}

#[test]
fn full_event_ring_gets_an_event_ring_full_error_and_nothing_is_overwritten() {
    let mut d = Driver::new(XhciConfig::default());
    d.bring_up();
    d.setup_interrupter(0, 16);
    for _ in 0..20 {
        d.push_cmd(trb(TRB_NOOP_COMMAND, 0, 0, 0));
    }
    d.w32(DOORBELL_BASE, 0);
    let base = Driver::ev_ring(0);
    for i in 0..14 {
        let e = d.get(base + 16 * i);
        assert_eq!(e.trb_type(), TRB_COMMAND_COMPLETION, "slot {i}");
        assert!(e.cycle());
    }
    let full = d.get(base + 16 * 14);
    assert_eq!(full.trb_type(), TRB_HOST_CONTROLLER_EVENT);
    assert_eq!((full.status >> 24) as u8, CC_EVENT_RING_FULL);
    assert!(!d.get(base + 16 * 15).cycle(), "one slot stays empty");
    // An ERDP write that consumes nothing keeps the ring full.
    d.w64(Driver::ir(0, IR_ERDP_LO), base | ERDP_EHB);
    d.push_cmd(trb(TRB_NOOP_COMMAND, 0, 0, 0));
    d.w32(DOORBELL_BASE, 0);
    assert!(!d.get(base + 16 * 15).cycle());
    assert_eq!(d.get(base).parameter, CMD_RING, "oldest event intact");
    // After the guest consumes, events flow again (wrapping, cycle 0).
    for _ in 0..15 {
        d.pop_event(0).unwrap();
    }
    assert_eq!(d.pop_event(0), None);
    assert_eq!(d.command(trb(TRB_NOOP_COMMAND, 0, 0, 0)).0, CC_SUCCESS);
    assert!(d.get(base + 16 * 15).cycle());
    assert_eq!(d.command(trb(TRB_NOOP_COMMAND, 0, 0, 0)).0, CC_SUCCESS);
    assert!(!d.get(base).cycle());
}

#[test]
fn doorbells_for_disabled_slots_and_endpoints_do_nothing() {
    let mut d = Driver::new(XhciConfig::default());
    d.bring_up();
    d.ack(0);
    for (db, target) in [(1u64, 1u32), (64, 1), (5, 3), (1, 0), (1, 32), (0, 5)] {
        d.w32(DOORBELL_BASE + 4 * db, target);
    }
    let slot = d.ready_device(KEYBOARD_PORT, 8);
    d.ack(0);
    // DCI 5 was never configured.
    d.w32(DOORBELL_BASE + 4 * u64::from(slot), 5);
    assert_eq!(d.pop_event(0), None);
    assert!(!d.irq.is_asserted());
    assert_eq!(d.op(OP_USBSTS) & USBSTS_HSE, 0);
}

#[test]
fn event_handler_busy_holds_the_next_interrupt_until_erdp() {
    let mut d = Driver::new(XhciConfig::default());
    d.bring_up();
    d.push_cmd(trb(TRB_NOOP_COMMAND, 0, 0, 0));
    d.w32(DOORBELL_BASE, 0);
    assert!(d.irq.is_asserted());
    assert_ne!(d.r32(Driver::ir(0, IR_ERDP_LO)) & ERDP_EHB as u32, 0);
    // The handler clears IP but has not written ERDP yet.
    d.ack(0);
    d.push_cmd(trb(TRB_NOOP_COMMAND, 0, 0, 0));
    d.w32(DOORBELL_BASE, 0);
    assert!(!d.irq.is_asserted(), "EHB still set");
    // Consuming only the first event leaves one: the interrupt comes back.
    d.pop_event(0).unwrap();
    assert!(d.irq.is_asserted());
    d.ack(0);
    d.pop_event(0).unwrap();
    assert!(!d.irq.is_asserted());
}

#[test]
fn moderation_delays_the_second_interrupt() {
    let mut d = Driver::new(XhciConfig::default());
    d.bring_up();
    // 20 ms between interrupts.
    d.w32(Driver::ir(0, IR_IMOD), 80_000 & 0xffff);
    let interval = std::time::Duration::from_nanos(250 * u64::from(80_000u32 & 0xffff));
    d.push_cmd(trb(TRB_NOOP_COMMAND, 0, 0, 0));
    d.w32(DOORBELL_BASE, 0);
    assert!(d.irq.is_asserted());
    let first = std::time::Instant::now();
    d.ack(0);
    d.pop_event(0).unwrap();
    d.push_cmd(trb(TRB_NOOP_COMMAND, 0, 0, 0));
    d.w32(DOORBELL_BASE, 0);
    if first.elapsed() < interval / 2 {
        assert!(!d.irq.is_asserted(), "held back by IMOD");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !d.irq.is_asserted() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert!(d.irq.is_asserted(), "the moderation timer fires");
    assert!(first.elapsed() >= interval);
}

#[test]
fn command_abort_stops_the_ring_with_an_event() {
    let mut d = Driver::new(XhciConfig::default());
    d.bring_up();
    assert_eq!(d.command(trb(TRB_NOOP_COMMAND, 0, 0, 0)).0, CC_SUCCESS);
    assert_ne!(d.op(OP_CRCR_LO) & CRCR_CRR as u32, 0);
    d.set_op(OP_CRCR_LO, CRCR_CA as u32);
    assert_eq!(d.op(OP_CRCR_LO) & CRCR_CRR as u32, 0);
    let ev = d.pop_event(0).unwrap();
    assert_eq!((ev.status >> 24) as u8, CC_COMMAND_RING_STOPPED);
    assert_eq!(ev.parameter, d.cmd.0);
}

#[test]
fn usbcmd_run_stop_and_hcrst() {
    let mut d = Driver::new(XhciConfig::default());
    d.bring_up();
    let slot = d.enable_slot();
    assert_eq!(slot, 1);
    d.set_op(OP_USBCMD, 0);
    assert_ne!(d.op(OP_USBSTS) & USBSTS_HCH, 0);
    // Doorbells are ignored while halted.
    d.push_cmd(trb(TRB_NOOP_COMMAND, 0, 0, 0));
    d.w32(DOORBELL_BASE, 0);
    assert_eq!(d.pop_event(0), None);
    d.set_op(OP_USBCMD, USBCMD_HCRST);
    assert_eq!(d.op(OP_CONFIG), 0);
    assert_eq!(d.r32(Driver::ir(0, IR_IMOD)), IMOD_RESET);
    assert_eq!(d.r32(Driver::ir(0, IR_ERSTSZ)), 0);
    assert!(!d.irq.is_asserted());
    // After a fresh bring-up, slot 1 is free again.
    d.cmd = (CMD_RING, true);
    d.bring_up();
    assert_eq!(d.enable_slot(), 1);
}

#[test]
fn every_bar_offset_and_width_is_safe() {
    let mut d = Driver::new(XhciConfig::default());
    let widths = [
        AccessWidth::Byte,
        AccessWidth::Half,
        AccessWidth::Word,
        AccessWidth::Double,
    ];
    for off in 0..BAR_SIZE + 16 {
        for w in widths {
            d.x.read_bar(0, off, w);
            d.x.read_bar(1, off, w);
        }
    }
    d.x.read_bar(0, u64::MAX, AccessWidth::Double);
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for pass in 0..2 {
        d.bring_up();
        for off in 0..BAR_SIZE + 16 {
            for w in widths {
                let v = if pass == 0 { rand() } else { u64::MAX };
                d.x.write_bar(0, off, w, v);
                d.x.write_bar(2, off, w, v);
            }
        }
    }
    d.x.write_bar(0, u64::MAX - 2, AccessWidth::Double, 0);
    for off in 0..0x200u16 {
        d.x.read_config(off, AccessWidth::Word);
        d.x.write_config(off, AccessWidth::Word, u32::MAX);
    }
    // The controller still works after all that.
    d.x.reset();
    d.x.command_written(0x0006);
    d.cmd = (CMD_RING, true);
    d.bring_up();
    assert_eq!(d.command(trb(TRB_NOOP_COMMAND, 0, 0, 0)).0, CC_SUCCESS);
}

#[test]
fn suspended_port_resumes_on_input_with_remote_wakeup() {
    let mut d = Driver::new(XhciConfig::default());
    d.bring_up();
    let slot = d.ready_device(KEYBOARD_PORT, 8);
    // SET_FEATURE(DEVICE_REMOTE_WAKEUP).
    let (ev, _) = d.control(slot, [0, 3, 1, 0, 0, 0, 0, 0], None);
    assert!(is_transfer_event(&ev[0], slot, 1, CC_SUCCESS));
    let off = Driver::portsc_off(KEYBOARD_PORT);
    d.w32(off, PORTSC_PP | PORTSC_LWS | (PLS_U3 << PORTSC_PLS_SHIFT));
    assert_eq!((d.r32(off) & PORTSC_PLS_MASK) >> PORTSC_PLS_SHIFT, PLS_U3);
    d.x.input_sink().send(InputEvent::Key {
        usage: 4,
        pressed: true,
    });
    let sc = d.r32(off);
    assert_eq!((sc & PORTSC_PLS_MASK) >> PORTSC_PLS_SHIFT, PLS_RESUME);
    assert_ne!(sc & PORTSC_PLC, 0);
    let ev = d.pop_event(0).unwrap();
    assert_eq!(ev.trb_type(), TRB_PORT_STATUS_CHANGE);
}

#[test]
fn input_sink_outlives_nothing() {
    fn usable_from_any_thread<T: Clone + Send + Sync>() {}
    usable_from_any_thread::<InputSink>();
    let d = Driver::new(XhciConfig::default());
    let sink = d.x.input_sink();
    let clone = sink.clone();
    std::thread::spawn(move || {
        clone.send(InputEvent::Wheel(1));
    })
    .join()
    .unwrap();
    drop(d);
    assert!(!sink.send(InputEvent::Buttons(1)), "controller gone");
}

#[test]
fn keyboard_leds_through_a_control_out_data_stage() {
    let mut d = Driver::new(XhciConfig::default());
    d.bring_up();
    let slot = d.ready_device(KEYBOARD_PORT, 8);
    // SET_REPORT(Output, 0), one byte: Caps Lock.
    let (ev, _) = d.control(slot, [0x21, 9, 0, 2, 0, 0, 1, 0], Some(&[0x02]));
    assert_eq!(ev.len(), 1);
    assert!(is_transfer_event(&ev[0], slot, 1, CC_SUCCESS));
    let (ev, data) = d.control(slot, [0xa1, 1, 0, 2, 0, 0, 1, 0], None);
    assert!(is_transfer_event(&ev[0], slot, 1, CC_SUCCESS));
    assert_eq!(data, [0x02]);
    // The same with the data inside the TRB (IDT).
    let setup = [0x21, 9, 0, 2, 0, 0, 1, 0];
    d.push_xfer(
        slot,
        1,
        trb(
            TRB_SETUP_STAGE,
            u64::from_le_bytes(setup),
            8,
            TRB_IDT | (2 << 16),
        ),
    );
    d.push_xfer(slot, 1, trb(TRB_DATA_STAGE, 0x05, 1, TRB_IDT));
    d.push_xfer(slot, 1, trb(TRB_STATUS_STAGE, 0, 0, TRB_IOC | TRB_DIR_IN));
    d.w32(DOORBELL_BASE + 4 * u64::from(slot), 1);
    assert!(is_transfer_event(
        &d.pop_event(0).unwrap(),
        slot,
        1,
        CC_SUCCESS
    ));
    let (_, data) = d.control(slot, [0xa1, 1, 0, 2, 0, 0, 1, 0], None);
    assert_eq!(data, [0x05]);
}

#[test]
fn chained_td_with_event_data_scatters_and_reports_the_total() {
    let mut d = Driver::new(XhciConfig::default());
    d.bring_up();
    let slot = d.ready_device(KEYBOARD_PORT, 8);
    d.push_xfer(slot, 3, trb(TRB_NORMAL, BUF, 4, TRB_CH));
    d.push_xfer(slot, 3, trb(TRB_NORMAL, BUF + 0x40, 4, TRB_CH));
    d.push_xfer(slot, 3, trb(TRB_EVENT_DATA, 0xdead_beef_0000, 0, TRB_IOC));
    d.w32(DOORBELL_BASE + 4 * u64::from(slot), 3);
    for usage in [0xe0, 0x04, 0x05] {
        d.x.input_sink().send(InputEvent::Key {
            usage,
            pressed: true,
        });
    }
    assert_eq!(d.read(BUF, 4), [0x01, 0, 0, 0]);
    assert_eq!(d.read(BUF + 0x40, 4), [0, 0, 0, 0]);
    let ev = d.pop_event(0).unwrap();
    assert!(is_transfer_event(&ev, slot, 3, CC_SUCCESS));
    assert_ne!(ev.control & TRB_ED, 0, "Event Data event");
    assert_eq!(ev.parameter, 0xdead_beef_0000);
    assert_eq!(ev.status & 0xff_ffff, 8, "EDTLA");
    assert_eq!(d.pop_event(0), None);

    // A chained TD that comes up short: 4 + 8 bytes of room, 8 arrive.
    d.push_xfer(slot, 3, trb(TRB_NORMAL, BUF, 4, TRB_CH | TRB_ISP));
    d.push_xfer(slot, 3, trb(TRB_NORMAL, BUF + 0x40, 8, TRB_IOC | TRB_ISP));
    d.w32(DOORBELL_BASE + 4 * u64::from(slot), 3);
    assert_eq!(d.read(BUF, 4), [0x01, 0, 0x04, 0]);
    assert_eq!(d.read(BUF + 0x40, 4), [0, 0, 0, 0]);
    let ev = d.pop_event(0).unwrap();
    assert!(is_transfer_event(&ev, slot, 3, CC_SHORT_PACKET));
    assert_eq!(ev.status & 0xff_ffff, 4, "residual of the last TRB");
    // The third queued report (0x05 added) is next.
    d.push_xfer(slot, 3, trb(TRB_NORMAL, BUF, 8, TRB_IOC));
    d.w32(DOORBELL_BASE + 4 * u64::from(slot), 3);
    assert_eq!(d.read(BUF, 8), [0x01, 0, 0x04, 0x05, 0, 0, 0, 0]);
}

#[test]
fn wrong_trb_types_get_trb_errors() {
    let mut d = Driver::new(XhciConfig::default());
    d.bring_up();
    let slot = d.ready_device(KEYBOARD_PORT, 8);
    // A Status stage with no Setup on EP0.
    let t = d.push_xfer(slot, 1, trb(TRB_NORMAL, BUF, 8, TRB_IOC));
    d.w32(DOORBELL_BASE + 4 * u64::from(slot), 1);
    let ev = d.pop_event(0).unwrap();
    assert!(is_transfer_event(&ev, slot, 1, CC_TRB_ERROR));
    assert_eq!(ev.parameter, t);
    // A Setup stage on the interrupt ring, and an IN TRB with IDT.
    d.push_xfer(slot, 3, trb(TRB_SETUP_STAGE, 0, 8, TRB_IDT | TRB_IOC));
    d.push_xfer(slot, 3, trb(TRB_NORMAL, 0, 8, TRB_IDT | TRB_IOC));
    d.w32(DOORBELL_BASE + 4 * u64::from(slot), 3);
    assert!(is_transfer_event(
        &d.pop_event(0).unwrap(),
        slot,
        3,
        CC_TRB_ERROR
    ));
    assert!(is_transfer_event(
        &d.pop_event(0).unwrap(),
        slot,
        3,
        CC_TRB_ERROR
    ));
    // A TD that never ends (every TRB chained, the ring looping without a
    // cycle toggle) is cut at MAX_TD_TRBS with a TRB Error.
    let base = Driver::ring_base(slot, 3);
    for i in 0..RING_TRBS - 1 {
        d.put(base + 16 * i, trb(TRB_NORMAL, BUF, 1, TRB_CH | TRB_CYCLE));
    }
    d.put(
        base + 16 * (RING_TRBS - 1),
        trb(TRB_LINK, base, 0, TRB_CYCLE),
    );
    let stop = trb(TRB_STOP_ENDPOINT, 0, 0, (u32::from(slot) << 24) | (3 << 16));
    assert_eq!(d.command(stop).0, CC_SUCCESS);
    let deq = trb(
        TRB_SET_TR_DEQUEUE,
        base | 1,
        0,
        (u32::from(slot) << 24) | (3 << 16),
    );
    assert_eq!(d.command(deq).0, CC_SUCCESS);
    d.w32(DOORBELL_BASE + 4 * u64::from(slot), 3);
    let ev = d.pop_event(0).unwrap();
    assert!(is_transfer_event(&ev, slot, 3, CC_TRB_ERROR), "{ev:?}");
    assert_eq!(d.op(OP_USBSTS) & USBSTS_HSE, 0);
}

#[test]
fn no_dma_without_bus_mastering() {
    let mut d = Driver::new(XhciConfig::default());
    d.bring_up();
    d.x.command_written(0x0002);
    d.push_cmd(trb(TRB_NOOP_COMMAND, 0, 0, 0));
    d.w32(DOORBELL_BASE, 0);
    assert_eq!(d.pop_event(0), None);
    assert!(!d.irq.is_asserted());
    d.x.command_written(0x0006);
    d.w32(DOORBELL_BASE, 0);
    let ev = d.pop_event(0).unwrap();
    assert_eq!((ev.status >> 24) as u8, CC_SUCCESS);
}

#[test]
fn event_ring_follows_several_segments() {
    let mut d = Driver::new(XhciConfig::default());
    d.bring_up();
    // Two 16-TRB segments: ring 0's own buffer and ring 3's.
    let (a, b) = (Driver::ev_ring(0), Driver::ev_ring(3));
    let mut e = [0u8; 32];
    e[0..8].copy_from_slice(&a.to_le_bytes());
    e[8..12].copy_from_slice(&16u32.to_le_bytes());
    e[16..24].copy_from_slice(&b.to_le_bytes());
    e[24..28].copy_from_slice(&16u32.to_le_bytes());
    write_all(&d.mem, ERST, &e).unwrap();
    write_all(&d.mem, a, &[0u8; 256]).unwrap();
    write_all(&d.mem, b, &[0u8; 256]).unwrap();
    d.w32(Driver::ir(0, IR_ERSTSZ), 2);
    d.w64(Driver::ir(0, IR_ERDP_LO), a);
    d.w64(Driver::ir(0, IR_ERSTBA_LO), ERST);
    for _ in 0..20 {
        d.push_cmd(trb(TRB_NOOP_COMMAND, 0, 0, 0));
    }
    d.w32(DOORBELL_BASE, 0);
    for i in 0..16 {
        assert_eq!(d.get(a + 16 * i).trb_type(), TRB_COMMAND_COMPLETION);
    }
    for i in 0..4 {
        let t = d.get(b + 16 * i);
        assert_eq!(t.trb_type(), TRB_COMMAND_COMPLETION, "second segment {i}");
        assert!(t.cycle());
    }
    assert!(!d.get(b + 16 * 4).cycle());
}

#[test]
fn intx_needs_ip_ie_and_inte() {
    let mut d = Driver::new(XhciConfig::default());
    d.bring_up();
    d.w32(Driver::ir(0, IR_IMAN), 0);
    d.push_cmd(trb(TRB_NOOP_COMMAND, 0, 0, 0));
    d.w32(DOORBELL_BASE, 0);
    assert_ne!(d.r32(Driver::ir(0, IR_IMAN)) & IMAN_IP, 0, "IP without IE");
    assert!(!d.irq.is_asserted());
    d.w32(Driver::ir(0, IR_IMAN), IMAN_IE);
    assert!(d.irq.is_asserted());
    d.set_op(OP_USBCMD, USBCMD_RS);
    assert!(!d.irq.is_asserted(), "INTE clear");
    d.set_op(OP_USBCMD, USBCMD_RS | USBCMD_INTE);
    assert!(d.irq.is_asserted());
    d.ack(0);
    assert!(!d.irq.is_asserted());
    assert_eq!(d.irq.rising_edges(), 2);
}

#[test]
fn a_restored_controller_delivers_input_that_waited_during_the_save() {
    let mut d = Driver::new(XhciConfig::default());
    d.bring_up();
    let slot = d.ready_device(TABLET_PORT, 6);
    d.push_xfer(slot, 3, trb(TRB_NORMAL, BUF + 0x200, 6, TRB_IOC | TRB_ISP));
    d.w32(DOORBELL_BASE + 4 * u64::from(slot), 3);
    // The save: input arriving while quiesced waits in the tablet.
    d.x.quiesce();
    assert!(d
        .x
        .input_sink()
        .send(InputEvent::PointerAbs { x: 100, y: 200 }));
    assert!(d.pop_event(0).is_none(), "nothing reaches guest memory");
    let saved = d.x.save_state().unwrap();

    // A new controller on the same memory (as a restore maps it).
    let x = Xhci::with_hid_devices(d.mem.clone(), XhciConfig::default());
    x.set_intx(d.irq.clone());
    x.restore_state(&saved).unwrap();
    d.x = x;
    let ev = d.pop_event(0).expect("the waiting report completes its TD");
    assert!(is_transfer_event(&ev, slot, 3, CC_SUCCESS));
    assert_eq!(d.read(BUF + 0x200, 6), [0, 100, 0, 200, 0, 0]);
    // It runs on: the next TD and input, the next event on the ring.
    d.push_xfer(slot, 3, trb(TRB_NORMAL, BUF + 0x200, 6, TRB_IOC | TRB_ISP));
    d.w32(DOORBELL_BASE + 4 * u64::from(slot), 3);
    assert!(d.x.input_sink().send(InputEvent::Buttons(1)));
    let ev = d.pop_event(0).unwrap();
    assert!(is_transfer_event(&ev, slot, 3, CC_SUCCESS));
    assert_eq!(d.read(BUF + 0x200, 6), [1, 100, 0, 200, 0, 0]);
}

#[test]
fn a_hostile_saved_controller_is_refused_and_changes_nothing() {
    use crate::hid::SavedDevice;
    let mut d = Driver::new(XhciConfig::default());
    d.bring_up();
    d.ready_device(KEYBOARD_PORT, 8);
    let good = d.x.save_state().unwrap();
    type Damage = Box<dyn Fn(&mut SavedXhci)>;
    fn keyboard(s: &mut SavedXhci) -> &mut SavedDevice {
        s.ports[KEYBOARD_PORT - 1].device.as_mut().unwrap()
    }
    let damaged: Vec<(&str, Damage)> = vec![
        (
            "a port missing",
            Box::new(|s| {
                s.ports.pop();
            }),
        ),
        (
            "a slot too many",
            Box::new(|s| s.slots.push(s.slots[0].clone())),
        ),
        (
            "reset bit in USBCMD",
            Box::new(|s| s.usbcmd |= USBCMD_HCRST),
        ),
        ("running and halted", Box::new(|s| s.usbsts |= USBSTS_HCH)),
        ("slot on port 99", Box::new(|s| s.slots[0].port = 99)),
        ("slot state 7", Box::new(|s| s.slots[0].state = 7)),
        (
            "endpoint state 9",
            Box::new(|s| s.slots[0].endpoints[2].state = 9),
        ),
        (
            "30 endpoints",
            Box::new(|s| {
                s.slots[0].endpoints.pop();
            }),
        ),
        (
            "producer past its segment",
            Box::new(|s| {
                let i = &mut s.interrupters[0];
                i.enq_index = i.segment.unwrap().1;
            }),
        ),
        (
            "a segment of 8 TRBs",
            Box::new(|s| s.interrupters[0].segment = Some((EVENT_RING, 8))),
        ),
        (
            "producer in entry 40",
            Box::new(|s| s.interrupters[0].seg_index = 40),
        ),
        (
            "no device on the keyboard's port",
            Box::new(|s| s.ports[KEYBOARD_PORT - 1].device = None),
        ),
        (
            "a device on an empty port",
            Box::new(|s| s.ports[0].device = s.ports[KEYBOARD_PORT - 1].device.clone()),
        ),
        (
            "a key down twice",
            Box::new(|s| {
                if let SavedDevice::Keyboard { keys, .. } = keyboard(s) {
                    *keys = vec![4, 4];
                }
            }),
        ),
        (
            "17 queued reports",
            Box::new(|s| {
                if let SavedDevice::Keyboard { hid, .. } = keyboard(s) {
                    hid.queue = vec![vec![0; 8]; 17];
                }
            }),
        ),
        (
            "a short report",
            Box::new(|s| {
                if let SavedDevice::Keyboard { hid, .. } = keyboard(s) {
                    hid.current = vec![0; 3];
                }
            }),
        ),
        (
            "a tablet's state for the keyboard",
            Box::new(|s| {
                let tablet = s.ports[TABLET_PORT - 1].device.clone().unwrap();
                *keyboard(s) = tablet;
            }),
        ),
        (
            "MSI-X on a controller without it",
            Box::new(|s| {
                s.msix = Some(pci::msix::SavedMsix {
                    control: 0,
                    table: vec![[0; 4]; NUM_INTRS],
                    pba: vec![0],
                })
            }),
        ),
    ];
    for (what, damage) in damaged {
        let mut bad = good.clone();
        damage(&mut bad);
        let fresh = Driver::new(XhciConfig::default());
        let before = fresh.x.save_state().unwrap();
        assert!(fresh.x.restore_state(&bad).is_err(), "{what}: accepted");
        assert_eq!(fresh.x.save_state().unwrap(), before, "{what}");
    }
    let fresh = Driver::new(XhciConfig::default());
    fresh.x.restore_state(&good).unwrap();
    assert_eq!(fresh.x.save_state().unwrap().slots, good.slots);
}
