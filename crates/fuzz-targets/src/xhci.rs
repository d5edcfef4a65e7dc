//! The XHCI controller with the vmapple keyboard and tablet attached: BAR 0
//! accesses, with command, transfer and event rings in the fuzz RAM, plus
//! host input, PCI resets and Bus Master toggles as extras.

use std::sync::Arc;

use pci::PciDevice;
use usb::xhci::regs::*;
use usb::xhci::trb::{CC_SUCCESS, TRB_COMMAND_COMPLETION, TRB_TRANSFER_EVENT};
use usb::{InputEvent, Xhci, XhciConfig};
use vm_core::memory::read_exact;
use vm_core::{AccessWidth, GuestRam, MmioDevice, TestIrq};

use crate::input::{self, Input, RAM_BASE, RAM_SEED_LEN};
use crate::Report;

/// BAR 0 as an [`MmioDevice`], the way the PCI host reaches it.
struct Bar0<'a>(&'a Xhci);

impl MmioDevice for Bar0<'_> {
    fn read(&self, offset: u64, width: AccessWidth) -> u64 {
        self.0.read_bar(0, offset, width)
    }
    fn write(&self, offset: u64, width: AccessWidth, value: u64) {
        self.0.write_bar(0, offset, width, value)
    }
}

/// Offset of interrupter `i`'s register `reg` in BAR 0.
pub fn ir(i: u64, reg: u64) -> u64 {
    RUNTIME_BASE + RT_IR_BASE + IR_STRIDE * i + reg
}

fn registers() -> Vec<u64> {
    let mut r = vec![
        OP_BASE + OP_USBCMD,
        OP_BASE + OP_USBSTS,
        OP_BASE + OP_DNCTRL,
        OP_BASE + OP_CRCR_LO,
        OP_BASE + OP_CRCR_HI,
        OP_BASE + OP_DCBAAP_LO,
        OP_BASE + OP_DCBAAP_HI,
        OP_BASE + OP_CONFIG,
        RUNTIME_BASE + RT_MFINDEX,
    ];
    for port in 0..NUM_PORTS as u64 {
        let base = OP_BASE + OP_PORT_BASE + PORT_STRIDE * port;
        r.extend([base + PORT_SC, base + PORT_PMSC, base + PORT_HLPMC]);
    }
    for i in 0..2 {
        r.extend([
            ir(i, IR_IMAN),
            ir(i, IR_IMOD),
            ir(i, IR_ERSTSZ),
            ir(i, IR_ERSTBA_LO),
            ir(i, IR_ERDP_LO),
            ir(i, IR_ERDP_HI),
        ]);
    }
    // Doorbells: the host controller's and the first slots'.
    for slot in 0..4 {
        r.extend([DOORBELL_BASE + 4 * slot; 3]);
    }
    r
}

/// Successful command completions and transfer events in interrupter 0's
/// first event-ring segment, first lap (cycle bit 1): evidence that the
/// controller really ran commands and transfers.
fn successful_events(x: &Xhci, mem: &GuestRam) -> u64 {
    let erstba = x.read_bar(0, ir(0, IR_ERSTBA_LO), AccessWidth::Double) & ERSTBA_PTR_MASK;
    let mut entry = [0u8; 16];
    if read_exact(mem, erstba, &mut entry).is_err() {
        return 0;
    }
    let base = u64::from_le_bytes(entry[0..8].try_into().unwrap_or_default()) & !0x3f;
    let trbs = u32::from_le_bytes(entry[8..12].try_into().unwrap_or_default()).min(4096);
    (0..u64::from(trbs))
        .filter(|i| {
            let mut t = [0u8; 16];
            if read_exact(mem, base.wrapping_add(16 * i), &mut t).is_err() {
                return false;
            }
            let status = u32::from_le_bytes([t[8], t[9], t[10], t[11]]);
            let control = u32::from_le_bytes([t[12], t[13], t[14], t[15]]);
            let ty = (control >> 10) & 0x3f;
            control & 1 == 1
                && (ty == TRB_COMMAND_COMPLETION || ty == TRB_TRANSFER_EVENT)
                && (status >> 24) as u8 == CC_SUCCESS
        })
        .count() as u64
}

/// The INTx line must follow interrupter 0 (IMAN.IP && IMAN.IE) and
/// USBCMD.INTE. A moderation timer thread may set IP meanwhile, so the
/// registers are read on both sides of the line and a change skips the
/// check.
fn check_line(x: &Xhci, irq: &TestIrq) {
    let iman = || x.read_bar(0, ir(0, IR_IMAN), AccessWidth::Word) as u32;
    let usbcmd = || x.read_bar(0, OP_BASE + OP_USBCMD, AccessWidth::Word) as u32;
    let (i1, c1) = (iman(), usbcmd());
    let level = irq.is_asserted();
    let (i2, c2) = (iman(), usbcmd());
    if i1 == i2 && c1 == c2 {
        let want = i1 & IMAN_IP != 0 && i1 & IMAN_IE != 0 && c1 & USBCMD_INTE != 0;
        assert_eq!(level, want, "xhci INTx with IMAN {i1:#x} USBCMD {c1:#x}");
    }
}

/// XHCI with a keyboard and a tablet.
pub fn xhci(data: &[u8]) -> Report {
    let mut input = Input::new(data);
    let mem = input::guest_memory(&mut input);
    let x = Xhci::with_hid_devices(mem.clone(), XhciConfig::default());
    let irq = Arc::new(TestIrq::new());
    x.set_intx(irq.clone());
    // Memory space and Bus Master Enable, as firmware leaves them.
    x.command_written(0x0006);
    let sink = x.input_sink();
    let regs = registers();
    let bar = Bar0(&x);
    let mut report = Report {
        ops: input::drive_with(
            &mut input,
            &bar,
            BAR_SIZE,
            &regs,
            |input| match input.u8() % 8 {
                0 => {
                    let usage = input.u8();
                    sink.send(InputEvent::Key {
                        usage,
                        pressed: input.u8() & 1 == 1,
                    });
                }
                1 => {
                    let (px, py) = (input.u16(), input.u16());
                    sink.send(InputEvent::PointerAbs { x: px, y: py });
                }
                2 => {
                    sink.send(InputEvent::Buttons(input.u8()));
                }
                3 => {
                    sink.send(InputEvent::Wheel(input.u8() as i8));
                }
                4 => x.reset(),
                5 => x.command_written(input.u16()),
                6 => {
                    let at = u64::from(input.u16()) % RAM_SEED_LEN as u64;
                    let len = usize::from(input.u8() % 32);
                    let bytes = input.take(len);
                    vm_core::memory::write_all(&mem, RAM_BASE + at, bytes).expect("inside RAM");
                }
                _ => {
                    let offset = u16::from(input.u8());
                    let width =
                        AccessWidth::from_bytes(1 << (input.u8() % 3)).unwrap_or(AccessWidth::Word);
                    let value = input.u32();
                    x.write_config(offset, width, value);
                    let v = x.read_config(offset, width);
                    assert_eq!(
                        u64::from(v) & !width.mask(),
                        0,
                        "config read wider than {width}"
                    );
                }
            },
            |_, _| check_line(&x, &irq),
        ),
        ..Report::default()
    };
    report.completions = successful_events(&x, &mem);
    report.interrupts = irq.rising_edges();
    report
}
