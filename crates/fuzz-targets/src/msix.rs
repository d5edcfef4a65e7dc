//! A PCI function's MSI-X (capability, table, PBA) wired to the GIC's
//! message-based SPIs, as `--msi on` wires it: a hostile guest programs
//! the table with any address and data, toggles enable and masks, rings
//! the v2m frame and the distributor's doorbells directly, and the
//! function sends vectors (also ones past the table). Nothing may panic,
//! and no message may make an SPI outside the message block pending.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use gic::message::{Doorbells, GICD_CLRSPI_NSR, GICD_SETSPI_NSR, V2M_MSI_SETSPI_NS, V2M_MSI_TYPER};
use gic::{CpuInterruptOutputs, GicV3};
use pci::msix::{MsixLayout, CONTROL_OFFSET, ENTRY_SIZE};
use pci::{CapabilityList, MsiSink, Msix};
use vm_core::{AccessWidth, MmioDevice};

use crate::input::{self, Input, RAM_SEED_LEN};
use crate::Report;

/// The fuzz region: config space, the table and PBA, the v2m frame and
/// the first 256 bytes of the distributor.
pub const CONFIG: u64 = 0x0000;
pub const TABLE: u64 = 0x1000;
pub const PBA: u64 = 0x1800;
pub const V2M: u64 = 0x2000;
pub const GICD: u64 = 0x3000;
const SIZE: u64 = 0x3100;
/// Vectors of the function (a virtio-blk with 16 queues has 17).
pub const VECTORS: u16 = 17;
/// Guest-physical doorbells, as the machine places them.
pub const DOORBELLS: Doorbells = Doorbells {
    v2m_base: 0x1fff_0000,
    gicd_base: 0x1000_0000,
};
/// The message block: SPIs 0x80.. (INTIDs 0xA0..0x120).
const FIRST_INTID: u32 = 0xa0;

struct NoCpus;

impl CpuInterruptOutputs for NoCpus {
    fn set(&self, _cpu: usize, _irq: bool, _fiq: bool) {}
}

/// The board's MSI sink, counting what reached the GIC.
struct Sink {
    gic: Arc<GicV3>,
    delivered: AtomicU64,
}

impl MsiSink for Sink {
    fn send(&self, address: u64, data: u32) {
        if DOORBELLS.deliver(&self.gic, address, data) {
            self.delivered.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// The region as one device.
struct Region {
    caps: std::sync::Mutex<CapabilityList>,
    msix: Msix,
    v2m: Arc<dyn MmioDevice>,
    gicd: Arc<dyn MmioDevice>,
}

impl MmioDevice for Region {
    fn read(&self, offset: u64, width: AccessWidth) -> u64 {
        match offset {
            CONFIG..TABLE if offset < 0x100 => {
                let caps = self.caps.lock().unwrap();
                let at = offset as u16;
                match width {
                    AccessWidth::Double => {
                        u64::from(caps.read(at, AccessWidth::Word))
                            | u64::from(caps.read(at.saturating_add(4), AccessWidth::Word)) << 32
                    }
                    w => u64::from(caps.read(at, w)),
                }
            }
            TABLE..PBA => self.msix.read_table(offset - TABLE, width),
            PBA..V2M => self.msix.read_pba(offset - PBA, width),
            V2M..GICD => self.v2m.read(offset - V2M, width),
            GICD.. => self.gicd.read(offset - GICD, width),
            _ => 0,
        }
    }

    fn write(&self, offset: u64, width: AccessWidth, value: u64) {
        match offset {
            CONFIG..TABLE if offset < 0x100 => {
                let mut caps = self.caps.lock().unwrap();
                self.msix
                    .write_config(&mut caps, offset as u16, width, value as u32)
            }
            TABLE..PBA => self.msix.write_table(offset - TABLE, width, value),
            V2M..GICD => self.v2m.write(offset - V2M, width, value),
            GICD.. => self.gicd.write(offset - GICD, width, value),
            _ => {}
        }
    }
}

fn registers(cap: u64) -> Vec<u64> {
    let mut r = vec![
        CONFIG + cap + u64::from(CONTROL_OFFSET),
        V2M + V2M_MSI_SETSPI_NS,
        V2M + V2M_MSI_TYPER,
        GICD + GICD_SETSPI_NSR,
        GICD + GICD_CLRSPI_NSR,
        GICD,
        PBA,
    ];
    for v in 0..4 {
        r.extend((0..4).map(|f| TABLE + v * ENTRY_SIZE + 4 * f));
    }
    r
}

/// Pending bits of INTIDs `first..first + 32`.
fn pending_word(gicd: &dyn MmioDevice, first: u32) -> u64 {
    gicd.read(0x200 + u64::from(first / 32) * 4, AccessWidth::Word)
}

pub fn msix(data: &[u8]) -> Report {
    let mut input = Input::new(data);
    // Same input format as the targets with RAM; this one has none.
    input.take(RAM_SEED_LEN);
    let gic = GicV3::new(1, 256, Arc::new(NoCpus));
    assert!(gic.enable_message_spis(FIRST_INTID - 32, 128));
    let sink = Arc::new(Sink {
        gic: gic.clone(),
        delivered: AtomicU64::new(0),
    });
    let layout = MsixLayout {
        vectors: VECTORS,
        table_bar: 1,
        table_offset: 0,
        pba_bar: 1,
        pba_offset: 0x800,
    };
    let mut caps = CapabilityList::new();
    let msix = Msix::add(&mut caps, layout, sink.clone()).expect("room for MSI-X");
    // The function's command register lets it write memory throughout.
    msix.set_bus_master(true);
    let cap = u64::from(msix.offset());
    let region = Region {
        caps: std::sync::Mutex::new(caps),
        msix,
        v2m: gic.v2m_frame(),
        gicd: gic.distributor(),
    };
    let ops = input::drive_with(
        &mut input,
        &region,
        SIZE,
        &registers(cap),
        |input| {
            // The function signals a vector, maybe one past its table.
            region.msix.notify(input.u16() % (VECTORS + 8));
        },
        |_, _| {},
    );
    // No message reaches an SPI outside the block: INTIDs 32..0xA0 have
    // no line in this rig, so nothing may be pending there.
    let gicd = gic.distributor();
    for first in (32..FIRST_INTID).step_by(32) {
        assert_eq!(pending_word(gicd.as_ref(), first), 0, "INTIDs {first}..");
    }
    let pending_messages: u64 = (FIRST_INTID..FIRST_INTID + 128)
        .step_by(32)
        .map(|first| u64::from(pending_word(gicd.as_ref(), first).count_ones()))
        .sum();
    Report {
        ops,
        completions: pending_messages,
        interrupts: sink.delivered.load(Ordering::SeqCst),
    }
}
